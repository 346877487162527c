//! `POST /v1/webhooks/stripe`: signed events from Stripe, each handled exactly once.
//!
//! The signature is checked on the raw bytes first. The event is then claimed by inserting its
//! id into `stripe_events`, and handled in the same database transaction, so a redelivery —
//! sequential or concurrent — finds the id and answers `duplicate: true`. Credits are granted
//! through `stripe_grant`, unique per Stripe object, so the two events that can announce one
//! payment (`checkout.session.completed`, `…async_payment_succeeded`) grant once between them.
//!
//! A handler failure that a retry may cure (an unknown user, a database error) is recorded as
//! `failed` and answered with a 503 so that Stripe retries; a malformed object, or an event of
//! the other mode than the secret key's (test or live), is recorded as `rejected` and answered
//! with a 200 so that it is not retried for days.
//!
//! The HTTP handler checks the signature; everything after it is [`deliver`], which
//! `amethyst-credits reconcile` (see [`super::reconcile`]) calls with the events it finds in
//! Stripe's event list, so that both routes share one claim and one set of rules.
//!
//! This module receives, verifies, claims and dispatches; each family of events is handled in
//! a module of its own: [`purchases`] (Checkout), [`refunds`] (refunds and disputes) and
//! [`subscriptions`] (subscriptions and their invoices).

mod purchases;
mod refunds;
mod subscriptions;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use chrono::Utc;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{Acquire, PgConnection};
use utoipa::ToSchema;
use uuid::Uuid;

use super::signature::{self, SignatureError};
use crate::db::{self, ServicePool};
use crate::error::{ApiError, ApiResult, DatabaseFault, Problem, database_fault};
use crate::extract::whole_numbers_as_integers;
use crate::limits;
use crate::state::AppState;
use crate::stripe_api::StripeClient;

/// Largest webhook body.
pub const WEBHOOK_BODY_LIMIT_BYTES: usize = limits::WEBHOOK_BODY_BYTES;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookReceipt {
    pub received: bool,
    /// True when this event id was handled before; nothing was done again.
    pub duplicate: bool,
}

/// Receives a Stripe event.
#[utoipa::path(
    post,
    path = "/v1/webhooks/stripe",
    tag = "stripe",
    params(("Stripe-Signature" = String, Header, description = "t=<unix time>,v1=<hex HMAC-SHA256>")),
    request_body(content = StripeEvent, description = "A Stripe event", content_type = "application/json"),
    responses(
        (status = 200, body = WebhookReceipt),
        (status = 400, description = "Bad signature (`invalid_signature`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Handling failed or the service is not configured; Stripe will retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<WebhookReceipt>> {
    let secrets = &state.config.stripe.webhook_secrets;
    if secrets.is_empty() {
        return Err(ApiError::StripeNotConfigured);
    }
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit_bytes: WEBHOOK_BODY_LIMIT_BYTES,
            }
        } else {
            ApiError::field("body", "the request body could not be read")
        }
    })?;
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    if let Err(why) = signature::verify(header, &body, secrets, Utc::now().timestamp()) {
        let reason = match why {
            SignatureError::Missing => "missing",
            SignatureError::Malformed => "malformed",
            SignatureError::OutsideTolerance => "outside_tolerance",
            SignatureError::NoMatch => "no_match",
        };
        metrics::counter!("stripe_webhook_signature_failures_total", "reason" => reason)
            .increment(1);
        tracing::warn!(reason, "refused a webhook with a bad signature");
        return Err(ApiError::InvalidSignature);
    }

    let payload: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::field("body", format!("not JSON: {e}")))?;
    let (event, delivery) = deliver(&state.pool, state.stripe.as_ref(), payload).await?;
    record(&event.kind, delivery.outcome());
    match delivery {
        Delivery::Duplicate => Ok(Json(WebhookReceipt {
            received: true,
            duplicate: true,
        })),
        Delivery::Processed | Delivery::Ignored | Delivery::Rejected(_) => {
            Ok(Json(WebhookReceipt {
                received: true,
                duplicate: false,
            }))
        }
        Delivery::Failed(_) => Err(ApiError::Unavailable("the event could not be handled yet")),
    }
}

/// What became of an event handed to [`deliver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Handled before (or being handled by someone else right now): nothing was done again.
    Duplicate,
    /// Acted on.
    Processed,
    /// Of a type, or in a state, that the service does not act on; recorded.
    Ignored,
    /// Malformed, or of the other mode than the secret key's: recorded, never retried.
    Rejected(String),
    /// A retry may cure it (an unknown user, database trouble): recorded as `failed`, and the
    /// next delivery or reconciliation handles it afresh.
    Failed(String),
}

