//! Every size limit of the API, in one place. Validation, the OpenAPI document and the
//! database's CHECK constraints agree with these numbers; `tests/validation.rs` compares the
//! constraints of a migrated database with them, so a change here that forgets the schema
//! (or the reverse) fails a test.

/// Request bodies on ordinary routes, in bytes.
pub const BODY_BYTES: usize = 64 * 1024;
/// Stripe webhook bodies, in bytes.
pub const WEBHOOK_BODY_BYTES: usize = 1024 * 1024;

/// Credits in one spend.
pub const SPEND_MAX: i64 = 1_000_000;
/// Credits in one admin adjustment, either way.
pub const ADJUST_MAX: i64 = 1_000_000_000;
/// Credits a pack grants.
pub const PACK_CREDITS_MAX: i64 = 1_000_000;
/// A pack's price in the currency's smallest unit.
pub const PACK_UNIT_AMOUNT_MAX: i64 = 99_999_999;
/// Seconds of an ad view.
pub const AD_DURATION_MAX: i64 = 86_400;

/// Characters of a ledger description (spends, admin reasons).
pub const DESCRIPTION_CHARS: usize = 500;
/// Characters of a caller's reference.
pub const REFERENCE_CHARS: usize = 255;
/// Characters of an ad unit id.
pub const AD_UNIT_CHARS: usize = 255;
/// Characters of an ad network's name.
pub const AD_PROVIDER_CHARS: usize = 255;
/// Characters of one parameter of an AdMob callback (and bytes of its whole query string).
pub const ADMOB_PARAM_CHARS: usize = 1024;
pub const ADMOB_QUERY_BYTES: usize = 8192;
/// Characters of a display name.
pub const DISPLAY_NAME_CHARS: usize = 100;
/// The largest low balance threshold a user may set (the migration's check says the same).
pub const LOW_BALANCE_THRESHOLD_MAX: i64 = 1_000_000;
/// Characters of an avatar URL, and of a checkout redirect URL.
pub const URL_CHARS: usize = 2048;
/// Characters of a pack name.
pub const PACK_NAME_CHARS: usize = 100;
/// Characters of an email search.
pub const EMAIL_CHARS: usize = 320;
/// Characters of a Stripe id (prices, events, objects).
pub const STRIPE_ID_CHARS: usize = 255;
/// Characters of an `Idempotency-Key`.
pub const IDEMPOTENCY_KEY_CHARS: usize = 255;

/// Items in one page of a list, and the default.
pub const PAGE_MAX: i64 = 100;
pub const PAGE_DEFAULT: i64 = 20;
/// Days of admin statistics, and the default.
pub const STATS_DAYS_MAX: i32 = 366;
pub const STATS_DAYS_DEFAULT: i32 = 30;

/// The largest hold, in credits.
pub const HOLD_MAX: i64 = 1_000_000;
/// A hold's lifetime, in seconds: at most a day, ten minutes unless said.
pub const HOLD_TTL_MAX: i64 = 86_400;
pub const HOLD_TTL_DEFAULT: i64 = 600;
/// A credit source's priority (lower is spent first) and the days before its lots expire.
pub const SOURCE_PRIORITY_MAX: i64 = 1_000;
pub const SOURCE_EXPIRY_DAYS_MAX: i64 = 36_500;
