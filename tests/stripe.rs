//! Stripe: Checkout Sessions against a local fake of Stripe's API, and signed webhook events
//! granting credits exactly once.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::binary::{Binary, sample};
use common::stripe::{
    self as fake, FakeStripe, OLD_WEBHOOK_SECRET, WEBHOOK_SECRET, charge, checkout_session,
    dispute, event, event_id, invoice_basil, invoice_classic, signature_header_at, stripe_config,
    subscription,
};
use common::{TestApp, TestUser, all_at_once, request, service_role_key};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

async fn stripe_app(connect: PgConnectOptions) -> (TestApp, FakeStripe) {
    let stripe = FakeStripe::start().await;
    let app = TestApp::with_config(connect, stripe_config(&stripe.url)).await;
    (app, stripe)
}

/// An admin-created pack, as `PUT /v1/admin/credit-packs/{id}` makes it.
async fn new_pack(app: &TestApp, credits: i32, kind: &str, price: &str) -> Uuid {
    let id = Uuid::new_v4();
    let response = app
        .send(request(
            axum::http::Method::PUT,
            &format!("/v1/admin/credit-packs/{id}"),
            Some(&service_role_key()),
            Some(
                json!({"name": format!("{credits} credits"), "credits": credits, "kind": kind, "stripe_price_id": price,
                       "unit_amount": 999, "currency": "usd", "active": true})
                .to_string(),
            ),
            &[],
        ))
        .await;
    assert_eq!(response.status, 200, "{:?}", response.body);
    id
}

async fn grants(app: &TestApp, user: Uuid) -> i64 {
    app.count(
        "select count(*) from public.stripe_grants where user_id = $1",
        user,
    )
    .await
}

/// The user's ledger rows written by Checkout grants: (amount, reference).
async fn stripe_ledger(app: &TestApp, user: Uuid) -> Vec<(i32, Option<String>)> {
    sqlx::query_as(
        "select amount, reference from public.credit_transactions
          where user_id = $1 and source = 'stripe' order by seq",
    )
    .bind(user)
    .fetch_all(&app.owner)
    .await
    .unwrap()
}

async fn event_status(app: &TestApp, id: &str) -> (String, Option<String>, i32) {
    sqlx::query_as("select status, error, attempts from public.stripe_events where id = $1")
        .bind(id)
        .fetch_one(&app.owner)
        .await
        .unwrap()
}

fn paid_session(user: &TestUser, pack: Uuid, credits: i32) -> (String, String, Value) {
    let session = format!("cs_test_{}", Uuid::new_v4().simple());
    let payment_intent = format!("pi_{}", Uuid::new_v4().simple());
    let object = checkout_session(&session, user.id, pack, credits, &payment_intent, "paid");
    (session, payment_intent, object)
}

#[sqlx::test]
async fn the_signature_matrix(pool: PgPoolOptions, connect: PgConnectOptions) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let body = event(
        &event_id(),
        "customer.created",
        json!({"id": "cus_1", "object": "customer"}),
    )
    .to_string();
    let now = chrono::Utc::now().timestamp();
    let good = signature_header_at(&body, now, WEBHOOK_SECRET);
    let v1 = good.split("v1=").nth(1).unwrap().to_owned();
    let mut tampered = body.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] ^= 0x01;
    let tampered = String::from_utf8(tampered).unwrap();

    let refused: Vec<(&str, String, Option<String>)> = vec![
        ("one byte tampered", tampered, Some(good.clone())),
        (
            "wrong secret",
            body.clone(),
            Some(signature_header_at(&body, now, "whsec_someone_else")),
        ),
        (
            "301 s old",
            body.clone(),
            Some(signature_header_at(&body, now - 301, WEBHOOK_SECRET)),
        ),
        (
            "301 s in the future",
            body.clone(),
            Some(signature_header_at(&body, now + 301, WEBHOOK_SECRET)),
        ),
        ("missing header", body.clone(), None),
        (
            "malformed header",
            body.clone(),
            Some("v1=abc, t".to_owned()),
        ),
        ("no timestamp", body.clone(), Some(format!("v1={v1}"))),
        ("v0 only", body.clone(), Some(format!("t={now},v0={v1}"))),
    ];
    for (name, payload, header) in refused {
        let response = app.webhook_raw(payload, header.as_deref()).await;
        assert_eq!(response.status, 400, "{name}: {:?}", response.body);
        assert_eq!(response.code(), "invalid_signature", "{name}");
    }
    let recorded: i64 = sqlx::query_scalar("select count(*) from public.stripe_events")
        .fetch_one(&app.owner)
        .await
        .unwrap();
    assert_eq!(recorded, 0, "nothing from a bad delivery is recorded");

    let two_values = format!("t={now},v1={},v1={v1}", "0".repeat(64));
    let accepted = app.webhook_raw(body.clone(), Some(&two_values)).await;
    assert_eq!(
        accepted.status, 200,
        "two v1 values, one valid: {:?}",
        accepted.body
    );
    assert_eq!(accepted.body, json!({"received": true, "duplicate": false}));

    let rotated = app
        .webhook_raw(
            body.clone(),
            Some(&signature_header_at(&body, now, OLD_WEBHOOK_SECRET)),
        )
        .await;
    assert_eq!(
        rotated.status, 200,
        "the previous secret still works during rotation"
    );
    assert_eq!(rotated.body["duplicate"], true);
}

#[sqlx::test]
async fn timestamps_at_the_ends_of_the_integer_range_are_refused_as_invalid_signatures(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let body = event(
        &event_id(),
        "customer.created",
        json!({"id": "cus_1", "object": "customer"}),
    )
    .to_string();
    for timestamp in [i64::MIN, i64::MIN + 1, i64::MAX - 1, i64::MAX] {
        // Correctly signed for that timestamp: only the distance to now is wrong.
        let header = signature_header_at(&body, timestamp, WEBHOOK_SECRET);
        let response = app.webhook_raw(body.clone(), Some(&header)).await;
        assert_eq!(response.status, 400, "t={timestamp}: {:?}", response.body);
        assert_eq!(response.code(), "invalid_signature", "t={timestamp}");
    }
}

#[sqlx::test]
async fn the_same_event_delivered_fifty_times_at_once_and_five_in_a_row_grants_once(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100, "one_time", "price_100").await;
    let (session_id, _, session) = paid_session(&user, pack, 100);
    let delivery = event(&event_id(), "checkout.session.completed", session);
    let server = Arc::new(app.serve());

    let results = all_at_once(50, |_| {
        let server = server.clone();
        let delivery = delivery.clone();
        async move { server.webhook(&delivery).await }
    })
    .await;
    for _ in 0..5 {
        let again = app.webhook(&delivery).await;
        assert_eq!(again.status, 200);
        assert_eq!(again.body["duplicate"], true);
    }

    assert!(results.iter().all(|(s, _)| *s == 200), "{results:?}");
    let firsts = results
        .iter()
        .filter(|(_, b)| b["duplicate"] == false)
        .count();
    assert_eq!(firsts, 1, "exactly one delivery is not a duplicate");
    assert_eq!(app.balance(user.id).await, 100);
    // One ledger row (the unique key of stripe_grants alone cannot say that).
    assert_eq!(
        stripe_ledger(&app, user.id).await,
        vec![(100, Some(session_id))]
    );
}

