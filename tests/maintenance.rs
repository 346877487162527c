//! The maintenance tasks on a seeded database, the archival's safety, and the admin view.

mod common;

use std::process::Command;
use std::time::Duration;

use amethyst_credits::maintenance::{self, Archival, Task};
use amethyst_credits::stripe::reconcile::Reconciler;
use common::binary::{Binary, Database, sample};
use common::stripe::{Breakage, FakeStripe, checkout_session, event, event_id, stripe_config};
use common::{TestApp, service_role_key};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

async fn run(app: &TestApp, task: Task, archival: Archival) -> maintenance::MaintenanceRun {
    let mut conn = PgConnection::connect_with(&app.connect).await.unwrap();
    maintenance::run(&mut conn, task, archival, None)
        .await
        .expect("maintenance runs")
}

/// `users` users with `per_user` grants each; the first `old` grants of each user are dated
/// 13 months back (ledger order and age agree, as in real life).
async fn seed(app: &TestApp, users: usize, per_user: i32, old: i32) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for _ in 0..users {
        let user = app.user().await;
        for n in 1..=per_user {
            app.grant(user.id, n).await;
        }
        sqlx::query(
            "update public.credit_transactions set created_at = now() - interval '13 months'
              where id in (select id from public.credit_transactions where user_id = $1 order by seq limit $2)",
        )
        .bind(user.id)
        .bind(i64::from(old))
        .execute(&app.owner)
        .await
        .unwrap();
        ids.push(user.id);
    }
    ids
}

async fn balances(app: &TestApp) -> Vec<(Uuid, i32)> {
    sqlx::query_as("select id, credits from public.profiles order by id")
        .fetch_all(&app.owner)
        .await
        .unwrap()
}

async fn discrepancies(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from public.ledger_discrepancies()")
        .fetch_one(&app.owner)
        .await
        .unwrap()
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.owner).await.unwrap()
}

#[sqlx::test]
async fn daily_reports_the_ledger_and_stripe_and_clears_old_idempotency_records(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    seed(&app, 3, 2, 0).await;
    let clean = run(&app, Task::Daily, Archival::default()).await;
    assert_eq!(clean.outcome, "ok", "{}", clean.findings);
    assert_eq!(clean.findings["ledger"]["discrepancies"], 0);

    let tampered = app.user().await;
    app.grant(tampered.id, 10).await;
    sqlx::query("update public.profiles set credits = 99 where id = $1")
        .bind(tampered.id)
        .execute(&app.owner)
        .await
        .unwrap();
    sqlx::query(
        "insert into public.stripe_events (id, type, status, error, payload) values
           ('evt_failed', 'checkout.session.completed', 'failed', 'no profile', '{}'),
           ('evt_rejected', 'invoice.paid', 'rejected', 'malformed invoice', '{}'),
           ('evt_fine', 'invoice.paid', 'processed', null, '{}')",
    )
    .execute(&app.owner)
    .await
    .unwrap();
    sqlx::query(
        "insert into public.idempotency_keys (owner, key, request_hash, status_code, response_body, created_at) values
           ('u', 'old', '\\x00', 201, '\\x7b7d', now() - interval '25 hours'),
           ('u', 'new', '\\x00', 201, '\\x7b7d', now() - interval '1 hour')",
    )
    .execute(&app.owner)
    .await
    .unwrap();

    let report = run(&app, Task::Daily, Archival::default()).await;

    assert_eq!(report.outcome, "findings");
    assert_eq!(report.findings["ledger"]["discrepancies"], 1);
    assert_eq!(
        report.findings["ledger"]["users"][0]["user_id"],
        tampered.id.to_string()
    );
    assert_eq!(report.findings["stripe_events"]["unsettled"], 2);
    let ids: Vec<&str> = report.findings["stripe_events"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"evt_failed") && ids.contains(&"evt_rejected"),
        "{ids:?}"
    );
    assert_eq!(report.findings["idempotency_keys_removed"], 1);
    assert_eq!(
        count(&app, "select count(*) from public.idempotency_keys").await,
        1
    );
    assert!(report.finished_at.is_some());
}

