//! The proxy data path: streaming, hop-by-hop and forwarding headers, pooling,
//! HTTP/2 both ways, TLS termination with SNI, WebSocket and SSE pass-through,
//! timeouts, upstream failures and credential stripping.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::Response;

use crate::harness::*;

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

const MIB: u64 = 1024 * 1024;

/// A gateway with an admin listener (so start-up is deterministic), `server_extra`
/// spliced under `server:`, and one route per `(name, prefix, proxy_yaml)`.
/// `proxy_yaml` lines are indented under `proxy:`.
fn config(server_extra: &str, top_extra: &str, routes: &[(&str, &str, &str)]) -> String {
    let mut yaml = String::from(
        "listeners:\n  - address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\n  token: admintoken\n",
    );
    yaml.push_str("server:\n  watch_config: false\n");
    for line in server_extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str("  ");
        yaml.push_str(line);
        yaml.push('\n');
    }
    yaml.push_str(top_extra);
    yaml.push_str("\nroutes:\n");
    for (name, prefix, proxy) in routes {
        yaml.push_str(&format!(
            "  - name: {name}\n    path_prefix: {prefix}\n    proxy:\n"
        ));
        for line in proxy.lines().filter(|l| !l.trim().is_empty()) {
            yaml.push_str("      ");
            yaml.push_str(line.trim_start());
            yaml.push('\n');
        }
    }
    yaml
}

fn simple(upstream: &str) -> String {
    config("", "", &[("api", "/api", &format!("upstream: {upstream}"))])
}

async fn echo_json(res: reqwest::Response) -> serde_json::Value {
    assert_eq!(res.status(), 200, "unexpected status");
    assert_eq!(
        res.headers().get("x-upstream").map(|v| v.to_str().unwrap()),
        Some("echo")
    );
    res.json().await.expect("echo JSON")
}

/// All values the echo upstream saw for header `name` (lowercase).
fn seen(echo: &serde_json::Value, name: &str) -> Vec<String> {
    echo["headers"][name]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
}

/// Samples the gateway's RSS every 25 ms while `task` runs; returns its output and
/// the peak RSS seen.
async fn sample_rss_while<T>(gw: &Gateway, task: tokio::task::JoinHandle<T>) -> (T, u64) {
    let mut peak = gw.rss_kib();
    let mut task = task;
    loop {
        tokio::select! {
            out = &mut task => {
                peak = peak.max(gw.rss_kib());
                return (out.expect("transfer task"), peak);
            }
            _ = tokio::time::sleep(Duration::from_millis(25)) => {
                peak = peak.max(gw.rss_kib());
            }
        }
    }
}

/// The gateway's RSS after it has served a few small requests (pools, buffers and
/// thread stacks touched).
async fn warm_idle_rss(gw: &Gateway, c: &reqwest::Client) -> u64 {
    for _ in 0..5 {
        let res = c.get(gw.url("/api/warm")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        res.bytes().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.rss_kib()
}

// ---------------------------------------------------------------------------------
// Streaming

// Sizes of the streamed bodies: many times the allowed RSS growth, so any
// buffering of a body (or a large part of it) is caught.
const DOWNLOAD: u64 = 1024 * MIB;
const UPLOAD: u64 = 512 * MIB;
const MAX_GROWTH_KIB: u64 = 64 * 1024;

/// The 1 GiB / 512 MiB transfers run one at a time: two at once on a small CI
/// machine starve each other (and every other test) of CPU.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_download_streams_without_buffering() {
    let _heavy = HEAVY.lock().await;
    let up = Upstream::echo().await;
    let gw = Gateway::start(&simple(&up.url()));
    // No bound on the whole (long) transfer, but every read must make progress.
    let c = stream_client();
    let idle = warm_idle_rss(&gw, &c).await;

    let url = gw.url(&format!("/api/big?download={DOWNLOAD}"));
    let started = Instant::now();
    let task = tokio::spawn(async move {
        let mut res = c.get(url).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let mut total = 0u64;
        while let Some(chunk) = res.chunk().await.expect("download body") {
            total += chunk.len() as u64;
        }
        total
    });
    let (total, peak) = sample_rss_while(&gw, task).await;
    eprintln!(
        "download: {total} bytes in {:?}; RSS idle {idle} KiB, peak {peak} KiB",
        started.elapsed()
    );
    assert_eq!(total, DOWNLOAD, "download truncated");
    assert!(
        peak.saturating_sub(idle) < MAX_GROWTH_KIB,
        "gateway RSS grew by {} KiB while streaming {DOWNLOAD} bytes (idle {idle}, peak {peak})",
        peak - idle
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_upload_streams_without_buffering() {
    let _heavy = HEAVY.lock().await;
    let up = Upstream::echo().await;
    // The default 10 MiB request body limit would stop the upload.
    let gw = Gateway::start(&config(
        "max_request_body: 1GiB",
        "",
        &[("api", "/api", &format!("upstream: {}", up.url()))],
    ));
    let c = stream_client();
    let idle = warm_idle_rss(&gw, &c).await;

    let url = gw.url("/api/upload");
    let started = Instant::now();
    let task = tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'y'; 256 * 1024]);
        let chunks = UPLOAD / chunk.len() as u64;
        let stream = futures_util::stream::iter(0..chunks)
            .map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
        let res = c
            .post(url)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .unwrap();
        echo_json(res).await
    });
    let (echo, peak) = sample_rss_while(&gw, task).await;
    eprintln!(
        "upload: {} bytes in {:?}; RSS idle {idle} KiB, peak {peak} KiB",
        echo["body_len"],
        started.elapsed()
    );
    assert_eq!(echo["body_len"], UPLOAD, "upload truncated: {echo}");
    assert!(
        peak.saturating_sub(idle) < MAX_GROWTH_KIB,
        "gateway RSS grew by {} KiB while streaming {UPLOAD} bytes up (idle {idle}, peak {peak})",
        peak - idle
    );
}

