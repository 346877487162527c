mod common;

use common::TestApp;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

async fn image(app: &TestApp, user: Uuid, path: &str, age_minutes: i32) -> Uuid {
    sqlx::query_scalar(
        "insert into public.images (user_id, kind, storage_path, prompt, width, height, mime_type, metadata, analysis, created_at)
         values ($1, 'generated', $2, 'a violet crystal', 1024, 1024, 'image/png', '{\"seed\": 7}', '{\"nsfw\": false}',
                 now() - make_interval(mins => $3))
         returning id",
    )
    .bind(user)
    .bind(path)
    .bind(age_minutes)
    .fetch_one(&app.owner)
    .await
    .unwrap()
}

#[sqlx::test]
async fn users_page_through_their_own_images_only(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect).await;
    let alice = app.user().await;
    let bob = app.user().await;
    let mut mine = Vec::new();
    for n in 0..5 {
        mine.push(image(&app, alice.id, &format!("alice/{n}.png"), 10 - n).await);
    }
    image(&app, bob.id, "bob/0.png", 0).await;

    let mut seen = Vec::new();
    let mut path = "/v1/me/images?limit=2".to_owned();
    loop {
        let page = app.get(&path, Some(&alice.token)).await;
        assert_eq!(page.status, 200, "{:?}", page.body);
        seen.extend(
            page.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["id"].as_str().unwrap().parse::<Uuid>().unwrap()),
        );
        match page.body["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/me/images?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    mine.reverse();
    assert_eq!(seen, mine, "newest first, each once, none of bob's");

    let one = app
        .get(&format!("/v1/me/images/{}", mine[0]), Some(&alice.token))
        .await;
    assert_eq!(one.status, 200);
    assert_eq!(one.body["prompt"], "a violet crystal");
    assert_eq!(one.body["metadata"], json!({"seed": 7}));
    assert_eq!(one.body["analysis"], json!({"nsfw": false}));
    assert_eq!(one.body["storage_bucket"], "images");
}

#[sqlx::test]
async fn another_users_image_is_not_found(pool: PgPoolOptions, connect: PgConnectOptions) {
    let app = TestApp::new(pool, connect).await;
    let alice = app.user().await;
    let bob = app.user().await;
    let bobs = image(&app, bob.id, "bob/secret.png", 0).await;

    let response = app
        .get(&format!("/v1/me/images/{bobs}"), Some(&alice.token))
        .await;
    assert_eq!(response.status, 404);
    assert_eq!(response.code(), "not_found");
    assert_eq!(
        app.get("/v1/me/images/not-a-uuid", Some(&alice.token))
            .await
            .status,
        422
    );
    assert_eq!(app.get("/v1/me/images", None).await.status, 401);
    let empty = app.get("/v1/me/images", Some(&alice.token)).await;
    assert_eq!(empty.body, json!({"items": [], "next_cursor": Value::Null}));
}
