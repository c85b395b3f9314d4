//! Where sessions live: a session survives a gateway restart (embedded store), is
//! shared by instances on one Redis, and a dead Redis is a 503 — never a 401 that
//! would log users out, never a crash.

use std::time::{Duration, Instant};

use super::idp::{Idp, IdpOptions};
use super::login::{gateway_yaml, to_callback, Browser};
use crate::harness::{assert_error, client, free_port, Gateway, Upstream};
use crate::redis_harness::RedisServer;

async fn me(base: &str, sid: &str) -> reqwest::Response {
    client()
        .get(format!("{base}/auth/me"))
        .header("cookie", format!("sid={sid}"))
        .send()
        .await
        .expect("request")
}

/// Logs `user` in through the gateway at `base`; returns the session id.
async fn login_at(base: &str, user: &str) -> String {
    let b = Browser::default();
    let res = b.get(&format!("{base}/auth/login"), &[]).await;
    assert_eq!(res.status(), 302);
    let authorize = res.headers()["location"].to_str().unwrap().to_owned();
    let callback = to_callback(&b, &authorize, &format!("{base}/auth/callback"), user).await;
    assert_eq!(b.get(&callback, &[]).await.status(), 302);
    b.cookie("sid").expect("session cookie")
}

#[tokio::test]
async fn a_session_survives_a_restart_on_the_embedded_store() {
    let (port, idp_port) = (free_port(), free_port());
    let base = format!("http://127.0.0.1:{port}");
    let idp = Idp::start(
        idp_port,
        &IdpOptions {
            redirect_uris: vec![format!("{base}/auth/callback")],
            ..Default::default()
        },
    );
    let up = Upstream::echo().await;
    let data = tempfile::tempdir().unwrap();
    let yaml = gateway_yaml(
        port,
        &idp.issuer(),
        &up.url(),
        "portcullis",
        &data.path().display().to_string(),
        "",
    );
    let mut gw = Gateway::start(&yaml);
    let sid = login_at(&base, "alice").await;
    assert_eq!(me(&base, &sid).await.status(), 200);
    assert!(gw.terminate().success());
    let gw = Gateway::start(&yaml);
    let res = me(&base, &sid).await;
    assert_eq!(res.status(), 200, "{}", gw.logs());
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["sub"], "alice");
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_share_sessions_on_redis_and_a_dead_redis_is_a_503() {
    let redis = RedisServer::start();
    let (pa, pb, idp_port) = (free_port(), free_port(), free_port());
    let (base_a, base_b) = (
        format!("http://127.0.0.1:{pa}"),
        format!("http://127.0.0.1:{pb}"),
    );
    let idp = Idp::start(
        idp_port,
        &IdpOptions {
            redirect_uris: vec![format!("{base_a}/auth/callback")],
            ..Default::default()
        },
    );
    let up = Upstream::echo().await;
    let yaml = |port: u16| {
        gateway_yaml(
            port,
            &idp.issuer(),
            &up.url(),
            "portcullis",
            "{{dir}}/data",
            "",
        )
        .replace(
            "store: {data_dir:",
            &format!(
                "store: {{url: \"redis://127.0.0.1:{}\", timeout: 500ms, data_dir:",
                redis.port
            ),
        )
    };
    let a = Gateway::start(&yaml(pa));
    let b = Gateway::start(&yaml(pb));
    let sid = login_at(&base_a, "bob").await;
    // Made on A, used on B.
    let res = me(&base_b, &sid).await;
    assert_eq!(res.status(), 200, "{}", b.logs());
    let api = client()
        .get(format!("{base_b}/api/x"))
        .header("cookie", format!("sid={sid}"))
        .send()
        .await
        .unwrap();
    let echo: serde_json::Value = api.json().await.unwrap();
    assert_eq!(echo["headers"]["x-user-sub"], serde_json::json!(["bob"]));

    // Redis gone: the session can be neither confirmed nor denied → 503.
    redis.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let res = me(&base_b, &sid).await;
        if res.status() == 503 {
            assert_error(res, 503, "SERVICE_UNAVAILABLE").await;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {} without Redis",
            res.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let res = client()
        .get(format!("{base_a}/api/x"))
        .header("cookie", format!("sid={sid}"))
        .send()
        .await
        .unwrap();
    assert_error(res, 503, "SERVICE_UNAVAILABLE").await;
    let res = client()
        .get(format!("{base_a}/auth/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503, "{}", a.logs());
}
