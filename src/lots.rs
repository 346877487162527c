//! Lots: where a balance's credits came from, what remains of each, and when it expires.
//! `GET /v1/me/lots`, `GET /v1/admin/users/{id}/lots`, and the per-source rules an admin sets
//! (`GET /v1/admin/credit-sources`, `PUT /v1/admin/credit-sources/{source}`). The spend order
//! and expiry are in the lots and holds migration.

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::{AdminCaller, AuthUser};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::extract::{ApiJson, ApiQuery, IdPath, List, PageParams};
use crate::limits;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(my_lots))
        .routes(routes!(user_lots))
        .routes(routes!(credit_sources))
        .routes(routes!(set_credit_source))
}

/// Credits from one grant.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Lot {
    pub id: Uuid,
    /// `opening` (a balance from before lots), `stripe`, `subscription`, `ad_view`, `admin` or
    /// `system`.
    pub source: String,
    /// Credits granted.
    pub amount: i32,
    /// Credits left: 0 once spent or expired.
    pub remaining: i32,
    /// Lower is spent first.
    pub priority: i32,
    /// Null: never expires.
    #[serde(serialize_with = "crate::timestamps::optional_utc")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "crate::timestamps::utc")]
    pub created_at: DateTime<Utc>,
    #[serde(skip)]
    #[schema(ignore)]
    pub seq: i64,
}

/// How lots from one source are spent and when they expire.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreditSource {
    /// `opening`, `stripe`, `subscription`, `ad_view`, `admin` or `system`.
    pub source: String,
    /// Lower is spent first (0–1000).
    pub priority: i32,
    /// Days before a new lot expires; null: never. Subscription lots expire at the end of the
    /// period paid for when it is known.
    pub expires_after_days: Option<i32>,
}

/// `{"items": [...]}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreditSources {
    pub items: Vec<CreditSource>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditSourceUpdate {
    /// Lower is spent first, 0–1000.
    #[schema(minimum = 0, maximum = 1000)]
    pub priority: i64,
    /// Days before a new lot expires, 1–36,500; null: never. Lots already granted keep theirs.
    #[schema(minimum = 1, maximum = 36_500)]
    pub expires_after_days: Option<i64>,
}

/// `?all=true` includes spent and expired lots.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LotListParams {
    /// `true` to include spent and expired lots.
    #[param(value_type = Option<bool>)]
    pub all: Option<String>,
    /// Items per page, 1–100 (default 20).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[0-9]{0,18}$")]
    pub cursor: Option<String>,
}

impl LotListParams {
    fn check(self) -> Result<(bool, crate::extract::Page<i64>), ApiError> {
        let all = match self.all.as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(_) => return Err(ApiError::field("all", "must be true or false")),
        };
        let page = PageParams {
            limit: self.limit,
            cursor: self.cursor,
        }
        .check()?;
        Ok((all, page))
    }
}

/// The caller's lots, newest first: live ones (credits left, not expired) unless `all=true`.
#[utoipa::path(
    get,
    path = "/v1/me/lots",
    tag = "credits",
    security(("bearer" = [])),
    params(LotListParams),
    responses(
        (status = 200, body = List<Lot>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Bad all, limit or cursor", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn my_lots(
    State(state): State<AppState>,
    user: AuthUser,
    ApiQuery(params): ApiQuery<LotListParams>,
) -> ApiResult<Json<List<Lot>>> {
    let (all, page) = params.check()?;
    let rows = sqlx::query_as!(
        Lot,
        r#"select id as "id!", source as "source!", amount as "amount!",
                  remaining as "remaining!", priority as "priority!", expires_at,
                  created_at as "created_at!", seq as "seq!"
             from public.lots_as_user($1, $2, $3, $4)"#,
        &*user.claims,
        all,
        page.after,
        (page.limit + 1) as i32,
    )
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(List::from_rows(rows, page.limit, |l| {
        l.seq.to_string()
    })))
}

