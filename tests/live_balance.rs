//! The live balance stream, `GET /v1/me/events`: the ledger's rows as events, in order, resumed
//! without loss or duplicates, across a lost listener and across processes.

mod common;

use axum::http::{Method, Request};
use common::binary::Binary;
use common::sse::{EventStream, SseEvent};
use common::stripe::{FakeStripe, checkout_session, event, event_id, stripe_config};
use common::{
    SECRET, TestApp, TestUser, request, service_role_key, sign_hs256, test_config, user_claims,
};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tower::ServiceExt;
use uuid::Uuid;

/// An app whose listener runs, as the server's does.
async fn live_app(connect: PgConnectOptions, config: amethyst_credits::Config) -> TestApp {
    let app = TestApp::with_config(connect.clone(), config).await;
    app.state.notifications.start(connect);
    app
}

/// Opens the caller's stream through the router: the status, and the events when it is 200.
async fn open(app: &TestApp, token: &str, headers: &[(&str, &str)]) -> (u16, EventStream) {
    let response = app
        .router
        .clone()
        .oneshot(request(
            Method::GET,
            "/v1/me/events",
            Some(token),
            None,
            headers,
        ))
        .await
        .unwrap();
    let status = response.status().as_u16();
    if status == 200 {
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "{:?}",
            response.headers()
        );
    }
    (status, EventStream::from_router(response.into_body()))
}

/// Opens the stream and reads its first event, which must be the balance.
async fn open_stream(app: &TestApp, user: &TestUser) -> (EventStream, SseEvent) {
    let (status, mut stream) = open(app, &user.token, &[]).await;
    assert_eq!(status, 200);
    let balance = stream.next().await.expect("a first event");
    assert_eq!(balance.name, "balance", "{balance:?}");
    (stream, balance)
}

async fn spend(app: &TestApp, user: &TestUser, amount: i32) {
    let spent = app
        .post(
            "/v1/credits/spend",
            Some(&user.token),
            json!({"amount": amount, "description": "Image"}),
        )
        .await;
    assert_eq!(spent.status, 201, "{:?}", spent.body);
}

/// The user's ledger, oldest first: (seq, amount, source).
async fn ledger(app: &TestApp, user: Uuid) -> Vec<(i64, i32, String)> {
    sqlx::query_as(
        "select seq, amount, source from public.credit_transactions where user_id = $1 order by seq",
    )
    .bind(user)
    .fetch_all(&app.owner)
    .await
    .unwrap()
}

