//! Operations: liveness, readiness and the Prometheus scrape. Liveness never touches the
//! database; a scrape never queries it either (the maintenance gauges are refreshed in the
//! background by [`refresh_maintenance_gauges`]).

use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, database_fault};
use crate::state::AppState;
use crate::{db, maintenance};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(metrics))
}

/// `/metrics` alone, for `METRICS_BIND_ADDR`.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(state)
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

/// Readiness: the database answers, every migration is applied, the process is not stopping.
///
/// After SIGTERM it answers 503 `draining` while requests are still served.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses((status = 200, body = Status), (status = 503, body = Status))
)]
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Status { status: "draining" }),
        )
            .into_response();
    }
    let status = match tokio::time::timeout(Duration::from_secs(2), readiness(&state.pool)).await {
        Ok(Ok(true)) => return Json(Status { status: "ok" }).into_response(),
        Ok(Ok(false)) => "migrations pending",
        Ok(Err(_)) | Err(_) => "database unavailable",
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(Status { status })).into_response()
}

/// Whether the migrations are current, asked again while the answer is a database fault: a
/// pooled connection that died with a restart of PostgreSQL fails once and is dropped, and
/// says nothing of the database now, which the next connection (a new one, if need be) asks.
/// The caller's time limit ends the loop while the database is really down.
async fn readiness(pool: &db::ServicePool) -> Result<bool, sqlx::Error> {
    loop {
        match db::migrations_current(pool).await {
            Err(err) if database_fault(&err).is_some() => {
                tracing::debug!(error = %err, "readiness: a database fault; asking again");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answer => return answer,
        }
    }
}

/// Prometheus text exposition: requests by route and status, pool use, credits by source,
/// Stripe events, maintenance runs. With `METRICS_BIND_ADDR` set it is served there instead,
/// and with `METRICS_TOKEN` set it requires that bearer token.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String),
        (status = 401, description = "`METRICS_TOKEN` is set and the bearer token is not it", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "Served on `METRICS_BIND_ADDR` instead", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn metrics(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    if state.config.metrics.bind_addr.is_some() {
        return ApiError::NotFound("route").into_response();
    }
    scrape(State(state), headers).await
}

async fn scrape(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    if let Some(token) = &state.config.metrics.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
            return ApiError::InvalidToken("this scrape needs METRICS_TOKEN").into_response();
        }
    }
    let size = state.pool.size();
    let idle = state.pool.num_idle() as u32;
    metrics::gauge!("db_pool_connections", "state" => "idle").set(f64::from(idle));
    metrics::gauge!("db_pool_connections", "state" => "in_use")
        .set(f64::from(size.saturating_sub(idle)));
    metrics::gauge!("db_pool_max_connections").set(f64::from(state.pool.max_connections()));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Sets the maintenance gauges from the recorded runs (pg_cron's as well as the CLI's): one
/// query for every task. `serve` calls it every minute.
pub async fn refresh_maintenance_gauges(pool: &db::ServicePool) -> Result<(), sqlx::Error> {
    for run in maintenance::last_runs(pool).await? {
        metrics::gauge!("maintenance_last_run_timestamp_seconds", "task" => run.task.clone())
            .set(run.at);
        for candidate in maintenance::OUTCOMES {
            metrics::gauge!("maintenance_last_run_outcome", "task" => run.task.clone(), "outcome" => *candidate)
                .set(if *candidate == run.outcome { 1.0 } else { 0.0 });
        }
    }
    Ok(())
}
