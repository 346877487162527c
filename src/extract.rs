//! Request extractors whose rejections answer in the API's problem shape, the pagination
//! types shared by every list, and a JSON answer sized for its document.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::error::{ApiError, FieldError};
use crate::limits;

/// A JSON answer written into a buffer of `BYTES` to begin with, for documents known to be
/// about that large (axum's `Json` starts at 128 bytes and grows, copying, as it writes).
pub struct SizedJson<T, const BYTES: usize>(pub T);

impl<T: Serialize, const BYTES: usize> IntoResponse for SizedJson<T, BYTES> {
    fn into_response(self) -> Response {
        let mut body = BytesMut::with_capacity(BYTES).writer();
        match serde_json::to_writer(&mut body, &self.0) {
            Ok(()) => (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                body.into_inner().freeze(),
            )
                .into_response(),
            Err(err) => ApiError::Internal(err.into()).into_response(),
        }
    }
}

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
        let document = whole_numbers_as_integers(document);
        let value = serde_path_to_error::deserialize(&document).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "body".to_owned() } else { path };
            ApiError::Validation(vec![FieldError::new(field, e.inner().to_string())])
        })?;
        Ok(ApiJson { value, document })
    }
}

/// JSON has one kind of number: `5.0` is the whole number 5 (as JSON Schema says), so it is
/// read as an integer wherever one is expected.
pub fn whole_numbers_as_integers(mut value: Value) -> Value {
    make_whole(&mut value);
    value
}

