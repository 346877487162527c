//! A local stand-in for Stripe: its API (Checkout Sessions, invoice payments, payment intents,
//! the event list) over HTTP, and webhook events in Stripe's object shapes (field names as in Stripe's OpenAPI
//! fixtures), signed as Stripe signs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use amethyst_credits::Config;
use amethyst_credits::stripe::signature;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use uuid::Uuid;

pub const WEBHOOK_SECRET: &str = "whsec_test_current";
pub const OLD_WEBHOOK_SECRET: &str = "whsec_test_previous";
pub const SECRET_KEY: &str = "sk_test_amethyst";
pub const SUCCESS_URL: &str = "https://app.amethyst.test/billing/success";
pub const CANCEL_URL: &str = "https://app.amethyst.test/billing/cancel";

/// A request the fake API received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub authorization: Option<String>,
    pub idempotency_key: Option<String>,
    pub stripe_version: Option<String>,
    pub content_type: Option<String>,
    pub form: Vec<(String, String)>,
}

impl Recorded {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
pub struct FakeState {
    pub requests: Mutex<Vec<Recorded>>,
    /// Answer this many requests with a 500 before behaving.
    pub fail_next: AtomicUsize,
    /// Answer every request with this status and error body.
    pub refuse: Mutex<Option<(u16, Value)>>,
    sessions_by_key: Mutex<HashMap<String, Value>>,
    counter: AtomicUsize,
    /// The account's events, as `GET /v1/events` lists them (see [`FakeStripe::publish`]).
    events: Mutex<Vec<Value>>,
    /// Pages of the event list served so far.
    pub event_pages_served: AtomicUsize,
    /// From the given page on (0 is the first), the event list breaks this way.
    pub events_break: Mutex<Option<(usize, Breakage)>>,
}

/// How the event list misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breakage {
    /// 500, as Stripe answers when it has trouble of its own.
    ServerError,
    /// No answer for a minute.
    Stall,
}

pub struct FakeStripe {
    pub url: String,
    pub state: Arc<FakeState>,
}

impl FakeStripe {
    pub async fn start() -> Self {
        let state = Arc::new(FakeState::default());
        let router = axum::Router::new()
            .route("/v1/checkout/sessions", axum::routing::post(create_session))
            .route("/v1/invoice_payments", axum::routing::get(invoice_payments))
            .route(
                "/v1/payment_intents/{id}",
                axum::routing::get(payment_intent),
            )
            .route("/v1/events", axum::routing::get(list_events))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        FakeStripe { url, state }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Adds events to the account's event list (Stripe lists them newest first by `created`,
    /// the later published first among events of the same second).
    pub fn publish(&self, events: impl IntoIterator<Item = Value>) {
        self.state.events.lock().unwrap().extend(events);
    }

    /// The requests made to the event list.
    pub fn event_list_requests(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == "/v1/events")
            .collect()
    }
}