/// A user's lots, newest first: live ones unless `all=true`.
#[utoipa::path(
    get,
    path = "/v1/admin/users/{id}/lots",
    tag = "admin",
    security(("bearer" = [])),
    params(("id" = Uuid, Path), LotListParams),
    responses(
        (status = 200, body = List<Lot>),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn user_lots(
    State(state): State<AppState>,
    _admin: AdminCaller,
    IdPath(id): IdPath,
    ApiQuery(params): ApiQuery<LotListParams>,
) -> ApiResult<Json<List<Lot>>> {
    let (all, page) = params.check()?;
    let rows = sqlx::query_as!(
        Lot,
        r#"select id, source, amount, remaining, priority, expires_at, created_at, seq
             from public.credit_lots
            where user_id = $1
              and ($2 or (remaining > 0 and (expires_at is null or expires_at > public.clock_now())))
              and ($3::bigint is null or seq < $3)
            order by seq desc
            limit $4"#,
        id,
        all,
        page.after,
        page.limit + 1,
    )
    .fetch_all(&state.pool)
    .await?;
    if rows.is_empty() {
        let exists = sqlx::query_scalar!(
            r#"select exists (select 1 from public.profiles where id = $1) as "exists!""#,
            id
        )
        .fetch_one(&state.pool)
        .await?;
        if !exists {
            return Err(ApiError::ProfileNotFound);
        }
    }
    Ok(Json(List::from_rows(rows, page.limit, |l| {
        l.seq.to_string()
    })))
}

/// Every source of credits, with its priority and expiry.
#[utoipa::path(
    get,
    path = "/v1/admin/credit-sources",
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, body = CreditSources),
        (status = 403, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn credit_sources(
    State(state): State<AppState>,
    _admin: AdminCaller,
) -> ApiResult<Json<CreditSources>> {
    let items = sqlx::query_as!(
        CreditSource,
        "select source, priority, expires_after_days from public.credit_sources
          order by priority, source",
    )
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(CreditSources { items }))
}

/// Sets a source's priority and expiry. Lots granted from now on follow them; the spend order
/// of existing lots keeps the priority they were granted with.
#[utoipa::path(
    put,
    path = "/v1/admin/credit-sources/{source}",
    tag = "admin",
    security(("bearer" = [])),
    params(("source" = String, Path, description = "`opening`, `stripe`, `subscription`, `ad_view`, `admin` or `system`")),
    request_body = CreditSourceUpdate,
    responses(
        (status = 200, body = CreditSource),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such source (`not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn set_credit_source(
    State(state): State<AppState>,
    _admin: AdminCaller,
    Path(source): Path<String>,
    body: ApiJson<CreditSourceUpdate>,
) -> ApiResult<Json<CreditSource>> {
    let request = body.value;
    let mut errors = Vec::new();
    if !(0..=limits::SOURCE_PRIORITY_MAX).contains(&request.priority) {
        errors.push(FieldError::new(
            "priority",
            format!(
                "must be a whole number from 0 to {}",
                limits::SOURCE_PRIORITY_MAX
            ),
        ));
    }
    if let Some(days) = request.expires_after_days
        && !(1..=limits::SOURCE_EXPIRY_DAYS_MAX).contains(&days)
    {
        errors.push(FieldError::new(
            "expires_after_days",
            format!(
                "must be a whole number from 1 to {}, or null",
                limits::SOURCE_EXPIRY_DAYS_MAX
            ),
        ));
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let updated = sqlx::query_as!(
        CreditSource,
        "update public.credit_sources
            set priority = $2, expires_after_days = $3
          where source = $1
         returning source, priority, expires_after_days",
        &source,
        request.priority as i32,
        request.expires_after_days.map(|d| d as i32),
    )
    .fetch_optional(&state.pool)
    .await?;
    updated.map(Json).ok_or(ApiError::NotFound("credit source"))
}