// ---------------------------------------------------------------------------------
// Headers

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_towards_the_upstream() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&simple(&up.url()));
    let res = raw(
        gw.addr(),
        "GET /api/hop HTTP/1.1\r\nHost: localhost\r\n\
         Connection: close, x-custom\r\n\
         X-Custom: secret\r\n\
         Keep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\n\
         Upgrade: websocket\r\n\
         TE: gzip\r\n\
         X-Keep: yes\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let echo = res.json();
    for name in [
        "connection",
        "x-custom",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "te",
    ] {
        assert!(
            seen(&echo, name).is_empty(),
            "{name} reached the upstream: {echo}"
        );
    }
    assert_eq!(seen(&echo, "x-keep"), ["yes"], "{echo}");

    // `TE: trailers` is end-to-end enough for gRPC: it survives.
    let res = client()
        .get(gw.url("/api/te"))
        .header("te", "trailers")
        .send()
        .await
        .unwrap();
    let echo = echo_json(res).await;
    assert_eq!(seen(&echo, "te"), ["trailers"], "{echo}");
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_towards_the_client() {
    let up = Upstream::serve(false, |_req| async move {
        Response::builder()
            .header("connection", "close, x-hop")
            .header("x-hop", "secret")
            .header("keep-alive", "timeout=5, max=100")
            .header("x-keep", "yes")
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from_static(b"hello")).boxed())
            .unwrap()
    })
    .await;
    let gw = Gateway::start(&simple(&up.url()));
    let res = client().get(gw.url("/api/hop")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let h = res.headers().clone();
    assert!(h.get("x-hop").is_none(), "{h:?}");
    assert!(h.get("keep-alive").is_none(), "{h:?}");
    for v in h.get_all("connection") {
        assert!(
            !v.to_str().unwrap().to_ascii_lowercase().contains("x-hop"),
            "{h:?}"
        );
    }
    assert_eq!(h["x-keep"], "yes");
    assert_eq!(res.text().await.unwrap(), "hello");
}

#[tokio::test]
async fn forwarding_headers_are_set_and_untrusted_ones_replaced() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&simple(&up.url()));
    let host = gw.addr().to_string();
    let res = client()
        .get(gw.url("/api/fwd"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-real-ip", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .header("forwarded", "for=6.6.6.6;proto=https")
        .send()
        .await
        .unwrap();
    let echo = echo_json(res).await;
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"], "{echo}");
    assert_eq!(seen(&echo, "x-real-ip"), ["127.0.0.1"], "{echo}");
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["http"], "{echo}");
    assert_eq!(seen(&echo, "x-forwarded-host"), [host.as_str()], "{echo}");
    let forwarded = seen(&echo, "forwarded");
    assert_eq!(forwarded.len(), 1, "{echo}");
    assert!(!forwarded[0].contains("6.6.6.6"), "{echo}");
    assert!(forwarded[0].contains("for=127.0.0.1"), "{echo}");
    assert!(forwarded[0].contains("proto=http"), "{echo}");
    assert!(!forwarded[0].contains("proto=https"), "{echo}");
    // The one authority the request was routed by, in both.
    assert_eq!(
        forwarded[0],
        format!("for=127.0.0.1;proto=http;host=\"{host}\""),
        "{echo}"
    );
}

