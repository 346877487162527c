//! `POST /v1/checkout/sessions`: a Stripe Checkout Session for one credit pack.

use axum::extract::{OriginalUri, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::extract::{ApiJson, is_http_url};
use crate::idempotency::{self, Claim, IdempotencyKey};
use crate::limits;
use crate::packs::PackKind;
use crate::state::AppState;
use crate::stripe_api::StripeApiError;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    /// An active pack of `GET /v1/credit-packs`.
    pub pack_id: Uuid,
    /// Where Stripe sends the buyer after paying; must share the origin of the configured
    /// `CHECKOUT_SUCCESS_URL`. Stripe replaces `{CHECKOUT_SESSION_ID}` in it.
    pub success_url: Option<String>,
    /// Where Stripe sends the buyer who gives up; same origin rule (`CHECKOUT_CANCEL_URL`).
    pub cancel_url: Option<String>,
}

/// The session to redirect the buyer to.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CheckoutSession {
    /// Stripe's Checkout Session id (`cs_…`).
    pub id: String,
    /// Stripe's hosted payment page.
    pub url: String,
}

struct Purchase {
    pack_found: bool,
    active: Option<bool>,
    name: Option<String>,
    credits: Option<i32>,
    kind: Option<PackKind>,
    stripe_price_id: Option<String>,
    profile_found: bool,
    email: Option<String>,
    stripe_customer_id: Option<String>,
}

