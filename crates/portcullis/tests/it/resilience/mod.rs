//! Upstream resilience (issue 8 §2): active and passive health checks, retries and
//! their budget, circuit breakers, down/recovery notifications, `/admin/upstreams`,
//! `/admin/health` and the target gauges — against real upstream servers that can be
//! made unhealthy or killed outright.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::harness::*;

/// An upstream that can be made to fail (`status`) or killed — listener and every
/// open connection closed, as when its process dies. `/health` answers
/// `health_status`; other paths answer `status` with the upstream's name.
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) name: &'static str,
    pub(crate) status: Arc<AtomicU16>,
    pub(crate) health_status: Arc<AtomicU16>,
    pub(crate) requests: Arc<AtomicUsize>,
    pub(crate) health_requests: Arc<AtomicUsize>,
    tasks: Arc<Mutex<tokio::task::JoinSet<()>>>,
}

impl Target {
    pub(crate) async fn start(name: &'static str) -> Target {
        Self::start_on(name, TcpListener::bind("127.0.0.1:0").await.unwrap()).await
    }

    pub(crate) async fn start_on(name: &'static str, listener: TcpListener) -> Target {
        let addr = listener.local_addr().unwrap();
        let t = Target {
            addr,
            name,
            status: Arc::new(AtomicU16::new(200)),
            health_status: Arc::new(AtomicU16::new(200)),
            requests: Arc::new(AtomicUsize::new(0)),
            health_requests: Arc::new(AtomicUsize::new(0)),
            tasks: Arc::new(Mutex::new(tokio::task::JoinSet::new())),
        };
        let (status, health, reqs, hreqs, tasks) = (
            t.status.clone(),
            t.health_status.clone(),
            t.requests.clone(),
            t.health_requests.clone(),
            t.tasks.clone(),
        );
        let accept_tasks = tasks.clone();
        tasks.lock().unwrap().spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (status, health, reqs, hreqs) =
                    (status.clone(), health.clone(), reqs.clone(), hreqs.clone());
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let is_health = req.uri().path() == "/health";
                    let code = if is_health {
                        hreqs.fetch_add(1, Ordering::SeqCst);
                        health.load(Ordering::SeqCst)
                    } else {
                        reqs.fetch_add(1, Ordering::SeqCst);
                        status.load(Ordering::SeqCst)
                    };
                    async move {
                        use http_body_util::BodyExt;
                        // Read the whole body, as a real service would.
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(
                            Response::builder().status(code).body(full(name)).unwrap(),
                        )
                    }
                });
                accept_tasks.lock().unwrap().spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        t
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes the listener and every connection.
    pub(crate) fn kill(&self) {
        self.tasks.lock().unwrap().abort_all();
    }

    /// Listens again on the same port (after [`Target::kill`]).
    pub(crate) async fn revive(self) -> Target {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot listen again: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        Self::start_on(self.name, listener).await
    }
}

fn group_yaml(targets: &[&Target], extra: &str, route_extra: &str) -> String {
    let list: Vec<String> = targets
        .iter()
        .map(|t| format!("{{url: \"{}\"}}", t.url()))
        .collect();
    format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
admin: {{address: "127.0.0.1:0", token: "admin-S3cret-token"}}
upstreams:
  app:
    targets: [{}]
{extra}
routes:
  - path_prefix: /
    proxy:
      upstream: app
{route_extra}
"#,
        list.join(", ")
    )
}

async fn admin_json(gw: &Gateway, path: &str) -> serde_json::Value {
    client()
        .get(gw.admin_url(path))
        .bearer_auth("admin-S3cret-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until `/admin/health` shows `url` with `status` (fails after 20 s).
async fn wait_status(gw: &Gateway, url: &str, status: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = admin_json(gw, "/admin/health").await;
        if v[url]["status"] == status {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never became {status}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
#[tokio::test]
async fn resilience_config_mistakes_are_refused() {
    for (yaml, needle) in [
        (
            "upstreams:\n  app:\n    url: http://127.0.0.1:1\n    breaker: {failures: 2}\nroutes:\n  - path_prefix: /\n    proxy: {upstream: app}\n",
            "list the URL under `targets`",
        ),
        (
            "upstreams:\n  app:\n    targets: [{url: \"http://127.0.0.1:1\"}]\nroutes:\n  - path_prefix: /\n    proxy: {upstream: app, retries: {on: [404]}}\n",
            "expected connect, reset, timeout or a 5xx status",
        ),
        (
            "upstreams:\n  app:\n    targets: [{url: \"http://127.0.0.1:1\"}]\nroutes:\n  - path_prefix: /\n    proxy: {upstream: app, retries: {attempts: 0}}\n",
            "attempts",
        ),
        (
            "upstreams:\n  app:\n    targets: [{url: \"http://127.0.0.1:1\"}]\n    health: {active: {path: health, interval: 0s}}\nroutes:\n  - path_prefix: /\n    proxy: {upstream: app}\n",
            "health.active.path",
        ),
        (
            "upstreams:\n  app:\n    targets: [{url: \"http://127.0.0.1:1\"}]\nnotifications:\n  webhooks: [{url: \"ftp://x\"}]\nroutes:\n  - path_prefix: /\n    proxy: {upstream: app}\n",
            "notifications.webhooks[0].url",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(
            dir.path(),
            &format!("listeners: [{{address: \"127.0.0.1:0\"}}]\n{yaml}"),
        );
        let (code, out, err) = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
        assert_ne!(code, 0, "accepted: {yaml}");
        assert!(
            err.contains(needle) || out.contains(needle),
            "{needle:?} not in:\n{err}{out}"
        );
    }
}

mod breakers;
mod health;
mod retries;
