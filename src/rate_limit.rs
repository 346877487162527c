//! Per-caller rate limiting (docs/api.md, "Rate limits"): a token bucket per user, or per client IP for
//! requests without a valid token. Stripe webhooks are never limited.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::Caller;
use crate::error::ApiError;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    User(uuid::Uuid),
    Service,
    Ip(IpAddr),
    Unknown,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets: `burst` tokens at most, refilled at `per_minute / 60` per second.
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<Key, Bucket>>,
    last_sweep: Mutex<Instant>,
}

impl RateLimiter {
    /// `per_minute = 0` turns limiting off.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(per_minute) / 60.0,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    fn enabled(&self) -> bool {
        self.per_second > 0.0
    }

    /// Takes one token for `key`, or says how many seconds until one is available.
    fn take(&self, key: Key, now: Instant) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
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

    /// Forgets buckets that have refilled completely; they behave exactly like new ones.
    fn sweep(&self, now: Instant) {
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
            if now.saturating_duration_since(*last) < Duration::from_secs(60) {
                return;
            }
            *last = now;
        }
        let full_after = Duration::from_secs_f64(self.burst / self.per_second);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets.retain(|_, b| now.saturating_duration_since(b.updated) < full_after);
    }
}

/// The middleware: runs after [`crate::auth::authenticate`], so a verified token is known.
pub async fn limit(
    State(limiter): State<Arc<RateLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if !limiter.enabled() || !path.starts_with("/v1/") || path.starts_with("/v1/webhooks/") {
        return next.run(request).await;
    }
    let key = match request.extensions().get::<Caller>() {
        Some(Caller::Token(token)) => match token.user_id {
            Some(id) => Key::User(id),
            None => Key::Service,
        },
        _ => match request.extensions().get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(addr)) => Key::Ip(addr.ip()),
            None => Key::Unknown,
        },
    };
    let now = Instant::now();
    limiter.sweep(now);
    match limiter.take(key, now) {
        Ok(()) => next.run(request).await,
        Err(retry_after_seconds) => {
            metrics::counter!("http_rate_limited_total").increment(1);
            ApiError::RateLimited {
                retry_after_seconds,
            }
            .into_response()
        }
    }
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
}
