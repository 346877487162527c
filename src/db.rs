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

use std::borrow::Cow;
use std::collections::VecDeque;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use sqlx::postgres::{
    PgConnectOptions, PgQueryResult, PgRow, PgStatement, PgTransactionManager, PgTypeInfo,
};
use sqlx::{
    Connection, Describe, Either, Execute, Executor, PgConnection, Postgres, Row,
    TransactionManager,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
) -> anyhow::Result<ServicePool> {
    connect_in_mode(
        options,
        max_connections,
        statement_timeout,
        PoolMode::Session,
    )
    .await
}

/// The service's pool for `DATABASE_POOL_MODE`, with one connection opened to prove the
/// settings. In transaction mode the connections carry no session state (no `set role`, no
/// prepared statement kept in a cache): [`ServicePool`] sets the role and the time limit in
/// every transaction instead.
pub async fn connect_in_mode(
    options: PgConnectOptions,
    max_connections: u32,
    statement_timeout: Duration,
    mode: PoolMode,
) -> anyhow::Result<ServicePool> {
    let pool = ServicePool::lazy(options, max_connections, statement_timeout, mode);
    let mut first = pool.acquire().await?;
    first.finished();
    Ok(pool)
}

/// A connection idle for longer than this is pinged before it is handed out.
pub const IDLE_PING_AFTER: Duration = Duration::from_secs(1);
/// How long a request waits for a connection (a free one, or a new one to open).
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection idle for longer than this is closed: a quiet service holds few.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// A connection older than this is closed when it comes back, and a new one opened in its
/// place when needed (the server's memory for a session grows with what it ran).
pub const MAX_LIFETIME: Duration = Duration::from_secs(1800);
/// How long a connection that came back in an unknown state gets to be reset ([`reset`])
/// before it is closed.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// The pool every query of the service goes through, whatever `DATABASE_POOL_MODE` says.
///
/// - `session`: the connections took the role and the time limit when they connected, and
///   keep their prepared statements: a query is one round trip (Bind/Execute/Sync).
/// - `transaction`: a query on the pool runs in a transaction of its own, begun with
///   `set local role service_role` and `set local statement_timeout` and committed before the
///   answer is returned (four round trips: begin, Parse, Bind/Execute, commit; sqlx sends
///   Parse and Bind with a Sync each, which a transaction-mode pooler may route to different
///   server connections outside a transaction). [`ServicePool::begin`] begins the same way.
///   Prepared statements are not cached (`statement_cache_capacity(0)`), and those a
///   transaction leaves behind are deallocated when the next one begins on that server
///   connection, so none is ever found under another client's name.
///
/// A connection goes back to the pool without a further round trip when the work on it ran
/// to its end ([`ServiceConnection::finished`], which the pool's own queries and a committed
/// [`ServiceTransaction`] call). One that comes back any other way (an error, a request
/// abandoned half-way, a transaction dropped without commit) is reset first (its transaction
/// rolled back, [`reset`]), and closed when that fails. A connection idle for
/// [`IDLE_PING_AFTER`] is pinged before it is handed out: a restart or a pooler may have cut it.
/// Waiters are served first come, first served.
#[derive(Clone)]
pub struct ServicePool {
    shared: Arc<PoolShared>,
}

struct PoolShared {
    options: PgConnectOptions,
    mode: PoolMode,
    /// Run once on every new connection (session mode): the role and the time limit.
    session: Option<String>,
    /// What begins a transaction in transaction mode (`None`: a plain `BEGIN`).
    begin: Option<Cow<'static, str>>,
    max_connections: u32,
    permits: Arc<Semaphore>,
    /// Connections ready for use; the most recently used last (handed out first, so a quiet
    /// pool lets the others reach [`IDLE_TIMEOUT`]).
    idle: Mutex<VecDeque<Idle>>,
    /// Open connections, idle or in use.
    open: Arc<AtomicU32>,
    closed: AtomicBool,
}

struct Idle {
    conn: Live,
    since: Instant,
}

/// An open connection, counted in [`PoolShared::open`] while it exists.
struct Live {
    conn: PgConnection,
    born: Instant,
    _counted: Counted,
}

