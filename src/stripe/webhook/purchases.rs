//! Purchases: a paid Checkout Session of a one-time pack grants the pack's credits, once per
//! session, whichever of `checkout.session.completed` and `…async_payment_succeeded` comes
//! first. A session that paid 0 grants only if its pack grants when free. The grant records
//! the charge that paid it, asked of Stripe beforehand, so that a dispute naming only the
//! charge finds it.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{
    Failure, Handled, Outcome, StripeEvent, clamp, id_of, object, remember_customer, user_from,
};
use crate::stripe_api::StripeClient;
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

impl CheckoutSessionObject {
    /// Whether the payment is done: Stripe has the money, or there was none to take.
    fn is_paid(&self) -> bool {
        matches!(
            self.payment_status.as_deref(),
            Some("paid" | "no_payment_required")
        )
    }

    /// What the buyer paid; 0 when no payment was required, None when Stripe did not say.
    fn amount_paid(&self) -> Option<i32> {
        if self.payment_status.as_deref() == Some("no_payment_required") {
            return Some(0);
        }
        self.amount_total.map(clamp)
    }
}

/// For a paid one-time Checkout Session, the charge of its payment intent. Nice to have: a
/// purchase never waits on it, so without a key, or when Stripe cannot answer, the grant goes
/// ahead without the charge.
pub(super) async fn look_up_charge(
    stripe: Option<&StripeClient>,
    event: &StripeEvent,
) -> Option<String> {
    if !matches!(
        event.kind.as_str(),
        "checkout.session.completed" | "checkout.session.async_payment_succeeded"
    ) {
        return None;
    }
    let session: CheckoutSessionObject = object(event).ok()?;
    if session.mode != "payment" || !session.is_paid() {
        return None;
    }
    let payment_intent = id_of(&session.payment_intent)?;
    let Some(stripe) = stripe else {
        tracing::warn!(
            session = %session.id,
            "the charge of this purchase is unknown (STRIPE_SECRET_KEY is not set): a dispute naming only the charge will not find it"
        );
        return None;
    };
    match stripe.payment_intent_charge(&payment_intent).await {
        Ok(charge) => charge,
        Err(e) => {
            tracing::warn!(
                session = %session.id,
                error = %e,
                "could not look up the charge of this purchase; granting without it"
            );
            None
        }
    }
}

pub(super) async fn checkout_paid(
    conn: &mut PgConnection,
    event: &StripeEvent,
    session: CheckoutSessionObject,
    charge: &Option<String>,
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
    // Delayed payment methods: async_payment_succeeded will follow.
    if !session.is_paid() {
        return Ok(Handled::Processed);
    }
    let pack = user_from(session.metadata.get("pack_id"));
    let (credits, pack_id, pack_name) =
        pack_credits(conn, pack, session.metadata.get("credits")).await?;
    let outcome = sqlx::query_scalar!(
        r#"select public.stripe_grant('checkout_session', $1, $2, $3, $4, $5, $6, $7, $8,
                                      'stripe', $9, $10) as "outcome!""#,
        &session.id,
        user,
        pack_id,
        credits,
        session.amount_paid(),
        session.currency.as_deref(),
        id_of(&session.payment_intent),
        charge.as_deref(),
        format!("Credit pack: {pack_name}"),
        &event.id,
    )
    .fetch_one(&mut *conn)
    .await?;
    match outcome.as_str() {
        "granted" => telemetry::credits_granted("stripe", i64::from(credits)),
        "free_not_granted" => tracing::info!(
            session = %session.id,
            pack = ?pack_id,
            "this purchase paid 0 and its pack does not grant when free: nothing granted"
        ),
        _ => {}
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
