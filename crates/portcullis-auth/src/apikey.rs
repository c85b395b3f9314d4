//! Per-user API keys.
//!
//! A key looks like `pcs_<id>_<secret>`: `id` is 12 characters `[a-z0-9]`, `secret` is
//! 43 characters of unpadded base64url (32 bytes from the OS random source). The raw key
//! is returned once by [`ApiKeys::create`]; only its SHA-256 (hex) is stored, in the
//! JSON record under `apikey:<id>`.
//!
//! [`ApiKeys::verify`] parses the id out of the raw key, loads the record by id and
//! compares SHA-256 of the raw key with the stored hash in constant time. Looking up by
//! id (not by hash) lets [`ApiKeys::revoke`] take just the id; the secret part is only
//! ever checked through its hash.
//!
//! Verification results (positive and negative) are cached in-process, keyed by the
//! SHA-256 of the raw key, for at most `cache_ttl` and at most `cache_max_entries`
//! entries. `cache_ttl` is therefore the bound on revocation latency for *other*
//! gateway instances; the instance that performs the revocation evicts its own entry
//! immediately.
//!
//! Quotas ([`ApiKeys::consume_quota`]) are fixed windows counted atomically by the
//! store (`quota:apikey:<id>`), so several instances sharing one backend never admit
//! more than the limit together.
//!
//! The static admin token is not handled here.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use portcullis_store::{Store, StoreError, WindowCount};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of every API key.
pub const KEY_PREFIX: &str = "pcs_";

/// Length of the id part.
const ID_LEN: usize = 12;
/// Length of the secret part (32 bytes, unpadded base64url).
const SECRET_LEN: usize = 43;
/// Random bytes in the secret part.
const SECRET_BYTES: usize = 32;
/// Total length of a raw key: prefix + id + `_` + secret.
const KEY_LEN: usize = KEY_PREFIX.len() + ID_LEN + 1 + SECRET_LEN;
/// Alphabet of the id part.
const ID_ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
/// Store key prefix of the records.
const RECORD_PREFIX: &str = "apikey:";
/// Store key prefix of the quota counters.
const QUOTA_PREFIX: &str = "quota:apikey:";
/// Maximum number of records returned by [`ApiKeys::list`].
const LIST_LIMIT: usize = 100_000;
/// Attempts at finding an unused id before giving up (collisions are astronomically
/// unlikely; this only guards against a broken random source).
const CREATE_ATTEMPTS: usize = 8;

/// Request quota of a key: at most `limit` units per fixed window of `window_secs`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Quota {
    pub limit: u64,
    pub window_secs: u64,
}

/// Stored form of an API key. Contains the hash of the key, never the key itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Public id (the `<id>` part of the key).
    pub id: String,
    /// Who the key authenticates as.
    pub principal: String,
    /// Optional human-readable label.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; the key is invalid from this instant on.
    #[serde(default)]
    pub expires_at: Option<u64>,
    #[serde(default)]
    pub quota: Option<Quota>,
    /// Lowercase hex SHA-256 of the raw key.
    pub hash: String,
}

impl ApiKeyRecord {
    /// Whether the key is expired at `now` (unix seconds).
    pub fn is_expired_at(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|exp| now >= exp)
    }
}

/// Parameters of [`ApiKeys::create`].
#[derive(Clone, Debug, Default)]
pub struct NewKey {
    pub principal: String,
    pub name: Option<String>,
    pub scopes: Vec<String>,
    /// Unix seconds; must be in the future.
    pub expires_at: Option<u64>,
    pub quota: Option<Quota>,
}

/// Errors of [`ApiKeys`]. Messages never contain a raw key.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The argument is neither an API key nor a key id.
    #[error("not an API key or API key id")]
    InvalidFormat,
    #[error("API key not found")]
    NotFound,
    /// A stored record could not be interpreted.
    #[error("API key record corrupt: {0}")]
    Corrupt(String),
    /// Invalid parameters for a new key.
    #[error("invalid API key parameters: {0}")]
    Invalid(String),
}

/// Cheap format check: `pcs_` + 12 × `[a-z0-9]` + `_` + 43 × base64url. Lets callers
/// skip store lookups for JWTs and other credentials.
pub fn looks_like_api_key(s: &str) -> bool {
    split_key(s).is_some()
}

