//! Google's verifier keys for AdMob's server-side verification callbacks, fetched from
//! `ADMOB_VERIFIER_KEYS_URL` (`{"keys": [{"keyId", "pem", "base64"}]}`, each a P-256
//! SubjectPublicKeyInfo) and cached by key id, and the check of a callback's signature.
//!
//! The shape follows the JWKS cache of [`crate::auth`]: fetches are one at a time and at least
//! [`JwksTiming::cooldown`] apart whatever started them, so callbacks with made-up key ids
//! cannot turn into a flood of requests to Google; a failed fetch keeps the keys known. Known
//! keys older than [`JwksTiming::refresh_after`] are refreshed on the next callback (AdMob
//! waits for our answer and retries, so no background task is needed).

use std::collections::HashMap;
use std::sync::{RwLock, RwLockReadGuard};
use std::time::Instant;

use base64::Engine;
use ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;

use crate::config::JwksTiming;

/// Why a callback's signature was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// No key with this id, even after a refetch.
    UnknownKey,
    /// The signature is not a DER-encoded ECDSA signature.
    Malformed,
    /// The signature does not match the message under the key.
    Mismatch,
}

impl SignatureError {
    /// A label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownKey => "unknown_key",
            Self::Malformed => "malformed_signature",
            Self::Mismatch => "mismatch",
        }
    }
}

#[derive(Default)]
struct Cached {
    keys: HashMap<i64, VerifyingKey>,
    fetched_at: Option<Instant>,
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

    /// The key, unless it should be fetched again first (unknown, or old), and may be.
    fn usable(&self, key_id: i64, now: Instant, timing: &JwksTiming) -> Lookup {
        let wants_fetch = !self.keys.contains_key(&key_id) || self.is_old(now, timing);
        if wants_fetch && self.may_fetch(now, timing) {
            return Lookup::Fetch;
        }
        Lookup::Done(self.keys.get(&key_id).cloned())
    }
}

enum Lookup {
    Done(Option<VerifyingKey>),
    Fetch,
}

pub struct AdmobKeys {
    url: String,
    client: reqwest::Client,
    timing: JwksTiming,
    /// Never held across an `.await`.
    cached: RwLock<Cached>,
    /// One fetch at a time; callbacks that need one wait for it and read what it found.
    fetching: tokio::sync::Mutex<()>,
}

impl AdmobKeys {
    pub fn new(url: String, client: reqwest::Client, timing: JwksTiming) -> Self {
        Self {
            url,
            client,
            timing,
            cached: RwLock::new(Cached::default()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// Checks `signature` (DER) over `message` with the key `key_id`.
    pub async fn verify(
        &self,
        key_id: i64,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), SignatureError> {
        let signature = Signature::from_der(signature).map_err(|_| SignatureError::Malformed)?;
        let key = self.key(key_id).await.ok_or(SignatureError::UnknownKey)?;
        key.verify(message, &signature)
            .map_err(|_| SignatureError::Mismatch)
    }

    async fn key(&self, key_id: i64) -> Option<VerifyingKey> {
        // A known key answers at once; an unknown one waits for any fetch in flight, which
        // may be bringing it.
        if let Lookup::Done(Some(key)) = self.read().usable(key_id, Instant::now(), &self.timing) {
            return Some(key);
        }
        let _one_at_a_time = self.fetching.lock().await;
        // The fetch this callback waited for may have brought the key, or used the cooldown.
        if let Lookup::Done(key) = self.read().usable(key_id, Instant::now(), &self.timing) {
            return key;
        }
        self.fetch_and_store().await;
        self.read().keys.get(&key_id).cloned()
    }

    fn read(&self) -> RwLockReadGuard<'_, Cached> {
        self.cached.read().unwrap_or_else(|p| p.into_inner())
    }

    async fn fetch_and_store(&self) {
        self.cached
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .last_attempt = Some(Instant::now());
        let fetched = self.fetch().await;
        let mut cached = self.cached.write().unwrap_or_else(|p| p.into_inner());
        match fetched {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "fetched the AdMob verifier keys");
                cached.keys = keys;
                cached.fetched_at = Some(Instant::now());
            }
            Err(err) => tracing::warn!(
                error = %err,
                "could not fetch the AdMob verifier keys; keeping the known keys"
            ),
        }
    }

    async fn fetch(&self) -> anyhow::Result<HashMap<i64, VerifyingKey>> {
        let body: serde_json::Value = self
            .client
            .get(&self.url)
            .timeout(self.timing.fetch_timeout)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let entries = body
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or_else(|| anyhow::anyhow!("the key document has no \"keys\" array"))?;
        // A key this service cannot read is skipped, not fatal to the others.
        Ok(entries.iter().filter_map(parse_key).collect())
    }
}

/// One `{"keyId", "pem", "base64"}` entry: the id (a number, or a string of digits) and the
/// key from `base64` (DER), or else from `pem`.
fn parse_key(entry: &serde_json::Value) -> Option<(i64, VerifyingKey)> {
    let id = match entry.get("keyId")? {
        serde_json::Value::Number(n) => n.as_i64()?,
        serde_json::Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    let der_base64 = match entry.get("base64").and_then(|b| b.as_str()) {
        Some(b64) => b64.to_owned(),
        None => entry
            .get("pem")?
            .as_str()?
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect(),
    };
    let der = base64::engine::general_purpose::STANDARD
        .decode(der_base64.trim())
        .ok()?;
    Some((id, VerifyingKey::from_public_key_der(&der).ok()?))
}
