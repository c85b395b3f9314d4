//! Tokens the gateway issues (Metacogna): login against users in the store, guest
//! tokens, legacy salted-SHA-256 import upgraded to argon2id, login rate limits.

use std::path::PathBuf;
use std::time::Duration;

use crate::harness::*;

const SECRET: &str = "metacogna-secret-0123456789abcdef";

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/metacogna.yaml")
}

struct Env {
    vars: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

impl Env {
    fn new(build: &str, kv: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let vars = vec![
            ("PORTCULLIS_LISTEN", "127.0.0.1:0".to_owned()),
            ("PORTCULLIS_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
            ("GATEWAY_JWT_SECRET", SECRET.to_owned()),
            ("BUILD_SERVICE_URL", build.to_owned()),
            ("KV_SERVICE_URL", kv.to_owned()),
            ("CORE_SERVICE_URL", kv.to_owned()),
            (
                "PORTCULLIS_DATA_DIR",
                dir.path().join("data").display().to_string(),
            ),
        ];
        Env {
            vars: vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            dir,
        }
    }

    fn pairs(&self) -> Vec<(&str, &str)> {
        self.vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    fn cli(&self, args: &[&str], stdin: &str) -> (i32, String, String) {
        let cfg = example();
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["-c", cfg.to_str().unwrap()]);
        run_cli_stdin(&full, &self.pairs(), stdin)
    }
}

async fn login(gw: &Gateway, user: &str, password: &str) -> reqwest::Response {
    client()
        .post(gw.url("/auth/login"))
        .json(&serde_json::json!({"username": user, "password": password}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn login_issues_tokens_the_gateway_accepts() {
    let build = Upstream::echo().await;
    let kv = Upstream::echo().await;
    let env = Env::new(&build.url(), &kv.url());
    let (code, out, err) = env.cli(
        &["user", "add", "alice", "--role", "admin"],
        "correct horse battery\n",
    );
    assert_eq!(code, 0, "{out}{err}");
    let gw = Gateway::start_file(&example(), &env.pairs());
    let c = client();

    let res = login(&gw, "alice", "correct horse battery").await;
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 86400);
    let token = body["token"].as_str().unwrap().to_owned();

    // /build needs the token; the prefix is stripped; identity travels as headers.
    assert_error(
        c.get(gw.url("/build/jobs")).send().await.unwrap(),
        401,
        "UNAUTHORIZED",
    )
    .await;
    let res = c
        .get(gw.url("/build/jobs"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let echo: serde_json::Value = res.json().await.unwrap();
    assert_eq!(echo["path"], "/jobs");
    assert_eq!(echo["headers"]["x-user"][0], "alice");
    assert_eq!(echo["headers"]["x-user-role"][0], "admin");

    // /kv: optional — anonymous is fine, a bad token is not.
    assert_eq!(c.get(gw.url("/kv/k1")).send().await.unwrap().status(), 200);
    assert_eq!(
        c.get(gw.url("/kv/k1"))
            .bearer_auth("forged.token.value")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    // Wrong password and unknown user: the same answer.
    let wrong = login(&gw, "alice", "wrong password!").await;
    let wrong_body = assert_error(wrong, 401, "UNAUTHORIZED").await;
    let unknown = login(&gw, "nobody", "wrong password!").await;
    let unknown_body = assert_error(unknown, 401, "UNAUTHORIZED").await;
    assert_eq!(
        wrong_body["error"]["message"],
        unknown_body["error"]["message"]
    );

    // Malformed bodies: 400; GET: 405.
    let res = c
        .post(gw.url("/auth/login"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_error(res, 400, "BAD_REQUEST").await;
    let res = c.get(gw.url("/auth/login")).send().await.unwrap();
    assert_error(res, 405, "METHOD_NOT_ALLOWED").await;

    // Guest tokens: short-lived, accepted by the gateway's own JWT authenticator.
    let res = c.post(gw.url("/auth/guest")).send().await.unwrap();
    let guest: serde_json::Value = res.json().await.unwrap();
    assert_eq!(guest["expires_in"], 3600);
    let res = c
        .get(gw.url("/core/x"))
        .bearer_auth(guest["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let echo: serde_json::Value = res.json().await.unwrap();
    assert_eq!(echo["headers"]["x-user-role"][0], "guest");
    assert!(echo["headers"]["x-user"][0]
        .as_str()
        .unwrap()
        .starts_with("guest-"));

    // Passwords and tokens never reach the logs (wait for the access lines first).
    assert!(
        gw.wait_log("\"route\":\"core\"", Duration::from_secs(5))
            .await
    );
    let logs = gw.logs();
    assert!(!logs.contains("correct horse battery") && !logs.contains(&token));
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_records_are_imported_and_upgraded() {
    use sha2_for_tests::legacy_hash;
    let up = Upstream::echo().await;
    let env = Env::new(&up.url(), &up.url());
    let records = serde_json::json!([
        {"username": "olduser", "salt": "s4lt", "hash": legacy_hash("s4lt", "legacy-pass"), "role": "user"}
    ]);
    let file = env.dir.path().join("admins.json");
    std::fs::write(&file, records.to_string()).unwrap();
    let (code, out, err) = env.cli(&["user", "import", file.to_str().unwrap()], "");
    assert_eq!(code, 0, "{out}{err}");
    let (_, out, _) = env.cli(&["user", "list"], "");
    assert!(
        out.contains("olduser") && out.contains("legacy-sha256"),
        "{out}"
    );

    let gw = Gateway::start_file(&example(), &env.pairs());
    assert_eq!(login(&gw, "olduser", "legacy-pass").await.status(), 200);
    let (_, out, _) = env.cli(&["user", "list"], "");
    assert!(
        out.contains("argon2id") && !out.contains("legacy-sha256"),
        "upgraded at first login: {out}"
    );
    assert_eq!(login(&gw, "olduser", "legacy-pass").await.status(), 200);
    assert_eq!(login(&gw, "olduser", "other").await.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn login_attempts_are_rate_limited_per_username() {
    let up = Upstream::echo().await;
    let env = Env::new(&up.url(), &up.url());
    let gw = Gateway::start_file(&example(), &env.pairs());
    // The default allows 5 failures per (client, username) per minute.
    for _ in 0..5 {
        assert_eq!(login(&gw, "victim", "guess").await.status(), 401);
    }
    let res = login(&gw, "victim", "guess").await;
    assert!(res.headers().contains_key("retry-after"));
    assert_error(res, 429, "RATE_LIMITED").await;
}

#[test]
fn user_cli_rejects_weak_passwords_and_duplicates() {
    let env = Env::new("http://127.0.0.1:1", "http://127.0.0.1:1");
    let (code, _, err) = env.cli(&["user", "add", "bob"], "short\n");
    assert_eq!(code, 1);
    assert!(err.contains("too short"), "{err}");
    assert_eq!(env.cli(&["user", "add", "bob"], "long enough pass\n").0, 0);
    let (code, _, err) = env.cli(&["user", "add", "bob"], "long enough pass\n");
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        env.cli(&["user", "passwd", "bob"], "another long one\n").0,
        0
    );
    assert_eq!(env.cli(&["user", "remove", "bob"], "").0, 0);
    assert_eq!(env.cli(&["user", "remove", "bob"], "").0, 1);
}

mod sha2_for_tests {
    /// Metacogna's salted SHA-256: hex(SHA-256(salt ‖ password)).
    pub fn legacy_hash(salt: &str, password: &str) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(format!("{salt}{password}").as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Redis down: logins cannot be checked or counted, so they answer 503 (fail-closed);
/// the gateway keeps serving and recovers with Redis.
#[tokio::test(flavor = "multi_thread")]
async fn login_with_redis_down_is_a_503() {
    use crate::redis_harness::RedisServer;
    let up = Upstream::echo().await;
    let redis = RedisServer::start();
    let port = redis.port;
    let mut env = Env::new(&up.url(), &up.url());
    env.vars.push((
        "PORTCULLIS_STORE".into(),
        format!("redis://127.0.0.1:{port}"),
    ));
    let (code, out, err) = env.cli(&["user", "add", "gina"], "a good password\n");
    assert_eq!(code, 0, "{out}{err}");
    let gw = Gateway::start_file(&example(), &env.pairs());
    assert_eq!(login(&gw, "gina", "a good password").await.status(), 200);
    drop(redis);
    let res = login(&gw, "gina", "a good password").await;
    assert_error(res, 503, "SERVICE_UNAVAILABLE").await;
    assert_eq!(
        client().get(gw.url("/kv/x")).send().await.unwrap().status(),
        200
    );
    let _redis = RedisServer::start_on(port);
    // The test Redis keeps nothing on disk: add the user again.
    let (code, out, err) = env.cli(&["user", "add", "gina"], "a good password\n");
    assert_eq!(code, 0, "{out}{err}");
    let mut ok = false;
    for _ in 0..50 {
        if login(&gw, "gina", "a good password").await.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "logins work again once Redis is back");
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_tokens_and_login_failures_are_limited_per_ip() {
    let up = Upstream::echo().await;
    let env = Env::new(&up.url(), &up.url());
    let gw = Gateway::start_file(&example(), &env.pairs());
    // The default allows 20 guest tokens per client IP per minute.
    for i in 0..20 {
        let res = client().post(gw.url("/auth/guest")).send().await.unwrap();
        assert_eq!(res.status(), 200, "attempt {i}");
    }
    let res = client().post(gw.url("/auth/guest")).send().await.unwrap();
    assert_error(res, 429, "RATE_LIMITED").await;
    // And 20 failed logins per client, whatever the usernames; then even a new name
    // is refused from that client.
    for i in 0..20 {
        assert_eq!(login(&gw, &format!("user{i}"), "x").await.status(), 401);
    }
    let res = login(&gw, "someone-new", "whatever").await;
    assert_error(res, 429, "RATE_LIMITED").await;
}

/// `role_scopes`: the scopes of a user's role land in the `scope` claim of the
/// token the gateway issues, and gate scoped routes through its JWT authenticator.
#[tokio::test(flavor = "multi_thread")]
async fn role_scopes_land_in_tokens_and_gate_routes() {
    let up = Upstream::echo().await;
    let yaml = format!(
        r#"listeners:
  - address: 127.0.0.1:0
store:
  data_dir: "{{{{dir}}}}/data"
token_issuer:
  secret: "{SECRET}"
  issuer: role-test
  guest_path: ""
  role_scopes:
    admin: [deploy, read]
    viewer: [read]
authenticators:
  issued:
    jwt:
      algorithms: [HS256]
      secret: "{SECRET}"
      issuer: [role-test]
      claim_headers: {{role: X-Role}}
auth:
  default: [issued]
routes:
  - name: deploy
    path: /deploy
    auth: {{scopes: [deploy]}}
    proxy: {{upstream: {up}}}
  - name: read
    path: /read
    auth: {{scopes: [read]}}
    proxy: {{upstream: {up}}}
  - name: plain
    path: /plain
    proxy: {{upstream: {up}}}
"#,
        up = up.url()
    );
    let gw = Gateway::start(&yaml);
    let cfg = gw.config_path.to_str().unwrap().to_owned();
    for (user, role) in [("ada", "admin"), ("vic", "viewer"), ("nora", "nobody")] {
        let (code, out, err) = run_cli_stdin(
            &["user", "add", user, "--role", role, "-c", &cfg],
            &[],
            "a long enough password\n",
        );
        assert_eq!(code, 0, "{out}{err}");
    }
    let mut tokens = std::collections::HashMap::new();
    for user in ["ada", "vic", "nora"] {
        let res = login(&gw, user, "a long enough password").await;
        assert_eq!(res.status(), 200);
        let body: serde_json::Value = res.json().await.unwrap();
        tokens.insert(user, body["token"].as_str().unwrap().to_owned());
    }

    // The claim itself (the payload, base64url JSON).
    let scope_of = |token: &str| {
        use base64::Engine;
        let payload = token.split('.').nth(1).unwrap();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        let claims: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        claims["scope"].clone()
    };
    assert_eq!(scope_of(&tokens["ada"]), "deploy read");
    assert_eq!(scope_of(&tokens["vic"]), "read");
    // A role without an entry gets no scope at all.
    let none = scope_of(&tokens["nora"]);
    assert!(none.is_null() || none == "", "{none}");

    let c = client();
    let status = |path: &'static str, user: &'static str| {
        let req = c.get(gw.url(path)).bearer_auth(&tokens[user]);
        async move { req.send().await.unwrap() }
    };
    assert_eq!(status("/deploy", "ada").await.status(), 200);
    assert_eq!(status("/read", "ada").await.status(), 200);
    let res = status("/deploy", "vic").await;
    assert_error(res, 403, "INSUFFICIENT_SCOPE").await;
    let res = status("/read", "vic").await;
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["headers"]["x-role"][0], "viewer", "{body}");
    for path in ["/deploy", "/read"] {
        let res = status(path, "nora").await;
        assert_error(res, 403, "INSUFFICIENT_SCOPE").await;
    }
    // Any valid token opens a route without scopes.
    assert_eq!(status("/plain", "nora").await.status(), 200);
}

/// The login and guest endpoints are routes like any other: `portcullis routes`
/// lists them, a user route on the same exact path is a conflict `check` reports,
/// and any other method is a 405 with `Allow: POST`.
#[tokio::test]
async fn login_endpoints_are_generated_routes() {
    let yaml = r#"listeners: [{address: "127.0.0.1:0"}]
token_issuer:
  secret: "login-routes-secret-0123456789ab"
  guest_path: /auth/guest
routes:
  - path: /auth/login
    public: true
    respond: {status: 200}
"#;
    let dir = tempfile::tempdir().unwrap();
    let p = write_config(dir.path(), yaml);
    let (code, _out, err) = run_cli(&["check", "-c", &p.display().to_string()], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("token_issuer") && err.contains("/auth/login"),
        "{err}"
    );

    let ok = yaml.replace("  - path: /auth/login\n", "  - path: /other\n");
    let p = write_config(dir.path(), &ok);
    let (code, out, err) = run_cli(&["routes", "-c", &p.display().to_string()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("/auth/login") && out.contains("login"),
        "{out}"
    );
    assert!(
        out.contains("/auth/guest") && out.contains("guest token"),
        "{out}"
    );

    let gw = Gateway::start(&ok);
    let res = client().get(gw.url("/auth/login")).send().await.unwrap();
    assert_eq!(res.headers()["allow"], "POST");
    assert_error(res, 405, "METHOD_NOT_ALLOWED").await;
}