/// `(id, secret)` of a well-formed key.
fn split_key(s: &str) -> Option<(&str, &str)> {
    if s.len() != KEY_LEN {
        return None;
    }
    let rest = s.strip_prefix(KEY_PREFIX)?;
    let bytes = rest.as_bytes();
    if bytes.get(ID_LEN) != Some(&b'_') {
        return None;
    }
    // Length checked and all-ASCII checked below, so these slices are on char
    // boundaries; `get` keeps it panic-free regardless.
    let id = rest.get(..ID_LEN)?;
    let secret = rest.get(ID_LEN + 1..)?;
    if !is_valid_id(id) {
        return None;
    }
    if secret.len() != SECRET_LEN
        || !secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return None;
    }
    Some((id, secret))
}

/// Whether `s` has the shape of a key id.
fn is_valid_id(s: &str) -> bool {
    s.len() == ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn sha256(raw: &str) -> [u8; 32] {
    Sha256::digest(raw.as_bytes()).into()
}

fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

fn from_hex32(s: &str) -> Option<[u8; 32]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_bytes(buf: &mut [u8]) -> Result<(), ApiKeyError> {
    getrandom::fill(buf).map_err(|e| ApiKeyError::Invalid(format!("OS random source failed: {e}")))
}

/// 12 characters from [`ID_ALPHABET`], uniformly (rejection sampling).
fn random_id() -> Result<String, ApiKeyError> {
    // 252 = 7 * 36: bytes >= 252 are rejected to avoid modulo bias.
    let mut id = String::with_capacity(ID_LEN);
    let mut buf = [0u8; 32];
    while id.len() < ID_LEN {
        random_bytes(&mut buf)?;
        for &b in &buf {
            if b < 252 && id.len() < ID_LEN {
                id.push(char::from(ID_ALPHABET[usize::from(b % 36)]));
            }
        }
    }
    Ok(id)
}

fn random_secret() -> Result<String, ApiKeyError> {
    let mut buf = [0u8; SECRET_BYTES];
    random_bytes(&mut buf)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf))
}

fn record_key(id: &str) -> String {
    format!("{RECORD_PREFIX}{id}")
}

fn parse_record(key: &str, bytes: &[u8]) -> Result<ApiKeyRecord, ApiKeyError> {
    serde_json::from_slice(bytes).map_err(|e| ApiKeyError::Corrupt(format!("{key}: {e}")))
}

/// Cached verification result: the record for a valid key, `None` for an invalid one.
#[derive(Clone)]
struct CacheEntry {
    record: Option<Arc<ApiKeyRecord>>,
    ttl: Duration,
}

struct CacheExpiry;

impl moka::Expiry<[u8; 32], CacheEntry> for CacheExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &CacheEntry,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

struct Inner {
    store: Arc<dyn Store>,
    cache_ttl: Duration,
    /// `None` when caching is disabled (zero TTL or zero capacity).
    cache: Option<moka::sync::Cache<[u8; 32], CacheEntry>>,
    /// Cache generation, bumped by every eviction (revocations). A verification notes
    /// it before reading the store and, after caching its result, checks it again: if
    /// it moved, the entry may be stale (read before a revocation that has already
    /// evicted) and is removed again.
    generation: AtomicU64,
}

/// API key management and verification. Cheap to clone (shared state behind an `Arc`).
#[derive(Clone)]
pub struct ApiKeys {
    inner: Arc<Inner>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("backend", &self.inner.store.backend_name())
            .field("cache_ttl", &self.inner.cache_ttl)
            .field("cache_enabled", &self.inner.cache.is_some())
            .finish()
    }
}

