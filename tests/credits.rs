mod common;

use common::{TestApp, all_at_once};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::sync::Arc;

#[sqlx::test]
async fn spending_takes_credits_and_records_the_transaction(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;

    let spent = app
        .post(
            "/v1/credits/spend",
            Some(&user.token),
            json!({"amount": 3, "description": "Image", "reference": "img_1"}),
        )
        .await;

    assert_eq!(spent.status, 201, "{:?}", spent.body);
    assert_eq!(spent.body["balance"], 7);
    let tx = &spent.body["transaction"];
    assert_eq!(tx["amount"], -3);
    assert_eq!(tx["balance_after"], 7);
    assert_eq!(tx["source"], "spend");
    assert_eq!(tx["description"], "Image");
    assert_eq!(tx["reference"], "img_1");
    assert_eq!(app.balance(user.id).await, 7);
    // The answer is the row the spend wrote.
    let written: uuid::Uuid = sqlx::query_scalar(
        "select id from public.credit_transactions where user_id = $1 and source = 'spend'",
    )
    .bind(user.id)
    .fetch_one(&app.owner)
    .await
    .unwrap();
    assert_eq!(tx["id"], written.to_string());
}

#[sqlx::test]
async fn spending_more_than_the_balance_is_refused_and_changes_nothing(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 5).await;

    let refused = app
        .post("/v1/credits/spend", Some(&user.token), json!({"amount": 6}))
        .await;

    assert_eq!(refused.status, 402);
    assert_eq!(refused.code(), "insufficient_credits");
    assert_eq!(refused.headers["content-type"], "application/problem+json");
    assert_eq!(app.balance(user.id).await, 5);
    assert_eq!(
        app.count(
            "select count(*) from public.credit_transactions where user_id = $1",
            user.id
        )
        .await,
        1
    );
}

#[sqlx::test]
async fn concurrent_spends_never_overdraw_the_balance(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 50).await;
    let server = Arc::new(app.serve());
    let token = Arc::new(user.token.clone());

    // 20 spends of 7 race over 50 credits: floor(50 / 7) = 7 can succeed.
    let results = all_at_once(20, |_| {
        let server = server.clone();
        let token = token.clone();
        async move {
            server
                .post("/v1/credits/spend", &token, None, &json!({"amount": 7}))
                .await
        }
    })
    .await;

    let succeeded = results.iter().filter(|(s, _)| *s == 201).count();
    let refused = results
        .iter()
        .filter(|(s, b)| *s == 402 && b["code"] == "insufficient_credits")
        .count();
    assert_eq!((succeeded, refused), (7, 13), "{results:?}");
    assert_eq!(app.balance(user.id).await, 1);
    let mut balances: Vec<i64> = results
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, b)| b["balance"].as_i64().unwrap())
        .collect();
    balances.sort();
    assert_eq!(
        balances,
        vec![1, 8, 15, 22, 29, 36, 43],
        "each success saw its own balance"
    );
    // The ledger holds the grant and exactly the seven spends, in the order their balances
    // were computed.
    let ledger: Vec<(i32, i32)> = sqlx::query_as(
        "select amount, balance_after from public.credit_transactions where user_id = $1 order by seq",
    )
    .bind(user.id)
    .fetch_all(&app.owner)
    .await
    .unwrap();
    assert_eq!(
        ledger,
        vec![
            (50, 50),
            (-7, 43),
            (-7, 36),
            (-7, 29),
            (-7, 22),
            (-7, 15),
            (-7, 8),
            (-7, 1)
        ]
    );
}

#[sqlx::test]
async fn a_replayed_spend_answers_the_same_and_applies_once(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;
    let body = json!({"amount": 4, "description": "Upscale"});

    let first = app
        .post_with_key("/v1/credits/spend", &user.token, "spend-1", body.clone())
        .await;
    // Same request, keys in another order: still the same request.
    let again = app
        .post_with_key(
            "/v1/credits/spend",
            &user.token,
            "spend-1",
            json!({"description": "Upscale", "amount": 4}),
        )
        .await;

    assert_eq!(first.status, 201);
    assert!(first.headers.get("idempotent-replayed").is_none());
    assert_eq!(again.status, 201);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body, first.body);
    assert_eq!(app.balance(user.id).await, 6);
}