#[tokio::test]
async fn forwarding_headers_from_a_trusted_proxy_are_appended() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(
        "trusted_proxies: [\"127.0.0.1/32\"]",
        "",
        &[("api", "/api", &format!("upstream: {}", up.url()))],
    ));
    let res = client()
        .get(gw.url("/api/fwd"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("forwarded", "for=6.6.6.6")
        .send()
        .await
        .unwrap();
    let echo = echo_json(res).await;
    assert_eq!(
        seen(&echo, "x-forwarded-for").join(", "),
        "6.6.6.6, 127.0.0.1",
        "{echo}"
    );
    assert_eq!(seen(&echo, "x-real-ip"), ["6.6.6.6"], "{echo}");
    let forwarded = seen(&echo, "forwarded").join(", ");
    assert!(forwarded.starts_with("for=6.6.6.6, "), "{echo}");
    assert!(forwarded.contains("for=127.0.0.1"), "{echo}");
}

// ---------------------------------------------------------------------------------
// Connections and protocols

#[tokio::test]
async fn upstream_connections_are_pooled() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&simple(&up.url()));
    let c = client();
    for i in 0..50 {
        let res = c.get(gw.url(&format!("/api/p{i}"))).send().await.unwrap();
        let echo = echo_json(res).await;
        assert_eq!(echo["path"], format!("/api/p{i}"));
    }
    let n = up.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        n <= 2,
        "50 sequential requests used {n} upstream connections"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_towards_upstream() {
    let h2 = Upstream::echo_h2c().await;
    let h1 = Upstream::echo().await;
    let gw = Gateway::start(&config(
        "",
        "",
        &[
            (
                "h2",
                "/h2",
                &format!("upstream: {}\nprotocol: http2", h2.url()),
            ),
            ("h1", "/h1", &format!("upstream: {}", h1.url())),
        ],
    ));
    let c = client();
    let res = c
        .post(gw.url("/h2/x?a=1"))
        .body("twelve bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_11);
    let echo = echo_json(res).await;
    assert_eq!(echo["version"], "HTTP/2.0", "{echo}");
    assert_eq!(echo["path"], "/h2/x");
    assert_eq!(echo["query"], "a=1");
    assert_eq!(echo["body_len"], 12);
    // The forwarding headers go over HTTP/2 as well.
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"], "{echo}");

    let echo = echo_json(c.get(gw.url("/h1/x")).send().await.unwrap()).await;
    assert_eq!(echo["version"], "HTTP/1.1", "{echo}");
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_prior_knowledge_from_clients() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&simple(&up.url()));
    let h2 = client_builder()
        .timeout(REQUEST_TIMEOUT)
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for _ in 0..3 {
        let res = h2
            .post(gw.url("/api/h2c"))
            .body("hello")
            .send()
            .await
            .unwrap();
        assert_eq!(res.version(), reqwest::Version::HTTP_2);
        let echo = echo_json(res).await;
        assert_eq!(echo["version"], "HTTP/1.1", "{echo}");
        assert_eq!(echo["body_len"], 5);
        assert_eq!(seen(&echo, "x-forwarded-proto"), ["http"], "{echo}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_can_be_disabled_per_listener() {
    let up = Upstream::echo().await;
    let yaml = simple(&up.url()).replace(
        "  - address: 127.0.0.1:0\n",
        "  - address: 127.0.0.1:0\n    h2c: false\n",
    );
    assert!(yaml.contains("h2c: false"));
    let gw = Gateway::start(&yaml);

    // HTTP/1.1 still works there.
    let echo = echo_json(client().get(gw.url("/api/x")).send().await.unwrap()).await;
    assert_eq!(echo["version"], "HTTP/1.1");

    let h2 = client_builder()
        .timeout(REQUEST_TIMEOUT)
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), h2.get(gw.url("/api/x")).send()).await;
    // An error or a hang both mean "not served"; a response means h2c was spoken.
    if let Ok(Ok(res)) = r {
        panic!(
            "h2c prior knowledge was served on an h2c: false listener ({:?}, {})",
            res.version(),
            res.status()
        );
    }
    assert_eq!(
        up.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the h2c attempt must not reach the upstream"
    );
}

