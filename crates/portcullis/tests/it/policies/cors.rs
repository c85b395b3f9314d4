//! Part 3, CORS: preflight answered by the gateway, disallowed origins get a
//! normal response without CORS headers, `Vary: Origin`, parsed origins.

use super::*;

fn cors_gateway(upstream: &str, env: &[(&str, &str)]) -> Gateway {
    Gateway::start_with_env(
        &format!(
            r#"listeners: [{{address: "127.0.0.1:0"}}]
authenticators:
  app:
    jwt: {{algorithms: [HS256], secret: "{SECRET}"}}
auth: {{default: [app]}}
defaults:
  cors:
    allowed_origins: ["https://app.example.com", "${{ALLOWED_ORIGINS:-http://localhost:3000}}", "https://*.example.org"]
    allow_credentials: true
    exposed_headers: [x-request-id]
    max_age: 10m
routes:
  - name: api
    path_prefix: /api
    proxy: {{upstream: "{upstream}"}}
  - name: public
    path_prefix: /public
    public: true
    cors: {{allowed_origins: ["*"]}}
    proxy: {{upstream: "{upstream}"}}
  - name: writes
    path: /items
    methods: [POST]
    proxy: {{upstream: "{upstream}"}}
  - name: reads
    path: /items
    methods: [GET]
    cors: false
    proxy: {{upstream: "{upstream}"}}
  - name: internal
    path_prefix: /internal
    public: true
    cors: false
    proxy: {{upstream: "{upstream}"}}
"#
        ),
        env,
    )
}

