//! The router: the one place that knows every feature. It gathers each module's routes and
//! their OpenAPI document, and wraps them in the layers every request goes through.

use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower::{Layer, Service, ServiceExt};
use tower_http::cors::{AllowOrigin, CorsLayer};
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

/// The whole service: routes, documentation and what every request goes through.
///
/// `Router::layer` wraps every route in the layer, as a boxed service of its own that each
/// request clones, so only what needs the matched route is applied that way, as one layer:
/// [`every_request`] (metrics are labelled by route). The rest is [`App`], one service around
/// the router.
pub fn app(state: AppState) -> App {
    let (routes, _) = routes();
    let cors = cors(&state.config);
    let routed = Router::new()
        .merge(routes)
        .merge(SwaggerUi::new("/docs").external_url_unchecked("/openapi.json", openapi()))
        .fallback(not_found)
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), every_request))
        .with_state(state);
    App::new(routed, cors)
}

/// What every request goes through around the router, in one service rather than a stack of
/// layers (each of its own boxes a future, copies the answer, and some allocate per request):
///
/// - `Authorization`, `Cookie` and `Stripe-Signature` are marked sensitive, so that no log or
///   debug output ever prints them;
/// - a request without an `X-Request-Id` is given one, and the answer carries the request's
///   (docs/api.md, "Request ids");
/// - the request runs in a `request` span (method, path, request id); its start and end are
///   logged at debug level, and an answer of 5xx as an error (`response failed`);
/// - CORS (`CORS_ALLOWED_ORIGINS`): a request with an `Origin`, and every `OPTIONS`, goes
///   through tower-http's CORS service; any other request cannot be a CORS one, and gets the
///   headers that service gives such a request (`Vary`, `Access-Control-Expose-Headers`),
///   read from it once at start-up;
/// - bodies are limited to `BODY_LIMIT_BYTES`;
/// - a panic is answered with a 500 (handlers' own panics are caught closer, by [`RunToEnd`]).
///
/// The server clones it for every request, so its contents are shared behind one `Arc`.
#[derive(Clone)]
pub struct App(std::sync::Arc<Around>);

struct Around {
    routed: Router,
    cors: CorsLayer,
    /// What the CORS service adds to the answer of a request without an `Origin`.
    plain_cors_headers: axum::http::HeaderMap,
}

const SENSITIVE_HEADERS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    header::COOKIE,
    HeaderName::from_static("stripe-signature"),
];

impl App {
    fn new(routed: Router, cors: CorsLayer) -> Self {
        let plain_cors_headers = {
            use futures_util::FutureExt;
            let mut probe = cors.layer(tower::service_fn(|_: Request| async {
                Ok::<_, std::convert::Infallible>(Response::new(axum::body::Body::empty()))
            }));
            let Ok(answer) = probe
                .call(Request::new(axum::body::Body::empty()))
                .now_or_never()
                .expect("the CORS service answers at once");
            answer.headers().clone()
        };
        Self(std::sync::Arc::new(Around {
            routed,
            cors,
            plain_cors_headers,
        }))
    }

    /// The service `axum::serve` takes, handing each request its peer's address
    /// (`ConnectInfo`, which the rate limit reads).
    pub fn into_make_service_with_connect_info<C>(
        self,
    ) -> axum::extract::connect_info::IntoMakeServiceWithConnectInfo<Self, C> {
        axum::ServiceExt::<Request>::into_make_service_with_connect_info(self)
    }

    fn limited(
        &self,
    ) -> impl tower::Service<
        Request,
        Response = Response,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Send
    + 'static {
        DefaultBodyLimit::max(BODY_LIMIT_BYTES).layer(self.0.routed.clone())
    }
}

impl tower::Service<Request> for App {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        use futures_util::FutureExt;
        use tracing::Instrument;

        let headers = request.headers_mut();
        for name in SENSITIVE_HEADERS {
            if let header::Entry::Occupied(mut values) = headers.entry(name) {
                for value in values.iter_mut() {
                    value.set_sensitive(true);
                }
            }
        }
        let request_id = match headers.get(&REQUEST_ID) {
            Some(given) => given.clone(),
            None => {
                let made = telemetry::new_request_id();
                headers.insert(REQUEST_ID, made.clone());
                made
            }
        };
        let span = tracing::info_span!(
            "request",
            method = %request.method(),
            path = %request.uri().path(),
            request_id = request_id.to_str().unwrap_or_default(),
        );
        let plain =
            !request.headers().contains_key(header::ORIGIN) && request.method() != Method::OPTIONS;
        let answer = if plain {
            self.limited().oneshot(request).left_future()
        } else {
            self.0
                .cors
                .layer(self.limited())
                .oneshot(request)
                .right_future()
        };
        let plain_cors = plain.then(|| self.0.clone());

