//! Circuit breakers: failures, half-open probe, concurrency and queue limits.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Response;

use super::*;

/// GETs `url` until the body is `body` (fails after 10 s).
async fn until_body(url: &str, body: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = client()
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text == body {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never answered {body:?}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_breaker_opens_on_failures_and_closes_after_a_good_probe() {
    let a = Target::start("a").await;
    a.status.store(503, Ordering::SeqCst);
    let gw = Gateway::start(&group_yaml(
        &[&a],
        "    breaker: {failures: 3, open_for: 2s}\n",
        "      retries: false\n",
    ));
    let client = client();
    for _ in 0..3 {
        let res = client.get(gw.url("/")).send().await.unwrap();
        assert_eq!(res.text().await.unwrap(), "a");
    }
    // Open: refused without reaching the target.
    assert_error(
        client.get(gw.url("/")).send().await.unwrap(),
        503,
        "UPSTREAM_OVERLOADED",
    )
    .await;
    assert_eq!(a.requests.load(Ordering::SeqCst), 3);
    let view = admin_json(&gw, "/admin/upstreams").await;
    assert_eq!(
        view["upstreams"][0]["targets"][0]["breaker"], "open",
        "{view}"
    );
    // After open_for, one probe reaches the target; it fails → open again.
    until_body(&gw.url("/"), "a").await;
    assert_eq!(a.requests.load(Ordering::SeqCst), 4);
    assert_error(
        client.get(gw.url("/")).send().await.unwrap(),
        503,
        "UPSTREAM_OVERLOADED",
    )
    .await;
    // The target recovers: the next probe closes the breaker.
    a.status.store(200, Ordering::SeqCst);
    until_status(&gw.url("/"), 200).await;
    for _ in 0..5 {
        assert_eq!(client.get(gw.url("/")).send().await.unwrap().status(), 200);
    }
    let view = admin_json(&gw, "/admin/upstreams").await;
    assert_eq!(
        view["upstreams"][0]["targets"][0]["breaker"], "closed",
        "{view}"
    );
}

#[tokio::test]
async fn the_breaker_limits_concurrent_requests_per_target() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let slow = Upstream::serve(false, move |_req| {
        let held = held.clone();
        async move {
            let _ = held.acquire().await.unwrap();
            Response::new(full("slow"))
        }
    })
    .await;
    let yaml = format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
upstreams:
  app:
    targets: [{{url: "{}"}}]
    breaker: {{max_concurrent: 2}}
routes:
  - path_prefix: /
    proxy: {{upstream: app}}
"#,
        slow.url()
    );
    let gw = Gateway::start(&yaml);
    let client = client();
    let first: Vec<_> = (0..2)
        .map(|_| tokio::spawn(client.get(gw.url("/")).send()))
        .collect();
    slow.wait_requests(2).await;
    // Two in flight: the next ones are refused at once, the target never sees them.
    for _ in 0..4 {
        assert_error(
            client.get(gw.url("/")).send().await.unwrap(),
            503,
            "UPSTREAM_OVERLOADED",
        )
        .await;
    }
    assert_eq!(slow.requests.load(Ordering::SeqCst), 2);
    gate.add_permits(2);
    for f in first {
        assert_eq!(f.await.unwrap().unwrap().status(), 200);
    }
    // Slots free again.
    gate.add_permits(1);
    assert_eq!(client.get(gw.url("/")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn the_breaker_refuses_a_target_whose_connection_queue_is_full() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let slow = Upstream::serve(false, move |_req| {
        let held = held.clone();
        async move {
            let _ = held.acquire().await.unwrap();
            Response::new(full("slow"))
        }
    })
    .await;
    // One connection at most, one request waiting for it at most.
    let yaml = format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
admin: {{address: "127.0.0.1:0", token: "admin-S3cret-token"}}
server: {{workers: 1}}
upstreams:
  app:
    targets: [{{url: "{}"}}]
    pool_max_connections: 1
    breaker: {{max_pending: 1}}
routes:
  - path_prefix: /
    proxy: {{upstream: app}}
"#,
        slow.url()
    );
    let gw = Gateway::start(&yaml);
    let client = client();
    let busy = tokio::spawn(client.get(gw.url("/1")).send());
    slow.wait_requests(1).await;
    let waiting = tokio::spawn(client.get(gw.url("/2")).send());
    // The second request waits for the only connection: the queue is full.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = admin_json(&gw, "/admin/upstreams").await;
        let t = &view["upstreams"][0]["targets"][0];
        if t["pending"] == 1 {
            assert_eq!(t["connections"], 1, "{view}");
            break;
        }
        assert!(Instant::now() < deadline, "never pending: {view}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    assert_error(
        client.get(gw.url("/3")).send().await.unwrap(),
        503,
        "UPSTREAM_OVERLOADED",
    )
    .await;
    // Refused at once, not after waiting for the connect timeout.
    assert!(started.elapsed() < Duration::from_secs(5));
    gate.add_permits(100);
    assert_eq!(busy.await.unwrap().unwrap().status(), 200);
    assert_eq!(waiting.await.unwrap().unwrap().status(), 200);
}
