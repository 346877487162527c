//! Credit packs, the catalogue users buy from: `GET /v1/credit-packs` (anyone) and
//! `PUT /v1/admin/credit-packs/{id}` (admins).

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::AdminCaller;
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::extract::{ApiJson, IdPath, List, check_line, is_blank};
use crate::limits;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_packs))
        .routes(routes!(put_pack))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum PackKind {
    OneTime,
    Subscription,
}

/// A pack as the catalogue shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreditPack {
    pub id: Uuid,
    pub name: String,
    pub credits: i32,
    pub kind: PackKind,
    /// Price in the currency's smallest unit (cents).
    pub unit_amount: i32,
    /// ISO 4217, lower case.
    pub currency: String,
}

/// A pack as admins manage it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AdminCreditPack {
    pub id: Uuid,
    pub name: String,
    pub credits: i32,
    pub kind: PackKind,
    pub stripe_price_id: Option<String>,
    pub unit_amount: i32,
    pub currency: String,
    pub active: bool,
    /// Whether a payment of 0 (a trial invoice, a 100 % coupon) still grants the credits.
    pub grants_when_free: bool,
    #[serde(serialize_with = "crate::timestamps::utc")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "crate::timestamps::utc")]
    pub updated_at: DateTime<Utc>,
}

/// The active packs, cheapest first.
#[utoipa::path(
    get,
    path = "/v1/credit-packs",
    tag = "credits",
    responses((status = 200, body = List<CreditPack>))
)]
pub async fn list_packs(State(state): State<AppState>) -> ApiResult<Json<List<CreditPack>>> {
    let items = sqlx::query_as!(
        CreditPack,
        r#"select id, name, credits, kind as "kind: PackKind", unit_amount, currency
             from public.credit_packs where active
            order by unit_amount, credits, id"#
    )
    .fetch_all(&state.pool)
    .await?;
    // The catalogue is short: one page, in the shape of every list.
    Ok(Json(List {
        items,
        next_cursor: None,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PackRequest {
    /// 1–100 characters.
    pub name: String,
    /// Credits granted per purchase (or per paid invoice for subscriptions), 1–1,000,000.
    pub credits: i64,
    pub kind: PackKind,
    /// The Stripe Price (`price_…`) that Checkout sells this pack with.
    pub stripe_price_id: Option<String>,
    /// Price in the smallest currency unit, 0–99,999,999.
    pub unit_amount: i64,
    /// Three-letter ISO 4217 code.
    pub currency: String,
    pub active: bool,
    /// Whether a payment of 0 (a trial invoice, a 100 % coupon) still grants the credits.
    /// Optional, false when left out.
    #[serde(default)]
    pub grants_when_free: bool,
}

/// Creates or replaces a pack.
#[utoipa::path(
    put,
    path = "/v1/admin/credit-packs/{id}",
    tag = "admin",
    security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    request_body = PackRequest,
    responses(
        (status = 200, body = AdminCreditPack),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn put_pack(
    State(state): State<AppState>,
    _admin: AdminCaller,
    IdPath(id): IdPath,
    body: ApiJson<PackRequest>,
) -> ApiResult<Json<AdminCreditPack>> {
    let p = body.value;
    let mut errors = Vec::new();
    // Checked as given; stored trimmed.
    check_line(&mut errors, "name", &p.name, limits::PACK_NAME_CHARS);
    if is_blank(&p.name) {
        errors.push(FieldError::new("name", "is required"));
    }
    let name = p.name.trim().to_owned();
    if !(1..=limits::PACK_CREDITS_MAX).contains(&p.credits) {
        errors.push(FieldError::new(
            "credits",
            format!(
                "must be a whole number from 1 to {}",
                limits::PACK_CREDITS_MAX
            ),
        ));
    }
    if let Some(price) = &p.stripe_price_id
        && !(price.starts_with("price_")
            && price.len() <= limits::STRIPE_ID_CHARS
            && price
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    {
        errors.push(FieldError::new(
            "stripe_price_id",
            "must be a Stripe Price id (price_…)",
        ));
    }
    if !(0..=limits::PACK_UNIT_AMOUNT_MAX).contains(&p.unit_amount) {
        errors.push(FieldError::new(
            "unit_amount",
            format!(
                "must be a whole number from 0 to {}",
                limits::PACK_UNIT_AMOUNT_MAX
            ),
        ));
    }
    let currency = p.currency.to_ascii_lowercase();
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_lowercase()) {
        errors.push(FieldError::new(
            "currency",
            "must be a three-letter ISO 4217 code",
        ));
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }

    let result = sqlx::query_as!(
        AdminCreditPack,
        r#"insert into public.credit_packs
             (id, name, credits, kind, stripe_price_id, unit_amount, currency, active,
              grants_when_free)
           values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
           on conflict (id) do update
              set name = excluded.name, credits = excluded.credits, kind = excluded.kind,
                  stripe_price_id = excluded.stripe_price_id, unit_amount = excluded.unit_amount,
                  currency = excluded.currency, active = excluded.active,
                  grants_when_free = excluded.grants_when_free
           returning id, name, credits, kind as "kind: PackKind", stripe_price_id, unit_amount,
                     currency, active, grants_when_free, created_at, updated_at"#,
        id,
        &name,
        p.credits as i32,
        p.kind as _,
        p.stripe_price_id.as_deref(),
        p.unit_amount as i32,
        &currency,
        p.active,
        p.grants_when_free,
    )
    .fetch_one(&state.pool)
    .await;
    match result {
        Ok(pack) => Ok(Json(pack)),
        Err(sqlx::Error::Database(e))
            if e.constraint() == Some("credit_packs_stripe_price_id_key") =>
        {
            Err(ApiError::field(
                "stripe_price_id",
                "already used by another pack",
            ))
        }
        Err(e) => Err(e.into()),
    }
}
