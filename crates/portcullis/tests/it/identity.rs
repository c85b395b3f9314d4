//! Identity at the gateway: JWT authenticators, scopes per method, claim headers,
//! optional auth, spoofed identity headers, credential sources.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::harness::*;

const SECRET: &str = "eloquent-test-secret-0123456789abcdef";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn eloquent_claims(scopes: &[&str]) -> serde_json::Value {
    json!({
        "iss": "eloquent-gateway", "aud": "eloquent-api", "exp": now() + 3600, "iat": now(),
        "sub": "user-1", "org_id": "org-9", "user_id": "user-1", "email": "a@example.com",
        "role": "user", "scopes": scopes,
    })
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../portcullis-auth/tests/fixtures")
        .join(name)
}

fn config(upstream: &str) -> String {
    format!(
        r#"
listeners:
  - address: 127.0.0.1:0
authenticators:
  eloquent:
    jwt:
      algorithms: [HS256]
      secret: "{SECRET}"
      issuer: [eloquent-gateway]
      audience: [eloquent-api]
      leeway: 5s
      token_sources: {{cookie: gw_token, query: access_token}}
      claim_headers:
        org_id: X-Org-ID
        user_id: X-User-ID
        email: X-User-Email
        role: X-User-Role
  rsa:
    jwt:
      algorithms: [RS256]
      public_keys: ["{rsa}"]
      principal_header: X-Principal
auth:
  default: [eloquent]
routes:
  - name: docs
    path: /api/v1/docs
    public: true
    proxy: {{upstream: {upstream}}}
  - name: agents-read
    path: /api/v1/agents
    methods: [GET]
    proxy: {{upstream: {upstream}}}
  - name: agents-write
    path: /api/v1/agents
    methods: [POST]
    auth:
      scopes: ["write:agents"]
    proxy: {{upstream: {upstream}}}
  - name: kv
    path_prefix: /kv
    auth:
      optional: true
    proxy: {{upstream: {upstream}, strip_prefix: true}}
  - name: rsa-only
    path_prefix: /rsa
    auth:
      authenticators: [rsa]
    proxy: {{upstream: {upstream}}}
"#,
        rsa = fixture("rsa1.pub.pem").display()
    )
}

async fn echo(res: reqwest::Response) -> serde_json::Value {
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

#[tokio::test]
async fn jwt_with_scopes_per_method_and_claim_headers() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(&up.url()));
    let c = client();
    let read_only = hs256(eloquent_claims(&["read"]));
    let writer = hs256(eloquent_claims(&["read", "write:agents"]));

    // GET needs only a valid token; claims travel as headers.
    let body = echo(
        c.get(gw.url("/api/v1/agents"))
            .bearer_auth(&read_only)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(body["headers"]["x-org-id"][0], "org-9");
    assert_eq!(body["headers"]["x-user-id"][0], "user-1");
    assert_eq!(body["headers"]["x-user-email"][0], "a@example.com");
    assert_eq!(body["headers"]["x-user-role"][0], "user");
    assert!(
        body["headers"].get("authorization").is_none(),
        "the credential is not forwarded"
    );

    // POST needs write:agents.
    let res = c
        .post(gw.url("/api/v1/agents"))
        .bearer_auth(&read_only)
        .send()
        .await
        .unwrap();
    let www = res.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        www.contains("error=\"insufficient_scope\"") && www.contains("write:agents"),
        "{www}"
    );
    assert_error(res, 403, "INSUFFICIENT_SCOPE").await;
    let res = c
        .post(gw.url("/api/v1/agents"))
        .bearer_auth(&writer)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // No token: 401.
    let res = c.get(gw.url("/api/v1/agents")).send().await.unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
}

