//! Routing: hosts, ports, path kinds, methods, hostile paths, per-route request
//! rewriting, templated upstreams and the non-proxy actions, all over real sockets.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use crate::harness::*;

/// A verbatim request with a chosen method, Host header and target.
async fn send(addr: SocketAddr, method: &str, host: &str, target: &str) -> RawResponse {
    raw(
        addr,
        &format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// GET with a chosen Host header; returns (status, body).
async fn get_host(addr: SocketAddr, host: &str, target: &str) -> (u16, String) {
    let res = send(addr, "GET", host, target).await;
    (res.status, res.body)
}

#[track_caller]
fn assert_raw_error(res: &RawResponse, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(res.status, status, "{res:?}");
    let body = res.json();
    assert_eq!(body["error"]["code"], code, "{res:?}");
    assert!(body["error"]["message"].is_string(), "{res:?}");
    assert_eq!(
        body["error"]["request_id"].as_str(),
        res.header("x-request-id"),
        "{res:?}"
    );
    body
}

/// The echo body's view of the upstream path (`path`) and full URI (`uri`).
async fn echo_json(res: reqwest::Response) -> serde_json::Value {
    assert_eq!(res.status(), 200, "unexpected status");
    assert_eq!(res.headers()["x-upstream"], "echo");
    res.json().await.unwrap()
}

const LISTENER: &str = "listeners:\n  - address: 127.0.0.1:0\n";

// ---------------------------------------------------------------------------------
// Hosts

#[tokio::test]
async fn host_matching_exact_wildcard_port_and_precedence() {
    let port = free_port();
    let yaml = format!(
        r#"listeners:
  - address: 127.0.0.1:{port}
routes:
  - name: exact
    hosts: [api.test]
    path_prefix: /
    respond: {{body: exact}}
  - name: wild
    hosts: ["*.example.com"]
    path_prefix: /
    respond: {{body: wild}}
  - name: ported
    hosts: [ported.test]
    port: {port}
    path_prefix: /
    respond: {{body: ported}}
  - name: never
    hosts: [never.test]
    port: 8443
    path_prefix: /
    respond: {{body: never}}
  - name: a-y
    hosts: [a.com]
    path: /y
    respond: {{body: a-y}}
  - name: b-y
    hosts: [b.com]
    path: /y
    respond: {{body: b-y}}
  - name: b-host-only
    hosts: [b.com]
    respond: {{body: b-host-only}}
  - name: default-x
    path: /x
    respond: {{body: default-x}}
"#
    );
    let gw = Gateway::start(&yaml);
    let a = gw.addr();

    // Exact host, case-insensitive, with or without a port.
    assert_eq!(get_host(a, "api.test", "/").await, (200, "exact".into()));
    assert_eq!(
        get_host(a, "API.Test:1234", "/q").await,
        (200, "exact".into())
    );
    // `other.test` has no host route and the default route only has /x.
    assert_eq!(get_host(a, "other.test", "/").await.0, 404);
    assert_eq!(
        get_host(a, "other.test", "/x").await,
        (200, "default-x".into())
    );

    // Wildcards match at any depth below the suffix, never the suffix itself.
    assert_eq!(
        get_host(a, "a.example.com", "/").await,
        (200, "wild".into())
    );
    assert_eq!(
        get_host(a, "a.b.example.com", "/z").await,
        (200, "wild".into())
    );
    assert_eq!(get_host(a, "example.com", "/").await.0, 404);
    assert_eq!(
        get_host(a, "example.com", "/x").await,
        (200, "default-x".into())
    );
    assert_eq!(get_host(a, "a.example.org", "/").await.0, 404);

    // `port` matches the listener's port, never the port a client writes in Host.
    for host in ["ported.test", "ported.test:9999", "ported.test:8443"] {
        assert_eq!(
            get_host(a, host, "/").await,
            (200, "ported".into()),
            "{host}"
        );
    }
    assert_eq!(get_host(a, "never.test:8443", "/").await.0, 404);
    assert_eq!(get_host(a, "never.test", "/").await.0, 404);

    // Precedence: host+path, then host-only, then the default route.
    assert_eq!(get_host(a, "b.com", "/y").await, (200, "b-y".into()));
    assert_eq!(
        get_host(a, "b.com", "/x").await,
        (200, "b-host-only".into())
    );
    assert_eq!(get_host(a, "a.com", "/y").await, (200, "a-y".into()));
    // a.com has only /y: /x falls through to the default route.
    assert_eq!(get_host(a, "a.com", "/x").await, (200, "default-x".into()));
    assert_eq!(get_host(a, "a.com", "/nothing").await.0, 404);
}

// ---------------------------------------------------------------------------------
// Paths

#[tokio::test]
async fn path_kinds_and_precedence() {
    let up = Upstream::echo().await;
    let u = up.url();
    let yaml = format!(
        r#"{LISTENER}routes:
  - name: exact
    path: /exact
    respond: {{body: exact}}
  - name: api
    path_prefix: /api
    respond: {{body: api}}
  - name: users-new
    path: /users/new
    respond: {{body: static}}
  - name: user
    path: /users/{{id}}
    proxy:
      upstream: {u}
      rewrite: /param/{{id}}
  - name: user-rest
    path: /users/{{id}}/{{*rest}}
    proxy:
      upstream: {u}
      rewrite: /catchall/{{id}}/{{rest}}
"#
    );
    let gw = Gateway::start(&yaml);
    let c = client();
    let text = |p: &'static str| {
        let c = c.clone();
        let url = gw.url(p);
        async move {
            let res = c.get(url).send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    };

    // Exact path: nothing else.
    assert_eq!(text("/exact").await, (200, "exact".into()));
    assert_eq!(text("/exact/").await.0, 404);
    assert_eq!(text("/exact/x").await.0, 404);
    assert_eq!(text("/exactly").await.0, 404);

    // Prefix on a segment boundary.
    assert_eq!(text("/api").await, (200, "api".into()));
    assert_eq!(text("/api/").await, (200, "api".into()));
    assert_eq!(text("/api/x/y").await, (200, "api".into()));
    assert_eq!(text("/apix").await.0, 404);
    assert_eq!(text("/ap").await.0, 404);

    // Static beats param beats catch-all.
    assert_eq!(text("/users/new").await, (200, "static".into()));
    let res = c.get(gw.url("/users/42?x=1")).send().await.unwrap();
    let body = echo_json(res).await;
    assert_eq!(body["path"], "/param/42");
    assert_eq!(body["query"], "x=1");
    let res = c.get(gw.url("/users/42/a/b")).send().await.unwrap();
    assert_eq!(echo_json(res).await["path"], "/catchall/42/a/b");
    // `new` is only static on its own: below it the catch-all applies.
    let res = c.get(gw.url("/users/new/x")).send().await.unwrap();
    assert_eq!(echo_json(res).await["path"], "/catchall/new/x");
    assert_eq!(text("/users").await.0, 404);
}

// ---------------------------------------------------------------------------------
// Methods

#[tokio::test]
async fn methods_select_routes_head_follows_get_and_405_lists_allow() {
    let up_get = Upstream::echo().await;
    let up_post = Upstream::echo().await;
    let yaml = format!(
        r#"{LISTENER}routes:
  - name: items-get
    path: /items
    methods: [GET]
    proxy: {{upstream: "{}"}}
  - name: items-post
    path: /items
    methods: [POST]
    proxy: {{upstream: "{}"}}
  - name: ro
    path: /ro
    methods: [get]
    respond: {{body: read-only}}
"#,
        up_get.url(),
        up_post.url()
    );
    let gw = Gateway::start(&yaml);
    let c = client();

    // HEAD is served by the GET route (and reaches the GET upstream only).
    let res = c.head(gw.url("/items")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-upstream"], "echo");
    assert_eq!(up_get.connections.load(Ordering::SeqCst), 1);
    assert_eq!(up_post.connections.load(Ordering::SeqCst), 0);

    let res = c.get(gw.url("/items")).send().await.unwrap();
    let body = echo_json(res).await;
    assert_eq!(body["method"], "GET");
    assert_eq!(body["headers"]["host"][0], up_get.addr.to_string());

    let res = c.post(gw.url("/items")).body("x").send().await.unwrap();
    let body = echo_json(res).await;
    assert_eq!(body["method"], "POST");
    assert_eq!(body["headers"]["host"][0], up_post.addr.to_string());
    assert_eq!(body["body_len"], 1);

    // HEAD on a respond route: status and headers, no body.
    let res = c.head(gw.url("/ro")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "");
    let res = c.get(gw.url("/ro")).send().await.unwrap();
    assert_eq!(res.text().await.unwrap(), "read-only");

    // Wrong method: 405 with Allow.
    let res = c.delete(gw.url("/items")).send().await.unwrap();
    let allow = res
        .headers()
        .get("allow")
        .expect("Allow header on 405")
        .to_str()
        .unwrap()
        .to_owned();
    assert_error(res, 405, "METHOD_NOT_ALLOWED").await;
    let allowed: Vec<&str> = allow.split(',').map(str::trim).collect();
    for m in ["GET", "HEAD", "POST"] {
        assert!(allowed.contains(&m), "Allow: {allow}");
    }
    assert!(!allowed.contains(&"DELETE"), "Allow: {allow}");

    let res = c.post(gw.url("/ro")).send().await.unwrap();
    let allow = res.headers()["allow"].to_str().unwrap().to_owned();
    assert_error(res, 405, "METHOD_NOT_ALLOWED").await;
    assert!(allow.contains("GET") && !allow.contains("POST"), "{allow}");
    assert_eq!(up_post.connections.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------
// Hostile paths

fn guarded_config(public: &str, admin: &str, extra: &str) -> String {
    format!(
        r#"{LISTENER}{extra}auth:
  tokens: [s3cret-token]
routes:
  - name: public
    path_prefix: /public
    public: true
    proxy: {{upstream: "{public}"}}
  - name: admin
    path_prefix: /admin
    proxy: {{upstream: "{admin}"}}
"#
    )
}

#[tokio::test]
async fn traversal_spellings_never_bypass_auth() {
    let public = Upstream::echo().await;
    let admin = Upstream::echo().await;
    let gw = Gateway::start(&guarded_config(&public.url(), &admin.url(), ""));
    for target in [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public/.%2e/admin",
        "/public/%2e./admin",
        "//admin",
        "/public/./../admin",
        "/public/x/../../admin/users",
        "/public/../admin?x=1",
        "/../../admin",
    ] {
        let res = raw_get(gw.addr(), target, "").await;
        assert_raw_error(&res, 401, "UNAUTHORIZED");
        assert!(
            res.header("x-upstream").is_none(),
            "{target} reached an upstream: {res:?}"
        );
    }
    assert_eq!(admin.connections.load(Ordering::SeqCst), 0);
    assert_eq!(public.connections.load(Ordering::SeqCst), 0);

    // With the token they reach admin, which sees the normalised path.
    let auth = "Authorization: Bearer s3cret-token\r\n";
    let res = raw_get(gw.addr(), "/public/%2e%2e/admin/x?q=%2F", auth).await;
    assert_eq!(res.status, 200, "{res:?}");
    let body = res.json();
    assert_eq!(body["path"], "/admin/x");
    assert_eq!(body["query"], "q=%2F");
    assert_eq!(admin.connections.load(Ordering::SeqCst), 1);

    // The public upstream sees normalised paths too.
    for (target, want) in [
        ("/public/./a/../b", "/public/b"),
        ("/public//a///b/", "/public/a/b/"),
        ("/public/%7euser/%41", "/public/~user/A"),
        ("/public/a%3fb", "/public/a%3Fb"),
    ] {
        let res = raw_get(gw.addr(), target, "").await;
        assert_eq!(res.status, 200, "{target}: {res:?}");
        assert_eq!(res.json()["path"], want, "{target}");
    }
}

#[tokio::test]
async fn encoded_slashes_and_nul_are_rejected_by_default() {
    let public = Upstream::echo().await;
    let admin = Upstream::echo().await;
    let gw = Gateway::start(&guarded_config(&public.url(), &admin.url(), ""));
    for target in [
        "/public/..%2Fadmin",
        "/public/..%2fadmin",
        "/a%2Fb",
        "/public/a%5Cb",
        "/public/a%00",
        "/public/%00/../admin",
        "/public/%zz",
        "/public/a%5c..%5c..%5cadmin",
    ] {
        let res = raw_get(gw.addr(), target, "").await;
        assert_raw_error(&res, 400, "INVALID_PATH");
    }
    assert_eq!(admin.connections.load(Ordering::SeqCst), 0);
    assert_eq!(public.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn encoded_slashes_kept_stay_encoded_upstream() {
    let public = Upstream::echo().await;
    let admin = Upstream::echo().await;
    let gw = Gateway::start(&guarded_config(
        &public.url(),
        &admin.url(),
        "server:\n  encoded_slashes: keep\n",
    ));
    let res = raw_get(gw.addr(), "/public/a%2fb", "").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.json()["path"], "/public/a%2Fb");
    // A kept slash is never a separator: no traversal into /admin.
    let res = raw_get(gw.addr(), "/public/..%2Fadmin", "").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.json()["path"], "/public/..%2Fadmin");
    let res = raw_get(gw.addr(), "/admin%2Fx", "").await;
    assert_raw_error(&res, 404, "NOT_FOUND");
    assert_eq!(admin.connections.load(Ordering::SeqCst), 0);
    // NUL is refused whatever the slash policy.
    let res = raw_get(gw.addr(), "/public/a%00b", "").await;
    assert_raw_error(&res, 400, "INVALID_PATH");
}

// ---------------------------------------------------------------------------------
// Per-route request rewriting

#[tokio::test]
async fn strip_prefix_rewrite_and_base_path() {
    let up = Upstream::echo().await;
    let u = up.url();
    let yaml = format!(
        r#"{LISTENER}routes:
  - name: svc
    path_prefix: /svc
    proxy: {{upstream: "{u}", strip_prefix: true}}
  - name: users
    path: /users/{{id}}
    proxy: {{upstream: "{u}", rewrite: "/v2/{{id}}"}}
  - name: old
    path_prefix: /old
    proxy: {{upstream: "{u}", rewrite: "/new/{{rest}}"}}
  - name: base
    path: /x
    proxy: {{upstream: "{u}/base"}}
  - name: base-slash
    path_prefix: /y
    proxy: {{upstream: "{u}/base/"}}
  - name: base-strip
    path_prefix: /z
    proxy: {{upstream: "{u}/base", strip_prefix: true}}
"#
    );
    let gw = Gateway::start(&yaml);
    let c = client();
    let path_of = |p: &'static str| {
        let c = c.clone();
        let url = gw.url(p);
        async move {
            let body = echo_json(c.get(url).send().await.unwrap()).await;
            (
                body["path"].as_str().unwrap().to_owned(),
                body["query"].as_str().unwrap().to_owned(),
            )
        }
    };
    assert_eq!(path_of("/svc/a/b").await.0, "/a/b");
    assert_eq!(path_of("/svc/a/b/").await.0, "/a/b/");
    assert_eq!(path_of("/svc").await.0, "/");
    assert_eq!(path_of("/svc/").await.0, "/");
    assert_eq!(
        path_of("/svc/a?page=2&q=x").await,
        ("/a".into(), "page=2&q=x".into())
    );
    assert_eq!(path_of("/users/42").await.0, "/v2/42");
    assert_eq!(
        path_of("/users/42?full=1").await,
        ("/v2/42".into(), "full=1".into())
    );
    assert_eq!(path_of("/old/a/b").await.0, "/new/a/b");
    assert_eq!(path_of("/x").await.0, "/base/x");
    assert_eq!(path_of("/x?k=v").await, ("/base/x".into(), "k=v".into()));
    assert_eq!(path_of("/y/1").await.0, "/base/y/1");
    assert_eq!(path_of("/z/1").await.0, "/base/1");
}

#[tokio::test]
async fn preserve_host_or_upstream_host() {
    let up = Upstream::echo().await;
    let u = up.url();
    let yaml = format!(
        r#"{LISTENER}routes:
  - name: keep
    path_prefix: /keep
    proxy: {{upstream: "{u}", preserve_host: true}}
  - name: own
    path_prefix: /own
    proxy: {{upstream: "{u}"}}
"#
    );
    let gw = Gateway::start(&yaml);
    let res = send(gw.addr(), "GET", "client.example:1234", "/keep/x").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.json()["headers"]["host"][0], "client.example:1234");
    let res = send(gw.addr(), "GET", "client.example:1234", "/own/x").await;
    assert_eq!(res.status, 200, "{res:?}");
    let body = res.json();
    assert_eq!(body["headers"]["host"][0], up.addr.to_string());
    assert_eq!(body["headers"]["host"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn max_request_body_limits_sized_and_chunked_bodies() {
    let up = Upstream::echo().await;
    let yaml = format!(
        r#"{LISTENER}routes:
  - name: small
    path_prefix: /small
    max_request_body: 1KiB
    proxy: {{upstream: "{}"}}
"#,
        up.url()
    );
    let gw = Gateway::start(&yaml);
    let c = client();

    // With Content-Length.
    let res = c
        .post(gw.url("/small/x"))
        .body(vec![b'a'; 2048])
        .send()
        .await
        .unwrap();
    assert_error(res, 413, "PAYLOAD_TOO_LARGE").await;

    // Chunked (no Content-Length): cut while streaming.
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = (0..8)
        .map(|_| Ok(bytes::Bytes::from(vec![b'b'; 256])))
        .collect();
    let res = c
        .post(gw.url("/small/x"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_error(res, 413, "PAYLOAD_TOO_LARGE").await;

    // Under the limit, both ways.
    let res = c
        .post(gw.url("/small/x"))
        .body(vec![b'a'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(echo_json(res).await["body_len"], 1000);
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = (0..4)
        .map(|_| Ok(bytes::Bytes::from(vec![b'b'; 256])))
        .collect();
    let res = c
        .post(gw.url("/small/x"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(echo_json(res).await["body_len"], 1024);
}

// ---------------------------------------------------------------------------------
// Templated upstreams (FnKit)

#[tokio::test]
async fn templated_upstream_by_function_name() {
    let up = Upstream::echo().await;
    let port = up.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let hosts = hosts_file(dir.path(), &["hello"]);
    let hosts = hosts.display();
    let yaml = format!(
        r#"{LISTENER}server:
  hosts_file: "{hosts}"
routes:
  - name: fn
    path_prefix: "/{{name}}"
    proxy:
      upstream: "http://{{name}}:{port}"
      strip_prefix: true
      timeouts: {{connect: 2s}}
"#
    );
    let gw = Gateway::start(&yaml);
    let c = client();

    let res = c
        .get(gw.url("/hello/api/users?page=2"))
        .send()
        .await
        .unwrap();
    let body = echo_json(res).await;
    assert_eq!(body["uri"], "/api/users?page=2");
    assert_eq!(body["headers"]["host"][0], format!("hello:{port}"));
    for p in ["/hello", "/hello/"] {
        let res = c.get(gw.url(p)).send().await.unwrap();
        assert_eq!(echo_json(res).await["path"], "/", "{p}");
    }

    // Not a DNS label: never resolved, never proxied.
    let before = up.connections.load(Ordering::SeqCst);
    let res = c.get(gw.url("/hello.txt/x")).send().await.unwrap();
    assert_error(res, 404, "NOT_FOUND").await;
    let res = raw_get(gw.addr(), "/127.0.0.1%3A1/x", "").await;
    assert_raw_error(&res, 404, "NOT_FOUND");
    assert_eq!(up.connections.load(Ordering::SeqCst), before);

    // A name that does not resolve: 502 naming the function, nothing internal.
    let res = c.get(gw.url("/no-such-fn-xyz/x")).send().await.unwrap();
    let body = assert_error(res, 502, "UPSTREAM_UNAVAILABLE").await;
    let text = body.to_string();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no-such-fn-xyz"),
        "message should name the function: {body}"
    );
    let lower = text.to_ascii_lowercase();
    for leak in ["dns", "lookup", "os error", "tcp", "resolve", "hyper"] {
        assert!(
            !lower.contains(leak),
            "internal detail {leak:?} leaked: {text}"
        );
    }
    assert_eq!(body["error"]["retryable"], true);
}

// ---------------------------------------------------------------------------------
// Actions

fn site_dir() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let site = root.path().join("site");
    std::fs::create_dir_all(site.join("sub")).unwrap();
    std::fs::write(site.join("index.html"), "<h1>index</h1>").unwrap();
    std::fs::write(site.join("a.css"), "body{color:red}").unwrap();
    std::fs::write(site.join("sub/b.txt"), "bee").unwrap();
    // Outside the served directory.
    std::fs::write(root.path().join("secret.txt"), "TOP-SECRET").unwrap();
    root
}

#[tokio::test]
async fn static_files_index_spa_and_no_escape() {
    let root = site_dir();
    let site = root.path().join("site");
    let site = site.display();
    let yaml = format!(
        r#"{LISTENER}routes:
  - name: site
    path_prefix: /site
    static: {{dir: "{site}"}}
  - name: spa
    path_prefix: /spa
    static: {{dir: "{site}", spa_fallback: true, cache_control: "max-age=60"}}
  - name: files
    hosts: [files.test]
    path_prefix: /
    static: {{dir: "{site}"}}
"#
    );
    let gw = Gateway::start(&yaml);
    let c = client();

    let res = c.get(gw.url("/site/a.css")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/css"), "{ct}");
    assert_eq!(res.text().await.unwrap(), "body{color:red}");

    let res = c.get(gw.url("/site/sub/b.txt")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "bee");

    for p in ["/site/", "/site"] {
        let res = c.get(gw.url(p)).send().await.unwrap();
        let status = res.status().as_u16();
        let ct = res
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = res.text().await.unwrap();
        assert_eq!(status, 200, "{p}");
        assert!(ct.unwrap_or_default().starts_with("text/html"), "{p}");
        assert_eq!(body, "<h1>index</h1>", "{p}");
    }

    let res = c.get(gw.url("/site/missing.css")).send().await.unwrap();
    assert_error(res, 404, "NOT_FOUND").await;
    let res = c.get(gw.url("/site/some/page")).send().await.unwrap();
    assert_error(res, 404, "NOT_FOUND").await;

    // SPA fallback: page-like paths get the index, assets stay 404.
    let res = c.get(gw.url("/spa/some/page")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "max-age=60");
    assert_eq!(res.text().await.unwrap(), "<h1>index</h1>");
    let res = c.get(gw.url("/spa/a.css")).send().await.unwrap();
    assert_eq!(res.text().await.unwrap(), "body{color:red}");
    let res = c.get(gw.url("/spa/missing.js")).send().await.unwrap();
    assert_error(res, 404, "NOT_FOUND").await;

    // Traversal never escapes the directory.
    for target in [
        "/site/../Cargo.toml",
        "/site/../secret.txt",
        "/site/%2e%2e/secret.txt",
        "/site/sub/../../secret.txt",
        "/spa/../secret.txt",
        "/spa/..%2fsecret.txt",
        "/site/%2e%2e%2fsecret.txt",
    ] {
        let res = raw_get(gw.addr(), target, "").await;
        assert!(res.status == 404 || res.status == 400, "{target}: {res:?}");
        assert!(!res.body.contains("TOP-SECRET"), "{target}: {res:?}");
    }
    for target in [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/sub/../../secret.txt",
    ] {
        let res = send(gw.addr(), "GET", "files.test", target).await;
        assert_raw_error(&res, 404, "NOT_FOUND");
        assert!(!res.body.contains("TOP-SECRET"), "{target}: {res:?}");
    }
    let res = send(gw.addr(), "GET", "files.test", "/sub/b.txt").await;
    assert_eq!((res.status, res.body.as_str()), (200, "bee"));
}

#[tokio::test]
async fn respond_action() {
    let yaml = format!(
        r#"{LISTENER}routes:
  - name: tea
    path: /tea
    respond:
      status: 418
      headers: {{x-kind: earl-grey, cache-control: no-cache}}
      body: "I'm a teapot"
      content_type: text/x-tea
  - name: plain
    path: /plain
    respond: {{body: hello}}
"#
    );
    let gw = Gateway::start(&yaml);
    let c = client();
    let res = c.get(gw.url("/tea")).send().await.unwrap();
    assert_eq!(res.status(), 418);
    assert_eq!(res.headers()["x-kind"], "earl-grey");
    assert_eq!(res.headers()["cache-control"], "no-cache");
    assert_eq!(res.headers()["content-type"], "text/x-tea");
    assert!(res.headers().contains_key("x-request-id"));
    assert_eq!(res.text().await.unwrap(), "I'm a teapot");

    let res = c.post(gw.url("/plain")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(res.text().await.unwrap(), "hello");
}

#[tokio::test]
async fn redirect_action() {
    let yaml = format!(
        r#"{LISTENER}routes:
  - name: moved
    path: /old/{{id}}
    redirect: {{to: "/new/{{id}}", status: 301}}
  - name: dropq
    path: /drop/{{id}}
    redirect: {{to: "/new/{{id}}", keep_query: false}}
  - name: away
    path_prefix: /away
    redirect: {{to: "https://elsewhere.test/{{rest}}"}}
"#
    );
    let gw = Gateway::start(&yaml);
    let c = client();
    let location = |res: &reqwest::Response| {
        res.headers()
            .get("location")
            .expect("Location")
            .to_str()
            .unwrap()
            .to_owned()
    };
    let res = c.get(gw.url("/old/7")).send().await.unwrap();
    assert_eq!(res.status(), 301);
    assert_eq!(location(&res), "/new/7");
    let res = c.get(gw.url("/old/7?a=1&b=2")).send().await.unwrap();
    assert_eq!(res.status(), 301);
    assert_eq!(location(&res), "/new/7?a=1&b=2");

    let res = c.get(gw.url("/drop/8?a=1")).send().await.unwrap();
    assert_eq!(res.status(), 302);
    assert_eq!(location(&res), "/new/8");

    let res = c.get(gw.url("/away/x/y?z=1")).send().await.unwrap();
    assert_eq!(res.status(), 302);
    assert_eq!(location(&res), "https://elsewhere.test/x/y?z=1");
}

// ---------------------------------------------------------------------------------
// Scale

#[tokio::test]
async fn ten_thousand_routes() {
    use std::fmt::Write;
    let mut yaml = format!("{LISTENER}routes:\n");
    for i in 0..10_000 {
        if i % 2 == 0 {
            let _ = writeln!(
                yaml,
                "  - {{name: r{i}, path: \"/svc{i}/items/{{id}}\", redirect: {{to: \"/dest{i}/{{id}}\"}}}}"
            );
        } else {
            let _ = writeln!(
                yaml,
                "  - {{name: r{i}, hosts: [h{i}.example.com], path_prefix: /p, respond: {{body: \"r{i}\"}}}}"
            );
        }
    }
    let started = std::time::Instant::now();
    let gw = Gateway::start(&yaml);
    let startup = started.elapsed();
    assert!(
        startup.as_secs() < 15,
        "10k routes took {startup:?} to start"
    );

    let c = client();
    for (path, want) in [
        ("/svc0/items/1", "/dest0/1"),
        ("/svc5000/items/abc", "/dest5000/abc"),
        ("/svc9998/items/z", "/dest9998/z"),
    ] {
        let res = c.get(gw.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 302, "{path}");
        assert_eq!(res.headers()["location"], want, "{path}");
    }
    assert_eq!(
        get_host(gw.addr(), "h9999.example.com", "/p/x").await,
        (200, "r9999".into())
    );
    assert_eq!(
        get_host(gw.addr(), "h1.example.com", "/p").await,
        (200, "r1".into())
    );
    assert_eq!(get_host(gw.addr(), "h2.example.com", "/p").await.0, 404);
    assert_eq!(get_host(gw.addr(), "x", "/svc1/items/1").await.0, 404);
    assert_eq!(get_host(gw.addr(), "x", "/svc10000/items/1").await.0, 404);
}

/// A public template must never take a request that a protected prefix with a longer
/// literal start owns (`/api/x` is `/api`'s, not `/{page}/{x}`'s).
#[tokio::test]
async fn protected_prefix_beats_a_public_template() {
    let up = Upstream::echo().await;
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\nauth:\n  tokens: [t0ken]\nroutes:\n  - name: pages\n    path: /{{page}}/{{x}}\n    public: true\n    proxy: {{upstream: {u}}}\n  - name: api\n    path_prefix: /api\n    proxy: {{upstream: {u}}}\n",
        u = up.url()
    );
    let gw = Gateway::start(&yaml);
    let res = client().get(gw.url("/api/users")).send().await.unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
    assert_eq!(
        client()
            .get(gw.url("/docs/intro"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// Static routes answer other methods in the one envelope, not with an empty body.
#[tokio::test]
async fn static_route_refuses_other_methods_with_json() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "<p>hi</p>").unwrap();
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\nroutes:\n  - path_prefix: /\n    static: {{dir: \"{}\"}}\n",
        dir.path().display()
    );
    let gw = Gateway::start(&yaml);
    let res = client().post(gw.url("/index.html")).send().await.unwrap();
    assert_eq!(res.headers()["allow"], "GET, HEAD");
    assert_error(res, 405, "METHOD_NOT_ALLOWED").await;
}
