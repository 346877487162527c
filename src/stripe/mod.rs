//! Stripe: Checkout Sessions for credit packs, and the webhook that turns Stripe's events into
//! grants, take-backs and subscription state — exactly once per Stripe object; and the
//! reconciliation that hands the webhook any event Stripe could not deliver.

pub mod checkout;
pub mod reconcile;
pub mod signature;
pub mod webhook;

use axum::extract::DefaultBodyLimit;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    let webhook = OpenApiRouter::new()
        .routes(routes!(webhook::receive))
        .layer(DefaultBodyLimit::max(webhook::WEBHOOK_BODY_LIMIT_BYTES));
    OpenApiRouter::new()
        .routes(routes!(checkout::create_session))
        .merge(webhook)
}
