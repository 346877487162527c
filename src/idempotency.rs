//! `Idempotency-Key` (docs/api.md, "Idempotency"): the same caller, key and request within
//! the window (`public.idempotency_window()`, 24 h) gets the first answer again and nothing is
//! applied twice, even when the requests race.
//!
//! A handler goes through it in a straight line: [`try_processing`] either answers
//! [`Claim::Replay`] (send the saved answer) or [`Claim::Start`] with a connection to do the
//! work on; the handler does the work and hands the answer to [`Processing::save`].
//!
//! The key is claimed by inserting its row inside the transaction that does the work, and the
//! answer is written into that row before the commit. A concurrent request with the same key
//! blocks on the row's unique index until the first commits, then finds the answer and
//! replays it. If the work fails, the transaction (claim included) rolls back and the next
//! request with the key runs afresh: only successful answers are stored.

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;

use crate::config::PoolMode;
use crate::db::{ServiceConnection, ServicePool, ServiceTransaction};
use crate::error::{ApiError, ApiResult};
use crate::limits;

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The optional `Idempotency-Key` header, 1–255 visible ASCII characters.
#[derive(Debug, Clone)]
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(&IDEMPOTENCY_KEY) else {
            return Ok(IdempotencyKey(None));
        };
        let key = value
            .to_str()
            .ok()
            .filter(|k| {
                (1..=limits::IDEMPOTENCY_KEY_CHARS).contains(&k.len())
                    && k.bytes().all(|b| b.is_ascii_graphic())
            })
            .ok_or_else(|| {
                ApiError::field(
                    "Idempotency-Key",
                    "must be 1 to 255 visible ASCII characters",
                )
            })?;
        Ok(IdempotencyKey(Some(key.to_owned())))
    }
}

/// What makes two requests "the same": method, path and the parsed body.
pub fn fingerprint(method: &Method, path: &str, document: &serde_json::Value) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update(method.as_str().as_bytes());
    hash.update(b" ");
    hash.update(path.as_bytes());
    hash.update(b"\n");
    hash.update(serde_json::to_vec(document).unwrap_or_default());
    hash.finalize().to_vec()
}

/// A successful answer, as stored and replayed.
struct Stored {
    status: StatusCode,
    body: Vec<u8>,
}

impl Stored {
    fn json(status: StatusCode, value: &impl Serialize) -> ApiResult<Self> {
        let body = serde_json::to_vec(value).map_err(|e| ApiError::Internal(e.into()))?;
        Ok(Stored { status, body })
    }

    fn into_response(self, replayed: bool) -> Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if replayed {
            headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        }
        response
    }
}

/// The outcome of trying to start a request that may carry a key.
pub enum Claim<T> {
    /// The same request was answered before (or concurrently, and we waited for it): its
    /// answer, to send again.
    Replay(Response),
    /// The request is new: do the work with `T`, then save the answer through it.
    Start(T),
}

/// A request whose work runs in the database. With a key, the claim and the work share one
/// transaction, which [`Processing::save`] commits with the answer; dropping it (the work
/// failed) rolls both back, so a retry with the key runs afresh. Without a key the work runs
/// on a connection of its own, in a transaction that `save` commits when the pool is in
/// transaction mode (where nothing may run outside one).
pub struct Processing {
    conn: Conn,
    record: Option<(String, String)>,
}

enum Conn {
    Plain(ServiceConnection),
    Claimed(ServiceTransaction),
}

impl Processing {
    /// The connection to do the work on (inside the claiming transaction when keyed).
    pub fn conn(&mut self) -> &mut PgConnection {
        match &mut self.conn {
            Conn::Plain(conn) => conn,
            Conn::Claimed(tx) => tx,
        }
    }

    /// Stores the answer under the key and commits the work with it.
    pub async fn save(self, status: StatusCode, body: &impl Serialize) -> ApiResult<Response> {
        let stored = Stored::json(status, body)?;
        match (self.conn, self.record) {
            (Conn::Claimed(mut tx), Some((owner, key))) => {
                store(&mut *tx, &owner, &key, &stored).await?;
                tx.commit().await?;
            }
            (Conn::Claimed(tx), None) => tx.commit().await?,
            (Conn::Plain(mut conn), _) => conn.finished(),
        }
        Ok(stored.into_response(false))
    }
}

/// Starts a request whose work runs in the database; see [`Processing`].
pub async fn try_processing(
    pool: &ServicePool,
    owner: &str,
    key: Option<&str>,
    request_hash: &[u8],
) -> ApiResult<Claim<Processing>> {
    let Some(key) = key else {
        let conn = match pool.mode() {
            PoolMode::Session => Conn::Plain(pool.acquire().await?),
            PoolMode::Transaction => Conn::Claimed(pool.begin().await?),
        };
        return Ok(Claim::Start(Processing { conn, record: None }));
    };
    let mut tx = pool.begin().await?;
    if claim(&mut *tx, owner, key, request_hash).await? {
        return Ok(Claim::Start(Processing {
            conn: Conn::Claimed(tx),
            record: Some((owner.to_owned(), key.to_owned())),
        }));
    }
    tx.rollback().await?;
    // The other request committed (we waited for it on the key's row): its answer is there.
    // No answer yet means the key is held by work done outside the database (a checkout
    // waiting on Stripe), or was just released: the caller's retry will find out.
    match lookup(pool, owner, key, request_hash).await? {
        Lookup::Answer(response) => Ok(Claim::Replay(response)),
        Lookup::Missing | Lookup::Pending => Err(ApiError::Unavailable(
            "a request with this Idempotency-Key is still in progress",
        )),
    }
}

