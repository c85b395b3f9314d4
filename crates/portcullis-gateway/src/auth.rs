//! Authentication: named authenticators (static bearer tokens, JWT) and the per-route
//! policy that combines them (any of, optional, required scopes).
//!
//! Identity headers that authenticators set are removed from every incoming request
//! before routing ([`strip_identity_headers`]), so a client can never spoof them.

use std::collections::HashSet;
use std::sync::Arc;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};
use portcullis_auth::jwt::{JwtError, JwtVerifier, VerifiedToken};
use subtle::ConstantTimeEq;

use crate::error::{ErrorCode, GatewayError};

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
}

impl Authenticator {
    pub fn name(&self) -> &str {
        match self {
            Authenticator::StaticToken { name, .. } | Authenticator::Jwt { name, .. } => name,
        }
    }

    fn sources(&self) -> TokenSources {
        match self {
            Authenticator::StaticToken { .. } => TokenSources::default(),
            Authenticator::Jwt { sources, .. } => sources.clone(),
        }
    }

    /// Every header this authenticator may set upstream.
    pub fn identity_headers(&self) -> Vec<HeaderName> {
        match self {
            Authenticator::StaticToken {
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
        }
    }

    async fn verify(&self, credential: &str) -> Result<Identity, Failure> {
        match self {
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
                })
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
        }
    }
}

fn jwt_identity(
    token: &VerifiedToken,
    claim_headers: &[(String, HeaderName)],
    principal_header: Option<&HeaderName>,
) -> Identity {
    let mut headers = Vec::with_capacity(claim_headers.len() + 1);
    for (claim, header) in claim_headers {
        let value = match token.claims.get(claim) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(serde_json::Value::Bool(b)) => b.to_string(),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .or_else(|| i.as_number().map(|n| n.to_string()))
                })
                .collect::<Vec<_>>()
                .join(","),
            _ => continue,
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
    }
}

enum Failure {
    Invalid,
    Expired,
    KeysUnavailable,
}

/// Who the request is, once authenticated.
#[derive(Debug, Clone)]
pub struct Identity {
    pub principal: String,
    pub scopes: Vec<String>,
    /// Headers to set upstream (claims, principal).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub source: CredentialSource,
}

/// A route's authentication rule.
#[derive(Clone)]
pub enum AuthPolicy {
    /// Nothing configured anywhere: open mode.
    Open,
    /// The route is marked `public`.
    Public,
    Required {
        /// A request passes if any of these accepts it.
        authenticators: Arc<[Arc<Authenticator>]>,
        /// No credential at all: continue anonymously.
        optional: bool,
        /// All of these must be granted.
        scopes: Arc<[String]>,
        forward_credential: bool,
    },
}

/// The outcome of a successful check.
pub struct Authenticated {
    pub identity: Option<Identity>,
    /// Remove the credential from where it was found before proxying.
    pub strip_credential: bool,
}

impl AuthPolicy {
    pub async fn check(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Authenticated, GatewayError> {
        let AuthPolicy::Required {
            authenticators,
            optional,
            scopes,
            forward_credential,
        } = self
        else {
            return Ok(Authenticated {
                identity: None,
                strip_credential: false,
            });
        };
        let mut presented = false;
        let mut expired = false;
        let mut unavailable = false;
        for authenticator in authenticators.iter() {
            let Some((credential, source)) =
                find_credential(&authenticator.sources(), headers, query)
            else {
                continue;
            };
            presented = true;
            match authenticator.verify(&credential).await {
                Ok(mut identity) => {
                    identity.source = source;
                    if let Some(missing) = scopes.iter().find(|s| !identity.scopes.contains(s)) {
                        return Err(insufficient_scope(scopes, missing));
                    }
                    return Ok(Authenticated {
                        identity: Some(identity),
                        strip_credential: !forward_credential,
                    });
                }
                Err(Failure::Expired) => expired = true,
                Err(Failure::KeysUnavailable) => unavailable = true,
                Err(Failure::Invalid) => {}
            }
        }
        if !presented {
            if *optional {
                return Ok(Authenticated {
                    identity: None,
                    strip_credential: false,
                });
            }
            return Err(unauthorized(
                ErrorCode::Unauthorized,
                "missing credential",
                "Bearer",
            ));
        }
        if expired {
            return Err(unauthorized(
                ErrorCode::ExpiredToken,
                "the token has expired",
                "Bearer error=\"invalid_token\", error_description=\"the token has expired\"",
            ));
        }
        if unavailable {
            tracing::warn!("JWT keys unavailable (JWKS not fetched yet); rejecting the token");
            return Err(GatewayError::server(ErrorCode::ServiceUnavailable));
        }
        Err(unauthorized(
            ErrorCode::Unauthorized,
            "invalid credential",
            "Bearer error=\"invalid_token\"",
        ))
    }
}

fn unauthorized(code: ErrorCode, message: &str, challenge: &'static str) -> GatewayError {
    GatewayError::new(code, message).with_header(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    )
}

fn insufficient_scope(required: &[String], missing: &str) -> GatewayError {
    let challenge = format!(
        "Bearer error=\"insufficient_scope\", scope=\"{}\"",
        required.join(" ")
    );
    let mut e = GatewayError::new(
        ErrorCode::InsufficientScope,
        format!("the token lacks the scope {missing:?}"),
    );
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        e = e.with_header(header::WWW_AUTHENTICATE, v);
    }
    e
}

/// Finds a credential: `Authorization: Bearer`, then the cookie, then the query parameter.
fn find_credential(
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
                if k == name && !v.is_empty() {
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

/// Removes every identity header from an incoming request.
pub fn strip_identity_headers(headers: &mut HeaderMap, names: &HashSet<HeaderName>) {
    for name in names {
        headers.remove(name);
    }
}

/// Removes the credential from where it was found.
pub fn remove_credential(headers: &mut HeaderMap, source: &CredentialSource) -> Option<String> {
    match source {
        CredentialSource::Header => {
            headers.remove(header::AUTHORIZATION);
            None
        }
        CredentialSource::Cookie(name) => {
            let kept: Vec<String> = headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .map(str::trim)
                .filter(|pair| {
                    !pair.is_empty() && pair.split_once('=').is_none_or(|(k, _)| k != name)
                })
                .map(str::to_owned)
                .collect();
            headers.remove(header::COOKIE);
            if !kept.is_empty() {
                if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
                    headers.insert(header::COOKIE, v);
                }
            }
            None
        }
        // The caller rewrites the query.
        CredentialSource::Query(name) => Some(name.clone()),
    }
}

/// The query without parameter `name`.
pub fn query_without(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) != name)
        .collect::<Vec<_>>()
        .join("&")
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
    fn cookie_credential_is_removed_alone() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; token=secret; b=2"),
        );
        remove_credential(&mut h, &CredentialSource::Cookie("token".into()));
        assert_eq!(h[header::COOKIE], "a=1; b=2");
    }

    #[test]
    fn query_parameter_is_removed() {
        assert_eq!(
            query_without("a=1&access_token=x&b=2", "access_token"),
            "a=1&b=2"
        );
        assert_eq!(query_without("access_token=x", "access_token"), "");
    }
}
