//! A provider that lies: every ID-token check of the callback is proven by a token
//! that breaks exactly that rule (the control case, a valid token, passes). No
//! session is created for any of them.

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use hyper::body::Incoming;
use portcullis_auth::jwt::Algorithm;
use serde_json::{json, Value};

use super::login::{gateway_yaml, Browser};
use crate::harness::{assert_error, free_port, full, BoxBody, Gateway, Upstream};
use crate::jwt_support::{jwk, jwks, now, sign, sign_with, signing_key};

const CLIENT: &str = "portcullis";

/// What the provider's token endpoint answers for the next exchange.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Lie {
    Honest,
    WrongNonce,
    OtherAudience,
    SeveralAudiencesNoAzp,
    OtherAzp,
    OtherIssuer,
    Expired,
    NoSub,
    HmacWithClientSecret,
    UnknownKey,
    AlgNone,
    NoIdToken,
    ServerError,
    HugeBody,
    MaxAgeExceeded,
}

struct State {
    lie: Lie,
    nonce: String,
    issuer: String,
}

fn json_response(status: u16, body: String) -> Response<BoxBody> {
    let mut res = Response::new(full(body));
    *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
    res.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    res
}

fn id_token(st: &State) -> Option<String> {
    let mut claims = json!({
        "iss": st.issuer, "sub": "mallory", "aud": CLIENT, "exp": now() + 300,
        "iat": now(), "nonce": st.nonce, "auth_time": now(),
    });
    let rs = |c: &Value| Some(sign(Algorithm::RS256, Some("k1"), c));
    match st.lie {
        Lie::Honest => rs(&claims),
        Lie::WrongNonce => {
            claims["nonce"] = json!("not-the-nonce");
            rs(&claims)
        }
        Lie::OtherAudience => {
            claims["aud"] = json!("another-client");
            rs(&claims)
        }
        Lie::SeveralAudiencesNoAzp => {
            claims["aud"] = json!([CLIENT, "another-client"]);
            rs(&claims)
        }
        Lie::OtherAzp => {
            claims["azp"] = json!("another-client");
            rs(&claims)
        }
        Lie::OtherIssuer => {
            claims["iss"] = json!("https://evil.test");
            rs(&claims)
        }
        Lie::Expired => {
            claims["exp"] = json!(now() - 3600);
            rs(&claims)
        }
        Lie::NoSub => {
            claims.as_object_mut().unwrap().remove("sub");
            rs(&claims)
        }
        Lie::HmacWithClientSecret => {
            let key =
                jsonwebtoken::EncodingKey::from_secret(b"test-secret-test-secret-test-secret");
            Some(sign_with(Algorithm::HS256, &key, Some("k1"), &claims))
        }
        Lie::UnknownKey => Some(sign_with(
            Algorithm::RS256,
            &signing_key(Algorithm::RS256, "rsa2"),
            Some("k2"),
            &claims,
        )),
        Lie::AlgNone => {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            Some(format!(
                "{}.{}.",
                b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
                b64.encode(claims.to_string())
            ))
        }
        Lie::MaxAgeExceeded => {
            claims["auth_time"] = json!(now() - 7200);
            rs(&claims)
        }
        Lie::NoIdToken | Lie::ServerError | Lie::HugeBody => None,
    }
}

async fn provider(state: Arc<Mutex<State>>) -> Upstream {
    Upstream::serve(false, move |req: Request<Incoming>| {
        let state = state.clone();
        async move {
            let st = state.lock().unwrap();
            match req.uri().path() {
                "/.well-known/openid-configuration" => json_response(
                    200,
                    json!({
                        "issuer": st.issuer,
                        "authorization_endpoint": format!("{}/authorize", st.issuer),
                        "token_endpoint": format!("{}/token", st.issuer),
                        "jwks_uri": format!("{}/jwks", st.issuer),
                        // HS256 listed: the gateway must still refuse HMAC ID tokens.
                        "id_token_signing_alg_values_supported": ["RS256", "HS256"],
                    })
                    .to_string(),
                ),
                "/jwks" => json_response(200, jwks(vec![jwk(Algorithm::RS256, "rsa1", "k1")])),
                "/token" => match st.lie {
                    Lie::ServerError => json_response(500, "{\"error\":\"server_error\"}".into()),
                    Lie::HugeBody => json_response(200, " ".repeat(2 * 1024 * 1024)),
                    _ => {
                        let mut body = json!({
                            "access_token": "at", "token_type": "Bearer", "expires_in": 300,
                        });
                        if let Some(t) = id_token(&st) {
                            body["id_token"] = json!(t);
                        }
                        json_response(200, body.to_string())
                    }
                },
                _ => json_response(404, "{}".into()),
            }
        }
    })
    .await
}

fn query_param(url: &str, name: &str) -> String {
    url.split(['?', '&'])
        .find_map(|p| p.strip_prefix(&format!("{name}=")))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn every_lie_in_an_id_token_is_a_502_and_no_session() {
    let state = Arc::new(Mutex::new(State {
        lie: Lie::Honest,
        nonce: String::new(),
        issuer: String::new(),
    }));
    let idp = provider(state.clone()).await;
    state.lock().unwrap().issuer = idp.url();
    let port = free_port();
    let up = Upstream::echo().await;
    let gw = Gateway::start(&gateway_yaml(
        port,
        &idp.url(),
        &up.url(),
        CLIENT,
        "{{dir}}/data",
        "      id_token_max_age: 1h\n",
    ));
    let base = format!("http://127.0.0.1:{port}");
    let lies = [
        Lie::WrongNonce,
        Lie::OtherAudience,
        Lie::SeveralAudiencesNoAzp,
        Lie::OtherAzp,
        Lie::OtherIssuer,
        Lie::Expired,
        Lie::NoSub,
        Lie::HmacWithClientSecret,
        Lie::UnknownKey,
        Lie::AlgNone,
        Lie::NoIdToken,
        Lie::ServerError,
        Lie::HugeBody,
        Lie::MaxAgeExceeded,
        Lie::Honest,
    ];
    for lie in lies {
        let b = Browser::default();
        let res = b.get(&format!("{base}/auth/login"), &[]).await;
        assert_eq!(res.status(), 302, "{}", gw.logs());
        let authorize = res.headers()["location"].to_str().unwrap().to_owned();
        assert_eq!(query_param(&authorize, "max_age"), "3600");
        {
            let mut st = state.lock().unwrap();
            st.lie = lie;
            st.nonce = query_param(&authorize, "nonce");
        }
        let state_param = query_param(&authorize, "state");
        let res = b
            .get(
                &format!("{base}/auth/callback?code=c&state={state_param}"),
                &[],
            )
            .await;
        if lie == Lie::Honest {
            assert_eq!(res.status(), 302, "the control case: {}", gw.logs());
            assert!(b.cookie("sid").is_some());
        } else {
            let body = assert_error(res, 502, "IDP_ERROR").await;
            assert!(b.cookie("sid").is_none(), "{lie:?} made a session");
            let text = body.to_string();
            assert!(
                !text.contains("mallory") && !text.contains("server_error"),
                "{text}"
            );
        }
    }
}