impl Delivery {
    /// The outcome as the metrics and `stripe_events.status` name it.
    pub fn outcome(&self) -> &'static str {
        match self {
            Delivery::Duplicate => "duplicate",
            Delivery::Processed => "processed",
            Delivery::Ignored => "ignored",
            Delivery::Rejected(_) => "rejected",
            Delivery::Failed(_) => "failed",
        }
    }
}

/// The one path every Stripe event takes, whether a webhook delivered it or a reconciliation
/// found it in Stripe's event list: checked, looked up, claimed, handled and recorded, in one
/// transaction. The claim makes it exactly once: a concurrent delivery of the same event, by
/// either route, waits on the claim and then finds it settled.
///
/// An `Err` means nothing was recorded: the payload is not a Stripe event (422 for a webhook),
/// or the database could not be used.
pub async fn deliver(
    pool: &ServicePool,
    stripe: Option<&StripeClient>,
    payload: Value,
) -> Result<(StripeEvent, Delivery), ApiError> {
    let event: StripeEvent = serde_json::from_value(whole_numbers_as_integers(payload.clone()))
        .map_err(|e| ApiError::field("body", format!("not a Stripe event: {e}")))?;
    // Kept for the record; PostgreSQL's jsonb cannot hold a NUL character, which Stripe never
    // sends, so any is replaced rather than failing the delivery.
    let payload = without_nul(payload);
    event.check()?;

    // An event of the other mode than the key's (a test event at a live deployment, or the
    // reverse) is recorded and refused, never acted on. Without a key there is no mode to hold
    // events to.
    let wrong_mode = stripe
        .filter(|stripe| stripe.livemode() != event.livemode)
        .map(|stripe| {
            format!(
                "a {} event, but STRIPE_SECRET_KEY is a {} key: refused",
                mode_name(event.livemode),
                mode_name(stripe.livemode())
            )
        });

    // A redelivery of an event settled here is answered at once, without asking Stripe
    // anything. (The claim below stays what decides: this only spares the lookups.)
    let settled = sqlx::query_scalar!(
        "select exists (select 1 from public.stripe_events where id = $1 and status <> 'failed')
            as \"settled!\"",
        &event.id,
    )
    .fetch_one(pool)
    .await?;
    if settled {
        return Ok((event, Delivery::Duplicate));
    }

    // Anything to ask Stripe is asked before the transaction opens: no row lock or pooled
    // connection is held while Stripe answers.
    let lookups = match wrong_mode {
        None => Lookups::gather(stripe, &event).await,
        Some(_) => Lookups::default(),
    };

    // The claim, the handling and the recorded outcome are one unit of work: a conflict with
    // another transaction (a serialization failure, a deadlock) rolls all of it back and it
    // runs again. A failure of the database itself commits nothing, so the event stays
    // unclaimed and the next delivery or reconciliation handles it afresh.
    let delivery = db::retrying_conflicts(|| {
        claim_and_handle(pool, &event, &payload, wrong_mode.as_deref(), &lookups)
    })
    .await?;

    match &delivery {
        Delivery::Rejected(why) => {
            tracing::warn!(event = %event.id, kind = %event.kind, error = %why, "rejected a Stripe event");
        }
        Delivery::Failed(why) => {
            tracing::warn!(event = %event.id, kind = %event.kind, error = %why, "handling a Stripe event failed; a redelivery or reconciliation will retry");
        }
        _ => {}
    }
    Ok((event, delivery))
}

