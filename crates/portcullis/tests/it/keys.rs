//! API keys with quotas (FoldForge): CLI and admin API, cache, revocation, quotas that
//! hold across two gateways sharing one Redis.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;
use crate::redis_harness::RedisServer;

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/foldforge.yaml")
}

struct Env {
    vars: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Env {
    /// The FoldForge example with its env; the store is embedded in a temp dir unless
    /// `store` is given.
    fn new(orchestrator: &str, keys_enabled: bool, store: Option<&str>) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let vars = vec![
            ("PORTCULLIS_LISTEN", "127.0.0.1:0".to_owned()),
            ("PORTCULLIS_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
            ("PORTCULLIS_ADMIN_TOKEN", "adm".to_owned()),
            ("FOLDFORGE_GATEWAY__API_TOKEN", "break-glass".to_owned()),
            (
                "FOLDFORGE_GATEWAY__API_KEYS_ENABLED",
                keys_enabled.to_string(),
            ),
            ("FOLDFORGE_GATEWAY__AUTH_CACHE_TTL_SECONDS", "1".to_owned()),
            ("ORCHESTRATOR_URL", orchestrator.to_owned()),
            (
                "PORTCULLIS_DATA_DIR",
                dir.path().join("data").display().to_string(),
            ),
            ("PORTCULLIS_STORE", store.unwrap_or("").to_owned()),
        ];
        Env {
            vars: vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            _dir: dir,
        }
    }

    fn pairs(&self) -> Vec<(&str, &str)> {
        self.vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    fn gateway(&self) -> Gateway {
        Gateway::start_file(&example(), &self.pairs())
    }

    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let cfg = example();
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["-c", cfg.to_str().unwrap()]);
        run_cli(&full, &self.pairs())
    }

