//! Part 3: security headers, CSRF, IP rules and header transforms, and the
//! `defaults:` merge they share.

use super::*;

// ---------------------------------------------------------------------------------
// Security headers

fn security_gateway(upstream: &str) -> Gateway {
    Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
authenticators:
  app:
    jwt: {{algorithms: [HS256], secret: "{SECRET}"}}
auth: {{default: [app]}}
defaults:
  security_headers: {{server: "portcullis"}}
routes:
  - name: api
    path_prefix: /api
    proxy: {{upstream: "{upstream}"}}
  - name: framed
    path_prefix: /framed
    public: true
    security_headers: {{x_frame_options: DENY, content_security_policy: "", server: ""}}
    proxy: {{upstream: "{upstream}"}}
  - name: bare
    path_prefix: /bare
    public: true
    security_headers: false
    proxy: {{upstream: "{upstream}"}}
  - name: forced
    path_prefix: /forced
    public: true
    security_headers: {{force: true}}
    proxy: {{upstream: "{upstream}"}}
"#
    ))
}

fn leaky_upstream_response() -> hyper::Response<BoxBody> {
    hyper::Response::builder()
        .header("x-powered-by", "Express")
        .header("server", "internal-app/1.2")
        .header("x-frame-options", "ALLOW-FROM https://partner.test")
        .body(full("ok"))
        .unwrap()
}

