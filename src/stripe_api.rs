//! Stripe's API as this service uses it: creating a Checkout Session, looking up what paid an
//! invoice or a payment intent, and listing events (for `reconcile`).
//!
//! Form-encoded, `Authorization: Bearer <secret key>`, the API version pinned, an
//! `Idempotency-Key` on every attempt of a creation (the caller's, or one of ours) so that
//! retrying after a network error or a 5xx cannot create two sessions. Other answers are not
//! retried.

use std::time::Duration;

use serde::Deserialize;

use crate::config::Secret;

/// The Stripe API version this code is written against.
pub const STRIPE_VERSION: &str = "2025-03-31.basil";

/// How long a call may keep trying.
#[derive(Clone, Copy)]
struct Patience {
    attempts: u32,
    attempt_timeout: Duration,
}

/// For calls whose answer the caller cannot do without.
const PERSISTENT: Patience = Patience {
    attempts: 3,
    attempt_timeout: Duration::from_secs(8),
};

/// For calls whose answer is only nice to have: one short try, never holding up the caller.
const BRIEF: Patience = Patience {
    attempts: 1,
    attempt_timeout: Duration::from_secs(3),
};

#[derive(Debug, Clone, Deserialize)]
pub struct CreatedSession {
    pub id: String,
    pub url: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StripeApiError {
    /// Stripe answered with an error (4xx): the request was refused.
    #[error("Stripe refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    /// Stripe could not be reached or kept failing (network, timeout, 5xx).
    #[error("Stripe is unavailable: {0}")]
    Unavailable(String),
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    message: Option<String>,
    code: Option<String>,
}

/// Stripe's API, with the account's secret key. One per process, in the shared state.
pub struct StripeClient {
    http: reqwest::Client,
    api_base: String,
    secret_key: Secret,
}

impl StripeClient {
    pub fn new(http: reqwest::Client, api_base: &str, secret_key: Secret) -> Self {
        Self {
            http,
            api_base: api_base.to_owned(),
            secret_key,
        }
    }

    /// Whether the key is a live-mode key (`sk_live_…`, `rk_live_…`): events must match it.
    pub fn livemode(&self) -> bool {
        let key = self.secret_key.expose();
        key.starts_with("sk_live_") || key.starts_with("rk_live_")
    }

    /// POST /v1/checkout/sessions with `form` (already in Stripe's bracket notation).
    pub async fn create_checkout_session(
        &self,
        form: &[(String, String)],
        idempotency_key: &str,
    ) -> Result<CreatedSession, StripeApiError> {
        let body = serde_urlencoded::to_string(form)
            .map_err(|e| StripeApiError::Unavailable(e.to_string()))?;
        let answer = self
            .call(
                reqwest::Method::POST,
                "/v1/checkout/sessions",
                Some(body),
                Some(idempotency_key),
                PERSISTENT,
            )
            .await?;
        parse(&answer)
    }

    /// The payment intent and charge of `invoice`'s paid payment, if Stripe lists one. From API
    /// version 2025-03-31 invoices no longer carry them, and webhook payloads do not include the
    /// invoice's `payments` list.
    pub async fn invoice_payment(
        &self,
        invoice: &str,
    ) -> Result<Option<(Option<String>, Option<String>)>, StripeApiError> {
        let query = serde_urlencoded::to_string([("invoice", invoice), ("limit", "10")])
            .map_err(|e| StripeApiError::Unavailable(e.to_string()))?;
        let answer = self
            .call(
                reqwest::Method::GET,
                &format!("/v1/invoice_payments?{query}"),
                None,
                None,
                PERSISTENT,
            )
            .await?;
        let list: PaymentList = parse(&answer)?;
        Ok(list
            .data
            .into_iter()
            .find(|p| p.status.as_deref() == Some("paid"))
            .map(|p| (p.payment.payment_intent, p.payment.charge))
            .filter(|(intent, charge)| intent.is_some() || charge.is_some()))
    }

    /// The charge that paid `payment_intent` (its `latest_charge`), if it has one. Checkout
    /// Sessions name their payment intent but not its charge, and a dispute may name only the
    /// charge. One brief attempt: the caller goes on without it.
    pub async fn payment_intent_charge(
        &self,
        payment_intent: &str,
    ) -> Result<Option<String>, StripeApiError> {
        // The id goes into the path: only what Stripe's ids are made of.
        if !payment_intent.starts_with("pi_")
            || !payment_intent
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(StripeApiError::Refused {
                status: 400,
                message: "not a payment intent id".to_owned(),
            });
        }
        let answer = self
            .call(
                reqwest::Method::GET,
                &format!("/v1/payment_intents/{payment_intent}"),
                None,
                None,
                BRIEF,
            )
            .await?;
        let intent: PaymentIntent = parse(&answer)?;
        Ok(match intent.latest_charge {
            Some(serde_json::Value::String(id)) if !id.is_empty() => Some(id),
            // Expanded: the charge object itself.
            Some(serde_json::Value::Object(charge)) => charge
                .get("id")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
            _ => None,
        })
    }

