//! Refunds and disputes: the refunded or disputed share of a purchase is taken back, never
//! below a zero balance; what the balance could not cover is recorded as the grant's shortfall.
//! `public.stripe_record_charge` does the work under the payment's lock.

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
    let taken = sqlx::query_scalar!(
        r#"select public.stripe_record_charge($1, $2, $3, $4, 0) as "taken!""#,
        &charge.id,
        id_of(&charge.payment_intent),
        clamp(charge.amount),
        clamp(charge.amount_refunded),
    )
    .fetch_one(&mut *conn)
    .await?;
    telemetry::credits_spent("refund", i64::from(taken));
    Ok(Handled::Processed)
}

#[derive(Debug, Deserialize)]
pub(super) struct DisputeObject {
    amount: i64,
    charge: Option<Value>,
    payment_intent: Option<Value>,
}

pub(super) async fn dispute_created(conn: &mut PgConnection, dispute: DisputeObject) -> Outcome {
    let charge = id_of(&dispute.charge)
        .ok_or_else(|| Failure::Permanent("the dispute names no charge".to_owned()))?;
    // The dispute does not carry its charge's amount: the function finds it under the
    // payment's lock (a null amount says so).
    let taken = sqlx::query_scalar!(
        r#"select public.stripe_record_charge($1, $2, null, 0, $3) as "taken!""#,
        &charge,
        id_of(&dispute.payment_intent),
        clamp(dispute.amount),
    )
    .fetch_one(&mut *conn)
    .await?;
    telemetry::credits_spent("refund", i64::from(taken));
    Ok(Handled::Processed)
}
