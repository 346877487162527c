//! Lots and holds: the spend order, expiry (moved by the database's clock, never by sleeping),
//! refunds from the purchase's own lot, holds reserved, captured and released exactly once,
//! and the upgrade of a database that predates lots.

mod common;

use std::borrow::Cow;
use std::process::Command;
use std::sync::Arc;

use amethyst_credits::db::MIGRATOR;
use common::{TestApp, all_at_once, service_role_key};
use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use uuid::Uuid;

/// Moves the database's clock (public.clock_now) this far ahead of now().
async fn set_clock(app: &TestApp, ahead: &str) {
    sqlx::query(
        "insert into public.clock_settings (id, offset_by) values (true, $1::interval)
         on conflict (id) do update set offset_by = excluded.offset_by",
    )
    .bind(ahead)
    .execute(&app.owner)
    .await
    .unwrap();
}

/// Grants a lot; `expires_in` is an interval from the database's clock.
async fn lot(
    app: &TestApp,
    user: Uuid,
    source: &str,
    amount: i32,
    expires_in: Option<&str>,
) -> Uuid {
    sqlx::query_scalar(
        "select (t.lots -> 0 ->> 'lot')::uuid
           from public.add_credits($1, $2, $3, 'test lot', null,
                                   public.clock_now() + $4::interval) t",
    )
    .bind(user)
    .bind(amount)
    .bind(source)
    .bind(expires_in)
    .fetch_one(&app.owner)
    .await
    .unwrap()
}

async fn remaining(app: &TestApp, lot: Uuid) -> i32 {
    sqlx::query_scalar("select remaining from public.credit_lots where id = $1")
        .bind(lot)
        .fetch_one(&app.owner)
        .await
        .unwrap()
}

/// The ledger of `user`, oldest first: (source, amount, draws as {lot: amount}).
async fn ledger(app: &TestApp, user: Uuid) -> Vec<(String, i32, Value)> {
    sqlx::query_as::<_, (String, i32, Option<Value>)>(
        "select source, amount, lots from public.credit_transactions where user_id = $1 order by seq",
    )
    .bind(user)
    .fetch_all(&app.owner)
    .await
    .unwrap()
    .into_iter()
    .map(|(source, amount, lots)| {
        let draws: serde_json::Map<String, Value> = lots
            .and_then(|l| l.as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .map(|d| (d["lot"].as_str().unwrap().to_owned(), d["amount"].clone()))
            .collect();
        (source, amount, Value::Object(draws))
    })
    .collect()
}

async fn discrepancies(app: &TestApp) -> Vec<Uuid> {
    sqlx::query_scalar("select user_id from public.ledger_discrepancies()")
        .fetch_all(&app.owner)
        .await
        .unwrap()
}

#[sqlx::test]
async fn spends_take_promotional_credits_first_soonest_expiry_first_and_never_expired_ones(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let paid = lot(&app, user.id, "stripe", 100, None).await;
    let ad = lot(&app, user.id, "ad_view", 10, Some("30 days")).await;
    let gone = lot(&app, user.id, "admin", 5, Some("1 hour")).await;
    let later = lot(&app, user.id, "admin", 7, Some("2 days")).await;
    let never = lot(&app, user.id, "system", 3, None).await;

    // Three hours on: the 5 admin credits are past their expiry; no job has run and nothing
    // has read the balance since.
    set_clock(&app, "3 hours").await;
    let spent = app
        .post(
            "/v1/credits/spend",
            Some(&user.token),
            json!({"amount": 15}),
        )
        .await;
    assert_eq!(spent.status, 201, "{:?}", spent.body);
    assert_eq!(spent.body["balance"], 105);
    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.status, 200, "{:?}", me.body);
    assert_eq!(me.body["credits"], 105);
    assert_eq!(me.body["balance"]["available"], 105);
    assert_eq!(me.body["balance"]["held"], 0);
    assert_eq!(me.body["balance"]["paid"], 100);
    assert_eq!(me.body["balance"]["promotional"], 5);
    let expiring = me.body["balance"]["expiring"].as_array().unwrap();
    assert_eq!(expiring.len(), 1, "{expiring:?}");
    assert_eq!(expiring[0]["amount"], 2);

    // Ad rewards (priority 10) first, then priority 20 by soonest expiry: the 2-day admin lot
    // before the never-expiring system one. The expired lot gave nothing to the spend.
    assert_eq!(remaining(&app, ad).await, 0);
    assert_eq!(remaining(&app, later).await, 2);
    assert_eq!(remaining(&app, never).await, 3);
    assert_eq!(remaining(&app, paid).await, 100);
    assert_eq!(remaining(&app, gone).await, 0);
    let rows = ledger(&app, user.id).await;
    let tail = &rows[rows.len() - 2..];
    assert_eq!(tail[0].0, "expiry");
    assert_eq!(tail[0].1, -5);
    assert_eq!(tail[0].2, json!({gone.to_string(): -5}));
    assert_eq!(tail[1].0, "spend");
    assert_eq!(
        tail[1].2,
        json!({ad.to_string(): -10, later.to_string(): -5})
    );
    assert!(discrepancies(&app).await.is_empty());

    let lots = app.get("/v1/me/lots", Some(&user.token)).await;
    assert_eq!(lots.status, 200);
    let live: Vec<i64> = lots.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["remaining"].as_i64().unwrap())
        .collect();
    assert_eq!(live, vec![3, 2, 100]);
    let all = app.get("/v1/me/lots?all=true", Some(&user.token)).await;
    assert_eq!(all.body["items"].as_array().unwrap().len(), 5);
}

