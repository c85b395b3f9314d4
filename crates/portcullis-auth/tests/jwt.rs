mod support;

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::EncodingKey;
use portcullis_auth::jwt::{
    weak_hs_secret, Algorithm, JwtConfig, JwtError, JwtSetupError, JwtVerifier, KeySource,
};
use serde_json::json;
use support::*;

fn pem_config(algs: Vec<Algorithm>, pems: Vec<Vec<u8>>) -> JwtConfig {
    JwtConfig::new(algs, KeySource::Pem(pems))
}

async fn pem_verifier(algs: Vec<Algorithm>, pems: Vec<Vec<u8>>) -> JwtVerifier {
    JwtVerifier::new(pem_config(algs, pems)).await.unwrap()
}

/// A JWKS config that checks no audience (test tokens carry none).
fn jwks_config(algs: Vec<Algorithm>, source: KeySource) -> JwtConfig {
    let mut cfg = JwtConfig::new(algs, source);
    cfg.allow_any_audience = true;
    cfg
}

fn jwks_source(url: &str, min_refetch: Duration) -> KeySource {
    KeySource::Jwks {
        url: url.to_owned(),
        refresh_interval: Duration::from_secs(3600),
        min_refetch_interval: min_refetch,
        timeout: Duration::from_secs(5),
        ca_file: None,
    }
}

const ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

// ---------------------------------------------------------------------------
// Every algorithm (also proves a crypto backend is compiled in: without one
// jsonwebtoken panics on first use).

#[tokio::test]
async fn every_algorithm_signs_and_verifies_with_static_keys() {
    for alg in Algorithm::ALL {
        let keys = if alg.is_hmac() {
            KeySource::Secret(SECRET.to_vec())
        } else {
            KeySource::Pem(vec![public_pem(alg)])
        };
        let v = JwtVerifier::new(JwtConfig::new(vec![alg], keys))
            .await
            .unwrap();
        let token = sign(alg, None, &claims());
        let t = v
            .verify(&token)
            .await
            .unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(t.subject.as_deref(), Some("alice"), "{alg}");
        assert_eq!(t.scopes, vec!["read", "write"], "{alg}");
        assert!(t.expires_at.is_some());
        assert_eq!(t.claims["sub"], "alice");
    }
}

#[tokio::test]
async fn every_asymmetric_algorithm_verifies_via_jwks() {
    let server = JwksServer::start(jwks(vec![
        jwk(Algorithm::RS256, "rsa1", "rsa"),
        jwk(Algorithm::ES256, "", "p256"),
        jwk(Algorithm::ES384, "", "p384"),
        jwk(Algorithm::EdDSA, "", "ed"),
    ]))
    .await;
    let v = JwtVerifier::new(jwks_config(
        ASYMMETRIC.to_vec(),
        jwks_source(&server.url, Duration::from_secs(60)),
    ))
    .await
    .unwrap();
    assert_eq!(v.key_count(), 4);
    for alg in ASYMMETRIC {
        let kid = match alg {
            Algorithm::ES256 => "p256",
            Algorithm::ES384 => "p384",
            Algorithm::EdDSA => "ed",
            _ => "rsa",
        };
        let token = sign(alg, Some(kid), &claims());
        v.verify(&token)
            .await
            .unwrap_or_else(|e| panic!("{alg}: {e}"));
    }
    assert_eq!(server.hits(), 1);
}

// ---------------------------------------------------------------------------
// Algorithm allow-list and confusion

fn unsigned_token(header: serde_json::Value, payload: serde_json::Value, sig: &str) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        sig
    )
}

#[tokio::test]
async fn alg_none_is_rejected() {
    let v = JwtVerifier::new(JwtConfig::new(
        vec![Algorithm::HS256],
        KeySource::Secret(SECRET.to_vec()),
    ))
    .await
    .unwrap();
    for none in ["none", "None", "NONE", "nOnE"] {
        let t = unsigned_token(json!({"alg": none, "typ": "JWT"}), claims(), "");
        assert_eq!(v.verify(&t).await, Err(JwtError::AlgorithmNotAllowed));
        let t = unsigned_token(json!({"alg": none}), claims(), "AAAA");
        assert_eq!(v.verify(&t).await, Err(JwtError::AlgorithmNotAllowed));
    }
    let t = unsigned_token(json!({"typ": "JWT"}), claims(), "AAAA");
    assert_eq!(v.verify(&t).await, Err(JwtError::Malformed));
}