        let handled = async move {
            let started = std::time::Instant::now();
            tracing::debug!("started processing request");
            // A panic is answered like any 500: with the CORS headers and the request id.
            let mut response = match std::panic::AssertUnwindSafe(answer).catch_unwind().await {
                Ok(Ok(response)) => response,
                Err(_) => ApiError::Internal(anyhow::anyhow!("a handler panicked")).into_response(),
            };
            if let Some(around) = plain_cors {
                let headers = response.headers_mut();
                // As the CORS service adds them: `Vary` after any the answer has, any other
                // name in place of the answer's own.
                for name in around.plain_cors_headers.keys() {
                    let mut values = around.plain_cors_headers.get_all(name).iter();
                    if name != header::VARY
                        && let Some(first) = values.next()
                    {
                        headers.insert(name.clone(), first.clone());
                    }
                    for value in values {
                        headers.append(name.clone(), value.clone());
                    }
                }
            }
            if !response.headers().contains_key(&REQUEST_ID) {
                response.headers_mut().insert(REQUEST_ID, request_id);
            }
            let latency = started.elapsed();
            tracing::debug!(
                status = response.status().as_u16(),
                latency_ms = latency.as_secs_f64() * 1e3,
                "finished processing request"
            );
            if response.status().is_server_error() {
                tracing::error!(
                    status = response.status().as_u16(),
                    latency_ms = latency.as_secs_f64() * 1e3,
                    "response failed"
                );
            }
            Ok(response)
        }
        .instrument(span);
        handled.boxed()
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
/// - on `/v1/…`, its caller is identified (the token, verified once) and then the rate limit,
///   which counts per user when there is one, admits it or answers 429;
/// - its handler runs to its end, even when the client goes away or the time limit answers
///   first ([`RunToEnd`]): a spend the client gave up on still happens or not as a whole,
///   and its answer is stored under its Idempotency-Key for the retry.
async fn every_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.config.request_timeout;
    telemetry::track_requests(request, |mut request| async move {
        let handler = async move {
            if request.uri().path().starts_with("/v1/") {
                auth::identify(&state.verifier, &mut request).await;
                if let Err(refused) = rate_limit::admit(&state.rate_limiter, &request) {
                    return refused.into_response();
                }
            }
            next.run(request).await
        };
        let mut handler = RunToEnd(Some(Box::pin(handler)));
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

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::get;

    use super::*;

    /// `App` around a router of its own, without `every_request` (and so without its
    /// run-to-end guard), to see what `App` alone does.
    fn app_around(routed: Router) -> App {
        App::new(routed, CorsLayer::new())
    }

    async fn send(app: &App, request: Request) -> Response {
        let Ok(response) = app.clone().oneshot(request).await;
        response
    }

    #[tokio::test]
    async fn secrets_in_headers_are_marked_sensitive_before_any_handler_sees_them() {
        let app = app_around(Router::new().route(
            "/",
            get(|headers: HeaderMap| async move {
                let sensitive = ["authorization", "cookie", "stripe-signature"]
                    .iter()
                    .all(|name| headers.get_all(*name).iter().all(|v| v.is_sensitive()));
                let others = !headers["x-other"].is_sensitive();
                format!("{}", sensitive && others)
            }),
        ));
        let request = Request::builder()
            .uri("/")
            .header("authorization", "Bearer secret")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("stripe-signature", "t=1,v1=x")
            .header("x-other", "plain")
            .body(Body::empty())
            .unwrap();
        let response = send(&app, request).await;
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(&body[..], b"true");
    }

    #[tokio::test]
    async fn a_panic_outside_a_handler_guard_is_a_500_with_a_request_id() {
        let app = app_around(Router::new().route(
            "/",
            get(|| async {
                if true {
                    panic!("a handler without its guard");
                }
            }),
        ));
        let response = send(&app, Request::new(Body::empty())).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(response.headers().contains_key(&REQUEST_ID));
    }

    #[tokio::test]
    async fn the_request_id_is_the_callers_or_a_new_one_and_comes_back() {
        let app = app_around(Router::new().route(
            "/",
            get(|headers: HeaderMap| async move {
                headers[&REQUEST_ID].to_str().unwrap_or_default().to_owned()
            }),
        ));
        let given = Request::builder()
            .uri("/")
            .header("x-request-id", "abc-123")
            .body(Body::empty())
            .unwrap();
        let response = send(&app, given).await;
        assert_eq!(response.headers()[&REQUEST_ID], "abc-123");

        let response = send(&app, Request::new(Body::empty())).await;
        let returned = response.headers()[&REQUEST_ID].clone();
        let seen_by_handler = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(returned.as_bytes(), &seen_by_handler[..]);
        assert_eq!(returned.len(), 36, "a UUID");
    }
}
