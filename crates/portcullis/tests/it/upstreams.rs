//! Upstream groups (issue 8, first part): named upstreams with several targets and
//! a balancer — weighted round-robin, least-request, consistent hashing. Connection
//! pools: HTTP/2 multiplexing, idle timeouts below the upstream's keep-alive, stale
//! connections, the total cap, the reaper.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::*;

fn group_config(targets: &[(&Upstream, u32)], balancer: &str) -> String {
    let list: Vec<String> = targets
        .iter()
        .map(|(u, w)| format!("{{url: \"{}\", weight: {w}}}", u.url()))
        .collect();
    format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
upstreams:
  app:
    targets: [{}]
    balancer: {balancer}
routes:
  - path_prefix: /
    proxy: {{upstream: app}}
"#,
        list.join(", ")
    )
}

#[tokio::test]
async fn weighted_round_robin_spreads_by_weight() {
    let (a, b, c) = (
        Upstream::echo().await,
        Upstream::echo().await,
        Upstream::echo().await,
    );
    let gw = Gateway::start(&group_config(&[(&a, 1), (&b, 1), (&c, 2)], "round_robin"));
    let client = client();
    for i in 0..2_000 {
        let res = client.get(gw.url(&format!("/r{i}"))).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let counts = [&a, &b, &c].map(|u| u.requests.load(Ordering::SeqCst));
    for (got, want) in counts.iter().zip([500usize, 500, 1_000]) {
        assert!(got.abs_diff(want) <= want / 20, "{counts:?}");
    }
}

#[tokio::test]
async fn consistent_hashing_keeps_keys_and_a_fourth_target_moves_few() {
    let ups = [
        Upstream::echo().await,
        Upstream::echo().await,
        Upstream::echo().await,
        Upstream::echo().await,
    ];
    let three = Gateway::start(&group_config(
        &[(&ups[0], 1), (&ups[1], 1), (&ups[2], 1)],
        "{hash: \"header:x-user\"}",
    ));
    let four = Gateway::start(&group_config(
        &[(&ups[0], 1), (&ups[1], 1), (&ups[2], 1), (&ups[3], 1)],
        "{hash: \"header:x-user\"}",
    ));
    let client = client();
    // Which upstream saw the request: the echo's Host header names it.
    let target = |gw: &Gateway, user: String| {
        let req = client.get(gw.url("/x")).header("x-user", user);
        async move {
            let body: serde_json::Value = req.send().await.unwrap().json().await.unwrap();
            body["headers"]["host"][0].as_str().unwrap().to_owned()
        }
    };
    // Enough keys that the share is measured, not sampled (the target URLs, and
    // with them the table, change every run): ideal 25 %, bound 30 %.
    let mut moved = 0;
    for i in 0..1_200 {
        let user = format!("user-{i}");
        let first = target(&three, user.clone()).await;
        if i < 100 {
            assert_eq!(first, target(&three, user.clone()).await, "{user} moved");
        }
        if first != target(&four, user).await {
            moved += 1;
        }
    }
    assert!(moved <= 360, "{moved} of 1200 keys moved");
    assert!(moved > 0);
    // No key: round-robin, every target used.
    for _ in 0..30 {
        client.get(three.url("/nokey")).send().await.unwrap();
    }
    for u in &ups[..3] {
        assert!(u.requests.load(Ordering::SeqCst) > 0);
    }
}

#[tokio::test]
async fn least_request_avoids_a_slow_target() {
    let fast_a = Upstream::echo().await;
    let fast_b = Upstream::echo().await;
    let slow = Upstream::serve(false, |_req| async move {
        tokio::time::sleep(Duration::from_millis(80)).await;
        hyper::Response::new(full("slow"))
    })
    .await;
    let gw = Gateway::start(&group_config(
        &[(&fast_a, 1), (&fast_b, 1), (&slow, 1)],
        "least_request",
    ));
    let client = client();
    for i in 0..150 {
        let res = client.get(gw.url(&format!("/{i}"))).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let slow_n = slow.requests.load(Ordering::SeqCst);
    assert!(slow_n < 30, "the slow target got {slow_n} of 150");
}

#[test]
fn group_config_mistakes_fail_check() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_config(
        dir.path(),
        r#"listeners: [{address: "127.0.0.1:0"}]
upstreams:
  both: {url: "http://127.0.0.1:1", targets: [{url: "http://127.0.0.1:2"}]}
  neither: {}
  heavy: {targets: [{url: "http://127.0.0.1:1", weight: 5000}, {url: "http://127.0.0.1:1"}]}
  badhash: {targets: [{url: "http://127.0.0.1:1"}], balancer: {hash: "body"}}
  templated: {targets: [{url: "http://{name}:8080"}]}
  nopool: {url: "http://127.0.0.1:1", pool_max_connections: 0}
  nostreams: {url: "http://127.0.0.1:1", http2_max_streams: 0}
routes:
  - {path: /a, proxy: {upstream: both}}
  - {path: /b, proxy: {upstream: neither}}
  - {path: /c, proxy: {upstream: heavy}}
  - {path: /d, proxy: {upstream: badhash}}
  - {path: /e, proxy: {upstream: templated}}
  - {path: /f, proxy: {upstream: nopool}}
  - {path: /g, proxy: {upstream: nostreams}}
"#,
    );
    let (code, _out, err) = run_cli(&["check", "-c", &p.display().to_string()], &[]);
    assert_ne!(code, 0);
    for needle in [
        "upstreams.both: set either `url` or `targets`",
        "upstreams.neither: needs a `url` or `targets`",
        "upstreams.heavy.targets[0].weight",
        "upstreams.heavy.targets[1].url: listed twice",
        "upstreams.badhash.balancer.hash",
        "upstreams.templated.targets[0].url",
        "upstreams.nopool.pool_max_connections: must be at least 1",
        "upstreams.nostreams.http2_max_streams: must be at least 1",
    ] {
        assert!(err.contains(needle), "{needle} missing from:\n{err}");
    }
}

// ---------------------------------------------------------------------------------
// Connection pools

/// One named upstream `app` at `url` with extra settings (YAML lines of the entry),
/// every path proxied to it.
fn pool_config(url: &str, settings: &[&str]) -> String {
    let settings: String = settings.iter().map(|l| format!("    {l}\n")).collect();
    format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
upstreams:
  app:
    url: "{url}"
{settings}routes:
  - path_prefix: /
    proxy: {{upstream: app}}
"#
    )
}