#[sqlx::test]
async fn completed_and_async_succeeded_for_one_session_grant_once(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 50, "one_time", "price_50").await;
    let (session, payment_intent, _) = paid_session(&user, pack, 50);

    // A delayed payment method: completed while unpaid, then the payment succeeds.
    let unpaid = checkout_session(&session, user.id, pack, 50, &payment_intent, "unpaid");
    assert_eq!(
        app.webhook(&event(&event_id(), "checkout.session.completed", unpaid))
            .await
            .status,
        200
    );
    assert_eq!(
        app.balance(user.id).await,
        0,
        "nothing is granted before the money arrives"
    );

    let paid = checkout_session(&session, user.id, pack, 50, &payment_intent, "paid");
    let succeeded = app
        .webhook(&event(
            &event_id(),
            "checkout.session.async_payment_succeeded",
            paid.clone(),
        ))
        .await;
    assert_eq!(succeeded.status, 200);
    // And the other order for good measure: a paid completed event for the same session.
    let completed = app
        .webhook(&event(&event_id(), "checkout.session.completed", paid))
        .await;
    assert_eq!(completed.status, 200);
    assert_eq!(
        completed.body["duplicate"], false,
        "a different event, recorded on its own"
    );

    assert_eq!(app.balance(user.id).await, 50);
    assert_eq!(
        stripe_ledger(&app, user.id).await,
        vec![(50, Some(session))]
    );
}

#[sqlx::test]
async fn a_refund_delivered_before_its_grant_still_ends_right(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100, "one_time", "price_r").await;
    let (_, payment_intent, session) = paid_session(&user, pack, 100);
    let charge_id = format!("ch_{}", Uuid::new_v4().simple());

    let refund = app
        .webhook(&event(
            &event_id(),
            "charge.refunded",
            charge(&charge_id, &payment_intent, 999, 500),
        ))
        .await;
    assert_eq!(refund.status, 200);
    assert_eq!(app.balance(user.id).await, 0);
    let grant = app
        .webhook(&event(&event_id(), "checkout.session.completed", session))
        .await;
    assert_eq!(grant.status, 200);

    // 500 of 999 refunded: floor(100 × 500 / 999) = 50 credits taken back.
    assert_eq!(app.balance(user.id).await, 50);
    assert_eq!(grants(&app, user.id).await, 1);
    let (passed, report) = verify(&app).await;
    assert!(passed, "{report}");
}

async fn verify(app: &TestApp) -> (bool, String) {
    let mut conn = app.owner.acquire().await.unwrap();
    let report = amethyst_credits::verify::run(&mut conn).await.unwrap();
    (report.passed(), report.to_string())
}

#[sqlx::test]
async fn the_whole_purchase_flow_from_pack_to_refunds_and_renewals(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect).await;
    let user = app.user().await;

    // An admin puts a pack on sale; the user starts a checkout.
    let pack = new_pack(&app, 100, "one_time", "price_1MoS36LgUG5tbmjch8DFzJe3").await;
    let created = app
        .post_with_key(
            "/v1/checkout/sessions",
            &user.token,
            "buy-1",
            json!({"pack_id": pack}),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let session_id = created.body["id"].as_str().unwrap().to_owned();
    assert!(
        created.body["url"]
            .as_str()
            .unwrap()
            .starts_with("https://checkout.stripe.com/")
    );

    let sent = stripe.requests();
    assert_eq!(sent.len(), 1);
    let sent = &sent[0];
    assert_eq!(
        sent.authorization.as_deref(),
        Some("Bearer sk_test_amethyst")
    );
    assert_eq!(
        sent.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert!(sent.stripe_version.is_some());
    assert!(
        sent.idempotency_key
            .as_deref()
            .unwrap()
            .starts_with("checkout-")
    );
    let user_id = user.id.to_string();
    let pack_id = pack.to_string();
    for (field, value) in [
        ("mode", "payment"),
        ("line_items[0][price]", "price_1MoS36LgUG5tbmjch8DFzJe3"),
        ("line_items[0][quantity]", "1"),
        ("client_reference_id", user_id.as_str()),
        ("metadata[user_id]", user_id.as_str()),
        ("metadata[pack_id]", pack_id.as_str()),
        ("metadata[credits]", "100"),
        ("payment_intent_data[metadata][user_id]", user_id.as_str()),
        ("success_url", fake::SUCCESS_URL),
        ("cancel_url", fake::CANCEL_URL),
        ("customer_email", user.email.as_str()),
        ("customer_creation", "always"),
    ] {
        assert_eq!(sent.field(field), Some(value), "{field}");
    }
    assert_eq!(sent.field("customer"), None);

    // Stripe reports the payment.
    let payment_intent = "pi_3MtwBwLkdIwHu7ix28a3tqPa";
    let mut paid = checkout_session(&session_id, user.id, pack, 100, payment_intent, "paid");
    paid["customer"] = json!("cus_Flow123");
    assert_eq!(
        app.webhook(&event(&event_id(), "checkout.session.completed", paid))
            .await
            .status,
        200
    );
    assert_eq!(app.balance(user.id).await, 100);
    let me = app.get("/v1/me/transactions", Some(&user.token)).await;
    assert_eq!(me.body["items"][0]["source"], "stripe");
    assert_eq!(me.body["items"][0]["reference"], session_id);

    // The next checkout reuses the Stripe customer.
    let again = app
        .post(
            "/v1/checkout/sessions",
            Some(&user.token),
            json!({"pack_id": pack}),
        )
        .await;
    assert_eq!(again.status, 201);
    let sessions: Vec<_> = stripe
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v1/checkout/sessions")
        .collect();
    assert_eq!(sessions[1].field("customer"), Some("cus_Flow123"));
    assert_eq!(sessions[1].field("customer_email"), None);

    // The user spends 70; a partial refund takes back 40 % of the pack.
    app.post(
        "/v1/credits/spend",
        Some(&user.token),
        json!({"amount": 70}),
    )
    .await;
    let ch = "ch_3MtwBwLkdIwHu7ix2fGHvUdi";
    let partial = app
        .webhook(&event(
            &event_id(),
            "charge.refunded",
            charge(ch, payment_intent, 1000, 400),
        ))
        .await;
    assert_eq!(partial.status, 200);
    assert_eq!(
        app.balance(user.id).await,
        0,
        "30 − 40 would go below zero: floors at 0"
    );
    let (revoked, shortfall): (i32, i32) = sqlx::query_as(
        "select credits_revoked, shortfall from public.stripe_grants where stripe_object_id = $1",
    )
    .bind(&session_id)
    .fetch_one(&app.owner)
    .await
    .unwrap();
    assert_eq!((revoked, shortfall), (40, 10));

    // A full refund takes back the rest of the pack, from an empty balance: all shortfall.
    app.grant(user.id, 5).await;
    let full = app
        .webhook(&event(
            &event_id(),
            "charge.refunded",
            charge(ch, payment_intent, 1000, 1000),
        ))
        .await;
    assert_eq!(full.status, 200);
    assert_eq!(app.balance(user.id).await, 0);
    let (revoked, shortfall): (i32, i32) = sqlx::query_as(
        "select credits_revoked, shortfall from public.stripe_grants where stripe_object_id = $1",
    )
    .bind(&session_id)
    .fetch_one(&app.owner)
    .await
    .unwrap();
    assert_eq!((revoked, shortfall), (100, 65));
    // A late copy of the partial refund changes nothing.
    app.webhook(&event(
        &event_id(),
        "charge.refunded",
        charge(ch, payment_intent, 1000, 400),
    ))
    .await;
    assert_eq!(app.balance(user.id).await, 0);

    // A subscription: its invoice grants the plan's credits, once per invoice.
    let plan = new_pack(&app, 300, "subscription", "price_monthly").await;
    let sub = "sub_1MowQVLkdIwHu7ixeRlqHVzs";
    let created_sub = app
        .webhook(&event(
            &event_id(),
            "customer.subscription.created",
            subscription(
                sub,
                "cus_Flow123",
                user.id,
                plan,
                "price_monthly",
                "active",
                1_900_000_000,
            ),
        ))
        .await;
    assert_eq!(created_sub.status, 200);
    let first = invoice_classic(
        "in_1MtHbELkdIwHu7ixl4OzzPMv",
        "cus_Flow123",
        sub,
        "price_monthly",
        "subscription_create",
        "pi_1First",
    );
    let first_event = event(&event_id(), "invoice.paid", first.clone());
    assert_eq!(app.webhook(&first_event).await.status, 200);
    assert_eq!(app.webhook(&first_event).await.body["duplicate"], true);
    assert_eq!(
        app.webhook(&event(&event_id(), "invoice.paid", first))
            .await
            .status,
        200
    );
    assert_eq!(
        app.balance(user.id).await,
        300,
        "one grant for the first invoice"
    );
    let renewal = invoice_basil(
        "in_1MtHbELkdIwHu7ixRenewal",
        "cus_Flow123",
        sub,
        "price_monthly",
        "subscription_cycle",
        user.id,
    );
    assert_eq!(
        app.webhook(&event(&event_id(), "invoice.paid", renewal.clone()))
            .await
            .status,
        200
    );
    assert_eq!(
        app.webhook(&event(&event_id(), "invoice.paid", renewal))
            .await
            .status,
        200
    );
    assert_eq!(app.balance(user.id).await, 600, "one grant for the renewal");
    let subscription_grants = app
        .count("select count(*) from public.credit_transactions where user_id = $1 and source = 'subscription'", user.id)
        .await;
    assert_eq!(subscription_grants, 2);

    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.body["subscription"]["status"], "active");
    assert_eq!(me.body["subscription"]["plan"], plan.to_string());
    assert_eq!(
        me.body["subscription"]["current_period_end"],
        "2030-03-17T17:46:40Z"
    );
    let (passed, report) = verify(&app).await;
    assert!(passed, "{report}");
}

