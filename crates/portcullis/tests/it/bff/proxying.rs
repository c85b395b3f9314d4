//! Requests a browser session authenticates: WebSockets need the application's
//! Origin (cross-site WebSocket hijacking), unsafe methods too (CSRF), on every
//! session route.

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::login::{login, setup, Browser, APP};
use crate::harness::{assert_error, client, ws_next, ws_send, READ_TIMEOUT};

async fn ws(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        crate::harness::WsStream,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    let mut req = url.into_client_request().expect("ws request");
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    tokio::time::timeout(READ_TIMEOUT, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake in time")
}

fn refused_with(
    r: Result<
        (
            crate::harness::WsStream,
            tokio_tungstenite::tungstenite::handshake::client::Response,
        ),
        tokio_tungstenite::tungstenite::Error,
    >,
) -> (u16, String) {
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            let body: serde_json::Value =
                serde_json::from_slice(res.body().as_deref().unwrap_or_default())
                    .unwrap_or_default();
            (
                res.status().as_u16(),
                body["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        }
        Err(e) => panic!("expected an HTTP refusal, got {e:?}"),
        Ok((_, res)) => panic!("the handshake was accepted: {res:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn session_websockets_need_the_applications_origin() {
    let s = setup("").await;
    let b = Browser::default();
    assert_eq!(login(&s, &b, "alice", "").await.status(), 302);
    let sid = b.cookie("sid").unwrap();
    let cookie = format!("sid={sid}; theme=dark");
    let url = format!("{}/ws", s.base.replace("http://", "ws://"));

    assert_eq!(
        refused_with(ws(&url, &[]).await),
        (401, "UNAUTHORIZED".into())
    );
    for origin in ["https://evil.test", "null", "http://app.example.test:5174"] {
        let r = ws(&url, &[("cookie", &cookie), ("origin", origin)]).await;
        assert_eq!(refused_with(r), (403, "ORIGIN_REJECTED".into()), "{origin}");
    }
    // No Origin at all (not a browser, or a forged request): refused too.
    let r = ws(&url, &[("cookie", &cookie)]).await;
    assert_eq!(refused_with(r), (403, "ORIGIN_REJECTED".into()));

    for origin in [s.base.as_str(), APP] {
        let (mut socket, res) = ws(&url, &[("cookie", &cookie), ("origin", origin)])
            .await
            .expect("handshake");
        assert_eq!(res.status(), 101);
        let seen: serde_json::Value =
            serde_json::from_str(res.headers()["x-seen-headers"].to_str().unwrap()).unwrap();
        assert_eq!(seen["x-user-sub"], serde_json::json!(["alice"]), "{seen}");
        let upstream_cookie = seen["cookie"].to_string();
        assert!(upstream_cookie.contains("theme=dark"), "{seen}");
        assert!(
            !upstream_cookie.contains(&sid),
            "session id upstream: {seen}"
        );
        ws_send(&mut socket, Message::text("ping")).await;
        assert_eq!(ws_next(&mut socket).await, Message::text("ping"));
    }

    // A dead WebSocket backend: 502, and the gateway goes on.
    let dead = format!("{}/deadws", s.base.replace("http://", "ws://"));
    let r = ws(&dead, &[("cookie", &cookie), ("origin", &s.base)]).await;
    assert_eq!(refused_with(r), (502, "UPSTREAM_UNAVAILABLE".into()));
    let me = client()
        .get(format!("{}/auth/me", s.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
}

#[tokio::test]
async fn unsafe_session_requests_need_the_applications_origin() {
    let s = setup("").await;
    let b = Browser::default();
    assert_eq!(login(&s, &b, "bob", "").await.status(), 302);
    let cookie = format!("sid={}", b.cookie("sid").unwrap());
    let post = |headers: Vec<(&'static str, String)>| {
        let mut req = client()
            .post(format!("{}/api/items", s.base))
            .header("cookie", &cookie)
            .body("{}");
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.send()
    };
    for h in [
        vec![],
        vec![("origin", "https://evil.test".to_owned())],
        vec![("origin", "null".to_owned())],
        vec![("referer", "https://evil.test/page".to_owned())],
        // "Same origin" by a Host the client chose is not the application's origin.
        vec![
            ("origin", "http://evil.test".to_owned()),
            ("host", "evil.test".to_owned()),
        ],
    ] {
        let res = post(h.clone()).await.unwrap();
        assert_error(res, 403, "CSRF_REJECTED").await;
    }
    for h in [
        vec![("origin", s.base.clone())],
        vec![("origin", APP.to_owned())],
        vec![("referer", format!("{}/page", s.base))],
    ] {
        let res = post(h.clone()).await.unwrap();
        assert_eq!(res.status(), 200, "{h:?}");
    }
    // Safe methods pass from anywhere (reads are CORS's business).
    let res = client()
        .get(format!("{}/api/items", s.base))
        .header("cookie", &cookie)
        .header("origin", "https://evil.test")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}
