//! Request extractors whose rejections answer in the API's problem shape, and the
//! pagination types shared by every list.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, FieldError};
use crate::limits;

/// Largest request body on ordinary routes.
pub const BODY_LIMIT_BYTES: usize = limits::BODY_BYTES;

/// A JSON body. Malformed JSON, wrong types and unknown fields answer 422 naming the field;
/// an oversized body answers 413. The parsed document is kept for idempotency fingerprints.
pub struct ApiJson<T> {
    pub value: T,
    /// The body as parsed, with keys sorted: equal requests give equal documents whatever
    /// their whitespace or key order.
    pub document: Value,
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(body_rejection)?;
        let document: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::field("body", "a JSON object is required"));
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::field("body", format!("malformed JSON: {e}")))?
        };
        if !document.is_object() {
            return Err(ApiError::field("body", "a JSON object is required"));
        }
        let value = serde_path_to_error::deserialize(&document).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "body".to_owned() } else { path };
            ApiError::Validation(vec![FieldError::new(field, e.inner().to_string())])
        })?;
        Ok(ApiJson { value, document })
    }
}

/// The answer to a body that could not be read.
pub fn body_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge {
            limit_bytes: BODY_LIMIT_BYTES,
        }
    } else {
        ApiError::field("body", "the request body could not be read")
    }
}

/// Query parameters; a malformed query string answers 422.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(ApiQuery)
            .map_err(|e| ApiError::field(e.path().to_string(), e.inner().to_string()))
    }
}

/// Checks free text: length in characters, and no control characters (a new line is allowed).
pub fn check_text(errors: &mut Vec<FieldError>, field: &str, value: &Option<String>, max: usize) {
    if let Some(text) = value {
        if text.chars().count() > max {
            errors.push(FieldError::new(field, format!("at most {max} characters")));
        } else if text.chars().any(|c| c.is_control() && c != '\n') {
            errors.push(FieldError::new(
                field,
                "must not contain control characters",
            ));
        }
    }
}

/// A UUID path segment; anything else answers 422.
pub struct IdPath(pub uuid::Uuid);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|_| ApiError::field("id", "must be a UUID"))?;
        uuid::Uuid::parse_str(&raw)
            .map(IdPath)
            .map_err(|_| ApiError::field("id", "must be a UUID"))
    }
}

/// `?limit=&cursor=` of every list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Items per page, 1–100 (default 20).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A checked page request.
#[derive(Debug, Clone)]
pub struct Page {
    pub limit: i64,
    pub cursor: Option<String>,
}

impl PageParams {
    /// Checks the limit and opens the cursor (its payload, still to be parsed by the list).
    pub fn check(&self) -> Result<Page, ApiError> {
        let limit = match self.limit.as_deref() {
            None => limits::PAGE_DEFAULT,
            Some(raw) => match raw.parse::<i64>() {
                Ok(n) if (1..=limits::PAGE_MAX).contains(&n) => n,
                _ => {
                    return Err(ApiError::field(
                        "limit",
                        format!("must be a whole number from 1 to {}", limits::PAGE_MAX),
                    ));
                }
            },
        };
        let cursor = match self.cursor.as_deref() {
            None | Some("") => None,
            Some(raw) => Some(open_cursor(raw)?),
        };
        Ok(Page { limit, cursor })
    }
}

const CURSOR_PREFIX: &str = "c1:";

/// Wraps a list position into an opaque cursor.
pub fn seal_cursor(position: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{CURSOR_PREFIX}{position}"))
}

fn open_cursor(raw: &str) -> Result<String, ApiError> {
    let invalid = || ApiError::field("cursor", "not a cursor returned by this list");
    if raw.len() > 200 {
        return Err(invalid());
    }
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    text.strip_prefix(CURSOR_PREFIX)
        .map(str::to_owned)
        .ok_or_else(invalid)
}

/// The position of a row in a list ordered by `(created_at desc, id desc)`.
pub fn time_id_position(at: &chrono::DateTime<chrono::Utc>, id: &uuid::Uuid) -> String {
    format!(
        "{}|{id}",
        at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    )
}

/// Reads a position written by [`time_id_position`].
pub fn parse_time_id(
    position: &str,
) -> Result<(chrono::DateTime<chrono::Utc>, uuid::Uuid), ApiError> {
    let (at, id) = position.split_once('|').ok_or_else(bad_cursor)?;
    let at = chrono::DateTime::parse_from_rfc3339(at).map_err(|_| bad_cursor())?;
    Ok((
        at.with_timezone(&chrono::Utc),
        uuid::Uuid::parse_str(id).map_err(|_| bad_cursor())?,
    ))
}

/// The error for a cursor whose payload does not parse.
pub fn bad_cursor() -> ApiError {
    ApiError::field("cursor", "not a cursor returned by this list")
}

/// `{"items": [...], "next_cursor": ...}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct List<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next (older) page; null on the last page.
    pub next_cursor: Option<String>,
}

impl<T> List<T> {
    /// Builds a page from up to `limit + 1` rows: the extra row only says there is more.
    pub fn from_rows(mut rows: Vec<T>, limit: i64, position: impl Fn(&T) -> String) -> Self {
        let more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let next_cursor = if more {
            rows.last().map(|r| seal_cursor(&position(r)))
        } else {
            None
        };
        List {
            items: rows,
            next_cursor,
        }
    }
}
