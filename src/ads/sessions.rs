//! Ad sessions: `POST /v1/ads/sessions`, `GET /v1/ads/sessions/{id}` and
//! `POST /v1/ads/sessions/{id}/complete`. The server's clock opens a session; completing it
//! pays for no more seconds than that clock saw pass, once. The rules (the open-session cap,
//! expiry, the credited duration, exactly-once, waiting for AdMob's callback) are
//! `public.open_ad_session` and `public.complete_ad_session`; this module validates and maps.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::AdViewResult;
use crate::auth::AuthUser;
use crate::config::AdsVerification;
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::extract::{ApiJson, IdPath, check_text};
use crate::limits;
use crate::state::AppState;
use crate::telemetry;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdSessionRequest {
    /// The ad unit to be shown (at most 255 characters).
    pub ad_unit_id: Option<String>,
    /// The ad network (at most 255 characters).
    pub provider: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdSessionCompletion {
    /// Seconds of the ad the app says were watched, 0–86400. The credited duration is at most
    /// the time the server saw pass since the session opened.
    #[schema(minimum = 0, maximum = 86400)]
    pub duration_seconds: i64,
}

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AdSessionStatus {
    /// Opened, waiting for its completion (and, in `admob` mode, AdMob's callback).
    Open,
    /// AdMob's callback arrived; the completion pays.
    Verified,
    /// Completed in `admob` mode before the callback; the callback pays.
    PendingVerification,
    /// Paid (`result` says what).
    Completed,
    /// Outlived `expires_at` unfinished: pays nothing.
    Expired,
}

/// What the app passes to the ad SDK (AdMob's `ServerSideVerificationOptions`), and AdMob
/// echoes in its callback.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SsvOptions {
    /// The user's id: `userIdentifier` / `setUserId`.
    pub user_id: String,
    /// The session's id: `customRewardString` / `setCustomData`.
    pub custom_data: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AdSession {
    pub id: Uuid,
    pub status: AdSessionStatus,
    pub provider: Option<String>,
    pub ad_unit_id: Option<String>,
    #[serde(serialize_with = "crate::timestamps::utc")]
    pub started_at: DateTime<Utc>,
    #[serde(serialize_with = "crate::timestamps::utc")]
    pub expires_at: DateTime<Utc>,
    pub ssv: SsvOptions,
    /// The paid view, once completed; its `duration_seconds` is the credited duration.
    pub result: Option<AdViewResult>,
}

struct SessionRow {
    id: Uuid,
    user_id: Uuid,
    status: String,
    provider: Option<String>,
    ad_unit_id: Option<String>,
    started_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    result: Option<serde_json::Value>,
    /// Paid by the statement that read it (not a repeat).
    paid_now: bool,
}

impl SessionRow {
    fn into_session(self) -> ApiResult<AdSession> {
        let status = serde_json::from_value(serde_json::Value::String(self.status))
            .map_err(|e| ApiError::Internal(e.into()))?;
        let result = self
            .result
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| ApiError::Internal(e.into()))?;
        Ok(AdSession {
            id: self.id,
            status,
            provider: self.provider,
            ad_unit_id: self.ad_unit_id,
            started_at: self.started_at,
            expires_at: self.expires_at,
            ssv: SsvOptions {
                user_id: self.user_id.to_string(),
                custom_data: self.id.to_string(),
            },
            result,
        })
    }
}

fn refused(reason: &'static str) {
    metrics::counter!("ad_sessions_refused_total", "reason" => reason).increment(1);
}

