#![allow(dead_code)]

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{EncodingKey, Header};
use portcullis_auth::jwt::Algorithm;
use serde_json::{json, Value};
use tokio::net::TcpListener;

pub const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-secret";

/// Fixtures live in this crate; other crates' tests include this module too.
pub fn fixture_path(name: &str) -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let own = here.join("tests/fixtures");
    let dir = if own.is_dir() {
        own
    } else {
        here.join("../portcullis-auth/tests/fixtures")
    };
    dir.join(name)
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture_path(name)).unwrap()
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn jalg(a: Algorithm) -> jsonwebtoken::Algorithm {
    a.as_str().parse().unwrap()
}

/// Private signing key used in tests for `alg` (RSA tests use `rsa_name`).
pub fn signing_key(a: Algorithm, rsa_name: &str) -> EncodingKey {
    use Algorithm::*;
    match a {
        HS256 | HS384 | HS512 => EncodingKey::from_secret(SECRET),
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => {
            EncodingKey::from_rsa_pem(&fixture(&format!("{rsa_name}.key.pem"))).unwrap()
        }
        ES256 => EncodingKey::from_ec_pem(&fixture("ec256.key.pem")).unwrap(),
        ES384 => EncodingKey::from_ec_pem(&fixture("ec384.key.pem")).unwrap(),
        EdDSA => EncodingKey::from_ed_pem(&fixture("ed25519.key.pem")).unwrap(),
    }
}

/// Public PEM matching [`signing_key`].
pub fn public_pem(a: Algorithm) -> Vec<u8> {
    use Algorithm::*;
    match a {
        HS256 | HS384 | HS512 => panic!("no PEM for HMAC"),
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => fixture("rsa1.pub.pem"),
        ES256 => fixture("ec256.pub.pem"),
        ES384 => fixture("ec384.pub.pem"),
        EdDSA => fixture("ed25519.pub.pem"),
    }
}

pub fn sign_with(a: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(jalg(a));
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

pub fn sign(a: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    sign_with(a, &signing_key(a, "rsa1"), kid, claims)
}

pub fn claims() -> Value {
    json!({"sub": "alice", "exp": now() + 3600, "scope": "read write"})
}

/// Public JWK for the private key used with `a`.
pub fn jwk(a: Algorithm, rsa_name: &str, kid: &str) -> Value {
    let key = signing_key(a, rsa_name);
    let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, jalg(a)).unwrap();
    let mut v = serde_json::to_value(jwk).unwrap();
    v["kid"] = json!(kid);
    // Let the verifier decide which algorithms the key may be used with.
    v.as_object_mut().unwrap().remove("alg");
    v
}

pub fn jwks(keys: Vec<Value>) -> String {
    json!({ "keys": keys }).to_string()
}

/// A tiny JWKS server on 127.0.0.1 that counts requests; its response can
/// be changed at any time.
pub struct JwksServer {
    pub url: String,
    pub response: Arc<Mutex<(u16, String)>>,
    pub hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    pub async fn start(body: String) -> Self {
        Self::start_inner(body, false).await
    }

    pub async fn start_tls(body: String) -> Self {
        Self::start_inner(body, true).await
    }

    async fn start_inner(body: String, tls: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let response = Arc::new(Mutex::new((200u16, body)));
        let hits = Arc::new(AtomicUsize::new(0));
        let acceptor = tls.then(tls_acceptor);
        let (r2, h2) = (response.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (r3, h3) = (r2.clone(), h2.clone());
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let (r4, h4) = (r3.clone(), h3.clone());
                        async move {
                            h4.fetch_add(1, Ordering::SeqCst);
                            // Slow enough that concurrent callers overlap.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            let (status, body) = r4.lock().unwrap().clone();
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acc) => {
                            if let Ok(s) = acc.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        let scheme = if tls { "https" } else { "http" };
        JwksServer {
            url: format!("{scheme}://127.0.0.1:{}/.well-known/jwks.json", addr.port()),
            response,
            hits,
            task,
        }
    }

    pub fn set(&self, status: u16, body: String) {
        *self.response.lock().unwrap() = (status, body);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(fixture_path("tls-server.pem"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_file(fixture_path("tls-server.key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}
