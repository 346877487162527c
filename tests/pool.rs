//! The service's own pool (`db::ServicePool`): a query is one round trip, with nothing sent
//! when its connection goes back; work abandoned half-way is rolled back and its connection
//! checked before anyone else gets it. Round trips are counted on the wire, by a proxy between
//! the pool and PostgreSQL that counts the server's ReadyForQuery messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use amethyst_credits::config::PoolMode;
use amethyst_credits::db::ServicePool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Forwards connections to PostgreSQL and counts the round trips completed on them (one
/// ReadyForQuery from the server ends each).
struct CountingProxy {
    port: u16,
    round_trips: Arc<AtomicUsize>,
}

impl CountingProxy {
    /// To PostgreSQL on this machine's loopback, at `port`.
    async fn start(port: u16) -> CountingProxy {
        let upstream = ("127.0.0.1", port);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let round_trips = Arc::new(AtomicUsize::new(0));
        let counter = round_trips.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(upstream).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    tokio::io::copy(&mut client_read, &mut server_write)
                        .await
                        .ok();
                });
                let counter = counter.clone();
                tokio::spawn(async move {
                    // Server messages: a type byte, then a length that counts itself.
                    let mut pending = Vec::new();
                    let mut buffer = vec![0u8; 64 * 1024];
                    loop {
                        let read = match server_read.read(&mut buffer).await {
                            Ok(0) | Err(_) => break,
                            Ok(read) => read,
                        };
                        pending.extend_from_slice(&buffer[..read]);
                        while pending.len() >= 5 {
                            let length = u32::from_be_bytes(pending[1..5].try_into().unwrap());
                            let whole = 1 + length as usize;
                            if pending.len() < whole {
                                break;
                            }
                            if pending[0] == b'Z' {
                                counter.fetch_add(1, Ordering::SeqCst);
                            }
                            pending.drain(..whole);
                        }
                        if client_write.write_all(&buffer[..read]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        CountingProxy { port, round_trips }
    }

    fn count(&self) -> usize {
        self.round_trips.load(Ordering::SeqCst)
    }
}

/// A pool of one connection, in `mode`, to the test's database through `proxy`.
fn pool_through(proxy: &CountingProxy, connect: &PgConnectOptions, mode: PoolMode) -> ServicePool {
    let options = connect
        .clone()
        .host("127.0.0.1")
        .port(proxy.port)
        .ssl_mode(PgSslMode::Disable);
    ServicePool::lazy(options, 1, Duration::from_secs(10), mode)
}

async fn select(pool: &ServicePool, n: i32) -> i32 {
    sqlx::query_scalar("select $1::int")
        .bind(n)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test]
async fn a_query_on_the_pool_is_one_round_trip_and_nothing_follows_it(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let proxy = CountingProxy::start(connect.get_port()).await;
    let pool = pool_through(&proxy, &connect, PoolMode::Session);
    // The connection opens, takes the role, and prepares the statement.
    assert_eq!(select(&pool, 0).await, 0);

    let before = proxy.count();
    for n in 1..=20 {
        assert_eq!(select(&pool, n).await, n);
    }
    // Anything sent when a connection goes back would be done before the next acquire (the
    // pool has one connection, handed out only once it is idle again).
    drop(pool.acquire().await.unwrap());
    assert_eq!(
        proxy.count() - before,
        20,
        "twenty queries, twenty round trips: no ping on release"
    );
}

#[sqlx::test]
async fn work_abandoned_half_way_is_rolled_back_and_its_connection_reset_before_reuse(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let proxy = CountingProxy::start(connect.get_port()).await;
    let mut owner = <sqlx::PgConnection as sqlx::Connection>::connect_with(&connect)
        .await
        .unwrap();
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let pool = pool_through(&proxy, &connect, mode);

        // A transaction dropped without commit or rollback: its lock is gone by the time the
        // connection is handed out again.
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("select pg_advisory_xact_lock(4242)")
            .execute(&mut *tx)
            .await
            .unwrap();
        drop(tx);
        let conn = pool.acquire().await.unwrap();
        let free: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock(4242)")
            .fetch_one(&mut owner)
            .await
            .unwrap();
        assert!(free, "{mode:?}: the abandoned transaction was rolled back");
        drop(conn);

        // A transaction the connection lost track of (the state a `BEGIN` abandoned while its
        // answer was on the way leaves: the server in a transaction, sqlx counting none),
        // given back without being finished: it is rolled back too.
        let mut conn = pool.acquire().await.unwrap();
        sqlx::raw_sql("begin; select pg_advisory_xact_lock(4343)")
            .execute(&mut *conn)
            .await
            .unwrap();
        drop(conn);
        let conn = pool.acquire().await.unwrap();
        let free: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock(4343)")
            .fetch_one(&mut owner)
            .await
            .unwrap();
        assert!(free, "{mode:?}: the untracked transaction was rolled back");
        drop(conn);

        // A query abandoned while the server is still working on it: its answer, when it
        // comes, is not taken for the next query's.
        let abandoned = tokio::time::timeout(
            Duration::from_millis(100),
            sqlx::query_scalar::<_, i32>("select 7 from pg_sleep(0.5)").fetch_one(&pool),
        )
        .await;
        assert!(abandoned.is_err(), "{mode:?}: the query was abandoned");
        assert_eq!(select(&pool, 8).await, 8, "{mode:?}");
        assert_eq!(select(&pool, 9).await, 9, "{mode:?}");
        pool.close().await;
    }
}
