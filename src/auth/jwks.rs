//! The project's asymmetric signing keys, fetched from its JWKS URL and cached by `kid`.
//!
//! A request whose `kid` is known never waits on the auth server: once the keys are older than
//! [`JwksTiming::refresh_after`] they are still used, and one background task refreshes them;
//! when that refresh fails the keys already known are kept. An unknown `kid` (a key rotation,
//! or a forgery) triggers a fetch the request waits for, but fetches are at least
//! [`JwksTiming::cooldown`] apart, and concurrent requests share the fetch in flight, so a
//! flood of tokens with made-up key ids cannot turn into a flood of requests to the auth server.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Instant;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::config::JwksTiming;

/// A verification key and the one algorithm it may be used with.
#[derive(Clone)]
pub struct VerificationKey {
    pub algorithm: Algorithm,
    pub key: Arc<DecodingKey>,
}

#[derive(Default)]
struct Cached {
    keys: HashMap<String, VerificationKey>,
    /// When the keys were last fetched successfully.
    fetched_at: Option<Instant>,
    /// When the last fetch started, successful or not.
    last_attempt: Option<Instant>,
}

impl Cached {
    fn may_fetch(&self, now: Instant, timing: &JwksTiming) -> bool {
        self.last_attempt
            .is_none_or(|t| now.saturating_duration_since(t) >= timing.cooldown)
    }

    fn is_old(&self, now: Instant, timing: &JwksTiming) -> bool {
        self.fetched_at
            .is_none_or(|t| now.saturating_duration_since(t) >= timing.refresh_after)
    }
}

/// Cheap to share: the spawned refresh holds the same cache.
pub struct JwksCache {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    client: reqwest::Client,
    timing: JwksTiming,
    /// Never held across an `.await`: readers on the request path must not wait on a fetch.
    cached: RwLock<Cached>,
    /// One fetch at a time; a request with an unknown `kid` waits for the fetch in flight and
    /// reads what it found.
    fetching: tokio::sync::Mutex<()>,
    /// A background refresh has been spawned and has not finished.
    refreshing: AtomicBool,
}

impl JwksCache {
    pub fn new(url: String, client: reqwest::Client, timing: JwksTiming) -> Self {
        Self {
            inner: Arc::new(Inner {
                url,
                client,
                timing,
                cached: RwLock::new(Cached::default()),
                fetching: tokio::sync::Mutex::new(()),
                refreshing: AtomicBool::new(false),
            }),
        }
    }

    /// The key for `kid`. A known key answers at once (starting a background refresh when the
    /// keys are old); an unknown one waits for a fetch, unless one happened within the cooldown.
    pub async fn key(&self, kid: &str) -> Option<VerificationKey> {
        let now = Instant::now();
        let (known, refresh) = {
            let cached = self.inner.read();
            let known = cached.keys.get(kid).cloned();
            let refresh = known.is_some()
                && cached.is_old(now, &self.inner.timing)
                && cached.may_fetch(now, &self.inner.timing);
            (known, refresh)
        };
        if let Some(key) = known {
            if refresh {
                self.refresh_in_background();
            }
            return Some(key);
        }

        let _one_at_a_time = self.inner.fetching.lock().await;
        {
            // The fetch this request waited for may have brought the key, or used the cooldown.
            let cached = self.inner.read();
            if let Some(key) = cached.keys.get(kid) {
                return Some(key.clone());
            }
            if !cached.may_fetch(Instant::now(), &self.inner.timing) {
                return None;
            }
        }
        self.inner.fetch_and_store().await;
        self.inner.read().keys.get(kid).cloned()
    }

    /// Fetches the key set once, for start-up; failures are logged, not fatal.
    pub async fn prefetch(&self) {
        let _one_at_a_time = self.inner.fetching.lock().await;
        self.inner.fetch_and_store().await;
    }

