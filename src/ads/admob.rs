//! AdMob's server-side verification callback: `GET /v1/ads/admob/ssv`.
//!
//! AdMob calls it with a query string it signs with ECDSA P-256 / SHA-256: the message is the
//! query string, percent-decoded as UTF-8, up to (not including) `&signature=`; `signature`
//! (URL-safe base64 of the DER signature) and `key_id` are the last two parameters. The
//! message is cut from the string exactly as received and never rebuilt from parsed
//! parameters, so no re-encoding can change what was signed. A verified callback is handed to
//! `public.record_admob_callback`, which decides (and records) what it does: verify a session,
//! pay one waiting for it, or refuse it, each transaction once.

use axum::Json;
use axum::extract::{OriginalUri, State};
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::sessions;
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::limits;
use crate::state::AppState;

/// The callback's parameters, as AdMob sends them (documentation: the handler reads the raw
/// query string, whose exact bytes the signature covers). Their lengths and forms are added
/// to the document by `openapi::exact`, from `limits`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct SsvParams {
    /// AdMob's id of the ad source.
    ad_network: Option<String>,
    /// The ad unit that was shown; checked against `ADMOB_AD_UNITS` when set.
    ad_unit: Option<String>,
    /// The session's id, as the app gave it to the ad SDK (`ssv.custom_data`).
    custom_data: Option<String>,
    /// The reward configured in AdMob (ignored: the reward table is ours).
    reward_amount: Option<String>,
    reward_item: Option<String>,
    /// When AdMob signed the callback, in milliseconds since the epoch.
    #[param(minimum = 0, maximum = 253_402_300_799_999_i64)]
    timestamp: i64,
    /// AdMob's id of the rewarded impression: pays at most once.
    transaction_id: String,
    /// The user's id, as the app gave it to the ad SDK (`ssv.user_id`).
    user_id: Option<String>,
    /// URL-safe base64 of the DER signature; second to last.
    signature: String,
    /// The id of the verifier key; last.
    #[param(minimum = 0)]
    key_id: i64,
}

/// Latest callback `timestamp` accepted: the end of year 9999, in milliseconds.
const LATEST_TIMESTAMP_MS: i64 = 253_402_300_799_999;

/// What became of a verified callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SsvOutcome {
    /// It verified its session (and paid it, when its completion was waiting).
    Accepted,
    /// Its `transaction_id` was received before: nothing more happened.
    Duplicate,
    /// It pays nothing; `reason` says why.
    Refused,
}

/// The answer to a callback whose signature verified. AdMob only needs a 200 to stop
/// retrying; the body is for people reading logs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SsvReceipt {
    pub received: bool,
    pub outcome: SsvOutcome,
    /// Why a callback was refused: `stale_timestamp`, `ad_unit_not_allowed`,
    /// `unknown_session`, `other_user`, `session_expired`, `session_already_verified` or
    /// `daily_ad_limit_reached`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Receives AdMob's server-side verification callback for a rewarded ad.
