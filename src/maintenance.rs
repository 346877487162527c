//! Maintenance (README, "Operations"): the daily, weekly and monthly tasks. The work itself is
//! in SQL, `public.maintenance_start`, `…_archive_batch` and `…_finish` (see the hardening
//! migration), which pg_cron jobs also call; this module runs them from the CLI and shows their
//! runs to admins. The one step SQL cannot do, reconciling with Stripe's events (daily, when
//! Stripe is configured), runs here and records itself in the run with
//! `public.maintenance_record_step` before the run finishes.

use std::fmt;

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::AdminCaller;
use crate::error::{ApiResult, Problem};
use crate::extract::{ApiQuery, List, PageParams};
use crate::state::AppState;
use crate::stripe::reconcile::{self, Reconciler};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Task {
    /// Reconciliation with Stripe (when configured), ledger check, unsettled Stripe events,
    /// expired idempotency records, ANALYZE.
    Daily,
    /// Slow queries, unused, duplicate and bloated indexes, tables without RLS.
    Weekly,
    /// Archive old credit transactions, in batches.
    Monthly,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Daily => "daily",
            Task::Weekly => "weekly",
            Task::Monthly => "monthly",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the monthly archival runs. What is left unset takes the database's defaults
/// (`public.maintenance_start` and `…_archive_batch`: 12 months, batches of 5000), which the
/// pg_cron jobs use too.
#[derive(Debug, Clone, Copy, Default)]
pub struct Archival {
    /// Transactions older than this many months move to the archive.
    pub older_than_months: Option<u32>,
    /// Rows moved per transaction.
    pub batch_size: Option<u32>,
    /// Pause between batches, to spread the load (seconds).
    pub pause_seconds: f64,
}

/// One recorded run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MaintenanceRun {
    pub id: i64,
    /// `daily`, `weekly` or `monthly`.
    pub task: String,
    #[serde(serialize_with = "crate::timestamps::utc")]
    pub started_at: DateTime<Utc>,
    #[serde(serialize_with = "crate::timestamps::optional_utc")]
    pub finished_at: Option<DateTime<Utc>>,
    /// `running`, `ok`, `findings`, `failed` or `interrupted`.
    pub outcome: String,
    /// What each step found, by step.
    #[schema(value_type = Object)]
    pub findings: serde_json::Value,
}

/// Runs `task` once on `conn`, which must not be inside a transaction: each step commits on
/// its own, so a run that dies keeps the archival batches it moved. The loop lives here (and in
/// the pg_cron jobs) because a function that pins its search_path cannot commit.
///
/// A daily run given a `reconciler` first reconciles with Stripe's events of the last 72 hours
/// (its own transactions, on the reconciler's pool); what it found is recorded with the run,
/// and a reconciliation that fails makes the run's outcome not `ok` while the other tasks
/// still run.
pub async fn run(
    conn: &mut PgConnection,
    task: Task,
    archival: Archival,
    reconciler: Option<Reconciler<'_>>,
) -> Result<MaintenanceRun, sqlx::Error> {
    let run_id = sqlx::query_scalar!(
        r#"select public.maintenance_start($1, make_interval(months => $2)) as "run_id!""#,
        task.as_str(),
        archival.older_than_months.map(|m| m as i32),
    )
    .fetch_one(&mut *conn)
    .await?;
    if task == Task::Daily
        && let Some(reconciler) = reconciler
    {
        let (outcome, details) = match reconciler.run(reconcile::DEFAULT_WINDOW).await {
            Ok(report) => {
                let mut details =
                    serde_json::to_value(&report.summary).expect("a summary is plain numbers");
                details["failures"] =
                    serde_json::json!(report.failures.iter().take(20).collect::<Vec<_>>());
                // Events left failed need a look (the unsettled-events step lists them too).
                let outcome = if report.succeeded() { "ok" } else { "findings" };
                (outcome, details)
            }
            Err(err) => {
                tracing::warn!(error = %err, "the daily reconciliation with Stripe failed");
                ("failed", serde_json::json!({"error": err.to_string()}))
            }
        };
        sqlx::query!(
            "select public.maintenance_record_step($1, 'reconcile', $2, $3)",
            run_id,
            outcome,
            details,
        )
        .execute(&mut *conn)
        .await?;
    }
    if task == Task::Monthly {
        loop {
            let moved = sqlx::query_scalar!(
                r#"select public.maintenance_archive_batch($1, $2) as "moved!""#,
                run_id,
                archival.batch_size.map(|b| b as i32),
            )
            .fetch_one(&mut *conn)
            .await?;
            if moved == 0 {
                break;
            }
            if let Ok(pause) = std::time::Duration::try_from_secs_f64(archival.pause_seconds) {
                tokio::time::sleep(pause).await;
            }
        }
    }
    let run = sqlx::query_as!(
        MaintenanceRun,
        r#"select id as "id!", task as "task!", started_at as "started_at!", finished_at,
                  outcome as "outcome!", findings as "findings!"
             from public.maintenance_finish($1)"#,
        run_id,
    )
    .fetch_one(&mut *conn)
    .await?;
    metrics::counter!("maintenance_runs_total", "task" => task.as_str(), "outcome" => run.outcome.clone()).increment(1);
    Ok(run)
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_runs))
}

/// Maintenance runs, newest first (from the CLI and from pg_cron alike).
#[utoipa::path(
    get,
    path = "/v1/admin/maintenance",
    tag = "admin",
    security(("bearer" = [])),
    params(PageParams),
    responses(
        (status = 200, body = List<MaintenanceRun>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_runs(
    State(state): State<AppState>,
    _admin: AdminCaller,
    ApiQuery(params): ApiQuery<PageParams>,
) -> ApiResult<Json<List<MaintenanceRun>>> {
    let page = params.check()?;
    let rows = sqlx::query_as!(
        MaintenanceRun,
        "select id, task, started_at, finished_at, outcome, findings from public.maintenance_runs
          where ($1::bigint is null or id < $1)
          order by id desc limit $2",
        page.after,
        page.limit + 1,
    )
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(List::from_rows(rows, page.limit, |r| {
        r.id.to_string()
    })))
}

/// Every outcome a run can have.
pub const OUTCOMES: &[&str] = &["ok", "findings", "failed", "interrupted", "running"];

/// The latest run of one task.
pub struct LastRun {
    pub task: String,
    pub outcome: String,
    /// When it finished (or started, if still running), as a Unix time.
    pub at: f64,
}

/// The latest run of each task, from the CLI and pg_cron alike.
pub async fn last_runs(pool: &crate::db::ServicePool) -> Result<Vec<LastRun>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"select distinct on (task) task, outcome,
                  extract(epoch from coalesce(finished_at, started_at))::float8 as "at!"
             from public.maintenance_runs order by task, id desc"#
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| LastRun {
            task: r.task,
            outcome: r.outcome,
            at: r.at,
        })
        .collect())
}
