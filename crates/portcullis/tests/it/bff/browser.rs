//! The end-to-end test of issue 9: headless Chromium (Debian's package, driven by
//! playwright-core) against the gateway and a real provider. The browser opens the
//! SPA, is sent to the provider, logs in, returns, calls `/api/…` and sees its
//! identity echoed by the upstream, opens a WebSocket whose upstream received the
//! identity headers, logs out and is refused afterwards. `scripts/test.sh`
//! installs Chromium and the npm packages; a missing one fails the test.

use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

use super::idp::{node_dir, Idp, IdpOptions, CLIENT_SECRET};
use crate::harness::{free_port, Gateway, Upstream};

/// A WebSocket upstream whose first message is the handshake headers it received
/// (a page's script cannot read a 101's headers); then it echoes.
async fn ws_identity_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = serde_json::Map::new();
                // tungstenite's callback type fixes the (large) error response.
                #[allow(clippy::result_large_err)]
                let callback = |req: &Request, res: Response| {
                    for (k, v) in req.headers() {
                        seen.insert(
                            k.as_str().to_owned(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
                        );
                    }
                    Ok(res)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                let first = serde_json::Value::Object(seen).to_string();
                if ws.send(Message::text(first)).await.is_err() {
                    return;
                }
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_close() || ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

fn chromium() -> &'static str {
    if Path::new("/usr/lib/chromium/chromium").exists() {
        "/usr/lib/chromium/chromium"
    } else {
        "/usr/bin/chromium"
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_browser_logs_in_uses_the_api_and_a_websocket_and_logs_out() {
    assert!(
        Path::new(chromium()).exists(),
        "Chromium is not installed: run scripts/test.sh"
    );
    assert!(
        node_dir().join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run scripts/test.sh"
    );
    let (port, idp_port) = (free_port(), free_port());
    let base = format!("http://127.0.0.1:{port}");
    let idp = Idp::start(
        idp_port,
        &IdpOptions {
            redirect_uris: vec![format!("{base}/auth/callback")],
            ..Default::default()
        },
    );
    let echo = Upstream::echo().await;
    let ws = ws_identity_upstream().await;
    let yaml = format!(
        r#"
listeners:
  - address: 127.0.0.1:{port}
store: {{data_dir: "{{{{dir}}}}/data"}}
authenticators:
  web:
    oidc:
      issuer: "{issuer}"
      client_id: portcullis
      client_secret: {CLIENT_SECRET}
      public_url: "{base}"
      session: {{encryption_key: "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=", cookie_secure: false}}
routes:
  - path_prefix: /api
    auth: {{authenticators: [web]}}
    proxy: {{upstream: "{echo}", strip_prefix: true}}
  - path: /ws
    auth: {{authenticators: [web]}}
    proxy: {{upstream: "{ws}"}}
  - path_prefix: /app
    public: true
    static: {{dir: "{spa}", spa_fallback: true}}
"#,
        issuer = idp.issuer(),
        echo = echo.url(),
        spa = node_dir().join("spa").display(),
    );
    let gw = Gateway::start(&yaml);
    let screenshot = gw.dir.path().join("failure.png");
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(node_dir().join("browser.mjs"))
        .current_dir(node_dir())
        .env("GW_URL", &base)
        .env("USER_NAME", "alice")
        .env("CHROMIUM", chromium())
        .env("SCREENSHOT", &screenshot)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("the browser test took over 90 s")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser steps:\n{stdout}\n{stderr}\nscreenshot: {}\ngateway:\n{}",
        screenshot.display(),
        gw.logs()
    );
    let steps: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let names: Vec<&str> = steps.iter().filter_map(|s| s["step"].as_str()).collect();
    assert_eq!(
        names,
        [
            "anonymous",
            "at_provider",
            "logged_in",
            "api",
            "websocket",
            "logged_out"
        ],
        "{stdout}"
    );
    assert!(steps[1]["url"]
        .as_str()
        .is_some_and(|u| u.starts_with(&idp.issuer())));
    assert_eq!(steps[2]["me"], "user:alice");
    // The provider saw the grant revoked at logout.
    assert!(idp.count("grant.revoked", None) >= 1);
}
