//! 2. Identity and forwarding headers belong to the gateway

use super::*;

fn jwt_gateway(upstream: &str, server_extra: &str) -> Gateway {
    Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
server:
  trusted_proxies: ["10.9.9.9/32"]
{server_extra}
authenticators:
  app:
    jwt:
      algorithms: [HS256]
      secret: "{SECRET}"
      principal_header: X-User-ID
      claim_headers: {{org_id: X-Org-ID}}
      token_sources: {{cookie: app_token, query: access_token}}
auth:
  default: [app]
routes:
  - name: api
    path_prefix: /
    proxy: {{upstream: "{upstream}"}}
"#
    ))
}

/// The Eloquent reproduction: `Connection: X-Org-ID` plus `X_Org_ID: victim-org`.
#[tokio::test]
async fn connection_and_underscores_cannot_forge_identity_headers() {
    let up = Upstream::echo().await;
    let gw = jwt_gateway(&up.url(), "");
    let token = hs256(serde_json::json!({"sub": "u1", "org_id": "org-1", "exp": exp()}));
    let res = raw_get(
        gw.addr(),
        "/x",
        &format!(
            "Authorization: Bearer {token}\r\nConnection: X-Org-ID, X-User-ID, X-Forwarded-For, Host, Via, X-Request-ID, Forwarded, X-Real-IP, Content-Length\r\nX_Org_ID: victim-org\r\nX-Org-ID: victim-2\r\nX_User_ID: admin\r\n"
        ),
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let h = &res.json()["headers"];
    assert_eq!(h["x-org-id"], serde_json::json!(["org-1"]), "{h}");
    assert_eq!(h["x-user-id"], serde_json::json!(["u1"]), "{h}");
    for gone in ["x_org_id", "x_user_id", "authorization", "connection"] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h}");
    }
    for kept in [
        "x-forwarded-for",
        "host",
        "via",
        "x-request-id",
        "forwarded",
        "x-real-ip",
    ] {
        assert!(h.get(kept).is_some(), "{kept} was removed: {h}");
    }
}

#[tokio::test]
async fn underscore_headers_drop_reject_allow() {
    let up = Upstream::echo().await;
    let token = hs256(serde_json::json!({"sub": "u1", "org_id": "org-1", "exp": exp()}));
    let auth = format!("Authorization: Bearer {token}\r\n");
    let hostile = format!("{auth}X_Org_ID: victim\r\nX_Custom: 1\r\n");

    let gw = jwt_gateway(&up.url(), "");
    let res = raw_get(gw.addr(), "/x", &hostile).await;
    let h = &res.json()["headers"];
    assert!(
        h.get("x_custom").is_none() && h.get("x_org_id").is_none(),
        "{h}"
    );

    let gw = jwt_gateway(&up.url(), "  underscore_headers: reject");
    let res = raw_get(gw.addr(), "/x", &hostile).await;
    assert_eq!(res.status, 400, "{res:?}");
    assert_eq!(res.json()["error"]["code"], "BAD_REQUEST");

    let gw = jwt_gateway(&up.url(), "  underscore_headers: allow");
    let res = raw_get(gw.addr(), "/x", &hostile).await;
    let h = &res.json()["headers"];
    assert_eq!(h["x_custom"], serde_json::json!(["1"]), "{h}");
    assert!(h.get("x_org_id").is_none(), "{h}");
    assert_eq!(h["x-org-id"], serde_json::json!(["org-1"]), "{h}");
}

