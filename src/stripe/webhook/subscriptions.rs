//! Subscriptions and their invoices: `customer.subscription.*` keep the profile's subscription
//! current (an older event never overwrites a newer one); each `invoice.paid` of a
//! subscription's first or renewal invoice grants the plan's credits, once per invoice (an
//! invoice that paid 0 only if the plan grants when free). Both
//! Stripe's classic shapes and those of API versions from 2025-03-31 are read.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{
    Failure, Handled, Outcome, StripeEvent, StripeList, clamp, id_of, object, remember_customer,
    user_from,
};
use crate::stripe_api::StripeClient;
use crate::telemetry;

/// The payment intent and charge that paid an invoice, or why they could not be found.
pub(super) type PaymentLink = Result<(Option<String>, Option<String>), String>;

/// For a paid subscription invoice that does not name its payment (API versions from
/// 2025-03-31), the payment Stripe lists for it. Without it a later refund of the invoice could
/// not take its credits back, so a failed lookup is worth Stripe's retry. None when there is
/// nothing to look up, or no key to look it up with.
pub(super) async fn look_up_payment(
    stripe: Option<&StripeClient>,
    event: &StripeEvent,
) -> Option<PaymentLink> {
    if event.kind != "invoice.paid" {
        return None;
    }
    let invoice: InvoiceObject = object(event).ok()?;
    if !invoice.grants_credits() || invoice.amount_paid <= 0 || invoice.payment_link().is_some() {
        return None;
    }
    let stripe = stripe?;
    Some(match stripe.invoice_payment(&invoice.id).await {
        // Invoice payments name the payment intent; its charge is asked for too, so that a
        // dispute naming only the charge finds the grant. Without it the grant still stands.
        Ok(Some((Some(intent), None))) => {
            let charge = stripe
                .payment_intent_charge(&intent)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(invoice = %invoice.id, error = %e, "could not look up the charge of this invoice's payment");
                    None
                });
            Ok((Some(intent), charge))
        }
        Ok(Some(link)) => Ok(link),
        Ok(None) => Err(format!(
            "Stripe lists no paid payment for invoice {} yet",
            invoice.id
        )),
        Err(e) => Err(format!(
            "could not look up the payment of invoice {}: {e}",
            invoice.id
        )),
    })
}

