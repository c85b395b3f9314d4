//! Aggregation (issue 10, §2): several upstreams' JSON answers merged into one,
//! in parallel or after the parts they depend on; optional and required parts.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;

use crate::harness::*;

/// Answers by path; records every path and query it was asked for.
async fn services() -> (Upstream, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let up = Upstream::serve(false, move |req: Request<Incoming>| {
        let s = s.clone();
        async move {
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let rid = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            s.lock().unwrap().push(format!("{pq} {rid}"));
            let json = |body: &str| {
                Response::builder()
                    .header("content-type", "application/json")
                    .body(full(body.to_owned()))
                    .unwrap()
            };
            match req.uri().path() {
                "/users/42" => json(r#"{"id":42,"name":"Ada","team_id":"t7","secret":"s3"}"#),
                "/teams/t7" => json(r#"{"team":"core","size":5}"#),
                "/orders" => json(r#"[{"id":1}]"#),
                "/evil" => json(r#"{"team_id":"../admin","empty":"","enc":"%2E%2E"}"#),
                "/text" => Response::builder().body(full("not json")).unwrap(),
                "/slow" => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    json("{}")
                }
                _ => Response::builder().status(500).body(full("boom")).unwrap(),
            }
        }
    })
    .await;
    (up, seen)
}

fn config(svc: &str) -> String {
    format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
routes:
  - name: dash
    path: /dash/{{id}}
    aggregate:
      timeout: 3s
      parts:
        - {{name: user, upstream: "{svc}", path: "/users/{{id}}", fields: [id, name]}}
        - {{name: team, upstream: "{svc}", path: "/teams/{{user.team_id}}", after: [user]}}
        - {{name: orders, upstream: "{svc}", path: "/orders?user={{id}}"}}
        - {{name: recs, upstream: "{svc}", path: /slow, required: false, timeout: 500ms}}
        - {{name: extra, upstream: "{svc}", path: /text, required: false}}
  - name: flat
    path: /flat/{{id}}
    aggregate:
      merge: flat
      parts:
        - {{name: user, upstream: "{svc}", path: "/users/{{id}}", fields: [name]}}
        - {{name: team, upstream: "{svc}", path: /teams/t7}}
  - name: strict
    path: /strict/{{id}}
    aggregate:
      parts:
        - {{name: user, upstream: "{svc}", path: "/users/{{id}}"}}
        - {{name: audit, upstream: "{svc}", path: /broken}}
  - name: late
    path: /late
    aggregate:
      timeout: 500ms
      parts: [{{name: slow, upstream: "{svc}", path: /slow}}]
  - name: climb
    path: /climb
    aggregate:
      parts:
        - {{name: evil, upstream: "{svc}", path: /evil}}
        - {{name: dep, upstream: "{svc}", path: "/users/{{evil.team_id}}", after: [evil], required: false}}
        - {{name: blank, upstream: "{svc}", path: "/teams/{{evil.empty}}", after: [evil], required: false}}
        - {{name: enc, upstream: "{svc}", path: "/users/{{evil.enc}}", after: [evil], required: false}}
"#
    )
}

#[tokio::test]
async fn parts_merge_with_dependencies_and_optional_failures() {
    let (svc, seen) = services().await;
    let gw = Gateway::start(&config(&svc.url()));
    let started = Instant::now();
    let res = client()
        .get(gw.url("/dash/42?debug=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(res.headers()["x-partial-response"], "recs, extra");
    let rid = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "user": {"id": 42, "name": "Ada"},
            "team": {"team": "core", "size": 5},
            "orders": [{"id": 1}],
            "recs": null,
            "extra": null,
        })
    );
    let seen = seen.lock().unwrap().clone();
    // The part's own query; the client's is not forwarded. Every part carries the
    // request id.
    assert!(seen.contains(&format!("/orders?user=42 {rid}")), "{seen:?}");
    assert!(seen.contains(&format!("/teams/t7 {rid}")), "{seen:?}");

    let res = client().get(gw.url("/flat/42")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(
        v,
        serde_json::json!({"name": "Ada", "team": "core", "size": 5})
    );
}

#[tokio::test]
async fn required_failures_and_the_deadline_fail_the_request() {
    let (svc, seen) = services().await;
    let gw = Gateway::start(&config(&svc.url()));
    let res = client().get(gw.url("/strict/42")).send().await.unwrap();
    let v = assert_error(res, 502, "UPSTREAM_UNAVAILABLE").await;
    assert!(
        v["error"]["message"].as_str().unwrap().contains("audit"),
        "{v}"
    );
    assert!(
        !v.to_string().contains("boom"),
        "the part's body is not shown"
    );

    let started = Instant::now();
    let res = client().get(gw.url("/late")).send().await.unwrap();
    assert_error(res, 504, "UPSTREAM_TIMEOUT").await;
    assert!(started.elapsed() < Duration::from_secs(3));

    // A value from an answer must be one plain segment: `../admin`, an empty
    // value and an encoded `..` fail their part, which is never sent.
    let res = client().get(gw.url("/climb")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-partial-response"], "dep, blank, enc");
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["dep"], serde_json::Value::Null);
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen.iter().any(|s| s.starts_with("/users/.")
            || s.starts_with("/users/%")
            || s.starts_with("/teams/ ")),
        "{seen:?}"
    );
}

#[test]
fn aggregate_config_mistakes_are_check_errors() {
    let head =
        "listeners: [{address: \"127.0.0.1:0\"}]\nroutes:\n  - path: /a/{id}\n    aggregate: ";
    for (body, want) in [
        ("{parts: []}", "1 to 16 parts"),
        (
            "{parts: [{name: a, upstream: \"http://x:1\"}, {name: a, upstream: \"http://x:1\"}]}",
            "unique name",
        ),
        (
            "{parts: [{name: a, upstream: \"http://x:1\", after: [b]}, {name: b, upstream: \"http://x:1\"}]}",
            "not a part declared before",
        ),
        (
            "{parts: [{name: a, upstream: \"http://x:1\"}, {name: b, upstream: \"http://x:1\", path: \"/{a.id}\"}]}",
            "must be a part listed in `after`",
        ),
        (
            "{parts: [{name: a, upstream: \"http://x:1\", path: \"/{nope}\"}]}",
            "{nope}",
        ),
        ("{merge: deep, parts: [{name: a, upstream: \"http://x:1\"}]}", "merge"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let p = write_config(dir.path(), &format!("{head}{body}\n"));
        let (code, _, err) = run_cli(&["check", "-c", p.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{body}");
        assert!(err.contains(want), "{body}\n{err}");
    }
}
