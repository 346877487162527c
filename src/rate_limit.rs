//! Per-caller rate limiting (docs/api.md, "Rate limits"): a token bucket per user, or per
//! client address for requests without a valid token. Stripe webhooks are never limited.
//!
//! The client address is the TCP peer's, unless the peer is a trusted proxy
//! (`TRUSTED_PROXIES`): then it is the right-most address of `X-Forwarded-For` that is not
//! itself a trusted proxy, since everything left of it was written by the client. IPv6 clients
//! share one bucket per /64, the block a single host or home network is usually given.
//!
//! The buckets live in this process: with N replicas a caller can make N times the configured
//! rate. Their number is bounded, so a flood of distinct addresses cannot grow memory.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderMap;

use crate::auth::Caller;
use crate::config::{Cidr, Config};
use crate::error::ApiError;

/// How many buckets are kept at most, unless told otherwise. An entry takes 48 bytes; with
/// the map's spare slots that comes to about 13 MB at the worst.
pub const DEFAULT_MAX_BUCKETS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    User(uuid::Uuid),
    Service,
    /// An IPv4 address, or the first 64 bits of an IPv6 one.
    Ip(IpAddr),
    Unknown,
}

impl Key {
    fn client(address: IpAddr) -> Self {
        match address.to_canonical() {
            IpAddr::V6(v6) => Key::Ip(IpAddr::V6(Ipv6Addr::from(
                u128::from(v6) & (u128::MAX << 64),
            ))),
            v4 => Key::Ip(v4),
        }
    }
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets: `burst` tokens at most, refilled at `per_minute / 60` per second.
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    max_buckets: usize,
    trusted_proxies: Vec<Cidr>,
    buckets: Mutex<HashMap<Key, Bucket>>,
    last_sweep: Mutex<Instant>,
}

impl RateLimiter {
    /// `per_minute = 0` turns limiting off.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(per_minute) / 60.0,
            burst: f64::from(burst.max(1)),
            max_buckets: DEFAULT_MAX_BUCKETS,
            trusted_proxies: Vec::new(),
            buckets: Mutex::new(HashMap::new()),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// The limiter `config` describes.
    pub fn from_config(config: &Config) -> Self {
        Self::new(config.rate_limit_per_minute, config.rate_limit_burst)
            .trusting(config.trusted_proxies.clone())
    }

    /// Takes the client address from `X-Forwarded-For` when the peer is in one of `proxies`.
    pub fn trusting(mut self, proxies: Vec<Cidr>) -> Self {
        self.trusted_proxies = proxies;
        self
    }

    /// Keeps at most `max` buckets (at least one).
    pub fn with_max_buckets(mut self, max: usize) -> Self {
        self.max_buckets = max.max(1);
        self
    }

    fn enabled(&self) -> bool {
        self.per_second > 0.0
    }

    /// Whether `bucket` has filled up again by `now`, making it the same as a new one.
    fn has_refilled(&self, bucket: &Bucket, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens + elapsed * self.per_second >= self.burst
    }

    /// Takes one token for `key`, or says how many seconds until one is available.
    fn take(&self, key: Key, now: Instant) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= self.max_buckets && !buckets.contains_key(&key) {
            self.make_room(&mut buckets, now);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / self.per_second).ceil().max(1.0) as u64)
        }
    }

    /// Frees room for new callers in a full map. Buckets that have refilled go first: they
    /// behave exactly like new ones, so forgetting them loses nothing. If that is not enough,
    /// the least recently used go, whose callers will start again with a full burst. A tenth
    /// of the map is freed at once, so that a flood of new addresses pays for this walk over
    /// the map once per many requests rather than on each.
    fn make_room(&self, buckets: &mut HashMap<Key, Bucket>, now: Instant) {
        buckets.retain(|_, b| !self.has_refilled(b, now));

        let keep = self.max_buckets - (self.max_buckets / 10).max(1);
        let Some(excess) = buckets.len().checked_sub(keep).filter(|e| *e > 0) else {
            return;
        };
        let mut ages: Vec<Instant> = buckets.values().map(|b| b.updated).collect();
        let (_, &mut cutoff, _) = ages.select_nth_unstable(excess - 1);
        // Everything older than the cutoff goes (fewer than `excess` buckets), then as many
        // buckets last used exactly at the cutoff as are still needed.
        buckets.retain(|_, b| b.updated > cutoff);
        let mut still = excess.saturating_sub(ages.iter().filter(|t| **t < cutoff).count());
        buckets.retain(|_, b| {
            if still > 0 && b.updated == cutoff {
                still -= 1;
                false
            } else {
                true
            }
        });
    }

    /// Forgets buckets that have refilled completely; they behave exactly like new ones.
    fn sweep(&self, now: Instant) {
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
            if now.saturating_duration_since(*last) < Duration::from_secs(60) {
                return;
            }
            *last = now;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets.retain(|_, b| !self.has_refilled(b, now));
    }

    fn is_trusted(&self, address: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|p| p.contains(address))
    }

    /// The address a request comes from, seen from a connection with `peer`.
    fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.is_trusted(peer) {
            return peer;
        }
        // Each proxy appends the address it was reached from, on the same line or on a line
        // of its own; the right-most hops are the trusted proxies' work, the rest the client's.
        let hops: Vec<&[u8]> = headers
            .get_all("x-forwarded-for")
            .iter()
            .flat_map(|line| line.as_bytes().split(|b| *b == b','))
            .collect();
        let mut client = None;
        for hop in hops.iter().rev() {
            // Only the hops read so far must make sense: junk the client wrote further left
            // cannot push its requests onto the proxy's bucket.
            let Some(address) = parse_hop(hop) else {
                return peer;
            };
            client = Some(address);
            if !self.is_trusted(address) {
                break;
            }
        }
        // All hops trusted: the left-most is where the request started.
        client.unwrap_or(peer)
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port as some proxies write it.
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(hop).ok()?.trim();
    let address = text
        .parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|s| s.ip()))?;
    Some(address.to_canonical())
}

