//! 6. Connections and slow clients

use super::*;

const QUICK: &str = "server: {header_read_timeout: 1s, idle_timeout: 1s}\n";

#[tokio::test]
async fn silent_and_half_open_clients_are_disconnected() {
    let gw = Gateway::start(&format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nadmin: {{address: \"127.0.0.1:0\"}}\n{QUICK}routes:\n  - path: /x\n    respond: {{body: x}}\n"
    ));
    let limit = Duration::from_secs(15);
    for (what, bytes) in [
        ("nothing", &b""[..]),
        ("a lone P", &b"P"[..]),
        ("part of a head", &b"GET /x HTTP/1.1\r\nHo"[..]),
        ("an h2 preface", &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..]),
    ] {
        for addr in [gw.addr(), gw.admin()] {
            let mut s = tcp_connect(addr).await;
            s.write_all(bytes).await.unwrap();
            assert!(
                closed_within(&mut s, limit).await,
                "{what} on {addr}: still open"
            );
        }
    }
}

#[tokio::test]
async fn idle_http2_connections_get_a_goaway() {
    let gw = Gateway::start(&format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\n{QUICK}routes:\n  - path: /x\n    respond: {{body: x}}\n"
    ));
    let stream = tcp_connect(gw.addr()).await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(format!("http://{}/x", gw.addr()))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    drop(res);
    let ended = tokio::time::timeout(Duration::from_secs(15), conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection stayed open");
}

#[tokio::test]
async fn max_connections_closes_the_excess_at_once() {
    let gw = Gateway::start(
        "listeners: [{address: \"127.0.0.1:0\"}]\nadmin: {address: \"127.0.0.1:0\"}\nserver: {max_connections: 2}\nroutes:\n  - path: /x\n    respond: {body: x}\n",
    );
    let keep_alive = "GET /x HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tcp_connect(gw.addr()).await;
        s.write_all(keep_alive.as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    // The limit is reported at start.
    assert!(gw.logs().contains("\"max_connections\":2"), "{}", gw.logs());
    let mut third = tcp_connect(gw.addr()).await;
    let _ = third.write_all(keep_alive.as_bytes()).await;
    assert!(closed_within(&mut third, Duration::from_secs(10)).await);
    assert!(gw
        .metrics()
        .await
        .contains("portcullis_connections_rejected_total 1"));
    // A freed slot is usable again.
    drop(held.pop());
    let mut ok = false;
    for _ in 0..100 {
        let res = raw_get(gw.addr(), "/x", "").await;
        if res.status == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "a freed slot was never reused");
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_tunnels_are_checked_counted_and_closed_when_idle() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let ws_up = Upstream::ws_echo().await;
    let echo = Upstream::echo().await;
    let gw = Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
admin: {{address: "127.0.0.1:0"}}
routes:
  - name: ws
    path_prefix: /ws
    proxy: {{upstream: "{}", timeouts: {{tunnel_idle: 1s}}}}
  - name: echo
    path_prefix: /
    proxy: {{upstream: "{}"}}
"#,
        ws_up.url(),
        echo.url()
    ));
    let (mut ws, res) = ws_connect(&format!("ws://{}/ws", gw.addr())).await.unwrap();
    assert_eq!(res.status(), 101);
    ws_send(&mut ws, Message::text("hi")).await;
    assert_eq!(ws_next(&mut ws).await, Message::text("hi"));
    // The tunnel is an open connection.
    assert!(gw
        .metrics()
        .await
        .contains("portcullis_open_connections{listener=\"main\"} 1"));
    // Silent for longer than tunnel_idle: closed.
    let end = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "an idle tunnel stayed open");

    // A broken handshake never reaches the upstream; other protocols are not tunnelled.
    let res = raw_request(
        gw.addr(),
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 426, "{res:?}");
    assert_eq!(res.header("sec-websocket-version"), Some("13"));
    for upgrade in ["websocket", "WebSocket/13"] {
        let res = raw_request(
            gw.addr(),
            &format!("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: {upgrade}\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n"),
        )
        .await;
        assert_eq!(res.status, 400, "{upgrade}: {res:?}");
    }
    let res = raw_request(
        gw.addr(),
        "GET /plain HTTP/1.1\r\nHost: x\r\nUpgrade: h2c, foo\r\nConnection: Upgrade, close\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let h = &res.json()["headers"];
    assert!(
        h.get("upgrade").is_none() && h.get("connection").is_none(),
        "{h}"
    );
}

