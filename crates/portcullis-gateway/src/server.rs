//! Listeners: accept, TLS, HTTP/1.1 + HTTP/2, graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::service::{handle, ConnInfo};
use crate::telemetry::ListenerLabels;
use crate::tls::SnapshotCertResolver;
use crate::Shared;

/// Runs every listener until `shutdown` resolves, then drains in-flight requests for
/// up to the configured grace period. The main listeners stop accepting at once; the
/// admin listener keeps answering (health, `/readyz` with 503, metrics) until the
/// drain is over, so the not-ready state can be observed.
pub async fn run(
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
    workers: crate::workers::Workers,
) -> std::io::Result<()> {
    let workers = Arc::new(workers);
    let snapshot = shared.snapshot.load_full();
    // Every connection task holds a sender; when all are gone, draining is done.
    let (alive_tx, mut alive_rx) = tokio::sync::mpsc::channel::<()>(1);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut accept_loops = Vec::new();

    // Reload triggers first, so a change made right after "listening" is never missed.
    crate::reload::spawn_sighup(shared.clone());
    crate::memory::spawn_trimmer(shared.clone(), shared.max_connections);
    let _watcher = if snapshot.config.server.watch_config.0 {
        crate::reload::spawn_file_watch(shared.clone())
    } else {
        None
    };

    for spec in &snapshot.listeners {
        let listener = TcpListener::bind(&spec.address).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {} ({}): {e}", spec.address, spec.name),
            )
        })?;
        let local = listener.local_addr()?;
        tracing::info!(listener = %spec.name, address = %local, tls = spec.tls, "listening");
        let tls = if spec.tls {
            let resolver = Arc::new(SnapshotCertResolver {
                shared: shared.clone(),
                listener: spec.name.clone(),
            });
            let config = crate::tls::server_config(resolver).map_err(std::io::Error::other)?;
            Some(TlsAcceptor::from(Arc::new(config)))
        } else {
            None
        };
        let ctx = ListenerCtx {
            shared: shared.clone(),
            name: Arc::from(spec.name.as_str()),
            tls,
            h2c: spec.h2c,
            stop: stop_rx.clone(),
            alive: alive_tx.clone(),
            workers: workers.clone(),
        };
        accept_loops.push(tokio::spawn(accept_loop(listener, ctx, stop_rx.clone())));
    }

    // The admin listener has its own stop signal and its own drain: its connections
    // (probes, scrapers) neither hold up the main drain nor end before it.
    let (admin_stop_tx, admin_stop_rx) = tokio::sync::watch::channel(false);
    let (admin_alive_tx, mut admin_alive_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut admin_loop = None;
    if let Some(admin) = &snapshot.admin {
        let listener = TcpListener::bind(&admin.address).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {} (admin): {e}", admin.address),
            )
        })?;
        tracing::info!(listener = "admin", address = %listener.local_addr()?, "listening");
        admin_loop = Some(tokio::spawn(crate::admin::serve(
            listener,
            shared.clone(),
            admin_stop_rx,
            admin_alive_tx.clone(),
        )));
    }

    shared.set_ready(true);
    drop(snapshot);

    shutdown.await;
    tracing::info!("shutting down: no longer accepting connections");
    shared.set_ready(false);
    let _ = stop_tx.send(true);
    for handle in accept_loops {
        let _ = handle.await;
    }
    let grace = shared.snapshot.load().shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    drop(alive_tx);
    match tokio::time::timeout_at(deadline, alive_rx.recv()).await {
        Ok(_) => tracing::info!("all connections drained"),
        Err(_) => {
            tracing::warn!(grace = ?grace, "grace period over; closing remaining connections")
        }
    }
    // Now the admin listener: its in-flight requests may finish within what is left
    // of the grace period.
    let _ = admin_stop_tx.send(true);
    if let Some(handle) = admin_loop {
        let _ = handle.await;
    }
    drop(admin_alive_tx);
    let _ = tokio::time::timeout_at(deadline, admin_alive_rx.recv()).await;
    Ok(())
}

struct ListenerCtx {
    shared: Arc<Shared>,
    name: Arc<str>,
    tls: Option<TlsAcceptor>,
    h2c: bool,
    stop: tokio::sync::watch::Receiver<bool>,
    alive: tokio::sync::mpsc::Sender<()>,
    workers: Arc<crate::workers::Workers>,
}

/// Accepts connections until `stop`; `EMFILE` and friends back off instead of
/// spinning. Shared with the admin listener.
pub async fn accept(
    listener: &TcpListener,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => return Some(x),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return None,
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: ListenerCtx,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let ctx = Arc::new(ctx);
    while let Some((stream, peer)) = accept(&listener, &mut stop).await {
        // Beyond max_connections a connection is closed at once: the client learns
        // immediately, and the accept loop never spins on a full fd table.
        let Ok(slot) = ctx.shared.connection_slots.clone().try_acquire_owned() else {
            ctx.shared.metrics.connections_rejected.inc();
            tracing::debug!(peer = %peer, "max_connections reached; connection closed");
            drop(stream);
            continue;
        };
        let task_ctx = ctx.clone();
        if !ctx.workers.per_core() {
            tokio::spawn(async move { serve_connection(stream, peer, task_ctx, slot).await });
            continue;
        }
        // The socket moves to the worker's own reactor: its I/O events are handled
        // on that thread, never on the accepting one.
        let std_stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer = %peer, error = %e, "cannot hand the connection over");
                continue;
            }
        };
        ctx.workers.spawn(async move {
            match TcpStream::from_std(std_stream) {
                Ok(stream) => serve_connection(stream, peer, task_ctx, slot).await,
                Err(e) => {
                    tracing::debug!(peer = %peer, error = %e, "cannot register the connection")
                }
            }
        });
    }
}