const PRESET: [(&str, &str); 6] = [
    ("x-frame-options", "SAMEORIGIN"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    ("content-security-policy", "default-src 'self';base-uri 'self';font-src 'self' https: data:;form-action 'self';frame-ancestors 'self';img-src 'self' data:;object-src 'none';script-src 'self';script-src-attr 'none';style-src 'self' https: 'unsafe-inline';upgrade-insecure-requests"),
];

#[tokio::test]
async fn security_headers_on_responses_and_error_envelopes() {
    let up = Upstream::echo().await;
    let gw = security_gateway(&up.url());
    let token = hs256(serde_json::json!({"sub": "u1", "exp": exp()}));
    let ok = client()
        .get(gw.url("/api/x"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let denied = client().get(gw.url("/api/x")).send().await.unwrap();
    let unmatched = client().get(gw.url("/nowhere")).send().await.unwrap();
    for res in [&ok, &denied, &unmatched] {
        for (name, value) in PRESET {
            assert_eq!(res.headers()[name], value, "{name} on {}", res.status());
        }
        // HSTS only over TLS.
        assert!(res.headers().get("strict-transport-security").is_none());
        assert_eq!(res.headers()["server"], "portcullis");
    }
    assert_eq!(ok.status(), 200);
    assert_error(denied, 401, "UNAUTHORIZED").await;
    assert_error(unmatched, 404, "NOT_FOUND").await;
}

#[tokio::test]
async fn security_headers_are_overridable_removable_and_forceable_per_route() {
    let up = Upstream::serve(false, |_req| async move { leaky_upstream_response() }).await;
    let gw = security_gateway(&up.url());
    let token = hs256(serde_json::json!({"sub": "u1", "exp": exp()}));
    // The upstream's own X-Frame-Options wins by default; X-Powered-By never leaks;
    // `server` replaces the upstream's Server.
    let res = client()
        .get(gw.url("/api/x"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()["x-frame-options"],
        "ALLOW-FROM https://partner.test"
    );
    assert!(res.headers().get("x-powered-by").is_none());
    assert_eq!(res.headers()["server"], "portcullis");
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    // `force: true` replaces the upstream's.
    let res = client().get(gw.url("/forced/x")).send().await.unwrap();
    assert_eq!(res.headers()["x-frame-options"], "SAMEORIGIN");
    // The route's key replaces the default's: `""` removes, `server: ""` drops Server.
    let res = client().get(gw.url("/framed/x")).send().await.unwrap();
    assert!(res.headers().get("content-security-policy").is_none());
    assert!(res.headers().get("server").is_none());
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    // `security_headers: false`: nothing added, nothing removed.
    let res = client().get(gw.url("/bare/x")).send().await.unwrap();
    assert!(res.headers().get("x-content-type-options").is_none());
    assert_eq!(res.headers()["x-powered-by"], "Express");
    assert_eq!(res.headers()["server"], "internal-app/1.2");
}

#[tokio::test(flavor = "multi_thread")]
async fn hsts_is_sent_over_tls_only() {
    let up = Upstream::echo().await;
    let certs = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["gw.test".to_owned()]).unwrap();
    let d = certs.path();
    std::fs::write(d.join("gw.crt"), ck.cert.pem()).unwrap();
    std::fs::write(d.join("gw.key"), ck.signing_key.serialize_pem()).unwrap();
    let gw = Gateway::start(&format!(
        r#"listeners:
  - name: tls
    address: 127.0.0.1:0
    tls: {{certificates: [{{cert_file: {d}/gw.crt, key_file: {d}/gw.key, server_names: [gw.test]}}]}}
  - name: plain
    address: 127.0.0.1:0
defaults:
  security_headers: true
routes:
  - path_prefix: /
    proxy: {{upstream: "{}"}}
"#,
        up.url(),
        d = d.display()
    ));
    let tls = gw.addrs["tls"];
    let https = client_builder()
        .timeout(Duration::from_secs(10))
        .resolve("gw.test", tls)
        .tls_certs_only([reqwest::Certificate::from_pem(ck.cert.pem().as_bytes()).unwrap()])
        .build()
        .unwrap();
    let res = https
        .get(format!("https://gw.test:{}/x", tls.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
    let plain = gw.addrs["plain"];
    let res = client()
        .get(format!("http://{plain}/x"))
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("strict-transport-security").is_none());
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
}

// ---------------------------------------------------------------------------------
// CSRF

fn csrf_gateway(upstream: &str) -> Gateway {
    Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
admin: {{address: "127.0.0.1:0", token: admintoken}}
authenticators:
  app:
    jwt:
      algorithms: [HS256]
      secret: "{SECRET}"
      token_sources: {{header: true, cookie: session}}
auth: {{default: [app]}}
defaults:
  cors: {{allowed_origins: ["https://app.example.com"], allow_credentials: true}}
  csrf: true
routes:
  - name: api
    path_prefix: /api
    proxy: {{upstream: "{upstream}"}}
  - name: form
    path_prefix: /form
    public: true
    csrf: {{allowed_origins: ["https://forms.example.com"]}}
    proxy: {{upstream: "{upstream}"}}
"#
    ))
}

#[tokio::test]
async fn csrf_guards_cookie_authenticated_unsafe_requests() {
    let up = Upstream::echo().await;
    let gw = csrf_gateway(&up.url());
    let token = hs256(serde_json::json!({"sub": "u1", "exp": exp()}));
    let cookie = format!("session={token}");
    let own = format!("http://{}", gw.addr());
    let post = |origin: Option<&str>, referer: Option<&str>| {
        let mut r = client()
            .post(gw.url("/api/x"))
            .header("cookie", &cookie)
            .body("{}");
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        if let Some(rf) = referer {
            r = r.header("referer", rf);
        }
        r.send()
    };
    // Without Origin or Referer: refused. A foreign or `null` origin: refused.
    assert_error(post(None, None).await.unwrap(), 403, "CSRF_REJECTED").await;
    assert_error(
        post(Some("https://evil.com"), None).await.unwrap(),
        403,
        "CSRF_REJECTED",
    )
    .await;
    assert_error(
        post(Some("null"), None).await.unwrap(),
        403,
        "CSRF_REJECTED",
    )
    .await;
    assert_error(
        post(None, Some("https://evil.com/https://app.example.com/"))
            .await
            .unwrap(),
        403,
        "CSRF_REJECTED",
    )
    .await;
    // An allowed origin (taken from CORS), the gateway's own origin, or a Referer
    // from one of them when Origin is absent: admitted.
    assert_eq!(
        post(Some("https://app.example.com"), None)
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(post(Some(&own), None).await.unwrap().status(), 200);
    assert_eq!(
        post(None, Some("https://app.example.com/page?x=1"))
            .await
            .unwrap()
            .status(),
        200
    );
    // Safe methods pass without Origin.
    let res = client()
        .get(gw.url("/api/x"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // A bearer token is not ambient: no Origin needed.
    let res = client()
        .post(gw.url("/api/x"))
        .bearer_auth(&token)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let m = gw
        .wait_metrics(&["portcullis_csrf_rejected_total{route=\"api\"} 4"])
        .await;
    assert!(m.contains("csrf_rejected"));
}

#[tokio::test]
async fn csrf_on_a_public_route_checks_requests_that_carry_cookies() {
    let up = Upstream::echo().await;
    let gw = csrf_gateway(&up.url());
    let post = |cookie: Option<&str>, origin: Option<&str>| {
        let mut r = client().post(gw.url("/form/submit")).body("a=1");
        if let Some(c) = cookie {
            r = r.header("cookie", c);
        }
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    assert_eq!(
        post(None, None).await.unwrap().status(),
        200,
        "no ambient credential"
    );
    assert_error(
        post(Some("sid=1"), Some("https://app.example.com"))
            .await
            .unwrap(),
        403,
        "CSRF_REJECTED",
    )
    .await;
    assert_eq!(
        post(Some("sid=1"), Some("https://forms.example.com"))
            .await
            .unwrap()
            .status(),
        200
    );
}

// ---------------------------------------------------------------------------------
// IP rules

#[tokio::test]
async fn ip_rules_allow_and_deny_ipv4_and_ipv6_clients() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
admin: {{address: "127.0.0.1:0", token: admintoken}}
server:
  trusted_proxies: ["127.0.0.1/32"]
defaults:
  ip: {{deny: ["203.0.113.0/24", "2001:db8:bad::/48"]}}
routes:
  - name: admin
    path_prefix: /admin-ui
    ip: {{allow: ["10.0.0.0/8", "2001:db8::/32"], deny: ["10.66.0.0/16", "2001:db8:bad::/48"]}}
    proxy: {{upstream: "{}"}}
  - name: open
    path_prefix: /
    proxy: {{upstream: "{}"}}
  - name: everyone
    path_prefix: /status
    ip: false
    proxy: {{upstream: "{}"}}
"#,
        up.url(),
        up.url(),
        up.url()
    ));
    // The client address comes from X-Forwarded-For: the test is the trusted proxy.
    let get = |path: &'static str, ip: &'static str| {
        client()
            .get(gw.url(path))
            .header("x-forwarded-for", ip)
            .send()
    };
    assert_eq!(get("/admin-ui/x", "10.1.2.3").await.unwrap().status(), 200);
    assert_eq!(
        get("/admin-ui/x", "2001:db8:1::7").await.unwrap().status(),
        200
    );
    assert_error(
        get("/admin-ui/x", "10.66.1.1").await.unwrap(),
        403,
        "FORBIDDEN",
    )
    .await;
    assert_error(
        get("/admin-ui/x", "2001:db8:bad:1::1").await.unwrap(),
        403,
        "FORBIDDEN",
    )
    .await;
    assert_error(
        get("/admin-ui/x", "192.168.1.1").await.unwrap(),
        403,
        "FORBIDDEN",
    )
    .await;
    assert_error(
        get("/admin-ui/x", "::ffff:192.168.1.1").await.unwrap(),
        403,
        "FORBIDDEN",
    )
    .await;
    assert_eq!(
        get("/admin-ui/x", "::ffff:10.1.2.3")
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(get("/x", "198.51.100.1").await.unwrap().status(), 200);
    assert_error(get("/x", "203.0.113.9").await.unwrap(), 403, "FORBIDDEN").await;
    assert_eq!(get("/status", "203.0.113.9").await.unwrap().status(), 200);
    gw.wait_metrics(&[
        "portcullis_ip_denied_total{route=\"admin\"} 4",
        "portcullis_ip_denied_total{route=\"open\"} 1",
    ])
    .await;
}

#[tokio::test]
async fn ip_rules_use_the_peer_address_when_the_peer_is_not_trusted() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
routes:
  - path_prefix: /
    ip: {{allow: ["10.0.0.0/8"]}}
    proxy: {{upstream: "{}"}}
"#,
        up.url()
    ));
    let res = client()
        .get(gw.url("/x"))
        .header("x-forwarded-for", "10.1.2.3")
        .send()
        .await
        .unwrap();
    assert_error(res, 403, "FORBIDDEN").await;
}

// ---------------------------------------------------------------------------------
// Header transforms

#[tokio::test]
async fn header_transforms_template_params_ids_and_claims() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
authenticators:
  app:
    jwt: {{algorithms: [HS256], secret: "{SECRET}"}}
auth: {{default: [app]}}
defaults:
  headers:
    response: {{set: {{x-served-by: portcullis}}}}
routes:
  - name: tenants
    path: /tenants/{{tenant}}/items
    headers:
      request:
        set: {{x-tenant: "{{tenant}}", x-org: "org-{{claim.org_id}}", x-principal: "{{principal}}", x-rid: "{{request_id}}", x-client: "{{client_ip}}"}}
        add: {{x-trace: "gw"}}
        remove: [x-debug]
      response:
        set: {{x-tenant-echo: "{{tenant}}"}}
        remove: [x-internal]
    proxy: {{upstream: "{}"}}
  - name: plain
    path_prefix: /
    proxy: {{upstream: "{}"}}
"#,
        up.url(),
        up.url()
    ));
    let token = hs256(serde_json::json!({"sub": "u1", "org_id": 42, "exp": exp()}));
    let res = client()
        .get(gw.url("/tenants/acme/items"))
        .bearer_auth(&token)
        .header("x-request-id", "rid-123")
        .header("x-debug", "1")
        .header("x-tenant", "victim")
        .header("x-trace", "client")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-tenant-echo"], "acme");
    // The route's `headers` replaced the default's.
    assert!(res.headers().get("x-served-by").is_none());
    let h = res.json::<serde_json::Value>().await.unwrap()["headers"].clone();
    assert_eq!(h["x-tenant"], serde_json::json!(["acme"]), "{h}");
    assert_eq!(h["x-org"], serde_json::json!(["org-42"]), "{h}");
    assert_eq!(h["x-principal"], serde_json::json!(["u1"]), "{h}");
    assert_eq!(h["x-rid"], serde_json::json!(["rid-123"]), "{h}");
    assert_eq!(h["x-client"], serde_json::json!(["127.0.0.1"]), "{h}");
    assert_eq!(h["x-trace"], serde_json::json!(["client", "gw"]), "{h}");
    assert!(h.get("x-debug").is_none(), "{h}");

    // A token without the claim: the header is not sent, and the client's copy is
    // gone all the same.
    let token = hs256(serde_json::json!({"sub": "u2", "exp": exp()}));
    let res = client()
        .get(gw.url("/tenants/acme/items"))
        .bearer_auth(&token)
        .header("x-org", "org-victim")
        .send()
        .await
        .unwrap();
    let h = res.json::<serde_json::Value>().await.unwrap()["headers"].clone();
    assert!(h.get("x-org").is_none(), "{h}");

    let res = client()
        .get(gw.url("/other"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-served-by"], "portcullis");
    // Response transforms apply to error envelopes too.
    let res = client().get(gw.url("/other")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert!(
        res.headers().get("x-served-by").is_none(),
        "headers run after auth"
    );
}

#[test]
fn policy_config_mistakes_fail_check_with_their_field() {
    let (code, err) = check(
        r#"listeners: [{address: "127.0.0.1:0"}]
defaults:
  ip: {allow: ["10.0.0.0/33"]}
  security_headers: {x_frame_options: "bad\u0001"}
routes:
  - path: /items/{id}
    headers:
      request: {set: {x-a: "{nope}", content-length: "1", "bad name": x}}
      response: {add: {x-b: "{claim.}"}}
    respond: {status: 200}
  - path: /c
    csrf: {allowed_origins: ["*"]}
    respond: {status: 200}
"#,
    );
    assert_ne!(code, 0);
    for needle in [
        "defaults.ip.allow[0]",
        "defaults.security_headers.x_frame_options",
        "routes[0].headers.request.set.x-a",
        "routes[0].headers.request.set",
        "routes[0].headers.response.add.x-b",
        "routes[1].csrf.allowed_origins",
    ] {
        assert!(err.contains(needle), "{needle} missing from:\n{err}");
    }
}

/// Rules written in IPv4-mapped IPv6 form mean the IPv4 addresses (clients are
/// compared as IPv4): `::ffff:127.0.0.1` denies 127.0.0.1.
#[tokio::test]
async fn ip_rules_in_mapped_form_match_ipv4_clients() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
routes:
  - path_prefix: /
    ip: {{deny: ["::ffff:127.0.0.0/104"]}}
    proxy: {{upstream: "{}"}}
"#,
        up.url()
    ));
    let res = client().get(gw.url("/x")).send().await.unwrap();
    assert_error(res, 403, "FORBIDDEN").await;
}