#[sqlx::test]
async fn weekly_reports_duplicate_indexes_and_tables_without_rls(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let clean = run(&app, Task::Weekly, Archival::default()).await;
    assert_eq!(clean.outcome, "ok", "{}", clean.findings);
    assert!(
        clean.findings["slow_queries"].is_object() || clean.findings["slow_queries"].is_array()
    );
    assert!(
        !clean.findings["unused_indexes"]
            .as_array()
            .unwrap()
            .is_empty(),
        "a fresh database has unused indexes"
    );

    sqlx::query("create index credit_transactions_created_at_again on public.credit_transactions (created_at)")
        .execute(&app.owner)
        .await
        .unwrap();
    sqlx::query("create table public.scratchpad (id int)")
        .execute(&app.owner)
        .await
        .unwrap();

    let report = run(&app, Task::Weekly, Archival::default()).await;

    assert_eq!(report.outcome, "findings");
    assert_eq!(
        report.findings["duplicate_indexes"],
        json!([[
            "credit_transactions_created_at_again",
            "credit_transactions_created_at_idx"
        ]])
    );
    assert_eq!(report.findings["tables_without_rls"], json!(["scratchpad"]));
}

#[sqlx::test]
async fn monthly_archives_exactly_the_old_rows_and_changes_no_balance(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let users = seed(&app, 4, 5, 3).await;
    let before = balances(&app).await;
    let old_ids: Vec<Uuid> = sqlx::query_scalar(
        "select id from public.credit_transactions where created_at < now() - interval '12 months' order by id",
    )
    .fetch_all(&app.owner)
    .await
    .unwrap();
    assert_eq!(old_ids.len(), 12);

    let archival = Archival {
        batch_size: Some(5),
        ..Archival::default()
    };
    let first = run(&app, Task::Monthly, archival).await;

    assert_eq!(first.outcome, "ok");
    assert_eq!(first.findings["archived"], 12);
    assert_eq!(first.findings["batches"], 3);
    let archived: Vec<Uuid> =
        sqlx::query_scalar("select id from public.credit_transactions_archive order by id")
            .fetch_all(&app.owner)
            .await
            .unwrap();
    assert_eq!(archived, old_ids, "exactly the old rows moved");
    assert_eq!(
        count(&app, "select count(*) from public.credit_transactions").await,
        8
    );
    assert_eq!(balances(&app).await, before, "no balance changed");
    assert_eq!(
        discrepancies(&app).await,
        0,
        "the ledger invariant counts archived rows"
    );

    // History still works and new activity goes on from the right balance.
    let user = &users[0];
    app.grant(*user, 1).await;
    assert_eq!(discrepancies(&app).await, 0);

    // Rows that point at archived ledger rows keep their links.
    let viewer = app.user().await;
    let (view, entry): (Uuid, Uuid) =
        sqlx::query_as("select view_id, transaction_id from public.handle_ad_view($1, 40)")
            .bind(viewer.id)
            .fetch_one(&app.owner)
            .await
            .unwrap();
    sqlx::query("update public.credit_transactions set created_at = now() - interval '13 months' where id = $1")
        .bind(entry)
        .execute(&app.owner)
        .await
        .unwrap();
    let moved = run(&app, Task::Monthly, archival).await;
    assert_eq!(moved.findings["archived"], 1);
    let link: Option<Uuid> =
        sqlx::query_scalar("select transaction_id from public.ad_views where id = $1")
            .bind(view)
            .fetch_one(&app.owner)
            .await
            .unwrap();
    assert_eq!(
        link,
        Some(entry),
        "archiving does not cut the ad view's link to its ledger row"
    );
    assert_eq!(discrepancies(&app).await, 0);

    let again = run(&app, Task::Monthly, archival).await;
    assert_eq!(again.findings["archived"], 0, "a rerun moves nothing more");
    assert_eq!(
        count(
            &app,
            "select count(*) from public.credit_transactions_archive"
        )
        .await,
        13
    );
}

