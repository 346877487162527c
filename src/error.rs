//! The one error type of the HTTP layer, rendered as RFC 9457 `application/problem+json`
//! (docs/api.md, "Errors"), and the one place where database outcomes get their meaning.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The media type of every error answer.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The `Retry-After` of `503 unavailable`: a fault of the database or of the time limit, which
/// a retry after a short pause may not meet again (a restarting PostgreSQL is back in seconds).
pub const UNAVAILABLE_RETRY_AFTER_SECONDS: u64 = 1;

/// One field that failed validation.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable machine-readable code (docs/api.md, "Error codes").
    pub code: String,
    /// Present on `validation_failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid token: {0}")]
    InvalidToken(&'static str),
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    #[error("anonymous users cannot earn ad rewards")]
    AnonymousUser,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("profile not found")]
    ProfileNotFound,
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("insufficient credits")]
    InsufficientCredits,
    #[error("daily ad limit reached")]
    DailyAdLimitReached { retry_after_seconds: u64 },
    /// `POST /v1/ads/views` outside the `client` verification mode.
    #[error("an ad session is required")]
    AdSessionRequired,
    #[error("too many open ad sessions")]
    TooManyAdSessions,
    #[error("ad session expired")]
    AdSessionExpired,
    /// A capture or release of a hold already captured, released or expired.
    #[error("hold not active")]
    HoldNotActive,
    /// A query string that is not the shape a caller outside our API sends (AdMob's callback):
    /// 400 `validation_failed`, naming the parameters at fault.
    #[error("malformed query")]
    MalformedQuery(Vec<FieldError>),
    #[error("idempotency key reused with a different request")]
    IdempotencyKeyReused,
    #[error("invalid signature")]
    InvalidSignature,
    #[error("payload too large")]
    PayloadTooLarge { limit_bytes: usize },
    #[error("rate limited")]
    RateLimited { retry_after_seconds: u64 },
    #[error("stripe is not configured")]
    StripeNotConfigured,
    /// Stripe's API refused or failed a request (502).
    #[error("stripe error: {0}")]
    Stripe(&'static str),
    #[error("unavailable: {0}")]
    Unavailable(&'static str),
    /// The database rolled the transaction back to let a conflicting one finish (40001,
    /// 40P01): nothing was committed, so [`crate::db::retrying_conflicts`] runs the work again;
    /// answered 503 `unavailable` once its attempts are spent.
    #[error("the database rolled the transaction back (serialization failure or deadlock)")]
    Conflict,
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    /// A validation error on a single field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError::new(field, message)])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::AnonymousUser => StatusCode::FORBIDDEN,
            Self::NotFound(_) | Self::ProfileNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Validation(_) | Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InsufficientCredits => StatusCode::PAYMENT_REQUIRED,
            Self::DailyAdLimitReached { .. } | Self::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::InvalidSignature | Self::MalformedQuery(_) => StatusCode::BAD_REQUEST,
            Self::AdSessionRequired | Self::TooManyAdSessions | Self::HoldNotActive => {
                StatusCode::CONFLICT
            }
            Self::AdSessionExpired => StatusCode::GONE,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::StripeNotConfigured | Self::Unavailable(_) | Self::Conflict => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Stripe(_) => StatusCode::BAD_GATEWAY,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidToken(_) => "invalid_token",
            Self::Forbidden(_) => "forbidden",
            Self::AnonymousUser => "anonymous_user",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::ProfileNotFound => "profile_not_found",
            Self::Validation(_) | Self::MalformedQuery(_) => "validation_failed",
            Self::AdSessionRequired => "ad_session_required",
            Self::TooManyAdSessions => "too_many_ad_sessions",
            Self::AdSessionExpired => "ad_session_expired",
            Self::HoldNotActive => "hold_not_active",
            Self::InsufficientCredits => "insufficient_credits",
            Self::DailyAdLimitReached { .. } => "daily_ad_limit_reached",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::InvalidSignature => "invalid_signature",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::RateLimited { .. } => "rate_limited",
            Self::StripeNotConfigured => "stripe_not_configured",
            Self::Stripe(_) => "stripe_error",
            Self::Unavailable(_) | Self::Conflict => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::InvalidToken(_) => "Invalid or missing access token",
            Self::Forbidden(_) => "Forbidden",
            Self::AnonymousUser => "Anonymous users cannot do this",
            Self::NotFound(_) => "Not found",
            Self::MethodNotAllowed => "Method not allowed",
            Self::ProfileNotFound => "Profile not found",
            Self::Validation(_) | Self::MalformedQuery(_) => "The request is not valid",
            Self::AdSessionRequired => "Ad views are paid through ad sessions",
            Self::TooManyAdSessions => "Too many open ad sessions",
            Self::AdSessionExpired => "The ad session has expired",
            Self::HoldNotActive => "The hold is not active",
            Self::InsufficientCredits => "Not enough credits",
            Self::DailyAdLimitReached { .. } => "Daily ad view limit reached",
            Self::IdempotencyKeyReused => "Idempotency key already used for another request",
            Self::InvalidSignature => "Invalid signature",
            Self::PayloadTooLarge { .. } => "Request body too large",
            Self::RateLimited { .. } => "Too many requests",
            Self::StripeNotConfigured => "Payments are not configured",
            Self::Stripe(_) => "The payment provider failed",
            Self::Unavailable(_) | Self::Conflict => "Service unavailable",
            Self::Internal(_) => "Internal error",
        }
    }

    fn detail(&self) -> String {
        match self {
            Self::InvalidToken(why) => format!("The access token was refused: {why}."),
            Self::Forbidden(why) => format!("{why}."),
            Self::AnonymousUser => {
                "Anonymous sessions cannot earn ad rewards; sign in with an account first."
                    .to_owned()
            }
            Self::NotFound(what) => format!("No {what} matches this request."),
            Self::MethodNotAllowed => "This route does not take this method.".to_owned(),
            Self::ProfileNotFound => "No profile exists for this user.".to_owned(),
            Self::Validation(errors) | Self::MalformedQuery(errors) => {
                let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
                format!("Check these fields: {}.", fields.join(", "))
            }
            Self::AdSessionRequired => {
                "Open an ad session (POST /v1/ads/sessions) and complete it; views are not taken \
                 on the client's word."
                    .to_owned()
            }
            Self::TooManyAdSessions => {
                "Complete or let expire one of the open ad sessions before opening another."
                    .to_owned()
            }
            Self::AdSessionExpired => {
                "The ad session outlived its lifetime and pays nothing; open a new one.".to_owned()
            }
            Self::HoldNotActive => {
                "This hold was already captured, released or has expired; its credits are no \
                 longer reserved."
                    .to_owned()
            }
            Self::InsufficientCredits => "The balance is too low for this operation.".to_owned(),
            Self::DailyAdLimitReached { .. } => {
                "All of today's rewarded ad views are used; the count restarts at midnight UTC."
                    .to_owned()
            }
            Self::IdempotencyKeyReused => {
                "This Idempotency-Key was already used with a different request; use a new key."
                    .to_owned()
            }
            Self::InvalidSignature => {
                "The signature is missing or does not match what it signs.".to_owned()
            }
            Self::PayloadTooLarge { limit_bytes } => {
                format!("The request body exceeds the limit of {limit_bytes} bytes.")
            }
            Self::RateLimited {
                retry_after_seconds,
            } => {
                format!("Slow down; retry in {retry_after_seconds} s.")
            }
            Self::StripeNotConfigured => "Stripe is not configured on this server.".to_owned(),
            Self::Stripe(why) => format!("{why}."),
            Self::Unavailable(why) => format!("{why}; retry shortly."),
            Self::Conflict => {
                "The database is busy with conflicting work; retry shortly.".to_owned()
            }
            Self::Internal(_) => "Something went wrong on our side; it has been logged.".to_owned(),
        }
    }

    /// The problem document for this error.
    pub fn problem(&self) -> Problem {
        Problem {
            kind: format!(
                "https://docs.amethyst.ai/problems/{}",
                self.code().replace('_', "-")
            ),
            title: self.title().to_owned(),
            status: self.status().as_u16(),
            detail: self.detail(),
            code: self.code().to_owned(),
            errors: match self {
                Self::Validation(errors) | Self::MalformedQuery(errors) => Some(errors.clone()),
                _ => None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(cause) = &self {
            // Logged once, here; the answer says nothing internal.
            tracing::error!(error = format!("{cause:#}"), "request failed");
        }
        let status = self.status();
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        match &self {
            Self::InvalidToken(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer error="invalid_token""#),
                );
            }
            Self::DailyAdLimitReached {
                retry_after_seconds,
            }
            | Self::RateLimited {
                retry_after_seconds,
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_seconds));
            }
            Self::Unavailable(_) | Self::Conflict => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(UNAVAILABLE_RETRY_AFTER_SECONDS),
                );
            }
            _ => {}
        }
        response
    }
}