#[derive(Debug, Deserialize)]
pub(super) struct SubscriptionObject {
    id: String,
    customer: Option<Value>,
    status: String,
    #[serde(default)]
    metadata: HashMap<String, String>,
    items: Option<StripeList<SubscriptionItem>>,
    /// Where API versions before 2025-03-31 put it.
    current_period_end: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct SubscriptionItem {
    price: Option<Value>,
    /// Where API versions from 2025-03-31 put it.
    current_period_end: Option<i64>,
}

/// The user a subscription or invoice belongs to: the metadata set at checkout, else the
/// profile that holds the Stripe customer.
async fn subscriber(
    conn: &mut PgConnection,
    metadata_user: Option<Uuid>,
    customer: Option<&str>,
) -> Result<Uuid, Failure> {
    if let Some(user) = metadata_user {
        return Ok(user);
    }
    let Some(customer) = customer else {
        return Err(Failure::Permanent(
            "no user in metadata and no customer".to_owned(),
        ));
    };
    let user = sqlx::query_scalar!(
        "select id from public.profiles where stripe_customer_id = $1",
        customer
    )
    .fetch_optional(&mut *conn)
    .await?;
    user.ok_or_else(|| Failure::Retry(format!("no profile holds Stripe customer {customer}")))
}

pub(super) async fn subscription_changed(
    conn: &mut PgConnection,
    event: &StripeEvent,
    sub: SubscriptionObject,
) -> Outcome {
    let customer = id_of(&sub.customer);
    let user = subscriber(
        conn,
        user_from(sub.metadata.get("user_id")),
        customer.as_deref(),
    )
    .await?;
    let items = sub.items.map(|l| l.data).unwrap_or_default();
    let price = items.iter().find_map(|i| id_of(&i.price));
    let period_end = sub
        .current_period_end
        .or_else(|| items.iter().find_map(|i| i.current_period_end));
    let plan: Option<Uuid> = match &price {
        Some(price) => {
            sqlx::query_scalar!(
                "select id from public.credit_packs where stripe_price_id = $1",
                price
            )
            .fetch_optional(&mut *conn)
            .await?
        }
        None => None,
    }
    .or_else(|| user_from(sub.metadata.get("pack_id")));
    let event_at = event
        .created
        .and_then(|c| DateTime::<Utc>::from_timestamp(c, 0))
        .unwrap_or_else(Utc::now);
    let status = if event.kind == "customer.subscription.deleted" {
        "canceled".to_owned()
    } else {
        sub.status
    };

    if let Some(customer) = &customer {
        remember_customer(conn, user, customer).await?;
    }
    // Older events never overwrite newer state, and the end of a previous subscription does not
    // cancel the one that replaced it.
    sqlx::query!(
        "update public.profiles p
            set stripe_subscription_id = $2, subscription_status = $3, subscription_plan = $4,
                subscription_current_period_end = $5, stripe_subscription_event_at = $6
          where p.id = $1
            and (p.stripe_subscription_event_at is null or p.stripe_subscription_event_at <= $6)
            and not ($7 and p.stripe_subscription_id is not null
                     and p.stripe_subscription_id <> $2)",
        user,
        &sub.id,
        &status,
        plan.map(|p| p.to_string()),
        period_end.and_then(|e| DateTime::<Utc>::from_timestamp(e, 0)),
        event_at,
        event.kind == "customer.subscription.deleted",
    )
    .execute(&mut *conn)
    .await?;
    Ok(Handled::Processed)
}

#[derive(Debug, Deserialize)]
pub(super) struct InvoiceObject {
    id: String,
    customer: Option<Value>,
    billing_reason: Option<String>,
    #[serde(default)]
    amount_paid: i64,
    /// The invoice's total after discounts, before the customer's balance is applied: 0 for a
    /// trial or a full discount, more when the balance paid it.
    total: Option<i64>,
    currency: Option<String>,
    /// Before 2025-03-31: the subscription, charge and payment intent sit on the invoice.
    subscription: Option<Value>,
    charge: Option<Value>,
    payment_intent: Option<Value>,
    subscription_details: Option<Value>,
    /// From 2025-03-31: `parent.subscription_details` and `payments`.
    parent: Option<Value>,
    payments: Option<Value>,
    lines: Option<StripeList<Value>>,
}

impl InvoiceObject {
    fn subscription_details(&self) -> Option<&Value> {
        self.parent
            .as_ref()
            .and_then(|p| p.get("subscription_details"))
            .filter(|d| d.is_object())
            .or(self.subscription_details.as_ref().filter(|d| d.is_object()))
    }

    fn subscription_id(&self) -> Option<String> {
        id_of(&self.subscription).or_else(|| {
            id_of(
                &self
                    .subscription_details()
                    .and_then(|d| d.get("subscription"))
                    .cloned(),
            )
        })
    }