#[sqlx::test]
async fn a_dispute_takes_back_the_disputed_share(pool: PgPoolOptions, connect: PgConnectOptions) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100, "one_time", "price_d").await;
    let (_, payment_intent, session) = paid_session(&user, pack, 100);
    app.webhook(&event(&event_id(), "checkout.session.completed", session))
        .await;

    let disputed = app
        .webhook(&event(
            &event_id(),
            "charge.dispute.created",
            dispute("dp_1", "ch_disputed", &payment_intent, 999),
        ))
        .await;
    assert_eq!(disputed.status, 200);
    assert_eq!(app.balance(user.id).await, 0);
    let refund = app.count("select count(*) from public.credit_transactions where user_id = $1 and source = 'refund'", user.id).await;
    assert_eq!(refund, 1);
}

#[tokio::test]
async fn a_dispute_counts_the_credits_it_takes_back_in_the_refund_metric() {
    let server = Binary::serve(&[("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)]).await;
    let user = server.user().await;
    let pack = Uuid::new_v4();
    let created = server
        .request(
            reqwest::Method::PUT,
            &format!("/v1/admin/credit-packs/{pack}"),
        )
        .bearer_auth(service_role_key())
        .json(
            &json!({"name": "100 credits", "credits": 100, "kind": "one_time",
                      "stripe_price_id": "price_metric", "unit_amount": 999,
                      "currency": "usd", "active": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let deliver = |delivery: Value| {
        let body = delivery.to_string();
        server
            .request(reqwest::Method::POST, "/v1/webhooks/stripe")
            .header("content-type", "application/json")
            .header("stripe-signature", fake::signature_header(&body))
            .body(body)
            .send()
    };
    let (_, payment_intent, session) = paid_session(&user, pack, 100);

    let granted = deliver(event(&event_id(), "checkout.session.completed", session))
        .await
        .unwrap();
    assert_eq!(granted.status(), 200);
    let disputed = deliver(event(
        &event_id(),
        "charge.dispute.created",
        dispute("dp_metric", "ch_metric", &payment_intent, 999),
    ))
    .await
    .unwrap();
    assert_eq!(disputed.status(), 200);
    let text = server.scrape().await;

    for (series, value) in [
        (r#"credits_granted_total{source="stripe"}"#, 100.0),
        (r#"credits_spent_total{source="refund"}"#, 100.0),
        (
            r#"stripe_webhook_events_total{type="charge.dispute.created",outcome="processed"}"#,
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
}

#[sqlx::test]
async fn an_event_for_an_unknown_user_fails_so_stripe_retries(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let pack = new_pack(&app, 20, "one_time", "price_u").await;
    let ghost = TestUser {
        id: Uuid::new_v4(),
        email: "ghost@example.com".into(),
        token: String::new(),
    };
    let (_, _, session) = paid_session(&ghost, pack, 20);
    let id = event_id();
    let delivery = event(&id, "checkout.session.completed", session);

    let failed = app.webhook(&delivery).await;
    assert!(failed.status.is_server_error(), "{:?}", failed.body);
    let (status, error, attempts) = event_status(&app, &id).await;
    assert_eq!((status.as_str(), attempts), ("failed", 1));
    assert!(error.unwrap().contains("no profile"));

    // The user's sign-up lands; Stripe's retry then succeeds.
    sqlx::query("insert into auth.users (id, email) values ($1, $2)")
        .bind(ghost.id)
        .bind(&ghost.email)
        .execute(&app.owner)
        .await
        .unwrap();
    let retried = app.webhook(&delivery).await;
    assert_eq!(retried.status, 200);
    assert_eq!(retried.body["duplicate"], false);
    assert_eq!(event_status(&app, &id).await.0, "processed");
    assert_eq!(event_status(&app, &id).await.2, 2);
    assert_eq!(app.balance(ghost.id).await, 20);
}

#[sqlx::test]
async fn a_malformed_event_is_recorded_as_rejected_and_not_retried(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let id = event_id();
    let delivery = event(
        &id,
        "checkout.session.completed",
        json!({"id": "cs_broken", "object": "checkout.session"}),
    );

    let answer = app.webhook(&delivery).await;
    assert_eq!(answer.status, 200);
    let (status, error, _) = event_status(&app, &id).await;
    assert_eq!(status, "rejected");
    assert!(error.unwrap().contains("malformed"));
    assert_eq!(app.webhook(&delivery).await.body["duplicate"], true);

    // An envelope the events table cannot hold is refused, not a 500.
    let oversized = app
        .webhook(&event(&"e".repeat(300), "invoice.paid", json!({})))
        .await;
    assert_eq!(oversized.status, 422, "{:?}", oversized.body);

    let other = event_id();
    assert_eq!(
        app.webhook(&event(&other, "product.created", json!({"id": "prod_1"})))
            .await
            .status,
        200
    );
    assert_eq!(event_status(&app, &other).await.0, "ignored");
}

#[sqlx::test]
async fn subscription_state_follows_the_newest_event(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let plan = new_pack(&app, 300, "subscription", "price_pro").await;
    let sub = "sub_state";
    let at = |created: i64, kind: &str, status: &str| {
        let mut e = event(
            &event_id(),
            kind,
            subscription(
                sub,
                "cus_state",
                user.id,
                plan,
                "price_pro",
                status,
                1_900_000_000,
            ),
        );
        e["created"] = json!(created);
        e
    };

    app.webhook(&at(1_000, "customer.subscription.created", "incomplete"))
        .await;
    app.webhook(&at(3_000, "customer.subscription.updated", "past_due"))
        .await;
    // An older update delivered late is ignored.
    app.webhook(&at(2_000, "customer.subscription.updated", "active"))
        .await;
    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.body["subscription"]["status"], "past_due");

    app.webhook(&at(4_000, "customer.subscription.deleted", "canceled"))
        .await;
    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.body["subscription"]["status"], "canceled");
    let customer: Option<String> =
        sqlx::query_scalar("select stripe_customer_id from public.profiles where id = $1")
            .bind(user.id)
            .fetch_one(&app.owner)
            .await
            .unwrap();
    assert_eq!(customer.as_deref(), Some("cus_state"));
}

#[sqlx::test]
async fn checkout_retries_stripe_server_errors_and_reports_refusals_as_502(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 10, "one_time", "price_10").await;

    stripe.state.fail_next.store(2, Ordering::SeqCst);
    let recovered = app
        .post(
            "/v1/checkout/sessions",
            Some(&user.token),
            json!({"pack_id": pack}),
        )
        .await;
    assert_eq!(recovered.status, 201, "{:?}", recovered.body);
    let keys: Vec<Option<String>> = stripe
        .requests()
        .iter()
        .map(|r| r.idempotency_key.clone())
        .collect();
    assert_eq!(keys.len(), 3);
    assert!(
        keys.iter().all(|k| k == &keys[0]),
        "every retry carries the same Idempotency-Key"
    );

    *stripe.state.refuse.lock().unwrap() = Some((
        400,
        json!({"error": {"type": "invalid_request_error", "code": "resource_missing", "message": "No such price: 'price_10'"}}),
    ));
    let refused = app
        .post(
            "/v1/checkout/sessions",
            Some(&user.token),
            json!({"pack_id": pack}),
        )
        .await;
    assert_eq!(refused.status, 502);
    assert_eq!(refused.code(), "stripe_error");
    let detail = refused.body["detail"].as_str().unwrap();
    assert!(
        !detail.contains("price_10") && !detail.contains("No such"),
        "Stripe's own text stays in the log: {detail}"
    );
    assert_eq!(stripe.requests().len(), 4, "a refusal is not retried");

    *stripe.state.refuse.lock().unwrap() = Some((503, json!({"error": {"message": "down"}})));
    let down = app
        .post(
            "/v1/checkout/sessions",
            Some(&user.token),
            json!({"pack_id": pack}),
        )
        .await;
    assert_eq!(down.status, 502);
    assert_eq!(
        stripe.requests().len(),
        7,
        "three attempts on server errors"
    );
}

#[sqlx::test]
async fn checkout_redirects_stay_on_the_configured_origin(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 10, "one_time", "price_o").await;

    let own = app
        .post(
            "/v1/checkout/sessions",
            Some(&user.token),
            json!({"pack_id": pack, "success_url": "https://app.amethyst.test/done?session={CHECKOUT_SESSION_ID}"}),
        )
        .await;
    assert_eq!(own.status, 201);
    assert_eq!(
        stripe.requests()[0].field("success_url"),
        Some("https://app.amethyst.test/done?session={CHECKOUT_SESSION_ID}")
    );
    for evil in [
        "https://evil.example/steal",
        "https://app.amethyst.test@evil.example/",
        "http://app.amethyst.test/downgrade",
        "javascript:alert(1)",
    ] {
        let refused = app
            .post(
                "/v1/checkout/sessions",
                Some(&user.token),
                json!({"pack_id": pack, "cancel_url": evil}),
            )
            .await;
        assert_eq!(refused.status, 422, "{evil}");
        assert_eq!(refused.body["errors"][0]["field"], "cancel_url");
    }
    assert_eq!(stripe.requests().len(), 1);

    let unknown = app
        .post(
            "/v1/checkout/sessions",
            Some(&user.token),
            json!({"pack_id": Uuid::new_v4()}),
        )
        .await;
    assert_eq!(unknown.status, 422);
    assert_eq!(unknown.body["errors"][0]["field"], "pack_id");
}

#[sqlx::test]
async fn a_replayed_checkout_creates_one_session(pool: PgPoolOptions, connect: PgConnectOptions) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 10, "subscription", "price_sub").await;

    let first = app
        .post_with_key(
            "/v1/checkout/sessions",
            &user.token,
            "k1",
            json!({"pack_id": pack}),
        )
        .await;
    let second = app
        .post_with_key(
            "/v1/checkout/sessions",
            &user.token,
            "k1",
            json!({"pack_id": pack}),
        )
        .await;

    assert_eq!(first.status, 201);
    assert_eq!(second.headers["idempotent-replayed"], "true");
    assert_eq!(second.body, first.body);
    assert_eq!(stripe.requests().len(), 1);
    assert_eq!(stripe.requests()[0].field("mode"), Some("subscription"));
    assert!(
        stripe.requests()[0]
            .field("subscription_data[metadata][user_id]")
            .is_some()
    );
}

#[sqlx::test]
async fn without_stripe_settings_checkout_and_webhooks_answer_503(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;

    let checkout = app
        .post(
            "/v1/checkout/sessions",
            Some(&user.token),
            json!({"pack_id": Uuid::new_v4()}),
        )
        .await;
    assert_eq!(checkout.status, 503);
    assert_eq!(checkout.code(), "stripe_not_configured");
    let webhook = app.webhook(&event(&event_id(), "ping", json!({}))).await;
    assert_eq!(webhook.status, 503);
    assert_eq!(webhook.code(), "stripe_not_configured");
}

#[sqlx::test]
async fn webhooks_take_a_megabyte_and_no_more(pool: PgPoolOptions, connect: PgConnectOptions) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let big = event(
        &event_id(),
        "product.updated",
        json!({"id": "prod_1", "description": "x".repeat(200 * 1024)}),
    );
    assert_eq!(
        app.webhook(&big).await.status,
        200,
        "larger than 64 KiB is fine for webhooks"
    );
    let huge = event(
        &event_id(),
        "product.updated",
        json!({"id": "prod_1", "description": "x".repeat(1024 * 1024)}),
    );
    let refused = app.webhook(&huge).await;
    assert_eq!(refused.status, 413);
    assert_eq!(refused.code(), "payload_too_large");
}

#[sqlx::test]
async fn a_refund_racing_its_grant_is_not_lost(pool: PgPoolOptions, connect: PgConnectOptions) {
    use sqlx::Connection;
    let _ = pool;
    let (app, _stripe) = stripe_app(connect.clone()).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100, "one_time", "price_race").await;

    // The refund's transaction records the charge and is still open when the grant runs.
    let mut refund = sqlx::PgConnection::connect_with(&connect).await.unwrap();
    let mut refund_tx = refund.begin().await.unwrap();
    sqlx::query("select public.stripe_record_charge('ch_race', 'pi_race', 1000, 1000, 0, 0)")
        .execute(&mut *refund_tx)
        .await
        .unwrap();
    let owner = app.owner.clone();
    let user_id = user.id;
    let grant = tokio::spawn(async move {
        sqlx::query(
            "select public.stripe_grant('checkout_session', 'cs_race', $1, $2, 100, 1000, 'usd', 'pi_race', null,
                                        'stripe', 'race', 'evt_race')",
        )
        .bind(user_id)
        .bind(pack)
        .execute(&owner)
        .await
        .unwrap();
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !grant.is_finished(),
        "the grant waits for the refund's transaction"
    );
    refund_tx.commit().await.unwrap();
    grant.await.unwrap();

    assert_eq!(
        app.balance(user.id).await,
        0,
        "the full refund took the grant back"
    );
    let (passed, report) = verify(&app).await;
    assert!(passed, "{report}");
}

#[sqlx::test]
async fn concurrent_checkouts_with_one_key_create_one_session(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let stripe = FakeStripe::start().await;
    let app = TestApp::with_config(connect, stripe_config(&stripe.url)).await;
    let user = app.user().await;
    let pack = new_pack(&app, 10, "one_time", "price_once").await;
    let server = Arc::new(app.serve());
    let token = Arc::new(user.token.clone());

    let results = all_at_once(8, |_| {
        let server = server.clone();
        let token = token.clone();
        async move {
            server
                .post(
                    "/v1/checkout/sessions",
                    &token,
                    Some("buy-once"),
                    &json!({"pack_id": pack}),
                )
                .await
        }
    })
    .await;

    assert!(results.iter().all(|(s, _)| *s == 201), "{results:?}");
    assert!(
        results.iter().all(|(_, b)| b == &results[0].1),
        "one answer for all"
    );
    assert_eq!(stripe.requests().len(), 1, "Stripe saw one request");
}

#[sqlx::test]
async fn refunding_a_renewal_paid_under_the_2025_api_takes_its_credits_back(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect).await;
    let user = app.user().await;
    new_pack(&app, 300, "subscription", "price_basil").await;
    let invoice = "in_1RBasilRenewal";

    let paid = app
        .webhook(&event(
            &event_id(),
            "invoice.paid",
            invoice_basil(
                invoice,
                "cus_basil",
                "sub_basil",
                "price_basil",
                "subscription_cycle",
                user.id,
            ),
        ))
        .await;
    assert_eq!(paid.status, 200, "{:?}", paid.body);
    assert_eq!(app.balance(user.id).await, 300);
    let lookups: Vec<_> = stripe
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v1/invoice_payments")
        .collect();
    assert_eq!(lookups.len(), 1, "the payment is looked up once");
    assert_eq!(lookups[0].field("invoice"), Some(invoice));
    assert_eq!(
        lookups[0].authorization.as_deref(),
        Some("Bearer sk_test_amethyst")
    );

    // Charges keep their payment intent in every version: the refund finds the grant.
    let refund = charge("ch_basil", "pi_1RBasilRenewal", 1500, 1500);
    assert_eq!(
        app.webhook(&event(&event_id(), "charge.refunded", refund))
            .await
            .status,
        200
    );
    assert_eq!(app.balance(user.id).await, 0);
}

#[sqlx::test]
async fn a_renewal_whose_payment_stripe_cannot_name_yet_is_retried(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let user = app.user().await;
    new_pack(&app, 300, "subscription", "price_later").await;
    let id = event_id();
    let invoice = invoice_basil(
        "in_unpaid_1",
        "cus_later",
        "sub_later",
        "price_later",
        "subscription_cycle",
        user.id,
    );

    let answer = app.webhook(&event(&id, "invoice.paid", invoice)).await;

    assert_eq!(answer.status, 503, "{:?}", answer.body);
    assert_eq!(event_status(&app, &id).await.0, "failed");
    assert_eq!(
        app.balance(user.id).await,
        0,
        "no grant that a refund could never find"
    );
}

// Payments of 0 -------------------------------------------------------------------------------

/// `PUT /v1/admin/credit-packs/{id}` with `body`.
async fn put_pack(app: &TestApp, id: Uuid, body: Value) -> common::TestResponse {
    app.send(request(
        axum::http::Method::PUT,
        &format!("/v1/admin/credit-packs/{id}"),
        Some(&service_role_key()),
        Some(body.to_string()),
        &[],
    ))
    .await
}

/// A pack whose payments of 0 still grant its credits.
async fn new_pack_granting_when_free(app: &TestApp, credits: i32, kind: &str, price: &str) -> Uuid {
    let id = Uuid::new_v4();
    let response = put_pack(
        app,
        id,
        json!({"name": format!("{credits} credits, free too"), "credits": credits, "kind": kind,
               "stripe_price_id": price, "unit_amount": 999, "currency": "usd", "active": true,
               "grants_when_free": true}),
    )
    .await;
    assert_eq!(response.status, 200, "{:?}", response.body);
    assert_eq!(response.body["grants_when_free"], true);
    id
}

#[sqlx::test]
async fn a_pack_grants_when_free_only_when_an_admin_says_so(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let id = Uuid::new_v4();
    let body = json!({"name": "Starter", "credits": 10, "kind": "one_time",
                      "stripe_price_id": "price_starter", "unit_amount": 0, "currency": "usd",
                      "active": true});

    let created = put_pack(&app, id, body.clone()).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    assert_eq!(created.body["grants_when_free"], false, "left out: false");

    let mut granting = body.clone();
    granting["grants_when_free"] = json!(true);
    let replaced = put_pack(&app, id, granting).await;
    assert_eq!(replaced.body["grants_when_free"], true);

    let replaced_whole = put_pack(&app, id, body).await;
    assert_eq!(
        replaced_whole.body["grants_when_free"], false,
        "a PUT replaces the pack whole"
    );
    let mut wrong = json!({"name": "Starter", "credits": 10, "kind": "one_time",
                           "unit_amount": 0, "currency": "usd", "active": true});
    wrong["grants_when_free"] = json!("yes");
    assert_eq!(put_pack(&app, id, wrong).await.status, 422);
}

#[sqlx::test]
async fn a_checkout_that_paid_nothing_grants_nothing_unless_its_pack_grants_when_free(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100, "one_time", "price_coupon").await;

    // No payment required (a 100 % coupon), and a paid session whose total is 0.
    let (_, _, mut free) = paid_session(&user, pack, 100);
    free["payment_status"] = json!("no_payment_required");
    free["amount_total"] = json!(0);
    free["payment_intent"] = Value::Null;
    let (_, _, mut zero) = paid_session(&user, pack, 100);
    zero["amount_total"] = json!(0);
    for object in [free, zero] {
        let id = event_id();
        let answer = app
            .webhook(&event(&id, "checkout.session.completed", object))
            .await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        assert_eq!(
            event_status(&app, &id).await.0,
            "processed",
            "recorded as handled"
        );
    }
    assert_eq!(
        app.balance(user.id).await,
        0,
        "a payment of 0 grants nothing"
    );
    assert_eq!(grants(&app, user.id).await, 0);

    let granting = new_pack_granting_when_free(&app, 40, "one_time", "price_trial_pack").await;
    let (_, _, mut free) = paid_session(&user, granting, 40);
    free["payment_status"] = json!("no_payment_required");
    free["amount_total"] = json!(0);
    free["payment_intent"] = Value::Null;
    app.webhook(&event(&event_id(), "checkout.session.completed", free))
        .await;
    assert_eq!(app.balance(user.id).await, 40, "its pack grants when free");

    let (_, _, paid) = paid_session(&user, pack, 100);
    app.webhook(&event(&event_id(), "checkout.session.completed", paid))
        .await;
    assert_eq!(
        app.balance(user.id).await,
        140,
        "a paid purchase still grants"
    );
}

