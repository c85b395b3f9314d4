//! Upstream HTTP clients: our own connection pools on `hyper::client::conn`,
//! HTTP/1.1 and HTTP/2 (h2c or ALPN), resolving names through [`crate::dns`]
//! (cached, coalesced, off the blocking pool) and, for templated upstreams, only to
//! addresses their route's targets permit.
//!
//! - A request is sent from the caller's task: no boxed future, no task hop. Each
//!   connection has one task driving it, on the worker that opened it; a request
//!   uses its own worker's connections (see [`pool`]).
//! - HTTP/1: an idle connection goes back to its target's pool when the response body
//!   ends (an unfinished body closes it); a `101 Switching Protocols` never does.
//! - HTTP/2: one connection carries up to `http2_max_streams` requests at once; the
//!   next one opens another connection.
//! - Per target: at most `pool_max_idle` idle HTTP/1 connections, none idle longer
//!   than `pool_idle_timeout` (a reaper closes them without traffic), at most
//!   `pool_max_connections` in all; at that cap a request waits for one until the
//!   connect timeout, then fails as overloaded.
//! - A request the connection never started to send (it closed under us) is sent
//!   once more on a new connection; one that may have reached the upstream is not.
//!
//! Clients are shared across config reloads when their settings are unchanged, so a
//! reload keeps warm connection pools.

mod connect;
mod pool;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portcullis_config::{UpstreamConfig, UpstreamProtocol};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::body::{Body, BoxError};
use crate::dns::Resolver;
use crate::targets::TargetRules;

pub use connect::ConnectError;
use pool::{Checkout, Conn, Key, Proto};

/// Targets one client pools connections for (templated upstreams make them from
/// client input); idle ones are evicted first.
const MAX_TARGETS: usize = 1024;
/// Workers whose connections are kept apart (more share the last stack).
const MAX_WORKER: usize = 255;
/// Fastest reaper tick.
const REAP_MIN: Duration = Duration::from_millis(10);

type Tx1 = http1::SendRequest<Body>;
type Tx2 = http2::SendRequest<Body>;
type Pool = pool::Pool<Tx1, Tx2>;
type Target = pool::Target<Tx1, Tx2>;
type Slot = pool::Slot<Tx1, Tx2>;
type Stream = pool::Stream<Tx1, Tx2>;

impl Conn for Tx1 {
    fn is_closed(&self) -> bool {
        http1::SendRequest::is_closed(self)
    }
}

impl Conn for Tx2 {
    fn is_closed(&self) -> bool {
        http2::SendRequest::is_closed(self)
    }
}

/// Everything that makes two upstream clients different.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientSettings {
    pub protocol: UpstreamProtocol,
    pub ca_file: Option<String>,
    pub insecure_skip_verify: bool,
    pub connect_timeout: Duration,
    pub pool: PoolSettings,
    /// Templated upstreams: the addresses their names may resolve to.
    pub targets: Option<Arc<TargetRules>>,
}

/// Connection pool settings, per target (scheme and authority).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolSettings {
    pub idle_timeout: Duration,
    pub max_idle: usize,
    /// Connections in all (idle and busy); at least 1.
    pub max_connections: usize,
    /// Requests in flight on one HTTP/2 connection; at least 1.
    pub http2_max_streams: usize,
}

impl Default for PoolSettings {
    /// The config's defaults (inline `upstream:` URLs).
    fn default() -> Self {
        PoolSettings {
            idle_timeout: portcullis_config::default_pool_idle().get(),
            max_idle: portcullis_config::default_pool_max_idle().0,
            max_connections: portcullis_config::default_pool_max_connections().0,
            http2_max_streams: portcullis_config::default_http2_max_streams().0,
        }
    }
}

impl PoolSettings {
    /// A named upstream's settings, or the defaults (inline URLs). `Err`: the field
    /// and why its value is refused.
    pub fn of(upstream: Option<&UpstreamConfig>) -> Result<Self, (&'static str, &'static str)> {
        let Some(u) = upstream else {
            return Ok(PoolSettings::default());
        };
        // Zero would refuse every request.
        if u.pool_max_connections.0 == 0 {
            return Err(("pool_max_connections", "must be at least 1"));
        }
        if u.http2_max_streams.0 == 0 {
            return Err(("http2_max_streams", "must be at least 1"));
        }
        Ok(PoolSettings {
            idle_timeout: u.pool_idle_timeout.get(),
            max_idle: u.pool_max_idle.0,
            max_connections: u.pool_max_connections.0,
            http2_max_streams: u.http2_max_streams.0,
        })
    }
}

