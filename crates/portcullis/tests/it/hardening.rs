//! The hardening issue: every bypass found in review, attacked the way an attacker
//! would (raw sockets, hostile names and headers), against the real binary.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

const SECRET: &str = "hardening-secret-0123456789abcdef";

fn hs256(claims: serde_json::Value) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn exp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

/// A raw HTTP/1.1 request with extra header lines (each ending in `\r\n`).
async fn raw_request(addr: SocketAddr, head: &str) -> RawResponse {
    raw(addr, head).await
}

/// Waits until the peer closes `stream` (EOF or reset); false if it stays open.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

fn check_file(yaml: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), yaml);
    run_cli(&["check", "-c", &path.display().to_string()], &[])
}

async fn admin_metrics(gw: &Gateway) -> String {
    client()
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------
// 1. Templated upstreams: no SSRF, no loops

#[tokio::test]
async fn function_names_that_read_as_addresses_never_resolve() {
    let up = Upstream::echo().await;
    let port = up.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let hosts = hosts_file(dir.path(), &["fn-hello", "other"]);
    let yaml = format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
server: {{hosts_file: "{}"}}
routes:
  - name: fn
    path_prefix: "/{{name}}"
    proxy:
      upstream: "http://{{name}}:{port}"
      strip_prefix: true
      allow_names: ["fn-*", "~[a-z]+-v[0-9]"]
"#,
        hosts.display()
    );
    let gw = Gateway::start(&yaml);
    let res = raw_get(gw.addr(), "/fn-hello/x", "").await;
    assert_eq!(res.status, 200, "{res:?}");
    let before = up.connections.load(Ordering::SeqCst);
    for target in [
        "/2130706433/x",
        "/017700000001/x",
        "/0x7f000001/x",
        "/0X7F000001/x",
        "/127.1/x",
        "/127.0.0.1/x",
        "/localhost/x",
        "/LOCALHOST/x",
        "/%5B::1%5D/x",
        "/other/x",
        "/fn-a.evil.com/x",
    ] {
        let res = raw_get(gw.addr(), target, "").await;
        assert_eq!(res.status, 404, "{target}: {res:?}");
        assert_eq!(res.json()["error"]["code"], "NOT_FOUND", "{target}");
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn resolved_addresses_are_checked_on_every_connect() {
    let up = Upstream::echo().await;
    let port = up.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 local-fn\n169.254.169.254 metadata\n0.0.0.0 zero\n224.0.0.1 multi\n64:ff9b::a9fe:a9fe nat64-metadata\nfd00:ec2::254 aws6\n",
    )
    .unwrap();
    let yaml = format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
server: {{hosts_file: "{}"}}
routes:
  - name: strict
    path_prefix: "/strict/{{name}}"
    proxy:
      upstream: "http://{{name}}:{port}"
      strip_prefix: true
      targets: {{allow: ["10.0.0.0/8"]}}
  - name: no-loopback
    path_prefix: "/private/{{name}}"
    proxy:
      upstream: "http://{{name}}:{port}"
      strip_prefix: true
      targets: {{deny: ["127.0.0.0/8"]}}
  - name: fn
    path_prefix: "/{{name}}"
    proxy:
      upstream: "http://{{name}}:{port}"
      strip_prefix: true
"#,
        hosts.display()
    );
    let gw = Gateway::start(&yaml);
    let c = client();
    // Loopback stays allowed by default: functions run there.
    assert_eq!(
        c.get(gw.url("/local-fn/x")).send().await.unwrap().status(),
        200
    );
    let before = up.connections.load(Ordering::SeqCst);
    for path in [
        "/metadata/latest/meta-data",
        "/nat64-metadata/latest/meta-data",
        "/aws6/latest/meta-data",
        "/zero/x",
        "/multi/x",
        "/private/local-fn/x",
        "/strict/local-fn/x",
    ] {
        let res = c.get(gw.url(path)).send().await.unwrap();
        assert_error(res, 403, "UPSTREAM_FORBIDDEN").await;
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), before);
}

/// FnKit with the function port equal to the gateway's own: the request comes back
/// in carrying our Via and stops at the second hop. The same through a fixed route.
#[tokio::test]
async fn a_request_sent_back_into_the_gateway_stops_at_the_second_hop() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let hosts = hosts_file(dir.path(), &["myself"]);
    let yaml = format!(
        r#"listeners: [{{address: "127.0.0.1:{port}"}}]
admin: {{address: "127.0.0.1:0"}}
server: {{hosts_file: "{}"}}
routes:
  - name: loop
    path_prefix: /loop
    proxy: {{upstream: "http://127.0.0.1:{port}"}}
  - name: fn
    path_prefix: "/{{name}}"
    proxy:
      upstream: "http://{{name}}:{port}"
      strip_prefix: true
"#,
        hosts.display()
    );
    let gw = Gateway::start(&yaml);
    let c = client();
    let res = c.get(gw.url("/myself/myself/x")).send().await.unwrap();
    assert_error(res, 508, "LOOP_DETECTED").await;
    let res = c.get(gw.url("/loop/x")).send().await.unwrap();
    assert_error(res, 508, "LOOP_DETECTED").await;
    assert!(admin_metrics(&gw)
        .await
        .contains("portcullis_loops_detected_total 2"));
}