#[tokio::test]
async fn preflight_is_answered_by_the_gateway_without_credentials() {
    let up = Upstream::echo().await;
    let gw = cors_gateway(&up.url(), &[]);
    let res = client()
        .request(reqwest::Method::OPTIONS, gw.url("/api/items"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "PUT")
        .header(
            "access-control-request-headers",
            "content-type, authorization",
        )
        .send()
        .await
        .unwrap();
    // No token, yet no 401: preflights never carry credentials.
    assert_eq!(res.status(), 204);
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert!(h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("PUT"));
    assert_eq!(
        h["access-control-allow-headers"],
        "content-type, authorization"
    );
    assert_eq!(h["access-control-max-age"], "600");
    assert!(h["vary"].to_str().unwrap().contains("Origin"));
    assert_eq!(up.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn allowed_origin_gets_headers_on_success_and_on_errors() {
    let up = Upstream::echo().await;
    let gw = cors_gateway(
        &up.url(),
        &[("ALLOWED_ORIGINS", "https://one.test,https://two.test:8443")],
    );
    let token = hs256(serde_json::json!({"sub": "u1", "exp": exp()}));
    for origin in [
        "https://app.example.com",
        "https://two.test:8443",
        "https://deep.sub.example.org",
    ] {
        let res = client()
            .get(gw.url("/api/x"))
            .header("origin", origin)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{origin}");
        assert_eq!(res.headers()["access-control-allow-origin"], origin);
        assert_eq!(
            res.headers()["access-control-expose-headers"],
            "x-request-id"
        );
        assert!(res.headers()["vary"].to_str().unwrap().contains("Origin"));
    }
    // The 401 of the auth policy carries CORS headers, so the browser app can read it.
    let res = client()
        .get(gw.url("/api/x"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_error(res, 401, "UNAUTHORIZED").await;
    // The env list replaced the default.
    let res = client()
        .get(gw.url("/api/x"))
        .header("origin", "http://localhost:3000")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn disallowed_and_tricky_origins_get_a_normal_response_without_cors() {
    let up = Upstream::echo().await;
    let gw = cors_gateway(&up.url(), &[]);
    let token = hs256(serde_json::json!({"sub": "u1", "exp": exp()}));
    for origin in [
        "https://evil.com",
        "https://app.example.com.evil.com",
        "http://app.example.com",
        "https://app.example.com:444",
        "https://example.org",
        "null",
        "https://app.example.com/",
        "garbage",
        "https://user@app.example.com",
    ] {
        let res = client()
            .get(gw.url("/api/x"))
            .header("origin", origin)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{origin}: never a 500");
        assert!(
            res.headers().get("access-control-allow-origin").is_none(),
            "{origin} was allowed"
        );
        assert!(res.headers()["vary"].to_str().unwrap().contains("Origin"));
        let pre = client()
            .request(reqwest::Method::OPTIONS, gw.url("/api/x"))
            .header("origin", origin)
            .header("access-control-request-method", "DELETE")
            .send()
            .await
            .unwrap();
        assert_eq!(pre.status(), 204, "{origin}");
        assert!(pre.headers().get("access-control-allow-origin").is_none());
        assert!(pre.headers().get("access-control-allow-methods").is_none());
    }
    // `https://app.example.com/` with a trailing slash is the same origin as listed.
    let res = client()
        .get(gw.url("/api/x"))
        .header("origin", "https://APP.example.com:443")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://APP.example.com:443"
    );
}

#[tokio::test]
async fn upstream_cors_headers_are_replaced_and_routes_can_turn_cors_off() {
    let up = Upstream::serve(false, |_req| async move {
        hyper::Response::builder()
            .header("access-control-allow-origin", "*")
            .body(full("hi"))
            .unwrap()
    })
    .await;
    let gw = cors_gateway(&up.url(), &[]);
    let token = hs256(serde_json::json!({"sub": "u1", "exp": exp()}));
    let res = client()
        .get(gw.url("/api/x"))
        .header("origin", "https://evil.com")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(
        res.headers().get("access-control-allow-origin").is_none(),
        "the upstream's `*` leaked"
    );
    // `*` without credentials on the public route.
    let res = client()
        .get(gw.url("/public/x"))
        .header("origin", "https://anyone.test")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    // `cors: false`: the upstream's own headers pass untouched, no preflight answer.
    let res = client()
        .get(gw.url("/internal/x"))
        .header("origin", "https://evil.com")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    assert!(res.headers().get("vary").is_none());
}

/// A route that lists its methods still gets its preflight answered (by the route
/// of the method asked about), and never sees an OPTIONS request itself.
#[tokio::test]
async fn preflight_reaches_routes_that_list_their_methods() {
    let up = Upstream::echo().await;
    let gw = cors_gateway(&up.url(), &[]);
    let preflight = |method: &'static str| {
        client()
            .request(reqwest::Method::OPTIONS, gw.url("/items"))
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", method)
            .send()
    };
    let res = preflight("POST").await.unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    // The GET route has no CORS: its preflight is the table's 405, never forwarded.
    let res = preflight("GET").await.unwrap();
    assert_error(res, 405, "METHOD_NOT_ALLOWED").await;
    let res = preflight("DELETE").await.unwrap();
    assert_error(res, 405, "METHOD_NOT_ALLOWED").await;
    let res = client()
        .request(reqwest::Method::OPTIONS, gw.url("/items"))
        .send()
        .await
        .unwrap();
    assert_error(res, 405, "METHOD_NOT_ALLOWED").await;
    assert_eq!(up.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn cors_config_mistakes_fail_check() {
    let (code, err) = check(
        r#"listeners: [{address: "127.0.0.1:0"}]
routes:
  - path: /
    cors: {allowed_origins: ["*"], allow_credentials: true}
    respond: {status: 200}
  - path: /b
    cors: {allowed_origins: ["app.example.com", "https://a.com/path"], allowed_methods: ["G T"]}
    respond: {status: 200}
"#,
    );
    assert_ne!(code, 0);
    assert!(err.contains("routes[0].cors.allowed_origins"), "{err}");
    assert!(err.contains("routes[1].cors.allowed_origins[0]"), "{err}");
    assert!(err.contains("routes[1].cors.allowed_origins[1]"), "{err}");
    assert!(err.contains("routes[1].cors.allowed_methods[0]"), "{err}");
}
