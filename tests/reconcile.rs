//! Reconciliation with Stripe's event list (`amethyst-credits reconcile`), against a local fake
//! of Stripe's API: undelivered events are handled once, through the webhook's own path.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use amethyst_credits::AppState;
use amethyst_credits::stripe::reconcile::{Reconciler, Summary};
use common::binary::sample;
use common::stripe::{
    Breakage, FakeStripe, SECRET_KEY, charge, checkout_session, created_at, event, event_id,
    stripe_config,
};
use common::{TestApp, TestUser, all_at_once, request, service_role_key};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

/// Every type the webhook acts on: what reconcile must ask Stripe for.
const HANDLED_TYPES: [&str; 11] = [
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

async fn stripe_app(connect: PgConnectOptions) -> (TestApp, FakeStripe) {
    let stripe = FakeStripe::start().await;
    let app = TestApp::with_config(connect, stripe_config(&stripe.url)).await;
    (app, stripe)
}

async fn new_pack(app: &TestApp, credits: i32) -> Uuid {
    let id = Uuid::new_v4();
    let response = app
        .send(request(
            axum::http::Method::PUT,
            &format!("/v1/admin/credit-packs/{id}"),
            Some(&service_role_key()),
            Some(
                json!({"name": format!("{credits} credits"), "credits": credits, "kind": "one_time",
                       "stripe_price_id": format!("price_{}", Uuid::new_v4().simple()),
                       "unit_amount": 999, "currency": "usd", "active": true})
                .to_string(),
            ),
            &[],
        ))
        .await;
    assert_eq!(response.status, 200, "{:?}", response.body);
    id
}

/// A `checkout.session.completed` for a paid session of `pack`: (event, payment intent).
fn purchase(user: &TestUser, pack: Uuid, credits: i32) -> (Value, String) {
    purchase_of_kind(user, pack, credits, "checkout.session.completed")
}

fn purchase_of_kind(user: &TestUser, pack: Uuid, credits: i32, kind: &str) -> (Value, String) {
    let session = format!("cs_test_{}", Uuid::new_v4().simple());
    let payment_intent = format!("pi_{}", Uuid::new_v4().simple());
    let object = checkout_session(&session, user.id, pack, credits, &payment_intent, "paid");
    (event(&event_id(), kind, object), payment_intent)
}

async fn reconcile(state: &AppState) -> Summary {
    Reconciler::from_state(state)
        .expect("Stripe is configured")
        .run(Duration::from_secs(72 * 3600))
        .await
        .expect("Stripe's events are read")
        .summary
}

fn summary(listed: u64, already_processed: u64, processed: u64, failed: u64) -> Summary {
    Summary {
        listed,
        already_processed,
        processed,
        failed,
    }
}

async fn grants(app: &TestApp, user: Uuid) -> i64 {
    app.count(
        "select count(*) from public.stripe_grants where user_id = $1",
        user,
    )
    .await
}

async fn events_recorded(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from public.stripe_events")
        .fetch_one(&app.owner)
        .await
        .unwrap()
}

#[sqlx::test]
async fn an_undelivered_purchase_is_granted_once_by_reconcile_and_a_second_run_does_nothing(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100).await;
    let (delivery, _) = purchase(&user, pack, 100);
    stripe.publish([delivery.clone()]);

    let first = reconcile(&app.state).await;

    assert_eq!(first, summary(1, 0, 1, 0));
    assert_eq!(app.balance(user.id).await, 100);
    assert_eq!(grants(&app, user.id).await, 1);
    let status: String =
        sqlx::query_scalar("select status from public.stripe_events where id = $1")
            .bind(delivery["id"].as_str().unwrap())
            .fetch_one(&app.owner)
            .await
            .unwrap();
    assert_eq!(status, "processed");

    // What was asked: every handled type, the window, full pages, with the secret key.
    let asked = &stripe.event_list_requests()[0];
    let mut types: Vec<&str> = asked
        .form
        .iter()
        .filter(|(k, _)| k == "types[]")
        .map(|(_, v)| v.as_str())
        .collect();
    types.sort_unstable();
    let mut expected = HANDLED_TYPES.to_vec();
    expected.sort_unstable();
    assert_eq!(types, expected);
    assert_eq!(asked.field("limit"), Some("100"));
    assert_eq!(asked.field("starting_after"), None);
    let since: i64 = asked.field("created[gte]").unwrap().parse().unwrap();
    let expected_since = chrono::Utc::now().timestamp() - 72 * 3600;
    assert!((since - expected_since).abs() < 60, "created[gte]={since}");
    assert_eq!(
        asked.authorization.as_deref(),
        Some(format!("Bearer {SECRET_KEY}").as_str())
    );

    let second = reconcile(&app.state).await;

    assert_eq!(second, summary(1, 1, 0, 0));
    assert_eq!(app.balance(user.id).await, 100);
    assert_eq!(grants(&app, user.id).await, 1);
}

