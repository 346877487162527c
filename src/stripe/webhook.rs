//! `POST /v1/webhooks/stripe`: signed events from Stripe, each handled exactly once.
//!
//! The signature is checked on the raw bytes first. The event is then claimed by inserting its
//! id into `stripe_events`, and handled in the same database transaction, so a redelivery —
//! sequential or concurrent — finds the id and answers `duplicate: true`. Credits are granted
//! through `stripe_grant`, unique per Stripe object, so the two events that can announce one
//! payment (`checkout.session.completed`, `…async_payment_succeeded`) grant once between them.
//!
//! A handler failure that a retry may cure (an unknown user, a database error) is recorded as
//! `failed` and answered with a 503 so that Stripe retries; a malformed object is recorded as
//! `rejected` and answered with a 200 so that it is not retried for days.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{Acquire, PgConnection};
use utoipa::ToSchema;
use uuid::Uuid;

use super::client::StripeClient;
use super::signature::{self, SignatureError};
use crate::app::AppState;
use crate::error::{ApiError, ApiResult, Problem};
use crate::telemetry;

/// Largest webhook body (CONTRACT §4).
pub const WEBHOOK_BODY_LIMIT_BYTES: usize = 1024 * 1024;

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
    request_body(content = Object, description = "A Stripe event", content_type = "application/json"),
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

    let event: Event = serde_json::from_slice(&body)
        .map_err(|e| ApiError::field("body", format!("not a Stripe event: {e}")))?;
    let payload: Value = serde_json::from_slice(&body).map_err(|e| ApiError::Internal(e.into()))?;
    if !(1..=255).contains(&event.id.len()) || !(1..=255).contains(&event.kind.len()) {
        return Err(ApiError::field(
            "body",
            "not a Stripe event: id and type must be 1 to 255 characters",
        ));
    }

    // Anything to ask Stripe is asked before the transaction opens: no row lock or pooled
    // connection is held while Stripe answers.
    let payment_link = look_up_payment(&state, &event).await;

    let mut tx = state.pool.begin().await?;
    // Claim the event: a new id, or one whose earlier handling failed. A concurrent delivery
    // waits here on the primary key until this transaction ends.
    let claimed: Option<i32> = sqlx::query_scalar(
        "insert into public.stripe_events (id, type, api_version, livemode, stripe_created_at, status, payload)
         values ($1, $2, $3, $4, to_timestamp($5), 'processing', $6)
         on conflict (id) do update
            set status = 'processing', attempts = public.stripe_events.attempts + 1, error = null,
                payload = excluded.payload
          where public.stripe_events.status = 'failed'
         returning 1",
    )
    .bind(&event.id)
    .bind(&event.kind)
    .bind(&event.api_version)
    .bind(event.livemode)
    .bind(event.created.map(|c| c as f64))
    .bind(&payload)
    .fetch_optional(&mut *tx)
    .await?;
    if claimed.is_none() {
        tx.rollback().await?;
        record(&event.kind, "duplicate");
        return Ok(Json(WebhookReceipt {
            received: true,
            duplicate: true,
        }));
    }

    // The handler runs inside a savepoint: whatever it did is undone if it fails, while the
    // outcome is still recorded on the event row.
    let outcome = {
        let mut savepoint = (&mut *tx).begin().await?;
        let outcome = handle(&mut savepoint, &event, &payment_link).await;
        if outcome.is_ok() {
            savepoint.commit().await?;
        } else {
            savepoint.rollback().await?;
        }
        outcome
    };
    let (status, error) = match &outcome {
        Ok(Handled::Processed) => ("processed", None),
        Ok(Handled::Ignored) => ("ignored", None),
        Err(Failure::Permanent(why)) => ("rejected", Some(why.clone())),
        Err(Failure::Retry(why)) => ("failed", Some(why.clone())),
    };
    sqlx::query(
        "update public.stripe_events set status = $2, error = $3,
                processed_at = case when $2 in ('processed', 'ignored') then now() end
          where id = $1",
    )
    .bind(&event.id)
    .bind(status)
    .bind(&error)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    record(&event.kind, status);

    match outcome {
        Ok(_) => Ok(Json(WebhookReceipt {
            received: true,
            duplicate: false,
        })),
        Err(Failure::Permanent(why)) => {
            tracing::warn!(event = %event.id, kind = %event.kind, error = %why, "rejected a malformed Stripe event");
            Ok(Json(WebhookReceipt {
                received: true,
                duplicate: false,
            }))
        }
        Err(Failure::Retry(why)) => {
            tracing::warn!(event = %event.id, kind = %event.kind, error = %why, "handling a Stripe event failed; Stripe will retry");
            Err(ApiError::Unavailable("the event could not be handled yet"))
        }
    }
}

