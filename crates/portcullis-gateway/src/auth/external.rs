//! The `external` authenticator: another service decides whether a request may
//! pass, as nginx `auth_request`, Traefik ForwardAuth and Envoy `ext_authz` do.
//!
//! HTTP mode sends the request's method, URI and credential headers to a URL: 2xx
//! allows (identity from the response headers), 401/403 deny (their status and body
//! go to the client), anything else is a failure handled by the failure mode. gRPC
//! mode asks an Envoy `envoy.service.auth.v3.Authorization/Check` server
//! ([`grpc`]). Decisions are cached per credential for `cache_ttl` (the revocation
//! bound), bounded, and concurrent misses for one credential make one call.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use portcullis_config::{ExternalAuthConfig, FailureMode, Location};
use sha2::{Digest, Sha256};

use super::{CredentialSource, Identity, TokenSources};
use crate::body::Body;
use crate::error::{ErrorCode, GatewayError};
use crate::snapshot::{header_name, relative_to, Errors};
use crate::upstream::{ClientRegistry, ClientSettings, UpstreamClient};

pub mod grpc;

/// Largest body read from the service (a denial's body, a gRPC answer).
const MAX_ANSWER: usize = 16 * 1024;
/// Longest denial text put in the error envelope.
const MAX_DENIAL_MESSAGE: usize = 512;

/// What an authenticator may look at besides the credential.
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// The normalised path.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub host: Option<&'a HeaderValue>,
    pub scheme: &'static str,
    pub client_ip: IpAddr,
    pub request_id: (&'a HeaderName, &'a HeaderValue),
}

impl RequestView<'_> {
    fn path_and_query(&self) -> String {
        match self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.to_owned(),
        }
    }
}

pub struct ExternalAuth {
    call: Call,
    client: UpstreamClient,
    timeout: Duration,
    fail_open: bool,
    pub(crate) sources: TokenSources,
    forward_headers: Vec<HeaderName>,
    principal_from: HeaderName,
    scopes_from: Option<HeaderName>,
    copy_headers: Vec<HeaderName>,
    principal_header: Option<HeaderName>,
    cache: Option<moka::future::Cache<[u8; 32], Arc<Decision>>>,
    /// Cached decisions are keyed by the request too, not only the credential.
    cache_by_request: bool,
}

enum Call {
    Http { uri: Uri, method: Method },
    Grpc { uri: Uri },
}

/// The service's answer.
pub enum Decision {
    Allow {
        principal: String,
        scopes: Vec<String>,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    Deny(Denial),
}

/// A refusal as the service worded it.
pub struct Denial {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
    /// The answer headers a client may see: `WWW-Authenticate`, `Location`,
    /// `Retry-After`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// Answer headers passed on with a refusal.
const DENIAL_HEADERS: [HeaderName; 3] = [
    header::WWW_AUTHENTICATE,
    header::LOCATION,
    header::RETRY_AFTER,
];

/// The service gave no decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// No answer (refused, slow, a 5xx, a failed gRPC call): the failure mode decides.
    Down,
    /// An answer that cannot be read (too large, garbled): never a pass, whatever
    /// the failure mode (it may have been a refusal).
    Garbled,
}

/// What [`ExternalAuth::verify`] concluded.
pub enum Outcome {
    Allowed(Identity),
    Denied(Arc<Decision>),
    Unavailable,
}

impl ExternalAuth {
    pub fn identity_headers(&self) -> Vec<HeaderName> {
        self.copy_headers
            .iter()
            .cloned()
            .chain(self.principal_header.iter().cloned())
            .collect()
    }

    pub async fn verify(
        &self,
        credential: &str,
        source: &CredentialSource,
        req: &RequestView<'_>,
    ) -> Outcome {
        let decision = match &self.cache {
            Some(cache) => cache
                .try_get_with(self.cache_key(credential, req), self.ask(req))
                .await
                .map_err(|e| *e),
            None => self.ask(req).await,
        };
        match decision {
            Ok(d) => match &*d {
                Decision::Allow {
                    principal,
                    scopes,
                    headers,
                } => Outcome::Allowed(Identity {
                    principal: principal.clone(),
                    scopes: scopes.clone(),
                    headers: headers.clone(),
                    source: source.clone(),
                    api_key: None,
                    token: None,
                }),
                Decision::Deny(_) => Outcome::Denied(d),
            },
            Err(Unavailable::Down) if self.fail_open => {
                tracing::warn!("authorization service unavailable; failing open");
                Outcome::Allowed(Identity {
                    principal: String::new(),
                    scopes: Vec::new(),
                    headers: Vec::new(),
                    source: source.clone(),
                    api_key: None,
                    token: None,
                })
            }
            Err(_) => Outcome::Unavailable,
        }
    }

