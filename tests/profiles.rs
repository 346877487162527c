mod common;

use common::TestApp;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

#[sqlx::test]
async fn signing_up_creates_a_profile_with_no_credits(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app
        .user_with_meta(
            json!({"full_name": "Ada Lovelace", "avatar_url": "https://img.example/a.png"}),
        )
        .await;

    let me = app.get("/v1/me", Some(&user.token)).await;

    assert_eq!(me.status, 200, "{:?}", me.body);
    assert_eq!(me.headers["content-type"], "application/json");
    assert_eq!(me.body["id"], user.id.to_string());
    assert_eq!(me.body["email"], user.email);
    assert_eq!(me.body["display_name"], "Ada Lovelace");
    assert_eq!(me.body["avatar_url"], "https://img.example/a.png");
    assert_eq!(me.body["credits"], 0);
    assert_eq!(me.body["is_admin"], false);
    assert_eq!(me.body["subscription"], serde_json::Value::Null);
    assert_eq!(me.body["ads"]["views_today"], 0);
    assert_eq!(me.body["ads"]["daily_limit"], 10);
    assert_eq!(me.body["ads"]["views_remaining"], 10);
    let resets_at = me.body["ads"]["resets_at"].as_str().unwrap();
    assert!(resets_at.ends_with("T00:00:00Z"), "{resets_at}");
}

#[sqlx::test]
async fn a_user_without_a_profile_gets_profile_not_found(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let stranger = common::user_token(uuid::Uuid::new_v4(), "ghost@example.com");

    let me = app.get("/v1/me", Some(&stranger)).await;

    assert_eq!(me.status, 404);
    assert_eq!(me.code(), "profile_not_found");
}

#[sqlx::test]
async fn users_change_their_display_name_and_avatar(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;

    let patched = app
        .send(common::request(
            axum::http::Method::PATCH,
            "/v1/me",
            Some(&user.token),
            Some(
                json!({"display_name": "  Grace  ", "avatar_url": "https://cdn.example/g.webp"})
                    .to_string(),
            ),
            &[],
        ))
        .await;
    assert_eq!(patched.status, 200, "{:?}", patched.body);
    assert_eq!(patched.body["display_name"], "Grace");
    assert_eq!(patched.body["avatar_url"], "https://cdn.example/g.webp");

    // Leaving a field out keeps it; null clears it.
    let cleared = app
        .send(common::request(
            axum::http::Method::PATCH,
            "/v1/me",
            Some(&user.token),
            Some(json!({"avatar_url": null}).to_string()),
            &[],
        ))
        .await;
    assert_eq!(cleared.status, 200);
    assert_eq!(cleared.body["display_name"], "Grace");
    assert_eq!(cleared.body["avatar_url"], serde_json::Value::Null);
}

#[sqlx::test]
async fn users_cannot_patch_their_balance_or_admin_flag(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;

    for body in [
        json!({"credits": 1000}),
        json!({"is_admin": true}),
        json!({"display_name": "x", "credits": 5}),
    ] {
        let response = app
            .send(common::request(
                axum::http::Method::PATCH,
                "/v1/me",
                Some(&user.token),
                Some(body.to_string()),
                &[],
            ))
            .await;
        assert_eq!(response.status, 422, "{body}");
        assert_eq!(response.code(), "validation_failed");
    }
    assert_eq!(app.balance(user.id).await, 0);
    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.body["is_admin"], false);
    assert_eq!(me.body["display_name"], serde_json::Value::Null);
}

#[sqlx::test]
async fn profiles_of_users_who_signed_up_earlier_are_backfilled(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    // A user who exists without a profile, as before the migrations ran.
    let id = uuid::Uuid::new_v4();
    sqlx::query("alter table auth.users disable trigger on_auth_user_created")
        .execute(&app.owner)
        .await
        .unwrap();
    sqlx::query("insert into auth.users (id, email) values ($1, 'early@example.com')")
        .bind(id)
        .execute(&app.owner)
        .await
        .unwrap();
    sqlx::query("alter table auth.users enable trigger on_auth_user_created")
        .execute(&app.owner)
        .await
        .unwrap();
    assert_eq!(
        app.count("select count(*) from public.profiles where id = $1", id)
            .await,
        0
    );

    // The backfill statement of the migration, run again.
    let migration = amethyst_credits::MIGRATOR
        .iter()
        .find(|m| m.description.contains("credit functions"))
        .unwrap();
    let backfill = migration
        .sql
        .split("-- Users who signed up before this migration get their profile now.")
        .nth(1)
        .unwrap();
    let backfill = backfill.split(';').next().unwrap();
    sqlx::query(backfill).execute(&app.owner).await.unwrap();

    assert_eq!(
        app.count("select count(*) from public.profiles where id = $1", id)
            .await,
        1
    );
}