/// Sends `n` GETs at once; returns their statuses.
async fn concurrent_gets(url: &str, n: usize) -> Vec<u16> {
    let c = client();
    let requests = (0..n).map(|_| {
        let req = c.get(url).send();
        async move { req.await.map(|r| r.status().as_u16()).unwrap_or(0) }
    });
    futures_util::future::join_all(requests).await
}

/// A raw HTTP/1.1 upstream: answers each request head with `200 ok` (keep-alive, no
/// `Connection: close`), then either closes at once or keeps the connection open
/// until it has been idle for `idle`. Counts accepted connections and the ones the
/// gateway closed (EOF while waiting for a request).
struct RawUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    gateway_closed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone, Copy)]
enum After {
    Close,
    IdleFor(Duration),
}

impl RawUpstream {
    async fn start(after: After) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let gateway_closed = Arc::new(AtomicUsize::new(0));
        let (conns, closed) = (connections.clone(), gateway_closed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_raw(stream, after, closed.clone()));
            }
        });
        RawUpstream {
            addr,
            connections,
            gateway_closed,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn serve_raw(mut stream: TcpStream, after: After, gateway_closed: Arc<AtomicUsize>) {
    let idle = match after {
        After::Close => Duration::from_secs(30),
        After::IdleFor(d) => d,
    };
    let mut buf = Vec::new();
    loop {
        match tokio::time::timeout(idle, read_head(&mut stream, &mut buf)).await {
            // Idle for too long: the upstream's keep-alive timeout.
            Err(_) => return,
            Ok(false) => {
                gateway_closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(true) => {}
        }
        let res = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
        if stream.write_all(res.as_bytes()).await.is_err() {
            return;
        }
        if let After::Close = after {
            // No `Connection: close`: the gateway learns it from the socket.
            return;
        }
    }
}

/// Reads one request head (the gateway's GETs have no body); false at EOF.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            return true;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// 50 concurrent requests to an h2c upstream share one connection per worker.
#[tokio::test]
async fn http2_upstream_requests_are_multiplexed() {
    let up = Upstream::serve(true, |req| async move {
        // Long enough for all 50 to be in flight together.
        tokio::time::sleep(Duration::from_millis(200)).await;
        hyper::Response::new(full(format!("{:?}", req.version())))
    })
    .await;
    // Each worker drives connections of its own: two workers, at most two.
    let yaml = pool_config(&up.url(), &["protocol: http2"]);
    let gw = Gateway::start(&format!("server: {{workers: 2}}\n{yaml}"));
    let statuses = concurrent_gets(&gw.url("/m"), 50).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 50);
    let n = up.connections.load(Ordering::SeqCst);
    assert!(n <= 2, "50 concurrent requests used {n} HTTP/2 connections");
    let body = client()
        .get(gw.url("/v"))
        .send()
        .await
        .unwrap()
        .text()
        .await;
    assert_eq!(body.unwrap(), "HTTP/2.0");
}

/// HTTP/2 carries the host in `:authority`: a preserved client `Host` becomes it,
/// and no `Host` header is sent beside it.
#[tokio::test]
async fn http2_upstream_gets_a_preserved_host_as_its_authority() {
    let up = Upstream::echo_h2c().await;
    let gw = Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
upstreams:
  app: {{url: "{}", protocol: http2}}
routes:
  - path: /kept
    proxy: {{upstream: app, preserve_host: true}}
  - path: /own
    proxy: {{upstream: app}}
"#,
        up.url()
    ));
    let c = client();
    let get = |path: &str| {
        c.get(gw.url(path))
            .header("host", "api.example.test")
            .send()
    };
    let echo: serde_json::Value = get("/kept").await.unwrap().json().await.unwrap();
    assert_eq!(echo["version"], "HTTP/2.0", "{echo}");
    assert_eq!(echo["uri"], "http://api.example.test/kept", "{echo}");
    assert!(echo["headers"].get("host").is_none(), "{echo}");
    let echo: serde_json::Value = get("/own").await.unwrap().json().await.unwrap();
    assert_eq!(echo["uri"], format!("http://{}/own", up.addr), "{echo}");
    assert!(echo["headers"].get("host").is_none(), "{echo}");
}