#[sqlx::test]
async fn a_read_never_counts_credits_past_their_expiry_even_before_the_daily_job(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    lot(&app, user.id, "stripe", 10, None).await;
    let ad = lot(&app, user.id, "ad_view", 5, Some("1 hour")).await;

    set_clock(&app, "2 hours").await;
    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.body["credits"], 10, "{:?}", me.body);
    assert_eq!(me.body["balance"]["available"], 10);
    assert_eq!(me.body["balance"]["promotional"], 0);
    assert_eq!(me.body["balance"]["expiring"], json!([]));
    // The read wrote the expiry, so the ledger says the same.
    let history = app.get("/v1/me/transactions", Some(&user.token)).await;
    assert_eq!(history.body["items"][0]["source"], "expiry");
    assert_eq!(history.body["items"][0]["amount"], -5);
    assert_eq!(history.body["items"][0]["balance_after"], 10);
    assert_eq!(remaining(&app, ad).await, 0);
    let admin = app.admin().await;
    let seen = app
        .get(&format!("/v1/admin/users/{}", user.id), Some(&admin.token))
        .await;
    assert_eq!(seen.body["credits"], 10);
    assert!(discrepancies(&app).await.is_empty());
}

#[sqlx::test]
async fn a_refund_takes_back_the_purchases_own_lot_first_then_the_others_in_spend_order(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let ad = lot(&app, user.id, "ad_view", 10, Some("30 days")).await;
    sqlx::query(
        "select public.stripe_grant('checkout_session', 'cs_lots', $1, null, 50, 500, 'usd',
                                    'pi_lots', 'ch_lots', 'stripe', 'Pack of 50', 'evt_lots')",
    )
    .bind(user.id)
    .execute(&app.owner)
    .await
    .unwrap();
    let purchase: Uuid = sqlx::query_scalar(
        "select id from public.credit_lots where user_id = $1 and source = 'stripe'",
    )
    .bind(user.id)
    .fetch_one(&app.owner)
    .await
    .unwrap();
    // 20 spent: the 10 ad credits, then 10 of the purchase.
    let spent = app
        .post(
            "/v1/credits/spend",
            Some(&user.token),
            json!({"amount": 20}),
        )
        .await;
    assert_eq!(spent.status, 201);
    assert_eq!(remaining(&app, ad).await, 0);
    assert_eq!(remaining(&app, purchase).await, 40);
    let gift = lot(&app, user.id, "admin", 30, None).await;

    // The whole payment refunded: 50 credits owed, 40 from the purchase's lot and 10 from the
    // gift, although the gift comes first in the spend order.
    sqlx::query("select public.stripe_record_charge('ch_lots', 'pi_lots', 500, 500, 0, 0)")
        .execute(&app.owner)
        .await
        .unwrap();

    assert_eq!(app.balance(user.id).await, 20);
    assert_eq!(remaining(&app, purchase).await, 0);
    assert_eq!(remaining(&app, gift).await, 20);
    let rows = ledger(&app, user.id).await;
    let refund = rows.last().unwrap();
    assert_eq!(refund.0, "refund");
    assert_eq!(refund.1, -50);
    assert_eq!(
        refund.2,
        json!({purchase.to_string(): -40, gift.to_string(): -10})
    );
    assert!(discrepancies(&app).await.is_empty());
}

