//! Environment → typed configuration. Every error names the variable at fault; secrets are
//! wrapped so that they never reach a log line through `Debug`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

/// The Supabase CLI's well-known local JWT secret, used by `serve --dev` only.
pub const DEV_JWT_SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/amethyst";

/// A secret value: printable only on purpose, through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// `DATABASE_POOL_MODE`: what `DATABASE_URL` reaches (README, "Running several").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// PostgreSQL itself, or a pooler that gives each client connection a server connection of
    /// its own: session settings and prepared statements last as long as the connection.
    Session,
    /// A transaction-mode pooler (PgBouncer's `pool_mode = transaction`, Supabase's pooler on
    /// port 6543): consecutive transactions of one client connection may run on different
    /// server connections, so nothing may outlive a transaction.
    Transaction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// How tokens are checked (docs/api.md, "Tokens the service accepts").
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub secret: Option<Secret>,
    pub jwks_url: Option<String>,
    pub jwks_timing: JwksTiming,
    pub audience: String,
    pub issuer: Option<String>,
    /// Verified tokens remembered until they expire (`JWT_CACHE_SIZE`; 0 turns it off).
    pub cache_size: usize,
}

/// How the JWKS keys are cached. Not read from the environment: the defaults follow Supabase
/// (which caches its JWKS for 10 minutes) and the API guide (docs/api.md, "Tokens the service
/// accepts": an unknown `kid` refetches at most once per 30 s); tests shorten them to make
/// keys old without waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwksTiming {
    /// Age after which known keys are refreshed, in the background.
    pub refresh_after: Duration,
    /// Least time between two fetches of the key set, whatever started them.
    pub cooldown: Duration,
    /// How long one fetch may take.
    pub fetch_timeout: Duration,
}

