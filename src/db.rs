//! Connections and migrations. Pooled connections act as `service_role` (docs/api.md, "Authentication"); user
//! reads go through the `*_as_user` functions, which switch to `authenticated` with the
//! token's claims for the duration of the call, so `auth.uid()` and RLS decide what is visible.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection, PgPool};

use crate::error::{ApiError, ApiResult};

/// The migrations of `migrations/`, embedded in the binary. Tests and the CLI share it.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Parses `DATABASE_URL`.
pub fn connect_options(url: &str) -> anyhow::Result<PgConnectOptions> {
    PgConnectOptions::from_str(url).context("DATABASE_URL is not a valid PostgreSQL URL")
}

/// Creates the database named by `options` when it does not exist yet.
pub async fn ensure_database(options: &PgConnectOptions) -> anyhow::Result<()> {
    let name = options.get_database().unwrap_or("postgres").to_owned();
    if PgConnection::connect_with(options).await.is_ok() {
        return Ok(());
    }
    let mut admin = PgConnection::connect_with(&options.clone().database("postgres"))
        .await
        .context("could not connect to PostgreSQL (database postgres) to create the database")?;
    let exists = sqlx::query_scalar!(
        r#"select exists (select 1 from pg_database where datname = $1) as "exists!""#,
        &name
    )
    .fetch_one(&mut admin)
    .await?;
    if !exists {
        let statement = format!("create database \"{}\"", name.replace('"', "\"\""));
        match admin.execute(statement.as_str()).await {
            Ok(_) => tracing::info!(database = %name, "created the database"),
            // Another process created it meanwhile.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e).context("could not create the database"),
        }
    }
    Ok(())
}

/// Applies pending migrations as the connecting role (the owner of the schema).
pub async fn migrate(options: &PgConnectOptions) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect_with(options)
        .await
        .context("could not connect to the database")?;
    MIGRATOR.run(&mut conn).await.context("migrations failed")?;
    conn.close().await.ok();
    Ok(())
}

/// Whether every embedded migration has been applied successfully.
pub async fn migrations_current(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied =
        sqlx::query_scalar!("select max(version) from public._sqlx_migrations where success")
            .fetch_one(pool)
            .await?;
    Ok(applied == Some(latest))
}

/// The service's pool: every connection acts as `service_role`, and no statement runs longer
/// than `statement_timeout` (`DATABASE_STATEMENT_TIMEOUT_SECONDS`; zero for no limit), so one
/// stuck statement cannot hold a pooled connection for the whole request time limit.
pub async fn connect(
    options: PgConnectOptions,
    max_connections: u32,
    statement_timeout: Duration,
) -> anyhow::Result<PgPool> {
    Ok(pool_options(max_connections, statement_timeout)
        .connect_with(options)
        .await?)
}

/// A connection idle for longer than this is pinged before it is handed out.
pub const IDLE_PING_AFTER: Duration = Duration::from_secs(1);

fn pool_options(max_connections: u32, statement_timeout: Duration) -> PgPoolOptions {
    // One round trip for both settings (the simple query protocol takes several statements).
    let session = format!(
        "set role service_role; set statement_timeout = {}",
        statement_timeout.as_millis()
    );
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        // A ping before every checkout would add a round trip to every request. A connection
        // in steady use is known to be alive; one that sat idle may have been cut while it
        // waited (a restart of PostgreSQL, a pooler or a firewall dropping it), so it is
        // pinged first, and replaced when the ping fails. A connection that dies in use fails
        // its request (a 503) and is dropped when it comes back: sqlx pings on release.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= IDLE_PING_AFTER {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .after_connect(move |conn, _meta| {
            let session = session.clone();
            Box::pin(async move {
                conn.execute(session.as_str()).await?;
                Ok(())
            })
        })
}

/// How many times a unit of work runs at most when the database rolls it back for a
/// serialization failure or a deadlock.
pub const CONFLICT_ATTEMPTS: u32 = 3;

/// Runs `unit`, a whole unit of work (its transaction from `BEGIN` to `COMMIT`), and runs it
/// again from the start when the database rolled it back for a conflict with another
/// transaction ([`ApiError::Conflict`]): nothing of it was committed, so nothing is applied
/// twice. After [`CONFLICT_ATTEMPTS`] the conflict is answered as a 503.
pub async fn retrying_conflicts<T, Unit>(mut unit: impl FnMut() -> Unit) -> ApiResult<T>
where
    Unit: Future<Output = ApiResult<T>>,
{
    let mut attempt = 1;
    loop {
        match unit().await {
            Err(ApiError::Conflict) if attempt < CONFLICT_ATTEMPTS => {
                tracing::info!(
                    attempt,
                    "the database rolled the work back (serialization failure or deadlock); \
                     running it again"
                );
                // A short, growing pause lets the transaction that won finish first.
                tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}