#[tokio::test]
async fn algorithm_outside_allow_list_is_rejected() {
    let v = pem_verifier(vec![Algorithm::RS256], vec![fixture("rsa1.pub.pem")]).await;
    // Same key family, different algorithm: still not allowed.
    for alg in [Algorithm::PS256, Algorithm::RS384, Algorithm::RS512] {
        let token = sign(alg, None, &claims());
        assert_eq!(v.verify(&token).await, Err(JwtError::AlgorithmNotAllowed));
    }
    let token = sign(Algorithm::ES256, None, &claims());
    assert_eq!(v.verify(&token).await, Err(JwtError::AlgorithmNotAllowed));
    assert!(v
        .verify(&sign(Algorithm::RS256, None, &claims()))
        .await
        .is_ok());
}

#[tokio::test]
async fn rsa_public_key_used_as_hmac_secret_is_rejected() {
    let pub_pem = fixture("rsa1.pub.pem");
    let v = pem_verifier(vec![Algorithm::RS256], vec![pub_pem.clone()]).await;
    // The classic confusion attack: HMAC over the public key bytes.
    let forged = sign_with(
        Algorithm::HS256,
        &EncodingKey::from_secret(&pub_pem),
        None,
        &claims(),
    );
    assert_eq!(v.verify(&forged).await, Err(JwtError::AlgorithmNotAllowed));
    assert_eq!(v.stats().signature_verifications, 0);
}

#[tokio::test]
async fn key_type_must_match_algorithm_family() {
    // HS* can never be combined with public keys, nor RS* with a secret.
    let err = JwtVerifier::new(pem_config(
        vec![Algorithm::RS256, Algorithm::HS256],
        vec![fixture("rsa1.pub.pem")],
    ))
    .await
    .unwrap_err();
    assert!(matches!(
        err,
        JwtSetupError::AlgorithmKeyMismatch {
            algorithm: Algorithm::HS256,
            ..
        }
    ));
    let err = JwtVerifier::new(JwtConfig::new(
        vec![Algorithm::HS256, Algorithm::RS256],
        KeySource::Secret(SECRET.to_vec()),
    ))
    .await
    .unwrap_err();
    assert!(matches!(
        err,
        JwtSetupError::AlgorithmKeyMismatch {
            algorithm: Algorithm::RS256,
            ..
        }
    ));
    let err = JwtVerifier::new(JwtConfig::new(
        vec![Algorithm::HS256],
        jwks_source("http://127.0.0.1:1/jwks", Duration::from_secs(1)),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, JwtSetupError::AlgorithmKeyMismatch { .. }));

    // With RSA and EC keys loaded, an ES256 token is only ever checked
    // against the EC key, and an ES384 token finds no P-384 key.
    let v = pem_verifier(
        vec![Algorithm::RS256, Algorithm::ES256, Algorithm::ES384],
        vec![fixture("rsa1.pub.pem"), fixture("ec256.pub.pem")],
    )
    .await;
    v.verify(&sign(Algorithm::ES256, None, &claims()))
        .await
        .unwrap();
    assert_eq!(v.stats().signature_verifications, 1);
    assert_eq!(
        v.verify(&sign(Algorithm::ES384, None, &claims())).await,
        Err(JwtError::UnknownKey)
    );
    assert_eq!(v.stats().signature_verifications, 1);
}

#[tokio::test]
async fn jwks_key_is_only_used_for_its_own_type_and_symmetric_keys_are_ignored() {
    let mut rsa = jwk(Algorithm::RS256, "rsa1", "shared");
    rsa["alg"] = json!("RS256");
    let oct = json!({"kty": "oct", "kid": "hmac", "k": URL_SAFE_NO_PAD.encode(SECRET)});
    let server = JwksServer::start(jwks(vec![rsa, oct])).await;
    let v = JwtVerifier::new(jwks_config(
        vec![Algorithm::RS256, Algorithm::PS256, Algorithm::ES256],
        jwks_source(&server.url, Duration::from_secs(60)),
    ))
    .await
    .unwrap();
    assert_eq!(v.key_count(), 1, "oct key must be ignored");
    v.verify(&sign(Algorithm::RS256, Some("shared"), &claims()))
        .await
        .unwrap();
    // EC token naming the RSA key's kid: no key of the right type.
    assert_eq!(
        v.verify(&sign(Algorithm::ES256, Some("shared"), &claims()))
            .await,
        Err(JwtError::UnknownKey)
    );
    // The JWK says alg RS256: it must not verify PS256 even though it is RSA.
    assert_eq!(
        v.verify(&sign(Algorithm::PS256, Some("shared"), &claims()))
            .await,
        Err(JwtError::UnknownKey)
    );
}

