//! Response compression: negotiation, eligibility, streaming.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;

use crate::harness::*;

type Res = hyper::Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>;

fn original() -> String {
    let mut s = String::from("[");
    for i in 0..400 {
        s.push_str(&format!("{{\"id\":{i},\"name\":\"item number {i}\"}},"));
    }
    s.push_str("{}]");
    s
}

/// `/json` the original (with a strong ETag), `/tiny` 10 bytes, `/gz` an already
/// gzip-encoded body, `/png` an image, `/stream` text chunks released by the gate.
async fn upstream() -> (Upstream, Arc<tokio::sync::Semaphore>) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let up = Upstream::serve(false, move |req| {
        let gate = g.clone();
        async move {
            let full = |ct: &str, body: Bytes| -> Res {
                hyper::Response::builder()
                    .header("content-type", ct)
                    .header("etag", "\"v1\"")
                    .body(Full::new(body).boxed())
                    .unwrap()
            };
            match req.uri().path() {
                "/json" => full("application/json", Bytes::from(original())),
                "/tiny" => full("text/plain", Bytes::from_static(b"0123456789")),
                "/png" => full("image/png", Bytes::from(original())),
                "/gz" => {
                    let mut res = full("text/plain", Bytes::from_static(b"not really gzip"));
                    res.headers_mut()
                        .insert("content-encoding", "gzip".parse().unwrap());
                    res
                }
                _ => {
                    let stream = futures_util::stream::unfold(0usize, move |i| {
                        let gate = gate.clone();
                        async move {
                            if i >= 3 {
                                return None;
                            }
                            if i > 0 {
                                gate.acquire().await.ok()?.forget();
                            }
                            let frame = Frame::data(Bytes::from(format!("chunk {i};")));
                            Some((Ok::<_, Infallible>(frame), i + 1))
                        }
                    });
                    hyper::Response::builder()
                        .header("content-type", "text/plain")
                        .body(StreamBody::new(stream).boxed())
                        .unwrap()
                }
            }
        }
    })
    .await;
    (up, gate)
}

fn config(upstream: &str, sse: &str) -> String {
    format!(
        r#"
listeners:
  - address: 127.0.0.1:0
routes:
  - name: sse
    path: /events
    public: true
    compression: true
    proxy: {{upstream: "{sse}"}}
  - name: cached
    path_prefix: /cached
    public: true
    compression: true
    cache: {{ttl: 60s}}
    proxy: {{upstream: "{upstream}", rewrite: "/json"}}
  - name: gzip-only
    path_prefix: /gzip-only
    public: true
    compression: {{algorithms: [gzip]}}
    proxy: {{upstream: "{upstream}", rewrite: "/json"}}
  - name: plain
    path_prefix: /plain
    public: true
    proxy: {{upstream: "{upstream}", rewrite: "/json"}}
  - name: default
    path_prefix: /
    public: true
    compression: true
    proxy: {{upstream: "{upstream}"}}
"#
    )
}

fn decode(encoding: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => {
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => out = zstd::stream::decode_all(body).unwrap(),
        other => panic!("unexpected encoding {other}"),
    }
    out
}

async fn fetch(url: &str, accept: Option<&str>) -> reqwest::Response {
    let mut req = client().get(url);
    if let Some(a) = accept {
        req = req.header("accept-encoding", a);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200);
    res
}