/// A subscription's first invoice during a free trial: nothing paid, no payment.
fn trial_invoice(id: &str, customer: &str, subscription: &str, price: &str) -> Value {
    let mut invoice = invoice_classic(
        id,
        customer,
        subscription,
        price,
        "subscription_create",
        "pi_unused",
    );
    invoice["amount_due"] = json!(0);
    invoice["amount_paid"] = json!(0);
    invoice["total"] = json!(0);
    invoice["charge"] = Value::Null;
    invoice["payment_intent"] = Value::Null;
    invoice
}

#[sqlx::test]
async fn a_trial_invoice_grants_nothing_unless_its_plan_grants_when_free(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let plan = new_pack(&app, 300, "subscription", "price_plan_trial").await;
    let sub = "sub_trial_1";
    app.webhook(&event(
        &event_id(),
        "customer.subscription.created",
        subscription(
            sub,
            "cus_trial",
            user.id,
            plan,
            "price_plan_trial",
            "trialing",
            1_900_000_000,
        ),
    ))
    .await;

    let id = event_id();
    let answer = app
        .webhook(&event(
            &id,
            "invoice.paid",
            trial_invoice("in_trial_1", "cus_trial", sub, "price_plan_trial"),
        ))
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(event_status(&app, &id).await.0, "processed");
    assert_eq!(app.balance(user.id).await, 0, "a trial grants nothing");
    assert_eq!(grants(&app, user.id).await, 0);

    new_pack_granting_when_free(&app, 50, "subscription", "price_plan_trial_granting").await;
    app.webhook(&event(
        &event_id(),
        "invoice.paid",
        trial_invoice(
            "in_trial_2",
            "cus_trial",
            "sub_trial_2",
            "price_plan_trial_granting",
        ),
    ))
    .await;
    assert_eq!(app.balance(user.id).await, 50, "this plan grants its trial");
}