/// Builds clients and hands out the same one for the same settings.
pub struct ClientRegistry {
    resolver: Arc<Resolver>,
    clients: Mutex<HashMap<ClientSettings, UpstreamClient>>,
}

impl ClientRegistry {
    pub fn new(resolver: Arc<Resolver>) -> Self {
        ClientRegistry {
            resolver,
            clients: Mutex::new(HashMap::new()),
        }
    }

    pub fn client(&self, settings: &ClientSettings) -> Result<UpstreamClient, String> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| "client registry poisoned")?;
        if let Some(c) = clients.get(settings) {
            return Ok(c.clone());
        }
        let client = UpstreamClient::new(settings, self.resolver.clone())?;
        clients.insert(settings.clone(), client.clone());
        Ok(client)
    }

    /// Drops clients no snapshot uses any more (in-flight requests keep their clone;
    /// idle connections close with the last one).
    pub fn retain(&self, used: &[ClientSettings]) {
        if let Ok(mut clients) = self.clients.lock() {
            clients.retain(|k, _| used.contains(k));
        }
    }
}

/// A pooled upstream client; clones share the pools.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    connector: connect::Connector,
    protocol: UpstreamProtocol,
    connect_timeout: Duration,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// The reaper starts with the first connection (`check` builds clients it never uses).
    reaper: std::sync::Once,
}

impl UpstreamClient {
    fn new(settings: &ClientSettings, resolver: Arc<Resolver>) -> Result<Self, String> {
        let mut tls = crate::tls::client_config(settings)?;
        tls.alpn_protocols = connect::alpn(settings.protocol);
        let h1 = http1::Builder::new();
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .adaptive_window(true)
            // Pings only while requests are in flight: a dead connection fails them
            // instead of leaving them to the response timeout.
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        let limits = pool::Limits {
            idle_timeout: settings.pool.idle_timeout,
            max_idle: settings.pool.max_idle,
            max_connections: settings.pool.max_connections.max(1),
            max_streams: settings.pool.http2_max_streams.max(1),
            max_targets: MAX_TARGETS,
        };
        Ok(UpstreamClient {
            inner: Arc::new(Inner {
                pool: Pool::new(limits),
                connector: connect::Connector {
                    resolver,
                    rules: settings.targets.clone(),
                    tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
                },
                protocol: settings.protocol,
                connect_timeout: settings.connect_timeout,
                h1,
                h2,
                reaper: std::sync::Once::new(),
            }),
        })
    }

    /// Requests waiting for a connection to `authority` (the total cap, or an HTTP/2
    /// connection being opened).
    pub fn pending(&self, authority: &Authority) -> usize {
        self.inner.pool.pending(authority)
    }

    /// Connections open to `authority`: connecting, idle and busy.
    pub fn open(&self, authority: &Authority) -> usize {
        self.inner.pool.open(authority)
    }

