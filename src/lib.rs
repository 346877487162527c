//! amethyst-credits: the credits service of Amethyst, an AI image app on Supabase.
//!
//! Users earn credits by watching rewarded ads and buy them with Stripe, spend them on images,
//! and admins look up and adjust balances. The rules live in the database functions of
//! `migrations/`; this crate authenticates, validates input, calls one function and maps the
//! outcome to the REST contract.

pub mod admin;
pub mod ads;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod credits;
pub mod db;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod images;
pub mod maintenance;
pub mod openapi;
pub mod packs;
pub mod profiles;
pub mod rate_limit;
pub mod stripe;
pub mod telemetry;
pub mod verify;

pub use app::{AppState, app};
pub use config::Config;

/// The migrations of `migrations/`, embedded in the binary. Tests and the CLI share it.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