/// The payment intent and charge that paid an invoice, or why they could not be found.
type PaymentLink = Result<(Option<String>, Option<String>), String>;

/// For a paid subscription invoice that does not name its payment (API versions from
/// 2025-03-31), the payment Stripe lists for it. Without it a later refund of the invoice could
/// not take its credits back, so a failed lookup is worth Stripe's retry. None when there is
/// nothing to look up, or no key to look it up with.
async fn look_up_payment(state: &AppState, event: &Event) -> Option<PaymentLink> {
    if event.kind != "invoice.paid" {
        return None;
    }
    let invoice: Invoice = serde_json::from_value(event.data.object.clone()).ok()?;
    if !invoice.grants_credits() || invoice.amount_paid <= 0 || invoice.payment_link().is_some() {
        return None;
    }
    let secret_key = state.config.stripe.secret_key.as_ref()?;
    let client = StripeClient {
        http: &state.http,
        api_base: &state.config.stripe.api_base,
        secret_key,
    };
    Some(match client.invoice_payment(&invoice.id).await {
        Ok(Some(link)) => Ok(link),
        Ok(None) => Err(format!(
            "Stripe lists no paid payment for invoice {} yet",
            invoice.id
        )),
        Err(e) => Err(format!(
            "could not look up the payment of invoice {}: {e}",
            invoice.id
        )),
    })
}

fn record(kind: &str, outcome: &'static str) {
    metrics::counter!("stripe_webhook_events_total", "type" => kind.to_owned(), "outcome" => outcome).increment(1);
}

#[derive(Debug, Deserialize)]
struct Event {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    created: Option<i64>,
    api_version: Option<String>,
    #[serde(default)]
    livemode: bool,
    data: EventData,
}

#[derive(Debug, Deserialize)]
struct EventData {
    object: Value,
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
}

impl From<sqlx::Error> for Failure {
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err
            && db.code().as_deref() == Some("AC404")
        {
            return Failure::Retry("no profile exists for the user this payment is for".to_owned());
        }
        Failure::Retry(format!("database error: {err}"))
    }
}

type Outcome = Result<Handled, Failure>;

fn object<T: DeserializeOwned>(event: &Event) -> Result<T, Failure> {
    serde_json::from_value(event.data.object.clone())
        .map_err(|e| Failure::Permanent(format!("malformed {} object: {e}", event.kind)))
}

async fn handle(
    conn: &mut PgConnection,
    event: &Event,
    payment_link: &Option<PaymentLink>,
) -> Outcome {
    match event.kind.as_str() {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            checkout_paid(conn, event, object(event)?).await
        }
        "checkout.session.async_payment_failed" => {
            let session: CheckoutSession = object(event)?;
            tracing::info!(session = %session.id, "a delayed Checkout payment failed; nothing granted");
            Ok(Handled::Processed)
        }
        "charge.refunded" => charge_refunded(conn, object(event)?).await,
        "charge.dispute.created" => dispute_created(conn, object(event)?).await,
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted" => {
            subscription_changed(conn, event, object(event)?).await
        }
        "invoice.paid" => invoice_paid(conn, event, object(event)?, payment_link).await,
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

#[derive(Debug, Deserialize)]
struct CheckoutSession {
    id: String,
    mode: String,
    payment_status: Option<String>,
    client_reference_id: Option<String>,
    customer: Option<Value>,
    payment_intent: Option<Value>,
    #[serde(default)]
    metadata: HashMap<String, String>,
    amount_total: Option<i64>,
    currency: Option<String>,
}