impl Default for JwksTiming {
    fn default() -> Self {
        Self {
            refresh_after: Duration::from_secs(600),
            cooldown: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StripeConfig {
    pub secret_key: Option<Secret>,
    pub webhook_secrets: Vec<Secret>,
    pub api_base: String,
    pub success_url: Option<String>,
    pub cancel_url: Option<String>,
}

/// Where `/metrics` is served and what it requires.
#[derive(Debug, Clone, Default)]
pub struct MetricsConfig {
    /// `METRICS_BIND_ADDR`: a separate listener for `/metrics` (then absent from the main one).
    pub bind_addr: Option<SocketAddr>,
    /// `METRICS_TOKEN`: the bearer token a scrape must send.
    pub token: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// May hold a password: printed only on purpose.
    pub database_url: Secret,
    /// `DATABASE_DIRECT_URL`: a direct connection (no transaction-mode pooler) for what needs a
    /// session of its own: migrations, maintenance's advisory locks, listening for the ledger's
    /// notifications. Defaults to `DATABASE_URL`. May hold a password.
    pub database_direct_url: Secret,
    /// `DATABASE_POOL_MODE`: `session` (the default) or `transaction`.
    pub database_pool_mode: PoolMode,
    pub database_max_connections: u32,
    /// `DATABASE_STATEMENT_TIMEOUT_SECONDS`: the longest a statement of the service may run;
    /// zero for no limit.
    pub database_statement_timeout: Duration,
    pub bind_addr: SocketAddr,
    pub jwt: JwtConfig,
    pub stripe: StripeConfig,
    pub cors_allowed_origins: Vec<String>,
    pub allow_anonymous_rewards: bool,
    pub log_format: LogFormat,
    /// Requests per minute and burst per caller; 0 turns rate limiting off.
    pub rate_limit_per_minute: u32,
    pub rate_limit_burst: u32,
    /// Peers whose `X-Forwarded-For` names the client (README, "Configuration").
    pub trusted_proxies: Vec<Cidr>,
    pub request_timeout: Duration,
    /// `SHUTDOWN_DRAIN_SECONDS`: how long `/ready` answers 503 after SIGTERM while requests are
    /// still served, before the server stops accepting them.
    pub shutdown_drain: Duration,
    pub metrics: MetricsConfig,
    /// How rewarded ads are verified (docs/api.md, "Rewarded ads").
    pub ads: AdsConfig,
    /// `LOW_BALANCE_THRESHOLD`: the balance under which the live stream sends `low_balance`,
    /// for users who set none of their own; 0 turns the alerts off.
    pub low_balance_threshold: i32,
    /// `serve --dev`: the well-known local secret is in use.
    pub dev: bool,
}

/// What a rewarded ad must show before it pays (`ADS_VERIFICATION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdsVerification {
    /// A session the server opened, completed: paid for the time the server saw pass.
    Session,
    /// As `Session`, and only once AdMob's signed callback for the session has arrived.
    Admob,
    /// `POST /v1/ads/views` on the client's word: local development only.
    Client,
}

#[derive(Debug, Clone)]
pub struct AdsConfig {
    pub verification: AdsVerification,
    /// `ADS_SESSION_TTL_SECONDS`: lifetime of an open session.
    pub session_ttl_seconds: i32,
    /// `ADS_MAX_OPEN_SESSIONS`: unfinished sessions a user may have at once.
    pub max_open_sessions: i32,
    /// `ADMOB_VERIFIER_KEYS_URL`: Google's verifier keys for reward callbacks.
    pub admob_keys_url: String,
    /// How the verifier keys are cached. Not read from the environment: the contract fixes at
    /// most one refetch per 10 s for an unknown `key_id`; tests shorten it.
    pub admob_key_timing: JwksTiming,
    /// `ADMOB_AD_UNITS`: the `ad_unit` values a callback may name; empty allows any.
    pub admob_ad_units: Vec<String>,
    /// `ADMOB_SSV_MAX_AGE_SECONDS`: how far a callback's `timestamp` may be from now.
    pub ssv_max_age_seconds: i32,
}

impl AdsConfig {
    /// Google's published verifier keys.
    pub const ADMOB_KEYS_URL: &str = "https://www.gstatic.com/admob/reward/verifier-keys.json";

    pub fn admob_key_timing() -> JwksTiming {
        JwksTiming {
            // Google rotates the keys now and then; a day-old set is refreshed on next use.
            refresh_after: Duration::from_secs(24 * 3600),
            cooldown: Duration::from_secs(10),
            fetch_timeout: Duration::from_secs(5),
        }
    }

    /// Whether a callback naming this ad unit may pay.
    pub fn allows_ad_unit(&self, ad_unit: Option<&str>) -> bool {
        self.admob_ad_units.is_empty()
            || ad_unit.is_some_and(|unit| self.admob_ad_units.iter().any(|u| u == unit))
    }
}

/// A block of addresses, such as `10.0.0.0/8` or `2001:db8::/32`; a bare address is a block
/// of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, address: IpAddr) -> bool {
        // An IPv4 client seen through a dual-stack socket arrives as ::ffff:a.b.c.d.
        match (self.network, address.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                u32::from(address) & v4_mask(self.prefix) == u32::from(network)
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                u128::from(address) & v6_mask(self.prefix) == u128::from(network)
            }
            _ => false,
        }
    }
}

fn v4_mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn v6_mask(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .parse()
            .map_err(|_| format!("{address:?} is not an IPv4 or IPv6 address"))?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            // Digits only: `u8::from_str` would also take "+8".
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("the prefix length of {text:?} is above {bits}"))?,
            Some(_) => return Err(format!("{text:?} has no valid prefix length")),
        };
        let (network, prefix) = match network {
            // A block of v4-mapped addresses is the IPv4 block they map, which is how
            // `contains` sees such clients.
            IpAddr::V6(v6) if prefix >= 96 && v6.to_ipv4_mapped().is_some() => (
                IpAddr::V4(v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)),
                prefix - 96,
            ),
            _ => (network, prefix),
        };
        let host_bits_clear = match network {
            IpAddr::V4(n) => u32::from(n) & !v4_mask(prefix) == 0,
            IpAddr::V6(n) => u128::from(n) & !v6_mask(prefix) == 0,
        };
        if !host_bits_clear {
            return Err(format!(
                "{text:?} has bits set past its prefix length: write the block's first address"
            ));
        }
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// A configuration error, naming the variable.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub message: String,
}

fn invalid(variable: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        message: message.into(),
    }
}

impl Config {
    /// Reads the process environment (after `.env`, which `main` loads).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds the configuration from any variable source; empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };

        let database_url =
            Secret::new(get("DATABASE_URL").unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned()));
        let database_direct_url = get("DATABASE_DIRECT_URL")
            .map(Secret::new)
            .unwrap_or_else(|| database_url.clone());
        let database_pool_mode = match get("DATABASE_POOL_MODE").as_deref() {
            None | Some("session") => PoolMode::Session,
            Some("transaction") => PoolMode::Transaction,
            Some(_) => {
                return Err(invalid(
                    "DATABASE_POOL_MODE",
                    "expected session or transaction",
                ));
            }
        };
        let database_max_connections = parse_number(
            "DATABASE_MAX_CONNECTIONS",
            get("DATABASE_MAX_CONNECTIONS"),
            10,
        )?;
        if database_max_connections == 0 {
            return Err(invalid("DATABASE_MAX_CONNECTIONS", "must be at least 1"));
        }
        let database_statement_timeout = Duration::from_secs(parse_number(
            "DATABASE_STATEMENT_TIMEOUT_SECONDS",
            get("DATABASE_STATEMENT_TIMEOUT_SECONDS"),
            10,
        )?);

        let bind_addr = get("BIND_ADDR")
            .unwrap_or_else(|| "127.0.0.1:8080".to_owned())
            .parse()
            .map_err(|_| invalid("BIND_ADDR", "expected host:port, such as 0.0.0.0:8080"))?;

        let supabase_url = get("SUPABASE_URL").map(|u| u.trim_end_matches('/').to_owned());
        if let Some(url) = &supabase_url {
            check_http_url("SUPABASE_URL", url)?;
        }
        let jwks_url = get("SUPABASE_JWKS_URL")
            .or_else(|| {
                supabase_url
                    .as_ref()
                    .map(|u| format!("{u}/auth/v1/.well-known/jwks.json"))
            })
            .map(|u| check_http_url("SUPABASE_JWKS_URL", &u).map(|()| u))
            .transpose()?;
        let issuer =
            get("JWT_ISSUER").or_else(|| supabase_url.as_ref().map(|u| format!("{u}/auth/v1")));
        let secret = get("SUPABASE_JWT_SECRET").map(Secret::new);
        if let Some(secret) = &secret
            && secret.expose().len() < 32
        {
            return Err(invalid(
                "SUPABASE_JWT_SECRET",
                "must be at least 32 characters (Supabase's JWT secrets are)",
            ));
        }

        let webhook_secrets = get("STRIPE_WEBHOOK_SECRET")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(Secret::new)
                    .collect()
            })
            .unwrap_or_default();
        let api_base = get("STRIPE_API_BASE")
            .unwrap_or_else(|| "https://api.stripe.com".to_owned())
            .trim_end_matches('/')
            .to_owned();
        check_http_url("STRIPE_API_BASE", &api_base)?;
        let success_url = get("CHECKOUT_SUCCESS_URL");
        if let Some(url) = &success_url {
            check_http_url("CHECKOUT_SUCCESS_URL", url)?;
        }
        let cancel_url = get("CHECKOUT_CANCEL_URL");
        if let Some(url) = &cancel_url {
            check_http_url("CHECKOUT_CANCEL_URL", url)?;
        }

        let cors_allowed_origins = get("CORS_ALLOWED_ORIGINS")
            .map(|v| {
                v.split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_owned())
                    .filter(|o| !o.is_empty())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for origin in &cors_allowed_origins {
            check_http_url("CORS_ALLOWED_ORIGINS", origin)?;
        }

        let allow_anonymous_rewards =
            parse_bool("ALLOW_ANONYMOUS_REWARDS", get("ALLOW_ANONYMOUS_REWARDS"))?;
        let log_format = match get("LOG_FORMAT").as_deref() {
            None => {
                if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    LogFormat::Pretty
                } else {
                    LogFormat::Json
                }
            }
            Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(_) => return Err(invalid("LOG_FORMAT", "expected json or pretty")),
        };

        let rate_limit_per_minute =
            parse_number("RATE_LIMIT_PER_MINUTE", get("RATE_LIMIT_PER_MINUTE"), 600)?;
        let rate_limit_burst = parse_number("RATE_LIMIT_BURST", get("RATE_LIMIT_BURST"), 100)?;
        let trusted_proxies = get("TRUSTED_PROXIES")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(|c| {
                        c.parse::<Cidr>()
                            .map_err(|why| invalid("TRUSTED_PROXIES", why))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let request_timeout = Duration::from_secs(parse_number(
            "REQUEST_TIMEOUT_SECONDS",
            get("REQUEST_TIMEOUT_SECONDS"),
            30,
        )?);
        let shutdown_drain = Duration::from_secs(parse_number(
            "SHUTDOWN_DRAIN_SECONDS",
            get("SHUTDOWN_DRAIN_SECONDS"),
            5,
        )?);

        let metrics = MetricsConfig {
            bind_addr: get("METRICS_BIND_ADDR")
                .map(|v| {
                    v.parse().map_err(|_| {
                        invalid(
                            "METRICS_BIND_ADDR",
                            "expected host:port, such as 127.0.0.1:9090",
                        )
                    })
                })
                .transpose()?,
            token: get("METRICS_TOKEN").map(Secret::new),
        };

        let verification = match get("ADS_VERIFICATION").as_deref() {
            None | Some("session") => AdsVerification::Session,
            Some("admob") => AdsVerification::Admob,
            Some("client") => AdsVerification::Client,
            Some(_) => {
                return Err(invalid(
                    "ADS_VERIFICATION",
                    "expected session, admob or client",
                ));
            }
        };
        let session_ttl_seconds: i32 = parse_number(
            "ADS_SESSION_TTL_SECONDS",
            get("ADS_SESSION_TTL_SECONDS"),
            600,
        )?;
        if !(1..=86_400).contains(&session_ttl_seconds) {
            return Err(invalid(
                "ADS_SESSION_TTL_SECONDS",
                "must be from 1 to 86400",
            ));
        }
        let max_open_sessions: i32 =
            parse_number("ADS_MAX_OPEN_SESSIONS", get("ADS_MAX_OPEN_SESSIONS"), 3)?;
        if !(1..=1000).contains(&max_open_sessions) {
            return Err(invalid("ADS_MAX_OPEN_SESSIONS", "must be from 1 to 1000"));
        }
        let admob_keys_url =
            get("ADMOB_VERIFIER_KEYS_URL").unwrap_or_else(|| AdsConfig::ADMOB_KEYS_URL.to_owned());
        check_http_url("ADMOB_VERIFIER_KEYS_URL", &admob_keys_url)?;
        let admob_ad_units = get("ADMOB_AD_UNITS")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let ssv_max_age_seconds: i32 = parse_number(
            "ADMOB_SSV_MAX_AGE_SECONDS",
            get("ADMOB_SSV_MAX_AGE_SECONDS"),
            3600,
        )?;
        if ssv_max_age_seconds < 1 {
            return Err(invalid("ADMOB_SSV_MAX_AGE_SECONDS", "must be at least 1"));
        }

        let low_balance_threshold: i32 =
            parse_number("LOW_BALANCE_THRESHOLD", get("LOW_BALANCE_THRESHOLD"), 5)?;
        if !(0..=1_000_000).contains(&low_balance_threshold) {
            return Err(invalid(
                "LOW_BALANCE_THRESHOLD",
                "must be from 0 to 1000000",
            ));
        }

        Ok(Config {
            database_url,
            database_direct_url,
            database_pool_mode,
            database_max_connections,
            database_statement_timeout,
            bind_addr,
            jwt: JwtConfig {
                secret,
                jwks_url,
                jwks_timing: JwksTiming::default(),
                audience: get("JWT_AUDIENCE").unwrap_or_else(|| "authenticated".to_owned()),
                issuer,
                cache_size: parse_number("JWT_CACHE_SIZE", get("JWT_CACHE_SIZE"), 100_000)?,
            },
            stripe: StripeConfig {
                secret_key: get("STRIPE_SECRET_KEY").map(Secret::new),
                webhook_secrets,
                api_base,
                success_url,
                cancel_url,
            },
            cors_allowed_origins,
            allow_anonymous_rewards,
            log_format,
            rate_limit_per_minute,
            rate_limit_burst,
            trusted_proxies,
            request_timeout,
            shutdown_drain,
            metrics,
            ads: AdsConfig {
                verification,
                session_ttl_seconds,
                max_open_sessions,
                admob_keys_url,
                admob_key_timing: AdsConfig::admob_key_timing(),
                admob_ad_units,
                ssv_max_age_seconds,
            },
            low_balance_threshold,
            dev: false,
        })
    }

    /// `serve --dev`: fall back to the Supabase CLI's local secret when none is configured.
    pub fn with_dev_defaults(mut self) -> Self {
        self.dev = true;
        if self.jwt.secret.is_none() {
            self.jwt.secret = Some(Secret::new(DEV_JWT_SECRET));
        }
        self
    }

    /// The server refuses to start without a way to check tokens.
    pub fn check_can_authenticate(&self) -> Result<(), ConfigError> {
        if self.jwt.secret.is_none() && self.jwt.jwks_url.is_none() {
            return Err(invalid(
                "SUPABASE_JWT_SECRET",
                "no way to check tokens: set SUPABASE_JWT_SECRET (legacy HS256 secret) and/or \
                 SUPABASE_JWKS_URL (or SUPABASE_URL, from which it is derived)",
            ));
        }
        Ok(())
    }
}

