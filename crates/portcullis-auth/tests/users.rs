//! Integration tests of `users` (real `EmbeddedStore` in a temp dir) and `issuer`
//! (issued tokens checked by `JwtVerifier`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use portcullis_auth::issuer::{IssuerConfig, IssuerError, SigningKey, TokenIssuer, TokenKind};
use portcullis_auth::jwt::{Algorithm, JwtConfig, JwtError, JwtVerifier, KeySource};
use portcullis_auth::users::{LegacyRecord, PasswordHash, UserError, Users};
use portcullis_store::{EmbeddedStore, Store};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

async fn setup() -> (tempfile::TempDir, Users, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&path))
        .await
        .unwrap()
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    (dir, Users::new(store.clone()), store)
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
    }
    h.finalize().into()
}

async fn stored_raw(store: &Arc<dyn Store>, key: &str) -> Value {
    serde_json::from_slice(&store.get(key).await.unwrap().unwrap()).unwrap()
}

// ---------------------------------------------------------------------------
// users

#[tokio::test]
async fn add_get_list_remove() {
    let (_dir, users, store) = setup().await;
    users.add("Alice", "correct horse", "admin").await.unwrap();
    users.add("bob", "battery staple", "user").await.unwrap();

    let a = users.get("alice").await.unwrap().unwrap();
    assert_eq!(a.username, "Alice", "display name kept");
    assert_eq!(a.role, "admin");
    assert!(matches!(&a.password, PasswordHash::Argon2id { phc } if phc.starts_with("$argon2id$")));
    assert!(a.created_at > 0 && a.created_at == a.updated_at);
    // Stored under the lower-cased key, as tagged JSON.
    let raw = stored_raw(&store, "user:alice").await;
    assert_eq!(raw["username"], "Alice");
    assert_eq!(raw["password"]["scheme"], "argon2id");
    // Debug output never shows the hash.
    assert!(!format!("{a:?}").contains("$argon2id$"));

    let names: Vec<String> = users
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.username)
        .collect();
    assert_eq!(names, vec!["Alice", "bob"]);

    assert!(users.remove("ALICE").await.unwrap());
    assert!(!users.remove("alice").await.unwrap());
    assert!(users.get("Alice").await.unwrap().is_none());
    assert_eq!(users.list().await.unwrap().len(), 1);
    assert!(users.get("nobody").await.unwrap().is_none());
}

#[tokio::test]
async fn duplicate_add_is_exists_case_insensitively() {
    let (_dir, users, _store) = setup().await;
    users.add("carol", "password-1", "user").await.unwrap();
    assert_eq!(
        users.add("carol", "password-2", "admin").await,
        Err(UserError::Exists)
    );
    assert_eq!(
        users.add("CAROL", "password-2", "admin").await,
        Err(UserError::Exists)
    );
    // Unchanged.
    let c = users.get("carol").await.unwrap().unwrap();
    assert_eq!(c.role, "user");
    assert!(users.verify("carol", "password-1").await.unwrap().is_some());

    // Racing adds: exactly one wins.
    let (a, b) = tokio::join!(
        users.add("dave", "password-a", "x"),
        users.add("Dave", "password-b", "y")
    );
    assert!(
        matches!(
            (&a, &b),
            (Ok(()), Err(UserError::Exists)) | (Err(UserError::Exists), Ok(()))
        ),
        "{a:?} {b:?}"
    );
}

#[tokio::test]
async fn weak_passwords_and_invalid_usernames() {
    let (_dir, users, _store) = setup().await;
    assert_eq!(
        users.add("erin", "short", "user").await,
        Err(UserError::WeakPassword)
    );
    assert_eq!(
        users.add("erin", "1234567", "user").await,
        Err(UserError::WeakPassword)
    );
    assert!(users.get("erin").await.unwrap().is_none());
    users.add("erin", "12345678", "user").await.unwrap();
    assert_eq!(
        users.set_password("erin", "1234567").await,
        Err(UserError::WeakPassword)
    );

    let long = "x".repeat(65);
    for bad in ["", "a b", "a/b", "a:b", "ünïcode", "tab\t", long.as_str()] {
        assert_eq!(
            users.add(bad, "long enough pw", "user").await,
            Err(UserError::InvalidUsername),
            "{bad:?}"
        );
        assert_eq!(users.get(bad).await.err(), Some(UserError::InvalidUsername));
        assert_eq!(
            users.remove(bad).await.err(),
            Some(UserError::InvalidUsername)
        );
        assert_eq!(
            users.set_password(bad, "long enough pw").await,
            Err(UserError::InvalidUsername)
        );
        // verify never reveals why: just no match.
        assert!(users.verify(bad, "long enough pw").await.unwrap().is_none());
    }
    let ok = "A.b_c-d@e.F".to_owned() + &"9".repeat(53);
    assert_eq!(ok.len(), 64);
    users.add(&ok, "long enough pw", "user").await.unwrap();
}

