//! Rewarded ad views: `POST /v1/ads/views`. The limit and the reward are decided by
//! `public.handle_ad_view` (see the credit functions migration); this module validates,
//! refuses anonymous sessions, and maps the outcome.

use axum::extract::{OriginalUri, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::AuthUser;
use crate::credits::check_text;
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::extract::ApiJson;
use crate::idempotency::{self, IdempotencyKey, Stored};
use crate::profiles::next_midnight;
use crate::telemetry;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(record_view))
}

/// Seconds from `now` to the next midnight UTC (at least 1), for `Retry-After`.
pub fn seconds_until_utc_midnight(now: DateTime<Utc>) -> u64 {
    let next = next_midnight(now.date_naive());
    (next - now).num_seconds().max(1) as u64
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdViewRequest {
    /// Seconds of the ad actually watched, 0–86400.
    #[schema(minimum = 0, maximum = 86400)]
    pub duration_seconds: i64,
    /// The ad unit shown (at most 255 characters).
    pub ad_unit_id: Option<String>,
    /// The ad network (at most 100 characters).
    pub provider: Option<String>,
}

#[derive(Debug, FromRow)]
struct AdViewRow {
    view_id: Uuid,
    credits_awarded: i32,
    balance: i32,
    views_today: i32,
    daily_limit: i32,
    today: NaiveDate,
}

/// The outcome of a recorded ad view.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AdViewResult {
    pub view_id: Uuid,
    pub duration_seconds: i64,
    /// 2 for 30 s or more, 1 for 15–29 s, 0 below 15 s.
    pub credits_awarded: i32,
    pub balance: i32,
    pub views_today: i32,
    pub views_remaining: i32,
    pub resets_at: DateTime<Utc>,
}

/// Records an ad view and pays its reward (at most 10 views per UTC day).
#[utoipa::path(
    post,
    path = "/v1/ads/views",
    tag = "ads",
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for 24 h")),
    request_body = AdViewRequest,
    responses(
        (status = 201, body = AdViewResult),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Anonymous session (`anonymous_user`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Daily limit reached (`daily_ad_limit_reached`), with Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn record_view(
    State(state): State<AppState>,
    user: AuthUser,
    IdempotencyKey(key): IdempotencyKey,
    OriginalUri(uri): OriginalUri,
    body: ApiJson<AdViewRequest>,
) -> ApiResult<Response> {
    if user.is_anonymous && !state.config.allow_anonymous_rewards {
        return Err(ApiError::AnonymousUser);
    }
    let request = body.value;
    let mut errors = Vec::new();
    if !(0..=86_400).contains(&request.duration_seconds) {
        errors.push(FieldError::new(
            "duration_seconds",
            "must be a whole number from 0 to 86400",
        ));
    }
    check_text(&mut errors, "ad_unit_id", &request.ad_unit_id, 255);
    check_text(&mut errors, "provider", &request.provider, 100);
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }

    let hash = idempotency::fingerprint(&Method::POST, uri.path(), &body.document);
    let user_id = user.id;
    let result = idempotency::run(
        &state.pool,
        &user.id.to_string(),
        key.as_deref(),
        hash,
        move |conn| {
            Box::pin(async move {
                let row: AdViewRow = sqlx::query_as(
                    "select v.view_id, v.credits_awarded, v.balance, v.views_today,
                        public.ad_daily_limit() as daily_limit,
                        (now() at time zone 'utc')::date as today
                   from public.handle_ad_view($1, $2, $3, $4) v",
                )
                .bind(user_id)
                .bind(request.duration_seconds as i32)
                .bind(&request.ad_unit_id)
                .bind(&request.provider)
                .fetch_one(conn)
                .await?;
                telemetry::credits_granted("ad_view", i64::from(row.credits_awarded));
                Stored::json(
                    StatusCode::CREATED,
                    &AdViewResult {
                        view_id: row.view_id,
                        duration_seconds: request.duration_seconds,
                        credits_awarded: row.credits_awarded,
                        balance: row.balance,
                        views_today: row.views_today,
                        views_remaining: (row.daily_limit - row.views_today).max(0),
                        resets_at: next_midnight(row.today),
                    },
                )
            })
        },
    )
    .await;
    let outcome = match &result {
        Ok(_) => "accepted",
        Err(ApiError::DailyAdLimitReached { .. }) => "refused",
        Err(_) => "failed",
    };
    metrics::counter!("ad_views_total", "outcome" => outcome).increment(1);
    result
}
