//! `amethyst-credits reconcile`: nothing Stripe sent is lost for good.
//!
//! Stripe retries a webhook for about three days; an outage, a wrongly rotated secret or a
//! disabled endpoint can outlast that. Stripe keeps every event for 30 days and lists them, so
//! this lists the events of the types the webhook handles, created in a window, and hands each
//! one that is not settled here to [`webhook::deliver`], the webhook's own path after the
//! signature check: the same claim, the same exactly-once grants, the same refund and
//! subscription rules. A webhook delivery of the same event at the same moment waits on the
//! claim, and so does another reconciliation.
//!
//! Every page is read before anything is handled, so a Stripe that cannot be read changes
//! nothing. Events are handled oldest first (Stripe lists newest first): a refund found in the
//! same pass as its purchase comes after the purchase's grant.

use std::collections::HashSet;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::webhook::{self, Delivery};
use crate::db::ServicePool;
use crate::state::AppState;
use crate::stripe_api::{StripeApiError, StripeClient};

/// The window `reconcile` looks at unless told otherwise: the time Stripe keeps retrying a
/// webhook for.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(72 * 3600);

/// What a reconciliation needs: the pool its transactions run on, and Stripe.
#[derive(Clone, Copy)]
pub struct Reconciler<'a> {
    pub pool: &'a ServicePool,
    pub stripe: &'a StripeClient,
}

/// What one reconciliation found and did, as `reconcile` prints it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Events of the handled types that Stripe listed in the window.
    pub listed: u64,
    /// Of those, the ones already settled here (processed, ignored or rejected before, or
    /// settled by a webhook delivery while this ran): nothing done.
    pub already_processed: u64,
    /// Handled now (acted on, or recorded as not needing action).
    pub processed: u64,
    /// Could not be handled: recorded as `failed` (a retry may cure it) or `rejected`
    /// (malformed), or not an event at all. Each is in [`Report::failures`].
    pub failed: u64,
}

/// One event that could not be handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedEvent {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub error: String,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub summary: Summary,
    pub failures: Vec<FailedEvent>,
}

impl Report {
    /// Whether every listed event is now settled.
    pub fn succeeded(&self) -> bool {
        self.summary.failed == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Stripe's event list could not be read: nothing was handled.
    #[error("could not list Stripe's events, nothing was handled: {0}")]
    Stripe(#[from] StripeApiError),
    /// The database could not say which events are settled: nothing was handled.
    #[error("could not read the recorded Stripe events, nothing was handled: {0}")]
    Database(#[from] sqlx::Error),
}

impl<'a> Reconciler<'a> {
    /// The state's pool and Stripe client; `None` without `STRIPE_SECRET_KEY`.
    pub fn from_state(state: &'a AppState) -> Option<Self> {
        state.stripe.as_ref().map(|stripe| Reconciler {
            pool: &state.pool,
            stripe,
        })
    }

    /// Lists the events created in the last `window` and handles every one not settled here.
    pub async fn run(self, window: Duration) -> Result<Report, ReconcileError> {
        let since = chrono::Utc::now().timestamp() - window.as_secs().min(i64::MAX as u64) as i64;
        let events = self.list(since.max(0)).await?;

        let ids: Vec<String> = events.iter().map(|(id, _)| id.clone()).collect();
        // Settled events are not handed on: their lookups would ask Stripe for nothing. An event
        // settled between this query and its claim is still caught by the claim.
        let settled: HashSet<String> = sqlx::query_scalar!(
            "select id from public.stripe_events where id = any($1) and status <> 'failed'",
            &ids,
        )
        .fetch_all(self.pool)
        .await?
        .into_iter()
        .collect();

        let mut report = Report {
            summary: Summary {
                listed: events.len() as u64,
                ..Summary::default()
            },
            failures: Vec::new(),
        };
        for (id, payload) in events {
            let kind = payload
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let outcome = if settled.contains(&id) {
                Ok(Delivery::Duplicate)
            } else {
                webhook::deliver(self.pool, Some(self.stripe), payload)
                    .await
                    .map(|(_, delivery)| delivery)
            };
            let label = match &outcome {
                Ok(Delivery::Duplicate) => {
                    report.summary.already_processed += 1;
                    "already_processed"
                }
                Ok(Delivery::Processed | Delivery::Ignored) => {
                    report.summary.processed += 1;
                    outcome.as_ref().map(Delivery::outcome).unwrap_or("failed")
                }
                Ok(Delivery::Rejected(why) | Delivery::Failed(why)) => {
                    report.summary.failed += 1;
                    report.failures.push(FailedEvent {
                        id: id.clone(),
                        kind: kind.clone(),
                        error: why.clone(),
                    });
                    outcome.as_ref().map(Delivery::outcome).unwrap_or("failed")
                }
                Err(err) => {
                    report.summary.failed += 1;
                    tracing::warn!(event = %id, kind = %kind, error = %err, "a listed Stripe event could not be handled");
                    report.failures.push(FailedEvent {
                        id: id.clone(),
                        kind: kind.clone(),
                        error: err.to_string(),
                    });
                    "failed"
                }
            };
            metrics::counter!("stripe_reconciled_events_total", "type" => webhook::type_label(&kind), "outcome" => label)
                .increment(1);
        }
        tracing::info!(
            listed = report.summary.listed,
            already_processed = report.summary.already_processed,
            processed = report.summary.processed,
            failed = report.summary.failed,
            "reconciled with Stripe's events"
        );
        Ok(report)
    }

    /// Every event of the handled types created at or after `since`, oldest first, each once.
    async fn list(&self, since: i64) -> Result<Vec<(String, Value)>, StripeApiError> {
        let mut newest_first: Vec<(String, Value)> = Vec::new();
        let mut seen = HashSet::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .stripe
                .list_events(since, webhook::HANDLED_TYPES, after.as_deref())
                .await?;
            let last = page
                .data
                .last()
                .and_then(|e| e.get("id"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            for event in page.data {
                let id = event
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                if seen.insert(id.clone()) {
                    newest_first.push((id, event));
                }
            }
            match last {
                // A page without a last id has nothing to continue from.
                Some(last) if page.has_more => after = Some(last),
                _ => break,
            }
        }
        // Stripe's order, reversed, keeps events of the same second in the order they happened;
        // the stable sort then puts them in order of creation.
        newest_first.reverse();
        let mut oldest_first = newest_first;
        oldest_first.sort_by_key(|(_, e)| e.get("created").and_then(Value::as_i64).unwrap_or(0));
        Ok(oldest_first)
    }
}
