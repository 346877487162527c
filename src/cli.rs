//! The command line (docs/api.md, "Command line"): each verb is a thin call into the library.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use sqlx::Connection;
use uuid::Uuid;

use crate::config::{Config, DEV_JWT_SECRET, LogFormat};
use crate::router::{app, openapi};
use crate::state::AppState;
use crate::stripe::reconcile::Reconciler;
use crate::{db, maintenance, operations, telemetry, verify};

#[derive(Debug, Parser)]
#[command(
    name = "amethyst-credits",
    version,
    about = "The Amethyst credits service"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending migrations, then serve HTTP (the default).
    Serve {
        /// Use the Supabase CLI's local JWT secret when none is configured.
        #[arg(long)]
        dev: bool,
        /// Do not apply migrations at start-up.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Apply pending migrations and exit.
    Migrate,
    /// Check the schema, the privileges and the ledger; exit non-zero on any failure.
    Verify,
    /// Run the daily, weekly or monthly maintenance once and print what it found.
    Maintenance {
        #[arg(value_enum)]
        task: maintenance::Task,
        /// Monthly: archive credit transactions older than this many months (default 12).
        #[arg(long, env = "ARCHIVE_AFTER_MONTHS", value_parser = clap::value_parser!(u32).range(1..=1200))]
        archive_after_months: Option<u32>,
        /// Monthly: rows moved per transaction (default 5000).
        #[arg(long, env = "ARCHIVE_BATCH_SIZE", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        batch_size: Option<u32>,
        /// Monthly: seconds to pause between batches.
        #[arg(long, default_value_t = 0.0)]
        pause_seconds: f64,
    },
    /// List Stripe's recent events and handle the ones never processed, as a webhook would;
    /// print a summary, exit non-zero when any could not be handled or Stripe could not be read.
    Reconcile {
        /// How far back to look, such as 72h or 7d (Stripe keeps events for 30 days).
        #[arg(long, default_value = "72h", value_parser = parse_ttl)]
        since: Duration,
    },
    /// Mint an HS256 access token with the configured secret, for local trials.
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        sub: Uuid,
        #[arg(long, value_enum, default_value_t = TokenRole::Authenticated)]
        role: TokenRole,
        #[arg(long)]
        email: Option<String>,
        /// Lifetime, such as 90s, 30m, 1h or 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
        /// Mark the token as a Supabase anonymous sign-in.
        #[arg(long)]
        anonymous: bool,
    },
    /// Print the OpenAPI document.
    Openapi,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TokenRole {
    Authenticated,
    /// Spelled as Supabase spells the role (`service_role`, not clap's `service-role`).
    #[value(name = "service_role")]
    ServiceRole,
}

fn parse_ttl(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (number, unit) = raw.split_at(raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 30m or 1h"))?;
    let seconds = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{raw:?}: the unit must be s, m, h or d")),
    };
    if seconds == 0 {
        return Err("the lifetime must be positive".to_owned());
    }
    Ok(Duration::from_secs(seconds))
}