    /// One page of `GET /v1/events`: events of `types` created at or after `created_from` (a
    /// Unix time), newest first, 100 at most, after the event `starting_after` when given.
    /// Stripe keeps events for 30 days and takes at most 20 types.
    pub async fn list_events(
        &self,
        created_from: i64,
        types: &[&str],
        starting_after: Option<&str>,
    ) -> Result<EventPage, StripeApiError> {
        let mut query: Vec<(&str, String)> = vec![
            ("created[gte]", created_from.to_string()),
            ("limit", "100".to_owned()),
        ];
        query.extend(types.iter().map(|t| ("types[]", (*t).to_owned())));
        if let Some(after) = starting_after {
            query.push(("starting_after", after.to_owned()));
        }
        let query = serde_urlencoded::to_string(&query)
            .map_err(|e| StripeApiError::Unavailable(e.to_string()))?;
        let answer = self
            .call(
                reqwest::Method::GET,
                &format!("/v1/events?{query}"),
                None,
                None,
                PERSISTENT,
            )
            .await?;
        parse(&answer)
    }

    /// One API call with retries on network errors and 5xx, as `patience` allows (the same
    /// idempotency key on each attempt); any other answer is final.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        form: Option<String>,
        idempotency_key: Option<&str>,
        patience: Patience,
    ) -> Result<Vec<u8>, StripeApiError> {
        let url = format!("{}{path}", self.api_base);
        let mut last_failure = String::new();
        for attempt in 0..patience.attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 * 3u64.pow(attempt - 1))).await;
            }
            let mut request = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(self.secret_key.expose())
                .header("Stripe-Version", STRIPE_VERSION)
                .timeout(patience.attempt_timeout);
            if let Some(key) = idempotency_key {
                request = request.header("Idempotency-Key", key);
            }
            if let Some(form) = &form {
                request = request
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(form.clone());
            }
            let response = match request.send().await {
                Ok(response) => response,
                Err(err) => {
                    last_failure = format!("request failed: {}", without_url(&err));
                    tracing::warn!(attempt, error = %last_failure, "Stripe request failed; retrying");
                    continue;
                }
            };
            let status = response.status();
            if status.is_server_error() {
                last_failure = format!("Stripe answered {status}");
                tracing::warn!(attempt, %status, "Stripe answered a server error; retrying");
                continue;
            }
            let bytes = response
                .bytes()
                .await
                .map_err(|e| StripeApiError::Unavailable(without_url(&e)))?;
            if status.is_success() {
                return Ok(bytes.to_vec());
            }
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| match (b.error.message, b.error.code) {
                    (Some(m), _) => m,
                    (None, Some(c)) => c,
                    (None, None) => status.to_string(),
                })
                .unwrap_or_else(|_| status.to_string());
            return Err(StripeApiError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        Err(StripeApiError::Unavailable(last_failure))
    }
}

fn parse<T: serde::de::DeserializeOwned>(answer: &[u8]) -> Result<T, StripeApiError> {
    serde_json::from_slice(answer)
        .map_err(|e| StripeApiError::Unavailable(format!("unexpected answer from Stripe: {e}")))
}

/// A page of Stripe's event list. The events are kept as JSON: each is handled exactly as a
/// webhook delivery of it would be, from the same document.
#[derive(Debug, Deserialize)]
pub struct EventPage {
    pub data: Vec<serde_json::Value>,
    pub has_more: bool,
}

#[derive(Deserialize)]
struct PaymentList {
    #[serde(default)]
    data: Vec<InvoicePayment>,
}

#[derive(Deserialize)]
struct InvoicePayment {
    status: Option<String>,
    payment: PaymentRef,
}

#[derive(Deserialize)]
struct PaymentIntent {
    latest_charge: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct PaymentRef {
    payment_intent: Option<String>,
    charge: Option<String>,
}

/// What went wrong, in words fit for an answer (no URL, no key).
fn without_url(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "could not connect"
    } else if err.is_body() || err.is_decode() {
        "the answer could not be read"
    } else {
        "the request failed"
    }
    .to_owned()
}
