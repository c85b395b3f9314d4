//! Fetching JWKS documents over http/https with a hyper client.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;

use super::keys::{parse_jwks, VerifyingKey};
use super::JwtSetupError;

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

pub(crate) struct JwksClient {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    uri: http::Uri,
    timeout: Duration,
}

impl JwksClient {
    pub(crate) fn new(
        url: &str,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<Self, JwtSetupError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| JwtSetupError::InvalidJwksUrl("not a valid URI".into()))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return Err(JwtSetupError::InvalidJwksUrl(
                    "scheme must be http or https".into(),
                ))
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(JwtSetupError::InvalidJwksUrl("missing host".into()));
        }

        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let ca_err = |reason: String| JwtSetupError::CaFile {
                    path: path.to_path_buf(),
                    reason,
                };
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| ca_err(e.to_string()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ca_err(e.to_string()))?;
                if certs.is_empty() {
                    return Err(ca_err("no certificate found".into()));
                }
                for cert in certs {
                    roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| JwtSetupError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(JwksClient {
            client,
            uri,
            timeout,
        })
    }

    /// Fetches and parses the key set. The error string never contains
    /// response bodies.
    pub(crate) async fn fetch(&self) -> Result<Vec<VerifyingKey>, String> {
        match tokio::time::timeout(self.timeout, self.fetch_inner()).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {:?}", self.timeout)),
        }
    }

    async fn fetch_inner(&self) -> Result<Vec<VerifyingKey>, String> {
        let req = http::Request::get(self.uri.clone())
            .header(
                http::header::ACCEPT,
                "application/jwk-set+json, application/json",
            )
            .header(http::header::USER_AGENT, "portcullis")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("building request: {e}"))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("unexpected status {status}"));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading body: {e}"))?
            .to_bytes();
        parse_jwks(&body)
    }
}