impl std::fmt::Debug for ServicePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServicePool")
            .field("mode", &self.shared.mode)
            .field("max_connections", &self.shared.max_connections)
            .field("open", &self.size())
            .field("idle", &self.num_idle())
            .finish()
    }
}

impl ServicePool {
    /// A pool that opens its connections when they are first needed.
    pub fn lazy(
        options: PgConnectOptions,
        max_connections: u32,
        statement_timeout: Duration,
        mode: PoolMode,
    ) -> Self {
        let timeout = statement_timeout.as_millis();
        let (options, session, begin) = match mode {
            // One round trip for both settings (the simple query protocol takes several
            // statements).
            PoolMode::Session => (
                options,
                Some(format!(
                    "set role service_role; set statement_timeout = {timeout}"
                )),
                None,
            ),
            // No statement is kept for a later transaction, which may run on another server
            // connection where it does not exist (or where another client's statement of the
            // same name does).
            PoolMode::Transaction => (
                options.statement_cache_capacity(0),
                None,
                Some(Cow::Owned(format!(
                    "begin; set local role service_role; set local statement_timeout = {timeout}; \
                     deallocate all"
                ))),
            ),
        };
        ServicePool {
            shared: Arc::new(PoolShared {
                options,
                mode,
                session,
                begin,
                max_connections,
                permits: Arc::new(Semaphore::new(max_connections as usize)),
                idle: Mutex::new(VecDeque::new()),
                open: Arc::new(AtomicU32::new(0)),
                closed: AtomicBool::new(false),
            }),
        }
    }

    pub fn mode(&self) -> PoolMode {
        self.shared.mode
    }

    /// Open connections, idle or in use.
    pub fn size(&self) -> u32 {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Connections waiting for work.
    pub fn num_idle(&self) -> usize {
        self.shared.idle().len()
    }

    pub fn max_connections(&self) -> u32 {
        self.shared.max_connections
    }

    /// A connection of the pool, acting as `service_role` in session mode (in transaction
    /// mode, only inside [`ServiceConnection::begin`]). Waits [`ACQUIRE_TIMEOUT`] at most.
    pub async fn acquire(&self) -> Result<ServiceConnection, sqlx::Error> {
        tokio::time::timeout(ACQUIRE_TIMEOUT, self.acquire_now())
            .await
            .unwrap_or(Err(sqlx::Error::PoolTimedOut))
    }

    async fn acquire_now(&self) -> Result<ServiceConnection, sqlx::Error> {
        let permit = Arc::clone(&self.shared.permits)
            .acquire_owned()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        loop {
            let Some(Idle { mut conn, since }) = self.shared.idle().pop_back() else {
                break;
            };
            if since.elapsed() < IDLE_PING_AFTER || conn.conn.ping().await.is_ok() {
                return Ok(self.hand_out(conn, permit));
            }
            // Cut while it waited; the next one may have been too.
        }
        let conn = self.shared.open().await?;
        Ok(self.hand_out(conn, permit))
    }

    /// A transaction acting as `service_role` under the statement time limit, on a connection
    /// of its own.
    pub async fn begin(&self) -> Result<ServiceTransaction, sqlx::Error> {
        self.acquire().await?.begin().await
    }

    /// Closes the idle connections and every connection that comes back; waiters and later
    /// callers get [`sqlx::Error::PoolClosed`].
    pub async fn close(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.permits.close();
        let idle: Vec<Idle> = self.shared.idle().drain(..).collect();
        for Idle { conn, .. } in idle {
            conn.close().await;
        }
    }

    fn hand_out(&self, conn: Live, permit: OwnedSemaphorePermit) -> ServiceConnection {
        ServiceConnection {
            conn: Some(conn),
            permit: Some(permit),
            shared: Arc::clone(&self.shared),
            finished: false,
        }
    }
}

impl PoolShared {
    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn open(&self) -> Result<Live, sqlx::Error> {
        let mut conn = PgConnection::connect_with(&self.options).await?;
        if let Some(session) = &self.session {
            conn.execute(session.as_str()).await?;
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(Live {
            conn,
            born: Instant::now(),
            _counted: Counted(Arc::clone(&self.open)),
        })
    }

    /// Puts a connection in a known state back among the idle ones (or closes it, when the
    /// pool is closed), and closes the longest idle one when it has waited too long.
    fn park(&self, conn: Live) {
        let stale = {
            let mut idle = self.idle();
            if self.closed.load(Ordering::SeqCst) {
                Some(conn)
            } else {
                idle.push_back(Idle {
                    conn,
                    since: Instant::now(),
                });
                match idle.front() {
                    Some(oldest) if oldest.since.elapsed() > IDLE_TIMEOUT => {
                        idle.pop_front().map(|idle| idle.conn)
                    }
                    _ => None,
                }
            }
        };
        if let Some(stale) = stale {
            spawn_or_drop(stale.close());
        }
    }
}

/// Counts an open connection in [`PoolShared::open`] for as long as it exists.
struct Counted(Arc<AtomicU32>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Live {
    /// Says goodbye to the server (a Terminate message) rather than just hanging up.
    async fn close(self) {
        let Live { conn, _counted, .. } = self;
        conn.close().await.ok();
    }
}

/// Runs `work` on the current runtime; outside one (a process shutting down), drops it.
fn spawn_or_drop(work: impl Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(work);
    }
}

/// A connection taken from a [`ServicePool`]; it goes back when dropped. Acts as a
/// [`PgConnection`] (for `sqlx` queries: `&mut *conn`).
pub struct ServiceConnection {
    conn: Option<Live>,
    permit: Option<OwnedSemaphorePermit>,
    shared: Arc<PoolShared>,
    /// Set by [`ServiceConnection::finished`], cleared by any use of the connection.
    finished: bool,
}

impl ServiceConnection {
    /// Says the work on this connection ran to its end (every answer read, no transaction
    /// open): it goes back to the pool as it is, without a round trip to check it. Any later
    /// use of the connection takes this back.
    pub fn finished(&mut self) {
        self.finished = true;
    }

