//! The store behind the gateway: embedded by default, Redis when configured;
//! `/readyz` follows the store's health.

use std::time::{Duration, Instant};

use crate::harness::*;
use crate::redis_harness::RedisServer;

fn config(store_url: &str) -> String {
    format!(
        "listeners:\n  - address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\n  token: adm\nstore:\n  url: \"{store_url}\"\n  timeout: 500ms\nroutes:\n  - path: /x\n    respond: {{body: hi}}\n"
    )
}

async fn ready_status(gw: &Gateway) -> u16 {
    client()
        .get(gw.url("/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn wait_ready(gw: &Gateway, expected: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if ready_status(gw).await == expected {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn embedded_store_is_the_default() {
    let gw = Gateway::start(&config(""));
    assert!(wait_ready(&gw, 200).await, "{}", gw.logs());
    assert!(
        gw.logs().contains("\"backend\":\"embedded\""),
        "{}",
        gw.logs()
    );
    assert!(gw.dir.path().join("data/portcullis.db").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_redis() {
    let redis = RedisServer::start();
    let port = redis.port;
    let gw = Gateway::start(&config(&format!("redis://127.0.0.1:{port}")));
    assert!(wait_ready(&gw, 200).await, "{}", gw.logs());
    // Redis dies: not ready (and the gateway keeps serving).
    drop(redis);
    assert!(wait_ready(&gw, 503).await);
    let res = client().get(gw.url("/readyz")).send().await.unwrap();
    assert_error(res, 503, "SERVICE_UNAVAILABLE").await;
    assert_eq!(
        client().get(gw.url("/x")).send().await.unwrap().status(),
        200
    );
    // Redis is back: ready again.
    let _redis = RedisServer::start_on(port);
    assert!(wait_ready(&gw, 200).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_starts_while_redis_is_down() {
    let port = crate::redis_harness::free_port();
    let gw = Gateway::start(&config(&format!("redis://127.0.0.1:{port}")));
    assert_eq!(ready_status(&gw).await, 503);
    assert_eq!(
        client().get(gw.url("/x")).send().await.unwrap().status(),
        200
    );
    let _redis = RedisServer::start_on(port);
    assert!(wait_ready(&gw, 200).await);
}
