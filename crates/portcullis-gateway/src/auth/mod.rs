//! Authentication: named authenticators (static bearer tokens, JWT) and the per-route
//! policy that combines them (any of, optional, required scopes).
//!
//! Identity headers that authenticators set are removed from every incoming request
//! before routing ([`crate::sanitize`]), so a client can never spoof them.

use std::sync::Arc;

pub(crate) mod compile;
pub mod external;

pub use external::RequestView;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};
use portcullis_auth::apikey::{ApiKeyRecord, ApiKeys};
use portcullis_auth::jwt::{JwtError, JwtVerifier, VerifiedToken};
use subtle::ConstantTimeEq;

/// Where an authenticator looks for its credential.
#[derive(Debug, Clone)]
pub struct TokenSources {
    pub header: bool,
    pub cookie: Option<String>,
    pub query: Option<String>,
}

impl Default for TokenSources {
    fn default() -> Self {
        TokenSources {
            header: true,
            cookie: None,
            query: None,
        }
    }
}

impl From<&portcullis_config::TokenSources> for TokenSources {
    fn from(c: &portcullis_config::TokenSources) -> Self {
        TokenSources {
            header: c.header.0,
            cookie: c.cookie.as_ref().map(|v| v.to_string()),
            query: c.query.as_ref().map(|v| v.to_string()),
        }
    }
}

/// Where a credential was found: it is removed from there before proxying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    Header,
    Cookie(String),
    Query(String),
}

pub enum Authenticator {
    StaticToken {
        name: Arc<str>,
        tokens: Vec<Box<[u8]>>,
        principal: String,
        principal_header: Option<HeaderName>,
    },
    Jwt {
        name: Arc<str>,
        verifier: JwtVerifier,
        sources: TokenSources,
        claim_headers: Vec<(String, HeaderName)>,
        principal_header: Option<HeaderName>,
    },
    ApiKey {
        name: Arc<str>,
        enabled: bool,
        keys: ApiKeys,
        sources: TokenSources,
        principal_header: Option<HeaderName>,
        quota_fail_open: bool,
    },
    /// A browser session (OpenID Connect login) named by its cookie.
    Oidc {
        name: Arc<str>,
        service: Arc<crate::action::oidc::OidcService>,
    },
    /// Another service decides (HTTP subrequest or Envoy ext_authz over gRPC).
    External {
        name: Arc<str>,
        auth: Arc<external::ExternalAuth>,
    },
}

impl Authenticator {
    pub fn name(&self) -> &str {
        match self {
            Authenticator::StaticToken { name, .. }
            | Authenticator::Jwt { name, .. }
            | Authenticator::ApiKey { name, .. }
            | Authenticator::Oidc { name, .. }
            | Authenticator::External { name, .. } => name,
        }
    }

    pub fn sources(&self) -> TokenSources {
        match self {
            Authenticator::StaticToken { .. } => TokenSources::default(),
            Authenticator::Jwt { sources, .. } | Authenticator::ApiKey { sources, .. } => {
                sources.clone()
            }
            Authenticator::Oidc { service, .. } => TokenSources {
                header: service.accepts_bearer(),
                cookie: Some(service.cookie_name().to_owned()),
                query: None,
            },
            Authenticator::External { auth, .. } => auth.sources.clone(),
        }
    }

    /// Every header this authenticator may set upstream.
    pub fn identity_headers(&self) -> Vec<HeaderName> {
        match self {
            Authenticator::StaticToken {
                principal_header, ..
            }
            | Authenticator::ApiKey {
                principal_header, ..
            } => principal_header.iter().cloned().collect(),
            Authenticator::Jwt {
                claim_headers,
                principal_header,
                ..
            } => claim_headers
                .iter()
                .map(|(_, h)| h.clone())
                .chain(principal_header.iter().cloned())
                .collect(),
            Authenticator::Oidc { service, .. } => service.headers.all(),
            Authenticator::External { auth, .. } => auth.identity_headers(),
        }
    }

