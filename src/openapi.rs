//! The OpenAPI document's frame: title, tags and the bearer scheme. Its paths and schemas come
//! from the handlers' own annotations, gathered by `router::openapi()`, so it cannot drift from
//! the code.

use serde_json::{Map, Value, json};
use utoipa::Modify;
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

use crate::limits;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Amethyst credits",
        description = "Credits for Amethyst: balances and history, spending, rewarded ads, \
                       credit packs, and admin tools. Errors are RFC 9457 problem documents \
                       with a stable `code`.",
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "profile", description = "The signed-in user's profile"),
        (name = "credits", description = "Balances, history, spending and the pack catalogue"),
        (name = "holds", description = "Credits reserved for image generations: reserve, capture, release (service_role key or an admin's token)"),
        (name = "ads", description = "Rewarded ads: ad sessions, AdMob's server-side verification callback, and views on the client's word (development only)"),
        (name = "images", description = "The signed-in user's images"),
        (name = "stripe", description = "Stripe webhooks (signed with the endpoint's secret)"),
        (name = "admin", description = "Admin tools (service_role key or an admin's token)"),
        (name = "operations", description = "Health, readiness and metrics"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.bearer_format = Some("JWT".to_owned());
        scheme.description = Some(
            "A Supabase access token, or the project's service_role key on admin routes".to_owned(),
        );
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The document's frame, before the routes are added.
pub fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// Makes the generated document exact: what the layers answer on every route (401 and 403
/// where a token is needed, 422 where there is input, 413 for bodies, 429 past the rate
/// limit, 503 when the database or the time limit fails), and the constraints that validation
/// enforces but the handlers' types cannot say (lengths from [`crate::limits`], the forms of
/// free text, a non-zero amount, the `Idempotency-Key` header).
pub fn exact(mut doc: Value) -> Value {
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for operation in item.values_mut().filter_map(Value::as_object_mut) {
                add_layer_responses(path, operation);
                if let Some(parameters) = operation
                    .get_mut("parameters")
                    .and_then(Value::as_array_mut)
                {
                    for parameter in parameters {
                        constrain_parameter(path, parameter);
                    }
                }
            }
        }
    }
    if let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        for (schema, field, constraint) in FIELD_CONSTRAINTS {
            if let Some(property) = schemas
                .get_mut(*schema)
                .and_then(|s| s.pointer_mut(&format!("/properties/{field}")))
                .and_then(Value::as_object_mut)
            {
                constraint.apply(property);
            }
        }
    }
    doc
}

fn problem(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    })
}

fn add_layer_responses(path: &str, operation: &mut Map<String, Value>) {
    let has_token = operation
        .get("security")
        .and_then(Value::as_array)
        .is_some_and(|s| !s.is_empty());
    let has_body = operation.contains_key("requestBody");
    let has_parameters = operation
        .get("parameters")
        .and_then(Value::as_array)
        .is_some_and(|p| !p.is_empty());
    let Some(responses) = operation
        .entry("responses")
        .or_insert_with(|| json!({}))
        .as_object_mut()
    else {
        return;
    };
    let mut add = |status: &str, description: &str| {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| problem(description));
    };
    if has_token {
        add(
            "401",
            "No token, or a token that is malformed, badly signed or expired (`invalid_token`)",
        );
        add(
            "403",
            "The token is valid but not for this route (`forbidden`)",
        );
    }
    if has_body {
        add("413", "The body is too large (`payload_too_large`)");
    }
    if has_body || has_parameters {
        add(
            "422",
            "The input is not valid (`validation_failed`, with the fields at fault)",
        );
    }
    if path.starts_with("/v1/") && !path.starts_with("/v1/webhooks/") {
        add(
            "429",
            "Past the caller's rate limit (`rate_limited`), with Retry-After",
        );
    }
    if path != "/health" {
        add(
            "503",
            "The database is unavailable or the request took too long (`unavailable`), with \
             Retry-After; retry",
        );
        // `unavailable` says when to retry; `stripe_not_configured`, on the Stripe routes,
        // does not, so the header is not required. `/ready`'s 503 is a probe's answer.
        if let Some(unavailable) = responses
            .get_mut("503")
            .and_then(Value::as_object_mut)
            .filter(|_| path != "/ready")
        {
            unavailable.entry("headers").or_insert_with(|| {
                json!({"Retry-After": {
                    "description": "Seconds to wait before retrying (`unavailable`)",
                    "schema": {"type": "integer", "minimum": 1}
                }})
            });
        }
    }
}