// Won disputes --------------------------------------------------------------------------------

/// A dispute of `charge` as Stripe sends it once closed, or once its funds are back.
fn dispute_with(id: &str, charge: &str, payment_intent: &str, amount: i64, status: &str) -> Value {
    let mut object = dispute(id, charge, payment_intent, amount);
    object["status"] = json!(status);
    object
}

/// Credits given back by won disputes, as the ledger shows them.
async fn given_back(app: &TestApp, user: Uuid) -> i64 {
    app.count(
        "select count(*) from public.credit_transactions
          where user_id = $1 and amount > 0 and description like 'Stripe dispute won%'",
        user,
    )
    .await
}

async fn revoked_and_shortfall(app: &TestApp, payment_intent: &str) -> (i32, i32) {
    sqlx::query_as(
        "select credits_revoked, shortfall from public.stripe_grants where payment_intent = $1",
    )
    .bind(payment_intent)
    .fetch_one(&app.owner)
    .await
    .unwrap()
}

#[sqlx::test]
async fn a_won_dispute_gives_back_what_it_took_once_in_either_order(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let pack = new_pack(&app, 100, "one_time", "price_won").await;

    // Spent 70 of 100, then disputed whole: 30 taken, 70 short. Then the dispute is won:
    // funds reinstated first, closed as won after, and each again.
    let first = app.user().await;
    let (_, first_pi, session) = paid_session(&first, pack, 100);
    app.webhook(&event(&event_id(), "checkout.session.completed", session))
        .await;
    app.post(
        "/v1/credits/spend",
        Some(&first.token),
        json!({"amount": 70}),
    )
    .await;
    let ch = "ch_won_first";
    app.webhook(&event(
        &event_id(),
        "charge.dispute.created",
        dispute("dp_first", ch, &first_pi, 999),
    ))
    .await;
    assert_eq!(app.balance(first.id).await, 0);
    assert_eq!(revoked_and_shortfall(&app, &first_pi).await, (100, 70));

    let reinstated = event(
        &event_id(),
        "charge.dispute.funds_reinstated",
        dispute_with("dp_first", ch, &first_pi, 999, "won"),
    );
    let closed = event(
        &event_id(),
        "charge.dispute.closed",
        dispute_with("dp_first", ch, &first_pi, 999, "won"),
    );
    for delivery in [&reinstated, &closed, &reinstated] {
        assert_eq!(app.webhook(delivery).await.status, 200);
    }
    app.webhook(&event(
        &event_id(),
        "charge.dispute.closed",
        dispute_with("dp_first", ch, &first_pi, 999, "won"),
    ))
    .await;
    assert_eq!(
        app.balance(first.id).await,
        30,
        "the 70 never taken are forgiven, the 30 taken come back"
    );
    assert_eq!(given_back(&app, first.id).await, 1);
    assert_eq!(revoked_and_shortfall(&app, &first_pi).await, (0, 0));

    // Disputed whole from a full balance, then closed as won before the funds event.
    let second = app.user().await;
    let (_, second_pi, session) = paid_session(&second, pack, 100);
    app.webhook(&event(&event_id(), "checkout.session.completed", session))
        .await;
    let ch = "ch_won_second";
    app.webhook(&event(
        &event_id(),
        "charge.dispute.created",
        dispute("dp_second", ch, &second_pi, 999),
    ))
    .await;
    assert_eq!(app.balance(second.id).await, 0);
    for kind in ["charge.dispute.closed", "charge.dispute.funds_reinstated"] {
        let answer = app
            .webhook(&event(
                &event_id(),
                kind,
                dispute_with("dp_second", ch, &second_pi, 999, "won"),
            ))
            .await;
        assert_eq!(answer.status, 200, "{kind}: {:?}", answer.body);
    }
    assert_eq!(app.balance(second.id).await, 100);
    assert_eq!(given_back(&app, second.id).await, 1);
    let source: String = sqlx::query_scalar(
        "select source from public.credit_transactions
          where user_id = $1 and description like 'Stripe dispute won%'",
    )
    .bind(second.id)
    .fetch_one(&app.owner)
    .await
    .unwrap();
    assert_eq!(source, "stripe", "given back under the purchase's source");

    // Won before Stripe's created event even arrived: nothing is taken at all.
    let third = app.user().await;
    let (_, third_pi, session) = paid_session(&third, pack, 100);
    app.webhook(&event(&event_id(), "checkout.session.completed", session))
        .await;
    app.webhook(&event(
        &event_id(),
        "charge.dispute.closed",
        dispute_with("dp_third", "ch_won_third", &third_pi, 999, "won"),
    ))
    .await;
    app.webhook(&event(
        &event_id(),
        "charge.dispute.created",
        dispute("dp_third", "ch_won_third", &third_pi, 999),
    ))
    .await;
    assert_eq!(app.balance(third.id).await, 100);

    let (passed, report) = verify(&app).await;
    assert!(passed, "{report}");
}