    /// Checks `credential`, found at `source` in the request `req`.
    pub(crate) async fn verify(
        &self,
        credential: &str,
        source: &CredentialSource,
        req: &RequestView<'_>,
    ) -> Result<Identity, Failure> {
        match self {
            Authenticator::External { auth, .. } => {
                match auth.verify(credential, source, req).await {
                    external::Outcome::Allowed(identity) => Ok(identity),
                    external::Outcome::Denied(d) => Err(Failure::Denied(d)),
                    external::Outcome::Unavailable => Err(Failure::ServiceUnavailable),
                }
            }
            Authenticator::StaticToken {
                tokens,
                principal,
                principal_header,
                ..
            } => {
                // Check every token so timing does not reveal which one matched.
                let mut ok = subtle::Choice::from(0);
                for t in tokens {
                    ok |= t.as_ref().ct_eq(credential.as_bytes());
                }
                if !bool::from(ok) {
                    return Err(Failure::Invalid);
                }
                let mut headers = Vec::new();
                if let (Some(h), Ok(v)) = (principal_header, HeaderValue::from_str(principal)) {
                    headers.push((h.clone(), v));
                }
                Ok(Identity {
                    principal: principal.clone(),
                    scopes: Vec::new(),
                    headers,
                    source: CredentialSource::Header,
                    api_key: None,
                    token: None,
                })
            }
            Authenticator::ApiKey {
                enabled,
                keys,
                principal_header,
                quota_fail_open,
                ..
            } => {
                // Other credentials (JWTs, static tokens) never cost a store lookup.
                if !*enabled || !portcullis_auth::apikey::looks_like_api_key(credential) {
                    return Err(Failure::Invalid);
                }
                match keys.verify(credential).await {
                    Ok(Some(record)) => {
                        let mut headers = Vec::new();
                        if let (Some(h), Ok(v)) =
                            (principal_header, HeaderValue::from_str(&record.principal))
                        {
                            headers.push((h.clone(), v));
                        }
                        Ok(Identity {
                            principal: record.principal.clone(),
                            scopes: record.scopes.clone(),
                            headers,
                            source: CredentialSource::Header,
                            api_key: Some(ApiKeyUse {
                                keys: keys.clone(),
                                record,
                                fail_open: *quota_fail_open,
                            }),
                            token: None,
                        })
                    }
                    Ok(None) => Err(Failure::Invalid),
                    Err(e) => {
                        tracing::warn!(error = %e, "API key lookup failed");
                        Err(Failure::StoreUnavailable)
                    }
                }
            }
            Authenticator::Jwt {
                verifier,
                claim_headers,
                principal_header,
                ..
            } => match verifier.verify(credential).await {
                Ok(token) => Ok(jwt_identity(
                    &token,
                    claim_headers,
                    principal_header.as_ref(),
                )),
                Err(JwtError::Expired) => Err(Failure::Expired),
                Err(JwtError::KeysUnavailable) => Err(Failure::KeysUnavailable),
                Err(_) => Err(Failure::Invalid),
            },
            Authenticator::Oidc { service, .. } if *source == CredentialSource::Header => {
                use crate::action::oidc::BearerRefusal;
                match service.bearer(credential).await {
                    Ok(token) => Ok(bearer_identity(service, token)),
                    Err(BearerRefusal::Invalid) => Err(Failure::Invalid),
                    Err(BearerRefusal::Expired) => Err(Failure::Expired),
                    Err(BearerRefusal::Unavailable) => Err(Failure::KeysUnavailable),
                }
            }
            Authenticator::Oidc { service, .. } => {
                use crate::action::oidc::SessionLookup;
                match service.session(credential).await {
                    Ok(SessionLookup::Live(record)) => Ok(session_identity(service, *record)),
                    Ok(SessionLookup::Missing) => Err(Failure::Invalid),
                    Ok(SessionLookup::Ended) => Err(Failure::SessionEnded(service.clear_cookie())),
                    Err(_) => Err(Failure::StoreUnavailable),
                }
            }
        }
    }
}