fn constrain_parameter(path: &str, parameter: &mut Value) {
    let name = parameter
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let constraint = match (path, name) {
        (_, "Idempotency-Key") => Constraint {
            min_length: Some(1),
            max_length: Some(limits::IDEMPOTENCY_KEY_CHARS),
            pattern: Some(IDEMPOTENCY_KEY),
            ..Constraint::NONE
        },
        (_, "email") => Constraint::text(limits::EMAIL_CHARS, LINE),
        // AdMob's callback: each value one line, the signature URL-safe base64.
        ("/v1/ads/admob/ssv", "transaction_id") => Constraint {
            min_length: Some(1),
            ..Constraint::text(limits::ADMOB_PARAM_CHARS, ADMOB_VALUE_NOT_EMPTY)
        },
        ("/v1/ads/admob/ssv", "signature") => Constraint {
            min_length: Some(1),
            ..Constraint::text(limits::ADMOB_PARAM_CHARS, "^[A-Za-z0-9_-]+=*$")
        },
        (
            "/v1/ads/admob/ssv",
            "ad_network" | "ad_unit" | "custom_data" | "reward_amount" | "reward_item" | "user_id",
        ) => Constraint::text(limits::ADMOB_PARAM_CHARS, ADMOB_VALUE),
        _ => return,
    };
    if let Some(schema) = parameter.get_mut("schema").and_then(Value::as_object_mut) {
        constraint.apply(schema);
    }
}

/// Free text: anything but control characters, a line feed excepted.
const TEXT: &str = "^[^\\u0000-\\u0009\\u000B-\\u001F\\u007F-\\u009F]*$";
/// Free text with at least one character that is not white space. (White space is spelled out
/// as Rust's `char::is_whitespace` has it: regex dialects disagree on `\s`.)
const TEXT_NOT_BLANK: &str = "^[^\\u0000-\\u0009\\u000B-\\u001F\\u007F-\\u009F]*[^ \\u0000-\\u001F\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000][^\\u0000-\\u0009\\u000B-\\u001F\\u007F-\\u009F]*$";
/// One line: no control characters at all.
const LINE: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$";
/// An AdMob callback value: one line without `&` (which would change the signed text's pairs).
const ADMOB_VALUE: &str = "^[^&\\u0000-\\u001F\\u007F-\\u009F]*$";
/// The same, at least one character.
const ADMOB_VALUE_NOT_EMPTY: &str = "^[^&\\u0000-\\u001F\\u007F-\\u009F]+$";
/// One line with at least one character that is not white space.
const LINE_NOT_BLANK: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^ \\u0000-\\u001F\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000][^\\u0000-\\u001F\\u007F-\\u009F]*$";
/// An http(s) URL without white space or control characters.
const HTTP_URL: &str = "^https?://[^ \\u0000-\\u001F\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]+$";
/// Visible ASCII.
const IDEMPOTENCY_KEY: &str = "^[!-~]+$";

struct Constraint {
    min_length: Option<usize>,
    max_length: Option<usize>,
    pattern: Option<&'static str>,
    minimum: Option<i64>,
    maximum: Option<i64>,
    not_zero: bool,
}

impl Constraint {
    const NONE: Constraint = Constraint {
        min_length: None,
        max_length: None,
        pattern: None,
        minimum: None,
        maximum: None,
        not_zero: false,
    };

    const fn text(max_length: usize, pattern: &'static str) -> Self {
        Constraint {
            max_length: Some(max_length),
            pattern: Some(pattern),
            ..Constraint::NONE
        }
    }

    const fn range(minimum: i64, maximum: i64) -> Self {
        Constraint {
            minimum: Some(minimum),
            maximum: Some(maximum),
            ..Constraint::NONE
        }
    }

    fn apply(&self, schema: &mut Map<String, Value>) {
        if let Some(n) = self.min_length {
            schema.insert("minLength".into(), n.into());
        }
        if let Some(n) = self.max_length {
            schema.insert("maxLength".into(), n.into());
        }
        if let Some(p) = self.pattern {
            schema.insert("pattern".into(), p.into());
        }
        if let Some(n) = self.minimum {
            schema.insert("minimum".into(), n.into());
        }
        if let Some(n) = self.maximum {
            schema.insert("maximum".into(), n.into());
        }
        if self.not_zero {
            schema.insert("not".into(), json!({"const": 0}));
        }
    }
}