#[sqlx::test]
async fn an_expiry_racing_spends_of_the_same_credits_lets_each_credit_go_once(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = Arc::new(TestApp::new(pool, connect).await);
    let mut users = Vec::new();
    for _ in 0..20 {
        let user = app.user().await;
        let promo = lot(&app, user.id, "ad_view", 10, Some("1 hour")).await;
        let paid = lot(&app, user.id, "stripe", 10, None).await;
        users.push((user, promo, paid));
    }
    set_clock(&app, "2 hours").await;

    // Half the users spend before any sweep (their own spend must expire what is due), the
    // other half while the daily expiry sweeps everyone.
    let users = Arc::new(users);
    let spend = |i: usize| {
        let app = app.clone();
        let users = users.clone();
        async move {
            let (user, _, _) = &users[i];
            app.post(
                "/v1/credits/spend",
                Some(&user.token),
                json!({"amount": 10}),
            )
            .await
            .status
            .as_u16()
        }
    };
    let mut outcomes = all_at_once(10, spend).await;
    let raced = all_at_once(11, |i| {
        let app = app.clone();
        let spend = spend(10 + i.min(9));
        async move {
            if i == 10 {
                sqlx::query("select * from public.expire_due_credits()")
                    .execute(&app.owner)
                    .await
                    .unwrap();
                return 0;
            }
            spend.await
        }
    })
    .await;
    outcomes.extend(raced);
    assert!(
        outcomes.iter().all(|s| *s == 0 || *s == 201),
        "{outcomes:?}"
    );

    for (user, promo, paid) in users.iter() {
        // The expired 10 went to expiry, the spend took the paid 10: nothing twice, nothing lost.
        let rows = ledger(&app, user.id).await;
        let expired: i32 = rows.iter().filter(|r| r.0 == "expiry").map(|r| r.1).sum();
        let spent: i32 = rows.iter().filter(|r| r.0 == "spend").map(|r| r.1).sum();
        assert_eq!(expired, -10, "{rows:?}");
        assert_eq!(spent, -10, "{rows:?}");
        assert_eq!(remaining(&app, *promo).await, 0);
        assert_eq!(remaining(&app, *paid).await, 0);
        assert_eq!(app.balance(user.id).await, 0);
    }
    assert!(discrepancies(&app).await.is_empty());
}

async fn reserve(
    app: &TestApp,
    user: Uuid,
    amount: i32,
    ttl: i32,
    reference: &str,
) -> common::TestResponse {
    app.post(
        "/v1/holds",
        Some(&service_role_key()),
        json!({"user_id": user, "amount": amount, "ttl_seconds": ttl, "reference": reference}),
    )
    .await
}

#[sqlx::test]
async fn a_hold_reserves_credits_and_its_capture_spends_part_once(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;
    let service = service_role_key();

    let hold = reserve(&app, user.id, 8, 600, "gen-1").await;
    assert_eq!(hold.status, 201, "{:?}", hold.body);
    assert_eq!(hold.body["status"], "active");
    let id = hold.body["id"].as_str().unwrap().to_owned();

    // The user sees the hold and can spend only what is left.
    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.body["credits"], 10);
    assert_eq!(me.body["balance"]["available"], 2);
    assert_eq!(me.body["balance"]["held"], 8);
    let mine = app
        .get("/v1/me/holds?status=active", Some(&user.token))
        .await;
    assert_eq!(mine.body["items"][0]["id"], id);
    let refused = app
        .post("/v1/credits/spend", Some(&user.token), json!({"amount": 3}))
        .await;
    assert_eq!(refused.status, 402);
    let too_big = reserve(&app, user.id, 3, 600, "gen-2").await;
    assert_eq!(too_big.status, 402);
    assert_eq!(too_big.code(), "insufficient_credits");

    // Users cannot settle holds.
    let by_user = app
        .post(
            &format!("/v1/holds/{id}/capture"),
            Some(&user.token),
            json!({}),
        )
        .await;
    assert_eq!(by_user.status, 403);

    let over = app
        .post(
            &format!("/v1/holds/{id}/capture"),
            Some(&service),
            json!({"amount": 9}),
        )
        .await;
    assert_eq!(over.status, 422, "{:?}", over.body);

    let captured = app
        .post(
            &format!("/v1/holds/{id}/capture"),
            Some(&service),
            json!({"amount": 5}),
        )
        .await;
    assert_eq!(captured.status, 200, "{:?}", captured.body);
    assert_eq!(captured.body["hold"]["status"], "captured");
    assert_eq!(captured.body["hold"]["captured_amount"], 5);
    assert_eq!(captured.body["transaction"]["amount"], -5);
    assert_eq!(captured.body["transaction"]["source"], "spend");
    assert_eq!(captured.body["transaction"]["reference"], "gen-1");
    assert_eq!(captured.body["balance"], 5);

    for path in ["capture", "release"] {
        let again = app
            .post(&format!("/v1/holds/{id}/{path}"), Some(&service), json!({}))
            .await;
        assert_eq!(again.status, 409, "{path}");
        assert_eq!(again.code(), "hold_not_active");
    }
    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.body["balance"]["available"], 5);
    assert_eq!(app.count("select count(*) from public.credit_transactions where user_id = $1 and source = 'spend'", user.id).await, 1);
    assert!(discrepancies(&app).await.is_empty());
}