#[tokio::test]
async fn bad_tokens_are_rejected() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(&up.url()));
    let c = client();
    let mut expired = eloquent_claims(&["read"]);
    expired["exp"] = json!(now() - 3600);
    let mut wrong_aud = eloquent_claims(&["read"]);
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = eloquent_claims(&["read"]);
    wrong_iss["iss"] = json!("evil");
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &eloquent_claims(&["read"]),
        &EncodingKey::from_secret(b"not-the-secret"),
    )
    .unwrap();
    // alg: none, hand-made.
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(eloquent_claims(&["read"]))
    );
    // Algorithm confusion: HS256 signed with the RSA public key as the secret.
    let rsa_pub = std::fs::read(fixture("rsa1.pub.pem")).unwrap();
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &eloquent_claims(&["read"]),
        &EncodingKey::from_secret(&rsa_pub),
    )
    .unwrap();

    let res = c
        .get(gw.url("/api/v1/agents"))
        .bearer_auth(hs256(expired))
        .send()
        .await
        .unwrap();
    assert!(res.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
    assert_error(res, 401, "EXPIRED_TOKEN").await;
    for (what, token) in [
        ("wrong audience", hs256(wrong_aud)),
        ("wrong issuer", hs256(wrong_iss)),
        ("forged", forged),
        ("alg none", none),
        ("garbage", "a.b.c".to_owned()),
    ] {
        let res = c
            .get(gw.url("/api/v1/agents"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{what}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], "UNAUTHORIZED", "{what}");
    }
    let res = c
        .get(gw.url("/rsa/x"))
        .bearer_auth(&confused)
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
    // Tokens never reach the logs (wait for the last access line first).
    assert!(
        gw.wait_log("\"route\":\"rsa-only\"", std::time::Duration::from_secs(5))
            .await
    );
    let logs = gw.logs();
    assert!(!logs.contains(SECRET) && !logs.contains(&hs256(eloquent_claims(&["read"]))[..40]));
}

#[tokio::test]
async fn rs256_from_a_pem_key_with_principal_header() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(&up.url()));
    let key = EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa1.key.pem")).unwrap()).unwrap();
    let token = encode(
        &Header::new(Algorithm::RS256),
        &json!({"sub": "svc-7", "exp": now() + 600}),
        &key,
    )
    .unwrap();
    let c = client();
    for _ in 0..3 {
        let body = echo(
            c.get(gw.url("/rsa/x"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(body["headers"]["x-principal"][0], "svc-7");
    }
    // A token for the other authenticator does not open this route.
    let res = c
        .get(gw.url("/rsa/x"))
        .bearer_auth(hs256(eloquent_claims(&["read"])))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
}

#[tokio::test]
async fn spoofed_identity_headers_are_removed_everywhere() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(&up.url()));
    let c = client();
    let spoof = |rb: reqwest::RequestBuilder| {
        rb.header("X-Org-ID", "evil-org")
            .header("X-User-ID", "admin")
            .header("X-User-Role", "admin")
            .header("X-Principal", "root")
    };
    // Public route: removed, nothing set.
    let body = echo(spoof(c.get(gw.url("/api/v1/docs"))).send().await.unwrap()).await;
    for h in ["x-org-id", "x-user-id", "x-user-role", "x-principal"] {
        assert!(
            body["headers"].get(h).is_none(),
            "{h} leaked on a public route: {body}"
        );
    }
    // Optional route without a token: removed.
    let body = echo(spoof(c.get(gw.url("/kv/a"))).send().await.unwrap()).await;
    assert!(body["headers"].get("x-org-id").is_none(), "{body}");
    // Authenticated: replaced by the token's claims.
    let token = hs256(eloquent_claims(&["read"]));
    let body = echo(
        spoof(c.get(gw.url("/api/v1/agents")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(body["headers"]["x-org-id"], json!(["org-9"]));
    assert_eq!(body["headers"]["x-user-role"], json!(["user"]));
    assert!(body["headers"].get("x-principal").is_none());
}

#[tokio::test]
async fn optional_auth_verifies_only_when_a_token_is_sent() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(&up.url()));
    let c = client();
    let body = echo(c.get(gw.url("/kv/key1")).send().await.unwrap()).await;
    assert_eq!(body["path"], "/key1");
    let body = echo(
        c.get(gw.url("/kv/key1"))
            .bearer_auth(hs256(eloquent_claims(&[])))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(body["headers"]["x-user-id"][0], "user-1");
    // A token that is sent must be valid.
    let res = c
        .get(gw.url("/kv/key1"))
        .bearer_auth("garbage")
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
}

#[tokio::test]
async fn token_from_cookie_or_query_is_removed_before_proxying() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(&up.url()));
    let c = client();
    let token = hs256(eloquent_claims(&["read"]));
    let res = c
        .get(gw.url("/api/v1/agents"))
        .header("cookie", format!("theme=dark; gw_token={token}"))
        .send()
        .await
        .unwrap();
    let body = echo(res).await;
    assert_eq!(body["headers"]["cookie"][0], "theme=dark");
    assert_eq!(body["headers"]["x-user-id"][0], "user-1");

    let res = c
        .get(gw.url(&format!("/api/v1/agents?page=2&access_token={token}")))
        .send()
        .await
        .unwrap();
    let body = echo(res).await;
    assert_eq!(body["query"], "page=2");
}

