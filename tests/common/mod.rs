//! Shared test helpers: the app built in-process on the test's own database, users made the
//! way Supabase makes them (a row in auth.users), tokens, and a real HTTP server for tests
//! that need requests handled in parallel.
#![allow(dead_code)]

pub mod admob;
pub mod binary;
pub mod cluster;
pub mod pgbouncer;
pub mod sse;
pub mod stripe;

use std::net::SocketAddr;
use std::sync::Arc;

use amethyst_credits::{AppState, Config, app, db};
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tower::ServiceExt;
use uuid::Uuid;

pub const SECRET: &str = "test-only-jwt-secret-that-is-at-least-32-chars";
pub const ISSUER: &str = "http://127.0.0.1:54321/auth/v1";

/// An HTTP client for tests that talk to a server without building the app first (the app
/// installs rustls's crypto provider; reqwest is built without a default one).
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// The configuration tests start from: HS256 secret, issuer set, no rate limit (the rate
/// limit test turns it on).
pub fn test_config() -> Config {
    let mut config = Config::from_lookup(|name| match name {
        "SUPABASE_JWT_SECRET" => Some(SECRET.to_owned()),
        "JWT_ISSUER" => Some(ISSUER.to_owned()),
        "RATE_LIMIT_PER_MINUTE" => Some("0".to_owned()),
        "LOG_FORMAT" => Some("json".to_owned()),
        _ => None,
    })
    .expect("the test configuration is valid");
    config.database_max_connections = 30;
    config
}

/// The test configuration in the `client` ad verification mode, where `POST /v1/ads/views`
/// pays on the client's word: for the tests of that route (the default mode is `session`).
pub fn client_ads_config() -> Config {
    let mut config = test_config();
    config.ads.verification = amethyst_credits::config::AdsVerification::Client;
    config
}

pub struct TestApp {
    pub router: amethyst_credits::App,
    pub state: AppState,
    /// Connected as the database owner, for setting up and inspecting state.
    pub owner: PgPool,
    pub connect: PgConnectOptions,
    pub config: Config,
}

pub struct TestUser {
    pub id: Uuid,
    pub email: String,
    pub token: String,
}

pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl TestResponse {
    /// The problem `code`, for error answers.
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

impl TestApp {
    pub async fn new(_pool: PgPoolOptions, connect: PgConnectOptions) -> Self {
        Self::with_config(connect, test_config()).await
    }

    /// An app in the `client` ad verification mode ([`client_ads_config`]).
    pub async fn client_ads(connect: PgConnectOptions) -> Self {
        Self::with_config(connect, client_ads_config()).await
    }

    pub async fn with_config(connect: PgConnectOptions, config: Config) -> Self {
        let pool = db::connect(
            connect.clone(),
            config.database_max_connections,
            config.database_statement_timeout,
        )
        .await
        .expect("the service pool connects");
        let owner = PgPoolOptions::new()
            .max_connections(5)
            .connect_with(connect.clone())
            .await
            .expect("the owner pool connects");
        let state = AppState::new(config.clone(), pool);
        TestApp {
            router: app(state.clone()),
            state,
            owner,
            connect,
            config,
        }
    }

    /// Signs a user up the way Supabase Auth does: a row in auth.users.
    pub async fn user(&self) -> TestUser {
        self.user_with_meta(json!({})).await
    }

    pub async fn user_with_meta(&self, meta: Value) -> TestUser {
        let id = Uuid::new_v4();
        let email = format!("user-{}@example.com", &id.to_string()[..8]);
        sqlx::query("insert into auth.users (id, email, raw_user_meta_data) values ($1, $2, $3)")
            .bind(id)
            .bind(&email)
            .bind(meta)
            .execute(&self.owner)
            .await
            .expect("auth user inserted");
        TestUser {
            id,
            token: user_token(id, &email),
            email,
        }
    }

    pub async fn admin(&self) -> TestUser {
        let user = self.user().await;
        sqlx::query("update public.profiles set is_admin = true where id = $1")
            .bind(user.id)
            .execute(&self.owner)
            .await
            .unwrap();
        user
    }

    /// Gives `user` credits through the ledger (source `system`).
    pub async fn grant(&self, user: Uuid, amount: i32) {
        sqlx::query("select public.add_credits($1, $2, 'system', 'test grant')")
            .bind(user)
            .bind(amount)
            .execute(&self.owner)
            .await
            .expect("credits granted");
    }

    pub async fn balance(&self, user: Uuid) -> i32 {
        sqlx::query_scalar("select credits from public.profiles where id = $1")
            .bind(user)
            .fetch_one(&self.owner)
            .await
            .unwrap()
    }

    pub async fn count(&self, sql: &str, user: Uuid) -> i64 {
        sqlx::query_scalar(sql)
            .bind(user)
            .fetch_one(&self.owner)
            .await
            .unwrap()
    }

    /// Sends a request through the router.
    pub async fn send(&self, request: Request<Body>) -> TestResponse {
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("the router answers");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        TestResponse {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> TestResponse {
        self.send(request(Method::GET, path, token, None, &[]))
            .await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> TestResponse {
        self.send(request(
            Method::POST,
            path,
            token,
            Some(body.to_string()),
            &[],
        ))
        .await
    }

    pub async fn post_with_key(
        &self,
        path: &str,
        token: &str,
        key: &str,
        body: Value,
    ) -> TestResponse {
        self.send(request(
            Method::POST,
            path,
            Some(token),
            Some(body.to_string()),
            &[("idempotency-key", key)],
        ))
        .await
    }

    /// Delivers a Stripe event, signed with the current webhook secret.
    pub async fn webhook(&self, event: &Value) -> TestResponse {
        let body = event.to_string();
        let signature = stripe::signature_header(&body);
        self.webhook_raw(body, Some(&signature)).await
    }

    pub async fn webhook_raw(&self, body: String, signature: Option<&str>) -> TestResponse {
        let headers: Vec<(&str, &str)> = signature
            .map(|s| vec![("stripe-signature", s)])
            .unwrap_or_default();
        self.send(request(
            Method::POST,
            "/v1/webhooks/stripe",
            None,
            Some(body),
            &headers,
        ))
        .await
    }

    /// Serves the app on a free port from a multi-threaded runtime of its own, so that
    /// requests are handled in parallel. Stopped when the handle is dropped.
    pub fn serve(&self) -> Server {
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let connect = self.connect.clone();
        let config = self.config.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let pool = db::connect(connect, 40, config.database_statement_timeout)
                    .await
                    .unwrap();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                address_tx.send(listener.local_addr().unwrap()).unwrap();
                let service = app(AppState::new(config, pool.clone()))
                    .into_make_service_with_connect_info::<SocketAddr>();
                axum::serve(listener, service)
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .unwrap();
                pool.close().await;
            });
        });
        Server {
            url: format!("http://{}", address_rx.recv().unwrap()),
            client: reqwest::Client::new(),
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

pub struct Server {
    pub url: String,
    pub client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// POSTs JSON; answers (status, body).
    pub async fn post(
        &self,
        path: &str,
        token: &str,
        key: Option<&str>,
        body: &Value,
    ) -> (u16, Value) {
        let mut request = self
            .client
            .post(format!("{}{path}", self.url))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let response = request.send().await.expect("the server answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

impl Server {
    /// Delivers a signed Stripe event; answers (status, body).
    pub async fn webhook(&self, event: &Value) -> (u16, Value) {
        let body = event.to_string();
        let response = self
            .client
            .post(format!("{}/v1/webhooks/stripe", self.url))
            .header("content-type", "application/json")
            .header("stripe-signature", stripe::signature_header(&body))
            .body(body)
            .send()
            .await
            .expect("the server answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub fn request(
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
    headers: &[(&str, &str)],
) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(body.map(Body::from).unwrap_or_else(Body::empty))
        .unwrap()
}

/// Claims shaped like a Supabase Auth access token.
pub fn user_claims(id: Uuid, email: &str) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "iss": ISSUER,
        "sub": id,
        "aud": "authenticated",
        "exp": now + 3600,
        "iat": now,
        "email": email,
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {},
        "role": "authenticated",
        "aal": "aal1",
        "amr": [{"method": "password", "timestamp": now}],
        "session_id": Uuid::new_v4(),
        "is_anonymous": false
    })
}

pub fn sign_hs256(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn user_token(id: Uuid, email: &str) -> String {
    sign_hs256(&user_claims(id, email), SECRET)
}

/// The project's legacy service_role key: HS256, no `aud`, no `sub`.
pub fn service_role_key() -> String {
    let now = chrono::Utc::now().timestamp();
    sign_hs256(
        &json!({"iss": "supabase", "ref": "testproject", "role": "service_role", "iat": now, "exp": now + 3600}),
        SECRET,
    )
}

/// The project's legacy anon key.
pub fn anon_key() -> String {
    let now = chrono::Utc::now().timestamp();
    sign_hs256(
        &json!({"iss": "supabase", "ref": "testproject", "role": "anon", "iat": now, "exp": now + 3600}),
        SECRET,
    )
}

/// Runs `count` copies of a future at once and collects their outputs.
pub async fn all_at_once<F, Fut, T>(count: usize, make: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(count));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let barrier = barrier.clone();
        let fut = make(i);
        tasks.spawn(async move {
            barrier.wait().await;
            fut.await
        });
    }
    let mut out = Vec::with_capacity(count);
    while let Some(result) = tasks.join_next().await {
        out.push(result.expect("task completed"));
    }
    out
}

/// Waits until `count` sessions of this database wait for a lock.
pub async fn wait_for_lock_waiters(owner: &PgPool, count: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
              where datname = current_database() and wait_event_type = 'Lock'",
        )
        .fetch_one(owner)
        .await
        .unwrap();
        if waiting >= count {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{waiting} of {count} sessions wait"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
