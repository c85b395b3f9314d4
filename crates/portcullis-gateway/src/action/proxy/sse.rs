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

/// How a broken stream is asked for again: the request (a GET, its body headers
/// removed), the client, and the route's timeouts.
pub(crate) struct Again {
    pub client: UpstreamClient,
    pub head: http::request::Parts,
    pub idle: Duration,
    pub response_timeout: Duration,
    /// The route's total deadline: it ends the stream, it is never "a break".
    pub deadline: Option<tokio::time::Instant>,
}

/// The client's body: events forwarded by a task that owns the upstream stream and
/// reconnects it (`again`: GET requests on a route with `resume`).
pub(crate) fn stream(
    policy: SsePolicy,
    upstream: IdleTimeout<PooledBody>,
    again: Option<Again>,
    route: Arc<str>,
) -> Body {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(8);
    let heartbeat = policy.heartbeat;
    let task = Task {
        again: again.filter(|_| policy.resume),
        policy,
        route,
        tx,
        heartbeat,
    };
    tokio::spawn(task.forward(upstream));
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Body::boxed(http_body_util::StreamBody::new(events))
}

type Sender = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// The task that reads the upstream stream and feeds the client's.
struct Task {
    policy: SsePolicy,
    again: Option<Again>,
    route: Arc<str>,
    tx: Sender,
    heartbeat: Option<Duration>,
}

/// A far-away instant for a heartbeat timer that never fires.
const NEVER: Duration = Duration::from_secs(86_400 * 365);

impl Task {
    async fn forward(self, mut upstream: IdleTimeout<PooledBody>) {
        let mut events = Events::default();
        let mut sent = SentIds::default();
        let mut resumed = false;
        // Consecutive reconnections that forwarded nothing (`attempts` bounds them).
        let mut failures = 0_u32;
        let every = self.heartbeat.unwrap_or(NEVER);
        let quiet = tokio::time::sleep(every);
        tokio::pin!(quiet);
        loop {
            tokio::select! {
                frame = upstream.frame() => match frame {
                    Some(Ok(frame)) => {
                        let Ok(data) = frame.into_data() else { continue };
                        events.push(&data);
                        while let Some((event, id)) = events.next_event() {
                            if event.len() > self.policy.max_event {
                                return self.fail(SseError::EventTooLarge(self.policy.max_event)).await;
                            }
                            if let Some(id) = &id {
                                sent.seen(id);
                            }
                            if resumed && id.as_deref().is_some_and(|id| sent.contains(id)) {
                                continue;
                            }
                            if self.tx.send(Ok(Frame::data(event))).await.is_err() {
                                return;
                            }
                            failures = 0;
                            quiet.as_mut().reset(tokio::time::Instant::now() + every);
                            if let Some(id) = id {
                                sent.remember(id);
                            }
                        }
                        if events.pending() > self.policy.max_event {
                            return self.fail(SseError::EventTooLarge(self.policy.max_event)).await;
                        }
                    }
                    // The upstream ended the stream itself: a last event cut by a CR
                    // line ending is complete now.
                    None => {
                        for (event, _) in events.finish() {
                            if self.tx.send(Ok(Frame::data(event))).await.is_err() {
                                return;
                            }
                        }
                        return;
                    }
                    Some(Err(e)) => {
                        // The route's total deadline ends the stream; it is no break.
                        if crate::body::find_cause::<crate::body::DeadlineExceeded>(&*e).is_some() {
                            return self.fail(SseError::NotResumed).await;
                        }
                        tracing::debug!(route = %self.route, error = %e, resumable = self.again.is_some(), "upstream event stream broke");
                        match self.reconnect(sent.last(), &mut failures).await {
                            Some(body) => {
                                upstream = body;
                                events = Events::default();
                                resumed = true;
                                quiet.as_mut().reset(tokio::time::Instant::now() + every);
                            }
                            None => return self.fail(SseError::NotResumed).await,
                        }
                    }
                },
                () = &mut quiet, if self.heartbeat.is_some() => {
                    if !self.beat().await {
                        return;
                    }
                    quiet.as_mut().reset(tokio::time::Instant::now() + every);
                }
                () = self.tx.closed() => return,
            }
        }
    }