/// Database outcomes and their meaning. The SQL functions raise SQLSTATE class `AC` for the
/// business refusals (see `migrations/*_credit_functions.sql`).
impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err {
            match db.code().as_deref() {
                Some("AC402") => return Self::InsufficientCredits,
                Some("AC404") => return Self::ProfileNotFound,
                Some("ACS04") => return Self::NotFound("ad session"),
                Some("ACS09") => return Self::TooManyAdSessions,
                Some("ACS10") => return Self::AdSessionExpired,
                Some("ACH04") => return Self::NotFound("hold"),
                Some("ACH09") => return Self::HoldNotActive,
                // A value only the database can judge (against a hold's amount, its clock): the
                // field is the error's detail, the message its text.
                Some("AC422") => {
                    if let Some(e) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                        return Self::field(e.detail().unwrap_or("body"), e.message());
                    }
                }
                // The function says when the ad day ends, in seconds, as the error's detail.
                Some("AC429") => {
                    let retry_after_seconds = db
                        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                        .and_then(|e| e.detail())
                        .and_then(|d| d.parse::<u64>().ok())
                        .unwrap_or(1)
                        .max(1);
                    return Self::DailyAdLimitReached {
                        retry_after_seconds,
                    };
                }
                // The balance check is the last line of defence behind the functions.
                Some("23514") if db.constraint() == Some("profiles_credits_non_negative") => {
                    return Self::InsufficientCredits;
                }
                // A NUL character (or another one the database's encoding cannot hold) in text.
                Some("22P05" | "22021") => {
                    return Self::field("body", "contains a character that cannot be stored (NUL)");
                }
                Some("22003") => {
                    return Self::field("amount", "the resulting balance would be out of range");
                }
                _ => {}
            }
        }
        match database_fault(&err) {
            Some(DatabaseFault::Conflict) => Self::Conflict,
            Some(DatabaseFault::Unavailable(why)) => {
                let sqlstate = match &err {
                    sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
                    _ => None,
                };
                tracing::warn!(error = %err, sqlstate, "database fault: answered 503");
                Self::Unavailable(why)
            }
            None => Self::Internal(anyhow::Error::new(err)),
        }
    }
}

