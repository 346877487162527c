//! Health, readiness, metrics, the OpenAPI document, limits, and the binary's life cycle.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use axum::http::Method;
use common::binary::{Binary, sample};
use common::{TestApp, request, test_config};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

#[sqlx::test]
async fn health_and_readiness(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect).await;

    let health = app.get("/health", None).await;
    assert_eq!(
        (health.status.as_u16(), health.body.clone()),
        (200, json!({"status": "ok"}))
    );
    assert_eq!(app.get("/ready", None).await.status, 200);

    // A migration missing from the history means the schema is behind the code.
    sqlx::query("delete from public._sqlx_migrations where version = (select max(version) from public._sqlx_migrations)")
        .execute(&app.owner)
        .await
        .unwrap();
    let behind = app.get("/ready", None).await;
    assert_eq!(behind.status, 503);
    assert_eq!(behind.body["status"], "migrations pending");
}

/// POSTs JSON to a server of its own with a bearer token; answers the status.
async fn post(server: &Binary, path: &str, token: &str, body: Value) -> u16 {
    server
        .request(reqwest::Method::POST, path)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("the server answers")
        .status()
        .as_u16()
}

#[tokio::test]
async fn metrics_count_exactly_the_requests_and_credits_of_this_server() {
    let server = Binary::serve(&[("ADS_VERIFICATION", "client")]).await;
    let user = server.user().await;
    server.grant(user.id, 10).await;

    assert_eq!(
        post(
            &server,
            "/v1/credits/spend",
            &user.token,
            json!({"amount": 3})
        )
        .await,
        201
    );
    assert_eq!(
        post(
            &server,
            "/v1/ads/views",
            &user.token,
            json!({"duration_seconds": 30})
        )
        .await,
        201
    );
    let text = server.scrape().await;

    for (series, value) in [
        (
            r#"http_requests_total{method="POST",route="/v1/credits/spend",status="201"}"#,
            1.0,
        ),
        (
            r#"http_requests_total{method="POST",route="/v1/ads/views",status="201"}"#,
            1.0,
        ),
        (
            r#"http_request_duration_seconds_count{method="POST",route="/v1/credits/spend"}"#,
            1.0,
        ),
        (r#"credits_spent_total{source="spend"}"#, 3.0),
        (r#"credits_granted_total{source="ad_view"}"#, 2.0),
        (r#"ad_views_total{outcome="accepted"}"#, 1.0),
        // DATABASE_MAX_CONNECTIONS=5 for these servers.
        ("db_pool_max_connections", 5.0),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
    // The grant went through SQL, not through the service: nothing counted it.
    assert_eq!(
        sample(&text, r#"credits_granted_total{source="system"}"#),
        None
    );
    assert!(sample(&text, r#"db_pool_connections{state="idle"}"#).is_some());
    assert!(text.contains("# HELP credits_granted_total"), "{text}");
    assert!(!text.contains(&user.id.to_string()), "no per-user series");

    // Another spend moves the counters by exactly its own amount.
    assert_eq!(
        post(
            &server,
            "/v1/credits/spend",
            &user.token,
            json!({"amount": 2})
        )
        .await,
        201
    );
    let text = server.scrape().await;
    assert_eq!(
        sample(&text, r#"credits_spent_total{source="spend"}"#),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"http_requests_total{method="POST",route="/v1/credits/spend",status="201"}"#
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn requests_are_counted_by_a_closed_set_of_methods_and_by_route_template() {
    let server = Binary::serve(&[]).await;
    let someone = uuid::Uuid::new_v4();

    for method in ["PROPFIND", "FOO"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let answer = server.request(method, "/health").send().await.unwrap();
        assert_eq!(answer.status(), 405);
    }
    let lookup = server
        .request(reqwest::Method::GET, &format!("/v1/admin/users/{someone}"))
        .bearer_auth(common::service_role_key())
        .send()
        .await
        .unwrap();
    assert_eq!(lookup.status(), 404);
    let nowhere = server
        .request(reqwest::Method::GET, &format!("/v1/nowhere/{someone}"))
        .send()
        .await
        .unwrap();
    assert_eq!(nowhere.status(), 404);
    let text = server.scrape().await;

    for (series, value) in [
        (
            r#"http_requests_total{method="other",route="/health",status="405"}"#,
            2.0,
        ),
        (
            r#"http_requests_total{method="GET",route="/v1/admin/users/{id}",status="404"}"#,
            1.0,
        ),
        (
            r#"http_requests_total{method="GET",route="unmatched",status="404"}"#,
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
    for leaked in [someone.to_string().as_str(), "PROPFIND", "FOO", "nowhere"] {
        assert!(!text.contains(leaked), "{leaked} is in\n{text}");
    }
}

#[tokio::test]
async fn a_thousand_distinct_unknown_paths_and_methods_add_no_series() {
    let server = Binary::serve(&[]).await;
    let send = |method: &str, path: String| {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let request = server.request(method, &path);
        async move {
            let status = request.send().await.expect("the server answers").status();
            assert_eq!(status, 404, "{path}");
        }
    };
    // Every series these requests can reach exists before counting: an unknown path by GET
    // and by an unknown method, and the scrape itself.
    send("GET", "/warm-up".to_owned()).await;
    send("WARMUP", "/warm-up".to_owned()).await;
    server.scrape().await;
    let before = server.scrape().await;

    for i in 0..500 {
        send("GET", format!("/v1/probe-{i}/{}", uuid::Uuid::new_v4())).await;
        send(&format!("VERB{i}"), format!("/x/{i}")).await;
    }
    let after = server.scrape().await;

    assert_eq!(
        after.lines().count(),
        before.lines().count(),
        "series were added:\n{after}"
    );
    // They were counted, under the two series that were already there.
    assert_eq!(
        sample(
            &after,
            r#"http_requests_total{method="GET",route="unmatched",status="404"}"#
        ),
        Some(501.0)
    );
    assert_eq!(
        sample(
            &after,
            r#"http_requests_total{method="other",route="unmatched",status="404"}"#
        ),
        Some(501.0)
    );
}

#[tokio::test]
async fn metrics_bind_addr_serves_metrics_apart_and_the_main_address_answers_404() {
    let server = Binary::serve(&[
        ("METRICS_BIND_ADDR", "127.0.0.1:0"),
        ("METRICS_TOKEN", "scrape-secret"),
    ])
    .await;
    let metrics_url = server
        .metrics_url
        .clone()
        .expect("the metrics address is logged");
    assert_ne!(metrics_url, server.url);

    for token in [None, Some("scrape-secret")] {
        let mut request = server.request(reqwest::Method::GET, "/metrics");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status(), 404, "token {token:?}");
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["code"], "not_found");
    }
    let apart = |token: Option<&str>| {
        let mut request = server.client.get(format!("{metrics_url}/metrics"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(apart(None).await.unwrap().status(), 401);
    assert_eq!(apart(Some("not-it")).await.unwrap().status(), 401);
    let scraped = apart(Some("scrape-secret")).await.unwrap();
    assert_eq!(scraped.status(), 200);
    let text = scraped.text().await.unwrap();
    // The two refusals on the main address, counted there; scrapes apart are not requests
    // of the API.
    assert_eq!(
        sample(
            &text,
            r#"http_requests_total{method="GET",route="/metrics",status="404"}"#
        ),
        Some(2.0),
        "{text}"
    );
    let other = server
        .client
        .get(format!("{metrics_url}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404, "only /metrics is served apart");
    let health = server
        .request(reqwest::Method::GET, "/health")
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[sqlx::test]
async fn metrics_token_must_come_as_the_bearer_token(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let mut config = test_config();
    config.metrics.token = Some(amethyst_credits::config::Secret::new("scrape-secret"));
    let app = TestApp::with_config(connect, config).await;
    let user = app.user().await;
    let scrape = |authorization: Option<&str>| {
        let headers: Vec<(&str, &str)> = authorization
            .map(|value| vec![("authorization", value)])
            .unwrap_or_default();
        app.send(request(Method::GET, "/metrics", None, None, &headers))
    };

    for authorization in [
        None,
        Some("Bearer not-it"),
        Some("Bearer scrape-secre"),
        Some("Bearer scrape-secretx"),
        Some("Basic scrape-secret"),
        Some("scrape-secret"),
    ] {
        let refused = scrape(authorization).await;
        assert_eq!(refused.status, 401, "{authorization:?}");
        assert_eq!(refused.code(), "invalid_token", "{authorization:?}");
    }
    let with_a_user_token = app.get("/metrics", Some(&user.token)).await;
    assert_eq!(with_a_user_token.status, 401);

    let scraped = scrape(Some("Bearer scrape-secret")).await;
    assert_eq!(scraped.status, 200);
    assert!(
        scraped
            .body
            .as_str()
            .unwrap()
            .contains("# TYPE db_pool_max_connections gauge")
    );
    // The other operations routes stay open.
    assert_eq!(app.get("/health", None).await.status, 200);
}

#[tokio::test]
async fn a_scrape_and_liveness_never_ask_the_database_for_anything() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // A "database" that counts the connections made to it and closes each at once.
    let database = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = database.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = database.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    let pool = amethyst_credits::db::ServicePool::lazy(
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(port)
            .username("postgres")
            .database("none"),
        4,
        Duration::from_secs(1),
        amethyst_credits::config::PoolMode::Session,
    );
    let app = amethyst_credits::app(amethyst_credits::AppState::new(test_config(), pool));
    let get = |path: &'static str| {
        let app = app.clone();
        async move {
            let response =
                tower::ServiceExt::oneshot(app, request(Method::GET, path, None, None, &[]))
                    .await
                    .unwrap();
            response.status().as_u16()
        }
    };

    for _ in 0..20 {
        assert_eq!(get("/metrics").await, 200);
        // Liveness never touches the database either.
        assert_eq!(get("/health").await, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "a scrape or a liveness probe connected to the database"
    );

    // The counter sees a route that does ask: readiness.
    assert_eq!(get("/ready").await, 503);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while connections.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "readiness never reached the counting listener"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[sqlx::test]
async fn the_openapi_document_covers_every_route_of_the_contract(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;

    let doc = app.get("/openapi.json", None).await;

    assert_eq!(doc.status, 200);
    assert!(doc.body["openapi"].as_str().unwrap().starts_with("3.1"));
    for (path, method) in [
        ("/health", "get"),
        ("/ready", "get"),
        ("/metrics", "get"),
        ("/v1/me", "get"),
        ("/v1/me", "patch"),
        ("/v1/me/transactions", "get"),
        ("/v1/credits/spend", "post"),
        ("/v1/ads/views", "post"),
        ("/v1/ads/sessions", "post"),
        ("/v1/ads/sessions/{id}", "get"),
        ("/v1/ads/sessions/{id}/complete", "post"),
        ("/v1/ads/admob/ssv", "get"),
        ("/v1/credit-packs", "get"),
        ("/v1/admin/users", "get"),
        ("/v1/admin/users/{id}", "get"),
        ("/v1/admin/users/{id}/transactions", "get"),
        ("/v1/admin/users/{id}/credits", "post"),
        ("/v1/admin/stats", "get"),
        ("/v1/admin/credit-packs/{id}", "put"),
        ("/v1/checkout/sessions", "post"),
        ("/v1/webhooks/stripe", "post"),
        ("/v1/me/images", "get"),
        ("/v1/me/images/{id}", "get"),
        ("/v1/admin/maintenance", "get"),
    ] {
        assert!(
            doc.body["paths"][path][method].is_object(),
            "{method} {path} is missing"
        );
    }
    assert!(doc.body["components"]["schemas"]["Problem"].is_object());
    assert!(doc.body["components"]["securitySchemes"]["bearer"].is_object());

    let docs = app.get("/docs/", None).await;
    assert_eq!(docs.status, 200);
    assert!(
        docs.body.as_str().unwrap().contains("swagger"),
        "the docs page renders the document"
    );
}

#[sqlx::test]
async fn callers_past_their_rate_limit_get_429_with_retry_after(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let mut config = test_config();
    // One token a minute: a slow machine cannot refill the bucket between these requests.
    config.rate_limit_per_minute = 1;
    config.rate_limit_burst = 3;
    let app = TestApp::with_config(connect, config).await;
    let alice = app.user().await;
    let bob = app.user().await;

    for _ in 0..3 {
        assert_eq!(app.get("/v1/me", Some(&alice.token)).await.status, 200);
    }
    let limited = app.get("/v1/me", Some(&alice.token)).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.code(), "rate_limited");
    assert!(
        limited.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    // Another user has a budget of their own; health checks are never limited.
    assert_eq!(app.get("/v1/me", Some(&bob.token)).await.status, 200);
    assert_eq!(app.get("/health", None).await.status, 200);
    // An unknown path under /v1/ is the API's too: probing for routes spends the caller's
    // budget like any request. Paths outside /v1/ are never counted.
    for status in [404, 404, 429] {
        let probe = app.get("/v1/no-such-route", Some(&bob.token)).await;
        assert_eq!(probe.status, status, "{:?}", probe.body);
    }
    for _ in 0..4 {
        assert_eq!(
            app.get("/no-such-route", Some(&bob.token)).await.status,
            404
        );
    }
}

/// GETs the public catalogue from a real server (so the limiter sees the TCP peer,
/// 127.0.0.1) with the given `X-Forwarded-For`; answers the status.
async fn catalogue_via(server: &common::Server, forwarded_for: Option<&str>) -> u16 {
    let mut request = server.client.get(format!("{}/v1/credit-packs", server.url));
    if let Some(value) = forwarded_for {
        request = request.header("x-forwarded-for", value);
    }
    request.send().await.unwrap().status().as_u16()
}

fn limited_config(trusted_proxies: &str) -> amethyst_credits::Config {
    let mut config = test_config();
    config.rate_limit_per_minute = 1;
    config.rate_limit_burst = 2;
    config.trusted_proxies = trusted_proxies
        .split(',')
        .map(|c| c.parse().unwrap())
        .collect();
    config
}

#[sqlx::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_a_bucket_of_its_own(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let app = TestApp::with_config(connect, limited_config("127.0.0.0/8,::1/128")).await;
    let server = app.serve();

    let alice = Some("203.0.113.7");
    assert_eq!(catalogue_via(&server, alice).await, 200);
    assert_eq!(catalogue_via(&server, alice).await, 200);
    assert_eq!(catalogue_via(&server, alice).await, 429);
    // Another client behind the same proxy is not held back by the first.
    assert_eq!(catalogue_via(&server, Some("203.0.113.8")).await, 200);
    // What a client writes left of the address the proxy appended changes nothing.
    assert_eq!(
        catalogue_via(&server, Some("198.51.100.99, 203.0.113.7")).await,
        429
    );
    // A proxy of our own between them is skipped.
    assert_eq!(
        catalogue_via(&server, Some("203.0.113.7, 127.0.0.5")).await,
        429
    );
    // IPv6 clients share one bucket per /64.
    assert_eq!(catalogue_via(&server, Some("2001:db8:1:2::1")).await, 200);
    assert_eq!(
        catalogue_via(&server, Some("2001:db8:1:2::ffff")).await,
        200
    );
    assert_eq!(
        catalogue_via(&server, Some("2001:db8:1:2:abcd::9")).await,
        429
    );
    assert_eq!(catalogue_via(&server, Some("2001:db8:1:3::1")).await, 200);
    // A malformed header counts against the peer itself.
    assert_eq!(catalogue_via(&server, Some("not an address")).await, 200);
    assert_eq!(catalogue_via(&server, None).await, 200);
    assert_eq!(catalogue_via(&server, Some("")).await, 429);
}

#[sqlx::test]
async fn x_forwarded_for_from_an_untrusted_peer_is_ignored(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let app = TestApp::with_config(connect, limited_config("10.0.0.0/8")).await;
    let server = app.serve();

    // Every request counts against the peer, whatever address it claims to forward for.
    assert_eq!(catalogue_via(&server, Some("203.0.113.7")).await, 200);
    assert_eq!(catalogue_via(&server, Some("203.0.113.8")).await, 200);
    assert_eq!(catalogue_via(&server, Some("203.0.113.9")).await, 429);
    assert_eq!(catalogue_via(&server, None).await, 429);
}

#[sqlx::test]
async fn every_answer_carries_a_request_id_and_cors_allows_configured_origins(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let mut config = test_config();
    config.cors_allowed_origins = vec!["https://app.amethyst.ai".to_owned()];
    let app = TestApp::with_config(connect, config).await;

    let answer = app.get("/health", None).await;
    assert!(answer.headers.get("x-request-id").is_some());
    let given = app
        .send(request(
            Method::GET,
            "/health",
            None,
            None,
            &[("x-request-id", "abc-123")],
        ))
        .await;
    assert_eq!(given.headers["x-request-id"], "abc-123");

    let preflight = app
        .send(request(
            Method::OPTIONS,
            "/v1/credits/spend",
            None,
            None,
            &[
                ("origin", "https://app.amethyst.ai"),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization,idempotency-key",
                ),
            ],
        ))
        .await;
    assert_eq!(
        preflight.headers["access-control-allow-origin"],
        "https://app.amethyst.ai"
    );
    let other = app
        .send(request(
            Method::GET,
            "/health",
            None,
            None,
            &[("origin", "https://evil.example")],
        ))
        .await;
    assert!(other.headers.get("access-control-allow-origin").is_none());

    // A request without an Origin takes a shorter way than the CORS service, and gets the same
    // CORS headers as one that went through it.
    let allowed = app
        .send(request(
            Method::GET,
            "/health",
            None,
            None,
            &[("origin", "https://app.amethyst.ai")],
        ))
        .await;
    assert_eq!(
        allowed.headers["access-control-allow-origin"],
        "https://app.amethyst.ai"
    );
    for name in ["vary", "access-control-expose-headers"] {
        let values = |answer: &common::TestResponse| -> Vec<String> {
            answer
                .headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect()
        };
        assert!(!values(&answer).is_empty(), "{name}");
        assert_eq!(values(&answer), values(&allowed), "{name}");
        assert_eq!(values(&answer), values(&other), "{name}");
    }
    assert!(
        answer.headers["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("x-request-id")
    );
}

/// The URL of a database that does not exist yet, on the tests' server.
fn fresh_database_url() -> (String, String) {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for the tests");
    let (server, _) = base.rsplit_once('/').unwrap();
    let name = format!("amethyst_serve_{}", uuid::Uuid::new_v4().simple());
    (format!("{server}/{name}"), format!("{server}/postgres"))
}

#[tokio::test]
async fn serve_creates_the_database_migrates_answers_and_stops_on_sigterm() {
    let (url, admin_url) = fresh_database_url();
    let mut child = Command::new(env!("CARGO_BIN_EXE_amethyst-credits"))
        .arg("serve")
        .env("DATABASE_URL", &url)
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("SUPABASE_JWT_SECRET", common::SECRET)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    // The chosen address is logged.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let address = loop {
        let line = lines
            .next()
            .expect("the server logs until it listens")
            .unwrap();
        let entry: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if entry["message"] == "listening" {
            break entry["address"].as_str().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    let ready = common::http_client()
        .get(format!("http://{address}/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut status = None;
    for _ in 0..100 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.expect("the server stops within 5 s of SIGTERM");
    assert!(status.success(), "{status:?}");

    let name = url.rsplit('/').next().unwrap().to_owned();
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url)
        .await
        .unwrap();
    sqlx::query(&format!("drop database if exists \"{name}\" with (force)"))
        .execute(&mut admin)
        .await
        .ok();
}

#[tokio::test]
async fn migrate_creates_the_database_and_verify_passes_on_it() {
    let (url, admin_url) = fresh_database_url();
    let run = |verb: &str| {
        Command::new(env!("CARGO_BIN_EXE_amethyst-credits"))
            .arg(verb)
            .env("DATABASE_URL", &url)
            .env("LOG_FORMAT", "json")
            .output()
            .unwrap()
    };
    let first = run("migrate");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let again = run("migrate");
    assert!(again.status.success(), "migrating twice is harmless");
    let verify = run("verify");
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{report}");
    assert!(report.contains("all 10 checks passed"), "{report}");

    let name = url.rsplit('/').next().unwrap().to_owned();
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url)
        .await
        .unwrap();
    sqlx::query(&format!("drop database if exists \"{name}\" with (force)"))
        .execute(&mut admin)
        .await
        .ok();
}

#[test]
fn serve_refuses_to_start_without_a_way_to_check_tokens() {
    let output = Command::new(env!("CARGO_BIN_EXE_amethyst-credits"))
        .arg("serve")
        // Away from any .env a developer keeps in the checkout.
        .current_dir(std::env::temp_dir())
        .env_remove("SUPABASE_JWT_SECRET")
        .env_remove("SUPABASE_JWKS_URL")
        .env_remove("SUPABASE_URL")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("SUPABASE_JWT_SECRET") && stderr.contains("SUPABASE_JWKS_URL"),
        "{stderr}"
    );
}

#[test]
fn token_mints_a_token_the_service_accepts() {
    let output = Command::new(env!("CARGO_BIN_EXE_amethyst-credits"))
        .args([
            "token",
            "--sub",
            "7d3c1c52-7a3f-4f57-9a59-1b8f2f0e0c11",
            "--email",
            "t@example.com",
            "--ttl",
            "10m",
        ])
        .env("SUPABASE_JWT_SECRET", common::SECRET)
        .env("JWT_ISSUER", common::ISSUER)
        .output()
        .unwrap();
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_audience(&["authenticated"]);
    validation.set_issuer(&[common::ISSUER]);
    let data = jsonwebtoken::decode::<Value>(
        token.trim(),
        &jsonwebtoken::DecodingKey::from_secret(common::SECRET.as_bytes()),
        &validation,
    )
    .unwrap();
    assert_eq!(data.claims["sub"], "7d3c1c52-7a3f-4f57-9a59-1b8f2f0e0c11");
    assert_eq!(data.claims["role"], "authenticated");
    assert_eq!(data.claims["email"], "t@example.com");
    let lifetime = data.claims["exp"].as_i64().unwrap() - data.claims["iat"].as_i64().unwrap();
    assert_eq!(lifetime, 600);
}

#[test]
fn token_mints_service_role_tokens_too() {
    let output = Command::new(env!("CARGO_BIN_EXE_amethyst-credits"))
        .args([
            "token",
            "--sub",
            "7d3c1c52-7a3f-4f57-9a59-1b8f2f0e0c11",
            "--role",
            "service_role",
        ])
        .env("SUPABASE_JWT_SECRET", common::SECRET)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_audience(&["authenticated"]);
    let data = jsonwebtoken::decode::<Value>(
        token.trim(),
        &jsonwebtoken::DecodingKey::from_secret(common::SECRET.as_bytes()),
        &validation,
    )
    .unwrap();
    assert_eq!(data.claims["role"], "service_role");
}

#[test]
fn openapi_prints_the_document() {
    let output = Command::new(env!("CARGO_BIN_EXE_amethyst-credits"))
        .arg("openapi")
        .output()
        .unwrap();
    assert!(output.status.success());
    let doc: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(doc["paths"]["/v1/credits/spend"]["post"].is_object());
}

#[sqlx::test]
async fn clients_that_hang_up_leave_no_transaction_open(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 10_000).await;
    let server = std::sync::Arc::new(app.serve());
    let token = std::sync::Arc::new(user.token.clone());

    // Hang up on hundreds of requests at scattered points of their handling. Spends with an
    // Idempotency-Key run in a transaction (BEGIN, claim, spend, store, COMMIT).
    common::all_at_once(8, |worker| {
        let server = server.clone();
        let token = token.clone();
        async move {
            for round in 0..120u64 {
                let micros = 50 + (round * 97 + worker as u64 * 31) % 2500;
                let _ = server
                    .client
                    .post(format!("{}/v1/credits/spend", server.url))
                    .bearer_auth(&*token)
                    .header("idempotency-key", format!("hang-up-{worker}-{round}"))
                    .json(&json!({"amount": 1}))
                    .timeout(Duration::from_micros(micros))
                    .send()
                    .await;
            }
        }
    })
    .await;

    // Handlers finish what they started (the spends queue on the user's row, hundreds of them
    // on a loaded machine); a transaction abandoned half-way would stay open for good. Wait
    // until the service's connections have all gone idle, seen on three polls in a row, then
    // count the ones still inside a transaction.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut quiet_polls = 0;
    let stuck = loop {
        let (busy, open): (i64, i64) = sqlx::query_as(
            "select count(*) filter (where state <> 'idle'),
                    count(*) filter (where state like 'idle in transaction%')
               from pg_stat_activity
              where datname = current_database() and pid <> pg_backend_pid()
                and backend_type = 'client backend'",
        )
        .fetch_one(&app.owner)
        .await
        .unwrap();
        quiet_polls = if busy == open { quiet_polls + 1 } else { 0 };
        if quiet_polls >= 3 || std::time::Instant::now() > deadline {
            break open;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        stuck, 0,
        "no pooled connection is left inside a transaction"
    );
    let spend = server
        .client
        .post(format!("{}/v1/credits/spend", server.url))
        .bearer_auth(&*token)
        .json(&json!({"amount": 1}))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("the user's row is not locked by an abandoned transaction");
    assert_eq!(spend.status(), 201);
}

#[test]
fn the_committed_openapi_document_is_the_one_the_service_serves() {
    let served = serde_json::to_string_pretty(&amethyst_credits::router::openapi())
        .expect("the document serializes");
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
            .expect("docs/openapi.json exists");
    assert!(
        committed.trim_end() == served.trim_end(),
        "docs/openapi.json is stale: regenerate it with `cargo run -q -- openapi > docs/openapi.json`"
    );
}

/// The layer every routed request goes through: a request past `REQUEST_TIMEOUT_SECONDS`
/// answers 503, is counted with that status, and its handler still runs to its end.
#[tokio::test]
async fn a_request_past_the_time_limit_answers_503_is_counted_and_its_work_completes() {
    let server = Binary::serve(&[("REQUEST_TIMEOUT_SECONDS", "1")]).await;
    let user = server.user().await;
    server.grant(user.id, 10).await;
    let owner = server.database.owner().await;

    // Another transaction holds the caller's profile row: the spend (with its key, a
    // transaction of its own) waits for it past the time limit, and is answered before the
    // row is free.
    let mut holder = owner.begin().await.unwrap();
    sqlx::query("select 1 from public.profiles where id = $1 for update")
        .bind(user.id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let spend = || {
        server
            .request(Method::POST, "/v1/credits/spend")
            .bearer_auth(&user.token)
            .header("idempotency-key", "slow-spend")
            .json(&json!({"amount": 3}))
            .send()
    };
    let response = spend().await.expect("the server answers");
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "unavailable", "{problem}");
    holder.rollback().await.unwrap();

    // The answer did not cancel the work: once the row is free the spend is applied, and
    // its answer stored under the key.
    let mut waited = 0;
    loop {
        let credits: i32 = sqlx::query_scalar("select credits from public.profiles where id = $1")
            .bind(user.id)
            .fetch_one(&owner)
            .await
            .unwrap();
        if credits == 7 {
            break;
        }
        assert_eq!(credits, 10, "the spend is applied whole or not yet");
        waited += 1;
        assert!(waited < 1500, "the spend never completed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let replay = spend().await.expect("the server answers");
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");

    let text = server.scrape().await;
    assert_eq!(
        sample(
            &text,
            r#"http_requests_total{method="POST",route="/v1/credits/spend",status="503"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"http_request_duration_seconds_count{method="POST",route="/v1/credits/spend"}"#
        ),
        Some(2.0)
    );
    owner.close().await;
}