/// Starts a purchase: creates a Stripe Checkout Session for the pack.
#[utoipa::path(
    post,
    path = "/v1/checkout/sessions",
    tag = "credits",
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for 24 h; also sent to Stripe")),
    request_body = CheckoutRequest,
    responses(
        (status = 201, body = CheckoutSession),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No profile (`profile_not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown pack or foreign redirect URL", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Stripe refused or failed (`stripe_error`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Stripe is not configured (`stripe_not_configured`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_session(
    State(state): State<AppState>,
    user: AuthUser,
    IdempotencyKey(key): IdempotencyKey,
    OriginalUri(uri): OriginalUri,
    body: ApiJson<CheckoutRequest>,
) -> ApiResult<Response> {
    let request = body.value;
    // The form of the input first: a bad request is the caller's to fix, configured or not.
    let mut errors = Vec::new();
    for (field, url) in [
        ("success_url", &request.success_url),
        ("cancel_url", &request.cancel_url),
    ] {
        if let Some(url) = url
            && (!is_http_url(url) || url.chars().count() > limits::URL_CHARS)
        {
            errors.push(FieldError::new(
                field,
                format!(
                    "must be an http(s) URL of at most {} characters",
                    limits::URL_CHARS
                ),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let client = state.stripe.as_ref().ok_or(ApiError::StripeNotConfigured)?;
    let stripe = &state.config.stripe;
    let success_url = redirect(
        "success_url",
        request.success_url,
        stripe.success_url.as_deref(),
        &mut errors,
    )?;
    let cancel_url = redirect(
        "cancel_url",
        request.cancel_url,
        stripe.cancel_url.as_deref(),
        &mut errors,
    )?;
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }

    let purchase = sqlx::query_as!(
        Purchase,
        r#"select k.id is not null as "pack_found!", k.active as "active?", k.name as "name?",
                  k.credits as "credits?", k.kind as "kind?: PackKind",
                  k.stripe_price_id as "stripe_price_id?",
                  p.id is not null as "profile_found!", p.email as "email?",
                  p.stripe_customer_id as "stripe_customer_id?"
             from (select 1) one
             left join public.credit_packs k on k.id = $1
             left join public.profiles p on p.id = $2"#,
        request.pack_id,
        user.id,
    )
    .fetch_one(&state.pool)
    .await?;
    if !purchase.profile_found {
        return Err(ApiError::ProfileNotFound);
    }
    let (true, Some(true), Some(name), Some(credits), Some(kind)) = (
        purchase.pack_found,
        purchase.active,
        purchase.name,
        purchase.credits,
        purchase.kind,
    ) else {
        return Err(ApiError::field(
            "pack_id",
            "no active credit pack has this id",
        ));
    };
    let Some(price) = purchase.stripe_price_id else {
        return Err(ApiError::field(
            "pack_id",
            "this pack is not for sale yet (no Stripe price)",
        ));
    };

    let user_id = user.id.to_string();
    let pack_id = request.pack_id.to_string();
    let mut form: Vec<(String, String)> = vec![
        (
            "mode".into(),
            if kind == PackKind::Subscription {
                "subscription"
            } else {
                "payment"
            }
            .into(),
        ),
        ("line_items[0][price]".into(), price),
        ("line_items[0][quantity]".into(), "1".into()),
        ("success_url".into(), success_url),
        ("cancel_url".into(), cancel_url),
        ("client_reference_id".into(), user_id.clone()),
        ("metadata[user_id]".into(), user_id.clone()),
        ("metadata[pack_id]".into(), pack_id.clone()),
        ("metadata[credits]".into(), credits.to_string()),
        ("metadata[pack_name]".into(), name),
    ];
    // The same user and pack ride along on the objects later events are about, so refunds and
    // renewals can be traced back even without this session.
    let carrier = if kind == PackKind::Subscription {
        "subscription_data"
    } else {
        "payment_intent_data"
    };
    form.push((format!("{carrier}[metadata][user_id]"), user_id.clone()));
    form.push((format!("{carrier}[metadata][pack_id]"), pack_id));
    match (purchase.stripe_customer_id, purchase.email) {
        (Some(customer), _) => form.push(("customer".into(), customer)),
        (None, email) => {
            if let Some(email) = email {
                form.push(("customer_email".into(), email));
            }
            if kind == PackKind::OneTime {
                // A customer is created for one-time payments too, so the next purchase reuses it.
                form.push(("customer_creation".into(), "always".into()));
            }
        }
    }

    // Stripe's idempotency keys are per account: the caller's key is namespaced by user.
    let stripe_key = match &key {
        Some(key) => {
            let digest = Sha256::digest(format!("{user_id}\n{key}").as_bytes());
            format!(
                "checkout-{}",
                digest
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            )
        }
        None => format!("checkout-{}", Uuid::new_v4()),
    };
    let hash = idempotency::fingerprint(&Method::POST, uri.path(), &body.document);
    let reservation =
        match idempotency::try_reserving(&state.pool, &user_id, key.as_deref(), &hash).await? {
            Claim::Replay(answer) => return Ok(answer),
            Claim::Start(reservation) => reservation,
        };
    let created = match client.create_checkout_session(&form, &stripe_key).await {
        Ok(created) => created,
        Err(err) => {
            reservation.release().await?;
            // Stripe's own message stays in the log: it can quote the API key's last
            // characters or other accounts' ids.
            tracing::warn!(error = %err, "creating a Checkout Session failed");
            return Err(ApiError::Stripe(match err {
                StripeApiError::Refused { .. } => "Stripe refused to create the checkout session",
                StripeApiError::Unavailable(_) => "Stripe could not be reached; try again shortly",
            }));
        }
    };
    let Some(url) = created.url else {
        reservation.release().await?;
        return Err(ApiError::Stripe("Stripe returned a session without a URL"));
    };
    reservation
        .save(
            StatusCode::CREATED,
            &CheckoutSession {
                id: created.id,
                url,
            },
        )
        .await
}

/// The redirect URL to send Stripe: the client's, if it shares the configured URL's origin,
/// else the configured one. Never an arbitrary URL (no open redirect).
fn redirect(
    field: &str,
    given: Option<String>,
    configured: Option<&str>,
    errors: &mut Vec<FieldError>,
) -> ApiResult<String> {
    let Some(configured) = configured else {
        return Err(ApiError::StripeNotConfigured);
    };
    let Some(given) = given else {
        return Ok(configured.to_owned());
    };
    match (origin(&given), origin(configured)) {
        (Some(a), Some(b)) if a == b && given.chars().count() <= limits::URL_CHARS => Ok(given),
        _ => {
            errors.push(FieldError::new(
                field,
                format!(
                    "must be a URL on the same origin as {}",
                    origin(configured).unwrap_or_default()
                ),
            ));
            Ok(String::new())
        }
    }
}

/// `scheme://host[:port]`, lower-cased, of an absolute http(s) URL; None for anything odd
/// (user info, backslashes, control characters, no host).
pub fn origin(url: &str) -> Option<String> {
    let lower = url.to_ascii_lowercase();
    let (scheme, rest) = lower.split_once("://")?;
    if scheme != "https" && scheme != "http" {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.is_empty()
        || authority.contains(['@', '\\'])
        || url.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return None;
    }
    let authority = match (
        scheme,
        authority.strip_suffix(":443"),
        authority.strip_suffix(":80"),
    ) {
        ("https", Some(host), _) | ("http", _, Some(host)) => host,
        _ => authority,
    };
    Some(format!("{scheme}://{authority}"))
}

#[cfg(test)]
mod tests {
    use super::origin;

    #[test]
    fn origins_are_compared_strictly() {
        assert_eq!(
            origin("https://App.example.com/done?x=1").as_deref(),
            Some("https://app.example.com")
        );
        assert_eq!(
            origin("https://app.example.com:443/x").as_deref(),
            Some("https://app.example.com")
        );
        assert_eq!(
            origin("http://localhost:3000/x").as_deref(),
            Some("http://localhost:3000")
        );
        assert_eq!(origin("https://app.example.com@evil.example/"), None);
        assert_eq!(origin("https://evil.example\\@app.example.com/"), None);
        assert_eq!(origin("javascript:alert(1)"), None);
        assert_eq!(origin("//evil.example/x"), None);
        assert_ne!(
            origin("https://app.example.com.evil.example/"),
            origin("https://app.example.com/")
        );
    }
}
