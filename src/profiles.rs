//! Profiles: `GET /v1/me` and `PATCH /v1/me`, and the Profile shape admins see too.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Deserializer, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::batch;
use crate::db::{ServiceConnection, ServicePool, Unit};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::extract::{ApiJson, SizedJson, check_line, is_http_url};
use crate::limits;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_me, patch_me))
}

/// A profile as read: the columns of `public.profiles` the answer shows, and the ad allowance
/// as `public.ad_allowance` computes it (the ad day is the database's).
#[derive(Debug)]
pub struct ProfileRow {
    pub id: Uuid,
    pub email: Option<String>,
    pub display_name: Option<String>,
    pub avatar_url: Option<String>,
    pub credits: i32,
    pub is_admin: bool,
    pub views_today: i32,
    pub daily_limit: i32,
    pub views_remaining: i32,
    pub resets_at: DateTime<Utc>,
    pub subscription_status: Option<String>,
    pub subscription_plan: Option<String>,
    pub subscription_current_period_end: Option<DateTime<Utc>>,
    pub low_balance_threshold: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub available: i32,
    pub held: i32,
    pub paid: i32,
    pub promotional: i32,
    pub expiring: serde_json::Value,
}

/// A user's profile and balance.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Profile {
    pub id: Uuid,
    pub email: Option<String>,
    pub display_name: Option<String>,
    pub avatar_url: Option<String>,
    /// Current balance in credits.
    pub credits: i32,
    pub is_admin: bool,
    /// The balance in parts.
    pub balance: Balance,
    pub subscription: Option<Subscription>,
    pub ads: AdAllowance,
    /// The balance under which the live stream (`GET /v1/me/events`) sends `low_balance`;
    /// null: the service's default (`LOW_BALANCE_THRESHOLD`); 0: no alerts.
    pub low_balance_threshold: Option<i32>,
    #[serde(serialize_with = "crate::timestamps::utc")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "crate::timestamps::utc")]
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Subscription {
    /// Stripe's subscription status (`active`, `past_due`, `canceled`, …).
    pub status: String,
    /// The credit pack the subscription is for.
    pub plan: Option<String>,
    #[serde(serialize_with = "crate::timestamps::optional_utc")]
    pub current_period_end: Option<DateTime<Utc>>,
}

/// A balance in parts. `available` = `credits` − `held`; `paid` + `promotional` = `credits`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Balance {
    /// What can be spent or reserved now.
    pub available: i32,
    /// Reserved by active holds.
    pub held: i32,
    /// Credits bought (Stripe purchases and subscriptions, and balances from before lots).
    pub paid: i32,
    /// Ad rewards, admin and system grants.
    pub promotional: i32,
    /// The next expiries, soonest first (at most 3).
    pub expiring: Vec<Expiring>,
}

/// Credits that expire together.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Expiring {
    pub amount: i32,
    #[serde(serialize_with = "crate::timestamps::utc")]
    pub expires_at: DateTime<Utc>,
}

/// Today's rewarded ad views.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AdAllowance {
    pub views_today: i32,
    pub daily_limit: i32,
    pub views_remaining: i32,
    /// The next midnight UTC, when the count starts again.
    #[serde(serialize_with = "crate::timestamps::utc")]
    pub resets_at: DateTime<Utc>,
}

