//! A tiny, fixed-response HTTP/1.1 keep-alive upstream used by `bench/run.sh`.
//!
//! Usage: `portcullis-bench-upstream --listen 127.0.0.1:PORT`
//!
//! * `GET /64k`          → 200, a fixed 65,536-byte body
//! * `GET` anything else → 200 `text/plain` `hello world\n`
//! * `POST` anything     → the request body is consumed, 200 `ok\n`
//!
//! It runs on a single-threaded tokio runtime so that it costs at most one
//! core and behaves the same for every contender in the benchmark.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const HELLO: &[u8] = b"hello world\n";
const POST_OK: &[u8] = b"ok\n";
const BIG_LEN: usize = 64 * 1024;

const USAGE: &str = "usage: portcullis-bench-upstream --listen ADDR (e.g. 127.0.0.1:18080)";

fn parse_args() -> Result<SocketAddr, String> {
    let mut args = std::env::args().skip(1);
    let mut listen: Option<SocketAddr> = None;
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "--listen" | "-l" => args.next().ok_or_else(|| format!("{arg} needs a value"))?,
            "-h" | "--help" => return Err(String::new()),
            other => match other.strip_prefix("--listen=") {
                Some(v) => v.to_owned(),
                None => return Err(format!("unknown argument: {other}")),
            },
        };
        listen = Some(
            value
                .parse()
                .map_err(|e| format!("invalid --listen address {value:?}: {e}"))?,
        );
    }
    listen.ok_or_else(|| "--listen is required".to_owned())
}

fn text_response(body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

async fn handle(req: Request<Incoming>, big: Bytes) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() == Method::POST {
        // Drain the whole request body; a broken body is answered with 400.
        return Ok(match req.into_body().collect().await {
            Ok(_) => text_response(Bytes::from_static(POST_OK)),
            Err(_) => {
                let mut resp = text_response(Bytes::from_static(b"bad body\n"));
                *resp.status_mut() = StatusCode::BAD_REQUEST;
                resp
            }
        });
    }
    if req.uri().path() == "/json" {
        // Composition benchmarks (bench/compose.sh): parts must answer JSON.
        let mut resp = Response::new(Full::new(Bytes::from_static(br#"{"ok":true}"#)));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return Ok(resp);
    }
    if req.uri().path() == "/64k" {
        let mut resp = Response::new(Full::new(big));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return Ok(resp);
    }
    Ok(text_response(Bytes::from_static(HELLO)))
}

async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let big = Bytes::from(vec![b'x'; BIG_LEN]);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                eprintln!("accept error: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let big = big.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, big.clone()));
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn main() -> ExitCode {
    let addr = match parse_args() {
        Ok(addr) => addr,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("error: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(addr)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}
