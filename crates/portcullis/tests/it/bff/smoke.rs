//! The provider the session tests rely on runs and speaks OpenID Connect.

use super::idp::{Idp, IdpOptions};
use crate::harness::{client, free_port};

#[tokio::test]
async fn the_test_idp_serves_discovery_and_keys() {
    let port = free_port();
    let idp = Idp::start(
        port,
        &IdpOptions {
            redirect_uris: vec!["http://127.0.0.1:9/auth/callback".into()],
            ..Default::default()
        },
    );
    let c = client();
    let doc: serde_json::Value = c
        .get(format!("{}/.well-known/openid-configuration", idp.issuer()))
        .send()
        .await
        .expect("discovery")
        .json()
        .await
        .expect("discovery json");
    assert_eq!(doc["issuer"], idp.issuer());
    for field in [
        "authorization_endpoint",
        "token_endpoint",
        "jwks_uri",
        "revocation_endpoint",
        "end_session_endpoint",
    ] {
        assert!(doc[field].is_string(), "{field} missing: {doc}");
    }
    assert!(doc["code_challenge_methods_supported"]
        .as_array()
        .is_some_and(|m| m.iter().any(|x| x == "S256")));
    let jwks: serde_json::Value = c
        .get(doc["jwks_uri"].as_str().unwrap_or_default())
        .send()
        .await
        .expect("jwks")
        .json()
        .await
        .expect("jwks json");
    assert!(!jwks["keys"].as_array().expect("keys").is_empty());
    assert!(idp.requests_to("/.well-known/openid-configuration") >= 1);
}
