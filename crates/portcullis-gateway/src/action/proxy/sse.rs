//! Server-sent events with gateway-side resumption and heartbeats (`proxy.sse`).
//!
//! Plain SSE needs nothing here: the proxy streams `text/event-stream` chunk by chunk
//! and a client's `Last-Event-ID` reaches the upstream like any header. On a route
//! with `sse`, the upstream's stream is cut into events and forwarded event by event
//! from a task; when the upstream's connection breaks before the upstream ended the
//! stream, the task asks again with `Last-Event-ID` set to the last id it forwarded
//! (with backoff, a bounded number of attempts) and drops events it already sent — the
//! client's connection never notices. While nothing is sent for `heartbeat`, a
//! comment line keeps intermediaries from closing the idle connection.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use crate::body::{Body, BoxError, IdleTimeout};
use crate::upstream::{PooledBody, UpstreamClient};

/// Ids remembered to drop repeats after a reconnect.
const REMEMBERED_IDS: usize = 1024;
const HEARTBEAT: &[u8] = b": keep-alive\n\n";
static LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// A route's `sse` settings.
#[derive(Debug, Clone)]
pub struct SsePolicy {
    pub resume: bool,
    pub heartbeat: Option<Duration>,
    /// Consecutive reconnection attempts before the client's stream is failed.
    pub attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Largest single event (the stream fails beyond it).
    pub max_event: usize,
}

/// Why the stream given to the client failed.
#[derive(Debug, thiserror::Error)]
enum SseError {
    #[error("the upstream event stream broke and could not be resumed")]
    NotResumed,
    #[error("an upstream event is larger than {0} bytes")]
    EventTooLarge(usize),
}

/// Whether `res` is an event stream the policy applies to.
pub(crate) fn applies(res: &Response<Body>) -> bool {
    res.status() == StatusCode::OK
        && res
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
            })
}

/// The client's body: events forwarded by a task that owns the upstream stream and
/// reconnects it. `again` is the request to send for a reconnection (GET only).
pub(crate) fn stream(
    policy: SsePolicy,
    upstream: IdleTimeout<PooledBody>,
    again: Option<(UpstreamClient, http::request::Parts, Duration)>,
    route: Arc<str>,
) -> Body {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(8);
    tokio::spawn(forward(policy, upstream, again, route, tx));
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Body::boxed(http_body_util::StreamBody::new(events))
}

type Sender = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

async fn forward(
    policy: SsePolicy,
    mut upstream: IdleTimeout<PooledBody>,
    again: Option<(UpstreamClient, http::request::Parts, Duration)>,
    route: Arc<str>,
    tx: Sender,
) {
    let mut events = Events::default();
    let mut sent = SentIds::default();
    let mut resumed = false;
    let heartbeat = policy
        .heartbeat
        .unwrap_or(Duration::from_secs(86_400 * 365));
    let quiet = tokio::time::sleep(heartbeat);
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            frame = upstream.frame() => match frame {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    events.push(&data);
                    while let Some((event, id)) = events.next_event() {
                        if resumed && id.as_ref().is_some_and(|id| sent.contains(id)) {
                            continue;
                        }
                        if tx.send(Ok(Frame::data(event))).await.is_err() {
                            return;
                        }
                        quiet.as_mut().reset(tokio::time::Instant::now() + heartbeat);
                        if let Some(id) = id {
                            sent.remember(id);
                        }
                    }
                    if events.pending() > policy.max_event {
                        tracing::warn!(route = %route, max = policy.max_event, "upstream event too large; stream ended");
                        let _ = tx.send(Err(Box::new(SseError::EventTooLarge(policy.max_event)))).await;
                        return;
                    }
                }
                // The upstream ended the stream itself.
                None => return,
                Some(Err(e)) => {
                    let resumable = policy.resume && again.is_some();
                    tracing::debug!(route = %route, error = %e, resumable, "upstream event stream broke");
                    let next = match &again {
                        Some((client, head, idle)) if policy.resume => {
                            reconnect(&policy, client, head, *idle, sent.last(), &route, &tx, heartbeat).await
                        }
                        _ => None,
                    };
                    match next {
                        Some(body) => {
                            upstream = body;
                            events = Events::default();
                            resumed = true;
                            quiet.as_mut().reset(tokio::time::Instant::now() + heartbeat);
                        }
                        None => {
                            let _ = tx.send(Err(Box::new(SseError::NotResumed))).await;
                            return;
                        }
                    }
                }
            },
            () = &mut quiet, if policy.heartbeat.is_some() => {
                if tx.send(Ok(Frame::data(Bytes::from_static(HEARTBEAT)))).await.is_err() {
                    return;
                }
                quiet.as_mut().reset(tokio::time::Instant::now() + heartbeat);
            }
            () = tx.closed() => return,
        }
    }
}

