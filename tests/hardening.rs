//! The second security review: what a user can write through Supabase's REST API (role
//! `authenticated`, their claims set, in a transaction as PostgREST runs each request), which
//! sequences they can reach, and functions that all pin their search_path.

mod common;

use std::borrow::Cow;

use amethyst_credits::{MIGRATOR, maintenance, verify};
use common::TestApp;
use serde_json::json;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection, PgPool};
use uuid::Uuid;

/// The migration under test: everything before it is what a live database already has.
const HARDENING: i64 = 20261127100000;

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

/// The migrations before `version`, as a database deployed earlier has them.
fn migrations_before(version: i64) -> Migrator {
    Migrator {
        migrations: Cow::Owned(
            MIGRATOR
                .migrations
                .iter()
                .filter(|m| m.version < version)
                .cloned()
                .collect(),
        ),
        ..Migrator::DEFAULT
    }
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

// Finding: display names and avatar URLs.

#[sqlx::test]
async fn a_user_cannot_put_control_characters_in_their_display_name(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let alice = app.user().await;
    let set = |value: &str| {
        format!(
            "update public.profiles set display_name = {value} where id = '{}'",
            alice.id
        )
    };

    for value in [
        r"E'Ada\x1b[2J'",
        r"E'Ada\nLovelace'",
        r"E'Ada\tLovelace'",
        r"E'Ada\x7f'",
        r"E'Ada\u0085'",
        r"E'\u009bAda'",
    ] {
        assert_eq!(
            as_user(&app.owner, alice.id, &set(value)).await,
            "23514",
            "{value}"
        );
    }
    for value in ["'Ada Lovelace'", "'Zoë 🌸'", "null"] {
        assert_eq!(
            as_user(&app.owner, alice.id, &set(value)).await,
            "ok (1 rows)",
            "{value}"
        );
    }
}

#[sqlx::test]
async fn a_user_can_only_set_an_http_avatar_url_without_whitespace(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let alice = app.user().await;
    let set = |value: &str| {
        format!(
            "update public.profiles set avatar_url = {value} where id = '{}'",
            alice.id
        )
    };

    for value in [
        "'javascript:alert(1)'",
        "'data:image/png;base64,AAAA'",
        "'ftp://example.com/a.png'",
        "'//example.com/a.png'",
        "'HTTPS://example.com/a.png'",
        "' https://example.com/a.png'",
        "'https://example.com/a b.png'",
        r"E'https://example.com/a.png\n'",
        r"E'https://example.com/\u00a0a.png'",
        r"E'https://example.com/\u2028a.png'",
    ] {
        assert_eq!(
            as_user(&app.owner, alice.id, &set(value)).await,
            "23514",
            "{value}"
        );
    }
    for value in [
        "'https://cdn.example.com/a.png'",
        "'http://localhost:54321/a.png'",
        "null",
    ] {
        assert_eq!(
            as_user(&app.owner, alice.id, &set(value)).await,
            "ok (1 rows)",
            "{value}"
        );
    }
}

#[sqlx::test]
async fn a_sign_up_with_unfit_metadata_still_creates_the_profile_without_it(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let unfit = app
        .user_with_meta(json!({"full_name": "Ada\u{1b}[2J", "avatar_url": "javascript:alert(1)"}))
        .await;
    let spaced = app
        .user_with_meta(json!({"name": "Bo\nb", "avatar_url": "https://example.com/a b.png"}))
        .await;
    let fit = app
        .user_with_meta(json!({"name": "Grace", "avatar_url": "https://example.com/g.png"}))
        .await;

    let profile = |id: Uuid| {
        sqlx::query_as::<_, (Option<String>, Option<String>)>(
            "select display_name, avatar_url from public.profiles where id = $1",
        )
        .bind(id)
        .fetch_one(&app.owner)
    };
    assert_eq!(profile(unfit.id).await.unwrap(), (None, None));
    assert_eq!(profile(spaced.id).await.unwrap(), (None, None));
    assert_eq!(
        profile(fit.id).await.unwrap(),
        (
            Some("Grace".to_owned()),
            Some("https://example.com/g.png".to_owned())
        )
    );
}

#[sqlx::test(migrations = false)]
async fn the_migration_clears_unfit_names_and_avatars_before_constraining_them(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = PgPoolOptions::new().connect_with(connect).await.unwrap();
    migrations_before(HARDENING).run(&pool).await.unwrap();
    // Signed up before: the old trigger kept whatever fitted its length limits.
    let unfit = Uuid::new_v4();
    let fit = Uuid::new_v4();
    sqlx::query(
        "insert into auth.users (id, email, raw_user_meta_data) values
           ($1, 'unfit@example.com', $2), ($3, 'fit@example.com', $4)",
    )
    .bind(unfit)
    .bind(json!({"name": "Eve\u{7}", "avatar_url": "javascript:alert(1)"}))
    .bind(fit)
    .bind(json!({"name": "Grace", "avatar_url": "https://example.com/g.png"}))
    .execute(&pool)
    .await
    .unwrap();
    // Written directly, as a user could before.
    sqlx::query(
        "update public.profiles set avatar_url = 'https://example.com/a b.png' where id = $1",
    )
    .bind(fit)
    .execute(&pool)
    .await
    .unwrap();

    MIGRATOR
        .run(&pool)
        .await
        .expect("the migration applies to existing rows");

    let rows: Vec<(Uuid, Option<String>, Option<String>)> = sqlx::query_as(
        "select id, display_name, avatar_url from public.profiles order by email desc",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![(unfit, None, None), (fit, Some("Grace".to_owned()), None),]
    );
}

// Finding: sequences.

/// The default privileges a Supabase project gives the `postgres` role in `public`.
async fn supabase_default_privileges(pool: &PgPool) {
    for kind in ["tables", "functions", "sequences"] {
        pool.execute(
            format!(
                "alter default privileges in schema public grant all on {kind}
                   to anon, authenticated, service_role"
            )
            .as_str(),
        )
        .await
        .unwrap();
    }
}

#[sqlx::test(migrations = false)]
async fn users_can_use_no_sequence_in_public_even_with_supabases_default_privileges(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = PgPoolOptions::new().connect_with(connect).await.unwrap();
    // The first migration creates the roles (on Supabase they exist), then the project's
    // defaults are in place before anything else is created, as on Supabase.
    let platform = MIGRATOR.migrations[0].version;
    migrations_before(platform + 1).run(&pool).await.unwrap();
    supabase_default_privileges(&pool).await;
    MIGRATOR.run(&pool).await.unwrap();
    // A later migration's sequence.
    pool.execute("create table public.later (id bigint generated always as identity)")
        .await
        .unwrap();

    let usable: Vec<(String, String)> = sqlx::query_as(
        "select c.relname::text, r.rolname
           from pg_class c cross join (values ('anon'), ('authenticated')) as r(rolname)
          where c.relkind = 'S' and c.relnamespace = 'public'::regnamespace
            and has_sequence_privilege(r.rolname, c.oid, 'USAGE, SELECT, UPDATE')
          order by 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(usable, vec![]);

    let user = Uuid::new_v4();
    for sql in [
        "select nextval('public.maintenance_runs_id_seq')",
        "select setval('public.credit_transactions_seq_seq', 1)",
        "select last_value from public.later_id_seq",
    ] {
        assert_eq!(as_user(&pool, user, sql).await, "42501", "{sql}");
    }

    // service_role keeps what it needs.
    let service: Vec<bool> = sqlx::query_scalar(
        "select has_sequence_privilege('service_role', s, 'USAGE')
           from unnest(array['public.credit_transactions_seq_seq', 'public.later_id_seq']) as s",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(service, vec![true, true]);
}

// Finding: search paths, and the maintenance that could not pin one.

#[sqlx::test]
async fn no_function_in_public_takes_the_callers_search_path(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    // What Supabase's linter reports as function_search_path_mutable, for our schema:
    // functions and procedures with no search_path among their settings, other than an
    // extension's own.
    let unpinned: Vec<String> = sqlx::query_scalar(
        "select p.proname::text
           from pg_catalog.pg_proc p
          where p.pronamespace = 'public'::regnamespace
            and not exists (select 1 from pg_catalog.pg_depend d
                             where d.classid = 'pg_catalog.pg_proc'::regclass
                               and d.objid = p.oid and d.deptype = 'e')
            and not exists (select 1 from unnest(coalesce(p.proconfig, '{}')) as setting
                             where setting like 'search_path=%')
          order by 1",
    )
    .fetch_all(&app.owner)
    .await
    .unwrap();
    assert_eq!(unpinned, Vec::<String>::new());
}

#[sqlx::test]
async fn a_maintenance_run_is_continued_only_by_the_session_that_started_it(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let mut first = PgConnection::connect_with(&app.connect).await.unwrap();
    let mut second = PgConnection::connect_with(&app.connect).await.unwrap();
    let run: i64 = sqlx::query_scalar("select public.maintenance_start('monthly')")
        .fetch_one(&mut first)
        .await
        .unwrap();

    for sql in [
        "select public.maintenance_start('monthly')",
        &format!("select public.maintenance_archive_batch({run})"),
        &format!("select public.maintenance_finish({run})"),
    ] {
        assert_eq!(sqlstate(second.execute(sql).await), "55P03", "{sql}");
    }

    let finished: String = sqlx::query_scalar(&format!(
        "select outcome from public.maintenance_finish({run})"
    ))
    .fetch_one(&mut first)
    .await
    .unwrap();
    assert_eq!(finished, "ok");
    let again = sqlstate(
        first
            .execute(format!("select public.maintenance_finish({run})").as_str())
            .await,
    );
    assert_eq!(again, "22023", "a finished run is not finished twice");
    // The lock went with the finish: the next run starts anywhere.
    let next = maintenance::run(
        &mut second,
        maintenance::Task::Monthly,
        Default::default(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(next.outcome, "ok");
}

#[sqlx::test]
async fn verify_names_unpinned_functions_and_sequences_users_can_use(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let mut conn = PgConnection::connect_with(&app.connect).await.unwrap();
    let clean = verify::run(&mut conn).await.unwrap();
    assert!(clean.passed(), "{clean}");

    conn.execute(
        "create function public.unpinned() returns int language sql as 'select 1';
         grant usage on sequence public.maintenance_runs_id_seq to authenticated",
    )
    .await
    .unwrap();
    let report = verify::run(&mut conn).await.unwrap().to_string();

    assert!(
        report.contains("public.unpinned() runs with the caller's search_path"),
        "{report}"
    );
    assert!(
        report.contains("public.maintenance_runs_id_seq is usable by authenticated"),
        "{report}"
    );
}
