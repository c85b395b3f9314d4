//! Test harness: starts the real `portcullis` binary on ephemeral ports against real
//! upstreams (small hyper servers) and talks to it over real sockets.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// A running gateway process. Killed on drop.
pub struct Gateway {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// Listener name → bound address (`admin` for the admin listener).
    pub addrs: HashMap<String, SocketAddr>,
    /// Every stdout line (JSON logs) so far.
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    /// Starts the gateway with `yaml` as its config. `{{dir}}` in the YAML is replaced
    /// by the gateway's temp dir.
    pub fn start(yaml: &str) -> Gateway {
        Self::start_with_env(yaml, &[])
    }

    pub fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Gateway {
        Self::start_with_args(yaml, &[], env)
    }

    /// Like `start_with_env`, with extra `portcullis run` arguments (`--workers 3`).
    pub fn start_with_args(yaml: &str, args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("portcullis.yaml");
        std::fs::write(
            &config_path,
            yaml.replace("{{dir}}", &dir.path().display().to_string()),
        )
        .expect("write config");
        Self::spawn(dir, config_path, args, env)
    }

    /// Starts the gateway on an existing config file (e.g. `examples/*.yaml`).
    pub fn start_file(path: &Path, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::spawn(dir, path.to_owned(), &[], env)
    }

