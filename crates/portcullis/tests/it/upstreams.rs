//! Upstream groups (issue 8, first part): named upstreams with several targets and
//! a balancer — weighted round-robin, least-request, consistent hashing.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::harness::*;

fn group_config(targets: &[(&Upstream, u32)], balancer: &str) -> String {
    let list: Vec<String> = targets
        .iter()
        .map(|(u, w)| format!("{{url: \"{}\", weight: {w}}}", u.url()))
        .collect();
    format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
upstreams:
  app:
    targets: [{}]
    balancer: {balancer}
routes:
  - path_prefix: /
    proxy: {{upstream: app}}
"#,
        list.join(", ")
    )
}

#[tokio::test]
async fn weighted_round_robin_spreads_by_weight() {
    let (a, b, c) = (
        Upstream::echo().await,
        Upstream::echo().await,
        Upstream::echo().await,
    );
    let gw = Gateway::start(&group_config(&[(&a, 1), (&b, 1), (&c, 2)], "round_robin"));
    let client = client();
    for i in 0..2_000 {
        let res = client.get(gw.url(&format!("/r{i}"))).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let counts = [&a, &b, &c].map(|u| u.requests.load(Ordering::SeqCst));
    for (got, want) in counts.iter().zip([500usize, 500, 1_000]) {
        assert!(got.abs_diff(want) <= want / 20, "{counts:?}");
    }
}

#[tokio::test]
async fn consistent_hashing_keeps_keys_and_a_fourth_target_moves_few() {
    let ups = [
        Upstream::echo().await,
        Upstream::echo().await,
        Upstream::echo().await,
        Upstream::echo().await,
    ];
    let three = Gateway::start(&group_config(
        &[(&ups[0], 1), (&ups[1], 1), (&ups[2], 1)],
        "{hash: \"header:x-user\"}",
    ));
    let four = Gateway::start(&group_config(
        &[(&ups[0], 1), (&ups[1], 1), (&ups[2], 1), (&ups[3], 1)],
        "{hash: \"header:x-user\"}",
    ));
    let client = client();
    // Which upstream saw the request: the echo's Host header names it.
    let target = |gw: &Gateway, user: String| {
        let req = client.get(gw.url("/x")).header("x-user", user);
        async move {
            let body: serde_json::Value = req.send().await.unwrap().json().await.unwrap();
            body["headers"]["host"][0].as_str().unwrap().to_owned()
        }
    };
    let mut moved = 0;
    for i in 0..300 {
        let user = format!("user-{i}");
        let first = target(&three, user.clone()).await;
        assert_eq!(first, target(&three, user.clone()).await, "{user} moved");
        if first != target(&four, user).await {
            moved += 1;
        }
    }
    assert!(moved <= 90, "{moved} of 300 keys moved");
    assert!(moved > 0);
    // No key: round-robin, every target used.
    for _ in 0..30 {
        client.get(three.url("/nokey")).send().await.unwrap();
    }
    for u in &ups[..3] {
        assert!(u.requests.load(Ordering::SeqCst) > 0);
    }
}

#[tokio::test]
async fn least_request_avoids_a_slow_target() {
    let fast_a = Upstream::echo().await;
    let fast_b = Upstream::echo().await;
    let slow = Upstream::serve(false, |_req| async move {
        tokio::time::sleep(Duration::from_millis(80)).await;
        hyper::Response::new(full("slow"))
    })
    .await;
    let gw = Gateway::start(&group_config(
        &[(&fast_a, 1), (&fast_b, 1), (&slow, 1)],
        "least_request",
    ));
    let client = client();
    for i in 0..150 {
        let res = client.get(gw.url(&format!("/{i}"))).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let slow_n = slow.requests.load(Ordering::SeqCst);
    assert!(slow_n < 30, "the slow target got {slow_n} of 150");
}

#[test]
fn group_config_mistakes_fail_check() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_config(
        dir.path(),
        r#"listeners: [{address: "127.0.0.1:0"}]
upstreams:
  both: {url: "http://127.0.0.1:1", targets: [{url: "http://127.0.0.1:2"}]}
  neither: {}
  heavy: {targets: [{url: "http://127.0.0.1:1", weight: 5000}, {url: "http://127.0.0.1:1"}]}
  badhash: {targets: [{url: "http://127.0.0.1:1"}], balancer: {hash: "body"}}
  templated: {targets: [{url: "http://{name}:8080"}]}
routes:
  - {path: /a, proxy: {upstream: both}}
  - {path: /b, proxy: {upstream: neither}}
  - {path: /c, proxy: {upstream: heavy}}
  - {path: /d, proxy: {upstream: badhash}}
  - {path: /e, proxy: {upstream: templated}}
"#,
    );
    let (code, _out, err) = run_cli(&["check", "-c", &p.display().to_string()], &[]);
    assert_ne!(code, 0);
    for needle in [
        "upstreams.both: set either `url` or `targets`",
        "upstreams.neither: needs a `url` or `targets`",
        "upstreams.heavy.targets[0].weight",
        "upstreams.heavy.targets[1].url: listed twice",
        "upstreams.badhash.balancer.hash",
        "upstreams.templated.targets[0].url",
    ] {
        assert!(err.contains(needle), "{needle} missing from:\n{err}");
    }
}
