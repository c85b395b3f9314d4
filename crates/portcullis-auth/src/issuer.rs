//! Issuing the gateway's own JWTs (login and guest tokens).
//!
//! [`TokenIssuer`] signs compact JWS tokens with an HMAC secret (HS256/384/512) or a
//! PEM private key (RS*/PS* RSA, ES256 P-256, ES384 P-384, EdDSA Ed25519) using the
//! same `jsonwebtoken` crate as [`crate::jwt::JwtVerifier`], so a verifier configured
//! with the matching secret or public key, issuer and audience accepts its tokens.
//!
//! The key is checked once in [`TokenIssuer::new`]: its family must match the
//! algorithm, it must actually sign (right curve, a private and not a public key),
//! RSA keys must have at least 2048 bits (the verifier rejects smaller ones) and HMAC
//! secrets at least 16 bytes.
//!
//! Every token is issued as a [`TokenKind`]: guest tokens carry the payload claim
//! `"typ": "guest"`, which verifiers reject unless configured to accept guests
//! ([`crate::jwt::JwtConfig::accept_guest`]).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Map, Value};

use crate::jwt::{Algorithm, GUEST_TOKEN_TYPE, MIN_HS_SECRET_LEN, TOKEN_TYPE_CLAIM};

/// Smallest RSA modulus accepted, in bits (same as the verifier).
const MIN_RSA_BITS: usize = 2048;

/// Registered claims that [`TokenIssuer::issue`] sets itself; `extra` may not contain
/// them.
pub const RESERVED_CLAIMS: [&str; 6] = ["iss", "sub", "aud", "exp", "nbf", "iat"];

/// What a token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// A logged-in user (or any token that is not a guest token).
    User,
    /// An anonymous guest: the token carries `"typ": "guest"` (whatever `extra`
    /// says), so verifiers reject it unless they accept guests.
    Guest,
}

/// The signing key.
#[derive(Clone)]
pub enum SigningKey {
    /// HMAC shared secret (HS256/HS384/HS512); must not be empty.
    Secret(Vec<u8>),
    /// One PEM private key: RSA (`RSA PRIVATE KEY` or PKCS#8 `PRIVATE KEY`) for
    /// RS*/PS*, PKCS#8 EC P-256/P-384 for ES256/ES384, PKCS#8 Ed25519 for EdDSA.
    PrivatePem(Vec<u8>),
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SigningKey::Secret(_) => f.write_str("Secret([redacted])"),
            SigningKey::PrivatePem(_) => f.write_str("PrivatePem([redacted])"),
        }
    }
}

/// Issuer configuration.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub algorithm: Algorithm,
    pub key: SigningKey,
    /// `iss` of every token, if set.
    pub issuer: Option<String>,
    /// `aud` (a single string) of every token, if set.
    pub audience: Option<String>,
    /// `kid` header of every token, if set.
    pub kid: Option<String>,
}

/// Errors of [`TokenIssuer`]. Never contain key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IssuerError {
    #[error("token issuer: algorithm {algorithm} cannot be used with this key: {reason}")]
    AlgorithmKeyMismatch {
        algorithm: Algorithm,
        reason: &'static str,
    },
    #[error("token issuer: the HMAC secret is empty")]
    EmptySecret,
    /// Shorter than [`MIN_HS_SECRET_LEN`] (but not empty).
    #[error("token issuer: {}", crate::jwt::SHORT_HS_SECRET)]
    ShortSecret,
    #[error("token issuer: invalid private key for {algorithm}: {reason}")]
    InvalidKey {
        algorithm: Algorithm,
        reason: String,
    },
    #[error("token issuer: RSA key of {bits} bits is too small (minimum 2048)")]
    WeakRsaKey { bits: usize },
    #[error("token issuer: token lifetime must be greater than zero")]
    InvalidTtl,
    #[error("token issuer: claim `{0}` is set by the issuer and cannot be overridden")]
    ReservedClaim(String),
    #[error("token issuer: signing failed: {0}")]
    Sign(String),
}

/// Signs tokens. Cheap to clone.
#[derive(Clone)]
pub struct TokenIssuer {
    algorithm: Algorithm,
    header: Header,
    key: EncodingKey,
    issuer: Option<String>,
    audience: Option<String>,
}