#[tokio::test]
async fn verify_right_wrong_unknown() {
    let (_dir, users, _store) = setup().await;
    users.add("frank", "s3cret-pass", "admin").await.unwrap();
    let r = users.verify("frank", "s3cret-pass").await.unwrap().unwrap();
    assert_eq!(r.username, "frank");
    assert_eq!(r.role, "admin");
    assert!(users
        .verify("FRANK", "s3cret-pass")
        .await
        .unwrap()
        .is_some());
    assert!(users
        .verify("frank", "s3cret-pasS")
        .await
        .unwrap()
        .is_none());
    assert!(users.verify("frank", "").await.unwrap().is_none());
    assert!(users
        .verify("nobody", "s3cret-pass")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn set_password_replaces_the_password() {
    let (_dir, users, _store) = setup().await;
    assert_eq!(
        users.set_password("gina", "new password").await,
        Err(UserError::NotFound)
    );
    users.add("Gina", "old password", "user").await.unwrap();
    let before = users.get("gina").await.unwrap().unwrap();
    users.set_password("GINA", "new password").await.unwrap();
    let after = users.get("gina").await.unwrap().unwrap();
    assert_eq!(after.username, "Gina");
    assert_eq!(after.role, "user");
    assert_eq!(after.created_at, before.created_at);
    assert!(after.updated_at >= before.updated_at);
    assert!(users
        .verify("gina", "new password")
        .await
        .unwrap()
        .is_some());
    assert!(users
        .verify("gina", "old password")
        .await
        .unwrap()
        .is_none());
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test]
async fn unknown_user_costs_as_much_as_a_wrong_password() {
    let (_dir, users, _store) = setup().await;
    users.add("henry", "the right one", "user").await.unwrap();
    // Warm up (the dummy hash is computed once per process).
    users.verify("nobody", "x").await.unwrap();
    users.verify("henry", "x").await.unwrap();

    let t = Instant::now();
    users
        .verify("henry", "the right one")
        .await
        .unwrap()
        .unwrap();
    let argon2_cost = t.elapsed();

    let (mut unknown, mut wrong) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        assert!(users.verify("nobody", "guess").await.unwrap().is_none());
        unknown.push(t.elapsed());
        let t = Instant::now();
        assert!(users.verify("henry", "guess").await.unwrap().is_none());
        wrong.push(t.elapsed());
    }
    let (unknown, wrong) = (median(unknown), median(wrong));
    eprintln!("argon2 {argon2_cost:?}, unknown user {unknown:?}, wrong password {wrong:?}");
    // Both do the Argon2 work (loose bound: other tests run in parallel)...
    assert!(unknown * 3 >= argon2_cost, "{unknown:?} vs {argon2_cost:?}");
    assert!(wrong * 3 >= argon2_cost, "{wrong:?} vs {argon2_cost:?}");
    // ...and the unknown-user path is not much faster.
    assert!(
        unknown * 3 >= wrong,
        "unknown {unknown:?} vs wrong {wrong:?}"
    );
}

#[tokio::test]
async fn legacy_import_verifies_and_upgrades() {
    let (_dir, users, store) = setup().await;
    // The Metacogna JSON shape (extra fields ignored), several digest encodings.
    let json = json!([
        {"username": "Ivy", "salt": "a1b2c3", "hash": hex(&sha(&["a1b2c3", "ivy-password"])), "role": "admin"},
        {"username": "jack", "salt": "s", "hash": hex(&sha(&["jack-pw", "s"])).to_uppercase(), "role": "user"},
        {"username": "kim", "salt": "k-salt", "hash": base64::engine::general_purpose::STANDARD.encode(sha(&["k-salt", "kim"])), "role": "user", "created": "2024-01-01"},
    ]);
    let records: Vec<LegacyRecord> = serde_json::from_value(json).unwrap();
    assert!(
        !format!("{records:?}").contains("a1b2c3"),
        "Debug is redacted"
    );
    assert_eq!(users.import_legacy(records, false).await.unwrap(), 3);

    let ivy = users.get("ivy").await.unwrap().unwrap();
    assert_eq!(ivy.username, "Ivy");
    assert_eq!(ivy.role, "admin");
    assert!(ivy.password.is_legacy());
    assert_eq!(
        stored_raw(&store, "user:ivy").await["password"]["scheme"],
        "legacy_sha256"
    );

    // Wrong password: no match, still legacy.
    assert!(users.verify("ivy", "nope").await.unwrap().is_none());
    assert!(users
        .get("ivy")
        .await
        .unwrap()
        .unwrap()
        .password
        .is_legacy());

    // Right password: match, and the stored record is now Argon2id.
    let r = users.verify("IVY", "ivy-password").await.unwrap().unwrap();
    assert!(matches!(r.password, PasswordHash::Argon2id { .. }));
    let stored = users.get("ivy").await.unwrap().unwrap();
    assert!(matches!(stored.password, PasswordHash::Argon2id { .. }));
    assert_eq!(stored.username, "Ivy");
    assert_eq!(stored.role, "admin");
    assert_eq!(
        stored_raw(&store, "user:ivy").await["password"]["scheme"],
        "argon2id"
    );
    // The old password still works against the new hash, a wrong one does not.
    assert!(users.verify("ivy", "ivy-password").await.unwrap().is_some());
    assert!(users.verify("ivy", "ivy-passwore").await.unwrap().is_none());

    // password‖salt order, upper-case hex; standard base64.
    assert!(users.verify("jack", "jack-pw").await.unwrap().is_some());
    assert!(!users
        .get("jack")
        .await
        .unwrap()
        .unwrap()
        .password
        .is_legacy());
    assert!(users.verify("kim", "kim").await.unwrap().is_some());
    assert!(users.verify("kim", "kim2").await.unwrap().is_none());
}

#[tokio::test]
async fn legacy_import_overwrite_and_validation() {
    let (_dir, users, _store) = setup().await;
    users.add("lena", "argon password", "user").await.unwrap();
    let rec = |name: &str, pw: &str| LegacyRecord {
        username: name.to_owned(),
        salt: "salt".to_owned(),
        hash: hex(&sha(&["salt", pw])),
        role: "legacy".to_owned(),
    };

    // Existing users are left alone without `overwrite`; no password policy.
    let n = users
        .import_legacy(vec![rec("LENA", "x"), rec("mo", "y")], false)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(users
        .verify("lena", "argon password")
        .await
        .unwrap()
        .is_some());
    assert!(users.verify("mo", "y").await.unwrap().is_some());

    // With `overwrite` they are replaced.
    let n = users
        .import_legacy(vec![rec("lena", "short")], true)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(users.verify("lena", "short").await.unwrap().is_some());
    assert!(users
        .verify("lena", "argon password")
        .await
        .unwrap()
        .is_none());

    // An invalid record rejects the whole batch before anything is written.
    let mut bad = rec("nina", "z");
    bad.hash = "not-a-digest".to_owned();
    assert!(matches!(
        users
            .import_legacy(vec![rec("olga", "z"), bad], false)
            .await,
        Err(UserError::Corrupt(_))
    ));
    assert!(users.get("olga").await.unwrap().is_none());
    assert_eq!(
        users
            .import_legacy(vec![rec("pat", "z"), rec("bad name", "z")], false)
            .await,
        Err(UserError::InvalidUsername)
    );
    assert!(matches!(
        users
            .import_legacy(vec![rec("quinn", "z"), rec("QUINN", "z")], false)
            .await,
        Err(UserError::Corrupt(_))
    ));
    assert!(users.get("pat").await.unwrap().is_none());
    assert!(users.get("quinn").await.unwrap().is_none());
}

// ---------------------------------------------------------------------------
// issuer

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-issuer-secret";

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(path).unwrap()
}

