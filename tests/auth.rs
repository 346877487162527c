//! The token matrix of docs/api.md ("Authentication"), with a local JWKS server publishing the project's key.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amethyst_credits::Config;
use amethyst_credits::config::JwksTiming;
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{ISSUER, SECRET, TestApp, sign_hs256, user_claims};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::Notify;
use tower::ServiceExt;
use uuid::Uuid;

const KID: &str = "test-es256-key";
const JWKS_PATH: &str = "/auth/v1/.well-known/jwks.json";

/// A local stand-in for Supabase Auth's JWKS endpoint; counts how often it is fetched.
struct JwksServer {
    url: String,
    fetches: Arc<AtomicUsize>,
    behaviour: Arc<Mutex<Behaviour>>,
    fetched: Arc<Notify>,
}

/// How the stand-in answers.
#[derive(Clone, Copy)]
enum Behaviour {
    Answer,
    /// Accepts the request and never answers.
    Hang,
    Fail,
    /// Publishes no ES256 key any more: the project revoked it.
    Revoked,
    /// Publishes another key (`es256_other_private.pem`'s) under the same `kid`.
    Replaced,
}

impl JwksServer {
    fn behave(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    fn fetch_count(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Returns once the server has been asked for the keys `count` times in all.
    async fn fetched_at_least(&self, count: usize) {
        loop {
            let next = self.fetched.notified();
            if self.fetch_count() >= count {
                return;
            }
            next.await;
        }
    }
}

async fn jwks_server() -> JwksServer {
    let jwk: Value = serde_json::from_str(include_str!("fixtures/es256_public.jwk.json")).unwrap();
    let fetches = Arc::new(AtomicUsize::new(0));
    let behaviour = Arc::new(Mutex::new(Behaviour::Answer));
    let fetched = Arc::new(Notify::new());
    let (counter, current, notify) = (fetches.clone(), behaviour.clone(), fetched.clone());
    let router = axum::Router::new().route(
        JWKS_PATH,
        axum::routing::get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            notify.notify_waiters();
            let behaviour = *current.lock().unwrap();
            let symmetric = json!({"kty": "oct", "k": "c2VjcmV0", "kid": "symmetric"});
            let body = json!({"keys": [jwk.clone(), symmetric.clone()]});
            let replaced = json!({"keys": [{
                "kty": "EC", "crv": "P-256", "kid": KID, "alg": "ES256", "use": "sig",
                "x": "v_vSod5KuKiZGunxvG86Rsh5tKkoG6VBz_DZwne4XE4",
                "y": "whUaCjNm94K7wCQQhFR5lPil2CtZGuTbnpy099bAKUA",
            }, symmetric.clone()]});
            let revoked = json!({"keys": [symmetric]});
            async move {
                match behaviour {
                    Behaviour::Answer => axum::Json(body).into_response(),
                    Behaviour::Revoked => axum::Json(revoked).into_response(),
                    Behaviour::Replaced => axum::Json(replaced).into_response(),
                    Behaviour::Hang => std::future::pending().await,
                    Behaviour::Fail => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    JwksServer {
        url,
        fetches,
        behaviour,
        fetched,
    }
}

async fn app_with_jwks(connect: PgConnectOptions, jwks: &JwksServer) -> TestApp {
    app_with_jwks_timing(connect, jwks, JwksTiming::default()).await
}

async fn app_with_jwks_timing(
    connect: PgConnectOptions,
    jwks: &JwksServer,
    timing: JwksTiming,
) -> TestApp {
    let jwks_url = format!("{}{JWKS_PATH}", jwks.url);
    let mut config = Config::from_lookup(|name| match name {
        "SUPABASE_JWT_SECRET" => Some(SECRET.to_owned()),
        "SUPABASE_JWKS_URL" => Some(jwks_url.clone()),
        "JWT_ISSUER" => Some(ISSUER.to_owned()),
        "RATE_LIMIT_PER_MINUTE" => Some("0".to_owned()),
        _ => None,
    })
    .unwrap();
    config.database_max_connections = 5;
    config.jwt.jwks_timing = timing;
    TestApp::with_config(connect, config).await
}

/// Keys that are old as soon as they arrive, no cooldown, and fetches allowed to take longer
/// than any test: every request with a known `kid` may start a refresh.
fn always_refreshing() -> JwksTiming {
    JwksTiming {
        refresh_after: Duration::ZERO,
        cooldown: Duration::ZERO,
        fetch_timeout: Duration::from_secs(600),
    }
}

/// Generous: these tests take well under a second when the cache behaves.
const GUARD: Duration = Duration::from_secs(60);

fn sign_es256(claims: &Value, kid: &str, pem: &[u8]) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_pem(pem).unwrap()).unwrap()
}

fn project_key() -> &'static [u8] {
    include_bytes!("fixtures/es256_private.pem")
}

fn unsigned(header: Value, claims: &Value) -> String {
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn with(claims: &Value, changes: Value) -> Value {
    let mut c = claims.clone();
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

#[sqlx::test]
async fn the_token_matrix_on_a_user_route(pool: PgPoolOptions, connect: PgConnectOptions) {
    let _ = pool;
    let jwks = jwks_server().await;
    let app = app_with_jwks(connect, &jwks).await;
    let user = app.user().await;
    let claims = user_claims(user.id, &user.email);
    let now = chrono::Utc::now().timestamp();

    let mut hs256_with_ec_public_key = Header::new(Algorithm::HS256);
    hs256_with_ec_public_key.kid = Some(KID.to_owned());
    let hs256_with_ec_public_key = jsonwebtoken::encode(
        &hs256_with_ec_public_key,
        &claims,
        &EncodingKey::from_secret(include_bytes!("fixtures/es256_public.pem")),
    )
    .unwrap();

    // A valid token taken apart, for tokens that are changed after signing.
    let valid = sign_hs256(&claims, SECRET);
    let (signing_input, signature) = valid.rsplit_once('.').unwrap();
    let other_payload = sign_hs256(&with(&claims, json!({"role": "service_role"})), SECRET);
    let other_payload = other_payload.split('.').nth(1).unwrap();
    let header_part = signing_input.split('.').next().unwrap();

    let cases: Vec<(&str, Option<String>, StatusCode)> = vec![
        (
            "valid HS256",
            Some(sign_hs256(&claims, SECRET)),
            StatusCode::OK,
        ),
        (
            "valid ES256 from the JWKS",
            Some(sign_es256(&claims, KID, project_key())),
            StatusCode::OK,
        ),
        (
            "aud given as a list",
            Some(sign_hs256(
                &with(&claims, json!({"aud": ["x", "authenticated"]})),
                SECRET,
            )),
            StatusCode::OK,
        ),
        (
            "expired within the leeway",
            Some(sign_hs256(&with(&claims, json!({"exp": now - 30})), SECRET)),
            StatusCode::OK,
        ),
        (
            "expired",
            Some(sign_hs256(
                &with(&claims, json!({"exp": now - 120})),
                SECRET,
            )),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "exp as a string",
            Some(sign_hs256(
                &with(&claims, json!({"exp": (now + 3600).to_string()})),
                SECRET,
            )),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "no exp",
            Some(sign_hs256(&with(&claims, json!({"exp": null})), SECRET)),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "not yet valid",
            Some(sign_hs256(
                &with(&claims, json!({"nbf": now + 600})),
                SECRET,
            )),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "not yet valid, within the leeway",
            Some(sign_hs256(&with(&claims, json!({"nbf": now + 30})), SECRET)),
            StatusCode::OK,
        ),
        (
            "exp with a fraction",
            Some(sign_hs256(
                &with(&claims, json!({"exp": (now + 3600) as f64 + 0.5})),
                SECRET,
            )),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "another payload under this signature",
            Some(format!("{header_part}.{other_payload}.{signature}")),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "signature cut short",
            Some(valid[..valid.len() - 2].to_owned()),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "signature padded",
            Some(format!("{valid}=")),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "a fourth part",
            Some(format!("{valid}.{signature}")),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "parts swapped",
            Some(format!("{other_payload}.{header_part}.{signature}")),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "wrong aud",
            Some(sign_hs256(
                &with(&claims, json!({"aud": "someone-else"})),
                SECRET,
            )),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "no aud",
            Some(sign_hs256(&with(&claims, json!({"aud": null})), SECRET)),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "wrong iss",
            Some(sign_hs256(
                &with(&claims, json!({"iss": "https://evil.example/auth/v1"})),
                SECRET,
            )),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "wrong secret",
            Some(sign_hs256(
                &claims,
                "another-secret-that-is-also-32-characters",
            )),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "alg none",
            Some(unsigned(json!({"alg": "none", "typ": "JWT"}), &claims)),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "HS256 signed with the EC public key",
            Some(hs256_with_ec_public_key),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "ES256 with an unknown kid",
            Some(sign_es256(&claims, "unknown-kid", project_key())),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "ES256 signed by a key not in the set",
            Some(sign_es256(
                &claims,
                KID,
                include_bytes!("fixtures/es256_other_private.pem"),
            )),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "ES256 token naming a symmetric JWKS key",
            Some(sign_es256(&claims, "symmetric", project_key())),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "sub that is not a UUID",
            Some(sign_hs256(&with(&claims, json!({"sub": "admin"})), SECRET)),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "garbage",
            Some("not.a.jwt".to_owned()),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "the anon key",
            Some(common::anon_key()),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "a user-shaped anon token",
            Some(sign_hs256(&with(&claims, json!({"role": "anon"})), SECRET)),
            StatusCode::FORBIDDEN,
        ),
        (
            "the service_role key",
            Some(common::service_role_key()),
            StatusCode::FORBIDDEN,
        ),
        ("no token", None, StatusCode::UNAUTHORIZED),
    ];

    for (name, token, expected) in cases {
        let response = app.get("/v1/me", token.as_deref()).await;
        assert_eq!(response.status, expected, "{name}: {:?}", response.body);
        if expected == StatusCode::UNAUTHORIZED {
            assert_eq!(response.code(), "invalid_token", "{name}");
            assert_eq!(
                response.headers["www-authenticate"], r#"Bearer error="invalid_token""#,
                "{name}"
            );
            assert_eq!(
                response.headers["content-type"], "application/problem+json",
                "{name}"
            );
        }
        if expected == StatusCode::FORBIDDEN {
            assert_eq!(response.code(), "forbidden", "{name}");
        }
    }
}

#[sqlx::test]
async fn malformed_authorization_headers_are_unauthorized(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    for header in [
        format!("Basic {}", user.token),
        "Bearer".to_owned(),
        "Bearer    ".to_owned(),
        user.token.clone(),
    ] {
        let response = app
            .send(common::request(
                axum::http::Method::GET,
                "/v1/me",
                None,
                None,
                &[("authorization", header.as_str())],
            ))
            .await;
        assert_eq!(response.status, 401, "{header}");
    }
}

#[sqlx::test]
async fn an_unknown_kid_refetches_the_jwks_at_most_once_per_cooldown(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let jwks = jwks_server().await;
    let app = app_with_jwks(connect, &jwks).await;
    let user = app.user().await;
    let claims = user_claims(user.id, &user.email);

    assert_eq!(
        app.get("/v1/me", Some(&sign_es256(&claims, KID, project_key())))
            .await
            .status,
        200
    );
    assert_eq!(
        app.get("/v1/me", Some(&sign_es256(&claims, KID, project_key())))
            .await
            .status,
        200
    );
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        1,
        "known keys are cached"
    );

    for i in 0..5 {
        let forged = sign_es256(&claims, &format!("made-up-{i}"), project_key());
        assert_eq!(app.get("/v1/me", Some(&forged)).await.status, 401);
    }
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        1,
        "unknown kids within the cooldown fetch nothing"
    );
}

#[sqlx::test]
async fn a_flood_of_unknown_kids_fetches_the_keys_once_per_cooldown(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let jwks = jwks_server().await;
    let app = app_with_jwks(connect, &jwks).await;
    let claims = user_claims(Uuid::new_v4(), "flood@example.com");

    for round in 0..2 {
        let router = app.router.clone();
        let claims = claims.clone();
        let statuses = common::all_at_once(50, move |i| {
            let forged = sign_es256(&claims, &format!("made-up-{round}-{i}"), project_key());
            let request = common::request(Method::GET, "/v1/me", Some(&forged), None, &[]);
            let router = router.clone();
            async move { router.oneshot(request).await.unwrap().status() }
        })
        .await;
        assert!(
            statuses.iter().all(|s| *s == StatusCode::UNAUTHORIZED),
            "{statuses:?}"
        );
        assert_eq!(
            jwks.fetch_count(),
            1,
            "round {round}: a flood of unknown kids fetches the key set once per cooldown"
        );
    }
}

#[sqlx::test]
async fn a_request_with_a_cached_kid_never_waits_on_a_refresh_that_hangs(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    tokio::time::timeout(GUARD, async {
        let jwks = jwks_server().await;
        let app = app_with_jwks_timing(connect, &jwks, always_refreshing()).await;
        let user = app.user().await;
        let token = sign_es256(&user_claims(user.id, &user.email), KID, project_key());

        assert_eq!(app.get("/v1/me", Some(&token)).await.status, 200);
        assert_eq!(jwks.fetch_count(), 1, "the first request fetched the keys");

        // The keys are now old and the auth server stops answering.
        jwks.behave(Behaviour::Hang);
        assert_eq!(app.get("/v1/me", Some(&token)).await.status, 200);
        // That request started a refresh, which reached the server and hangs there...
        jwks.fetched_at_least(2).await;
        // ...while requests with the cached kid go on being served from the cache.
        for _ in 0..3 {
            assert_eq!(app.get("/v1/me", Some(&token)).await.status, 200);
        }
    })
    .await
    .expect("requests with a cached kid must not wait for the JWKS server");
}

#[sqlx::test]
async fn a_failed_background_refresh_keeps_the_known_keys(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    tokio::time::timeout(GUARD, async {
        let jwks = jwks_server().await;
        let app = app_with_jwks_timing(connect, &jwks, always_refreshing()).await;
        let user = app.user().await;
        let token = sign_es256(&user_claims(user.id, &user.email), KID, project_key());
        assert_eq!(app.get("/v1/me", Some(&token)).await.status, 200);

        jwks.behave(Behaviour::Fail);
        // One refresh runs at a time, so the third fetch starts only after the second one
        // failed; every request meanwhile, and the one after, still finds the key.
        while jwks.fetch_count() < 3 {
            assert_eq!(app.get("/v1/me", Some(&token)).await.status, 200);
            tokio::task::yield_now().await;
        }
        assert_eq!(app.get("/v1/me", Some(&token)).await.status, 200);
    })
    .await
    .expect("the refreshes ran");
}

#[sqlx::test]
async fn admin_routes_take_the_service_role_key_or_an_admin(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let admin = app.admin().await;
    let path = format!("/v1/admin/users/{}", user.id);

    assert_eq!(app.get(&path, Some(&user.token)).await.status, 403);
    assert_eq!(app.get(&path, Some(&user.token)).await.code(), "forbidden");
    assert_eq!(app.get(&path, Some(&admin.token)).await.status, 200);
    assert_eq!(
        app.get(&path, Some(&common::service_role_key()))
            .await
            .status,
        200
    );
    assert_eq!(app.get(&path, Some(&common::anon_key())).await.status, 401);
    assert_eq!(app.get(&path, None).await.status, 401);

    // A service_role token shaped like a user token is accepted too.
    let mut claims = user_claims(Uuid::new_v4(), "");
    claims["role"] = json!("service_role");
    assert_eq!(
        app.get(&path, Some(&sign_hs256(&claims, SECRET)))
            .await
            .status,
        200
    );

    // A legacy-shaped key with another role is not a service key.
    let now = chrono::Utc::now().timestamp();
    let odd = sign_hs256(
        &json!({"iss": "supabase", "role": "authenticated", "iat": now, "exp": now + 60}),
        SECRET,
    );
    assert_eq!(app.get(&path, Some(&odd)).await.status, 401);

    // Revoking admin takes effect at once.
    sqlx::query("update public.profiles set is_admin = false where id = $1")
        .bind(admin.id)
        .execute(&app.owner)
        .await
        .unwrap();
    assert_eq!(app.get(&path, Some(&admin.token)).await.status, 403);
}

#[sqlx::test]
async fn the_public_catalogue_ignores_whatever_token_comes_with_it(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    assert_eq!(app.get("/v1/credit-packs", None).await.status, 200);
    // supabase-js sends the anon key when nobody is signed in.
    assert_eq!(
        app.get("/v1/credit-packs", Some(&common::anon_key()))
            .await
            .status,
        200
    );
}

#[sqlx::test]
async fn without_a_secret_hs256_tokens_are_refused(pool: PgPoolOptions, connect: PgConnectOptions) {
    let _ = pool;
    let jwks = jwks_server().await;
    let jwks_url = format!("{}{JWKS_PATH}", jwks.url);
    let config = Config::from_lookup(|name| match name {
        "SUPABASE_JWKS_URL" => Some(jwks_url.clone()),
        "JWT_ISSUER" => Some(ISSUER.to_owned()),
        _ => None,
    })
    .unwrap();
    let app = TestApp::with_config(connect, config).await;
    let user = app.user().await;
    let claims = user_claims(user.id, &user.email);

    assert_eq!(
        app.get("/v1/me", Some(&sign_hs256(&claims, SECRET)))
            .await
            .status,
        401
    );
    assert_eq!(
        app.get("/v1/me", Some(&sign_es256(&claims, KID, project_key())))
            .await
            .status,
        200
    );
}

// Verified tokens are remembered until they expire (src/auth/cache.rs); the time bounds are
// tested there with explicit times.

/// Signs in with the project's ES256 key (the token is now remembered), makes the JWKS
/// server answer as `change` says, then sends the token until it is refused (each request
/// with the token starts a refresh of the keys). The app, the server and the user's claims.
async fn remembered_until_the_keys_change(
    connect: PgConnectOptions,
    change: Behaviour,
) -> (TestApp, JwksServer, Value) {
    let jwks = jwks_server().await;
    let app = app_with_jwks_timing(connect, &jwks, always_refreshing()).await;
    let user = app.user().await;
    let claims = user_claims(user.id, &user.email);
    let token = sign_es256(&claims, KID, project_key());
    assert_eq!(app.get("/v1/me", Some(&token)).await.status, 200);
    assert_eq!(app.state.verifier.cached_tokens(), 1);

    jwks.behave(change);
    loop {
        let status = app.get("/v1/me", Some(&token)).await.status;
        if status == 200 {
            tokio::task::yield_now().await;
        } else {
            assert_eq!(status, 401);
            break;
        }
    }
    assert_eq!(app.get("/v1/me", Some(&token)).await.status, 401);
    (app, jwks, claims)
}

#[sqlx::test]
async fn a_remembered_token_is_refused_once_the_jwks_drops_its_key(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    tokio::time::timeout(
        GUARD,
        remembered_until_the_keys_change(connect, Behaviour::Revoked),
    )
    .await
    .expect("a token whose key was revoked must stop being accepted");
}

#[sqlx::test]
async fn a_remembered_token_is_refused_once_its_kid_names_another_key(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _ = pool;
    let (app, _jwks, claims) = tokio::time::timeout(
        GUARD,
        remembered_until_the_keys_change(connect, Behaviour::Replaced),
    )
    .await
    .expect("a token whose key was replaced must stop being accepted");
    // The key now published under that kid signs the tokens that pass.
    let other = include_bytes!("fixtures/es256_other_private.pem");
    let renewed = sign_es256(&claims, KID, other);
    assert_eq!(app.get("/v1/me", Some(&renewed)).await.status, 200);
}

#[sqlx::test]
async fn only_accepted_tokens_are_remembered_each_as_sent(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let user = app.user().await;
    let verifier = &app.state.verifier;

    assert_eq!(app.get("/v1/me", Some(&user.token)).await.status, 200);
    assert_eq!(app.get("/v1/me", Some(&user.token)).await.status, 200);
    assert_eq!(verifier.cached_tokens(), 1, "one token, remembered once");

    // The same claims under another signature, and the remembered token with a character of
    // its signature changed: each is another token, checked afresh, refused and not remembered.
    let claims = user_claims(user.id, &user.email);
    let forged = sign_hs256(&claims, "another-secret-of-at-least-32-characters");
    // (Not the last character: its low bits are padding.)
    let at = user.token.len() - 10;
    let swapped = if &user.token[at..=at] == "A" {
        "B"
    } else {
        "A"
    };
    let altered = format!("{}{swapped}{}", &user.token[..at], &user.token[at + 1..]);
    for token in [&forged, &altered] {
        assert_eq!(app.get("/v1/me", Some(token)).await.status, 401, "{token}");
    }
    assert_eq!(verifier.cached_tokens(), 1);

    // An expired token is refused, remembered or not.
    let expired = sign_hs256(
        &with(
            &claims,
            json!({"exp": chrono::Utc::now().timestamp() - 3600}),
        ),
        SECRET,
    );
    assert_eq!(app.get("/v1/me", Some(&expired)).await.status, 401);
    assert_eq!(verifier.cached_tokens(), 1);
}

#[sqlx::test]
async fn jwt_cache_size_zero_remembers_nothing(pool: PgPoolOptions, connect: PgConnectOptions) {
    let _ = pool;
    let mut config = Config::from_lookup(|name| match name {
        "SUPABASE_JWT_SECRET" => Some(SECRET.to_owned()),
        "JWT_ISSUER" => Some(ISSUER.to_owned()),
        "JWT_CACHE_SIZE" => Some("0".to_owned()),
        _ => None,
    })
    .unwrap();
    config.database_max_connections = 5;
    let app = TestApp::with_config(connect, config).await;
    let user = app.user().await;
    assert_eq!(app.get("/v1/me", Some(&user.token)).await.status, 200);
    assert_eq!(app.state.verifier.cached_tokens(), 0);
}
