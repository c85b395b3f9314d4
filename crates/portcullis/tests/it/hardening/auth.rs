//! 5. Auth that fails closed

use super::*;

#[test]
fn auth_config_mistakes_are_refused() {
    let head = "listeners: [{address: \"127.0.0.1:0\"}]\n";
    let jwt = format!(
        "authenticators:\n  app:\n    jwt: {{algorithms: [HS256], secret: \"{SECRET}\"}}\n"
    );
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{head}{jwt}routes:\n  - path: /x\n    auth: {{authenticators: [app], optional: true, scopes: [a]}}\n    respond: {{body: x}}\n"),
            "`optional: true` cannot be combined with `scopes`",
        ),
        (
            format!("{head}authenticators:\n  idp:\n    jwt: {{algorithms: [RS256], jwks_url: \"http://127.0.0.1:1/jwks\"}}\nroutes:\n  - path: /x\n    auth: {{authenticators: [idp]}}\n    respond: {{body: x}}\n"),
            "audience",
        ),
        (
            format!("{head}authenticators:\n  app:\n    jwt: {{algorithms: [HS256], secret: short-secret}}\nroutes:\n  - path: /x\n    auth: {{authenticators: [app]}}\n    respond: {{body: x}}\n"),
            "at least 16 bytes",
        ),
        (
            format!("{head}auth: {{open: true, tokens: [a-real-token]}}\nroutes:\n  - path: /x\n    respond: {{body: x}}\n"),
            "auth.open",
        ),
        (
            format!("{head}{jwt}routes:\n  - path: /x\n    auth: {{authenticators: [app]}}\n    respond: {{body: x}}\n  - path: /y\n    respond: {{body: y}}\n"),
            "routes[1].auth: no authenticator applies",
        ),
    ];
    for (yaml, needle) in cases {
        let (code, out, err) = check_file(&yaml);
        assert_eq!(code, 1, "accepted:\n{yaml}\n{out}{err}");
        assert!(err.contains(needle), "{needle:?} missing from {err}");
    }
    // A 16–31 byte secret is accepted with a warning.
    let yaml = format!("{head}authenticators:\n  app:\n    jwt: {{algorithms: [HS256], secret: sixteen-bytes-ok-20}}\nroutes:\n  - path: /x\n    auth: {{authenticators: [app]}}\n    respond: {{body: x}}\n");
    let (code, out, err) = check_file(&yaml);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        format!("{out}{err}").contains("shorter than 32 bytes"),
        "{out}{err}"
    );
}

#[tokio::test]
async fn routes_show_each_routes_auth() {
    let gw = Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
admin: {{address: "127.0.0.1:0", token: adm}}
authenticators:
  app:
    jwt: {{algorithms: [HS256], secret: "{SECRET}"}}
routes:
  - name: api
    path: /api
    auth: {{authenticators: [app], scopes: [read]}}
    respond: {{body: x}}
  - name: open
    path: /open
    public: true
    respond: {{body: x}}
"#
    ));
    let res = client()
        .get(gw.admin_url("/admin/routes"))
        .bearer_auth("adm")
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = res.json().await.unwrap();
    let auth_of = |name: &str| {
        body["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()["auth"]
            .clone()
    };
    assert_eq!(auth_of("api"), "app scopes=read", "{body}");
    assert_eq!(auth_of("open"), "public", "{body}");
}

fn issuer_gateway(extra_issuer: &str) -> Gateway {
    Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
store: {{data_dir: "{{{{dir}}}}/data"}}
token_issuer:
  algorithm: HS256
  secret: "{SECRET}"
{extra_issuer}
authenticators:
  strict:
    jwt: {{algorithms: [HS256], secret: "{SECRET}"}}
  lenient:
    jwt: {{algorithms: [HS256], secret: "{SECRET}", accept_guest: true}}
routes:
  - name: strict
    path_prefix: /strict
    auth: {{authenticators: [strict]}}
    respond: {{body: strict}}
  - name: lenient
    path_prefix: /lenient
    auth: {{authenticators: [lenient]}}
    respond: {{body: lenient}}
"#
    ))
}

