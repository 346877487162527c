//! Holds: credits reserved while an image generation runs, then captured (all or part) or
//! released. `POST /v1/holds`, `GET /v1/holds/{id}`, `POST /v1/holds/{id}/capture`,
//! `POST /v1/holds/{id}/release` for the generation backend (the service_role key or an admin),
//! and `GET /v1/me/holds` for users. The rules (available balance, exactly once, expiry) are in
//! the lots and holds migration; a lapsed hold needs no job to free its credits.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{OriginalUri, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::{AdminCaller, AuthUser};
use crate::credits::Transaction;
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::extract::{
    ApiJson, ApiQuery, IdPath, List, PageParams, body_rejection, check_text,
    whole_numbers_as_integers,
};
use crate::idempotency::{self, Claim, IdempotencyKey};
use crate::state::AppState;
use crate::{db, limits, telemetry};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(reserve))
        .routes(routes!(get_hold))
        .routes(routes!(capture))
        .routes(routes!(release))
        .routes(routes!(my_holds))
}

/// Credits reserved for work under way.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Hold {
    pub id: Uuid,
    pub user_id: Uuid,
    /// Credits reserved.
    pub amount: i32,
    /// Credits a capture spent (0 until then).
    pub captured_amount: i32,
    /// `active`, `captured`, `released` or `expired` (an active hold whose `expires_at` passed).
    pub status: String,
    pub reference: Option<String>,
    pub description: Option<String>,
    #[serde(serialize_with = "crate::timestamps::utc")]
    pub created_at: DateTime<Utc>,
    /// When an active hold lapses by itself, its credits available again.
    #[serde(serialize_with = "crate::timestamps::utc")]
    pub expires_at: DateTime<Utc>,
    /// When it was captured, released or lapsed.
    #[serde(serialize_with = "crate::timestamps::optional_utc")]
    pub settled_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    #[schema(ignore)]
    pub seq: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldRequest {
    /// The user whose credits are reserved.
    pub user_id: Uuid,
    /// Credits to reserve, 1–1,000,000.
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub amount: i64,
    /// Seconds before the hold lapses by itself, 1–86,400 (default 600).
    #[schema(minimum = 1, maximum = 86_400)]
    pub ttl_seconds: Option<i64>,
    /// The caller's own reference, such as a generation id (at most 255 characters); the
    /// capture's ledger row carries it.
    pub reference: Option<String>,
    /// What the credits are for (at most 500 characters).
    pub description: Option<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    /// Credits to spend, 1 to the hold's amount (default: all of it). The rest is freed.
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub amount: Option<i64>,
    /// For the ledger row (at most 500 characters); the hold's description by default.
    pub description: Option<String>,
}

/// A captured hold, the spend it wrote, and the balance (total credits) after.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Capture {
    pub hold: Hold,
    pub transaction: Transaction,
    pub balance: i32,
}

/// A released hold and the balance (total credits) after.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Release {
    pub hold: Hold,
    pub balance: i32,
}

/// `?status=active` keeps active holds only.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HoldListParams {
    /// `active` for active holds only.
    #[param(value_type = Option<String>, pattern = "^active$")]
    pub status: Option<String>,
    /// Items per page, 1–100 (default 20).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[0-9]{0,18}$")]
    pub cursor: Option<String>,
}

