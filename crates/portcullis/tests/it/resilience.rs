//! Upstream resilience (issue 8 §2): active and passive health checks, retries and
//! their budget, circuit breakers, down/recovery notifications, `/admin/upstreams`,
//! `/admin/health` and the target gauges — against real upstream servers that can be
//! made unhealthy or killed outright.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::harness::*;

/// An upstream that can be made to fail (`status`) or killed — listener and every
/// open connection closed, as when its process dies. `/health` answers
/// `health_status`; other paths answer `status` with the upstream's name.
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) name: &'static str,
    pub(crate) status: Arc<AtomicU16>,
    pub(crate) health_status: Arc<AtomicU16>,
    pub(crate) requests: Arc<AtomicUsize>,
    pub(crate) health_requests: Arc<AtomicUsize>,
    tasks: Arc<Mutex<tokio::task::JoinSet<()>>>,
    alive: Arc<AtomicBool>,
}

impl Target {
    pub(crate) async fn start(name: &'static str) -> Target {
        Self::start_on(name, TcpListener::bind("127.0.0.1:0").await.unwrap()).await
    }

    pub(crate) async fn start_on(name: &'static str, listener: TcpListener) -> Target {
        let addr = listener.local_addr().unwrap();
        let t = Target {
            addr,
            name,
            status: Arc::new(AtomicU16::new(200)),
            health_status: Arc::new(AtomicU16::new(200)),
            requests: Arc::new(AtomicUsize::new(0)),
            health_requests: Arc::new(AtomicUsize::new(0)),
            tasks: Arc::new(Mutex::new(tokio::task::JoinSet::new())),
            alive: Arc::new(AtomicBool::new(true)),
        };
        let (status, health, reqs, hreqs, tasks) = (
            t.status.clone(),
            t.health_status.clone(),
            t.requests.clone(),
            t.health_requests.clone(),
            t.tasks.clone(),
        );
        let accept_tasks = tasks.clone();
        tasks.lock().unwrap().spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (status, health, reqs, hreqs) =
                    (status.clone(), health.clone(), reqs.clone(), hreqs.clone());
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let is_health = req.uri().path() == "/health";
                    let code = if is_health {
                        hreqs.fetch_add(1, Ordering::SeqCst);
                        health.load(Ordering::SeqCst)
                    } else {
                        reqs.fetch_add(1, Ordering::SeqCst);
                        status.load(Ordering::SeqCst)
                    };
                    async move {
                        use http_body_util::BodyExt;
                        // Read the whole body, as a real service would.
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(
                            Response::builder().status(code).body(full(name)).unwrap(),
                        )
                    }
                });
                accept_tasks.lock().unwrap().spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        t
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes the listener and every connection.
    pub(crate) fn kill(&self) {
        self.alive.store(false, Ordering::SeqCst);
        self.tasks.lock().unwrap().abort_all();
    }

    /// Listens again on the same port (after [`Target::kill`]).
    pub(crate) async fn revive(self) -> Target {
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        Self::start_on(self.name, listener).await
    }
}

fn group_yaml(targets: &[&Target], extra: &str, route_extra: &str) -> String {
    let list: Vec<String> = targets
        .iter()
        .map(|t| format!("{{url: \"{}\"}}", t.url()))
        .collect();
    format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
admin: {{address: "127.0.0.1:0", token: "admin-S3cret-token"}}
upstreams:
  app:
    targets: [{}]
{extra}
routes:
  - path_prefix: /
    proxy:
      upstream: app
{route_extra}
"#,
        list.join(", ")
    )
}

