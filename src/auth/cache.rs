//! Verified tokens, remembered until they expire, so that a client reusing its access token
//! (Supabase's last an hour) pays for the signature check once and not on every request.
//!
//! An entry is found by the SHA-256 of the whole token as sent: any change to the header, the
//! claims or the signature is another token, verified afresh. An entry answers only while the
//! verifier itself would accept the token: up to `exp` plus the same leeway, and not before
//! `nbf` less it. A token checked against a JWKS key answers from here only while the JWKS still
//! holds that same key: a refresh that drops or replaces it sends the token back to the
//! verifier. Refusals are never remembered.
//!
//! The cache is bounded. It is split into shards by the digest's first byte, and each shard
//! keeps two generations: new and promoted entries go to the young one; when it is full it
//! becomes the old one and the previous old one is dropped. A token in use is promoted on every
//! hit, so it stays; tokens nobody sends any more fall out within two generations.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use jsonwebtoken::DecodingKey;
use sha2::{Digest, Sha256};

use super::VerifiedToken;

const SHARDS: usize = 16;

/// SHA-256 of a token.
pub type TokenDigest = [u8; 32];

pub fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// What a verified token was found to be, and until when that holds.
#[derive(Clone)]
pub struct Entry {
    pub token: VerifiedToken,
    /// Seconds since the epoch up to which (inclusive) the verifier accepts it: `exp` + leeway.
    pub valid_through: u64,
    /// Seconds since the epoch from which the verifier accepts it: `nbf` − leeway, or 0.
    pub valid_from: u64,
    /// The JWKS key it was checked against (none for the project's HS256 secret): its `kid`,
    /// and the key itself, which must still be the one the JWKS has under that `kid`.
    pub jwks_key: Option<(Arc<str>, Arc<DecodingKey>)>,
}

impl Entry {
    fn answers_at(&self, now: u64) -> bool {
        self.valid_from <= now && now <= self.valid_through
    }
}

/// The digest is already uniform: its first eight bytes are the hash.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 |= u64::from(*b) << (8 * i);
        }
    }
}

type Map = HashMap<TokenDigest, Entry, BuildHasherDefault<DigestHasher>>;

#[derive(Default)]
struct Shard {
    young: Map,
    old: Map,
}

pub struct TokenCache {
    shards: Vec<Mutex<Shard>>,
    /// Entries per generation per shard: a shard holds at most twice this.
    generation: usize,
}

impl TokenCache {
    /// A cache of about `capacity` tokens (never more); `None` for a capacity of 0, which
    /// turns caching off.
    pub fn new(capacity: usize) -> Option<Self> {
        if capacity == 0 {
            return None;
        }
        let generation = capacity.div_ceil(2 * SHARDS);
        Some(Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            generation,
        })
    }

    fn shard(&self, key: &TokenDigest) -> std::sync::MutexGuard<'_, Shard> {
        // The digest's last byte picks the shard; its first bytes are the map's hash.
        self.shards[usize::from(key[31]) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The entry for `key` if it answers at `now` (seconds since the epoch). An expired entry
    /// is dropped.
    pub fn get(&self, key: &TokenDigest, now: u64) -> Option<Entry> {
        let mut shard = self.shard(key);
        if let Some(entry) = shard.young.get(key) {
            if entry.answers_at(now) {
                return Some(entry.clone());
            }
            if now > entry.valid_through {
                shard.young.remove(key);
            }
            return None;
        }
        let entry = shard.old.remove(key)?;
        if now > entry.valid_through {
            return None;
        }
        let found = entry.answers_at(now).then(|| entry.clone());
        self.put(&mut shard, *key, entry);
        found
    }

    pub fn insert(&self, key: TokenDigest, entry: Entry) {
        let mut shard = self.shard(&key);
        shard.old.remove(&key);
        self.put(&mut shard, key, entry);
    }

    /// Forgets `key` (its JWKS key changed).
    pub fn remove(&self, key: &TokenDigest) {
        let mut shard = self.shard(key);
        shard.young.remove(key);
        shard.old.remove(key);
    }

    fn put(&self, shard: &mut Shard, key: TokenDigest, entry: Entry) {
        if shard.young.len() >= self.generation && !shard.young.contains_key(&key) {
            shard.old = std::mem::take(&mut shard.young);
        }
        shard.young.insert(key, entry);
    }

    /// Tokens held now (for tests and metrics).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap_or_else(|p| p.into_inner());
                s.young.len() + s.old.len()
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;
    use uuid::Uuid;

    fn entry(valid_from: u64, valid_through: u64) -> Entry {
        Entry {
            token: VerifiedToken {
                role: Role::Authenticated,
                user_id: Some(Uuid::nil()),
                is_anonymous: false,
                claims: Arc::from("{}"),
            },
            valid_through,
            valid_from,
            jwks_key: None,
        }
    }

    #[test]
    fn an_entry_answers_from_nbf_through_exp_and_never_after() {
        let cache = TokenCache::new(100).unwrap();
        let key = digest("a.b.c");
        cache.insert(key, entry(1_000, 2_000));
        assert!(cache.get(&key, 999).is_none(), "before nbf");
        assert!(cache.get(&key, 1_000).is_some());
        assert!(
            cache.get(&key, 2_000).is_some(),
            "the last second it is valid"
        );
        assert!(cache.get(&key, 2_001).is_none(), "past exp and the leeway");
        // Dropped once expired: not even an earlier time finds it again.
        assert!(cache.get(&key, 1_500).is_none());
    }

    #[test]
    fn another_token_is_another_entry() {
        let cache = TokenCache::new(100).unwrap();
        cache.insert(digest("a.b.c"), entry(0, u64::MAX));
        assert!(cache.get(&digest("a.b.d"), 10).is_none());
        assert!(cache.get(&digest("a.b.c"), 10).is_some());
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity_and_keeps_what_is_used() {
        let capacity = 320;
        let cache = TokenCache::new(capacity).unwrap();
        let kept = digest("kept");
        cache.insert(kept, entry(0, u64::MAX));
        for i in 0..10_000 {
            cache.insert(digest(&format!("token {i}")), entry(0, u64::MAX));
            assert!(cache.len() <= capacity, "{} entries", cache.len());
            if i % 5 == 0 {
                assert!(cache.get(&kept, 1).is_some(), "lost a token in use at {i}");
            }
        }
        // The tokens inserted early and never used again are gone.
        assert!(cache.get(&digest("token 0"), 1).is_none());
    }

    #[test]
    fn a_capacity_of_zero_turns_the_cache_off() {
        assert!(TokenCache::new(0).is_none());
    }
}
