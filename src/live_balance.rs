//! Live balance (docs/api.md, "Live balance"): `GET /v1/me/events`, a Server-Sent Events stream
//! of the caller's ledger.
//!
//! The ledger is the source of truth. A stream opens with a `balance` snapshot (the profile as
//! `GET /v1/me` reads it), then sends a `transaction` event for each ledger row after its
//! starting point, with the row's sequence number as its `id:`. It reads the ledger itself,
//! through the user's RLS-respecting function, one query per wake-up; a notification (see
//! [`crate::notifications`]) only tells it when to look. So a stream resumed with
//! `Last-Event-ID`, or woken after the listener was away, sends exactly the rows it has not sent,
//! in order.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::credits::Transaction;
use crate::error::{ApiError, ApiResult, Problem};
use crate::holds::Hold;
use crate::notifications::{Subscription, closing};
use crate::profiles::{self, Balance, Expiring, Profile};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(my_events))
}

/// The longest a stream stays silent: a `:` comment line is sent after this much quiet, which
/// keeps proxies and load balancers from closing an idle connection.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The most missed rows a resumed stream sends again; further back, it sends `reset`.
pub const MAX_REPLAY: i32 = 1000;

/// Rows read per query; a wake-up with more to read reads again at once.
const BATCH_ROWS: i32 = 200;

/// Longest pause before reading again after a failed read (the database away).
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(30);

/// Events waiting for a slow client before the stream stops reading the ledger for it.
const BUFFERED_EVENTS: usize = 64;

/// How far ahead an expiry is announced with `credits_expiring`.
pub const EXPIRING_NOTICE: chrono::TimeDelta = chrono::TimeDelta::days(7);

/// The part of the balance a `transaction` event speaks of.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct LiveBalance {
    /// Credits that could be spent right after the row: credits less active holds.
    pub available: i32,
}

/// `balance`: the first event of every stream: the Profile's `credits` and `balance`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BalanceEvent {
    pub credits: i32,
    pub balance: Balance,
}

impl From<Profile> for BalanceEvent {
    fn from(profile: Profile) -> Self {
        BalanceEvent {
            credits: profile.credits,
            balance: profile.balance,
        }
    }
}

/// `transaction`: one ledger row and the balance after it.
#[derive(Debug, Serialize, ToSchema)]
pub struct TransactionEvent {
    #[serde(flatten)]
    pub transaction: Transaction,
    pub balance: LiveBalance,
}

/// `low_balance` and `balance_recovered`: the available balance crossed the threshold.
#[derive(Debug, Serialize, ToSchema)]
pub struct BalanceAlert {
    pub available: i32,
    pub threshold: i32,
}

/// A ledger row as `public.ledger_events_as_user` reads it, with the alert it causes (the rule
/// is `public.balance_alert`, in SQL).
struct LedgerRow {
    seq: i64,
    id: Uuid,
    amount: i32,
    balance_after: i32,
    source: String,
    description: Option<String>,
    reference: Option<String>,
    created_at: DateTime<Utc>,
    available: i32,
    threshold: i32,
    alert: Option<String>,
}

impl LedgerRow {
    /// The `transaction` event, then the alert it causes, if any.
    fn into_events(self) -> impl Iterator<Item = Event> {
        let alert = self.alert.as_deref().and_then(|name| {
            let name = match name {
                "low_balance" => "low_balance",
                "balance_recovered" => "balance_recovered",
                _ => return None,
            };
            Some(event(
                name,
                &BalanceAlert {
                    available: self.available,
                    threshold: self.threshold,
                },
            ))
        });
        let transaction = event(
            "transaction",
            &TransactionEvent {
                balance: LiveBalance {
                    available: self.available,
                },
                transaction: Transaction {
                    id: self.id,
                    amount: self.amount,
                    balance_after: self.balance_after,
                    source: self.source,
                    description: self.description,
                    reference: self.reference,
                    created_at: self.created_at,
                    seq: self.seq,
                },
            },
        )
        .id(self.seq.to_string());
        std::iter::once(transaction).chain(alert)
    }
}

/// Least time a client waits before it reconnects (the `retry:` of the opening event), and
/// the spread above it.
pub const RECONNECT_AFTER: Duration = Duration::from_millis(1_000);
pub const RECONNECT_SPREAD: Duration = Duration::from_millis(4_000);