    fn spawn(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        let mut cmd = Command::new(BIN);
        // Each gateway works in its own directory, so its embedded store (`./data`)
        // is its own.
        cmd.arg("run")
            .arg("-c")
            .arg(&config_path)
            .args(args)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .env_remove("PORTCULLIS_WORKERS")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn portcullis");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    logs.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let mut gw = Gateway {
            child: Some(child),
            dir,
            config_path,
            addrs: HashMap::new(),
            logs,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                        continue;
                    };
                    if v["message"] == "listening" {
                        let name = v["listener"].as_str().unwrap_or("main").to_owned();
                        let addr: SocketAddr = v["address"].as_str().unwrap().parse().unwrap();
                        gw.addrs.insert(name, addr);
                    }
                    if v["message"] == "listening" && v["listener"] == "admin" {
                        // The admin listener binds last.
                        return gw;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = gw.child.as_mut().unwrap().try_wait().unwrap() {
                        panic!("gateway exited early ({status}):\n{}", gw.logs());
                    }
                    // Without an admin listener, the last "listening" line is enough
                    // once things go quiet.
                    if !gw.addrs.is_empty() && !gw.addrs.contains_key("admin") {
                        let s = gw.logs();
                        if !s.contains("\"listener\":\"admin\"") && !gw.expects_admin() {
                            return gw;
                        }
                    }
                }
                Err(_) => break,
            }
        }
        panic!("gateway did not start:\n{}", gw.logs());
    }

    fn expects_admin(&self) -> bool {
        std::fs::read_to_string(&self.config_path)
            .map(|s| s.lines().any(|l| l.starts_with("admin:")))
            .unwrap_or(false)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs["main"]
    }

    pub fn admin(&self) -> SocketAddr {
        self.addrs["admin"]
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin(), path)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits until a log line containing `needle` appears.
    /// The admin listener's metrics page.
    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The admin metrics page once it contains every one of `lines` (fails after 30 s).
    pub async fn wait_metrics(&self, lines: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.metrics().await;
            if lines.iter().all(|l| text.contains(l)) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "metrics never showed {lines:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.logs().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends `sig` (`libc::SIGHUP`, `libc::SIGTERM`, …) to the gateway process.
    pub fn signal(&self, sig: libc::c_int) {
        send_signal(self.pid(), sig);
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.terminate_wait()
    }

    /// Waits (up to 30 s) for the process to exit after a SIGTERM already sent.
    pub fn terminate_wait(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("gateway did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident set size of the gateway process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Rewrites the config file in place (write to a temp file, then rename, as editors do).
    pub fn rewrite_config(&self, yaml: &str) {
        let tmp = self.config_path.with_extension("yaml.tmp");
        std::fs::write(
            &tmp,
            yaml.replace("{{dir}}", &self.dir.path().display().to_string()),
        )
        .unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `sig` to process `pid` with kill(2) (no `kill` binary needed).
pub fn send_signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// Runs `portcullis <args>` to completion: (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run portcullis");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn write_config(dir: &Path, yaml: &str) -> PathBuf {
    let p = dir.join("config.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

// ---------------------------------------------------------------------------------
// Upstreams

pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).boxed()
}

/// A test upstream server. Counts the TCP connections it accepted and the requests
/// whose head it received.
pub struct Upstream {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until the upstream has received `n` requests in all (fails after 10 s).
    pub async fn wait_requests(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.requests.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "the upstream received {} of {n} requests",
                self.requests.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Echo: answers every request with JSON describing it:
    /// `{"method","uri","path","query","version","headers":{name:[values]},"body_len"}`.
    /// `?download=N` streams N bytes instead (in 64 KiB chunks);
    /// `?status=N` answers with that status; `?delay_ms=N` waits first.
    pub async fn echo() -> Upstream {
        Self::serve(false, |req| async move { echo_handler(req).await }).await
    }

    /// Echo over HTTP/2 prior knowledge (h2c) only.
    pub async fn echo_h2c() -> Upstream {
        Self::serve(true, |req| async move { echo_handler(req).await }).await
    }

    /// Server-sent events: `count` events `data: N`, one every `interval`.
    pub async fn sse(count: usize, interval: Duration) -> Upstream {
        Self::serve(false, move |_req| async move {
            let stream = futures_util::stream::unfold(0usize, move |i| async move {
                if i >= count {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                let frame = Frame::data(Bytes::from(format!("data: {i}\n\n")));
                Some((Ok::<_, Infallible>(frame), i + 1))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(StreamBody::new(stream).boxed())
                .unwrap()
        })
        .await
    }

    /// Server-sent events `data: 0` … `data: {count-1}` sent one at a time at the
    /// test's command: `data: 0` at once, each later event only after a permit is
    /// added to the returned semaphore. A test that reads event N before allowing
    /// N+1 proves the events are streamed one by one, with no wall-clock bound.
    pub async fn sse_gated(count: usize) -> (Upstream, Arc<tokio::sync::Semaphore>) {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let g = gate.clone();
        let up = Self::serve(false, move |_req| {
            let gate = g.clone();
            async move {
                let stream = futures_util::stream::unfold(0usize, move |i| {
                    let gate = gate.clone();
                    async move {
                        if i >= count {
                            return None;
                        }
                        if i > 0 {
                            gate.acquire().await.ok()?.forget();
                        }
                        let frame = Frame::data(Bytes::from(format!("data: {i}\n\n")));
                        Some((Ok::<_, Infallible>(frame), i + 1))
                    }
                });
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .header("cache-control", "no-cache")
                    .body(StreamBody::new(stream).boxed())
                    .unwrap()
            }
        })
        .await;
        (up, gate)
    }

    /// Accepts WebSocket upgrades and echoes every message back.
    pub async fn ws_echo() -> Upstream {
        Self::serve(false, |mut req| async move {
            use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
            let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
                return Response::builder()
                    .status(400)
                    .body(full("not a websocket"))
                    .unwrap();
            };
            let seen_headers = serde_json::to_string(&headers_json(req.headers())).unwrap();
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                use futures_util::{SinkExt, StreamExt};
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                let (mut tx, mut rx) = ws.split();
                while let Some(Ok(msg)) = rx.next().await {
                    if msg.is_text() || msg.is_binary() {
                        if tx.send(msg).await.is_err() {
                            break;
                        }
                    } else if msg.is_close() {
                        break;
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("upgrade", "websocket")
                .header("connection", "upgrade")
                .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
                .header("x-seen-headers", seen_headers)
                .body(full(""))
                .unwrap()
        })
        .await
    }

    /// Answers every request with a fixed status and body.
    pub async fn fixed(status: u16, body: &'static str) -> Upstream {
        Self::serve(false, move |_req| async move {
            Response::builder()
                .status(status)
                .header("content-type", "text/plain")
                .body(full(body))
                .unwrap()
        })
        .await
    }

    pub async fn serve<F, Fut>(h2_only: bool, handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Response<BoxBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let conns = connections.clone();
        let reqs = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let reqs = reqs.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        reqs.fetch_add(1, Ordering::SeqCst);
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler(req).await) }
                    });
                    let io = TokioIo::new(stream);
                    if h2_only {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .with_upgrades()
                            .await;
                    }
                });
            }
        });
        Upstream {
            addr,
            connections,
            requests,
            task,
        }
    }
}