// ---------------------------------------------------------------------------
// Claims

async fn hs_verifier(f: impl FnOnce(&mut JwtConfig)) -> JwtVerifier {
    let mut cfg = JwtConfig::new(vec![Algorithm::HS256], KeySource::Secret(SECRET.to_vec()));
    cfg.cache_max_entries = 0;
    f(&mut cfg);
    JwtVerifier::new(cfg).await.unwrap()
}

fn hs(claims: serde_json::Value) -> String {
    sign(Algorithm::HS256, None, &claims)
}

#[tokio::test]
async fn exp_nbf_iat_and_leeway() {
    let v = hs_verifier(|c| c.leeway = Duration::from_secs(30)).await;
    let n = now();
    // exp in the past beyond leeway
    let e = v.verify(&hs(json!({"exp": n - 100}))).await.unwrap_err();
    assert_eq!(e, JwtError::Expired);
    assert!(e.is_expired());
    // exp in the past within leeway
    v.verify(&hs(json!({"exp": n - 10}))).await.unwrap();
    // nbf in the future beyond / within leeway
    assert_eq!(
        v.verify(&hs(json!({"exp": n + 600, "nbf": n + 100}))).await,
        Err(JwtError::NotYetValid)
    );
    v.verify(&hs(json!({"exp": n + 600, "nbf": n + 10})))
        .await
        .unwrap();
    // iat in the future beyond / within leeway
    assert_eq!(
        v.verify(&hs(json!({"exp": n + 600, "iat": n + 100}))).await,
        Err(JwtError::NotYetValid)
    );
    v.verify(&hs(json!({"exp": n + 600, "iat": n + 10})))
        .await
        .unwrap();
    // non-numeric exp
    assert_eq!(
        v.verify(&hs(json!({"exp": "soon"}))).await,
        Err(JwtError::Malformed)
    );

    let strict = hs_verifier(|c| c.leeway = Duration::ZERO).await;
    assert_eq!(
        strict.verify(&hs(json!({"exp": n - 10}))).await,
        Err(JwtError::Expired)
    );
    assert_eq!(
        strict
            .verify(&hs(json!({"exp": n + 600, "nbf": n + 10})))
            .await,
        Err(JwtError::NotYetValid)
    );
}

#[tokio::test]
async fn missing_exp_rejected_when_required() {
    let v = hs_verifier(|_| {}).await;
    assert_eq!(
        v.verify(&hs(json!({"sub": "a"}))).await,
        Err(JwtError::MissingClaim("exp"))
    );
    let lax = hs_verifier(|c| c.require_exp = false).await;
    let t = lax.verify(&hs(json!({"sub": "a"}))).await.unwrap();
    assert_eq!(t.expires_at, None);
}