#[tokio::test]
async fn rewrite_and_client_address_headers_are_stripped() {
    let up = Upstream::echo().await;
    let yaml = format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nroutes:\n  - path_prefix: /\n    proxy: {{upstream: \"{}\"}}\n",
        up.url()
    );
    let gw = Gateway::start(&yaml);
    let hostile = "X-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\nX-HTTP-Method-Override: DELETE\r\nX-Method-Override: DELETE\r\nX-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /admin\r\nTrue-Client-IP: 1.2.3.4\r\nX-Client-IP: 1.2.3.4\r\nCF-Connecting-IP: 1.2.3.4\r\nX-Kept: yes\r\n";
    let res = raw_get(gw.addr(), "/x", hostile).await;
    let h = &res.json()["headers"];
    for gone in [
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-method-override",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "true-client-ip",
        "x-client-ip",
        "cf-connecting-ip",
    ] {
        assert!(h.get(gone).is_none(), "{gone}: {h}");
    }
    assert_eq!(h["x-kept"], serde_json::json!(["yes"]));

    // From a trusted proxy, client-address headers pass; rewrite headers never do.
    let yaml = format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nserver: {{trusted_proxies: [127.0.0.1]}}\nroutes:\n  - path_prefix: /\n    proxy: {{upstream: \"{}\"}}\n",
        up.url()
    );
    let gw = Gateway::start(&yaml);
    let res = raw_get(gw.addr(), "/x", hostile).await;
    let h = &res.json()["headers"];
    assert_eq!(h["true-client-ip"], serde_json::json!(["1.2.3.4"]), "{h}");
    assert!(h.get("x-original-url").is_none(), "{h}");
}

#[tokio::test]
async fn every_configured_credential_source_is_removed() {
    let up = Upstream::echo().await;
    let gw = jwt_gateway(&up.url(), "");
    let token = hs256(serde_json::json!({"sub": "u1", "org_id": "o", "exp": exp()}));
    // Authenticated by the header; the cookie and (percent-encoded) query copies go too.
    let res = raw_get(
        gw.addr(),
        &format!("/x?a=1&access%5Ftoken={token}&b=2&access_token=other"),
        &format!("Authorization: Bearer {token}\r\nCookie: keep=1; app_token={token}\r\n"),
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let echo = res.json();
    assert_eq!(echo["query"], "a=1&b=2", "{echo}");
    assert_eq!(echo["headers"]["cookie"], serde_json::json!(["keep=1"]));
    assert!(echo["headers"].get("authorization").is_none());
    assert!(!echo.to_string().contains(&token));
    // A non-ASCII cookie beside the credential does not hide it.
    let res = raw_get(
        gw.addr(),
        "/x",
        &format!(
            "Authorization: Bearer {token}\r\nCookie: app_token={token}; pref=\u{e9}t\u{e9}\r\n"
        ),
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let echo = res.json();
    assert!(!echo.to_string().contains(&token), "{echo}");
    assert!(echo["headers"]["cookie"][0]
        .as_str()
        .unwrap()
        .starts_with("pref="));
}

/// Identity names smuggled as request trailers never reach an (HTTP/2) upstream.
#[tokio::test]
async fn request_trailers_never_reach_the_upstream() {
    let up = Upstream::serve(
        true,
        |req: hyper::Request<hyper::body::Incoming>| async move {
            let collected = req.into_body().collect().await.unwrap();
            let trailers = collected
                .trailers()
                .map(headers_json)
                .unwrap_or(serde_json::json!({}));
            let body = serde_json::json!({"trailers": trailers, "len": collected.to_bytes().len()});
            hyper::Response::new(
                http_body_util::Full::new(Bytes::from(body.to_string()))
                    .map_err(|e| match e {})
                    .boxed(),
            )
        },
    )
    .await;
    let yaml = format!(
        "listeners: [{{address: \"127.0.0.1:0\"}}]\nroutes:\n  - path_prefix: /\n    proxy: {{upstream: \"{}\", protocol: http2}}\n",
        up.url()
    );
    let gw = Gateway::start(&yaml);
    let res = raw_request(
        gw.addr(),
        "POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: X-Org-ID\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nX-Org-ID: evil\r\nX-Other: t\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let body = res.json();
    assert_eq!(body["len"], 5);
    assert_eq!(body["trailers"], serde_json::json!({}), "{body}");
}
