//! Rewarded ads. A view pays through an ad session the server opened ([`sessions`]), in
//! `admob` mode only once AdMob's signed callback for it arrived ([`admob`]);
//! `POST /v1/ads/views`, a view on the client's word, answers only in `client` mode, for local
//! development. The limit and the reward are decided by `public.handle_ad_view` (see the
//! credit functions migration) on every path; the sessions' rules by the functions of the ad
//! sessions migration. This module validates, refuses anonymous users, and maps the outcome.

pub mod admob;
pub mod sessions;

use axum::extract::{OriginalUri, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::config::AdsVerification;
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::extract::{ApiJson, check_text};
use crate::idempotency::{self, Claim, IdempotencyKey};
use crate::limits;
use crate::state::AppState;
use crate::{db, telemetry};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(record_view))
        .routes(routes!(sessions::open_session))
        .routes(routes!(sessions::get_session))
        .routes(routes!(sessions::complete_session))
        .routes(routes!(admob::ssv_callback))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdViewRequest {
    /// Seconds of the ad actually watched, 0–86400.
    #[schema(minimum = 0, maximum = 86400)]
    pub duration_seconds: i64,
    /// The ad unit shown (at most 255 characters).
    pub ad_unit_id: Option<String>,
    /// The ad network (at most 255 characters).
    pub provider: Option<String>,
}

#[derive(Debug)]
struct AdViewRow {
    view_id: Uuid,
    credits_awarded: i32,
    balance: i32,
    views_today: i32,
    views_remaining: i32,
    resets_at: DateTime<Utc>,
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
    #[serde(serialize_with = "crate::timestamps::utc")]
    pub resets_at: DateTime<Utc>,
}

/// Records an ad view on the client's word and pays its reward (at most 10 views per UTC
/// day). Only in the `client` verification mode, for local development; otherwise 409
/// `ad_session_required`: use an ad session.
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
        (status = 409, description = "Not in the `client` verification mode (`ad_session_required`)", body = Problem, content_type = "application/problem+json"),
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
    if state.config.ads.verification != AdsVerification::Client {
        metrics::counter!("ad_views_total", "outcome" => "session_required").increment(1);
        return Err(ApiError::AdSessionRequired);
    }
    if user.is_anonymous && !state.config.allow_anonymous_rewards {
        return Err(ApiError::AnonymousUser);
    }
    let request = body.value;
    let mut errors = Vec::new();
    if !(0..=limits::AD_DURATION_MAX).contains(&request.duration_seconds) {
        errors.push(FieldError::new(
            "duration_seconds",
            format!(
                "must be a whole number from 0 to {}",
                limits::AD_DURATION_MAX
            ),
        ));
    }
    check_text(
        &mut errors,
        "ad_unit_id",
        &request.ad_unit_id,
        limits::AD_UNIT_CHARS,
    );
    check_text(
        &mut errors,
        "provider",
        &request.provider,
        limits::AD_PROVIDER_CHARS,
    );
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }

    let hash = idempotency::fingerprint(&Method::POST, uri.path(), &body.document);
    // The claim of the key, the view and the stored answer are one unit of work: a conflict
    // rolls all of it back and it runs again.
    let result =
        db::retrying_conflicts(|| record(&state, &user, key.as_deref(), &hash, &request)).await;
    let outcome = match &result {
        Ok(_) => "accepted",
        Err(ApiError::DailyAdLimitReached { .. }) => "refused",
        Err(_) => "failed",
    };
    metrics::counter!("ad_views_total", "outcome" => outcome).increment(1);
    result
}

async fn record(
    state: &AppState,
    user: &AuthUser,
    key: Option<&str>,
    hash: &[u8],
    request: &AdViewRequest,
) -> ApiResult<Response> {
    let mut work =
        match idempotency::try_processing(&state.pool, &user.id.to_string(), key, hash).await? {
            Claim::Replay(answer) => return Ok(answer),
            Claim::Start(work) => work,
        };
    // The day, the count and the reset time are the database's (public.ad_allowance).
    let row = sqlx::query_as!(
        AdViewRow,
        r#"select v.view_id as "view_id!", v.credits_awarded as "credits_awarded!",
                  v.balance as "balance!", a.views_today as "views_today!",
                  a.views_remaining as "views_remaining!", a.resets_at as "resets_at!"
             from public.handle_ad_view($1, $2, $3, $4) v
            cross join lateral public.ad_allowance((now() at time zone 'utc')::date, v.views_today) a"#,
        user.id,
        request.duration_seconds as i32,
        request.ad_unit_id.as_deref(),
        request.provider.as_deref(),
    )
    .fetch_one(work.conn())
    .await?;
    let answer = work
        .save(
            StatusCode::CREATED,
            &AdViewResult {
                view_id: row.view_id,
                duration_seconds: request.duration_seconds,
                credits_awarded: row.credits_awarded,
                balance: row.balance,
                views_today: row.views_today,
                views_remaining: row.views_remaining,
                resets_at: row.resets_at,
            },
        )
        .await?;
    telemetry::credits_granted("ad_view", i64::from(row.credits_awarded));
    Ok(answer)
}
