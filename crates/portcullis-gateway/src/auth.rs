//! Baseline authentication: static bearer tokens (FnKit's token mode, FoldForge's
//! admin token). Compared in constant time, case-sensitively.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue};
use portcullis_config::Secret;
use subtle::ConstantTimeEq;

use crate::error::{ErrorCode, GatewayError};

#[derive(Clone, Debug)]
pub enum AuthPolicy {
    /// No credential configured anywhere: open mode.
    Open,
    /// The route is marked `public`.
    Public,
    /// One of these bearer tokens is required.
    Tokens {
        tokens: Arc<[Box<[u8]>]>,
        forward_credential: bool,
    },
}

impl AuthPolicy {
    /// Empty tokens are ignored, so `${TOKEN:-}` left unset means open mode.
    pub fn from_tokens(tokens: &[Secret], forward_credential: bool) -> Self {
        let tokens: Vec<Box<[u8]>> = tokens
            .iter()
            .filter(|t| !t.is_empty())
            .map(|t| t.expose().as_bytes().into())
            .collect();
        if tokens.is_empty() {
            AuthPolicy::Open
        } else {
            AuthPolicy::Tokens {
                tokens: tokens.into(),
                forward_credential,
            }
        }
    }

    /// Checks the request; on success says whether `Authorization` must be removed
    /// before proxying.
    pub fn check(&self, headers: &HeaderMap) -> Result<StripCredential, GatewayError> {
        let AuthPolicy::Tokens {
            tokens,
            forward_credential,
        } = self
        else {
            return Ok(StripCredential(false));
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()));
        let Some(presented) = presented else {
            return Err(unauthorized("missing bearer token"));
        };
        // Check every token so timing does not reveal which one matched.
        let mut ok = subtle::Choice::from(0);
        for t in tokens.iter() {
            ok |= t.as_ref().ct_eq(presented);
        }
        if bool::from(ok) {
            Ok(StripCredential(!forward_credential))
        } else {
            Err(unauthorized("invalid bearer token"))
        }
    }
}

/// Whether the gateway's own credential must be removed before proxying.
#[derive(Clone, Copy, Debug)]
pub struct StripCredential(pub bool);

/// `Bearer <token>`: the scheme is case-insensitive (RFC 7235), the token is not.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    if value.len() < 7 || !value[..7].eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = value[7..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

fn unauthorized(message: &str) -> GatewayError {
    GatewayError::new(ErrorCode::Unauthorized, message)
        .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AuthPolicy {
        AuthPolicy::from_tokens(&[Secret("Tok3n".into()), Secret(String::new())], false)
    }

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn tokens_are_case_sensitive_and_scheme_is_not() {
        let p = policy();
        assert!(p.check(&headers("Bearer Tok3n")).is_ok());
        assert!(p.check(&headers("bearer Tok3n")).is_ok());
        assert!(p.check(&headers("Bearer tok3n")).is_err());
        assert!(p.check(&headers("Bearer Tok3n2")).is_err());
        assert!(p.check(&headers("Basic Tok3n")).is_err());
        assert!(p.check(&HeaderMap::new()).is_err());
    }

    #[test]
    fn empty_tokens_mean_open_mode() {
        assert!(matches!(
            AuthPolicy::from_tokens(&[Secret(String::new())], false),
            AuthPolicy::Open
        ));
    }
}
