//! External authorization (issue 10, §3): an HTTP service (as nginx `auth_request`,
//! Traefik ForwardAuth) and an Envoy ext_authz gRPC server decide per request;
//! decisions cached per credential, concurrent misses coalesced, failure modes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use prost::Message;

use crate::harness::*;

/// What the authorization service saw.
#[derive(Default)]
struct Seen {
    calls: AtomicUsize,
    last: Mutex<HashMap<String, String>>,
}

/// The HTTP authorization service: decides by the bearer token.
async fn http_authz() -> (Upstream, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    let up = Upstream::serve(false, move |req: Request<Incoming>| {
        let s = s.clone();
        async move {
            s.calls.fetch_add(1, Ordering::SeqCst);
            let h = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let mut last = HashMap::new();
            for n in [
                "authorization",
                "x-forwarded-uri",
                "x-forwarded-method",
                "x-forwarded-host",
                "x-request-id",
                "x-api-version",
                "cookie",
            ] {
                last.insert(n.to_owned(), h(n));
            }
            last.insert("method".into(), req.method().to_string());
            last.insert("uri".into(), req.uri().to_string());
            *s.last.lock().unwrap() = last;
            let bearer = h("authorization");
            let cookie = h("cookie");
            let token = bearer
                .strip_prefix("Bearer ")
                .or_else(|| cookie.strip_prefix("auth="))
                .unwrap_or("");
            let b = Response::builder();
            match token {
                "good" | "slowok" => {
                    if token == "slowok" {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    b.status(200)
                        .header("x-auth-principal", "alice")
                        .header("x-auth-scopes", "read write")
                        .header("x-tenant", "t1")
                        .body(full(""))
                }
                "forbidden" => b
                    .status(403)
                    .header("content-type", "application/json")
                    .body(full(r#"{"reason":"tenant suspended"}"#)),
                "bad" => b
                    .status(401)
                    .header("www-authenticate", "Bearer realm=\"authz\"")
                    .body(full("invalid key")),
                "slow" => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    b.status(200).body(full(""))
                }
                "redirect" => b.status(302).header("location", "/login").body(full("")),
                "quota" => b
                    .status(429)
                    .header("retry-after", "7")
                    .header("x-internal", "never shown")
                    .body(full("quota exceeded")),
                _ => b.status(500).body(full("boom")),
            }
            .unwrap()
        }
    })
    .await;
    (up, seen)
}

fn http_config(authz: &str, echo: &str) -> String {
    format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
authenticators:
  ext:
    external:
      url: "{authz}/check"
      timeout: 1s
      scopes_from: X-Auth-Scopes
      copy_headers: [X-Tenant]
      principal_header: X-Principal
      forward_headers: [X-Api-Version]
  ext_open:
    external: {{url: "{authz}/check", timeout: 1s, failure_mode: fail_open, cache_ttl: 0s, principal_header: X-Principal}}
  nocache:
    external: {{url: "{authz}/check", cache_ttl: 0s}}
  by_cookie:
    external: {{url: "{authz}/check", token_sources: {{header: false, cookie: auth}}}}
  dead:
    external: {{url: "http://127.0.0.1:1/check", timeout: 1s}}
  dead_open:
    external: {{url: "http://127.0.0.1:1/check", timeout: 1s, failure_mode: fail_open}}
  st:
    static_token: {{tokens: [static-secret], principal: ops}}
routes:
  - {{name: api, path_prefix: /api, auth: {{authenticators: [ext]}}, proxy: {{upstream: "{echo}"}}}}
  - {{name: scoped, path_prefix: /scoped, auth: {{authenticators: [ext], scopes: [admin]}}, proxy: {{upstream: "{echo}"}}}}
  - {{name: open, path_prefix: /open, auth: {{authenticators: [ext_open]}}, proxy: {{upstream: "{echo}"}}}}
  - {{name: nc, path_prefix: /nc, auth: {{authenticators: [nocache]}}, proxy: {{upstream: "{echo}"}}}}
  - {{name: dead, path_prefix: /dead, auth: {{authenticators: [dead]}}, proxy: {{upstream: "{echo}"}}}}
  - {{name: deadopen, path_prefix: /deadopen, auth: {{authenticators: [dead_open]}}, proxy: {{upstream: "{echo}"}}}}
  - {{name: either, path_prefix: /either, auth: {{authenticators: [st, ext]}}, proxy: {{upstream: "{echo}"}}}}
  - {{name: cookie, path_prefix: /cookie, auth: {{authenticators: [by_cookie]}}, proxy: {{upstream: "{echo}"}}}}
"#
    )
}

async fn get(gw: &Gateway, path: &str, token: &str) -> reqwest::Response {
    client()
        .get(gw.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn http_mode_allows_with_identity_and_sends_the_request_shape() {
    let (authz, seen) = http_authz().await;
    let echo = Upstream::echo().await;
    let gw = Gateway::start(&http_config(&authz.url(), &echo.url()));

    let res = client()
        .post(gw.url("/api/items?q=1"))
        .bearer_auth("good")
        .header("x-api-version", "7")
        // Spoofed identity: the service's value wins, the client's never arrives.
        .header("x-tenant", "evil")
        .header("x-principal", "root")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let rid = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["headers"]["x-principal"], serde_json::json!(["alice"]));
    assert_eq!(v["headers"]["x-tenant"], serde_json::json!(["t1"]));
    assert!(
        v["headers"].get("authorization").is_none(),
        "credential removed"
    );

    let last = seen.last.lock().unwrap().clone();
    assert_eq!(last["method"], "GET");
    assert_eq!(last["uri"], "/check");
    assert_eq!(last["authorization"], "Bearer good");
    assert_eq!(last["x-forwarded-uri"], "/api/items?q=1");
    assert_eq!(last["x-forwarded-method"], "POST");
    assert_eq!(last["x-api-version"], "7");
    assert_eq!(last["x-request-id"], rid);
    assert_eq!(
        last["cookie"], "",
        "only the credential's own headers are sent"
    );

    // The returned scopes count: `scoped` needs `admin`.
    let res = get(&gw, "/scoped/x", "good").await;
    assert_error(res, 403, "INSUFFICIENT_SCOPE").await;
    // Any-of: another authenticator's credential passes without asking.
    let before = seen.calls.load(Ordering::SeqCst);
    let res = get(&gw, "/either/x", "static-secret").await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        seen.calls.load(Ordering::SeqCst),
        before,
        "the static token is tried first"
    );
}

#[tokio::test]
async fn http_mode_denials_reach_the_client() {
    let (authz, seen) = http_authz().await;
    let echo = Upstream::echo().await;
    let gw = Gateway::start(&http_config(&authz.url(), &echo.url()));

    // 403 with a JSON body: kept, with our code and request id.
    let res = get(&gw, "/api/x", "forbidden").await;
    assert_eq!(res.status(), 403);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["reason"], "tenant suspended");
    assert_eq!(v["code"], "FORBIDDEN");
    // 401 with text and a challenge: the text in the envelope, the challenge kept.
    let res = get(&gw, "/api/x", "bad").await;
    assert_eq!(res.headers()["www-authenticate"], "Bearer realm=\"authz\"");
    let v = assert_error(res, 401, "UNAUTHORIZED").await;
    assert_eq!(v["error"]["message"], "invalid key");
    // Other refusals keep their status and the headers a client may see: a quota's
    // 429 with Retry-After, a login redirect with Location — under fail_open too.
    for path in ["/api/x", "/open/x"] {
        let res = get(&gw, path, "quota").await;
        assert_eq!(res.headers()["retry-after"], "7", "{path}");
        assert!(res.headers().get("x-internal").is_none());
        let v = assert_error(res, 429, "RATE_LIMITED").await;
        assert_eq!(v["error"]["message"], "quota exceeded");
    }
    let res = get(&gw, "/api/x", "redirect").await;
    assert_eq!(res.status(), 302);
    assert_eq!(res.headers()["location"], "/login");
    // No credential: the service is not asked.
    let before = seen.calls.load(Ordering::SeqCst);
    let res = client().get(gw.url("/api/x")).send().await.unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
    assert_eq!(seen.calls.load(Ordering::SeqCst), before);
    assert_eq!(echo.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn failures_close_by_default_and_open_when_asked() {
    let (authz, _seen) = http_authz().await;
    let echo = Upstream::echo().await;
    let gw = Gateway::start(&http_config(&authz.url(), &echo.url()));

    // A 5xx, a timeout, a dead service: 503, never a pass.
    for (path, token) in [("/api/x", "boom"), ("/api/x", "slow"), ("/dead/x", "good")] {
        let started = Instant::now();
        let res = get(&gw, path, token).await;
        assert_error(res, 503, "SERVICE_UNAVAILABLE").await;
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{token}: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(echo.requests.load(Ordering::SeqCst), 0);
    // fail_open: the request passes, with no identity.
    for path in ["/open/x", "/deadopen/x"] {
        let res = get(&gw, path, "boom").await;
        assert_eq!(res.status(), 200, "{path}");
        let v: serde_json::Value = res.json().await.unwrap();
        assert!(v["headers"].get("x-principal").is_none(), "{path}");
    }
    // fail_open never turns a denial into a pass.
    let res = get(&gw, "/open/x", "forbidden").await;
    assert_eq!(res.status(), 403);
}

/// A cookie credential: only that cookie reaches the service, never the others
/// (browser sessions stay inside the gateway).
#[tokio::test]
async fn only_the_credentials_own_cookie_is_sent() {
    let (authz, seen) = http_authz().await;
    let echo = Upstream::echo().await;
    let gw = Gateway::start(&http_config(&authz.url(), &echo.url()));
    let res = client()
        .get(gw.url("/cookie/x"))
        .header("cookie", "session=s3cr3t; auth=good; theme=dark")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(seen.last.lock().unwrap()["cookie"], "auth=good");
    assert_eq!(seen.last.lock().unwrap()["authorization"], "");
}

#[tokio::test]
async fn decisions_are_cached_per_credential_and_misses_coalesce() {
    let (authz, seen) = http_authz().await;
    let echo = Upstream::echo().await;
    let gw = Gateway::start(&http_config(&authz.url(), &echo.url()));

    for _ in 0..3 {
        assert_eq!(get(&gw, "/api/x", "good").await.status(), 200);
        assert_eq!(get(&gw, "/api/x", "forbidden").await.status(), 403);
    }
    assert_eq!(
        seen.calls.load(Ordering::SeqCst),
        2,
        "one call per credential"
    );
    // Without a cache every request asks.
    for _ in 0..3 {
        assert_eq!(get(&gw, "/nc/x", "good").await.status(), 200);
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 5);

    // Twenty concurrent requests with a new credential: one call.
    let before = seen.calls.load(Ordering::SeqCst);
    let gw = Arc::new(gw);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move { get(&gw, "/api/x", "slowok").await.status() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), before + 1);
}

#[test]
fn external_config_mistakes_are_check_errors() {
    let head = "listeners: [{address: \"127.0.0.1:0\"}]\nroutes:\n  - {path: /, auth: {authenticators: [x]}, respond: {}}\nauthenticators:\n  x:\n    external: ";
    for (body, want) in [
        ("{}", "exactly one of `url`"),
        (
            "{url: \"http://a:1\", grpc: \"http://a:1\"}",
            "exactly one of `url`",
        ),
        ("{url: \"ftp://a\"}", "authenticators.x.external.url"),
        (
            "{url: \"http://a:1\", method: \"G T\"}",
            "not an HTTP method",
        ),
        ("{url: \"http://a:1\", timeout: 0s}", "must be more than 0"),
        (
            "{url: \"http://a:1\", copy_headers: [\"bad header\"]}",
            "copy_headers",
        ),
        (
            "{url: \"http://a:1\", failure_mode: sometimes}",
            "failure_mode",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let p = write_config(dir.path(), &format!("{head}{body}\n"));
        let (code, _, err) = run_cli(&["check", "-c", p.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{body}");
        assert!(err.contains(want), "{body}\n{err}");
    }
}

// ---------------------------------------------------------------------------------
// gRPC mode: a small Envoy ext_authz server with its own copy of the messages
// (from envoy/service/auth/v3/*.proto), independent of the gateway's.

mod envoy {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CheckRequest {
        #[prost(message, optional, tag = "1")]
        pub attributes: Option<AttributeContext>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeContext {
        #[prost(message, optional, tag = "1")]
        pub source: Option<Peer>,
        #[prost(message, optional, tag = "4")]
        pub request: Option<Req>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Peer {
        #[prost(message, optional, tag = "1")]
        pub address: Option<Address>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Address {
        #[prost(message, optional, tag = "1")]
        pub socket_address: Option<SocketAddress>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SocketAddress {
        #[prost(string, tag = "2")]
        pub address: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Req {
        #[prost(message, optional, tag = "2")]
        pub http: Option<HttpRequest>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HttpRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub method: String,
        #[prost(map = "string, string", tag = "3")]
        pub headers: HashMap<String, String>,
        #[prost(string, tag = "4")]
        pub path: String,
        #[prost(string, tag = "5")]
        pub host: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CheckResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<Status>,
        #[prost(message, optional, tag = "2")]
        pub denied_response: Option<Denied>,
        #[prost(message, optional, tag = "3")]
        pub ok_response: Option<Ok>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(int32, tag = "1")]
        pub code: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Denied {
        #[prost(message, optional, tag = "1")]
        pub status: Option<HttpStatus>,
        #[prost(message, repeated, tag = "2")]
        pub headers: Vec<HeaderValueOption>,
        #[prost(string, tag = "3")]
        pub body: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Ok {
        #[prost(message, repeated, tag = "2")]
        pub headers: Vec<HeaderValueOption>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HttpStatus {
        #[prost(int32, tag = "1")]
        pub code: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderValueOption {
        #[prost(message, optional, tag = "1")]
        pub header: Option<HeaderValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    pub fn header(key: &str, value: &str) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(HeaderValue {
                key: key.into(),
                value: value.into(),
            }),
        }
    }
}

fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

/// A gRPC answer: the message, then `grpc-status` in trailers.
fn grpc_answer(msg: Option<envoy::CheckResponse>, grpc_status: u32) -> Response<BoxBody> {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = Vec::new();
    if let Some(m) = msg {
        frames.push(Ok(Frame::data(grpc_frame(&m.encode_to_vec()))));
    }
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", grpc_status.to_string().parse().unwrap());
    frames.push(Ok(Frame::trailers(trailers)));
    Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap()
}

async fn grpc_authz() -> (Upstream, Arc<Seen>, Arc<Mutex<Option<envoy::CheckRequest>>>) {
    let seen = Arc::new(Seen::default());
    let last = Arc::new(Mutex::new(None));
    let (s, l) = (seen.clone(), last.clone());
    let up = Upstream::serve(true, move |req: Request<Incoming>| {
        let (s, l) = (s.clone(), l.clone());
        async move {
            s.calls.fetch_add(1, Ordering::SeqCst);
            assert_eq!(
                req.uri().path(),
                "/envoy.service.auth.v3.Authorization/Check"
            );
            assert_eq!(req.headers()["content-type"], "application/grpc");
            let mut body = req.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.get_u8(), 0);
            let len = body.get_u32() as usize;
            let check = envoy::CheckRequest::decode(body.split_to(len)).unwrap();
            let auth = check
                .attributes
                .as_ref()
                .and_then(|a| a.request.as_ref())
                .and_then(|r| r.http.as_ref())
                .and_then(|h| h.headers.get("authorization").cloned())
                .unwrap_or_default();
            *l.lock().unwrap() = Some(check);
            match auth.as_str() {
                "Bearer good" => grpc_answer(
                    Some(envoy::CheckResponse {
                        status: Some(envoy::Status { code: 0 }),
                        ok_response: Some(envoy::Ok {
                            headers: vec![
                                envoy::header("x-auth-principal", "grpc-alice"),
                                envoy::header("x-tenant", "g1"),
                            ],
                        }),
                        denied_response: None,
                    }),
                    0,
                ),
                "Bearer bad" => grpc_answer(
                    Some(envoy::CheckResponse {
                        status: Some(envoy::Status { code: 16 }),
                        denied_response: Some(envoy::Denied {
                            status: Some(envoy::HttpStatus { code: 401 }),
                            headers: vec![envoy::header(
                                "www-authenticate",
                                "Bearer realm=\"opa\"",
                            )],
                            body: "denied by policy".into(),
                        }),
                        ok_response: None,
                    }),
                    0,
                ),
                "Bearer bare-deny" => grpc_answer(
                    Some(envoy::CheckResponse {
                        status: Some(envoy::Status { code: 7 }),
                        denied_response: None,
                        ok_response: None,
                    }),
                    0,
                ),
                "Bearer huge" => grpc_answer(
                    Some(envoy::CheckResponse {
                        status: Some(envoy::Status { code: 7 }),
                        denied_response: Some(envoy::Denied {
                            status: Some(envoy::HttpStatus { code: 403 }),
                            headers: Vec::new(),
                            body: "x".repeat(20_000),
                        }),
                        ok_response: None,
                    }),
                    0,
                ),
                "Bearer slow" => {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    grpc_answer(Some(envoy::CheckResponse::default()), 0)
                }
                // The call itself fails (INTERNAL).
                _ => grpc_answer(None, 13),
            }
        }
    })
    .await;
    (up, seen, last)
}

#[tokio::test]
async fn grpc_mode_speaks_envoy_ext_authz() {
    let (authz, seen, last) = grpc_authz().await;
    let echo = Upstream::echo().await;
    let yaml = format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
authenticators:
  opa:
    external: {{grpc: "{authz}", timeout: 1s, copy_headers: [X-Tenant], principal_header: X-Principal}}
  opa_open:
    external: {{grpc: "{authz}", timeout: 1s, failure_mode: fail_open, cache_ttl: 0s}}
routes:
  - {{name: api, path_prefix: /api, auth: {{authenticators: [opa]}}, proxy: {{upstream: "{echo}"}}}}
  - {{name: open, path_prefix: /open, auth: {{authenticators: [opa_open]}}, proxy: {{upstream: "{echo}"}}}}
"#,
        authz = authz.url(),
        echo = echo.url()
    );
    let gw = Gateway::start(&yaml);

    let res = get(&gw, "/api/orders?page=2", "good").await;
    assert_eq!(res.status(), 200);
    let rid = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(
        v["headers"]["x-principal"],
        serde_json::json!(["grpc-alice"])
    );
    assert_eq!(v["headers"]["x-tenant"], serde_json::json!(["g1"]));
    let check = last.lock().unwrap().clone().unwrap();
    let attrs = check.attributes.unwrap();
    let http = attrs.request.unwrap().http.unwrap();
    assert_eq!(http.method, "GET");
    assert_eq!(http.path, "/api/orders?page=2");
    assert_eq!(http.id, rid);
    assert_eq!(http.headers[":path"], "/api/orders?page=2");
    assert_eq!(
        attrs
            .source
            .unwrap()
            .address
            .unwrap()
            .socket_address
            .unwrap()
            .address,
        "127.0.0.1"
    );
    // Cached per request in gRPC mode (policies decide per path): the same request
    // does not ask again, another path does.
    assert_eq!(get(&gw, "/api/orders?page=2", "good").await.status(), 200);
    assert_eq!(seen.calls.load(Ordering::SeqCst), 1);
    assert_eq!(get(&gw, "/api/x", "good").await.status(), 200);
    assert_eq!(seen.calls.load(Ordering::SeqCst), 2);

    let res = get(&gw, "/api/x", "bad").await;
    assert_eq!(res.headers()["www-authenticate"], "Bearer realm=\"opa\"");
    let v = assert_error(res, 401, "UNAUTHORIZED").await;
    assert_eq!(v["error"]["message"], "denied by policy");
    // Denied without a response: 403, as Envoy.
    let res = get(&gw, "/api/x", "bare-deny").await;
    assert_error(res, 403, "FORBIDDEN").await;
    // A failed call, a slow one: fail closed.
    let res = get(&gw, "/api/x", "broken").await;
    assert_error(res, 503, "SERVICE_UNAVAILABLE").await;
    let started = Instant::now();
    let res = get(&gw, "/api/x", "slow").await;
    assert_error(res, 503, "SERVICE_UNAVAILABLE").await;
    assert!(
        started.elapsed() < Duration::from_millis(2900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(echo.requests.load(Ordering::SeqCst), 3);

    // fail_open lets a failed call through, never a refusal it could not read.
    assert_eq!(get(&gw, "/open/x", "broken").await.status(), 200);
    let res = get(&gw, "/open/x", "huge").await;
    assert_error(res, 503, "SERVICE_UNAVAILABLE").await;
    assert_eq!(get(&gw, "/open/x", "bad").await.status(), 401);
}
