//! Change notices ([`Store::notify`], [`Store::watch`]) and unprefixed views,
//! against a real `redis-server` and SQLite files shared by two handles.

mod backends;
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::{redis_store, two_embedded, two_redis};
use common::{data_dir, redis_cli, RedisServer};
use portcullis_store::Store;
use tokio::sync::watch;

/// Waits until `rx` moves past `from`.
async fn advances(rx: &mut watch::Receiver<u64>, from: u64, what: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = *rx.borrow_and_update();
        if now > from {
            return now;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{what}: no notice");
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
}

/// A notice from one handle reaches the other's watcher; with `exact`, other topics'
/// watchers do not move (Redis may move any watcher when its connection is made
/// again: "notices may have been missed" is allowed to over-report).
async fn notices_cross(a: Arc<dyn Store>, b: Arc<dyn Store>, exact: bool) {
    let mut rx = b.watch("pipelines", None).await.unwrap();
    let other = b.watch("other", None).await.unwrap();
    let g = *rx.borrow();
    let o = *other.borrow();
    a.notify("pipelines").await.unwrap();
    let g = advances(&mut rx, g, "first notice").await;
    a.notify("pipelines").await.unwrap();
    advances(&mut rx, g, "second notice").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    if exact {
        assert_eq!(*other.borrow(), o, "another topic's watcher was not told");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_notices_reach_another_handle() {
    let dir = data_dir();
    let (a, b) = two_embedded(&dir);
    notices_cross(a, b, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_notices_reach_another_instance() {
    let server = RedisServer::start();
    let (a, b) = two_redis(&server).await;
    notices_cross(a, b, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprefixed_views_read_other_programs_keys() {
    let server = RedisServer::start();
    let store = redis_store(&server, "gw:").await;
    let raw = store.unprefixed();
    raw.set("fnkit:pipeline:p", b"v", None).await.unwrap();
    assert_eq!(store.get("fnkit:pipeline:p").await.unwrap(), None);
    assert_eq!(
        store.get("gw:fnkit:pipeline:p").await.unwrap(),
        None,
        "the prefix is not doubled"
    );
    assert_eq!(
        raw.get("fnkit:pipeline:p").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    // A view dropped leaves the store's connection open.
    drop(store.unprefixed());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(store.get("k").await.is_ok());
    let listed = raw.scan_prefix("fnkit:pipeline:", 10).await.unwrap();
    assert_eq!(listed, vec![("fnkit:pipeline:p".to_owned(), b"v".to_vec())]);
    store.set("k", b"mine", None).await.unwrap();
    assert_eq!(
        raw.get("gw:k").await.unwrap().as_deref(),
        Some(&b"mine"[..])
    );
}

/// Writes by programs that never notify (FnKit's CLI: a plain SET) are seen when
/// the server reports keyspace events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keyspace_events_count_as_notices() {
    let server = RedisServer::start();
    let store = redis_store(&server, "gw:").await;
    let raw = store.unprefixed();
    let mut rx = raw
        .watch("pipelines", Some("fnkit:pipeline:"))
        .await
        .unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(redis_cli())
            .args(["-p", &server.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success());
    };
    cli(&["CONFIG", "SET", "notify-keyspace-events", "K$g"]);
    let g = *rx.borrow();
    cli(&["SET", "fnkit:pipeline:x", "{}"]);
    let g = advances(&mut rx, g, "SET").await;
    cli(&["DEL", "fnkit:pipeline:x"]);
    let g = advances(&mut rx, g, "DEL").await;
    // Other keys do not.
    cli(&["SET", "unrelated", "1"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(*rx.borrow(), g);
}

/// A lost connection may have lost notices: the watcher counts a change when it
/// is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reconnect_counts_as_a_change() {
    let port = common::free_port();
    let server = RedisServer::start_on(port);
    let store = redis_store(&server, "gw:").await;
    let mut rx = store.watch("pipelines", None).await.unwrap();
    let g = *rx.borrow();
    server.kill();
    let _again = RedisServer::start_on(port);
    advances(&mut rx, g, "reconnect").await;
}