#[sqlx::test]
async fn an_event_already_delivered_by_webhook_is_not_processed_again(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100).await;
    let (delivery, _) = purchase(&user, pack, 100);
    let delivered = app.webhook(&delivery).await;
    assert_eq!(delivered.status, 200, "{:?}", delivered.body);
    stripe.publish([delivery.clone()]);
    let lookups_before = stripe.requests().len();

    let found = reconcile(&app.state).await;

    assert_eq!(found, summary(1, 1, 0, 0));
    assert_eq!(app.balance(user.id).await, 100);
    let attempts: i32 =
        sqlx::query_scalar("select attempts from public.stripe_events where id = $1")
            .bind(delivery["id"].as_str().unwrap())
            .fetch_one(&app.owner)
            .await
            .unwrap();
    assert_eq!(attempts, 1);
    // Only the list was asked for: a settled event costs no lookup at Stripe.
    let asked: Vec<String> = stripe.requests()[lookups_before..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(asked, ["/v1/events"]);
}

#[sqlx::test]
async fn a_purchase_and_its_later_refund_found_in_one_pass_end_at_the_right_balance(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100).await;
    let (bought, payment_intent) = purchase(&user, pack, 100);
    let now = chrono::Utc::now().timestamp();
    let bought = created_at(bought, now - 3600);
    let refunded = created_at(
        event(
            &event_id(),
            "charge.refunded",
            charge("ch_refunded", &payment_intent, 999, 999),
        ),
        now - 60,
    );
    stripe.publish([bought.clone(), refunded.clone()]);

    let found = reconcile(&app.state).await;

    assert_eq!(found, summary(2, 0, 2, 0));
    assert_eq!(app.balance(user.id).await, 0);
    // Oldest first: the grant, then the refund taking it back.
    let ledger: Vec<(String, i32)> = sqlx::query_as(
        "select source, amount from public.credit_transactions where user_id = $1 order by seq",
    )
    .bind(user.id)
    .fetch_all(&app.owner)
    .await
    .unwrap();
    assert_eq!(
        ledger,
        [("stripe".to_owned(), 100), ("refund".to_owned(), -100)]
    );
    let handled: Vec<String> = sqlx::query_scalar(
        "select id from public.stripe_events order by processed_at, received_at",
    )
    .fetch_all(&app.owner)
    .await
    .unwrap();
    assert_eq!(
        handled,
        [
            bought["id"].as_str().unwrap(),
            refunded["id"].as_str().unwrap()
        ]
    );
}

#[sqlx::test]
async fn three_pages_of_events_are_all_read(pool: PgPoolOptions, connect: PgConnectOptions) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100).await;
    let now = chrono::Utc::now().timestamp();
    // The oldest event, on the last page, is the one that grants.
    let (oldest, _) = purchase(&user, pack, 100);
    let mut events = vec![created_at(oldest, now - 7200)];
    for n in 0..249 {
        let session = format!("cs_test_{}", Uuid::new_v4().simple());
        let object = checkout_session(&session, user.id, pack, 100, "pi_never", "unpaid");
        events.push(created_at(
            event(&event_id(), "checkout.session.async_payment_failed", object),
            now - 3600 + n,
        ));
    }
    stripe.publish(events);

    let found = reconcile(&app.state).await;

    assert_eq!(found, summary(250, 0, 250, 0));
    assert_eq!(app.balance(user.id).await, 100);
    let pages = stripe.event_list_requests();
    assert_eq!(pages.len(), 3);
    assert_eq!(pages[0].field("starting_after"), None);
    for page in &pages[1..] {
        let after = page
            .field("starting_after")
            .expect("continues after a page");
        assert!(after.starts_with("evt_"), "{after}");
    }
    assert_ne!(
        pages[1].field("starting_after"),
        pages[2].field("starting_after")
    );
    assert_eq!(events_recorded(&app).await, 250);
}