#[tokio::test]
async fn via_names_the_gateway_and_a_forged_via_is_a_loop() {
    let up = Upstream::echo().await;
    let yaml = format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nserver: {{gateway_id: edge-1}}\nroutes:\n  - path_prefix: /\n    proxy: {{upstream: \"{}\"}}\n",
        up.url()
    );
    let gw = Gateway::start(&yaml);
    let res = raw_get(gw.addr(), "/x", "Via: 1.0 corp-proxy\r\n").await;
    let via = res.json()["headers"]["via"].clone();
    assert_eq!(via, serde_json::json!(["1.0 corp-proxy", "1.1 edge-1"]));
    let res = raw_get(gw.addr(), "/x", "Via: 1.1 other, 1.1 edge-1\r\n").await;
    assert_eq!(res.status, 508, "{res:?}");
}

// ---------------------------------------------------------------------------------
// 2. Identity and forwarding headers belong to the gateway

fn jwt_gateway(upstream: &str, server_extra: &str) -> Gateway {
    Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
server:
  trusted_proxies: ["10.9.9.9/32"]
{server_extra}
authenticators:
  app:
    jwt:
      algorithms: [HS256]
      secret: "{SECRET}"
      principal_header: X-User-ID
      claim_headers: {{org_id: X-Org-ID}}
      token_sources: {{cookie: app_token, query: access_token}}
auth:
  default: [app]
routes:
  - name: api
    path_prefix: /
    proxy: {{upstream: "{upstream}"}}
"#
    ))
}

/// The Eloquent reproduction: `Connection: X-Org-ID` plus `X_Org_ID: victim-org`.
#[tokio::test]
async fn connection_and_underscores_cannot_forge_identity_headers() {
    let up = Upstream::echo().await;
    let gw = jwt_gateway(&up.url(), "");
    let token = hs256(serde_json::json!({"sub": "u1", "org_id": "org-1", "exp": exp()}));
    let res = raw_get(
        gw.addr(),
        "/x",
        &format!(
            "Authorization: Bearer {token}\r\nConnection: X-Org-ID, X-User-ID, X-Forwarded-For, Host, Via, X-Request-ID, Forwarded, X-Real-IP, Content-Length\r\nX_Org_ID: victim-org\r\nX-Org-ID: victim-2\r\nX_User_ID: admin\r\n"
        ),
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let h = &res.json()["headers"];
    assert_eq!(h["x-org-id"], serde_json::json!(["org-1"]), "{h}");
    assert_eq!(h["x-user-id"], serde_json::json!(["u1"]), "{h}");
    for gone in ["x_org_id", "x_user_id", "authorization", "connection"] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h}");
    }
    for kept in [
        "x-forwarded-for",
        "host",
        "via",
        "x-request-id",
        "forwarded",
        "x-real-ip",
    ] {
        assert!(h.get(kept).is_some(), "{kept} was removed: {h}");
    }
}

#[tokio::test]
async fn underscore_headers_drop_reject_allow() {
    let up = Upstream::echo().await;
    let token = hs256(serde_json::json!({"sub": "u1", "org_id": "org-1", "exp": exp()}));
    let auth = format!("Authorization: Bearer {token}\r\n");
    let hostile = format!("{auth}X_Org_ID: victim\r\nX_Custom: 1\r\n");

    let gw = jwt_gateway(&up.url(), "");
    let res = raw_get(gw.addr(), "/x", &hostile).await;
    let h = &res.json()["headers"];
    assert!(
        h.get("x_custom").is_none() && h.get("x_org_id").is_none(),
        "{h}"
    );

    let gw = jwt_gateway(&up.url(), "  underscore_headers: reject");
    let res = raw_get(gw.addr(), "/x", &hostile).await;
    assert_eq!(res.status, 400, "{res:?}");
    assert_eq!(res.json()["error"]["code"], "BAD_REQUEST");

    let gw = jwt_gateway(&up.url(), "  underscore_headers: allow");
    let res = raw_get(gw.addr(), "/x", &hostile).await;
    let h = &res.json()["headers"];
    assert_eq!(h["x_custom"], serde_json::json!(["1"]), "{h}");
    assert!(h.get("x_org_id").is_none(), "{h}");
    assert_eq!(h["x-org-id"], serde_json::json!(["org-1"]), "{h}");
}

