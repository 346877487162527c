//! Logs and metrics. Logs never carry tokens, emails, secrets or bodies; every request span
//! carries its request id.

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the log subscriber (`RUST_LOG` filters; default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("http_request_duration_seconds".to_owned()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0,
                    ],
                )
                .expect("bucket list is not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "http_requests_total",
        "HTTP requests answered, by method, route and status."
    );
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by method and route."
    );
    describe_counter!(
        "http_rate_limited_total",
        "Requests refused by the per-caller rate limit."
    );
    describe_gauge!(
        "db_pool_connections",
        "Database pool connections, by state (idle, in_use)."
    );
    describe_gauge!(
        "db_pool_max_connections",
        "Largest size the database pool may grow to."
    );
    describe_counter!(
        "credits_granted_total",
        "Credits added to balances, by source."
    );
    describe_counter!(
        "credits_spent_total",
        "Credits taken from balances, by source."
    );
    describe_counter!(
        "ad_views_total",
        "Rewarded ad views on the client's word, by outcome (accepted, refused, failed, session_required)."
    );
    describe_counter!("ad_sessions_opened_total", "Ad sessions opened.");
    describe_counter!(
        "ad_sessions_completed_total",
        "Ad sessions paid (a view counted), by their completion or by AdMob's callback."
    );
    describe_counter!(
        "ad_sessions_rewarded_total",
        "Ad sessions paid with at least one credit."
    );
    describe_counter!(
        "ad_sessions_refused_total",
        "Ad session requests refused, by reason (too_many_ad_sessions, daily_ad_limit_reached, ad_session_expired, anonymous_user)."
    );
    describe_counter!(
        "admob_ssv_callbacks_total",
        "AdMob server-side verification callbacks, by outcome (accepted, duplicate, refused, invalid_signature, malformed) and refusal reason."
    );
    describe_counter!(
        "stripe_webhook_events_total",
        "Stripe events received, by type and outcome (processed, ignored, duplicate, failed, rejected)."
    );
    describe_counter!(
        "stripe_reconciled_events_total",
        "Stripe events found by reconcile, by type and outcome (already_processed, processed, ignored, failed, rejected)."
    );
    describe_counter!(
        "stripe_webhook_signature_failures_total",
        "Webhook deliveries refused for their signature, by reason."
    );
    describe_gauge!(
        "live_streams_open",
        "Open live balance streams (GET /v1/me/events)."
    );
    describe_gauge!(
        "live_listening",
        "1 while the process listens for ledger notifications (it does while streams are open), else 0."
    );
    describe_counter!(
        "maintenance_runs_total",
        "Maintenance runs started by this process (the CLI), by task and outcome."
    );
    describe_gauge!(
        "maintenance_last_run_timestamp_seconds",
        Unit::Seconds,
        "When each maintenance task last ran (CLI or pg_cron), as a Unix time."
    );
    describe_gauge!(
        "maintenance_last_run_outcome",
        "1 for the outcome of each task's last run (ok, findings, failed, interrupted, running), else 0."
    );
}

/// Counts and times every request by its route template (never the raw path, whose ids
/// would make one series per user), around `inner`, which answers it.
pub async fn track_requests<F, Fut>(request: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let started = Instant::now();
    let method = method_label(request.method());
    // The route template (`/v1/admin/users/{id}`), never the path: every label comes from a
    // closed set, so no request can add a series.
    let route = request.extensions().get::<MatchedPath>().cloned();
    let response = inner(request).await;
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let (count, duration) = request_series(method, route, response.status().as_u16());
    count.increment(1);
    duration.record(started.elapsed().as_secs_f64());
    response
}

/// The handles of one request series: its count and its duration.
type Series = (metrics::Counter, metrics::Histogram);

