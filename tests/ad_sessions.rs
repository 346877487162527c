//! Ad sessions in the default `session` mode: the server's clock measures the view, and a
//! session pays once. The clock is moved by moving a session's start back in the database.
mod common;

use std::sync::Arc;

use common::{TestApp, all_at_once, test_config};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

async fn open(app: &TestApp, token: &str) -> Value {
    let opened = app
        .post(
            "/v1/ads/sessions",
            Some(token),
            json!({"provider": "admob"}),
        )
        .await;
    assert_eq!(opened.status, 201, "{:?}", opened.body);
    opened.body
}

/// As if the session had opened `seconds` earlier (its lifetime moves with it).
async fn started_ago(app: &TestApp, session: &Value, seconds: i32) {
    let id: Uuid = session["id"].as_str().unwrap().parse().unwrap();
    sqlx::query(
        "update public.ad_sessions
            set started_at = started_at - make_interval(secs => $2),
                expires_at = expires_at - make_interval(secs => $2)
          where id = $1",
    )
    .bind(id)
    .bind(seconds)
    .execute(&app.owner)
    .await
    .unwrap();
}

fn complete_path(session: &Value) -> String {
    format!(
        "/v1/ads/sessions/{}/complete",
        session["id"].as_str().unwrap()
    )
}

#[sqlx::test]
async fn a_session_opens_with_the_values_the_ad_sdk_needs(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;

    let session = open(&app, &user.token).await;

    assert_eq!(session["status"], "open");
    assert_eq!(session["ssv"]["user_id"], user.id.to_string());
    assert_eq!(session["ssv"]["custom_data"], session["id"]);
    assert_eq!(session["result"], Value::Null);
    let read = app
        .get(
            &format!("/v1/ads/sessions/{}", session["id"].as_str().unwrap()),
            Some(&user.token),
        )
        .await;
    assert_eq!(read.status, 200);
    assert_eq!(read.body, session);
}

#[sqlx::test]
async fn a_session_completed_after_ten_seconds_credits_ten_seconds_whatever_it_claims(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let session = open(&app, &user.token).await;
    started_ago(&app, &session, 10).await;

    let done = app
        .post(
            &complete_path(&session),
            Some(&user.token),
            json!({"duration_seconds": 45}),
        )
        .await;

    assert_eq!(done.status, 201, "{:?}", done.body);
    assert_eq!(done.body["status"], "completed");
    assert_eq!(done.body["result"]["duration_seconds"], 10);
    assert_eq!(done.body["result"]["credits_awarded"], 0);
    assert_eq!(done.body["result"]["views_today"], 1);
    assert_eq!(app.balance(user.id).await, 0);
}

#[sqlx::test]
async fn a_session_completed_after_thirty_one_seconds_claiming_them_earns_two_credits(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let session = open(&app, &user.token).await;
    started_ago(&app, &session, 31).await;

    let done = app
        .post(
            &complete_path(&session),
            Some(&user.token),
            json!({"duration_seconds": 31}),
        )
        .await;

    assert_eq!(done.status, 201, "{:?}", done.body);
    assert_eq!(done.body["result"]["duration_seconds"], 31);
    assert_eq!(done.body["result"]["credits_awarded"], 2);
    assert_eq!(done.body["result"]["balance"], 2);
    assert_eq!(app.balance(user.id).await, 2);
}

#[sqlx::test]
async fn a_repeated_completion_answers_the_same_session_and_pays_nothing_more(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let session = open(&app, &user.token).await;
    started_ago(&app, &session, 40).await;

    let first = app
        .post(
            &complete_path(&session),
            Some(&user.token),
            json!({"duration_seconds": 35}),
        )
        .await;
    let again = app
        .post(
            &complete_path(&session),
            Some(&user.token),
            json!({"duration_seconds": 60}),
        )
        .await;

    assert_eq!((first.status.as_u16(), again.status.as_u16()), (201, 201));
    assert_eq!(again.body, first.body);
    assert_eq!(app.balance(user.id).await, 2);
    assert_eq!(
        app.count(
            "select count(*) from public.ad_views where user_id = $1",
            user.id
        )
        .await,
        1
    );
}

