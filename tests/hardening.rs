//! The second security review: what a user can write through Supabase's REST API (role
//! `authenticated`, their claims set, in a transaction as PostgREST runs each request), which
//! sequences they can reach, and functions that all pin their search_path.

mod common;

use common::TestApp;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};
use uuid::Uuid;

fn sqlstate(result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>) -> String {
    match result {
        Ok(r) => format!("ok ({} rows)", r.rows_affected()),
        Err(sqlx::Error::Database(e)) => e.code().unwrap_or_default().into_owned(),
        Err(e) => panic!("{e}"),
    }
}

/// Runs `sql` as Supabase's REST API runs a request of `user`: in a transaction, as role
/// `authenticated` with their claims. Rolled back afterwards; answers the SQLSTATE or the row
/// count.
async fn as_user(pool: &PgPool, user: Uuid, sql: &str) -> String {
    let claims = json!({"sub": user, "role": "authenticated", "aud": "authenticated"}).to_string();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("select set_config('request.jwt.claims', $1, true)")
        .bind(claims)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.execute("set local role authenticated").await.unwrap();
    let outcome = sqlstate(tx.execute(sql).await);
    tx.rollback().await.unwrap();
    outcome
}

/// Runs `sql` as this service's pooled connections do (role `service_role`), rolled back.
async fn as_service_role(pool: &PgPool, sql: &str) -> String {
    let mut tx = pool.begin().await.unwrap();
    tx.execute("set local role service_role").await.unwrap();
    let outcome = sqlstate(tx.execute(sql).await);
    tx.rollback().await.unwrap();
    outcome
}

fn register_image(owner: Uuid, bucket: &str, path: &str) -> String {
    format!(
        "insert into public.images (user_id, kind, storage_bucket, storage_path)
         values ('{owner}', 'generated', '{bucket}', '{path}')"
    )
}

// Finding: images outside the user's own folder or bucket.

#[sqlx::test]
async fn a_user_cannot_register_an_image_outside_their_folder(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let alice = app.user().await;
    let bob = app.user().await;

    for path in [
        format!("{}/1.png", bob.id),
        "1.png".to_owned(),
        "shared/1.png".to_owned(),
        format!("{}1.png", alice.id),
        format!("{}-copy/1.png", alice.id),
        format!("elsewhere/{}/1.png", alice.id),
        format!("/{}/1.png", alice.id),
    ] {
        let outcome = as_user(
            &app.owner,
            alice.id,
            &register_image(alice.id, "images", &path),
        )
        .await;
        assert_eq!(outcome, "42501", "{path} is outside alice's folder");
    }

    let own = format!("{}/2026/1.png", alice.id);
    assert_eq!(
        as_user(
            &app.owner,
            alice.id,
            &register_image(alice.id, "images", &own)
        )
        .await,
        "ok (1 rows)"
    );
}

#[sqlx::test]
async fn a_user_cannot_register_an_image_in_another_bucket(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let alice = app.user().await;
    let path = format!("{}/1.png", alice.id);

    for bucket in ["avatars", "private", "Images", ""] {
        let outcome = as_user(
            &app.owner,
            alice.id,
            &register_image(alice.id, bucket, &path),
        )
        .await;
        assert_eq!(outcome, "42501", "bucket {bucket:?}");
    }
}

#[sqlx::test]
async fn a_user_cannot_climb_out_of_their_folder_with_dot_segments(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let alice = app.user().await;
    let bob = app.user().await;

    for path in [
        format!("{}/../{}/1.png", alice.id, bob.id),
        format!("{}/..", alice.id),
        format!("{}/a/../../{}/1.png", alice.id, bob.id),
        format!("{}/./1.png", alice.id),
    ] {
        let outcome = as_user(
            &app.owner,
            alice.id,
            &register_image(alice.id, "images", &path),
        )
        .await;
        assert_eq!(outcome, "42501", "{path}");
    }
    // Dots inside a name are just a name.
    for path in [
        format!("{}/..png", alice.id),
        format!("{}/a..b/1.png", alice.id),
    ] {
        let outcome = as_user(
            &app.owner,
            alice.id,
            &register_image(alice.id, "images", &path),
        )
        .await;
        assert_eq!(outcome, "ok (1 rows)", "{path}");
    }
}

#[sqlx::test]
async fn a_user_cannot_move_a_registered_image(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect).await;
    let alice = app.user().await;
    let bob = app.user().await;
    let path = format!("{}/1.png", alice.id);
    sqlx::query(&register_image(alice.id, "images", &path))
        .execute(&app.owner)
        .await
        .unwrap();

    for set in [
        format!("storage_path = '{}/1.png'", bob.id),
        "storage_bucket = 'avatars'".to_owned(),
        format!("user_id = '{}'", bob.id),
    ] {
        let sql = format!(
            "update public.images set {set} where user_id = '{}'",
            alice.id
        );
        assert_eq!(as_user(&app.owner, alice.id, &sql).await, "42501", "{set}");
    }
    // What describes the image stays hers to change.
    let sql = format!(
        "update public.images set prompt = 'a violet crystal' where user_id = '{}'",
        alice.id
    );
    assert_eq!(as_user(&app.owner, alice.id, &sql).await, "ok (1 rows)");
}

#[sqlx::test]
async fn service_role_registers_images_for_anyone_but_never_with_dot_segments(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let bob = app.user().await;

    for (bucket, path) in [
        ("images", format!("{}/1.png", bob.id)),
        ("images", "imports/1.png".to_owned()),
        ("references", format!("{}/1.png", bob.id)),
    ] {
        let outcome = as_service_role(&app.owner, &register_image(bob.id, bucket, &path)).await;
        assert_eq!(outcome, "ok (1 rows)", "{bucket}/{path}");
    }
    let climbing = register_image(bob.id, "images", &format!("{}/../x.png", bob.id));
    assert_eq!(
        as_service_role(&app.owner, &climbing).await,
        "23514",
        "the check constraint holds for every role"
    );
}