#[tokio::test]
async fn issuer_and_audience() {
    let v = hs_verifier(|c| {
        c.issuer = Some(vec!["https://idp-a".into(), "https://idp-b".into()]);
        c.audience = Some(vec!["api".into(), "gateway".into()]);
    })
    .await;
    let exp = now() + 600;
    v.verify(&hs(
        json!({"exp": exp, "iss": "https://idp-b", "aud": "api"}),
    ))
    .await
    .unwrap();
    v.verify(&hs(
        json!({"exp": exp, "iss": "https://idp-a", "aud": ["other", "gateway"]}),
    ))
    .await
    .unwrap();
    assert_eq!(
        v.verify(&hs(
            json!({"exp": exp, "iss": "https://evil", "aud": "api"})
        ))
        .await,
        Err(JwtError::InvalidIssuer)
    );
    assert_eq!(
        v.verify(&hs(
            json!({"exp": exp, "iss": ["https://idp-a"], "aud": "api"})
        ))
        .await,
        Err(JwtError::InvalidIssuer)
    );
    assert_eq!(
        v.verify(&hs(json!({"exp": exp, "aud": "api"}))).await,
        Err(JwtError::MissingClaim("iss"))
    );
    assert_eq!(
        v.verify(&hs(
            json!({"exp": exp, "iss": "https://idp-a", "aud": "web"})
        ))
        .await,
        Err(JwtError::InvalidAudience)
    );
    assert_eq!(
        v.verify(&hs(
            json!({"exp": exp, "iss": "https://idp-a", "aud": ["web", "mobile"]}),
        ))
        .await,
        Err(JwtError::InvalidAudience)
    );
    assert_eq!(
        v.verify(&hs(json!({"exp": exp, "iss": "https://idp-a"})))
            .await,
        Err(JwtError::MissingClaim("aud"))
    );
    // Without an audience configured, `aud` is not checked.
    let open = hs_verifier(|_| {}).await;
    open.verify(&hs(json!({"exp": exp, "aud": "anything"})))
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------
// Signatures and structure

#[tokio::test]
async fn bad_signatures_and_malformed_tokens() {
    let v = pem_verifier(vec![Algorithm::RS256], vec![fixture("rsa1.pub.pem")]).await;
    // Signed by a different key.
    let other = sign_with(
        Algorithm::RS256,
        &signing_key(Algorithm::RS256, "rsa2"),
        None,
        &claims(),
    );
    assert_eq!(v.verify(&other).await, Err(JwtError::BadSignature));
    // Payload swapped after signing.
    let good = sign(Algorithm::RS256, None, &claims());
    let parts: Vec<&str> = good.split('.').collect();
    let evil = URL_SAFE_NO_PAD.encode(json!({"sub": "root", "exp": now() + 3600}).to_string());
    let tampered = format!("{}.{}.{}", parts[0], evil, parts[2]);
    assert_eq!(v.verify(&tampered).await, Err(JwtError::BadSignature));

    for bad in [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "!!!.???.***",
        &format!("{}.{}.", parts[0], parts[1]),
        &format!("{}.{}.{}=", parts[0], parts[1], parts[2]),
        &format!("{}.bm90LWpzb24.{}", parts[0], parts[2]),
        &"a".repeat(70_000),
    ] {
        let err = v.verify(bad).await.unwrap_err();
        assert_eq!(err, JwtError::Malformed, "{bad:.40}");
        assert!(bad.is_empty() || !err.to_string().contains(bad));
    }
    // crit header: extensions we do not understand
    let crit = unsigned_token(json!({"alg": "RS256", "crit": ["exp"]}), claims(), parts[2]);
    assert_eq!(v.verify(&crit).await, Err(JwtError::Malformed));
}

#[tokio::test]
async fn pem_formats() {
    let token = sign(Algorithm::RS256, None, &claims());
    for pem in ["rsa1.pkcs1.pub.pem", "rsa1.cert.pem", "rsa1.pub.pem"] {
        let v = pem_verifier(vec![Algorithm::RS256], vec![fixture(pem)]).await;
        v.verify(&token)
            .await
            .unwrap_or_else(|e| panic!("{pem}: {e}"));
    }
    let ec_cert = pem_verifier(vec![Algorithm::ES256], vec![fixture("ec256.cert.pem")]).await;
    ec_cert
        .verify(&sign(Algorithm::ES256, None, &claims()))
        .await
        .unwrap();
    // Several blocks in one entry; the right key is found among them.
    let mut bundle = fixture("rsa2.pub.pem");
    bundle.extend(fixture("rsa1.pub.pem"));
    let v = pem_verifier(vec![Algorithm::RS256], vec![bundle]).await;
    v.verify(&token).await.unwrap();
    // Private keys, small RSA keys and junk are rejected at setup.
    let e = JwtVerifier::new(pem_config(
        vec![Algorithm::RS256],
        vec![fixture("rsa1.key.pem")],
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(e, JwtSetupError::InvalidPem { index: 0, .. }),
        "{e}"
    );
    let e = JwtVerifier::new(pem_config(
        vec![Algorithm::RS256],
        vec![fixture("rsa1.pub.pem"), fixture("rsa1024.pub.pem")],
    ))
    .await
    .unwrap_err();
    assert_eq!(
        e,
        JwtSetupError::WeakRsaKey {
            index: 1,
            bits: 1024
        }
    );
    let e = JwtVerifier::new(pem_config(vec![Algorithm::RS256], vec![b"junk".to_vec()]))
        .await
        .unwrap_err();
    assert!(matches!(e, JwtSetupError::InvalidPem { .. }));
}

#[tokio::test]
async fn setup_validation() {
    let e = JwtVerifier::new(JwtConfig::new(vec![], KeySource::Secret(SECRET.to_vec())))
        .await
        .unwrap_err();
    assert_eq!(e, JwtSetupError::NoAlgorithms);
    let e = JwtVerifier::new(JwtConfig::new(
        vec![Algorithm::HS256],
        KeySource::Secret(vec![]),
    ))
    .await
    .unwrap_err();
    assert_eq!(e, JwtSetupError::EmptySecret);
    let e = JwtVerifier::new(pem_config(vec![Algorithm::RS256], vec![]))
        .await
        .unwrap_err();
    assert_eq!(e, JwtSetupError::NoKeys);
    for url in ["ftp://x/jwks", "not a url", "/relative"] {
        let e = JwtVerifier::new(JwtConfig::new(
            vec![Algorithm::RS256],
            jwks_source(url, Duration::from_secs(1)),
        ))
        .await
        .unwrap_err();
        assert!(matches!(e, JwtSetupError::InvalidJwksUrl(_)), "{url}: {e}");
    }
    let e = JwtVerifier::new(JwtConfig::new(
        vec![Algorithm::RS256],
        jwks_source("http://127.0.0.1:1/", Duration::ZERO),
    ))
    .await
    .unwrap_err();
    assert_eq!(e, JwtSetupError::ZeroDuration("min_refetch_interval"));
    // Non-JWKS verifiers have no refresh task.
    let v = pem_verifier(vec![Algorithm::RS256], vec![fixture("rsa1.pub.pem")]).await;
    assert!(v.spawn_refresh().is_none());
}

#[tokio::test]
async fn short_hmac_secrets_are_refused() {
    for len in [1, 8, 15] {
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let e = JwtVerifier::new(JwtConfig::new(
                vec![alg],
                KeySource::Secret(vec![b'k'; len]),
            ))
            .await
            .unwrap_err();
            assert_eq!(e, JwtSetupError::ShortSecret, "{alg}, {len} bytes");
            assert_eq!(
                e.to_string(),
                "jwt: HS secret must be at least 16 bytes; 32 or more recommended (RFC 7518 §3.2)"
            );
        }
    }
    // 16 bytes is the minimum: weak (the gateway warns) but accepted.
    let secret = b"0123456789abcdef";
    assert!(weak_hs_secret(secret));
    let v = JwtVerifier::new(JwtConfig::new(
        vec![Algorithm::HS256],
        KeySource::Secret(secret.to_vec()),
    ))
    .await
    .unwrap();
    let token = sign_with(
        Algorithm::HS256,
        &EncodingKey::from_secret(secret),
        None,
        &claims(),
    );
    v.verify(&token).await.unwrap();
    assert!(weak_hs_secret(&[0; 31]));
    assert!(!weak_hs_secret(&[0; 32]));
    assert!(!weak_hs_secret(SECRET));
}

#[tokio::test]
async fn jwks_needs_an_audience_unless_any_is_allowed() {
    // Nothing listens there: the initial fetch fails, which `new` tolerates.
    let source = || jwks_source("http://127.0.0.1:1/jwks", Duration::from_secs(60));
    let e = JwtVerifier::new(JwtConfig::new(vec![Algorithm::RS256], source()))
        .await
        .unwrap_err();
    assert_eq!(e, JwtSetupError::JwksWithoutAudience);
    assert_eq!(
        e.to_string(),
        "jwt: a jwks_url authenticator needs `audience` (or allow_any_audience: true)"
    );
    let mut empty = JwtConfig::new(vec![Algorithm::RS256], source());
    empty.audience = Some(Vec::new());
    assert_eq!(
        JwtVerifier::new(empty).await.unwrap_err(),
        JwtSetupError::JwksWithoutAudience
    );
    let mut with_audience = JwtConfig::new(vec![Algorithm::RS256], source());
    with_audience.audience = Some(vec!["api".into()]);
    JwtVerifier::new(with_audience).await.unwrap();
    JwtVerifier::new(jwks_config(vec![Algorithm::RS256], source()))
        .await
        .unwrap();
    // Static keys belong to one issuer: no audience is fine there.
    pem_verifier(vec![Algorithm::RS256], vec![fixture("rsa1.pub.pem")]).await;
}

// ---------------------------------------------------------------------------
// Guest tokens

#[tokio::test]
async fn guest_tokens_are_refused_unless_accepted() {
    let exp = now() + 600;
    let guest = hs(json!({"sub": "guest-1", "exp": exp, "typ": "guest"}));
    let strict = hs_verifier(|_| {}).await;
    let e = strict.verify(&guest).await.unwrap_err();
    assert_eq!(e, JwtError::GuestNotAccepted);
    assert!(!e.is_expired());
    // Other or non-string `typ` values are not guest tokens.
    for typ in [
        json!("Guest"),
        json!("access"),
        json!(["guest"]),
        json!(true),
    ] {
        strict
            .verify(&hs(json!({"exp": exp, "typ": typ})))
            .await
            .unwrap_or_else(|e| panic!("typ {typ}: {e}"));
    }
    // `guest: true` (guest tokens issued before `typ` existed) is refused too.
    assert_eq!(
        strict
            .verify(&hs(json!({"exp": exp, "guest": true})))
            .await
            .unwrap_err(),
        JwtError::GuestNotAccepted
    );

    let welcoming = hs_verifier(|c| c.accept_guest = true).await;
    let t = welcoming.verify(&guest).await.unwrap();
    assert_eq!(t.subject.as_deref(), Some("guest-1"));

    // A cached guest token is refused too (the check runs before caching).
    let mut cfg = JwtConfig::new(vec![Algorithm::HS256], KeySource::Secret(SECRET.to_vec()));
    cfg.cache_max_entries = 100;
    let cached = JwtVerifier::new(cfg).await.unwrap();
    for _ in 0..2 {
        assert_eq!(cached.verify(&guest).await, Err(JwtError::GuestNotAccepted));
    }
    assert_eq!(cached.cached_tokens(), 0);
}

// ---------------------------------------------------------------------------
// Verified-token cache

#[tokio::test]
async fn cache_hit_skips_signature_verification() {
    let v = pem_verifier(vec![Algorithm::RS256], vec![fixture("rsa1.pub.pem")]).await;
    let token = sign(Algorithm::RS256, None, &claims());
    let a = v.verify(&token).await.unwrap();
    let b = v.verify(&token).await.unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    let s = v.stats();
    assert_eq!(s.signature_verifications, 1);
    assert_eq!(s.cache_hits, 1);
    // A tampered token never hits the cache entry of the good one.
    let mut bad = token.clone();
    bad.pop();
    bad.push(if token.ends_with('A') { 'B' } else { 'A' });
    assert!(v.verify(&bad).await.is_err());

    let mut cfg = pem_config(vec![Algorithm::RS256], vec![fixture("rsa1.pub.pem")]);
    cfg.cache_max_entries = 0;
    let uncached = JwtVerifier::new(cfg).await.unwrap();
    uncached.verify(&token).await.unwrap();
    uncached.verify(&token).await.unwrap();
    assert_eq!(uncached.stats().signature_verifications, 2);
    assert_eq!(uncached.stats().cache_hits, 0);
}

#[tokio::test]
async fn cached_token_is_not_accepted_after_exp() {
    let mut cfg = pem_config(vec![Algorithm::ES256], vec![fixture("ec256.pub.pem")]);
    cfg.leeway = Duration::ZERO;
    let v = JwtVerifier::new(cfg).await.unwrap();
    let token = sign(Algorithm::ES256, None, &json!({"exp": now() + 3}));
    v.verify(&token).await.unwrap();
    v.verify(&token).await.unwrap();
    assert_eq!(v.stats().cache_hits, 1);
    // Accepted (from the cache) until `exp`, refused from then on: waited for.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while v.verify(&token).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(v.stats().cache_hits >= 2);
    assert_eq!(v.verify(&token).await, Err(JwtError::Expired));
}

#[tokio::test]
async fn cache_is_bounded() {
    let mut cfg = JwtConfig::new(vec![Algorithm::HS256], KeySource::Secret(SECRET.to_vec()));
    cfg.cache_max_entries = 5;
    let v = JwtVerifier::new(cfg).await.unwrap();
    let tokens: Vec<String> = (0..50)
        .map(|i| hs(json!({"exp": now() + 600, "n": i})))
        .collect();
    for t in &tokens {
        v.verify(t).await.unwrap();
    }
    assert!(v.cached_tokens() <= 5, "{}", v.cached_tokens());
    assert!(v.cached_tokens() > 0);
}

// ---------------------------------------------------------------------------
// JWKS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rotation_rate_limit_and_failures() {
    // Each burst of calls below must land inside one interval, even on a loaded
    // machine; the waits between bursts only need to be longer than it.
    let interval = Duration::from_secs(1);
    let server = JwksServer::start(jwks(vec![jwk(Algorithm::RS256, "rsa1", "k1")])).await;
    let v = JwtVerifier::new(jwks_config(
        vec![Algorithm::RS256],
        jwks_source(&server.url, interval),
    ))
    .await
    .unwrap();
    assert_eq!(server.hits(), 1);
    let t1 = sign(Algorithm::RS256, Some("k1"), &claims());
    v.verify(&t1).await.unwrap();

    // Bogus-kid flood right after a fetch: rate limited, no fetch at all.
    let bogus = sign(Algorithm::RS256, Some("bogus"), &claims());
    for _ in 0..20 {
        assert_eq!(v.verify(&bogus).await, Err(JwtError::UnknownKey));
    }
    assert_eq!(server.hits(), 1);

    // After the interval, a concurrent flood shares exactly one fetch.
    tokio::time::sleep(interval + Duration::from_millis(50)).await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (v, bogus) = (v.clone(), bogus.clone());
        set.spawn(async move { v.verify(&bogus).await });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap(), Err(JwtError::UnknownKey));
    }
    assert_eq!(server.hits(), 2);

    // Rotation: the IdP now publishes k2 as well; a k2 token is accepted at
    // once (one refetch), without waiting for the background refresh.
    tokio::time::sleep(interval + Duration::from_millis(50)).await;
    server.set(
        200,
        jwks(vec![
            jwk(Algorithm::RS256, "rsa1", "k1"),
            jwk(Algorithm::RS256, "rsa2", "k2"),
        ]),
    );
    let t2 = sign_with(
        Algorithm::RS256,
        &signing_key(Algorithm::RS256, "rsa2"),
        Some("k2"),
        &claims(),
    );
    v.verify(&t2).await.unwrap();
    assert_eq!(server.hits(), 3);
    v.verify(&t1).await.unwrap();

    // Fetch failures keep the previous key set.
    tokio::time::sleep(interval + Duration::from_millis(50)).await;
    server.set(500, "oops".into());
    assert_eq!(v.verify(&bogus).await, Err(JwtError::UnknownKey));
    assert_eq!(server.hits(), 4);
    assert_eq!(v.stats().jwks_fetch_failures, 1);
    let t2b = sign_with(
        Algorithm::RS256,
        &signing_key(Algorithm::RS256, "rsa2"),
        Some("k2"),
        &json!({"sub": "bob", "exp": now() + 60}),
    );
    v.verify(&t2b).await.unwrap();
    // Garbage and empty key sets also count as failures.
    tokio::time::sleep(interval + Duration::from_millis(50)).await;
    server.set(200, "{\"keys\": []}".into());
    assert_eq!(v.verify(&bogus).await, Err(JwtError::UnknownKey));
    assert_eq!(v.key_count(), 2);

    // Key removal: k1 disappears; cached k1 tokens must stop being accepted.
    tokio::time::sleep(interval + Duration::from_millis(50)).await;
    server.set(200, jwks(vec![jwk(Algorithm::RS256, "rsa2", "k2")]));
    assert_eq!(v.verify(&bogus).await, Err(JwtError::UnknownKey));
    assert_eq!(v.key_count(), 1);
    assert_eq!(v.verify(&t1).await, Err(JwtError::UnknownKey));
    v.verify(&t2).await.unwrap();
}