#[tokio::test]
async fn websocket_authenticates_with_a_query_token() {
    let ws = Upstream::ws_echo().await;
    let yaml = config("http://127.0.0.1:1").replace(
        "  - name: docs",
        &format!(
            "  - name: ws\n    path: /ws\n    proxy: {{upstream: {}}}\n  - name: docs",
            ws.url()
        ),
    );
    let gw = Gateway::start(&yaml);
    let token = hs256(eloquent_claims(&["read"]));
    // Without a token the handshake is answered 401 (not 101, and not just a
    // dropped connection).
    match ws_connect(&format!("ws://{}/ws", gw.addr())).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            assert_eq!(res.status(), 401, "{res:?}");
            let body: serde_json::Value =
                serde_json::from_slice(res.body().as_deref().unwrap_or_default())
                    .expect("JSON error body");
            assert_eq!(body["error"]["code"], "UNAUTHORIZED", "{body}");
        }
        Err(e) => panic!("expected a 401 handshake response, got {e:?}"),
        Ok((_, res)) => panic!("a WebSocket without a token was accepted: {res:?}"),
    }
    assert_eq!(
        ws.connections.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the refused handshake reached the upstream"
    );
    let (socket, response) = ws_connect(&format!("ws://{}/ws?access_token={token}", gw.addr()))
        .await
        .expect("handshake with a query token");
    assert_eq!(response.status(), 101);
    let seen: serde_json::Value =
        serde_json::from_str(response.headers()["x-seen-headers"].to_str().unwrap()).unwrap();
    assert_eq!(seen["x-user-id"][0], "user-1");
    drop(socket);
}

#[test]
fn unknown_authenticator_and_bad_algorithm_fail_check() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_config(
        dir.path(),
        "listeners:\n  - address: 127.0.0.1:0\nauthenticators:\n  j:\n    jwt:\n      algorithms: [HS999]\n      secret: x\nroutes:\n  - path: /x\n    auth:\n      authenticators: [nope]\n    respond: {body: hi}\n",
    );
    let (code, _, err) = run_cli(&["check", "-c", p.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("authenticators.j.jwt.algorithms[0]") && err.contains("HS999"),
        "{err}"
    );
    assert!(
        err.contains("routes[0].auth.authenticators[0]") && err.contains("nope"),
        "{err}"
    );
}

/// JWKS at the gateway: a rotated key is accepted at once (refetch on unknown `kid`),
/// and a token for a key the IdP dropped is refused after the next fetch.
#[tokio::test(flavor = "multi_thread")]
async fn jwks_rotation_through_the_gateway() {
    use crate::jwt_support::{jwk, jwks, sign_with, signing_key, JwksServer};
    use portcullis_auth::jwt::Algorithm as A;
    let up = Upstream::echo().await;
    let server = JwksServer::start(jwks(vec![jwk(A::RS256, "rsa1", "k1")])).await;
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\nauthenticators:\n  idp:\n    jwt:\n      algorithms: [RS256]\n      jwks_url: \"{}\"\n      jwks_min_refetch: 200ms\n      allow_any_audience: true\nauth:\n  default: [idp]\nroutes:\n  - path_prefix: /\n    proxy: {{upstream: {}}}\n",
        server.url,
        up.url()
    );
    let gw = Gateway::start(&yaml);
    let c = client();
    let claims = json!({"sub": "svc", "exp": now() + 600});
    let k1 = sign_with(
        A::RS256,
        &signing_key(A::RS256, "rsa1"),
        Some("k1"),
        &claims,
    );
    let k2 = sign_with(
        A::RS256,
        &signing_key(A::RS256, "rsa2"),
        Some("k2"),
        &claims,
    );
    assert_eq!(
        c.get(gw.url("/x"))
            .bearer_auth(&k1)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(gw.url("/x"))
            .bearer_auth(&k2)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    // The IdP rotates: k2 published, k1 retired. k2's unknown `kid` makes the gateway
    // refetch once `jwks_min_refetch` (200 ms) has passed since the last fetch.
    server.set(200, jwks(vec![jwk(A::RS256, "rsa2", "k2")]));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let status = c
            .get(gw.url("/x"))
            .bearer_auth(&k2)
            .send()
            .await
            .unwrap()
            .status();
        if status == 200 {
            break;
        }
        assert_eq!(status, 401);
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated key was never fetched"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let res = c.get(gw.url("/x")).bearer_auth(&k1).send().await.unwrap();
    assert_eq!(
        res.status(),
        401,
        "a retired key must not keep working from the cache"
    );

    // A token for an algorithm the authenticator does not allow is refused.
    let hs = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"whatever"),
    )
    .unwrap();
    assert_eq!(
        c.get(gw.url("/x"))
            .bearer_auth(&hs)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
}

