//! Stored (FnKit) pipelines: raw `SET fnkit:pipeline:<name>` in Redis, the
//! sequential and parallel shapes, failures, timeouts, cancellation, changes seen
//! by a second instance at once, the admin API and the CLI.

use std::process::Command;
use std::time::{Duration, Instant};

use super::*;
use crate::redis_harness::{redis_cli, RedisServer};

fn redis_cmd(redis: &RedisServer, args: &[&str]) -> String {
    let out = Command::new(redis_cli())
        .args(["-p", &redis.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// FnKit's CLI writes the key itself; the gateway reads it as it is.
fn fnkit_set(redis: &RedisServer, name: &str, json: &str) {
    assert_eq!(
        redis_cmd(redis, &["SET", &format!("fnkit:pipeline:{name}"), json]),
        "OK"
    );
}

#[tokio::test]
async fn sequential_hands_body_and_type_to_the_next_step() {
    let redis = RedisServer::start();
    let s = setup(&redis.url(), "").await;
    let (gw, calls) = (&s.gw, &s.calls);
    fnkit_set(
        &redis,
        "shout",
        r#"{"mode":"sequential","steps":["upper","wrap"]}"#,
    );

    let res = client()
        .post(gw.url("/orchestrate/shout/sub/path?q=1"))
        .bearer_auth("fn-token")
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    let v: serde_json::Value = res.json().await.unwrap();
    // `wrap` got `upper`'s body and content type, by POST, at the same rest and query.
    assert_eq!(v["input"], "HELLO");
    assert_eq!(v["content_type"], "text/x-upper");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["uri"], "/sub/path?q=1");
    assert_eq!(calls.called(), ["upper", "wrap"]);

    // An empty hand-off keeps the client's method and sends no content type.
    fnkit_set(
        &redis,
        "quiet",
        r#"{"mode":"sequential","steps":["empty","wrap"]}"#,
    );
    let res = orchestrate(gw, "/orchestrate/quiet").await;
    assert_eq!(res.status(), 200);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["method"], "GET");
    assert_eq!(v["input"], "");
    assert_eq!(v["content_type"], serde_json::Value::Null);
    assert_eq!(v["uri"], "/");

    // The last step's own answer is the response (status, type, body).
    fnkit_set(
        &redis,
        "plain",
        r#"{"mode":"sequential","steps":["wrap","text"]}"#,
    );
    let res = orchestrate(gw, "/orchestrate/plain").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/plain");
    assert_eq!(res.text().await.unwrap(), "plain text");
}

#[tokio::test]
async fn every_step_sees_identity_request_id_and_forwarding_headers() {
    let s = setup("", "").await;
    let gw = &s.gw;
    put_pipeline(
        gw,
        "who",
        r#"{"mode":"parallel","steps":["headers","wrap"]}"#,
    )
    .await;
    put_pipeline(
        gw,
        "who-seq",
        r#"{"mode":"sequential","steps":["empty","headers"]}"#,
    )
    .await;

    for name in ["who", "who-seq"] {
        let res = client()
            .get(gw.url(&format!("/orchestrate/{name}")))
            .bearer_auth("fn-token")
            // A spoofed identity header never reaches a step.
            .header("x-principal", "root")
            .header("x-request-id", "client-chosen")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{name}");
        let rid = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        let v: serde_json::Value = res.json().await.unwrap();
        let h = if name == "who" { &v["headers"] } else { &v };
        assert_eq!(
            h["x-principal"],
            serde_json::json!(["svc-user"]),
            "{name}: {h}"
        );
        assert_eq!(h["x-request-id"], serde_json::json!([rid]), "{name}");
        assert_eq!(
            h["x-forwarded-for"],
            serde_json::json!(["127.0.0.1"]),
            "{name}"
        );
        assert!(h["via"].is_array(), "{name}: {h}");
    }
    // Without the token: 401, no step called.
    let res = client()
        .get(gw.url("/orchestrate/who"))
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
}

#[tokio::test]
async fn failing_and_unreachable_steps_answer_in_fnkits_shape() {
    let s = setup("", "").await;
    let (gw, calls) = (&s.gw, &s.calls);
    put_pipeline(
        gw,
        "mid",
        r#"{"mode":"sequential","steps":["upper","fail","wrap"]}"#,
    )
    .await;
    put_pipeline(
        gw,
        "gone",
        r#"{"mode":"sequential","steps":["upper","ghost"]}"#,
    )
    .await;

    // The first non-2xx step stops the run with its own status and body.
    let res = orchestrate(gw, "/orchestrate/mid").await;
    assert_eq!(res.status(), 418);
    let rid = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["error"], "Step failed");
    assert_eq!(v["step"], "fail");
    assert_eq!(v["status"], 418);
    assert_eq!(v["body"], "nope");
    assert_eq!(v["code"], "STEP_FAILED");
    assert_eq!(v["request_id"], rid.as_str());
    assert_eq!(calls.called(), ["upper", "fail"], "wrap never runs");

    // A stopped function: 502 with a detail that names nothing internal.
    let res = orchestrate(gw, "/orchestrate/gone").await;
    assert_eq!(res.status(), 502);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["error"], "Step failed");
    assert_eq!(v["step"], "ghost");
    assert_eq!(v["detail"], "function not found or not running");
    assert!(!v.to_string().contains("127.0.0.2"), "{v}");
}

