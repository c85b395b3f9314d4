//! Verification keys: parsing PEM (SPKI, PKCS#1, X.509 certificates) and JWK
//! documents into [`VerifyingKey`]s that know which algorithms they may be
//! used with.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::DecodingKey;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::Algorithm;

/// Smallest RSA modulus accepted, in bits.
pub(crate) const MIN_RSA_BITS: usize = 2048;

/// The concrete type of a key; decides which algorithms it may verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Hmac,
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    /// Whether a key of this kind may verify `alg`. This is the
    /// algorithm-confusion guard: an HMAC secret never verifies RS*/ES*/EdDSA
    /// and a public key never verifies HS*.
    pub(crate) fn supports(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        matches!(
            (self, alg),
            (KeyKind::Hmac, HS256 | HS384 | HS512)
                | (KeyKind::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (KeyKind::EcP256, ES256)
                | (KeyKind::EcP384, ES384)
                | (KeyKind::Ed25519, EdDSA)
        )
    }
}

/// One key usable for signature verification.
#[derive(Clone)]
pub(crate) struct VerifyingKey {
    pub(crate) kid: Option<String>,
    pub(crate) kind: KeyKind,
    /// Algorithm restriction from a JWK's `alg` member.
    pub(crate) alg: Option<Algorithm>,
    pub(crate) key: DecodingKey,
    /// SHA-256 over kind + key material + kid; used to notice removed keys.
    pub(crate) fingerprint: [u8; 32],
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("kind", &self.kind)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl VerifyingKey {
    fn new(kid: Option<String>, kind: KeyKind, alg: Option<Algorithm>, key: DecodingKey) -> Self {
        let mut h = Sha256::new();
        h.update([kind as u8]);
        match key.kind() {
            jsonwebtoken::DecodingKeyKind::SecretOrDer(b) => {
                h.update(b"d");
                h.update((b.len() as u64).to_be_bytes());
                h.update(b);
            }
            jsonwebtoken::DecodingKeyKind::RsaModulusExponent { n, e } => {
                h.update(b"r");
                h.update((n.len() as u64).to_be_bytes());
                h.update(n);
                h.update((e.len() as u64).to_be_bytes());
                h.update(e);
            }
        }
        if let Some(kid) = &kid {
            h.update(b"k");
            h.update(kid.as_bytes());
        }
        VerifyingKey {
            kid,
            kind,
            alg,
            key,
            fingerprint: h.finalize().into(),
        }
    }

    pub(crate) fn hmac(secret: &[u8]) -> Self {
        Self::new(None, KeyKind::Hmac, None, DecodingKey::from_secret(secret))
    }

    /// Whether this key may verify a token signed with `alg`.
    pub(crate) fn supports(&self, alg: Algorithm) -> bool {
        self.kind.supports(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

// ---------------------------------------------------------------------------
// Minimal DER reading (only what SPKI / certificates / PKCS#1 need).

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_CTX0_CONSTRUCTED: u8 = 0xA0;

const OID_RSA_ENCRYPTION: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x01];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2B, 0x81, 0x04, 0x00, 0x22];
const OID_ED25519: &[u8] = &[0x2B, 0x65, 0x70];

/// Reads one DER TLV: returns (tag, contents, rest).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // high tag numbers: not used by anything we parse
    }
    let (&len0, rest) = rest.split_first()?;
    let (len, rest) = if len0 < 0x80 {
        (usize::from(len0), rest)
    } else {
        let n = usize::from(len0 & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (len_bytes, rest) = rest.split_at_checked(n)?;
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    Some((tag, contents, rest))
}

fn der_expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, contents, rest) = der_tlv(input)?;
    (t == tag).then_some((contents, rest))
}

/// Bit length of a DER INTEGER's contents (big-endian, possibly 0-padded).
fn integer_bits(contents: &[u8]) -> usize {
    let start = contents
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(contents.len());
    let trimmed = contents.get(start..).unwrap_or_default();
    match trimmed.first() {
        Some(&first) => (trimmed.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
        None => 0,
    }
}

/// Error from key parsing; never contains key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyError {
    Invalid(String),
    WeakRsa(usize),
}

fn invalid(msg: &str) -> KeyError {
    KeyError::Invalid(msg.to_owned())
}

/// PKCS#1 `RSAPublicKey` DER → key (checks modulus size).
fn rsa_from_pkcs1(der: &[u8]) -> Result<VerifyingKey, KeyError> {
    let (seq, _) = der_expect(der, TAG_SEQUENCE).ok_or_else(|| invalid("bad RSAPublicKey"))?;
    let (n, rest) = der_expect(seq, TAG_INTEGER).ok_or_else(|| invalid("bad RSA modulus"))?;
    der_expect(rest, TAG_INTEGER).ok_or_else(|| invalid("bad RSA exponent"))?;
    let bits = integer_bits(n);
    if bits < MIN_RSA_BITS {
        return Err(KeyError::WeakRsa(bits));
    }
    Ok(VerifyingKey::new(
        None,
        KeyKind::Rsa,
        None,
        DecodingKey::from_rsa_der(der),
    ))
}

