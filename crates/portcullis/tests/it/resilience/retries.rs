//! Retries: idempotency, replay buffer, budget, slow uploads, full pools, and the
//! first pick on the client's own headers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::Response;

use super::*;

#[tokio::test]
async fn a_post_is_never_retried_unless_the_route_says_so() {
    let (a, b) = (Target::start("a").await, Target::start("b").await);
    a.status.store(503, Ordering::SeqCst);
    b.status.store(503, Ordering::SeqCst);
    let routes: String = [("/p", ""), ("/get", ""), ("/opt-in", ", non_idempotent: true")]
        .iter()
        .map(|(path, extra)| {
            format!("  - path: {path}\n    proxy:\n      upstream: app\n      retries: {{attempts: 2, on: [503]{extra}}}\n")
        })
        .collect();
    let gw = Gateway::start(&format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nupstreams:\n  app:\n    targets: [{{url: \"{}\"}}, {{url: \"{}\"}}]\nroutes:\n{routes}",
        a.url(),
        b.url()
    ));
    let total = || a.requests.load(Ordering::SeqCst) + b.requests.load(Ordering::SeqCst);
    let client = client();

    let res = client.post(gw.url("/p")).body("x").send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(total(), 1, "a POST went out more than once");

    let res = client.get(gw.url("/get")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(total(), 3, "a GET is retried on the other target");

    let res = client
        .post(gw.url("/opt-in"))
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(total(), 5, "non_idempotent: true retries a small POST");

    // A body larger than the replay buffer streams once.
    let big = vec![b'x'; 100 * 1024];
    let res = client
        .post(gw.url("/opt-in"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(total(), 6, "a body over replay_buffer is never retried");
}

#[tokio::test]
async fn the_retry_budget_caps_attempts_when_every_target_fails() {
    let (a, b) = (Target::start("a").await, Target::start("b").await);
    a.status.store(503, Ordering::SeqCst);
    b.status.store(503, Ordering::SeqCst);
    let gw = Gateway::start(&group_yaml(
        &[&a, &b],
        "",
        "      retries: {attempts: 3, on: [503], budget_percent: 20, min_per_second: 0, backoff: 1ms}\n",
    ));
    let client = client();
    for _ in 0..100 {
        // Retried or not, the client gets the upstream's own 503, never a
        // gateway-made error.
        let res = client.get(gw.url("/")).send().await.unwrap();
        assert_eq!(res.status(), 503);
        let body = res.text().await.unwrap();
        assert!(body == "a" || body == "b", "{body}");
    }
    let attempts = a.requests.load(Ordering::SeqCst) + b.requests.load(Ordering::SeqCst);
    // Without a budget: 300. With 20 %: 100 + 20.
    assert!((100..=121).contains(&attempts), "{attempts} attempts");
    gw.wait_metrics(&["portcullis_upstream_retries_total{route=\"route-0\",kind=\"status\"} 20"])
        .await;
}

#[tokio::test]
async fn a_slow_client_upload_is_not_held_against_the_target() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = Target::start("a").await;
    let gw = Gateway::start(&group_yaml(
        &[&a],
        "    health:\n      passive: {failures: 1, eject_for: 1h}\n",
        "      timeouts: {response: 300ms}\n",
    ));
    // A POST that announces 100 bytes and sends 10: the upstream waits for the rest,
    // the gateway times out (504), and the target did nothing wrong.
    let mut s = tcp_connect(gw.addr()).await;
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    // Not ejected: the next request is served.
    let res = client().get(gw.url("/")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "a");
}

#[tokio::test]
async fn hashing_on_host_uses_the_clients_host_header() {
    let ts = [
        Target::start("a").await,
        Target::start("b").await,
        Target::start("c").await,
    ];
    let gw = Gateway::start(&group_yaml(
        &[&ts[0], &ts[1], &ts[2]],
        "    balancer: {hash: \"header:host\"}\n",
        "",
    ));
    let client = client();
    for host in ["one.test", "two.test", "three.test", "four.test"] {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10 {
            let res = client
                .get(gw.url("/"))
                .header("host", host)
                .send()
                .await
                .unwrap();
            seen.insert(res.text().await.unwrap());
        }
        assert_eq!(seen.len(), 1, "{host} went to {seen:?}");
    }
}

#[tokio::test]
async fn a_full_connection_pool_is_retried_on_another_target() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let busy = Upstream::serve(false, move |_req| {
        let held = held.clone();
        async move {
            let _ = held.acquire().await.unwrap();
            Response::new(full("busy"))
        }
    })
    .await;
    let free = Target::start("free").await;
    // One connection per target; a request finding it busy waits 300 ms, then goes
    // to the other target instead of failing.
    let yaml = format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
server: {{workers: 1}}
upstreams:
  app:
    targets: [{{url: "{}"}}, {{url: "{}"}}]
    pool_max_connections: 1
routes:
  - path_prefix: /
    proxy:
      upstream: app
      timeouts: {{connect: 300ms}}
"#,
        busy.url(),
        free.url()
    );
    let gw = Gateway::start(&yaml);
    let client = client();
    // Round-robin: the first request holds the busy target's only connection.
    let first = tokio::spawn(client.get(gw.url("/1")).send());
    busy.wait_requests(1).await;
    for i in 0..4 {
        let res = client.get(gw.url(&format!("/{i}"))).send().await.unwrap();
        assert_eq!(res.status(), 200, "request {i}");
        assert_eq!(res.text().await.unwrap(), "free");
    }
    assert_eq!(busy.requests.load(Ordering::SeqCst), 1);
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
}

#[tokio::test]
async fn a_stalled_body_kept_for_replay_is_a_408_and_never_reaches_a_target() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, b) = (Target::start("a").await, Target::start("b").await);
    // A group of two retries PUTs, so their bodies are read first for replay.
    let gw = Gateway::start(&group_yaml(
        &[&a, &b],
        "",
        "      timeouts: {body: 300ms}\n",
    ));
    let mut s = tcp_connect(gw.addr()).await;
    s.write_all(b"PUT /doc HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("REQUEST_TIMEOUT"), "{answer}");
    assert_eq!(
        a.requests.load(Ordering::SeqCst) + b.requests.load(Ordering::SeqCst),
        0
    );
}
