//! Composition (issue 10, §1-2): FnKit's `/orchestrate/<name>` with definitions in the
//! store, YAML-declared pipelines over upstream groups, aggregation of JSON parts.
//!
//! One function server stands in for every FnKit container: the gateway reaches
//! `http://<step>:<port>`, every name resolving to 127.0.0.1 through a hosts file,
//! and the server answers by the name in `Host`.

mod aggregate;
mod declared;
mod stored;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::harness::*;

/// What the function server saw: names called in order, and calls cut short.
#[derive(Default)]
pub struct Calls {
    pub log: Mutex<Vec<String>>,
    pub cancelled: Mutex<Vec<String>>,
}

impl Calls {
    pub fn called(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    pub fn cancelled(&self) -> Vec<String> {
        self.cancelled.lock().unwrap().clone()
    }
    pub fn clear(&self) {
        self.log.lock().unwrap().clear();
    }
}

/// Records a cancelled call when dropped before `done`.
struct CancelGuard {
    calls: Arc<Calls>,
    name: String,
    done: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.done {
            self.calls.cancelled.lock().unwrap().push(self.name.clone());
        }
    }
}

/// The functions, by name:
/// - `upper`: the body upper-cased, as `text/x-upper`;
/// - `wrap`: JSON of what it received (input, content type, method, uri);
/// - `headers`: JSON of its request headers;
/// - `json`: `{"x": 1}`; `text`: `plain text`; `empty`: 200 with no body;
/// - `fail`: 418 `nope`; `big`: 4 KiB; `slow`: answers after 3 s;
/// - `gz`: `zipped` — gzip-compressed when the request accepts gzip (it records
///   whether it was asked, as `gz-asked-gzip`).
pub async fn functions() -> (Upstream, Arc<Calls>) {
    let calls = Arc::new(Calls::default());
    let c = calls.clone();
    let up = Upstream::serve(false, move |req| {
        let c = c.clone();
        async move { function(c, req).await }
    })
    .await;
    (up, calls)
}

async fn function(calls: Arc<Calls>, req: Request<Incoming>) -> Response<BoxBody> {
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let name = host.split(':').next().unwrap_or("").to_owned();
    calls.log.lock().unwrap().push(name.clone());
    let accepts_gzip = req
        .headers()
        .get("accept-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("gzip"));
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let headers = headers_json(req.headers());
    let ct = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let reply = |status: u16, ct: &str, body: Vec<u8>| {
        Response::builder()
            .status(status)
            .header("content-type", ct)
            .body(full(body))
            .unwrap()
    };
    match name.as_str() {
        "upper" => reply(200, "text/x-upper", body.to_ascii_uppercase()),
        "wrap" => {
            let v = serde_json::json!({
                "input": String::from_utf8_lossy(&body),
                "content_type": ct,
                "method": method,
                "uri": uri,
            });
            reply(200, "application/json", v.to_string().into_bytes())
        }
        "headers" => reply(200, "application/json", headers.to_string().into_bytes()),
        "json" => reply(200, "application/json", br#"{"x":1}"#.to_vec()),
        "text" => reply(200, "text/plain", b"plain text".to_vec()),
        "empty" => Response::builder().status(200).body(full("")).unwrap(),
        "fail" => reply(418, "text/plain", b"nope".to_vec()),
        "big" => reply(200, "text/plain", vec![b'x'; 4096]),
        "slow" => {
            let mut guard = CancelGuard {
                calls: calls.clone(),
                name: name.clone(),
                done: false,
            };
            tokio::time::sleep(Duration::from_secs(3)).await;
            guard.done = true;
            reply(200, "text/plain", b"slow done".to_vec())
        }
        "gz" if accepts_gzip => {
            calls.log.lock().unwrap().push("gz-asked-gzip".into());
            use std::io::Write;
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(b"zipped").unwrap();
            Response::builder()
                .header("content-type", "text/plain")
                .header("content-encoding", "gzip")
                .body(full(enc.finish().unwrap()))
                .unwrap()
        }
        "gz" => reply(200, "text/plain", b"zipped".to_vec()),
        _ => reply(404, "text/plain", b"no such function".to_vec()),
    }
}

/// Every function name, mapped to 127.0.0.1; `ghost` to 127.0.0.2, where nothing
/// listens (a stopped container).
pub fn function_hosts(dir: &std::path::Path) -> String {
    let path = dir.join("hosts");
    std::fs::write(
        &path,
        "127.0.0.1 upper wrap headers json text empty fail big slow gz\n127.0.0.2 ghost\n",
    )
    .unwrap();
    path.display().to_string()
}

/// A gateway with `/orchestrate/{pipeline}` over the store at `store_url`
/// (empty: embedded under the gateway's dir), the admin API on, and `extra`
/// appended to the pipeline's settings.
pub fn orchestrator(fn_port: u16, hosts: &str, store_url: &str, extra: &str) -> String {
    format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
admin: {{address: "127.0.0.1:0", token: admin-secret}}
store: {{url: "{store_url}", data_dir: "{{{{dir}}}}/data"}}
server: {{hosts_file: "{hosts}"}}
authenticators:
  svc: {{static_token: {{tokens: [fn-token], principal: svc-user, principal_header: X-Principal}}}}
auth: {{default: [svc]}}
routes:
  - name: orchestrate
    path_prefix: "/orchestrate/{{pipeline}}"
    pipeline:
      from_store: pipeline
      functions:
        upstream: "http://{{step}}:{fn_port}"
        strip_prefix: true
{extra}
"#
    )
}

/// A running orchestrator over its function server (see [`orchestrator`]).
pub struct Setup {
    pub gw: Gateway,
    /// Kept running for the test's length.
    _fns: Upstream,
    pub calls: Arc<Calls>,
    _dir: tempfile::TempDir,
}

pub async fn setup(store_url: &str, extra: &str) -> Setup {
    let (fns, calls) = functions().await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = function_hosts(dir.path());
    let gw = Gateway::start(&orchestrator(fns.addr.port(), &hosts, store_url, extra));
    Setup {
        gw,
        _fns: fns,
        calls,
        _dir: dir,
    }
}

pub async fn put_pipeline(gw: &Gateway, name: &str, body: &str) -> reqwest::Response {
    client()
        .put(gw.admin_url(&format!("/admin/pipelines/{name}")))
        .bearer_auth("admin-secret")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

pub async fn orchestrate(gw: &Gateway, path: &str) -> reqwest::Response {
    client()
        .get(gw.url(path))
        .bearer_auth("fn-token")
        .send()
        .await
        .unwrap()
}
