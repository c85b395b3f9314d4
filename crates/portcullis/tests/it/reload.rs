//! Hot reload: SIGHUP, admin API, file watching; in-flight work keeps its snapshot.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;

fn config(body: &str, watch: bool, extra_routes: &str) -> String {
    format!(
        r#"
listeners:
  - address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
  token: adm
server:
  watch_config: {watch}
routes:
  - name: version
    path: /version
    respond:
      body: "{body}"
{extra_routes}
"#
    )
}

async fn body_of(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn eventually(url: &str, expected: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if body_of(url).await == expected {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn sighup_reloads() {
    let gw = Gateway::start(&config("one", false, ""));
    assert_eq!(body_of(&gw.url("/version")).await, "one");
    gw.rewrite_config(&config("two", false, ""));
    // No file watching: nothing changes until the signal.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(body_of(&gw.url("/version")).await, "one");
    gw.signal(libc::SIGHUP);
    assert!(eventually(&gw.url("/version"), "two").await);
}

#[tokio::test]
async fn admin_reload_and_invalid_config_keeps_the_old_one() {
    let gw = Gateway::start(&config("one", false, ""));
    let c = client();
    gw.rewrite_config(&config("two", false, ""));
    let res = c
        .post(gw.admin_url("/admin/reload"))
        .bearer_auth("adm")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["generation"], 2);
    assert_eq!(body_of(&gw.url("/version")).await, "two");

    // Unauthenticated reloads are refused.
    let res = c.post(gw.admin_url("/admin/reload")).send().await.unwrap();
    assert_eq!(res.status(), 401);

    // A broken config is rejected with its errors, and the running one stays.
    gw.rewrite_config(&config("three", false, "  - path: /bad\n    proxi: {}\n"));
    let res = c
        .post(gw.admin_url("/admin/reload"))
        .bearer_auth("adm")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "INVALID_CONFIG");
    let details = v["error"]["details"][0].as_str().unwrap();
    assert!(
        details.contains("proxi") && details.contains("portcullis.yaml:"),
        "{details}"
    );
    assert_eq!(body_of(&gw.url("/version")).await, "two");

    let metrics = body_of(&gw.admin_url("/metrics")).await;
    assert!(
        metrics.contains(r#"portcullis_config_reloads_total{result="success"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"portcullis_config_reloads_total{result="failure"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_config_generation 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn file_change_reloads_even_when_saved_by_rename() {
    let gw = Gateway::start(&config("one", true, ""));
    gw.rewrite_config(&config("two", true, ""));
    assert!(
        eventually(&gw.url("/version"), "two").await,
        "{}",
        gw.logs()
    );
    // An invalid save is logged and ignored.
    gw.rewrite_config("routes: [oops");
    assert!(
        gw.wait_log("config reload rejected", Duration::from_secs(10))
            .await
    );
    assert_eq!(body_of(&gw.url("/version")).await, "two");
    // In-place write (no rename) is seen too.
    std::fs::write(&gw.config_path, config("three", true, "")).unwrap();
    assert!(eventually(&gw.url("/version"), "three").await);
}

#[tokio::test]
async fn kubernetes_symlink_swap_reloads() {
    // ConfigMap layout: portcullis.yaml -> ..data/portcullis.yaml, ..data -> ..v1
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..v1")).unwrap();
    std::fs::write(d.join("..v1/portcullis.yaml"), config("one", true, "")).unwrap();
    std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/portcullis.yaml", d.join("portcullis.yaml")).unwrap();
    let gw = Gateway::start_file(&d.join("portcullis.yaml"), &[]);
    assert_eq!(body_of(&gw.url("/version")).await, "one");

    std::fs::create_dir(d.join("..v2")).unwrap();
    std::fs::write(d.join("..v2/portcullis.yaml"), config("two", true, "")).unwrap();
    std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(d.join("..v1")).unwrap();
    assert!(eventually(&gw.url("/version"), "two").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn open_streams_keep_their_snapshot_across_reload() {
    use tokio_tungstenite::tungstenite::Message;
    let (sse, gate) = Upstream::sse_gated(8).await;
    let ws = Upstream::ws_echo().await;
    let routes = format!(
        "  - name: events\n    path: /events\n    proxy:\n      upstream: {}\n  - name: ws\n    path: /ws\n    proxy:\n      upstream: {}\n",
        sse.url(),
        ws.url()
    );
    let gw = Gateway::start(&config("one", false, &routes));

    // Both are open and have carried data before the reload.
    let res = client().get(gw.url("/events")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let mut events = SseReader::new(res);
    assert_eq!(events.next_event().await, 0);
    gate.add_permits(1);
    assert_eq!(events.next_event().await, 1);
    let (mut socket, _) = ws_connect(&format!("ws://{}/ws", gw.addr()))
        .await
        .expect("websocket handshake");
    ws_send(&mut socket, Message::text("before")).await;
    assert_eq!(ws_next(&mut socket).await, Message::text("before"));

    // Remove both routes while the stream and the socket are open.
    gw.rewrite_config(&config("two", false, ""));
    let res = client()
        .post(gw.admin_url("/admin/reload"))
        .bearer_auth("adm")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(body_of(&gw.url("/version")).await, "two");
    assert_eq!(
        client()
            .get(gw.url("/events"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // The events the upstream sends only now still arrive, and the stream ends cleanly.
    for i in 2..8 {
        gate.add_permits(1);
        assert_eq!(events.next_event().await, i);
    }
    events.expect_end().await;

    ws_send(&mut socket, Message::text("still here")).await;
    assert_eq!(ws_next(&mut socket).await, Message::text("still here"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_loses_no_request() {
    let up = Upstream::echo().await;
    let route = |tag: &str| {
        format!("  - name: api\n    path_prefix: /api\n    proxy:\n      upstream: {}\n      rewrite: /{tag}\n", up.url())
    };
    let gw = Arc::new(Gateway::start(&config("one", false, &route("a"))));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (gw, ok, failed, stop) = (gw.clone(), ok.clone(), failed.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::SeqCst) {
                match c.get(gw.url("/api/x")).send().await {
                    Ok(r) if r.status() == 200 => {
                        r.bytes().await.unwrap();
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let c = client();
    for i in 0..10 {
        // Between reloads, wait for requests to be served (not for wall-clock time).
        wait_for_more(&ok, 25).await;
        gw.rewrite_config(&config(
            "x",
            false,
            &route(if i % 2 == 0 { "b" } else { "a" }),
        ));
        let res = c
            .post(gw.admin_url("/admin/reload"))
            .bearer_auth("adm")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    wait_for_more(&ok, 25).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok >= 275, "too few requests: {ok}");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during reloads",
        ok + failed
    );
}

/// Waits until `counter` has grown by `n` (fails after 30 s).
async fn wait_for_more(counter: &AtomicUsize, n: usize) {
    let target = counter.load(Ordering::Relaxed) + n;
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter.load(Ordering::Relaxed) < target {
        assert!(Instant::now() < deadline, "requests stopped being served");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
