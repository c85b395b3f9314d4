//! Resumable server-sent events (issue 11, §3): `Last-Event-ID` passes through;
//! with `proxy.sse` the gateway reconnects a broken upstream stream from the last id
//! it forwarded, drops repeats, and keeps idle clients alive with heartbeats.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::*;

/// How the raw SSE upstream behaves on its n-th connection (0-based).
#[derive(Clone, Copy)]
enum Script {
    /// 1..=3 then a broken connection; then from the asked id to 6 and a clean end.
    Resume,
    /// Like `Resume`, but the second connection replays from 1 (ignores the id).
    Replay,
    /// One event, then broken; every later connection is answered 503.
    Unresumable,
    /// id 1, silence for 1.2 s, id 2, clean end.
    Quiet,
    /// id 1 then broken; later connections answer 200 and close before any event.
    Flap,
    /// id 1 then broken; later connections never answer.
    Hang,
    /// ids 1..=3 with CR-only line endings after a byte-order mark, clean end.
    CrOnly,
}

/// A raw HTTP/1.1 SSE server: it can break a chunked stream mid-way (no final
/// chunk), which a well-behaved server library would not.
async fn sse_upstream(script: Script) -> (SocketAddr, Arc<Mutex<Vec<Option<String>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let a = asked.clone();
    tokio::spawn(async move {
        let mut n = 0usize;
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let a = a.clone();
            let nth = n;
            n += 1;
            tokio::spawn(async move { serve(sock, script, nth, a).await });
        }
    });
    (addr, asked)
}

async fn serve(
    mut sock: TcpStream,
    script: Script,
    nth: usize,
    asked: Arc<Mutex<Vec<Option<String>>>>,
) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if sock.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let last = head
        .lines()
        .find_map(|l| l.strip_prefix("last-event-id:"))
        .map(|v| v.trim().to_owned());
    asked.lock().unwrap().push(last.clone());
    if matches!(script, Script::Hang) && nth > 0 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        return;
    }
    if matches!(script, Script::Unresumable) && nth > 0 {
        let _ = sock
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    }
    let _ = sock
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        .await;
    let event = |id: u32| format!("id: {id}\ndata: event {id}\n\n");
    let chunk = |s: String| format!("{:x}\r\n{s}\r\n", s.len());
    let (ids, end): (Vec<u32>, bool) = match (script, nth) {
        (Script::Resume | Script::Replay, 0) => ((1..=3).collect(), false),
        (Script::Resume, _) => {
            let from = last
                .as_deref()
                .and_then(|l| l.parse::<u32>().ok())
                .unwrap_or(0);
            ((from + 1..=6).collect(), true)
        }
        (Script::Replay, _) => ((1..=6).collect(), true),
        (Script::Unresumable | Script::Flap | Script::Hang, 0) => (vec![1], false),
        (Script::Unresumable | Script::Flap | Script::Hang, _) => (vec![], false),
        (Script::CrOnly, _) => {
            let mut all = "\u{feff}".to_owned();
            for id in 1..=3 {
                all.push_str(&format!("id: {id}\rdata: event {id}\r\r"));
            }
            let _ = sock.write_all(chunk(all).as_bytes()).await;
            (vec![], true)
        }
        (Script::Quiet, _) => {
            let _ = sock.write_all(chunk(event(1)).as_bytes()).await;
            tokio::time::sleep(Duration::from_millis(1200)).await;
            (vec![2], true)
        }
    };
    for id in ids {
        if sock.write_all(chunk(event(id)).as_bytes()).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if end {
        let _ = sock.write_all(b"0\r\n\r\n").await;
    } else {
        // Broken: the connection closes without the final chunk.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn config(upstream: SocketAddr, sse: &str) -> String {
    format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nroutes:\n  - path_prefix: /\n    proxy:\n      upstream: \"http://{upstream}\"\n{sse}"
    )
}

/// Reads the whole body: (text, whether it ended cleanly).
async fn read_all(res: reqwest::Response) -> (String, bool) {
    let mut res = res;
    let mut text = String::new();
    loop {
        match tokio::time::timeout(READ_TIMEOUT, res.chunk()).await {
            Ok(Ok(Some(c))) => text.push_str(&String::from_utf8_lossy(&c)),
            Ok(Ok(None)) => return (text, true),
            Ok(Err(_)) => return (text, false),
            Err(_) => panic!("stream stalled; so far: {text:?}"),
        }
    }
}

fn ids(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|v| v.parse().unwrap())
        .collect()
}