impl From<ProfileRow> for Profile {
    fn from(row: ProfileRow) -> Self {
        Profile {
            id: row.id,
            email: row.email,
            display_name: row.display_name,
            avatar_url: row.avatar_url,
            credits: row.credits,
            balance: Balance {
                available: row.available,
                held: row.held,
                paid: row.paid,
                promotional: row.promotional,
                // Written by public.credit_balance in this very shape.
                expiring: serde_json::from_value(row.expiring).unwrap_or_default(),
            },
            is_admin: row.is_admin,
            subscription: row.subscription_status.map(|status| Subscription {
                status,
                plan: row.subscription_plan,
                current_period_end: row.subscription_current_period_end,
            }),
            ads: AdAllowance {
                views_today: row.views_today,
                daily_limit: row.daily_limit,
                views_remaining: row.views_remaining,
                resets_at: row.resets_at,
            },
            low_balance_threshold: row.low_balance_threshold,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// The profile of `id`, read as `service_role` (admin routes).
pub async fn fetch(pool: &ServicePool, id: Uuid) -> ApiResult<Option<Profile>> {
    let row = sqlx::query_as!(
        ProfileRow,
        r#"select p.id, p.email, p.display_name, p.avatar_url, b.credits as "credits!", p.is_admin,
                  a.views_today as "views_today!", a.daily_limit as "daily_limit!",
                  a.views_remaining as "views_remaining!", a.resets_at as "resets_at!",
                  p.subscription_status, p.subscription_plan, p.subscription_current_period_end,
                  p.low_balance_threshold, p.created_at, p.updated_at, b.available as "available!",
                  b.held as "held!", b.paid as "paid!", b.promotional as "promotional!",
                  b.expiring as "expiring!"
             from public.profiles p
            cross join lateral public.ad_allowance(p.ad_views_date, p.ad_views_today) a
            cross join lateral public.credit_balance(p.id) b
            where p.id = $1"#,
        id,
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(Profile::from))
}

/// The caller's profile.
#[utoipa::path(
    get,
    path = "/v1/me",
    tag = "profile",
    security(("bearer" = [])),
    responses(
        (status = 200, body = Profile),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No profile for this user (`profile_not_found`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_me(
    State(state): State<AppState>,
    user: AuthUser,
) -> ApiResult<SizedJson<Profile, PROFILE_BYTES>> {
    let profile = read_together(&state, &user.claims).await?;
    Ok(SizedJson(profile.ok_or(ApiError::ProfileNotFound)?))
}

/// Room for a profile's JSON: 474 bytes with no name or avatar and no expiring credits, about
/// 50 bytes more for each lot that expires.
const PROFILE_BYTES: usize = 1024;

/// The most profile reads in one statement.
const READS_TOGETHER: usize = 32;

/// As [`read_as_user`], sharing its round trip with the profile reads that arrive with it
/// (`batch`). A read the batch could not answer runs again alone.
async fn read_together(state: &AppState, claims: &Arc<str>) -> ApiResult<Option<Profile>> {
    let batcher = state
        .batches
        .get::<Arc<str>, Option<Option<Profile>>>("profile_read", READS_TOGETHER);
    match batcher
        .run(&state.pool, Arc::clone(claims), run_reads)
        .await?
    {
        Some(read) => Ok(read),
        None => read_as_user(&state.pool, claims).await,
    }
}

/// A batch of profile reads in one statement, each as its own user (the verified claims):
/// each read's profile, `Some(None)` when the user has none, or `None` for every read when the
/// statement failed for a reason of its own (they are then run alone, for their own answers).
fn run_reads(
    pool: &ServicePool,
    conn: ServiceConnection,
    claims: Vec<Arc<str>>,
) -> BoxFuture<'static, Vec<ApiResult<Option<Option<Profile>>>>> {
    let pool = pool.clone();
    Box::pin(async move {
        let n = claims.len();
        let claims: Vec<&str> = claims.iter().map(|c| &**c).collect();
        let outcome = async {
            let mut unit = Unit::start(&pool, conn).await?;
            let rows = sqlx::query!(
                r#"select c.n as "item!", p.id as "id!", p.email, p.display_name, p.avatar_url,
                          b.credits as "credits!", p.is_admin as "is_admin!",
                          a.views_today as "views_today!", a.daily_limit as "daily_limit!",
                          a.views_remaining as "views_remaining!", a.resets_at as "resets_at!",
                          p.subscription_status, p.subscription_plan,
                          p.subscription_current_period_end, p.low_balance_threshold,
                          p.created_at as "created_at!", p.updated_at as "updated_at!",
                          b.available as "available!", b.held as "held!", b.paid as "paid!",
                          b.promotional as "promotional!", b.expiring as "expiring!"
                     from unnest($1::text[]) with ordinality as c(claims, n)
                    cross join lateral public.profile_as_user(c.claims) p
                    cross join lateral public.ad_allowance(p.ad_views_date, p.ad_views_today) a
                    cross join lateral public.credit_balance(p.id) b"#,
                &claims as &[&str],
            )
            .fetch_all(&mut *unit)
            .await?;
            unit.done().await?;
            Ok::<_, sqlx::Error>(rows)
        }
        .await;
        let rows = match outcome {
            Ok(rows) => rows,
            Err(e) if crate::error::database_fault(&e).is_some() => {
                return batch::each_failed(e, n);
            }
            Err(_) => return (0..n).map(|_| Ok(None)).collect(),
        };
        let found = batch::by_item(
            n,
            rows.into_iter().map(|r| {
                let item = r.item;
                let profile = Profile::from(ProfileRow {
                    id: r.id,
                    email: r.email,
                    display_name: r.display_name,
                    avatar_url: r.avatar_url,
                    credits: r.credits,
                    is_admin: r.is_admin,
                    views_today: r.views_today,
                    daily_limit: r.daily_limit,
                    views_remaining: r.views_remaining,
                    resets_at: r.resets_at,
                    subscription_status: r.subscription_status,
                    subscription_plan: r.subscription_plan,
                    subscription_current_period_end: r.subscription_current_period_end,
                    low_balance_threshold: r.low_balance_threshold,
                    created_at: r.created_at,
                    updated_at: r.updated_at,
                    available: r.available,
                    held: r.held,
                    paid: r.paid,
                    promotional: r.promotional,
                    expiring: r.expiring,
                });
                (item, profile)
            }),
        );
        // No row: that caller has no profile.
        found.into_iter().map(|profile| Ok(Some(profile))).collect()
    })
}

/// The profile of the user whose verified claims these are, read as that user: what
/// `GET /v1/me` answers, and what the live stream's `balance` event is made from.
pub async fn read_as_user(pool: &ServicePool, claims: &str) -> ApiResult<Option<Profile>> {
    // One round trip: the function reads as the user, under RLS (see the user reads migration).
    let row = sqlx::query_as!(
        ProfileRow,
        r#"select p.id as "id!", p.email, p.display_name, p.avatar_url, b.credits as "credits!",
                  p.is_admin as "is_admin!", a.views_today as "views_today!",
                  a.daily_limit as "daily_limit!", a.views_remaining as "views_remaining!",
                  a.resets_at as "resets_at!", p.subscription_status, p.subscription_plan,
                  p.subscription_current_period_end, p.low_balance_threshold,
                  p.created_at as "created_at!", p.updated_at as "updated_at!",
                  b.available as "available!", b.held as "held!", b.paid as "paid!",
                  b.promotional as "promotional!", b.expiring as "expiring!"
             from public.profile_as_user($1) p
            cross join lateral public.ad_allowance(p.ad_views_date, p.ad_views_today) a
            cross join lateral public.credit_balance(p.id) b"#,
        claims,
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(Profile::from))
}

/// What a user may change about themselves. A field left out is unchanged; `null` clears it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileUpdate {
    /// 1–100 characters, or null.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub display_name: Change,
    /// An http(s) URL of at most 2048 characters, or null.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub avatar_url: Change,
    /// 0–1,000,000: the balance under which the live stream sends `low_balance`; 0 turns the
    /// alerts off, null goes back to the service's default.
    #[serde(default, deserialize_with = "present_number")]
    #[schema(value_type = Option<i64>)]
    pub low_balance_threshold: Option<Option<i64>>,
}

/// A field of a partial update: `None` leaves it, `Some(None)` clears it, `Some(Some(v))` sets it.
type Change = Option<Option<String>>;

/// Tells "absent" (outer `None`) from "null" (`Some(None)`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Change, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// As [`present`], for a whole number.
fn present_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    Option::<i64>::deserialize(d).map(Some)
}

/// A checked update: each field `None` to leave it, `Some(None)` to clear it.
struct Checked {
    display_name: Change,
    avatar_url: Change,
    low_balance_threshold: Option<Option<i32>>,
}

impl ProfileUpdate {
    fn check(self) -> Result<Checked, ApiError> {
        let mut errors = Vec::new();
        // Checked as given; stored trimmed, and a blank name clears it.
        if let Some(Some(name)) = &self.display_name {
            check_line(
                &mut errors,
                "display_name",
                name,
                limits::DISPLAY_NAME_CHARS,
            );
        }
        let display_name = self
            .display_name
            .map(|v| v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()));
        if let Some(Some(url)) = &self.avatar_url
            && (!is_http_url(url) || url.chars().count() > limits::URL_CHARS)
        {
            errors.push(FieldError::new(
                "avatar_url",
                format!(
                    "must be an http(s) URL of at most {} characters",
                    limits::URL_CHARS
                ),
            ));
        }
        let avatar_url = self.avatar_url;
        let low_balance_threshold = match self.low_balance_threshold {
            Some(Some(n)) if !(0..=limits::LOW_BALANCE_THRESHOLD_MAX).contains(&n) => {
                errors.push(FieldError::new(
                    "low_balance_threshold",
                    format!(
                        "must be a whole number from 0 to {}, or null",
                        limits::LOW_BALANCE_THRESHOLD_MAX
                    ),
                ));
                None
            }
            other => other.map(|v| v.map(|n| n as i32)),
        };
        if errors.is_empty() {
            Ok(Checked {
                display_name,
                avatar_url,
                low_balance_threshold,
            })
        } else {
            Err(ApiError::Validation(errors))
        }
    }
}

/// Changes the caller's display name, avatar or low balance threshold. Other fields are not the
/// user's to change.
#[utoipa::path(
    patch,
    path = "/v1/me",
    tag = "profile",
    security(("bearer" = [])),
    request_body = ProfileUpdate,
    responses(
        (status = 200, body = Profile),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid or unknown field (`validation_failed`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn patch_me(
    State(state): State<AppState>,
    user: AuthUser,
    body: ApiJson<ProfileUpdate>,
) -> ApiResult<Json<Profile>> {
    let Checked {
        display_name,
        avatar_url,
        low_balance_threshold,
    } = body.value.check()?;
    // As the user: RLS and the column privileges are what allow this update.
    let (set_name, set_avatar, set_threshold) = (
        display_name.is_some(),
        avatar_url.is_some(),
        low_balance_threshold.is_some(),
    );
    let row = sqlx::query_as!(
        ProfileRow,
        r#"select p.id as "id!", p.email, p.display_name, p.avatar_url, b.credits as "credits!",
                  p.is_admin as "is_admin!", a.views_today as "views_today!",
                  a.daily_limit as "daily_limit!", a.views_remaining as "views_remaining!",
                  a.resets_at as "resets_at!", p.subscription_status, p.subscription_plan,
                  p.subscription_current_period_end, p.low_balance_threshold,
                  p.created_at as "created_at!", p.updated_at as "updated_at!",
                  b.available as "available!", b.held as "held!", b.paid as "paid!",
                  b.promotional as "promotional!", b.expiring as "expiring!"
             from public.update_profile_as_user($1, $2, $3, $4, $5, $6, $7) p
            cross join lateral public.ad_allowance(p.ad_views_date, p.ad_views_today) a
            cross join lateral public.credit_balance(p.id) b"#,
        &*user.claims,
        set_name,
        display_name.flatten(),
        set_avatar,
        avatar_url.flatten(),
        set_threshold,
        low_balance_threshold.flatten(),
    )
    .fetch_optional(&state.pool)
    .await?;
    Ok(Json(row.ok_or(ApiError::ProfileNotFound)?.into()))
}
