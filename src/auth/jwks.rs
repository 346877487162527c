//! The project's asymmetric signing keys, fetched from its JWKS URL and cached by `kid`.
//!
//! An unknown `kid` triggers a refetch (key rotation), at most once per cooldown, so a flood
//! of tokens with made-up key ids cannot turn into a flood of requests to the auth server.
//! Keys are refreshed after [`KEY_TTL`]; when the refresh fails the keys already known are kept.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::{Mutex, RwLock};

/// Minimum time between two fetches of the key set.
pub const REFETCH_COOLDOWN: Duration = Duration::from_secs(30);
/// Age after which known keys are refreshed (Supabase caches its JWKS for 10 minutes).
pub const KEY_TTL: Duration = Duration::from_secs(600);

/// A verification key and the one algorithm it may be used with.
#[derive(Clone)]
pub struct VerificationKey {
    pub algorithm: Algorithm,
    pub key: Arc<DecodingKey>,
}

#[derive(Default)]
struct Cached {
    keys: HashMap<String, VerificationKey>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
}

pub struct JwksCache {
    url: String,
    client: reqwest::Client,
    cached: RwLock<Cached>,
    /// One fetch at a time; others wait and then read what it found.
    fetching: Mutex<()>,
}

impl JwksCache {
    pub fn new(url: String, client: reqwest::Client) -> Self {
        Self {
            url,
            client,
            cached: RwLock::new(Cached::default()),
            fetching: Mutex::new(()),
        }
    }

    /// The key for `kid`, fetching the key set if the id is unknown or the keys are old.
    pub async fn key(&self, kid: &str) -> Option<VerificationKey> {
        {
            let cached = self.cached.read().await;
            if let Some(key) = cached.keys.get(kid)
                && cached.fetched_at.is_some_and(|t| t.elapsed() < KEY_TTL)
            {
                return Some(key.clone());
            }
        }

        let _one_at_a_time = self.fetching.lock().await;
        {
            let cached = self.cached.read().await;
            let fresh = cached.fetched_at.is_some_and(|t| t.elapsed() < KEY_TTL);
            let cooling_down = cached
                .last_attempt
                .is_some_and(|t| t.elapsed() < REFETCH_COOLDOWN);
            if fresh && cached.keys.contains_key(kid) || cooling_down {
                return cached.keys.get(kid).cloned();
            }
        }

        let fetched = self.fetch().await;
        let mut cached = self.cached.write().await;
        cached.last_attempt = Some(Instant::now());
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
        cached.keys.get(kid).cloned()
    }

    /// Fetches the key set once, for start-up; failures are logged, not fatal.
    pub async fn prefetch(&self) {
        let _ = self.key("").await;
    }

    async fn fetch(&self) -> anyhow::Result<HashMap<String, VerificationKey>> {
        let response = self
            .client
            .get(&self.url)
            .timeout(Duration::from_secs(5))
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