async fn checkout_paid(
    conn: &mut PgConnection,
    event: &Event,
    session: CheckoutSession,
) -> Outcome {
    let user = user_from(session.client_reference_id.as_ref()).ok_or_else(|| {
        Failure::Permanent(format!(
            "session {} has no client_reference_id user",
            session.id
        ))
    })?;
    if let Some(customer) = id_of(&session.customer) {
        remember_customer(conn, user, &customer).await?;
    }
    // A subscription's first payment is granted by its invoice.paid, never by the session.
    if session.mode != "payment" {
        return Ok(Handled::Processed);
    }
    match session.payment_status.as_deref() {
        Some("paid" | "no_payment_required") => {}
        // Delayed payment methods: async_payment_succeeded will follow.
        _ => return Ok(Handled::Processed),
    }
    let pack = user_from(session.metadata.get("pack_id"));
    let (credits, pack_id, pack_name) =
        pack_credits(conn, pack, session.metadata.get("credits")).await?;
    let granted: Option<Uuid> = sqlx::query_scalar(
        "select public.stripe_grant('checkout_session', $1, $2, $3, $4, $5, $6, $7, null, 'stripe', $8, $9)",
    )
    .bind(&session.id)
    .bind(user)
    .bind(pack_id)
    .bind(credits)
    .bind(session.amount_total.unwrap_or(0).clamp(0, i64::from(i32::MAX)) as i32)
    .bind(&session.currency)
    .bind(id_of(&session.payment_intent))
    .bind(format!("Credit pack: {pack_name}"))
    .bind(&event.id)
    .fetch_one(&mut *conn)
    .await?;
    if granted.is_some() {
        telemetry::credits_granted("stripe", i64::from(credits));
    }
    Ok(Handled::Processed)
}

/// The credits a purchase grants: those promised at checkout (metadata), else the pack's.
async fn pack_credits(
    conn: &mut PgConnection,
    pack: Option<Uuid>,
    promised: Option<&String>,
) -> Result<(i32, Option<Uuid>, String), Failure> {
    let row: Option<(Uuid, i32, String)> = match pack {
        Some(id) => {
            sqlx::query_as("select id, credits, name from public.credit_packs where id = $1")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?
        }
        None => None,
    };
    let promised = promised
        .and_then(|c| c.parse::<i32>().ok())
        .filter(|c| *c > 0);
    match (row, promised) {
        (Some((id, _, name)), Some(credits)) => Ok((credits, Some(id), name)),
        (Some((id, credits, name)), None) => Ok((credits, Some(id), name)),
        (None, Some(credits)) => Ok((credits, None, "unknown pack".to_owned())),
        (None, None) if pack.is_none() => {
            Err(Failure::Permanent("the session names no pack".to_owned()))
        }
        (None, None) => Err(Failure::Retry(
            "the session's pack does not exist".to_owned(),
        )),
    }
}

