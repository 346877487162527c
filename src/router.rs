//! The router: the one place that knows every feature. It gathers each module's routes and
//! their OpenAPI document, and wraps them in the layers every request goes through.

use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::config::Config;
use crate::error::ApiError;
use crate::extract::BODY_LIMIT_BYTES;
use crate::state::AppState;
use crate::{
    admin, ads, auth, credits, holds, images, live_balance, lots, maintenance, openapi, operations,
    packs, profiles, rate_limit, stripe, telemetry,
};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The routes of the API (docs/api.md, "Routes") and their OpenAPI document.
pub fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (api_router, api) = OpenApiRouter::with_openapi(openapi::base())
        .merge(profiles::router())
        .merge(credits::router())
        .merge(holds::router())
        .merge(lots::router())
        .merge(ads::router())
        .merge(packs::router())
        .merge(admin::router())
        .merge(stripe::router())
        .merge(images::router())
        .merge(maintenance::router())
        .merge(operations::router())
        .merge(live_balance::router())
        .split_for_parts();
    (api_router, api)
}

/// The complete OpenAPI document, as served at `/openapi.json` and committed as
/// `docs/openapi.json`.
pub fn openapi() -> serde_json::Value {
    let generated = serde_json::to_value(routes().1).expect("the document serializes");
    openapi::exact(generated)
}

/// The whole service: routes, documentation and the layers every request goes through.
///
/// `Router::layer` wraps every route in the layer, as a boxed service of its own that each
/// request clones, so only what needs the matched route is applied that way: the `/v1`
/// middleware (the caller and the rate limit) and [`every_request`] (metrics are labelled
/// by route). The rest is one stack around the router, built once.
pub fn app(state: AppState) -> Router {
    let (routes, _) = routes();
    let v1 = routes.layer(middleware::from_fn_with_state(state.clone(), v1_request));

    let timeout = state.config.request_timeout;
    let cors = cors(&state.config);
    let routed = Router::new()
        .merge(v1)
        .merge(SwaggerUi::new("/docs").external_url_unchecked("/openapi.json", openapi()))
        .fallback(not_found)
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            every_request(timeout, req, next)
        }))
        .with_state(state);
    let around = ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            header::COOKIE,
            HeaderName::from_static("stripe-signature"),
        ]))
        .layer(SetRequestIdLayer::new(REQUEST_ID, telemetry::MakeRequestIds))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
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
        .layer(CatchPanicLayer::custom(|_panic| {
            ApiError::Internal(anyhow::anyhow!("a handler panicked")).into_response()
        }))
        .layer(cors)
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .service(routed);
    Router::new().fallback_service(around)
}

/// Every `/v1` route: who is calling (the token, verified once), then the rate limit, which
/// counts per user when there is one.
async fn v1_request(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    auth::identify(&state.verifier, &mut request).await;
    match rate_limit::admit(&state.rate_limiter, &request) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}

/// What every routed request goes through, in one layer (each layer of its own costs a
/// boxed future and a copy of the route per request):
///
/// - it is counted and timed (outside the time limit, so that timed-out requests are counted
///   too);
/// - it times out (docs/api.md, "Request timeout") with a problem answer rather than a dropped
///   connection;
/// - its handler runs to its end, even when the client goes away or the time limit answers
///   first ([`RunToEnd`]): a spend the client gave up on still happens or not as a whole,
///   and its answer is stored under its Idempotency-Key for the retry.
async fn every_request(limit: Duration, request: Request, next: Next) -> Response {
    telemetry::track_requests(request, |request| async move {
        let mut handler = RunToEnd(Some(Box::pin(next.run(request))));
        match tokio::time::timeout(limit, &mut handler).await {
            Ok(response) => response,
            Err(_) => ApiError::Unavailable("the request took too long").into_response(),
        }
    })
    .await
}

/// A handler's future, run in the request's own task while someone waits for its answer.
/// Dropped before it finished (the client hung up, or the time limit answered), it moves to a
/// task of its own and runs to its end there: a pinned box can change hands without moving
/// the future. Most requests finish where they started, with no task spawned and no other
/// worker woken.
struct RunToEnd(Option<std::pin::Pin<Box<dyn Future<Output = Response> + Send>>>);

impl Future for RunToEnd {
    type Output = Response;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Response> {
        let mut handler = self
            .0
            .take()
            .expect("a finished handler is not polled again");
        // A panic is answered here, as a 500 that is counted like any answer; the handler is
        // not run again.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.as_mut().poll(cx))) {
            Ok(std::task::Poll::Pending) => {
                self.0 = Some(handler);
                std::task::Poll::Pending
            }
            Ok(std::task::Poll::Ready(response)) => std::task::Poll::Ready(response),
            Err(_) => std::task::Poll::Ready(
                ApiError::Internal(anyhow::anyhow!("a handler panicked")).into_response(),
            ),
        }
    }
}

impl Drop for RunToEnd {
    fn drop(&mut self) {
        if let Some(handler) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(handler);
        }
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
            // Sent by event stream clients when they resume (a fetch-based one asks first).
            HeaderName::from_static("last-event-id"),
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