/// Asks the upstream again from `last_id`, with backoff; heartbeats keep the client
/// alive meanwhile. `None` when every attempt failed or the client left.
#[allow(clippy::too_many_arguments)]
async fn reconnect(
    policy: &SsePolicy,
    client: &UpstreamClient,
    head: &http::request::Parts,
    idle: Duration,
    last_id: Option<&str>,
    route: &str,
    tx: &Sender,
    heartbeat: Duration,
) -> Option<IdleTimeout<PooledBody>> {
    for attempt in 1..=policy.attempts {
        let wait = portcullis_upstream::retry::backoff(policy.backoff, policy.max_backoff, attempt);
        let until = tokio::time::Instant::now() + wait;
        // Heartbeats while waiting (the wait may be longer than the interval).
        loop {
            let beat = tokio::time::Instant::now() + heartbeat;
            if beat >= until || policy.heartbeat.is_none() {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => break,
                    () = tx.closed() => return None,
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(beat) => {
                    if tx.send(Ok(Frame::data(Bytes::from_static(HEARTBEAT)))).await.is_err() {
                        return None;
                    }
                }
                () = tx.closed() => return None,
            }
        }
        let mut again = super::clone_head(head);
        if let Some(id) = last_id.and_then(|id| HeaderValue::from_str(id).ok()) {
            again.headers.insert(LAST_EVENT_ID.clone(), id);
        }
        let req = Request::from_parts(again, Body::empty());
        let answer = tokio::select! {
            r = client.request(req) => r,
            () = tx.closed() => return None,
        };
        match answer {
            Ok(res) if applies_pooled(&res) => {
                tracing::info!(route = %route, attempt, last_event_id = last_id.unwrap_or(""), "upstream event stream resumed");
                return Some(IdleTimeout::new(res.into_body(), idle));
            }
            Ok(res) => {
                tracing::warn!(route = %route, attempt, status = res.status().as_u16(), "upstream refused to resume the event stream");
            }
            Err(e) => {
                tracing::warn!(route = %route, attempt, error = %super::error_chain(&e), "reconnecting the event stream failed");
            }
        }
    }
    None
}

fn applies_pooled(res: &Response<PooledBody>) -> bool {
    res.status() == StatusCode::OK
        && res
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("text/event-stream"))
}

/// Cuts a byte stream into events (an event ends with an empty line; lines end with
/// CRLF, LF or CR) and reads each event's `id`.
#[derive(Default)]
struct Events {
    buf: BytesMut,
}

impl Events {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete event (its bytes as received) and its id, if it has one.
    fn next_event(&mut self) -> Option<(Bytes, Option<String>)> {
        let mut id = None;
        let mut start = 0;
        let b = &self.buf[..];
        let mut i = 0;
        while i < b.len() {
            let end = match b[i] {
                b'\n' => i + 1,
                // A CR at the very end may be the first half of CRLF: wait.
                b'\r' if i + 1 == b.len() => return None,
                b'\r' if b[i + 1] == b'\n' => i + 2,
                b'\r' => i + 1,
                _ => {
                    i += 1;
                    continue;
                }
            };
            let line = &b[start..i];
            if line.is_empty() {
                let event = self.buf.split_to(end).freeze();
                return Some((event, id));
            }
            if let Some(value) = field(line, b"id") {
                if !value.contains(&0) {
                    id = Some(String::from_utf8_lossy(value).into_owned());
                }
            }
            start = end;
            i = end;
        }
        None
    }
}

/// The value of `name` on this line (`name: value`, one leading space dropped).
fn field<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let rest = line.strip_prefix(name)?;
    match rest.first() {
        None => Some(rest),
        Some(b':') => Some(rest[1..].strip_prefix(b" ").unwrap_or(&rest[1..])),
        Some(_) => None,
    }
}

/// The last ids forwarded (bounded), and the very last one.
#[derive(Default)]
struct SentIds {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl SentIds {
    fn remember(&mut self, id: String) {
        if self.set.contains(&id) {
            return;
        }
        if self.order.len() >= REMEMBERED_IDS {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(id.clone());
        self.order.push_back(id);
    }

    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    fn last(&self) -> Option<&str> {
        self.order.back().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[&[u8]]) -> Vec<(String, Option<String>)> {
        let mut e = Events::default();
        let mut out = Vec::new();
        for chunk in input {
            e.push(chunk);
            while let Some((bytes, id)) = e.next_event() {
                out.push((String::from_utf8(bytes.to_vec()).unwrap(), id));
            }
        }
        out
    }

    #[test]
    fn events_split_on_every_line_ending_and_across_chunks() {
        let got = all(&[
            b"id: 1\ndata: a\n\nid:2\r\ndata: b\r\n\r",
            b"\n: comment\n\ndata: c\r\rid",
            b": 3\n\n",
        ]);
        assert_eq!(
            got,
            vec![
                ("id: 1\ndata: a\n\n".into(), Some("1".into())),
                ("id:2\r\ndata: b\r\n\r\n".into(), Some("2".into())),
                (": comment\n\n".into(), None),
                ("data: c\r\r".into(), None),
                ("id: 3\n\n".into(), Some("3".into())),
            ]
        );
        // An incomplete event waits.
        assert!(all(&[b"id: 9\ndata: x\n"]).is_empty());
    }

    #[test]
    fn ids_follow_the_spec() {
        assert_eq!(field(b"id: 7", b"id"), Some(&b"7"[..]));
        assert_eq!(field(b"id:  7", b"id"), Some(&b" 7"[..]));
        assert_eq!(field(b"id", b"id"), Some(&b""[..]));
        assert_eq!(field(b"idx: 7", b"id"), None);
        // An id with NUL is ignored.
        assert_eq!(all(&[b"id: a\0b\n\n"]), vec![("id: a\0b\n\n".into(), None)]);
    }

    #[test]
    fn remembered_ids_are_bounded() {
        let mut s = SentIds::default();
        for i in 0..(REMEMBERED_IDS + 10) {
            s.remember(i.to_string());
        }
        assert!(!s.contains("0"));
        assert!(s.contains(&(REMEMBERED_IDS + 9).to_string()));
        assert_eq!(s.last(), Some((REMEMBERED_IDS + 9).to_string().as_str()));
        assert_eq!(s.order.len(), REMEMBERED_IDS);
    }
}
