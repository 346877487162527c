//! The application: shared state, the router and its layers, and the operational routes.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use sqlx::PgPool;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::auth::{self, TokenVerifier};
use crate::config::Config;
use crate::error::ApiError;
use crate::extract::BODY_LIMIT_BYTES;
use crate::rate_limit::{self, RateLimiter};
use crate::{
    admin, ads, credits, db, images, maintenance, openapi, packs, profiles, stripe, telemetry,
};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Everything a handler may need. One `Arc` inside: every layer and extractor clones the
/// state per request, and one atomic count is cheaper than one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The contents of [`AppState`], reached through `Deref`.
pub struct Shared {
    pub pool: PgPool,
    pub config: Config,
    pub verifier: TokenVerifier,
    pub rate_limiter: RateLimiter,
    pub http: reqwest::Client,
    pub metrics: PrometheusHandle,
    /// `public.ad_daily_limit()`, read once: the rule lives in SQL.
    ad_daily_limit: tokio::sync::OnceCell<i32>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// `pool` should come from [`db::connect`], whose connections act as `service_role`.
    pub fn new(config: Config, pool: PgPool) -> Self {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .user_agent(concat!("amethyst-credits/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client builds with static settings");
        AppState(Arc::new(Shared {
            verifier: TokenVerifier::new(&config.jwt, http.clone()),
            rate_limiter: RateLimiter::from_config(&config),
            config,
            pool,
            http,
            metrics: telemetry::metrics_handle(),
            ad_daily_limit: tokio::sync::OnceCell::new(),
        }))
    }

    /// The number of rewarded ad views a day, as the database decides it.
    pub async fn ad_daily_limit(&self) -> Result<i32, sqlx::Error> {
        self.ad_daily_limit
            .get_or_try_init(|| async {
                sqlx::query_scalar("select public.ad_daily_limit()")
                    .fetch_one(&self.pool)
                    .await
            })
            .await
            .copied()
    }
}

/// TLS for outgoing requests (JWKS, Stripe) uses rustls with ring.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The routes of the contract and their OpenAPI document.
pub fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (api_router, api) = OpenApiRouter::with_openapi(openapi::base())
        .merge(profiles::router())
        .merge(credits::router())
        .merge(ads::router())
        .merge(packs::router())
        .merge(admin::router())
        .merge(stripe::router())
        .merge(images::router())
        .merge(maintenance::router())
        .split_for_parts();
    let (ops_router, ops_api) = OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(telemetry::metrics_endpoint))
        .split_for_parts();
    let mut api = api;
    api.merge(ops_api);
    (api_router.merge(ops_router), api)
}

/// The whole service: routes, documentation and the layers every request goes through.
pub fn app(state: AppState) -> Router {
    let (routes, api) = routes();
    let v1_layers = routes
        .layer(middleware::from_fn_with_state(
            state.clone(),
            rate_limit::limit,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES));

    let timeout = state.config.request_timeout;
    Router::new()
        .merge(v1_layers)
        .merge(SwaggerUi::new("/docs").url("/openapi.json", api))
        .fallback(not_found)
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn(run_to_completion))
        .layer(middleware::from_fn(move |req: Request, next: Next| time_limit(timeout, req, next)))
        // Outside the time limit, so that timed-out requests are counted too.
        .layer(middleware::from_fn(telemetry::track_requests))
        .layer(cors(&state.config))
        .layer(CatchPanicLayer::custom(|_panic| {
            ApiError::Internal(anyhow::anyhow!("a handler panicked")).into_response()
        }))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request| {
                let request_id = request
                    .headers()
                    .get(&REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id)
            }),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            header::COOKIE,
            HeaderName::from_static("stripe-signature"),
        ]))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}

/// Runs every handler to its end in a task of its own, even when the client goes away or the
/// time limit answers first. A handler dropped half-way through could leave a pooled database
/// connection inside a transaction it began (sqlx 0.8 loses track of a `BEGIN` whose answer
/// was still on the way), holding row locks that block every later request for that row.
async fn run_to_completion(request: Request, next: Next) -> Response {
    match tokio::spawn(next.run(request)).await {
        Ok(response) => response,
        Err(err) => {
            ApiError::Internal(anyhow::anyhow!("the request's task failed: {err}")).into_response()
        }
    }
}

/// Requests time out (CONTRACT §4) with a problem answer rather than a dropped connection.
async fn time_limit(limit: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Unavailable("the request took too long").into_response(),
    }
}

fn cors(config: &Config) -> CorsLayer {
    let origins: Vec<HeaderValue> = config
        .cors_allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PATCH,
            Method::PUT,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("x-client-info"),
            HeaderName::from_static("apikey"),
        ])
        .expose_headers([
            HeaderName::from_static("idempotent-replayed"),
            header::RETRY_AFTER,
            REQUEST_ID,
        ])
        .max_age(Duration::from_secs(600))
}

#[derive(Serialize, ToSchema)]
pub struct Status {
    /// `ok`, or what is wrong.
    pub status: &'static str,
}

/// Liveness: answers without touching the database.
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, body = Status)))]
pub async fn health() -> Json<Status> {
    Json(Status { status: "ok" })
}

/// Readiness: the database answers and every migration is applied.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses((status = 200, body = Status), (status = 503, body = Status))
)]
pub async fn ready(State(state): State<AppState>) -> Response {
    let status =
        match tokio::time::timeout(Duration::from_secs(2), db::migrations_current(&state.pool))
            .await
        {
            Ok(Ok(true)) => return Json(Status { status: "ok" }).into_response(),
            Ok(Ok(false)) => "migrations pending",
            Ok(Err(_)) | Err(_) => "database unavailable",
        };
    (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        Json(Status { status }),
    )
        .into_response()
}