/// Requests in flight on one connection and when that last changed: a connection
/// with none for its deadline is closed.
pub struct ConnActivity {
    start: tokio::time::Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
    served: AtomicBool,
}

impl Default for ConnActivity {
    fn default() -> Self {
        ConnActivity {
            start: tokio::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            served: AtomicBool::new(false),
        }
    }
}

impl ConnActivity {
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Relaxed);
        InFlight(self.clone(), false)
    }

    /// A request is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    fn touch(&self, now: tokio::time::Instant) {
        let ms = now.saturating_duration_since(self.start).as_millis() as u64;
        self.last_ms.store(ms, Ordering::Release);
    }

    /// Resolves once the connection has had no request in flight for `idle`
    /// (`first` until its first request).
    pub async fn idle(&self, first: Duration, idle: Duration) {
        loop {
            let limit = if self.served.load(Ordering::Relaxed) {
                idle
            } else {
                first
            };
            // In flight first: a request ending after this load leaves a fresh
            // `last_ms` for the next round.
            let busy = self.busy();
            let silent = self
                .start
                .elapsed()
                .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Acquire)));
            let wait = if busy {
                limit
            } else if silent >= limit {
                return;
            } else {
                limit - silent
            };
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    }
}

/// Why a connection is being closed.
pub enum Close {
    /// Shutdown: finish in-flight requests, then close.
    Drain,
    /// No request in flight for the connection's deadline.
    Idle,
}

/// Watches a connection's shutdown signal and idle deadline in a task of its own;
/// stopped when dropped with the connection.
pub struct Watchdog {
    fired: tokio::sync::oneshot::Receiver<Close>,
    task: tokio::task::JoinHandle<()>,
}

