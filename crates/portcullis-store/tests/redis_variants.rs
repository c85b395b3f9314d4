//! Redis deployments beyond a plain server: password, TLS (`rediss://`), Sentinel,
//! Cluster. Each against real `redis-server` processes started here.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, redis_cli, RedisServer};
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

fn cluster_node_args(port: u16) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        &format!("nodes-{port}.conf"),
        "--cluster-node-timeout",
        "2000",
        "--save",
        "",
        "--appendonly",
        "no",
        "--bind",
        "127.0.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test]
async fn redis_cluster_routes_by_slot_and_scans_every_node() {
    let nodes: Vec<RedisServer> = (0..3)
        .map(|_| {
            let port = free_port();
            RedisServer::start_with(port, &cluster_node_args(port))
        })
        .collect();
    let cli = redis_cli();
    let mut create = Command::new(&cli);
    create.arg("--cluster").arg("create");
    for n in &nodes {
        create.arg(format!("127.0.0.1:{}", n.port));
    }
    let out = create
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("run redis-cli --cluster create");
    assert!(
        out.status.success(),
        "redis-cli --cluster create failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every node must see the full slot map before clients connect.
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in &nodes {
        loop {
            let info = Command::new(&cli)
                .args(["-p", &n.port.to_string(), "cluster", "info"])
                .output()
                .expect("run redis-cli cluster info");
            if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "cluster did not become ok");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    let url = format!("redis-cluster://127.0.0.1:{}", nodes[0].port);
    let store = Arc::new(RedisStore::connect(options(url)).await.unwrap());
    store.ping().await.unwrap();

    // 50 keys spread over slots (and so over all three nodes).
    for i in 0..50 {
        let key = format!("multi:key-{i:02}");
        store
            .set(&key, format!("value-{i}").as_bytes(), None)
            .await
            .unwrap();
    }
    for i in 0..50 {
        let key = format!("multi:key-{i:02}");
        assert_eq!(
            store.get(&key).await.unwrap(),
            Some(format!("value-{i}").into_bytes()),
            "{key}"
        );
    }
    // The keys really live on more than one node.
    let mut owners = std::collections::BTreeSet::new();
    for i in 0..50 {
        let out = Command::new(&cli)
            .args([
                "-p",
                &nodes[0].port.to_string(),
                "cluster",
                "keyslot",
                &format!("t:multi:key-{i:02}"),
            ])
            .output()
            .unwrap();
        let slot: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        // `--cluster create` splits 16384 slots into three near-equal ranges.
        owners.insert(slot / 5462);
    }
    assert!(owners.len() >= 2, "keys all hash to one node: {owners:?}");

    // scan_prefix sees every node, ordered by key.
    let all = store.scan_prefix("multi:", 100).await.unwrap();
    assert_eq!(all.len(), 50);
    for (i, (k, v)) in all.iter().enumerate() {
        assert_eq!(k, &format!("multi:key-{i:02}"));
        assert_eq!(v, &format!("value-{i}").into_bytes());
    }
    let first = store.scan_prefix("multi:", 7).await.unwrap();
    assert_eq!(first.len(), 7);
    assert_eq!(first[6].0, "multi:key-06");

    // set_nx, take, delete.
    assert!(store.set_nx("nx", b"1", None).await.unwrap());
    assert!(!store.set_nx("nx", b"2", None).await.unwrap());
    assert_eq!(store.get("nx").await.unwrap().as_deref(), Some(&b"1"[..]));
    assert!(store
        .set_nx("nx-ttl", b"1", Some(Duration::from_secs(30)))
        .await
        .unwrap());
    assert_eq!(store.take("nx").await.unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(store.take("nx").await.unwrap(), None);
    assert!(store.delete("multi:key-00").await.unwrap());
    assert!(!store.delete("multi:key-00").await.unwrap());
    assert_eq!(store.get("multi:key-00").await.unwrap(), None);
    assert_eq!(store.scan_prefix("multi:", 100).await.unwrap().len(), 49);

    // compare_and_set / compare_and_delete scripts are routed by their key's slot too.
    for i in 0..20 {
        let key = format!("cas:key-{i:02}");
        store.set(&key, b"old", None).await.unwrap();
        assert!(!store
            .compare_and_set(&key, b"x", b"new", None)
            .await
            .unwrap());
        assert!(store
            .compare_and_set(&key, b"old", b"new", Some(Duration::from_secs(60)))
            .await
            .unwrap());
        assert_eq!(store.get(&key).await.unwrap().as_deref(), Some(&b"new"[..]));
        assert!(!store.compare_and_delete(&key, b"old").await.unwrap());
        assert!(store.compare_and_delete(&key, b"new").await.unwrap());
        assert_eq!(store.get(&key).await.unwrap(), None);
    }

    // Window counter on several keys (different slots): exact under concurrency.
    for name in ["win-a", "win-b", "win-c"] {
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .consume_window(name, 1, 30, Duration::from_secs(60))
                    .await
                    .unwrap()
            }));
        }
        let mut allowed = 0;
        for t in tasks {
            if t.await.unwrap().allowed {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 30, "{name}");
        let w = store
            .consume_window(name, 0, 30, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(w.count, 30);
    }

    // The open() entry point accepts the scheme too.
    let dir = common::data_dir();
    let via_open = portcullis_store::open(
        &format!("redis-cluster://127.0.0.1:{}", nodes[1].port),
        dir.path(),
        "t:",
    )
    .await
    .unwrap();
    assert_eq!(via_open.backend_name(), "redis");
    via_open.ping().await.unwrap();
    assert_eq!(via_open.scan_prefix("multi:", 100).await.unwrap().len(), 49);
}