    /// The credential and every other header the service sees: a decision is
    /// reused only for the same inputs.
    fn cache_key(&self, credential: &str, req: &RequestView<'_>) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(credential.as_bytes());
        if self.cache_by_request {
            h.update([0]);
            h.update(req.method.as_str().as_bytes());
            h.update([0]);
            h.update(req.host.map_or(&b""[..], |v| v.as_bytes()));
            h.update([0]);
            h.update(req.path_and_query().as_bytes());
        }
        for name in &self.forward_headers {
            h.update([0]);
            for v in req.headers.get_all(name) {
                h.update(v.as_bytes());
                h.update([1]);
            }
        }
        h.finalize().into()
    }

    async fn ask(&self, req: &RequestView<'_>) -> Result<Arc<Decision>, Unavailable> {
        let asked = match &self.call {
            Call::Http { uri, method } => self.ask_http(uri, method, req),
            Call::Grpc { uri } => {
                return tokio::time::timeout(self.timeout, grpc::check(self, uri, req))
                    .await
                    .map_err(|_| {
                        tracing::warn!("authorization service (gRPC) timed out");
                        Unavailable::Down
                    })?
                    .map(Arc::new);
            }
        };
        tokio::time::timeout(self.timeout, asked)
            .await
            .map_err(|_| {
                tracing::warn!("authorization service timed out");
                Unavailable::Down
            })?
            .map(Arc::new)
    }

    async fn ask_http(
        &self,
        uri: &Uri,
        method: &Method,
        req: &RequestView<'_>,
    ) -> Result<Decision, Unavailable> {
        let mut headers = HeaderMap::new();
        self.credential_headers(req, &mut headers);
        let forwarded = [
            ("x-forwarded-method", Some(req.method.as_str().to_owned())),
            ("x-forwarded-uri", Some(req.path_and_query())),
            (
                "x-forwarded-host",
                req.host.and_then(|h| h.to_str().ok()).map(str::to_owned),
            ),
            ("x-forwarded-proto", Some(req.scheme.to_owned())),
            ("x-forwarded-for", Some(req.client_ip.to_string())),
        ];
        for (name, value) in forwarded {
            if let Some(v) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                headers.insert(HeaderName::from_static(name), v);
            }
        }
        headers.insert(req.request_id.0.clone(), req.request_id.1.clone());
        let mut sub = Request::new(Body::empty());
        *sub.method_mut() = method.clone();
        *sub.uri_mut() = uri.clone();
        *sub.headers_mut() = headers;
        let res = self.client.request(sub).await.map_err(|e| {
            tracing::warn!(error = %crate::action::proxy::error_chain(&e), "authorization service unreachable");
            Unavailable::Down
        })?;
        let status = res.status();
        if status.is_success() {
            return Ok(self.allow(|name| res.headers().get(name)));
        }
        // 3xx and 4xx are the service's refusal (401, 403, a login redirect, a
        // quota's 429); 5xx and anything else: no decision.
        if status.is_redirection() || status.is_client_error() {
            let content_type = res.headers().get(header::CONTENT_TYPE).cloned();
            let headers = denial_headers(|name| res.headers().get(name));
            let body = read_answer(res.into_body())
                .await
                .ok_or(Unavailable::Garbled)?;
            return Ok(Decision::Deny(Denial {
                status,
                content_type,
                body,
                headers,
            }));
        }
        tracing::warn!(
            status = status.as_u16(),
            "authorization service answered neither allow nor deny"
        );
        Err(Unavailable::Down)
    }