/// The reconnection delay a stream asks of its client: a different one per stream, so that
/// the streams a replica ends when it shuts down do not all come back in the same instant.
/// (Spread, not secret: the clock's nanoseconds mixed with the user's id.)
fn reconnect_delay(user: Uuid) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let (high, low) = user.as_u64_pair();
    let spread = RECONNECT_SPREAD.as_millis() as u64;
    let pick = crate::telemetry::mix(high ^ low ^ u64::from(nanos)) % spread;
    RECONNECT_AFTER + Duration::from_millis(pick)
}

fn event(name: &str, data: &impl Serialize) -> Event {
    // These shapes always serialize; an empty object would still be a valid event.
    let json = serde_json::to_string(data).unwrap_or_else(|_| "{}".to_owned());
    Event::default().event(name).data(json)
}

/// The caller's live balance: a `text/event-stream` of `balance`, `transaction`, `low_balance`,
/// `balance_recovered`, `reset` and `token_expired` events (docs/api.md, "Live balance").
///
/// Browsers' `EventSource` cannot send headers: the token may come as `?access_token=`
/// instead (never logged). A client that reconnects sends `Last-Event-ID` (EventSource does
/// it by itself) and receives the rows it missed, in order; when they are too far back it
/// receives `reset` and should read `GET /v1/me` and its history again.
#[utoipa::path(
    get,
    path = "/v1/me/events",
    tag = "profile",
    security(("bearer" = [])),
    params(
        ("access_token" = Option<String>, Query, description = "The access token, for clients that cannot send `Authorization` (EventSource); the header wins when both are sent"),
        ("Last-Event-ID" = Option<String>, Header, description = "The `id:` of the last event received: the stream sends the ledger rows after it, or `reset` when they are too far back"),
    ),
    responses(
        (status = 200, description = "An endless event stream: `balance` first, then `transaction` (with `id:`), `low_balance`, `balance_recovered`, `hold`, `credits_expiring`, `reset` and `token_expired`, each `data:` one JSON object; a `:` comment after 15 s of quiet", content_type = "text/event-stream", body = String),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No profile for this user (`profile_not_found`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn my_events(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
) -> ApiResult<Response> {
    // Subscribed before the first read: a row committed after the read wakes the stream.
    let subscription = state.notifications.subscribe(user.id);
    // An id this service never sent (not a number) cannot be resumed from.
    let last_seen = headers.get("last-event-id").map(|value| {
        value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(-1)
    });
    let position = sqlx::query!(
        r#"select head as "head!", replayable as "replayable!"
             from public.ledger_position_as_user($1, $2, $3)"#,
        &*user.claims,
        last_seen,
        MAX_REPLAY,
    )
    .fetch_one(&state.pool)
    .await?;
    // Read after the position: a row committed in between is both in the snapshot and sent as
    // an event, never in neither.
    let profile = profiles::read_as_user(&state.pool, &user.claims)
        .await?
        .ok_or(ApiError::ProfileNotFound)?;
    // Hold changes from now on; the snapshot's `held` covers the ones before.
    let hold_cursor = sqlx::query_scalar!(
        r#"select coalesce(max(changed_seq), 0) as "head!" from public.credit_holds
            where user_id = $1"#,
        user.id,
    )
    .fetch_one(&state.pool)
    .await?;
    let active_holds = sqlx::query!(
        r#"select id, expires_at from public.credit_holds
            where user_id = $1 and status = 'active' and expires_at > public.clock_now()"#,
        user.id,
    )
    .fetch_all(&state.pool)
    .await?
    .into_iter()
    .map(|h| (h.id, h.expires_at))
    .collect();

    let mut announced = HashSet::new();
    let expiring = soon_expiring(&profile.balance.expiring, &mut announced);
    let mut opening =
        vec![event("balance", &BalanceEvent::from(profile)).retry(reconnect_delay(user.id))];
    opening.extend(expiring);
    let cursor = match last_seen {
        Some(seen) if position.replayable => seen,
        Some(_) => {
            opening.push(event("reset", &serde_json::json!({})));
            position.head
        }
        None => position.head,
    };

    let (sender, mut receiver) = mpsc::channel(BUFFERED_EVENTS);
    for event in opening {
        // The channel is new and larger than the opening.
        let _ = sender.try_send(event);
    }
    let stream = LiveStream {
        state: state.clone(),
        user: user.id,
        claims: user.claims.clone(),
        cursor,
        hold_cursor,
        active_holds,
        announced,
        subscription,
        expires_at: expiry(&user.claims),
        sender,
    };
    tokio::spawn(stream.follow());

    let events = futures_util::stream::poll_fn(move |cx| {
        receiver
            .poll_recv(cx)
            .map(|event| event.map(Ok::<_, std::convert::Infallible>))
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // Proxies that buffer answers (nginx) would hold events back.
    response.headers_mut().insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Ok(response)
}

/// When the token's `exp` passes, as an instant of this process's clock; `exp` is required and
/// was checked by the verifier.
fn expiry(claims: &str) -> Instant {
    let exp = serde_json::from_str::<serde_json::Value>(claims)
        .ok()
        .and_then(|c| c["exp"].as_f64())
        .unwrap_or(0.0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    Instant::now() + Duration::from_secs_f64((exp - now).clamp(0.0, 365.0 * 86_400.0))
}

/// One open stream: reads the ledger after `cursor` whenever woken, until the client goes, the
/// token expires or the process shuts down.
struct LiveStream {
    state: AppState,
    user: Uuid,
    claims: Arc<str>,
    /// The sequence number of the last row sent (or the head when the stream opened).
    cursor: i64,
    /// The number of the last hold change sent (or the newest when the stream opened).
    hold_cursor: i64,
    /// Active holds and when they lapse: a lapse changes no row, so the stream watches the time.
    active_holds: HashMap<Uuid, DateTime<Utc>>,
    /// The expiries `credits_expiring` has announced.
    announced: HashSet<DateTime<Utc>>,
    subscription: Subscription,
    expires_at: Instant,
    sender: mpsc::Sender<Event>,
}

impl LiveStream {
    async fn follow(mut self) {
        metrics::gauge!("live_streams_open").increment(1.0);
        self.run().await;
        metrics::gauge!("live_streams_open").decrement(1.0);
    }

    async fn run(&mut self) {
        let mut failures: u32 = 0;
        // Read, send, then wait to be woken (or to retry a failed read).
        loop {
            // Boxed: the query's future is large and lives only while reading, so an idle
            // stream's task stays small (the benchmark holds 10,000 of them).
            let read = Box::pin(self.read()).await;
            let retry_at = match read {
                Ok((rows, holds, expiring)) => {
                    failures = 0;
                    let more = rows.len() as i64 >= i64::from(BATCH_ROWS)
                        || holds.len() as i64 >= i64::from(BATCH_ROWS);
                    for row in rows {
                        let seq = row.seq;
                        for event in row.into_events() {
                            if self.sender.send(event).await.is_err() {
                                return; // the client went away
                            }
                        }
                        self.cursor = seq;
                    }
                    for (change, hold) in holds {
                        if !self.send_hold(&hold).await {
                            return;
                        }
                        self.hold_cursor = change;
                    }
                    for event in expiring {
                        if self.sender.send(event).await.is_err() {
                            return;
                        }
                    }
                    if more {
                        continue;
                    }
                    None
                }
                Err(err) => {
                    failures += 1;
                    let pause = (Duration::from_millis(250) * 2u32.pow(failures.min(8)))
                        .min(MAX_RETRY_PAUSE);
                    tracing::warn!(error = %err, retry_in_ms = pause.as_millis() as u64,
                        "a live stream could not read the ledger; reading again later");
                    Some(Instant::now() + pause)
                }
            };
            let next_lapse = self.next_lapse();
            let subscription = &mut self.subscription;
            tokio::select! {
                _ = tokio::time::sleep_until(next_lapse.unwrap_or(self.expires_at)), if next_lapse.is_some() => {
                    if !self.send_lapsed().await {
                        return;
                    }
                }
                woken = subscription.wake.changed() => {
                    if woken.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or(self.expires_at)), if retry_at.is_some() => {}
                _ = tokio::time::sleep_until(self.expires_at) => {
                    let _ = self.sender.send(event("token_expired", &serde_json::json!({}))).await;
                    return;
                }
                _ = closing(&mut subscription.closing) => return,
                _ = self.sender.closed() => return,
            }
        }
    }

    /// Sends a `hold` event and keeps watching an active hold's lapse; false when the client
    /// went away.
    async fn send_hold(&mut self, hold: &Hold) -> bool {
        if hold.status == "active" {
            self.active_holds.insert(hold.id, hold.expires_at);
        } else {
            self.active_holds.remove(&hold.id);
        }
        self.sender.send(event("hold", hold)).await.is_ok()
    }

    /// When the first watched hold lapses, on this process's clock.
    fn next_lapse(&self) -> Option<Instant> {
        let first = self.active_holds.values().min()?;
        let wait = (*first - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        Some(Instant::now() + wait)
    }

    /// Sends the holds that lapsed, as the database's clock sees them; false when the client
    /// went away. A hold the database still sees active is looked at again a second later.
    async fn send_lapsed(&mut self) -> bool {
        let due: Vec<Uuid> = self
            .active_holds
            .iter()
            .filter(|(_, at)| **at <= Utc::now())
            .map(|(id, _)| *id)
            .collect();
        let seen = match self.read_holds(&due).await {
            Ok(seen) => seen,
            Err(err) => {
                tracing::warn!(error = %err, "a live stream could not read its holds");
                Vec::new()
            }
        };
        for hold in seen {
            if hold.status == "active" {
                self.active_holds
                    .insert(hold.id, Utc::now() + chrono::TimeDelta::seconds(1));
            } else if !self.send_hold(&hold).await {
                return false;
            }
        }
        true
    }

    async fn read_holds(&self, ids: &[Uuid]) -> Result<Vec<Hold>, sqlx::Error> {
        sqlx::query_as!(
            Hold,
            r#"select s.id as "id!", s.user_id as "user_id!", s.amount as "amount!",
                      s.captured_amount as "captured_amount!", s.status as "status!",
                      s.reference, s.description, s.created_at as "created_at!",
                      s.expires_at as "expires_at!", s.settled_at, s.seq as "seq!"
                 from public.credit_holds h
                cross join lateral public.hold_seen(h, public.clock_now()) s
                where h.id = any($1) and h.user_id = $2"#,
            ids,
            self.user,
        )
        .fetch_all(&self.state.pool)
        .await
    }

    /// The next ledger rows after the cursor with their alerts, the hold changes after the
    /// hold cursor, and the `credits_expiring` events newly due: as the user.
    #[allow(clippy::type_complexity)]
    async fn read(
        &mut self,
    ) -> Result<(Vec<LedgerRow>, Vec<(i64, Hold)>, Vec<Event>), sqlx::Error> {
        let rows = self.read_ledger().await?;
        let holds = sqlx::query!(
            r#"select changed_seq as "changed_seq!", id as "id!", user_id as "user_id!",
                      amount as "amount!", captured_amount as "captured_amount!",
                      status as "status!", reference, description, created_at as "created_at!",
                      expires_at as "expires_at!", settled_at
                 from public.hold_changes_as_user($1, $2, $3)"#,
            &*self.claims,
            self.hold_cursor,
            BATCH_ROWS,
        )
        .fetch_all(&self.state.pool)
        .await?
        .into_iter()
        .map(|h| {
            (
                h.changed_seq,
                Hold {
                    id: h.id,
                    user_id: h.user_id,
                    amount: h.amount,
                    captured_amount: h.captured_amount,
                    status: h.status,
                    reference: h.reference,
                    description: h.description,
                    created_at: h.created_at,
                    expires_at: h.expires_at,
                    settled_at: h.settled_at,
                    seq: 0,
                },
            )
        })
        .collect();
        // A grant may bring a lot that expires soon.
        let expiring = if rows.iter().any(|r| r.amount > 0) {
            let list = sqlx::query_scalar!(
                r#"select expiring as "expiring!" from public.credit_balance($1)"#,
                self.user,
            )
            .fetch_optional(&self.state.pool)
            .await?
            .and_then(|v| serde_json::from_value::<Vec<Expiring>>(v).ok())
            .unwrap_or_default();
            soon_expiring(&list, &mut self.announced)
        } else {
            Vec::new()
        };
        Ok((rows, holds, expiring))
    }

    /// The next rows after the cursor, with their alerts: one query, as the user.
    async fn read_ledger(&self) -> Result<Vec<LedgerRow>, sqlx::Error> {
        sqlx::query_as!(
            LedgerRow,
            r#"select seq as "seq!", id as "id!", amount as "amount!",
                      balance_after as "balance_after!", source as "source!", description,
                      reference, created_at as "created_at!", available as "available!",
                      threshold as "threshold!", alert
                 from public.ledger_events_as_user($1, $2, $3, $4)"#,
            &*self.claims,
            self.cursor,
            BATCH_ROWS,
            self.state.config.low_balance_threshold,
        )
        .fetch_all(&self.state.pool)
        .await
    }
}

/// `credits_expiring` for each expiry within [`EXPIRING_NOTICE`] not announced yet.
fn soon_expiring(list: &[Expiring], announced: &mut HashSet<DateTime<Utc>>) -> Vec<Event> {
    let horizon = Utc::now() + EXPIRING_NOTICE;
    list.iter()
        .filter(|e| e.expires_at <= horizon && announced.insert(e.expires_at))
        .map(|e| event("credits_expiring", e))
        .collect()
}
