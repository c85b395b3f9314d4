//! Rate limits (`rate_limits:`): local and cluster (Redis, embedded store), keys,
//! algorithms, headers, store outages, `defaults:` and config errors.

use std::time::{Duration, Instant};

use crate::harness::*;
use crate::redis_harness::RedisServer;

/// A gateway answering `respond` routes, trusting X-Forwarded-For from loopback (so a
/// test can be many clients), with an admin listener and `extra` top-level YAML.
fn config(extra: &str, routes: &str) -> String {
    format!(
        r#"listeners:
  - address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
  token: adm
server:
  trusted_proxies: [127.0.0.1]
{extra}
routes:
{routes}
"#
    )
}

async fn get(c: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = c.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

fn header(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// Sends requests until one answers `status` (others must answer `from`); fails
/// after 15 s.
async fn until(
    c: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    from: u16,
    status: u16,
) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let res = get(c, url, headers).await;
        let got = res.status().as_u16();
        if got == status {
            return res;
        }
        assert_eq!(got, from, "{url}: unexpected status before {status}");
        assert!(Instant::now() < deadline, "{url}: never answered {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn per_ip_limit_answers_429_with_envelope_retry_after_and_headers() {
    let gw = Gateway::start(&config(
        "",
        r#"  - name: login
    path_prefix: /auth
    rate_limits: [{requests: 3, per: 1m, by: ip}]
    respond: {body: ok}
  - name: legacy
    path: /legacy
    rate_limits: [{name: per-ip, requests: 2, per: 10s, headers: both}]
    respond: {body: ok}"#,
    ));
    let c = client();
    let url = gw.url("/auth/login");
    let a = [("x-forwarded-for", "192.0.2.1")];
    for i in 0..3 {
        let res = get(&c, &url, &a).await;
        assert_eq!(res.status(), 200, "request {i}");
        assert_eq!(
            header(&res, "ratelimit-policy").as_deref(),
            Some(r#""login-0";q=3;w=60"#)
        );
        let rl = header(&res, "ratelimit").unwrap();
        assert!(
            rl.starts_with(&format!(r#""login-0";r={};t="#, 2 - i)),
            "{rl}"
        );
        let t: u64 = rl.rsplit("t=").next().unwrap().parse().unwrap();
        assert!(t <= 60, "{rl}");
        assert!(header(&res, "x-ratelimit-limit").is_none());
    }
    let res = get(&c, &url, &a).await;
    let retry: u64 = header(&res, "retry-after").unwrap().parse().unwrap();
    assert!((1..=120).contains(&retry), "{retry}");
    assert!(header(&res, "ratelimit")
        .unwrap()
        .starts_with(r#""login-0";r=0;t="#));
    assert_eq!(
        header(&res, "ratelimit-policy").as_deref(),
        Some(r#""login-0";q=3;w=60"#)
    );
    assert_error(res, 429, "RATE_LIMITED").await;

    // Another client has its own count.
    let res = get(&c, &url, &[("x-forwarded-for", "192.0.2.2")]).await;
    assert_eq!(res.status(), 200);

    // IPv6 clients are counted by /64.
    for i in 0..3 {
        let res = get(&c, &url, &[("x-forwarded-for", "2001:db8:1:2::1")]).await;
        assert_eq!(res.status(), 200, "v6 request {i}");
    }
    let res = get(&c, &url, &[("x-forwarded-for", "2001:db8:1:2:ffff::9")]).await;
    assert_error(res, 429, "RATE_LIMITED").await;
    let res = get(&c, &url, &[("x-forwarded-for", "2001:db8:1:3::1")]).await;
    assert_eq!(res.status(), 200);

    // `headers: both`: the legacy headers too.
    let url = gw.url("/legacy");
    let res = get(&c, &url, &a).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-ratelimit-limit").as_deref(), Some("2"));
    assert_eq!(header(&res, "x-ratelimit-remaining").as_deref(), Some("1"));
    let reset: u64 = header(&res, "x-ratelimit-reset").unwrap().parse().unwrap();
    assert!(reset <= 10);
    assert!(header(&res, "ratelimit").is_some());
    get(&c, &url, &a).await;
    let res = get(&c, &url, &a).await;
    assert_eq!(header(&res, "x-ratelimit-remaining").as_deref(), Some("0"));
    assert_error(res, 429, "RATE_LIMITED").await;

    gw.wait_metrics(&[
        r#"portcullis_ratelimit_decisions_total{route="login",limit="login-0",result="allowed"} 8"#,
        r#"portcullis_ratelimit_decisions_total{route="login",limit="login-0",result="limited"} 2"#,
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_by_header_and_principal_count_separately_and_absent_keys_are_not_limited() {
    let gw = Gateway::start(&config(
        r#"auth: {open: true}
authenticators:
  alice: {static_token: {tokens: [token-a], principal: alice}}
  bob: {static_token: {tokens: [token-b], principal: bob}}"#,
        r#"  - name: tenant
    path: /t
    rate_limits:
      - {name: per-ip, requests: 100, per: 1m, by: ip}
      - {name: per-tenant, requests: 2, per: 1m, by: "header:x-tenant"}
    respond: {body: ok}
  - name: user
    path: /u
    auth: {authenticators: [alice, bob], optional: true}
    rate_limits: [{name: per-user, requests: 2, per: 1m, by: principal}]
    respond: {body: ok}"#,
    ));
    let c = client();
    let url = gw.url("/t");
    for i in 0..2 {
        let res = get(&c, &url, &[("x-tenant", "a")]).await;
        assert_eq!(res.status(), 200, "tenant a {i}");
        // Both limits in the policy; the one closest to exhaustion in RateLimit.
        assert_eq!(
            header(&res, "ratelimit-policy").as_deref(),
            Some(r#""per-ip";q=100;w=60, "per-tenant";q=2;w=60"#)
        );
        let rl = header(&res, "ratelimit").unwrap();
        assert!(
            rl.starts_with(&format!(r#""per-tenant";r={};"#, 1 - i)),
            "{rl}"
        );
    }
    let res = get(&c, &url, &[("x-tenant", "a")]).await;
    assert_error(res, 429, "RATE_LIMITED").await;
    let res = get(&c, &url, &[("x-tenant", "b")]).await;
    assert_eq!(res.status(), 200);
    // Without the header the tenant limit does not apply (the IP limit does).
    for _ in 0..4 {
        let res = get(&c, &url, &[]).await;
        assert_eq!(res.status(), 200);
        assert!(header(&res, "ratelimit")
            .unwrap()
            .starts_with(r#""per-ip";"#));
    }

    let url = gw.url("/u");
    let alice = [("authorization", "Bearer token-a")];
    let bob = [("authorization", "Bearer token-b")];
    for i in 0..2 {
        assert_eq!(get(&c, &url, &alice).await.status(), 200, "alice {i}");
    }
    assert_error(get(&c, &url, &alice).await, 429, "RATE_LIMITED").await;
    assert_eq!(get(&c, &url, &bob).await.status(), 200);
    // Anonymous requests have no principal: not limited, no RateLimit header.
    for _ in 0..4 {
        let res = get(&c, &url, &[]).await;
        assert_eq!(res.status(), 200);
        assert!(header(&res, "ratelimit").is_none());
        assert_eq!(
            header(&res, "ratelimit-policy").as_deref(),
            Some(r#""per-user";q=2;w=60"#)
        );
    }
    // A refused credential is answered by auth; the limit never counts it.
    let res = get(&c, &url, &[("authorization", "Bearer nope")]).await;
    assert_error(res, 401, "UNAUTHORIZED").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_bucket_allows_a_burst_then_refills() {
    let gw = Gateway::start(&config(
        "",
        r#"  - name: bucket
    path: /b
    rate_limits: [{requests: 2, per: 1s, algorithm: token_bucket, burst: 4}]
    respond: {body: ok}"#,
    ));
    let c = client();
    let url = gw.url("/b");
    let mut ok = 0;
    // The burst (and at most what refills while these run).
    loop {
        let res = get(&c, &url, &[]).await;
        if res.status() == 429 {
            let retry: u64 = header(&res, "retry-after").unwrap().parse().unwrap();
            assert_eq!(retry, 1);
            assert_error(res, 429, "RATE_LIMITED").await;
            break;
        }
        assert_eq!(res.status(), 200);
        ok += 1;
        assert!(ok <= 20, "the bucket never ran dry");
    }
    assert!(ok >= 4, "burst of 4, got {ok}");
    // A token comes back within half a second.
    let res = until(&c, &url, &[], 429, 200).await;
    assert!(header(&res, "ratelimit")
        .unwrap()
        .starts_with(r#""bucket-0";r=0;"#));
}

#[tokio::test(flavor = "multi_thread")]
async fn defaults_apply_false_turns_off_and_reload_keeps_counters() {
    let yaml = config(
        "defaults:\n  rate_limits: [{name: everyone, requests: 2, per: 1h}]",
        r#"  - name: limited
    path: /limited
    respond: {body: ok}
  - name: free
    path: /free
    rate_limits: false
    respond: {body: ok}"#,
    );
    let gw = Gateway::start(&yaml);
    let c = client();
    for _ in 0..2 {
        let res = get(&c, &gw.url("/limited"), &[]).await;
        assert_eq!(res.status(), 200);
        assert_eq!(
            header(&res, "ratelimit-policy").as_deref(),
            Some(r#""everyone";q=2;w=3600"#)
        );
    }
    assert_error(get(&c, &gw.url("/limited"), &[]).await, 429, "RATE_LIMITED").await;
    for _ in 0..5 {
        let res = get(&c, &gw.url("/free"), &[]).await;
        assert_eq!(res.status(), 200);
        assert!(header(&res, "ratelimit-policy").is_none());
    }

    // A reload of the same limits keeps their counters.
    gw.rewrite_config(&yaml);
    let res = c
        .post(gw.admin_url("/admin/reload"))
        .bearer_auth("adm")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_error(get(&c, &gw.url("/limited"), &[]).await, 429, "RATE_LIMITED").await;
}

/// Fires `n` concurrent requests at `url`s in turn; returns (200s, 429s).
async fn storm(urls: &[String], n: usize) -> (usize, usize) {
    let c = client_builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let c = c.clone();
        let url = urls[i % urls.len()].clone();
        tasks.spawn(async move { c.get(url).send().await.unwrap().status().as_u16() });
    }
    let (mut ok, mut limited) = (0, 0);
    while let Some(status) = tasks.join_next().await {
        match status.unwrap() {
            200 => ok += 1,
            429 => limited += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    (ok, limited)
}

fn cluster_routes() -> &'static str {
    r#"  - name: shared
    path: /s
    rate_limits: [{requests: 100, per: 1m, by: ip, scope: cluster}]
    respond: {body: ok}"#
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_limit_holds_across_two_gateways_on_one_redis() {
    let redis = RedisServer::start();
    let store = format!("store: {{url: \"redis://127.0.0.1:{}\"}}", redis.port);
    let a = Gateway::start(&config(&store, cluster_routes()));
    let b = Gateway::start(&config(&store, cluster_routes()));
    let (ok, limited) = storm(&[a.url("/s"), b.url("/s")], 400).await;
    assert!((98..=100).contains(&ok), "admitted {ok}");
    assert_eq!(ok + limited, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_limit_holds_across_two_gateways_on_one_embedded_store() {
    let shared = tempfile::tempdir().unwrap();
    let store = format!(
        "store: {{data_dir: \"{}\"}}",
        shared.path().join("data").display()
    );
    let a = Gateway::start(&config(&store, cluster_routes()));
    let b = Gateway::start(&config(&store, cluster_routes()));
    let (ok, limited) = storm(&[a.url("/s"), b.url("/s")], 400).await;
    assert!((98..=100).contains(&ok), "admitted {ok}");
    assert_eq!(ok + limited, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_outage_fails_open_or_closed_per_limit_never_500() {
    let redis = RedisServer::start();
    let port = redis.port;
    let store = format!("store: {{url: \"redis://127.0.0.1:{port}\", timeout: 500ms}}");
    let gw = Gateway::start(&config(
        &store,
        r#"  - name: open
    path: /open
    rate_limits: [{requests: 1000, per: 1m, scope: cluster}]
    respond: {body: ok}
  - name: closed
    path: /closed
    rate_limits: [{requests: 1000, per: 1m, scope: cluster, on_store_error: fail_closed}]
    respond: {body: ok}"#,
    ));
    let c = client();
    assert_eq!(get(&c, &gw.url("/open"), &[]).await.status(), 200);
    assert_eq!(get(&c, &gw.url("/closed"), &[]).await.status(), 200);
    drop(redis);

    let res = until(&c, &gw.url("/closed"), &[], 200, 503).await;
    assert_error(res, 503, "SERVICE_UNAVAILABLE").await;
    for _ in 0..5 {
        let res = get(&c, &gw.url("/open"), &[]).await;
        assert_eq!(res.status(), 200);
        // Nothing was counted: no RateLimit header for this request.
        assert!(header(&res, "ratelimit").is_none());
        assert_error(
            get(&c, &gw.url("/closed"), &[]).await,
            503,
            "SERVICE_UNAVAILABLE",
        )
        .await;
    }
    gw.wait_metrics(&[
        r#"portcullis_ratelimit_decisions_total{route="open",limit="open-0",result="store_error"} 5"#,
        r#"portcullis_ratelimit_decisions_total{route="closed",limit="closed-0",result="store_error"}"#,
    ])
    .await;
    // Logged once for the outage, not once per request.
    let logs = gw.logs();
    assert_eq!(
        logs.matches("rate-limit store unavailable").count(),
        1,
        "{logs}"
    );

    // Redis back on the same port: counted again, the recovery logged; a second
    // outage is logged again.
    let redis = RedisServer::start_on(port);
    until(&c, &gw.url("/closed"), &[], 503, 200).await;
    assert!(
        gw.wait_log("rate-limit store reachable again", Duration::from_secs(10))
            .await
    );
    drop(redis);
    until(&c, &gw.url("/closed"), &[], 200, 503).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.logs().matches("rate-limit store unavailable").count() < 2 {
        assert!(Instant::now() < deadline, "second outage not logged");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for _ in 0..3 {
        get(&c, &gw.url("/closed"), &[]).await;
    }
    let logs = gw.logs();
    assert_eq!(
        logs.matches("rate-limit store unavailable").count(),
        2,
        "{logs}"
    );
}

/// `portcullis check` on `yaml`: (exit code, stderr).
fn check(yaml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), yaml);
    let (code, out, err) = run_cli(&["check", "-c", &path.display().to_string()], &[]);
    (code, format!("{out}{err}"))
}

#[test]
fn check_reports_bad_rate_limits_by_field() {
    let yaml = r#"listeners:
  - address: 127.0.0.1:0
defaults:
  rate_limits: [{requests: 5, per: 1m, by: "ip+hostname"}]
routes:
  - path: /a
    rate_limits: [{requests: 5, per: 1m, by: "query:x"}]
    respond: {body: a}
  - path: /b/{id}
    rate_limits: [{requests: 5, per: 1m, by: "param:user"}]
    respond: {body: b}
  - path: /c
    rate_limits: [{requests: 0, per: 1m}]
    respond: {body: c}
  - path: /d
    rate_limits: [{requests: 5, per: 0s}]
    respond: {body: d}
  - path: /e
    rate_limits: [{requests: 5, per: 1m, algorithm: token_bucket, burst: 0}]
    respond: {body: e}
  - path: /f
    rate_limits: [{requests: 5, per: 1m, ipv6_prefix: 129}]
    respond: {body: f}
  - path: /g
    rate_limits: [{name: x, requests: 5, per: 1m}, {name: x, requests: 9, per: 1h}]
    respond: {body: g}
  - path: /h
    respond: {body: h}
"#;
    let (code, err) = check(yaml);
    assert_eq!(code, 1, "{err}");
    for needle in [
        "routes[0].rate_limits[0].by",
        "\"query:\"",
        "routes[1].rate_limits[0].by",
        "param \"user\" is not captured",
        "routes[2].rate_limits[0].requests",
        "routes[3].rate_limits[0].per",
        "routes[4].rate_limits[0].burst",
        "routes[5].rate_limits[0].ipv6_prefix",
        "routes[6].rate_limits[1].name",
        "duplicate limit name \"x\"",
        "defaults.rate_limits[0].by",
        "\"hostname\"",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }

    // Cluster limits on the embedded store are fine, as is the seed's one-liner.
    let (code, err) = check(
        r#"listeners:
  - address: 127.0.0.1:0
routes:
  - path_prefix: /auth
    rate_limits: [{requests: 60, per: 1m, by: ip}]
    respond: {body: a}
  - path: /x/{tenant}
    rate_limits:
      - {requests: 10, per: 1s, by: "ip+param:tenant", scope: cluster, algorithm: token_bucket, burst: 20}
      - {requests: 1000, per: 1h, by: "header:x-tenant+cookie:sid", headers: legacy}
    respond: {body: b}
"#,
    );
    assert_eq!(code, 0, "{err}");
}

/// The same limit name on two gateways keeps separate local counts (`scope: local`).
#[tokio::test(flavor = "multi_thread")]
async fn local_limits_are_per_process() {
    let routes = r#"  - name: local
    path: /l
    rate_limits: [{requests: 2, per: 1h}]
    respond: {body: ok}"#;
    let a = Gateway::start(&config("", routes));
    let b = Gateway::start(&config("", routes));
    let c = client();
    for gw in [&a, &b] {
        for _ in 0..2 {
            assert_eq!(get(&c, &gw.url("/l"), &[]).await.status(), 200);
        }
        assert_error(get(&c, &gw.url("/l"), &[]).await, 429, "RATE_LIMITED").await;
    }
}

/// A byte that is not ASCII elsewhere in `Cookie` must not hide the counted cookie
/// (the upstream still gets it).
#[tokio::test]
async fn cookie_keys_are_read_as_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::echo().await;
    let gw = Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
routes:
  - path_prefix: /
    rate_limits: [{{requests: 1, per: 1m, by: "cookie:sid"}}]
    proxy: {{upstream: "{}"}}
"#,
        up.url()
    ));
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let mut s = tcp_connect(gw.addr()).await;
        let mut req =
            b"GET /x HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\nCookie: x=".to_vec();
        req.extend_from_slice(&[0xff, 0xfe]);
        req.extend_from_slice(b"; sid=abc\r\n\r\n");
        s.write_all(&req).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("answer in time")
            .unwrap();
        statuses.push(String::from_utf8_lossy(&out[..12]).into_owned());
    }
    assert_eq!(statuses, ["HTTP/1.1 200", "HTTP/1.1 429"]);
}