#[tokio::test]
async fn a_broken_stream_is_resumed_from_the_last_id() {
    let (up, asked) = sse_upstream(Script::Resume).await;
    let gw = Gateway::start(&config(
        up,
        "      sse: {attempts: 3, backoff: 50ms, heartbeat: 0s}",
    ));
    let res = stream_client().get(gw.url("/events")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let (text, clean) = read_all(res).await;
    assert_eq!(ids(&text), [1, 2, 3, 4, 5, 6], "{text}");
    assert!(clean, "the client's stream never noticed");
    assert_eq!(*asked.lock().unwrap(), [None, Some("3".to_owned())]);
}

#[tokio::test]
async fn events_already_sent_are_not_repeated() {
    let (up, _) = sse_upstream(Script::Replay).await;
    let gw = Gateway::start(&config(
        up,
        "      sse: {attempts: 3, backoff: 50ms, heartbeat: 0s}",
    ));
    let res = stream_client().get(gw.url("/events")).send().await.unwrap();
    let (text, clean) = read_all(res).await;
    assert_eq!(ids(&text), [1, 2, 3, 4, 5, 6], "{text}");
    assert!(clean);
}

#[tokio::test]
async fn attempts_are_bounded_and_the_client_sees_the_break() {
    let (up, asked) = sse_upstream(Script::Unresumable).await;
    let gw = Gateway::start(&config(
        up,
        "      sse: {attempts: 2, backoff: 50ms, heartbeat: 0s}",
    ));
    let res = stream_client().get(gw.url("/events")).send().await.unwrap();
    let (text, clean) = read_all(res).await;
    assert_eq!(ids(&text), [1]);
    assert!(!clean, "the stream fails so the client reconnects itself");
    // The first connection and two attempts, each from id 1.
    assert_eq!(
        *asked.lock().unwrap(),
        [None, Some("1".to_owned()), Some("1".to_owned())]
    );
}

#[tokio::test]
async fn heartbeats_fill_silences() {
    let (up, _) = sse_upstream(Script::Quiet).await;
    let gw = Gateway::start(&config(up, "      sse: {heartbeat: 200ms}"));
    let res = stream_client().get(gw.url("/events")).send().await.unwrap();
    let (text, clean) = read_all(res).await;
    assert!(clean);
    assert_eq!(ids(&text), [1, 2]);
    let beats = text.matches(": keep-alive\n\n").count();
    assert!((2..=8).contains(&beats), "{beats} heartbeats in {text:?}");
    // Heartbeats sit between events, never inside one.
    assert!(text.starts_with("id: 1\ndata: event 1\n\n"), "{text:?}");
}

#[tokio::test]
async fn without_sse_the_stream_passes_through_and_so_does_last_event_id() {
    let (up, asked) = sse_upstream(Script::Resume).await;
    let gw = Gateway::start(&config(up, ""));
    let res = stream_client()
        .get(gw.url("/events"))
        .header("last-event-id", "2")
        .send()
        .await
        .unwrap();
    let (text, clean) = read_all(res).await;
    // No resumption: the break reaches the client, which reconnects itself.
    assert_eq!(ids(&text), [1, 2, 3]);
    assert!(!clean);
    assert_eq!(*asked.lock().unwrap(), [Some("2".to_owned())]);
}

#[test]
fn sse_config_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_config(
        dir.path(),
        "listeners: [{address: \"127.0.0.1:0\"}]\nroutes:\n  - path_prefix: /\n    proxy: {upstream: \"http://127.0.0.1:1\", sse: {retries: 3}}\n",
    );
    let (code, _, err) = run_cli(&["check", "-c", p.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("retries"), "{err}");
}

/// An upstream that answers and breaks before any event, and one that never answers
/// again: both spend the attempts (they are consecutive across breaks) and the
/// client's stream fails instead of waiting or looping.
#[tokio::test]
async fn flapping_and_silent_upstreams_spend_the_attempts() {
    for script in [Script::Flap, Script::Hang] {
        let (up, asked) = sse_upstream(script).await;
        let gw = Gateway::start(&config(
            up,
            "      timeouts: {response: 300ms}\n      sse: {attempts: 3, backoff: 20ms, heartbeat: 0s}",
        ));
        let started = std::time::Instant::now();
        let res = stream_client().get(gw.url("/events")).send().await.unwrap();
        let (text, clean) = read_all(res).await;
        assert_eq!(ids(&text), [1]);
        assert!(!clean);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            asked.lock().unwrap().len(),
            4,
            "the first connection and 3 attempts"
        );
    }
}

/// CR-only line endings and a byte-order mark: every event arrives, the last one
/// when the stream ends.
#[tokio::test]
async fn cr_line_endings_and_a_bom_are_understood() {
    let (up, _) = sse_upstream(Script::CrOnly).await;
    let gw = Gateway::start(&config(up, "      sse: {heartbeat: 0s}"));
    let res = stream_client().get(gw.url("/events")).send().await.unwrap();
    let (text, clean) = read_all(res).await;
    assert!(clean);
    let got: Vec<&str> = text
        .split('\r')
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert_eq!(got, ["1", "2", "3"], "{text:?}");
    assert!(!text.starts_with('\u{feff}'));
}