/// What validation enforces on request fields, by schema and property.
const FIELD_CONSTRAINTS: &[(&str, &str, Constraint)] = &[
    (
        "HoldRequest",
        "reference",
        Constraint::text(limits::REFERENCE_CHARS, TEXT),
    ),
    (
        "HoldRequest",
        "description",
        Constraint::text(limits::DESCRIPTION_CHARS, TEXT),
    ),
    (
        "CaptureRequest",
        "description",
        Constraint::text(limits::DESCRIPTION_CHARS, TEXT),
    ),
    (
        "SpendRequest",
        "amount",
        Constraint::range(1, limits::SPEND_MAX),
    ),
    (
        "SpendRequest",
        "description",
        Constraint::text(limits::DESCRIPTION_CHARS, TEXT),
    ),
    (
        "SpendRequest",
        "reference",
        Constraint::text(limits::REFERENCE_CHARS, TEXT),
    ),
    (
        "AdViewRequest",
        "duration_seconds",
        Constraint::range(0, limits::AD_DURATION_MAX),
    ),
    (
        "AdViewRequest",
        "ad_unit_id",
        Constraint::text(limits::AD_UNIT_CHARS, TEXT),
    ),
    (
        "AdViewRequest",
        "provider",
        Constraint::text(limits::AD_PROVIDER_CHARS, TEXT),
    ),
    (
        "AdSessionRequest",
        "ad_unit_id",
        Constraint::text(limits::AD_UNIT_CHARS, TEXT),
    ),
    (
        "AdSessionRequest",
        "provider",
        Constraint::text(limits::AD_PROVIDER_CHARS, TEXT),
    ),
    (
        "AdSessionCompletion",
        "duration_seconds",
        Constraint::range(0, limits::AD_DURATION_MAX),
    ),
    (
        "ProfileUpdate",
        "display_name",
        Constraint::text(limits::DISPLAY_NAME_CHARS, LINE),
    ),
    (
        "ProfileUpdate",
        "avatar_url",
        Constraint::text(limits::URL_CHARS, HTTP_URL),
    ),
    (
        "ProfileUpdate",
        "low_balance_threshold",
        Constraint::range(0, limits::LOW_BALANCE_THRESHOLD_MAX),
    ),
    (
        "AdjustRequest",
        "amount",
        Constraint {
            not_zero: true,
            ..Constraint::range(-limits::ADJUST_MAX, limits::ADJUST_MAX)
        },
    ),
    (
        "AdjustRequest",
        "reason",
        Constraint::text(limits::DESCRIPTION_CHARS, TEXT_NOT_BLANK),
    ),
    (
        "PackRequest",
        "name",
        Constraint::text(limits::PACK_NAME_CHARS, LINE_NOT_BLANK),
    ),
    (
        "PackRequest",
        "credits",
        Constraint::range(1, limits::PACK_CREDITS_MAX),
    ),
    (
        "PackRequest",
        "unit_amount",
        Constraint::range(0, limits::PACK_UNIT_AMOUNT_MAX),
    ),
    (
        "PackRequest",
        "currency",
        Constraint::text(3, "^[A-Za-z]{3}$"),
    ),
    (
        "PackRequest",
        "stripe_price_id",
        Constraint::text(limits::STRIPE_ID_CHARS, "^price_[A-Za-z0-9_]*$"),
    ),
    (
        "StripeEvent",
        "id",
        Constraint {
            min_length: Some(1),
            ..Constraint::text(limits::STRIPE_ID_CHARS, "^[A-Za-z0-9_]+$")
        },
    ),
    (
        "StripeEvent",
        "type",
        Constraint {
            min_length: Some(1),
            ..Constraint::text(limits::STRIPE_ID_CHARS, "^[a-z0-9._]+$")
        },
    ),
    (
        "StripeEvent",
        "created",
        Constraint::range(0, 253_402_300_799),
    ),
    (
        "StripeEvent",
        "api_version",
        Constraint::text(limits::STRIPE_ID_CHARS, "^[!-~]*$"),
    ),
    (
        "CheckoutRequest",
        "success_url",
        Constraint::text(limits::URL_CHARS, HTTP_URL),
    ),
    (
        "CheckoutRequest",
        "cancel_url",
        Constraint::text(limits::URL_CHARS, HTTP_URL),
    ),
];