#[sqlx::test]
async fn an_idempotency_key_replays_a_capture_instead_of_refusing_it(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;
    let service = service_role_key();
    let hold = reserve(&app, user.id, 4, 600, "gen-k").await;
    let id = hold.body["id"].as_str().unwrap();

    let first = app
        .post_with_key(
            &format!("/v1/holds/{id}/capture"),
            &service,
            "cap-1",
            json!({}),
        )
        .await;
    let second = app
        .post_with_key(
            &format!("/v1/holds/{id}/capture"),
            &service,
            "cap-1",
            json!({}),
        )
        .await;
    assert_eq!(first.status, 200);
    assert_eq!(second.status, 200);
    assert_eq!(first.body, second.body);
    assert_eq!(app.balance(user.id).await, 6);
}

#[sqlx::test]
async fn a_hold_lapses_by_the_clock_and_is_never_captured_after(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;
    let service = service_role_key();
    let hold = reserve(&app, user.id, 10, 60, "gen-late").await;
    let id = hold.body["id"].as_str().unwrap().to_owned();
    let expires_at = hold.body["expires_at"].clone();

    set_clock(&app, "59 seconds").await;
    let still = app.get(&format!("/v1/holds/{id}"), Some(&service)).await;
    assert_eq!(still.body["status"], "active");

    set_clock(&app, "61 seconds").await;
    let seen = app.get(&format!("/v1/holds/{id}"), Some(&service)).await;
    assert_eq!(seen.status, 200);
    assert_eq!(seen.body["status"], "expired");
    assert_eq!(seen.body["settled_at"], expires_at);
    // Available again at once, without a job.
    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.body["balance"]["available"], 10);
    assert_eq!(me.body["balance"]["held"], 0);

    let late = app
        .post(
            &format!("/v1/holds/{id}/capture"),
            Some(&service),
            json!({}),
        )
        .await;
    assert_eq!(late.status, 409);
    assert_eq!(late.code(), "hold_not_active");
    let spent = app
        .post(
            "/v1/credits/spend",
            Some(&user.token),
            json!({"amount": 10}),
        )
        .await;
    assert_eq!(spent.status, 201);
    assert!(discrepancies(&app).await.is_empty());
}

#[sqlx::test]
async fn credits_a_hold_keeps_from_expiring_are_captured_first_and_the_rest_expires_after(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let paid = lot(&app, user.id, "stripe", 100, None).await;
    let promo = lot(&app, user.id, "admin", 20, Some("1 hour")).await;
    let service = service_role_key();
    let hold = reserve(&app, user.id, 110, 86_400, "gen-big").await;
    assert_eq!(hold.status, 201);
    let id = hold.body["id"].as_str().unwrap().to_owned();

    // Past the promo lot's expiry, the hold still needs 10 of its credits: only 10 expire.
    set_clock(&app, "2 hours").await;
    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.body["credits"], 110);
    assert_eq!(me.body["balance"]["available"], 0);
    assert_eq!(remaining(&app, promo).await, 10);

    let captured = app
        .post(
            &format!("/v1/holds/{id}/capture"),
            Some(&service),
            json!({"amount": 100}),
        )
        .await;
    assert_eq!(captured.status, 200, "{:?}", captured.body);
    assert_eq!(captured.body["balance"], 10);
    let rows = ledger(&app, user.id).await;
    let spend = rows.iter().find(|r| r.0 == "spend").unwrap();
    assert_eq!(
        spend.2,
        json!({promo.to_string(): -10, paid.to_string(): -90})
    );
    assert!(discrepancies(&app).await.is_empty());
}