#[tokio::test]
async fn metrics_token_on_the_main_listener() {
    let gw = Gateway::start(
        "listeners: [{address: \"127.0.0.1:0\"}]\nadmin: {address: \"127.0.0.1:0\", metrics_token: scrape-me}\nmetrics: {listener: main}\nroutes:\n  - path: /x\n    respond: {body: x}\n",
    );
    let c = client();
    let res = c.get(gw.url("/metrics")).send().await.unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
    let res = c
        .get(gw.url("/metrics"))
        .bearer_auth("scrape-me")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn admin_metrics_token() {
    let gw = Gateway::start(
        "listeners: [{address: \"127.0.0.1:0\"}]\nadmin: {address: \"127.0.0.1:0\", metrics_token: scrape-me}\nroutes:\n  - path: /x\n    respond: {body: x}\n",
    );
    let c = client();
    let res = c.get(gw.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "UNAUTHORIZED");
    let res = c
        .get(gw.admin_url("/metrics"))
        .bearer_auth("scrape-me")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn static_dotfiles_are_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    std::fs::create_dir_all(site.join(".git")).unwrap();
    std::fs::write(site.join(".env"), "SECRET=1").unwrap();
    std::fs::write(site.join(".git/config"), "[core]").unwrap();
    std::fs::write(site.join("a.txt"), "a").unwrap();
    let yaml = |extra: &str| {
        format!(
            "listeners: [{{address: \"127.0.0.1:0\"}}]\nroutes:\n  - path_prefix: /\n    static: {{dir: \"{}\"{extra}}}\n",
            site.display()
        )
    };
    let gw = Gateway::start(&yaml(""));
    for path in ["/.env", "/.git/config", "/.git/"] {
        let res = raw_get(gw.addr(), path, "").await;
        assert_eq!(res.status, 404, "{path}: {res:?}");
        assert!(!res.body.contains("SECRET"));
    }
    assert_eq!(raw_get(gw.addr(), "/a.txt", "").await.status, 200);
    let gw = Gateway::start(&yaml(", dotfiles: allow"));
    assert_eq!(raw_get(gw.addr(), "/.env", "").await.status, 200);
}

/// SIGTERM keeps an open tunnel working through the grace period, then the process
/// ends and the tunnel with it.
#[tokio::test(flavor = "multi_thread")]
async fn tunnels_hold_the_drain_for_the_grace_period() {
    use tokio_tungstenite::tungstenite::Message;
    let ws_up = Upstream::ws_echo().await;
    let mut gw = Gateway::start(&format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nserver: {{shutdown_grace: 3s}}\nroutes:\n  - path_prefix: /ws\n    proxy: {{upstream: \"{}\"}}\n",
        ws_up.url()
    ));
    let (mut ws, _) = ws_connect(&format!("ws://{}/ws", gw.addr())).await.unwrap();
    gw.signal(libc::SIGTERM);
    assert!(
        gw.wait_log("no longer accepting", Duration::from_secs(10))
            .await
    );
    ws_send(&mut ws, Message::text("still there?")).await;
    assert_eq!(ws_next(&mut ws).await, Message::text("still there?"));
    let status = tokio::task::spawn_blocking(move || gw.terminate_wait())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// Login and admin bodies must arrive quickly and small.
#[tokio::test]
async fn gateway_handled_bodies_have_a_deadline_and_a_limit() {
    let gw = Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
admin: {{address: "127.0.0.1:0", token: adm}}
store: {{data_dir: "{{{{dir}}}}/data"}}
token_issuer: {{algorithm: HS256, secret: "{SECRET}"}}
routes:
  - path: /x
    public: true
    respond: {{body: x}}
"#
    ));
    let res = client()
        .post(gw.admin_url("/admin/apikeys"))
        .bearer_auth("adm")
        .body(vec![b' '; 70_000])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    // A login body that stops half-way: 408 after the 10 s deadline, not never.
    let mut s = tcp_connect(gw.addr()).await;
    s.write_all(b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"username\":")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
        .await
        .expect("answered within the deadline")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
}

#[test]
fn zero_deadlines_are_refused() {
    for (server, timeouts) in [
        ("server: {idle_timeout: 0s}\n", ""),
        ("server: {header_read_timeout: 0s}\n", ""),
        ("server: {send_timeout: 0s}\n", ""),
        ("", ", timeouts: {body: 0s}"),
        ("", ", timeouts: {tunnel_idle: 0s}"),
    ] {
        let yaml = format!(
            "listeners: [{{address: \"127.0.0.1:0\"}}]\n{server}routes:\n  - path_prefix: /\n    proxy: {{upstream: \"http://127.0.0.1:9\"{timeouts}}}\n"
        );
        let (code, out, err) = check_file(&yaml);
        assert_eq!(code, 1, "accepted:\n{yaml}\n{out}");
        assert!(err.contains("must be longer than 0"), "{err}");
    }
}

/// A client that stops reading a large response is cut after `send_timeout`, freeing
/// its slot (and the upstream connection) instead of holding them forever.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nadmin: {{address: \"127.0.0.1:0\"}}\nserver: {{send_timeout: 1s}}\nroutes:\n  - path_prefix: /\n    proxy: {{upstream: \"{}\"}}\n",
        up.url()
    ));
    let mut s = tcp_connect(gw.addr()).await;
    s.write_all(b"GET /big?download=200000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Open while the response is stuck in the socket, then cut by send_timeout.
    gw.wait_metrics(&["portcullis_open_connections{listener=\"main\"} 1"])
        .await;
    gw.wait_metrics(&["portcullis_open_connections{listener=\"main\"} 0"])
        .await;
    drop(s);
}

/// The admin listener has a connection cap of its own (256).
#[tokio::test]
async fn admin_listener_connections_are_capped() {
    let gw = Gateway::start(
        "listeners: [{address: \"127.0.0.1:0\"}]\nadmin: {address: \"127.0.0.1:0\"}\nroutes:\n  - path: /x\n    respond: {body: x}\n",
    );
    let mut held = Vec::new();
    for _ in 0..256 {
        held.push(tcp_connect(gw.admin()).await);
    }
    // Each was accepted (served) before the next: the 257th is closed at once.
    let mut extra = tcp_connect(gw.admin()).await;
    assert!(closed_within(&mut extra, Duration::from_secs(10)).await);
    drop(held);
    let mut ok = false;
    for _ in 0..100 {
        if let Ok(res) = client().get(gw.admin_url("/health")).send().await {
            if res.status() == 200 {
                ok = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the admin listener never recovered");
}
