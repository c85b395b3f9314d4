//! `examples/bff.yaml`, seed 002's whole BFF, started with the seed's own variable
//! names against a real provider: login, /api proxied with identity headers and
//! /api stripped by host mapping, WebSockets, security headers, the SPA fallback.

use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::idp::{Idp, IdpOptions, CLIENT_SECRET};
use super::login::{to_callback, Browser};
use crate::harness::{client, free_port, Gateway, Upstream, READ_TIMEOUT};

fn example(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

#[tokio::test(flavor = "multi_thread")]
async fn bff_example_with_the_seeds_variables() {
    let (port, idp_port) = (free_port(), free_port());
    let base = format!("http://127.0.0.1:{port}");
    let idp = Idp::start(
        idp_port,
        &IdpOptions {
            redirect_uris: vec![format!("{base}/login/done")],
            ..Default::default()
        },
    );
    let default = Upstream::echo().await;
    let a = Upstream::ws_echo().await;
    let b = Upstream::echo().await;
    let listen = format!("127.0.0.1:{port}");
    let issuer = idp.issuer();
    let (du, au, bu) = (default.url(), a.url(), b.url());
    let env = [
        ("PORTCULLIS_LISTEN", listen.as_str()),
        ("PORTCULLIS_ADMIN_LISTEN", "127.0.0.1:0"),
        ("APP_BASE_URL", base.as_str()),
        ("OIDC_ISSUER", issuer.as_str()),
        ("OIDC_CLIENT_ID", "portcullis"),
        ("OIDC_CLIENT_SECRET", CLIENT_SECRET),
        ("OIDC_REDIRECT_PATH", "/login/done"),
        ("TOKEN_REFRESH_SKEW_SECONDS", "30"),
        ("SESSION_COOKIE_NAME", "bff_sid"),
        ("SESSION_COOKIE_SECURE", "false"),
        ("SESSION_COOKIE_SAMESITE", "Strict"),
        (
            "SESSION_ENCRYPTION_KEY",
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        ),
        ("ALLOWED_ORIGINS", "http://localhost:5173"),
        ("DEFAULT_BACKEND", du.as_str()),
        ("BACKEND_A_URL", au.as_str()),
        ("BACKEND_B_URL", bu.as_str()),
    ];
    let gw = Gateway::start_file(&example("bff.yaml"), &env);

    // The SPA, public, with its fallback and the security headers.
    let res = client()
        .get(format!("{base}/settings/profile"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", gw.logs());
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    assert_eq!(res.headers()["cross-origin-resource-policy"], "same-site");
    assert!(res.text().await.unwrap().contains("Single-page app"));
    // /api needs a session.
    let res = client()
        .get(format!("{base}/api/v1/users"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    let browser = Browser::default();
    let res = browser
        .get(&format!("{base}/auth/login?next=/settings"), &[])
        .await;
    assert_eq!(res.status(), 302, "{}", gw.logs());
    let authorize = res.headers()["location"].to_str().unwrap().to_owned();
    let callback = to_callback(&browser, &authorize, &format!("{base}/login/done"), "alice").await;
    let res = browser.get(&callback, &[]).await;
    assert_eq!(res.status(), 302, "{}", gw.logs());
    assert_eq!(res.headers()["location"], format!("{base}/settings"));
    let cookie = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("bff_sid="))
        .expect("the seed's cookie name");
    assert!(
        cookie.contains("SameSite=Strict") && !cookie.contains("Secure"),
        "{cookie}"
    );
    let sid = browser.cookie("bff_sid").unwrap();
    let session = format!("bff_sid={sid}");

    // The default backend, /api stripped, the user's identity.
    let res = client()
        .get(format!("{base}/api/v1/users"))
        .header("cookie", &session)
        .header("x-user-sub", "admin")
        .send()
        .await
        .unwrap();
    let echo: serde_json::Value = res.json().await.unwrap();
    assert_eq!(echo["path"], "/v1/users");
    assert_eq!(echo["headers"]["x-user-sub"], serde_json::json!(["alice"]));
    assert_eq!(
        echo["headers"]["x-user-email"],
        serde_json::json!(["alice@example.test"])
    );
    // mappings[1]: api.example.com with /v2.
    let res = client()
        .get(format!("{base}/api/v2/things"))
        .header("host", "api.example.com")
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    let echo: serde_json::Value = res.json().await.unwrap();
    assert_eq!(echo["path"], "/v2/things");
    // mappings[0]: app.example.com, a WebSocket with the app's Origin.
    let mut req = format!("ws://127.0.0.1:{port}/api/live")
        .into_client_request()
        .unwrap();
    for (k, v) in [
        ("host", "app.example.com"),
        ("cookie", session.as_str()),
        ("origin", "https://app.example.com"),
    ] {
        req.headers_mut().insert(k, v.parse().unwrap());
    }
    let (_ws, res) = tokio::time::timeout(READ_TIMEOUT, tokio_tungstenite::connect_async(req))
        .await
        .expect("in time")
        .expect("handshake");
    assert_eq!(res.status(), 101);
    let seen: serde_json::Value =
        serde_json::from_str(res.headers()["x-seen-headers"].to_str().unwrap()).unwrap();
    assert_eq!(seen["x-user-sub"], serde_json::json!(["alice"]));

    // /whoami/me, then logout from the app's origin.
    let me: serde_json::Value = client()
        .get(format!("{base}/whoami/me"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["sub"], "alice");
    // The generated endpoints carry the defaults' security headers and CORS: a front
    // end on an allowed origin reads /auth/me with its cookie.
    let res = client()
        .get(format!("{base}/auth/me"))
        .header("cookie", &session)
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(res.headers()["access-control-allow-credentials"], "true");
    let res = client()
        .post(format!("{base}/auth/logout"))
        .header("cookie", &session)
        .header("origin", "http://localhost:5173")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let res = client()
        .get(format!("{base}/api/v1/users"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
}
