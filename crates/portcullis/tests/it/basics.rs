use crate::harness::*;

fn proxy_config(upstream: &str) -> String {
    format!(
        r#"
listeners:
  - address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
  token: admintoken
routes:
  - name: api
    path_prefix: /api
    proxy:
      upstream: {upstream}
"#
    )
}

#[tokio::test]
async fn proxies_to_upstream_with_query_byte_for_byte() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&proxy_config(&up.url()));
    let res = raw_get(gw.addr(), "/api/users?page=2&q=a%20b&x=%2F&&y", "").await;
    assert_eq!(res.status, 200, "{res:?}");
    let body = res.json();
    assert_eq!(body["path"], "/api/users");
    assert_eq!(body["query"], "page=2&q=a%20b&x=%2F&&y");
    assert_eq!(body["method"], "GET");
}

#[tokio::test]
async fn unknown_path_is_a_json_404_with_request_id() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&proxy_config(&up.url()));
    let res = client().get(gw.url("/nope")).send().await.unwrap();
    let body = assert_error(res, 404, "NOT_FOUND").await;
    assert!(!body["error"]["request_id"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn request_id_is_kept_or_generated() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&proxy_config(&up.url()));
    let c = client();
    let res = c
        .get(gw.url("/api/x"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "abc-123");
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["headers"]["x-request-id"][0], "abc-123");

    // An invalid id (too long, odd characters) is replaced.
    let res = c
        .get(gw.url("/api/x"))
        .header("x-request-id", "a b\"<script>")
        .send()
        .await
        .unwrap();
    let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(id, "a b\"<script>");
    assert_eq!(id.len(), 36);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["headers"]["x-request-id"][0], id.as_str());
    assert!(
        gw.wait_log(
            &format!("\"request_id\":\"{id}\""),
            std::time::Duration::from_secs(5)
        )
        .await
    );
}

#[tokio::test]
async fn health_endpoints() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&proxy_config(&up.url()));
    let c = client();
    for p in ["/health", "/healthz"] {
        let res = c.get(gw.url(p)).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.text().await.unwrap(), "OK");
    }
    let res = until_status(&gw.url("/readyz"), 200).await;
    assert_eq!(res.text().await.unwrap(), "ready");
}

/// One worker runs on a current-thread runtime; it must serve, stream and reload alike.
#[tokio::test(flavor = "multi_thread")]
async fn single_worker_mode() {
    let up = Upstream::echo().await;
    let gw = Gateway::start_with_env(&proxy_config(&up.url()), &[("PORTCULLIS_WORKERS", "1")]);
    assert!(gw.logs().contains("\"workers\":1"), "{}", gw.logs());
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (c, url) = (c.clone(), gw.url(&format!("/api/{i}?download=300000")));
        tasks.push(tokio::spawn(async move {
            c.get(url)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .len()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 300000);
    }
    let res = c
        .post(gw.admin_url("/admin/reload"))
        .bearer_auth("admintoken")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}
