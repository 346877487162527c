//! Row Level Security, tested in SQL as the role it protects from: `authenticated` with the
//! claims PostgREST would set, the way a frontend reaches Supabase's own REST API.

mod common;

use common::TestApp;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection};
use uuid::Uuid;

/// A connection acting as `user` through Supabase's REST API: role `authenticated`, claims set.
async fn as_user(connect: &PgConnectOptions, user: Uuid) -> PgConnection {
    let mut conn = PgConnection::connect_with(connect).await.unwrap();
    let claims = serde_json::json!({"sub": user, "role": "authenticated", "aud": "authenticated"})
        .to_string();
    sqlx::query("select set_config('request.jwt.claims', $1, false)")
        .bind(claims)
        .execute(&mut conn)
        .await
        .unwrap();
    conn.execute("set role authenticated").await.unwrap();
    conn
}

async fn as_anon(connect: &PgConnectOptions) -> PgConnection {
    let mut conn = PgConnection::connect_with(connect).await.unwrap();
    conn.execute("set role anon").await.unwrap();
    conn
}

fn sqlstate(result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>) -> String {
    match result {
        Ok(r) => format!("ok ({} rows)", r.rows_affected()),
        Err(sqlx::Error::Database(e)) => e.code().unwrap_or_default().into_owned(),
        Err(e) => panic!("{e}"),
    }
}

#[sqlx::test]
async fn a_user_sees_only_their_own_rows(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect.clone()).await;
    let alice = app.user().await;
    let bob = app.user().await;
    app.grant(alice.id, 5).await;
    app.grant(bob.id, 7).await;
    sqlx::query("select public.handle_ad_view($1, 30)")
        .bind(bob.id)
        .execute(&app.owner)
        .await
        .unwrap();

    let mut conn = as_user(&connect, alice.id).await;
    let profiles: Vec<Uuid> = sqlx::query_scalar("select id from public.profiles")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(profiles, vec![alice.id]);
    let ledger: Vec<Uuid> = sqlx::query_scalar("select user_id from public.credit_transactions")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(ledger, vec![alice.id]);
    let views: i64 = sqlx::query_scalar("select count(*) from public.ad_views")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(views, 0, "bob's ad view is not visible to alice");
    let keys = sqlx::query("select * from public.idempotency_keys")
        .execute(&mut conn)
        .await;
    assert_eq!(
        sqlstate(keys),
        "42501",
        "idempotency records are not readable by users"
    );
}

#[sqlx::test]
async fn a_user_cannot_raise_their_credits_by_any_table_write(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect.clone()).await;
    let alice = app.user().await;
    let bob = app.user().await;
    app.grant(alice.id, 5).await;
    let mut conn = as_user(&connect, alice.id).await;

    let attempts = [
        format!("update public.profiles set credits = 1000000 where id = '{}'", alice.id),
        format!("update public.profiles set is_admin = true where id = '{}'", alice.id),
        format!("update public.profiles set ad_views_today = 0 where id = '{}'", alice.id),
        format!("update public.profiles set stripe_customer_id = 'cus_x' where id = '{}'", alice.id),
        format!(
            "insert into public.credit_transactions (user_id, amount, balance_after, source) values ('{}', 100, 105, 'system')",
            alice.id
        ),
        "update public.credit_transactions set amount = 1000".to_owned(),
        "delete from public.credit_transactions".to_owned(),
        format!("insert into public.ad_views (user_id, viewed_on, duration_seconds, credits_awarded) values ('{}', now(), 30, 2)", alice.id),
        "insert into public.credit_packs (id, name, credits, kind, unit_amount, currency) values (gen_random_uuid(), 'free', 1000, 'one_time', 0, 'usd')".to_owned(),
        format!("insert into public.idempotency_keys (owner, key, request_hash) values ('{}', 'k', '')", alice.id),
        format!("delete from public.profiles where id = '{}'", alice.id),
    ];
    for sql in &attempts {
        let outcome = sqlstate(conn.execute(sql.as_str()).await);
        assert_eq!(
            outcome, "42501",
            "{sql} must be refused (permission denied), got {outcome}"
        );
    }

    // Changing someone else's display name matches no row.
    let other = sqlstate(
        sqlx::query("update public.profiles set display_name = 'pwned' where id = $1")
            .bind(bob.id)
            .execute(&mut conn)
            .await,
    );
    assert_eq!(other, "ok (0 rows)");
    // Their own display name is theirs to change.
    let own = sqlstate(
        sqlx::query("update public.profiles set display_name = 'Alice' where id = $1")
            .bind(alice.id)
            .execute(&mut conn)
            .await,
    );
    assert_eq!(own, "ok (1 rows)");

    assert_eq!(app.balance(alice.id).await, 5);
    assert_eq!(
        app.count(
            "select count(*) from public.credit_transactions where user_id = $1",
            alice.id
        )
        .await,
        1
    );
}

