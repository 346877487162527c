//! Connections and migrations. Pooled connections act as `service_role` (docs/api.md, "Authentication"); user
//! reads go through the `*_as_user` functions, which switch to `authenticated` with the
//! token's claims for the duration of the call, so `auth.uid()` and RLS decide what is visible.
//!
//! The service's queries go through [`ServicePool`], which works the same behind a
//! transaction-mode pooler (`DATABASE_POOL_MODE=transaction`, README "Running several"): there a
//! client connection's consecutive transactions may run on different server connections, so
//! nothing is relied on between transactions. Every unit of work is a transaction of its own
//! that begins by taking the role and the statement time limit (`set local`), and no prepared
//! statement is used after its transaction (those left behind are deallocated when the next
//! transaction begins on that server connection).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use sqlx::postgres::{
    PgConnectOptions, PgPoolOptions, PgQueryResult, PgRow, PgStatement, PgTypeInfo,
};
use sqlx::{
    Connection, Describe, Either, Execute, Executor, PgConnection, PgPool, Postgres, Transaction,
};

use crate::config::PoolMode;
use crate::error::{ApiError, ApiResult};

/// The `application_name` of the service's connections, unless the URL names another: how they
/// are picked out in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "amethyst-credits";

/// The migrations of `migrations/`, embedded in the binary. Tests and the CLI share it.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Parses `DATABASE_URL` (or `DATABASE_DIRECT_URL`); the connections are named
/// [`APPLICATION_NAME`] unless the URL says otherwise.
pub fn connect_options(url: &str) -> anyhow::Result<PgConnectOptions> {
    let options = PgConnectOptions::from_str(url)
        .context("DATABASE_URL (or DATABASE_DIRECT_URL) is not a valid PostgreSQL URL")?;
    Ok(if options.get_application_name().is_none() {
        options.application_name(APPLICATION_NAME)
    } else {
        options
    })
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
pub async fn migrations_current(pool: &ServicePool) -> Result<bool, sqlx::Error> {
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied =
        sqlx::query_scalar!("select max(version) from public._sqlx_migrations where success")
            .fetch_one(pool)
            .await?;
    Ok(applied == Some(latest))
}

/// The service's pool for a direct connection or a session-mode pooler: every connection acts
/// as `service_role`, and no statement runs longer than `statement_timeout`
/// (`DATABASE_STATEMENT_TIMEOUT_SECONDS`; zero for no limit), so one stuck statement cannot
/// hold a pooled connection for the whole request time limit.
pub async fn connect(
    options: PgConnectOptions,
    max_connections: u32,
    statement_timeout: Duration,
) -> anyhow::Result<PgPool> {
    connect_in_mode(
        options,
        max_connections,
        statement_timeout,
        PoolMode::Session,
    )
    .await
}

/// The service's pool for `DATABASE_POOL_MODE`. In transaction mode the connections carry no
/// session state (no `set role`, no prepared statement kept in a cache): [`ServicePool`] sets
/// the role and the time limit in every transaction instead.
pub async fn connect_in_mode(
    options: PgConnectOptions,
    max_connections: u32,
    statement_timeout: Duration,
    mode: PoolMode,
) -> anyhow::Result<PgPool> {
    let pool = match mode {
        PoolMode::Session => pool_options(max_connections, Some(statement_timeout)),
        PoolMode::Transaction => pool_options(max_connections, None),
    };
    let options = match mode {
        PoolMode::Session => options,
        // No statement is kept for a later transaction, which may run on another server
        // connection where it does not exist (or where another client's statement of the
        // same name does).
        PoolMode::Transaction => options.statement_cache_capacity(0),
    };
    Ok(pool.connect_with(options).await?)
}

/// A connection idle for longer than this is pinged before it is handed out.
pub const IDLE_PING_AFTER: Duration = Duration::from_secs(1);

/// With `statement_timeout`, each new connection takes the role and the limit for its whole
/// session (session mode); without, it is left as it connected (transaction mode).
fn pool_options(max_connections: u32, statement_timeout: Option<Duration>) -> PgPoolOptions {
    // One round trip for both settings (the simple query protocol takes several statements).
    let session = statement_timeout.map(|timeout| {
        format!(
            "set role service_role; set statement_timeout = {}",
            timeout.as_millis()
        )
    });
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
                if let Some(session) = session {
                    conn.execute(session.as_str()).await?;
                }
                Ok(())
            })
        })
}

/// The pool every query of the service goes through, whatever `DATABASE_POOL_MODE` says.
///
/// - `session`: the connections took the role and the time limit when they connected, and
///   keep their prepared statements: a query is one round trip (Bind/Execute/Sync), as with a
///   plain [`PgPool`].
/// - `transaction`: a query on the pool runs in a transaction of its own, begun with
///   `set local role service_role` and `set local statement_timeout` and committed before the
///   answer is returned (four round trips: begin, Parse, Bind/Execute, commit; sqlx sends
///   Parse and Bind with a Sync each, which a transaction-mode pooler may route to different
///   server connections outside a transaction). [`ServicePool::begin`] begins the same way.
///   Prepared statements are not cached (`statement_cache_capacity(0)`), and those a
///   transaction leaves behind are deallocated when the next one begins on that server
///   connection, so none is ever found under another client's name.
#[derive(Clone, Debug)]
pub struct ServicePool {
    pool: PgPool,
    mode: PoolMode,
    /// What begins a transaction in transaction mode (shared: the pool is cloned per query).
    begin: Arc<str>,
}

impl ServicePool {
    /// `pool` comes from [`connect_in_mode`] with the same `mode`.
    pub fn new(pool: PgPool, mode: PoolMode, statement_timeout: Duration) -> Self {
        let begin = format!(
            "begin; set local role service_role; set local statement_timeout = {}; deallocate all",
            statement_timeout.as_millis()
        );
        ServicePool {
            pool,
            mode,
            begin: Arc::from(begin),
        }
    }

    pub fn mode(&self) -> PoolMode {
        self.mode
    }

    /// The pool underneath, for its size and settings.
    pub fn inner(&self) -> &PgPool {
        &self.pool
    }

    /// A transaction acting as `service_role` under the statement time limit.
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        match self.mode {
            PoolMode::Session => self.pool.begin().await,
            PoolMode::Transaction => self.pool.begin_with(self.begin.to_string()).await,
        }
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl<'p> Executor<'p> for &'_ ServicePool {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        match self.mode {
            PoolMode::Session => self.pool.fetch_many(query),
            PoolMode::Transaction => {
                let pool = self.clone();
                futures_util::stream::once(async move {
                    let mut tx = pool.begin().await?;
                    let steps: Vec<_> = tx.fetch_many(query).try_collect().await?;
                    tx.commit().await?;
                    Ok::<_, sqlx::Error>(futures_util::stream::iter(steps.into_iter().map(Ok)))
                })
                .try_flatten()
                .boxed()
            }
        }
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        match self.mode {
            PoolMode::Session => self.pool.fetch_optional(query),
            PoolMode::Transaction => {
                let pool = self.clone();
                Box::pin(async move {
                    let mut tx = pool.begin().await?;
                    let row = tx.fetch_optional(query).await?;
                    tx.commit().await?;
                    Ok(row)
                })
            }
        }
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement<'q>, sqlx::Error>>
    where
        'p: 'e,
    {
        self.pool.prepare_with(sql, parameters)
    }

    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> BoxFuture<'e, Result<Describe<Postgres>, sqlx::Error>>
    where
        'p: 'e,
    {
        self.pool.describe(sql)
    }
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
