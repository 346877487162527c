//! Ledger notifications (docs/api.md, "Live balance"): one `LISTEN` connection per process,
//! fanned out to the event streams of each user.
//!
//! A notification only says "look": the user's streams wake up and read what is new from the
//! ledger themselves, from the last sequence number each has sent. So nothing depends on a
//! notification arriving: when the listening connection is lost, it is made again (with a
//! growing pause), and once it listens again every open stream is woken to catch up, which
//! covers whatever was announced while nobody listened.
//!
//! The connection listens only while the process has streams open (and for
//! [`Notifications::linger`] after the last one closed): a replica nobody watches from does not
//! read every ledger change of every user. Listening that starts for a new stream wakes every
//! stream too, so the new stream reads what landed between its first read and the `LISTEN`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::watch;
use uuid::Uuid;

/// The channel the ledger's trigger notifies (migration `live_balance`).
pub const CHANNEL: &str = "amethyst_live";

/// `application_name` of the listening connection, which names it in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "amethyst-credits listener";

/// Longest pause between two attempts to listen again.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How long the connection keeps listening after the last stream closed: a client that
/// reconnects at once (a page reload, a token refresh) finds it still there.
pub const LINGER: Duration = Duration::from_secs(60);

/// The fan-out: who is watching which user, and whether the process is closing.
#[derive(Clone)]
pub struct Notifications(Arc<Inner>);

struct Inner {
    /// One wake-up signal per user with an open stream; the value only counts wake-ups.
    users: Mutex<HashMap<Uuid, watch::Sender<u64>>>,
    /// True once the process is shutting down: streams end.
    closing: watch::Sender<bool>,
    /// How many users have an open stream, for the listener: it listens while there are any.
    watched: watch::Sender<usize>,
    /// [`LINGER`], in milliseconds; tests shorten it.
    linger_ms: AtomicU64,
}

/// A user's wake-up signal, held by one stream. Dropping it forgets the user once their last
/// stream is gone.
pub struct Subscription {
    notifications: Notifications,
    user: Uuid,
    /// Changes when the user's ledger may have new rows.
    pub wake: watch::Receiver<u64>,
    /// Changes to true when the process is shutting down.
    pub closing: watch::Receiver<bool>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut users = self.notifications.users();
        // This subscription's receiver is still alive here: one left means it was the last.
        if users
            .get(&self.user)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            users.remove(&self.user);
            self.notifications.0.watched.send_replace(users.len());
        }
    }
}

/// What the trigger sends; `kind` names what changed (`transaction`), for the kinds to come.
#[derive(Debug, Deserialize)]
struct Announcement {
    kind: String,
    user_id: Uuid,
    seq: i64,
}

impl Default for Notifications {
    fn default() -> Self {
        Self::new()
    }
}

impl Notifications {
    pub fn new() -> Self {
        Notifications(Arc::new(Inner {
            users: Mutex::new(HashMap::new()),
            closing: watch::Sender::new(false),
            watched: watch::Sender::new(0),
            linger_ms: AtomicU64::new(LINGER.as_millis() as u64),
        }))
    }