/// Reserves credits of a user: they stay in the balance but cannot be spent until the hold is
/// captured, released, or lapses.
#[utoipa::path(
    post,
    path = "/v1/holds",
    tag = "holds",
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for 24 h")),
    request_body = HoldRequest,
    responses(
        (status = 201, body = Hold),
        (status = 402, description = "Available balance (credits less active holds) too low (`insufficient_credits`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not the service_role key or an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No profile for this user (`profile_not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn reserve(
    State(state): State<AppState>,
    caller: AdminCaller,
    IdempotencyKey(key): IdempotencyKey,
    OriginalUri(uri): OriginalUri,
    body: ApiJson<HoldRequest>,
) -> ApiResult<Response> {
    let request = body.value;
    let mut errors = Vec::new();
    if !(1..=limits::HOLD_MAX).contains(&request.amount) {
        errors.push(FieldError::new(
            "amount",
            format!("must be a whole number from 1 to {}", limits::HOLD_MAX),
        ));
    }
    let ttl = request.ttl_seconds.unwrap_or(limits::HOLD_TTL_DEFAULT);
    if !(1..=limits::HOLD_TTL_MAX).contains(&ttl) {
        errors.push(FieldError::new(
            "ttl_seconds",
            format!("must be a whole number from 1 to {}", limits::HOLD_TTL_MAX),
        ));
    }
    check_text(
        &mut errors,
        "reference",
        &request.reference,
        limits::REFERENCE_CHARS,
    );
    check_text(
        &mut errors,
        "description",
        &request.description,
        limits::DESCRIPTION_CHARS,
    );
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let hash = idempotency::fingerprint(&Method::POST, uri.path(), &body.document);
    let owner = format!("holds:{}", caller.actor());
    db::retrying_conflicts(|| async {
        let mut work =
            match idempotency::try_processing(&state.pool, &owner, key.as_deref(), &hash).await? {
                Claim::Replay(answer) => return Ok(answer),
                Claim::Start(work) => work,
            };
        let hold = sqlx::query_as!(
            Hold,
            r#"select id as "id!", user_id as "user_id!", amount as "amount!",
                      captured_amount as "captured_amount!", status as "status!", reference,
                      description, created_at as "created_at!", expires_at as "expires_at!",
                      settled_at, seq as "seq!"
                 from public.reserve_credits($1, $2, $3, $4, $5)"#,
            request.user_id,
            request.amount as i32,
            ttl as i32,
            request.reference.as_deref(),
            request.description.as_deref(),
        )
        .fetch_one(work.conn())
        .await?;
        work.save(StatusCode::CREATED, &hold).await
    })
    .await
}

/// One hold.
#[utoipa::path(
    get,
    path = "/v1/holds/{id}",
    tag = "holds",
    security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, body = Hold),
        (status = 403, description = "Not the service_role key or an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such hold (`not_found`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_hold(
    State(state): State<AppState>,
    _caller: AdminCaller,
    IdPath(id): IdPath,
) -> ApiResult<Json<Hold>> {
    let hold = sqlx::query_as!(
        Hold,
        r#"select s.id as "id!", s.user_id as "user_id!", s.amount as "amount!",
                  s.captured_amount as "captured_amount!", s.status as "status!", s.reference,
                  s.description, s.created_at as "created_at!", s.expires_at as "expires_at!",
                  s.settled_at, s.seq as "seq!"
             from public.credit_holds h
            cross join lateral public.hold_seen(h, public.clock_now()) s
            where h.id = $1"#,
        id,
    )
    .fetch_optional(&state.pool)
    .await?;
    hold.map(Json).ok_or(ApiError::NotFound("hold"))
}

/// Reads an optional JSON object body: an empty body is `{}`.
fn optional_body<T: Default + serde::de::DeserializeOwned>(
    bytes: &Bytes,
) -> Result<(T, serde_json::Value), ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok((T::default(), serde_json::json!({})));
    }
    let document: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::field("body", format!("malformed JSON: {e}")))?;
    if !document.is_object() {
        return Err(ApiError::field("body", "a JSON object is required"));
    }
    let document = whole_numbers_as_integers(document);
    let value = serde_path_to_error::deserialize(&document).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        ApiError::Validation(vec![FieldError::new(field, e.inner().to_string())])
    })?;
    Ok((value, document))
}

