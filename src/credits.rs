//! Balances and their history: `GET /v1/me/transactions`, `POST /v1/credits/spend`, and the
//! Transaction shape shared with the admin routes.

use axum::Json;
use axum::extract::{OriginalUri, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::batch;
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::extract::{ApiJson, ApiQuery, List, Page, PageParams, check_text};
use crate::idempotency::{self, Claim, IdempotencyKey};
use crate::limits;
use crate::state::AppState;
use crate::{db, telemetry};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(my_transactions))
        .routes(routes!(spend))
}

/// One change to a balance.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Transaction {
    pub id: Uuid,
    /// Positive for credits added, negative for credits taken.
    pub amount: i32,
    pub balance_after: i32,
    /// `stripe`, `subscription`, `ad_view`, `admin`, `system`, `spend` or `refund`.
    pub source: String,
    pub description: Option<String>,
    pub reference: Option<String>,
    #[serde(serialize_with = "crate::timestamps::utc")]
    pub created_at: DateTime<Utc>,
    #[serde(skip)]
    #[schema(ignore)]
    pub seq: i64,
}

/// A page of `user_id`'s history, newest first, read as `service_role` (admin routes). Keyset
/// pagination on the ledger order: the (user_id, seq) index serves every page at the same cost.
pub async fn history(
    pool: &crate::db::ServicePool,
    user_id: Uuid,
    page: &Page<i64>,
) -> ApiResult<List<Transaction>> {
    let rows = sqlx::query_as!(
        Transaction,
        "select id, amount, balance_after, source, description, reference, created_at, seq
           from public.credit_transactions
          where user_id = $1 and ($2::bigint is null or seq < $2)
          order by seq desc
          limit $3",
        user_id,
        page.after,
        page.limit + 1,
    )
    .fetch_all(pool)
    .await?;
    Ok(List::from_rows(rows, page.limit, |t| t.seq.to_string()))
}

/// The caller's credit history, newest first.
#[utoipa::path(
    get,
    path = "/v1/me/transactions",
    tag = "credits",
    security(("bearer" = [])),
    params(PageParams),
    responses(
        (status = 200, body = List<Transaction>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Bad limit or cursor", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn my_transactions(
    State(state): State<AppState>,
    user: AuthUser,
    ApiQuery(params): ApiQuery<PageParams>,
) -> ApiResult<Json<List<Transaction>>> {
    let page = params.check()?;
    // One round trip, as the user under RLS (see the user reads migration).
    let rows = sqlx::query_as!(
        Transaction,
        r#"select id as "id!", amount as "amount!", balance_after as "balance_after!",
                  source as "source!", description, reference, created_at as "created_at!",
                  seq as "seq!"
             from public.transactions_as_user($1, $2, $3)"#,
        &*user.claims,
        page.after,
        (page.limit + 1) as i32,
    )
    .fetch_all(&state.pool)
    .await?;
    let list = List::from_rows(rows, page.limit, |t| t.seq.to_string());
    Ok(Json(list))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SpendRequest {
    /// Credits to spend, 1–1,000,000.
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub amount: i64,
    /// What the credits pay for (at most 500 characters).
    pub description: Option<String>,
    /// The caller's own reference, such as an image id (at most 255 characters).
    pub reference: Option<String>,
}

/// A balance change and the balance after it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BalanceChange {
    pub transaction: Transaction,
    pub balance: i32,
}

/// Spends credits from the caller's balance.
#[utoipa::path(
    post,
    path = "/v1/credits/spend",
    tag = "credits",
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for 24 h")),
    request_body = SpendRequest,
    responses(
        (status = 201, body = BalanceChange),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 402, description = "Balance too low (`insufficient_credits`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn spend(
    State(state): State<AppState>,
    user: AuthUser,
    IdempotencyKey(key): IdempotencyKey,
    OriginalUri(uri): OriginalUri,
    body: ApiJson<SpendRequest>,
) -> ApiResult<Response> {
    let request = body.value;
    let mut errors = Vec::new();
    if !(1..=limits::SPEND_MAX).contains(&request.amount) {
        errors.push(FieldError::new(
            "amount",
            format!("must be a whole number from 1 to {}", limits::SPEND_MAX),
        ));
    }
    check_text(
        &mut errors,
        "description",
        &request.description,
        limits::DESCRIPTION_CHARS,
    );
    check_text(
        &mut errors,
        "reference",
        &request.reference,
        limits::REFERENCE_CHARS,
    );
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }

    let Some(key) = key else {
        // Without a key there is nothing to store with the spend: it can share its round trip
        // and its commit with the spends that arrive with it.
        let transaction =
            db::retrying_conflicts(|| spend_together(&state, user.id, &request)).await?;
        telemetry::credits_spent("spend", request.amount);
        let balance = transaction.balance_after;
        return Ok((
            StatusCode::CREATED,
            Json(BalanceChange {
                transaction,
                balance,
            }),
        )
            .into_response());
    };
    let hash = idempotency::fingerprint(&Method::POST, uri.path(), &body.document);
    let owner = user.id.to_string();
    // The claim of the key, the spend and the stored answer are one unit of work: a conflict
    // rolls all of it back and it runs again.
    db::retrying_conflicts(|| spend_once(&state, &user, &owner, &key, &hash, &request)).await
}