fn parse_number<T: std::str::FromStr>(
    variable: &'static str,
    value: Option<String>,
    default: T,
) -> Result<T, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| invalid(variable, format!("expected a whole number, got {v:?}"))),
    }
}

fn parse_bool(variable: &'static str, value: Option<String>) -> Result<bool, ConfigError> {
    match value.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("false" | "0" | "no" | "off") => Ok(false),
        Some("true" | "1" | "yes" | "on") => Ok(true),
        Some(_) => Err(invalid(variable, "expected true or false")),
    }
}

fn check_http_url(variable: &'static str, url: &str) -> Result<(), ConfigError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| invalid(variable, "expected an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(invalid(variable, "the URL has no host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    #[test]
    fn supabase_url_implies_jwks_url_and_issuer() {
        let c = config(&[("SUPABASE_URL", "https://abc.supabase.co/")]).unwrap();
        assert_eq!(
            c.jwt.jwks_url.as_deref(),
            Some("https://abc.supabase.co/auth/v1/.well-known/jwks.json")
        );
        assert_eq!(
            c.jwt.issuer.as_deref(),
            Some("https://abc.supabase.co/auth/v1")
        );
        assert_eq!(c.jwt.audience, "authenticated");
    }

    #[test]
    fn missing_verification_keys_are_named() {
        let c = config(&[]).unwrap();
        let err = c.check_can_authenticate().unwrap_err().to_string();
        assert!(
            err.contains("SUPABASE_JWT_SECRET") && err.contains("SUPABASE_JWKS_URL"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_their_variable() {
        let err = config(&[("RATE_LIMIT_PER_MINUTE", "lots")]).unwrap_err();
        assert_eq!(err.variable, "RATE_LIMIT_PER_MINUTE");
        let err = config(&[("SUPABASE_JWT_SECRET", "short")]).unwrap_err();
        assert_eq!(err.variable, "SUPABASE_JWT_SECRET");
    }

    #[test]
    fn ads_are_verified_by_session_unless_configured_otherwise() {
        let c = config(&[]).unwrap();
        assert_eq!(c.ads.verification, AdsVerification::Session);
        assert_eq!(
            (c.ads.session_ttl_seconds, c.ads.max_open_sessions),
            (600, 3)
        );
        assert_eq!(c.ads.admob_keys_url, AdsConfig::ADMOB_KEYS_URL);
        assert_eq!(c.ads.ssv_max_age_seconds, 3600);
        assert!(c.ads.allows_ad_unit(None));
        let c = config(&[
            ("ADS_VERIFICATION", "admob"),
            ("ADMOB_AD_UNITS", "111, 222"),
        ])
        .unwrap();
        assert_eq!(c.ads.verification, AdsVerification::Admob);
        assert!(c.ads.allows_ad_unit(Some("222")));
        assert!(!c.ads.allows_ad_unit(Some("333")) && !c.ads.allows_ad_unit(None));
        let err = config(&[("ADS_VERIFICATION", "trust-me")]).unwrap_err();
        assert_eq!(err.variable, "ADS_VERIFICATION");
    }

    #[test]
    fn the_pool_mode_is_session_and_the_direct_url_the_database_url_unless_configured() {
        let c = config(&[("DATABASE_URL", "postgres://u@pooler:6543/app")]).unwrap();
        assert_eq!(c.database_pool_mode, PoolMode::Session);
        assert_eq!(
            c.database_direct_url.expose(),
            "postgres://u@pooler:6543/app"
        );
        let c = config(&[
            ("DATABASE_URL", "postgres://u@pooler:6543/app"),
            ("DATABASE_DIRECT_URL", "postgres://u@db:5432/app"),
            ("DATABASE_POOL_MODE", "transaction"),
        ])
        .unwrap();
        assert_eq!(c.database_pool_mode, PoolMode::Transaction);
        assert_eq!(c.database_direct_url.expose(), "postgres://u@db:5432/app");
        let err = config(&[("DATABASE_POOL_MODE", "statement")]).unwrap_err();
        assert_eq!(err.variable, "DATABASE_POOL_MODE");
    }

    #[test]
    fn the_statement_timeout_is_ten_seconds_unless_configured() {
        let default = config(&[]).unwrap();
        assert_eq!(default.database_statement_timeout, Duration::from_secs(10));
        let set = config(&[("DATABASE_STATEMENT_TIMEOUT_SECONDS", "3")]).unwrap();
        assert_eq!(set.database_statement_timeout, Duration::from_secs(3));
        let err = config(&[("DATABASE_STATEMENT_TIMEOUT_SECONDS", "2.5")]).unwrap_err();
        assert_eq!(err.variable, "DATABASE_STATEMENT_TIMEOUT_SECONDS");
    }

    #[test]
    fn the_low_balance_threshold_is_five_unless_configured() {
        assert_eq!(config(&[]).unwrap().low_balance_threshold, 5);
        let c = config(&[("LOW_BALANCE_THRESHOLD", "0")]).unwrap();
        assert_eq!(c.low_balance_threshold, 0);
        let err = config(&[("LOW_BALANCE_THRESHOLD", "-1")]).unwrap_err();
        assert_eq!(err.variable, "LOW_BALANCE_THRESHOLD");
    }

    #[test]
    fn webhook_secrets_are_a_comma_separated_list() {
        let c = config(&[("STRIPE_WEBHOOK_SECRET", "whsec_a, whsec_b")]).unwrap();
        assert_eq!(c.stripe.webhook_secrets.len(), 2);
        assert_eq!(
            format!("{:?}", c.stripe.webhook_secrets[0]),
            "Secret([redacted])"
        );
    }

    #[test]
    fn trusted_proxies_are_a_comma_separated_list_of_ipv4_and_ipv6_blocks() {
        let c = config(&[("TRUSTED_PROXIES", " 10.0.0.0/8, ::1/128,192.168.1.7,")]).unwrap();
        let blocks: Vec<String> = c.trusted_proxies.iter().map(|b| b.to_string()).collect();
        assert_eq!(blocks, ["10.0.0.0/8", "::1/128", "192.168.1.7/32"]);
        assert!(config(&[]).unwrap().trusted_proxies.is_empty());
    }

    #[test]
    fn invalid_trusted_proxies_are_refused_naming_the_variable() {
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0/8",
            "10.0.0.1/8",
            "2001:db8::1/32",
            "proxy.internal",
            "10.0.0.0/8,nonsense",
        ] {
            let err = config(&[("TRUSTED_PROXIES", bad)]).unwrap_err();
            assert_eq!(err.variable, "TRUSTED_PROXIES", "{bad}");
            assert!(err.to_string().starts_with("TRUSTED_PROXIES: "), "{err}");
        }
    }

    #[test]
    fn a_block_contains_the_addresses_under_its_prefix() {
        let block = |text: &str| text.parse::<Cidr>().unwrap();
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert!(block("10.0.0.0/8").contains(ip("10.255.1.2")));
        assert!(!block("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(block("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(block("::ffff:10.0.0.0/104").contains(ip("10.1.2.3")));
        assert!(block("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!block("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(block("::/0").contains(ip("2001:db8::1")));
        assert!(block("::1/128").contains(ip("::1")));
        assert!(!block("::1/128").contains(ip("::2")));
        assert!(block("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
        assert!(!block("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(block("192.168.1.7").contains(ip("192.168.1.7")));
        assert!(!block("192.168.1.7").contains(ip("192.168.1.8")));
    }
}