/// `GET /v1/events`: the account's events of `types[]` created at or after `created[gte]`,
/// newest first, `limit` (1 to 100, default 10) at a time after `starting_after`, in Stripe's
/// list shape.
async fn list_events(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let query = query.unwrap_or_default();
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    state.requests.lock().unwrap().push(Recorded {
        path: "/v1/events".to_owned(),
        authorization: header("authorization"),
        idempotency_key: header("idempotency-key"),
        stripe_version: header("stripe-version"),
        content_type: None,
        form: params.clone(),
    });
    let page = state.event_pages_served.load(Ordering::SeqCst);
    let breakage = *state.events_break.lock().unwrap();
    match breakage {
        Some((from, Breakage::ServerError)) if page >= from => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(
                    json!({"error": {"type": "api_error", "message": "An unknown error occurred"}}),
                ),
            )
                .into_response();
        }
        Some((from, Breakage::Stall)) if page >= from => {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        }
        _ => {}
    }
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let invalid = |message: &str, param: &str| {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": {"message": message, "param": param, "type": "invalid_request_error"}})),
        )
            .into_response()
    };
    let limit = match param("limit").map(str::parse::<usize>) {
        None => 10,
        Some(Ok(n)) if (1..=100).contains(&n) => n,
        _ => return invalid("Invalid integer: limit must be between 1 and 100", "limit"),
    };
    let types: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k == "types[]")
        .map(|(_, v)| v.as_str())
        .collect();
    if types.len() > 20 {
        return invalid("You may pass at most 20 types", "types");
    }
    let since: i64 = param("created[gte]")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);

    // Newest first; among events of the same second, the later published first.
    let mut listed: Vec<Value> = state
        .events
        .lock()
        .unwrap()
        .iter()
        .rev()
        .filter(|e| e["created"].as_i64().unwrap_or(0) >= since)
        .filter(|e| types.is_empty() || types.contains(&e["type"].as_str().unwrap_or("")))
        .cloned()
        .collect();
    listed.sort_by_key(|e| std::cmp::Reverse(e["created"].as_i64().unwrap_or(0)));
    if let Some(after) = param("starting_after") {
        match listed.iter().position(|e| e["id"] == after) {
            Some(at) => {
                listed.drain(..=at);
            }
            None => {
                return (
                    StatusCode::NOT_FOUND,
                    axum::Json(json!({"error": {"code": "resource_missing",
                        "message": format!("No such event: '{after}'"),
                        "param": "starting_after", "type": "invalid_request_error"}})),
                )
                    .into_response();
            }
        }
    }
    let has_more = listed.len() > limit;
    listed.truncate(limit);
    state.event_pages_served.fetch_add(1, Ordering::SeqCst);
    axum::Json(json!({
        "object": "list",
        "data": listed,
        "has_more": has_more,
        "url": "/v1/events"
    }))
    .into_response()
}

async fn create_session(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let recorded = Recorded {
        path: "/v1/checkout/sessions".to_owned(),
        authorization: header("authorization"),
        idempotency_key: header("idempotency-key"),
        stripe_version: header("stripe-version"),
        content_type: header("content-type"),
        form: form.clone(),
    };
    state.requests.lock().unwrap().push(recorded.clone());

    if state
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(
                json!({"error": {"type": "api_error", "message": "An unknown error occurred"}}),
            ),
        )
            .into_response();
    }
    if let Some((status, body)) = state.refuse.lock().unwrap().clone() {
        return (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
    }
    if let Some(key) = &recorded.idempotency_key
        && let Some(session) = state.sessions_by_key.lock().unwrap().get(key)
    {
        return axum::Json(session.clone()).into_response();
    }
    let n = state.counter.fetch_add(1, Ordering::SeqCst);
    let id = format!("cs_test_a1{n:04}{}", Uuid::new_v4().simple());
    let field = |name: &str| recorded.field(name).map(str::to_owned);
    let metadata: serde_json::Map<String, Value> = form
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("metadata[")
                .and_then(|k| k.strip_suffix(']'))
                .map(|k| (k.to_owned(), json!(v)))
        })
        .collect();
    let session = json!({
        "id": id,
        "object": "checkout.session",
        "cancel_url": field("cancel_url"),
        "client_reference_id": field("client_reference_id"),
        "created": chrono::Utc::now().timestamp(),
        "currency": "usd",
        "customer": field("customer"),
        "customer_email": field("customer_email"),
        "expires_at": chrono::Utc::now().timestamp() + 86400,
        "livemode": false,
        "metadata": metadata,
        "mode": field("mode"),
        "payment_intent": null,
        "payment_status": "unpaid",
        "status": "open",
        "subscription": null,
        "success_url": field("success_url"),
        "url": format!("https://checkout.stripe.com/c/pay/{id}"),
    });
    if let Some(key) = &recorded.idempotency_key {
        state
            .sessions_by_key
            .lock()
            .unwrap()
            .insert(key.clone(), session.clone());
    }
    axum::Json(session).into_response()
}