#[tokio::test]
async fn jwks_unreachable_at_start_then_recovers() {
    let interval = Duration::from_millis(300);
    let server = JwksServer::start(String::new()).await;
    server.set(503, String::new());
    let v = JwtVerifier::new(jwks_config(
        vec![Algorithm::ES256],
        jwks_source(&server.url, interval),
    ))
    .await
    .unwrap();
    assert_eq!(v.key_count(), 0);
    let token = sign(Algorithm::ES256, Some("ec"), &claims());
    assert_eq!(v.verify(&token).await, Err(JwtError::KeysUnavailable));
    assert_eq!(server.hits(), 1);

    server.set(200, jwks(vec![jwk(Algorithm::ES256, "", "ec")]));
    // A lower bound: the refetch is allowed once the interval has passed.
    tokio::time::sleep(interval + Duration::from_millis(50)).await;
    v.verify(&token).await.unwrap();
    assert_eq!(server.hits(), 2);

    // A port nobody listens on: still starts.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let v = JwtVerifier::new(jwks_config(
        vec![Algorithm::ES256],
        jwks_source(&format!("http://127.0.0.1:{closed}/jwks"), interval),
    ))
    .await
    .unwrap();
    assert_eq!(v.verify(&token).await, Err(JwtError::KeysUnavailable));
}