    /// The request headers the service sees: the credential's own (`Authorization`,
    /// `Cookie`) and `forward_headers`.
    fn credential_headers(&self, req: &RequestView<'_>, out: &mut HeaderMap) {
        let mut names: Vec<HeaderName> = self.forward_headers.clone();
        if self.sources.header {
            names.push(header::AUTHORIZATION);
        }
        for name in names {
            for v in req.headers.get_all(&name) {
                out.append(name.clone(), v.clone());
            }
        }
        // Only the credential's own cookie: other cookies (browser sessions) never
        // leave the gateway.
        if let Some(cookie) = &self.sources.cookie {
            let found = req
                .headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .map(str::trim)
                .find(|pair| {
                    pair.split_once('=')
                        .is_some_and(|(k, v)| k == cookie && !v.is_empty())
                });
            if let Some(v) = found.and_then(|p| HeaderValue::from_str(p).ok()) {
                out.insert(header::COOKIE, v);
            }
        }
    }

    /// An allow decision, its identity read from the answer's headers.
    fn allow<'a>(&self, get: impl Fn(&HeaderName) -> Option<&'a HeaderValue>) -> Decision {
        let principal = get(&self.principal_from)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let scopes = self
            .scopes_from
            .as_ref()
            .and_then(&get)
            .and_then(|v| v.to_str().ok())
            .map(|s| {
                s.split([' ', ','])
                    .filter(|x| !x.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let mut headers = Vec::new();
        for name in &self.copy_headers {
            if let Some(v) = get(name) {
                headers.push((name.clone(), v.clone()));
            }
        }
        if let (Some(h), Ok(v)) = (&self.principal_header, HeaderValue::from_str(&principal)) {
            if !principal.is_empty() {
                headers.push((h.clone(), v));
            }
        }
        Decision::Allow {
            principal,
            scopes,
            headers,
        }
    }
}

/// The refusal headers a client may see, from an answer's headers.
pub(super) fn denial_headers<'a>(
    get: impl Fn(&HeaderName) -> Option<&'a HeaderValue>,
) -> Vec<(HeaderName, HeaderValue)> {
    DENIAL_HEADERS
        .iter()
        .filter_map(|name| get(name).map(|v| (name.clone(), v.clone())))
        .collect()
}

impl Denial {
    /// The client's answer, with the service's status (3xx or 4xx; anything else
    /// becomes 403): its JSON object body kept (with our `code` and `request_id`
    /// added), other text as the envelope's message.
    pub fn to_error(&self) -> GatewayError {
        let status = if self.status.is_redirection() || self.status.is_client_error() {
            self.status
        } else {
            StatusCode::FORBIDDEN
        };
        let code = match status {
            StatusCode::TOO_MANY_REQUESTS => ErrorCode::RateLimited,
            s if s.is_redirection() || s == StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
            _ => ErrorCode::Forbidden,
        };
        let json = self
            .content_type
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("json"));
        let object = json
            .then(|| serde_json::from_slice::<serde_json::Value>(&self.body).ok())
            .flatten()
            .and_then(|v| match v {
                serde_json::Value::Object(m) => Some(m),
                _ => None,
            });
        let mut e = match object {
            Some(m) => GatewayError::compat(code, status, m),
            None => {
                let text = String::from_utf8_lossy(&self.body);
                let text = text.trim();
                let message = if text.is_empty() {
                    "the authorization service refused the request".to_owned()
                } else {
                    text.chars().take(MAX_DENIAL_MESSAGE).collect()
                };
                GatewayError::new(code, message).with_status(status)
            }
        };
        for (name, value) in &self.headers {
            e = e.with_header(name.clone(), value.clone());
        }
        e
    }
}

async fn read_answer<B>(body: B) -> Option<Bytes>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    http_body_util::Limited::new(body, MAX_ANSWER)
        .collect()
        .await
        .ok()
        .map(|c| c.to_bytes())
}

