//! YAML-declared pipelines: steps over any upstream (a URL or a group), with their
//! own path templates, methods and headers; config mistakes are `check` errors.

use super::*;

#[tokio::test]
async fn declared_steps_use_groups_paths_methods_and_headers() {
    let echo = Upstream::echo().await;
    let (a, b) = (Upstream::echo().await, Upstream::echo().await);
    let yaml = format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
upstreams:
  accounts:
    targets: [{{url: "{a}"}}, {{url: "{b}"}}]
pipelines:
  profile:
    mode: parallel
    steps:
      - name: account
        upstream: accounts
        path: /v1/accounts/{{id}}
        headers: {{X-Step: account}}
      - name: audit
        upstream: "{echo}"
        path: /audit/{{id}}
        method: PUT
        timeout: 2s
  chain:
    mode: sequential
    steps:
      - {{name: first, upstream: "{echo}", path: /first}}
      - {{name: second, upstream: accounts}}
routes:
  - name: profile
    path: /profile/{{id}}
    pipeline: {{name: profile}}
  - name: chain
    path_prefix: /chain
    pipeline: {{name: chain}}
"#,
        a = a.url(),
        b = b.url(),
        echo = echo.url()
    );
    let gw = Gateway::start(&yaml);
    let res = client()
        .get(gw.url("/profile/42?full=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["account"]["uri"], "/v1/accounts/42?full=1");
    assert_eq!(v["account"]["method"], "GET");
    assert_eq!(
        v["account"]["headers"]["x-step"],
        serde_json::json!(["account"])
    );
    assert_eq!(v["audit"]["uri"], "/audit/42?full=1");
    assert_eq!(v["audit"]["method"], "PUT");
    assert!(v["audit"]["headers"].get("x-step").is_none());
    // Both group targets take turns.
    for i in 0..4 {
        let res = client()
            .get(gw.url(&format!("/profile/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    assert!(a.requests.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert!(b.requests.load(std::sync::atomic::Ordering::SeqCst) >= 2);

    // Sequential: the second step (the remainder of a prefix route) gets the first
    // step's JSON as a POST.
    let res = client()
        .get(gw.url("/chain/rest/of/it"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["uri"], "/rest/of/it");
    assert!(v["body_len"].as_u64().unwrap() > 20, "{v}");
    assert_eq!(
        v["headers"]["content-type"],
        serde_json::json!(["application/json"])
    );
}

fn check(yaml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = write_config(dir.path(), yaml);
    let (code, _, err) = run_cli(&["check", "-c", p.to_str().unwrap()], &[]);
    (code, err)
}

#[test]
fn pipeline_config_mistakes_are_check_errors() {
    let head = "listeners: [{address: \"127.0.0.1:0\"}]\n";
    let cases = [
        (
            "routes:\n  - path: /p\n    pipeline: {name: nope}\n",
            "routes[0].pipeline.name",
        ),
        (
            "routes:\n  - path_prefix: /o/{pipeline}\n    pipeline: {from_store: pipeline}\n",
            "routes[0].pipeline.functions",
        ),
        (
            "routes:\n  - path_prefix: /o/{pipeline}\n    pipeline: {from_store: pipeline, functions: {upstream: \"http://fn:8080\"}}\n",
            "must use {step}",
        ),
        (
            "routes:\n  - path_prefix: /o/{p}\n    pipeline: {from_store: pipeline, functions: {upstream: \"http://{step}:8080\"}}\n",
            "does not capture {pipeline}",
        ),
        (
            "routes:\n  - path: /p\n    pipeline: {}\n",
            "needs exactly one of `name`",
        ),
        (
            "pipelines:\n  x: {mode: both, steps: [{name: a, upstream: \"http://a:1\"}]}\nroutes:\n  - path: /p\n    pipeline: {name: x}\n",
            "pipelines.x.mode",
        ),
        (
            "pipelines:\n  x: {mode: sequential, steps: []}\nroutes:\n  - path: /p\n    pipeline: {name: x}\n",
            "pipelines.x.steps",
        ),
        (
            "pipelines:\n  x: {mode: parallel, steps: [{name: a, upstream: \"http://a:1\"}, {name: a, upstream: \"http://b:1\"}]}\nroutes:\n  - path: /p\n    pipeline: {name: x}\n",
            "duplicate step name",
        ),
        (
            "pipelines:\n  x: {mode: parallel, steps: [{name: a, upstream: \"http://a:1\", path: \"/u/{id}\"}]}\nroutes:\n  - path: /p\n    pipeline: {name: x}\n",
            "{id}",
        ),
        (
            "pipelines:\n  x: {mode: parallel, steps: [{name: a, upstream: \"http://a:1\", method: \"GE T\"}]}\nroutes:\n  - path: /p\n    pipeline: {name: x}\n",
            "not an HTTP method",
        ),
        (
            "routes:\n  - path: /p\n    pipeline: {name: x}\n    proxy: {upstream: \"http://a:1\"}\n",
            "exactly one of",
        ),
    ];
    for (body, want) in cases {
        let (code, err) = check(&format!("{head}{body}"));
        assert_eq!(code, 1, "{body}");
        assert!(err.contains(want), "{body}\n{err}");
    }
}
