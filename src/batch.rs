//! Requests that arrive together share one round trip to the database.
//!
//! A request that needs the database puts its work in a [`Batcher`]'s queue and waits for its
//! answer. One task per batcher takes the queue's work to the database: it takes a connection
//! of the pool, takes everything queued by then (at most [`Batcher`]'s `max`), and runs it as
//! one statement on that connection, in a task of its own. A request that finds nothing of its
//! kind running runs at once, alone. While [`BATCHES_AT_ONCE`] batches of its kind run, work
//! queues behind them and goes in the next batch, unless a full batch is waiting, which goes
//! at once, and so does the next batch when one has run longer than [`STALLED_AFTER`]: under
//! load, requests share round trips and, for writes, commits, instead of taking one each,
//! and a batch stuck behind a row lock holds up its own items only.
//!
//! What runs a batch answers each of its items separately ([`Work`]), so one item's refusal
//! is that item's answer alone.

use std::any::{Any, TypeId};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{Notify, oneshot};

use crate::db::{ServiceConnection, ServicePool};
use crate::error::{ApiError, ApiResult};

/// Runs a batch on a connection of the pool, and answers each item in order: one outcome per
/// item, as many as there were items.
pub type Work<I, O> =
    fn(&ServicePool, ServiceConnection, Vec<I>) -> BoxFuture<'static, Vec<ApiResult<O>>>;

/// How many batches of one kind run at once while none of the waiting work fills a batch.
/// Measured with `bench/run` (spend, 64 connections, a pool of 16): two at once gave the
/// fewest commits and the least CPU per spend (74 µs, 2,234 spends/s), against 85 µs with
/// three, 90 with four, and 120 with no limit.
const BATCHES_AT_ONCE: usize = 2;

/// A batch running longer than this no longer counts among the [`BATCHES_AT_ONCE`]: it is
/// waiting on something (a row lock), and the work queued behind it goes ahead.
const STALLED_AFTER: Duration = Duration::from_millis(50);

/// A queue of one kind of work; see the module's documentation.
pub struct Batcher<I, O> {
    kind: &'static str,
    counts: Arc<Counts>,
    queue: Mutex<VecDeque<Entry<I, O>>>,
    /// Told when work is queued.
    queued: Notify,
    /// Whether the task that takes the queue to the database is alive.
    running: AtomicBool,
    /// Batches running now, and how many may run at once before a batch waits to fill.
    in_flight: AtomicUsize,
    concurrent: usize,
    max: usize,
}

struct Entry<I, O> {
    item: I,
    answer: oneshot::Sender<ApiResult<O>>,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// A batch holds at most `max` items (at least one); `kind` names it in the metrics.
    fn new(kind: &'static str, max: usize) -> Self {
        Batcher {
            kind,
            counts: Arc::default(),
            queue: Mutex::new(VecDeque::new()),
            queued: Notify::new(),
            running: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            concurrent: BATCHES_AT_ONCE,
            max: max.max(1),
        }
    }

    /// Runs `item` with whatever else is queued when a connection is free, and answers it.
    pub async fn run(
        self: &Arc<Self>,
        pool: &ServicePool,
        item: I,
        work: Work<I, O>,
    ) -> ApiResult<O> {
        let (answer, answered) = oneshot::channel();
        self.queue().push_back(Entry { item, answer });
        if !self.running.swap(true, Ordering::AcqRel) {
            tokio::spawn(Arc::clone(self).drive(pool.clone(), work));
        }
        self.queued.notify_one();
        answered.await.unwrap_or_else(|_| Err(abandoned()))
    }

    /// The task that takes the queue to the database, batch after batch.
    async fn drive(self: Arc<Self>, pool: ServicePool, work: Work<I, O>) {
        // A runtime shutting down drops this task: the next request starts another.
        let _running = Running(Arc::clone(&self));
        loop {
            let queued = self.queue().len();
            if queued == 0 {
                self.queued.notified().await;
                continue;
            }
            // Few batches at a time, so that work queues into bigger ones; a full batch goes
            // at once whatever runs, so one batch stuck behind a lock holds up its own items
            // only.
            if self.in_flight.load(Ordering::Acquire) >= self.concurrent && queued < self.max {
                self.queued.notified().await;
                continue;
            }
            match pool.acquire().await {
                Ok(mut conn) => {
                    let batch = self.take(self.max);
                    if batch.is_empty() {
                        conn.finished();
                        continue;
                    }
                    self.counts.add(self.kind, batch.len());
                    self.in_flight.fetch_add(1, Ordering::AcqRel);
                    let pool = pool.clone();
                    let batcher = Arc::clone(&self);
                    tokio::spawn(async move {
                        let (items, answers): (Vec<I>, Vec<_>) =
                            batch.into_iter().map(|e| (e.item, e.answer)).unzip();
                        let running = work(&pool, conn, items);
                        tokio::pin!(running);
                        // A batch that takes long (waiting on a row lock, say) stops counting
                        // among those running, so that the work behind it goes ahead.
                        let outcomes = tokio::select! {
                            outcomes = &mut running => outcomes,
                            () = tokio::time::sleep(STALLED_AFTER) => {
                                batcher.in_flight.fetch_sub(1, Ordering::AcqRel);
                                batcher.queued.notify_one();
                                let outcomes = running.await;
                                batcher.in_flight.fetch_add(1, Ordering::AcqRel);
                                outcomes
                            }
                        };
                        batcher.in_flight.fetch_sub(1, Ordering::AcqRel);
                        batcher.queued.notify_one();
                        answer_all(answers, outcomes);
                    });
                }
                // No connection (the pool timed out or is closed): every request waiting
                // gets that answer, as it would have waiting on its own.
                Err(e) => {
                    let batch = self.take(usize::MAX);
                    let n = batch.len();
                    answer_all(
                        batch.into_iter().map(|e| e.answer).collect(),
                        each_failed(e, n),
                    );
                }
            }
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry<I, O>>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes up to `n` items from the front of the queue.
    fn take(&self, n: usize) -> Vec<Entry<I, O>> {
        let mut queue = self.queue();
        let n = queue.len().min(n);
        queue.drain(..n).collect()
    }
}

/// Marks the batcher's task as gone when it is dropped.
struct Running<I, O>(Arc<Batcher<I, O>>);

impl<I, O> Drop for Running<I, O> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
    }
}