/// Runs the command line; the process exits with the returned code.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::from_env()?;
    match cli.command.unwrap_or(Command::Serve {
        dev: false,
        no_migrate: false,
    }) {
        Command::Serve { dev, no_migrate } => serve(config, dev, no_migrate).await,
        Command::Migrate => {
            telemetry::init_logging(config.log_format);
            let options = db::connect_options(config.database_direct_url.expose())?;
            db::ensure_database(&options).await?;
            db::migrate(&options).await?;
            tracing::info!("migrations are current");
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify => {
            let options = db::connect_options(config.database_direct_url.expose())?;
            let mut conn = sqlx::PgConnection::connect_with(&options)
                .await
                .context("could not connect to the database")?;
            let report = verify::run(&mut conn).await?;
            println!("{report}");
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Maintenance {
            task,
            archive_after_months,
            batch_size,
            pause_seconds,
        } => {
            telemetry::init_logging(config.log_format);
            // Its advisory locks and its long batches need a session of their own.
            let options = db::connect_options(config.database_direct_url.expose())?;
            let mut conn = sqlx::PgConnection::connect_with(&options)
                .await
                .context("could not connect to the database")?;
            let archival = maintenance::Archival {
                older_than_months: archive_after_months,
                batch_size,
                pause_seconds: pause_seconds.max(0.0),
            };
            // The daily run reconciles with Stripe when there is a Stripe account.
            let state = if task == maintenance::Task::Daily && config.stripe.secret_key.is_some() {
                Some(connect_state(config).await?)
            } else {
                None
            };
            let reconciler = state.as_ref().and_then(Reconciler::from_state);
            let run = maintenance::run(&mut conn, task, archival, reconciler)
                .await
                .context("maintenance failed")?;
            tracing::info!(task = %task, run = run.id, outcome = %run.outcome, findings = %run.findings, "maintenance finished");
            println!("{}", serde_json::to_string_pretty(&run)?);
            Ok(if run.outcome == "ok" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Reconcile { since } => {
            telemetry::init_logging(config.log_format);
            if config.stripe.secret_key.is_none() {
                bail!("STRIPE_SECRET_KEY is not set: there is no Stripe account to reconcile with");
            }
            let state = connect_state(config).await?;
            let reconciler =
                Reconciler::from_state(&state).expect("the Stripe client exists with a secret key");
            let report = reconciler.run(since).await?;
            println!("{}", serde_json::to_string_pretty(&report.summary)?);
            Ok(if report.succeeded() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Token {
            sub,
            role,
            email,
            ttl,
            anonymous,
        } => {
            let secret = match &config.jwt.secret {
                Some(secret) => secret.expose().to_owned(),
                None => {
                    eprintln!(
                        "SUPABASE_JWT_SECRET is not set: signing with the local development secret (serve --dev)"
                    );
                    DEV_JWT_SECRET.to_owned()
                }
            };
            println!(
                "{}",
                mint_token(&config, &secret, sub, role, email, ttl, anonymous)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Openapi => {
            println!("{}", serde_json::to_string_pretty(&openapi())?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The shared state on a small pool, for the verbs that reach Stripe.
async fn connect_state(config: Config) -> anyhow::Result<AppState> {
    let options = db::connect_options(config.database_url.expose())?;
    let pool = db::connect_in_mode(
        options,
        config.database_max_connections.min(4),
        config.database_statement_timeout,
        config.database_pool_mode,
    )
    .await
    .context("could not connect to the database")?;
    Ok(AppState::new(config, pool))
}

fn mint_token(
    config: &Config,
    secret: &str,
    sub: Uuid,
    role: TokenRole,
    email: Option<String>,
    ttl: Duration,
    anonymous: bool,
) -> anyhow::Result<String> {
    let now = chrono::Utc::now().timestamp();
    let mut claims = serde_json::json!({
        "sub": sub,
        "aud": config.jwt.audience,
        "role": match role {
            TokenRole::Authenticated => "authenticated",
            TokenRole::ServiceRole => "service_role",
        },
        "iat": now,
        "exp": now + ttl.as_secs() as i64,
        "aal": "aal1",
        "session_id": Uuid::new_v4(),
        "is_anonymous": anonymous,
    });
    if let Some(issuer) = &config.jwt.issuer {
        claims["iss"] = issuer.clone().into();
    }
    if let Some(email) = email {
        claims["email"] = email.into();
    }
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

async fn serve(config: Config, dev: bool, no_migrate: bool) -> anyhow::Result<ExitCode> {
    let config = if dev {
        config.with_dev_defaults()
    } else {
        config
    };
    telemetry::init_logging(config.log_format);
    if dev {
        tracing::warn!(
            "DEVELOPMENT MODE: tokens signed with the Supabase CLI's well-known local secret are accepted. \
             Never run --dev where real users can reach it."
        );
    }
    if config.ads.verification == crate::config::AdsVerification::Client {
        tracing::warn!(
            "ADS_VERIFICATION=client: POST /v1/ads/views pays rewarded ads on the client's word, \
             and anyone with a token can mint credits with it. For local development only; \
             never where real users can reach it."
        );
    }
    if config.ads.verification == crate::config::AdsVerification::Admob
        && config.ads.admob_ad_units.is_empty()
    {
        tracing::warn!(
            "ADS_VERIFICATION=admob with ADMOB_AD_UNITS empty: Google signs every publisher's \
             reward callbacks with the same keys, so another publisher's rewarded ad can verify \
             a session here. List this app's rewarded ad units in ADMOB_AD_UNITS."
        );
    }
    config.check_can_authenticate()?;
    if config.log_format == LogFormat::Pretty {
        tracing::debug!(?config, "configuration");
    }

    // Creating the database and migrating need a session of their own: the direct URL.
    let direct = db::connect_options(config.database_direct_url.expose())?;
    db::ensure_database(&direct).await?;
    if !no_migrate {
        db::migrate(&direct).await?;
    }
    let pool = db::connect_in_mode(
        db::connect_options(config.database_url.expose())?,
        config.database_max_connections,
        config.database_statement_timeout,
        config.database_pool_mode,
    )
    .await?;
    if config.database_pool_mode == crate::config::PoolMode::Transaction {
        if config.database_direct_url.expose() == config.database_url.expose() {
            tracing::warn!(
                "DATABASE_POOL_MODE=transaction without DATABASE_DIRECT_URL: migrations and \
                 maintenance go through the pooler too, and their advisory locks need a session \
                 of their own; set DATABASE_DIRECT_URL to a direct connection"
            );
        }
        tracing::info!(
            "DATABASE_POOL_MODE=transaction: every query runs in a transaction of its own, \
             begun with the role and the statement time limit; no prepared statement is kept"
        );
    }
    let listener = tokio::net::TcpListener::bind(config.bind_addr)
        .await
        .with_context(|| format!("could not listen on {} (BIND_ADDR)", config.bind_addr))?;
    let metrics_listener = match config.metrics.bind_addr {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("could not listen on {address} (METRICS_BIND_ADDR)"))?,
        ),
        None => None,
    };
    let direct = db::connect_options(config.database_direct_url.expose())
        .context("DATABASE_DIRECT_URL is not a valid PostgreSQL URL")?;
    let state = AppState::new(config, pool);
    // One listening connection for the whole process, fanned out to the live streams.
    state.notifications.start(direct);
    let notifications = state.notifications.clone();
    let prefetching = state.clone();
    tokio::spawn(async move { prefetching.verifier.prefetch().await });
    // The maintenance gauges come from the recorded runs (pg_cron's too); refreshed here so
    // that a scrape never queries the database.
    let gauges = state.pool.clone();
    let draining = state.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            if let Err(err) = operations::refresh_maintenance_gauges(&gauges).await {
                tracing::warn!(error = %err, "could not read the maintenance runs for /metrics");
            }
        }
    });
    if let Some(listener) = metrics_listener {
        tracing::info!(address = %listener.local_addr()?, "serving /metrics");
        let metrics = operations::metrics_router(state.clone());
        tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, metrics).await {
                tracing::error!(error = %err, "the metrics listener failed");
            }
        });
    }

    let address = listener.local_addr()?;
    let runtime = tokio::runtime::Handle::current();
    let threads = match runtime.runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => "one (the main thread)".to_owned(),
        _ => runtime.metrics().num_workers().to_string(),
    };
    tracing::info!(%address, worker_threads = %threads, "listening");
    let drain = draining.config.shutdown_drain;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        // The shutdown sequence (README, "Running several"): on SIGTERM, /ready answers 503
        // while every request is still served, for SHUTDOWN_DRAIN_SECONDS, so that a load
        // balancer stops sending new ones; then no new connection is accepted and the requests
        // in flight finish (30 s at most). Ctrl-C skips the wait.
        if shutdown_signal().await == Signal::Terminate && !drain.is_zero() {
            draining.start_draining();
            tracing::info!(
                seconds = drain.as_secs_f64(),
                "draining: /ready answers 503, requests are still served"
            );
            tokio::time::sleep(drain).await;
        }
        tracing::info!("shutting down: finishing requests in flight");
        // Event streams never finish by themselves: they end now, and their clients reconnect
        // (to another instance) with Last-Event-ID.
        notifications.close();
        let _ = stop_tx.send(true);
    });
    tokio::select! {
        result = server => result.context("the server failed")?,
        _ = async {
            let _ = stop_rx.wait_for(|stop| *stop).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        } => {
            tracing::warn!("requests still running after 30 s; stopping anyway");
            bail!("shutdown timed out");
        }
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Interrupt,
    Terminate,
}

async fn shutdown_signal() -> Signal {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => Signal::Interrupt,
        _ = terminate => Signal::Terminate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_take_the_usual_units() {
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