/// The upstream closes connections idle for 300 ms; the gateway's pool gives up on
/// them after 100 ms, so no request is ever sent on one the upstream is closing.
#[tokio::test]
async fn pool_idle_timeout_below_the_upstreams_keep_alive() {
    let up = RawUpstream::start(After::IdleFor(Duration::from_millis(300))).await;
    let gw = Gateway::start(&pool_config(&up.url(), &["pool_idle_timeout: 100ms"]));
    let c = client();
    for round in 0..20u64 {
        let res = c.get(gw.url("/k")).send().await.unwrap();
        assert_eq!(res.status(), 200, "round {round}");
        assert_eq!(res.text().await.unwrap(), "ok");
        // Around the upstream's timeout: 290 ms to 318 ms.
        tokio::time::sleep(Duration::from_millis(290 + (round % 8) * 4)).await;
    }
    // Requests within 100 ms of each other do reuse the connection.
    let before = up.connections.load(Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(c.get(gw.url("/k")).send().await.unwrap().status(), 200);
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), before + 1);
    assert!(
        !gw.logs().contains("upstream request failed"),
        "{}",
        gw.logs()
    );
}

/// An upstream that closes every connection right after its keep-alive response:
/// the closed connection is noticed before use, or the request (not sent) is
/// retried on a new one.
#[tokio::test]
async fn an_upstream_closing_after_each_response_never_causes_a_502() {
    let up = RawUpstream::start(After::Close).await;
    let gw = Gateway::start(&pool_config(&up.url(), &[]));
    let c = client();
    for i in 0..30 {
        let res = c.get(gw.url(&format!("/c{i}"))).send().await.unwrap();
        assert_eq!(res.status(), 200, "request {i}");
        assert_eq!(res.text().await.unwrap(), "ok");
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 30);
}