    /// Ends the client's stream with an error (its `EventSource` reconnects).
    async fn fail(&self, e: SseError) {
        if let SseError::EventTooLarge(max) = e {
            tracing::warn!(route = %self.route, max, "upstream event too large; stream ended");
        }
        let _ = self.tx.send(Err(Box::new(e))).await;
    }

    /// A heartbeat comment; false when the client is gone.
    async fn beat(&self) -> bool {
        self.tx
            .send(Ok(Frame::data(Bytes::from_static(HEARTBEAT))))
            .await
            .is_ok()
    }

    /// Asks the upstream again from `last_id`, with backoff, until `attempts`
    /// consecutive attempts (counted in `failures` across breaks: an upstream that
    /// answers and breaks before any event counts as a failure) are spent or the
    /// deadline is reached; heartbeats keep the client alive meanwhile. `None`: give
    /// up (or the client left).
    async fn reconnect(
        &self,
        last_id: Option<&str>,
        failures: &mut u32,
    ) -> Option<IdleTimeout<PooledBody>> {
        let again = self.again.as_ref()?;
        while *failures < self.policy.attempts {
            *failures += 1;
            let attempt = *failures;
            let wait = portcullis_upstream::retry::backoff(
                self.policy.backoff,
                self.policy.max_backoff,
                attempt,
            );
            let until = tokio::time::Instant::now() + wait;
            if again.deadline.is_some_and(|d| until >= d) {
                return None;
            }
            if !self.wait(until).await {
                return None;
            }
            let mut head = super::clone_head(&again.head);
            if let Some(id) = last_id.and_then(|id| HeaderValue::from_str(id).ok()) {
                head.headers.insert(LAST_EVENT_ID.clone(), id);
            }
            let req = Request::from_parts(head, Body::empty());
            let respond_by = tokio::time::Instant::now() + again.response_timeout;
            let respond_by = again.deadline.map_or(respond_by, |d| d.min(respond_by));
            let answer = tokio::select! {
                r = tokio::time::timeout_at(respond_by, again.client.request(req)) => r,
                () = self.tx.closed() => return None,
            };
            match answer {
                Ok(Ok(res)) if applies_pooled(&res) => {
                    tracing::info!(route = %self.route, attempt, last_event_id = last_id.unwrap_or(""), "upstream event stream resumed");
                    return Some(
                        IdleTimeout::new(res.into_body(), again.idle).with_deadline(again.deadline),
                    );
                }
                Ok(Ok(res)) => {
                    tracing::warn!(route = %self.route, attempt, status = res.status().as_u16(), "upstream refused to resume the event stream");
                }
                Ok(Err(e)) => {
                    tracing::warn!(route = %self.route, attempt, error = %super::error_chain(&e), "reconnecting the event stream failed");
                }
                Err(_) => {
                    tracing::warn!(route = %self.route, attempt, "reconnecting the event stream timed out");
                }
            }
        }
        None
    }

    /// Sleeps until `until`, with heartbeats; false when the client left.
    async fn wait(&self, until: tokio::time::Instant) -> bool {
        loop {
            let beat = self
                .heartbeat
                .map_or(until, |h| (tokio::time::Instant::now() + h).min(until));
            tokio::select! {
                () = tokio::time::sleep_until(beat) => {
                    if beat >= until {
                        return true;
                    }
                    if !self.beat().await {
                        return false;
                    }
                }
                () = self.tx.closed() => return false,
            }
        }
    }
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
/// CRLF, LF or CR) and reads each event's `id`. Scanning resumes where it stopped, so
/// an event arriving in many small chunks costs linear time.
#[derive(Default)]
struct Events {
    buf: BytesMut,
    /// Where the line being scanned starts.
    line_start: usize,
    /// The current event's id so far (`Some("")`: an empty `id` field).
    id: Option<String>,
    /// A leading byte-order mark was looked for.
    bom_checked: bool,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl Events {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        if !self.bom_checked && self.buf.len() >= BOM.len() {
            self.bom_checked = true;
            if self.buf.starts_with(BOM) {
                let _ = self.buf.split_to(BOM.len());
            }
        }
    }

    fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete event (its bytes as received) and its id, if it has one.
    fn next_event(&mut self) -> Option<(Bytes, Option<String>)> {
        let mut i = self.line_start;
        while i < self.buf.len() {
            let b = &self.buf[..];
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
            let line = &b[self.line_start..i];
            if line.is_empty() {
                let event = self.buf.split_to(end).freeze();
                self.line_start = 0;
                return Some((event, self.id.take()));
            }
            if let Some(value) = field(line, b"id") {
                if !value.contains(&0) {
                    self.id = Some(String::from_utf8_lossy(value).into_owned());
                }
            }
            self.line_start = end;
            i = end;
        }
        None
    }

    /// At the end of the stream: a final CR ends its line (no CRLF can follow).
    fn finish(&mut self) -> Vec<(Bytes, Option<String>)> {
        let mut out = Vec::new();
        if self.buf.ends_with(b"\r") {
            self.buf.extend_from_slice(b"\n");
            while let Some(e) = self.next_event() {
                out.push(e);
            }
        }
        out
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

/// Longest id remembered (a longer one cannot be resumed from or recognised).
const MAX_ID: usize = 256;

/// The last ids forwarded (bounded), and the stream's last event id.
#[derive(Default)]
struct SentIds {
    order: VecDeque<String>,
    set: HashSet<String>,
    /// The last event id as the spec keeps it: an empty `id` resets it, a too long
    /// one leaves nothing to resume from.
    last: Option<String>,
}

impl SentIds {
    /// An id field was read (forwarded or not): it is the stream's last id now.
    fn seen(&mut self, id: &str) {
        self.last = (!id.is_empty() && id.len() <= MAX_ID).then(|| id.to_owned());
    }

    fn remember(&mut self, id: String) {
        if id.is_empty() || id.len() > MAX_ID || self.set.contains(&id) {
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
        self.last.as_deref()
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
    fn a_final_cr_ends_the_last_event_and_a_bom_is_dropped() {
        let mut e = Events::default();
        e.push(b"\xEF\xBB\xBFid: 1\rdata: a\r\rid: 2\rdata: b\r\r");
        let (first, id) = e.next_event().unwrap();
        assert_eq!(
            (&first[..], id.as_deref()),
            (&b"id: 1\rdata: a\r\r"[..], Some("1"))
        );
        // The second event's last CR may still be a CRLF's first half: it waits ...
        assert!(e.next_event().is_none());
        // ... until the stream ends.
        let rest = e.finish();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].1.as_deref(), Some("2"));
    }

    #[test]
    fn empty_and_overlong_ids_leave_nothing_to_resume_from() {
        let mut s = SentIds::default();
        s.seen("7");
        assert_eq!(s.last(), Some("7"));
        s.seen("");
        assert_eq!(s.last(), None);
        s.remember(String::new());
        assert!(!s.contains(""));
        let long = "x".repeat(MAX_ID + 1);
        s.seen(&long);
        s.remember(long.clone());
        assert_eq!(s.last(), None);
        assert!(!s.contains(&long));
    }

    #[test]
    fn remembered_ids_are_bounded() {
        let mut s = SentIds::default();
        for i in 0..(REMEMBERED_IDS + 10) {
            s.seen(&i.to_string());
            s.remember(i.to_string());
        }
        assert!(!s.contains("0"));
        assert!(s.contains(&(REMEMBERED_IDS + 9).to_string()));
        assert_eq!(s.last(), Some((REMEMBERED_IDS + 9).to_string().as_str()));
        assert_eq!(s.order.len(), REMEMBERED_IDS);
    }
}