fn answer_all<O>(answers: Vec<oneshot::Sender<ApiResult<O>>>, outcomes: Vec<ApiResult<O>>) {
    debug_assert_eq!(outcomes.len(), answers.len());
    let mut outcomes = outcomes.into_iter();
    for answer in answers {
        // The request may have given up waiting; its outcome is then nobody's.
        let _ = answer.send(outcomes.next().unwrap_or_else(|| Err(abandoned())));
    }
}

/// The batch this item was in stopped before answering (the runtime is shutting down).
/// Whether the item was applied is unknown.
fn abandoned() -> ApiError {
    ApiError::Internal(anyhow::anyhow!(
        "the batch this request was in did not answer"
    ))
}

/// How many batches a [`Batcher`] ran, and how many items they held.
#[derive(Default)]
pub struct Counts {
    batches: AtomicU64,
    items: AtomicU64,
}

impl Counts {
    fn add(&self, kind: &'static str, items: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.items.fetch_add(items as u64, Ordering::Relaxed);
        metrics::counter!("db_batches_total", "kind" => kind).increment(1);
        metrics::counter!("db_batched_items_total", "kind" => kind).increment(items as u64);
    }

    /// (batches, items) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.batches.load(Ordering::Relaxed),
            self.items.load(Ordering::Relaxed),
        )
    }
}

/// One [`Batcher`] of each kind per process (per [`crate::state::AppState`]), made on first use.
#[derive(Default)]
pub struct Batchers {
    kinds: Mutex<HashMap<TypeId, Kind>>,
}

/// A batcher's name, the batcher (a `Batcher<I, O>`), and its counts.
type Kind = (&'static str, Arc<dyn Any + Send + Sync>, Arc<Counts>);

impl Batchers {
    /// The batcher of work `I` answered with `O`, made the first time it is asked for: at most
    /// `max` items a batch, named `kind` in the metrics (`db_batches_total{kind}`,
    /// `db_batched_items_total{kind}`).
    pub fn get<I, O>(&self, kind: &'static str, max: usize) -> Arc<Batcher<I, O>>
    where
        I: Send + 'static,
        O: Send + 'static,
    {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let (_, any, _) = kinds
            .entry(TypeId::of::<Batcher<I, O>>())
            .or_insert_with(|| {
                let batcher = Batcher::<I, O>::new(kind, max);
                let counts = Arc::clone(&batcher.counts);
                (kind, Arc::new(batcher), counts)
            });
        Arc::clone(any)
            .downcast::<Batcher<I, O>>()
            .expect("each type's entry holds that type")
    }

    /// (batches, items) of the batcher named `kind`, (0, 0) before its first use.
    pub fn counts(&self, kind: &str) -> (u64, u64) {
        let kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        kinds
            .values()
            .find(|(k, _, _)| *k == kind)
            .map_or((0, 0), |(_, _, counts)| counts.get())
    }
}

/// The answers of a batch's `n` items in their order, from rows numbered by item from 1 (as
/// `with ordinality` numbers them): `None` for an item no row answered.
pub fn by_item<T>(n: usize, rows: impl IntoIterator<Item = (i64, T)>) -> Vec<Option<T>> {
    let mut answers: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for (item, answer) in rows {
        if let Some(slot) = usize::try_from(item - 1)
            .ok()
            .and_then(|i| answers.get_mut(i))
        {
            *slot = Some(answer);
        }
    }
    answers
}

/// One batch-wide failure as the answer of each item: the database's outcome for the whole
/// statement applies to all of them alike.
pub fn each_failed<O>(err: sqlx::Error, n: usize) -> Vec<ApiResult<O>> {
    let first = ApiError::from(err);
    let again = |e: &ApiError| match e {
        ApiError::Conflict => ApiError::Conflict,
        ApiError::Unavailable(why) => ApiError::Unavailable(why),
        other => ApiError::Internal(anyhow::anyhow!("{other}")),
    };
    let mut out: Vec<ApiResult<O>> = (1..n).map(|_| Err(again(&first))).collect();
    out.push(Err(first));
    out
}
