mod common;

use common::{TestApp, service_role_key};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

#[sqlx::test]
async fn admins_find_users_by_part_of_their_email(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect).await;
    let admin = app.admin().await;
    for email in [
        "Alice.Smith@Example.com",
        "bob@example.com",
        "alice_w@other.org",
        "carol%@example.com",
    ] {
        sqlx::query("insert into auth.users (email) values ($1)")
            .bind(email)
            .execute(&app.owner)
            .await
            .unwrap();
    }

    let emails = |r: &common::TestResponse| -> Vec<String> {
        let mut v: Vec<String> = r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["email"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };
    let found = app
        .get("/v1/admin/users?email=ALICE", Some(&admin.token))
        .await;
    assert_eq!(found.status, 200, "{:?}", found.body);
    assert_eq!(
        emails(&found),
        vec!["Alice.Smith@Example.com", "alice_w@other.org"]
    );
    // LIKE wildcards in the query match literally.
    let literal = app
        .get("/v1/admin/users?email=%25", Some(&admin.token))
        .await;
    assert_eq!(emails(&literal), vec!["carol%@example.com"]);
    let underscore = app
        .get("/v1/admin/users?email=e_w", Some(&admin.token))
        .await;
    assert_eq!(emails(&underscore), vec!["alice_w@other.org"]);

    // Paging through everyone, two at a time, visits each profile once.
    let mut seen = Vec::new();
    let mut path = "/v1/admin/users?limit=2".to_owned();
    loop {
        let page = app.get(&path, Some(&service_role_key())).await;
        assert_eq!(page.status, 200);
        seen.extend(
            page.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].clone()),
        );
        match page.body["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/admin/users?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
    seen.sort_by_key(|v| v.to_string());
    seen.dedup();
    assert_eq!(seen.len(), 5);
}

#[sqlx::test]
async fn admins_adjust_balances_and_the_ledger_says_who(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let admin = app.admin().await;
    let user = app.user().await;
    let path = format!("/v1/admin/users/{}/credits", user.id);

    let added = app
        .post(
            &path,
            Some(&admin.token),
            json!({"amount": 25, "reason": "Support goodwill"}),
        )
        .await;
    assert_eq!(added.status, 201, "{:?}", added.body);
    assert_eq!(added.body["balance"], 25);
    assert_eq!(added.body["transaction"]["source"], "admin");
    assert_eq!(added.body["transaction"]["description"], "Support goodwill");
    assert_eq!(
        added.body["transaction"]["reference"],
        format!("admin:{}", admin.id)
    );

    let removed = app
        .post(
            &path,
            Some(&service_role_key()),
            json!({"amount": -5, "reason": "Correction"}),
        )
        .await;
    assert_eq!(removed.status, 201);
    assert_eq!(removed.body["balance"], 20);
    assert_eq!(
        removed.body["transaction"]["reference"],
        "admin:service_role"
    );

    let too_much = app
        .post(
            &path,
            Some(&admin.token),
            json!({"amount": -21, "reason": "Too much"}),
        )
        .await;
    assert_eq!(too_much.status, 402);
    assert_eq!(app.balance(user.id).await, 20);

    let history = app
        .get(
            &format!("/v1/admin/users/{}/transactions", user.id),
            Some(&admin.token),
        )
        .await;
    let amounts: Vec<i64> = history.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["amount"].as_i64().unwrap())
        .collect();
    assert_eq!(amounts, vec![-5, 25]);

    let profile = app
        .get(&format!("/v1/admin/users/{}", user.id), Some(&admin.token))
        .await;
    assert_eq!(profile.body["credits"], 20);
}

#[sqlx::test]
async fn admin_lookups_of_missing_users_answer_404(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect).await;
    let key = service_role_key();
    let ghost = uuid::Uuid::new_v4();

    for path in [
        format!("/v1/admin/users/{ghost}"),
        format!("/v1/admin/users/{ghost}/transactions"),
    ] {
        let response = app.get(&path, Some(&key)).await;
        assert_eq!(response.status, 404, "{path}");
        assert_eq!(response.code(), "profile_not_found");
    }
    let credit = app
        .post(
            &format!("/v1/admin/users/{ghost}/credits"),
            Some(&key),
            json!({"amount": 5, "reason": "x"}),
        )
        .await;
    assert_eq!(credit.status, 404);
    assert_eq!(credit.code(), "profile_not_found");
}