    fn metadata(&self, key: &str) -> Option<String> {
        self.subscription_details()
            .and_then(|d| d.get("metadata"))
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    /// Price ids of the invoice's lines: `price` before 2025-03-31, `pricing.price_details.price` after.
    fn price_ids(&self) -> Vec<String> {
        let lines = self
            .lines
            .as_ref()
            .map(|l| l.data.as_slice())
            .unwrap_or_default();
        lines
            .iter()
            .filter_map(|line| {
                id_of(&line.get("price").cloned())
                    .or_else(|| id_of(&line.pointer("/pricing/price_details/price").cloned()))
                    .or_else(|| id_of(&line.get("plan").cloned()))
            })
            .collect()
    }

    /// The payment intent and charge the invoice itself names, if any (classic fields, or an
    /// expanded `payments` list).
    fn payment_link(&self) -> Option<(Option<String>, Option<String>)> {
        let intent = id_of(&self.payment_intent).or_else(|| self.first_payment("payment_intent"));
        let charge = id_of(&self.charge).or_else(|| self.first_payment("charge"));
        (intent.is_some() || charge.is_some()).then_some((intent, charge))
    }

    /// The end of the period the invoice pays for: the latest `period.end` of its lines.
    fn paid_until(&self) -> Option<DateTime<Utc>> {
        self.lines
            .as_ref()
            .map(|l| l.data.as_slice())
            .unwrap_or_default()
            .iter()
            .filter_map(|line| line.pointer("/period/end").and_then(Value::as_i64))
            .max()
            .and_then(|end| DateTime::<Utc>::from_timestamp(end, 0))
    }

    /// Whether this invoice grants credits (a subscription's first or renewal invoice).
    fn grants_credits(&self) -> bool {
        matches!(
            self.billing_reason.as_deref(),
            Some("subscription_create" | "subscription_cycle")
        )
    }

    fn first_payment(&self, field: &str) -> Option<String> {
        self.payments
            .as_ref()
            .and_then(|p| p.get("data"))
            .and_then(Value::as_array)
            .and_then(|data| {
                data.iter()
                    .find_map(|p| id_of(&p.pointer(&format!("/payment/{field}")).cloned()))
            })
    }
}

pub(super) async fn invoice_paid(
    conn: &mut PgConnection,
    event: &StripeEvent,
    invoice: InvoiceObject,
    payment_link: &Option<PaymentLink>,
) -> Outcome {
    if !invoice.grants_credits() {
        return Ok(Handled::Processed);
    }
    if invoice.subscription_id().is_none() {
        return Err(Failure::Permanent(format!(
            "invoice {} names no subscription",
            invoice.id
        )));
    }
    let customer = id_of(&invoice.customer);
    let user = subscriber(
        conn,
        invoice
            .metadata("user_id")
            .as_ref()
            .and_then(|u| Uuid::parse_str(u).ok()),
        customer.as_deref(),
    )
    .await?;
    let prices = invoice.price_ids();
    let pack = sqlx::query!(
        "select id, credits, name from public.credit_packs
          where kind = 'subscription' and stripe_price_id = any ($1)
          order by credits desc limit 1",
        &prices
    )
    .fetch_optional(&mut *conn)
    .await?
    .map(|r| (r.id, r.credits, r.name));
    let pack = match pack {
        Some(pack) => pack,
        None => {
            let by_metadata = invoice
                .metadata("pack_id")
                .and_then(|p| Uuid::parse_str(&p).ok());
            match by_metadata {
                Some(id) => sqlx::query!(
                    "select id, credits, name from public.credit_packs where id = $1",
                    id
                )
                .fetch_optional(&mut *conn)
                .await?
                .map(|r| (r.id, r.credits, r.name))
                .ok_or_else(|| {
                    Failure::Retry(format!(
                        "no credit pack sells the prices of invoice {}",
                        invoice.id
                    ))
                })?,
                None => {
                    return Err(Failure::Retry(format!(
                        "no credit pack sells the prices of invoice {}",
                        invoice.id
                    )));
                }
            }
        }
    };
    if let Some(customer) = &customer {
        remember_customer(conn, user, customer).await?;
    }
    let (payment_intent, charge) = match invoice.payment_link() {
        Some(link) => link,
        // Nothing was charged (a trial, a full discount, or the customer's balance paid it): no
        // payment to know.
        None if invoice.amount_paid <= 0 => (None, None),
        None => match payment_link {
            Some(Ok(link)) => link.clone(),
            Some(Err(why)) => return Err(Failure::Retry(why.clone())),
            None => {
                tracing::warn!(
                    invoice = %invoice.id,
                    "this invoice's payment is unknown (STRIPE_SECRET_KEY is not set): its refunds will not take credits back"
                );
                (None, None)
            }
        },
    };
    let outcome = sqlx::query_scalar!(
        r#"select public.stripe_grant('invoice', $1, $2, $3, $4, $5, $6, $7, $8, 'subscription',
                                      $9, $10, $11, $12) as "outcome!""#,
        &invoice.id,
        user,
        pack.0,
        pack.1,
        clamp(invoice.amount_paid),
        invoice.currency.as_deref(),
        payment_intent,
        charge,
        format!("Subscription: {}", pack.2),
        &event.id,
        // Free when the invoice cost nothing, not when the customer's balance paid it.
        invoice.total.map(|total| total <= 0),
        // The credits last as long as the period paid for.
        invoice.paid_until(),
    )
    .fetch_one(&mut *conn)
    .await?;
    match outcome.as_str() {
        "granted" => telemetry::credits_granted("subscription", i64::from(pack.1)),
        "free_not_granted" => tracing::info!(
            invoice = %invoice.id,
            pack = %pack.0,
            "this invoice paid 0 (a trial or a full discount) and its plan does not grant when free: nothing granted"
        ),
        _ => {}
    }
    Ok(Handled::Processed)
}