/// The identity of a browser session: its user, and the identity headers the
/// authenticator names (values that are not valid header text are left out).
fn session_identity(
    service: &crate::action::oidc::OidcService,
    record: portcullis_session::record::SessionRecord,
) -> Identity {
    let h = &service.headers;
    let mut headers: Vec<(HeaderName, HeaderValue)> =
        forwarded_token(service, &record).into_iter().collect();
    // An email the provider did not verify is not an identity (self-registration
    // would let anyone claim anyone's address).
    let email = record.email.as_ref().filter(|_| record.email_verified);
    for (name, value) in [
        (&h.sub, Some(&record.sub)),
        (&h.email, email),
        (&h.name, record.name.as_ref()),
    ] {
        if let (Some(name), Some(Ok(v))) =
            (name, value.map(|v| HeaderValue::from_bytes(v.as_bytes())))
        {
            headers.push((name.clone(), v));
        }
    }
    Identity {
        principal: record.sub.clone(),
        scopes: record
            .scope
            .as_deref()
            .unwrap_or("")
            .split_ascii_whitespace()
            .map(str::to_owned)
            .collect(),
        headers,
        source: CredentialSource::Cookie(service.cookie_name().to_owned()),
        api_key: None,
        token: None,
    }
}

/// The identity of an API client's access token: its `sub`, scopes and claims, and
/// the same identity headers a session gets (from the token's claims).
fn bearer_identity(
    service: &crate::action::oidc::OidcService,
    token: Arc<VerifiedToken>,
) -> Identity {
    let h = &service.headers;
    let mut headers = Vec::new();
    let verified = token.claims.get("email_verified") == Some(&serde_json::Value::Bool(true));
    for (name, claim) in [(&h.sub, "sub"), (&h.email, "email"), (&h.name, "name")] {
        if claim == "email" && !verified {
            continue;
        }
        let value = token.claims.get(claim).and_then(serde_json::Value::as_str);
        if let (Some(name), Some(Ok(v))) =
            (name, value.map(|v| HeaderValue::from_bytes(v.as_bytes())))
        {
            headers.push((name.clone(), v));
        }
    }
    Identity {
        principal: token.subject.clone().unwrap_or_default(),
        scopes: token.scopes.clone(),
        headers,
        source: CredentialSource::Header,
        api_key: None,
        token: Some(token),
    }
}

/// `Authorization: Bearer <access token>` for the upstream, when the session's
/// authenticator forwards it.
fn forwarded_token(
    service: &crate::action::oidc::OidcService,
    record: &portcullis_session::record::SessionRecord,
) -> Option<(HeaderName, HeaderValue)> {
    if !service.forwards_access_token() {
        return None;
    }
    let mut v = HeaderValue::from_str(&format!("Bearer {}", record.access_token)).ok()?;
    v.set_sensitive(true);
    Some((header::AUTHORIZATION, v))
}

fn jwt_identity(
    token: &Arc<VerifiedToken>,
    claim_headers: &[(String, HeaderName)],
    principal_header: Option<&HeaderName>,
) -> Identity {
    let mut headers = Vec::with_capacity(claim_headers.len() + 1);
    for (claim, header) in claim_headers {
        let Some(value) = token.claims.get(claim).and_then(claim_text) else {
            continue;
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.push((header.clone(), v));
        }
    }
    let principal = token.subject.clone().unwrap_or_default();
    if let (Some(h), Ok(v)) = (principal_header, HeaderValue::from_str(&principal)) {
        headers.push((h.clone(), v));
    }
    Identity {
        principal,
        scopes: token.scopes.clone(),
        headers,
        source: CredentialSource::Header,
        api_key: None,
        token: Some(token.clone()),
    }
}