/// `GET /v1/invoice_payments?invoice=in_…`: the invoice was paid by payment intent
/// `pi_<the invoice id without in_>`.
async fn invoice_payments(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let query = query.unwrap_or_default();
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    state.requests.lock().unwrap().push(Recorded {
        path: "/v1/invoice_payments".to_owned(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        idempotency_key: None,
        stripe_version: headers
            .get("stripe-version")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        content_type: None,
        form: params.clone(),
    });
    let invoice = params
        .iter()
        .find(|(k, _)| k == "invoice")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    if invoice.starts_with("in_unpaid") {
        // Stripe has not recorded the payment (yet).
        return axum::Json(
            json!({"object": "list", "data": [], "has_more": false, "url": "/v1/invoice_payments"}),
        )
        .into_response();
    }
    let payment_intent = format!("pi_{}", invoice.trim_start_matches("in_"));
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": format!("inpay_{}", invoice.trim_start_matches("in_")),
            "object": "invoice_payment",
            "amount_paid": 1500,
            "amount_requested": 1500,
            "currency": "usd",
            "invoice": invoice,
            "is_default": true,
            "livemode": false,
            "payment": {"type": "payment_intent", "payment_intent": payment_intent},
            "status": "paid"
        }],
        "has_more": false,
        "url": "/v1/invoice_payments"
    }))
    .into_response()
}

/// `GET /v1/payment_intents/pi_…`: a succeeded payment intent whose latest charge is
/// `ch_<the id without pi_>` (see [`charge_of`]). Stripe does not know ids starting with
/// `pi_missing` (404, as Stripe answers them).
async fn payment_intent(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    state.requests.lock().unwrap().push(Recorded {
        path: format!("/v1/payment_intents/{id}"),
        authorization: header("authorization"),
        idempotency_key: header("idempotency-key"),
        stripe_version: header("stripe-version"),
        content_type: None,
        form: Vec::new(),
    });
    if id.starts_with("pi_missing") {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": {
                "code": "resource_missing",
                "doc_url": "https://stripe.com/docs/error-codes/resource-missing",
                "message": format!("No such payment_intent: '{id}'"),
                "param": "intent",
                "type": "invalid_request_error"
            }})),
        )
            .into_response();
    }
    axum::Json(json!({
        "id": id,
        "object": "payment_intent",
        "amount": 999,
        "amount_capturable": 0,
        "amount_received": 999,
        "application": null,
        "automatic_payment_methods": {"enabled": true},
        "canceled_at": null,
        "capture_method": "automatic",
        "client_secret": format!("{id}_secret_vRcEaoMZkrLEvQ6mp0MIdKsRg"),
        "confirmation_method": "automatic",
        "created": 1_700_000_000,
        "currency": "usd",
        "customer": "cus_NZbFQAsc0ptasX",
        "description": null,
        "last_payment_error": null,
        "latest_charge": charge_of(&id),
        "livemode": false,
        "metadata": {},
        "next_action": null,
        "payment_method": "pm_1MoRxGLgUG5tbmjcfQwEkNkb",
        "payment_method_types": ["card"],
        "receipt_email": null,
        "setup_future_usage": null,
        "status": "succeeded"
    }))
    .into_response()
}

/// The charge the fake API names as the latest of `payment_intent`.
pub fn charge_of(payment_intent: &str) -> String {
    format!("ch_{}", payment_intent.trim_start_matches("pi_"))
}

/// The test configuration plus Stripe's.
pub fn stripe_config(api_base: &str) -> Config {
    let mut config = super::test_config();
    config.stripe.secret_key = Some(amethyst_credits::config::Secret::new(SECRET_KEY));
    config.stripe.webhook_secrets = vec![
        amethyst_credits::config::Secret::new(WEBHOOK_SECRET),
        amethyst_credits::config::Secret::new(OLD_WEBHOOK_SECRET),
    ];
    config.stripe.api_base = api_base.to_owned();
    config.stripe.success_url = Some(SUCCESS_URL.to_owned());
    config.stripe.cancel_url = Some(CANCEL_URL.to_owned());
    config
}

