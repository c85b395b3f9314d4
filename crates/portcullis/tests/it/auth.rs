//! Baseline auth: static bearer tokens, public routes, open mode.

use crate::harness::*;

fn config(upstream: &str, global_tokens: &str) -> String {
    format!(
        r#"
listeners:
  - address: 127.0.0.1:0
auth:
  tokens: {global_tokens}
routes:
  - name: public
    path_prefix: /public
    public: true
    proxy:
      upstream: {upstream}
  - name: own-token
    path_prefix: /special
    auth:
      tokens: ["route-token"]
    proxy:
      upstream: {upstream}
  - name: forwarding
    path_prefix: /fwd
    auth:
      tokens: ["fwd-token"]
      forward_credential: true
    proxy:
      upstream: {upstream}
  - name: default
    path_prefix: /
    proxy:
      upstream: {upstream}
"#
    )
}

#[tokio::test]
async fn bearer_token_required_with_www_authenticate() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(&up.url(), r#"["S3cret-Token", "second"]"#));
    let c = client();

    let res = c.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    assert_error(res, 401, "UNAUTHORIZED").await;

    // Wrong case, wrong scheme, extra characters, empty: all rejected.
    for value in [
        "Bearer s3cret-token",
        "Basic S3cret-Token",
        "Bearer S3cret-Token2",
        "Bearer ",
        "S3cret-Token",
    ] {
        let res = c
            .get(gw.url("/x"))
            .header("authorization", value)
            .send()
            .await
            .unwrap();
        assert_error(res, 401, "UNAUTHORIZED").await;
    }

    for token in ["S3cret-Token", "second"] {
        let res = c.get(gw.url("/x")).bearer_auth(token).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let body: serde_json::Value = res.json().await.unwrap();
        // The gateway's credential is removed before proxying.
        assert!(body["headers"].get("authorization").is_none(), "{body}");
    }
    // The scheme is case-insensitive (RFC 7235).
    let res = c
        .get(gw.url("/x"))
        .header("authorization", "bearer S3cret-Token")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn public_routes_and_builtin_health_need_no_token() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(&up.url(), r#"["tok"]"#));
    let c = client();
    assert_eq!(
        c.get(gw.url("/public/a")).send().await.unwrap().status(),
        200
    );
    assert_eq!(c.get(gw.url("/health")).send().await.unwrap().status(), 200);
    // A hostile path never escapes the public route's protection.
    let res = raw_get(gw.addr(), "/public/../secret", "").await;
    assert_eq!(res.status, 401, "{res:?}");
}

#[tokio::test]
async fn route_tokens_replace_global_ones() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(&up.url(), r#"["global"]"#));
    let c = client();
    let res = c
        .get(gw.url("/special/x"))
        .bearer_auth("global")
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
    let res = c
        .get(gw.url("/special/x"))
        .bearer_auth("route-token")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // forward_credential: the upstream sees the token.
    let res = c
        .get(gw.url("/fwd/x"))
        .bearer_auth("fwd-token")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["headers"]["authorization"][0], "Bearer fwd-token");
}

/// An unset `${TOKEN:-}` never opens a route: the config is refused, naming the field.
#[test]
fn empty_token_list_is_a_config_error() {
    let yaml = config("http://127.0.0.1:9", r#"["${FNKIT_AUTH_TOKEN:-}"]"#);
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &yaml);
    let (code, _, err) = run_cli(
        &["check", "-c", &path.display().to_string()],
        &[("FNKIT_AUTH_TOKEN", "")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("auth.tokens: every token is empty"), "{err}");
    // A route's own list of empty tokens too.
    let yaml = "listeners: [{address: \"127.0.0.1:0\"}]\nroutes:\n  - path: /x\n    auth: {tokens: [\"${UNSET_TOKEN_Q:-}\"]}\n    respond: {body: x}\n";
    let path = write_config(dir.path(), yaml);
    let (code, _, err) = run_cli(&["check", "-c", &path.display().to_string()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("routes[0].auth.tokens"), "{err}");
}

/// Open mode is chosen explicitly, and said at every load.
#[tokio::test]
async fn open_mode_is_explicit_and_logged() {
    let up = Upstream::echo().await;
    let yaml = format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nauth:\n  open: true\n  tokens: [\"${{FNKIT_AUTH_TOKEN:-}}\"]\nroutes:\n  - name: default\n    path_prefix: /\n    proxy: {{upstream: \"{}\"}}\n",
        up.url()
    );
    let gw = Gateway::start_with_env(&yaml, &[("FNKIT_AUTH_TOKEN", "")]);
    let res = client().get(gw.url("/anything")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(gw.logs().contains("open mode"), "{}", gw.logs());
    // A client's own Authorization passes through in open mode.
    let res = client()
        .get(gw.url("/anything"))
        .bearer_auth("theirs")
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["headers"]["authorization"][0], "Bearer theirs");
}

#[tokio::test]
async fn tokens_never_reach_the_logs() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(&up.url(), r#"["LogSecret-123"]"#));
    let c = client();
    let res = c
        .get(gw.url("/x"))
        .bearer_auth("LogSecret-123")
        .header("cookie", "session=CookieSecret-9")
        .header("x-request-id", "secret-ok")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // The cookie went upstream (it is not the gateway's credential).
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["headers"]["cookie"][0], "session=CookieSecret-9");
    let res = c
        .get(gw.url("/x"))
        .bearer_auth("WrongSecret-456")
        .header("x-request-id", "secret-bad")
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
    // Both requests were logged (so the check below looks at their lines).
    for id in ["secret-ok", "secret-bad"] {
        assert!(
            gw.wait_log(
                &format!("\"request_id\":\"{id}\""),
                std::time::Duration::from_secs(5)
            )
            .await,
            "{}",
            gw.logs()
        );
    }
    let logs = gw.logs();
    for secret in ["LogSecret-123", "CookieSecret-9", "WrongSecret-456"] {
        assert!(!logs.contains(secret), "{secret} leaked into logs:\n{logs}");
    }
}