impl Watchdog {
    pub fn spawn(
        mut stop: tokio::sync::watch::Receiver<bool>,
        activity: Arc<ConnActivity>,
        first: Duration,
        idle: Duration,
    ) -> Self {
        let (tx, fired) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let close = tokio::select! {
                _ = stop.wait_for(|s| *s) => Close::Drain,
                _ = activity.idle(first, idle) => Close::Idle,
            };
            let _ = tx.send(close);
        });
        Watchdog { fired, task }
    }

    pub async fn fired(&mut self) -> Close {
        match (&mut self.fired).await {
            Ok(close) => close,
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request in flight; ended with its response body.
pub struct InFlight(Arc<ConnActivity>, bool);

impl InFlight {
    /// Ends the request at `now` (a clock read the caller already made).
    pub fn end_at(mut self, now: std::time::Instant) {
        self.end(tokio::time::Instant::from_std(now));
    }

    fn end(&mut self, now: tokio::time::Instant) {
        if !self.1 {
            self.1 = true;
            self.0.touch(now);
            self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.1 {
            self.end(tokio::time::Instant::now());
        }
    }
}

/// Keeps the open-connections gauge honest however a connection ends.
struct OpenConnection(prometheus_client::metrics::gauge::Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves a connection; on shutdown, lets in-flight requests finish and closes it
/// (HTTP/1: after the current response; HTTP/2: GOAWAY). A connection with no
/// request in flight is closed the same way after `header_read_timeout` if it never
/// sent one (silent clients, a lone `P`, an h2 preface and nothing) and after
/// `server.idle_timeout` otherwise. A macro because the connection type is unnameable.
#[macro_export]
#[doc(hidden)]
macro_rules! drive {
    ($conn:expr, $stop:expr, $peer:expr, $activity:expr, $first:expr, $idle:expr) => {{
        let mut conn = std::pin::pin!($conn);
        // The deadlines are watched by a task of their own, so the connection's
        // every wake-up polls one cheap receiver, not two timers.
        let stop = $stop;
        let mut watchdog =
            $crate::server::Watchdog::spawn(stop.clone(), $activity.clone(), $first, $idle);
        let result = loop {
            tokio::select! {
                result = conn.as_mut() => break result,
                close = watchdog.fired() => match close {
                    $crate::server::Close::Drain => {
                        conn.as_mut().graceful_shutdown();
                        break conn.as_mut().await;
                    }
                    // Decided on another task: a request may have begun since.
                    $crate::server::Close::Idle if $activity.busy() => {
                        watchdog = $crate::server::Watchdog::spawn(
                            stop.clone(),
                            $activity.clone(),
                            $first,
                            $idle,
                        );
                    }
                    $crate::server::Close::Idle => {
                        tracing::debug!(peer = %$peer, "idle connection closed");
                        conn.as_mut().graceful_shutdown();
                        break match tokio::time::timeout($first, conn.as_mut()).await {
                            Ok(result) => result,
                            Err(_) => Ok(()),
                        };
                    }
                },
            }
        };
        if let Err(e) = result {
            tracing::debug!(peer = %$peer, error = %e, "connection error");
        }
    }};
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    /// HTTP/1.1, or HTTP/2 when the client starts with the h2 preface (h2c).
    Auto,
}

/// Serves `io` with the hyper connection type for `mode`.
macro_rules! serve {
    ($ctx:expr, $io:expr, $info:expr, $mode:expr, $header_timeout:expr, $idle:expr, $peer:expr) => {{
        let shared = $ctx.shared.clone();
        let info = $info;
        let activity = info.activity.clone();
        // Not boxed: hyper's HTTP/1 dispatcher already keeps the in-flight future in
        // a box of its own (measured: boxing it again saved no memory per
        // connection, bench/connections.sh).
        let service = service_fn(move |req| handle(shared.clone(), info.clone(), req));
        match $mode {
            Protocol::Http1 => {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout($header_timeout)
                    .keep_alive(true);
                drive!(
                    b.serve_connection($io, service).with_upgrades(),
                    $ctx.stop.clone(),
                    $peer,
                    activity,
                    $header_timeout,
                    $idle
                );
            }
            Protocol::Http2 => {
                let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                b.timer(TokioTimer::new())
                    .keep_alive_interval(Some(Duration::from_secs(30)))
                    .keep_alive_timeout(Duration::from_secs(20));
                drive!(
                    b.serve_connection($io, service),
                    $ctx.stop.clone(),
                    $peer,
                    activity,
                    $header_timeout,
                    $idle
                );
            }
            Protocol::Auto => {
                let mut b = auto::Builder::new(TokioExecutor::new());
                b.http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout($header_timeout)
                    .keep_alive(true);
                b.http2()
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Some(Duration::from_secs(30)))
                    .keep_alive_timeout(Duration::from_secs(20));
                drive!(
                    b.serve_connection_with_upgrades($io, service),
                    $ctx.stop.clone(),
                    $peer,
                    activity,
                    $header_timeout,
                    $idle
                );
            }
        }
    }};
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerCtx>,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    // Released when the connection ends, unless a tunnel took it over.
    let own_slot = Arc::new(std::sync::Mutex::new(Some(slot)));
    let _alive = ctx.alive.clone();
    let _ = stream.set_nodelay(true);
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let labels = ListenerLabels {
        listener: ctx.name.clone(),
    };
    ctx.shared.metrics.connections.get_or_create(&labels).inc();
    let gauge = ctx
        .shared
        .metrics
        .open_connections
        .get_or_create(&labels)
        .clone();
    gauge.inc();
    let _open = OpenConnection(gauge);

    let snapshot = ctx.shared.snapshot.load();
    let header_timeout = snapshot.header_read_timeout;
    let idle_timeout = snapshot.idle_timeout;
    let stream = SendDeadline::new(stream, snapshot.send_timeout);
    drop(snapshot);
    let activity = Arc::new(ConnActivity::default());
    let tunnels = crate::tunnel::Tunnels {
        slots: ctx.shared.connection_slots.clone(),
        own_slot,
        gauge: _open.0.clone(),
        alive: Some(ctx.alive.clone()),
    };

    match &ctx.tls {
        Some(acceptor) => {
            let tls = match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            // ALPN decides the protocol; a client that negotiated http/1.1 cannot
            // switch to HTTP/2 on the same connection.
            let mode = if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                Protocol::Http2
            } else {
                Protocol::Http1
            };
            let info = Arc::new(ConnInfo::new(peer, local, "https", activity, tunnels));
            serve!(
                ctx,
                TokioIo::new(tls),
                info,
                mode,
                header_timeout,
                idle_timeout,
                peer
            );
        }
        None => {
            let mode = if ctx.h2c {
                Protocol::Auto
            } else {
                Protocol::Http1
            };
            let info = Arc::new(ConnInfo::new(peer, local, "http", activity, tunnels));
            serve!(
                ctx,
                TokioIo::new(stream),
                info,
                mode,
                header_timeout,
                idle_timeout,
                peer
            );
        }
    }
}

/// A client socket whose writes must make progress: a client that stops reading (so
/// a response can never be delivered) is cut after `server.send_timeout` instead of
/// holding its connection slot and an upstream connection forever.
pub struct SendDeadline<T> {
    io: T,
    timeout: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<T> SendDeadline<T> {
    pub fn new(io: T, timeout: Duration) -> Self {
        SendDeadline {
            io,
            timeout,
            stalled: None,
        }
    }

    fn progress<R>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<R>>,
    ) -> std::task::Poll<std::io::Result<R>> {
        use std::task::Poll;
        match polled {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let stalled = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if stalled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "client stopped reading",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for SendDeadline<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for SendDeadline<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.io).poll_write(cx, buf);
        this.progress(cx, polled)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.progress(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.io).poll_flush(cx);
        this.progress(cx, polled)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