/// `pool_max_connections`: requests beyond it wait for a connection instead of
/// opening more; past the connect timeout they get 503 `UPSTREAM_OVERLOADED`.
#[tokio::test]
async fn the_total_connection_cap_is_never_exceeded() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (current, max, requests) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (cur, mx, reqs) = (current.clone(), max.clone(), requests.clone());
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let n = cur.fetch_add(1, Ordering::SeqCst) + 1;
            mx.fetch_max(n, Ordering::SeqCst);
            let (cur, reqs) = (cur.clone(), reqs.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    reqs.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let ms = if req.uri().path() == "/slow" {
                            1500
                        } else {
                            200
                        };
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Ok::<_, Infallible>(hyper::Response::new(full("ok")))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                cur.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    let url = format!("http://{addr}");
    let gw = Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
admin:
  address: 127.0.0.1:0
upstreams:
  capped: {{url: "{url}", pool_max_connections: 2}}
  tight: {{url: "{url}", pool_max_connections: 1}}
routes:
  - name: capped
    path_prefix: /capped
    proxy: {{upstream: capped}}
  - name: tight
    path_prefix: /tight
    proxy: {{upstream: tight, strip_prefix: true, timeouts: {{connect: 300ms}}}}
"#
    ));
    let statuses = concurrent_gets(&gw.url("/capped/x"), 10).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(requests.load(Ordering::SeqCst), 10);
    let most = max.load(Ordering::SeqCst);
    assert!(most <= 2, "the upstream saw {most} connections at once");

    // One connection allowed and busy for 1.5 s: the next request waits 300 ms.
    let slow = tokio::spawn(client().get(gw.url("/tight/slow")).send());
    let deadline = Instant::now() + Duration::from_secs(10);
    while requests.load(Ordering::SeqCst) < 11 {
        assert!(Instant::now() < deadline, "the slow request never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = Instant::now();
    let res = client().get(gw.url("/tight/x")).send().await.unwrap();
    let waited = t0.elapsed();
    let body = assert_error(res, 503, "UPSTREAM_OVERLOADED").await;
    assert_eq!(body["error"]["retryable"], true, "{body}");
    assert!(waited >= Duration::from_millis(300), "503 after {waited:?}");
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"portcullis_upstream_errors_total{route="tight",kind="overloaded"} 1"#),
        "{metrics}"
    );
    server.abort();
}

/// With no further traffic, an idle pooled connection is closed by the gateway
/// once `pool_idle_timeout` has passed.
#[tokio::test]
async fn idle_connections_are_closed_without_traffic() {
    let up = RawUpstream::start(After::IdleFor(Duration::from_secs(60))).await;
    let gw = Gateway::start(&pool_config(&up.url(), &["pool_idle_timeout: 200ms"]));
    let t0 = Instant::now();
    let res = client().get(gw.url("/once")).send().await.unwrap();
    assert_eq!(res.text().await.unwrap(), "ok");
    let deadline = t0 + Duration::from_secs(5);
    while up.gateway_closed.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the idle connection was still open after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(200),
        "closed too early"
    );
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}
