mod common;

use chrono::{DateTime, Utc};
use common::{TestApp, all_at_once};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::sync::Arc;

#[sqlx::test]
async fn the_reward_follows_the_watched_seconds_at_every_boundary(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::client_ads(connect).await;
    let user = app.user().await;

    let mut balance = 0;
    for (seconds, reward) in [(0, 0), (14, 0), (15, 1), (29, 1), (30, 2), (86_400, 2)] {
        let view = app
            .post(
                "/v1/ads/views",
                Some(&user.token),
                json!({"duration_seconds": seconds}),
            )
            .await;
        balance += reward;
        assert_eq!(view.status, 201, "{seconds} s: {:?}", view.body);
        assert_eq!(view.body["credits_awarded"], reward, "{seconds} s");
        assert_eq!(view.body["duration_seconds"], seconds);
        assert_eq!(view.body["balance"], balance, "{seconds} s");
    }
    assert_eq!(app.balance(user.id).await, balance);
    // Every view is recorded; only rewarded ones reach the ledger.
    assert_eq!(
        app.count(
            "select count(*) from public.ad_views where user_id = $1",
            user.id
        )
        .await,
        6
    );
    assert_eq!(
        app.count("select count(*) from public.credit_transactions where user_id = $1 and source = 'ad_view'", user.id).await,
        4
    );
}

#[sqlx::test]
async fn the_eleventh_ad_view_of_the_day_is_refused_with_retry_after(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::client_ads(connect).await;
    let user = app.user().await;

    for n in 1..=10 {
        let view = app
            .post(
                "/v1/ads/views",
                Some(&user.token),
                json!({"duration_seconds": 30, "provider": "admob", "ad_unit_id": "unit-1"}),
            )
            .await;
        assert_eq!(view.status, 201);
        assert_eq!(view.body["views_today"], n);
        assert_eq!(view.body["views_remaining"], 10 - n);
    }
    let eleventh = app
        .post(
            "/v1/ads/views",
            Some(&user.token),
            json!({"duration_seconds": 30}),
        )
        .await;

    assert_eq!(eleventh.status, 429);
    assert_eq!(eleventh.code(), "daily_ad_limit_reached");
    let retry_after: u64 = eleventh.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The ad day is the database's UTC day: the wait is until its next midnight, as the
    // database's clock sees it (the clock moves on between the two, by a second or so).
    let until_midnight = seconds_to_next_utc_midnight(&app).await;
    assert!(
        retry_after.abs_diff(until_midnight) <= 2,
        "Retry-After {retry_after}, next UTC midnight in {until_midnight} s"
    );
    assert_eq!(app.balance(user.id).await, 20);
    assert_eq!(
        app.count(
            "select count(*) from public.ad_views where user_id = $1",
            user.id
        )
        .await,
        10
    );

    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.body["ads"]["views_today"], 10);
    assert_eq!(me.body["ads"]["views_remaining"], 0);
}

/// Seconds from the database's now to the next midnight UTC, rounded up.
async fn seconds_to_next_utc_midnight(app: &TestApp) -> u64 {
    sqlx::query_scalar::<_, i64>(
        "select ceil(extract(epoch from
                   date_trunc('day', now() at time zone 'utc') + interval '1 day'
                   - (now() at time zone 'utc')))::bigint",
    )
    .fetch_one(&app.owner)
    .await
    .unwrap() as u64
}

/// The next midnight UTC by the database's clock.
async fn next_utc_midnight(app: &TestApp) -> DateTime<Utc> {
    sqlx::query_scalar(
        "select (date_trunc('day', now() at time zone 'utc') + interval '1 day') at time zone 'utc'",
    )
    .fetch_one(&app.owner)
    .await
    .unwrap()
}