#[utoipa::path(
    get,
    path = "/v1/ads/admob/ssv",
    tag = "ads",
    params(SsvParams),
    responses(
        (status = 200, description = "The signature verified; `outcome` says what the callback did", body = SsvReceipt),
        (status = 400, description = "A missing or bad signature, or an unknown `key_id` (`invalid_signature`); a malformed query string (`validation_failed`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn ssv_callback(
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
) -> ApiResult<Json<SsvReceipt>> {
    let callback = match Callback::parse(uri.query().unwrap_or_default()) {
        Ok(callback) => callback,
        Err(err) => {
            let outcome = match err {
                ApiError::InvalidSignature => "invalid_signature",
                _ => "malformed",
            };
            metrics::counter!("admob_ssv_callbacks_total", "outcome" => outcome).increment(1);
            return Err(err);
        }
    };
    if let Err(why) = state
        .admob_keys
        .verify(
            callback.key_id,
            callback.message.as_bytes(),
            &callback.signature,
        )
        .await
    {
        tracing::warn!(
            key_id = callback.key_id,
            reason = why.as_str(),
            "refused an AdMob callback for its signature"
        );
        metrics::counter!("admob_ssv_callbacks_total", "outcome" => "invalid_signature")
            .increment(1);
        return Err(ApiError::InvalidSignature);
    }

    let ads = &state.config.ads;
    let row = sqlx::query!(
        r#"select c.outcome as "outcome!", c.reason, c.paid as "paid!", c.credits_awarded
             from public.record_admob_callback($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) c"#,
        callback.transaction_id,
        callback.key_id,
        callback.ad_unit.as_deref(),
        callback.user_id.as_deref(),
        callback.custom_data.as_deref(),
        callback
            .user_id
            .as_deref()
            .and_then(|u| Uuid::parse_str(u).ok()),
        callback
            .custom_data
            .as_deref()
            .and_then(|c| Uuid::parse_str(c).ok()),
        callback.signed_at,
        ads.ssv_max_age_seconds,
        ads.allows_ad_unit(callback.ad_unit.as_deref()),
    )
    .fetch_one(&state.pool)
    .await?;

    let outcome = match row.outcome.as_str() {
        "accepted" => SsvOutcome::Accepted,
        "duplicate" => SsvOutcome::Duplicate,
        _ => SsvOutcome::Refused,
    };
    let label = match outcome {
        SsvOutcome::Accepted => "accepted",
        SsvOutcome::Duplicate => "duplicate",
        SsvOutcome::Refused => "refused",
    };
    // The reasons are the function's closed set, so they cannot add series.
    let reason_label = row.reason.clone().unwrap_or_default();
    metrics::counter!("admob_ssv_callbacks_total", "outcome" => label, "reason" => reason_label)
        .increment(1);
    if row.paid {
        sessions::session_paid(row.credits_awarded.unwrap_or(0));
    }
    Ok(Json(SsvReceipt {
        received: true,
        outcome,
        reason: row.reason,
    }))
}

/// A callback whose shape is right; its signature is not checked yet.
#[derive(Debug)]
struct Callback {
    /// What the signature covers.
    message: String,
    /// DER.
    signature: Vec<u8>,
    key_id: i64,
    transaction_id: String,
    signed_at: DateTime<Utc>,
    ad_unit: Option<String>,
    user_id: Option<String>,
    custom_data: Option<String>,
}

const SIGNATURE: &str = "&signature=";
const KEY_ID: &str = "&key_id=";

impl Callback {
    /// Reads a raw query string. A missing or undecodable signature is `invalid_signature`;
    /// anything else out of shape is `validation_failed` (400), naming the parameters.
    fn parse(raw: &str) -> Result<Self, ApiError> {
        let malformed = |field: &str, message: &str| {
            ApiError::MalformedQuery(vec![FieldError::new(field, message)])
        };
        if raw.len() > limits::ADMOB_QUERY_BYTES {
            return Err(malformed(
                "query",
                &format!("at most {} bytes", limits::ADMOB_QUERY_BYTES),
            ));
        }
        let at = raw.rfind(SIGNATURE).ok_or(ApiError::InvalidSignature)?;
        let (signed, tail) = (&raw[..at], &raw[at + SIGNATURE.len()..]);
        let (signature, key_id) = tail.split_once(KEY_ID).ok_or_else(|| {
            malformed("key_id", "required, as the last parameter, after signature")
        })?;
        if signature.contains('&') || key_id.contains('&') {
            return Err(malformed(
                "signature",
                "signature and key_id must be the last two parameters",
            ));
        }
        let key_id = key_id
            .parse::<i64>()
            .ok()
            .filter(|k| *k >= 0 && key_id.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| malformed("key_id", "must be a whole number"))?;
        let signature = percent_decode(signature)
            .and_then(|s| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(s.trim_end_matches('='))
                    .ok()
            })
            .ok_or(ApiError::InvalidSignature)?;
        let message = percent_decode(signed)
            .ok_or_else(|| malformed("query", "must be percent-encoded UTF-8"))?;

        // What is read must be what was signed. The signature covers the decoded text, and
        // many raw queries decode to one text: an `%26` inside a value becomes an `&` there. A
        // callback signed for another publisher's ad unit (Google's keys sign every
        // publisher's), with `&ad_unit=…&custom_data=…` smuggled inside a value and re-encoded,
        // could otherwise name this service's ad unit and a session of the caller's choosing.
        // So no decoded name or value may hold an `&`, and no name may repeat: the raw pairs
        // are then exactly the pairs of the signed text.
        let mut errors = Vec::new();
        let mut params: Vec<(String, String)> = Vec::new();
        for pair in signed.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (Some(name), Some(value)) = (percent_decode(name), percent_decode(value)) else {
                errors.push(FieldError::new("query", "must be percent-encoded UTF-8"));
                continue;
            };
            if name.contains('&') || value.contains('&') {
                errors.push(FieldError::new(name, "must not contain &"));
            } else if params.iter().any(|(n, _)| *n == name) {
                errors.push(FieldError::new(name, "given more than once"));
            } else if value.chars().count() > limits::ADMOB_PARAM_CHARS {
                errors.push(FieldError::new(
                    name,
                    format!("at most {} characters", limits::ADMOB_PARAM_CHARS),
                ));
            } else if value.chars().any(char::is_control) {
                errors.push(FieldError::new(name, "must not contain control characters"));
            } else {
                params.push((name, value));
            }
        }
        let mut take = |name: &str| {
            params
                .iter()
                .position(|(n, _)| n == name)
                .map(|i| params.swap_remove(i).1)
        };
        let transaction_id = take("transaction_id").filter(|t| !t.is_empty());
        if transaction_id.is_none() {
            errors.push(FieldError::new("transaction_id", "required"));
        }
        let signed_at = take("timestamp").and_then(|t| {
            t.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| t.parse::<i64>().ok())
                .flatten()
                .filter(|ms| *ms <= LATEST_TIMESTAMP_MS)
                .and_then(DateTime::from_timestamp_millis)
        });
        if signed_at.is_none() {
            errors.push(FieldError::new(
                "timestamp",
                "required: milliseconds since the epoch",
            ));
        }
        let (ad_unit, user_id, custom_data) =
            (take("ad_unit"), take("user_id"), take("custom_data"));
        match (transaction_id, signed_at) {
            (Some(transaction_id), Some(signed_at)) if errors.is_empty() => Ok(Callback {
                message,
                signature,
                key_id,
                transaction_id,
                signed_at,
                ad_unit,
                user_id,
                custom_data,
            }),
            _ => Err(ApiError::MalformedQuery(errors)),
        }
    }
}

/// Decodes `%XX` escapes (and nothing else: a `+` stays a `+`, as in what AdMob signs) into
/// UTF-8; a stray `%` or invalid UTF-8 is refused.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signed_message_is_the_decoded_query_up_to_the_signature() {
        let raw = "ad_unit=1&custom_data=a%2Db%20c&timestamp=1700000000000&transaction_id=t1\
                   &user_id=u&signature=MEUCIQ&key_id=3335741209";
        let callback = Callback::parse(raw).unwrap();
        assert_eq!(
            callback.message,
            "ad_unit=1&custom_data=a-b c&timestamp=1700000000000&transaction_id=t1&user_id=u"
        );
        assert_eq!(callback.custom_data.as_deref(), Some("a-b c"));
        assert_eq!(callback.key_id, 3_335_741_209);
        assert_eq!(callback.transaction_id, "t1");
    }

    #[test]
    fn a_plus_sign_is_not_a_space_in_what_is_signed() {
        assert_eq!(percent_decode("a+b%2B").as_deref(), Some("a+b+"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%+1"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