#[sqlx::test]
async fn a_won_dispute_announced_many_times_at_once_gives_back_once(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100, "one_time", "price_won_race").await;
    let (_, pi, session) = paid_session(&user, pack, 100);
    app.webhook(&event(&event_id(), "checkout.session.completed", session))
        .await;
    app.webhook(&event(
        &event_id(),
        "charge.dispute.created",
        dispute("dp_race", "ch_won_race", &pi, 999),
    ))
    .await;
    assert_eq!(app.balance(user.id).await, 0);
    let server = Arc::new(app.serve());

    let results = all_at_once(20, |i| {
        let server = server.clone();
        let kind = if i % 2 == 0 {
            "charge.dispute.closed"
        } else {
            "charge.dispute.funds_reinstated"
        };
        let delivery = event(
            &event_id(),
            kind,
            dispute_with("dp_race", "ch_won_race", &pi, 999, "won"),
        );
        async move { server.webhook(&delivery).await }
    })
    .await;

    assert!(results.iter().all(|(s, _)| *s == 200), "{results:?}");
    assert_eq!(app.balance(user.id).await, 100);
    assert_eq!(given_back(&app, user.id).await, 1);
    let (passed, report) = verify(&app).await;
    assert!(passed, "{report}");
}

#[sqlx::test]
async fn a_lost_dispute_changes_nothing(pool: PgPoolOptions, connect: PgConnectOptions) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100, "one_time", "price_lost").await;
    let (_, pi, session) = paid_session(&user, pack, 100);
    app.webhook(&event(&event_id(), "checkout.session.completed", session))
        .await;
    app.webhook(&event(
        &event_id(),
        "charge.dispute.created",
        dispute("dp_lost", "ch_lost", &pi, 999),
    ))
    .await;
    app.grant(user.id, 5).await;

    let id = event_id();
    let answer = app
        .webhook(&event(
            &id,
            "charge.dispute.closed",
            dispute_with("dp_lost", "ch_lost", &pi, 999, "lost"),
        ))
        .await;

    assert_eq!(answer.status, 200);
    assert_eq!(event_status(&app, &id).await.0, "processed");
    assert_eq!(app.balance(user.id).await, 5);
    assert_eq!(given_back(&app, user.id).await, 0);
    assert_eq!(revoked_and_shortfall(&app, &pi).await, (100, 0));
}