pub(crate) fn compile(
    c: &ExternalAuthConfig,
    at: Location,
    field: &str,
    source: &Path,
    clients: &ClientRegistry,
    errors: &mut Errors<'_>,
) -> Option<ExternalAuth> {
    let field = format!("{field}.external");
    let (raw, grpc) = match (&c.url, &c.grpc) {
        (Some(u), None) => (u, false),
        (None, Some(g)) => (g, true),
        _ => {
            errors.push(at, &field, "needs exactly one of `url` (HTTP) and `grpc`");
            return None;
        }
    };
    let key = if grpc { "grpc" } else { "url" };
    let mut uri: Uri = match raw.value.parse::<Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some() => u,
        _ => {
            errors.push(
                raw.referenced,
                format!("{field}.{key}"),
                "must be an http:// or https:// URL",
            );
            return None;
        }
    };
    let method = match Method::from_bytes(c.method.trim().to_ascii_uppercase().as_bytes()) {
        Ok(m) => m,
        Err(_) => {
            errors.push(at, format!("{field}.method"), "not an HTTP method");
            return None;
        }
    };
    if c.timeout.get().is_zero() {
        errors.push(at, format!("{field}.timeout"), "must be more than 0");
        return None;
    }
    let call = if grpc {
        uri = match grpc::check_uri(&uri) {
            Some(u) => u,
            None => {
                errors.push(raw.referenced, format!("{field}.grpc"), "not a base URL");
                return None;
            }
        };
        Call::Grpc { uri }
    } else {
        Call::Http { uri, method }
    };
    let mut names = |list: &[portcullis_config::Text], key: &str| -> Option<Vec<HeaderName>> {
        list.iter()
            .map(|h| header_name(h, at, format!("{field}.{key}"), errors))
            .collect()
    };
    let forward_headers = names(&c.forward_headers, "forward_headers")?;
    let copy_headers = names(&c.copy_headers, "copy_headers")?;
    let principal_from = header_name(
        &c.principal_from,
        at,
        format!("{field}.principal_from"),
        errors,
    )?;
    let scopes_from = match &c.scopes_from {
        Some(h) => Some(header_name(h, at, format!("{field}.scopes_from"), errors)?),
        None => None,
    };
    let principal_header = match &c.principal_header {
        Some(h) => Some(header_name(
            h,
            at,
            format!("{field}.principal_header"),
            errors,
        )?),
        None => None,
    };
    let settings = ClientSettings {
        protocol: if grpc {
            portcullis_config::UpstreamProtocol::Http2
        } else {
            portcullis_config::UpstreamProtocol::Auto
        },
        ca_file: c.ca_file.as_ref().map(|f| relative_to(source, f)),
        insecure_skip_verify: false,
        connect_timeout: c.timeout.get(),
        pool: crate::upstream::PoolSettings::default(),
        targets: None,
    };
    let client = match clients.client(&settings) {
        Ok(c) => c,
        Err(e) => {
            errors.push(at, format!("{field}.ca_file"), e);
            return None;
        }
    };
    let ttl = c.cache_ttl.get();
    // Weighed by size: `cache_size` decisions of up to 1 KiB each (a refusal's body
    // counts), so random credentials cannot fill memory with large refusals.
    let cache = (!ttl.is_zero()).then(|| {
        moka::future::Cache::builder()
            .max_capacity(c.cache_size.0.max(1).saturating_mul(1024))
            .weigher(|_key, d: &Arc<Decision>| decision_weight(d))
            .time_to_live(ttl)
            .build()
    });
    let cache_by_request = match c.cache_by {
        Some(portcullis_config::CacheBy::Request) => true,
        Some(portcullis_config::CacheBy::Credential) => false,
        None => grpc,
    };
    Some(ExternalAuth {
        call,
        client,
        timeout: c.timeout.get(),
        fail_open: c.failure_mode == FailureMode::FailOpen,
        sources: TokenSources::from(&c.token_sources),
        forward_headers,
        principal_from,
        scopes_from,
        copy_headers,
        principal_header,
        cache,
        cache_by_request,
    })
}

/// A decision's weight in the cache, in bytes (at least 1 KiB).
fn decision_weight(d: &Decision) -> u32 {
    let bytes = match d {
        Decision::Allow {
            principal,
            scopes,
            headers,
        } => {
            principal.len()
                + scopes.iter().map(String::len).sum::<usize>()
                + headers
                    .iter()
                    .map(|(k, v)| k.as_str().len() + v.len())
                    .sum::<usize>()
        }
        Decision::Deny(denial) => denial.body.len() + 256,
    };
    u32::try_from(bytes.max(1024)).unwrap_or(u32::MAX)
}