async fn remember_customer(
    conn: &mut PgConnection,
    user: Uuid,
    customer: &str,
) -> Result<(), Failure> {
    sqlx::query(
        "update public.profiles p set stripe_customer_id = $2
          where p.id = $1 and p.stripe_customer_id is distinct from $2
            and not exists (select 1 from public.profiles o where o.stripe_customer_id = $2)",
    )
    .bind(user)
    .bind(customer)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[derive(Debug, Deserialize)]
struct Charge {
    id: String,
    amount: i64,
    amount_refunded: i64,
    payment_intent: Option<Value>,
}

async fn charge_refunded(conn: &mut PgConnection, charge: Charge) -> Outcome {
    let taken: i32 = sqlx::query_scalar("select public.stripe_record_charge($1, $2, $3, $4, 0)")
        .bind(&charge.id)
        .bind(id_of(&charge.payment_intent))
        .bind(clamp(charge.amount))
        .bind(clamp(charge.amount_refunded))
        .fetch_one(&mut *conn)
        .await?;
    telemetry::credits_spent("refund", i64::from(taken));
    Ok(Handled::Processed)
}

#[derive(Debug, Deserialize)]
struct Dispute {
    amount: i64,
    charge: Option<Value>,
    payment_intent: Option<Value>,
}

async fn dispute_created(conn: &mut PgConnection, dispute: Dispute) -> Outcome {
    let charge = id_of(&dispute.charge)
        .ok_or_else(|| Failure::Permanent("the dispute names no charge".to_owned()))?;
    // The dispute does not carry its charge's amount: the function finds it under the
    // payment's lock (a null amount says so).
    let taken: i32 = sqlx::query_scalar("select public.stripe_record_charge($1, $2, null, 0, $3)")
        .bind(&charge)
        .bind(id_of(&dispute.payment_intent))
        .bind(clamp(dispute.amount))
        .fetch_one(&mut *conn)
        .await?;
    telemetry::credits_spent("refund", i64::from(taken));
    Ok(Handled::Processed)
}

fn clamp(amount: i64) -> i32 {
    amount.clamp(0, i64::from(i32::MAX)) as i32
}

#[derive(Debug, Deserialize)]
struct Subscription {
    id: String,
    customer: Option<Value>,
    status: String,
    #[serde(default)]
    metadata: HashMap<String, String>,
    items: Option<List<SubscriptionItem>>,
    /// Where API versions before 2025-03-31 put it.
    current_period_end: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct List<T> {
    #[serde(default = "Vec::new")]
    data: Vec<T>,
}

#[derive(Debug, Deserialize)]
struct SubscriptionItem {
    price: Option<Value>,
    /// Where API versions from 2025-03-31 put it.
    current_period_end: Option<i64>,
}

/// The user a subscription or invoice belongs to: the metadata set at checkout, else the
/// profile that holds the Stripe customer.
async fn subscriber(
    conn: &mut PgConnection,
    metadata_user: Option<Uuid>,
    customer: Option<&str>,
) -> Result<Uuid, Failure> {
    if let Some(user) = metadata_user {
        return Ok(user);
    }
    let Some(customer) = customer else {
        return Err(Failure::Permanent(
            "no user in metadata and no customer".to_owned(),
        ));
    };
    let user: Option<Uuid> =
        sqlx::query_scalar("select id from public.profiles where stripe_customer_id = $1")
            .bind(customer)
            .fetch_optional(&mut *conn)
            .await?;
    user.ok_or_else(|| Failure::Retry(format!("no profile holds Stripe customer {customer}")))
}

async fn subscription_changed(
    conn: &mut PgConnection,
    event: &Event,
    sub: Subscription,
) -> Outcome {
    let customer = id_of(&sub.customer);
    let user = subscriber(
        conn,
        user_from(sub.metadata.get("user_id")),
        customer.as_deref(),
    )
    .await?;
    let items = sub.items.map(|l| l.data).unwrap_or_default();
    let price = items.iter().find_map(|i| id_of(&i.price));
    let period_end = sub
        .current_period_end
        .or_else(|| items.iter().find_map(|i| i.current_period_end));
    let plan: Option<Uuid> = match &price {
        Some(price) => {
            sqlx::query_scalar("select id from public.credit_packs where stripe_price_id = $1")
                .bind(price)
                .fetch_optional(&mut *conn)
                .await?
        }
        None => None,
    }
    .or_else(|| user_from(sub.metadata.get("pack_id")));
    let event_at = event
        .created
        .and_then(|c| DateTime::<Utc>::from_timestamp(c, 0))
        .unwrap_or_else(Utc::now);
    let status = if event.kind == "customer.subscription.deleted" {
        "canceled".to_owned()
    } else {
        sub.status
    };

    if let Some(customer) = &customer {
        remember_customer(conn, user, customer).await?;
    }
    // Older events never overwrite newer state, and the end of a previous subscription does not
    // cancel the one that replaced it.
    sqlx::query(
        "update public.profiles p
            set stripe_subscription_id = $2, subscription_status = $3, subscription_plan = $4,
                subscription_current_period_end = $5, stripe_subscription_event_at = $6
          where p.id = $1
            and (p.stripe_subscription_event_at is null or p.stripe_subscription_event_at <= $6)
            and not ($7 and p.stripe_subscription_id is not null and p.stripe_subscription_id <> $2)",
    )
    .bind(user)
    .bind(&sub.id)
    .bind(&status)
    .bind(plan.map(|p| p.to_string()))
    .bind(period_end.and_then(|e| DateTime::<Utc>::from_timestamp(e, 0)))
    .bind(event_at)
    .bind(event.kind == "customer.subscription.deleted")
    .execute(&mut *conn)
    .await?;
    Ok(Handled::Processed)
}

#[derive(Debug, Deserialize)]
struct Invoice {
    id: String,
    customer: Option<Value>,
    billing_reason: Option<String>,
    #[serde(default)]
    amount_paid: i64,
    currency: Option<String>,
    /// Before 2025-03-31: the subscription, charge and payment intent sit on the invoice.
    subscription: Option<Value>,
    charge: Option<Value>,
    payment_intent: Option<Value>,
    subscription_details: Option<Value>,
    /// From 2025-03-31: `parent.subscription_details` and `payments`.
    parent: Option<Value>,
    payments: Option<Value>,
    lines: Option<List<Value>>,
}

impl Invoice {
    fn subscription_details(&self) -> Option<&Value> {
        self.parent
            .as_ref()
            .and_then(|p| p.get("subscription_details"))
            .filter(|d| d.is_object())
            .or(self.subscription_details.as_ref().filter(|d| d.is_object()))
    }

    fn subscription_id(&self) -> Option<String> {
        id_of(&self.subscription).or_else(|| {
            id_of(
                &self
                    .subscription_details()
                    .and_then(|d| d.get("subscription"))
                    .cloned(),
            )
        })
    }

    fn metadata(&self, key: &str) -> Option<String> {
        self.subscription_details()
            .and_then(|d| d.get("metadata"))
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    /// Price ids of the invoice's lines: `price` before 2025-03-31, `pricing.price_details.price` after.
    fn price_ids(&self) -> Vec<String> {
        let lines = self
            .lines
            .as_ref()
            .map(|l| l.data.as_slice())
            .unwrap_or_default();
        lines
            .iter()
            .filter_map(|line| {
                id_of(&line.get("price").cloned())
                    .or_else(|| id_of(&line.pointer("/pricing/price_details/price").cloned()))
                    .or_else(|| id_of(&line.get("plan").cloned()))
            })
            .collect()
    }

    /// The payment intent and charge the invoice itself names, if any (classic fields, or an
    /// expanded `payments` list).
    fn payment_link(&self) -> Option<(Option<String>, Option<String>)> {
        let intent = id_of(&self.payment_intent).or_else(|| self.first_payment("payment_intent"));
        let charge = id_of(&self.charge).or_else(|| self.first_payment("charge"));
        (intent.is_some() || charge.is_some()).then_some((intent, charge))
    }

    /// Whether this invoice grants credits (a subscription's first or renewal invoice).
    fn grants_credits(&self) -> bool {
        matches!(
            self.billing_reason.as_deref(),
            Some("subscription_create" | "subscription_cycle")
        )
    }

    fn first_payment(&self, field: &str) -> Option<String> {
        self.payments
            .as_ref()
            .and_then(|p| p.get("data"))
            .and_then(Value::as_array)
            .and_then(|data| {
                data.iter()
                    .find_map(|p| id_of(&p.pointer(&format!("/payment/{field}")).cloned()))
            })
    }
}

async fn invoice_paid(
    conn: &mut PgConnection,
    event: &Event,
    invoice: Invoice,
    payment_link: &Option<PaymentLink>,
) -> Outcome {
    if !invoice.grants_credits() {
        return Ok(Handled::Processed);
    }
    if invoice.subscription_id().is_none() {
        return Err(Failure::Permanent(format!(
            "invoice {} names no subscription",
            invoice.id
        )));
    }
    let customer = id_of(&invoice.customer);
    let user = subscriber(
        conn,
        invoice
            .metadata("user_id")
            .as_ref()
            .and_then(|u| Uuid::parse_str(u).ok()),
        customer.as_deref(),
    )
    .await?;
    let prices = invoice.price_ids();
    let pack: Option<(Uuid, i32, String)> = sqlx::query_as(
        "select id, credits, name from public.credit_packs
          where kind = 'subscription' and stripe_price_id = any ($1)
          order by credits desc limit 1",
    )
    .bind(&prices)
    .fetch_optional(&mut *conn)
    .await?;
    let pack = match pack {
        Some(pack) => pack,
        None => {
            let by_metadata = invoice
                .metadata("pack_id")
                .and_then(|p| Uuid::parse_str(&p).ok());
            match by_metadata {
                Some(id) => sqlx::query_as(
                    "select id, credits, name from public.credit_packs where id = $1",
                )
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?
                .ok_or_else(|| {
                    Failure::Retry(format!(
                        "no credit pack sells the prices of invoice {}",
                        invoice.id
                    ))
                })?,
                None => {
                    return Err(Failure::Retry(format!(
                        "no credit pack sells the prices of invoice {}",
                        invoice.id
                    )));
                }
            }
        }
    };
    if let Some(customer) = &customer {
        remember_customer(conn, user, customer).await?;
    }
    let (payment_intent, charge) = match invoice.payment_link() {
        Some(link) => link,
        None => match payment_link {
            Some(Ok(link)) => link.clone(),
            Some(Err(why)) => return Err(Failure::Retry(why.clone())),
            None => {
                tracing::warn!(
                    invoice = %invoice.id,
                    "this invoice's payment is unknown (STRIPE_SECRET_KEY is not set): its refunds will not take credits back"
                );
                (None, None)
            }
        },
    };
    let granted: Option<Uuid> = sqlx::query_scalar(
        "select public.stripe_grant('invoice', $1, $2, $3, $4, $5, $6, $7, $8, 'subscription', $9, $10)",
    )
    .bind(&invoice.id)
    .bind(user)
    .bind(pack.0)
    .bind(pack.1)
    .bind(clamp(invoice.amount_paid))
    .bind(&invoice.currency)
    .bind(payment_intent)
    .bind(charge)
    .bind(format!("Subscription: {}", pack.2))
    .bind(&event.id)
    .fetch_one(&mut *conn)
    .await?;
    if granted.is_some() {
        telemetry::credits_granted("subscription", i64::from(pack.1));
    }
    Ok(Handled::Processed)
}