    /// How long listening goes on after the last stream closed.
    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.0.linger_ms.load(Ordering::Relaxed))
    }

    pub fn set_linger(&self, linger: Duration) {
        self.0
            .linger_ms
            .store(linger.as_millis() as u64, Ordering::Relaxed);
    }

    fn users(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, watch::Sender<u64>>> {
        self.0.users.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts receiving `user`'s wake-ups. Subscribe before reading the ledger: a change
    /// committed between the read and the subscription would otherwise wake nobody.
    pub fn subscribe(&self, user: Uuid) -> Subscription {
        let wake = {
            let mut users = self.users();
            let wake = users
                .entry(user)
                .or_insert_with(|| watch::Sender::new(0))
                .subscribe();
            self.0.watched.send_if_modified(|watched| {
                let changed = *watched != users.len();
                *watched = users.len();
                changed
            });
            wake
        };
        Subscription {
            notifications: self.clone(),
            user,
            wake,
            closing: self.0.closing.subscribe(),
        }
    }

    /// Users with at least one open stream.
    pub fn watched_users(&self) -> usize {
        self.users().len()
    }

    /// Wakes `user`'s streams, if any.
    pub fn wake(&self, user: Uuid) {
        if let Some(sender) = self.users().get(&user) {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wakes every stream: after the listener was away, any of them may have missed something.
    pub fn wake_all(&self) {
        for sender in self.users().values() {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Ends every stream, now and from now on (shutdown).
    pub fn close(&self) {
        self.0.closing.send_replace(true);
    }

    /// Listens on a connection of its own to the database of `options` (`DATABASE_DIRECT_URL`:
    /// a transaction-mode pooler cannot hold a `LISTEN`), until the process closes.
    pub fn start(&self, options: PgConnectOptions) -> tokio::task::JoinHandle<()> {
        let notifications = self.clone();
        let options = options.application_name(APPLICATION_NAME);
        tokio::spawn(async move { notifications.listen(options).await })
    }

    async fn listen(self, options: PgConnectOptions) {
        let mut closed = self.0.closing.subscribe();
        let mut watched = self.0.watched.subscribe();
        let mut backoff = Duration::from_millis(100);
        loop {
            // Nobody watches from this process: no connection until a stream opens.
            tokio::select! {
                _ = watched.wait_for(|n| *n > 0) => {}
                _ = closing(&mut closed) => return,
            }
            let failure = tokio::select! {
                outcome = self.session(&options, &mut backoff) => match outcome {
                    Ok(()) => {
                        tracing::info!("no stream open: the listening connection is closed");
                        continue;
                    }
                    Err(err) => err,
                },
                _ = closing(&mut closed) => return,
            };
            tracing::warn!(error = %failure, retry_in_ms = backoff.as_millis() as u64,
                "the listening connection failed; listening again");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = closing(&mut closed) => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One listening connection, until it fails (an error) or no stream has been open for
    /// [`Self::linger`] (`Ok`).
    async fn session(
        &self,
        options: &PgConnectOptions,
        backoff: &mut Duration,
    ) -> Result<(), sqlx::Error> {
        let mut listener = connect(options).await?;
        tracing::info!(channel = CHANNEL, "listening for ledger notifications");
        let _listening = Listening::new();
        *backoff = Duration::from_millis(100);
        // Listening (again): whatever was announced while nobody listened is read now.
        self.wake_all();
        let mut watched = self.0.watched.subscribe();
        tokio::select! {
            failure = self.receive(&mut listener) => {
                let Err(err) = failure;
                Err(err)
            }
            // The listener is dropped with its connection: nothing of it is reused.
            () = unwatched_for(&mut watched, self.linger()) => Ok(()),
        }
    }

    async fn receive(&self, listener: &mut PgListener) -> Result<Infallible, sqlx::Error> {
        loop {
            match listener.try_recv().await? {
                Some(notification) => self.dispatch(notification.payload()),
                // The connection was lost and sqlx made it again, listening again before it
                // answered: streams catch up.
                None => {
                    tracing::warn!(
                        "the listening connection was lost and is back; streams catch up"
                    );
                    self.wake_all();
                }
            }
        }
    }

    fn dispatch(&self, payload: &str) {
        match serde_json::from_str::<Announcement>(payload) {
            Ok(announcement) => {
                tracing::trace!(kind = %announcement.kind, seq = announcement.seq, "ledger notification");
                self.wake(announcement.user_id);
            }
            Err(err) => tracing::warn!(error = %err, "an unreadable ledger notification"),
        }
    }
}

/// The `live_listening` gauge at 1 while a listening connection is up.
struct Listening;

impl Listening {
    fn new() -> Self {
        metrics::gauge!("live_listening").set(1.0);
        Listening
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        metrics::gauge!("live_listening").set(0.0);
    }
}

/// Resolves once no stream has been open for `linger` in a row.
async fn unwatched_for(watched: &mut watch::Receiver<usize>, linger: Duration) {
    loop {
        // The sender lives as long as the fan-out, which outlives this wait.
        let _ = watched.wait_for(|n| *n == 0).await;
        tokio::select! {
            () = tokio::time::sleep(linger) => return,
            _ = watched.wait_for(|n| *n > 0) => {}
        }
    }
}

/// Resolves once the process is shutting down.
pub async fn closing(receiver: &mut watch::Receiver<bool>) {
    // The guard `wait_for` answers is dropped here: it may not be held across an await.
    let _ = receiver.wait_for(|closing| *closing).await.map(|_| ());
}

async fn connect(options: &PgConnectOptions) -> Result<PgListener, sqlx::Error> {
    // A pool of one, which PgListener uses to connect again when its connection is lost.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_with(options.clone())
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.ignore_pool_close_event(true);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}
