//! The caller's images (generated and reference, with metadata and analysis):
//! `GET /v1/me/images` and `GET /v1/me/images/{id}`. Read as the user: RLS shows owners
//! their own images only.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{ApiQuery, IdPath, List, TimePageParams, time_id_cursor};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_images))
        .routes(routes!(get_image))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Image {
    pub id: Uuid,
    /// `generated` or `reference`.
    pub kind: String,
    /// Where the file is in Supabase Storage.
    pub storage_bucket: String,
    pub storage_path: String,
    pub prompt: Option<String>,
    pub model: Option<String>,
    pub width: Option<i32>,
    pub height: Option<i32>,
    pub mime_type: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// Results of image analysis, when done.
    #[schema(value_type = Option<Object>)]
    pub analysis: Option<serde_json::Value>,
    /// The spend that paid for a generated image.
    pub transaction_id: Option<Uuid>,
    #[serde(serialize_with = "crate::timestamps::utc")]
    pub created_at: DateTime<Utc>,
}

/// The caller's images, newest first.
#[utoipa::path(
    get,
    path = "/v1/me/images",
    tag = "images",
    security(("bearer" = [])),
    params(TimePageParams),
    responses(
        (status = 200, body = List<Image>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_images(
    State(state): State<AppState>,
    user: AuthUser,
    ApiQuery(params): ApiQuery<TimePageParams>,
) -> ApiResult<Json<List<Image>>> {
    let page = params.check()?;
    let after = page.after;
    // One round trip, as the user under RLS (see the user reads migration).
    let rows = sqlx::query_as!(
        Image,
        r#"select id as "id!", kind as "kind!", storage_bucket as "storage_bucket!",
                  storage_path as "storage_path!", prompt, model, width, height, mime_type,
                  metadata as "metadata!", analysis, transaction_id, created_at as "created_at!"
             from public.images_as_user($1, $2, $3, $4)"#,
        &*user.claims,
        after.map(|a| a.0),
        after.map(|a| a.1),
        (page.limit + 1) as i32,
    )
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(List::from_rows(rows, page.limit, |i| {
        time_id_cursor(&i.created_at, &i.id)
    })))
}

/// One of the caller's images; another user's image is not found.
#[utoipa::path(
    get,
    path = "/v1/me/images/{id}",
    tag = "images",
    security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, body = Image),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_image(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath,
) -> ApiResult<Json<Image>> {
    let image = sqlx::query_as!(
        Image,
        r#"select id as "id!", kind as "kind!", storage_bucket as "storage_bucket!",
                  storage_path as "storage_path!", prompt, model, width, height, mime_type,
                  metadata as "metadata!", analysis, transaction_id, created_at as "created_at!"
             from public.image_as_user($1, $2)"#,
        &*user.claims,
        id,
    )
    .fetch_optional(&state.pool)
    .await?;
    image.map(Json).ok_or(ApiError::NotFound("image"))
}