#[sqlx::test]
async fn fifty_concurrent_reserves_captures_releases_and_spends_keep_every_rule(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = Arc::new(TestApp::new(pool, connect).await);
    let user = Arc::new(app.user().await);
    app.grant(user.id, 60).await;

    let outcomes = all_at_once(50, |i| {
        let app = app.clone();
        let user = user.clone();
        async move {
            let service = service_role_key();
            let mut log = Vec::new();
            match i % 4 {
                0 => {
                    let spent = app
                        .post("/v1/credits/spend", Some(&user.token), json!({"amount": 3}))
                        .await;
                    log.push(("spend", spent.status.as_u16()));
                }
                kind => {
                    let hold = reserve(&app, user.id, 5, 600, &format!("gen-{i}")).await;
                    log.push(("reserve", hold.status.as_u16()));
                    if hold.status == 201 {
                        let id = hold.body["id"].as_str().unwrap().to_owned();
                        let path = if kind == 2 { "release" } else { "capture" };
                        // Two settlements of the same hold at once: exactly one goes through.
                        let uri = format!("/v1/holds/{id}/{path}");
                        let (a, b) = tokio::join!(
                            app.post(&uri, Some(&service), json!({})),
                            app.post(&uri, Some(&service), json!({}))
                        );
                        let mut pair = [a.status.as_u16(), b.status.as_u16()];
                        pair.sort();
                        assert_eq!(pair, [200, 409], "{path}: {:?} {:?}", a.body, b.body);
                        log.push((path, 200));
                    }
                }
            }
            let me = app.get("/v1/me", Some(&user.token)).await;
            let available = me.body["balance"]["available"].as_i64().unwrap();
            assert!(available >= 0, "{:?}", me.body);
            log
        }
    })
    .await;

    let log: Vec<(&str, u16)> = outcomes.into_iter().flatten().collect();
    let spends = log.iter().filter(|e| *e == &("spend", 201)).count() as i32;
    let captures = log.iter().filter(|e| *e == &("capture", 200)).count() as i32;
    assert!(
        log.iter().all(|(_, s)| [200, 201, 402].contains(s)),
        "{log:?}"
    );
    assert_eq!(app.balance(user.id).await, 60 - 3 * spends - 5 * captures);
    // One spend row per capture, each for its own hold.
    let rows: i64 = app
        .count(
            "select count(distinct reference) from public.credit_transactions
              where user_id = $1 and reference like 'gen-%'",
            user.id,
        )
        .await;
    assert_eq!(rows, i64::from(captures));
    assert_eq!(
        app.count(
            "select count(*) from public.credit_holds where user_id = $1 and status = 'active'",
            user.id
        )
        .await,
        0
    );
    assert!(discrepancies(&app).await.is_empty());
}

/// The test database's URL, for the binary.
fn database_url(connect: &PgConnectOptions) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for the tests");
    let (server, _) = base
        .rsplit_once('/')
        .expect("DATABASE_URL names a database");
    format!("{server}/{}", connect.get_database().unwrap())
}

#[sqlx::test]
async fn verify_names_the_user_whose_lot_was_tampered(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect.clone()).await;
    let honest = app.user().await;
    let tampered = app.user().await;
    for user in [&honest, &tampered] {
        lot(&app, user.id, "stripe", 10, None).await;
        lot(&app, user.id, "ad_view", 10, Some("30 days")).await;
        app.post("/v1/credits/spend", Some(&user.token), json!({"amount": 4}))
            .await;
    }
    // Moved between two lots of one user: every total still agrees, the draws do not.
    sqlx::query(
        "update public.credit_lots
            set remaining = remaining + case source when 'stripe' then -3 else 3 end
          where user_id = $1",
    )
    .bind(tampered.id)
    .execute(&app.owner)
    .await
    .unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_amethyst-credits"))
        .arg("verify")
        .env("DATABASE_URL", database_url(&connect))
        .output()
        .expect("the binary runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "{report}");
    assert!(
        report.contains(&format!("user {}", tampered.id)),
        "{report}"
    );
    assert!(
        report.contains("lots disagreeing with their draws 2"),
        "{report}"
    );
    assert!(!report.contains(&honest.id.to_string()), "{report}");
}

