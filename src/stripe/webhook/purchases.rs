//! Purchases: a paid Checkout Session of a one-time pack grants the pack's credits, once per
//! session, whichever of `checkout.session.completed` and `…async_payment_succeeded` comes
//! first.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{Failure, Handled, Outcome, StripeEvent, clamp, id_of, remember_customer, user_from};
use crate::telemetry;

#[derive(Debug, Deserialize)]
pub(super) struct CheckoutSessionObject {
    id: String,
    mode: String,
    payment_status: Option<String>,
    client_reference_id: Option<String>,
    customer: Option<Value>,
    payment_intent: Option<Value>,
    #[serde(default)]
    metadata: HashMap<String, String>,
    amount_total: Option<i64>,
    currency: Option<String>,
}

pub(super) async fn checkout_paid(
    conn: &mut PgConnection,
    event: &StripeEvent,
    session: CheckoutSessionObject,
) -> Outcome {
    let user = user_from(session.client_reference_id.as_ref()).ok_or_else(|| {
        Failure::Permanent(format!(
            "session {} has no client_reference_id user",
            session.id
        ))
    })?;
    if let Some(customer) = id_of(&session.customer) {
        remember_customer(conn, user, &customer).await?;
    }
    // A subscription's first payment is granted by its invoice.paid, never by the session.
    if session.mode != "payment" {
        return Ok(Handled::Processed);
    }
    match session.payment_status.as_deref() {
        Some("paid" | "no_payment_required") => {}
        // Delayed payment methods: async_payment_succeeded will follow.
        _ => return Ok(Handled::Processed),
    }
    let pack = user_from(session.metadata.get("pack_id"));
    let (credits, pack_id, pack_name) =
        pack_credits(conn, pack, session.metadata.get("credits")).await?;
    let granted = sqlx::query_scalar!(
        "select public.stripe_grant('checkout_session', $1, $2, $3, $4, $5, $6, $7, null,
                                    'stripe', $8, $9)",
        &session.id,
        user,
        pack_id,
        credits,
        clamp(session.amount_total.unwrap_or(0)),
        session.currency.as_deref(),
        id_of(&session.payment_intent),
        format!("Credit pack: {pack_name}"),
        &event.id,
    )
    .fetch_one(&mut *conn)
    .await?;
    if granted.is_some() {
        telemetry::credits_granted("stripe", i64::from(credits));
    }
    Ok(Handled::Processed)
}

/// The credits a purchase grants: those promised at checkout (metadata), else the pack's.
async fn pack_credits(
    conn: &mut PgConnection,
    pack: Option<Uuid>,
    promised: Option<&String>,
) -> Result<(i32, Option<Uuid>, String), Failure> {
    let row = match pack {
        Some(id) => sqlx::query!(
            "select id, credits, name from public.credit_packs where id = $1",
            id
        )
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| (r.id, r.credits, r.name)),
        None => None,
    };
    let promised = promised
        .and_then(|c| c.parse::<i32>().ok())
        .filter(|c| *c > 0);
    match (row, promised) {
        (Some((id, _, name)), Some(credits)) => Ok((credits, Some(id), name)),
        (Some((id, credits, name)), None) => Ok((credits, Some(id), name)),
        (None, Some(credits)) => Ok((credits, None, "unknown pack".to_owned())),
        (None, None) if pack.is_none() => {
            Err(Failure::Permanent("the session names no pack".to_owned()))
        }
        (None, None) => Err(Failure::Retry(
            "the session's pack does not exist".to_owned(),
        )),
    }
}

/// A delayed payment method failed: nothing was granted, nothing is taken.
pub(super) fn checkout_failed(session: CheckoutSessionObject) -> Outcome {
    tracing::info!(session = %session.id, "a delayed Checkout payment failed; nothing granted");
    Ok(Handled::Processed)
}
