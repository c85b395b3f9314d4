//! Access-token refresh: once per session however many requests arrive together,
//! on two gateway instances sharing one store; a refused refresh or an expired
//! token without a refresh token ends the session with `SESSION_EXPIRED`.

use std::time::{Duration, Instant};

use super::idp::{Idp, IdpOptions};
use super::login::{gateway_yaml, login, setup_with, to_callback, Browser, Setup};
use crate::harness::{assert_error, client, free_port, Gateway, Upstream};

/// Waits until `t` (the condition is the clock itself: a token's lifetime).
async fn until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        tokio::time::sleep(d).await;
    }
}

fn bearer(echo: &serde_json::Value) -> String {
    echo["headers"]["authorization"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn api(url: &str, sid: &str) -> reqwest::Response {
    client()
        .get(url)
        .header("cookie", format!("sid={sid}"))
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn many_requests_on_two_instances_refresh_once() {
    let (pa, pb, idp_port) = (free_port(), free_port(), free_port());
    let base_a = format!("http://127.0.0.1:{pa}");
    // Access tokens live 4 s and refresh tokens are single use: a second refresh
    // with the same refresh token would be refused and end the session.
    let idp = Idp::start(
        idp_port,
        &IdpOptions {
            redirect_uris: vec![format!("{base_a}/auth/callback")],
            access_ttl: Some(4),
            rotate_refresh: true,
            ..Default::default()
        },
    );
    let upstream = Upstream::echo().await;
    let shared = tempfile::tempdir().unwrap();
    let data = shared.path().display().to_string();
    // max_age is checked at login only: a refreshed ID token keeps the login's
    // auth_time, older than 2 s by the time of the refresh.
    let extra =
        "      refresh_skew: 2s\n      forward_access_token: true\n      id_token_max_age: 2s\n";
    let a = Gateway::start(&gateway_yaml(
        pa,
        &idp.issuer(),
        &upstream.url(),
        "portcullis",
        &data,
        extra,
    ));
    let b = Gateway::start(&gateway_yaml(
        pb,
        &idp.issuer(),
        &upstream.url(),
        "portcullis",
        &data,
        extra,
    ));

    let browser = Browser::default();
    let res = browser.get(&format!("{base_a}/auth/login"), &[]).await;
    let authorize = res.headers()["location"].to_str().unwrap().to_owned();
    let callback = to_callback(
        &browser,
        &authorize,
        &format!("{base_a}/auth/callback"),
        "alice",
    )
    .await;
    let issued = Instant::now();
    assert_eq!(
        browser.get(&callback, &[]).await.status(),
        302,
        "{}",
        a.logs()
    );
    let sid = browser.cookie("sid").unwrap();

    // The session's access token reaches the upstream, on either instance.
    let first: serde_json::Value = api(&format!("{base_a}/api/x"), &sid)
        .await
        .json()
        .await
        .unwrap();
    let t1 = bearer(&first);
    assert!(t1.starts_with("Bearer ey"), "a JWT access token: {first}");
    let on_b: serde_json::Value = api(&format!("http://127.0.0.1:{pb}/api/x"), &sid)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(bearer(&on_b), t1);
    assert_eq!(idp.count("grant.success", Some("refresh_token")), 0);

    // Within the refresh skew (2 s before expiry), 20 requests at once, half on
    // each instance.
    until(issued + Duration::from_millis(2500)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let url = if i % 2 == 0 {
            format!("{base_a}/api/{i}")
        } else {
            format!("http://127.0.0.1:{pb}/api/{i}")
        };
        let sid = sid.clone();
        tasks.spawn(async move { api(&url, &sid).await.status().as_u16() });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 200, "{}\n{}", a.logs(), b.logs());
    }
    // Exactly one refresh at the provider; the next request carries the new token.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now: serde_json::Value = api(&format!("{base_a}/api/after"), &sid)
            .await
            .json()
            .await
            .unwrap();
        if bearer(&now) != t1 {
            break;
        }
        assert!(Instant::now() < deadline, "the token was never refreshed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        idp.count("grant.success", Some("refresh_token")),
        1,
        "{:?}",
        idp.events()
    );
    assert_eq!(idp.count("grant.error", None), 0, "{:?}", idp.events());
    let me = api(&format!("http://127.0.0.1:{pb}/auth/me"), &sid).await;
    assert_eq!(me.status(), 200);
    // The refresh token never reaches a log.
    assert!(!a.logs().contains(t1.trim_start_matches("Bearer ")));
}

async fn logged_in(s: &Setup, user: &str) -> (String, Instant) {
    let b = Browser::default();
    let res = login(s, &b, user, "").await;
    let at = Instant::now();
    assert_eq!(res.status(), 302, "{}", s.gw.logs());
    (b.cookie("sid").unwrap(), at)
}

#[tokio::test]
async fn a_refused_refresh_ends_the_session() {
    // The refresh token expires after 1 s, the access token after 2 s.
    let s = setup_with(
        IdpOptions {
            access_ttl: Some(2),
            refresh_ttl: Some(1),
            ..Default::default()
        },
        "      refresh_skew: 1s\n",
        "portcullis",
    )
    .await;
    let (sid, at) = logged_in(&s, "bob").await;
    until(at + Duration::from_millis(2500)).await;
    let res = api(&format!("{}/api/x", s.base), &sid).await;
    let cleared = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .any(|v| v.to_str().unwrap().starts_with("sid=;"));
    assert!(cleared, "the cookie is removed");
    assert_error(res, 401, "SESSION_EXPIRED").await;
    assert!(s.idp.count("grant.error", Some("refresh_token")) >= 1);
    // The session is gone for good.
    assert_error(
        api(&format!("{}/auth/me", s.base), &sid).await,
        401,
        "UNAUTHORIZED",
    )
    .await;
}

#[tokio::test]
async fn an_expired_token_without_refresh_token_ends_the_session() {
    // A client the provider gives no refresh token.
    let s = setup_with(
        IdpOptions {
            access_ttl: Some(2),
            ..Default::default()
        },
        "      refresh_skew: 1s\n",
        "norefresh",
    )
    .await;
    let (sid, at) = logged_in(&s, "carol").await;
    // Valid (even within the skew): served.
    assert_eq!(
        api(&format!("{}/auth/me", s.base), &sid).await.status(),
        200
    );
    until(at + Duration::from_millis(3000)).await;
    assert_error(
        api(&format!("{}/auth/me", s.base), &sid).await,
        401,
        "SESSION_EXPIRED",
    )
    .await;
    assert_error(
        api(&format!("{}/api/x", s.base), &sid).await,
        401,
        "UNAUTHORIZED",
    )
    .await;
    assert_eq!(s.idp.count("grant.success", Some("refresh_token")), 0);
}