impl fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.header.kid)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Bits of a big-endian unsigned integer.
fn integer_bits(bytes: &[u8]) -> usize {
    let bytes = match bytes.iter().position(|&b| b != 0) {
        Some(i) => &bytes[i..],
        None => return 0,
    };
    match bytes.first() {
        Some(&first) => (bytes.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
        None => 0,
    }
}

impl TokenIssuer {
    /// Validates the key against the algorithm and builds the issuer.
    pub fn new(config: IssuerConfig) -> Result<Self, IssuerError> {
        // Same as `JwtVerifier::new`: make the crypto backend explicit. An Err only
        // means a provider was already installed.
        let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
            &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
        );

        let algorithm = config.algorithm;
        let jalg: jsonwebtoken::Algorithm =
            algorithm
                .as_str()
                .parse()
                .map_err(|_| IssuerError::InvalidKey {
                    algorithm,
                    reason: "algorithm unsupported by the signing backend".to_owned(),
                })?;
        let invalid = |reason: String| IssuerError::InvalidKey { algorithm, reason };

        let key = match (&config.key, algorithm.is_hmac()) {
            (SigningKey::Secret(secret), true) => {
                if secret.is_empty() {
                    return Err(IssuerError::EmptySecret);
                }
                if secret.len() < MIN_HS_SECRET_LEN {
                    return Err(IssuerError::ShortSecret);
                }
                if crate::jwt::weak_hs_secret(secret) {
                    tracing::warn!(
                        len = secret.len(),
                        "token issuer: HMAC secret is shorter than 32 bytes; use a longer random secret"
                    );
                }
                EncodingKey::from_secret(secret)
            }
            (SigningKey::Secret(_), false) => {
                return Err(IssuerError::AlgorithmKeyMismatch {
                    algorithm,
                    reason: "an HMAC secret can only sign HS256/HS384/HS512",
                })
            }
            (SigningKey::PrivatePem(_), true) => {
                return Err(IssuerError::AlgorithmKeyMismatch {
                    algorithm,
                    reason: "HS* needs a shared secret, not a private key",
                })
            }
            (SigningKey::PrivatePem(pem), false) => {
                let parsed = match algorithm {
                    Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem),
                    Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
                    _ => EncodingKey::from_rsa_pem(pem),
                };
                let key = parsed.map_err(|e| invalid(e.to_string()))?;
                if jalg.family() == jsonwebtoken::AlgorithmFamily::Rsa {
                    let (n, _e) = (jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER
                        .key_utils
                        .rsa_pub_components_from_private_key)(
                        key.as_bytes()
                    )
                    .map_err(|_| invalid("not an RSA private key".to_owned()))?;
                    let bits = integer_bits(&n);
                    if bits < MIN_RSA_BITS {
                        return Err(IssuerError::WeakRsaKey { bits });
                    }
                }
                key
            }
        };

        // Proves the key signs with this algorithm (e.g. a P-384 key with ES256, or a
        // public key in the PEM, fail here rather than on the first login).
        jsonwebtoken::crypto::sign(b"portcullis token issuer key check", &key, jalg)
            .map_err(|e| invalid(e.to_string()))?;

        let mut header = Header::new(jalg);
        header.kid = config.kid;
        Ok(TokenIssuer {
            algorithm,
            header,
            key,
            issuer: config.issuer,
            audience: config.audience,
        })
    }

    /// The signing algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Signs a token of `kind` with iat, nbf = now, exp = now + ttl, iss/aud as
    /// configured, sub, and `extra` claims (role, scope …); a [`TokenKind::Guest`]
    /// token also gets `"typ": "guest"`, overriding any `typ` in `extra`. Returns
    /// (token, expires_in seconds).
    ///
    /// `ttl` is rounded up to whole seconds and must not be zero. `extra` must not
    /// contain the claims of [`RESERVED_CLAIMS`] ([`IssuerError::ReservedClaim`]).
    pub fn issue(
        &self,
        kind: TokenKind,
        subject: &str,
        ttl: Duration,
        extra: Map<String, Value>,
    ) -> Result<(String, u64), IssuerError> {
        let ttl_secs = ttl
            .as_secs()
            .saturating_add(u64::from(ttl.subsec_nanos() > 0));
        if ttl_secs == 0 {
            return Err(IssuerError::InvalidTtl);
        }
        if let Some(name) = RESERVED_CLAIMS.iter().find(|c| extra.contains_key(**c)) {
            return Err(IssuerError::ReservedClaim((*name).to_owned()));
        }
        let now = now_secs();
        let mut claims = Map::with_capacity(extra.len() + RESERVED_CLAIMS.len());
        if let Some(iss) = &self.issuer {
            claims.insert("iss".to_owned(), Value::from(iss.as_str()));
        }
        claims.insert("sub".to_owned(), Value::from(subject));
        if let Some(aud) = &self.audience {
            claims.insert("aud".to_owned(), Value::from(aud.as_str()));
        }
        claims.insert("iat".to_owned(), Value::from(now));
        claims.insert("nbf".to_owned(), Value::from(now));
        claims.insert("exp".to_owned(), Value::from(now.saturating_add(ttl_secs)));
        claims.extend(extra);
        if kind == TokenKind::Guest {
            claims.insert(TOKEN_TYPE_CLAIM.to_owned(), Value::from(GUEST_TOKEN_TYPE));
        }
        let token = jsonwebtoken::encode(&self.header, &claims, &self.key)
            .map_err(|e| IssuerError::Sign(e.to_string()))?;
        Ok((token, ttl_secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits() {
        assert_eq!(integer_bits(&[]), 0);
        assert_eq!(integer_bits(&[0, 0]), 0);
        assert_eq!(integer_bits(&[0, 1]), 1);
        assert_eq!(integer_bits(&[0x80, 0]), 16);
        assert_eq!(integer_bits(&[0, 0x7f, 0]), 15);
    }

    fn secret_config(algorithm: Algorithm, len: usize) -> IssuerConfig {
        IssuerConfig {
            algorithm,
            key: SigningKey::Secret(vec![7; len]),
            issuer: None,
            audience: None,
            kid: None,
        }
    }

    fn hs() -> Option<TokenIssuer> {
        TokenIssuer::new(secret_config(Algorithm::HS256, 32)).ok()
    }

    #[test]
    fn mismatches_and_bad_input() {
        let r = TokenIssuer::new(IssuerConfig {
            algorithm: Algorithm::RS256,
            key: SigningKey::Secret(vec![7; 32]),
            issuer: None,
            audience: None,
            kid: None,
        });
        assert!(matches!(r, Err(IssuerError::AlgorithmKeyMismatch { .. })));
        let r = TokenIssuer::new(IssuerConfig {
            algorithm: Algorithm::HS256,
            key: SigningKey::Secret(Vec::new()),
            issuer: None,
            audience: None,
            kid: None,
        });
        assert!(matches!(r, Err(IssuerError::EmptySecret)));
        for len in [1, 15] {
            let e = TokenIssuer::new(secret_config(Algorithm::HS512, len)).err();
            assert_eq!(e, Some(IssuerError::ShortSecret), "{len} bytes");
            assert!(e
                .map(|e| e.to_string())
                .is_some_and(|m| m.contains("at least 16 bytes; 32 or more recommended")));
        }
        for len in [16, 31] {
            let r = TokenIssuer::new(secret_config(Algorithm::HS256, len));
            assert!(r.is_ok(), "{len} bytes: weak but accepted");
        }
        let r = TokenIssuer::new(IssuerConfig {
            algorithm: Algorithm::EdDSA,
            key: SigningKey::PrivatePem(b"not a pem".to_vec()),
            issuer: None,
            audience: None,
            kid: None,
        });
        assert!(matches!(r, Err(IssuerError::InvalidKey { .. })));

        let Some(issuer) = hs() else {
            panic!("HS256 issuer");
        };
        assert_eq!(
            issuer
                .issue(TokenKind::User, "a", Duration::ZERO, Map::new())
                .err(),
            Some(IssuerError::InvalidTtl)
        );
        let mut extra = Map::new();
        extra.insert("exp".to_owned(), Value::from(1));
        assert_eq!(
            issuer
                .issue(TokenKind::User, "a", Duration::from_secs(1), extra)
                .err(),
            Some(IssuerError::ReservedClaim("exp".to_owned()))
        );
        assert_eq!(
            issuer
                .issue(
                    TokenKind::User,
                    "a",
                    Duration::from_millis(1500),
                    Map::new()
                )
                .ok()
                .map(|t| t.1),
            Some(2)
        );
    }
}