#[sqlx::test]
async fn an_archival_killed_between_batches_recovers_on_the_next_run(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    seed(&app, 2, 6, 5).await;
    let before = balances(&app).await;
    let total = count(&app, "select count(*) from public.credit_transactions").await;

    // A slow run: one row per batch, half a second between batches.
    let mut victim = PgConnection::connect_with(&app.connect).await.unwrap();
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&mut victim)
        .await
        .unwrap();
    let slow = Archival {
        batch_size: Some(1),
        pause_seconds: 0.5,
        ..Archival::default()
    };
    let running =
        tokio::spawn(async move { maintenance::run(&mut victim, Task::Monthly, slow, None).await });
    let mut waited = 0;
    while count(
        &app,
        "select count(*) from public.credit_transactions_archive",
    )
    .await
        < 2
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
        assert!(waited < 200, "the archival never got going");
    }
    let killed: bool = sqlx::query_scalar("select pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&app.owner)
        .await
        .unwrap();
    assert!(killed);
    assert!(
        running.await.unwrap().is_err(),
        "the killed run ends in an error"
    );

    let moved = count(
        &app,
        "select count(*) from public.credit_transactions_archive",
    )
    .await;
    assert!(
        (2..10).contains(&moved),
        "killed part-way: {moved} of 10 moved"
    );
    assert_eq!(
        count(&app, "select count(*) from public.credit_transactions").await + moved,
        total,
        "nothing lost or doubled"
    );
    assert_eq!(balances(&app).await, before);
    assert_eq!(discrepancies(&app).await, 0);

    let resumed = run(&app, Task::Monthly, Archival::default()).await;
    assert_eq!(resumed.outcome, "ok");
    assert_eq!(
        count(
            &app,
            "select count(*) from public.credit_transactions_archive"
        )
        .await,
        10
    );
    assert_eq!(
        count(&app, "select count(*) from public.credit_transactions").await,
        total - 10
    );
    assert_eq!(balances(&app).await, before);
    let interrupted = count(
        &app,
        "select count(*) from public.maintenance_runs where outcome = 'interrupted'",
    )
    .await;
    assert_eq!(interrupted, 1, "the killed run is marked interrupted");
}

#[sqlx::test]
async fn admins_read_the_maintenance_runs(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect).await;
    run(&app, Task::Daily, Archival::default()).await;
    run(&app, Task::Weekly, Archival::default()).await;
    let user = app.user().await;

    let runs = app
        .get("/v1/admin/maintenance?limit=1", Some(&service_role_key()))
        .await;
    assert_eq!(runs.status, 200, "{:?}", runs.body);
    assert_eq!(runs.body["items"][0]["task"], "weekly");
    assert!(runs.body["items"][0]["findings"]["tables_without_rls"].is_array());
    let cursor = runs.body["next_cursor"].as_str().unwrap();
    let older = app
        .get(
            &format!("/v1/admin/maintenance?cursor={cursor}"),
            Some(&service_role_key()),
        )
        .await;
    assert_eq!(older.body["items"][0]["task"], "daily");
    assert_eq!(older.body["next_cursor"], serde_json::Value::Null);

    assert_eq!(
        app.get("/v1/admin/maintenance", Some(&user.token))
            .await
            .status,
        403
    );
}