/// The request series' handles, registered once each. Building a series' key (its labels,
/// owned strings) and finding it in the recorder cost more than the rest of the recording;
/// here a request finds its handles with one read lock and no allocation. The labels come
/// from closed sets (see [`track_requests`]), so the map stays small.
fn request_series(method: &'static str, route: &str, status: u16) -> Series {
    type Map = HashMap<String, Vec<(&'static str, u16, Series)>>;
    static SERIES: OnceLock<RwLock<Map>> = OnceLock::new();
    let series = SERIES.get_or_init(Default::default);
    let find = |map: &Map| {
        map.get(route).and_then(|found| {
            found
                .iter()
                .find(|(m, s, _)| *m == method && *s == status)
                .map(|(_, _, handles)| handles.clone())
        })
    };
    registered_once(series, find, |map| {
        let handles = (
            metrics::counter!("http_requests_total", "method" => method, "route" => route.to_owned(), "status" => status.to_string()),
            metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route.to_owned()),
        );
        map.entry(route.to_owned())
            .or_default()
            .push((method, status, handles.clone()));
        handles
    })
}

/// Metric handles registered once and then shared: what `find` finds under the read lock is
/// answered at once; a miss takes the write lock, looks again (another thread may have
/// registered it meanwhile) and only then `register`s. A poisoned lock is used as it is: the
/// handles it guards stay valid.
fn registered_once<M, V>(
    lock: &RwLock<M>,
    find: impl Fn(&M) -> Option<V>,
    register: impl FnOnce(&mut M) -> V,
) -> V {
    if let Some(found) = find(&lock.read().unwrap_or_else(|p| p.into_inner())) {
        return found;
    }
    let mut map = lock.write().unwrap_or_else(|p| p.into_inner());
    if let Some(found) = find(&map) {
        return found;
    }
    register(&mut map)
}

/// The methods the API serves by name; anything else (`PROPFIND`, made-up verbs) is `other`.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Credits added to a balance, for the dashboard.
pub fn credits_granted(source: &'static str, amount: i64) {
    if amount > 0 {
        credits_counter(CreditFlow::Granted, source).increment(amount as u64);
    }
}

/// Credits taken from a balance.
pub fn credits_spent(source: &'static str, amount: i64) {
    if amount > 0 {
        credits_counter(CreditFlow::Spent, source).increment(amount as u64);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CreditFlow {
    Granted,
    Spent,
}

/// The counter of credits granted or spent from one source, registered once: `metrics::counter!`
/// builds the series' key and looks it up in the recorder at every call. Sources are the
/// code's own constants, so the list stays short.
fn credits_counter(flow: CreditFlow, source: &'static str) -> metrics::Counter {
    type List = Vec<(CreditFlow, &'static str, metrics::Counter)>;
    static COUNTERS: OnceLock<RwLock<List>> = OnceLock::new();
    let counters = COUNTERS.get_or_init(Default::default);
    let find = |list: &List| {
        list.iter()
            .find(|(f, s, _)| *f == flow && *s == source)
            .map(|(_, _, counter)| counter.clone())
    };
    registered_once(counters, find, |list| {
        let counter = match flow {
            CreditFlow::Granted => metrics::counter!("credits_granted_total", "source" => source),
            CreditFlow::Spent => metrics::counter!("credits_spent_total", "source" => source),
        };
        list.push((flow, source, counter.clone()));
        counter
    })
}

/// The `X-Request-Id` of a request that came without one: a version 4 UUID, unique in this
/// process (a counter through a bijective mix) and, by its random half, across processes.
/// Only the first one reads the system's random source; `Uuid::new_v4` costs a `getrandom`
/// system call per request.
pub fn new_request_id() -> axum::http::HeaderValue {
    static SEED: OnceLock<(u64, u64)> = OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let (prefix, offset) = *SEED.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair());
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&prefix.to_be_bytes());
    bytes[8..].copy_from_slice(&mix(n.wrapping_add(offset)).to_be_bytes());
    let id = uuid::Builder::from_random_bytes(bytes).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut text);
    axum::http::HeaderValue::from_str(text).expect("a UUID is a valid header value")
}

/// SplitMix64's finalizer: a bijection on 64 bits that scatters consecutive inputs.
pub fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::new_request_id;

    #[test]
    fn request_ids_are_distinct_version_4_uuids() {
        let ids: std::collections::HashSet<String> = (0..10_000)
            .map(|_| new_request_id().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(100) {
            let parsed = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(parsed.get_version_num(), 4, "{id}");
            assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
    }
}