/// Claims the event, hands it to its handler and records the outcome, in one transaction.
async fn claim_and_handle(
    pool: &ServicePool,
    event: &StripeEvent,
    payload: &Value,
    wrong_mode: Option<&str>,
    lookups: &Lookups,
) -> ApiResult<Delivery> {
    let mut tx = pool.begin().await?;
    // Claim the event: a new id, or one whose earlier handling failed. A concurrent delivery
    // waits here on the primary key until this transaction ends.
    let claimed = sqlx::query_scalar!(
        "insert into public.stripe_events
           (id, type, api_version, livemode, stripe_created_at, status, payload)
         values ($1, $2, $3, $4, to_timestamp($5), 'processing', $6)
         on conflict (id) do update
            set status = 'processing', attempts = public.stripe_events.attempts + 1, error = null,
                payload = excluded.payload
          where public.stripe_events.status = 'failed'
         returning 1 as claimed",
        &event.id,
        &event.kind,
        event.api_version.as_deref(),
        event.livemode,
        event.created.map(|c| c as f64),
        payload,
    )
    .fetch_optional(&mut *tx)
    .await?;
    if claimed.is_none() {
        tx.rollback().await?;
        return Ok(Delivery::Duplicate);
    }

    // The handler runs inside a savepoint: whatever it did is undone if it fails, while the
    // outcome is still recorded on the event row.
    let outcome = if let Some(why) = wrong_mode {
        Err(Failure::Permanent(why.to_owned()))
    } else {
        let mut savepoint = (&mut *tx).begin().await?;
        let outcome = dispatch(&mut savepoint, event, lookups).await;
        if outcome.is_ok() {
            savepoint.commit().await?;
        } else {
            savepoint.rollback().await?;
        }
        outcome
    };
    let delivery = match outcome {
        Ok(Handled::Processed) => Delivery::Processed,
        Ok(Handled::Ignored) => Delivery::Ignored,
        Err(Failure::Permanent(why)) => Delivery::Rejected(why),
        Err(Failure::Retry(why)) => Delivery::Failed(why),
        // The whole transaction (claim included) is rolled back and runs again.
        Err(Failure::Conflict) => return Err(ApiError::Conflict),
    };
    let error = match &delivery {
        Delivery::Rejected(why) | Delivery::Failed(why) => Some(why.as_str()),
        _ => None,
    };
    sqlx::query!(
        "update public.stripe_events set status = $2, error = $3,
                processed_at = case when $2 in ('processed', 'ignored') then now() end
          where id = $1",
        &event.id,
        delivery.outcome(),
        error,
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(delivery)
}

fn mode_name(livemode: bool) -> &'static str {
    if livemode { "live-mode" } else { "test-mode" }
}

/// What Stripe's API is asked about an event before its transaction opens, so that no row lock
/// or pooled connection is held while Stripe answers.
#[derive(Default)]
struct Lookups {
    /// For `invoice.paid`: the payment that paid the invoice.
    invoice_payment: Option<subscriptions::PaymentLink>,
    /// For a paid Checkout Session: the charge of its payment intent, when Stripe could say.
    checkout_charge: Option<String>,
}

impl Lookups {
    async fn gather(stripe: Option<&StripeClient>, event: &StripeEvent) -> Self {
        Lookups {
            invoice_payment: subscriptions::look_up_payment(stripe, event).await,
            checkout_charge: purchases::look_up_charge(stripe, event).await,
        }
    }
}

/// The event types this service acts on (and `reconcile` lists); metrics label any other as
/// `other`, so a label's values come from a closed set.
pub const HANDLED_TYPES: &[&str] = &[
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "charge.refunded",
    "charge.dispute.created",
    "charge.dispute.closed",
    "charge.dispute.funds_reinstated",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.paid",
];

/// `kind` as a metric label: a handled type, or `other`.
pub fn type_label(kind: &str) -> &'static str {
    HANDLED_TYPES
        .iter()
        .find(|t| **t == kind)
        .copied()
        .unwrap_or("other")
}

fn record(kind: &str, outcome: &'static str) {
    let kind = type_label(kind);
    metrics::counter!("stripe_webhook_events_total", "type" => kind, "outcome" => outcome)
        .increment(1);
}