async fn spend_once(
    state: &AppState,
    user: &AuthUser,
    owner: &str,
    key: &str,
    hash: &[u8],
    request: &SpendRequest,
) -> ApiResult<Response> {
    let mut work = match idempotency::try_processing(&state.pool, owner, Some(key), hash).await? {
        Claim::Replay(answer) => return Ok(answer),
        Claim::Start(work) => work,
    };
    let transaction = sqlx::query_as!(
        Transaction,
        r#"select id as "id!", amount as "amount!", balance_after as "balance_after!",
                  source as "source!", description, reference, created_at as "created_at!",
                  seq as "seq!"
             from public.spend_credits($1, $2, $3, $4)"#,
        user.id,
        request.amount as i32,
        request.description.as_deref(),
        request.reference.as_deref(),
    )
    .fetch_one(work.conn())
    .await?;
    let balance = transaction.balance_after;
    let answer = work
        .save(
            StatusCode::CREATED,
            &BalanceChange {
                transaction,
                balance,
            },
        )
        .await?;
    telemetry::credits_spent("spend", request.amount);
    Ok(answer)
}

/// A spend without an Idempotency-Key, as it waits for its batch.
struct SpendItem {
    user_id: Uuid,
    amount: i32,
    description: Option<String>,
    reference: Option<String>,
}

/// The most spends in one statement: each is a subtransaction, and PostgreSQL keeps up to 64
/// of a transaction's subtransactions in shared memory before other sessions' snapshots slow
/// down.
const SPENDS_TOGETHER: usize = 32;

/// Runs one spend with those that arrive with it (`batch`); a spend the batch refused runs
/// again alone, so that its answer is exactly the single call's (the refusal undid it).
async fn spend_together(
    state: &AppState,
    user_id: Uuid,
    request: &SpendRequest,
) -> ApiResult<Transaction> {
    let item = SpendItem {
        user_id,
        amount: request.amount as i32,
        description: request.description.clone(),
        reference: request.reference.clone(),
    };
    let batcher = state
        .batches
        .get::<SpendItem, Option<Transaction>>("spend", SPENDS_TOGETHER);
    if let Some(transaction) = batcher.run(&state.pool, item, run_spends).await? {
        return Ok(transaction);
    }
    spend_alone(&state.pool, user_id, request).await
}

/// One spend, alone, on a connection of its own.
async fn spend_alone(
    pool: &db::ServicePool,
    user_id: Uuid,
    request: &SpendRequest,
) -> ApiResult<Transaction> {
    Ok(sqlx::query_as!(
        Transaction,
        r#"select id as "id!", amount as "amount!", balance_after as "balance_after!",
                  source as "source!", description, reference, created_at as "created_at!",
                  seq as "seq!"
             from public.spend_credits($1, $2, $3, $4)"#,
        user_id,
        request.amount as i32,
        request.description.as_deref(),
        request.reference.as_deref(),
    )
    .fetch_one(pool)
    .await?)
}

/// A batch of spends in one call of `spend_credits_together`: each item's transaction, or
/// `None` when the database refused that spend (it is then run alone for its exact answer).
fn run_spends(
    pool: &db::ServicePool,
    conn: db::ServiceConnection,
    items: Vec<SpendItem>,
) -> BoxFuture<'static, Vec<ApiResult<Option<Transaction>>>> {
    let pool = pool.clone();
    Box::pin(async move {
        let n = items.len();
        let mut users = Vec::with_capacity(n);
        let mut amounts = Vec::with_capacity(n);
        let mut descriptions = Vec::with_capacity(n);
        let mut references = Vec::with_capacity(n);
        for item in items {
            users.push(item.user_id);
            amounts.push(item.amount);
            descriptions.push(item.description);
            references.push(item.reference);
        }
        let outcome = async {
            let mut unit = db::Unit::start(&pool, conn).await?;
            let rows = sqlx::query!(
                r#"select item as "item!", id, amount, balance_after, source, description,
                          reference, created_at, seq, failure
                     from public.spend_credits_together($1, $2, $3, $4)"#,
                &users,
                &amounts,
                &descriptions as &[Option<String>],
                &references as &[Option<String>],
            )
            .fetch_all(&mut *unit)
            .await?;
            unit.done().await?;
            Ok::<_, sqlx::Error>(rows)
        }
        .await;
        let rows = match outcome {
            Ok(rows) => rows,
            Err(e) => return batch::each_failed(e, n),
        };
        let answers = batch::by_item(
            n,
            rows.into_iter().map(|row| {
                let transaction = match (
                    row.failure,
                    row.id,
                    row.amount,
                    row.balance_after,
                    row.source,
                    row.created_at,
                    row.seq,
                ) {
                    (
                        None,
                        Some(id),
                        Some(amount),
                        Some(balance_after),
                        Some(source),
                        Some(created_at),
                        Some(seq),
                    ) => Some(Transaction {
                        id,
                        amount,
                        balance_after,
                        source,
                        description: row.description,
                        reference: row.reference,
                        created_at,
                        seq,
                    }),
                    _ => None,
                };
                (i64::from(row.item), transaction)
            }),
        );
        answers
            .into_iter()
            .map(|answer| {
                answer.ok_or_else(|| {
                    ApiError::Internal(anyhow::anyhow!(
                        "the batch of spends did not answer every spend"
                    ))
                })
            })
            .collect()
    })
}
