//! 3. One authority per request

use super::*;

#[tokio::test]
async fn one_authority_per_request() {
    let up = Upstream::echo().await;
    let yaml = format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
routes:
  - name: a
    hosts: [a.test]
    path_prefix: /
    proxy: {{upstream: "{0}", preserve_host: true}}
  - name: other
    path_prefix: /
    respond: {{body: other}}
"#,
        up.url()
    );
    let gw = Gateway::start(&yaml);
    let a = gw.addr();
    // Absolute-form wins for routing, Host, X-Forwarded-Host and Forwarded alike.
    let res = raw_request(
        a,
        "GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let h = &res.json()["headers"];
    assert_eq!(h["host"], serde_json::json!(["a.test"]), "{h}");
    assert_eq!(h["x-forwarded-host"], serde_json::json!(["a.test"]), "{h}");
    assert!(h["forwarded"][0]
        .as_str()
        .unwrap()
        .contains("host=\"a.test\""));
    // Forwarded in the same spelling routing used: lower case, no trailing dot.
    let res = raw_request(
        a,
        "GET /x HTTP/1.1\r\nHost: A.Test.\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let h = &res.json()["headers"];
    assert_eq!(h["host"], serde_json::json!(["a.test"]), "{h}");
    assert_eq!(h["x-forwarded-host"], serde_json::json!(["a.test"]), "{h}");
    // Disagreement, duplicates, missing and malformed hosts: 400.
    for head in [
        "GET http://a.test/x HTTP/1.1\r\nHost: other.test\r\n",
        "GET http://other.test/x HTTP/1.1\r\nHost: a.test\r\n",
        "GET /x HTTP/1.1\r\nHost: a.test\r\nHost: other.test\r\n",
        "GET /x HTTP/1.1\r\n",
        "GET /x HTTP/1.1\r\nHost: evil@a.test\r\n",
        "GET /x HTTP/1.1\r\nHost: a.test:80:80\r\n",
        "GET /x HTTP/1.1\r\nHost: a.test:\r\n",
        "GET /x HTTP/1.1\r\nHost: a.test:8x\r\n",
        "GET /x HTTP/1.1\r\nHost: a.test\\@b\r\n",
        "GET /x HTTP/1.1\r\nHost: a\"test\r\n",
    ] {
        let res = raw_request(a, &format!("{head}Connection: close\r\n\r\n")).await;
        assert_eq!(res.status, 400, "{head:?}: {res:?}");
    }
    // HTTP/1.0 may omit Host.
    let res = raw_request(a, "GET /x HTTP/1.0\r\n\r\n").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.body, "other");
}

/// HTTP/2: `:authority` is the authority; a Host header that disagrees is a 400.
#[tokio::test]
async fn http2_authority_and_host_must_agree() {
    let gw = Gateway::start(
        "listeners: [{address: \"127.0.0.1:0\"}]\nroutes:\n  - hosts: [a.test]\n    path_prefix: /\n    respond: {body: a}\n",
    );
    let stream = tcp_connect(gw.addr()).await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let send = |host: Option<&str>| {
        let mut b = hyper::Request::get("http://a.test/x");
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(http_body_util::Empty::<Bytes>::new()).unwrap()
    };
    let res = tokio::time::timeout(Duration::from_secs(10), sender.send_request(send(None)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        sender.send_request(send(Some("b.test"))),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(res.status(), 400);
}
