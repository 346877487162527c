//! Bad input on every route answers a documented 4xx, never a 5xx, and changes nothing.

mod common;

use axum::http::Method;
use base64::Engine;
use common::{TestApp, request, service_role_key};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Sends a raw body and checks the status and code.
async fn expect(
    app: &TestApp,
    method: Method,
    path: &str,
    token: &str,
    body: Option<&str>,
    status: u16,
    code: &str,
) {
    let response = app
        .send(request(
            method.clone(),
            path,
            Some(token),
            body.map(str::to_owned),
            &[],
        ))
        .await;
    assert_eq!(
        response.status.as_u16(),
        status,
        "{method} {path} {body:?}: {:?}",
        response.body
    );
    assert_eq!(response.code(), code, "{method} {path} {body:?}");
    assert_eq!(response.headers["content-type"], "application/problem+json");
}

#[sqlx::test]
async fn bad_spend_requests_are_refused_and_change_nothing(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 100).await;
    let long = "x".repeat(501);
    let huge = format!(
        r#"{{"amount": 1, "description": "{}"}}"#,
        "x".repeat(70 * 1024)
    );

    for body in [
        r#"{"amount": "#,
        r#"{"amount": "5"}"#,
        r#"{"amount": 1.5}"#,
        r#"{"amount": 0}"#,
        r#"{"amount": -5}"#,
        r#"{"amount": 1000001}"#,
        r#"{"amount": 99999999999999999999999}"#,
        r#"{"amount": null}"#,
        r#"{}"#,
        r#"[]"#,
        r#""amount""#,
        "",
        r#"{"amount": 1, "user_id": "00000000-0000-0000-0000-000000000000"}"#,
        r#"{"amount": 1, "description": 5}"#,
        &format!(r#"{{"amount": 1, "description": "{long}"}}"#),
        r#"{"amount": 1, "reference": "a\u0000b"}"#,
    ] {
        expect(
            &app,
            Method::POST,
            "/v1/credits/spend",
            &user.token,
            Some(body),
            422,
            "validation_failed",
        )
        .await;
    }
    expect(
        &app,
        Method::POST,
        "/v1/credits/spend",
        &user.token,
        Some(&huge),
        413,
        "payload_too_large",
    )
    .await;

    let field = app
        .post(
            "/v1/credits/spend",
            Some(&user.token),
            json!({"amount": "5"}),
        )
        .await;
    assert_eq!(field.body["errors"][0]["field"], "amount");

    assert_eq!(app.balance(user.id).await, 100);
    assert_eq!(
        app.count(
            "select count(*) from public.credit_transactions where user_id = $1",
            user.id
        )
        .await,
        1
    );
}