#[sqlx::test]
async fn an_email_change_in_auth_reaches_the_profile(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    sqlx::query("update auth.users set email = 'new@example.com' where id = $1")
        .bind(user.id)
        .execute(&app.owner)
        .await
        .unwrap();
    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.body["email"], "new@example.com");
}

#[sqlx::test]
async fn users_set_and_clear_their_low_balance_threshold(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let patch = |body: serde_json::Value| {
        common::request(
            axum::http::Method::PATCH,
            "/v1/me",
            Some(&user.token),
            Some(body.to_string()),
            &[],
        )
    };

    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.body["low_balance_threshold"], serde_json::Value::Null);

    let set = app.send(patch(json!({"low_balance_threshold": 20}))).await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    assert_eq!(set.body["low_balance_threshold"], 20);
    // Another field's change leaves it as it is.
    let renamed = app.send(patch(json!({"display_name": "Ada"}))).await;
    assert_eq!(renamed.body["low_balance_threshold"], 20);
    let me = app.get("/v1/me", Some(&user.token)).await;
    assert_eq!(me.body["low_balance_threshold"], 20);

    let off = app.send(patch(json!({"low_balance_threshold": 0}))).await;
    assert_eq!(off.body["low_balance_threshold"], 0);
    let default = app
        .send(patch(json!({"low_balance_threshold": null})))
        .await;
    assert_eq!(default.status, 200);
    assert_eq!(
        default.body["low_balance_threshold"],
        serde_json::Value::Null
    );

    for bad in [json!(-1), json!(1_000_001), json!(2.5), json!("5")] {
        let refused = app.send(patch(json!({"low_balance_threshold": bad}))).await;
        assert_eq!(refused.status, 422, "{bad}");
        assert_eq!(refused.code(), "validation_failed");
    }
}

/// `GET /v1/me` joins three set-returning functions (the profile as the user, the ad allowance,
/// the balance), each answering one row and declaring it (`ROWS 1`). At PostgreSQL's default
/// estimate of 1000 rows per function the plan's cost crossed `jit_above_cost`, and every
/// read paid about 30 ms of JIT compilation for 1 ms of work. The statement is the one
/// `profiles::read_as_user` sends.
#[sqlx::test]
async fn the_profile_read_is_planned_as_one_row_and_never_jit_compiled(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let claims = common::user_claims(user.id, &user.email).to_string();
    let plan: serde_json::Value = sqlx::query_scalar(
        r#"explain (format json)
           select p.id, p.email, p.display_name, p.avatar_url, b.credits, p.is_admin,
                  a.views_today, a.daily_limit, a.views_remaining, a.resets_at,
                  p.subscription_status, p.subscription_plan, p.subscription_current_period_end,
                  p.low_balance_threshold, p.created_at, p.updated_at, b.available, b.held,
                  b.paid, b.promotional, b.expiring
             from public.profile_as_user($1) p
            cross join lateral public.ad_allowance(p.ad_views_date, p.ad_views_today) a
            cross join lateral public.credit_balance(p.id) b"#,
    )
    .bind(&claims)
    .fetch_one(&app.owner)
    .await
    .unwrap();
    let root = &plan[0]["Plan"];
    let jit_above_cost: f64 =
        sqlx::query_scalar("select current_setting('jit_above_cost')::float8")
            .fetch_one(&app.owner)
            .await
            .unwrap();
    assert_eq!(root["Plan Rows"], 1, "{plan:#}");
    let cost = root["Total Cost"].as_f64().unwrap();
    assert!(
        cost < jit_above_cost,
        "estimated at {cost}, above jit_above_cost ({jit_above_cost}): JIT on every read"
    );
}