#[sqlx::test]
async fn an_idempotency_key_reused_with_another_body_is_refused(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;

    let first = app
        .post_with_key("/v1/credits/spend", &user.token, "k", json!({"amount": 1}))
        .await;
    let other = app
        .post_with_key("/v1/credits/spend", &user.token, "k", json!({"amount": 2}))
        .await;

    assert_eq!(first.status, 201);
    assert_eq!(other.status, 422);
    assert_eq!(other.code(), "idempotency_key_reused");
    assert_eq!(app.balance(user.id).await, 9);
}

#[sqlx::test]
async fn idempotency_keys_belong_to_their_caller(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect).await;
    let alice = app.user().await;
    let bob = app.user().await;
    app.grant(alice.id, 10).await;
    app.grant(bob.id, 10).await;

    let a = app
        .post_with_key(
            "/v1/credits/spend",
            &alice.token,
            "same",
            json!({"amount": 1}),
        )
        .await;
    let b = app
        .post_with_key(
            "/v1/credits/spend",
            &bob.token,
            "same",
            json!({"amount": 1}),
        )
        .await;

    assert_eq!(
        (a.status, b.status),
        (
            axum::http::StatusCode::CREATED,
            axum::http::StatusCode::CREATED
        )
    );
    assert!(b.headers.get("idempotent-replayed").is_none());
    assert_eq!(
        (app.balance(alice.id).await, app.balance(bob.id).await),
        (9, 9)
    );
}

#[sqlx::test]
async fn ten_concurrent_requests_with_one_key_apply_once(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 100).await;
    let server = Arc::new(app.serve());
    let token = Arc::new(user.token.clone());

    let results = all_at_once(10, |_| {
        let server = server.clone();
        let token = token.clone();
        async move {
            server
                .post(
                    "/v1/credits/spend",
                    &token,
                    Some("race-key"),
                    &json!({"amount": 5}),
                )
                .await
        }
    })
    .await;

    assert!(results.iter().all(|(s, _)| *s == 201), "{results:?}");
    let first: &Value = &results[0].1;
    assert!(
        results.iter().all(|(_, b)| b == first),
        "every answer is the first answer"
    );
    assert_eq!(app.balance(user.id).await, 95);
    assert_eq!(
        app.count("select count(*) from public.credit_transactions where user_id = $1 and source = 'spend'", user.id).await,
        1
    );
}

#[sqlx::test]
async fn a_refused_spend_is_not_remembered_under_its_key(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;

    let refused = app
        .post_with_key(
            "/v1/credits/spend",
            &user.token,
            "retry-me",
            json!({"amount": 5}),
        )
        .await;
    assert_eq!(refused.status, 402);
    app.grant(user.id, 5).await;
    let retried = app
        .post_with_key(
            "/v1/credits/spend",
            &user.token,
            "retry-me",
            json!({"amount": 5}),
        )
        .await;

    assert_eq!(retried.status, 201);
    assert_eq!(app.balance(user.id).await, 0);
}

#[sqlx::test]
async fn history_pages_newest_first_with_an_opaque_cursor(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let other = app.user().await;
    app.grant(other.id, 99).await;
    for amount in 1..=5 {
        app.grant(user.id, amount).await;
    }

    let first = app
        .get("/v1/me/transactions?limit=2", Some(&user.token))
        .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let amounts = |r: &common::TestResponse| -> Vec<i64> {
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["amount"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(amounts(&first), vec![5, 4]);
    assert_eq!(first.body["items"][0]["balance_after"], 15);
    let cursor = first.body["next_cursor"].as_str().unwrap().to_owned();

    let second = app
        .get(
            &format!("/v1/me/transactions?limit=2&cursor={cursor}"),
            Some(&user.token),
        )
        .await;
    assert_eq!(amounts(&second), vec![3, 2]);
    let cursor = second.body["next_cursor"].as_str().unwrap().to_owned();

    let last = app
        .get(
            &format!("/v1/me/transactions?limit=2&cursor={cursor}"),
            Some(&user.token),
        )
        .await;
    assert_eq!(amounts(&last), vec![1]);
    assert_eq!(last.body["next_cursor"], Value::Null);

    let all = app.get("/v1/me/transactions", Some(&user.token)).await;
    assert_eq!(
        amounts(&all),
        vec![5, 4, 3, 2, 1],
        "the other user's grant is not visible"
    );
}