fn header(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn gzip_br_and_zstd_decode_to_the_original() {
    let (up, _) = upstream().await;
    let gw = Gateway::start(&config(&up.url(), &up.url()));
    for (accept, expected) in [
        ("gzip", "gzip"),
        ("br", "br"),
        ("zstd", "zstd"),
        ("gzip, deflate, br, zstd", "br"),
        ("br;q=0, zstd;q=0.5, gzip", "gzip"),
        ("br;q=0, *", "zstd"),
    ] {
        let res = fetch(&gw.url("/json"), Some(accept)).await;
        assert_eq!(
            header(&res, "content-encoding").as_deref(),
            Some(expected),
            "{accept}"
        );
        assert_eq!(header(&res, "content-length"), None);
        assert!(
            header(&res, "vary")
                .unwrap()
                .to_ascii_lowercase()
                .contains("accept-encoding"),
            "{accept}"
        );
        assert_eq!(header(&res, "etag").as_deref(), Some("W/\"v1\""));
        let body = res.bytes().await.unwrap();
        assert!(
            body.len() < original().len() / 3,
            "{accept}: {} bytes",
            body.len()
        );
        assert_eq!(decode(expected, &body), original().as_bytes(), "{accept}");
    }
    // The route's list limits the choice.
    let res = fetch(&gw.url("/gzip-only"), Some("br, zstd, gzip;q=0.1")).await;
    assert_eq!(header(&res, "content-encoding").as_deref(), Some("gzip"));
    let res = fetch(&gw.url("/gzip-only"), Some("br")).await;
    assert_eq!(header(&res, "content-encoding"), None);
}

#[tokio::test]
async fn identity_when_the_client_does_not_ask_or_refuses() {
    let (up, _) = upstream().await;
    let gw = Gateway::start(&config(&up.url(), &up.url()));
    for accept in [
        None,
        Some("identity"),
        Some("*;q=0"),
        Some("gzip;q=0"),
        Some("deflate"),
    ] {
        let res = fetch(&gw.url("/json"), accept).await;
        assert_eq!(header(&res, "content-encoding"), None, "{accept:?}");
        assert_eq!(header(&res, "etag").as_deref(), Some("\"v1\""));
        // Still varies: another client would get it compressed.
        assert!(header(&res, "vary").unwrap().contains("accept-encoding"));
        assert_eq!(res.text().await.unwrap(), original());
    }
    // A route without compression.
    let res = fetch(&gw.url("/plain"), Some("gzip")).await;
    assert_eq!(header(&res, "content-encoding"), None);
    assert_eq!(header(&res, "vary"), None);
}

#[tokio::test]
async fn small_encoded_and_unlisted_bodies_are_sent_as_they_are() {
    let (up, _) = upstream().await;
    let gw = Gateway::start(&config(&up.url(), &up.url()));
    let res = fetch(&gw.url("/tiny"), Some("gzip")).await;
    assert_eq!(header(&res, "content-encoding"), None);
    assert_eq!(header(&res, "content-length").as_deref(), Some("10"));
    assert_eq!(res.text().await.unwrap(), "0123456789");

    let res = fetch(&gw.url("/gz"), Some("gzip, br")).await;
    assert_eq!(header(&res, "content-encoding").as_deref(), Some("gzip"));
    assert_eq!(&res.bytes().await.unwrap()[..], b"not really gzip");

    let res = fetch(&gw.url("/png"), Some("gzip")).await;
    assert_eq!(header(&res, "content-encoding"), None);
    assert_eq!(res.bytes().await.unwrap().len(), original().len());

    // HEAD: never encoded.
    let res = client()
        .head(gw.url("/json"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&res, "content-encoding"), None);
}

#[tokio::test]
async fn event_streams_are_never_compressed_and_still_stream() {
    let (up, _) = upstream().await;
    let (sse, gate) = Upstream::sse_gated(3).await;
    let gw = Gateway::start(&config(&up.url(), &sse.url()));
    let res = stream_client()
        .get(gw.url("/events"))
        .header("accept-encoding", "gzip, br, zstd")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "content-encoding"), None);
    let mut events = SseReader::new(res);
    assert_eq!(events.next_event().await, 0);
    gate.add_permits(1);
    assert_eq!(events.next_event().await, 1);
    gate.add_permits(1);
    assert_eq!(events.next_event().await, 2);
    events.expect_end().await;
}

#[tokio::test]
async fn compressed_streams_are_flushed_chunk_by_chunk() {
    let (up, gate) = upstream().await;
    let gw = Gateway::start(&config(&up.url(), &up.url()));
    let mut res = stream_client()
        .get(gw.url("/stream"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&res, "content-encoding").as_deref(), Some("gzip"));
    let mut decoder = flate2::write::GzDecoder::new(Vec::new());
    for i in 0..3 {
        let want = format!("chunk {i};");
        // Each chunk decodes before the upstream is allowed to send the next.
        loop {
            if String::from_utf8_lossy(decoder.get_ref()).ends_with(&want) {
                break;
            }
            let chunk = tokio::time::timeout(READ_TIMEOUT, res.chunk())
                .await
                .expect("compressed chunk held back")
                .unwrap()
                .expect("stream ended early");
            decoder.write_all(&chunk).unwrap();
            decoder.flush().unwrap();
        }
        gate.add_permits(1);
    }
    while let Some(chunk) = tokio::time::timeout(READ_TIMEOUT, res.chunk())
        .await
        .unwrap()
        .unwrap()
    {
        decoder.write_all(&chunk).unwrap();
    }
    let out = decoder.finish().unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), "chunk 0;chunk 1;chunk 2;");
}

#[tokio::test]
async fn cached_entries_are_stored_identity_and_compressed_per_client() {
    let (up, _) = upstream().await;
    let gw = Gateway::start(&config(&up.url(), &up.url()));
    let res = fetch(&gw.url("/cached"), Some("gzip")).await;
    assert_eq!(header(&res, "x-cache").as_deref(), Some("MISS"));
    assert_eq!(header(&res, "content-encoding").as_deref(), Some("gzip"));
    assert_eq!(
        decode("gzip", &res.bytes().await.unwrap()),
        original().as_bytes()
    );

    let res = fetch(&gw.url("/cached"), Some("br")).await;
    assert_eq!(header(&res, "x-cache").as_deref(), Some("HIT"));
    assert_eq!(header(&res, "content-encoding").as_deref(), Some("br"));
    assert_eq!(
        decode("br", &res.bytes().await.unwrap()),
        original().as_bytes()
    );

    let res = fetch(&gw.url("/cached"), None).await;
    assert_eq!(header(&res, "x-cache").as_deref(), Some("HIT"));
    assert_eq!(header(&res, "content-encoding"), None);
    assert_eq!(res.text().await.unwrap(), original());
    assert_eq!(up.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
}
