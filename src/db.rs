//! Connections and migrations. Pooled connections act as `service_role` (docs/api.md, "Authentication"); user
//! reads go through the `*_as_user` functions, which switch to `authenticated` with the
//! token's claims for the duration of the call, so `auth.uid()` and RLS decide what is visible.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection, PgPool};

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

/// The service's pool: every connection acts as `service_role`.
pub async fn connect(options: PgConnectOptions, max_connections: u32) -> anyhow::Result<PgPool> {
    Ok(pool_options(max_connections).connect_with(options).await?)
}

fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        // A dead connection fails its query and is replaced; a ping before every checkout
        // would add a round trip to every request.
        .test_before_acquire(false)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                conn.execute("set role service_role").await?;
                Ok(())
            })
        })
}