// ---------------------------------------------------------------------------------
// TLS

struct TestCert {
    pem: String,
}

fn write_cert(dir: &std::path::Path, name: &str) -> TestCert {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    let pem = ck.cert.pem();
    std::fs::write(dir.join(format!("{name}.crt")), &pem).unwrap();
    std::fs::write(
        dir.join(format!("{name}.key")),
        ck.signing_key.serialize_pem(),
    )
    .unwrap();
    TestCert { pem }
}

fn tls_client(trust: &TestCert, addr: std::net::SocketAddr) -> reqwest::Client {
    client_builder()
        .timeout(REQUEST_TIMEOUT)
        .resolve("a.test", addr)
        .resolve("b.test", addr)
        .tls_certs_only([reqwest::Certificate::from_pem(trust.pem.as_bytes()).unwrap()])
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_termination_picks_the_certificate_by_sni_and_negotiates_h2() {
    let up = Upstream::echo().await;
    let certs = tempfile::tempdir().unwrap();
    let a = write_cert(certs.path(), "a.test");
    let b = write_cert(certs.path(), "b.test");
    let d = certs.path().display();
    let yaml = format!(
        r#"listeners:
  - address: 127.0.0.1:0
    tls:
      certificates:
        - cert_file: {d}/a.test.crt
          key_file: {d}/a.test.key
          server_names: [a.test]
        - cert_file: {d}/b.test.crt
          key_file: {d}/b.test.key
          server_names: [b.test]
admin:
  address: 127.0.0.1:0
  token: admintoken
server:
  watch_config: false
routes:
  - name: api
    path_prefix: /api
    proxy:
      upstream: {}
"#,
        up.url()
    );
    let gw = Gateway::start(&yaml);
    let port = gw.addr().port();

    let trust_a = tls_client(&a, gw.addr());
    let trust_b = tls_client(&b, gw.addr());

    let res = trust_a
        .get(format!("https://a.test:{port}/api/tls"))
        .send()
        .await
        .expect("a.test with cert A trusted");
    assert_eq!(res.version(), reqwest::Version::HTTP_2, "ALPN h2");
    let echo = echo_json(res).await;
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["https"], "{echo}");
    assert_eq!(echo["version"], "HTTP/1.1", "{echo}");
    assert!(
        seen(&echo, "forwarded")[0].contains("proto=https"),
        "{echo}"
    );

    let res = trust_b
        .get(format!("https://b.test:{port}/api/tls"))
        .send()
        .await
        .expect("b.test with cert B trusted");
    assert_eq!(res.version(), reqwest::Version::HTTP_2, "ALPN h2");
    echo_json(res).await;

    // Each name is served its own certificate: trusting only the other one fails.
    let err = trust_a
        .get(format!("https://b.test:{port}/api/tls"))
        .send()
        .await;
    assert!(err.is_err(), "b.test was served a certificate A trusts");
    let err = trust_b
        .get(format!("https://a.test:{port}/api/tls"))
        .send()
        .await;
    assert!(err.is_err(), "a.test was served a certificate B trusts");

    // An HTTP/1.1-only client negotiates http/1.1 on the same listener.
    let h1 = client_builder()
        .timeout(REQUEST_TIMEOUT)
        .http1_only()
        .resolve("a.test", gw.addr())
        .tls_certs_only([reqwest::Certificate::from_pem(a.pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let res = h1
        .get(format!("https://a.test:{port}/api/tls"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_11);
    let echo = echo_json(res).await;
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["https"], "{echo}");
}

// ---------------------------------------------------------------------------------
// WebSocket and SSE

#[tokio::test(flavor = "multi_thread")]
async fn websocket_is_tunnelled() {
    use tokio_tungstenite::tungstenite::Message;
    let up = Upstream::ws_echo().await;
    let gw = Gateway::start(&config(
        "",
        "",
        &[("ws", "/ws", &format!("upstream: {}", up.url()))],
    ));
    let (mut ws, res) = ws_connect(&format!("ws://{}/ws", gw.addr()))
        .await
        .expect("websocket handshake through the gateway");
    assert_eq!(res.status(), 101);
    let seen_headers: serde_json::Value = serde_json::from_str(
        res.headers()
            .get("x-seen-headers")
            .expect("x-seen-headers")
            .to_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        seen_headers["x-forwarded-for"][0], "127.0.0.1",
        "{seen_headers}"
    );

    for i in 0..5 {
        let text = format!("hello {i}");
        ws_send(&mut ws, Message::text(text.clone())).await;
        let bin: Vec<u8> = (0..=255u8).cycle().skip(i).take(1000 + i).collect();
        ws_send(&mut ws, Message::binary(bin.clone())).await;
        assert_eq!(ws_next(&mut ws).await, Message::text(text));
        assert_eq!(ws_next(&mut ws).await, Message::binary(bin));
    }
    tokio::time::timeout(READ_TIMEOUT, ws.close(None))
        .await
        .expect("close in time")
        .unwrap();
}

/// Reads an SSE response, returning each `data: N` event with its arrival time
/// (relative to `t0`), and whether the body ended cleanly.
async fn read_events(mut res: reqwest::Response, t0: Instant) -> (Vec<(u64, Duration)>, bool) {
    let mut events = Vec::new();
    let mut buf = String::new();
    loop {
        match res.chunk().await {
            Ok(Some(chunk)) => {
                let at = t0.elapsed();
                buf.push_str(std::str::from_utf8(&chunk).unwrap());
                while let Some(end) = buf.find("\n\n") {
                    let event: String = buf.drain(..end + 2).collect();
                    let n = event
                        .trim()
                        .strip_prefix("data: ")
                        .expect("data event")
                        .parse()
                        .unwrap();
                    events.push((n, at));
                }
            }
            Ok(None) => return (events, true),
            Err(_) => return (events, false),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_is_streamed_event_by_event() {
    let (up, gate) = Upstream::sse_gated(5).await;
    let gw = Gateway::start(&simple(&up.url()));
    // A client that accepts compression still gets the upstream's bytes as they are.
    let res = client()
        .get(gw.url("/api/events"))
        .header("accept", "text/event-stream")
        .header("accept-encoding", "gzip, br, zstd")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    assert_eq!(res.headers()["cache-control"], "no-cache");
    let mut events = SseReader::new(res);
    // Each event reaches the client while the upstream is still holding the next
    // one back: nothing between them waits for more data.
    for i in 0..5u64 {
        if i > 0 {
            gate.add_permits(1);
        }
        assert_eq!(events.next_event().await, i);
    }
    events.expect_end().await;
    // Byte for byte what the upstream sent (no re-encoding, no compression).
    let expected: String = (0..5).map(|i| format!("data: {i}\n\n")).collect();
    assert_eq!(String::from_utf8(events.raw).unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_spares_a_busy_stream() {
    // 9 events 250 ms apart: the stream lasts 2 s, twice the idle timeout, with
    // 750 ms of slack per gap for a loaded machine.
    let up = Upstream::sse(9, Duration::from_millis(250)).await;
    let gw = Gateway::start(&config(
        "",
        "",
        &[(
            "api",
            "/api",
            &format!("upstream: {}\ntimeouts: {{idle: 1s}}", up.url()),
        )],
    ));
    let t0 = Instant::now();
    let res = client().get(gw.url("/api/events")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let (events, clean) = read_events(res, t0).await;
    assert!(clean, "busy stream was cut: {events:?}");
    assert_eq!(events.len(), 9, "{events:?}");
    // It outlived the idle timeout (a lower bound holds on any machine).
    assert!(t0.elapsed() >= Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_cuts_a_silent_stream() {
    let up = Upstream::serve(false, |_req| async move {
        let stream = futures_util::stream::unfold(0u8, |i| async move {
            match i {
                0 => Some((Ok::<_, Infallible>(Frame::data(Bytes::from("first\n"))), 1)),
                // Silent for good: only the gateway's idle timeout can end this.
                1 => futures_util::future::pending().await,
                _ => None,
            }
        });
        let body: UpBody = BodyExt::boxed(StreamBody::new(stream));
        Response::builder()
            .header("content-type", "text/plain")
            .body(body)
            .unwrap()
    })
    .await;
    let gw = Gateway::start(&config(
        "",
        "",
        &[(
            "api",
            "/api",
            &format!("upstream: {}\ntimeouts: {{idle: 500ms}}", up.url()),
        )],
    ));
    // The client's own timeouts are far beyond READ_TIMEOUT below, so whatever ends
    // the stream within it is the gateway.
    let patient = client_builder()
        .read_timeout(Duration::from_secs(120))
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let mut res = patient.get(gw.url("/api/silent")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let first = tokio::time::timeout(READ_TIMEOUT, res.chunk())
        .await
        .expect("first chunk in time")
        .unwrap()
        .expect("first chunk");
    assert_eq!(&first[..], b"first\n");
    let t1 = Instant::now();
    let mut rest = Vec::new();
    let ended_with = loop {
        match tokio::time::timeout(READ_TIMEOUT, res.chunk()).await {
            Ok(Ok(Some(c))) => rest.extend_from_slice(&c),
            Ok(Ok(None)) => break "end",
            Ok(Err(_)) => break "error",
            Err(_) => panic!("silent stream was never cut"),
        }
    };
    let after = t1.elapsed();
    eprintln!("silent stream ended ({ended_with}) {after:?} after the first chunk");
    assert!(
        rest.is_empty(),
        "data after the silence: {:?}",
        String::from_utf8_lossy(&rest)
    );
    // Not before the idle timeout (the gateway's clock started before ours: slack),
    // and the upstream never ends it, so the cut within READ_TIMEOUT is the timeout's.
    assert!(
        after >= Duration::from_millis(250),
        "cut after {after:?}, before the 500ms idle timeout"
    );
}

// ---------------------------------------------------------------------------------
// Failures and timeouts

#[tokio::test]
async fn dead_upstream_is_a_502_without_internal_detail() {
    let dead = dead_upstream();
    let gw = Gateway::start(&simple(&format!("http://{dead}")));
    let res = client().get(gw.url("/api/x")).send().await.unwrap();
    let body = assert_error(res, 502, "UPSTREAM_UNAVAILABLE").await;
    assert_eq!(body["error"]["retryable"], true, "{body}");
    let msg = body["error"]["message"]
        .as_str()
        .unwrap()
        .to_ascii_lowercase();
    let whole = body.to_string().to_ascii_lowercase();
    for leak in [
        "refused",
        "os error",
        "tcp",
        "127.0.0.1",
        &format!(":{}", dead.port()),
        "hyper",
        "connect error",
    ] {
        assert!(!msg.contains(leak), "message leaks {leak:?}: {body}");
        assert!(!whole.contains(leak), "body leaks {leak:?}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_upstream_is_a_504_after_the_response_timeout() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(
        "",
        "",
        &[(
            "api",
            "/api",
            &format!("upstream: {}\ntimeouts: {{response: 300ms}}", up.url()),
        )],
    ));
    let t0 = Instant::now();
    // The upstream would answer after a minute: a 504 well before that is the
    // gateway's response timeout.
    let res = client()
        .get(gw.url("/api/slow?delay_ms=60000"))
        .send()
        .await
        .unwrap();
    let took = t0.elapsed();
    let body = assert_error(res, 504, "UPSTREAM_TIMEOUT").await;
    assert_eq!(body["error"]["retryable"], true, "{body}");
    assert!(
        took >= Duration::from_millis(300),
        "504 after {took:?}, before the 300ms response timeout"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn total_timeout_cuts_a_long_stream() {
    // A stream that would last 30 s (an event every 100 ms), cut by a 1 s total.
    let up = Upstream::sse(300, Duration::from_millis(100)).await;
    let gw = Gateway::start(&config(
        "",
        "",
        &[(
            "api",
            "/api",
            &format!("upstream: {}\ntimeouts: {{total: 1s}}", up.url()),
        )],
    ));
    let t0 = Instant::now();
    let res = client().get(gw.url("/api/events")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let (events, _clean) = tokio::time::timeout(Duration::from_secs(15), read_events(res, t0))
        .await
        .expect("stream was never cut");
    let took = t0.elapsed();
    eprintln!("total timeout: {} events, cut after {took:?}", events.len());
    // Data flowed, then the stream was cut long before its natural end.
    assert!(
        !events.is_empty() && events.len() < 300,
        "{} events: {events:?}",
        events.len()
    );
    assert!(
        took >= Duration::from_secs(1),
        "cut after {took:?}, before the 1s total timeout"
    );
}

#[tokio::test]
async fn upstream_error_statuses_pass_through_untouched() {
    let unavailable = Upstream::fixed(503, "upstream is down for maintenance").await;
    let echo = Upstream::echo().await;
    let gw = Gateway::start(&config(
        "",
        "",
        &[
            ("down", "/down", &format!("upstream: {}", unavailable.url())),
            ("api", "/api", &format!("upstream: {}", echo.url())),
        ],
    ));
    let c = client();
    let res = c.get(gw.url("/down/x")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["content-type"], "text/plain");
    assert_eq!(
        res.text().await.unwrap(),
        "upstream is down for maintenance"
    );

    for status in [500u16, 404] {
        let res = c
            .get(gw.url(&format!("/api/x?status={status}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), status);
        assert_eq!(res.headers()["content-type"], "application/json");
        assert_eq!(res.headers()["x-upstream"], "echo");
        let body: serde_json::Value = res.json().await.unwrap();
        assert!(body.get("error").is_none(), "{body}");
        assert_eq!(body["path"], "/api/x", "{body}");
    }
}

// ---------------------------------------------------------------------------------
// Credentials

#[tokio::test]
async fn gateway_credential_is_stripped_unless_forwarded() {
    let up = Upstream::echo().await;
    let route = [("api", "/api", format!("upstream: {}", up.url()))];
    let routes: Vec<(&str, &str, &str)> =
        route.iter().map(|(a, b, c)| (*a, *b, c.as_str())).collect();
    let c = client();

    let gw = Gateway::start(&config("", "auth:\n  tokens: [t0ken]\n", &routes));
    let res = c.get(gw.url("/api/x")).send().await.unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
    let res = c
        .get(gw.url("/api/x"))
        .header("authorization", "Bearer t0ken")
        .send()
        .await
        .unwrap();
    let echo = echo_json(res).await;
    assert!(seen(&echo, "authorization").is_empty(), "{echo}");
    drop(gw);

    let gw = Gateway::start(&config(
        "",
        "auth:\n  tokens: [t0ken]\n  forward_credential: true\n",
        &routes,
    ));
    let res = c
        .get(gw.url("/api/x"))
        .header("authorization", "Bearer t0ken")
        .send()
        .await
        .unwrap();
    let echo = echo_json(res).await;
    assert_eq!(seen(&echo, "authorization"), ["Bearer t0ken"], "{echo}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_certificates_are_reloaded_with_the_config() {
    let up = Upstream::echo().await;
    let certs = tempfile::tempdir().unwrap();
    let old = write_cert(certs.path(), "a.test");
    let d = certs.path().display();
    let yaml = format!(
        r#"listeners:
  - address: 127.0.0.1:0
    tls:
      certificates:
        - cert_file: {d}/a.test.crt
          key_file: {d}/a.test.key
          server_names: [a.test]
admin:
  address: 127.0.0.1:0
  token: adm
server:
  watch_config: false
routes:
  - path_prefix: /
    proxy:
      upstream: {}
"#,
        up.url()
    );
    let gw = Gateway::start(&yaml);
    let url = format!("https://a.test:{}/x", gw.addr().port());
    assert_eq!(
        tls_client(&old, gw.addr())
            .get(&url)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Rotate the certificate on disk and reload: new handshakes get the new one.
    let new = write_cert(certs.path(), "a.test");
    let res = client()
        .post(gw.admin_url("/admin/reload"))
        .bearer_auth("adm")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        tls_client(&new, gw.addr())
            .get(&url)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(tls_client(&old, gw.addr()).get(&url).send().await.is_err());
}

/// A client that stops sending its body gets 408 once the route's idle timeout passes.
#[tokio::test]
async fn stalled_request_body_is_a_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::echo().await;
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\nroutes:\n  - path_prefix: /\n    proxy:\n      upstream: {}\n      timeouts: {{body: 300ms}}\n",
        up.url()
    );
    let gw = Gateway::start(&yaml);
    let mut s = tcp_connect(gw.addr()).await;
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(READ_TIMEOUT, s.read(&mut buf))
        .await
        .expect("answered")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("REQUEST_TIMEOUT"), "{text}");
}

// ---------------------------------------------------------------------------------
// Named upstreams and connect timeout

/// `upstreams:` entries are used by name at run time: the route reaches that
/// upstream, under its base path, with its own protocol.
#[tokio::test(flavor = "multi_thread")]
async fn named_upstreams_are_reached_under_their_base_path() {
    let users = Upstream::echo().await;
    let other = Upstream::echo().await;
    let h2 = Upstream::echo_h2c().await;
    let yaml = format!(
        r#"listeners:
  - address: 127.0.0.1:0
upstreams:
  users:
    url: {users}/base/v2
    pool_max_idle: 4
  plain:
    url: {other}
  fast:
    url: {h2}
    protocol: http2
routes:
  - name: users
    path_prefix: /users
    proxy: {{upstream: users}}
  - name: stripped
    path_prefix: /s
    proxy: {{upstream: users, strip_prefix: true}}
  - name: rewritten
    path: /r/{{id}}
    proxy: {{upstream: users, rewrite: "/by-id/{{id}}"}}
  - name: plain
    path_prefix: /plain
    proxy: {{upstream: plain}}
  - name: h2
    path_prefix: /h2
    proxy: {{upstream: fast}}
"#,
        users = users.url(),
        other = other.url(),
        h2 = h2.url(),
    );
    let gw = Gateway::start(&yaml);
    let c = client();

    let echo = echo_json(c.get(gw.url("/users/42?x=1")).send().await.unwrap()).await;
    assert_eq!(echo["path"], "/base/v2/users/42", "{echo}");
    assert_eq!(echo["query"], "x=1", "{echo}");
    // Host is the named upstream's authority.
    assert_eq!(seen(&echo, "host"), [users.addr.to_string()], "{echo}");

    let echo = echo_json(c.get(gw.url("/s/a/b")).send().await.unwrap()).await;
    assert_eq!(echo["path"], "/base/v2/a/b", "{echo}");
    let echo = echo_json(c.get(gw.url("/r/7")).send().await.unwrap()).await;
    assert_eq!(echo["path"], "/base/v2/by-id/7", "{echo}");
    assert_eq!(
        users.requests.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "every users request reached the users upstream"
    );

    // Another name, another upstream (without a base path).
    let echo = echo_json(c.get(gw.url("/plain/x")).send().await.unwrap()).await;
    assert_eq!(echo["path"], "/plain/x", "{echo}");
    assert_eq!(other.requests.load(std::sync::atomic::Ordering::SeqCst), 1);

    // The named upstream's protocol: h2c prior knowledge.
    let echo = echo_json(c.get(gw.url("/h2/x")).send().await.unwrap()).await;
    assert_eq!(echo["version"], "HTTP/2.0", "{echo}");

    // A name that is not in `upstreams` is a config error, not a guess.
    let bad = yaml.replace("proxy: {upstream: plain}", "proxy: {upstream: plian}");
    let path = write_config(gw.dir.path(), &bad);
    let (code, _, err) = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("routes[3].proxy.upstream") && err.contains("plian"),
        "{err}"
    );
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a TCP
/// connect to it never completes (deterministic, and on loopback). Returns the
/// listener and the connections that fill its queue (keep both alive).
async fn unconnectable() -> (tokio::net::TcpListener, Vec<std::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    // Backlog 0: Linux queues one connection, then drops SYNs.
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fill = Vec::new();
    // Fill the queue until a connect attempt hangs; that one proves it is full.
    tokio::task::spawn_blocking(move || {
        for _ in 0..16 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => fill.push(s),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return (listener, fill),
                Err(e) => panic!("connect to the full listener: {e}"),
            }
        }
        panic!("the accept queue of {addr} never filled up");
    })
    .await
    .unwrap()
}

/// `timeouts.connect` bounds the TCP connect: an upstream that never completes the
/// handshake is a 502 after the connect timeout, long before the response timeout.
#[tokio::test(flavor = "multi_thread")]
async fn connect_timeout_is_a_502() {
    let (listener, _fill) = unconnectable().await;
    let addr = listener.local_addr().unwrap();
    let gw = Gateway::start(&config(
        "",
        "",
        &[
            (
                "api",
                "/api",
                &format!("upstream: http://{addr}\ntimeouts: {{connect: 500ms, response: 60s}}"),
            ),
            (
                "patient",
                "/patient",
                &format!("upstream: http://{addr}\ntimeouts: {{connect: 60s, response: 60s}}"),
            ),
        ],
    ));
    // With a long connect timeout the request just waits: the connect really hangs.
    let pending = tokio::time::timeout(
        Duration::from_secs(3),
        client().get(gw.url("/patient/x")).send(),
    )
    .await;
    assert!(pending.is_err(), "the connect did not hang: {pending:?}");

    let t0 = Instant::now();
    let res = client().get(gw.url("/api/x")).send().await.unwrap();
    let took = t0.elapsed();
    let body = assert_error(res, 502, "UPSTREAM_UNAVAILABLE").await;
    assert_eq!(body["error"]["retryable"], true, "{body}");
    // Not before the connect timeout, and long before the response timeout.
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(10),
        "502 after {took:?}"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"portcullis_upstream_errors_total{route="api",kind="connect"} 1"#),
        "{metrics}"
    );
    drop(listener);
}