#[sqlx::test]
async fn twenty_concurrent_completions_of_one_session_pay_once(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let session = open(&app, &user.token).await;
    started_ago(&app, &session, 40).await;
    let server = Arc::new(app.serve());
    let token = Arc::new(user.token.clone());
    let path = Arc::new(complete_path(&session));

    let results = all_at_once(20, |_| {
        let (server, token, path) = (server.clone(), token.clone(), path.clone());
        async move {
            server
                .post(&path, &token, None, &json!({"duration_seconds": 40}))
                .await
        }
    })
    .await;

    assert!(results.iter().all(|(s, _)| *s == 201), "{results:?}");
    assert!(results.iter().all(|(_, b)| b == &results[0].1));
    assert_eq!(app.balance(user.id).await, 2);
    assert_eq!(
        app.count(
            "select count(*) from public.ad_views where user_id = $1",
            user.id
        )
        .await,
        1
    );
}

#[sqlx::test]
async fn fifteen_sessions_of_one_user_completed_concurrently_pay_exactly_ten_views(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let mut config = test_config();
    config.ads.max_open_sessions = 15;
    let app = TestApp::with_config(connect, config).await;
    let user = app.user().await;
    let mut paths = Vec::new();
    for _ in 0..15 {
        let session = open(&app, &user.token).await;
        started_ago(&app, &session, 30).await;
        paths.push(complete_path(&session));
    }
    let server = Arc::new(app.serve());
    let token = Arc::new(user.token.clone());
    let paths = Arc::new(paths);

    let results = all_at_once(15, |i| {
        let (server, token, paths) = (server.clone(), token.clone(), paths.clone());
        async move {
            server
                .post(&paths[i], &token, None, &json!({"duration_seconds": 30}))
                .await
        }
    })
    .await;

    let paid = results.iter().filter(|(s, _)| *s == 201).count();
    let refused = results
        .iter()
        .filter(|(s, b)| *s == 429 && b["code"] == "daily_ad_limit_reached")
        .count();
    assert_eq!((paid, refused), (10, 5), "{results:?}");
    assert_eq!(app.balance(user.id).await, 20);
    assert_eq!(
        app.count(
            "select count(*) from public.ad_sessions where user_id = $1 and status = 'completed'",
            user.id
        )
        .await,
        10
    );
}

#[sqlx::test]
async fn a_session_past_its_lifetime_pays_nothing_and_says_why(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let session = open(&app, &user.token).await;
    started_ago(&app, &session, 601).await;

    let late = app
        .post(
            &complete_path(&session),
            Some(&user.token),
            json!({"duration_seconds": 30}),
        )
        .await;

    assert_eq!(late.status, 410);
    assert_eq!(late.code(), "ad_session_expired");
    assert_eq!(app.balance(user.id).await, 0);
    let read = app
        .get(
            &format!("/v1/ads/sessions/{}", session["id"].as_str().unwrap()),
            Some(&user.token),
        )
        .await;
    assert_eq!(read.body["status"], "expired");
}

#[sqlx::test]
async fn a_user_may_have_only_so_many_sessions_open_and_expired_ones_do_not_count(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let first = open(&app, &user.token).await;
    open(&app, &user.token).await;
    open(&app, &user.token).await;

    let fourth = app
        .post("/v1/ads/sessions", Some(&user.token), json!({}))
        .await;
    assert_eq!(fourth.status, 409);
    assert_eq!(fourth.code(), "too_many_ad_sessions");

    started_ago(&app, &first, 601).await;
    open(&app, &user.token).await;
}

#[sqlx::test]
async fn no_session_opens_when_the_days_views_are_used_up(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    sqlx::query(
        "update public.profiles set ad_views_today = 10,
                ad_views_date = (now() at time zone 'utc')::date where id = $1",
    )
    .bind(user.id)
    .execute(&app.owner)
    .await
    .unwrap();

    let refused = app
        .post("/v1/ads/sessions", Some(&user.token), json!({}))
        .await;

    assert_eq!(refused.status, 429);
    assert_eq!(refused.code(), "daily_ad_limit_reached");
    assert!(refused.headers.contains_key("retry-after"));
}

#[sqlx::test]
async fn another_users_session_is_not_found(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect).await;
    let owner = app.user().await;
    let other = app.user().await;
    let session = open(&app, &owner.token).await;
    started_ago(&app, &session, 40).await;

    let read = app
        .get(
            &format!("/v1/ads/sessions/{}", session["id"].as_str().unwrap()),
            Some(&other.token),
        )
        .await;
    let completed = app
        .post(
            &complete_path(&session),
            Some(&other.token),
            json!({"duration_seconds": 40}),
        )
        .await;

    assert_eq!((read.status.as_u16(), read.code()), (404, "not_found"));
    assert_eq!(
        (completed.status.as_u16(), completed.code()),
        (404, "not_found")
    );
    assert_eq!(app.balance(other.id).await, 0);
    assert_eq!(app.balance(owner.id).await, 0);
}