pub fn headers_json(h: &http::HeaderMap) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for name in h.keys() {
        let values: Vec<serde_json::Value> = h
            .get_all(name)
            .iter()
            .map(|v| serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        map.insert(name.as_str().to_owned(), serde_json::Value::Array(values));
    }
    serde_json::Value::Object(map)
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

async fn echo_handler(req: Request<Incoming>) -> Response<BoxBody> {
    let query = req.uri().query().unwrap_or("").to_owned();
    if let Some(ms) = query_param(&query, "delay_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(n) = query_param(&query, "download").and_then(|v| v.parse::<u64>().ok()) {
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures_util::stream::unfold(n, move |left| {
            let chunk = chunk.clone();
            async move {
                if left == 0 {
                    return None;
                }
                let take = left.min(chunk.len() as u64);
                Some((
                    Ok::<_, Infallible>(Frame::data(chunk.slice(..take as usize))),
                    left - take,
                ))
            }
        });
        return Response::builder()
            .header("content-type", "application/octet-stream")
            .body(StreamBody::new(stream).boxed())
            .unwrap();
    }
    let status = query_param(&query, "status")
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let path = req.uri().path().to_owned();
    let version = format!("{:?}", req.version());
    let headers = headers_json(req.headers());
    // Count the body without holding it.
    let mut body = req.into_body();
    let mut body_len = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    body_len += d.len() as u64;
                }
            }
            Err(_) => break,
        }
    }
    let json = serde_json::json!({
        "method": method, "uri": uri, "path": path, "query": query,
        "version": version, "headers": headers, "body_len": body_len,
    });
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-upstream", "echo")
        .body(full(serde_json::to_vec(&json).unwrap()))
        .unwrap()
}

// ---------------------------------------------------------------------------------
// Clients

/// Connect timeout of every test client: loopback connects are instant, so a hang
/// here is a regression, reported in seconds instead of hanging CI.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole-exchange timeout of `client()` (request, response head and body).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for one read on a long stream (`stream_client()`, WebSockets).
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Installs ring as the process's rustls provider (reqwest is built without one,
/// so that aws-lc-rs is not compiled beside the ring the gateway uses).
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The base of every test client: no proxy, no redirects, a connect timeout and a
/// per-read timeout. Add `.timeout(..)` for a whole-exchange bound.
pub fn client_builder() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
}

/// The default test client: every exchange is over within `REQUEST_TIMEOUT`.
pub fn client() -> reqwest::Client {
    client_builder().timeout(REQUEST_TIMEOUT).build().unwrap()
}

/// For long streamed bodies (hundreds of MiB): no bound on the whole exchange, but
/// every read must make progress within `READ_TIMEOUT`.
pub fn stream_client() -> reqwest::Client {
    client_builder().build().unwrap()
}

