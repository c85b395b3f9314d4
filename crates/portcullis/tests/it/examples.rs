//! The shipped examples run as documented.

use std::path::PathBuf;

use crate::harness::*;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

const LOCAL: &[(&str, &str)] = &[
    ("PORTCULLIS_LISTEN", "127.0.0.1:0"),
    ("PORTCULLIS_ADMIN_LISTEN", "127.0.0.1:0"),
    ("PORTCULLIS_ADMIN_TOKEN", "adm"),
];

#[test]
fn every_example_passes_check() {
    for entry in std::fs::read_dir(example("")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (code, out, err) = run_cli(
                &["check", "-c", path.to_str().unwrap()],
                &[
                    ("UPSTREAM_URL", "http://127.0.0.1:1"),
                    ("JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                    ("FNKIT_AUTH_TOKEN", "t"),
                    ("AGENTS_SERVICE_URL", "http://127.0.0.1:1"),
                    ("FOLDFORGE_GATEWAY__API_TOKEN", "t"),
                    ("ORCHESTRATOR_URL", "http://127.0.0.1:1"),
                    ("GATEWAY_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                    ("BUILD_SERVICE_URL", "http://127.0.0.1:1"),
                    ("KV_SERVICE_URL", "http://127.0.0.1:1"),
                    ("CORE_SERVICE_URL", "http://127.0.0.1:1"),
                    ("DEFAULT_BACKEND", "http://127.0.0.1:1"),
                    ("BACKEND_A_URL", "http://127.0.0.1:1"),
                    ("BACKEND_B_URL", "http://127.0.0.1:1"),
                    ("TARGET_A_URL", "http://127.0.0.1:1"),
                    ("TARGET_B_URL", "http://127.0.0.1:2"),
                    ("TARGET_C_URL", "http://127.0.0.1:3"),
                    ("APP_BASE_URL", "https://app.example.com"),
                    ("OIDC_ISSUER", "https://idp.example.com"),
                    ("OIDC_CLIENT_ID", "bff"),
                    ("OIDC_CLIENT_SECRET", "s3cret"),
                    (
                        "SESSION_ENCRYPTION_KEY",
                        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
                    ),
                ],
            );
            assert_eq!(code, 0, "{}: {out}{err}", path.display());
        }
    }
}

#[tokio::test]
async fn quickstart_needs_no_other_service() {
    let gw = Gateway::start_file(&example("quickstart.yaml"), LOCAL);
    let c = client();
    let res = c.get(gw.url("/hello")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "Hello from Portcullis\n");
    let res = c.get(gw.url("/")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.text().await.unwrap().contains("Portcullis is running"));
    // SPA fallback: an unknown page gets the index.
    let res = c.get(gw.url("/some/page")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = c.get(gw.url("/docs")).send().await.unwrap();
    assert_eq!(res.status(), 301);
    assert_eq!(
        c.get(gw.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn proxy_example_forwards_everything() {
    let up = Upstream::echo().await;
    let url = up.url();
    let mut env = LOCAL.to_vec();
    env.push(("UPSTREAM_URL", &url));
    let gw = Gateway::start_file(&example("proxy.yaml"), &env);
    let res = client().get(gw.url("/any/path?x=1")).send().await.unwrap();
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["uri"], "/any/path?x=1");
}

/// FnKit: functions by DNS name (`hello`, from a hosts file, stands in for a
/// container name; `localhost` itself is refused as a function name).
#[tokio::test]
async fn fnkit_example_token_mode() {
    let up = Upstream::echo().await;
    let port = up.addr.port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let hosts = hosts_file(dir.path(), &["hello"]);
    let hosts = hosts.display().to_string();
    let mut env = LOCAL.to_vec();
    env.push(("FN_PORT", &port));
    env.push(("FNKIT_AUTH_TOKEN", "fn-secret"));
    env.push(("FNKIT_HOSTS_FILE", &hosts));
    let data = dir.path().join("data").display().to_string();
    env.push(("PORTCULLIS_DATA_DIR", &data));
    let gw = Gateway::start_file(&example("fnkit.yaml"), &env);
    let c = client();

    // /health without auth: text OK.
    let res = c.get(gw.url("/health")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "OK");
    // / without auth: usage JSON.
    let res = c.get(gw.url("/")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let usage: serde_json::Value = res.json().await.unwrap();
    assert!(usage["usage"]
        .as_str()
        .unwrap()
        .contains("/<container-name>"));

    // Functions need the token (case-sensitive), with WWW-Authenticate.
    let res = c
        .get(gw.url("/hello/api/users?page=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    assert_error(res, 401, "UNAUTHORIZED").await;
    let res = c
        .get(gw.url("/hello/api/users?page=2"))
        .bearer_auth("FN-SECRET")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    let res = c
        .get(gw.url("/hello/api/users?page=2"))
        .bearer_auth("fn-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["uri"], "/api/users?page=2");
    assert!(body["headers"].get("authorization").is_none());
    for bare in ["/hello", "/hello/"] {
        let res = c
            .get(gw.url(bare))
            .bearer_auth("fn-secret")
            .send()
            .await
            .unwrap();
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["path"], "/", "{bare}");
    }
    let res = c
        .get(gw.url("/hello?x=1"))
        .bearer_auth("fn-secret")
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["uri"], "/?x=1");

    // An unknown (or stopped) function: 502 naming it.
    let res = c
        .get(gw.url("/no-such-function/x"))
        .bearer_auth("fn-secret")
        .send()
        .await
        .unwrap();
    let body = assert_error(res, 502, "UPSTREAM_UNAVAILABLE").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-function"),
        "{body}"
    );
    // A function's own 503 passes through untouched.
    let res = c
        .get(gw.url("/hello/x?status=503"))
        .bearer_auth("fn-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["x-upstream"], "echo");
    // `/hello.txt` is not a function name: 404, not a 500.
    let res = c
        .get(gw.url("/hello.txt"))
        .bearer_auth("fn-secret")
        .send()
        .await
        .unwrap();
    assert_error(res, 404, "NOT_FOUND").await;

    // The orchestrator: a pipeline stored through the admin API runs its functions.
    let res = c
        .put(gw.admin_url("/admin/pipelines/twice"))
        .bearer_auth("adm")
        .body(r#"{"mode":"parallel","steps":["hello"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = c
        .get(gw.url("/orchestrate/twice/api/x?y=1"))
        .bearer_auth("fn-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["hello"]["uri"], "/api/x?y=1");
    let res = c
        .get(gw.url("/orchestrate/missing"))
        .bearer_auth("fn-secret")
        .send()
        .await
        .unwrap();
    assert_error(res, 404, "NOT_FOUND").await;
}

/// Open mode is asked for explicitly; an unset token alone is refused. The issue's
/// reproduction (`/2130706433/x` reaching 127.0.0.1) is a 404 with no connection.
#[tokio::test]
async fn fnkit_example_open_mode() {
    let up = Upstream::echo().await;
    let port = up.addr.port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let hosts = hosts_file(dir.path(), &["hello"]);
    let hosts = hosts.display().to_string();
    let mut env = LOCAL.to_vec();
    env.push(("FN_PORT", &port));
    env.push(("FNKIT_AUTH_TOKEN", ""));
    env.push(("FNKIT_HOSTS_FILE", &hosts));
    let (code, _, err) = run_cli(
        &["check", "-c", example("fnkit.yaml").to_str().unwrap()],
        &env,
    );
    assert_eq!(code, 1, "an unset token must not mean open mode: {err}");
    assert!(err.contains("auth.tokens"), "{err}");

    env.push(("FNKIT_OPEN", "true"));
    let gw = Gateway::start_file(&example("fnkit.yaml"), &env);
    let res = client().get(gw.url("/hello/hi")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let before = up.connections.load(std::sync::atomic::Ordering::SeqCst);
    for target in [
        "/2130706433/x",
        "/017700000001/x",
        "/0x7f000001/x",
        "/localhost/x",
        "/127.1/x",
    ] {
        let res = raw_get(gw.addr(), target, "").await;
        assert_eq!(res.status, 404, "{target}: {res:?}");
    }
    assert_eq!(
        up.connections.load(std::sync::atomic::Ordering::SeqCst),
        before
    );
}

/// Eloquent (seed 004): HS256 with issuer/audience, scopes per method, claim headers,
/// public paths, env upstreams.
#[tokio::test]
async fn eloquent_example() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let up = Upstream::echo().await;
    let url = up.url();
    let mut env = LOCAL.to_vec();
    env.push(("JWT_SECRET", "eloquent-secret-0123456789abcdef"));
    env.push(("AGENTS_SERVICE_URL", &url));
    let gw = Gateway::start_file(&example("eloquent.yaml"), &env);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = |scopes: &[&str]| {
        let claims = serde_json::json!({
            "org_id": "org-uuid", "user_id": "user-uuid", "email": "user@example.com", "role": "user",
            "scopes": scopes, "product": "eloquent", "iss": "eloquent-gateway", "aud": "eloquent-api",
            "iat": now, "exp": now + 3600,
        });
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"eloquent-secret-0123456789abcdef"),
        )
        .unwrap()
    };
    let c = client();
    for public in [
        "/health",
        "/ready",
        "/api/v1/docs",
        "/api/v1/docs/openapi.json",
    ] {
        assert_eq!(
            c.get(gw.url(public)).send().await.unwrap().status(),
            200,
            "{public}"
        );
    }
    assert_error(
        c.get(gw.url("/api/v1/agents")).send().await.unwrap(),
        401,
        "UNAUTHORIZED",
    )
    .await;

    let reader = token(&["read"]);
    let res = c
        .get(gw.url("/api/v1/agents"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["headers"]["x-org-id"][0], "org-uuid");
    assert_eq!(body["headers"]["x-user-id"][0], "user-uuid");
    assert_eq!(body["headers"]["x-user-email"][0], "user@example.com");
    assert_eq!(body["headers"]["x-user-role"][0], "user");
    let res = c
        .post(gw.url("/api/v1/agents"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_error(res, 403, "INSUFFICIENT_SCOPE").await;
    let res = c
        .put(gw.url("/api/v1/agents/42"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_error(res, 403, "INSUFFICIENT_SCOPE").await;

    let writer = token(&["read", "write", "write:agents"]);
    assert_eq!(
        c.post(gw.url("/api/v1/agents"))
            .bearer_auth(&writer)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let res = c
        .put(gw.url("/api/v1/agents/42"))
        .bearer_auth(&writer)
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["path"], "/api/v1/agents/42");
    assert_eq!(body["method"], "PUT");
    let res = c
        .delete(gw.url("/api/v1/agents/42"))
        .bearer_auth(&writer)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = c
        .patch(gw.url("/api/v1/agents/42"))
        .bearer_auth(&writer)
        .send()
        .await
        .unwrap();
    assert_error(res, 405, "METHOD_NOT_ALLOWED").await;

    // Seed 004's `cache_ttl: 60s` on GET /api/v1/agents, per principal: the second
    // read of a user is a hit, another user's first read is a miss.
    let sub_token = |sub: &str| {
        let claims = serde_json::json!({
            "sub": sub, "org_id": format!("org-{sub}"), "scopes": ["read"],
            "iss": "eloquent-gateway", "aud": "eloquent-api", "iat": now, "exp": now + 3600,
        });
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"eloquent-secret-0123456789abcdef"),
        )
        .unwrap()
    };
    let (alice, bob) = (sub_token("alice"), sub_token("bob"));
    let read = |t: String| c.get(gw.url("/api/v1/agents?page=1")).bearer_auth(t).send();
    let first = read(alice.clone()).await.unwrap();
    assert_eq!(first.headers()["x-cache"], "MISS");
    let again = read(alice.clone()).await.unwrap();
    assert_eq!(again.headers()["x-cache"], "HIT");
    let body: serde_json::Value = again.json().await.unwrap();
    assert_eq!(body["headers"]["x-org-id"][0], "org-alice");
    let other = read(bob.clone()).await.unwrap();
    assert_eq!(other.headers()["x-cache"], "MISS");
    let body: serde_json::Value = other.json().await.unwrap();
    assert_eq!(body["headers"]["x-org-id"][0], "org-bob");

    // The per-principal limit reports itself; CORS for ALLOWED_ORIGINS' default.
    let res = c
        .get(gw.url("/api/v1/agents/7"))
        .bearer_auth(&alice)
        .header("origin", "http://localhost:3000")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["ratelimit-policy"],
        r#""per-user";q=600;w=60"#
    );
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    assert_eq!(res.headers()["access-control-allow-credentials"], "true");
    let res = c
        .get(gw.url("/api/v1/docs"))
        .header("origin", "https://elsewhere.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("access-control-allow-origin").is_none());
    assert!(
        res.headers().get("ratelimit").is_none(),
        "anonymous: not counted"
    );
}

/// Seed 002's config.yml (`examples/bff-routing.yaml`): host and prefix mappings
/// with /api stripped, the default backend, helmet-style headers on every response
/// (error envelopes included), CORS for the configured and `ALLOWED_ORIGINS`
/// origins, and 60 requests per minute per client IP on /auth/*.
#[tokio::test]
async fn bff_routing_example() {
    let default = Upstream::echo().await;
    let a = Upstream::echo().await;
    let b = Upstream::echo().await;
    let (du, au, bu) = (default.url(), a.url(), b.url());
    let mut env = LOCAL.to_vec();
    env.extend([
        ("DEFAULT_BACKEND", du.as_str()),
        ("BACKEND_A_URL", au.as_str()),
        ("BACKEND_B_URL", bu.as_str()),
        (
            "ALLOWED_ORIGINS",
            "https://extra.example.net, http://localhost:5173",
        ),
    ]);
    let gw = Gateway::start_file(&example("bff-routing.yaml"), &env);
    let c = client();
    let get = |host: &str, path: &str| c.get(gw.url(path)).header("host", host).send();
    let echo = |res: reqwest::Response| async move {
        assert_eq!(res.status(), 200);
        res.json::<serde_json::Value>().await.unwrap()
    };

    // mappings[0]: app.example.com → backend A, /api stripped.
    let body = echo(get("app.example.com", "/api/v1/users").await.unwrap()).await;
    assert_eq!(body["path"], "/v1/users");
    assert_eq!(a.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    // mappings[1]: api.example.com with pathPrefix /v2 → backend B.
    let body = echo(get("api.example.com", "/api/v2/things").await.unwrap()).await;
    assert_eq!(body["path"], "/v2/things");
    assert_eq!(b.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    // api.example.com without /v2, and any other host → the default backend.
    let body = echo(get("api.example.com", "/api/graphql").await.unwrap()).await;
    assert_eq!(body["path"], "/graphql");
    let body = echo(get("other.test", "/api/v1/users").await.unwrap()).await;
    assert_eq!(body["path"], "/v1/users");
    assert_eq!(
        default.requests.load(std::sync::atomic::Ordering::SeqCst),
        2
    );

    // Helmet-style headers on a success, on a 404 and with the seed's CORP.
    for res in [
        get("app.example.com", "/api/x").await.unwrap(),
        get("app.example.com", "/nothing-here").await.unwrap(),
    ] {
        assert_eq!(res.headers()["x-content-type-options"], "nosniff");
        assert_eq!(res.headers()["cross-origin-resource-policy"], "same-site");
        assert_eq!(res.headers()["cross-origin-opener-policy"], "same-origin");
        assert!(res.headers().contains_key("content-security-policy"));
    }

    // CORS: the config's origins and ALLOWED_ORIGINS', credentials on.
    for origin in [
        "https://admin.example.com",
        "http://localhost:5173",
        "https://extra.example.net",
    ] {
        let res = c
            .request(reqwest::Method::OPTIONS, gw.url("/api/v1/users"))
            .header("host", "app.example.com")
            .header("origin", origin)
            .header("access-control-request-method", "PATCH")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 204, "{origin}");
        assert_eq!(res.headers()["access-control-allow-origin"], origin);
        assert_eq!(res.headers()["access-control-allow-credentials"], "true");
        assert_eq!(
            res.headers()["access-control-allow-headers"],
            "content-type, authorization"
        );
    }
    let res = c
        .get(gw.url("/api/x"))
        .header("host", "app.example.com")
        .header("origin", "https://evil.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("access-control-allow-origin").is_none());

    // 60 per minute per client IP on /auth/*, with the IETF headers.
    for i in 0..60 {
        let res = c.get(gw.url("/auth/me")).send().await.unwrap();
        assert_eq!(res.status(), 200, "request {i}");
    }
    let res = c.get(gw.url("/auth/me")).send().await.unwrap();
    assert!(res.headers().contains_key("retry-after"));
    assert!(res.headers().contains_key("ratelimit"));
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    assert_error(res, 429, "RATE_LIMITED").await;
    // Other paths are not limited.
    assert_eq!(
        get("app.example.com", "/api/x").await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn upstreams_example() {
    use crate::resilience::Target;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let (a, b, c) = (
        Target::start("a").await,
        Target::start("b").await,
        Target::start("c").await,
    );
    // A notification receiver standing in for Apprise API.
    let notes = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let seen = notes.clone();
    let apprise = Upstream::serve(false, move |req: hyper::Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            use http_body_util::BodyExt;
            let body = req.into_body().collect().await.unwrap().to_bytes();
            seen.lock()
                .unwrap()
                .push(serde_json::from_slice(&body).unwrap());
            hyper::Response::new(full("ok"))
        }
    })
    .await;
    let (au, bu, cu, nu) = (
        a.url(),
        b.url(),
        c.url(),
        format!("{}/notify/ops", apprise.url()),
    );
    let mut env = LOCAL.to_vec();
    env.extend([
        ("TARGET_A_URL", au.as_str()),
        ("TARGET_B_URL", bu.as_str()),
        ("TARGET_C_URL", cu.as_str()),
        ("HEALTH_INTERVAL", "100ms"),
        ("NOTIFY_URL", nu.as_str()),
        ("NOTIFY_AFTER", "200ms"),
    ]);
    let gw = Gateway::start_file(&example("upstreams.yaml"), &env);
    let cl = client();
    // Weighted 1:1:2 (`/health` checks are counted apart).
    for i in 0..400 {
        let res = cl.get(gw.url(&format!("/p{i}"))).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let got = [&a, &b, &c].map(|u| u.requests.load(Ordering::SeqCst));
    assert_eq!(got, [100, 100, 200]);
    assert!(a.health_requests.load(Ordering::SeqCst) > 0);
    // Target B dies: requests keep succeeding, and once it has been down for
    // NOTIFY_AFTER the Apprise endpoint hears of it.
    b.kill();
    for i in 0..100 {
        let res = cl.get(gw.url(&format!("/q{i}"))).send().await.unwrap();
        assert_eq!(res.status(), 200, "request {i}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while notes.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no notification");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let note = notes.lock().unwrap()[0].clone();
    assert_eq!(note["type"], "failure", "{note}");
    assert!(note["title"].as_str().unwrap().contains(&bu), "{note}");
    assert_eq!(note["tag"], "portcullis");
    let health: serde_json::Value = cl
        .get(gw.admin_url("/admin/health"))
        .bearer_auth("adm")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health[bu.as_str()]["status"], "down", "{health}");
    assert_eq!(health[bu.as_str()]["notifiedDown"], true, "{health}");
    assert_eq!(health[au.as_str()]["status"], "up", "{health}");
}