/// The rate limit's verdict on `request`, after authentication: `Err` is the 429 to answer.
pub fn admit(limiter: &RateLimiter, request: &Request) -> Result<(), ApiError> {
    let path = request.uri().path();
    if !limiter.enabled() || !path.starts_with("/v1/") || path.starts_with("/v1/webhooks/") {
        return Ok(());
    }
    let key = match request.extensions().get::<Caller>() {
        Some(Caller::Token(token)) => match token.user_id {
            Some(id) => Key::User(id),
            None => Key::Service,
        },
        _ => match request.extensions().get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(peer)) => {
                Key::client(limiter.client_address(peer.ip(), request.headers()))
            }
            None => Key::Unknown,
        },
    };
    let now = Instant::now();
    limiter.sweep(now);
    limiter.take(key, now).map_err(|retry_after_seconds| {
        metrics::counter!("http_rate_limited_total").increment(1);
        ApiError::RateLimited {
            retry_after_seconds,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_the_refill_rate_applies() {
        let limiter = RateLimiter::new(60, 3);
        let start = Instant::now();
        for _ in 0..3 {
            assert!(limiter.take(Key::Unknown, start).is_ok());
        }
        assert_eq!(limiter.take(Key::Unknown, start), Err(1));
        assert!(
            limiter
                .take(Key::Unknown, start + Duration::from_secs(1))
                .is_ok()
        );
        // Another caller has its own bucket.
        assert!(limiter.take(Key::Service, start).is_ok());
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn bucket_count(limiter: &RateLimiter) -> usize {
        limiter.buckets.lock().unwrap().len()
    }

    fn has_bucket(limiter: &RateLimiter, key: &Key) -> bool {
        limiter.buckets.lock().unwrap().contains_key(key)
    }

    #[test]
    fn a_flood_of_distinct_addresses_never_grows_the_map_past_its_bound() {
        // 1 token a second: none of the flood's buckets refills during it, so room is made by
        // letting the least recently used go.
        let limiter = RateLimiter::new(60, 10).with_max_buckets(10_000);
        let start = Instant::now();
        let mut first_full_capacity = None;
        for i in 0..100_000u32 {
            let address = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let now = start + Duration::from_micros(u64::from(i));
            assert!(limiter.take(Key::client(address), now).is_ok());
            let buckets = limiter.buckets.lock().unwrap();
            assert!(
                buckets.len() <= 10_000,
                "{} buckets after {i}",
                buckets.len()
            );
            // Memory stays flat: once the map has filled up, its allocation never grows.
            match first_full_capacity {
                None if buckets.len() == 10_000 => first_full_capacity = Some(buckets.capacity()),
                Some(capacity) => assert!(
                    buckets.capacity() <= 2 * capacity,
                    "capacity {} after {i}, {capacity} when first full",
                    buckets.capacity()
                ),
                None => {}
            }
        }
        assert!(first_full_capacity.is_some());
        // The newest callers are the ones kept.
        let last = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + 99_999));
        assert!(has_bucket(&limiter, &Key::client(last)));
    }

    #[test]
    fn the_default_bound_holds_under_a_flood_of_ipv6_networks() {
        let limiter = RateLimiter::new(600, 100);
        let start = Instant::now();
        for i in 0..150_000u128 {
            let address = IpAddr::V6(Ipv6Addr::from((0x2001_0db8_u128 << 96) | (i << 64) | 1));
            assert!(limiter.take(Key::client(address), start).is_ok());
        }
        assert!(bucket_count(&limiter) <= DEFAULT_MAX_BUCKETS);
    }

    #[test]
    fn when_full_refilled_buckets_go_before_a_drained_one_however_old() {
        // One token a minute, two at most: a bucket that gave one token refills in 60 s.
        let limiter = RateLimiter::new(1, 2).with_max_buckets(3);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let drained = Key::client(ip("203.0.113.1"));
        assert!(limiter.take(drained.clone(), at(0)).is_ok());
        assert!(limiter.take(drained.clone(), at(0)).is_ok());
        assert!(limiter.take(Key::client(ip("203.0.113.2")), at(1)).is_ok());
        assert!(limiter.take(Key::client(ip("203.0.113.3")), at(2)).is_ok());

        // At 70 s the map is full; the two one-token buckets have refilled, the drained one
        // (the least recently used) has not.
        assert!(limiter.take(Key::client(ip("203.0.113.4")), at(70)).is_ok());
        assert!(bucket_count(&limiter) <= 3);
        assert!(has_bucket(&limiter, &drained));
        // So its caller still has only the 1.17 tokens it earned back, not a fresh burst.
        assert!(limiter.take(drained.clone(), at(70)).is_ok());
        assert!(limiter.take(drained, at(70)).is_err());
    }

    #[test]
    fn when_full_and_nothing_has_refilled_the_least_recently_used_bucket_goes() {
        let limiter = RateLimiter::new(60, 5).with_max_buckets(3);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let keys: Vec<Key> = (1..=4)
            .map(|i| Key::client(ip(&format!("203.0.113.{i}"))))
            .collect();
        assert!(limiter.take(keys[0].clone(), at(0)).is_ok());
        assert!(limiter.take(keys[1].clone(), at(1)).is_ok());
        assert!(limiter.take(keys[2].clone(), at(2)).is_ok());
        // The oldest caller comes back: it is now the most recently used.
        assert!(limiter.take(keys[0].clone(), at(3)).is_ok());
        assert!(limiter.take(keys[3].clone(), at(4)).is_ok());
        assert_eq!(bucket_count(&limiter), 3);
        assert!(!has_bucket(&limiter, &keys[1]));
        for kept in [&keys[0], &keys[2], &keys[3]] {
            assert!(has_bucket(&limiter, kept), "{kept:?}");
        }
    }

    #[test]
    fn ipv6_clients_share_one_bucket_per_64() {
        assert_eq!(
            Key::client(ip("2001:db8:1:2::1")),
            Key::client(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(
            Key::client(ip("2001:db8:1:2::1")),
            Key::client(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            Key::client(ip("2001:db8:1:2::1")),
            Key::Ip(ip("2001:db8:1:2::"))
        );
        // IPv4 clients keep a bucket per address, however their connection shows them.
        assert_eq!(
            Key::client(ip("::ffff:203.0.113.7")),
            Key::Ip(ip("203.0.113.7"))
        );
        assert_ne!(
            Key::client(ip("203.0.113.7")),
            Key::client(ip("203.0.113.8"))
        );
    }

    #[test]
    fn the_client_address_comes_from_x_forwarded_for_only_through_trusted_proxies() {
        let limiter = RateLimiter::new(60, 3).trusting(vec![
            "10.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        let headers = |lines: &[&[u8]]| {
            let mut map = HeaderMap::new();
            for line in lines {
                map.append(
                    "x-forwarded-for",
                    axum::http::HeaderValue::from_bytes(line).unwrap(),
                );
            }
            map
        };
        let cases: &[(&str, &[&[u8]], &str)] = &[
            ("203.0.113.50", &[b"198.51.100.1"], "203.0.113.50"),
            ("10.0.0.1", &[], "10.0.0.1"),
            ("10.0.0.1", &[b"198.51.100.1"], "198.51.100.1"),
            ("10.0.0.1", &[b"6.6.6.6, 198.51.100.1"], "198.51.100.1"),
            ("10.0.0.1", &[b"198.51.100.1, 10.0.0.7"], "198.51.100.1"),
            (
                "10.0.0.1",
                &[b"6.6.6.6", b"198.51.100.1, 10.0.0.7"],
                "198.51.100.1",
            ),
            ("10.0.0.1", &[b"10.0.0.9, 10.0.0.7"], "10.0.0.9"),
            ("10.0.0.1", &[b"198.51.100.1:4711"], "198.51.100.1"),
            ("10.0.0.1", &[b"[2001:db8::5]:443"], "2001:db8::5"),
            ("::1", &[b"2001:db8::5"], "2001:db8::5"),
            ("::ffff:10.0.0.1", &[b"198.51.100.1"], "198.51.100.1"),
            ("10.0.0.1", &[b"::ffff:198.51.100.1"], "198.51.100.1"),
            // Junk left of the client is the client's own doing and is never read.
            ("10.0.0.1", &[b"junk, 198.51.100.1"], "198.51.100.1"),
            ("10.0.0.1", &[b"\xff\xfe, 198.51.100.1"], "198.51.100.1"),
            // Malformed where it matters: the peer.
            ("10.0.0.1", &[b"junk"], "10.0.0.1"),
            ("10.0.0.1", &[b""], "10.0.0.1"),
            ("10.0.0.1", &[b"198.51.100.1,"], "10.0.0.1"),
            ("10.0.0.1", &[b"198.51.100.1, 10.0.0.300"], "10.0.0.1"),
        ];
        for (peer, lines, expected) in cases {
            assert_eq!(
                limiter.client_address(ip(peer), &headers(lines)),
                ip(expected),
                "peer {peer}, X-Forwarded-For {lines:?}"
            );
        }
    }
}