/// Opens a TCP connection, failing the test after `CONNECT_TIMEOUT`.
pub async fn tcp_connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .unwrap_or_else(|_| panic!("connect to {addr} timed out"))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A WebSocket handshake that fails the test after `READ_TIMEOUT` instead of hanging.
pub async fn ws_connect(
    url: &str,
) -> Result<
    (
        WsStream,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    tokio::time::timeout(READ_TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .unwrap_or_else(|_| panic!("WebSocket handshake with {url} timed out"))
}

/// The next WebSocket message; fails the test after `READ_TIMEOUT` or at the end of
/// the stream.
pub async fn ws_next(ws: &mut WsStream) -> tokio_tungstenite::tungstenite::Message {
    use futures_util::StreamExt;
    tokio::time::timeout(READ_TIMEOUT, ws.next())
        .await
        .expect("WebSocket message in time")
        .expect("WebSocket still open")
        .expect("WebSocket message")
}

/// Sends a WebSocket message, failing the test after `READ_TIMEOUT`.
pub async fn ws_send(ws: &mut WsStream, msg: tokio_tungstenite::tungstenite::Message) {
    use futures_util::SinkExt;
    tokio::time::timeout(READ_TIMEOUT, ws.send(msg))
        .await
        .expect("WebSocket send in time")
        .expect("WebSocket send");
}

/// Reads `data: N` server-sent events from a response, one at a time, each within
/// `READ_TIMEOUT`.
pub struct SseReader {
    res: reqwest::Response,
    buf: String,
    /// Every byte received so far.
    pub raw: Vec<u8>,
}

impl SseReader {
    pub fn new(res: reqwest::Response) -> SseReader {
        SseReader {
            res,
            buf: String::new(),
            raw: Vec::new(),
        }
    }

    /// The next event's N. Fails if it does not arrive within `READ_TIMEOUT`, or if
    /// it arrives together with the start of the following one.
    pub async fn next_event(&mut self) -> u64 {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                assert!(
                    self.buf.is_empty(),
                    "more than one event at once: {event:?} then {:?}",
                    self.buf
                );
                return event
                    .trim()
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {event:?}"))
                    .parse()
                    .unwrap();
            }
            let chunk = tokio::time::timeout(READ_TIMEOUT, self.res.chunk())
                .await
                .expect("the next event was held back (buffered?)")
                .expect("stream error")
                .expect("stream ended before the event");
            self.raw.extend_from_slice(&chunk);
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Asserts the stream ends cleanly (within `READ_TIMEOUT`) with nothing more.
    pub async fn expect_end(&mut self) {
        let end = tokio::time::timeout(READ_TIMEOUT, self.res.chunk())
            .await
            .expect("stream end in time");
        assert!(
            matches!(end, Ok(None)),
            "stream did not end cleanly: {end:?}"
        );
        assert!(self.buf.is_empty(), "partial event left: {:?}", self.buf);
    }
}

/// A raw HTTP/1.1 exchange, for requests an HTTP client library would "fix"
/// (dot segments, odd encodings). Sends `request` verbatim and reads until close.
pub async fn raw(addr: SocketAddr, request: &str) -> RawResponse {
    let mut stream = tcp_connect(addr).await;
    tokio::time::timeout(READ_TIMEOUT, stream.write_all(request.as_bytes()))
        .await
        .expect("raw request written in time")
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    RawResponse::parse(&buf)
}

/// `GET <target>` with `Connection: close` and optional extra header lines.
pub async fn raw_get(addr: SocketAddr, target: &str, extra: &str) -> RawResponse {
    raw(
        addr,
        &format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n"),
    )
    .await
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    fn parse(buf: &[u8]) -> RawResponse {
        let text = String::from_utf8_lossy(buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let body = if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        };
        RawResponse {
            status,
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// GETs `url` until it answers `status` and returns that response (fails after 10 s).
/// For `/readyz` right after start: the gateway logs "listening" just before it
/// marks itself ready, so a first probe may still see 503.
pub async fn until_status(url: &str, status: u16) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let res = client().get(url).send().await.unwrap();
        if res.status().as_u16() == status {
            return res;
        }
        assert!(
            Instant::now() < deadline,
            "{url} still answers {} instead of {status}",
            res.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts an error envelope: status, code, and a request id.
pub async fn assert_error(res: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(res.status().as_u16(), status, "unexpected status");
    let rid = res
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: serde_json::Value = res.json().await.expect("JSON error body");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["retryable"].is_boolean(), "{body}");
    assert_eq!(
        body["error"]["request_id"].as_str(),
        rid.as_deref(),
        "{body}"
    );
    body
}

/// Runs `portcullis <args>` with `input` on standard input: (exit code, stdout, stderr).
pub fn run_cli_stdin(args: &[&str], env: &[(&str, &str)], input: &str) -> (i32, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run portcullis");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().expect("wait for portcullis");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An upstream address where nothing listens, deterministically: port 1 on loopback
/// (a freed ephemeral port could be taken by a parallel test).
pub fn dead_upstream() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1))
}

/// A port that was free a moment ago (for configs that must name their port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A hosts(5) file mapping each name to 127.0.0.1, for templated upstreams (the
/// gateway refuses `localhost` and address-like names there).
pub fn hosts_file(dir: &Path, names: &[&str]) -> PathBuf {
    let path = dir.join("hosts");
    std::fs::write(&path, format!("127.0.0.1 {}\n", names.join(" "))).expect("hosts file");
    path
}