/// The `Stripe-Signature` header Stripe would send for `body` now.
pub fn signature_header(body: &str) -> String {
    signature_header_at(body, chrono::Utc::now().timestamp(), WEBHOOK_SECRET)
}

pub fn signature_header_at(body: &str, timestamp: i64, secret: &str) -> String {
    format!(
        "t={timestamp},v1={}",
        signature::sign(secret, timestamp, body.as_bytes())
    )
}

/// The event envelope.
pub fn event(id: &str, kind: &str, object: Value) -> Value {
    json!({
        "id": id,
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": chrono::Utc::now().timestamp(),
        "data": {"object": object},
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": kind
    })
}

/// `delivery` as created at `created` (a Unix time).
pub fn created_at(mut delivery: Value, created: i64) -> Value {
    delivery["created"] = json!(created);
    delivery
}

pub fn event_id() -> String {
    format!("evt_{}", Uuid::new_v4().simple())
}

/// A completed Checkout Session for a one-time pack.
pub fn checkout_session(
    id: &str,
    user: Uuid,
    pack: Uuid,
    credits: i32,
    payment_intent: &str,
    payment_status: &str,
) -> Value {
    json!({
        "id": id,
        "object": "checkout.session",
        "after_expiration": null,
        "allow_promotion_codes": null,
        "amount_subtotal": 999,
        "amount_total": 999,
        "automatic_tax": {"enabled": false, "status": null},
        "billing_address_collection": null,
        "cancel_url": CANCEL_URL,
        "client_reference_id": user,
        "consent": null,
        "created": 1_700_000_000,
        "currency": "usd",
        "customer": "cus_NZbFQAsc0ptasX",
        "customer_creation": "always",
        "customer_details": {"address": null, "email": "buyer@example.com", "name": null, "phone": null, "tax_exempt": "none", "tax_ids": []},
        "customer_email": null,
        "expires_at": 1_700_086_400,
        "invoice": null,
        "livemode": false,
        "locale": null,
        "metadata": {"user_id": user, "pack_id": pack, "credits": credits.to_string()},
        "mode": "payment",
        "payment_intent": payment_intent,
        "payment_link": null,
        "payment_method_types": ["card"],
        "payment_status": payment_status,
        "status": "complete",
        "subscription": null,
        "success_url": SUCCESS_URL,
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "url": null
    })
}

/// A charge with its cumulative refunded amount.
pub fn charge(id: &str, payment_intent: &str, amount: i64, amount_refunded: i64) -> Value {
    json!({
        "id": id,
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "amount_refunded": amount_refunded,
        "balance_transaction": "txn_1Moqx7LgUG5tbmjcEekVfAbn",
        "billing_details": {"address": null, "email": null, "name": "Jenny Rosen", "phone": null},
        "captured": true,
        "created": 1_700_000_000,
        "currency": "usd",
        "customer": "cus_NZbFQAsc0ptasX",
        "description": null,
        "disputed": false,
        "livemode": false,
        "metadata": {},
        "paid": true,
        "payment_intent": payment_intent,
        "payment_method": "pm_1MoRxGLgUG5tbmjcfQwEkNkb",
        "refunded": amount_refunded >= amount,
        "refunds": {"object": "list", "data": [], "has_more": false, "url": format!("/v1/charges/{id}/refunds")},
        "status": "succeeded"
    })
}

pub fn dispute(id: &str, charge: &str, payment_intent: &str, amount: i64) -> Value {
    json!({
        "id": id,
        "object": "dispute",
        "amount": amount,
        "balance_transactions": [],
        "charge": charge,
        "created": 1_700_000_000,
        "currency": "usd",
        "evidence_details": {"due_by": 1_700_900_000, "has_evidence": false, "past_due": false, "submission_count": 0},
        "is_charge_refundable": false,
        "livemode": false,
        "metadata": {},
        "payment_intent": payment_intent,
        "reason": "fraudulent",
        "status": "needs_response"
    })
}