/// Contents of a `SubjectPublicKeyInfo` SEQUENCE → key.
fn from_spki_contents(spki: &[u8]) -> Result<VerifyingKey, KeyError> {
    let (alg_id, rest) =
        der_expect(spki, TAG_SEQUENCE).ok_or_else(|| invalid("bad AlgorithmIdentifier"))?;
    let (bits, _) =
        der_expect(rest, TAG_BIT_STRING).ok_or_else(|| invalid("bad subjectPublicKey"))?;
    let key = match bits.split_first() {
        Some((0, key)) => key,
        _ => return Err(invalid("bad subjectPublicKey bit string")),
    };
    let (oid, params) = der_expect(alg_id, TAG_OID).ok_or_else(|| invalid("bad algorithm OID"))?;
    match oid {
        OID_RSA_ENCRYPTION => rsa_from_pkcs1(key),
        OID_EC_PUBLIC_KEY => {
            let (curve, _) =
                der_expect(params, TAG_OID).ok_or_else(|| invalid("EC key without named curve"))?;
            let (kind, len) = match curve {
                OID_P256 => (KeyKind::EcP256, 65),
                OID_P384 => (KeyKind::EcP384, 97),
                _ => return Err(invalid("unsupported EC curve (P-256 and P-384 only)")),
            };
            if key.len() != len || key.first() != Some(&0x04) {
                return Err(invalid("EC public key is not an uncompressed point"));
            }
            Ok(VerifyingKey::new(
                None,
                kind,
                None,
                DecodingKey::from_ec_der(key),
            ))
        }
        OID_ED25519 => {
            if key.len() != 32 {
                return Err(invalid("bad Ed25519 public key length"));
            }
            Ok(VerifyingKey::new(
                None,
                KeyKind::Ed25519,
                None,
                DecodingKey::from_ed_der(key),
            ))
        }
        _ => Err(invalid(
            "unsupported public key algorithm (RSA, EC P-256/P-384, Ed25519 only)",
        )),
    }
}

/// X.509 certificate DER → the key in its `subjectPublicKeyInfo`. The
/// certificate itself (validity, issuer, ...) is not checked: it is only a
/// container for the configured public key.
fn from_certificate(der: &[u8]) -> Result<VerifyingKey, KeyError> {
    let bad = || invalid("bad X.509 certificate");
    let (cert, _) = der_expect(der, TAG_SEQUENCE).ok_or_else(bad)?;
    let (tbs, _) = der_expect(cert, TAG_SEQUENCE).ok_or_else(bad)?;
    let mut rest = tbs;
    let (tag, _, r) = der_tlv(rest).ok_or_else(bad)?;
    if tag == TAG_CTX0_CONSTRUCTED {
        rest = r; // explicit version
    }
    let (_, r) = der_expect(rest, TAG_INTEGER).ok_or_else(bad)?; // serialNumber
    rest = r;
    for _ in 0..4 {
        // signature, issuer, validity, subject
        let (_, r) = der_expect(rest, TAG_SEQUENCE).ok_or_else(bad)?;
        rest = r;
    }
    let (spki, _) = der_expect(rest, TAG_SEQUENCE).ok_or_else(bad)?;
    from_spki_contents(spki)
}

/// Parses every PEM block in `input` into keys.
pub(crate) fn parse_pem(input: &[u8]) -> Result<Vec<VerifyingKey>, KeyError> {
    let blocks = pem::parse_many(input).map_err(|_| invalid("not valid PEM"))?;
    if blocks.is_empty() {
        return Err(invalid("no PEM block found"));
    }
    let mut keys = Vec::with_capacity(blocks.len());
    for block in &blocks {
        let key = match block.tag() {
            "PUBLIC KEY" => {
                let (spki, _) = der_expect(block.contents(), TAG_SEQUENCE)
                    .ok_or_else(|| invalid("bad SubjectPublicKeyInfo"))?;
                from_spki_contents(spki)?
            }
            "RSA PUBLIC KEY" => rsa_from_pkcs1(block.contents())?,
            "CERTIFICATE" => from_certificate(block.contents())?,
            tag if tag.contains("PRIVATE KEY") => {
                return Err(invalid(
                    "a private key was given; configure the public key instead",
                ))
            }
            _ => return Err(invalid("unsupported PEM block type")),
        };
        keys.push(key);
    }
    Ok(keys)
}

// ---------------------------------------------------------------------------
// JWK / JWKS

fn b64(v: &Value, field: &str) -> Result<Vec<u8>, String> {
    let s = v
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing `{field}`"))?;
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| format!("`{field}` is not base64url"))
}