/// PS256, ES256 and EdDSA tokens verified by the gateway against PEM public keys,
/// each authenticator only for its own algorithm; `leeway` lets a token that
/// expired moments ago through and refuses one beyond it with EXPIRED_TOKEN.
#[tokio::test]
async fn ps256_es256_eddsa_and_leeway_through_the_gateway() {
    use crate::jwt_support::{sign, sign_with, signing_key};
    use portcullis_auth::jwt::Algorithm as A;
    let up = Upstream::echo().await;
    let key = |name: &str| fixture(name).display().to_string();
    let yaml = format!(
        r#"listeners:
  - address: 127.0.0.1:0
authenticators:
  ps:
    jwt: {{algorithms: [PS256], public_keys: ["{rsa}"], principal_header: X-Principal}}
  es:
    jwt: {{algorithms: [ES256], public_keys: ["{ec}"], principal_header: X-Principal}}
  ed:
    jwt: {{algorithms: [EdDSA], public_keys: ["{ed}"], principal_header: X-Principal}}
  lenient:
    jwt: {{algorithms: [ES256], public_keys: ["{ec}"], leeway: 60s}}
  strict:
    jwt: {{algorithms: [ES256], public_keys: ["{ec}"], leeway: 0s}}
routes:
  - {{path_prefix: /ps, auth: {{authenticators: [ps]}}, proxy: {{upstream: {up}}}}}
  - {{path_prefix: /es, auth: {{authenticators: [es]}}, proxy: {{upstream: {up}}}}}
  - {{path_prefix: /ed, auth: {{authenticators: [ed]}}, proxy: {{upstream: {up}}}}}
  - {{path_prefix: /lenient, auth: {{authenticators: [lenient]}}, proxy: {{upstream: {up}}}}}
  - {{path_prefix: /strict, auth: {{authenticators: [strict]}}, proxy: {{upstream: {up}}}}}
"#,
        rsa = key("rsa1.pub.pem"),
        ec = key("ec256.pub.pem"),
        ed = key("ed25519.pub.pem"),
        up = up.url()
    );
    let gw = Gateway::start(&yaml);
    let c = client();
    let get = |path: &str, token: &str| c.get(gw.url(path)).bearer_auth(token).send();

    let claims = |sub: &str| json!({"sub": sub, "exp": now() + 600});
    let ps = sign(A::PS256, None, &claims("ps-user"));
    let es = sign(A::ES256, None, &claims("es-user"));
    let ed = sign(A::EdDSA, None, &claims("ed-user"));
    for (path, token, sub) in [
        ("/ps/x", &ps, "ps-user"),
        ("/es/x", &es, "es-user"),
        ("/ed/x", &ed, "ed-user"),
    ] {
        let body = echo(get(path, token).await.unwrap()).await;
        assert_eq!(body["headers"]["x-principal"][0], sub, "{path}: {body}");
    }
    // Each authenticator takes only its own algorithm: the others' tokens, and an
    // RS256 token from the very RSA key PS256 uses, are refused.
    let rs = sign_with(
        A::RS256,
        &signing_key(A::RS256, "rsa1"),
        None,
        &claims("rs"),
    );
    for (path, token) in [
        ("/ps/x", &es),
        ("/ps/x", &rs),
        ("/es/x", &ed),
        ("/ed/x", &ps),
    ] {
        let res = get(path, token).await.unwrap();
        assert_error(res, 401, "UNAUTHORIZED").await;
    }

    // Leeway: 20 s past `exp` is inside 60 s of leeway (40 s of margin), 120 s is not.
    let recently = sign(A::ES256, None, &json!({"sub": "late", "exp": now() - 20}));
    let long_ago = sign(A::ES256, None, &json!({"sub": "later", "exp": now() - 120}));
    assert_eq!(get("/lenient/x", &recently).await.unwrap().status(), 200);
    let res = get("/lenient/x", &long_ago).await.unwrap();
    assert_error(res, 401, "EXPIRED_TOKEN").await;
    // Without leeway the recent one is expired too: the leeway is what let it in.
    let res = get("/strict/x", &recently).await.unwrap();
    assert_error(res, 401, "EXPIRED_TOKEN").await;
    // `nbf` gets the same leeway.
    let early = sign(
        A::ES256,
        None,
        &json!({"sub": "early", "exp": now() + 600, "nbf": now() + 20}),
    );
    assert_eq!(get("/lenient/x", &early).await.unwrap().status(), 200);
    assert_eq!(get("/strict/x", &early).await.unwrap().status(), 401);
}