#[tokio::test]
async fn serve_publishes_each_tasks_last_run_as_gauges() {
    let database = Database::fresh();
    database.migrate();
    let weekly = database.verb(&["maintenance", "weekly"]);
    assert!(
        weekly.status.success(),
        "{}",
        String::from_utf8_lossy(&weekly.stderr)
    );
    // A balance that disagrees with its ledger: the daily run has findings.
    let owner = database.owner().await;
    let user = Uuid::new_v4();
    sqlx::query("insert into auth.users (id, email) values ($1, 'gauges@example.com')")
        .bind(user)
        .execute(&owner)
        .await
        .unwrap();
    sqlx::query("select public.add_credits($1, 3, 'system')")
        .bind(user)
        .execute(&owner)
        .await
        .unwrap();
    sqlx::query("update public.profiles set credits = 4 where id = $1")
        .bind(user)
        .execute(&owner)
        .await
        .unwrap();
    let daily = database.verb(&["maintenance", "daily"]);
    assert!(!daily.status.success(), "the daily run has findings");
    let finished: Vec<(String, f64)> = sqlx::query_as(
        "select task, extract(epoch from finished_at)::float8 from public.maintenance_runs order by task",
    )
    .fetch_all(&owner)
    .await
    .unwrap();
    owner.close().await;

    // The server reads the runs when it starts, then every minute, in the background.
    let server = Binary::serve_on(database, &[]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = server.scrape().await;
        if text.contains("maintenance_last_run_outcome{") {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no maintenance gauge after 20 s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    for (series, value) in [
        (
            r#"maintenance_last_run_outcome{task="daily",outcome="findings"}"#,
            1.0,
        ),
        (
            r#"maintenance_last_run_outcome{task="daily",outcome="ok"}"#,
            0.0,
        ),
        (
            r#"maintenance_last_run_outcome{task="weekly",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"maintenance_last_run_outcome{task="weekly",outcome="findings"}"#,
            0.0,
        ),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
    assert!(
        !text.contains(r#"task="monthly""#),
        "monthly never ran:\n{text}"
    );
    assert_eq!(finished.len(), 2);
    for (task, at) in &finished {
        let series = format!(r#"maintenance_last_run_timestamp_seconds{{task="{task}"}}"#);
        let published = sample(&text, &series).unwrap_or_else(|| panic!("{series} in\n{text}"));
        assert!(
            (published - at).abs() < 0.001,
            "{series}: {published} ≠ {at}"
        );
    }
}

#[sqlx::test]
async fn the_maintenance_verb_prints_the_run_and_fails_on_findings(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect.clone()).await;
    let base = std::env::var("DATABASE_URL").unwrap();
    let url = format!(
        "{}/{}",
        base.rsplit_once('/').unwrap().0,
        connect.get_database().unwrap()
    );
    let maintenance = |task: &str| {
        Command::new(env!("CARGO_BIN_EXE_amethyst-credits"))
            .args(["maintenance", task])
            .env("DATABASE_URL", &url)
            .env("LOG_FORMAT", "json")
            .output()
            .unwrap()
    };

    let ok = maintenance("daily");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(printed["outcome"], "ok");

    let user = app.user().await;
    app.grant(user.id, 3).await;
    sqlx::query("update public.profiles set credits = 4 where id = $1")
        .bind(user.id)
        .execute(&app.owner)
        .await
        .unwrap();
    let findings = maintenance("daily");
    assert!(!findings.status.success());
    let printed: serde_json::Value = serde_json::from_slice(&findings.stdout).unwrap();
    assert_eq!(
        printed["findings"]["ledger"]["users"][0]["user_id"],
        user.id.to_string()
    );

    let bad = maintenance("hourly");
    assert!(!bad.status.success());
}

#[sqlx::test]
async fn without_pg_cron_no_job_is_attempted(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect).await;
    // This server does not preload pg_cron: the migration skipped scheduling, and nothing of
    // pg_cron exists in the database.
    assert_eq!(
        count(
            &app,
            "select count(*) from pg_extension where extname = 'pg_cron'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &app,
            "select count(*) from pg_namespace where nspname = 'cron'"
        )
        .await,
        0
    );
    // pgvector is not installed here either: the embedding column was skipped cleanly.
    assert_eq!(
        count(&app, "select count(*) from information_schema.columns where table_name = 'images' and column_name = 'embedding'").await,
        0
    );
}

/// A test app with Stripe configured at a local fake, and one purchase Stripe never delivered:
/// (app, fake, buyer).
async fn app_with_an_undelivered_purchase(
    connect: PgConnectOptions,
) -> (TestApp, FakeStripe, Uuid) {
    let stripe = FakeStripe::start().await;
    let app = TestApp::with_config(connect, stripe_config(&stripe.url)).await;
    let user = app.user().await;
    let pack = Uuid::new_v4();
    sqlx::query(
        "insert into public.credit_packs (id, name, credits, kind, stripe_price_id, unit_amount, currency, active)
         values ($1, '100 credits', 100, 'one_time', 'price_daily', 999, 'usd', true)",
    )
    .bind(pack)
    .execute(&app.owner)
    .await
    .unwrap();
    let session = format!("cs_test_{}", Uuid::new_v4().simple());
    let payment_intent = format!("pi_{}", Uuid::new_v4().simple());
    stripe.publish([event(
        &event_id(),
        "checkout.session.completed",
        checkout_session(&session, user.id, pack, 100, &payment_intent, "paid"),
    )]);
    (app, stripe, user.id)
}

async fn daily_with_stripe(app: &TestApp) -> maintenance::MaintenanceRun {
    let mut conn = PgConnection::connect_with(&app.connect).await.unwrap();
    maintenance::run(
        &mut conn,
        Task::Daily,
        Archival::default(),
        Reconciler::from_state(&app.state),
    )
    .await
    .expect("maintenance runs")
}

#[sqlx::test]
async fn daily_reconciles_with_stripe_and_records_what_it_found(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, _stripe, buyer) = app_with_an_undelivered_purchase(connect).await;

    let report = daily_with_stripe(&app).await;

    assert_eq!(report.outcome, "ok", "{}", report.findings);
    assert_eq!(
        report.findings["reconcile"],
        json!({"listed": 1, "already_processed": 0, "processed": 1, "failed": 0,
               "failures": [], "outcome": "ok"})
    );
    assert_eq!(app.balance(buyer).await, 100);
    // The SQL tasks ran and kept their findings beside it.
    assert_eq!(report.findings["ledger"]["discrepancies"], 0);
    assert_eq!(report.findings["stripe_events"]["unsettled"], 0);
    let stored: serde_json::Value = sqlx::query_scalar(
        "select findings -> 'reconcile' from public.maintenance_runs where id = $1",
    )
    .bind(report.id)
    .fetch_one(&app.owner)
    .await
    .unwrap();
    assert_eq!(stored, report.findings["reconcile"]);
}

#[sqlx::test]
async fn a_daily_run_whose_reconciliation_fails_is_not_ok_and_still_does_the_other_tasks(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, stripe, buyer) = app_with_an_undelivered_purchase(connect).await;
    *stripe.state.events_break.lock().unwrap() = Some((0, Breakage::ServerError));
    sqlx::query(
        "insert into public.idempotency_keys (owner, key, request_hash, status_code, response_body, created_at)
         values ('u', 'old', '\\x00', 201, '\\x7b7d', now() - interval '25 hours')",
    )
    .execute(&app.owner)
    .await
    .unwrap();

    let report = daily_with_stripe(&app).await;

    assert_eq!(report.outcome, "failed", "{}", report.findings);
    assert_eq!(report.findings["reconcile"]["outcome"], "failed");
    let error = report.findings["reconcile"]["error"].as_str().unwrap();
    assert!(error.contains("could not list Stripe's events"), "{error}");
    assert_eq!(app.balance(buyer).await, 0);
    assert_eq!(report.findings["ledger"]["discrepancies"], 0);
    assert_eq!(report.findings["idempotency_keys_removed"], 1);
    assert!(report.findings["analyzed"].is_array());
}
