//! `Idempotency-Key` (CONTRACT §4): the same caller, key and request within 24 h gets the
//! first answer again and nothing is applied twice, even when the requests race.
//!
//! The key is claimed by inserting its row inside the transaction that does the work, and the
//! answer is written into that row before the commit. A concurrent request with the same key
//! blocks on the row's unique index until the first commits, then finds the answer and
//! replays it. If the work fails, the transaction (claim included) rolls back and the next
//! request with the key runs afresh: only successful answers are stored.

use std::future::Future;
use std::pin::Pin;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};

use crate::error::{ApiError, ApiResult};

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
            .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()))
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
pub struct Stored {
    pub status: StatusCode,
    pub body: Vec<u8>,
}

impl Stored {
    pub fn json(status: StatusCode, value: &impl Serialize) -> ApiResult<Self> {
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

/// Work that runs on the connection (inside the claiming transaction when a key is given).
pub type Work<'c> = Pin<Box<dyn Future<Output = ApiResult<Stored>> + Send + 'c>>;

/// Runs `work` once per (owner, key, request); see the module documentation.
pub async fn run<F>(
    pool: &PgPool,
    owner: &str,
    key: Option<&str>,
    request_hash: Vec<u8>,
    work: F,
) -> ApiResult<Response>
where
    F: for<'c> FnOnce(&'c mut PgConnection) -> Work<'c> + Send,
{
    let Some(key) = key else {
        let mut conn = pool.acquire().await?;
        return Ok(work(&mut conn).await?.into_response(false));
    };

    let mut tx = pool.begin().await?;
    let claimed = claim(&mut *tx, owner, key, &request_hash).await?;

    if !claimed {
        tx.rollback().await?;
        // The other request committed (we waited for it on the key's row): its answer is there.
        return match lookup(pool, owner, key, &request_hash).await? {
            Lookup::Answer(response) => Ok(response),
            Lookup::Missing | Lookup::Pending => Err(ApiError::Internal(anyhow::anyhow!(
                "idempotency record without an answer"
            ))),
        };
    }

    let stored = work(&mut tx).await?;
    store(&mut *tx, owner, key, &stored).await?;
    tx.commit().await?;
    Ok(stored.into_response(false))
}

/// Like [`run`], for work done outside the database (a call to Stripe): no connection is held
/// while it runs. The key is claimed in a short transaction of its own; a concurrent request
/// with the same key polls until the answer is stored (or the claim is released by a failure,
/// or abandoned by a crashed process for over a minute, when it claims the key itself).
pub async fn run_external<Fut>(
    pool: &PgPool,
    owner: &str,
    key: Option<&str>,
    request_hash: Vec<u8>,
    work: impl FnOnce() -> Fut,
) -> ApiResult<Response>
where
    Fut: Future<Output = ApiResult<Stored>>,
{
    let Some(key) = key else {
        return Ok(work().await?.into_response(false));
    };
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(35);
    loop {
        if claim(pool, owner, key, &request_hash).await? {
            return match work().await {
                Ok(stored) => {
                    store(pool, owner, key, &stored).await?;
                    Ok(stored.into_response(false))
                }
                Err(err) => {
                    // Release the claim: a retry with this key runs afresh.
                    sqlx::query("delete from public.idempotency_keys where owner = $1 and key = $2 and status_code is null")
                        .bind(owner)
                        .bind(key)
                        .execute(pool)
                        .await?;
                    Err(err)
                }
            };
        }

        match lookup(pool, owner, key, &request_hash).await? {
            Lookup::Answer(response) => return Ok(response),
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
    let claimed: Option<i32> = sqlx::query_scalar(
        "insert into public.idempotency_keys (owner, key, request_hash)
         values ($1, $2, $3)
         on conflict (owner, key) do update
            set request_hash = excluded.request_hash, status_code = null, response_body = null,
                created_at = now()
          where public.idempotency_keys.created_at < now() - interval '24 hours'
             or (public.idempotency_keys.status_code is null
                 and public.idempotency_keys.created_at < now() - interval '60 seconds')
         returning 1",
    )
    .bind(owner)
    .bind(key)
    .bind(request_hash)
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
    sqlx::query("update public.idempotency_keys set status_code = $3, response_body = $4 where owner = $1 and key = $2")
        .bind(owner)
        .bind(key)
        .bind(stored.status.as_u16() as i16)
        .bind(&stored.body)
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

#[derive(sqlx::FromRow)]
struct Record {
    request_hash: Vec<u8>,
    status_code: Option<i16>,
    response_body: Option<Vec<u8>>,
}

/// What is stored under (owner, key); a different request under the key is refused.
async fn lookup(pool: &PgPool, owner: &str, key: &str, request_hash: &[u8]) -> ApiResult<Lookup> {
    let record: Option<Record> = sqlx::query_as(
        "select request_hash, status_code, response_body
           from public.idempotency_keys where owner = $1 and key = $2",
    )
    .bind(owner)
    .bind(key)
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