/// Opens an ad session with the server's clock; its `ssv` values go to the ad SDK.
#[utoipa::path(
    post,
    path = "/v1/ads/sessions",
    tag = "ads",
    security(("bearer" = [])),
    request_body = AdSessionRequest,
    responses(
        (status = 201, body = AdSession),
        (status = 403, description = "Anonymous session (`anonymous_user`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The user has `ADS_MAX_OPEN_SESSIONS` unfinished sessions (`too_many_ad_sessions`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "No view left today (`daily_ad_limit_reached`), with Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn open_session(
    State(state): State<AppState>,
    user: AuthUser,
    body: ApiJson<AdSessionRequest>,
) -> ApiResult<Response> {
    if user.is_anonymous && !state.config.allow_anonymous_rewards {
        refused("anonymous_user");
        return Err(ApiError::AnonymousUser);
    }
    let request = body.value;
    let mut errors = Vec::new();
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
    let row = sqlx::query_as!(
        SessionRow,
        r#"select s.id as "id!", s.user_id as "user_id!",
                  public.ad_session_status(s.status, s.expires_at) as "status!",
                  s.provider, s.ad_unit_id, s.started_at as "started_at!",
                  s.expires_at as "expires_at!", s.result, false as "paid_now!"
             from public.open_ad_session($1, $2, $3, $4, $5) s"#,
        user.id,
        request.ad_unit_id.as_deref(),
        request.provider.as_deref(),
        state.config.ads.session_ttl_seconds,
        state.config.ads.max_open_sessions,
    )
    .fetch_one(&state.pool)
    .await
    .map_err(ApiError::from);
    let row = match row {
        Ok(row) => row,
        Err(err) => {
            match &err {
                ApiError::TooManyAdSessions => refused("too_many_ad_sessions"),
                ApiError::DailyAdLimitReached { .. } => refused("daily_ad_limit_reached"),
                _ => {}
            }
            return Err(err);
        }
    };
    metrics::counter!("ad_sessions_opened_total").increment(1);
    Ok((StatusCode::CREATED, axum::Json(row.into_session()?)).into_response())
}

/// One of the user's ad sessions.
#[utoipa::path(
    get,
    path = "/v1/ads/sessions/{id}",
    tag = "ads",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The session's id")),
    responses(
        (status = 200, body = AdSession),
        (status = 404, description = "No such session of this user (`not_found`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_session(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath,
) -> ApiResult<axum::Json<AdSession>> {
    let row = sqlx::query_as!(
        SessionRow,
        r#"select s.id, s.user_id, public.ad_session_status(s.status, s.expires_at) as "status!",
                  s.provider, s.ad_unit_id, s.started_at, s.expires_at, s.result,
                  false as "paid_now!"
             from public.ad_sessions s
            where s.id = $1 and s.user_id = $2"#,
        id,
        user.id,
    )
    .fetch_optional(&state.pool)
    .await?
    .ok_or(ApiError::NotFound("ad session"))?;
    Ok(axum::Json(row.into_session()?))
}

/// Completes an ad session: pays for the watched seconds, at most the time the server saw pass
/// since the session opened, once. In `admob` mode a session whose callback has not arrived
/// answers 202 `pending_verification`, and the callback pays it.
#[utoipa::path(
    post,
    path = "/v1/ads/sessions/{id}/complete",
    tag = "ads",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The session's id")),
    request_body = AdSessionCompletion,
    responses(
        (status = 201, description = "Completed and paid (or completed before: the same session, nothing paid again)", body = AdSession),
        (status = 202, description = "`admob` mode: waiting for AdMob's callback, which pays it", body = AdSession),
        (status = 404, description = "No such session of this user (`not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The session outlived `expires_at` (`ad_session_expired`); nothing paid", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "No view left today (`daily_ad_limit_reached`), with Retry-After; nothing paid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn complete_session(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath,
    body: ApiJson<AdSessionCompletion>,
) -> ApiResult<Response> {
    let claimed = body.value.duration_seconds;
    if !(0..=limits::AD_DURATION_MAX).contains(&claimed) {
        return Err(ApiError::Validation(vec![FieldError::new(
            "duration_seconds",
            format!(
                "must be a whole number from 0 to {}",
                limits::AD_DURATION_MAX
            ),
        )]));
    }
    let require_verification = state.config.ads.verification == AdsVerification::Admob;
    // `paid_now`: one statement, one transaction, so now() is the instant the function paid.
    let row = sqlx::query_as!(
        SessionRow,
        r#"select s.id as "id!", s.user_id as "user_id!",
                  public.ad_session_status(s.status, s.expires_at) as "status!",
                  s.provider, s.ad_unit_id, s.started_at as "started_at!",
                  s.expires_at as "expires_at!", s.result,
                  coalesce(s.paid_at = now(), false) as "paid_now!"
             from public.complete_ad_session($1, $2, $3, $4) s"#,
        id,
        user.id,
        claimed as i32,
        require_verification,
    )
    .fetch_one(&state.pool)
    .await
    .map_err(ApiError::from);
    let row = match row {
        Ok(row) => row,
        Err(err) => {
            match &err {
                ApiError::AdSessionExpired => refused("ad_session_expired"),
                ApiError::DailyAdLimitReached { .. } => refused("daily_ad_limit_reached"),
                _ => {}
            }
            return Err(err);
        }
    };
    let paid_now = row.paid_now;
    let session = row.into_session()?;
    if paid_now {
        session_paid(session.result.as_ref().map_or(0, |r| r.credits_awarded));
    }
    let status = if session.status == AdSessionStatus::PendingVerification {
        StatusCode::ACCEPTED
    } else {
        StatusCode::CREATED
    };
    Ok((status, axum::Json(session)).into_response())
}

/// A session paid, by its completion or by AdMob's callback.
pub(super) fn session_paid(credits_awarded: i32) {
    metrics::counter!("ad_sessions_completed_total").increment(1);
    if credits_awarded > 0 {
        metrics::counter!("ad_sessions_rewarded_total").increment(1);
    }
    telemetry::credits_granted("ad_view", i64::from(credits_awarded));
}
