//! Errors, logs, metrics, admin API, shutdown.

use std::time::Duration;

use crate::harness::*;

fn config(upstream: &str) -> String {
    format!(
        r#"
listeners:
  - name: main
    address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
  token: "admin-S3cret"
auth:
  tokens: ["api-S3cret"]
routes:
  - name: echo
    path_prefix: /echo
    proxy:
      upstream: {upstream}
  - name: hello
    path: /hello
    public: true
    respond:
      body: hi
"#
    )
}

#[tokio::test]
async fn access_log_is_json_with_the_request_fields() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(&up.url()));
    let res = client()
        .get(gw.url("/echo//a/./b?q=1"))
        .bearer_auth("api-S3cret")
        .header("x-request-id", "log-test-1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(gw.wait_log("log-test-1", Duration::from_secs(5)).await);
    let line = gw
        .logs()
        .lines()
        .find(|l| l.contains("log-test-1"))
        .unwrap()
        .to_owned();
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/echo/a/b");
    assert_eq!(v["route"], "echo");
    assert_eq!(v["status"], 200);
    assert_eq!(v["upstream"], up.addr.to_string());
    assert!(v["duration_ms"].as_f64().is_some());
    assert!(v["bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["request_id"], "log-test-1");
}

#[tokio::test]
async fn metrics_by_route_never_by_raw_path() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(&up.url()));
    let c = client();
    for i in 0..3 {
        let res = c
            .get(gw.url(&format!("/echo/unique-{i}")))
            .bearer_auth("api-S3cret")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.bytes().await.unwrap();
    }
    c.get(gw.url("/hello"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    // Requests are counted when their body ends, just after the client has it: wait
    // for the last one's count rather than for a while.
    let text = gw
        .wait_metrics(&[
            r#"portcullis_requests_total{route="echo",method="GET",status="200"} 3"#,
            r#"portcullis_requests_total{route="hello",method="GET",status="200"} 1"#,
        ])
        .await;
    assert!(
        text.contains("portcullis_request_duration_seconds_bucket{"),
        "{text}"
    );
    assert!(
        text.contains(r#"portcullis_upstream_duration_seconds_count{route="echo"} 3"#),
        "{text}"
    );
    assert!(
        text.contains("portcullis_open_connections{listener=\"main\"}"),
        "{text}"
    );
    assert!(text.contains("portcullis_config_generation 1"), "{text}");
    assert!(!text.contains("unique-"), "raw paths must never be labels");
    // Metrics are not on the main listener by default: the path is an ordinary
    // (here token-protected) request, never the metrics page.
    let res = c
        .get(gw.url("/metrics"))
        .bearer_auth("api-S3cret")
        .send()
        .await
        .unwrap();
    assert_error(res, 404, "NOT_FOUND").await;
}

#[tokio::test]
async fn upstream_errors_are_counted() {
    let dead = dead_upstream();
    let gw = Gateway::start(&config(&format!("http://{dead}")));
    let c = client();
    let res = c
        .get(gw.url("/echo/x"))
        .bearer_auth("api-S3cret")
        .send()
        .await
        .unwrap();
    assert_error(res, 502, "UPSTREAM_UNAVAILABLE").await;
    let text = gw.metrics().await;
    assert!(
        text.contains(r#"portcullis_upstream_errors_total{route="echo",kind="connect"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_on_the_main_listener_when_configured() {
    let up = Upstream::echo().await;
    let yaml = config(&up.url()).replace(
        "routes:",
        "metrics:\n  listener: main\n  path: /_metrics\nroutes:",
    );
    let gw = Gateway::start(&yaml);
    let res = client().get(gw.url("/_metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res
        .text()
        .await
        .unwrap()
        .contains("portcullis_open_connections{listener=\"main\"} 1"));
}

#[tokio::test]
async fn admin_api_needs_its_token_and_redacts_secrets() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(&up.url()));
    let c = client();
    let res = c.get(gw.admin_url("/admin/config")).send().await.unwrap();
    assert_error_no_id(res, 401, "UNAUTHORIZED").await;
    // The data-plane token is not an admin token.
    let res = c
        .get(gw.admin_url("/admin/config"))
        .bearer_auth("api-S3cret")
        .send()
        .await
        .unwrap();
    assert_error_no_id(res, 401, "UNAUTHORIZED").await;

    let res = c
        .get(gw.admin_url("/admin/config"))
        .bearer_auth("admin-S3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(!text.contains("S3cret"), "secrets must be redacted: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["config"]["routes"][0]["name"], "echo");
    assert_eq!(v["config"]["auth"]["tokens"][0], "<redacted>");

    let res = c
        .get(gw.admin_url("/admin/routes"))
        .bearer_auth("admin-S3cret")
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = res.json().await.unwrap();
    let names: Vec<&str> = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hello", "echo"], "match order: exact before prefix");

    // Health on the admin listener needs no token.
    assert_eq!(
        c.get(gw.admin_url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    until_status(&gw.admin_url("/readyz"), 200).await;
}

#[tokio::test]
async fn admin_endpoints_disabled_without_a_token() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(&up.url()).replace("token: \"admin-S3cret\"", "token: \"\""));
    let res = client()
        .get(gw.admin_url("/admin/config"))
        .send()
        .await
        .unwrap();
    assert_error_no_id(res, 403, "FORBIDDEN").await;
}

#[tokio::test]
async fn five_xx_bodies_carry_no_internal_detail() {
    let dead = dead_upstream();
    let gw = Gateway::start(&config(&format!("http://{dead}")));
    let res = client()
        .get(gw.url("/echo/x"))
        .bearer_auth("api-S3cret")
        .send()
        .await
        .unwrap();
    let body = assert_error(res, 502, "UPSTREAM_UNAVAILABLE").await;
    let text = body.to_string().to_lowercase();
    for leak in [
        "refused",
        "os error",
        "tcp",
        &format!(":{}", dead.port()),
        "127.0.0.1",
        "hyper",
    ] {
        assert!(!text.contains(leak), "{leak} leaked: {text}");
    }
    assert_eq!(body["error"]["retryable"], true);
    // ...but the log says what happened.
    assert!(
        gw.wait_log("upstream request failed", Duration::from_secs(5))
            .await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let up = Upstream::echo().await;
    let mut gw = Gateway::start(&config(&up.url()));
    let url = gw.url("/echo/slow?delay_ms=1000");
    let inflight =
        tokio::spawn(async move { client().get(url).bearer_auth("api-S3cret").send().await });
    wait_in_flight(&up).await;
    let addr = gw.addr();
    let status = tokio::task::spawn_blocking(move || gw.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
    let res = inflight
        .await
        .unwrap()
        .expect("in-flight request completed");
    assert_eq!(res.status(), 200);
    // No longer accepting.
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect answered in time");
    assert!(connect.is_err());
}

async fn assert_error_no_id(res: reqwest::Response, status: u16, code: &str) {
    assert_eq!(res.status().as_u16(), status);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_grace_bounds_the_drain() {
    let up = Upstream::echo().await;
    let yaml = config(&up.url()).replace("routes:", "server:\n  shutdown_grace: 500ms\nroutes:");
    let mut gw = Gateway::start(&yaml);
    // The upstream would answer after a minute: only the grace period ends this.
    let url = gw.url("/echo/slow?delay_ms=60000");
    let inflight =
        tokio::spawn(async move { client().get(url).bearer_auth("api-S3cret").send().await });
    wait_in_flight(&up).await;
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || gw.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}: the drain was not bounded by the 500ms grace period",
        started.elapsed()
    );
    // The request that outlived the grace period was cut.
    assert!(inflight.await.unwrap().is_err());
}

/// Waits until the upstream has the request: it is in flight.
async fn wait_in_flight(up: &Upstream) {
    up.wait_requests(1).await;
}

/// The worker count: `--workers` over `PORTCULLIS_WORKERS` over `server.workers`;
/// the "starting" line reports it and the runtime (thread-per-core by default, with
/// one named thread per extra worker; work-stealing on request), and every layout
/// serves alike.
#[tokio::test(flavor = "multi_thread")]
async fn workers_flag_env_and_config() {
    let up = Upstream::echo().await;
    let yaml = config(&up.url()).replace("routes:", "server:\n  workers: 2\nroutes:");
    for (args, env, expected, runtime) in [
        (&["--workers", "1"][..], &[][..], 1, "single"),
        (
            &["--workers", "3"][..],
            &[("PORTCULLIS_WORKERS", "5")][..],
            3,
            "thread_per_core",
        ),
        (
            &[][..],
            &[
                ("PORTCULLIS_WORKERS", "4"),
                ("PORTCULLIS_RUNTIME", "work_stealing"),
            ][..],
            4,
            "work_stealing",
        ),
        (&[][..], &[][..], 2, "thread_per_core"),
    ] {
        let gw = Gateway::start_with_args(&yaml, args, env);
        let starting = gw
            .logs()
            .lines()
            .find(|l| l.contains("\"message\":\"starting\""))
            .unwrap_or_else(|| panic!("no starting line:\n{}", gw.logs()))
            .to_owned();
        let v: serde_json::Value = serde_json::from_str(&starting).unwrap();
        assert_eq!(v["workers"], expected, "{args:?} {env:?}: {starting}");
        assert_eq!(v["runtime"], runtime, "{starting}");
        let worker_threads = || {
            std::fs::read_dir(format!("/proc/{}/task", gw.pid()))
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|name| name.starts_with("portcullis-work"))
                .count()
        };
        let want = if runtime == "thread_per_core" {
            expected - 1
        } else {
            0
        };
        // The worker threads may still be starting when the listeners log: wait for
        // the count (on a loaded machine), then check it is exactly right.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while worker_threads() < want && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(worker_threads(), want, "{runtime}");
        // Concurrent requests, proxied and answered by the gateway itself.
        let c = client();
        let mut tasks = Vec::new();
        for i in 0..8 {
            let (c, url) = (c.clone(), gw.url(&format!("/echo/{i}")));
            tasks.push(tokio::spawn(async move {
                c.get(url)
                    .bearer_auth("api-S3cret")
                    .send()
                    .await
                    .unwrap()
                    .status()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 200, "{args:?} {env:?}");
        }
        assert_eq!(c.get(gw.url("/hello")).send().await.unwrap().status(), 200);
    }
}

/// `logging.access_log: false`: requests are served and logged nowhere; the same
/// requests with the default write one access line each.
#[tokio::test]
async fn access_log_can_be_turned_off() {
    let up = Upstream::echo().await;
    let requests = |gw: &Gateway| {
        let c = client();
        let (ok, missing, denied) = (
            c.get(gw.url("/echo/a"))
                .bearer_auth("api-S3cret")
                .header("x-request-id", "quiet-1"),
            c.get(gw.url("/nope"))
                .bearer_auth("api-S3cret")
                .header("x-request-id", "quiet-2"),
            c.get(gw.url("/echo/b")).header("x-request-id", "quiet-3"),
        );
        async move {
            assert_eq!(ok.send().await.unwrap().status(), 200);
            assert_eq!(missing.send().await.unwrap().status(), 404);
            assert_eq!(denied.send().await.unwrap().status(), 401);
        }
    };
    let access_lines = |gw: &Gateway| {
        gw.logs()
            .lines()
            .filter(|l| l.contains("\"target\":\"access\""))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };

    // The default: one line per request (so the pattern below is the right one).
    let gw = Gateway::start(&config(&up.url()));
    requests(&gw).await;
    assert!(gw.wait_log("quiet-3", Duration::from_secs(5)).await);
    assert_eq!(access_lines(&gw).len(), 3, "{}", gw.logs());

    let quiet = config(&up.url()).replace("routes:", "logging:\n  access_log: false\nroutes:");
    let gw = Gateway::start(&quiet);
    requests(&gw).await;
    // A later event that is logged: a reload through the admin API, sent after the
    // responses above were complete (their access lines would already be written).
    let res = client()
        .post(gw.admin_url("/admin/reload"))
        .bearer_auth("admin-S3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        gw.wait_log("\"generation\":2", Duration::from_secs(5))
            .await,
        "{}",
        gw.logs()
    );
    assert!(access_lines(&gw).is_empty(), "{}", gw.logs());
    assert!(!gw.logs().contains("quiet-"), "{}", gw.logs());
}

/// While SIGTERM drains an in-flight request, the gateway reports not-ready:
/// the main listener takes no new connections, and the admin listener answers
/// `/readyz` with 503 (and still `/healthz` and metrics) until the drain is over.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_while_draining() {
    // An upstream that holds the request until the test releases it.
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let gate = release.clone();
    let up = Upstream::serve(false, move |_req| {
        let gate = gate.clone();
        async move {
            let _ = gate.acquire().await;
            hyper::Response::new(http_body_util::BodyExt::boxed(http_body_util::Full::new(
                bytes::Bytes::from_static(b"done"),
            )))
        }
    })
    .await;
    let yaml = config(&up.url()).replace("routes:", "server:\n  shutdown_grace: 60s\nroutes:");
    let mut gw = Gateway::start(&yaml);
    until_status(&gw.admin_url("/readyz"), 200).await;
    let (main, admin_url) = (gw.addr(), gw.admin_url("/readyz"));
    let url = gw.url("/echo/slow");
    let inflight =
        tokio::spawn(async move { client().get(url).bearer_auth("api-S3cret").send().await });
    up.wait_requests(1).await;

    gw.signal(libc::SIGTERM);
    assert!(
        gw.wait_log("shutting down", Duration::from_secs(10)).await,
        "{}",
        gw.logs()
    );
    // Draining: not ready, on a fresh connection to the admin listener.
    let res = client()
        .get(&admin_url)
        .send()
        .await
        .expect("admin listener open while draining");
    assert_error_no_id(res, 503, "SERVICE_UNAVAILABLE").await;
    let res = client()
        .get(admin_url.replace("/readyz", "/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let metrics = client()
        .get(admin_url.replace("/readyz", "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("portcullis_open_connections"), "{metrics}");
    // The main listener no longer accepts.
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(main))
        .await
        .expect("connect answered in time");
    assert!(
        connect.is_err(),
        "main listener still accepting while draining"
    );

    // The drain ends with the in-flight request; then everything is closed.
    release.add_permits(1);
    let res = inflight
        .await
        .unwrap()
        .expect("in-flight request completed");
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "done");
    let status = tokio::task::spawn_blocking(move || gw.terminate_wait())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(client().get(&admin_url).send().await.is_err());
}