fn issuer_config(algorithm: Algorithm, key: SigningKey) -> IssuerConfig {
    IssuerConfig {
        algorithm,
        key,
        issuer: Some("https://portcullis.test".to_owned()),
        audience: Some("portcullis-api".to_owned()),
        kid: Some("k1".to_owned()),
    }
}

async fn verifier(algorithm: Algorithm, keys: KeySource) -> JwtVerifier {
    verifier_with(algorithm, keys, false).await
}

async fn verifier_with(algorithm: Algorithm, keys: KeySource, accept_guest: bool) -> JwtVerifier {
    let mut config = JwtConfig::new(vec![algorithm], keys);
    config.issuer = Some(vec!["https://portcullis.test".to_owned()]);
    config.audience = Some(vec!["portcullis-api".to_owned()]);
    config.leeway = Duration::ZERO;
    config.accept_guest = accept_guest;
    JwtVerifier::new(config).await.unwrap()
}

fn extra(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

#[tokio::test]
async fn issued_tokens_verify_carry_claims_and_expire() {
    let cases = [
        (
            Algorithm::HS256,
            SigningKey::Secret(SECRET.to_vec()),
            KeySource::Secret(SECRET.to_vec()),
        ),
        (
            Algorithm::RS256,
            SigningKey::PrivatePem(fixture("rsa1.key.pem")),
            KeySource::Pem(vec![fixture("rsa1.pub.pem")]),
        ),
        (
            Algorithm::EdDSA,
            SigningKey::PrivatePem(fixture("ed25519.key.pem")),
            KeySource::Pem(vec![fixture("ed25519.pub.pem")]),
        ),
    ];
    let mut short_lived = Vec::new();
    for (alg, key, public) in cases {
        let issuer = TokenIssuer::new(issuer_config(alg, key)).unwrap();
        assert_eq!(issuer.algorithm(), alg);
        let v = verifier(alg, public.clone()).await;
        let guests_welcome = verifier_with(alg, public, true).await;

        let (token, expires_in) = issuer
            .issue(
                TokenKind::User,
                "alice",
                Duration::from_secs(3600),
                extra(json!({"role": "admin", "scope": "read write"})),
            )
            .unwrap();
        assert_eq!(expires_in, 3600);
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.kid.as_deref(), Some("k1"));
        assert_eq!(format!("{:?}", header.alg), alg.as_str());

        let t = v.verify(&token).await.unwrap();
        assert_eq!(t.subject.as_deref(), Some("alice"), "{alg}");
        assert_eq!(t.claims["role"], "admin");
        assert_eq!(t.claims["iss"], "https://portcullis.test");
        assert_eq!(t.claims["aud"], "portcullis-api");
        assert_eq!(t.scopes, vec!["read", "write"]);
        let iat = t.claims["iat"].as_u64().unwrap();
        assert_eq!(t.claims["nbf"].as_u64(), Some(iat));
        assert_eq!(t.expires_at, Some(iat + 3600));
        assert!(!t.claims.contains_key("typ"), "user tokens are not typed");
        // A guest-accepting verifier takes user tokens too.
        guests_welcome.verify(&token).await.unwrap();

        // Guest token, 1 s lifetime: marked `typ: guest`, refused by default.
        let (guest, expires_in) = issuer
            .issue(
                TokenKind::Guest,
                "guest-1",
                Duration::from_secs(1),
                extra(json!({"guest": true})),
            )
            .unwrap();
        assert_eq!(expires_in, 1);
        assert_eq!(
            v.verify(&guest).await.err(),
            Some(JwtError::GuestNotAccepted),
            "{alg}"
        );
        let t = guests_welcome.verify(&guest).await.unwrap();
        assert_eq!(t.claims["typ"], "guest");
        assert_eq!(t.claims["guest"], true);
        short_lived.push((alg, guests_welcome, guest));
    }

    // Each guest token stops verifying once its second has passed (waited for, not
    // slept on); until then it verifies.
    let deadline = Instant::now() + Duration::from_secs(15);
    for (alg, v, guest) in short_lived {
        loop {
            match v.verify(&guest).await {
                Err(JwtError::Expired) => break,
                Ok(_) => {
                    assert!(
                        Instant::now() < deadline,
                        "{alg}: guest token never expired"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{alg}: {e:?}"),
            }
        }
    }
}

#[tokio::test]
async fn issued_tokens_fail_with_other_keys_or_claims() {
    let issuer = TokenIssuer::new(issuer_config(
        Algorithm::RS256,
        SigningKey::PrivatePem(fixture("rsa1.key.pem")),
    ))
    .unwrap();
    let (token, _) = issuer
        .issue(
            TokenKind::User,
            "alice",
            Duration::from_secs(60),
            Map::new(),
        )
        .unwrap();
    let other = verifier(
        Algorithm::RS256,
        KeySource::Pem(vec![fixture("rsa2.pub.pem")]),
    )
    .await;
    assert_eq!(
        other.verify(&token).await.err(),
        Some(JwtError::BadSignature)
    );

    let mut config = JwtConfig::new(
        vec![Algorithm::RS256],
        KeySource::Pem(vec![fixture("rsa1.pub.pem")]),
    );
    config.audience = Some(vec!["someone-else".to_owned()]);
    let v = JwtVerifier::new(config).await.unwrap();
    assert_eq!(
        v.verify(&token).await.err(),
        Some(JwtError::InvalidAudience)
    );

    // No iss/aud configured: none in the token.
    let bare = TokenIssuer::new(IssuerConfig {
        algorithm: Algorithm::HS256,
        key: SigningKey::Secret(SECRET.to_vec()),
        issuer: None,
        audience: None,
        kid: None,
    })
    .unwrap();
    let (token, _) = bare
        .issue(TokenKind::User, "x", Duration::from_secs(60), Map::new())
        .unwrap();
    let v = JwtVerifier::new(JwtConfig::new(
        vec![Algorithm::HS256],
        KeySource::Secret(SECRET.to_vec()),
    ))
    .await
    .unwrap();
    let t = v.verify(&token).await.unwrap();
    assert!(!t.claims.contains_key("iss") && !t.claims.contains_key("aud"));
    assert!(jsonwebtoken::decode_header(&token).unwrap().kid.is_none());
}

/// A guest token is always `typ: guest`, whatever the extra claims say; a user token
/// keeps the caller's `typ`.
#[tokio::test]
async fn guest_type_cannot_be_overridden() {
    let issuer = TokenIssuer::new(issuer_config(
        Algorithm::HS256,
        SigningKey::Secret(SECRET.to_vec()),
    ))
    .unwrap();
    let v = verifier(Algorithm::HS256, KeySource::Secret(SECRET.to_vec())).await;
    let (guest, _) = issuer
        .issue(
            TokenKind::Guest,
            "guest-2",
            Duration::from_secs(60),
            extra(json!({"typ": "user"})),
        )
        .unwrap();
    assert_eq!(
        v.verify(&guest).await.err(),
        Some(JwtError::GuestNotAccepted)
    );
    let (user, _) = issuer
        .issue(
            TokenKind::User,
            "bob",
            Duration::from_secs(60),
            extra(json!({"typ": "access"})),
        )
        .unwrap();
    assert_eq!(v.verify(&user).await.unwrap().claims["typ"], "access");
}

#[test]
fn issuer_rejects_mismatched_keys() {
    let new = |alg, key| TokenIssuer::new(issuer_config(alg, key)).err();
    let pem = |name| SigningKey::PrivatePem(fixture(name));
    assert!(matches!(
        new(Algorithm::HS256, pem("rsa1.key.pem")),
        Some(IssuerError::AlgorithmKeyMismatch { .. })
    ));
    assert!(matches!(
        new(Algorithm::RS256, SigningKey::Secret(SECRET.to_vec())),
        Some(IssuerError::AlgorithmKeyMismatch { .. })
    ));
    for (alg, key) in [
        (Algorithm::RS256, "ed25519.key.pem"),
        (Algorithm::EdDSA, "rsa1.key.pem"),
        (Algorithm::ES256, "ec384.key.pem"),
        (Algorithm::ES384, "ec256.key.pem"),
        (Algorithm::RS256, "rsa1.pub.pem"),
        (Algorithm::EdDSA, "ed25519.pub.pem"),
    ] {
        assert!(
            matches!(new(alg, pem(key)), Some(IssuerError::InvalidKey { .. })),
            "{alg} with {key}: {:?}",
            new(alg, pem(key))
        );
    }
    // Matching keys are accepted for the other families too.
    for (alg, key) in [
        (Algorithm::PS256, "rsa1.key.pem"),
        (Algorithm::RS512, "rsa2.key.pem"),
        (Algorithm::ES256, "ec256.key.pem"),
        (Algorithm::ES384, "ec384.key.pem"),
    ] {
        assert!(new(alg, pem(key)).is_none(), "{alg} with {key}");
    }
}
