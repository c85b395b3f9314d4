//! A small HTTP(S) client for identity providers: key sets (JWKS), OIDC discovery,
//! token and revocation endpoints. Not the proxy's upstream pool: few requests,
//! small bounded bodies, a deadline on every call.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HttpSetupError {
    #[error("CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// A response: status and a body of at most the client's limit.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

/// Client for an identity provider's endpoints (http or https, HTTP/1.1).
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    max_body: usize,
}

impl HttpClient {
    /// `ca_file`: PEM roots to trust instead of the web PKI's. Every call is bounded
    /// by `timeout` (connect, send and the whole body) and reads at most `max_body`
    /// bytes.
    pub fn new(
        timeout: Duration,
        max_body: usize,
        ca_file: Option<&Path>,
    ) -> Result<Self, HttpSetupError> {
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let ca_err = |reason: String| HttpSetupError::CaFile {
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
            .map_err(|e| HttpSetupError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        // Idle connections are closed before a typical server's keep-alive ends
        // (field.md: hyper-util's pool otherwise keeps them for 90 s).
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(HttpClient {
            client,
            timeout,
            max_body,
        })
    }

    /// `GET uri` with an `Accept` header.
    pub async fn get(&self, uri: &Uri, accept: &'static str) -> Result<HttpResponse, String> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(uri.clone())
            .header(ACCEPT, accept)
            .header(USER_AGENT, "portcullis")
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("building request: {e}"))?;
        self.send(req).await
    }

    /// `POST uri` with an `application/x-www-form-urlencoded` body and, when given,
    /// an `Authorization` header (client authentication).
    pub async fn post_form(
        &self,
        uri: &Uri,
        form: &[(&str, &str)],
        authorization: Option<HeaderValue>,
    ) -> Result<HttpResponse, String> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .header(ACCEPT, "application/json")
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(USER_AGENT, "portcullis");
        if let Some(auth) = authorization {
            builder = builder.header(AUTHORIZATION, auth);
        }
        let req = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("building request: {e}"))?;
        self.send(req).await
    }

    /// Sends `req`; the error string never contains a response body.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<HttpResponse, String> {
        match tokio::time::timeout(self.timeout, self.send_inner(req)).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {:?}", self.timeout)),
        }
    }

    async fn send_inner(&self, req: Request<Full<Bytes>>) -> Result<HttpResponse, String> {
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), self.max_body)
            .collect()
            .await
            .map_err(|e| format!("reading body: {e}"))?
            .to_bytes();
        Ok(HttpResponse { status, body })
    }
}

/// Checks that `url` is an absolute http or https URI with a host.
pub fn parse_http_uri(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|_| "not a valid URI".to_string())?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("scheme must be http or https".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("missing host".into());
    }
    Ok(uri)
}