#[tokio::test]
async fn guest_tokens_are_off_by_default_and_refused_unless_accepted() {
    let gw = issuer_gateway("");
    let res = client().post(gw.url("/auth/guest")).send().await.unwrap();
    assert_error(res, 404, "NOT_FOUND").await;

    let gw = issuer_gateway("  guest_path: /auth/guest");
    let res = client().post(gw.url("/auth/guest")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let guest: serde_json::Value = res.json().await.unwrap();
    let token = guest["token"].as_str().unwrap();
    let res = client()
        .get(gw.url("/strict"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
    let res = client()
        .get(gw.url("/lenient"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// The Metacogna reproduction: a guest token (or a `user` one) never opens /build.
#[tokio::test]
async fn metacogna_build_needs_the_build_scope() {
    let up = Upstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let url = up.url();
    let data = dir.path().join("data").display().to_string();
    let env = [
        ("PORTCULLIS_LISTEN", "127.0.0.1:0"),
        ("PORTCULLIS_ADMIN_LISTEN", "127.0.0.1:0"),
        ("GATEWAY_JWT_SECRET", SECRET),
        ("BUILD_SERVICE_URL", url.as_str()),
        ("KV_SERVICE_URL", url.as_str()),
        ("CORE_SERVICE_URL", url.as_str()),
        ("PORTCULLIS_DATA_DIR", data.as_str()),
    ];
    let example =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/metacogna.yaml");
    let cfg = example.display().to_string();
    let (code, out, err) = run_cli_stdin(
        &["user", "add", "bob", "--role", "user", "-c", &cfg],
        &env,
        "a long user password\n",
    );
    assert_eq!(code, 0, "{out}{err}");
    let gw = Gateway::start_file(&example, &env);
    let c = client();
    let guest: serde_json::Value = c
        .post(gw.url("/auth/guest"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let user: serde_json::Value = c
        .post(gw.url("/auth/login"))
        .json(&serde_json::json!({"username": "bob", "password": "a long user password"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for token in [&guest["token"], &user["token"]] {
        let token = token.as_str().unwrap();
        let res = c
            .get(gw.url("/build/jobs"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_error(res, 403, "INSUFFICIENT_SCOPE").await;
        // /kv keeps optional auth, and accepts both.
        let res = c
            .get(gw.url("/kv/k"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
}

#[tokio::test]
async fn login_failures_lock_a_client_not_the_account() {
    let yaml = format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
store: {{data_dir: "{{{{dir}}}}/data"}}
server: {{trusted_proxies: [127.0.0.1]}}
token_issuer:
  algorithm: HS256
  secret: "{SECRET}"
  login_per_username: 3
  login_per_ip: 50
routes:
  - path: /x
    public: true
    respond: {{body: x}}
"#
    );
    let gw = Gateway::start(&yaml);
    let (code, out, err) = run_cli_stdin(
        &[
            "user",
            "add",
            "alice",
            "-c",
            &gw.config_path.display().to_string(),
        ],
        &[],
        "alice's long password\n",
    );
    assert_eq!(code, 0, "{out}{err}");
    let c = client();
    let login = |from: &'static str, password: &'static str| {
        let c = c.clone();
        let url = gw.url("/auth/login");
        async move {
            c.post(url)
                .header("x-forwarded-for", from)
                .json(&serde_json::json!({"username": "alice", "password": password}))
                .send()
                .await
                .unwrap()
        }
    };
    for _ in 0..3 {
        assert_eq!(login("10.0.0.66", "guess").await.status(), 401);
    }
    let res = login("10.0.0.66", "alice's long password").await;
    assert_error(res, 429, "RATE_LIMITED").await;
    // The owner, elsewhere, still gets in.
    let res = login("10.0.0.7", "alice's long password").await;
    assert_eq!(res.status(), 200);
    // IPv6 clients are one client per /64.
    for _ in 0..3 {
        assert_eq!(login("2001:db8:1:2::1", "guess").await.status(), 401);
    }
    let res = login("2001:db8:1:2::99", "alice's long password").await;
    assert_error(res, 429, "RATE_LIMITED").await;
    // Parallel guesses cannot overtake the counter: at most 3 are checked.
    let guesses = (0..12).map(|_| login("10.0.0.99", "parallel guess"));
    let statuses: Vec<u16> = futures_util::future::join_all(guesses)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        9,
        "{statuses:?}"
    );
    // A username's shape is checked before it becomes a store key.
    let res = c
        .post(gw.url("/auth/login"))
        .json(&serde_json::json!({"username": "a:b\n*", "password": "x"}))
        .send()
        .await
        .unwrap();
    assert_error(res, 400, "BAD_REQUEST").await;
    // Oversized login bodies are refused before parsing.
    let res = c
        .post(gw.url("/auth/login"))
        .body(vec![b'x'; 20_000])
        .send()
        .await
        .unwrap();
    assert_error(res, 413, "PAYLOAD_TOO_LARGE").await;
}
