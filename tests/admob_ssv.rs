//! AdMob's server-side verification callback, against a local key server speaking Google's
//! format with keys made in the test.
mod common;

use std::sync::Arc;

use common::admob::{AdmobKey, KeyServer, callback_params, encode, signed_query};
use common::{TestApp, TestResponse, all_at_once, test_config};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::time::Duration;
use uuid::Uuid;

/// An app in `admob` mode reading its keys from `keys`; refetches are not held back, so that
/// a rotation shows at once.
async fn admob_app(connect: PgConnectOptions, keys: &KeyServer) -> TestApp {
    let mut config = test_config();
    config.ads.verification = amethyst_credits::config::AdsVerification::Admob;
    config.ads.admob_keys_url = keys.url.clone();
    config.ads.admob_key_timing.cooldown = Duration::ZERO;
    TestApp::with_config(connect, config).await
}

/// The same, with `ADMOB_AD_UNITS` set to `units`.
async fn admob_app_allowing(
    connect: PgConnectOptions,
    keys: &KeyServer,
    units: &[&str],
) -> TestApp {
    let mut config = test_config();
    config.ads.verification = amethyst_credits::config::AdsVerification::Admob;
    config.ads.admob_keys_url = keys.url.clone();
    config.ads.admob_ad_units = units.iter().map(|u| (*u).to_owned()).collect();
    TestApp::with_config(connect, config).await
}

/// Opens a session that started 31 s ago, as far as the server knows.
async fn watched_session(app: &TestApp, token: &str) -> String {
    let opened = app.post("/v1/ads/sessions", Some(token), json!({})).await;
    assert_eq!(opened.status, 201, "{:?}", opened.body);
    let id = opened.body["id"].as_str().unwrap().to_owned();
    sqlx::query(
        "update public.ad_sessions set started_at = started_at - interval '31 seconds'
          where id = $1",
    )
    .bind(Uuid::parse_str(&id).unwrap())
    .execute(&app.owner)
    .await
    .unwrap();
    id
}

async fn complete(app: &TestApp, token: &str, session: &str) -> TestResponse {
    app.post(
        &format!("/v1/ads/sessions/{session}/complete"),
        Some(token),
        json!({"duration_seconds": 31}),
    )
    .await
}

async fn callback(app: &TestApp, query: &str) -> TestResponse {
    app.get(&format!("/v1/ads/admob/ssv?{query}"), None).await
}

fn transaction() -> String {
    Uuid::new_v4().simple().to_string()
}

async fn callbacks_recorded(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from public.admob_ssv_callbacks")
        .fetch_one(&app.owner)
        .await
        .unwrap()
}

#[sqlx::test]
async fn a_good_callback_pays_the_session_waiting_for_it(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let key = AdmobKey::generate(3_335_741_209);
    let keys = KeyServer::start(&[&key]).await;
    let app = admob_app(connect, &keys).await;
    let user = app.user().await;
    let session = watched_session(&app, &user.token).await;

    let waiting = complete(&app, &user.token, &session).await;
    assert_eq!(waiting.status, 202, "{:?}", waiting.body);
    assert_eq!(waiting.body["status"], "pending_verification");
    assert_eq!(app.balance(user.id).await, 0);

    let query = signed_query(
        &key,
        &callback_params(&user.id.to_string(), &session, &transaction()),
    );
    let received = callback(&app, &query).await;

    assert_eq!(received.status, 200, "{:?}", received.body);
    assert_eq!(
        received.body,
        json!({"received": true, "outcome": "accepted"})
    );
    assert_eq!(app.balance(user.id).await, 2);
    let read = app
        .get(&format!("/v1/ads/sessions/{session}"), Some(&user.token))
        .await;
    assert_eq!(read.body["status"], "completed");
    assert_eq!(read.body["result"]["credits_awarded"], 2);
}

#[sqlx::test]
async fn a_callback_before_the_completion_lets_the_completion_pay(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let key = AdmobKey::generate(1);
    let keys = KeyServer::start(&[&key]).await;
    let app = admob_app(connect, &keys).await;
    let user = app.user().await;
    let session = watched_session(&app, &user.token).await;

    let query = signed_query(
        &key,
        &callback_params(&user.id.to_string(), &session, &transaction()),
    );
    assert_eq!(callback(&app, &query).await.body["outcome"], "accepted");
    let done = complete(&app, &user.token, &session).await;

    assert_eq!(done.status, 201, "{:?}", done.body);
    assert_eq!(done.body["result"]["credits_awarded"], 2);
    assert_eq!(app.balance(user.id).await, 2);
}

