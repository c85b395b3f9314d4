//! HTTPS upstreams: certificate verification, custom CAs, ALPN h2 or HTTP/1.1.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::harness::*;

/// An HTTPS upstream for `localhost` that answers with the HTTP version it spoke.
/// Returns (address, CA PEM path, temp dir).
async fn https_upstream() -> (std::net::SocketAddr, std::path::PathBuf, tempfile::TempDir) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("upstream.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = format!("{:?} {}", req.version(), req.uri().path());
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body)).boxed()))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, ca, dir)
}

fn config(port: u16, tls: &str) -> String {
    format!(
        r#"
listeners:
  - address: 127.0.0.1:0
routes:
  - name: secure
    path_prefix: /
    proxy:
      upstream: https://localhost:{port}
{tls}
"#
    )
}

#[tokio::test]
async fn https_upstream_with_custom_ca_negotiates_h2() {
    let (addr, ca, _dir) = https_upstream().await;
    let gw = Gateway::start(&config(
        addr.port(),
        &format!("      tls: {{ca_file: \"{}\"}}", ca.display()),
    ));
    let res = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "HTTP/2.0 /x");
}

#[tokio::test]
async fn https_upstream_http1_only() {
    let (addr, ca, _dir) = https_upstream().await;
    let gw = Gateway::start(&config(
        addr.port(),
        &format!(
            "      protocol: http1\n      tls: {{ca_file: \"{}\"}}",
            ca.display()
        ),
    ));
    let res = client().get(gw.url("/y")).send().await.unwrap();
    assert_eq!(res.text().await.unwrap(), "HTTP/1.1 /y");
}

#[tokio::test]
async fn untrusted_upstream_certificate_is_a_502() {
    let (addr, _ca, _dir) = https_upstream().await;
    let gw = Gateway::start(&config(addr.port(), ""));
    let res = client().get(gw.url("/x")).send().await.unwrap();
    let body = assert_error(res, 502, "UPSTREAM_UNAVAILABLE").await;
    assert!(
        !body.to_string().to_lowercase().contains("certificate"),
        "{body}"
    );
    assert!(
        gw.wait_log("upstream request failed", std::time::Duration::from_secs(5))
            .await
    );

    let gw = Gateway::start(&config(
        addr.port(),
        "      tls: {insecure_skip_verify: true}",
    ));
    let res = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(res.status(), 200);
}