/// Parses one JWK. `Ok(None)` means "valid but not a signature-verification
/// key we use" (encryption key, symmetric key, unsupported type); `Err` means
/// malformed.
pub(crate) fn parse_jwk(v: &Value) -> Result<Option<VerifyingKey>, String> {
    if !v.is_object() {
        return Err("JWK is not an object".into());
    }
    if let Some(u) = v.get("use") {
        if u.as_str() != Some("sig") {
            return Ok(None);
        }
    }
    if let Some(ops) = v.get("key_ops") {
        let verify = ops
            .as_array()
            .is_some_and(|a| a.iter().any(|o| o.as_str() == Some("verify")));
        if !verify {
            return Ok(None);
        }
    }
    let alg = match v.get("alg") {
        None => None,
        Some(a) => match a.as_str().and_then(|s| s.parse::<Algorithm>().ok()) {
            Some(a) => Some(a),
            None => return Ok(None), // e.g. RSA-OAEP: not ours
        },
    };
    let kid = match v.get("kid") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("`kid` is not a string".into()),
    };
    let kty = v
        .get("kty")
        .and_then(Value::as_str)
        .ok_or("missing `kty`")?;
    let (kind, key) = match kty {
        "RSA" => {
            let n = b64(v, "n")?;
            let e = b64(v, "e")?;
            let bits = integer_bits(&n);
            if bits < MIN_RSA_BITS {
                return Err(format!("RSA key of {bits} bits is too small"));
            }
            if e.is_empty() {
                return Err("empty RSA exponent".into());
            }
            (KeyKind::Rsa, DecodingKey::from_rsa_raw_components(&n, &e))
        }
        "EC" => {
            let (kind, len) = match v.get("crv").and_then(Value::as_str) {
                Some("P-256") => (KeyKind::EcP256, 32),
                Some("P-384") => (KeyKind::EcP384, 48),
                _ => return Ok(None),
            };
            let x = b64(v, "x")?;
            let y = b64(v, "y")?;
            if x.len() != len || y.len() != len {
                return Err("EC coordinates have the wrong length".into());
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (kind, DecodingKey::from_ec_der(&point))
        }
        "OKP" => {
            if v.get("crv").and_then(Value::as_str) != Some("Ed25519") {
                return Ok(None);
            }
            let x = b64(v, "x")?;
            if x.len() != 32 {
                return Err("Ed25519 key has the wrong length".into());
            }
            (KeyKind::Ed25519, DecodingKey::from_ed_der(&x))
        }
        // Symmetric keys are never taken from a JWKS document.
        _ => return Ok(None),
    };
    if let Some(alg) = alg {
        if !kind.supports(alg) {
            return Err(format!("`alg` {alg} does not match key type {kty}"));
        }
    }
    Ok(Some(VerifyingKey::new(kid, kind, alg, key)))
}

/// Parses a JWKS document. Individual malformed keys are skipped (logged);
/// an unparseable document is an error.
pub(crate) fn parse_jwks(body: &[u8]) -> Result<Vec<VerifyingKey>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|_| "JWKS is not valid JSON")?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("JWKS has no `keys` array")?;
    let mut out = Vec::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        match parse_jwk(k) {
            Ok(Some(key)) => out.push(key),
            Ok(None) => {}
            Err(e) => tracing::warn!(index = i, error = %e, "skipping invalid JWK"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_length_forms() {
        assert_eq!(
            der_tlv(&[0x02, 0x01, 0x05]),
            Some((0x02, &[5u8][..], &[][..]))
        );
        let mut long = vec![0x04, 0x81, 0x80];
        long.extend(std::iter::repeat_n(0u8, 128));
        assert_eq!(der_tlv(&long).map(|t| t.1.len()), Some(128));
        assert_eq!(der_tlv(&[0x04, 0x82, 0x01]), None);
        assert_eq!(der_tlv(&[0x04, 0x05, 0x00]), None);
        assert_eq!(der_tlv(&[]), None);
    }

    #[test]
    fn integer_bit_lengths() {
        assert_eq!(integer_bits(&[0x00, 0x80]), 8);
        assert_eq!(integer_bits(&[0x01, 0x00]), 9);
        assert_eq!(integer_bits(&[0x00]), 0);
    }

    #[test]
    fn kind_support_matrix() {
        assert!(KeyKind::Hmac.supports(Algorithm::HS384));
        assert!(!KeyKind::Hmac.supports(Algorithm::RS256));
        assert!(!KeyKind::Rsa.supports(Algorithm::HS256));
        assert!(KeyKind::Rsa.supports(Algorithm::PS256));
        assert!(!KeyKind::EcP256.supports(Algorithm::ES384));
        assert!(!KeyKind::EcP384.supports(Algorithm::ES256));
        assert!(KeyKind::Ed25519.supports(Algorithm::EdDSA));
    }

    #[test]
    fn jwk_filters() {
        let oct = serde_json::json!({"kty": "oct", "k": "c2VjcmV0"});
        assert!(matches!(parse_jwk(&oct), Ok(None)));
        let enc = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "use": "enc", "x": "AA"});
        assert!(matches!(parse_jwk(&enc), Ok(None)));
        let bad = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": "AA"});
        assert!(parse_jwk(&bad).is_err());
        let small_rsa = serde_json::json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"});
        assert!(parse_jwk(&small_rsa).is_err());
    }
}
