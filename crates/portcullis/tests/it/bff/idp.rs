//! A real OpenID Connect provider for the tests: `tests/node/idp.mjs` (the npm
//! package oidc-provider) run by node. `scripts/test.sh` installs node and the
//! packages; a missing install fails the test with what to run, it never skips.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The client secret registered in `idp.mjs`.
pub const CLIENT_SECRET: &str = "test-secret-test-secret-test-secret";

/// Options of one provider process (`idp.mjs`'s environment).
#[derive(Default, Clone)]
pub struct IdpOptions {
    pub redirect_uris: Vec<String>,
    pub post_logout_uris: Vec<String>,
    pub client_secret_post: bool,
    pub access_ttl: Option<u64>,
    pub refresh_ttl: Option<u64>,
    pub rotate_refresh: bool,
}

pub struct Idp {
    child: Child,
    pub port: u16,
    events: Arc<Mutex<Vec<serde_json::Value>>>,
}

pub fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/node")
}

impl Idp {
    /// Starts the provider on `port` (pick it first: the gateway's config names the
    /// issuer and the provider the gateway's callback).
    pub fn start(port: u16, opts: &IdpOptions) -> Idp {
        let dir = node_dir();
        assert!(
            dir.join("node_modules/oidc-provider").is_dir(),
            "the test IdP is not installed: run scripts/test.sh (npm ci in {})",
            dir.display()
        );
        let mut cmd = Command::new("node");
        cmd.arg(dir.join("idp.mjs"))
            .current_dir(&dir)
            .env("IDP_PORT", port.to_string())
            .env("RP_REDIRECTS", opts.redirect_uris.join(","))
            .env("POST_LOGOUT", opts.post_logout_uris.join(","))
            .env(
                "AUTH_METHOD",
                if opts.client_secret_post {
                    "client_secret_post"
                } else {
                    "client_secret_basic"
                },
            )
            .env("ROTATE", if opts.rotate_refresh { "1" } else { "0" })
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = opts.access_ttl {
            cmd.env("AT_TTL", t.to_string());
        }
        if let Some(t) = opts.refresh_ttl {
            cmd.env("RT_TTL", t.to_string());
        }
        let mut child = cmd
            .spawn()
            .expect("node is not installed: run scripts/test.sh");
        let stdout = child.stdout.take().expect("idp stdout");
        let stderr = child.stderr.take().expect("idp stderr");
        // Kept for failure messages (node prints its own warnings there).
        let errors = Arc::new(Mutex::new(Vec::new()));
        let err_sink = errors.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                err_sink.lock().expect("stderr").push(line);
            }
        });
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    sink.lock().expect("events").push(v);
                }
            }
        });
        let idp = Idp {
            child,
            port,
            events,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while idp.count("listening", None) == 0 {
            assert!(
                Instant::now() < deadline,
                "the test IdP did not start on port {port}: {}",
                errors.lock().expect("stderr").join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        idp
    }

    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How many events named `event` (with this `grant_type`, when given) it logged.
    pub fn count(&self, event: &str, grant_type: Option<&str>) -> usize {
        self.events
            .lock()
            .expect("events")
            .iter()
            .filter(|e| e["event"] == event)
            .filter(|e| grant_type.is_none_or(|g| e["grant_type"] == g))
            .count()
    }

    /// Every event so far (for failure messages).
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.events.lock().expect("events").clone()
    }

    /// Requests the provider received on `path`.
    pub fn requests_to(&self, path: &str) -> usize {
        self.events
            .lock()
            .expect("events")
            .iter()
            .filter(|e| e["event"] == "request" && e["path"] == path)
            .count()
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