#[sqlx::test]
async fn reconcile_racing_webhook_deliveries_of_the_same_event_grants_once(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect).await;
    let server = Arc::new(app.serve());
    let pack = new_pack(&app, 100).await;
    for round in 0..5 {
        let user = app.user().await;
        let (delivery, _) = purchase(&user, pack, 100);
        stripe.publish([delivery.clone()]);

        // 3 webhook deliveries and 3 reconciliations, released together.
        let handled = all_at_once(6, |i| {
            let server = server.clone();
            let state = app.state.clone();
            let delivery = delivery.clone();
            async move {
                if i % 2 == 0 {
                    let (status, body) = server.webhook(&delivery).await;
                    assert_eq!(status, 200, "{body}");
                    u64::from(body["duplicate"] == false)
                } else {
                    let found = reconcile(&state).await;
                    assert_eq!(found.failed, 0, "{found:?}");
                    found.processed
                }
            }
        })
        .await;

        assert_eq!(
            handled.iter().sum::<u64>(),
            1,
            "round {round}: the event was handled once, by one of them"
        );
        assert_eq!(grants(&app, user.id).await, 1);
        assert_eq!(app.balance(user.id).await, 100);
    }
}

#[sqlx::test]
async fn two_reconciles_at_once_process_each_event_once(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect).await;
    let pack = new_pack(&app, 100).await;
    let mut users = Vec::new();
    for _ in 0..10 {
        let user = app.user().await;
        stripe.publish([purchase(&user, pack, 100).0]);
        users.push(user.id);
    }

    let summaries = all_at_once(2, |_| {
        let state = app.state.clone();
        async move { reconcile(&state).await }
    })
    .await;

    let processed: u64 = summaries.iter().map(|s| s.processed).sum();
    let already: u64 = summaries.iter().map(|s| s.already_processed).sum();
    assert_eq!(processed, 10, "{summaries:?}");
    assert_eq!(already, 10, "{summaries:?}");
    for user in users {
        assert_eq!(grants(&app, user).await, 1);
        assert_eq!(app.balance(user).await, 100);
    }
}

