//! The OpenAPI document's frame: title, tags and the bearer scheme. Its paths and schemas come
//! from the handlers' own annotations, gathered by `router::openapi()`, so it cannot drift from
//! the code.

use utoipa::Modify;
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

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
        (name = "ads", description = "Rewarded ad views"),
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
