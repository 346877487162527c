//! `verify`: the post-migration checks and the ledger invariant, through the real binary.

mod common;

use std::process::Command;

use common::TestApp;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The test database's URL, for the binary.
fn database_url(connect: &PgConnectOptions) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for the tests");
    let (server, _) = base
        .rsplit_once('/')
        .expect("DATABASE_URL names a database");
    format!("{server}/{}", connect.get_database().unwrap())
}

fn verify(connect: &PgConnectOptions) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_amethyst-credits"))
        .arg("verify")
        .env("DATABASE_URL", database_url(connect))
        .output()
        .expect("the binary runs");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[sqlx::test]
async fn verify_passes_on_a_clean_database_with_activity(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::client_ads(connect.clone()).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;
    app.post("/v1/credits/spend", Some(&user.token), json!({"amount": 4}))
        .await;
    app.post(
        "/v1/ads/views",
        Some(&user.token),
        json!({"duration_seconds": 40}),
    )
    .await;
    let _idle = app.user().await;

    let (passed, report) = verify(&connect);

    assert!(passed, "{report}");
    assert!(report.contains("all 10 checks passed"), "{report}");
}

#[sqlx::test]
async fn verify_fails_naming_the_user_whose_balance_was_tampered(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect.clone()).await;
    let honest = app.user().await;
    let tampered = app.user().await;
    app.grant(honest.id, 10).await;
    app.grant(tampered.id, 10).await;
    sqlx::query("update public.profiles set credits = 1000 where id = $1")
        .bind(tampered.id)
        .execute(&app.owner)
        .await
        .unwrap();

    let (passed, report) = verify(&connect);

    assert!(!passed, "{report}");
    assert!(
        report.contains(&format!(
            "user {}: balance 1000, sum of transactions 10",
            tampered.id
        )),
        "{report}"
    );
    assert!(!report.contains(&honest.id.to_string()), "{report}");
}

#[sqlx::test]
async fn verify_fails_when_a_ledger_row_disagrees_with_the_balance(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect.clone()).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;
    sqlx::query("update public.credit_transactions set balance_after = 9 where user_id = $1")
        .bind(user.id)
        .execute(&app.owner)
        .await
        .unwrap();

    let (passed, report) = verify(&connect);

    assert!(!passed);
    assert!(report.contains(&format!("user {}", user.id)), "{report}");
    assert!(report.contains("newest balance_after 9"), "{report}");
}

#[sqlx::test]
async fn verify_fails_when_a_table_loses_rls_or_a_function_is_exposed(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect.clone()).await;
    sqlx::query("alter table public.ad_views disable row level security")
        .execute(&app.owner)
        .await
        .unwrap();
    sqlx::query("grant execute on function public.add_credits(uuid, integer, text, text, text, timestamptz, uuid) to authenticated")
        .execute(&app.owner)
        .await
        .unwrap();
    sqlx::query("grant update (credits) on public.profiles to authenticated")
        .execute(&app.owner)
        .await
        .unwrap();

    let (passed, report) = verify(&connect);

    assert!(!passed);
    assert!(
        report.contains("public.ad_views has RLS disabled"),
        "{report}"
    );
    assert!(
        report.contains("public.add_credits is executable by authenticated"),
        "{report}"
    );
    assert!(
        report.contains("public.profiles.credits is writable by users"),
        "{report}"
    );
}

#[sqlx::test]
async fn verify_fails_when_the_signup_trigger_is_gone(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect.clone()).await;
    sqlx::query("drop trigger on_auth_user_created on auth.users")
        .execute(&app.owner)
        .await
        .unwrap();

    let (passed, report) = verify(&connect);

    assert!(!passed);
    assert!(
        report.contains("FAIL trigger on_auth_user_created"),
        "{report}"
    );
}

#[sqlx::test]
async fn verify_fails_while_the_rules_clock_is_moved(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(_pool, connect.clone()).await;
    sqlx::query("insert into public.clock_settings (offset_by) values (interval '2 days')")
        .execute(&app.owner)
        .await
        .unwrap();

    let (passed, report) = verify(&connect);
    assert!(!passed, "{report}");
    assert!(report.contains("moves their clock by 2 days"), "{report}");

    sqlx::query("delete from public.clock_settings")
        .execute(&app.owner)
        .await
        .unwrap();
    let (passed, report) = verify(&connect);
    assert!(passed, "{report}");
}