#[sqlx::test]
async fn reconciled_events_are_counted_by_type_and_outcome(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100).await;
    // A type no other test here reconciles: the counts below are this test's alone.
    let kind = "checkout.session.async_payment_succeeded";
    stripe.publish([purchase_of_kind(&user, pack, 100, kind).0]);
    let processed =
        format!(r#"stripe_reconciled_events_total{{type="{kind}",outcome="processed"}}"#);
    let settled =
        format!(r#"stripe_reconciled_events_total{{type="{kind}",outcome="already_processed"}}"#);
    let read = |series: &str| sample(&app.state.metrics.render(), series).unwrap_or(0.0);

    reconcile(&app.state).await;
    reconcile(&app.state).await;

    assert_eq!(read(&processed), 1.0);
    assert_eq!(read(&settled), 1.0);
}

/// `amethyst-credits reconcile` on the test's database, with Stripe at `stripe_url`. Waited for
/// off the runtime, which serves the fake meanwhile.
async fn reconcile_verb(
    connect: &PgConnectOptions,
    stripe_url: Option<&str>,
) -> std::process::Output {
    let base = std::env::var("DATABASE_URL").unwrap();
    let url = format!(
        "{}/{}",
        base.rsplit_once('/').unwrap().0,
        connect.get_database().unwrap()
    );
    let mut command = Command::new(env!("CARGO_BIN_EXE_amethyst-credits"));
    command
        .arg("reconcile")
        .current_dir(std::env::temp_dir())
        .env("DATABASE_URL", url)
        .env("LOG_FORMAT", "json")
        .env_remove("STRIPE_WEBHOOK_SECRET")
        .env_remove("STRIPE_SECRET_KEY");
    if let Some(stripe_url) = stripe_url {
        command
            .env("STRIPE_SECRET_KEY", SECRET_KEY)
            .env("STRIPE_API_BASE", stripe_url);
    }
    tokio::task::spawn_blocking(move || command.output().expect("the binary runs"))
        .await
        .unwrap()
}

fn printed(output: &std::process::Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "stdout is JSON: {} / {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[sqlx::test]
async fn the_reconcile_verb_prints_its_summary_fails_on_an_unhandled_event_and_retries_it_next_time(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect.clone()).await;
    let pack = new_pack(&app, 100).await;
    let user = app.user().await;
    // A buyer whose profile does not exist yet: the event fails, as a webhook's would.
    let stranger = TestUser {
        id: Uuid::new_v4(),
        email: String::new(),
        token: String::new(),
    };
    stripe.publish([purchase(&user, pack, 100).0]);
    let (waiting, _) = purchase(&stranger, pack, 50);
    stripe.publish([waiting.clone()]);

    let first = reconcile_verb(&connect, Some(&stripe.url)).await;

    assert!(!first.status.success(), "an unhandled event fails the run");
    assert_eq!(
        printed(&first),
        json!({"listed": 2, "already_processed": 0, "processed": 1, "failed": 1})
    );
    assert_eq!(app.balance(user.id).await, 100);

    // The buyer signs up; the failed event is handled afresh, like a redelivery.
    sqlx::query("insert into auth.users (id, email) values ($1, 'late@example.com')")
        .bind(stranger.id)
        .execute(&app.owner)
        .await
        .unwrap();
    let second = reconcile_verb(&connect, Some(&stripe.url)).await;

    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(
        printed(&second),
        json!({"listed": 2, "already_processed": 1, "processed": 1, "failed": 0})
    );
    assert_eq!(app.balance(stranger.id).await, 50);
    let attempts: i32 =
        sqlx::query_scalar("select attempts from public.stripe_events where id = $1")
            .bind(waiting["id"].as_str().unwrap())
            .fetch_one(&app.owner)
            .await
            .unwrap();
    assert_eq!(attempts, 2);

    let unconfigured = reconcile_verb(&connect, None).await;
    assert!(!unconfigured.status.success());
    assert!(
        String::from_utf8_lossy(&unconfigured.stderr).contains("STRIPE_SECRET_KEY is not set"),
        "{}",
        String::from_utf8_lossy(&unconfigured.stderr)
    );
}

#[sqlx::test]
async fn stripe_answering_5xx_on_a_later_page_is_a_clear_error_a_non_zero_exit_and_nothing_applied(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect.clone()).await;
    let pack = new_pack(&app, 100).await;
    let user = app.user().await;
    let now = chrono::Utc::now().timestamp();
    // 150 events: the first page reads, the second keeps failing.
    stripe.publish((0..150).map(|n| created_at(purchase(&user, pack, 1).0, now - 1000 + n)));
    *stripe.state.events_break.lock().unwrap() = Some((1, Breakage::ServerError));

    let output = reconcile_verb(&connect, Some(&stripe.url)).await;

    assert!(!output.status.success());
    assert!(output.stdout.is_empty(), "no summary is printed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("could not list Stripe's events, nothing was handled")
            && stderr.contains("500"),
        "{stderr}"
    );
    // One good page, then the second asked for three times.
    assert_eq!(stripe.event_list_requests().len(), 4);
    assert_eq!(events_recorded(&app).await, 0);
    assert_eq!(app.balance(user.id).await, 0);
}

#[sqlx::test]
async fn stripe_timing_out_is_a_clear_error_a_non_zero_exit_and_nothing_applied(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, stripe) = stripe_app(connect.clone()).await;
    let pack = new_pack(&app, 100).await;
    let user = app.user().await;
    stripe.publish([purchase(&user, pack, 100).0]);
    *stripe.state.events_break.lock().unwrap() = Some((0, Breakage::Stall));

    let output = reconcile_verb(&connect, Some(&stripe.url)).await;

    assert!(!output.status.success());
    assert!(output.stdout.is_empty(), "no summary is printed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("could not list Stripe's events, nothing was handled")
            && stderr.contains("timed out"),
        "{stderr}"
    );
    assert_eq!(events_recorded(&app).await, 0);
    assert_eq!(app.balance(user.id).await, 0);
}