#[sqlx::test]
async fn the_ad_day_resets_at_the_databases_next_utc_midnight(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::client_ads(connect).await;
    let user = app.user().await;
    let before = next_utc_midnight(&app).await;

    let me = app.get("/v1/me", Some(&user.token)).await;
    let view = app
        .post(
            "/v1/ads/views",
            Some(&user.token),
            json!({"duration_seconds": 20}),
        )
        .await;

    let after = next_utc_midnight(&app).await;
    assert_eq!(me.status, 200);
    assert_eq!(view.status, 201);
    for resets_at in [&me.body["ads"]["resets_at"], &view.body["resets_at"]] {
        let resets_at: DateTime<Utc> = resets_at
            .as_str()
            .unwrap()
            .parse()
            .expect("resets_at is an RFC 3339 time");
        // Either midnight, should the day have turned between the two reads.
        assert!(
            resets_at == before || resets_at == after,
            "resets_at {resets_at}, next UTC midnight {before}"
        );
    }
}

#[sqlx::test]
async fn yesterdays_views_do_not_count_today(_pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::client_ads(connect).await;
    let user = app.user().await;
    sqlx::query(
        "update public.profiles set ad_views_today = 10,
                ad_views_date = (now() at time zone 'utc')::date - 1 where id = $1",
    )
    .bind(user.id)
    .execute(&app.owner)
    .await
    .unwrap();

    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.body["ads"]["views_today"], 0);
    let view = app
        .post(
            "/v1/ads/views",
            Some(&user.token),
            json!({"duration_seconds": 20}),
        )
        .await;
    assert_eq!(view.status, 201);
    assert_eq!(view.body["views_today"], 1);
}

#[sqlx::test]
async fn thirty_concurrent_views_pay_exactly_ten(_pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::client_ads(connect).await;
    let user = app.user().await;
    let server = Arc::new(app.serve());
    let token = Arc::new(user.token.clone());

    let results = all_at_once(30, |_| {
        let server = server.clone();
        let token = token.clone();
        async move {
            server
                .post(
                    "/v1/ads/views",
                    &token,
                    None,
                    &json!({"duration_seconds": 45}),
                )
                .await
        }
    })
    .await;

    let accepted = results.iter().filter(|(s, _)| *s == 201).count();
    let refused = results
        .iter()
        .filter(|(s, b)| *s == 429 && b["code"] == "daily_ad_limit_reached")
        .count();
    assert_eq!((accepted, refused), (10, 20), "{results:?}");
    assert_eq!(app.balance(user.id).await, 20);
    assert_eq!(
        app.count(
            "select count(*) from public.ad_views where user_id = $1",
            user.id
        )
        .await,
        10
    );
}

#[sqlx::test]
async fn anonymous_sessions_earn_no_rewards_unless_allowed(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::client_ads(connect.clone()).await;
    let user = app.user().await;
    let mut claims = common::user_claims(user.id, "");
    claims["is_anonymous"] = json!(true);
    let anonymous = common::sign_hs256(&claims, common::SECRET);

    let refused = app
        .post(
            "/v1/ads/views",
            Some(&anonymous),
            json!({"duration_seconds": 30}),
        )
        .await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.code(), "anonymous_user");
    assert_eq!(app.balance(user.id).await, 0);
    // Reading is fine.
    assert_eq!(app.get("/v1/me", Some(&anonymous)).await.status, 200);

    let mut config = common::client_ads_config();
    config.allow_anonymous_rewards = true;
    let permissive = TestApp::with_config(connect, config).await;
    let allowed = permissive
        .post(
            "/v1/ads/views",
            Some(&anonymous),
            json!({"duration_seconds": 30}),
        )
        .await;
    assert_eq!(allowed.status, 201);
    assert_eq!(permissive.balance(user.id).await, 2);
}

#[sqlx::test]
async fn a_replayed_ad_view_is_counted_once(_pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::client_ads(connect).await;
    let user = app.user().await;

    let first = app
        .post_with_key(
            "/v1/ads/views",
            &user.token,
            "view-1",
            json!({"duration_seconds": 31}),
        )
        .await;
    let again = app
        .post_with_key(
            "/v1/ads/views",
            &user.token,
            "view-1",
            json!({"duration_seconds": 31}),
        )
        .await;

    assert_eq!(first.status, 201);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body, first.body);
    assert_eq!(
        app.count(
            "select count(*) from public.ad_views where user_id = $1",
            user.id
        )
        .await,
        1
    );
    assert_eq!(app.balance(user.id).await, 2);
}