#[sqlx::test]
async fn daily_stats_split_credits_by_source(_pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::client_ads(connect).await;
    let user = app.user().await;
    app.grant(user.id, 10).await;
    app.post("/v1/credits/spend", Some(&user.token), json!({"amount": 4}))
        .await;
    app.post(
        "/v1/ads/views",
        Some(&user.token),
        json!({"duration_seconds": 35}),
    )
    .await;
    app.post(
        "/v1/ads/views",
        Some(&user.token),
        json!({"duration_seconds": 5}),
    )
    .await;
    app.post(
        &format!("/v1/admin/users/{}/credits", user.id),
        Some(&service_role_key()),
        json!({"amount": -1, "reason": "fix"}),
    )
    .await;

    let stats = app
        .get("/v1/admin/stats?days=7", Some(&service_role_key()))
        .await;

    assert_eq!(stats.status, 200, "{:?}", stats.body);
    let days = stats.body["days"].as_array().unwrap();
    assert_eq!(days.len(), 7);
    let today = &days[6];
    assert_eq!(today["date"], chrono::Utc::now().date_naive().to_string());
    assert_eq!(today["granted"], json!({"system": 10, "ad_view": 2}));
    assert_eq!(today["spent"], 4);
    assert_eq!(today["removed"], json!({"admin": 1}));
    assert_eq!(today["ad_views"], 2);
    assert_eq!(today["ad_credits"], 2);
    assert_eq!(days[0]["ad_views"], 0);
    assert_eq!(days[0]["granted"], json!({}));

    let default = app.get("/v1/admin/stats", Some(&service_role_key())).await;
    assert_eq!(default.body["days"].as_array().unwrap().len(), 30);
}

#[sqlx::test]
async fn packs_are_created_replaced_and_listed_when_active(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let app = TestApp::new(pool, connect).await;
    let admin = app.admin().await;
    let id = uuid::Uuid::new_v4();
    let path = format!("/v1/admin/credit-packs/{id}");
    let pack = json!({"name": "Starter", "credits": 100, "kind": "one_time", "stripe_price_id": "price_123",
                      "unit_amount": 499, "currency": "EUR", "active": true});

    let put = |body: Value| {
        let path = path.clone();
        let token = admin.token.clone();
        let app = &app;
        async move {
            app.send(common::request(
                axum::http::Method::PUT,
                &path,
                Some(&token),
                Some(body.to_string()),
                &[],
            ))
            .await
        }
    };
    let created = put(pack.clone()).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    assert_eq!(created.body["currency"], "eur");
    assert_eq!(created.body["stripe_price_id"], "price_123");

    let listed = app.get("/v1/credit-packs", None).await;
    assert_eq!(listed.body["next_cursor"], Value::Null);
    assert_eq!(
        listed.body["items"],
        json!([{"id": id, "name": "Starter", "credits": 100, "kind": "one_time", "unit_amount": 499, "currency": "eur"}])
    );

    let mut replaced = pack.clone();
    replaced["credits"] = json!(120);
    replaced["active"] = json!(false);
    let replaced = put(replaced).await;
    assert_eq!(replaced.status, 200);
    assert_eq!(replaced.body["credits"], 120);
    assert_eq!(
        app.get("/v1/credit-packs", None).await.body["items"],
        json!([])
    );

    // A Stripe price sells one pack only.
    let other = app
        .send(common::request(
            axum::http::Method::PUT,
            &format!("/v1/admin/credit-packs/{}", uuid::Uuid::new_v4()),
            Some(&admin.token),
            Some(pack.to_string()),
            &[],
        ))
        .await;
    assert_eq!(other.status, 422);
    assert_eq!(other.body["errors"][0]["field"], "stripe_price_id");

    let user = app.user().await;
    let refused = app
        .send(common::request(
            axum::http::Method::PUT,
            &path,
            Some(&user.token),
            Some(pack.to_string()),
            &[],
        ))
        .await;
    assert_eq!(refused.status, 403);
}
