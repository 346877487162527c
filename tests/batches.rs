//! Requests that arrive together share a round trip (src/batch.rs): spends without an
//! Idempotency-Key and profile reads. Each keeps its own answer, a refusal stays that
//! request's alone, and the ledger adds up.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{TestApp, all_at_once, test_config, user_token, wait_for_lock_waiters};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

/// An app whose pool has two connections: requests beyond two at a time queue, and batch.
async fn two_connections(connect: PgConnectOptions) -> Arc<TestApp> {
    let mut config = test_config();
    config.database_max_connections = 2;
    Arc::new(TestApp::with_config(connect, config).await)
}

#[sqlx::test]
async fn spends_that_arrive_together_share_a_commit_and_keep_their_own_answers(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = two_connections(connect).await;
    let rich = app.user().await;
    let poor = app.user().await;
    app.grant(rich.id, 1000).await;
    app.grant(poor.id, 10).await;
    // A valid token for a user the database has never seen.
    let ghost = user_token(Uuid::new_v4(), "ghost@example.com");

    // 30 spends of 3 by one user, 20 of 1 by a user with 10, 10 by nobody, all at once.
    let who = |i: usize| match i % 6 {
        0..=2 => ("rich", rich.token.clone(), 3),
        3 | 4 => ("poor", poor.token.clone(), 1),
        _ => ("ghost", ghost.clone(), 1),
    };
    let results = all_at_once(60, |i| {
        let app = app.clone();
        let (name, token, amount) = who(i);
        async move {
            let response = app
                .post("/v1/credits/spend", Some(&token), json!({"amount": amount}))
                .await;
            (name, response.status.as_u16(), response.body)
        }
    })
    .await;

    let mut outcomes: HashMap<(&str, u16, String), usize> = HashMap::new();
    for (name, status, body) in &results {
        let code = body["code"].as_str().unwrap_or("").to_owned();
        *outcomes.entry((*name, *status, code)).or_default() += 1;
    }
    let expected: HashMap<(&str, u16, String), usize> = [
        (("rich", 201, String::new()), 30),
        (("poor", 201, String::new()), 10),
        (("poor", 402, "insufficient_credits".to_owned()), 10),
        (("ghost", 404, "profile_not_found".to_owned()), 10),
    ]
    .into_iter()
    .collect();
    assert_eq!(outcomes, expected, "{results:?}");

    // Each success answered with its own place in its user's ledger.
    let mut rich_balances: Vec<i64> = results
        .iter()
        .filter(|(name, status, _)| *name == "rich" && *status == 201)
        .map(|(_, _, body)| body["balance"].as_i64().unwrap())
        .collect();
    rich_balances.sort();
    let expected_rich: Vec<i64> = (0..30).map(|k| 910 + 3 * k).collect();
    assert_eq!(rich_balances, expected_rich);
    let mut poor_balances: Vec<i64> = results
        .iter()
        .filter(|(name, status, _)| *name == "poor" && *status == 201)
        .map(|(_, _, body)| body["balance"].as_i64().unwrap())
        .collect();
    poor_balances.sort();
    assert_eq!(poor_balances, (0..10).collect::<Vec<i64>>());
    assert_eq!(app.balance(rich.id).await, 910);
    assert_eq!(app.balance(poor.id).await, 0);

    // Spends shared transactions (one `now()` each), and the refused ones left no trace.
    let (rows, transactions): (i64, i64) = sqlx::query_as(
        "select count(*), count(distinct created_at)
           from public.credit_transactions where source = 'spend'",
    )
    .fetch_one(&app.owner)
    .await
    .unwrap();
    assert_eq!(rows, 40);
    assert!(
        transactions < rows,
        "{transactions} commits for {rows} spends"
    );
    let (batches, items) = app.state.batches.counts("spend");
    assert!(batches < items, "{batches} batches for {items} spends");

    let mut conn = sqlx::Connection::connect_with(&app.connect).await.unwrap();
    let report = amethyst_credits::verify::run(&mut conn).await.unwrap();
    assert!(report.passed(), "{report}");
}

#[sqlx::test]
async fn profile_reads_that_arrive_together_each_get_their_own_profile(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = two_connections(connect).await;
    let mut users = Vec::new();
    for k in 1..=8 {
        let user = app.user().await;
        app.grant(user.id, 10 * k).await;
        users.push((user.id, user.token, 10 * k));
    }
    let users = Arc::new(users);
    let ghost = Arc::new(user_token(Uuid::new_v4(), "ghost@example.com"));

    let results = all_at_once(72, |i| {
        let app = app.clone();
        let users = users.clone();
        let ghost = ghost.clone();
        async move {
            if i % 9 == 8 {
                let response = app.get("/v1/me", Some(&ghost)).await;
                return (None, response.status.as_u16(), response.body);
            }
            let (id, token, credits) = &users[i % 9];
            let response = app.get("/v1/me", Some(token)).await;
            (
                Some((*id, *credits)),
                response.status.as_u16(),
                response.body,
            )
        }
    })
    .await;

    for (expected, status, body) in &results {
        match expected {
            Some((id, credits)) => {
                assert_eq!(*status, 200, "{body}");
                assert_eq!(body["id"], json!(id), "{body}");
                assert_eq!(body["credits"], json!(credits), "{body}");
                assert_eq!(body["balance"]["available"], json!(credits), "{body}");
            }
            None => {
                assert_eq!(*status, 404, "{body}");
                assert_eq!(body["code"], "profile_not_found", "{body}");
            }
        }
    }
    let (batches, items) = app.state.batches.counts("profile_read");
    assert_eq!(items, 72);
    assert!(batches < items, "{batches} batches for {items} reads");
}

#[sqlx::test]
async fn spends_stuck_behind_a_row_lock_do_not_hold_up_the_others(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = Arc::new(TestApp::new(pool, connect).await);
    let mut users = Vec::new();
    for _ in 0..7 {
        let user = app.user().await;
        app.grant(user.id, 10).await;
        users.push(user);
    }

    // Two users' rows are locked elsewhere; a spend of each waits, in a batch of its own.
    let mut holders = Vec::new();
    let mut stuck = Vec::new();
    for (n, user) in users[..2].iter().enumerate() {
        let mut holder = app.owner.begin().await.unwrap();
        sqlx::query("select 1 from public.profiles where id = $1 for update")
            .bind(user.id)
            .execute(&mut *holder)
            .await
            .unwrap();
        holders.push(holder);
        let (server, token) = (app.clone(), user.token.clone());
        stuck.push(tokio::spawn(async move {
            server
                .post("/v1/credits/spend", Some(&token), json!({"amount": 1}))
                .await
        }));
        wait_for_lock_waiters(&app.owner, n as i64 + 1).await;
    }

    // The others' spends are answered while those two still wait.
    let tokens: Vec<String> = users[2..].iter().map(|u| u.token.clone()).collect();
    let others = all_at_once(5, |i| {
        let (app, token) = (app.clone(), tokens[i].clone());
        async move {
            app.post("/v1/credits/spend", Some(&token), json!({"amount": 1}))
                .await
        }
    });
    let others = tokio::time::timeout(Duration::from_secs(10), others)
        .await
        .expect("spends of other users are not held up by the waiting ones");
    for response in &others {
        assert_eq!(response.status, 201, "{:?}", response.body);
    }

    for holder in holders {
        holder.rollback().await.unwrap();
    }
    for spend in stuck {
        let response = spend.await.unwrap();
        assert_eq!(response.status, 201, "{:?}", response.body);
    }
    for user in &users {
        assert_eq!(app.balance(user.id).await, 9);
    }
}