/// A database failure that is not the request's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseFault {
    /// 40001 `serialization_failure`, 40P01 `deadlock_detected`: the database rolled the
    /// transaction back so that another could finish. Nothing was committed: the unit of work
    /// may run again from its start.
    Conflict,
    /// The database cannot serve the request now (unreachable, restarting, out of resources,
    /// too slow): a later attempt may succeed. What it is, in words.
    Unavailable(&'static str),
}

/// Which failures are faults of the database rather than of the request or of the code
/// (README, "Faults"); `None` for everything else, which stays a 500 unless it has a meaning
/// of its own.
pub fn database_fault(err: &sqlx::Error) -> Option<DatabaseFault> {
    match err {
        sqlx::Error::Database(db) => {
            let code = db.code()?;
            let fault = match (code.get(..2)?, code.as_ref()) {
                (_, "40001" | "40P01") => DatabaseFault::Conflict,
                // The commit's outcome is unknown: the idempotency key of a retry settles it.
                (_, "40003") => DatabaseFault::Unavailable("the database lost track of a commit"),
                // Connection exceptions.
                ("08", _) => DatabaseFault::Unavailable("the connection to the database failed"),
                // A statement timeout (or a cancel request) stopped the statement.
                (_, "57014") => DatabaseFault::Unavailable("the database took too long"),
                // Operator intervention: admin_shutdown, crash_shutdown, cannot_connect_now,
                // database_dropped, idle_session_timeout.
                ("57", _) => DatabaseFault::Unavailable("the database is restarting"),
                // Insufficient resources: too_many_connections, disk_full, out_of_memory.
                ("53", _) => DatabaseFault::Unavailable("the database is out of resources"),
                // A lock wait past lock_timeout.
                (_, "55P03") => DatabaseFault::Unavailable("the database is busy"),
                _ => return None,
            };
            Some(fault)
        }
        sqlx::Error::PoolTimedOut => Some(DatabaseFault::Unavailable(
            "no database connection became free in time",
        )),
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed => {
            Some(DatabaseFault::Unavailable("the database is unreachable"))
        }
        _ => None,
    }
}

/// The result type of handlers.
pub type ApiResult<T> = Result<T, ApiError>;