/// A Stripe event, as far as this service reads it (Stripe sends more fields).
#[derive(Debug, Deserialize, ToSchema)]
pub struct StripeEvent {
    /// `evt_…`
    id: String,
    /// Such as `checkout.session.completed`.
    #[serde(rename = "type")]
    kind: String,
    /// Unix time.
    created: Option<i64>,
    api_version: Option<String>,
    #[serde(default)]
    livemode: bool,
    data: EventData,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct EventData {
    /// The object the event is about.
    #[schema(value_type = Object)]
    object: Value,
}

/// Latest `created` accepted: the end of year 9999, as far as timestamps go.
const LATEST_CREATED: i64 = 253_402_300_799;

impl StripeEvent {
    /// `evt_…`
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Such as `checkout.session.completed`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// What the events table can hold and Stripe sends: ids of letters, digits and `_`,
    /// types of lower-case letters, digits, `.` and `_`, a creation time within range.
    fn check(&self) -> Result<(), ApiError> {
        let id_ok = (1..=limits::STRIPE_ID_CHARS).contains(&self.id.len())
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        let type_ok = (1..=limits::STRIPE_ID_CHARS).contains(&self.kind.len())
            && self
                .kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_');
        let created_ok = self
            .created
            .is_none_or(|c| (0..=LATEST_CREATED).contains(&c));
        let version_ok = self.api_version.as_ref().is_none_or(|v| {
            v.len() <= limits::STRIPE_ID_CHARS && v.bytes().all(|b| b.is_ascii_graphic())
        });
        if id_ok && type_ok && created_ok && version_ok && self.data.object.is_object() {
            Ok(())
        } else {
            Err(ApiError::field(
                "body",
                "not a Stripe event: an id of letters, digits and _, a type of lower-case \
                 letters, digits, . and _ (each 1 to 255 characters), a Unix time, an API \
                 version of visible characters and an object in data",
            ))
        }
    }
}

enum Handled {
    Processed,
    Ignored,
}

enum Failure {
    /// Malformed: retrying cannot help.
    Permanent(String),
    /// Might work later (unknown user, database trouble): Stripe should retry.
    Retry(String),
    /// The database rolled the transaction back for a serialization failure or a deadlock:
    /// the whole delivery runs again at once.
    Conflict,
}

impl From<sqlx::Error> for Failure {
    fn from(err: sqlx::Error) -> Self {
        if database_fault(&err) == Some(DatabaseFault::Conflict) {
            return Failure::Conflict;
        }
        if let sqlx::Error::Database(db) = &err
            && db.code().as_deref() == Some("AC404")
        {
            return Failure::Retry("no profile exists for the user this payment is for".to_owned());
        }
        Failure::Retry(format!("database error: {err}"))
    }
}

type Outcome = Result<Handled, Failure>;

fn object<T: DeserializeOwned>(event: &StripeEvent) -> Result<T, Failure> {
    serde_json::from_value(event.data.object.clone())
        .map_err(|e| Failure::Permanent(format!("malformed {} object: {e}", event.kind)))
}

/// Hands the event to its family's handler.
async fn dispatch(conn: &mut PgConnection, event: &StripeEvent, lookups: &Lookups) -> Outcome {
    match event.kind.as_str() {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            purchases::checkout_paid(conn, event, object(event)?, &lookups.checkout_charge).await
        }
        "checkout.session.async_payment_failed" => purchases::checkout_failed(object(event)?),
        "charge.refunded" => refunds::charge_refunded(conn, object(event)?).await,
        "charge.dispute.created" => refunds::dispute_created(conn, object(event)?).await,
        "charge.dispute.closed" => refunds::dispute_closed(conn, object(event)?).await,
        "charge.dispute.funds_reinstated" => {
            refunds::dispute_funds_reinstated(conn, object(event)?).await
        }
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted" => {
            subscriptions::subscription_changed(conn, event, object(event)?).await
        }
        "invoice.paid" => {
            subscriptions::invoice_paid(conn, event, object(event)?, &lookups.invoice_payment).await
        }
        _ => Ok(Handled::Ignored),
    }
}

/// An id field that Stripe may send as a string or, when expanded, as an object with `id`.
fn id_of(value: &Option<Value>) -> Option<String> {
    match value {
        Some(Value::String(id)) if !id.is_empty() => Some(id.clone()),
        Some(Value::Object(map)) => map.get("id").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn user_from(text: Option<&String>) -> Option<Uuid> {
    text.and_then(|t| Uuid::parse_str(t).ok())
}

/// `value` with every NUL character in its strings and keys replaced by U+FFFD.
fn without_nul(value: Value) -> Value {
    let clean = |s: String| {
        if s.contains('\0') {
            s.replace('\0', "\u{fffd}")
        } else {
            s
        }
    };
    match value {
        Value::String(s) => Value::String(clean(s)),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nul).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (clean(k), without_nul(v)))
                .collect(),
        ),
        other => other,
    }
}

/// Links the Stripe customer to the user, unless another profile holds it already.
async fn remember_customer(
    conn: &mut PgConnection,
    user: Uuid,
    customer: &str,
) -> Result<(), Failure> {
    sqlx::query!(
        "update public.profiles p set stripe_customer_id = $2
          where p.id = $1 and p.stripe_customer_id is distinct from $2
            and not exists (select 1 from public.profiles o where o.stripe_customer_id = $2)",
        user,
        customer,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A Stripe amount (smallest currency unit) as the tables hold it.
fn clamp(amount: i64) -> i32 {
    amount.clamp(0, i64::from(i32::MAX)) as i32
}

/// A list as Stripe embeds it in objects (`{"object": "list", "data": [...]}`).
#[derive(Debug, Deserialize)]
struct StripeList<T> {
    #[serde(default = "Vec::new")]
    data: Vec<T>,
}
