//! Redis deployments beyond a plain server: password, TLS (`rediss://`), Sentinel.
//! Each against a real `redis-server` started here.

mod common;

use std::time::Duration;

use common::{free_port, RedisServer};
use portcullis_store::{RedisOptions, RedisStore, Store, StoreError};

fn options(url: String) -> RedisOptions {
    RedisOptions {
        url,
        key_prefix: "t:".into(),
        connect_timeout: Duration::from_secs(3),
        command_timeout: Duration::from_secs(2),
    }
}

async fn round_trip(store: &RedisStore) {
    store.set("k", b"v", None).await.unwrap();
    assert_eq!(store.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    let w = store
        .consume_window("q", 1, 1, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(w.allowed);
}

#[tokio::test]
async fn password_protected_redis() {
    let port = free_port();
    let args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        "--bind",
        "127.0.0.1",
        "--requirepass",
        "s3cret-pw",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _server = RedisServer::start_with(port, &args);
    let store = RedisStore::connect(options(format!("redis://:s3cret-pw@127.0.0.1:{port}")))
        .await
        .unwrap();
    round_trip(&store).await;

    // A wrong password is never "connected": commands report the store unavailable.
    let wrong = RedisStore::connect(options(format!("redis://:nope@127.0.0.1:{port}")))
        .await
        .unwrap();
    assert!(matches!(
        wrong.ping().await,
        Err(StoreError::Unavailable(_))
    ));
}

#[tokio::test]
async fn tls_redis_with_rediss_url() {
    let fixtures = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../portcullis-auth/tests/fixtures");
    let port = free_port();
    let args: Vec<String> = vec![
        "--port".into(),
        "0".into(),
        "--tls-port".into(),
        port.to_string(),
        "--tls-cert-file".into(),
        fixtures.join("tls-server.pem").display().to_string(),
        "--tls-key-file".into(),
        fixtures.join("tls-server.key.pem").display().to_string(),
        "--tls-ca-cert-file".into(),
        fixtures.join("tls-ca.pem").display().to_string(),
        "--tls-auth-clients".into(),
        "no".into(),
        "--save".into(),
        "".into(),
        "--appendonly".into(),
        "no".into(),
        "--bind".into(),
        "127.0.0.1".into(),
    ];
    let _server = RedisServer::start_with(port, &args);
    // The test CA is trusted through the standard SSL_CERT_FILE variable (read by the
    // system-roots loader); this test binary holds only TLS tests.
    std::env::set_var("SSL_CERT_FILE", fixtures.join("tls-ca.pem"));
    let store = RedisStore::connect(options(format!("rediss://127.0.0.1:{port}")))
        .await
        .unwrap();
    round_trip(&store).await;
}

#[tokio::test]
async fn sentinel_finds_the_primary() {
    let primary = RedisServer::start();
    let sentinel_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {} 1\nsentinel resolve-hostnames no\n",
            primary.port
        ),
    )
    .unwrap();
    let args = vec![conf.display().to_string(), "--sentinel".to_string()];
    let _sentinel = RedisServer::start_with(sentinel_port, &args);
    let url = format!("redis-sentinel://127.0.0.1:{sentinel_port}/0?sentinelServiceName=mymaster");
    let store = RedisStore::connect(options(url)).await.unwrap();
    round_trip(&store).await;
}
