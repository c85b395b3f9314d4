//! Random identifiers. Every one comes from the operating system's random source and
//! is written in base64url without padding.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Random bytes behind a session id: 256 bits (at least 192 are required).
pub const SESSION_ID_BYTES: usize = 32;
/// Random bytes behind a login's `state` and `nonce`.
pub const STATE_BYTES: usize = 24;

/// The OS random source failed: nothing may be issued.
#[derive(Debug, thiserror::Error)]
#[error("the system's random source failed: {0}")]
pub struct RandomError(String);

/// `n` random bytes, base64url without padding.
pub fn random_token(n: usize) -> Result<String, RandomError> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|e| RandomError(e.to_string()))?;
    Ok(URL_SAFE_NO_PAD.encode(&buf))
}

/// A new session id (43 characters).
pub fn session_id() -> Result<String, RandomError> {
    random_token(SESSION_ID_BYTES)
}

/// A new `state` or `nonce` (32 characters).
pub fn state() -> Result<String, RandomError> {
    random_token(STATE_BYTES)
}

/// A PKCE code verifier: 32 random bytes, 43 characters of the unreserved set
/// (RFC 7636 §4.1).
pub fn pkce_verifier() -> Result<String, RandomError> {
    random_token(32)
}

/// The S256 code challenge of `verifier` (RFC 7636 §4.2).
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// The store key part of a secret id: its SHA-256, base64url. A store dump or a
/// key listing then holds no value a client could present.
pub fn hashed(id: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(id.as_bytes()))
}

/// Whether a presented id has the shape of one this module issues for `bytes`
/// random bytes: junk is refused before any store lookup.
pub fn well_formed(id: &str, bytes: usize) -> bool {
    id.len() == (bytes * 4).div_ceil(3)
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_matches_rfc_7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn ids_are_long_distinct_and_well_formed() {
        let a = session_id().unwrap();
        let b = session_id().unwrap();
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert!(well_formed(&a, SESSION_ID_BYTES));
        let s = state().unwrap();
        assert_eq!(s.len(), 32);
        assert!(well_formed(&s, STATE_BYTES));
        let v = pkce_verifier().unwrap();
        assert!((43..=128).contains(&v.len()));
    }

    #[test]
    fn junk_is_not_well_formed() {
        let ok = session_id().unwrap();
        assert!(!well_formed(&ok[1..], SESSION_ID_BYTES));
        assert!(!well_formed(&format!("{ok}A"), SESSION_ID_BYTES));
        let bad = format!("{}=", &ok[..42]);
        assert!(!well_formed(&bad, SESSION_ID_BYTES));
        assert!(!well_formed("", SESSION_ID_BYTES));
        assert!(!well_formed(&"é".repeat(22), SESSION_ID_BYTES));
    }

    #[test]
    fn hashed_is_stable_and_hides_the_id() {
        let id = session_id().unwrap();
        assert_eq!(hashed(&id), hashed(&id));
        assert_ne!(hashed(&id), id);
        assert_ne!(hashed(&id), hashed(&session_id().unwrap()));
    }
}