/// The migrations that had landed before lots.
fn before_lots() -> sqlx::migrate::Migrator {
    sqlx::migrate::Migrator {
        migrations: Cow::Owned(
            MIGRATOR
                .iter()
                .filter(|m| m.version < 20261127150000)
                .cloned()
                .collect(),
        ),
        ignore_missing: false,
        locking: true,
        no_tx: false,
    }
}

#[sqlx::test(migrations = false)]
async fn a_database_from_before_lots_upgrades_with_every_balance_unchanged(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let mut conn = PgConnection::connect_with(&connect).await.unwrap();
    before_lots().run(&mut conn).await.unwrap();

    // Users with history of every kind, as the previous version wrote it.
    let mut users = Vec::new();
    for i in 0..30 {
        let id = Uuid::new_v4();
        sqlx::query("insert into auth.users (id, email) values ($1, $2)")
            .bind(id)
            .bind(format!("old-{i}@example.com"))
            .execute(&mut conn)
            .await
            .unwrap();
        if i % 5 != 0 {
            sqlx::query("select public.add_credits($1, $2, 'admin', 'old grant')")
                .bind(id)
                .bind(10 + i)
                .execute(&mut conn)
                .await
                .unwrap();
        }
        if i % 3 == 0 {
            sqlx::query(
                "select public.stripe_grant('checkout_session', $2, $1, null, 50, 500, 'usd',
                                            $3, $4, 'stripe', 'Pack', $5)",
            )
            .bind(id)
            .bind(format!("cs_old_{i}"))
            .bind(format!("pi_old_{i}"))
            .bind(format!("ch_old_{i}"))
            .bind(format!("evt_old_{i}"))
            .execute(&mut conn)
            .await
            .unwrap();
        }
        sqlx::query("select * from public.handle_ad_view($1, 31)")
            .bind(id)
            .execute(&mut conn)
            .await
            .unwrap();
        if i % 2 == 0 {
            sqlx::query("select public.spend_credits($1, 1, 'old spend')")
                .bind(id)
                .execute(&mut conn)
                .await
                .unwrap();
        }
        users.push(id);
    }
    let before: Vec<(Uuid, i32)> =
        sqlx::query_as("select id, credits from public.profiles order by id")
            .fetch_all(&mut conn)
            .await
            .unwrap();

    MIGRATOR.run(&mut conn).await.unwrap();

    let after: Vec<(Uuid, i32)> =
        sqlx::query_as("select id, credits from public.profiles order by id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(before, after);
    let openings: Vec<(Uuid, i32, bool)> = sqlx::query_as(
        "select user_id, remaining, expires_at is null from public.credit_lots
          where source = 'opening' order by user_id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let expected: Vec<(Uuid, i32, bool)> = before
        .iter()
        .filter(|(_, c)| *c > 0)
        .map(|(id, c)| (*id, *c, true))
        .collect();
    assert_eq!(openings, expected);
    let broken: i64 = sqlx::query_scalar("select count(*) from public.ledger_discrepancies()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(broken, 0);

    // And the upgraded balances work: a refund of an old purchase, a spend.
    sqlx::query("select public.stripe_record_charge('ch_old_3', 'pi_old_3', 500, 500, 0, 0)")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("select public.spend_credits($1, 1)")
        .bind(users[1])
        .execute(&mut conn)
        .await
        .unwrap();
    let broken: i64 = sqlx::query_scalar("select count(*) from public.ledger_discrepancies()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(broken, 0);
}

#[sqlx::test]
async fn the_daily_maintenance_writes_every_due_expiry_and_records_it(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect.clone()).await;
    let mut users = Vec::new();
    for _ in 0..3 {
        let user = app.user().await;
        lot(&app, user.id, "stripe", 10, None).await;
        lot(&app, user.id, "ad_view", 4, Some("1 day")).await;
        users.push(user);
    }
    let untouched = app.user().await;
    lot(&app, untouched.id, "ad_view", 4, Some("3 days")).await;
    set_clock(&app, "2 days").await;

    let output = Command::new(env!("CARGO_BIN_EXE_amethyst-credits"))
        .args(["maintenance", "daily"])
        .env("DATABASE_URL", database_url(&connect))
        .output()
        .expect("the binary runs");
    let run: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!("{}", String::from_utf8_lossy(&output.stderr));
    });
    assert_eq!(run["findings"]["expiry"]["users"], 3, "{run}");
    assert_eq!(run["findings"]["expiry"]["credits"], 12, "{run}");
    assert_eq!(run["findings"]["expiry"]["outcome"], "ok", "{run}");
    assert_eq!(run["findings"]["ledger"]["discrepancies"], 0, "{run}");
    for user in &users {
        assert_eq!(app.balance(user.id).await, 10);
    }
    assert_eq!(app.balance(untouched.id).await, 4);
}