/// A subscription in the shape of API versions from 2025-03-31 (period on the items).
pub fn subscription(
    id: &str,
    customer: &str,
    user: Uuid,
    pack: Uuid,
    price: &str,
    status: &str,
    period_end: i64,
) -> Value {
    json!({
        "id": id,
        "object": "subscription",
        "cancel_at_period_end": false,
        "created": 1_700_000_000,
        "currency": "usd",
        "customer": customer,
        "items": {
            "object": "list",
            "data": [{
                "id": "si_NcLYdDxLHxlFo7",
                "object": "subscription_item",
                "current_period_end": period_end,
                "current_period_start": period_end - 2_592_000,
                "price": {"id": price, "object": "price", "recurring": {"interval": "month", "interval_count": 1}, "type": "recurring", "unit_amount": 1500},
                "quantity": 1
            }],
            "has_more": false
        },
        "livemode": false,
        "metadata": {"user_id": user, "pack_id": pack},
        "status": status
    })
}

/// A paid subscription invoice in the classic shape (before 2025-03-31).
pub fn invoice_classic(
    id: &str,
    customer: &str,
    subscription: &str,
    price: &str,
    billing_reason: &str,
    payment_intent: &str,
) -> Value {
    json!({
        "id": id,
        "object": "invoice",
        "amount_due": 1500,
        "amount_paid": 1500,
        "amount_remaining": 0,
        "billing_reason": billing_reason,
        "charge": format!("ch_{}", &payment_intent[3..]),
        "collection_method": "charge_automatically",
        "created": 1_700_000_000,
        "currency": "usd",
        "customer": customer,
        "lines": {
            "object": "list",
            "data": [{
                "id": "il_1MoqxDLgUG5tbmjct1y8AVhx",
                "object": "line_item",
                "amount": 1500,
                "currency": "usd",
                "period": {"end": 1_702_592_000, "start": 1_700_000_000},
                "price": {"id": price, "object": "price", "type": "recurring", "unit_amount": 1500},
                "proration": false,
                "quantity": 1,
                "subscription": subscription,
                "type": "subscription"
            }],
            "has_more": false,
            "url": format!("/v1/invoices/{id}/lines")
        },
        "livemode": false,
        "metadata": {},
        "paid": true,
        "payment_intent": payment_intent,
        "period_end": 1_702_592_000,
        "period_start": 1_700_000_000,
        "status": "paid",
        "subscription": subscription,
        "subscription_details": {"metadata": {}}
    })
}

/// A paid subscription invoice in the shape of API versions from 2025-03-31: subscription under
/// `parent`, price under `pricing`, no charge or payment intent (webhooks do not include the
/// `payments` list; the fake API answers for it).
pub fn invoice_basil(
    id: &str,
    customer: &str,
    subscription: &str,
    price: &str,
    billing_reason: &str,
    user: Uuid,
) -> Value {
    json!({
        "id": id,
        "object": "invoice",
        "amount_due": 1500,
        "amount_paid": 1500,
        "amount_remaining": 0,
        "billing_reason": billing_reason,
        "collection_method": "charge_automatically",
        "created": 1_700_000_000,
        "currency": "usd",
        "customer": customer,
        "lines": {
            "object": "list",
            "data": [{
                "id": "il_1RGVHpLkdIwHu7ixh6gC8QMG",
                "object": "line_item",
                "amount": 1500,
                "currency": "usd",
                "parent": {"type": "subscription_item_details", "subscription_item_details": {"subscription": subscription, "subscription_item": "si_x"}},
                "period": {"end": 1_702_592_000, "start": 1_700_000_000},
                "pricing": {"type": "price_details", "price_details": {"price": price, "product": "prod_x"}, "unit_amount_decimal": "1500"},
                "quantity": 1
            }],
            "has_more": false,
            "url": format!("/v1/invoices/{id}/lines")
        },
        "livemode": false,
        "metadata": {},
        "parent": {
            "type": "subscription_details",
            "quote_details": null,
            "subscription_details": {"metadata": {"user_id": user}, "subscription": subscription}
        },
        "period_end": 1_702_592_000,
        "period_start": 1_700_000_000,
        "status": "paid"
    })
}