    /// Begins a transaction acting as `service_role` under the statement time limit.
    pub async fn begin(mut self) -> Result<ServiceTransaction, sqlx::Error> {
        let statement = self.shared.begin.clone();
        PgTransactionManager::begin(&mut self, statement).await?;
        Ok(ServiceTransaction { conn: self })
    }

    fn live(&self) -> &Live {
        self.conn
            .as_ref()
            .expect("a connection is present until dropped")
    }
}

impl std::ops::Deref for ServiceConnection {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.live().conn
    }
}

impl std::ops::DerefMut for ServiceConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.finished = false;
        &mut self
            .conn
            .as_mut()
            .expect("a connection is present until dropped")
            .conn
    }
}

impl Drop for ServiceConnection {
    fn drop(&mut self) {
        let Some(mut live) = self.conn.take() else {
            return;
        };
        // Released only once the connection is idle again (or closed): a waiter finds it.
        let permit = self.permit.take();
        let shared = Arc::clone(&self.shared);
        let in_transaction = PgTransactionManager::get_transaction_depth(&live.conn) > 0;
        if live.born.elapsed() >= MAX_LIFETIME {
            spawn_or_drop(async move {
                live.close().await;
                drop(permit);
            });
        } else if self.finished && !in_transaction {
            shared.park(live);
        } else {
            // An error, a request abandoned half-way, or a transaction neither committed nor
            // rolled back: queue the rollback, and reset the connection before reuse.
            while PgTransactionManager::get_transaction_depth(&live.conn) > 0 {
                PgTransactionManager::start_rollback(&mut live.conn);
            }
            spawn_or_drop(async move {
                let reset = tokio::time::timeout(RESET_TIMEOUT, reset(&mut live.conn)).await;
                if matches!(reset, Ok(Ok(()))) {
                    shared.park(live);
                }
                drop(permit);
            });
        }
    }
}

/// Brings a connection given back in an unknown state to a known one, or fails: sends what
/// it has queued (a rollback), and rolls back a transaction the server still has open that
/// the connection lost track of (sqlx counts a `BEGIN` only once its answer is read, so one
/// abandoned in flight leaves the server inside a transaction with nothing queued to end it).
/// One round trip when no transaction is open: the first statement of a transaction is the
/// only one whose `now()` equals its `statement_timestamp()`.
fn reset(conn: &mut PgConnection) -> BoxFuture<'_, Result<(), sqlx::Error>> {
    Box::pin(async move {
        let outside_transaction = match conn.fetch_one("select now() = statement_timestamp()").await
        {
            Ok(row) => row.try_get::<bool, _>(0)?,
            // An aborted transaction refuses every statement until it is rolled back.
            Err(sqlx::Error::Database(_)) => false,
            Err(e) => return Err(e),
        };
        if !outside_transaction {
            conn.execute("rollback").await?;
        }
        Ok(())
    })
}