#[sqlx::test]
async fn admins_set_a_sources_rules_and_give_credits_that_expire(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::client_ads(connect).await;
    let admin = app.admin().await;
    let user = app.user().await;

    let sources = app
        .get("/v1/admin/credit-sources", Some(&admin.token))
        .await;
    assert_eq!(sources.status, 200);
    assert_eq!(
        sources.body["items"][0],
        json!({"source": "ad_view", "priority": 10, "expires_after_days": 30})
    );
    let by_user = app.get("/v1/admin/credit-sources", Some(&user.token)).await;
    assert_eq!(by_user.status, 403);

    let put = |path: &str, body: Value| {
        app.send(common::request(
            axum::http::Method::PUT,
            path,
            Some(&admin.token),
            Some(body.to_string()),
            &[],
        ))
    };
    let changed = put(
        "/v1/admin/credit-sources/ad_view",
        json!({"priority": 5, "expires_after_days": 7}),
    )
    .await;
    assert_eq!(changed.status, 200, "{:?}", changed.body);
    assert_eq!(
        changed.body,
        json!({"source": "ad_view", "priority": 5, "expires_after_days": 7})
    );
    let unknown = put(
        "/v1/admin/credit-sources/lottery",
        json!({"priority": 5, "expires_after_days": null}),
    )
    .await;
    assert_eq!(unknown.status, 404);
    let bad = put(
        "/v1/admin/credit-sources/admin",
        json!({"priority": -1, "expires_after_days": 0}),
    )
    .await;
    assert_eq!(bad.status, 422);
    assert_eq!(bad.body["errors"].as_array().unwrap().len(), 2);

    // An ad reward granted now follows the new rule.
    let viewed = app
        .post(
            "/v1/ads/views",
            Some(&user.token),
            json!({"duration_seconds": 31}),
        )
        .await;
    assert_eq!(viewed.status, 201, "{:?}", viewed.body);
    let days: f64 = sqlx::query_scalar(
        "select (extract(epoch from expires_at - created_at) / 86400)::float8 from public.credit_lots
          where user_id = $1 and source = 'ad_view'",
    )
    .bind(user.id)
    .fetch_one(&app.owner)
    .await
    .unwrap();
    assert!((days - 7.0).abs() < 0.01, "{days}");
    let priority: i32 = sqlx::query_scalar(
        "select priority from public.credit_lots where user_id = $1 and source = 'ad_view'",
    )
    .bind(user.id)
    .fetch_one(&app.owner)
    .await
    .unwrap();
    assert_eq!(priority, 5);

    // An admin gives credits with an expiry; a past expiry, or one on a debit, is refused.
    let path = format!("/v1/admin/users/{}/credits", user.id);
    let expires_at = (chrono::Utc::now() + chrono::Duration::days(3)).to_rfc3339();
    let given = app
        .post(
            &path,
            Some(&admin.token),
            json!({"amount": 50, "reason": "Sorry", "expires_at": expires_at}),
        )
        .await;
    assert_eq!(given.status, 201, "{:?}", given.body);
    let past = app
        .post(
            &path,
            Some(&admin.token),
            json!({"amount": 5, "reason": "Late", "expires_at": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(past.status, 422, "{:?}", past.body);
    assert_eq!(past.body["errors"][0]["field"], "expires_at");
    let debit = app
        .post(
            &path,
            Some(&admin.token),
            json!({"amount": -5, "reason": "Oops", "expires_at": expires_at}),
        )
        .await;
    assert_eq!(debit.status, 422);
    assert_eq!(app.balance(user.id).await, 52);

    let lots = app
        .get(
            &format!("/v1/admin/users/{}/lots", user.id),
            Some(&admin.token),
        )
        .await;
    assert_eq!(lots.status, 200);
    let items = lots.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["source"], "admin");
    assert_eq!(items[0]["amount"], 50);
    assert!(items[0]["expires_at"].is_string());
    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.body["balance"]["promotional"], 52);
    assert_eq!(me.body["balance"]["expiring"].as_array().unwrap().len(), 2);
}
