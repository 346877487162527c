//! Faults answer as faults (docs/api.md, "Errors"): a database that restarts, drops
//! connections, or stops a statement past its time limit gets `503 unavailable` with a
//! `Retry-After`, never a 500; serialization failures and deadlocks are run again; and a
//! client that retries with its `Idempotency-Key` gets each operation applied exactly once.
//!
//! The tests that stop PostgreSQL or kill its sessions run a throwaway cluster of their own
//! (`common::cluster`); the others take a database of the test server like every test.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amethyst_credits::db::CONFLICT_ATTEMPTS;
use common::binary::{Binary, Database};
use common::cluster::Cluster;
use common::stripe::{FakeStripe, checkout_session, event, event_id, stripe_config};
use common::{
    TestApp, TestResponse, TestUser, request, service_role_key, test_config, wait_for_lock_waiters,
};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// A cluster for the tests that hurt the database. No fsync: nothing here survives a crash
/// of the machine, and initdb and checkpoints are faster without it.
fn cluster() -> Cluster {
    Cluster::start("amethyst-faults", "-c fsync=off")
}

/// A 503 as the contract wants it for a fault: `unavailable`, with a `Retry-After`.
fn assert_unavailable(response: &TestResponse, what: &str) {
    assert_eq!(response.status, 503, "{what}: {:?}", response.body);
    assert_eq!(response.code(), "unavailable", "{what}");
    assert_eq!(
        response
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1"),
        "{what}: a Retry-After"
    );
}

async fn spend_rows(owner: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "select count(*), count(distinct reference) from public.credit_transactions
          where source = 'spend'",
    )
    .fetch_one(owner)
    .await
    .unwrap()
}

async fn ledger_holds(connect: &PgConnectOptions) -> bool {
    let mut conn = PgConnection::connect_with(connect).await.unwrap();
    let report = amethyst_credits::verify::run(&mut conn).await.unwrap();
    report.passed()
}

/// Terminates the sessions of this database that wait for a lock, as an operator's
/// `pg_terminate_backend` would (they fail with SQLSTATE 57P01); answers how many.
async fn terminate_lock_waiters(owner: &PgPool) -> i64 {
    sqlx::query_scalar(
        "select count(*) filter (where pg_terminate_backend(pid)) from pg_stat_activity
          where datname = current_database() and wait_event_type = 'Lock'",
    )
    .fetch_one(owner)
    .await
    .unwrap()
}

/// An open transaction of the test's holding `user`'s profile row, so that whatever changes
/// the balance waits.
async fn hold_profile(owner: &PgPool, user: Uuid) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = owner.begin().await.unwrap();
    sqlx::query("select 1 from public.profiles where id = $1 for update")
        .bind(user)
        .execute(&mut *holder)
        .await
        .unwrap();
    holder
}

fn spend(key: &str) -> serde_json::Value {
    json!({"amount": 1, "description": "Image", "reference": key})
}

// ---------------------------------------------------------------------------------------------
// A restart of PostgreSQL under load.