    /// Sends `req` (absolute URI; `Host` only when the route preserves the client's)
    /// on a pooled or new connection and returns the response head.
    pub async fn request(
        &self,
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let inner = &*self.inner;
        let key = match (req.uri().scheme(), req.uri().authority()) {
            (Some(s), Some(a)) if *s == Scheme::HTTP || *s == Scheme::HTTPS => Key {
                https: *s == Scheme::HTTPS,
                authority: a.clone(),
            },
            _ => {
                return Err(UpstreamError::new(
                    ErrorKind::Request,
                    false,
                    "not an http(s) URL",
                ))
            }
        };
        let proto = match (key.https, inner.protocol) {
            (_, UpstreamProtocol::Http2) => Proto::Http2,
            (true, UpstreamProtocol::Auto) => Proto::Negotiated,
            _ => Proto::Http1,
        };
        let Some(target) = inner.pool.target(&key) else {
            return Err(UpstreamError::new(
                ErrorKind::Overloaded,
                false,
                "too many upstream targets in use",
            ));
        };
        // Connections are driven by the runtime that opened them: this worker's.
        let worker = crate::workers::current().min(MAX_WORKER);
        let mut now = Instant::now();
        let mut deadline = now + inner.connect_timeout;
        // Set once a request came back unsent: the second try is the last.
        let mut retried = false;
        loop {
            let conn = match target.checkout(proto, retried, worker, now, deadline).await {
                Ok(Checkout::Http1(mut tx, home)) => {
                    // Ready at once unless it closed since it was pooled.
                    if tx.ready().await.is_err() {
                        continue;
                    }
                    Sender::Http1(tx, home)
                }
                Ok(Checkout::Http2(tx, stream)) => Sender::Http2(tx, stream),
                Ok(Checkout::Connect(connecting)) => {
                    self.start_reaper();
                    // Boxed: per connection, and it keeps every request's future small.
                    let connect = Box::pin(self.connect(&key, connecting, worker, deadline));
                    match tokio::time::timeout_at(deadline, connect).await {
                        Ok(Ok(sender)) => sender,
                        Ok(Err(e)) => return Err(UpstreamError::connect(e)),
                        Err(_) => return Err(UpstreamError::connect(ConnectError::TimedOut)),
                    }
                }
                Err(pool::Waited::Overloaded) => {
                    return Err(UpstreamError::new(
                        ErrorKind::Overloaded,
                        false,
                        "every connection to the upstream is busy",
                    ))
                }
                Err(pool::Waited::Connecting) => {
                    return Err(UpstreamError::connect(ConnectError::TimedOut))
                }
            };
            let unsent = match conn {
                Sender::Http1(mut tx, home) => {
                    origin_form(&mut req, &target);
                    match tx.try_send_request(req).await {
                        Ok(res) => return Ok(http1_response(res, tx, home, target)),
                        Err(e) => e,
                    }
                }
                Sender::Http2(mut tx, stream) => {
                    absolute_form(&mut req, &key);
                    match tx.try_send_request(req).await {
                        Ok(res) => return Ok(res.map(|b| PooledBody::new(b, Held::Http2(stream)))),
                        Err(e) => e,
                    }
                }
            };
            let mut e = unsent;
            match e.take_message() {
                Some(back) if !retried => {
                    tracing::debug!(upstream = %key.authority, error = %e.error(), "upstream connection closed before the request was sent; retrying once");
                    req = back;
                    retried = true;
                    // The first try failed at once; the retry gets a whole connect timeout.
                    now = Instant::now();
                    deadline = now + inner.connect_timeout;
                }
                back => {
                    let sent = back.is_none();
                    return Err(UpstreamError {
                        kind: ErrorKind::Request,
                        sent,
                        source: Some(Box::new(e.into_error())),
                    });
                }
            }
        }
    }

    fn start_reaper(&self) {
        self.inner.reaper.call_once(|| {
            let every = (self.inner.pool.limits().idle_timeout / 2)
                .min(Duration::from_secs(1))
                .max(REAP_MIN);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(reap(Arc::downgrade(&self.inner), every));
            }
        });
    }

    /// A new connection, its task spawned; HTTP/2 ones join the target's pool.
    async fn connect(
        &self,
        key: &Key,
        connecting: pool::Connecting<Tx1, Tx2>,
        worker: usize,
        deadline: Instant,
    ) -> Result<Sender, ConnectError> {
        let inner = &*self.inner;
        let (stream, h2) = match inner.connector.connect(key, deadline).await? {
            connect::Stream::Plain(tcp) => (tcp, inner.protocol == UpstreamProtocol::Http2),
            connect::Stream::Tls(tls, h2) => {
                if inner.protocol == UpstreamProtocol::Http2 && !h2 {
                    return Err(ConnectError::NoH2);
                }
                return self.handshake(*tls, h2, connecting, worker).await;
            }
        };
        self.handshake(stream, h2, connecting, worker).await
    }

    async fn handshake<I>(
        &self,
        io: I,
        h2: bool,
        connecting: pool::Connecting<Tx1, Tx2>,
        worker: usize,
    ) -> Result<Sender, ConnectError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        if h2 {
            let (tx, conn) = self
                .inner
                .h2
                .handshake(io)
                .await
                .map_err(ConnectError::Handshake)?;
            let Some((slot, stream)) = connecting.http2(tx.clone()) else {
                return Err(ConnectError::TimedOut);
            };
            spawn_conn(conn, slot);
            Ok(Sender::Http2(tx, stream))
        } else {
            let (tx, conn) = self
                .inner
                .h1
                .handshake(io)
                .await
                .map_err(ConnectError::Handshake)?;
            let Some(slot) = connecting.http1() else {
                return Err(ConnectError::TimedOut);
            };
            spawn_conn(conn.with_upgrades(), slot);
            Ok(Sender::Http1(tx, worker))
        }
    }
}

enum Sender {
    /// With the worker driving the connection.
    Http1(Tx1, usize),
    Http2(Tx2, Stream),
}

/// Drives one connection until it closes; its place under the cap goes with it.
fn spawn_conn<F>(conn: F, slot: Slot)
where
    F: std::future::Future<Output = hyper::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
        drop(slot);
    });
}

async fn reap(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.pool.sweep();
    }
}

