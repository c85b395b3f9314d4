//! Encryption at rest of what a session record holds (access, refresh and ID
//! tokens): AES-256-GCM with a random 96-bit nonce per record, the record's store
//! key as associated data (a sealed value copied under another key does not open),
//! and a key ring so keys can be rotated: new records are sealed with the first
//! key, records sealed with any listed key still open.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

/// Format version of a sealed value (its first byte).
const VERSION: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// A configured key is not base64 of 32 bytes (the key itself is never shown).
    #[error("{0}")]
    BadKey(String),
    /// Wrong key, wrong store key, tampered or truncated.
    #[error("the sealed value does not open")]
    Open,
    #[error("encryption failed")]
    Seal,
}

/// The key ring. The first key seals; every key opens.
pub struct Sealer {
    keys: Vec<LessSafeKey>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer({} key(s))", self.keys.len())
    }
}

impl Sealer {
    /// `current` and `previous` are base64 (standard or URL-safe, padding optional)
    /// of 32 bytes each.
    pub fn from_base64(current: &str, previous: &[&str]) -> Result<Self, SealError> {
        let mut keys = Vec::with_capacity(1 + previous.len());
        for (i, k) in std::iter::once(current)
            .chain(previous.iter().copied())
            .enumerate()
        {
            let what = if i == 0 {
                "encryption_key".to_string()
            } else {
                format!("previous_keys[{}]", i - 1)
            };
            let bytes = decode_key(k).ok_or_else(|| {
                SealError::BadKey(format!(
                    "{what} must be base64 of 32 random bytes (e.g. `openssl rand -base64 32`)"
                ))
            })?;
            keys.push(key(&bytes)?);
        }
        Ok(Sealer { keys })
    }

    /// Encrypts `plaintext`, bound to `context` (the record's store key).
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let key = self.keys.first().ok_or(SealError::Seal)?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|_| SealError::Seal)?;
        let mut in_out = plaintext.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(context),
            &mut in_out,
        )
        .map_err(|_| SealError::Seal)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + in_out.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&in_out);
        Ok(out)
    }

    /// Decrypts a value sealed for `context` by any key of the ring.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let (&version, rest) = sealed.split_first().ok_or(SealError::Open)?;
        if version != VERSION || rest.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(SealError::Open);
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        for key in &self.keys {
            let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
            let mut in_out = ciphertext.to_vec();
            if let Ok(plain) = key.open_in_place(nonce, Aad::from(context), &mut in_out) {
                return Ok(plain.to_vec());
            }
        }
        Err(SealError::Open)
    }
}

fn decode_key(text: &str) -> Option<Vec<u8>> {
    let t = text.trim();
    let bytes = STANDARD
        .decode(t)
        .ok()
        .or_else(|| URL_SAFE_NO_PAD.decode(t.trim_end_matches('=')).ok())?;
    (bytes.len() == 32).then_some(bytes)
}

fn key(bytes: &[u8]) -> Result<LessSafeKey, SealError> {
    UnboundKey::new(&AES_256_GCM, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| SealError::BadKey("not a 256-bit key".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // "0123456789abcdef" x2
    const K2: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";

    #[test]
    fn round_trip_and_fresh_nonces() {
        let s = Sealer::from_base64(K1, &[]).unwrap();
        let a = s.seal(b"session:x", b"refresh-token").unwrap();
        let b = s.seal(b"session:x", b"refresh-token").unwrap();
        assert_ne!(a, b, "a nonce was reused");
        assert!(!a.windows(13).any(|w| w == b"refresh-token"));
        assert_eq!(s.open(b"session:x", &a).unwrap(), b"refresh-token");
    }

    #[test]
    fn another_context_key_or_a_flipped_bit_does_not_open() {
        let s = Sealer::from_base64(K1, &[]).unwrap();
        let sealed = s.seal(b"session:a", b"secret").unwrap();
        assert_eq!(s.open(b"session:b", &sealed), Err(SealError::Open));
        let other = Sealer::from_base64(K2, &[]).unwrap();
        assert_eq!(other.open(b"session:a", &sealed), Err(SealError::Open));
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 1;
            assert_eq!(s.open(b"session:a", &t), Err(SealError::Open), "byte {i}");
        }
        assert_eq!(s.open(b"session:a", &sealed[..10]), Err(SealError::Open));
        assert_eq!(s.open(b"session:a", &[]), Err(SealError::Open));
    }

    #[test]
    fn rotation_opens_old_records_and_seals_with_the_new_key() {
        let old = Sealer::from_base64(K1, &[]).unwrap();
        let sealed = old.seal(b"k", b"v").unwrap();
        let ring = Sealer::from_base64(K2, &[K1]).unwrap();
        assert_eq!(ring.open(b"k", &sealed).unwrap(), b"v");
        let fresh = ring.seal(b"k", b"w").unwrap();
        assert_eq!(old.open(b"k", &fresh), Err(SealError::Open));
        assert_eq!(
            Sealer::from_base64(K2, &[])
                .unwrap()
                .open(b"k", &fresh)
                .unwrap(),
            b"w"
        );
    }

    #[test]
    fn bad_keys_are_refused_without_echoing_them() {
        for bad in [
            "",
            "short",
            "MDEyMzQ1Njc4OWFiY2RlZg==",
            "not base64 at all!!",
        ] {
            let e = Sealer::from_base64(bad, &[]).unwrap_err();
            let SealError::BadKey(msg) = &e else {
                panic!("{e:?}")
            };
            assert!(msg.starts_with("encryption_key"), "{msg}");
            assert!(bad.is_empty() || !msg.contains(bad), "{msg}");
        }
        let e = Sealer::from_base64(K1, &["nope"]).unwrap_err();
        assert!(e.to_string().starts_with("previous_keys[0]"), "{e}");
        // URL-safe and unpadded spellings of a good key are accepted.
        let url = K1.replace('+', "-").replace('/', "_");
        assert!(Sealer::from_base64(url.trim_end_matches('='), &[]).is_ok());
    }
}