pub(crate) enum Failure {
    Invalid,
    Expired,
    KeysUnavailable,
    StoreUnavailable,
    /// A browser session just ended (refresh refused, token expired): 401
    /// `SESSION_EXPIRED` with this `Set-Cookie`, which removes the cookie.
    SessionEnded(HeaderValue),
    /// An authorization service refused (its status and body go to the client).
    Denied(Arc<external::Decision>),
    /// An authorization service gave no decision (fail-closed).
    ServiceUnavailable,
}

/// The API key a request authenticated with, for quota accounting.
#[derive(Clone)]
pub struct ApiKeyUse {
    pub keys: ApiKeys,
    pub record: Arc<ApiKeyRecord>,
    pub fail_open: bool,
}

impl std::fmt::Debug for ApiKeyUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyUse")
            .field("id", &self.record.id)
            .finish()
    }
}

/// Who the request is, once authenticated.
#[derive(Debug, Clone)]
pub struct Identity {
    pub principal: String,
    pub scopes: Vec<String>,
    /// Headers to set upstream (claims, principal).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub source: CredentialSource,
    pub api_key: Option<ApiKeyUse>,
    /// The verified JWT, for `{claim.<name>}` in header templates.
    pub token: Option<Arc<VerifiedToken>>,
}

impl Identity {
    /// A claim of the JWT as header text (strings as they are, numbers and booleans
    /// printed, arrays comma-joined); `None` for other kinds or without a JWT.
    pub fn claim_text(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        claim_text(self.token.as_ref()?.claims.get(name)?)
    }
}

fn claim_text(value: &serde_json::Value) -> Option<std::borrow::Cow<'_, str>> {
    use std::borrow::Cow;
    match value {
        serde_json::Value::String(s) => Some(Cow::Borrowed(s)),
        serde_json::Value::Number(n) => Some(Cow::Owned(n.to_string())),
        serde_json::Value::Bool(b) => Some(Cow::Owned(b.to_string())),
        serde_json::Value::Array(items) => Some(Cow::Owned(
            items
                .iter()
                .filter_map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .or_else(|| i.as_number().map(|n| n.to_string()))
                })
                .collect::<Vec<_>>()
                .join(","),
        )),
        _ => None,
    }
}

/// Every place a route's authenticators read credentials from: all of them are
/// removed before proxying (unless the route forwards credentials), not only the
/// one a request happened to use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialSources {
    pub authorization: bool,
    pub cookies: Vec<String>,
    /// Compared with percent-decoded parameter names.
    pub query: Vec<String>,
}

impl CredentialSources {
    pub fn of(authenticators: &[Arc<Authenticator>]) -> Self {
        let mut out = CredentialSources::default();
        for a in authenticators {
            let s = a.sources();
            out.authorization |= s.header;
            if let Some(c) = s.cookie {
                if !out.cookies.contains(&c) {
                    out.cookies.push(c);
                }
            }
            if let Some(q) = s.query {
                if !out.query.contains(&q) {
                    out.query.push(q);
                }
            }
        }
        out
    }
}

/// Finds a credential: `Authorization: Bearer`, then the cookie, then the query parameter.
pub(crate) fn find_credential(
    sources: &TokenSources,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Option<(String, CredentialSource)> {
    if sources.header {
        if let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()))
        {
            return Some((token, CredentialSource::Header));
        }
    }
    if let Some(name) = &sources.cookie {
        for value in headers.get_all(header::COOKIE) {
            let Ok(s) = value.to_str() else { continue };
            for pair in s.split(';') {
                if let Some((k, v)) = pair.trim().split_once('=') {
                    if k == name && !v.is_empty() {
                        return Some((v.to_owned(), CredentialSource::Cookie(name.clone())));
                    }
                }
            }
        }
    }
    if let (Some(name), Some(q)) = (&sources.query, query) {
        for pair in q.split('&') {
            if let Some((k, v)) = pair.split_once('=') {
                let k = percent_encoding::percent_decode_str(k).decode_utf8_lossy();
                if k == name.as_str() && !v.is_empty() {
                    let v = percent_encoding::percent_decode_str(v).decode_utf8().ok()?;
                    return Some((v.into_owned(), CredentialSource::Query(name.clone())));
                }
            }
        }
    }
    None
}