/// HTTP/1 wants origin-form (`/path?q`) and a `Host` (the legacy client's `set_host`).
fn origin_form(req: &mut Request<Body>, target: &Target) {
    if !req.headers().contains_key(HOST) {
        if let Some(host) = &target.host {
            req.headers_mut().insert(HOST, host.clone());
        }
    }
    if req.uri().scheme().is_some() {
        let pq = req.uri().path_and_query().cloned();
        *req.uri_mut() = pq.map(Uri::from).unwrap_or_else(|| Uri::from_static("/"));
    }
    *req.version_mut() = Version::HTTP_11;
}

/// HTTP/2 takes `:scheme` and `:authority` from an absolute URI. hyper would send a
/// `Host` beside `:authority`; a preserved client `Host` becomes the `:authority`
/// instead (RFC 9113 §8.3.1: the two must not differ).
fn absolute_form(req: &mut Request<Body>, key: &Key) {
    let host = req
        .headers_mut()
        .remove(HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok());
    if host.is_some() || req.uri().authority().is_none() {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(if key.https {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        });
        parts.authority = Some(host.unwrap_or_else(|| key.authority.clone()));
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    *req.version_mut() = Version::HTTP_2;
}

fn http1_response(
    res: Response<Incoming>,
    tx: Tx1,
    worker: usize,
    target: Arc<Target>,
) -> Response<PooledBody> {
    // An upgraded connection belongs to the tunnel now; one the upstream closes after
    // this response is not worth keeping.
    let held = if res.status() == StatusCode::SWITCHING_PROTOCOLS
        || res.version() != Version::HTTP_11
        || says_close(res.headers())
    {
        Held::None
    } else {
        Held::Http1(Some((tx, worker, target)))
    };
    res.map(|b| PooledBody::new(b, held))
}

fn says_close(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

/// An upstream response body. When an HTTP/1 body ends, its connection goes back to
/// the pool; an HTTP/2 body holds its stream's place until dropped.
pub struct PooledBody {
    inner: Incoming,
    held: Held,
}

enum Held {
    None,
    Http1(Option<(Tx1, usize, Arc<Target>)>),
    /// Dropped with the body: the stream's place on the connection is free again.
    #[allow(dead_code)]
    Http2(Stream),
}

impl PooledBody {
    fn new(inner: Incoming, held: Held) -> Self {
        PooledBody { inner, held }
    }

    fn give_back(&mut self) {
        if let Held::Http1(conn) = &mut self.held {
            if let Some((tx, worker, target)) = conn.take() {
                give_back(tx, worker, target);
            }
        }
    }
}

/// Pools an HTTP/1 connection whose response is complete, once hyper is ready to send
/// on it again (at once, unless it is still sending the request body: then a small
/// task waits for that).
fn give_back(mut tx: Tx1, worker: usize, target: Arc<Target>) {
    if tx.is_ready() {
        target.put_h1(tx, worker);
    } else if !Conn::is_closed(&tx) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if tx.ready().await.is_ok() {
                    target.put_h1(tx, worker);
                }
            });
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.give_back(),
            // The connection closes with the body.
            Poll::Ready(Some(Err(_))) => this.held = Held::None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body that was complete without being read to its end (no body, or the
        // reader stopped at `is_end_stream`). Anything else closes the connection.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    Connect,
    Overloaded,
    Request,
}

/// Why an upstream request failed. The sources lead to the cause (`io::Error`,
/// `hyper::Error`, and within it a request body's own error).
#[derive(Debug)]
pub struct UpstreamError {
    kind: ErrorKind,
    sent: bool,
    source: Option<BoxError>,
}

impl UpstreamError {
    fn new(kind: ErrorKind, sent: bool, message: &'static str) -> Self {
        UpstreamError {
            kind,
            sent,
            source: Some(message.into()),
        }
    }

    fn connect(e: ConnectError) -> Self {
        UpstreamError {
            kind: ErrorKind::Connect,
            sent: false,
            source: Some(Box::new(e)),
        }
    }

    /// Nothing was sent: DNS, TCP, TLS, the HTTP handshake, or no connection free
    /// within the connect timeout.
    pub fn is_connect(&self) -> bool {
        matches!(self.kind, ErrorKind::Connect | ErrorKind::Overloaded)
    }

    /// Every connection the target may have (`pool_max_connections`) stayed busy for
    /// the whole connect timeout.
    pub fn is_overloaded(&self) -> bool {
        self.kind == ErrorKind::Overloaded
    }

    /// Whether any byte of the request may have reached the upstream.
    pub fn request_sent(&self) -> bool {
        self.sent
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.kind {
            ErrorKind::Connect => "cannot connect to the upstream",
            ErrorKind::Overloaded => "no upstream connection free in time",
            ErrorKind::Request => "upstream request failed",
        })
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