#[tokio::test]
async fn parallel_merges_json_and_text_and_reports_failures() {
    let s = setup("", "").await;
    let (gw, calls) = (&s.gw, &s.calls);
    put_pipeline(
        gw,
        "both",
        r#"{"mode":"parallel","steps":["json","text","wrap"]}"#,
    )
    .await;
    put_pipeline(gw, "half", r#"{"mode":"parallel","steps":["json","fail"]}"#).await;

    let res = client()
        .post(gw.url("/orchestrate/both?v=2"))
        .bearer_auth("fn-token")
        .header("content-type", "application/json")
        .body(r#"{"in":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["json"], serde_json::json!({"x": 1}));
    assert_eq!(v["text"], "plain text");
    // Every step gets the original body, type and method.
    assert_eq!(v["wrap"]["input"], r#"{"in":true}"#);
    assert_eq!(v["wrap"]["content_type"], "application/json");
    assert_eq!(v["wrap"]["method"], "POST");
    assert_eq!(v["wrap"]["uri"], "/?v=2");
    assert_eq!(calls.called().len(), 3);

    let res = orchestrate(gw, "/orchestrate/half").await;
    assert_eq!(res.status(), 502);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["error"], "Parallel execution failed");
    assert_eq!(v["code"], "PIPELINE_FAILED");
    assert_eq!(
        v["details"]["fail"],
        serde_json::json!({"status": 418, "body": "nope"})
    );
    assert!(v["details"].get("json").is_none());
}

#[tokio::test]
async fn partial_parallel_answers_with_what_succeeded() {
    let s = setup("", "      partial: true").await;
    let gw = &s.gw;
    put_pipeline(
        gw,
        "half",
        r#"{"mode":"parallel","steps":["json","fail","ghost"]}"#,
    )
    .await;
    let res = orchestrate(gw, "/orchestrate/half").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-partial-response"], "fail, ghost");
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["json"], serde_json::json!({"x": 1}));
    assert_eq!(v["fail"], serde_json::Value::Null);
    assert_eq!(v["ghost"], serde_json::Value::Null);
    assert_eq!(v["$errors"]["fail"]["status"], 418);
    assert_eq!(
        v["$errors"]["ghost"]["detail"],
        "function not found or not running"
    );
}

#[tokio::test]
async fn unknown_empty_and_hostile_pipelines() {
    let redis = RedisServer::start();
    let s = setup(&redis.url(), "").await;
    let (gw, calls) = (&s.gw, &s.calls);

    // FnKit answered 500 here; a missing pipeline is a 404.
    let res = orchestrate(gw, "/orchestrate/nope").await;
    let v = assert_error(res, 404, "NOT_FOUND").await;
    assert!(v["error"]["message"].as_str().unwrap().contains("nope"));
    fnkit_set(&redis, "hollow", r#"{"mode":"sequential","steps":[]}"#);
    let res = orchestrate(gw, "/orchestrate/hollow").await;
    assert_error(res, 400, "BAD_REQUEST").await;
    // Garbage under the key is the store's fault, not the client's.
    fnkit_set(&redis, "junk", "not json");
    let res = orchestrate(gw, "/orchestrate/junk").await;
    assert_error(res, 503, "SERVICE_UNAVAILABLE").await;

    // Names that would climb or address anything are refused before the store.
    for path in [
        "/orchestrate/..%2Fx",
        "/orchestrate/a%20b",
        "/orchestrate/%2e%2e",
    ] {
        let res = orchestrate(gw, path).await;
        assert!(
            [400, 404].contains(&res.status().as_u16()),
            "{path}: {}",
            res.status()
        );
    }
    // Definitions written by another program get our checks before anything runs:
    // no addresses, no localhost, no paths, no duplicate parallel steps.
    for (i, steps) in [
        r#"["json", "127.0.0.1"]"#,
        r#"["json", "localhost"]"#,
        r#"["json", "0x7f000001"]"#,
        r#"["json", "../admin"]"#,
        r#"["json", "a?x=1"]"#,
    ]
    .iter()
    .enumerate()
    {
        fnkit_set(
            &redis,
            &format!("sneaky{i}"),
            &format!(r#"{{"mode":"sequential","steps":{steps}}}"#),
        );
        let res = orchestrate(gw, &format!("/orchestrate/sneaky{i}")).await;
        let v = assert_error(res, 400, "BAD_REQUEST").await;
        assert!(
            v["error"]["message"].as_str().unwrap().contains("invalid"),
            "{steps}: {v}"
        );
    }
    fnkit_set(
        &redis,
        "twice",
        r#"{"mode":"parallel","steps":["json","json"]}"#,
    );
    let res = orchestrate(gw, "/orchestrate/twice").await;
    assert_error(res, 400, "BAD_REQUEST").await;
    assert!(calls.called().is_empty(), "{:?}", calls.called());
}

#[tokio::test]
async fn slow_steps_hit_their_timeout_and_large_handoffs_are_refused() {
    let s = setup("", "      step_timeout: 1s\n      max_handoff: 1KiB").await;
    let gw = &s.gw;
    put_pipeline(
        gw,
        "slow",
        r#"{"mode":"sequential","steps":["upper","slow"]}"#,
    )
    .await;
    put_pipeline(gw, "big", r#"{"mode":"sequential","steps":["big","wrap"]}"#).await;
    put_pipeline(
        gw,
        "slowpar",
        r#"{"mode":"parallel","steps":["json","slow"]}"#,
    )
    .await;

    let started = Instant::now();
    let res = orchestrate(gw, "/orchestrate/slow").await;
    assert_eq!(res.status(), 504);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["step"], "slow");
    assert_eq!(v["detail"], "timed out");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    let res = orchestrate(gw, "/orchestrate/slowpar").await;
    assert_eq!(res.status(), 502);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["details"]["slow"]["detail"], "timed out");

    let res = orchestrate(gw, "/orchestrate/big").await;
    assert_eq!(res.status(), 413);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["step"], "big");
    assert_eq!(v["code"], "STEP_FAILED");

    // The client's own body beyond the route's limit: 413 before any step.
    let res = client()
        .post(gw.url("/orchestrate/slowpar"))
        .bearer_auth("fn-token")
        .body(vec![b'a'; 4096])
        .send()
        .await
        .unwrap();
    assert_error(res, 413, "PAYLOAD_TOO_LARGE").await;
}

#[tokio::test]
async fn the_whole_pipeline_has_a_deadline() {
    let s = setup("", "      timeout: 1s\n      step_timeout: 30s").await;
    let gw = &s.gw;
    put_pipeline(gw, "slow", r#"{"mode":"sequential","steps":["slow"]}"#).await;
    let started = Instant::now();
    let res = orchestrate(gw, "/orchestrate/slow").await;
    assert_eq!(res.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(8));
}

#[tokio::test]
async fn a_client_going_away_cancels_the_steps() {
    let s = setup("", "").await;
    let (gw, calls) = (&s.gw, &s.calls);
    put_pipeline(
        gw,
        "seq",
        r#"{"mode":"sequential","steps":["slow","wrap"]}"#,
    )
    .await;
    put_pipeline(gw, "par", r#"{"mode":"parallel","steps":["slow","json"]}"#).await;

    for name in ["seq", "par"] {
        calls.clear();
        let started = Instant::now();
        let c = client_builder()
            .timeout(Duration::from_millis(500))
            .build()
            .unwrap();
        let res = c
            .get(gw.url(&format!("/orchestrate/{name}")))
            .bearer_auth("fn-token")
            .send()
            .await;
        assert!(res.is_err(), "the client gave up");
        // The gateway drops the step's request: the function sees its call cut
        // before its 3 s answer.
        while !calls.cancelled().iter().any(|n| n == "slow") {
            assert!(
                started.elapsed() < Duration::from_millis(2900),
                "{name}: slow step not cancelled"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        calls.cancelled.lock().unwrap().clear();
        // Past the moment `slow` would have answered and `wrap` been called.
        tokio::time::sleep(Duration::from_secs(4).saturating_sub(started.elapsed())).await;
        assert!(
            !calls.called().contains(&"wrap".to_owned()),
            "{name}: no later step starts"
        );
    }
}

#[tokio::test]
async fn a_change_is_seen_by_a_second_instance_at_once() {
    let redis = RedisServer::start();
    let (fns, _calls) = functions().await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = function_hosts(dir.path());
    // A TTL of an hour: only a notice can make the change visible.
    let yaml = orchestrator(fns.addr.port(), &hosts, &redis.url(), "      cache_ttl: 1h");
    let a = Gateway::start(&yaml);
    let b = Gateway::start(&yaml);
    assert_eq!(
        put_pipeline(&a, "p", r#"{"mode":"sequential","steps":["json"]}"#)
            .await
            .status(),
        200
    );
    let res = orchestrate(&b, "/orchestrate/p").await;
    assert_eq!(res.text().await.unwrap(), r#"{"x":1}"#);

    // Changed through A's admin API: B answers with the new definition.
    put_pipeline(&a, "p", r#"{"mode":"sequential","steps":["text"]}"#).await;
    wait_body(&b, "/orchestrate/p", "plain text").await;

    // Removed: B answers 404.
    let res = client()
        .delete(a.admin_url("/admin/pipelines/p"))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    wait_status(&b, "/orchestrate/p", 404).await;

    // FnKit's own CLI only SETs the key: seen at once where the server reports
    // keyspace events.
    redis_cmd(&redis, &["CONFIG", "SET", "notify-keyspace-events", "K$g"]);
    fnkit_set(&redis, "p", r#"{"mode":"sequential","steps":["json"]}"#);
    wait_body(&b, "/orchestrate/p", r#"{"x":1}"#).await;
    fnkit_set(&redis, "p", r#"{"mode":"sequential","steps":["text"]}"#);
    wait_body(&b, "/orchestrate/p", "plain text").await;
}

/// Waits (at most 3 s, far below any TTL in these tests) for `path` to answer `body`.
async fn wait_body(gw: &Gateway, path: &str, body: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let got = orchestrate(gw, path).await.text().await.unwrap();
        if got == body {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path}: still {got:?}\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_status(gw: &Gateway, path: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let got = orchestrate(gw, path).await.status().as_u16();
        if got == status {
            return;
        }
        assert!(Instant::now() < deadline, "{path}: still {got}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn admin_api_validates_before_storing() {
    let s = setup("", "").await;
    let gw = &s.gw;
    for bad in [
        r#"{"mode":"sequential","steps":[]}"#,
        r#"{"mode":"both","steps":["a"]}"#,
        r#"{"mode":"sequential","steps":["a/b"]}"#,
        r#"{"mode":"sequential","steps":["127.0.0.1"]}"#,
        r#"{"mode":"parallel","steps":["a","a"]}"#,
        "not json",
    ] {
        let res = put_pipeline(gw, "p", bad).await;
        assert_eq!(res.status(), 400, "{bad}");
        let v: serde_json::Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], "BAD_REQUEST", "{bad}");
    }
    let res = put_pipeline(gw, "bad%20name", r#"{"mode":"sequential","steps":["a"]}"#).await;
    assert_eq!(res.status(), 404);
    // Without the admin token: refused.
    let res = client()
        .put(gw.admin_url("/admin/pipelines/p"))
        .body(r#"{"mode":"sequential","steps":["a"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    let res = put_pipeline(gw, "p", r#"{"mode":"parallel","steps":["json","text"]}"#).await;
    assert_eq!(res.status(), 200);
    let get = |path: &'static str| {
        let url = gw.admin_url(path);
        async move {
            client()
                .get(url)
                .bearer_auth("admin-secret")
                .send()
                .await
                .unwrap()
        }
    };
    let v: serde_json::Value = get("/admin/pipelines/p").await.json().await.unwrap();
    assert_eq!(
        v,
        serde_json::json!({"mode": "parallel", "steps": ["json", "text"]})
    );
    let v: serde_json::Value = get("/admin/pipelines").await.json().await.unwrap();
    assert_eq!(
        v["pipelines"]["p"]["steps"],
        serde_json::json!(["json", "text"])
    );
    assert_eq!(get("/admin/pipelines/q").await.status(), 404);
}

/// `portcullis pipeline …` writes FnKit's keys; a gateway on the same embedded
/// store file (another process) sees the change without waiting for the TTL.
#[tokio::test]
async fn cli_manages_pipelines_and_a_running_gateway_sees_them() {
    let s = setup("", "      cache_ttl: 1h").await;
    let gw = &s.gw;
    let cfg = gw.config_path.display().to_string();
    let cli = |args: &[&str]| {
        let mut all = vec!["-c", cfg.as_str(), "pipeline"];
        all.extend_from_slice(args);
        run_cli(&all, &[])
    };
    let res = orchestrate(gw, "/orchestrate/etl").await;
    assert_eq!(res.status(), 404);

    let (code, out, err) = cli(&[
        "add",
        "etl",
        "--steps",
        "upper,wrap",
        "--mode",
        "sequential",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    // Another process wrote the file: seen within the store's poll (200 ms).
    wait_status(gw, "/orchestrate/etl", 200).await;
    let res = client()
        .post(gw.url("/orchestrate/etl"))
        .bearer_auth("fn-token")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["input"], "X");

    let (code, out, _) = cli(&["list"]);
    assert_eq!(code, 0);
    assert!(out.contains("etl") && out.contains("upper,wrap"), "{out}");
    let (code, out, _) = cli(&["show", "etl"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["mode"], "sequential");

    let (code, _, err) = cli(&["add", "bad", "--steps", "a/b"]);
    assert_ne!(code, 0);
    assert!(err.contains("a/b"), "{err}");
    let (code, _, err) = cli(&["add", "bad", "--steps", "a", "--mode", "sideways"]);
    assert_ne!(code, 0);
    assert!(err.contains("sideways"), "{err}");

    let (code, _, _) = cli(&["remove", "etl"]);
    assert_eq!(code, 0);
    wait_status(gw, "/orchestrate/etl", 404).await;
    let (code, _, _) = cli(&["rm", "etl"]);
    assert_ne!(code, 0, "removing twice fails");
}

/// Answers handed from step to step, or merged, are asked for uncompressed; the
/// last step's answer goes to the client as it accepts it.
#[tokio::test]
async fn hand_offs_and_merges_are_never_compressed() {
    let s = setup("", "").await;
    let (gw, calls) = (&s.gw, &s.calls);
    put_pipeline(gw, "z", r#"{"mode":"sequential","steps":["gz","wrap"]}"#).await;
    put_pipeline(gw, "zp", r#"{"mode":"parallel","steps":["gz","json"]}"#).await;
    let res = client()
        .get(gw.url("/orchestrate/z"))
        .bearer_auth("fn-token")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["input"], "zipped");
    let res = client()
        .get(gw.url("/orchestrate/zp"))
        .bearer_auth("fn-token")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["gz"], "zipped");
    assert!(
        !calls.called().iter().any(|c| c == "gz-asked-gzip"),
        "{:?}",
        calls.called()
    );
}

#[tokio::test]
async fn step_durations_are_metrics() {
    let s = setup("", "").await;
    let gw = &s.gw;
    put_pipeline(gw, "m", r#"{"mode":"sequential","steps":["upper","text"]}"#).await;
    assert_eq!(orchestrate(gw, "/orchestrate/m").await.status(), 200);
    gw.wait_metrics(&[
        r#"portcullis_pipeline_step_duration_seconds_count{pipeline="m",step="upper"} 1"#,
        r#"portcullis_pipeline_step_duration_seconds_count{pipeline="m",step="text"} 1"#,
    ])
    .await;
}
