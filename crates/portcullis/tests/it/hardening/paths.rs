//! 4. Paths

use super::*;

#[tokio::test]
async fn path_parameters_are_refused_or_never_dot_segments() {
    let up = Upstream::echo().await;
    let route = format!(
        "routes:\n  - path_prefix: /\n    proxy: {{upstream: \"{}\"}}\n",
        up.url()
    );
    let gw = Gateway::start(&format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\n{route}"
    ));
    for target in ["/a;jsessionid=1", "/public/..;/admin", "/a%3Bx"] {
        let res = raw_get(gw.addr(), target, "").await;
        assert_eq!(res.status, 400, "{target}: {res:?}");
        assert_eq!(res.json()["error"]["code"], "INVALID_PATH");
    }
    let gw = Gateway::start(&format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nserver: {{path_parameters: keep}}\n{route}"
    ));
    let res = raw_get(gw.addr(), "/a;jsessionid=1", "").await;
    assert_eq!(res.status, 200, "{res:?}");
    for target in [
        "/public/..;/admin",
        "/public/.;x/admin",
        "/public/%2e%2e;x/admin",
    ] {
        let res = raw_get(gw.addr(), target, "").await;
        assert_eq!(res.status, 400, "{target}: {res:?}");
    }
}

#[tokio::test]
async fn a_method_mismatch_never_falls_through_to_a_public_route() {
    let gw = Gateway::start(
        r#"listeners: [{address: "127.0.0.1:0"}]
routes:
  - name: admin
    path: /admin
    methods: [GET]
    auth: {tokens: [admin-token-0123]}
    respond: {body: admin}
  - name: area
    path_prefix: /area
    methods: [GET]
    auth: {tokens: [admin-token-0123]}
    respond: {body: area}
  - name: public
    path_prefix: /
    public: true
    respond: {body: public}
"#,
    );
    for (method, path) in [
        ("DELETE", "/admin"),
        ("POST", "/admin"),
        ("DELETE", "/area"),
        ("DELETE", "/area/"),
        ("PUT", "/area/x"),
    ] {
        let res = raw_request(
            gw.addr(),
            &format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(res.status, 405, "{method} {path}: {res:?}");
        assert_eq!(res.header("allow"), Some("GET, HEAD"), "{method} {path}");
        assert_ne!(res.body, "public");
    }
    assert_eq!(raw_get(gw.addr(), "/other", "").await.body, "public");
}
