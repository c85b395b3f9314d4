//! Active and passive health checks, panic mode, notifications, re-admission,
//! state across reloads.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::{Request, Response};

use super::*;

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
