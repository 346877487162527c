//! Several replicas behind a transaction-mode pooler: three `serve` processes on one database,
//! all through one PgBouncer in transaction mode (`DATABASE_POOL_MODE=transaction`, migrations
//! on `DATABASE_DIRECT_URL`), fewer server connections than client connections, so that
//! consecutive transactions of one client connection run on different server connections.
//! Exactly-once and the ledger hold across them, and `verify` passes after; the pool itself
//! leaves nothing on the pooler's connections. Also: readiness while draining on SIGTERM.

mod common;

use std::collections::BTreeMap;

use amethyst_credits::config::PoolMode;
use amethyst_credits::db::{self, ServicePool};
use common::binary::{Binary, Database};
use common::pgbouncer::PgBouncer;
use common::stripe::{WEBHOOK_SECRET, checkout_session, event, event_id, signature_header};
use common::{TestUser, all_at_once, service_role_key, user_token};
use serde_json::{Value, json};
use sqlx::{Connection, PgPool};
use uuid::Uuid;

/// Server connections PgBouncer opens to the database, for all three replicas together (each
/// has up to 8 client connections).
const SERVER_CONNECTIONS: u32 = 4;

fn tests_database_url() -> String {
    std::env::var("DATABASE_URL").expect("DATABASE_URL is set for the tests")
}

/// PgBouncer, a migrated database and three replicas on it through PgBouncer. Fields drop in
/// order: the replicas stop first, the database goes last.
struct Replicas {
    replicas: Vec<Binary>,
    /// The owner, connected directly (not through PgBouncer).
    owner: PgPool,
    _bouncer: PgBouncer,
    database: Database,
}

impl Replicas {
    /// `None` when PgBouncer is missing outside CI (`CI=true` fails instead).
    async fn start() -> Option<Replicas> {
        let bouncer = PgBouncer::start(&tests_database_url(), SERVER_CONNECTIONS)?;
        let database = Database::fresh();
        database.migrate();
        let through_pooler = bouncer.url_of(&database.url);
        let mut replicas = Vec::new();
        for _ in 0..3 {
            let env = [
                ("DATABASE_DIRECT_URL", database.url.as_str()),
                ("DATABASE_POOL_MODE", "transaction"),
                ("DATABASE_MAX_CONNECTIONS", "8"),
                ("ADS_VERIFICATION", "client"),
                ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET),
            ];
            replicas.push(Binary::serve_on(Database::attached(&through_pooler), &env).await);
        }
        let owner = database.owner().await;
        Some(Replicas {
            replicas,
            owner,
            _bouncer: bouncer,
            database,
        })
    }

    /// Signs a user up the way Supabase Auth does (a row in auth.users).
    async fn user(&self) -> TestUser {
        let id = Uuid::new_v4();
        let email = format!("user-{}@example.com", &id.to_string()[..8]);
        sqlx::query("insert into auth.users (id, email) values ($1, $2)")
            .bind(id)
            .bind(&email)
            .execute(&self.owner)
            .await
            .unwrap();
        TestUser {
            id,
            token: user_token(id, &email),
            email,
        }
    }

    async fn grant(&self, user: Uuid, amount: i32) {
        sqlx::query("select public.add_credits($1, $2, 'system', 'test grant')")
            .bind(user)
            .bind(amount)
            .execute(&self.owner)
            .await
            .unwrap();
    }

    async fn balance(&self, user: Uuid) -> i32 {
        sqlx::query_scalar("select credits from public.profiles where id = $1")
            .bind(user)
            .fetch_one(&self.owner)
            .await
            .unwrap()
    }

    /// `count` POSTs of `body` at once, request `i` to replica `i % 3`: (status, code or
    /// replay header, body) of each.
    async fn post_spread(
        &self,
        count: usize,
        path: &str,
        token: &str,
        key: Option<&str>,
        body: Value,
    ) -> Vec<(u16, bool, Value)> {
        let requests: Vec<reqwest::RequestBuilder> = (0..count)
            .map(|i| {
                let request = self.replicas[i % 3]
                    .request(reqwest::Method::POST, path)
                    .bearer_auth(token)
                    .json(&body);
                match key {
                    Some(key) => request.header("Idempotency-Key", key),
                    None => request,
                }
            })
            .collect();
        let requests = std::sync::Mutex::new(requests.into_iter().map(Some).collect::<Vec<_>>());
        all_at_once(count, |i| {
            let request = requests.lock().unwrap()[i].take().unwrap();
            async move {
                let response = request.send().await.expect("the replica answers");
                let status = response.status().as_u16();
                let replayed = response.headers().contains_key("idempotent-replayed");
                let body: Value = response.json().await.unwrap_or(Value::Null);
                (status, replayed, body)
            }
        })
        .await
    }

    /// The ledger invariant for every profile, and `verify` on the database (directly).
    async fn assert_ledger_and_verify(&self) {
        let off: i64 = sqlx::query_scalar(
            "select count(*) from public.profiles p
              where p.credits <> coalesce((select sum(t.amount) from public.credit_transactions t
                                           where t.user_id = p.id), 0)",
        )
        .fetch_one(&self.owner)
        .await
        .unwrap();
        assert_eq!(
            off, 0,
            "profiles whose balance is not the sum of their ledger"
        );
        let verify = self.database.verb(&["verify"]);
        assert!(
            verify.status.success(),
            "verify: {}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );
    }
}

