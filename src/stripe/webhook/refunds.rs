//! Refunds and disputes: the refunded or disputed share of a purchase is taken back, never
//! below a zero balance; what the balance could not cover is recorded as the grant's shortfall.
//! A dispute the merchant wins gives back what it took: the shortfall is forgiven first, the
//! rest returned to the balance. `public.stripe_record_charge` does the work under the
//! payment's lock, from cumulative amounts, so any number of deliveries in any order settle
//! once.

use serde::Deserialize;
use serde_json::Value;
use sqlx::PgConnection;

use super::{Failure, Handled, Outcome, clamp, id_of};
use crate::telemetry;

#[derive(Debug, Deserialize)]
pub(super) struct ChargeObject {
    id: String,
    amount: i64,
    amount_refunded: i64,
    payment_intent: Option<Value>,
}

pub(super) async fn charge_refunded(conn: &mut PgConnection, charge: ChargeObject) -> Outcome {
    let change = record_charge(
        conn,
        &charge.id,
        id_of(&charge.payment_intent),
        Some(clamp(charge.amount)),
        clamp(charge.amount_refunded),
        0,
        0,
    )
    .await?;
    count(change);
    Ok(Handled::Processed)
}

#[derive(Debug, Deserialize)]
pub(super) struct DisputeObject {
    id: Option<String>,
    amount: i64,
    charge: Option<Value>,
    payment_intent: Option<Value>,
    status: Option<String>,
}

impl DisputeObject {
    fn charge(&self) -> Result<String, Failure> {
        id_of(&self.charge)
            .ok_or_else(|| Failure::Permanent("the dispute names no charge".to_owned()))
    }
}

pub(super) async fn dispute_created(conn: &mut PgConnection, dispute: DisputeObject) -> Outcome {
    let charge = dispute.charge()?;
    let amount = clamp(dispute.amount);
    let change = record_charge(
        conn,
        &charge,
        id_of(&dispute.payment_intent),
        None,
        0,
        amount,
        0,
    )
    .await?;
    count(change);
    Ok(Handled::Processed)
}

/// A closed dispute: won, what it took comes back; lost, what `charge.dispute.created` took
/// stays taken and nothing changes.
pub(super) async fn dispute_closed(conn: &mut PgConnection, dispute: DisputeObject) -> Outcome {
    if dispute.status.as_deref() != Some("won") {
        tracing::info!(
            dispute = dispute.id.as_deref().unwrap_or("?"),
            status = dispute.status.as_deref().unwrap_or("?"),
            "a dispute closed without being won: nothing changes"
        );
        return Ok(Handled::Processed);
    }
    dispute_won(conn, dispute).await
}

/// Stripe returned the disputed funds: the dispute was won.
pub(super) async fn dispute_funds_reinstated(
    conn: &mut PgConnection,
    dispute: DisputeObject,
) -> Outcome {
    dispute_won(conn, dispute).await
}

/// Records the disputed amount as both disputed and reinstated: whichever of the dispute's
/// events comes first, and however often, the charge ends with nothing disputed.
async fn dispute_won(conn: &mut PgConnection, dispute: DisputeObject) -> Outcome {
    let charge = dispute.charge()?;
    let amount = clamp(dispute.amount);
    let change = record_charge(
        conn,
        &charge,
        id_of(&dispute.payment_intent),
        None,
        0,
        amount,
        amount,
    )
    .await?;
    count(change);
    Ok(Handled::Processed)
}

/// Records what Stripe said of a charge and settles the grants it paid. A null amount (a
/// dispute, which does not carry its charge's amount) is found by the function under the
/// payment's lock. Answers the change to balances.
async fn record_charge(
    conn: &mut PgConnection,
    charge: &str,
    payment_intent: Option<String>,
    amount: Option<i32>,
    refunded: i32,
    disputed: i32,
    reinstated: i32,
) -> Result<i32, Failure> {
    let change = sqlx::query_scalar!(
        r#"select public.stripe_record_charge($1, $2, $3, $4, $5, $6) as "balance_change!""#,
        charge,
        payment_intent,
        amount,
        refunded,
        disputed,
        reinstated,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(change)
}

fn count(change: i32) {
    if change < 0 {
        telemetry::credits_spent("refund", -i64::from(change));
    } else {
        // The ledger gives back under the purchase's own source (stripe or subscription); the
        // answer does not say which, and most purchases are Checkout's.
        telemetry::credits_granted("stripe", i64::from(change));
    }
}
