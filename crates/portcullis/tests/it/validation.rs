//! OpenAPI request validation (issue 11, §2) with the FoldForge document in
//! `examples/`: parameters, bodies, strict mode, limits and broken documents.

use std::path::PathBuf;

use crate::harness::*;

fn document() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/foldforge/openapi.yaml")
        .display()
        .to_string()
}

fn config(echo: &str) -> String {
    let doc = document();
    format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
defaults:
  openapi: {{document: "{doc}"}}
routes:
  - {{name: api, path_prefix: /v1, proxy: {{upstream: "{echo}"}}}}
  - name: strict
    path_prefix: /strict
    openapi: {{document: "{doc}", base_path: /strict, strict: true, max_body: 1KiB, max_errors: 3}}
    proxy: {{upstream: "{echo}"}}
  - {{name: free, path_prefix: /free, openapi: false, proxy: {{upstream: "{echo}"}}}}
  - {{name: small, path_prefix: /small, max_request_body: 100, openapi: {{document: "{doc}", base_path: /small}}, proxy: {{upstream: "{echo}"}}}}
"#
    )
}

async fn post(gw: &Gateway, path: &str, ct: &str, body: &str) -> reqwest::Response {
    client()
        .post(gw.url(path))
        .header("content-type", ct)
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

/// The problems of a 400 `VALIDATION_FAILED`.
async fn problems(res: reqwest::Response) -> Vec<serde_json::Value> {
    let v = assert_error(res, 400, "VALIDATION_FAILED").await;
    v["error"]["details"].as_array().unwrap().clone()
}

fn has(problems: &[serde_json::Value], location: &str, pointer: &str) -> bool {
    problems
        .iter()
        .any(|p| p["location"] == location && p["pointer"] == pointer)
}

#[tokio::test]
async fn bodies_are_checked_and_forwarded_as_read() {
    let echo = Upstream::echo().await;
    let gw = Gateway::start(&config(&echo.url()));
    let good = r#"{"name":"fold-1","labels":{"team":"bio"}}"#;
    let res = post(&gw, "/v1/workflows", "application/json", good).await;
    assert_eq!(res.status(), 200);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["body_len"], good.len());
    assert_eq!(v["method"], "POST");

    let cases = [
        (r#"{"labels":{}}"#, "body", ""),
        (
            &*format!(r#"{{"name":"{}"}}"#, "n".repeat(129)),
            "body",
            "/name",
        ),
        (r#"{"name":""}"#, "body", "/name"),
        (r#"{"name":"a","labels":{"x":1}}"#, "body", "/labels/x"),
        (r#"{"name":"a","surprise":true}"#, "body", ""),
        ("{not json", "body", ""),
    ];
    for (body, location, pointer) in cases {
        let p = problems(post(&gw, "/v1/workflows", "application/json", body).await).await;
        assert!(has(&p, location, pointer), "{body}: {p:?}");
    }
    // No body, the wrong type: refused before the upstream.
    let p = problems(post(&gw, "/v1/workflows", "application/json", "").await).await;
    assert!(
        p[0]["message"].as_str().unwrap().contains("required"),
        "{p:?}"
    );
    let p = problems(post(&gw, "/v1/workflows", "text/plain", "name=x").await).await;
    assert!(has(&p, "header", "/content-type"), "{p:?}");
    assert_eq!(echo.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn parameters_are_typed_and_checked() {
    let echo = Upstream::echo().await;
    let gw = Gateway::start(&config(&echo.url()));
    let c = client();
    for ok in [
        "/v1/workflows?page_size=5",
        "/v1/workflows?label=team%3Dbio",
        "/v1/workflows/wf_1",
    ] {
        assert_eq!(
            c.get(gw.url(ok)).send().await.unwrap().status(),
            200,
            "{ok}"
        );
    }
    for (path, location, pointer) in [
        ("/v1/workflows?page_size=0", "query", "/page_size"),
        ("/v1/workflows?page_size=abc", "query", "/page_size"),
        ("/v1/workflows?label=nolabel", "query", "/label"),
        ("/v1/workflows/a.b", "path", "/id"),
    ] {
        let p = problems(c.get(gw.url(path)).send().await.unwrap()).await;
        assert!(has(&p, location, pointer), "{path}: {p:?}");
    }
    let res = c
        .get(gw.url("/v1/workflows/wf_1/events"))
        .header("last-event-id", "abc")
        .send()
        .await
        .unwrap();
    let p = problems(res).await;
    assert!(has(&p, "header", "/last-event-id"), "{p:?}");
    // A scalar given twice is refused: the upstream could read the other value.
    let p = problems(
        c.get(gw.url("/v1/workflows?page_size=5&page_size=500"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(has(&p, "query", "/page_size"), "{p:?}");
    assert!(p[0]["message"].as_str().unwrap().contains("more than once"));
    // Operations the document lacks pass unvalidated unless the route is strict.
    assert_eq!(
        c.get(gw.url("/v1/other")).send().await.unwrap().status(),
        200
    );
    // A route that turns the default off.
    assert_eq!(
        c.get(gw.url("/free/v1/workflows?page_size=0"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn strict_routes_refuse_undescribed_operations_and_bound_everything() {
    let echo = Upstream::echo().await;
    let gw = Gateway::start(&config(&echo.url()));
    let c = client();
    let res = c.get(gw.url("/strict/v1/nothing")).send().await.unwrap();
    assert_error(res, 404, "NOT_FOUND").await;
    let res = c.put(gw.url("/strict/v1/workflows")).send().await.unwrap();
    assert_error(res, 405, "METHOD_NOT_ALLOWED").await;
    let res = c.get(gw.url("/strict/v1/workflows")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    // The body limit of validation.
    let big = format!(r#"{{"name":"a","spec_json":"{}"}}"#, "x".repeat(2048));
    let res = post(&gw, "/strict/v1/workflows", "application/json", &big).await;
    assert_error(res, 413, "PAYLOAD_TOO_LARGE").await;
    // At most `max_errors` problems, the last one saying more were left out.
    let res = post(
        &gw,
        "/strict/v1/workflows",
        "application/json",
        r#"{"name":"","labels":{"a":1,"b":2,"c":3,"d":4},"x":1}"#,
    )
    .await;
    let p = problems(res).await;
    assert_eq!(p.len(), 3, "{p:?}");
    assert_eq!(p[2]["more"], true);
}

#[test]
fn broken_documents_are_check_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (name, doc, want) in [
        ("old.yaml", "swagger: \"2.0\"\npaths: {}\n", "only OpenAPI 3.0 and 3.1"),
        ("ref.yaml", "openapi: 3.1.0\npaths:\n  /a:\n    get:\n      parameters: [{$ref: \"#/nope\"}]\n", "does not resolve"),
        ("schema.yaml", "openapi: 3.0.3\npaths:\n  /a:\n    post:\n      requestBody:\n        content:\n          application/json:\n            schema: {type: 7}\n", "schema at"),
        ("missing.yaml", "", "cannot read"),
    ] {
        let doc_path = dir.path().join(name);
        if !doc.is_empty() {
            std::fs::write(&doc_path, doc).unwrap();
        }
        let cfg = write_config(
            dir.path(),
            &format!(
                "listeners: [{{address: \"127.0.0.1:0\"}}]\nroutes:\n  - path: /a\n    openapi: {{document: \"{}\"}}\n    respond: {{}}\n",
                doc_path.display()
            ),
        );
        let (code, _, err) = run_cli(&["check", "-c", cfg.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{name}");
        assert!(err.contains("routes[0].openapi.document") && err.contains(want), "{name}: {err}");
    }
}

/// A streamed (chunked) body is held to the route's own `max_request_body` too: the
/// bytes validation reads replace the client's stream.
#[tokio::test]
async fn the_routes_body_limit_holds_for_validated_bodies() {
    let echo = Upstream::echo().await;
    let gw = Gateway::start(&config(&echo.url()));
    let body = format!(r#"{{"name":"a","spec_json":"{}"}}"#, "x".repeat(300));
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = body
        .as_bytes()
        .chunks(64)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let res = client()
        .post(gw.url("/small/v1/workflows"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_error(res, 413, "PAYLOAD_TOO_LARGE").await;
    assert_eq!(echo.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
}