/// A transaction on a connection of its own, from [`ServicePool::begin`]. Dropped without
/// [`commit`](Self::commit), it is rolled back. Acts as a [`PgConnection`] (`&mut *tx`);
/// `(&mut *tx).begin()` opens a savepoint.
pub struct ServiceTransaction {
    conn: ServiceConnection,
}

impl ServiceTransaction {
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        PgTransactionManager::commit(&mut self.conn).await?;
        self.conn.finished();
        Ok(())
    }

    pub async fn rollback(mut self) -> Result<(), sqlx::Error> {
        PgTransactionManager::rollback(&mut self.conn).await?;
        self.conn.finished();
        Ok(())
    }
}

impl std::ops::Deref for ServiceTransaction {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for ServiceTransaction {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

/// A connection of the pool ready for one unit of work, run the way the pool's own queries
/// run: as it is in session mode, inside a transaction of its own (begun as
/// [`ServicePool::begin`] begins) in transaction mode. [`Unit::done`] ends the work.
pub enum Unit {
    Plain(ServiceConnection),
    Transaction(ServiceTransaction),
}

impl Unit {
    /// Makes `conn`, taken from this `pool`, ready for one unit of work.
    pub async fn start(pool: &ServicePool, conn: ServiceConnection) -> Result<Unit, sqlx::Error> {
        Ok(match pool.mode() {
            PoolMode::Session => Unit::Plain(conn),
            PoolMode::Transaction => Unit::Transaction(conn.begin().await?),
        })
    }

    /// The work ran to its end: commits it (transaction mode) and gives the connection back.
    pub async fn done(self) -> Result<(), sqlx::Error> {
        match self {
            Unit::Plain(mut conn) => {
                conn.finished();
                Ok(())
            }
            Unit::Transaction(tx) => tx.commit().await,
        }
    }
}

impl std::ops::Deref for Unit {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match self {
            Unit::Plain(conn) => conn,
            Unit::Transaction(tx) => tx,
        }
    }
}

impl std::ops::DerefMut for Unit {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            Unit::Plain(conn) => conn,
            Unit::Transaction(tx) => tx,
        }
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
        let pool = self.clone();
        futures_util::stream::once(async move {
            let conn = pool.acquire().await?;
            let steps: Vec<_> = match pool.mode() {
                PoolMode::Session => {
                    let mut conn = conn;
                    let steps = conn.fetch_many(query).try_collect().await?;
                    conn.finished();
                    steps
                }
                PoolMode::Transaction => {
                    let mut tx = conn.begin().await?;
                    let steps = tx.fetch_many(query).try_collect().await?;
                    tx.commit().await?;
                    steps
                }
            };
            Ok::<_, sqlx::Error>(futures_util::stream::iter(steps.into_iter().map(Ok)))
        })
        .try_flatten()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        let pool = self.clone();
        Box::pin(async move {
            let conn = pool.acquire().await?;
            match pool.mode() {
                PoolMode::Session => {
                    let mut conn = conn;
                    let row = conn.fetch_optional(query).await?;
                    conn.finished();
                    Ok(row)
                }
                PoolMode::Transaction => {
                    let mut tx = conn.begin().await?;
                    let row = tx.fetch_optional(query).await?;
                    tx.commit().await?;
                    Ok(row)
                }
            }
        })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement<'q>, sqlx::Error>>
    where
        'p: 'e,
    {
        let pool = self.clone();
        Box::pin(async move {
            let mut conn = pool.acquire().await?;
            let statement = conn.prepare_with(sql, parameters).await?;
            conn.finished();
            Ok(statement)
        })
    }

    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> BoxFuture<'e, Result<Describe<Postgres>, sqlx::Error>>
    where
        'p: 'e,
    {
        let pool = self.clone();
        Box::pin(async move {
            let mut conn = pool.acquire().await?;
            let described = conn.describe(sql).await?;
            conn.finished();
            Ok(described)
        })
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