#[sqlx::test]
async fn a_tampered_parameter_is_an_invalid_signature_and_changes_nothing(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let key = AdmobKey::generate(1);
    let keys = KeyServer::start(&[&key]).await;
    let app = admob_app(connect, &keys).await;
    let user = app.user().await;
    let session = watched_session(&app, &user.token).await;
    complete(&app, &user.token, &session).await;

    let query = signed_query(
        &key,
        &callback_params(&user.id.to_string(), &session, &transaction()),
    )
    .replace("reward_amount=1", "reward_amount=9");
    let refused = callback(&app, &query).await;

    assert_eq!(refused.status, 400);
    assert_eq!(refused.code(), "invalid_signature");
    assert_eq!(app.balance(user.id).await, 0);
    assert_eq!(callbacks_recorded(&app).await, 0);
}

#[sqlx::test]
async fn a_signature_from_another_key_is_refused(_pool: PgPoolOptions, connect: PgConnectOptions) {
    let published = AdmobKey::generate(1);
    let keys = KeyServer::start(&[&published]).await;
    let app = admob_app(connect, &keys).await;
    let user = app.user().await;
    let session = watched_session(&app, &user.token).await;
    complete(&app, &user.token, &session).await;

    // Signed with a key nobody published, under the published key's id.
    let forger = AdmobKey::generate(1);
    let query = signed_query(
        &forger,
        &callback_params(&user.id.to_string(), &session, &transaction()),
    );
    let refused = callback(&app, &query).await;

    assert_eq!(
        (refused.status.as_u16(), refused.code()),
        (400, "invalid_signature")
    );
    assert_eq!(app.balance(user.id).await, 0);
}

#[sqlx::test]
async fn a_key_published_after_a_rotation_is_fetched_for_its_unknown_key_id(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let old = AdmobKey::generate(1);
    let new = AdmobKey::generate(2);
    let keys = KeyServer::start(&[&old]).await;
    let app = admob_app(connect, &keys).await;
    let user = app.user().await;

    let first = watched_session(&app, &user.token).await;
    let query = signed_query(
        &old,
        &callback_params(&user.id.to_string(), &first, &transaction()),
    );
    assert_eq!(callback(&app, &query).await.body["outcome"], "accepted");
    assert_eq!(keys.fetches(), 1);

    keys.publish(&[&old, &new]);
    let second = watched_session(&app, &user.token).await;
    let query = signed_query(
        &new,
        &callback_params(&user.id.to_string(), &second, &transaction()),
    );
    let rotated = callback(&app, &query).await;

    assert_eq!(rotated.status, 200, "{:?}", rotated.body);
    assert_eq!(rotated.body["outcome"], "accepted");
    assert_eq!(keys.fetches(), 2);
}

#[sqlx::test]
async fn an_unknown_key_id_is_refetched_at_most_once_per_cooldown(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let published = AdmobKey::generate(1);
    let unknown = AdmobKey::generate(99);
    let keys = KeyServer::start(&[&published]).await;
    let mut config = test_config();
    config.ads.verification = amethyst_credits::config::AdsVerification::Admob;
    config.ads.admob_keys_url = keys.url.clone();
    let app = TestApp::with_config(connect, config).await;
    let user = app.user().await;

    for _ in 0..5 {
        let query = signed_query(
            &unknown,
            &callback_params(
                &user.id.to_string(),
                &Uuid::new_v4().to_string(),
                &transaction(),
            ),
        );
        let refused = callback(&app, &query).await;
        assert_eq!(refused.code(), "invalid_signature");
    }
    assert_eq!(keys.fetches(), 1);
}

#[sqlx::test]
async fn a_repeated_transaction_id_pays_once(_pool: PgPoolOptions, connect: PgConnectOptions) {
    let key = AdmobKey::generate(1);
    let keys = KeyServer::start(&[&key]).await;
    let app = admob_app(connect, &keys).await;
    let user = app.user().await;
    let session = watched_session(&app, &user.token).await;
    complete(&app, &user.token, &session).await;
    let query = signed_query(
        &key,
        &callback_params(&user.id.to_string(), &session, &transaction()),
    );

    let first = callback(&app, &query).await;
    let again = callback(&app, &query).await;

    assert_eq!(first.body["outcome"], "accepted");
    assert_eq!(again.status, 200);
    assert_eq!(again.body["outcome"], "duplicate");
    assert_eq!(app.balance(user.id).await, 2);
    assert_eq!(callbacks_recorded(&app).await, 1);
}