// Grants that know their charge ---------------------------------------------------------------

async fn grant_charge(app: &TestApp, payment_intent: &str) -> Option<String> {
    sqlx::query_scalar("select charge from public.stripe_grants where payment_intent = $1")
        .bind(payment_intent)
        .fetch_one(&app.owner)
        .await
        .unwrap()
}

/// A dispute naming its charge and no payment intent.
fn dispute_of_charge(id: &str, charge: &str, amount: i64) -> Value {
    let mut object = dispute(id, charge, "pi_unused", amount);
    object["payment_intent"] = Value::Null;
    object
}

#[sqlx::test]
async fn a_dispute_naming_only_the_charge_finds_its_checkout_grant(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100, "one_time", "price_charge_only").await;
    let (_, pi, session) = paid_session(&user, pack, 100);

    app.webhook(&event(&event_id(), "checkout.session.completed", session))
        .await;
    assert_eq!(app.balance(user.id).await, 100);
    let lookups: Vec<_> = stripe
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/v1/payment_intents/"))
        .collect();
    assert_eq!(lookups.len(), 1, "{lookups:?}");
    assert_eq!(lookups[0].path, format!("/v1/payment_intents/{pi}"));
    assert_eq!(
        lookups[0].authorization.as_deref(),
        Some("Bearer sk_test_amethyst")
    );
    assert!(lookups[0].stripe_version.is_some());
    assert_eq!(
        grant_charge(&app, &pi).await,
        Some(fake::charge_of(&pi)),
        "the grant records its charge"
    );

    let disputed = app
        .webhook(&event(
            &event_id(),
            "charge.dispute.created",
            dispute_of_charge("dp_charge_only", &fake::charge_of(&pi), 999),
        ))
        .await;
    assert_eq!(disputed.status, 200);
    assert_eq!(app.balance(user.id).await, 0, "the dispute found the grant");
}