#[sqlx::test]
async fn users_and_anon_cannot_execute_the_balance_functions(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect.clone()).await;
    let alice = app.user().await;

    for mut conn in [as_user(&connect, alice.id).await, as_anon(&connect).await] {
        for sql in [
            "select public.add_credits($1, 100, 'system')",
            "select public.spend_credits($1, -100)",
            "select * from public.handle_ad_view($1, 30)",
        ] {
            let outcome = sqlstate(sqlx::query(sql).bind(alice.id).execute(&mut conn).await);
            assert_eq!(outcome, "42501", "{sql}");
        }
    }
    assert_eq!(app.balance(alice.id).await, 0);

    // service_role, which this service uses, can.
    let mut service = PgConnection::connect_with(&connect).await.unwrap();
    service.execute("set role service_role").await.unwrap();
    sqlx::query("select public.add_credits($1, 3, 'system')")
        .bind(alice.id)
        .execute(&mut service)
        .await
        .unwrap();
    assert_eq!(app.balance(alice.id).await, 3);
}

#[sqlx::test]
async fn admins_read_every_profile_but_still_cannot_write_balances(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect.clone()).await;
    let admin = app.admin().await;
    let _alice = app.user().await;
    let mut conn = as_user(&connect, admin.id).await;

    let count: i64 = sqlx::query_scalar("select count(*) from public.profiles")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(count, 2);
    let write = sqlstate(conn.execute("update public.profiles set credits = 5").await);
    assert_eq!(write, "42501");
}

#[sqlx::test]
async fn anon_sees_only_the_active_catalogue(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect.clone()).await;
    sqlx::query(
        "insert into public.credit_packs (id, name, credits, kind, unit_amount, currency, active)
         values (gen_random_uuid(), 'Active', 100, 'one_time', 500, 'usd', true),
                (gen_random_uuid(), 'Retired', 100, 'one_time', 100, 'usd', false)",
    )
    .execute(&app.owner)
    .await
    .unwrap();

    let mut anon = as_anon(&connect).await;
    let names: Vec<String> = sqlx::query_scalar("select name from public.credit_packs")
        .fetch_all(&mut anon)
        .await
        .unwrap();
    assert_eq!(names, vec!["Active".to_owned()]);
    let profiles = sqlx::query("select * from public.profiles")
        .execute(&mut anon)
        .await;
    assert_eq!(sqlstate(profiles), "42501");
}

#[sqlx::test]
async fn images_are_visible_to_their_owner_only(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect.clone()).await;
    let alice = app.user().await;
    let bob = app.user().await;

    let mut conn = as_user(&connect, alice.id).await;
    let own = sqlx::query("insert into public.images (user_id, kind, storage_path) values ($1, 'generated', $1 || '/1.png')")
        .bind(alice.id)
        .execute(&mut conn)
        .await;
    assert_eq!(sqlstate(own), "ok (1 rows)");
    let forged = sqlx::query("insert into public.images (user_id, kind, storage_path) values ($1, 'generated', $1 || '/1.png')")
        .bind(bob.id)
        .execute(&mut conn)
        .await;
    assert_eq!(
        sqlstate(forged),
        "42501",
        "inserting for another user violates the policy"
    );

    let mut bobs = as_user(&connect, bob.id).await;
    let seen: i64 = sqlx::query_scalar("select count(*) from public.images")
        .fetch_one(&mut bobs)
        .await
        .unwrap();
    assert_eq!(seen, 0);
}

#[sqlx::test]
async fn users_cannot_borrow_the_read_functions_to_act_as_someone_else(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect.clone()).await;
    let alice = app.user().await;
    let bob = app.user().await;
    let bobs_claims = serde_json::json!({"sub": bob.id, "role": "authenticated"}).to_string();

    let mut conn = as_user(&connect, alice.id).await;
    for sql in [
        "select * from public.profile_as_user($1)",
        "select * from public.transactions_as_user($1, null, 20)",
        "select * from public.images_as_user($1, null, null, 20)",
        "select * from public.enter_user_session($1)",
    ] {
        let outcome = sqlstate(sqlx::query(sql).bind(&bobs_claims).execute(&mut conn).await);
        assert_eq!(outcome, "42501", "{sql}");
    }
}

#[sqlx::test]
async fn the_read_functions_hand_back_the_callers_role(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect.clone()).await;
    let alice = app.user().await;
    let _bob = app.user().await;
    let claims = serde_json::json!({"sub": alice.id, "role": "authenticated"}).to_string();

    let mut service = PgConnection::connect_with(&connect).await.unwrap();
    let mut tx = sqlx::Connection::begin(&mut service).await.unwrap();
    sqlx::query("set local role service_role")
        .execute(&mut *tx)
        .await
        .unwrap();
    let seen: Vec<Uuid> = sqlx::query_scalar("select id from public.profile_as_user($1)")
        .bind(&claims)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(seen, vec![alice.id], "inside: the user's own row only");
    let (role, claims_after, visible): (String, String, i64) = sqlx::query_as(
        "select current_user::text, coalesce(current_setting('request.jwt.claims', true), ''),
                (select count(*) from public.profiles)",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(
        (role.as_str(), claims_after.as_str(), visible),
        ("service_role", "", 2),
        "after: back to service_role"
    );
}