/// Answers by status, for the assertion messages and the figures.
fn by_status(results: &[(u16, bool, Value)]) -> BTreeMap<u16, usize> {
    let mut counts = BTreeMap::new();
    for (status, _, _) in results {
        *counts.entry(*status).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn concurrent_spends_of_one_user_spread_over_three_replicas_never_overdraw() {
    let Some(cluster) = Replicas::start().await else {
        return;
    };
    let user = cluster.user().await;
    cluster.grant(user.id, 60).await;

    let results = cluster
        .post_spread(
            90,
            "/v1/credits/spend",
            &user.token,
            None,
            json!({"amount": 1, "description": "Image"}),
        )
        .await;

    let statuses = by_status(&results);
    eprintln!("90 spends of 1 credit (60 held) over 3 replicas: {statuses:?}");
    assert_eq!(
        statuses,
        BTreeMap::from([(201, 60), (402, 30)]),
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .filter(|(s, _, _)| *s == 402)
            .all(|(_, _, b)| b["code"] == "insufficient_credits")
    );
    assert_eq!(cluster.balance(user.id).await, 0);
    cluster.assert_ledger_and_verify().await;
}

#[tokio::test]
async fn one_idempotency_key_raced_on_three_replicas_spends_once() {
    let Some(cluster) = Replicas::start().await else {
        return;
    };
    let user = cluster.user().await;
    cluster.grant(user.id, 10).await;

    let results = cluster
        .post_spread(
            12,
            "/v1/credits/spend",
            &user.token,
            Some("img-raced"),
            json!({"amount": 3, "description": "Image", "reference": "img-raced"}),
        )
        .await;

    eprintln!(
        "12 spends with one Idempotency-Key over 3 replicas: {:?}",
        by_status(&results)
    );
    assert!(results.iter().all(|(s, _, _)| *s == 201), "{results:?}");
    let ids: std::collections::HashSet<_> = results
        .iter()
        .map(|(_, _, b)| b["transaction"]["id"].clone())
        .collect();
    assert_eq!(ids.len(), 1, "one transaction answered to all: {results:?}");
    let first = results.iter().filter(|(_, replayed, _)| !replayed).count();
    assert_eq!(first, 1, "exactly one answer is not a replay");
    assert_eq!(cluster.balance(user.id).await, 7);
    cluster.assert_ledger_and_verify().await;
}

#[tokio::test]
async fn one_stripe_event_delivered_to_three_replicas_at_once_grants_once() {
    let Some(cluster) = Replicas::start().await else {
        return;
    };
    let user = cluster.user().await;
    let pack = Uuid::new_v4();
    let created = cluster.replicas[0]
        .request(
            reqwest::Method::PUT,
            &format!("/v1/admin/credit-packs/{pack}"),
        )
        .bearer_auth(service_role_key())
        .json(
            &json!({"name": "100 credits", "credits": 100, "kind": "one_time",
                      "stripe_price_id": "price_100", "unit_amount": 999, "currency": "usd",
                      "active": true}),
        )
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{:?}", created.text().await);
    let session = format!("cs_test_{}", Uuid::new_v4().simple());
    let object = checkout_session(&session, user.id, pack, 100, "pi_raced", "paid");
    let body = event(&event_id(), "checkout.session.completed", object).to_string();
    let signature = signature_header(&body);

    let deliveries: Vec<_> = (0..9)
        .map(|i| {
            cluster.replicas[i % 3]
                .request(reqwest::Method::POST, "/v1/webhooks/stripe")
                .header("Stripe-Signature", &signature)
                .header("Content-Type", "application/json")
                .body(body.clone())
        })
        .collect();
    let deliveries = std::sync::Mutex::new(deliveries.into_iter().map(Some).collect::<Vec<_>>());
    let results = all_at_once(9, |i| {
        let delivery = deliveries.lock().unwrap()[i].take().unwrap();
        async move {
            let response = delivery.send().await.expect("the replica answers");
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    })
    .await;

    eprintln!("one Stripe event delivered 9 times at once over 3 replicas: {results:?}");
    assert!(results.iter().all(|(s, _)| *s == 200), "{results:?}");
    let firsts = results
        .iter()
        .filter(|(_, b)| b["duplicate"] == false)
        .count();
    assert_eq!(firsts, 1, "exactly one delivery is not a duplicate");
    assert_eq!(cluster.balance(user.id).await, 100);
    let rows: i64 = sqlx::query_scalar(
        "select count(*) from public.credit_transactions where user_id = $1 and source = 'stripe'",
    )
    .bind(user.id)
    .fetch_one(&cluster.owner)
    .await
    .unwrap();
    assert_eq!(rows, 1, "one ledger row");
    cluster.assert_ledger_and_verify().await;
}

#[tokio::test]
async fn the_daily_ad_limit_holds_across_three_replicas() {
    let Some(cluster) = Replicas::start().await else {
        return;
    };
    let user = cluster.user().await;

    let results = cluster
        .post_spread(
            30,
            "/v1/ads/views",
            &user.token,
            None,
            json!({"duration_seconds": 30}),
        )
        .await;

    let statuses = by_status(&results);
    eprintln!("30 rewarded ad views at once over 3 replicas: {statuses:?}");
    assert_eq!(
        statuses,
        BTreeMap::from([(201, 10), (429, 20)]),
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .filter(|(s, _, _)| *s == 429)
            .all(|(_, _, b)| b["code"] == "daily_ad_limit_reached")
    );
    let paid: i64 = results
        .iter()
        .filter(|(s, _, _)| *s == 201)
        .map(|(_, _, b)| b["credits_awarded"].as_i64().unwrap())
        .sum();
    assert_eq!(i64::from(cluster.balance(user.id).await), paid);
    cluster.assert_ledger_and_verify().await;
}

/// A pool of the service in `mode` through `bouncer`, to the database of `database`.
async fn service_pool(bouncer: &PgBouncer, database: &Database, mode: PoolMode) -> ServicePool {
    let options = db::connect_options(&bouncer.url_of(&database.url)).unwrap();
    let timeout = std::time::Duration::from_secs(7);
    db::connect_in_mode(options, 6, timeout, mode)
        .await
        .unwrap()
}

#[tokio::test]
async fn in_transaction_mode_the_role_and_time_limit_hold_and_neither_stays_on_the_pooler() {
    // One server connection: whatever a client leaves on it, the next client finds.
    let Some(bouncer) = PgBouncer::start(&tests_database_url(), 1) else {
        return;
    };
    let database = Database::fresh();
    database.migrate();
    let service = service_pool(&bouncer, &database, PoolMode::Transaction).await;

    // The simple query protocol throughout: no prepared statement, only the session state.
    use sqlx::Row;
    let row = sqlx::raw_sql("select current_user::text, current_setting('statement_timeout')")
        .fetch_one(&service)
        .await
        .unwrap();
    assert_eq!(
        (row.get::<String, _>(0), row.get::<String, _>(1)),
        ("service_role".to_owned(), "7s".to_owned())
    );
    // A transaction of the service, as the keyed routes take.
    let mut tx = service.begin().await.unwrap();
    let row = sqlx::raw_sql("select current_user::text")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(row.get::<String, _>(0), "service_role");
    tx.commit().await.unwrap();

    // Another client of the pooler, on the same server connection, finds it as it was.
    let mut other = sqlx::PgConnection::connect(&bouncer.url_of(&database.url))
        .await
        .unwrap();
    let found = sqlx::raw_sql("select current_user::text, current_setting('statement_timeout')")
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert_eq!(
        (found.get::<String, _>(0), found.get::<String, _>(1)),
        ("postgres".to_owned(), "0".to_owned()),
        "the role or the time limit of the service stayed on the server connection"
    );
    other.close().await.unwrap();
    service.close().await;
}

#[tokio::test]
async fn in_transaction_mode_many_clients_share_few_server_connections_without_statement_errors() {
    let Some(bouncer) = PgBouncer::start(&tests_database_url(), 2) else {
        return;
    };
    let database = Database::fresh();
    database.migrate();
    // Two processes' pools (twelve client connections) on two server connections.
    let pools = [
        service_pool(&bouncer, &database, PoolMode::Transaction).await,
        service_pool(&bouncer, &database, PoolMode::Transaction).await,
    ];

    let results = all_at_once(240, |i| {
        let pool = pools[i % 2].clone();
        async move {
            let n = i as i64;
            // Four statements, each with parameters: prepared, bound and executed.
            match i % 4 {
                0 => sqlx::query_scalar::<_, i64>("select $1::bigint + 1")
                    .bind(n)
                    .fetch_one(&pool)
                    .await
                    .map(|v| (v, n + 1)),
                1 => sqlx::query_scalar::<_, i64>("select $1::bigint * 2")
                    .bind(n)
                    .fetch_one(&pool)
                    .await
                    .map(|v| (v, n * 2)),
                2 => sqlx::query_scalar::<_, i64>(
                    "select count(*) from generate_series(1, $1::bigint)",
                )
                .bind(n)
                .fetch_one(&pool)
                .await
                .map(|v| (v, n)),
                _ => sqlx::query_scalar::<_, i64>("select $1::bigint - $2::bigint")
                    .bind(n)
                    .bind(1_i64)
                    .fetch_one(&pool)
                    .await
                    .map(|v| (v, n - 1)),
            }
        }
    })
    .await;

    let failures: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(
        results
            .iter()
            .flatten()
            .all(|(got, expected)| got == expected)
    );
    for pool in pools {
        pool.close().await;
    }
}

#[tokio::test]
async fn readiness_answers_503_while_draining_after_sigterm_and_requests_are_still_served() {
    let server = Binary::serve(&[("SHUTDOWN_DRAIN_SECONDS", "60")]).await;
    let user = server.user().await;
    let get = |path: &str, token: Option<&str>| {
        let request = server.request(reqwest::Method::GET, path);
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        async move {
            let response = request.send().await.expect("the server still answers");
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    assert_eq!(get("/ready", None).await.0, 200);

    server.send_sigterm();
    // The signal is handled asynchronously: readiness turns within the drain period, and the
    // server answers throughout it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let draining = loop {
        let (status, body) = get("/ready", None).await;
        if status == 503 {
            break body;
        }
        assert_eq!(status, 200);
        assert!(
            std::time::Instant::now() < deadline,
            "/ready never answered 503 after SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(draining, json!({"status": "draining"}));
    assert_eq!(
        get("/health", None).await.0,
        200,
        "liveness holds while draining"
    );
    assert_eq!(
        get("/v1/me", Some(&user.token)).await.0,
        200,
        "requests are still served while draining"
    );
}