/// Waits until `done`, failing the test after `deadline`.
async fn wait_for(what: &str, deadline: Duration, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < deadline, "waited too long for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How one request with a key went.
#[derive(Clone, Debug)]
struct Sent {
    user: usize,
    key: String,
    /// The status, or `None` when the client hung up before the answer.
    status: Option<u16>,
}

const CLIENTS: usize = 32;
const USERS: usize = 4;
const GRANT: i32 = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_of_postgresql_mid_run_answers_503s_never_a_500_and_retried_keys_apply_once() {
    let cluster = Arc::new(cluster());
    let server = Arc::new(
        Binary::serve_on(
            Database::fresh_on(&cluster.url("postgres")),
            &[("DATABASE_MAX_CONNECTIONS", "10")],
        )
        .await,
    );
    let mut users: Vec<TestUser> = Vec::new();
    for _ in 0..USERS {
        let user = server.user().await;
        server.grant(user.id, GRANT).await;
        users.push(user);
    }
    let users = Arc::new(users);

    // /ready and /health, polled throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let ready_seen: Arc<Mutex<Vec<u16>>> = Arc::default();
    let health_seen: Arc<Mutex<Vec<u16>>> = Arc::default();
    let probe = {
        let (server, stop) = (server.clone(), stop.clone());
        let (ready_seen, health_seen) = (ready_seen.clone(), health_seen.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                for (path, seen) in [("/ready", &ready_seen), ("/health", &health_seen)] {
                    let status = server
                        .request(reqwest::Method::GET, path)
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    seen.lock().unwrap().push(status);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // 32 clients spend one credit per request, each with a key of its own; every eighth
    // request hangs up after 20 ms.
    let answered = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..CLIENTS {
        let (server, users, stop, answered) = (
            server.clone(),
            users.clone(),
            stop.clone(),
            answered.clone(),
        );
        clients.spawn(async move {
            let mut sent = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let user = (client + n) % USERS;
                let key = format!("c{client}-{n}");
                let hang_up = n % 8 == 7;
                let answer = server
                    .request(reqwest::Method::POST, "/v1/credits/spend")
                    .bearer_auth(&users[user].token)
                    .header("idempotency-key", &key)
                    .json(&spend(&key))
                    .timeout(if hang_up {
                        Duration::from_millis(20)
                    } else {
                        Duration::from_secs(40)
                    })
                    .send()
                    .await;
                let status = match answer {
                    Ok(response) => Some(response.status().as_u16()),
                    Err(err) if err.is_timeout() && hang_up => None,
                    Err(err) => panic!("{key}: the server did not answer: {err}"),
                };
                answered.fetch_add(1, Ordering::SeqCst);
                sent.push(Sent { user, key, status });
                n += 1;
            }
            sent
        });
    }

    wait_for(
        "150 answers before the restart",
        Duration::from_secs(60),
        || answered.load(Ordering::SeqCst) >= 150,
    )
    .await;

    // The restart, in fast mode: stopped, kept down until /ready has said so, started.
    let restart_started = Instant::now();
    let stopping = cluster.clone();
    tokio::task::spawn_blocking(move || stopping.stop_fast())
        .await
        .unwrap();
    let ready_before = ready_seen.lock().unwrap().len();
    wait_for("/ready to answer 503", Duration::from_secs(20), || {
        ready_seen.lock().unwrap()[ready_before..].contains(&503)
    })
    .await;
    let starting = cluster.clone();
    tokio::task::spawn_blocking(move || starting.start_again())
        .await
        .unwrap();
    let down_for = restart_started.elapsed();
    let ready_after = ready_seen.lock().unwrap().len();
    wait_for(
        "/ready to answer 200 again",
        Duration::from_secs(20),
        || ready_seen.lock().unwrap()[ready_after..].contains(&200),
    )
    .await;
    let at_restart = answered.load(Ordering::SeqCst);
    wait_for(
        "150 answers after the restart",
        Duration::from_secs(60),
        || answered.load(Ordering::SeqCst) >= at_restart + 150,
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut sent: Vec<Sent> = Vec::new();
    while let Some(client) = clients.join_next().await {
        sent.extend(client.unwrap());
    }
    probe.await.unwrap();

    // Every request without a 2xx is retried with its key until it gets one.
    let mut retries = 0;
    let mut retry_statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut replayed = 0;
    for request in sent.iter().filter(|s| s.status != Some(201)) {
        let mut status = 0;
        for _ in 0..50 {
            let response = server
                .request(reqwest::Method::POST, "/v1/credits/spend")
                .bearer_auth(&users[request.user].token)
                .header("idempotency-key", &request.key)
                .json(&spend(&request.key))
                .send()
                .await
                .expect("the server answers");
            retries += 1;
            status = response.status().as_u16();
            *retry_statuses.entry(status).or_default() += 1;
            if status == 201 {
                replayed += usize::from(response.headers().contains_key("idempotent-replayed"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, 201, "{} was never applied", request.key);
    }

    let mut first: BTreeMap<String, usize> = BTreeMap::new();
    for s in &sent {
        let label = s.status.map_or("hung up".to_owned(), |s| s.to_string());
        *first.entry(label).or_default() += 1;
    }
    let owner = server.database.owner().await;
    let (rows, distinct) = spend_rows(&owner).await;
    let balances: i64 = sqlx::query_scalar("select sum(credits)::bigint from public.profiles")
        .fetch_one(&owner)
        .await
        .unwrap();
    let ready = ready_seen.lock().unwrap().clone();
    let health = health_seen.lock().unwrap().clone();
    println!(
        "restart: down {down_for:?}; {} requests with {} keys, first answers {first:?}; \
         {retries} retries answered {retry_statuses:?} ({replayed} replayed); \
         {rows} ledger rows; /ready polled {} times ({} × 503); /health {} × 200",
        sent.len(),
        sent.len(),
        ready.len(),
        ready.iter().filter(|s| **s == 503).count(),
        health.iter().filter(|s| **s == 200).count(),
    );

    let statuses: Vec<u16> = sent
        .iter()
        .filter_map(|s| s.status)
        .chain(retry_statuses.keys().copied())
        .collect();
    assert!(
        !statuses.contains(&500),
        "a 500: {first:?} {retry_statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 503),
        "only 201 and 503: {first:?} {retry_statuses:?}"
    );
    assert!(
        first.contains_key("503"),
        "the restart was felt by requests in flight: {first:?}"
    );
    assert_eq!(
        (rows, distinct),
        (sent.len() as i64, sent.len() as i64),
        "every key applied exactly once"
    );
    assert_eq!(
        balances,
        (USERS as i64) * i64::from(GRANT) - sent.len() as i64
    );
    let verify = server.database.verb(&["verify"]);
    assert!(
        verify.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let first_503 = ready
        .iter()
        .position(|s| *s == 503)
        .expect("/ready said 503");
    assert!(ready[..first_503].iter().all(|s| *s == 200), "{ready:?}");
    assert_eq!(ready.last(), Some(&200), "/ready came back: {ready:?}");
    assert!(health.iter().all(|s| *s == 200), "/health: {health:?}");
    owner.close().await;
}

// ---------------------------------------------------------------------------------------------
// Sessions killed in the middle of the work.

/// An admin-created pack, as `PUT /v1/admin/credit-packs/{id}` makes it.
async fn new_pack(app: &TestApp, credits: i32, price: &str) -> Uuid {
    let id = Uuid::new_v4();
    let response = app
        .send(request(
            axum::http::Method::PUT,
            &format!("/v1/admin/credit-packs/{id}"),
            Some(&service_role_key()),
            Some(
                json!({"name": format!("{credits} credits"), "credits": credits, "kind": "one_time",
                       "stripe_price_id": price, "unit_amount": 999, "currency": "usd", "active": true})
                .to_string(),
            ),
            &[],
        ))
        .await;
    assert_eq!(response.status, 200, "{:?}", response.body);
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_killed_during_spends_and_a_webhook_answer_503_and_retries_lose_nothing() {
    let cluster = cluster();
    let connect = cluster.migrated_database().await;
    let stripe = FakeStripe::start().await;
    let app = Arc::new(TestApp::with_config(connect.clone(), stripe_config(&stripe.url)).await);
    let user = app.user().await;
    app.grant(user.id, 100).await;

    // Six spends with keys and two without wait on the user's row; their sessions are killed.
    let holder = hold_profile(&app.owner, user.id).await;
    let mut spends = tokio::task::JoinSet::new();
    for i in 0..8 {
        let (app, token) = (app.clone(), user.token.clone());
        spends.spawn(async move {
            let key = format!("kill-{i}");
            let response = if i < 6 {
                app.post_with_key("/v1/credits/spend", &token, &key, spend(&key))
                    .await
            } else {
                app.post("/v1/credits/spend", Some(&token), spend(&key))
                    .await
            };
            (key, i < 6, response)
        });
    }
    // The two without a key may share a batch, and so a session: once both are in batches,
    // the sessions waiting are the six keyed ones and one per batch.
    let deadline = Instant::now() + Duration::from_secs(10);
    let sessions = loop {
        let (batches, items) = app.state.batches.counts("spend");
        if items == 2 {
            break 6 + batches as i64;
        }
        assert!(Instant::now() < deadline, "{items} of 2 spends in a batch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    wait_for_lock_waiters(&app.owner, sessions).await;
    assert_eq!(terminate_lock_waiters(&app.owner).await, sessions);
    holder.commit().await.unwrap();
    let mut keys = Vec::new();
    while let Some(done) = spends.join_next().await {
        let (key, keyed, response) = done.unwrap();
        assert_unavailable(&response, &key);
        if keyed {
            keys.push(key);
        }
    }
    assert_eq!(app.balance(user.id).await, 100, "nothing was applied");
    for key in &keys {
        let retry = app
            .post_with_key("/v1/credits/spend", &user.token, key, spend(key))
            .await;
        assert_eq!(retry.status, 201, "{key}: {:?}", retry.body);
        assert!(!retry.headers.contains_key("idempotent-replayed"));
    }
    assert_eq!(app.balance(user.id).await, 94);
    assert_eq!(spend_rows(&app.owner).await, (6, 6));

    // A paid checkout waits on the same row; its session is killed: 503, nothing recorded, and
    // Stripe's next delivery grants once.
    let pack = new_pack(&app, 100, "price_faults").await;
    let session = format!("cs_test_{}", Uuid::new_v4().simple());
    let object = checkout_session(
        &session,
        user.id,
        pack,
        100,
        &format!("pi_{}", Uuid::new_v4().simple()),
        "paid",
    );
    let delivery = event(&event_id(), "checkout.session.completed", object);
    let holder = hold_profile(&app.owner, user.id).await;
    let first = {
        let (app, delivery) = (app.clone(), delivery.clone());
        tokio::spawn(async move { app.webhook(&delivery).await })
    };
    wait_for_lock_waiters(&app.owner, 1).await;
    assert_eq!(terminate_lock_waiters(&app.owner).await, 1);
    holder.commit().await.unwrap();
    assert_unavailable(
        &first.await.unwrap(),
        "the webhook whose session was killed",
    );
    assert_eq!(app.balance(user.id).await, 94, "nothing granted yet");

    let again = app.webhook(&delivery).await;
    assert_eq!(
        (again.status.as_u16(), again.body["duplicate"].clone()),
        (200, json!(false)),
        "{:?}",
        again.body
    );
    let once_more = app.webhook(&delivery).await;
    assert_eq!(once_more.body["duplicate"], true);
    assert_eq!(app.balance(user.id).await, 194, "granted exactly once");
    let status: String =
        sqlx::query_scalar("select status from public.stripe_events where id = $1")
            .bind(delivery["id"].as_str().unwrap())
            .fetch_one(&app.owner)
            .await
            .unwrap();
    assert_eq!(status, "processed");
    assert!(ledger_holds(&connect).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_answers_200_at_once_when_the_idle_pooled_connections_were_killed() {
    let cluster = cluster();
    let connect = cluster.migrated_database().await;
    let mut config = test_config();
    config.database_max_connections = 4;
    let app = TestApp::with_config(connect.clone(), config).await;
    // Open every connection of the pool, then leave them idle.
    let held: Vec<_> = futures_acquire(&app.state.pool, 4).await;
    drop(held);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(app.state.pool.num_idle(), 4);

    let mut killer = PgConnection::connect_with(&connect).await.unwrap();
    sqlx::query(
        "select pg_terminate_backend(pid) from pg_stat_activity
          where datname = current_database() and pid <> pg_backend_pid()",
    )
    .execute(&mut killer)
    .await
    .unwrap();

    let health = app.get("/health", None).await;
    assert_eq!(health.status, 200);
    let ready = app.get("/ready", None).await;
    assert_eq!(ready.status, 200, "{:?}", ready.body);
    let user = app.user().await;
    app.grant(user.id, 5).await;
    let spent = app
        .post_with_key("/v1/credits/spend", &user.token, "after", spend("after"))
        .await;
    assert!(
        spent.status == 201 || spent.status == 503,
        "a dead connection may cost one request a 503, never a 500: {:?}",
        spent.body
    );
    killer.close().await.unwrap();
}

/// `count` connections of `pool`, held at once.
async fn futures_acquire(
    pool: &amethyst_credits::db::ServicePool,
    count: usize,
) -> Vec<amethyst_credits::db::ServiceConnection> {
    let mut held = Vec::new();
    for _ in 0..count {
        held.push(pool.acquire().await.unwrap());
    }
    held
}

// ---------------------------------------------------------------------------------------------
// Statement timeouts, serialization failures and deadlocks, on a database of the test server.

#[sqlx::test]
async fn a_statement_past_the_timeout_answers_503_and_the_pool_recovers(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let mut config = test_config();
    config.database_statement_timeout = Duration::from_millis(300);
    config.database_max_connections = 2;
    let app = TestApp::with_config(connect, config).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;

    let holder = hold_profile(&app.owner, user.id).await;
    let started = Instant::now();
    let stuck = tokio::time::timeout(
        Duration::from_secs(5),
        app.post_with_key("/v1/credits/spend", &user.token, "stuck", spend("stuck")),
    )
    .await
    .expect("the statement timeout ends the wait, not the test's patience");
    assert_unavailable(&stuck, "a spend stuck behind a lock");
    assert!(started.elapsed() < Duration::from_secs(3));
    holder.rollback().await.unwrap();

    // More requests than the pool has connections, each on a connection that may have timed
    // out before: all served.
    for i in 0..6 {
        let key = format!("after-{i}");
        let response = app
            .post_with_key("/v1/credits/spend", &user.token, &key, spend(&key))
            .await;
        assert_eq!(response.status, 201, "{key}: {:?}", response.body);
    }
    let retried = app
        .post_with_key("/v1/credits/spend", &user.token, "stuck", spend("stuck"))
        .await;
    assert_eq!(retried.status, 201, "the key of the 503 runs afresh");
    assert!(!retried.headers.contains_key("idempotent-replayed"));
    assert_eq!(app.balance(user.id).await, 3);
}

/// Makes the next `count` ledger inserts fail with `sqlstate`, as a serialization failure or a
/// deadlock would: the statement fails and the transaction is rolled back.
async fn inject_conflicts(owner: &PgPool, sqlstate: &str, count: i64) {
    for statement in [
        "create sequence public.test_conflicts".to_owned(),
        format!(
            "create function public.test_conflict() returns trigger
               language plpgsql security definer set search_path = '' as $$
             begin
               if nextval('public.test_conflicts') <= {count} then
                 raise exception 'injected conflict' using errcode = '{sqlstate}';
               end if;
               return new;
             end $$"
        ),
        "create trigger test_conflict before insert on public.credit_transactions
           for each row execute function public.test_conflict()"
            .to_owned(),
    ] {
        sqlx::query(&statement).execute(owner).await.unwrap();
    }
}

/// How many ledger inserts were attempted since [`inject_conflicts`].
async fn ledger_attempts(owner: &PgPool) -> i64 {
    sqlx::query_scalar("select last_value from public.test_conflicts")
        .fetch_one(owner)
        .await
        .unwrap()
}

#[sqlx::test]
async fn a_spend_rolled_back_for_serialization_failures_runs_again_and_applies_once(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;
    let conflicts = i64::from(CONFLICT_ATTEMPTS) - 1;
    inject_conflicts(&app.owner, "40001", conflicts).await;

    let response = app
        .post_with_key("/v1/credits/spend", &user.token, "busy", spend("busy"))
        .await;
    assert_eq!(response.status, 201, "{:?}", response.body);
    assert_eq!(ledger_attempts(&app.owner).await, conflicts + 1);
    assert_eq!(app.balance(user.id).await, 9);
    assert_eq!(spend_rows(&app.owner).await, (1, 1));
    let replay = app
        .post_with_key("/v1/credits/spend", &user.token, "busy", spend("busy"))
        .await;
    assert_eq!(replay.body, response.body);
    assert!(replay.headers.contains_key("idempotent-replayed"));

    // Without a key, the single statement runs again just the same.
    let unkeyed = app
        .post("/v1/credits/spend", Some(&user.token), spend("unkeyed"))
        .await;
    assert_eq!(unkeyed.status, 201);
    assert_eq!(app.balance(user.id).await, 8);
}

#[sqlx::test]
async fn deadlocks_past_the_bound_answer_503_and_apply_nothing(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;
    inject_conflicts(&app.owner, "40P01", i64::from(CONFLICT_ATTEMPTS)).await;

    let response = app
        .post_with_key("/v1/credits/spend", &user.token, "stuck", spend("stuck"))
        .await;
    assert_unavailable(&response, "a spend that deadlocks every time");
    assert_eq!(
        ledger_attempts(&app.owner).await,
        i64::from(CONFLICT_ATTEMPTS)
    );
    assert_eq!(app.balance(user.id).await, 10);
    let keys: i64 = sqlx::query_scalar("select count(*) from public.idempotency_keys")
        .fetch_one(&app.owner)
        .await
        .unwrap();
    assert_eq!(keys, 0, "the key is free for the retry");
    let retried = app
        .post_with_key("/v1/credits/spend", &user.token, "stuck", spend("stuck"))
        .await;
    assert_eq!(retried.status, 201);
    assert_eq!(app.balance(user.id).await, 9);
}

#[sqlx::test]
async fn a_webhook_rolled_back_for_a_deadlock_runs_again_and_grants_once(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let stripe = FakeStripe::start().await;
    let app = TestApp::with_config(connect, stripe_config(&stripe.url)).await;
    let user = app.user().await;
    let pack = new_pack(&app, 100, "price_deadlock").await;
    inject_conflicts(&app.owner, "40P01", 1).await;
    let session = format!("cs_test_{}", Uuid::new_v4().simple());
    let object = checkout_session(
        &session,
        user.id,
        pack,
        100,
        &format!("pi_{}", Uuid::new_v4().simple()),
        "paid",
    );
    let delivery = event(&event_id(), "checkout.session.completed", object);

    let response = app.webhook(&delivery).await;
    assert_eq!(response.status, 200, "{:?}", response.body);
    assert_eq!(response.body["duplicate"], false);
    assert_eq!(ledger_attempts(&app.owner).await, 2);
    assert_eq!(app.balance(user.id).await, 100);
    let (status, attempts): (String, i32) =
        sqlx::query_as("select status, attempts from public.stripe_events where id = $1")
            .bind(delivery["id"].as_str().unwrap())
            .fetch_one(&app.owner)
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempts), ("processed", 1));
    assert_eq!(app.webhook(&delivery).await.body["duplicate"], true);
    assert_eq!(app.balance(user.id).await, 100);
}