/// Spends what a hold reserved, all of it or part (the rest is freed), in one `spend` ledger
/// row carrying the hold's reference. Exactly once: a hold no longer active answers 409.
#[utoipa::path(
    post,
    path = "/v1/holds/{id}/capture",
    tag = "holds",
    security(("bearer" = [])),
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for 24 h")),
    request_body = CaptureRequest,
    responses(
        (status = 200, body = Capture),
        (status = 403, description = "Not the service_role key or an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such hold (`not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already captured, released or expired (`hold_not_active`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn capture(
    State(state): State<AppState>,
    caller: AdminCaller,
    IdPath(id): IdPath,
    IdempotencyKey(key): IdempotencyKey,
    OriginalUri(uri): OriginalUri,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Response> {
    let (request, document) = optional_body::<CaptureRequest>(&body.map_err(body_rejection)?)?;
    let mut errors = Vec::new();
    if let Some(amount) = request.amount
        && !(1..=limits::HOLD_MAX).contains(&amount)
    {
        errors.push(FieldError::new(
            "amount",
            "must be a whole number from 1 to the hold's amount",
        ));
    }
    check_text(
        &mut errors,
        "description",
        &request.description,
        limits::DESCRIPTION_CHARS,
    );
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let hash = idempotency::fingerprint(&Method::POST, uri.path(), &document);
    let owner = format!("holds:{}", caller.actor());
    db::retrying_conflicts(|| async {
        let mut work =
            match idempotency::try_processing(&state.pool, &owner, key.as_deref(), &hash).await? {
                Claim::Replay(answer) => return Ok(answer),
                Claim::Start(work) => work,
            };
        let row = sqlx::query!(
            r#"select h_id as "h_id!", h_user_id as "h_user_id!", h_amount as "h_amount!",
                      h_captured_amount as "h_captured_amount!", h_status as "h_status!",
                      h_reference, h_description, h_created_at as "h_created_at!",
                      h_expires_at as "h_expires_at!", h_settled_at, t_id as "t_id!",
                      t_amount as "t_amount!", t_balance_after as "t_balance_after!",
                      t_source as "t_source!", t_description, t_reference,
                      t_created_at as "t_created_at!", t_seq as "t_seq!", balance as "balance!"
                 from public.capture_hold($1, $2, $3)"#,
            id,
            request.amount.map(|a| a as i32),
            request.description.as_deref(),
        )
        .fetch_one(work.conn())
        .await?;
        let answer = Capture {
            hold: Hold {
                id: row.h_id,
                user_id: row.h_user_id,
                amount: row.h_amount,
                captured_amount: row.h_captured_amount,
                status: row.h_status,
                reference: row.h_reference,
                description: row.h_description,
                created_at: row.h_created_at,
                expires_at: row.h_expires_at,
                settled_at: row.h_settled_at,
                seq: 0,
            },
            transaction: Transaction {
                id: row.t_id,
                amount: row.t_amount,
                balance_after: row.t_balance_after,
                source: row.t_source,
                description: row.t_description,
                reference: row.t_reference,
                created_at: row.t_created_at,
                seq: row.t_seq,
            },
            balance: row.balance,
        };
        let captured = i64::from(answer.hold.captured_amount);
        let response = work.save(StatusCode::OK, &answer).await?;
        telemetry::credits_spent("hold", captured);
        Ok(response)
    })
    .await
}

/// Frees what a hold reserved. Exactly once: a hold no longer active answers 409.
#[utoipa::path(
    post,
    path = "/v1/holds/{id}/release",
    tag = "holds",
    security(("bearer" = [])),
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for 24 h")),
    responses(
        (status = 200, body = Release),
        (status = 403, description = "Not the service_role key or an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such hold (`not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already captured, released or expired (`hold_not_active`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn release(
    State(state): State<AppState>,
    caller: AdminCaller,
    IdPath(id): IdPath,
    IdempotencyKey(key): IdempotencyKey,
    OriginalUri(uri): OriginalUri,
) -> ApiResult<Response> {
    let hash = idempotency::fingerprint(&Method::POST, uri.path(), &serde_json::json!({}));
    let owner = format!("holds:{}", caller.actor());
    db::retrying_conflicts(|| async {
        let mut work =
            match idempotency::try_processing(&state.pool, &owner, key.as_deref(), &hash).await? {
                Claim::Replay(answer) => return Ok(answer),
                Claim::Start(work) => work,
            };
        let row = sqlx::query!(
            r#"select h_id as "h_id!", h_user_id as "h_user_id!", h_amount as "h_amount!",
                      h_captured_amount as "h_captured_amount!", h_status as "h_status!",
                      h_reference, h_description, h_created_at as "h_created_at!",
                      h_expires_at as "h_expires_at!", h_settled_at, balance as "balance!"
                 from public.release_hold($1)"#,
            id,
        )
        .fetch_one(work.conn())
        .await?;
        let answer = Release {
            hold: Hold {
                id: row.h_id,
                user_id: row.h_user_id,
                amount: row.h_amount,
                captured_amount: row.h_captured_amount,
                status: row.h_status,
                reference: row.h_reference,
                description: row.h_description,
                created_at: row.h_created_at,
                expires_at: row.h_expires_at,
                settled_at: row.h_settled_at,
                seq: 0,
            },
            balance: row.balance,
        };
        work.save(StatusCode::OK, &answer).await
    })
    .await
}

/// The caller's holds, newest first.
#[utoipa::path(
    get,
    path = "/v1/me/holds",
    tag = "credits",
    security(("bearer" = [])),
    params(HoldListParams),
    responses(
        (status = 200, body = List<Hold>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Bad status, limit or cursor", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn my_holds(
    State(state): State<AppState>,
    user: AuthUser,
    ApiQuery(params): ApiQuery<HoldListParams>,
) -> ApiResult<Json<List<Hold>>> {
    let only_active = match params.status.as_deref() {
        None => false,
        Some("active") => true,
        Some(_) => return Err(ApiError::field("status", "must be active, or absent")),
    };
    let page = PageParams {
        limit: params.limit,
        cursor: params.cursor,
    }
    .check()?;
    let rows = sqlx::query_as!(
        Hold,
        r#"select id as "id!", user_id as "user_id!", amount as "amount!",
                  captured_amount as "captured_amount!", status as "status!", reference,
                  description, created_at as "created_at!", expires_at as "expires_at!",
                  settled_at, seq as "seq!"
             from public.holds_as_user($1, $2, $3, $4)"#,
        &*user.claims,
        only_active,
        page.after,
        (page.limit + 1) as i32,
    )
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(List::from_rows(rows, page.limit, |h| {
        h.seq.to_string()
    })))
}