#[sqlx::test]
async fn a_callback_for_another_users_session_is_refused(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let key = AdmobKey::generate(1);
    let keys = KeyServer::start(&[&key]).await;
    let app = admob_app(connect, &keys).await;
    let owner = app.user().await;
    let other = app.user().await;
    let session = watched_session(&app, &owner.token).await;
    complete(&app, &owner.token, &session).await;

    let query = signed_query(
        &key,
        &callback_params(&other.id.to_string(), &session, &transaction()),
    );
    let refused = callback(&app, &query).await;

    assert_eq!(refused.status, 200);
    assert_eq!(
        refused.body,
        json!({"received": true, "outcome": "refused", "reason": "other_user"})
    );
    assert_eq!(app.balance(owner.id).await, 0);
    assert_eq!(app.balance(other.id).await, 0);
}

#[sqlx::test]
async fn a_percent_encoded_custom_data_is_verified_and_matched_decoded(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let key = AdmobKey::generate(1);
    let keys = KeyServer::start(&[&key]).await;
    let app = admob_app(connect, &keys).await;
    let user = app.user().await;
    let session = watched_session(&app, &user.token).await;
    complete(&app, &user.token, &session).await;

    let mut params = callback_params(&user.id.to_string(), &session, &transaction());
    params[2].1 = encode(&session, true);
    assert!(params[2].1.starts_with('%'));
    let received = callback(&app, &signed_query(&key, &params)).await;

    assert_eq!(received.status, 200, "{:?}", received.body);
    assert_eq!(received.body["outcome"], "accepted");
    assert_eq!(app.balance(user.id).await, 2);
}

#[sqlx::test]
async fn stale_callbacks_and_ad_units_outside_the_allow_list_are_refused(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let key = AdmobKey::generate(1);
    let keys = KeyServer::start(&[&key]).await;
    let app = admob_app_allowing(connect, &keys, &["1234567890"]).await;
    let user = app.user().await;
    let session = watched_session(&app, &user.token).await;
    complete(&app, &user.token, &session).await;

    let mut stale = callback_params(&user.id.to_string(), &session, &transaction());
    let two_hours_ago = (chrono::Utc::now().timestamp_millis() - 7_200_000).to_string();
    stale[5] = ("timestamp", two_hours_ago.clone(), two_hours_ago);
    let mut elsewhere = callback_params(&user.id.to_string(), &session, &transaction());
    elsewhere[1] = ("ad_unit", "999".to_owned(), "999".to_owned());

    let stale = callback(&app, &signed_query(&key, &stale)).await;
    let elsewhere = callback(&app, &signed_query(&key, &elsewhere)).await;

    assert_eq!(stale.body["reason"], "stale_timestamp");
    assert_eq!(elsewhere.body["reason"], "ad_unit_not_allowed");
    assert_eq!(app.balance(user.id).await, 0);
    // The session still pays when its own callback comes.
    let good = callback(
        &app,
        &signed_query(
            &key,
            &callback_params(&user.id.to_string(), &session, &transaction()),
        ),
    )
    .await;
    assert_eq!(good.body["outcome"], "accepted");
    assert_eq!(app.balance(user.id).await, 2);
}

#[sqlx::test]
async fn malformed_callbacks_get_a_stable_code_and_change_nothing(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let key = AdmobKey::generate(1);
    let keys = KeyServer::start(&[&key]).await;
    let app = admob_app(connect, &keys).await;
    let user = app.user().await;
    let session = watched_session(&app, &user.token).await;
    let good = signed_query(
        &key,
        &callback_params(&user.id.to_string(), &session, &transaction()),
    );
    let unsigned = good.split("&signature=").next().unwrap().to_owned();
    let mut no_transaction = callback_params(&user.id.to_string(), &session, "x");
    no_transaction.remove(6);
    // Past the end of year 9999, the latest timestamp the document allows.
    let mut far_future = callback_params(&user.id.to_string(), &session, &transaction());
    far_future[5] = (
        "timestamp",
        "253402300800000".to_owned(),
        "253402300800000".to_owned(),
    );

    for (query, code) in [
        (String::new(), "invalid_signature"),
        (unsigned.clone(), "invalid_signature"),
        (
            format!("{unsigned}&signature=!!!&key_id=1"),
            "invalid_signature",
        ),
        (format!("{unsigned}&signature=MEUCIQ"), "validation_failed"),
        (
            good.replace("&key_id=1", "&key_id=one"),
            "validation_failed",
        ),
        (
            good.replace("&key_id=1", "&key_id=1&extra=1"),
            "validation_failed",
        ),
        (signed_query(&key, &no_transaction), "validation_failed"),
        (signed_query(&key, &far_future), "validation_failed"),
        (
            good.replace("reward_item=Reward", "reward_item=%zz"),
            "validation_failed",
        ),
    ] {
        let refused = callback(&app, &query).await;
        assert_eq!(
            (refused.status.as_u16(), refused.code()),
            (400, code),
            "{query}: {:?}",
            refused.body
        );
    }
    assert_eq!(callbacks_recorded(&app).await, 0);
    assert_eq!(app.balance(user.id).await, 0);
}

