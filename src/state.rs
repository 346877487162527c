//! The state every handler shares: the pool, the configuration, the token verifier, the rate
//! limiter, the Stripe client and the metrics recorder. It sits below every feature module and
//! knows none of them; the router above hands it to each.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::FromRef;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::batch::Batchers;
use crate::db::ServicePool;

use crate::admob_keys::AdmobKeys;
use crate::auth::TokenVerifier;
use crate::config::Config;
use crate::notifications::Notifications;
use crate::rate_limit::RateLimiter;
use crate::stripe_api::StripeClient;
use crate::telemetry;

/// Everything a handler may need. One `Arc` inside: every layer and extractor clones the
/// state per request, and one atomic count is cheaper than one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The contents of [`AppState`], reached through `Deref`.
pub struct Shared {
    /// Every query of the service goes through it (`DATABASE_POOL_MODE` decides how).
    pub pool: ServicePool,
    pub config: Config,
    pub verifier: Arc<TokenVerifier>,
    pub rate_limiter: Arc<RateLimiter>,
    /// Present when `STRIPE_SECRET_KEY` is set.
    pub stripe: Option<StripeClient>,
    /// Google's verifier keys for AdMob's reward callbacks, fetched on the first callback.
    pub admob_keys: AdmobKeys,
    pub metrics: PrometheusHandle,
    /// Set on SIGTERM: `/ready` answers 503 while the requests still arriving are served.
    draining: AtomicBool,
    /// The ledger's notifications, fanned out to the live streams; listening starts with
    /// [`Notifications::start`] (the server does it, on `DATABASE_DIRECT_URL`).
    pub notifications: Notifications,
    /// The queues of work that shares round trips when it arrives together (`batch`).
    pub batches: Batchers,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// `pool` should come from [`crate::db::connect_in_mode`] with `config.database_pool_mode`
    /// (or [`crate::db::connect`] in session mode), whose connections act as `service_role`.
    pub fn new(config: Config, pool: ServicePool) -> Self {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .user_agent(concat!("amethyst-credits/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client builds with static settings");
        let stripe = config
            .stripe
            .secret_key
            .clone()
            .map(|key| StripeClient::new(http.clone(), &config.stripe.api_base, key));
        let admob_keys = AdmobKeys::new(
            config.ads.admob_keys_url.clone(),
            http.clone(),
            config.ads.admob_key_timing,
        );
        AppState(Arc::new(Shared {
            admob_keys,
            verifier: Arc::new(TokenVerifier::new(&config.jwt, http)),
            rate_limiter: Arc::new(RateLimiter::from_config(&config)),
            stripe,
            config,
            pool,
            metrics: telemetry::metrics_handle(),
            draining: AtomicBool::new(false),
            notifications: Notifications::new(),
            batches: Batchers::default(),
        }))
    }

    /// The process is stopping: readiness fails from now on, so that load balancers send
    /// nothing new.
    pub fn start_draining(&self) {
        self.0.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Relaxed)
    }
}

/// Extractors that only need the pool (the admin check) take it from any state that has one.
impl FromRef<AppState> for ServicePool {
    fn from_ref(state: &AppState) -> ServicePool {
        state.pool.clone()
    }
}

/// TLS for outgoing requests (JWKS, Stripe) uses rustls with ring.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
