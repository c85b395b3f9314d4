//! API clients on session routes: the provider's JWT access tokens for the API's
//! audience are accepted as bearer tokens, verified against its key set — never by
//! calling the provider per request. ID tokens and other audiences are refused.

use super::login::{login, setup, Browser};
use crate::harness::{assert_error, client};

#[tokio::test]
async fn access_tokens_of_the_provider_work_as_bearer_tokens() {
    let s = setup(
        "      forward_access_token: true\n      end_session: true\n      bearer_audience: [\"https://api.test\"]\n",
    )
    .await;
    let b = Browser::default();
    assert_eq!(login(&s, &b, "alice", "").await.status(), 302);
    // The session's access token, as its upstream sees it.
    let echo: serde_json::Value = b
        .get(&format!("{}/api/x", s.base), &[])
        .await
        .json()
        .await
        .unwrap();
    let access = echo["headers"]["authorization"][0]
        .as_str()
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_owned();
    // An ID token, from the RP-initiated logout URL (id_token_hint).
    let res = b
        .post(&format!("{}/auth/logout", s.base), &[("origin", &s.base)])
        .await;
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let id_token = location
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("id_token_hint="))
        .expect("id_token_hint")
        .to_owned();
    let userinfo_before = s.idp.requests_to("/me");

    let call = |token: String| {
        client()
            .get(format!("{}/api/y", s.base))
            .header("authorization", format!("Bearer {token}"))
            .header("x-user-sub", "admin")
            .send()
    };
    for _ in 0..3 {
        let res = call(access.clone()).await.unwrap();
        assert_eq!(res.status(), 200, "{}", s.gw.logs());
        let echo: serde_json::Value = res.json().await.unwrap();
        assert_eq!(echo["headers"]["x-user-sub"], serde_json::json!(["alice"]));
        // The client's own token is replaced by nothing of the session's: it is the
        // credential, removed before proxying (no session to forward).
        assert!(echo["headers"]["authorization"].is_null(), "{echo}");
    }
    assert_error(call(id_token).await.unwrap(), 401, "UNAUTHORIZED").await;
    let mut tampered = access.clone();
    tampered.pop();
    tampered.push(if access.ends_with('A') { 'B' } else { 'A' });
    assert_error(call(tampered).await.unwrap(), 401, "UNAUTHORIZED").await;
    assert_error(call("not-a-jwt".into()).await.unwrap(), 401, "UNAUTHORIZED").await;
    // No request ever asked the provider who the token belongs to.
    assert_eq!(s.idp.requests_to("/me"), userinfo_before);
    // A bearer client is not a browser: no Origin needed for a POST.
    let res = client()
        .post(format!("{}/api/z", s.base))
        .header("authorization", format!("Bearer {access}"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn without_bearer_audience_tokens_are_not_accepted() {
    let s = setup("      forward_access_token: true\n").await;
    let b = Browser::default();
    assert_eq!(login(&s, &b, "bob", "").await.status(), 302);
    let echo: serde_json::Value = b
        .get(&format!("{}/api/x", s.base), &[])
        .await
        .json()
        .await
        .unwrap();
    let access = echo["headers"]["authorization"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let res = client()
        .get(format!("{}/api/y", s.base))
        .header("authorization", access)
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
}
