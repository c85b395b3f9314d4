//! 1. Templated upstreams: no SSRF, no loops

use super::*;

#[tokio::test]
async fn function_names_that_read_as_addresses_never_resolve() {
    let up = Upstream::echo().await;
    let port = up.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let hosts = hosts_file(dir.path(), &["fn-hello", "other"]);
    let yaml = format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
server: {{hosts_file: "{}"}}
routes:
  - name: fn
    path_prefix: "/{{name}}"
    proxy:
      upstream: "http://{{name}}:{port}"
      strip_prefix: true
      allow_names: ["fn-*", "~[a-z]+-v[0-9]"]
"#,
        hosts.display()
    );
    let gw = Gateway::start(&yaml);
    let res = raw_get(gw.addr(), "/fn-hello/x", "").await;
    assert_eq!(res.status, 200, "{res:?}");
    let before = up.connections.load(Ordering::SeqCst);
    for target in [
        "/2130706433/x",
        "/017700000001/x",
        "/0x7f000001/x",
        "/0X7F000001/x",
        "/127.1/x",
        "/127.0.0.1/x",
        "/localhost/x",
        "/LOCALHOST/x",
        "/%5B::1%5D/x",
        "/other/x",
        "/fn-a.evil.com/x",
    ] {
        let res = raw_get(gw.addr(), target, "").await;
        assert_eq!(res.status, 404, "{target}: {res:?}");
        assert_eq!(res.json()["error"]["code"], "NOT_FOUND", "{target}");
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn resolved_addresses_are_checked_on_every_connect() {
    let up = Upstream::echo().await;
    let port = up.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 local-fn\n169.254.169.254 metadata\n0.0.0.0 zero\n224.0.0.1 multi\n64:ff9b::a9fe:a9fe nat64-metadata\nfd00:ec2::254 aws6\n",
    )
    .unwrap();
    let yaml = format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
server: {{hosts_file: "{}"}}
routes:
  - name: strict
    path_prefix: "/strict/{{name}}"
    proxy:
      upstream: "http://{{name}}:{port}"
      strip_prefix: true
      targets: {{allow: ["10.0.0.0/8"]}}
  - name: no-loopback
    path_prefix: "/private/{{name}}"
    proxy:
      upstream: "http://{{name}}:{port}"
      strip_prefix: true
      targets: {{deny: ["127.0.0.0/8"]}}
  - name: fn
    path_prefix: "/{{name}}"
    proxy:
      upstream: "http://{{name}}:{port}"
      strip_prefix: true
"#,
        hosts.display()
    );
    let gw = Gateway::start(&yaml);
    let c = client();
    // Loopback stays allowed by default: functions run there.
    assert_eq!(
        c.get(gw.url("/local-fn/x")).send().await.unwrap().status(),
        200
    );
    let before = up.connections.load(Ordering::SeqCst);
    for path in [
        "/metadata/latest/meta-data",
        "/nat64-metadata/latest/meta-data",
        "/aws6/latest/meta-data",
        "/zero/x",
        "/multi/x",
        "/private/local-fn/x",
        "/strict/local-fn/x",
    ] {
        let res = c.get(gw.url(path)).send().await.unwrap();
        assert_error(res, 403, "UPSTREAM_FORBIDDEN").await;
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), before);
}

/// FnKit with the function port equal to the gateway's own: the request comes back
/// in carrying our Via and stops at the second hop. The same through a fixed route.
#[tokio::test]
async fn a_request_sent_back_into_the_gateway_stops_at_the_second_hop() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let hosts = hosts_file(dir.path(), &["myself"]);
    let yaml = format!(
        r#"listeners: [{{address: "127.0.0.1:{port}"}}]
admin: {{address: "127.0.0.1:0"}}
server: {{hosts_file: "{}"}}
routes:
  - name: loop
    path_prefix: /loop
    proxy: {{upstream: "http://127.0.0.1:{port}"}}
  - name: fn
    path_prefix: "/{{name}}"
    proxy:
      upstream: "http://{{name}}:{port}"
      strip_prefix: true
"#,
        hosts.display()
    );
    let gw = Gateway::start(&yaml);
    let c = client();
    let res = c.get(gw.url("/myself/myself/x")).send().await.unwrap();
    assert_error(res, 508, "LOOP_DETECTED").await;
    let res = c.get(gw.url("/loop/x")).send().await.unwrap();
    assert_error(res, 508, "LOOP_DETECTED").await;
    assert!(gw
        .metrics()
        .await
        .contains("portcullis_loops_detected_total 2"));
}

#[tokio::test]
async fn via_names_the_gateway_and_a_forged_via_is_a_loop() {
    let up = Upstream::echo().await;
    let yaml = format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nserver: {{gateway_id: edge-1}}\nroutes:\n  - path_prefix: /\n    proxy: {{upstream: \"{}\"}}\n",
        up.url()
    );
    let gw = Gateway::start(&yaml);
    let res = raw_get(gw.addr(), "/x", "Via: 1.0 corp-proxy\r\n").await;
    let via = res.json()["headers"]["via"].clone();
    assert_eq!(via, serde_json::json!(["1.0 corp-proxy", "1.1 edge-1"]));
    let res = raw_get(gw.addr(), "/x", "Via: 1.1 other, 1.1 edge-1\r\n").await;
    assert_eq!(res.status, 508, "{res:?}");
}

#[test]
fn upstream_rule_mistakes_are_refused() {
    let head = "listeners: [{address: \"127.0.0.1:0\"}]\n";
    for (yaml, needle) in [
        (
            format!("{head}routes:\n  - path_prefix: /\n    proxy: {{upstream: \"http://127.0.0.1:9\", targets: {{deny: [10.0.0.0/8]}}}}\n"),
            "templated upstreams",
        ),
        (
            format!("{head}routes:\n  - path_prefix: \"/{{name}}\"\n    proxy: {{upstream: \"http://{{name}}:9\", allow_names: [\"~(\"]}}\n"),
            "allow_names[0]: invalid regex",
        ),
        (
            format!("{head}routes:\n  - path_prefix: \"/{{name}}\"\n    proxy: {{upstream: \"http://{{name}}:9\", targets: {{allow: [not-a-cidr]}}}}\n"),
            "targets.allow[0]",
        ),
        (
            format!("{head}server: {{gateway_id: \"edge 1\"}}\nroutes:\n  - path: /x\n    respond: {{body: x}}\n"),
            "server.gateway_id",
        ),
    ] {
        let (code, out, err) = check_file(&yaml);
        assert_eq!(code, 1, "accepted:\n{yaml}\n{out}");
        assert!(err.contains(needle), "{needle:?} missing from {err}");
    }
}