    fn refresh_in_background(&self) {
        if self
            .inner
            .refreshing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let _done = ClearOnDrop(&inner.refreshing);
            let _one_at_a_time = inner.fetching.lock().await;
            let still_needed = {
                let now = Instant::now();
                let cached = inner.read();
                cached.is_old(now, &inner.timing) && cached.may_fetch(now, &inner.timing)
            };
            if still_needed {
                inner.fetch_and_store().await;
            }
        });
    }
}

/// Lowers the flag however the refresh task ends, so that a panic cannot stop refreshes.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Inner {
    fn read(&self) -> RwLockReadGuard<'_, Cached> {
        self.cached.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Fetches the key set and replaces the known keys with it; on failure keeps them.
    /// The caller holds `fetching`.
    async fn fetch_and_store(&self) {
        self.cached
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .last_attempt = Some(Instant::now());
        let fetched = self.fetch().await;
        let mut cached = self.cached.write().unwrap_or_else(|p| p.into_inner());
        match fetched {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "fetched the JWKS");
                cached.keys = keys;
                cached.fetched_at = Some(Instant::now());
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not fetch the JWKS; keeping the known keys")
            }
        }
    }

    async fn fetch(&self) -> anyhow::Result<HashMap<String, VerificationKey>> {
        let response = self
            .client
            .get(&self.url)
            .timeout(self.timing.fetch_timeout)
            .send()
            .await?
            .error_for_status()?;
        let body: serde_json::Value = response.json().await?;
        let entries = body
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or_else(|| anyhow::anyhow!("the JWKS document has no \"keys\" array"))?;

        // Keys this service cannot use (unknown types, symmetric keys, keys for encryption)
        // are skipped one by one instead of failing the whole set.
        let mut keys = HashMap::new();
        for entry in entries {
            let Ok(jwk) = serde_json::from_value::<Jwk>(entry.clone()) else {
                continue;
            };
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let Some(algorithm) = signing_algorithm(&jwk) else {
                continue;
            };
            if let Ok(key) = DecodingKey::from_jwk(&jwk) {
                keys.insert(
                    kid,
                    VerificationKey {
                        algorithm,
                        key: Arc::new(key),
                    },
                );
            }
        }
        Ok(keys)
    }
}

/// The asymmetric algorithm a JWK is for: its `alg` when given, else implied by its curve or
/// type. Symmetric (`oct`) keys are never taken from a JWKS.
fn signing_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    if let Some(use_) = &jwk.common.public_key_use
        && *use_ != jsonwebtoken::jwk::PublicKeyUse::Signature
    {
        return None;
    }
    let declared = jwk.common.key_algorithm.and_then(|alg| match alg {
        KeyAlgorithm::ES256 => Some(Algorithm::ES256),
        KeyAlgorithm::ES384 => Some(Algorithm::ES384),
        KeyAlgorithm::RS256 => Some(Algorithm::RS256),
        KeyAlgorithm::RS384 => Some(Algorithm::RS384),
        KeyAlgorithm::RS512 => Some(Algorithm::RS512),
        KeyAlgorithm::PS256 => Some(Algorithm::PS256),
        KeyAlgorithm::PS384 => Some(Algorithm::PS384),
        KeyAlgorithm::PS512 => Some(Algorithm::PS512),
        KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
        _ => None,
    });
    match (&jwk.algorithm, declared) {
        (AlgorithmParameters::OctetKey(_), _) => None,
        (_, Some(alg)) if jwk.common.key_algorithm.is_some() => Some(alg),
        (_, None) if jwk.common.key_algorithm.is_some() => None,
        (AlgorithmParameters::EllipticCurve(ec), _) => match ec.curve {
            EllipticCurve::P256 => Some(Algorithm::ES256),
            EllipticCurve::P384 => Some(Algorithm::ES384),
            _ => None,
        },
        (AlgorithmParameters::RSA(_), _) => Some(Algorithm::RS256),
        (AlgorithmParameters::OctetKeyPair(_), _) => Some(Algorithm::EdDSA),
    }
}