/// [`whole_numbers_as_integers`] in place: a document without such numbers is left as it is,
/// rather than rebuilt map by map.
fn make_whole(value: &mut Value) {
    match value {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            if let Some(f) = n.as_f64()
                && f.fract() == 0.0
                && f.abs() < 9.0e15
            {
                *value = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(make_whole),
        Value::Object(map) => map.values_mut().for_each(make_whole),
        _ => {}
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

/// Checks one line of text as given (before any trimming): length in characters, and no
/// control characters at all.
pub fn check_line(errors: &mut Vec<FieldError>, field: &str, text: &str, max: usize) {
    if text.chars().count() > max {
        errors.push(FieldError::new(field, format!("at most {max} characters")));
    } else if text.chars().any(char::is_control) {
        errors.push(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
}

/// Whether `text` is only white space (or empty).
pub fn is_blank(text: &str) -> bool {
    text.chars().all(char::is_whitespace)
}

/// An absolute http(s) URL without white space or control characters.
pub fn is_http_url(text: &str) -> bool {
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"));
    rest.is_some_and(|rest| {
        !rest.is_empty() && !rest.chars().any(|c| c.is_whitespace() || c.is_control())
    })
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

/// The form of a cursor in a list ordered by the ledger (`seq`) or by id: the position to
/// continue below. Empty or absent is the first page.
pub const SEQ_CURSOR_PATTERN: &str = "^[0-9]{0,18}$";
/// The form of a cursor in a list ordered by `(created_at, id)`: microseconds since the epoch
/// and the id, of the last row of the previous page.
pub const TIME_ID_CURSOR_PATTERN: &str = "^([0-9]{1,16}-[0-9a-f]{32})?$";

/// `?limit=&cursor=` of the lists in ledger (or id) order. The cursor is opaque to clients;
/// its form is documented so that a malformed one is refused as such.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Items per page, 1–100 (default 20).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[0-9]{0,18}$")]
    pub cursor: Option<String>,
}

/// `?limit=&cursor=` of the lists in `(created_at, id)` order.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TimePageParams {
    /// Items per page, 1–100 (default 20).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^([0-9]{1,16}-[0-9a-f]{32})?$")]
    pub cursor: Option<String>,
}

/// A checked page request: how many rows, and where to continue.
#[derive(Debug, Clone)]
pub struct Page<P> {
    pub limit: i64,
    pub after: Option<P>,
}

impl PageParams {
    /// Checks the limit and reads the cursor: the position to continue below.
    pub fn check(&self) -> Result<Page<i64>, ApiError> {
        Ok(Page {
            limit: check_limit(self.limit.as_deref())?,
            after: match self.cursor.as_deref() {
                None | Some("") => None,
                Some(raw) => Some(parse_seq(raw).ok_or_else(bad_cursor)?),
            },
        })
    }
}

impl TimePageParams {
    /// Checks the limit and reads the cursor: the `(created_at, id)` to continue below.
    pub fn check(&self) -> Result<Page<(DateTime<Utc>, Uuid)>, ApiError> {
        time_page(self.limit.as_deref(), self.cursor.as_deref())
    }
}

/// A `(created_at, id)` page from raw `limit` and `cursor` values.
pub fn time_page(
    limit: Option<&str>,
    cursor: Option<&str>,
) -> Result<Page<(DateTime<Utc>, Uuid)>, ApiError> {
    Ok(Page {
        limit: check_limit(limit)?,
        after: match cursor {
            None | Some("") => None,
            Some(raw) => Some(parse_time_id(raw).ok_or_else(bad_cursor)?),
        },
    })
}

fn check_limit(raw: Option<&str>) -> Result<i64, ApiError> {
    match raw {
        None => Ok(limits::PAGE_DEFAULT),
        Some(raw) => match raw.parse::<i64>() {
            Ok(n)
                if (1..=limits::PAGE_MAX).contains(&n)
                    && raw.bytes().all(|b| b.is_ascii_digit()) =>
            {
                Ok(n)
            }
            _ => Err(ApiError::field(
                "limit",
                format!("must be a whole number from 1 to {}", limits::PAGE_MAX),
            )),
        },
    }
}

fn parse_seq(raw: &str) -> Option<i64> {
    if raw.len() > 18 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse().ok()
}

/// The cursor of a row in a list ordered by `(created_at desc, id desc)`.
pub fn time_id_cursor(at: &DateTime<Utc>, id: &Uuid) -> String {
    format!("{}-{}", at.timestamp_micros(), id.simple())
}

fn parse_time_id(raw: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let (micros, id) = raw.split_once('-')?;
    if micros.is_empty()
        || micros.len() > 16
        || !micros.bytes().all(|b| b.is_ascii_digit())
        || id.len() != 32
        || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    Some((at, Uuid::try_parse(id).ok()?))
}

/// The error for a cursor this service did not hand out.
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
    /// Builds a page from up to `limit + 1` rows: the extra row only says there is more. The
    /// cursor is the last row's position, as `position` writes it.
    pub fn from_rows(mut rows: Vec<T>, limit: i64, position: impl Fn(&T) -> String) -> Self {
        let more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let next_cursor = if more {
            rows.last().map(position)
        } else {
            None
        };
        List {
            items: rows,
            next_cursor,
        }
    }
}

#[cfg(test)]
mod sized_json_tests {
    use super::*;

    #[tokio::test]
    async fn a_sized_answer_is_serde_jsons_document_whatever_its_size() {
        for text in ["", "short", &"long ".repeat(100), "quote \" and é"] {
            let value = serde_json::json!({"text": text, "n": [1, 2, 3]});
            let response = SizedJson::<_, 16>(&value).into_response();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            assert_eq!(body, serde_json::to_vec(&value).unwrap());
        }
    }
}

#[cfg(test)]
mod whole_number_tests {
    use super::whole_numbers_as_integers;
    use serde_json::json;

    #[test]
    fn whole_numbers_become_integers_at_any_depth_and_nothing_else_changes() {
        let given = json!({
            "amount": 5.0,
            "negative": -2.0,
            "fraction": 1.5,
            "huge": 1.0e20,
            "integer": 7,
            "text": "3.0",
            "items": [2.0, {"inner": 4.0}, null],
        });
        let made = whole_numbers_as_integers(given);
        assert_eq!(
            made,
            json!({
                "amount": 5,
                "negative": -2,
                "fraction": 1.5,
                "huge": 1.0e20,
                "integer": 7,
                "text": "3.0",
                "items": [2, {"inner": 4}, null],
            })
        );
        assert!(made["amount"].is_i64() && made["items"][1]["inner"].is_i64());
        assert!(made["huge"].is_f64());
    }
}
