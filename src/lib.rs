//! amethyst-credits: the credits service of Amethyst, an AI image app on Supabase.
//!
//! Users earn credits by watching rewarded ads and buy them with Stripe, spend them on images,
//! and admins look up and adjust balances. The rules live in the database functions of
//! `migrations/`; this crate authenticates, validates input, calls one function and maps the
//! outcome to the REST contract.

//!
//! Modules come in layers, and each imports only from layers below it:
//!
//! 1. plumbing: [`config`], [`limits`], [`error`], [`extract`], [`auth`], [`rate_limit`],
//!    [`idempotency`], [`db`], [`batch`] (work that arrives together shares a round trip),
//!    [`telemetry`], [`timestamps`] (how answers write them), [`openapi`] (the document's frame and what makes it exact), [`stripe_api`] (the one client of Stripe's API), [`admob_keys`] (Google's
//!    keys for AdMob's reward callbacks) and [`notifications`] (the ledger's `LISTEN`, fanned
//!    out to each user's streams);
//! 2. [`state`]: the shared state, built from the plumbing;
//! 3. features, one per capability, each owning its routes, types and SQL: [`profiles`],
//!    [`credits`], [`holds`], [`lots`], [`ads`], [`packs`], [`images`], [`admin`], [`stripe`],
//!    [`maintenance`], [`operations`], [`live_balance`]; a feature may use a feature below it
//!    (admin shows profiles and credits, the live stream sends them);
//! 4. [`router`]: the one place that knows every feature;
//! 5. [`cli`] and [`verify`]: the binary's verbs.

// 1. plumbing
pub mod admob_keys;
pub mod auth;
pub mod batch;
pub mod config;
pub mod db;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod limits;
pub mod notifications;
pub mod openapi;
pub mod rate_limit;
pub mod stripe_api;
pub mod telemetry;
pub mod timestamps;
// 2. the shared state
pub mod state;
// 3. features
pub mod admin;
pub mod ads;
pub mod credits;
pub mod holds;
pub mod images;
pub mod live_balance;
pub mod lots;
pub mod maintenance;
pub mod operations;
pub mod packs;
pub mod profiles;
pub mod stripe;
// 4. the router
pub mod router;
// 5. the verbs
pub mod cli;
pub mod verify;

pub use config::Config;
pub use db::MIGRATOR;
pub use router::{App, app};
pub use state::AppState;