    /// `apikey create …`; returns the raw key (the last line).
    fn create_key(&self, args: &[&str]) -> String {
        let mut full = vec!["apikey", "create"];
        full.extend(args);
        let (code, out, err) = self.cli(&full);
        assert_eq!(code, 0, "{out}{err}");
        let key = out.lines().last().unwrap().trim().to_owned();
        assert!(key.starts_with("pcs_"), "{out}");
        key
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_token_keys_quota_and_principal() {
    let up = Upstream::echo().await;
    let env = Env::new(&up.url(), true, None);
    let gw = env.gateway();
    let c = client();

    // Health endpoints of FoldForge.
    assert_eq!(
        c.get(gw.url("/v1/healthz")).send().await.unwrap().status(),
        200
    );
    until_status(&gw.url("/v1/readyz"), 200).await;

    // The CLI works on the embedded store while the gateway runs on it.
    let key = env.create_key(&["alice", "--limit", "3", "--window", "1h", "--name", "ci"]);
    let res = c
        .get(gw.url("/v1/workflows"))
        .bearer_auth(&key)
        .header("ff-principal", "mallory")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(
        body["headers"]["ff-principal"],
        serde_json::json!(["alice"]),
        "{body}"
    );
    assert!(body["headers"].get("authorization").is_none());

    // Quota only on POST /v1/workflows: 3 pass, the 4th is refused with its headers.
    for i in 0..3 {
        let res = c
            .post(gw.url("/v1/workflows"))
            .json(&serde_json::json!({"name": "wf"}))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "request {i}");
        assert_eq!(res.headers()["x-ratelimit-limit"], "3");
        assert_eq!(
            res.headers()["x-ratelimit-remaining"],
            (2 - i).to_string().as_str()
        );
    }
    let res = c
        .post(gw.url("/v1/workflows"))
        .json(&serde_json::json!({"name": "wf"}))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 0 && retry <= 3600, "{retry}");
    assert_eq!(res.headers()["x-ratelimit-remaining"], "0");
    assert!(res.headers().contains_key("x-ratelimit-reset"));
    let body = assert_error(res, 429, "QUOTA_EXCEEDED").await;
    assert_eq!(body["error"]["retryable"], true);
    // Reads are not counted.
    assert_eq!(
        c.get(gw.url("/v1/workflows"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // The admin token is always valid and never quota-limited.
    for _ in 0..5 {
        let res = c
            .post(gw.url("/v1/workflows"))
            .json(&serde_json::json!({"name": "wf"}))
            .bearer_auth("break-glass")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["headers"]["ff-principal"][0], "admin");
    }

    // Bad keys: unknown, tampered, wrong prefix.
    let tampered = format!(
        "{}{}",
        &key[..key.len() - 1],
        if key.ends_with('A') { "B" } else { "A" }
    );
    for bad in [
        tampered.as_str(),
        "pcs_000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "nope",
    ] {
        let res = c
            .get(gw.url("/v1/workflows"))
            .bearer_auth(bad)
            .send()
            .await
            .unwrap();
        assert_error(res, 401, "UNAUTHORIZED").await;
    }

    // Revocation takes effect within the cache TTL (1 s here).
    let (code, out, _) = env.cli(&["apikey", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("principal=alice") && out.contains("quota=3/3600s") && !out.contains(&key),
        "{out}"
    );
    let (code, _, err) = env.cli(&["apikey", "revoke", &key]);
    assert_eq!(code, 0, "{err}");
    let res = until_key_status(&gw.url("/v1/workflows"), &key, 200, 401).await;
    assert_error(res, 401, "UNAUTHORIZED").await;
    // Keys never reach the logs (wait for the last request's access line first).
    assert!(gw.wait_log("\"status\":401", Duration::from_secs(5)).await);
    assert!(!gw.logs().contains(&key));
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_refused_when_disabled() {
    let up = Upstream::echo().await;
    let env = Env::new(&up.url(), false, None);
    let gw = env.gateway();
    let key = env.create_key(&["bob"]);
    let res = client()
        .get(gw.url("/v1/workflows"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
    let res = client()
        .get(gw.url("/v1/workflows"))
        .bearer_auth("break-glass")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_manages_keys() {
    let up = Upstream::echo().await;
    let env = Env::new(&up.url(), true, None);
    let gw = env.gateway();
    let c = client();
    let res = c
        .post(gw.admin_url("/admin/apikeys"))
        .bearer_auth("adm")
        .json(
            &serde_json::json!({"principal": "carol", "scopes": ["a"], "limit": 10, "window": 60}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let created: serde_json::Value = res.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["record"]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        c.get(gw.url("/v1/x"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let list: serde_json::Value = c
        .get(gw.admin_url("/admin/apikeys"))
        .bearer_auth("adm")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["keys"][0]["principal"], "carol");
    assert!(!list.to_string().contains(&key));

    let res = c
        .delete(gw.admin_url(&format!("/admin/apikeys/{id}")))
        .bearer_auth("adm")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Revoked through this instance: forgotten at once, no cache TTL to wait for.

    assert_eq!(
        c.get(gw.url("/v1/x"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    // Without the admin token: refused.
    let res = c.get(gw.admin_url("/admin/apikeys")).send().await.unwrap();
    assert_eq!(res.status(), 401);
}

/// Two gateways on one Redis never admit more than the quota together.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_holds_across_two_gateways_on_one_redis() {
    let up = Upstream::echo().await;
    let redis = RedisServer::start();
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let env = Env::new(&up.url(), true, Some(&url));
    let a = Arc::new(env.gateway());
    let b = Arc::new(env.gateway());
    let key = env.create_key(&["dave", "--limit", "20", "--window", "1h"]);
    let ok = Arc::new(AtomicUsize::new(0));
    let limited = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..60 {
        let gw = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (key, ok, limited) = (key.clone(), ok.clone(), limited.clone());
        tasks.push(tokio::spawn(async move {
            let res = client()
                .post(gw.url("/v1/workflows"))
                .json(&serde_json::json!({"name": "wf"}))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            match res.status().as_u16() {
                200 => ok.fetch_add(1, Ordering::SeqCst),
                429 => limited.fetch_add(1, Ordering::SeqCst),
                other => panic!("unexpected status {other}"),
            };
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(ok.load(Ordering::SeqCst), 20);
    assert_eq!(limited.load(Ordering::SeqCst), 40);
}

/// Redis down: API keys cannot be checked (503, fail-closed); the admin token, which
/// needs no store, still works.
#[tokio::test(flavor = "multi_thread")]
async fn redis_outage_fails_closed_for_keys() {
    let up = Upstream::echo().await;
    let redis = RedisServer::start();
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let env = Env::new(&up.url(), true, Some(&url));
    let gw = env.gateway();
    let key = env.create_key(&["erin"]);
    assert_eq!(
        client()
            .get(gw.url("/v1/x"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    drop(redis);
    // Answered from the key cache until its TTL (1 s) passes, then refused.
    let res = until_key_status(&gw.url("/v1/x"), &key, 200, 503).await;
    assert_error(res, 503, "SERVICE_UNAVAILABLE").await;
    let res = client()
        .get(gw.url("/v1/x"))
        .bearer_auth("break-glass")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_keys_are_refused() {
    let up = Upstream::echo().await;
    let env = Env::new(&up.url(), true, None);
    let gw = env.gateway();
    let key = env.create_key(&["frank", "--expires", "4s"]);
    assert_eq!(
        client()
            .get(gw.url("/v1/x"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let res = until_key_status(&gw.url("/v1/x"), &key, 200, 401).await;
    assert_error(res, 401, "UNAUTHORIZED").await;
}

/// GETs `url` with `key` until the answer is `to` (returned), allowing only `from`
/// before it; fails after 15 s.
async fn until_key_status(url: &str, key: &str, from: u16, to: u16) -> reqwest::Response {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let res = client().get(url).bearer_auth(key).send().await.unwrap();
        let status = res.status().as_u16();
        if status == to {
            return res;
        }
        assert_eq!(status, from, "unexpected status before {to}");
        assert!(
            std::time::Instant::now() < deadline,
            "still {from}, never {to}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A gateway of our own with an `api_key` authenticator (`api_key_yaml` spliced
/// under it), the admin API, and two routes: POST /q counts the key's quota,
/// /write needs the `write` scope, anything else just a valid key.
fn key_config(upstream: &str, store: &str, api_key_yaml: &str) -> String {
    format!(
        r#"listeners:
  - address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
  token: adm
store:
  url: "{store}"
  data_dir: "{{{{dir}}}}/data"
  timeout: 500ms
authenticators:
  keys:
    api_key:
      principal_header: x-principal
{api_key_yaml}
auth:
  default: [keys]
routes:
  - name: quota
    path: /q
    methods: [POST]
    auth: {{quota: true}}
    proxy: {{upstream: {upstream}}}
  - name: write
    path: /write
    auth: {{scopes: [write]}}
    proxy: {{upstream: {upstream}}}
  - name: any
    path_prefix: /
    proxy: {{upstream: {upstream}}}
"#
    )
}

/// Creates a key through the admin API; returns the raw key.
async fn admin_create_key(gw: &Gateway, body: serde_json::Value) -> String {
    let res = client()
        .post(gw.admin_url("/admin/apikeys"))
        .bearer_auth("adm")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let created: serde_json::Value = res.json().await.unwrap();
    created["key"].as_str().unwrap().to_owned()
}

/// A key's scopes are checked like a JWT's: without the route's scope 403
/// INSUFFICIENT_SCOPE (the upstream never sees the request), with it 200.
#[tokio::test(flavor = "multi_thread")]
async fn api_key_scopes_are_enforced() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&key_config(&up.url(), "", ""));
    let reader = admin_create_key(
        &gw,
        serde_json::json!({"principal": "rita", "scopes": ["read"]}),
    )
    .await;
    let writer = admin_create_key(
        &gw,
        serde_json::json!({"principal": "walt", "scopes": ["read", "write"]}),
    )
    .await;
    let unscoped = admin_create_key(&gw, serde_json::json!({"principal": "una"})).await;
    let c = client();

    for key in [&reader, &unscoped] {
        let res = c
            .get(gw.url("/write"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        let www = res.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            www.contains("error=\"insufficient_scope\"") && www.contains("scope=\"write\""),
            "{www}"
        );
        assert_error(res, 403, "INSUFFICIENT_SCOPE").await;
    }
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        0,
        "refused requests went upstream"
    );

    let res = c
        .get(gw.url("/write"))
        .bearer_auth(&writer)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["headers"]["x-principal"][0], "walt", "{body}");
    // A route without scopes takes any valid key.
    for key in [&reader, &unscoped] {
        let res = c
            .get(gw.url("/other"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let res = c.get(gw.url("/write")).send().await.unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
}

/// `quota_fail_open`: with the store (Redis) gone, a key still in the verification
/// cache passes uncounted with fail-open, and is refused 503 without it.
#[tokio::test(flavor = "multi_thread")]
async fn quota_fail_open_lets_requests_through_uncounted() {
    let up = Upstream::echo().await;
    let redis = RedisServer::start();
    let store = redis.url();
    // Verified keys are cached for a minute: only the quota needs the store.
    let open = Gateway::start(&key_config(
        &up.url(),
        &store,
        "      cache_ttl: 60s\n      quota_fail_open: true",
    ));
    let closed = Gateway::start(&key_config(&up.url(), &store, "      cache_ttl: 60s"));
    let key = admin_create_key(
        &open,
        serde_json::json!({"principal": "quinn", "limit": 100, "window": 3600}),
    )
    .await;
    let c = client();

    // Store up: both count (one shared counter in Redis).
    let mut remaining = Vec::new();
    for gw in [&open, &closed] {
        let res = c.post(gw.url("/q")).bearer_auth(&key).send().await.unwrap();
        assert_eq!(res.status(), 200);
        remaining.push(
            res.headers()["x-ratelimit-remaining"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(remaining, ["99", "98"]);

    drop(redis);
    let before = up.requests.load(Ordering::SeqCst);
    // Fail-open: through to the upstream, without rate-limit headers (not counted).
    let res = c
        .post(open.url("/q"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers().get("x-ratelimit-remaining").is_none(),
        "{:?}",
        res.headers()
    );
    assert_eq!(up.requests.load(Ordering::SeqCst), before + 1);
    assert!(
        open.wait_log(
            "letting the request through uncounted",
            Duration::from_secs(5)
        )
        .await,
        "{}",
        open.logs()
    );
    // Fail-closed (the default): 503, and the upstream never sees it.
    let res = c
        .post(closed.url("/q"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_error(res, 503, "SERVICE_UNAVAILABLE").await;
    assert_eq!(up.requests.load(Ordering::SeqCst), before + 1);
    // Routes that count nothing keep working on both (the key is cached).
    for gw in [&open, &closed] {
        let res = c.get(gw.url("/x")).bearer_auth(&key).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
}