#[sqlx::test]
async fn bad_ad_views_are_refused_and_not_counted(_pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::client_ads(connect).await;
    let user = app.user().await;
    let long = "p".repeat(amethyst_credits::limits::AD_PROVIDER_CHARS + 1);

    for body in [
        r#"{"duration_seconds": -1}"#.to_owned(),
        r#"{"duration_seconds": 86401}"#.to_owned(),
        r#"{"duration_seconds": "30"}"#.to_owned(),
        r#"{"duration_seconds": 30.5}"#.to_owned(),
        r#"{"duration_seconds": null}"#.to_owned(),
        r#"{}"#.to_owned(),
        r#"{"duration_seconds": 30, "credits": 100}"#.to_owned(),
        format!(r#"{{"duration_seconds": 30, "provider": "{long}"}}"#),
        "{not json".to_owned(),
    ] {
        expect(
            &app,
            Method::POST,
            "/v1/ads/views",
            &user.token,
            Some(&body),
            422,
            "validation_failed",
        )
        .await;
    }
    assert_eq!(
        app.count(
            "select count(*) from public.ad_views where user_id = $1",
            user.id
        )
        .await,
        0
    );
    assert_eq!(app.balance(user.id).await, 0);
}

#[sqlx::test]
async fn bad_profile_updates_are_refused(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let long = "n".repeat(101);

    for body in [
        format!(r#"{{"display_name": "{long}"}}"#),
        r#"{"display_name": 5}"#.to_owned(),
        r#"{"avatar_url": "javascript:alert(1)"}"#.to_owned(),
        r#"{"avatar_url": "https://a.example/ b.png"}"#.to_owned(),
        r#"{"email": "me@evil.example"}"#.to_owned(),
        "nope".to_owned(),
    ] {
        expect(
            &app,
            Method::PATCH,
            "/v1/me",
            &user.token,
            Some(&body),
            422,
            "validation_failed",
        )
        .await;
    }
    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.body["display_name"], serde_json::Value::Null);
    assert_eq!(me.body["email"], user.email);
}

#[sqlx::test]
async fn bad_pagination_and_forged_cursors_are_refused(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let key = service_role_key();
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let forged_number = engine.encode("c1:not-a-number");
    let forged_prefix = engine.encode("42");
    let forged_admin = engine.encode("c1:yesterday|nobody");
    let long = "A".repeat(500);

    for query in [
        "limit=0",
        "limit=101",
        "limit=abc",
        "limit=-1",
        "cursor=%%%",
        "cursor=!!!",
        &format!("cursor={forged_number}"),
        &format!("cursor={forged_prefix}"),
        &format!("cursor={long}"),
    ] {
        expect(
            &app,
            Method::GET,
            &format!("/v1/me/transactions?{query}"),
            &user.token,
            None,
            422,
            "validation_failed",
        )
        .await;
        expect(
            &app,
            Method::GET,
            &format!("/v1/admin/users/{}/transactions?{query}", user.id),
            &key,
            None,
            422,
            "validation_failed",
        )
        .await;
    }
    expect(
        &app,
        Method::GET,
        &format!("/v1/admin/users?cursor={forged_admin}"),
        &key,
        None,
        422,
        "validation_failed",
    )
    .await;
    expect(
        &app,
        Method::GET,
        "/v1/admin/users?limit=1000",
        &key,
        None,
        422,
        "validation_failed",
    )
    .await;
}

#[sqlx::test]
async fn bad_admin_requests_are_refused_and_change_nothing(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let key = service_role_key();
    let credits = format!("/v1/admin/users/{}/credits", user.id);

    expect(
        &app,
        Method::GET,
        "/v1/admin/users/not-a-uuid",
        &key,
        None,
        422,
        "validation_failed",
    )
    .await;
    expect(
        &app,
        Method::POST,
        "/v1/admin/users/not-a-uuid/credits",
        &key,
        Some(r#"{"amount": 1, "reason": "x"}"#),
        422,
        "validation_failed",
    )
    .await;
    for body in [
        r#"{"amount": 0, "reason": "nothing"}"#,
        r#"{"amount": 5}"#,
        r#"{"amount": 5, "reason": "   "}"#,
        r#"{"amount": 2000000000, "reason": "too much"}"#,
        r#"{"amount": "5", "reason": "text"}"#,
    ] {
        expect(
            &app,
            Method::POST,
            &credits,
            &key,
            Some(body),
            422,
            "validation_failed",
        )
        .await;
    }
    for days in ["0", "367", "abc", "-3"] {
        expect(
            &app,
            Method::GET,
            &format!("/v1/admin/stats?days={days}"),
            &key,
            None,
            422,
            "validation_failed",
        )
        .await;
    }
    let pack = format!("/v1/admin/credit-packs/{}", uuid::Uuid::new_v4());
    for body in [
        r#"{"name": "", "credits": 10, "kind": "one_time", "stripe_price_id": null, "unit_amount": 100, "currency": "usd", "active": true}"#,
        r#"{"name": "P", "credits": 0, "kind": "one_time", "stripe_price_id": null, "unit_amount": 100, "currency": "usd", "active": true}"#,
        r#"{"name": "P", "credits": 10, "kind": "forever", "stripe_price_id": null, "unit_amount": 100, "currency": "usd", "active": true}"#,
        r#"{"name": "P", "credits": 10, "kind": "one_time", "stripe_price_id": "prod_1", "unit_amount": 100, "currency": "usd", "active": true}"#,
        r#"{"name": "P", "credits": 10, "kind": "one_time", "stripe_price_id": null, "unit_amount": -1, "currency": "usd", "active": true}"#,
        r#"{"name": "P", "credits": 10, "kind": "one_time", "stripe_price_id": null, "unit_amount": 100, "currency": "dollars", "active": true}"#,
        r#"{"name": "P", "credits": 10, "kind": "one_time", "unit_amount": 100, "currency": "usd"}"#,
    ] {
        expect(
            &app,
            Method::PUT,
            &pack,
            &key,
            Some(body),
            422,
            "validation_failed",
        )
        .await;
    }
    expect(
        &app,
        Method::PUT,
        "/v1/admin/credit-packs/xyz",
        &key,
        Some("{}"),
        422,
        "validation_failed",
    )
    .await;

    assert_eq!(app.balance(user.id).await, 0);
    let packs: i64 = sqlx::query_scalar("select count(*) from public.credit_packs")
        .fetch_one(&app.owner)
        .await
        .unwrap();
    assert_eq!(packs, 0);
}

#[sqlx::test]
async fn a_malformed_idempotency_key_is_refused(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;
    let long = "k".repeat(256);

    for key in [long.as_str(), "", "has space"] {
        let response = app
            .send(request(
                Method::POST,
                "/v1/credits/spend",
                Some(&user.token),
                Some(r#"{"amount": 1}"#.to_owned()),
                &[("idempotency-key", key)],
            ))
            .await;
        assert_eq!(response.status, 422, "{key:?}");
        assert_eq!(response.body["errors"][0]["field"], "Idempotency-Key");
    }
    assert_eq!(app.balance(user.id).await, 10);
}

#[sqlx::test]
async fn unknown_routes_and_methods_answer_problems(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let response = app.get("/v1/nothing-here", None).await;
    assert_eq!(response.status, 404);
    assert_eq!(response.code(), "not_found");
    let user = app.user().await;
    let wrong = app
        .send(request(
            Method::DELETE,
            "/v1/me",
            Some(&user.token),
            None,
            &[],
        ))
        .await;
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.code(), "method_not_allowed");
    assert_eq!(wrong.headers["content-type"], "application/problem+json");
}

/// The largest length a CHECK constraint's definition allows `column`, when it sets one:
/// `char_length(column) <= N`, as PostgreSQL prints both `<=` and `BETWEEN`.
fn max_length(definition: &str, column: &str) -> Option<usize> {
    [
        format!("char_length({column}) <= "),
        format!("char_length(\"{column}\") <= "),
    ]
    .iter()
    .find_map(|prefix| {
        let rest = &definition[definition.find(prefix.as_str())? + prefix.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

#[sqlx::test]
async fn the_length_limits_are_the_ones_the_database_checks(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    use amethyst_credits::limits;
    let app = TestApp::new(pool, connect).await;

    let mut disagreements = Vec::new();
    for (table, column, limit) in [
        (
            "credit_transactions",
            "description",
            limits::DESCRIPTION_CHARS,
        ),
        ("credit_transactions", "reference", limits::REFERENCE_CHARS),
        ("ad_views", "ad_unit_id", limits::AD_UNIT_CHARS),
        ("ad_views", "provider", limits::AD_PROVIDER_CHARS),
        ("ad_sessions", "ad_unit_id", limits::AD_UNIT_CHARS),
        ("ad_sessions", "provider", limits::AD_PROVIDER_CHARS),
        (
            "admob_ssv_callbacks",
            "transaction_id",
            limits::ADMOB_PARAM_CHARS,
        ),
        (
            "admob_ssv_callbacks",
            "custom_data",
            limits::ADMOB_PARAM_CHARS,
        ),
        ("profiles", "display_name", limits::DISPLAY_NAME_CHARS),
        ("profiles", "avatar_url", limits::URL_CHARS),
        ("credit_packs", "name", limits::PACK_NAME_CHARS),
        ("credit_packs", "stripe_price_id", limits::STRIPE_ID_CHARS),
        ("stripe_events", "id", limits::STRIPE_ID_CHARS),
        ("stripe_events", "type", limits::STRIPE_ID_CHARS),
        ("stripe_grants", "stripe_object_id", limits::STRIPE_ID_CHARS),
        ("stripe_charges", "id", limits::STRIPE_ID_CHARS),
        ("idempotency_keys", "key", limits::IDEMPOTENCY_KEY_CHARS),
    ] {
        // The CHECK constraints of the migrated table that concern this column alone.
        let definitions: Vec<String> = sqlx::query_scalar(
            "select pg_get_constraintdef(c.oid)
               from pg_constraint c
               join pg_attribute a on a.attrelid = c.conrelid and a.attnum = any (c.conkey)
              where c.contype = 'c' and c.conrelid = ('public.' || $1)::regclass
                and a.attname = $2 and cardinality(c.conkey) = 1",
        )
        .bind(table)
        .bind(column)
        .fetch_all(&app.owner)
        .await
        .unwrap();
        let in_database: Vec<usize> = definitions
            .iter()
            .filter_map(|definition| max_length(definition, column))
            .collect();
        if in_database != [limit] {
            disagreements.push(format!(
                "{table}.{column}: limits.rs says {limit}, the database {in_database:?} ({definitions:?})"
            ));
        }
    }
    assert!(disagreements.is_empty(), "{disagreements:#?}");
}

#[sqlx::test]
async fn a_whole_number_written_with_a_decimal_point_is_a_whole_number(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;

    let spent = app
        .post(
            "/v1/credits/spend",
            Some(&user.token),
            json!({"amount": 3.0}),
        )
        .await;

    assert_eq!(spent.status, 201, "{:?}", spent.body);
    assert_eq!(spent.body["transaction"]["amount"], -3);
    assert_eq!(app.balance(user.id).await, 7);
}

#[sqlx::test]
async fn text_is_checked_as_sent_and_stored_trimmed(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;
    let key = service_role_key();
    let padded = format!("  {}  ", "n".repeat(98));

    // 102 characters as sent, 98 once trimmed: the limit applies to what was sent.
    let body = json!({"display_name": padded}).to_string();
    expect(
        &app,
        Method::PATCH,
        "/v1/me",
        &user.token,
        Some(&body),
        422,
        "validation_failed",
    )
    .await;
    let named = app
        .send(request(
            Method::PATCH,
            "/v1/me",
            Some(&user.token),
            Some(json!({"display_name": "  Ada  "}).to_string()),
            &[],
        ))
        .await;
    assert_eq!(named.body["display_name"], "Ada");

    let blank = json!({"amount": 5, "reason": " \n "}).to_string();
    let path = format!("/v1/admin/users/{}/credits", user.id);
    expect(
        &app,
        Method::POST,
        &path,
        &key,
        Some(&blank),
        422,
        "validation_failed",
    )
    .await;
    let adjusted = app
        .post(
            &path,
            Some(&key),
            json!({"amount": 5, "reason": "  goodwill  "}),
        )
        .await;
    assert_eq!(adjusted.status, 201);
    assert_eq!(adjusted.body["transaction"]["description"], "goodwill");
    assert_eq!(app.balance(user.id).await, 15);
}

#[sqlx::test]
async fn any_cursor_of_the_documented_form_is_a_position(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;

    // Below position 1 there is nothing; below a huge one, everything.
    let none = app
        .get("/v1/me/transactions?cursor=1", Some(&user.token))
        .await;
    assert_eq!(none.status, 200);
    assert_eq!(none.body["items"], json!([]));
    let all = app
        .get(
            "/v1/me/transactions?cursor=999999999999999999",
            Some(&user.token),
        )
        .await;
    assert_eq!(all.body["items"].as_array().unwrap().len(), 1);

    let images = app
        .get(
            &format!("/v1/me/images?cursor=1-{}", "0".repeat(32)),
            Some(&user.token),
        )
        .await;
    assert_eq!(images.status, 200, "{:?}", images.body);
    for query in ["cursor=1-0", "cursor=x-00000000000000000000000000000000"] {
        expect(
            &app,
            Method::GET,
            &format!("/v1/me/images?{query}"),
            &user.token,
            None,
            422,
            "validation_failed",
        )
        .await;
    }
}

#[sqlx::test]
async fn a_bad_checkout_url_is_refused_before_stripe_configuration_is_consulted(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    // The test configuration has no Stripe at all.
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let pack = uuid::Uuid::new_v4();

    let body = json!({"pack_id": pack, "success_url": "javascript:alert(1)"}).to_string();
    expect(
        &app,
        Method::POST,
        "/v1/checkout/sessions",
        &user.token,
        Some(&body),
        422,
        "validation_failed",
    )
    .await;
    let fine = json!({"pack_id": pack}).to_string();
    expect(
        &app,
        Method::POST,
        "/v1/checkout/sessions",
        &user.token,
        Some(&fine),
        503,
        "stripe_not_configured",
    )
    .await;
}

#[sqlx::test]
async fn a_signed_body_that_is_not_a_well_formed_event_is_refused_never_a_500(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app =
        TestApp::with_config(connect, common::stripe::stripe_config("http://127.0.0.1:9")).await;
    let good = common::stripe::event("evt_shape_ok", "some.event", json!({"id": "x"}));

    for (field, value) in [
        ("created", json!(1_000_000_000_000_000_i64)),
        ("created", json!(-1)),
        ("id", json!("evt bad")),
        ("type", json!("Some.Event")),
        ("api_version", json!("2025\u{0}")),
        ("data", json!({"object": [1, 2]})),
    ] {
        let mut event = good.clone();
        event[field] = value;
        let refused = app.webhook(&event).await;
        assert_eq!(refused.status, 422, "{field}: {:?}", refused.body);
    }

    // A NUL deep in the object cannot go into jsonb: it is replaced, not a 500.
    let mut nul = good.clone();
    nul["data"]["object"]["note"] = json!("a\u{0}b");
    let kept = app.webhook(&nul).await;
    assert_eq!(kept.status, 200, "{:?}", kept.body);
    let stored: String = sqlx::query_scalar(
        "select payload #>> '{data,object,note}' from public.stripe_events where id = 'evt_shape_ok'",
    )
    .fetch_one(&app.owner)
    .await
    .unwrap();
    assert_eq!(stored, "a\u{fffd}b");
}