/// A request whose work happens outside the database (a call to Stripe): no connection is held
/// while it runs. The key is claimed in a short transaction of its own; [`Reservation::save`]
/// stores the answer, [`Reservation::release`] frees the key after a failure.
pub struct Reservation {
    pool: ServicePool,
    record: Option<(String, String)>,
}

impl Reservation {
    pub async fn save(self, status: StatusCode, body: &impl Serialize) -> ApiResult<Response> {
        let stored = Stored::json(status, body)?;
        if let Some((owner, key)) = &self.record {
            store(&self.pool, owner, key, &stored).await?;
        }
        Ok(stored.into_response(false))
    }

    /// The work failed: a retry with this key runs afresh.
    pub async fn release(self) -> ApiResult<()> {
        if let Some((owner, key)) = &self.record {
            sqlx::query!(
                "delete from public.idempotency_keys
                  where owner = $1 and key = $2 and status_code is null",
                owner,
                key
            )
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }
}

/// Starts a request whose work happens outside the database. A concurrent request with the
/// same key polls until the answer is stored (or the claim is released by a failure, or
/// abandoned by a crashed process for over a minute, when it claims the key itself).
pub async fn try_reserving(
    pool: &ServicePool,
    owner: &str,
    key: Option<&str>,
    request_hash: &[u8],
) -> ApiResult<Claim<Reservation>> {
    let Some(key) = key else {
        return Ok(Claim::Start(Reservation {
            pool: pool.clone(),
            record: None,
        }));
    };
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(35);
    loop {
        if claim(pool, owner, key, request_hash).await? {
            return Ok(Claim::Start(Reservation {
                pool: pool.clone(),
                record: Some((owner.to_owned(), key.to_owned())),
            }));
        }
        match lookup(pool, owner, key, request_hash).await? {
            Lookup::Answer(response) => return Ok(Claim::Replay(response)),
            Lookup::Missing => continue,
            Lookup::Pending => {
                if std::time::Instant::now() > give_up {
                    return Err(ApiError::Unavailable(
                        "a request with this Idempotency-Key is still in progress",
                    ));
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Claims (owner, key) for this request: a new key, an expired record (over 24 h), or a claim
/// abandoned for over a minute by a process that died before storing its answer. While the
/// claiming transaction is open, a concurrent claim of the same key waits on its row.
async fn claim<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    owner: &str,
    key: &str,
    request_hash: &[u8],
) -> Result<bool, sqlx::Error> {
    let claimed = sqlx::query_scalar!(
        "insert into public.idempotency_keys (owner, key, request_hash)
         values ($1, $2, $3)
         on conflict (owner, key) do update
            set request_hash = excluded.request_hash, status_code = null, response_body = null,
                created_at = now()
          where public.idempotency_keys.created_at < now() - public.idempotency_window()
             or (public.idempotency_keys.status_code is null
                 and public.idempotency_keys.created_at < now() - interval '60 seconds')
         returning 1 as claimed",
        owner,
        key,
        request_hash
    )
    .fetch_optional(executor)
    .await?;
    Ok(claimed.is_some())
}

/// Stores the answer under the claimed key.
async fn store<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    owner: &str,
    key: &str,
    stored: &Stored,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "update public.idempotency_keys set status_code = $3, response_body = $4
          where owner = $1 and key = $2",
        owner,
        key,
        stored.status.as_u16() as i16,
        &stored.body
    )
    .execute(executor)
    .await?;
    Ok(())
}

enum Lookup {
    /// No record: the key is free (again).
    Missing,
    /// Claimed, the answer not stored yet.
    Pending,
    /// The stored answer, to replay.
    Answer(Response),
}

struct Record {
    request_hash: Vec<u8>,
    status_code: Option<i16>,
    response_body: Option<Vec<u8>>,
}

/// What is stored under (owner, key); a different request under the key is refused.
async fn lookup(
    pool: &ServicePool,
    owner: &str,
    key: &str,
    request_hash: &[u8],
) -> ApiResult<Lookup> {
    let record = sqlx::query_as!(
        Record,
        "select request_hash, status_code, response_body
           from public.idempotency_keys where owner = $1 and key = $2",
        owner,
        key
    )
    .fetch_optional(pool)
    .await?;
    match record {
        None => Ok(Lookup::Missing),
        Some(r) if r.request_hash != request_hash => Err(ApiError::IdempotencyKeyReused),
        Some(Record {
            status_code: Some(status),
            response_body: Some(body),
            ..
        }) => {
            let status =
                StatusCode::from_u16(status as u16).map_err(|e| ApiError::Internal(e.into()))?;
            Ok(Lookup::Answer(Stored { status, body }.into_response(true)))
        }
        Some(_) => Ok(Lookup::Pending),
    }
}