impl ApiKeys {
    /// `cache_ttl` bounds how long a revoked key stays valid on instances other than
    /// the one that revoked it; a zero TTL or zero `cache_max_entries` disables the
    /// cache.
    pub fn new(store: Arc<dyn Store>, cache_ttl: Duration, cache_max_entries: u64) -> Self {
        let cache = (!cache_ttl.is_zero() && cache_max_entries > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(cache_max_entries)
                .expire_after(CacheExpiry)
                .build()
        });
        Self {
            inner: Arc::new(Inner {
                store,
                cache_ttl,
                cache,
                generation: AtomicU64::new(0),
            }),
        }
    }

    /// Create a key. Returns the raw key (shown once; not stored anywhere) and the
    /// stored record.
    pub async fn create(&self, new: NewKey) -> Result<(String, ApiKeyRecord), ApiKeyError> {
        let now = now_secs();
        validate_new(&new, now)?;
        for _ in 0..CREATE_ATTEMPTS {
            let id = random_id()?;
            let raw = format!("{KEY_PREFIX}{id}_{}", random_secret()?);
            let record = ApiKeyRecord {
                id: id.clone(),
                principal: new.principal.clone(),
                name: new.name.clone(),
                scopes: new.scopes.clone(),
                created_at: now,
                expires_at: new.expires_at,
                quota: new.quota.clone(),
                hash: to_hex(&sha256(&raw)),
            };
            let json = serde_json::to_vec(&record)
                .map_err(|e| ApiKeyError::Corrupt(format!("serialise record: {e}")))?;
            // set_nx: an id collision must never overwrite another key.
            if self
                .inner
                .store
                .set_nx(&record_key(&id), &json, None)
                .await?
            {
                tracing::info!(id = %id, principal = %record.principal, "API key created");
                return Ok((raw, record));
            }
        }
        Err(ApiKeyError::Invalid(
            "could not allocate an unused key id".to_string(),
        ))
    }

    /// All stored keys (at most 100 000), oldest first. Records that cannot be parsed
    /// are skipped with a warning.
    pub async fn list(&self) -> Result<Vec<ApiKeyRecord>, ApiKeyError> {
        let rows = self
            .inner
            .store
            .scan_prefix(RECORD_PREFIX, LIST_LIMIT)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (key, value) in rows {
            match parse_record(&key, &value) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!(error = %e, "skipping unreadable API key record"),
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    /// Revoke by raw key or by id. With a raw key, the key must match the stored hash
    /// (a forged key with someone else's id revokes nothing). Returns whether a key was
    /// deleted. Evicts the local cache entry immediately; other instances see the
    /// revocation within their cache TTL.
    pub async fn revoke(&self, key_or_id: &str) -> Result<bool, ApiKeyError> {
        let (id, raw_hash) = if let Some((id, _)) = split_key(key_or_id) {
            (id, Some(sha256(key_or_id)))
        } else if is_valid_id(key_or_id) {
            (key_or_id, None)
        } else {
            return Err(ApiKeyError::InvalidFormat);
        };
        let key = record_key(id);
        if let Some(h) = raw_hash {
            self.evict(&h);
        }
        let Some(bytes) = self.inner.store.get(&key).await? else {
            return Ok(false);
        };
        let stored = match parse_record(&key, &bytes) {
            Ok(record) => {
                let stored = from_hex32(&record.hash);
                if let Some(h) = raw_hash {
                    if !stored.is_some_and(|s| bool::from(s.ct_eq(&h))) {
                        return Ok(false);
                    }
                }
                stored
            }
            // An unreadable record can never verify; let the admin delete it by id.
            Err(e) if raw_hash.is_none() => {
                tracing::warn!(error = %e, "deleting unreadable API key record");
                None
            }
            Err(e) => return Err(e),
        };
        let deleted = self.inner.store.delete(&key).await?;
        // Evict (and bump the generation) after the delete too, so a verification that
        // read the record before the delete does not leave a positive entry behind.
        match (stored, raw_hash) {
            (Some(s), _) | (None, Some(s)) => self.evict(&s),
            (None, None) => self.bump_generation(),
        }
        if deleted {
            tracing::info!(id = %id, "API key revoked");
        }
        Ok(deleted)
    }

    /// `Ok(Some)` for a valid, unexpired key; `Ok(None)` for an unknown, revoked,
    /// expired or malformed one (malformed strings never reach the store). Results are
    /// cached (positive and negative) for at most the cache TTL; a positive entry never
    /// outlives the key's expiry. Store errors are returned as `Err(Store)` and never
    /// cached; an unreadable record is `Err(Corrupt)`.
    pub async fn verify(&self, raw: &str) -> Result<Option<Arc<ApiKeyRecord>>, ApiKeyError> {
        let Some((id, _)) = split_key(raw) else {
            return Ok(None);
        };
        let digest = sha256(raw);
        let now = now_secs();
        if let Some(cache) = &self.inner.cache {
            if let Some(entry) = cache.get(&digest) {
                return Ok(entry.record.filter(|r| !r.is_expired_at(now)));
            }
        }

        let generation = self.inner.generation.load(Ordering::SeqCst);
        let found = self.lookup(id, &digest, now).await?;
        self.remember(digest, found.clone(), now, generation);
        Ok(found)
    }

    /// The store half of [`ApiKeys::verify`]: the record of `id` if `digest` matches
    /// its hash and it has not expired at `now`.
    async fn lookup(
        &self,
        id: &str,
        digest: &[u8; 32],
        now: u64,
    ) -> Result<Option<Arc<ApiKeyRecord>>, ApiKeyError> {
        let key = record_key(id);
        let Some(bytes) = self.inner.store.get(&key).await? else {
            return Ok(None);
        };
        let record = parse_record(&key, &bytes)?;
        if record.id != id {
            return Err(ApiKeyError::Corrupt(format!("{key}: id mismatch")));
        }
        let stored = from_hex32(&record.hash)
            .ok_or_else(|| ApiKeyError::Corrupt(format!("{key}: bad hash")))?;
        let matches = bool::from(stored.ct_eq(digest));
        Ok((matches && !record.is_expired_at(now)).then(|| Arc::new(record)))
    }

    /// Caches the result of a lookup that started at cache generation `generation`.
    /// If the generation moved since (an eviction ran while the store was read), the
    /// result may predate a revocation whose eviction has already happened, so the
    /// entry just inserted is removed again (re-checking after the insert closes the
    /// gap between a check and the insert).
    fn remember(
        &self,
        digest: [u8; 32],
        found: Option<Arc<ApiKeyRecord>>,
        now: u64,
        generation: u64,
    ) {
        let Some(cache) = &self.inner.cache else {
            return;
        };
        let mut ttl = self.inner.cache_ttl;
        if let Some(exp) = found.as_ref().and_then(|r| r.expires_at) {
            ttl = ttl.min(Duration::from_secs(exp.saturating_sub(now)));
        }
        if ttl.is_zero() {
            return;
        }
        cache.insert(digest, CacheEntry { record: found, ttl });
        if self.inner.generation.load(Ordering::SeqCst) != generation {
            cache.invalidate(&digest);
        }
    }

    /// Consume `cost` units of the key's quota in the current window (atomic in the
    /// store, exact across instances). A key without a quota is always allowed; the
    /// returned count then has `limit == u64::MAX`, `count == 0` and a zero
    /// `reset_after`.
    pub async fn consume_quota(
        &self,
        record: &ApiKeyRecord,
        cost: u64,
    ) -> Result<WindowCount, ApiKeyError> {
        let Some(quota) = &record.quota else {
            return Ok(WindowCount {
                allowed: true,
                count: 0,
                limit: u64::MAX,
                reset_after: Duration::ZERO,
            });
        };
        let window = Duration::from_secs(quota.window_secs.max(1));
        let key = format!("{QUOTA_PREFIX}{}", record.id);
        Ok(self
            .inner
            .store
            .consume_window(&key, cost, quota.limit, window)
            .await?)
    }

    /// Number of entries in the local verification cache (after running pending
    /// evictions). For metrics and tests.
    pub fn cached_entries(&self) -> u64 {
        match &self.inner.cache {
            Some(cache) => {
                cache.run_pending_tasks();
                cache.entry_count()
            }
            None => 0,
        }
    }

    /// Removes the cached result for `digest` (after bumping the generation, so a
    /// verification in flight does not put it back).
    fn evict(&self, digest: &[u8; 32]) {
        self.bump_generation();
        if let Some(cache) = &self.inner.cache {
            cache.invalidate(digest);
        }
    }

    fn bump_generation(&self) {
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
    }
}

fn validate_new(new: &NewKey, now: u64) -> Result<(), ApiKeyError> {
    let invalid = |m: &str| Err(ApiKeyError::Invalid(m.to_string()));
    if new.principal.trim().is_empty() {
        return invalid("principal must not be empty");
    }
    if new.principal.len() > 256 {
        return invalid("principal longer than 256 bytes");
    }
    if new.name.as_ref().is_some_and(|n| n.len() > 256) {
        return invalid("name longer than 256 bytes");
    }
    if new.scopes.iter().any(|s| s.trim().is_empty()) {
        return invalid("scopes must not be empty strings");
    }
    if new.expires_at.is_some_and(|exp| exp <= now) {
        return invalid("expires_at is in the past");
    }
    if let Some(q) = &new.quota {
        if q.limit == 0 {
            return invalid("quota limit must be at least 1");
        }
        if q.window_secs == 0 {
            return invalid("quota window must be at least 1 second");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_in_temp_store() -> (tempfile::TempDir, ApiKeys) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = portcullis_store::EmbeddedStore::open(dir.path()).expect("open store");
        let keys = ApiKeys::new(Arc::new(store), Duration::from_secs(300), 100);
        (dir, keys)
    }

    fn new_key() -> NewKey {
        NewKey {
            principal: "alice".into(),
            ..NewKey::default()
        }
    }

    fn cached(keys: &ApiKeys, raw: &str) -> bool {
        keys.inner
            .cache
            .as_ref()
            .is_some_and(|c| c.get(&sha256(raw)).is_some())
    }

    /// What the first half of `verify` (up to the store read) leaves for the second.
    struct FirstHalf {
        digest: [u8; 32],
        now: u64,
        generation: u64,
        found: Option<Arc<ApiKeyRecord>>,
    }

    impl FirstHalf {
        /// The second half of `verify`: cache the result.
        fn remember(self, keys: &ApiKeys) {
            keys.remember(self.digest, self.found, self.now, self.generation);
        }
    }

    async fn read_first(keys: &ApiKeys, raw: &str) -> FirstHalf {
        let (id, _) = split_key(raw).expect("well-formed");
        let digest = sha256(raw);
        let now = now_secs();
        let generation = keys.inner.generation.load(Ordering::SeqCst);
        let found = keys.lookup(id, &digest, now).await.expect("lookup");
        FirstHalf {
            digest,
            now,
            generation,
            found,
        }
    }

    /// `verify` reads the record, a revocation (by raw key or by id) deletes it and
    /// evicts, then `verify` caches what it read: the stale positive entry must not
    /// survive, and the key must not verify.
    #[tokio::test]
    async fn verify_that_read_before_a_revoke_does_not_cache_after_it() {
        let (_dir, keys) = keys_in_temp_store();
        for by_id in [false, true] {
            let (raw, record) = keys.create(new_key()).await.expect("create");
            let read = read_first(&keys, &raw).await;
            assert!(read.found.is_some(), "read before the revocation");
            // The revocation runs to completion.
            let target = if by_id {
                record.id.as_str()
            } else {
                raw.as_str()
            };
            assert!(keys.revoke(target).await.expect("revoke"));
            // verify, second half: caches the stale record, sees the generation moved.
            read.remember(&keys);
            assert!(!cached(&keys, &raw), "by_id={by_id}: stale entry left");
            assert!(keys.verify(&raw).await.expect("verify").is_none());
        }
    }

    /// Without an eviction in between, the result is cached as before.
    #[tokio::test]
    async fn verify_without_a_revoke_caches() {
        let (_dir, keys) = keys_in_temp_store();
        let (raw, _) = keys.create(new_key()).await.expect("create");
        read_first(&keys, &raw).await.remember(&keys);
        assert!(cached(&keys, &raw));
        assert!(keys.verify(&raw).await.expect("verify").is_some());
    }

    #[test]
    fn hex_round_trip() {
        let d = sha256("x");
        assert_eq!(from_hex32(&to_hex(&d)), Some(d));
        assert_eq!(from_hex32("zz"), None);
    }

    #[test]
    fn generated_keys_have_the_documented_shape() {
        for _ in 0..200 {
            let id = random_id().unwrap();
            let raw = format!("{KEY_PREFIX}{id}_{}", random_secret().unwrap());
            assert_eq!(raw.len(), KEY_LEN);
            assert_eq!(split_key(&raw), Some((id.as_str(), &raw[17..])));
        }
    }

    #[test]
    fn rejects_malformed() {
        let good = format!("pcs_abcdefghij12_{}", "A".repeat(43));
        assert!(looks_like_api_key(&good));
        for bad in [
            String::new(),
            "pcs_".to_string(),
            format!("pcx_abcdefghij12_{}", "A".repeat(43)),
            format!("pcs_abcdefghiJ12_{}", "A".repeat(43)),
            format!("pcs_abcdefghij12-{}", "A".repeat(43)),
            format!("pcs_abcdefghij12_{}", "A".repeat(42)),
            format!("pcs_abcdefghij12_{}", "A".repeat(44)),
            format!("pcs_abcdefghij12_{}=", "A".repeat(42)),
            format!("pcs_abcdefghij12_{}é", "A".repeat(41)),
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.sig".to_string(),
        ] {
            assert!(!looks_like_api_key(&bad), "{bad}");
        }
    }
}