#[sqlx::test]
async fn a_callback_and_a_completion_arriving_together_pay_once(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let key = AdmobKey::generate(1);
    let keys = KeyServer::start(&[&key]).await;
    let mut config = test_config();
    config.ads.verification = amethyst_credits::config::AdsVerification::Admob;
    config.ads.admob_keys_url = keys.url.clone();
    config.ads.max_open_sessions = 5;
    let app = TestApp::with_config(connect, config).await;
    let user = app.user().await;
    let mut sessions = Vec::new();
    for _ in 0..5 {
        sessions.push(watched_session(&app, &user.token).await);
    }
    let queries: Vec<String> = sessions
        .iter()
        .map(|s| {
            signed_query(
                &key,
                &callback_params(&user.id.to_string(), s, &transaction()),
            )
        })
        .collect();
    let server = Arc::new(app.serve());
    let (token, sessions, queries) = (
        Arc::new(user.token.clone()),
        Arc::new(sessions),
        Arc::new(queries),
    );

    let results = all_at_once(10, |i| {
        let (server, token, sessions, queries) = (
            server.clone(),
            token.clone(),
            sessions.clone(),
            queries.clone(),
        );
        async move {
            let n = i / 2;
            if i % 2 == 0 {
                server
                    .post(
                        &format!("/v1/ads/sessions/{}/complete", sessions[n]),
                        &token,
                        None,
                        &json!({"duration_seconds": 31}),
                    )
                    .await
            } else {
                let response = server
                    .client
                    .get(format!("{}/v1/ads/admob/ssv?{}", server.url, queries[n]))
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                (
                    status,
                    response.json::<Value>().await.unwrap_or(Value::Null),
                )
            }
        }
    })
    .await;

    assert!(
        results.iter().all(|(s, _)| [200, 201, 202].contains(s)),
        "{results:?}"
    );
    assert_eq!(app.balance(user.id).await, 10);
    assert_eq!(
        app.count(
            "select count(*) from public.ad_sessions where user_id = $1 and status = 'completed'",
            user.id
        )
        .await,
        5
    );
    assert_eq!(
        app.count(
            "select count(*) from public.ad_views where user_id = $1",
            user.id
        )
        .await,
        5
    );
}

#[sqlx::test]
async fn parameters_smuggled_inside_a_signed_value_cannot_change_what_is_read(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    // Google's keys sign every publisher's callbacks. Another publisher's callback, for their
    // own ad unit, whose custom_data carries "&ad_unit=<ours>&custom_data=<a session>", decodes
    // to the same signed text whichever way it is re-encoded: it must not pass as ours.
    let key = AdmobKey::generate(1);
    let keys = KeyServer::start(&[&key]).await;
    let app = admob_app_allowing(connect, &keys, &["1234567890"]).await;
    let user = app.user().await;
    let session = watched_session(&app, &user.token).await;
    complete(&app, &user.token, &session).await;

    let smuggled = format!("x&ad_unit=1234567890&custom_data={session}");
    let mut params = callback_params(&user.id.to_string(), &session, &transaction());
    params[1] = ("ad_unit", "999".to_owned(), "999".to_owned());
    params[2] = ("custom_data", encode(&smuggled, false), smuggled.clone());
    // As the other publisher received it: one ad_unit (theirs), one custom_data.
    let theirs = signed_query(&key, &params);
    // Re-encoded so that a reader of the raw query would see our ad unit and the session.
    let ad_network = "5450213213286189855%26ad_unit%3D999%26custom_data%3Dx";
    let rewritten = theirs
        .replacen(
            "ad_network=5450213213286189855",
            &format!("ad_network={ad_network}"),
            1,
        )
        .replacen("ad_unit=999&", "", 1)
        .replacen(
            &format!("custom_data={}", encode(&smuggled, false)),
            &format!("ad_unit=1234567890&custom_data={session}"),
            1,
        );

    // The rewritten query goes first: a refused callback uses its transaction id up.
    for query in [rewritten, theirs] {
        let answer = callback(&app, &query).await;
        assert_ne!(
            answer.body["outcome"], "accepted",
            "{query}: {:?}",
            answer.body
        );
    }
    assert_eq!(app.balance(user.id).await, 0);
}