#[tokio::test]
async fn jwks_background_refresh() {
    let server = JwksServer::start(jwks(vec![jwk(Algorithm::EdDSA, "", "ed1")])).await;
    let v = JwtVerifier::new(jwks_config(
        vec![Algorithm::EdDSA, Algorithm::RS256],
        KeySource::Jwks {
            url: server.url.clone(),
            refresh_interval: Duration::from_millis(200),
            min_refetch_interval: Duration::from_secs(3600),
            timeout: Duration::from_secs(5),
            ca_file: None,
        },
    ))
    .await
    .unwrap();
    assert_eq!(v.key_count(), 1);
    let handle = v.spawn_refresh().unwrap();
    server.set(
        200,
        jwks(vec![
            jwk(Algorithm::EdDSA, "", "ed1"),
            jwk(Algorithm::RS256, "rsa1", "r1"),
        ]),
    );
    // Refreshed in the background, with no request asking for it (waited for).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while v.key_count() != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no background refresh (hits {})",
            server.hits()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(server.hits() >= 2, "hits {}", server.hits());
    // Accepted via the background-refreshed set (unknown-kid refetch is
    // rate limited to once an hour here, so this proves the refresh).
    v.verify(&sign(Algorithm::RS256, Some("r1"), &claims()))
        .await
        .unwrap();
    handle.abort();
}

