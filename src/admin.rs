//! Admin routes: look up users and their history, adjust balances, daily statistics.
//! They run as `service_role` once [`AdminCaller`] has accepted the caller.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{OriginalUri, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::AdminCaller;
use crate::credits::{self, BalanceChange, Transaction};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::extract::{
    ApiJson, ApiQuery, IdPath, List, PageParams, check_line, check_text, is_blank, time_id_cursor,
    time_page,
};
use crate::idempotency::{self, Claim, IdempotencyKey};
use crate::limits;
use crate::profiles::{self, Profile, ProfileRow};
use crate::state::AppState;
use crate::{db, telemetry};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(search_users))
        .routes(routes!(get_user))
        .routes(routes!(user_transactions))
        .routes(routes!(adjust_credits))
        .routes(routes!(stats))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UserSearch {
    /// Case-insensitive part of the email address.
    pub email: Option<String>,
    /// Items per page, 1–100 (default 20).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^([0-9]{1,16}-[0-9a-f]{32})?$")]
    pub cursor: Option<String>,
}

/// Users whose email contains `email`, newest first.
#[utoipa::path(
    get,
    path = "/v1/admin/users",
    tag = "admin",
    security(("bearer" = [])),
    params(UserSearch),
    responses(
        (status = 200, body = List<Profile>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn search_users(
    State(state): State<AppState>,
    _admin: AdminCaller,
    ApiQuery(search): ApiQuery<UserSearch>,
) -> ApiResult<Json<List<Profile>>> {
    let page = time_page(search.limit.as_deref(), search.cursor.as_deref())?;
    // Checked as given, then matched trimmed and case-insensitively.
    let mut errors = Vec::new();
    if let Some(email) = &search.email {
        check_line(&mut errors, "email", email, limits::EMAIL_CHARS);
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let email = search
        .email
        .map(|e| e.trim().to_lowercase())
        .filter(|e| !e.is_empty());
    let after = page.after;
    let pattern = email.map(|e| format!("%{}%", escape_like(&e)));
    let rows = sqlx::query_as!(
        ProfileRow,
        r#"select p.id, p.email, p.display_name, p.avatar_url, b.credits as "credits!",
                  p.is_admin, a.views_today as "views_today!", a.daily_limit as "daily_limit!",
                  a.views_remaining as "views_remaining!", a.resets_at as "resets_at!",
                  p.subscription_status, p.subscription_plan, p.subscription_current_period_end,
                  p.low_balance_threshold, p.created_at, p.updated_at, b.available as "available!",
                  b.held as "held!", b.paid as "paid!", b.promotional as "promotional!",
                  b.expiring as "expiring!"
             from public.profiles p
            cross join lateral public.ad_allowance(p.ad_views_date, p.ad_views_today) a
            cross join lateral public.credit_balance(p.id) b
            where ($1::text is null or lower(p.email) like $1 escape '\')
              and ($2::timestamptz is null or (p.created_at, p.id) < ($2, $3))
            order by p.created_at desc, p.id desc
            limit $4"#,
        pattern,
        after.map(|a| a.0),
        after.map(|a| a.1),
        page.limit + 1,
    )
    .fetch_all(&state.pool)
    .await?;
    let profiles: Vec<Profile> = rows.into_iter().map(Profile::from).collect();
    Ok(Json(List::from_rows(profiles, page.limit, |p| {
        time_id_cursor(&p.created_at, &p.id)
    })))
}

/// Escapes `%`, `_` and `\` so that the text matches literally inside a LIKE pattern.
fn escape_like(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One user's profile.
#[utoipa::path(
    get,
    path = "/v1/admin/users/{id}",
    tag = "admin",
    security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, body = Profile),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_user(
    State(state): State<AppState>,
    _admin: AdminCaller,
    IdPath(id): IdPath,
) -> ApiResult<Json<Profile>> {
    let profile = profiles::fetch(&state.pool, id)
        .await?
        .ok_or(ApiError::ProfileNotFound)?;
    Ok(Json(profile))
}

/// One user's credit history, newest first.
#[utoipa::path(
    get,
    path = "/v1/admin/users/{id}/transactions",
    tag = "admin",
    security(("bearer" = [])),
    params(("id" = Uuid, Path), PageParams),
    responses(
        (status = 200, body = List<Transaction>),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn user_transactions(
    State(state): State<AppState>,
    _admin: AdminCaller,
    IdPath(id): IdPath,
    ApiQuery(params): ApiQuery<PageParams>,
) -> ApiResult<Json<List<Transaction>>> {
    let page = params.check()?;
    let list = credits::history(&state.pool, id, &page).await?;
    if list.items.is_empty() {
        let exists = sqlx::query_scalar!(
            r#"select exists (select 1 from public.profiles where id = $1) as "exists!""#,
            id
        )
        .fetch_one(&state.pool)
        .await?;
        if !exists {
            return Err(ApiError::ProfileNotFound);
        }
    }
    Ok(Json(list))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdjustRequest {
    /// Credits to add (positive) or take away (negative, never below a zero balance).
    #[schema(minimum = -1_000_000_000, maximum = 1_000_000_000)]
    pub amount: i64,
    /// Why, for the ledger (1–500 characters).
    pub reason: String,
    /// When the credits added expire (in the future; only with a positive amount). Without
    /// it, as the `admin` credit source says (by default, never).
    pub expires_at: Option<DateTime<Utc>>,
}

/// Adds or removes credits; recorded with source `admin`.
#[utoipa::path(
    post,
    path = "/v1/admin/users/{id}/credits",
    tag = "admin",
    security(("bearer" = [])),
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for 24 h")),
    request_body = AdjustRequest,
    responses(
        (status = 201, body = BalanceChange),
        (status = 402, description = "Would take the balance below zero", body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn adjust_credits(
    State(state): State<AppState>,
    admin: AdminCaller,
    IdPath(id): IdPath,
    IdempotencyKey(key): IdempotencyKey,
    OriginalUri(uri): OriginalUri,
    body: ApiJson<AdjustRequest>,
) -> ApiResult<Response> {
    let request = body.value;
    let mut errors = Vec::new();
    if request.amount == 0 || request.amount.abs() > limits::ADJUST_MAX {
        errors.push(FieldError::new(
            "amount",
            format!(
                "must be a non-zero whole number between -{max} and {max}",
                max = limits::ADJUST_MAX
            ),
        ));
    }
    // Checked as given; recorded trimmed.
    check_text(
        &mut errors,
        "reason",
        &Some(request.reason.clone()),
        limits::DESCRIPTION_CHARS,
    );
    if is_blank(&request.reason) {
        errors.push(FieldError::new("reason", "is required"));
    }
    if request.expires_at.is_some() && request.amount < 0 {
        errors.push(FieldError::new(
            "expires_at",
            "applies to credits added, not taken",
        ));
    }
    let reason = Some(request.reason.trim().to_owned());
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }

    let actor = admin.actor();
    let hash = idempotency::fingerprint(&Method::POST, uri.path(), &body.document);
    let owner = format!("admin:{actor}");
    // The claim of the key, the adjustment and the stored answer are one unit of work: a
    // conflict rolls all of it back and it runs again.
    db::retrying_conflicts(|| {
        adjust_once(
            &state,
            id,
            &owner,
            key.as_deref(),
            &hash,
            Adjustment {
                amount: request.amount,
                reason: reason.as_deref(),
                expires_at: request.expires_at,
            },
        )
    })
    .await
}

/// A checked adjustment.
struct Adjustment<'a> {
    amount: i64,
    reason: Option<&'a str>,
    expires_at: Option<DateTime<Utc>>,
}

async fn adjust_once(
    state: &AppState,
    id: uuid::Uuid,
    owner: &str,
    key: Option<&str>,
    hash: &[u8],
    Adjustment {
        amount,
        reason,
        expires_at,
    }: Adjustment<'_>,
) -> ApiResult<Response> {
    let mut work = match idempotency::try_processing(&state.pool, owner, key, hash).await? {
        Claim::Replay(answer) => return Ok(answer),
        Claim::Start(work) => work,
    };
    let transaction = sqlx::query_as!(
        Transaction,
        r#"select id as "id!", amount as "amount!", balance_after as "balance_after!",
                  source as "source!", description, reference, created_at as "created_at!",
                  seq as "seq!"
             from public.add_credits($1, $2, 'admin', $3, $4, $5)"#,
        id,
        amount as i32,
        reason,
        owner,
        expires_at,
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
    if amount > 0 {
        telemetry::credits_granted("admin", amount);
    } else {
        telemetry::credits_spent("admin", -amount);
    }
    Ok(answer)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatsParams {
    /// Days back from today (UTC), 1–366; default 30.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 366)]
    pub days: Option<String>,
}

/// One UTC day of activity.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DayStats {
    pub date: NaiveDate,
    /// Credits added, by source.
    pub granted: BTreeMap<String, i64>,
    /// Credits spent by users.
    pub spent: i64,
    /// Credits taken back other than by spending (admin removals, refunds), by source.
    pub removed: BTreeMap<String, i64>,
    pub ad_views: i64,
    pub ad_credits: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Stats {
    /// Oldest day first.
    pub days: Vec<DayStats>,
}

struct StatsRow {
    day: NaiveDate,
    source: Option<String>,
    granted: i64,
    taken: i64,
    ad_views: i64,
    ad_credits: i64,
}

/// Daily totals for the last `days` UTC days, today included.
#[utoipa::path(
    get,
    path = "/v1/admin/stats",
    tag = "admin",
    security(("bearer" = [])),
    params(StatsParams),
    responses(
        (status = 200, body = Stats),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn stats(
    State(state): State<AppState>,
    _admin: AdminCaller,
    ApiQuery(params): ApiQuery<StatsParams>,
) -> ApiResult<Json<Stats>> {
    let days: i32 = match params.days.as_deref() {
        None => limits::STATS_DAYS_DEFAULT,
        Some(raw) => match raw.parse() {
            Ok(n) if (1..=limits::STATS_DAYS_MAX).contains(&n) => n,
            _ => {
                return Err(ApiError::field(
                    "days",
                    format!(
                        "must be a whole number from 1 to {}",
                        limits::STATS_DAYS_MAX
                    ),
                ));
            }
        },
    };
    // One row per (day, source) of ledger totals, plus one row per day (source null) of ad
    // totals; every day of the range appears even when nothing happened.
    let rows = sqlx::query_as!(
        StatsRow,
        r#"with bounds as (
           select (now() at time zone 'utc')::date - ($1 - 1) as first_day
         ),
         ledger as (
           select (t.created_at at time zone 'utc')::date as day, t.source,
                  coalesce(sum(t.amount) filter (where t.amount > 0), 0)::bigint as granted,
                  coalesce(-sum(t.amount) filter (where t.amount < 0), 0)::bigint as taken
             from public.credit_transactions t, bounds b
            where t.created_at >= b.first_day::timestamp at time zone 'utc'
            group by 1, 2
         ),
         ads as (
           select v.viewed_on as day, count(*)::bigint as ad_views,
                  coalesce(sum(v.credits_awarded), 0)::bigint as ad_credits
             from public.ad_views v, bounds b
            where v.viewed_on >= b.first_day
            group by 1
         )
         select d.day::date as "day!", null::text as source, 0::bigint as "granted!",
                0::bigint as "taken!", coalesce(a.ad_views, 0) as "ad_views!",
                coalesce(a.ad_credits, 0) as "ad_credits!"
           from bounds b,
                generate_series(b.first_day, (now() at time zone 'utc')::date, interval '1 day') as d(day)
           left join ads a on a.day = d.day::date
         union all
         select l.day, l.source, l.granted, l.taken, 0, 0 from ledger l
         order by 1, 2 nulls first"#,
        days,
    )
    .fetch_all(&state.pool)
    .await?;

    let mut by_day: BTreeMap<NaiveDate, DayStats> = BTreeMap::new();
    for row in rows {
        let day = by_day.entry(row.day).or_insert_with(|| DayStats {
            date: row.day,
            granted: BTreeMap::new(),
            spent: 0,
            removed: BTreeMap::new(),
            ad_views: 0,
            ad_credits: 0,
        });
        match row.source {
            None => {
                day.ad_views = row.ad_views;
                day.ad_credits = row.ad_credits;
            }
            Some(source) => {
                if row.granted > 0 {
                    day.granted.insert(source.clone(), row.granted);
                }
                if row.taken > 0 {
                    if source == "spend" {
                        day.spent += row.taken;
                    } else {
                        day.removed.insert(source, row.taken);
                    }
                }
            }
        }
    }
    Ok(Json(Stats {
        days: by_day.into_values().collect(),
    }))
}