fn summary(events: &[SseEvent]) -> Vec<(i64, i64, String)> {
    events
        .iter()
        .map(|e| {
            assert_eq!(e.name, "transaction", "{e:?}");
            (
                e.seq(),
                e.data["amount"].as_i64().unwrap(),
                e.data["source"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn as_summary(rows: &[(i64, i32, String)]) -> Vec<(i64, i64, String)> {
    rows.iter()
        .map(|(seq, amount, source)| (*seq, i64::from(*amount), source.clone()))
        .collect()
}

#[sqlx::test]
async fn a_stream_sees_a_spend_an_ad_reward_a_stripe_grant_and_an_admin_adjustment_in_ledger_order(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let stripe = FakeStripe::start().await;
    let mut config = stripe_config(&stripe.url);
    config.ads.verification = amethyst_credits::config::AdsVerification::Client;
    let app = live_app(connect, config).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;
    let (mut stream, balance) = open_stream(&app, &user).await;
    assert_eq!(
        balance.data,
        json!({"credits": 10, "balance": {"available": 10, "held": 0, "paid": 0, "promotional": 10, "expiring": []}})
    );

    spend(&app, &user, 3).await;
    let ad = app
        .post(
            "/v1/ads/views",
            Some(&user.token),
            json!({"duration_seconds": 32}),
        )
        .await;
    assert_eq!(ad.status, 201, "{:?}", ad.body);
    let pack = Uuid::new_v4();
    sqlx::query(
        "insert into public.credit_packs (id, name, credits, kind, stripe_price_id, unit_amount, currency, active)
         values ($1, '100 credits', 100, 'one_time', 'price_100', 999, 'usd', true)",
    )
    .bind(pack)
    .execute(&app.owner)
    .await
    .unwrap();
    let session = format!("cs_test_{}", Uuid::new_v4().simple());
    let paid = checkout_session(&session, user.id, pack, 100, "pi_live_1", "paid");
    let delivered = app
        .webhook(&event(&event_id(), "checkout.session.completed", paid))
        .await;
    assert_eq!(delivered.status, 200, "{:?}", delivered.body);
    let adjusted = app
        .post(
            &format!("/v1/admin/users/{}/credits", user.id),
            Some(&service_role_key()),
            json!({"amount": -5, "reason": "Correction"}),
        )
        .await;
    assert_eq!(adjusted.status, 201, "{:?}", adjusted.body);

    let events = stream.take(4).await;
    let rows = ledger(&app, user.id).await;
    assert_eq!(summary(&events), as_summary(&rows[1..]));
    let sources: Vec<&str> = events
        .iter()
        .map(|e| e.data["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["spend", "ad_view", "stripe", "admin"]);
    let ad_credits = ad.body["credits_awarded"].as_i64().unwrap();
    let after_ad = 7 + ad_credits;
    let balances: Vec<(i64, i64)> = events
        .iter()
        .map(|e| {
            (
                e.data["balance_after"].as_i64().unwrap(),
                e.data["balance"]["available"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        balances,
        [
            (7, 7),
            (after_ad, after_ad),
            (after_ad + 100, after_ad + 100),
            (after_ad + 95, after_ad + 95)
        ]
    );
    assert_eq!(events[0].data["description"], "Image");
    assert!(events[0].data["id"].is_string() && events[0].data["created_at"].is_string());
}

#[sqlx::test]
async fn resuming_with_last_event_id_sends_exactly_the_missed_events_in_order(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let app = live_app(connect, test_config()).await;
    let user = app.user().await;
    app.grant(user.id, 50).await;
    let (mut stream, _) = open_stream(&app, &user).await;
    spend(&app, &user, 1).await;
    let seen = stream.transaction().await;
    drop(stream);

    // Missed while away.
    spend(&app, &user, 2).await;
    app.grant(user.id, 7).await;
    spend(&app, &user, 3).await;

    let last = seen.seq().to_string();
    let (status, mut resumed) = open(&app, &user.token, &[("last-event-id", &last)]).await;
    assert_eq!(status, 200);
    let balance = resumed.next().await.unwrap();
    assert_eq!(balance.name, "balance");
    assert_eq!(balance.data["credits"], 51);
    let missed = resumed.take(3).await;
    let rows = ledger(&app, user.id).await;
    assert_eq!(summary(&missed), as_summary(&rows[2..5]));
    // Then live, nothing sent twice: the next event is the next row.
    spend(&app, &user, 4).await;
    let next = resumed.transaction().await;
    assert_eq!(next.seq(), ledger(&app, user.id).await[5].0);
    assert_eq!(next.data["amount"], -4);
}

#[sqlx::test]
async fn a_last_event_id_too_far_back_gets_reset(pool: PgPoolOptions, connect: PgConnectOptions) {
    let _ = pool;
    let app = live_app(connect, test_config()).await;
    let user = app.user().await;
    app.grant(user.id, 5).await;
    app.grant(user.id, 5).await;
    let first = ledger(&app, user.id).await[0].0;
    // The second row goes to the archive, as the monthly maintenance moves old rows.
    sqlx::query(
        "with moved as (delete from public.credit_transactions where user_id = $1 and seq > $2
                        returning id, seq, user_id, amount, balance_after, source, description, reference, created_at)
         insert into public.credit_transactions_archive
           (id, seq, user_id, amount, balance_after, source, description, reference, created_at)
         select * from moved",
    )
    .bind(user.id)
    .bind(first)
    .execute(&app.owner)
    .await
    .unwrap();

    for last in [
        first.to_string(),
        "not-an-id".to_owned(),
        "999999999".to_owned(),
    ] {
        let (status, mut stream) = open(&app, &user.token, &[("last-event-id", &last)]).await;
        assert_eq!(status, 200);
        let events = stream.take(2).await;
        assert_eq!(events[0].name, "balance", "{last}");
        assert_eq!(events[0].data["credits"], 10);
        assert_eq!(events[1].name, "reset", "{last}: {:?}", events[1]);
        // And live from now on.
        spend(&app, &user, 1).await;
        let next = stream.transaction().await;
        assert_eq!(
            next.data["balance_after"],
            events[0].data["credits"].as_i64().unwrap() - 1
        );
        app.grant(user.id, 1).await;
        assert_eq!(stream.transaction().await.data["amount"], 1);
    }
}

/// The listening connection, as PostgreSQL lists it.
async fn listener_pids(app: &TestApp) -> Vec<i32> {
    sqlx::query_scalar(
        "select pid from pg_stat_activity
          where datname = current_database() and application_name = $1",
    )
    .bind(amethyst_credits::notifications::APPLICATION_NAME)
    .fetch_all(&app.owner)
    .await
    .unwrap()
}

async fn until_listening(app: &TestApp) -> i32 {
    loop {
        if let Some(pid) = listener_pids(app).await.first() {
            return *pid;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[sqlx::test]
async fn every_stream_receives_every_event_when_the_listener_connection_is_killed(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let app = live_app(connect, test_config()).await;
    let users = [app.user().await, app.user().await];
    for user in &users {
        app.grant(user.id, 1000).await;
    }
    let mut streams = Vec::new();
    for user in &users {
        streams.push(open_stream(&app, user).await.0);
        streams.push(open_stream(&app, user).await.0);
    }

    // Changes go on from another task while the listener is killed three times; each kill is
    // followed at once by more changes, made while nothing listens.
    let owner = app.owner.clone();
    let ids: Vec<Uuid> = users.iter().map(|u| u.id).collect();
    let changes = tokio::spawn(async move {
        for i in 0..40 {
            sqlx::query("select public.spend_credits($1, 1, 'live', null)")
                .bind(ids[i % 2])
                .execute(&owner)
                .await
                .unwrap();
            tokio::task::yield_now().await;
        }
    });
    for _ in 0..3 {
        let pid = until_listening(&app).await;
        sqlx::query("select pg_terminate_backend($1)")
            .bind(pid)
            .execute(&app.owner)
            .await
            .unwrap();
        for user in &users {
            app.grant(user.id, 1).await;
        }
    }
    changes.await.unwrap();
    // The last changes of all, while nothing listens either.
    let pid = until_listening(&app).await;
    sqlx::query("select pg_terminate_backend($1)")
        .bind(pid)
        .execute(&app.owner)
        .await
        .unwrap();
    for user in &users {
        spend(&app, user, 2).await;
    }

    for (i, stream) in streams.iter_mut().enumerate() {
        let user = &users[i / 2];
        let rows = ledger(&app, user.id).await;
        let expected = as_summary(&rows[1..]);
        let events = stream.take(expected.len()).await;
        assert_eq!(summary(&events), expected, "stream {i}");
    }
}

#[sqlx::test]
async fn another_users_events_never_reach_a_stream(pool: PgPoolOptions, connect: PgConnectOptions) {
    let _ = pool;
    let app = live_app(connect, test_config()).await;
    let (ada, bob) = (app.user().await, app.user().await);
    app.grant(ada.id, 20).await;
    app.grant(bob.id, 20).await;
    let (mut bobs, _) = open_stream(&app, &bob).await;
    let (mut adas, _) = open_stream(&app, &ada).await;

    spend(&app, &ada, 1).await;
    spend(&app, &ada, 2).await;
    spend(&app, &bob, 3).await;

    // Bob's next event is his own row: none of Ada's came first.
    let own = bobs.transaction().await;
    assert_eq!(own.seq(), ledger(&app, bob.id).await[1].0);
    assert_eq!(own.data["amount"], -3);
    let adas_events = adas.take(2).await;
    assert_eq!(
        summary(&adas_events),
        as_summary(&ledger(&app, ada.id).await[1..])
    );
}

#[sqlx::test]
async fn an_invalid_or_expired_token_gets_401(pool: PgPoolOptions, connect: PgConnectOptions) {
    let _ = pool;
    let app = live_app(connect, test_config()).await;
    let user = app.user().await;
    let mut claims = user_claims(user.id, &user.email);
    claims["exp"] = json!(chrono::Utc::now().timestamp() - 3600);
    let expired = sign_hs256(&claims, SECRET);
    let forged = sign_hs256(
        &user_claims(user.id, &user.email),
        "another-secret-at-least-32-chars!!",
    );

    let paths = [
        "/v1/me/events".to_owned(),
        format!("/v1/me/events?access_token={expired}"),
        format!("/v1/me/events?access_token={forged}"),
        "/v1/me/events?access_token=".to_owned(),
        "/v1/me/events?access_token=not.a.token".to_owned(),
    ];
    for path in paths {
        let refused = app.get(&path, None).await;
        assert_eq!(refused.status, 401, "{path}");
        assert_eq!(refused.code(), "invalid_token");
    }
    let refused = app.get("/v1/me/events", Some(&expired)).await;
    assert_eq!(refused.status, 401);
    // The query string is read on the event stream only.
    let elsewhere = app
        .get(&format!("/v1/me?access_token={}", user.token), None)
        .await;
    assert_eq!(elsewhere.status, 401);
    // The service_role key is not a user.
    let service = app.get("/v1/me/events", Some(&service_role_key())).await;
    assert_eq!(service.status, 403);

    // A good token in the query string opens it.
    let response = app
        .router
        .clone()
        .oneshot(
            Request::get(format!("/v1/me/events?access_token={}", user.token))
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = EventStream::from_router(response.into_body());
    assert_eq!(stream.next().await.unwrap().name, "balance");
}

#[sqlx::test]
async fn low_balance_and_balance_recovered_come_once_per_crossing(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let app = live_app(connect, test_config()).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;
    let (mut stream, _) = open_stream(&app, &user).await;

    spend(&app, &user, 3).await; // 7
    spend(&app, &user, 3).await; // 4: below 5
    spend(&app, &user, 1).await; // 3: still below
    app.grant(user.id, 10).await; // 13: back
    app.grant(user.id, 1).await; // 14

    let events = stream.take(7).await;
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "transaction",
            "transaction",
            "low_balance",
            "transaction",
            "transaction",
            "balance_recovered",
            "transaction"
        ]
    );
    assert_eq!(events[2].data, json!({"available": 4, "threshold": 5}));
    assert_eq!(events[5].data, json!({"available": 13, "threshold": 5}));

    // The user's own threshold applies; 0 turns the alerts off.
    let patch = |value: Value| {
        request(
            Method::PATCH,
            "/v1/me",
            Some(&user.token),
            Some(json!({"low_balance_threshold": value}).to_string()),
            &[],
        )
    };
    assert_eq!(app.send(patch(json!(20))).await.status, 200);
    app.grant(user.id, 10).await; // 24: crosses 20 upwards
    spend(&app, &user, 5).await; // 19: below 20
    let events = stream.take(4).await;
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "transaction",
            "balance_recovered",
            "transaction",
            "low_balance"
        ]
    );
    assert_eq!(events[3].data, json!({"available": 19, "threshold": 20}));
    assert_eq!(app.send(patch(json!(0))).await.status, 200);
    spend(&app, &user, 18).await; // 1
    app.grant(user.id, 30).await; // 31
    let events = stream.take(2).await;
    assert_eq!(summary(&events).len(), 2, "no alert while they are off");
}

#[sqlx::test]
async fn token_expired_comes_last_when_the_token_expires(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let app = live_app(connect, test_config()).await;
    let user = app.user().await;
    // Past its `exp` already, within the leeway the verifier allows for clock skew: accepted,
    // and due to end at once. Then one that expires a second from now.
    for lifetime in [-5, 1] {
        let mut claims = user_claims(user.id, &user.email);
        claims["exp"] = json!(chrono::Utc::now().timestamp() + lifetime);
        let token = sign_hs256(&claims, SECRET);
        let (status, mut stream) = open(&app, &token, &[]).await;
        assert_eq!(status, 200);
        assert_eq!(stream.next().await.unwrap().name, "balance");
        let last = stream.next().await.unwrap();
        assert_eq!(last.name, "token_expired", "{last:?}");
        assert!(
            stream.next().await.is_none(),
            "the stream ends after token_expired"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_through_one_process_reaches_a_stream_on_another() {
    let first = Binary::serve(&[]).await;
    // The request time limit bounds how long an answer takes to start, not a stream's life.
    // The second runs everything on one thread, as TOKIO_WORKER_THREADS=1 makes it.
    let second = Binary::serve_on(
        first.database.shared(),
        &[
            ("REQUEST_TIMEOUT_SECONDS", "1"),
            ("TOKIO_WORKER_THREADS", "1"),
        ],
    )
    .await;
    let says = |server: &Binary, threads: &str| {
        server
            .logs()
            .iter()
            .any(|l| l.contains("listening") && l.contains(threads))
    };
    assert!(
        says(&second, "one (the main thread)"),
        "{:?}",
        second.logs()
    );
    assert!(!says(&first, "one (the main thread)"), "{:?}", first.logs());
    let user = first.user().await;
    first.grant(user.id, 10).await;

    let response = second
        .request(reqwest::Method::GET, "/v1/me/events")
        .bearer_auth(&user.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = EventStream::from_http(response);
    assert_eq!(stream.next().await.unwrap().data["credits"], 10);
    // Past the second server's request time limit (the one wait of this file).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

    let spent = first
        .request(reqwest::Method::POST, "/v1/credits/spend")
        .bearer_auth(&user.token)
        .json(&json!({"amount": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(spent.status(), 201);
    let spent: Value = spent.json().await.unwrap();
    let event = stream.transaction().await;
    assert_eq!(event.data["id"], spent["transaction"]["id"]);
    assert_eq!(event.data["balance_after"], 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_in_the_query_string_never_reaches_the_logs() {
    let mut server = Binary::serve(&[("RUST_LOG", "debug")]).await;
    let user = server.user().await;
    server.grant(user.id, 10).await;

    let response = server
        .request(
            reqwest::Method::GET,
            &format!("/v1/me/events?access_token={}", user.token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = EventStream::from_http(response);
    assert_eq!(stream.next().await.unwrap().name, "balance");
    let spent = server
        .request(reqwest::Method::POST, "/v1/credits/spend")
        .bearer_auth(&user.token)
        .json(&json!({"amount": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(spent.status(), 201);
    assert_eq!(stream.transaction().await.data["amount"], -1);
    // A refused one too: a token with a bad signature in the query string.
    let forged = format!("{}x", user.token);
    let refused = server
        .request(
            reqwest::Method::GET,
            &format!("/v1/me/events?access_token={forged}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    drop(stream);
    assert!(server.terminate(), "the server stops cleanly");

    let logs = server.logs();
    assert!(
        logs.iter().any(|l| l.contains("/v1/me/events")),
        "the requests were logged"
    );
    let signature = user.token.rsplit('.').next().unwrap();
    let payload = user.token.split('.').nth(1).unwrap();
    for line in &logs {
        assert!(
            !line.contains(signature) && !line.contains(payload) && !line.contains("access_token="),
            "a log line carries the token: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn open_streams_end_when_the_server_shuts_down() {
    let mut server = Binary::serve(&[]).await;
    let user = server.user().await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let response = server
            .request(reqwest::Method::GET, "/v1/me/events")
            .bearer_auth(&user.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut stream = EventStream::from_http(response);
        assert_eq!(stream.next().await.unwrap().name, "balance");
        streams.push(stream);
    }
    // SIGTERM: the process ends (well before its 30 s limit for requests in flight) with the
    // streams open, and exits successfully.
    let stopping = tokio::task::spawn_blocking(move || server.terminate());
    for stream in &mut streams {
        assert!(stream.next().await.is_none(), "the stream ends");
    }
    assert!(stopping.await.unwrap(), "the server stopped cleanly");
}

#[sqlx::test]
async fn browsers_of_allowed_origins_may_resume_with_last_event_id(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let mut config = test_config();
    config.cors_allowed_origins = vec!["https://app.amethyst.ai".to_owned()];
    let app = live_app(connect, config).await;
    let preflight = app
        .send(
            Request::builder()
                .method(Method::OPTIONS)
                .uri("/v1/me/events")
                .header("origin", "https://app.amethyst.ai")
                .header("access-control-request-method", "GET")
                .header(
                    "access-control-request-headers",
                    "authorization,last-event-id",
                )
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await;
    let allowed = preflight.headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("last-event-id"), "{allowed}");
}

#[sqlx::test]
async fn holds_reach_the_stream_as_they_are_reserved_captured_released_and_lapse(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = live_app(connect, test_config()).await;
    let user = app.user().await;
    app.grant(user.id, 20).await;
    let service = service_role_key();
    let before = app
        .post(
            "/v1/holds",
            Some(&service),
            json!({"user_id": user.id, "amount": 4, "reference": "gen-0"}),
        )
        .await;
    assert_eq!(before.status, 201);

    // The snapshot carries the Profile's balance, the hold from before included.
    let (mut stream, balance) = open_stream(&app, &user).await;
    assert_eq!(balance.data["credits"], 20);
    assert_eq!(balance.data["balance"]["available"], 16);
    assert_eq!(balance.data["balance"]["held"], 4);

    let reserve = |amount: i32, ttl: i32, reference: &str| {
        app.post(
            "/v1/holds",
            Some(&service),
            json!({"user_id": user.id, "amount": amount, "ttl_seconds": ttl, "reference": reference}),
        )
    };
    let first = reserve(5, 600, "gen-1").await;
    let first_id = first.body["id"].as_str().unwrap().to_owned();
    let event = stream.next().await.unwrap();
    assert_eq!(event.name, "hold");
    assert_eq!(event.data["id"], first_id);
    assert_eq!(event.data["status"], "active");

    // A capture: the hold's change and the spend it wrote, whose available balance counts the
    // holds still active (the one from before).
    let captured = app
        .post(
            &format!("/v1/holds/{first_id}/capture"),
            Some(&service),
            json!({"amount": 3}),
        )
        .await;
    assert_eq!(captured.status, 200);
    let events = stream.take(2).await;
    let mut names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["hold", "transaction"]);
    let transaction = events.iter().find(|e| e.name == "transaction").unwrap();
    assert_eq!(transaction.data["amount"], -3);
    assert_eq!(transaction.data["balance"]["available"], 13);
    let hold = events.iter().find(|e| e.name == "hold").unwrap();
    assert_eq!(hold.data["status"], "captured");

    let released = app
        .post(
            &format!("/v1/holds/{}/release", before.body["id"].as_str().unwrap()),
            Some(&service),
            json!({}),
        )
        .await;
    assert_eq!(released.status, 200);
    let event = stream.next().await.unwrap();
    assert_eq!(
        (event.name.as_str(), &event.data["status"]),
        ("hold", &json!("released"))
    );

    // A hold that lapses changes no row: the stream notices the time itself.
    let short = reserve(2, 1, "gen-2").await;
    assert_eq!(short.status, 201);
    let event = stream.next().await.unwrap();
    assert_eq!(event.data["status"], "active");
    let event = stream.next().await.unwrap();
    assert_eq!(event.name, "hold");
    assert_eq!(event.data["id"], short.body["id"]);
    assert_eq!(event.data["status"], "expired");
}

#[sqlx::test]
async fn credits_about_to_expire_are_announced_once(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = live_app(connect, test_config()).await;
    let user = app.user().await;
    sqlx::query("select public.add_credits($1, 6, 'admin', 'soon', null, public.clock_now() + interval '2 days')")
        .bind(user.id)
        .execute(&app.owner)
        .await
        .unwrap();
    sqlx::query("select public.add_credits($1, 9, 'admin', 'later', null, public.clock_now() + interval '60 days')")
        .bind(user.id)
        .execute(&app.owner)
        .await
        .unwrap();
    let (mut stream, _) = open_stream(&app, &user).await;
    let event = stream.next().await.unwrap();
    assert_eq!(event.name, "credits_expiring");
    assert_eq!(event.data["amount"], 6);

    // A new grant that expires soon is announced after its transaction; the old one is not again.
    sqlx::query("select public.add_credits($1, 2, 'admin', 'tomorrow', null, public.clock_now() + interval '1 day')")
        .bind(user.id)
        .execute(&app.owner)
        .await
        .unwrap();
    let events = stream.take(2).await;
    assert_eq!(events[0].name, "transaction");
    assert_eq!(events[1].name, "credits_expiring");
    assert_eq!(events[1].data["amount"], 2);

    // Another grant (that never expires): its transaction comes next, with no expiry announced
    // a second time before or after it.
    for amount in [1, 3] {
        sqlx::query("select public.add_credits($1, $2, 'admin', 'plain', null, null)")
            .bind(user.id)
            .bind(amount)
            .execute(&app.owner)
            .await
            .unwrap();
        let event = stream.next().await.unwrap();
        assert_eq!(event.name, "transaction", "{:?}", event.data);
        assert_eq!(event.data["amount"], amount);
    }
}

#[sqlx::test]
async fn every_stream_asks_for_its_own_reconnection_delay(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let app = live_app(connect, test_config()).await;
    let mut delays = Vec::new();
    for _ in 0..8 {
        let user = app.user().await;
        let (_stream, balance) = open_stream(&app, &user).await;
        let delay = balance.retry.expect("the balance event carries retry:");
        assert!((1_000..5_000).contains(&delay), "{delay} ms");
        delays.push(delay);
    }
    delays.dedup();
    assert!(delays.len() > 1, "eight streams, one delay: {delays:?}");
}

#[sqlx::test]
async fn the_process_listens_only_while_streams_are_open(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let app = live_app(connect, test_config()).await;
    app.state
        .notifications
        .set_linger(std::time::Duration::from_millis(100));
    let user = app.user().await;
    app.grant(user.id, 100).await;

    let (mut stream, _) = open_stream(&app, &user).await;
    until_listening(&app).await;
    spend(&app, &user, 1).await;
    assert_eq!(stream.transaction().await.data["amount"], -1);

    // The last stream closes: so does the listening connection, after the linger.
    drop(stream);
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while !listener_pids(&app).await.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the listening connection closes once no stream is open");

    // A change while nothing listens is in the next stream's balance; the stream starts the
    // listening again, and every change after reaches it.
    spend(&app, &user, 2).await;
    let (mut stream, balance) = open_stream(&app, &user).await;
    assert_eq!(balance.data["credits"], 97);
    for amount in [3, 1] {
        spend(&app, &user, amount).await;
        assert_eq!(stream.transaction().await.data["amount"], -amount);
    }
    assert!(!listener_pids(&app).await.is_empty());
}