#[tokio::test]
async fn jwks_over_https_with_ca_file() {
    let server = JwksServer::start_tls(jwks(vec![jwk(Algorithm::ES384, "", "ec384")])).await;
    let source = |ca_file| KeySource::Jwks {
        url: server.url.clone(),
        refresh_interval: Duration::from_secs(3600),
        min_refetch_interval: Duration::from_secs(3600),
        timeout: Duration::from_secs(5),
        ca_file,
    };
    let v = JwtVerifier::new(jwks_config(
        vec![Algorithm::ES384],
        source(Some(fixture_path("tls-ca.pem"))),
    ))
    .await
    .unwrap();
    assert_eq!(v.key_count(), 1);
    v.verify(&sign(Algorithm::ES384, Some("ec384"), &claims()))
        .await
        .unwrap();

    // Without our CA the server is not trusted: no keys.
    let untrusted = JwtVerifier::new(jwks_config(vec![Algorithm::ES384], source(None)))
        .await
        .unwrap();
    assert_eq!(untrusted.key_count(), 0);
    assert_eq!(untrusted.stats().jwks_fetch_failures, 1);

    let e = JwtVerifier::new(jwks_config(
        vec![Algorithm::ES384],
        source(Some(fixture_path("does-not-exist.pem"))),
    ))
    .await
    .unwrap_err();
    assert!(matches!(e, JwtSetupError::CaFile { .. }));
}