#[sqlx::test]
async fn bad_session_requests_get_a_stable_code_and_change_nothing(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let session = open(&app, &user.token).await;
    started_ago(&app, &session, 40).await;

    for body in [
        json!({"duration_seconds": -1}),
        json!({"duration_seconds": 86_401}),
        json!({"duration_seconds": "40"}),
        json!({}),
        json!({"duration_seconds": 40, "credits": 9}),
    ] {
        let bad = app
            .post(&complete_path(&session), Some(&user.token), body.clone())
            .await;
        assert_eq!(
            (bad.status.as_u16(), bad.code()),
            (422, "validation_failed"),
            "{body}"
        );
    }
    let bad_id = app
        .post(
            "/v1/ads/sessions/not-a-uuid/complete",
            Some(&user.token),
            json!({"duration_seconds": 40}),
        )
        .await;
    assert_eq!(
        (bad_id.status.as_u16(), bad_id.code()),
        (422, "validation_failed")
    );
    let long = app
        .post(
            "/v1/ads/sessions",
            Some(&user.token),
            json!({"provider": "p".repeat(256)}),
        )
        .await;
    assert_eq!(
        (long.status.as_u16(), long.code()),
        (422, "validation_failed")
    );

    assert_eq!(app.balance(user.id).await, 0);
    assert_eq!(
        app.count(
            "select count(*) from public.ad_sessions where user_id = $1 and status = 'open'",
            user.id
        )
        .await,
        1
    );
}

#[sqlx::test]
async fn views_on_the_clients_word_need_an_ad_session_outside_client_mode(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;

    let view = app
        .post(
            "/v1/ads/views",
            Some(&user.token),
            json!({"duration_seconds": 30}),
        )
        .await;

    assert_eq!(view.status, 409);
    assert_eq!(view.code(), "ad_session_required");
    assert_eq!(app.balance(user.id).await, 0);
}

#[sqlx::test]
async fn anonymous_users_open_no_sessions(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let mut claims = common::user_claims(user.id, "");
    claims["is_anonymous"] = json!(true);
    let anonymous = common::sign_hs256(&claims, common::SECRET);

    let refused = app
        .post("/v1/ads/sessions", Some(&anonymous), json!({}))
        .await;

    assert_eq!(
        (refused.status.as_u16(), refused.code()),
        (403, "anonymous_user")
    );
}

#[sqlx::test]
async fn sessions_are_counted_in_the_metrics(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let session = open(&app, &user.token).await;
    started_ago(&app, &session, 40).await;
    app.post(
        &complete_path(&session),
        Some(&user.token),
        json!({"duration_seconds": 40}),
    )
    .await;

    let metrics = app.get("/metrics", None).await;
    let text = metrics.body.as_str().unwrap_or_default();
    for series in [
        "ad_sessions_opened_total",
        "ad_sessions_completed_total",
        "ad_sessions_rewarded_total",
    ] {
        assert!(text.contains(series), "{series} missing from {text}");
    }
}

#[sqlx::test]
async fn a_completed_session_pays_once_even_through_its_payment_function(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let session = open(&app, &user.token).await;
    started_ago(&app, &session, 31).await;
    let completed = app
        .post(
            &complete_path(&session),
            Some(&user.token),
            json!({"duration_seconds": 31}),
        )
        .await;
    assert_eq!(completed.status, 201, "{:?}", completed.body);
    assert_eq!(app.balance(user.id).await, 2);
    let id: Uuid = session["id"].as_str().unwrap().parse().unwrap();

    // The service's own role cannot call it (the functions that pay call it as its owner)…
    let refused = sqlx::query("select * from public.pay_ad_session($1)")
        .bind(id)
        .execute(&app.state.pool)
        .await
        .unwrap_err();
    let code = refused
        .as_database_error()
        .and_then(|e| e.code())
        .unwrap_or_default();
    assert_eq!(code, "42501", "{refused}");
    // …and even its owner, calling it again, pays nothing more.
    sqlx::query("select * from public.pay_ad_session($1)")
        .bind(id)
        .execute(&app.owner)
        .await
        .unwrap();
    assert_eq!(app.balance(user.id).await, 2);
}