/// `Bearer <token>`: the scheme is case-insensitive (RFC 7235), the token is not.
fn bearer(value: &[u8]) -> Option<String> {
    if value.len() < 7 || !value[..7].eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = value[7..].trim_ascii();
    if token.is_empty() {
        return None;
    }
    std::str::from_utf8(token).ok().map(str::to_owned)
}

/// Removes every configured credential from the headers; returns the query
/// parameter names to drop.
pub fn remove_credentials<'s>(
    headers: &mut HeaderMap,
    sources: &'s CredentialSources,
) -> &'s [String] {
    if sources.authorization {
        headers.remove(header::AUTHORIZATION);
    }
    // Bytes, not `str`: a cookie value with non-ASCII bytes beside the credential
    // must not hide the credential from this check.
    let is_credential = |pair: &[u8]| {
        let name = pair
            .split(|b| *b == b'=')
            .next()
            .unwrap_or(pair)
            .trim_ascii();
        sources.cookies.iter().any(|c| c.as_bytes() == name)
    };
    let has_credential_cookie = !sources.cookies.is_empty()
        && headers
            .get_all(header::COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
            .any(is_credential);
    if has_credential_cookie {
        let mut kept: Vec<u8> = Vec::new();
        for pair in headers
            .get_all(header::COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
            .map(<[u8]>::trim_ascii)
            .filter(|pair| !pair.is_empty() && !is_credential(pair))
        {
            if !kept.is_empty() {
                kept.extend_from_slice(b"; ");
            }
            kept.extend_from_slice(pair);
        }
        headers.remove(header::COOKIE);
        if !kept.is_empty() {
            if let Ok(v) = HeaderValue::from_bytes(&kept) {
                headers.insert(header::COOKIE, v);
            }
        }
    }
    &sources.query
}

/// The query without any parameter whose percent-decoded name is in `names`;
/// `None` when nothing was removed.
pub fn query_without_any(query: &str, names: &[String]) -> Option<String> {
    if names.is_empty() {
        return None;
    }
    let drop = |pair: &str| {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if !key.contains(['%', '+']) {
            return names.iter().any(|n| n == key);
        }
        let decoded = percent_encoding::percent_decode_str(&key.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned();
        names.contains(&decoded)
    };
    if !query.split('&').any(drop) {
        return None;
    }
    Some(
        query
            .split('&')
            .filter(|pair| !drop(pair))
            .collect::<Vec<_>>()
            .join("&"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_token_is_not() {
        assert_eq!(bearer(b"Bearer Tok").as_deref(), Some("Tok"));
        assert_eq!(bearer(b"bearer Tok").as_deref(), Some("Tok"));
        assert_eq!(bearer(b"Basic Tok"), None);
        assert_eq!(bearer(b"Bearer "), None);
    }

    #[test]
    fn every_configured_credential_is_removed() {
        let sources = CredentialSources {
            authorization: true,
            cookies: vec!["token".into(), "sid".into()],
            query: vec!["access_token".into()],
        };
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; token=secret; sid=s; b=2"),
        );
        let params = remove_credentials(&mut h, &sources);
        assert!(!h.contains_key(header::AUTHORIZATION));
        assert_eq!(h[header::COOKIE], "a=1; b=2");
        // A non-ASCII cookie value beside the credential does not hide it.
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_bytes(b"token=secret; pref=\xc3\xa9").unwrap(),
        );
        remove_credentials(&mut h, &sources);
        assert_eq!(h[header::COOKIE].as_bytes(), b"pref=\xc3\xa9");
        assert_eq!(
            query_without_any("a=1&access%5Ftoken=x&b=2&access_token=y", params).as_deref(),
            Some("a=1&b=2")
        );
        assert_eq!(query_without_any("a=1", params), None);
        assert_eq!(
            query_without_any("access_token=x", params).as_deref(),
            Some("")
        );
    }
}