async fn admin_json(gw: &Gateway, path: &str) -> serde_json::Value {
    client()
        .get(gw.admin_url(path))
        .bearer_auth("admin-S3cret-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until `/admin/health` shows `url` with `status` (fails after 20 s).
async fn wait_status(gw: &Gateway, url: &str, status: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = admin_json(gw, "/admin/health").await;
        if v[url]["status"] == status {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never became {status}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn a_killed_target_is_ejected_and_idempotent_traffic_never_fails() {
    let (a, b, c) = (
        Target::start("a").await,
        Target::start("b").await,
        Target::start("c").await,
    );
    let gw = Gateway::start(&group_yaml(
        &[&a, &b, &c],
        "    health:\n      passive: {failures: 2, eject_for: 30s}\n",
        "",
    ));
    let client = client();
    for i in 0..60 {
        let res = client.get(gw.url(&format!("/x{i}"))).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert!(b.requests.load(Ordering::SeqCst) > 0);
    b.kill();
    let before = b.requests.load(Ordering::SeqCst);
    for i in 0..300 {
        let res = client.get(gw.url(&format!("/y{i}"))).send().await.unwrap();
        assert_eq!(res.status(), 200, "request {i} after the kill");
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), before);
    // Passive ejection: b is skipped, not retried on every third request.
    let retries = gw.metrics().await;
    let retried: f64 = retries
        .lines()
        .filter(|l| l.starts_with("portcullis_upstream_retries_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(retried <= 5.0, "{retried} retries: b was not ejected");
    let view = admin_json(&gw, "/admin/upstreams").await;
    let targets = view["upstreams"][0]["targets"].as_array().unwrap().clone();
    let bv = targets.iter().find(|t| t["url"] == b.url()).unwrap();
    assert_eq!(bv["ejected"], true, "{view}");
    assert_eq!(bv["healthy"], false, "{view}");
    gw.wait_metrics(&[&format!(
        "portcullis_upstream_target_healthy{{upstream=\"app\",target=\"{}\"}} 0",
        b.url()
    )])
    .await;
}

#[tokio::test]
async fn active_checks_take_targets_out_and_back_and_notify_with_the_downtime() {
    let hook = Upstream::serve(false, |req: Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let body = req.into_body().collect().await.unwrap().to_bytes();
        HOOK_BODIES.lock().unwrap().push(body.to_vec());
        Response::new(full("ok"))
    })
    .await;
    let (a, b) = (Target::start("a").await, Target::start("b").await);
    let yaml = group_yaml(
        &[&a, &b],
        "    health:\n      active: {path: /health, interval: 100ms, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 2}\n",
        "",
    ) + &format!(
        "notifications:\n  after: 300ms\n  webhooks:\n    - {{url: \"{}/notify\", tags: [ops, gateway]}}\n",
        hook.url()
    );
    let gw = Gateway::start(&yaml);
    wait_status(&gw, &b.url(), "up").await;

    b.health_status.store(503, Ordering::SeqCst);
    let down = wait_status(&gw, &b.url(), "down").await;
    assert!(down[b.url().as_str()]["firstDownAt"].is_u64(), "{down}");
    // Down: every request goes to a.
    let before = b.requests.load(Ordering::SeqCst);
    for _ in 0..20 {
        let res = client().get(gw.url("/")).send().await.unwrap();
        assert_eq!(res.text().await.unwrap(), "a");
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), before);
    // After `after`, the down notification (Apprise shape).
    let down_note = wait_hook(1).await;
    assert_eq!(down_note["type"], "failure", "{down_note}");
    assert!(down_note["title"].as_str().unwrap().contains(&b.url()));
    assert_eq!(down_note["tag"], "ops,gateway");
    let health = admin_json(&gw, "/admin/health").await;
    assert_eq!(health[b.url().as_str()]["notifiedDown"], true, "{health}");

    b.health_status.store(200, Ordering::SeqCst);
    wait_status(&gw, &b.url(), "up").await;
    let up_note = wait_hook(2).await;
    assert_eq!(up_note["type"], "success", "{up_note}");
    assert!(
        up_note["body"].as_str().unwrap().contains("after"),
        "{up_note}"
    );
    let health = admin_json(&gw, "/admin/health").await;
    let entry = &health[b.url().as_str()];
    assert_eq!(entry["notifiedDown"], false, "{health}");
    assert!(entry["firstDownAt"].is_null(), "{health}");
    assert!(
        entry["lastUp"].is_u64() && entry["latencyMs"].is_u64(),
        "{health}"
    );
    // Traffic reaches b again.
    let mut saw_b = false;
    for _ in 0..10 {
        saw_b |= client()
            .get(gw.url("/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            == "b";
    }
    assert!(saw_b);
    assert_eq!(
        HOOK_BODIES.lock().unwrap().len(),
        2,
        "exactly two notifications"
    );
}

static HOOK_BODIES: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

async fn wait_hook(n: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(b) = HOOK_BODIES.lock().unwrap().get(n - 1) {
            return serde_json::from_slice(b).unwrap();
        }
        assert!(Instant::now() < deadline, "notification {n} never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn json_webhooks_are_retried_until_delivered() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let (c2, s2) = (calls.clone(), seen.clone());
    let hook = Upstream::serve(false, move |req: Request<hyper::body::Incoming>| {
        let (calls, seen) = (c2.clone(), s2.clone());
        async move {
            use http_body_util::BodyExt;
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let body = req.into_body().collect().await.unwrap().to_bytes();
            if n == 0 {
                // The first delivery fails: the gateway tries again.
                return Response::builder().status(500).body(full("")).unwrap();
            }
            seen.lock()
                .unwrap()
                .push(serde_json::from_slice(&body).unwrap());
            Response::new(full("ok"))
        }
    })
    .await;
    let a = Target::start("a").await;
    a.health_status.store(500, Ordering::SeqCst);
    let yaml = group_yaml(
        &[&a],
        "    health:\n      active: {path: /health, interval: 100ms, unhealthy_threshold: 1}\n",
        "",
    ) + &format!(
        "notifications:\n  after: 0s\n  webhooks:\n    - {{url: \"{}\", format: json}}\n",
        hook.url()
    );
    let gw = Gateway::start(&yaml);
    wait_status(&gw, &a.url(), "down").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "never delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let event = seen.lock().unwrap()[0].clone();
    assert_eq!(event["event"], "down", "{event}");
    assert_eq!(event["upstream"], "app");
    assert_eq!(event["target"], a.url());
    assert!(calls.load(Ordering::SeqCst) >= 2);
    // None healthy: 503 SERVICE_UNAVAILABLE, the upstream is not asked.
    let before = a.requests.load(Ordering::SeqCst);
    assert_error(
        client().get(gw.url("/")).send().await.unwrap(),
        503,
        "SERVICE_UNAVAILABLE",
    )
    .await;
    assert_eq!(a.requests.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn panic_mode_tries_unhealthy_targets_when_none_is_healthy() {
    let a = Target::start("a").await;
    a.health_status.store(500, Ordering::SeqCst);
    let gw = Gateway::start(&group_yaml(
        &[&a],
        "    health:\n      panic: true\n      active: {path: /health, interval: 100ms, unhealthy_threshold: 1}\n",
        "",
    ));
    wait_status(&gw, &a.url(), "down").await;
    let res = client().get(gw.url("/")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "a");
}

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
async fn a_target_back_from_the_dead_is_readmitted() {
    let (a, b) = (Target::start("a").await, Target::start("b").await);
    let gw = Gateway::start(&group_yaml(
        &[&a, &b],
        "    health:\n      active: {path: /health, interval: 100ms, unhealthy_threshold: 1, healthy_threshold: 1}\n",
        "",
    ));
    b.kill();
    wait_status(&gw, &b.url(), "down").await;
    let err = admin_json(&gw, "/admin/upstreams").await;
    let bv = err["upstreams"][0]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["url"] == b.url())
        .unwrap()
        .clone();
    assert!(bv["last_error"].is_string(), "{bv}");
    let b = b.revive().await;
    wait_status(&gw, &b.url(), "up").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.requests.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "b never got traffic back");
        let res = client().get(gw.url("/")).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
}

#[tokio::test]
async fn resilience_config_mistakes_are_refused() {
    for (yaml, needle) in [
        (
            "upstreams:\n  app:\n    url: http://127.0.0.1:1\n    breaker: {failures: 2}\nroutes:\n  - path_prefix: /\n    proxy: {upstream: app}\n",
            "list the URL under `targets`",
        ),
        (
            "upstreams:\n  app:\n    targets: [{url: \"http://127.0.0.1:1\"}]\nroutes:\n  - path_prefix: /\n    proxy: {upstream: app, retries: {on: [404]}}\n",
            "expected connect, reset, timeout or a 5xx status",
        ),
        (
            "upstreams:\n  app:\n    targets: [{url: \"http://127.0.0.1:1\"}]\nroutes:\n  - path_prefix: /\n    proxy: {upstream: app, retries: {attempts: 0}}\n",
            "attempts",
        ),
        (
            "upstreams:\n  app:\n    targets: [{url: \"http://127.0.0.1:1\"}]\n    health: {active: {path: health, interval: 0s}}\nroutes:\n  - path_prefix: /\n    proxy: {upstream: app}\n",
            "health.active.path",
        ),
        (
            "upstreams:\n  app:\n    targets: [{url: \"http://127.0.0.1:1\"}]\nnotifications:\n  webhooks: [{url: \"ftp://x\"}]\nroutes:\n  - path_prefix: /\n    proxy: {upstream: app}\n",
            "notifications.webhooks[0].url",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(
            dir.path(),
            &format!("listeners: [{{address: \"127.0.0.1:0\"}}]\n{yaml}"),
        );
        let (code, out, err) = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
        assert_ne!(code, 0, "accepted: {yaml}");
        assert!(
            err.contains(needle) || out.contains(needle),
            "{needle:?} not in:\n{err}{out}"
        );
    }
}

#[tokio::test]
async fn target_state_outlives_a_reload() {
    let (a, b) = (Target::start("a").await, Target::start("b").await);
    let yaml = group_yaml(
        &[&a, &b],
        "    health:\n      passive: {failures: 1, eject_for: 1h}\n",
        "",
    );
    let gw = Gateway::start(&yaml);
    b.status.store(503, Ordering::SeqCst);
    // Round-robin reaches b within two requests; its 503 ejects it.
    for _ in 0..2 {
        client().get(gw.url("/")).send().await.unwrap();
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), 1);
    gw.rewrite_config(&yaml.replace(
        "routes:\n",
        "routes:\n  - path: /extra\n    respond: {status: 204}\n",
    ));
    let res = client()
        .post(gw.admin_url("/admin/reload"))
        .bearer_auth("admin-S3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        client()
            .get(gw.url("/extra"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    for _ in 0..20 {
        let res = client().get(gw.url("/")).send().await.unwrap();
        assert_eq!(res.text().await.unwrap(), "a");
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), 1, "b is still ejected");
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