#[sqlx::test]
async fn a_purchase_whose_charge_stripe_cannot_name_is_granted_and_learns_it_from_a_charge_event(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, _stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100, "one_time", "price_unnamed").await;
    let session = format!("cs_test_{}", Uuid::new_v4().simple());
    let pi = format!("pi_missing_{}", Uuid::new_v4().simple());
    let id = event_id();

    let answer = app
        .webhook(&event(
            &id,
            "checkout.session.completed",
            checkout_session(&session, user.id, pack, 100, &pi, "paid"),
        ))
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(event_status(&app, &id).await.0, "processed");
    assert_eq!(
        app.balance(user.id).await,
        100,
        "granted without its charge"
    );
    assert_eq!(grant_charge(&app, &pi).await, None);

    // A refund names both: the grant learns its charge, and a later dispute naming only the
    // charge finds it.
    let ch = "ch_learned";
    app.webhook(&event(
        &event_id(),
        "charge.refunded",
        charge(ch, &pi, 1000, 100),
    ))
    .await;
    assert_eq!(app.balance(user.id).await, 90);
    assert_eq!(grant_charge(&app, &pi).await.as_deref(), Some(ch));
    app.webhook(&event(
        &event_id(),
        "charge.dispute.created",
        dispute_of_charge("dp_learned", ch, 900),
    ))
    .await;
    assert_eq!(app.balance(user.id).await, 0);
    let (passed, report) = verify(&app).await;
    assert!(passed, "{report}");
}

// Test and live mode --------------------------------------------------------------------------

fn in_mode(mut delivery: Value, livemode: bool) -> Value {
    delivery["livemode"] = json!(livemode);
    delivery["data"]["object"]["livemode"] = json!(livemode);
    delivery
}

#[sqlx::test]
async fn an_event_of_the_other_mode_than_the_key_is_rejected_and_grants_nothing(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect.clone()).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100, "one_time", "price_modes").await;

    // A test-mode key: a live event is refused.
    let (_, _, session) = paid_session(&user, pack, 100);
    let id = event_id();
    let live = in_mode(event(&id, "checkout.session.completed", session), true);
    let answer = app.webhook(&live).await;
    assert_eq!(answer.status, 200, "answered so that Stripe stops");
    assert_eq!(answer.body["duplicate"], false);
    let (status, error, _) = event_status(&app, &id).await;
    assert_eq!(status, "rejected");
    assert!(error.unwrap().contains("live-mode event"));
    assert_eq!(app.webhook(&live).await.body["duplicate"], true);
    assert_eq!(app.balance(user.id).await, 0);
    assert_eq!(grants(&app, user.id).await, 0);
    assert!(
        stripe.requests().is_empty(),
        "Stripe is not asked about a refused event"
    );

    // A live key: a test event is refused, a live one granted.
    let mut config = stripe_config(&stripe.url);
    config.stripe.secret_key = Some(amethyst_credits::config::Secret::new("sk_live_amethyst"));
    let live_app = TestApp::with_config(connect, config).await;
    let (_, _, session) = paid_session(&user, pack, 100);
    let id = event_id();
    live_app
        .webhook(&in_mode(
            event(&id, "checkout.session.completed", session),
            false,
        ))
        .await;
    let (status, error, _) = event_status(&live_app, &id).await;
    assert_eq!(status, "rejected");
    assert!(error.unwrap().contains("test-mode event"));
    assert_eq!(live_app.balance(user.id).await, 0);
    let (_, _, session) = paid_session(&user, pack, 100);
    live_app
        .webhook(&in_mode(
            event(&event_id(), "checkout.session.completed", session),
            true,
        ))
        .await;
    assert_eq!(live_app.balance(user.id).await, 100);
}

#[sqlx::test]
async fn without_a_secret_key_purchases_of_either_mode_are_granted_without_a_lookup(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let stripe = FakeStripe::start().await;
    let mut config = stripe_config(&stripe.url);
    config.stripe.secret_key = None;
    let app = TestApp::with_config(connect, config).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100, "one_time", "price_keyless").await;

    for livemode in [false, true] {
        let (_, pi, session) = paid_session(&user, pack, 100);
        let answer = app
            .webhook(&in_mode(
                event(&event_id(), "checkout.session.completed", session),
                livemode,
            ))
            .await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        assert_eq!(grant_charge(&app, &pi).await, None);
    }
    assert_eq!(app.balance(user.id).await, 200);
    assert!(stripe.requests().is_empty());
}

#[sqlx::test]
async fn a_renewal_paid_from_the_customers_balance_grants_its_credits(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    // Stripe applies the customer's credit balance (a proration after a downgrade, say) before
    // charging: the invoice cost 1500, nothing was charged, and the plan's credits are owed.
    let (app, _stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let plan = new_pack(&app, 300, "subscription", "price_plan_balance").await;
    let sub = "sub_balance_1";
    app.webhook(&event(
        &event_id(),
        "customer.subscription.created",
        subscription(
            sub,
            "cus_balance",
            user.id,
            plan,
            "price_plan_balance",
            "active",
            1_900_000_000,
        ),
    ))
    .await;
    let mut invoice = trial_invoice("in_balance_1", "cus_balance", sub, "price_plan_balance");
    invoice["billing_reason"] = json!("subscription_cycle");
    invoice["total"] = json!(1500);
    invoice["starting_balance"] = json!(-1500);

    let id = event_id();
    let answer = app.webhook(&event(&id, "invoice.paid", invoice)).await;

    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(event_status(&app, &id).await.0, "processed");
    assert_eq!(app.balance(user.id).await, 300);
    assert_eq!(grants(&app, user.id).await, 1);
}

#[sqlx::test]
async fn a_redelivery_of_a_settled_event_asks_stripe_nothing(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let (app, stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100, "one_time", "price_redelivered").await;
    let paid = event(
        &event_id(),
        "checkout.session.completed",
        checkout_session(
            "cs_redelivered",
            user.id,
            pack,
            100,
            "pi_redelivered",
            "paid",
        ),
    );
    let lookups = || {
        stripe
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/v1/payment_intents/"))
            .count()
    };

    assert_eq!(app.webhook(&paid).await.body["duplicate"], false);
    assert_eq!(lookups(), 1);
    for _ in 0..3 {
        assert_eq!(app.webhook(&paid).await.body["duplicate"], true);
    }

    assert_eq!(
        lookups(),
        1,
        "redeliveries of a settled event ask Stripe nothing"
    );
    assert_eq!(app.balance(user.id).await, 100);
}