#[tokio::test]
async fn rewrite_and_client_address_headers_are_stripped() {
    let up = Upstream::echo().await;
    let yaml = format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nroutes:\n  - path_prefix: /\n    proxy: {{upstream: \"{}\"}}\n",
        up.url()
    );
    let gw = Gateway::start(&yaml);
    let hostile = "X-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\nX-HTTP-Method-Override: DELETE\r\nX-Method-Override: DELETE\r\nX-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /admin\r\nTrue-Client-IP: 1.2.3.4\r\nX-Client-IP: 1.2.3.4\r\nCF-Connecting-IP: 1.2.3.4\r\nX-Kept: yes\r\n";
    let res = raw_get(gw.addr(), "/x", hostile).await;
    let h = &res.json()["headers"];
    for gone in [
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-method-override",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "true-client-ip",
        "x-client-ip",
        "cf-connecting-ip",
    ] {
        assert!(h.get(gone).is_none(), "{gone}: {h}");
    }
    assert_eq!(h["x-kept"], serde_json::json!(["yes"]));

    // From a trusted proxy, client-address headers pass; rewrite headers never do.
    let yaml = format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nserver: {{trusted_proxies: [127.0.0.1]}}\nroutes:\n  - path_prefix: /\n    proxy: {{upstream: \"{}\"}}\n",
        up.url()
    );
    let gw = Gateway::start(&yaml);
    let res = raw_get(gw.addr(), "/x", hostile).await;
    let h = &res.json()["headers"];
    assert_eq!(h["true-client-ip"], serde_json::json!(["1.2.3.4"]), "{h}");
    assert!(h.get("x-original-url").is_none(), "{h}");
}

#[tokio::test]
async fn every_configured_credential_source_is_removed() {
    let up = Upstream::echo().await;
    let gw = jwt_gateway(&up.url(), "");
    let token = hs256(serde_json::json!({"sub": "u1", "org_id": "o", "exp": exp()}));
    // Authenticated by the header; the cookie and (percent-encoded) query copies go too.
    let res = raw_get(
        gw.addr(),
        &format!("/x?a=1&access%5Ftoken={token}&b=2&access_token=other"),
        &format!("Authorization: Bearer {token}\r\nCookie: keep=1; app_token={token}\r\n"),
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let echo = res.json();
    assert_eq!(echo["query"], "a=1&b=2", "{echo}");
    assert_eq!(echo["headers"]["cookie"], serde_json::json!(["keep=1"]));
    assert!(echo["headers"].get("authorization").is_none());
    assert!(!echo.to_string().contains(&token));
    // A non-ASCII cookie beside the credential does not hide it.
    let res = raw_get(
        gw.addr(),
        "/x",
        &format!(
            "Authorization: Bearer {token}\r\nCookie: app_token={token}; pref=\u{e9}t\u{e9}\r\n"
        ),
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let echo = res.json();
    assert!(!echo.to_string().contains(&token), "{echo}");
    assert!(echo["headers"]["cookie"][0]
        .as_str()
        .unwrap()
        .starts_with("pref="));
}

/// Identity names smuggled as request trailers never reach an (HTTP/2) upstream.
#[tokio::test]
async fn request_trailers_never_reach_the_upstream() {
    let up = Upstream::serve(
        true,
        |req: hyper::Request<hyper::body::Incoming>| async move {
            let collected = req.into_body().collect().await.unwrap();
            let trailers = collected
                .trailers()
                .map(headers_json)
                .unwrap_or(serde_json::json!({}));
            let body = serde_json::json!({"trailers": trailers, "len": collected.to_bytes().len()});
            hyper::Response::new(
                http_body_util::Full::new(Bytes::from(body.to_string()))
                    .map_err(|e| match e {})
                    .boxed(),
            )
        },
    )
    .await;
    let yaml = format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nroutes:\n  - path_prefix: /\n    proxy: {{upstream: \"{}\", protocol: http2}}\n",
        up.url()
    );
    let gw = Gateway::start(&yaml);
    let res = raw_request(
        gw.addr(),
        "POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: X-Org-ID\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nX-Org-ID: evil\r\nX-Other: t\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let body = res.json();
    assert_eq!(body["len"], 5);
    assert_eq!(body["trailers"], serde_json::json!({}), "{body}");
}

// ---------------------------------------------------------------------------------
// 3. One authority per request

#[tokio::test]
async fn one_authority_per_request() {
    let up = Upstream::echo().await;
    let yaml = format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
routes:
  - name: a
    hosts: [a.test]
    path_prefix: /
    proxy: {{upstream: "{0}", preserve_host: true}}
  - name: other
    path_prefix: /
    respond: {{body: other}}
"#,
        up.url()
    );
    let gw = Gateway::start(&yaml);
    let a = gw.addr();
    // Absolute-form wins for routing, Host, X-Forwarded-Host and Forwarded alike.
    let res = raw_request(
        a,
        "GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let h = &res.json()["headers"];
    assert_eq!(h["host"], serde_json::json!(["a.test"]), "{h}");
    assert_eq!(h["x-forwarded-host"], serde_json::json!(["a.test"]), "{h}");
    assert!(h["forwarded"][0]
        .as_str()
        .unwrap()
        .contains("host=\"a.test\""));
    // Forwarded in the same spelling routing used: lower case, no trailing dot.
    let res = raw_request(
        a,
        "GET /x HTTP/1.1\r\nHost: A.Test.\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let h = &res.json()["headers"];
    assert_eq!(h["host"], serde_json::json!(["a.test"]), "{h}");
    assert_eq!(h["x-forwarded-host"], serde_json::json!(["a.test"]), "{h}");
    // Disagreement, duplicates, missing and malformed hosts: 400.
    for head in [
        "GET http://a.test/x HTTP/1.1\r\nHost: other.test\r\n",
        "GET http://other.test/x HTTP/1.1\r\nHost: a.test\r\n",
        "GET /x HTTP/1.1\r\nHost: a.test\r\nHost: other.test\r\n",
        "GET /x HTTP/1.1\r\n",
        "GET /x HTTP/1.1\r\nHost: evil@a.test\r\n",
        "GET /x HTTP/1.1\r\nHost: a.test:80:80\r\n",
        "GET /x HTTP/1.1\r\nHost: a.test:\r\n",
        "GET /x HTTP/1.1\r\nHost: a.test:8x\r\n",
        "GET /x HTTP/1.1\r\nHost: a.test\\@b\r\n",
        "GET /x HTTP/1.1\r\nHost: a\"test\r\n",
    ] {
        let res = raw_request(a, &format!("{head}Connection: close\r\n\r\n")).await;
        assert_eq!(res.status, 400, "{head:?}: {res:?}");
    }
    // HTTP/1.0 may omit Host.
    let res = raw_request(a, "GET /x HTTP/1.0\r\n\r\n").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.body, "other");
}

/// HTTP/2: `:authority` is the authority; a Host header that disagrees is a 400.
#[tokio::test]
async fn http2_authority_and_host_must_agree() {
    let gw = Gateway::start(
        "listeners: [{address: \"127.0.0.1:0\"}]\nroutes:\n  - hosts: [a.test]\n    path_prefix: /\n    respond: {body: a}\n",
    );
    let stream = TcpStream::connect(gw.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let send = |host: Option<&str>| {
        let mut b = hyper::Request::get("http://a.test/x");
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(http_body_util::Empty::<Bytes>::new()).unwrap()
    };
    let res = tokio::time::timeout(Duration::from_secs(10), sender.send_request(send(None)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        sender.send_request(send(Some("b.test"))),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(res.status(), 400);
}

// ---------------------------------------------------------------------------------
// 4. Paths

#[tokio::test]
async fn path_parameters_are_refused_or_never_dot_segments() {
    let up = Upstream::echo().await;
    let route = format!(
        "routes:\n  - path_prefix: /\n    proxy: {{upstream: \"{}\"}}\n",
        up.url()
    );
    let gw = Gateway::start(&format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\n{route}"
    ));
    for target in ["/a;jsessionid=1", "/public/..;/admin", "/a%3Bx"] {
        let res = raw_get(gw.addr(), target, "").await;
        assert_eq!(res.status, 400, "{target}: {res:?}");
        assert_eq!(res.json()["error"]["code"], "INVALID_PATH");
    }
    let gw = Gateway::start(&format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nserver: {{path_parameters: keep}}\n{route}"
    ));
    let res = raw_get(gw.addr(), "/a;jsessionid=1", "").await;
    assert_eq!(res.status, 200, "{res:?}");
    for target in [
        "/public/..;/admin",
        "/public/.;x/admin",
        "/public/%2e%2e;x/admin",
    ] {
        let res = raw_get(gw.addr(), target, "").await;
        assert_eq!(res.status, 400, "{target}: {res:?}");
    }
}

#[tokio::test]
async fn a_method_mismatch_never_falls_through_to_a_public_route() {
    let gw = Gateway::start(
        r#"listeners: [{address: "127.0.0.1:0"}]
routes:
  - name: admin
    path: /admin
    methods: [GET]
    auth: {tokens: [admin-token-0123]}
    respond: {body: admin}
  - name: area
    path_prefix: /area
    methods: [GET]
    auth: {tokens: [admin-token-0123]}
    respond: {body: area}
  - name: public
    path_prefix: /
    public: true
    respond: {body: public}
"#,
    );
    for (method, path) in [
        ("DELETE", "/admin"),
        ("POST", "/admin"),
        ("DELETE", "/area"),
        ("DELETE", "/area/"),
        ("PUT", "/area/x"),
    ] {
        let res = raw_request(
            gw.addr(),
            &format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(res.status, 405, "{method} {path}: {res:?}");
        assert_eq!(res.header("allow"), Some("GET, HEAD"), "{method} {path}");
        assert_ne!(res.body, "public");
    }
    assert_eq!(raw_get(gw.addr(), "/other", "").await.body, "public");
}

// ---------------------------------------------------------------------------------
// 5. Auth that fails closed

#[test]
fn auth_config_mistakes_are_refused() {
    let head = "listeners: [{address: \"127.0.0.1:0\"}]\n";
    let jwt = format!(
        "authenticators:\n  app:\n    jwt: {{algorithms: [HS256], secret: \"{SECRET}\"}}\n"
    );
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{head}{jwt}routes:\n  - path: /x\n    auth: {{authenticators: [app], optional: true, scopes: [a]}}\n    respond: {{body: x}}\n"),
            "`optional: true` cannot be combined with `scopes`",
        ),
        (
            format!("{head}authenticators:\n  idp:\n    jwt: {{algorithms: [RS256], jwks_url: \"http://127.0.0.1:1/jwks\"}}\nroutes:\n  - path: /x\n    auth: {{authenticators: [idp]}}\n    respond: {{body: x}}\n"),
            "audience",
        ),
        (
            format!("{head}authenticators:\n  app:\n    jwt: {{algorithms: [HS256], secret: short-secret}}\nroutes:\n  - path: /x\n    auth: {{authenticators: [app]}}\n    respond: {{body: x}}\n"),
            "at least 16 bytes",
        ),
        (
            format!("{head}auth: {{open: true, tokens: [a-real-token]}}\nroutes:\n  - path: /x\n    respond: {{body: x}}\n"),
            "auth.open",
        ),
        (
            format!("{head}{jwt}routes:\n  - path: /x\n    auth: {{authenticators: [app]}}\n    respond: {{body: x}}\n  - path: /y\n    respond: {{body: y}}\n"),
            "routes[1].auth: no authenticator applies",
        ),
    ];
    for (yaml, needle) in cases {
        let (code, out, err) = check_file(&yaml);
        assert_eq!(code, 1, "accepted:\n{yaml}\n{out}{err}");
        assert!(err.contains(needle), "{needle:?} missing from {err}");
    }
    // A 16–31 byte secret is accepted with a warning.
    let yaml = format!("{head}authenticators:\n  app:\n    jwt: {{algorithms: [HS256], secret: sixteen-bytes-ok-20}}\nroutes:\n  - path: /x\n    auth: {{authenticators: [app]}}\n    respond: {{body: x}}\n");
    let (code, out, err) = check_file(&yaml);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        format!("{out}{err}").contains("shorter than 32 bytes"),
        "{out}{err}"
    );
}

#[tokio::test]
async fn routes_show_each_routes_auth() {
    let gw = Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
admin: {{address: "127.0.0.1:0", token: adm}}
authenticators:
  app:
    jwt: {{algorithms: [HS256], secret: "{SECRET}"}}
routes:
  - name: api
    path: /api
    auth: {{authenticators: [app], scopes: [read]}}
    respond: {{body: x}}
  - name: open
    path: /open
    public: true
    respond: {{body: x}}
"#
    ));
    let res = client()
        .get(gw.admin_url("/admin/routes"))
        .bearer_auth("adm")
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = res.json().await.unwrap();
    let auth_of = |name: &str| {
        body["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()["auth"]
            .clone()
    };
    assert_eq!(auth_of("api"), "app scopes=read", "{body}");
    assert_eq!(auth_of("open"), "public", "{body}");
}

fn issuer_gateway(extra_issuer: &str) -> Gateway {
    Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
store: {{data_dir: "{{{{dir}}}}/data"}}
token_issuer:
  algorithm: HS256
  secret: "{SECRET}"
{extra_issuer}
authenticators:
  strict:
    jwt: {{algorithms: [HS256], secret: "{SECRET}"}}
  lenient:
    jwt: {{algorithms: [HS256], secret: "{SECRET}", accept_guest: true}}
routes:
  - name: strict
    path_prefix: /strict
    auth: {{authenticators: [strict]}}
    respond: {{body: strict}}
  - name: lenient
    path_prefix: /lenient
    auth: {{authenticators: [lenient]}}
    respond: {{body: lenient}}
"#
    ))
}

#[tokio::test]
async fn guest_tokens_are_off_by_default_and_refused_unless_accepted() {
    let gw = issuer_gateway("");
    let res = client().post(gw.url("/auth/guest")).send().await.unwrap();
    assert_error(res, 404, "NOT_FOUND").await;

    let gw = issuer_gateway("  guest_path: /auth/guest");
    let res = client().post(gw.url("/auth/guest")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let guest: serde_json::Value = res.json().await.unwrap();
    let token = guest["token"].as_str().unwrap();
    let res = client()
        .get(gw.url("/strict"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
    let res = client()
        .get(gw.url("/lenient"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// The Metacogna reproduction: a guest token (or a `user` one) never opens /build.
#[tokio::test]
async fn metacogna_build_needs_the_build_scope() {
    let up = Upstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let url = up.url();
    let data = dir.path().join("data").display().to_string();
    let env = [
        ("PORTCULLIS_LISTEN", "127.0.0.1:0"),
        ("PORTCULLIS_ADMIN_LISTEN", "127.0.0.1:0"),
        ("GATEWAY_JWT_SECRET", SECRET),
        ("BUILD_SERVICE_URL", url.as_str()),
        ("KV_SERVICE_URL", url.as_str()),
        ("CORE_SERVICE_URL", url.as_str()),
        ("PORTCULLIS_DATA_DIR", data.as_str()),
    ];
    let example =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/metacogna.yaml");
    let cfg = example.display().to_string();
    let (code, out, err) = run_cli_stdin(
        &["user", "add", "bob", "--role", "user", "-c", &cfg],
        &env,
        "a long user password\n",
    );
    assert_eq!(code, 0, "{out}{err}");
    let gw = Gateway::start_file(&example, &env);
    let c = client();
    let guest: serde_json::Value = c
        .post(gw.url("/auth/guest"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let user: serde_json::Value = c
        .post(gw.url("/auth/login"))
        .json(&serde_json::json!({"username": "bob", "password": "a long user password"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for token in [&guest["token"], &user["token"]] {
        let token = token.as_str().unwrap();
        let res = c
            .get(gw.url("/build/jobs"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_error(res, 403, "INSUFFICIENT_SCOPE").await;
        // /kv keeps optional auth, and accepts both.
        let res = c
            .get(gw.url("/kv/k"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
}

#[tokio::test]
async fn login_failures_lock_a_client_not_the_account() {
    let yaml = format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
store: {{data_dir: "{{{{dir}}}}/data"}}
server: {{trusted_proxies: [127.0.0.1]}}
token_issuer:
  algorithm: HS256
  secret: "{SECRET}"
  login_per_username: 3
  login_per_ip: 50
routes:
  - path: /x
    public: true
    respond: {{body: x}}
"#
    );
    let gw = Gateway::start(&yaml);
    let (code, out, err) = run_cli_stdin(
        &[
            "user",
            "add",
            "alice",
            "-c",
            &gw.config_path.display().to_string(),
        ],
        &[],
        "alice's long password\n",
    );
    assert_eq!(code, 0, "{out}{err}");
    let c = client();
    let login = |from: &'static str, password: &'static str| {
        let c = c.clone();
        let url = gw.url("/auth/login");
        async move {
            c.post(url)
                .header("x-forwarded-for", from)
                .json(&serde_json::json!({"username": "alice", "password": password}))
                .send()
                .await
                .unwrap()
        }
    };
    for _ in 0..3 {
        assert_eq!(login("10.0.0.66", "guess").await.status(), 401);
    }
    let res = login("10.0.0.66", "alice's long password").await;
    assert_error(res, 429, "RATE_LIMITED").await;
    // The owner, elsewhere, still gets in.
    let res = login("10.0.0.7", "alice's long password").await;
    assert_eq!(res.status(), 200);
    // IPv6 clients are one client per /64.
    for _ in 0..3 {
        assert_eq!(login("2001:db8:1:2::1", "guess").await.status(), 401);
    }
    let res = login("2001:db8:1:2::99", "alice's long password").await;
    assert_error(res, 429, "RATE_LIMITED").await;
    // Parallel guesses cannot overtake the counter: at most 3 are checked.
    let guesses = (0..12).map(|_| login("10.0.0.99", "parallel guess"));
    let statuses: Vec<u16> = futures_util::future::join_all(guesses)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        9,
        "{statuses:?}"
    );
    // A username's shape is checked before it becomes a store key.
    let res = c
        .post(gw.url("/auth/login"))
        .json(&serde_json::json!({"username": "a:b\n*", "password": "x"}))
        .send()
        .await
        .unwrap();
    assert_error(res, 400, "BAD_REQUEST").await;
    // Oversized login bodies are refused before parsing.
    let res = c
        .post(gw.url("/auth/login"))
        .body(vec![b'x'; 20_000])
        .send()
        .await
        .unwrap();
    assert_error(res, 413, "PAYLOAD_TOO_LARGE").await;
}

// ---------------------------------------------------------------------------------
// 6. Connections and slow clients

const QUICK: &str = "server: {header_read_timeout: 1s, idle_timeout: 1s}\n";

#[tokio::test]
async fn silent_and_half_open_clients_are_disconnected() {
    let gw = Gateway::start(&format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nadmin: {{address: \"127.0.0.1:0\"}}\n{QUICK}routes:\n  - path: /x\n    respond: {{body: x}}\n"
    ));
    let limit = Duration::from_secs(15);
    for (what, bytes) in [
        ("nothing", &b""[..]),
        ("a lone P", &b"P"[..]),
        ("part of a head", &b"GET /x HTTP/1.1\r\nHo"[..]),
        ("an h2 preface", &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..]),
    ] {
        for addr in [gw.addr(), gw.admin()] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(bytes).await.unwrap();
            assert!(
                closed_within(&mut s, limit).await,
                "{what} on {addr}: still open"
            );
        }
    }
}

#[tokio::test]
async fn idle_http2_connections_get_a_goaway() {
    let gw = Gateway::start(&format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\n{QUICK}routes:\n  - path: /x\n    respond: {{body: x}}\n"
    ));
    let stream = TcpStream::connect(gw.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(format!("http://{}/x", gw.addr()))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    drop(res);
    let ended = tokio::time::timeout(Duration::from_secs(15), conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection stayed open");
}

#[tokio::test]
async fn max_connections_closes_the_excess_at_once() {
    let gw = Gateway::start(
        "listeners: [{address: \"127.0.0.1:0\"}]\nadmin: {address: \"127.0.0.1:0\"}\nserver: {max_connections: 2}\nroutes:\n  - path: /x\n    respond: {body: x}\n",
    );
    let keep_alive = "GET /x HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        s.write_all(keep_alive.as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let mut third = TcpStream::connect(gw.addr()).await.unwrap();
    let _ = third.write_all(keep_alive.as_bytes()).await;
    assert!(closed_within(&mut third, Duration::from_secs(10)).await);
    assert!(admin_metrics(&gw)
        .await
        .contains("portcullis_connections_rejected_total 1"));
    // A freed slot is usable again.
    drop(held.pop());
    let mut ok = false;
    for _ in 0..100 {
        let res = raw_get(gw.addr(), "/x", "").await;
        if res.status == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "a freed slot was never reused");
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_tunnels_are_checked_counted_and_closed_when_idle() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let ws_up = Upstream::ws_echo().await;
    let echo = Upstream::echo().await;
    let gw = Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
admin: {{address: "127.0.0.1:0"}}
routes:
  - name: ws
    path_prefix: /ws
    proxy: {{upstream: "{}", timeouts: {{tunnel_idle: 1s}}}}
  - name: echo
    path_prefix: /
    proxy: {{upstream: "{}"}}
"#,
        ws_up.url(),
        echo.url()
    ));
    let (mut ws, res) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr())),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(res.status(), 101);
    ws.send(Message::text("hi")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap();
    assert_eq!(got.unwrap().unwrap(), Message::text("hi"));
    // The tunnel is an open connection.
    assert!(admin_metrics(&gw)
        .await
        .contains("portcullis_open_connections{listener=\"main\"} 1"));
    // Silent for longer than tunnel_idle: closed.
    let end = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "an idle tunnel stayed open");

    // A broken handshake never reaches the upstream; other protocols are not tunnelled.
    let res = raw_request(
        gw.addr(),
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 426, "{res:?}");
    assert_eq!(res.header("sec-websocket-version"), Some("13"));
    for upgrade in ["websocket", "WebSocket/13"] {
        let res = raw_request(
            gw.addr(),
            &format!("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: {upgrade}\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n"),
        )
        .await;
        assert_eq!(res.status, 400, "{upgrade}: {res:?}");
    }
    let res = raw_request(
        gw.addr(),
        "GET /plain HTTP/1.1\r\nHost: x\r\nUpgrade: h2c, foo\r\nConnection: Upgrade, close\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let h = &res.json()["headers"];
    assert!(
        h.get("upgrade").is_none() && h.get("connection").is_none(),
        "{h}"
    );
}

#[tokio::test]
async fn metrics_token_on_the_main_listener() {
    let gw = Gateway::start(
        "listeners: [{address: \"127.0.0.1:0\"}]\nadmin: {address: \"127.0.0.1:0\", metrics_token: scrape-me}\nmetrics: {listener: main}\nroutes:\n  - path: /x\n    respond: {body: x}\n",
    );
    let c = client();
    let res = c.get(gw.url("/metrics")).send().await.unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
    let res = c
        .get(gw.url("/metrics"))
        .bearer_auth("scrape-me")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn admin_metrics_token() {
    let gw = Gateway::start(
        "listeners: [{address: \"127.0.0.1:0\"}]\nadmin: {address: \"127.0.0.1:0\", metrics_token: scrape-me}\nroutes:\n  - path: /x\n    respond: {body: x}\n",
    );
    let c = client();
    let res = c.get(gw.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "UNAUTHORIZED");
    let res = c
        .get(gw.admin_url("/metrics"))
        .bearer_auth("scrape-me")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn static_dotfiles_are_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    std::fs::create_dir_all(site.join(".git")).unwrap();
    std::fs::write(site.join(".env"), "SECRET=1").unwrap();
    std::fs::write(site.join(".git/config"), "[core]").unwrap();
    std::fs::write(site.join("a.txt"), "a").unwrap();
    let yaml = |extra: &str| {
        format!(
            "listeners: [{{address: \"127.0.0.1:0\"}}]\nroutes:\n  - path_prefix: /\n    static: {{dir: \"{}\"{extra}}}\n",
            site.display()
        )
    };
    let gw = Gateway::start(&yaml(""));
    for path in ["/.env", "/.git/config", "/.git/"] {
        let res = raw_get(gw.addr(), path, "").await;
        assert_eq!(res.status, 404, "{path}: {res:?}");
        assert!(!res.body.contains("SECRET"));
    }
    assert_eq!(raw_get(gw.addr(), "/a.txt", "").await.status, 200);
    let gw = Gateway::start(&yaml(", dotfiles: allow"));
    assert_eq!(raw_get(gw.addr(), "/.env", "").await.status, 200);
}

/// SIGTERM keeps an open tunnel working through the grace period, then the process
/// ends and the tunnel with it.
#[tokio::test(flavor = "multi_thread")]
async fn tunnels_hold_the_drain_for_the_grace_period() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let ws_up = Upstream::ws_echo().await;
    let mut gw = Gateway::start(&format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nserver: {{shutdown_grace: 3s}}\nroutes:\n  - path_prefix: /ws\n    proxy: {{upstream: \"{}\"}}\n",
        ws_up.url()
    ));
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr())),
    )
    .await
    .unwrap()
    .unwrap();
    gw.signal(libc::SIGTERM);
    assert!(
        gw.wait_log("no longer accepting", Duration::from_secs(10))
            .await
    );
    ws.send(Message::text("still there?")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("echo during the grace period");
    assert_eq!(got.unwrap().unwrap(), Message::text("still there?"));
    let mut child = gw.child.take().unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// Login and admin bodies must arrive quickly and small.
#[tokio::test]
async fn gateway_handled_bodies_have_a_deadline_and_a_limit() {
    let gw = Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
admin: {{address: "127.0.0.1:0", token: adm}}
store: {{data_dir: "{{{{dir}}}}/data"}}
token_issuer: {{algorithm: HS256, secret: "{SECRET}"}}
routes:
  - path: /x
    public: true
    respond: {{body: x}}
"#
    ));
    let res = client()
        .post(gw.admin_url("/admin/apikeys"))
        .bearer_auth("adm")
        .body(vec![b' '; 70_000])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    // A login body that stops half-way: 408 after the 10 s deadline, not never.
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"username\":")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
        .await
        .expect("answered within the deadline")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
}

#[test]
fn zero_deadlines_are_refused() {
    for (server, timeouts) in [
        ("server: {idle_timeout: 0s}\n", ""),
        ("server: {header_read_timeout: 0s}\n", ""),
        ("server: {send_timeout: 0s}\n", ""),
        ("", ", timeouts: {body: 0s}"),
        ("", ", timeouts: {tunnel_idle: 0s}"),
    ] {
        let yaml = format!(
            "listeners: [{{address: \"127.0.0.1:0\"}}]\n{server}routes:\n  - path_prefix: /\n    proxy: {{upstream: \"http://127.0.0.1:9\"{timeouts}}}\n"
        );
        let (code, out, err) = check_file(&yaml);
        assert_eq!(code, 1, "accepted:\n{yaml}\n{out}");
        assert!(err.contains("must be longer than 0"), "{err}");
    }
}

/// A client that stops reading a large response is cut after `send_timeout`, freeing
/// its slot (and the upstream connection) instead of holding them forever.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nadmin: {{address: \"127.0.0.1:0\"}}\nserver: {{send_timeout: 1s}}\nroutes:\n  - path_prefix: /\n    proxy: {{upstream: \"{}\"}}\n",
        up.url()
    ));
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"GET /big?download=200000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let open = "portcullis_open_connections{listener=\"main\"} 1";
    let closed = "portcullis_open_connections{listener=\"main\"} 0";
    let mut seen_open = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = admin_metrics(&gw).await;
        seen_open |= m.contains(open);
        if seen_open && m.contains(closed) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a stalled reader kept its connection: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(s);
}

/// The admin listener has a connection cap of its own (256).
#[tokio::test]
async fn admin_listener_connections_are_capped() {
    let gw = Gateway::start(
        "listeners: [{address: \"127.0.0.1:0\"}]\nadmin: {address: \"127.0.0.1:0\"}\nroutes:\n  - path: /x\n    respond: {body: x}\n",
    );
    let mut held = Vec::new();
    for _ in 0..256 {
        held.push(TcpStream::connect(gw.admin()).await.unwrap());
    }
    // Each was accepted (served) before the next: the 257th is closed at once.
    let mut extra = TcpStream::connect(gw.admin()).await.unwrap();
    assert!(closed_within(&mut extra, Duration::from_secs(10)).await);
    drop(held);
    let mut ok = false;
    for _ in 0..100 {
        if let Ok(res) = client().get(gw.admin_url("/health")).send().await {
            if res.status() == 200 {
                ok = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the admin listener never recovered");
}
