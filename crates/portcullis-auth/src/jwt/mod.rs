//! JWT (JWS compact serialisation) verification.
//!
//! [`JwtVerifier`] checks a bearer token's signature against an HMAC secret,
//! static PEM public keys, or a JWKS document fetched over http(s), then
//! validates `exp`/`nbf`/`iat`/`iss`/`aud`. Successful results are cached
//! (keyed by SHA-256 of the token) until the token expires, so repeat
//! requests with the same token skip signature verification.
//!
//! Security properties:
//! * the header `alg` must be in the configured allow-list (`none` never is);
//! * a key is only used with algorithms of its own type (HMAC secrets only for
//!   HS*, RSA keys only for RS*/PS*, P-256 only for ES256, P-384 only for
//!   ES384, Ed25519 only for EdDSA), and HS* cannot be combined with public
//!   keys in one verifier — so "RSA public key used as HMAC secret"
//!   confusion is impossible;
//! * JWKS `oct` (symmetric) keys are ignored;
//! * a JWKS verifier must check `aud` (or be told `allow_any_audience`):
//!   an identity provider's keys sign tokens for all of its clients;
//! * HMAC secrets have at least 16 bytes (a warning below 32);
//! * guest tokens (`"typ": "guest"`, or the older `"guest": true`) are refused unless `accept_guest`;
//! * a token verified with a key that a JWKS refresh removed is never
//!   answered from the cache again, even if its verification was in flight;
//! * unknown-`kid` refetches are rate limited and single-flight.

mod jwks;
mod keys;

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use self::jwks::JwksClient;
use self::keys::{KeyError, VerifyingKey};

/// Longest token accepted (bytes); longer input is `Malformed` without
/// further work.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// Upper bound on how long a verified token stays cached, whatever its `exp`.
const MAX_CACHE_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Cache lifetime for tokens without `exp` (only possible with
/// `require_exp = false`).
const NO_EXP_CACHE_TTL: Duration = Duration::from_secs(5 * 60);

/// Shortest HMAC secret accepted (bytes), by [`JwtVerifier::new`] and
/// [`crate::issuer::TokenIssuer::new`].
pub const MIN_HS_SECRET_LEN: usize = 16;
/// HMAC secrets shorter than this (bytes) are accepted but weak; see
/// [`weak_hs_secret`].
pub const RECOMMENDED_HS_SECRET_LEN: usize = 32;
/// Message of the errors for HMAC secrets shorter than [`MIN_HS_SECRET_LEN`].
pub(crate) const SHORT_HS_SECRET: &str =
    "HS secret must be at least 16 bytes; 32 or more recommended (RFC 7518 §3.2)";

/// Payload claim that marks the kind of a token the gateway issued.
pub const TOKEN_TYPE_CLAIM: &str = "typ";
/// Value of [`TOKEN_TYPE_CLAIM`] in guest tokens; such tokens are rejected
/// ([`JwtError::GuestNotAccepted`]) unless [`JwtConfig::accept_guest`] is set.
pub const GUEST_TOKEN_TYPE: &str = "guest";

/// True when an HMAC secret is shorter than [`RECOMMENDED_HS_SECRET_LEN`]
/// (32 bytes): still accepted from [`MIN_HS_SECRET_LEN`] (16) bytes on, but
/// worth a warning (RFC 7518 §3.2 wants at least the hash size).
pub fn weak_hs_secret(secret: &[u8]) -> bool {
    secret.len() < RECOMMENDED_HS_SECRET_LEN
}

// ---------------------------------------------------------------------------
// Algorithms

/// A JWS signature algorithm this crate can verify.
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Algorithm {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl Algorithm {
    /// Every supported algorithm.
    pub const ALL: [Algorithm; 12] = [
        Algorithm::HS256,
        Algorithm::HS384,
        Algorithm::HS512,
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ];

    /// The JOSE name (`"RS256"`, `"EdDSA"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::HS256 => "HS256",
            Algorithm::HS384 => "HS384",
            Algorithm::HS512 => "HS512",
            Algorithm::RS256 => "RS256",
            Algorithm::RS384 => "RS384",
            Algorithm::RS512 => "RS512",
            Algorithm::PS256 => "PS256",
            Algorithm::PS384 => "PS384",
            Algorithm::PS512 => "PS512",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::EdDSA => "EdDSA",
        }
    }

    /// Whether this is an HMAC (shared secret) algorithm.
    pub fn is_hmac(self) -> bool {
        matches!(self, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
    }

    fn to_jsonwebtoken(self) -> jsonwebtoken::Algorithm {
        use jsonwebtoken::Algorithm as J;
        match self {
            Algorithm::HS256 => J::HS256,
            Algorithm::HS384 => J::HS384,
            Algorithm::HS512 => J::HS512,
            Algorithm::RS256 => J::RS256,
            Algorithm::RS384 => J::RS384,
            Algorithm::RS512 => J::RS512,
            Algorithm::PS256 => J::PS256,
            Algorithm::PS384 => J::PS384,
            Algorithm::PS512 => J::PS512,
            Algorithm::ES256 => J::ES256,
            Algorithm::ES384 => J::ES384,
            Algorithm::EdDSA => J::EdDSA,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error from parsing an [`Algorithm`] name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported JWT algorithm `{0}`")]
pub struct UnknownAlgorithm(pub String);

impl FromStr for Algorithm {
    type Err = UnknownAlgorithm;

    /// Exact, case-sensitive JOSE names. `none` is not an algorithm here.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownAlgorithm(s.to_owned()))
    }
}

// ---------------------------------------------------------------------------
// Configuration

/// Where verification keys come from.
#[derive(Clone)]
pub enum KeySource {
    /// HMAC shared secret (HS256/384/512 only).
    Secret(Vec<u8>),
    /// PEM public keys (RSA, EC P-256/P-384, Ed25519) as `PUBLIC KEY`,
    /// `RSA PUBLIC KEY` or `CERTIFICATE` blocks; each entry may hold several
    /// blocks. Token `kid`s are ignored: every key of the right type is tried.
    Pem(Vec<Vec<u8>>),
    /// A JWKS document fetched over http or https.
    Jwks {
        url: String,
        /// Background refresh period (see [`JwtVerifier::spawn_refresh`]).
        refresh_interval: Duration,
        /// Minimum time between fetches triggered by unknown `kid`s.
        min_refetch_interval: Duration,
        /// Timeout of one whole fetch (connect + response + body).
        timeout: Duration,
        /// PEM CA bundle trusted for https instead of the built-in web roots.
        ca_file: Option<PathBuf>,
    },
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Secret(_) => f.write_str("Secret([redacted])"),
            KeySource::Pem(p) => write!(f, "Pem({} entries)", p.len()),
            KeySource::Jwks {
                url,
                refresh_interval,
                min_refetch_interval,
                timeout,
                ca_file,
            } => f
                .debug_struct("Jwks")
                .field("url", url)
                .field("refresh_interval", refresh_interval)
                .field("min_refetch_interval", min_refetch_interval)
                .field("timeout", timeout)
                .field("ca_file", ca_file)
                .finish(),
        }
    }
}

/// Verifier configuration.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// Allowed algorithms; must be non-empty and match the key source (HS*
    /// only with [`KeySource::Secret`], never with public keys).
    pub algorithms: Vec<Algorithm>,
    pub keys: KeySource,
    /// If set, `iss` must be present and equal one of these.
    pub issuer: Option<Vec<String>>,
    /// If set, `aud` (string or array) must be present and contain one of
    /// these. If unset, `aud` is not checked — which a [`KeySource::Jwks`]
    /// verifier only allows with `allow_any_audience`.
    pub audience: Option<Vec<String>>,
    /// Let a [`KeySource::Jwks`] verifier run without `audience` (accepting
    /// tokens the identity provider issued for any client). Default false:
    /// [`JwtVerifier::new`] then refuses a JWKS source without audience.
    pub allow_any_audience: bool,
    /// Accept guest tokens (payload claim `typ` equal to `"guest"`, as issued
    /// by [`crate::issuer::TokenKind::Guest`]). Default false: they fail with
    /// [`JwtError::GuestNotAccepted`].
    pub accept_guest: bool,
    /// Clock-skew allowance for `exp`, `nbf` and `iat` (whole seconds).
    pub leeway: Duration,
    /// Reject tokens without `exp`.
    pub require_exp: bool,
    /// Maximum entries of the verified-token cache; 0 disables it.
    pub cache_max_entries: u64,
}

impl JwtConfig {
    /// A config with the given algorithms and keys; no issuer/audience
    /// checks (a JWKS source needs `audience` or `allow_any_audience` set),
    /// guest tokens rejected, 60 s leeway, `exp` required, 10 000 cached
    /// tokens.
    pub fn new(algorithms: Vec<Algorithm>, keys: KeySource) -> Self {
        JwtConfig {
            algorithms,
            keys,
            issuer: None,
            audience: None,
            allow_any_audience: false,
            accept_guest: false,
            leeway: Duration::from_secs(60),
            require_exp: true,
            cache_max_entries: 10_000,
        }
    }
}

/// Error from [`JwtVerifier::new`]. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtSetupError {
    #[error("jwt: `algorithms` must not be empty")]
    NoAlgorithms,
    #[error("jwt: algorithm {algorithm} cannot be used with this key source: {reason}")]
    AlgorithmKeyMismatch {
        algorithm: Algorithm,
        reason: &'static str,
    },
    #[error("jwt: the HMAC secret is empty")]
    EmptySecret,
    /// Shorter than [`MIN_HS_SECRET_LEN`] (but not empty).
    #[error("jwt: {SHORT_HS_SECRET}")]
    ShortSecret,
    /// A [`KeySource::Jwks`] without `audience` and without
    /// `allow_any_audience`.
    #[error("jwt: a jwks_url authenticator needs `audience` (or allow_any_audience: true)")]
    JwksWithoutAudience,
    #[error("jwt: no PEM keys configured")]
    NoKeys,
    #[error("jwt: PEM key #{index}: {reason}")]
    InvalidPem { index: usize, reason: String },
    #[error("jwt: PEM key #{index}: RSA key of {bits} bits is too small (minimum 2048)")]
    WeakRsaKey { index: usize, bits: usize },
    #[error("jwt: invalid JWKS url: {0}")]
    InvalidJwksUrl(String),
    #[error("jwt: JWKS `{0}` must be greater than zero")]
    ZeroDuration(&'static str),
    #[error("jwt: CA file {path:?}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("jwt: TLS setup failed: {0}")]
    Tls(String),
}

// ---------------------------------------------------------------------------
// Results and errors

/// A token whose signature and claims were verified.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// All payload claims.
    pub claims: Map<String, Value>,
    /// `sub`, if it is a string.
    pub subject: Option<String>,
    /// See [`extract_scopes`].
    pub scopes: Vec<String>,
    /// `exp` in seconds since the Unix epoch.
    pub expires_at: Option<u64>,
}

/// Why a token was rejected. Messages never contain the token or claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token")]
    Malformed,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("invalid token signature")]
    BadSignature,
    #[error("no key matches the token")]
    UnknownKey,
    #[error("token algorithm is not allowed")]
    AlgorithmNotAllowed,
    #[error("invalid token issuer")]
    InvalidIssuer,
    #[error("invalid token audience")]
    InvalidAudience,
    #[error("token is missing the `{0}` claim")]
    MissingClaim(&'static str),
    #[error("verification keys are unavailable")]
    KeysUnavailable,
    /// A guest token (`typ` = `"guest"`) and the verifier does not accept
    /// them ([`JwtConfig::accept_guest`]). An invalid token for callers.
    #[error("guest tokens are not accepted here")]
    GuestNotAccepted,
}

impl JwtError {
    /// True for [`JwtError::Expired`] (lets callers answer with
    /// `error="invalid_token", error_description="expired"`).
    pub fn is_expired(&self) -> bool {
        matches!(self, JwtError::Expired)
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JwtStats {
    /// Tokens answered from the verified-token cache.
    pub cache_hits: u64,
    /// Signature checks performed (one per key tried).
    pub signature_verifications: u64,
    /// JWKS fetch attempts (initial, background and unknown-`kid`).
    pub jwks_fetches: u64,
    /// JWKS fetch attempts that failed (previous keys kept).
    pub jwks_fetch_failures: u64,
}

// ---------------------------------------------------------------------------
// Scopes

/// Scopes from `scope` (space-separated string), `scopes` and `scp` (array of
/// strings or space-separated string): their union, in first-seen order,
/// without duplicates. Non-string values are ignored.
pub fn extract_scopes(claims: &Map<String, Value>) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut add = |s: &str| {
        for part in s.split_whitespace() {
            if seen.insert(part.to_owned()) {
                out.push(part.to_owned());
            }
        }
    };
    for name in ["scope", "scopes", "scp"] {
        match claims.get(name) {
            Some(Value::String(s)) => add(s),
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).for_each(&mut add),
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Verifier

#[derive(Debug, Default)]
struct KeySet {
    keys: Vec<VerifyingKey>,
}

struct JwksState {
    client: JwksClient,
    refresh_interval: Duration,
    min_refetch_interval: Duration,
    /// Serialises fetches; holds the time of the last attempt.
    fetch_lock: tokio::sync::Mutex<Option<Instant>>,
    /// Bumped after every completed fetch attempt.
    fetch_seq: AtomicU64,
    /// Set once any fetch succeeded.
    loaded: std::sync::atomic::AtomicBool,
}

#[derive(Clone)]
struct CacheEntry {
    token: Arc<VerifiedToken>,
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

#[derive(Default)]
struct Counters {
    cache_hits: AtomicU64,
    signature_verifications: AtomicU64,
    jwks_fetches: AtomicU64,
    jwks_fetch_failures: AtomicU64,
}

struct Inner {
    allowed: Vec<Algorithm>,
    issuer: Option<Vec<String>>,
    audience: Option<Vec<String>>,
    leeway_secs: u64,
    require_exp: bool,
    accept_guest: bool,
    keys: ArcSwap<KeySet>,
    jwks: Option<JwksState>,
    cache: Option<moka::sync::Cache<[u8; 32], CacheEntry>>,
    /// Bumped whenever the cache is cleared (keys removed). A verification
    /// notes it before loading the keys and, after caching its result, checks
    /// it again: if it moved, the entry may come from a removed key and is
    /// removed again.
    cache_generation: AtomicU64,
    counters: Counters,
}

/// Verifies JWTs. Cheap to clone (shared state behind an `Arc`).
#[derive(Clone)]
pub struct JwtVerifier {
    inner: Arc<Inner>,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.inner.allowed)
            .field("keys", &self.inner.keys.load().keys.len())
            .field("jwks", &self.inner.jwks.is_some())
            .finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A NumericDate claim: `Ok(None)` if absent, `Malformed` if not a number.
/// Negative values clamp to 0, fractions are truncated.
fn numeric_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u))
            } else if n.as_i64().is_some() {
                Ok(Some(0)) // negative
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() => Ok(Some(if f <= 0.0 { 0 } else { f as u64 })),
                    _ => Err(JwtError::Malformed),
                }
            }
        }
        Some(_) => Err(JwtError::Malformed),
    }
}

fn b64_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)
}

#[derive(serde::Deserialize)]
struct Header {
    alg: Value,
    #[serde(default)]
    kid: Option<Value>,
    #[serde(default)]
    crit: Option<Value>,
}

impl JwtVerifier {
    /// Validates `config` and builds the verifier. For a JWKS source this
    /// performs an initial fetch; if it fails a warning is logged and the
    /// verifier starts with no keys (tokens fail with
    /// [`JwtError::KeysUnavailable`] until a later fetch succeeds).
    pub async fn new(config: JwtConfig) -> Result<Self, JwtSetupError> {
        // Make the crypto backend explicit: with exactly one jsonwebtoken
        // backend feature this is what it would pick anyway, and if feature
        // unification ever enables a second backend it avoids jsonwebtoken's
        // run-time panic. An Err only means a provider was already installed.
        let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
            &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
        );

        if config.algorithms.is_empty() {
            return Err(JwtSetupError::NoAlgorithms);
        }
        let mut allowed: Vec<Algorithm> = Vec::with_capacity(config.algorithms.len());
        for a in &config.algorithms {
            if !allowed.contains(a) {
                allowed.push(*a);
            }
        }

        let mut jwks = None;
        let mut initial = KeySet::default();
        match &config.keys {
            KeySource::Secret(secret) => {
                if let Some(&algorithm) = allowed.iter().find(|a| !a.is_hmac()) {
                    return Err(JwtSetupError::AlgorithmKeyMismatch {
                        algorithm,
                        reason: "an HMAC secret can only verify HS256/HS384/HS512",
                    });
                }
                if secret.is_empty() {
                    return Err(JwtSetupError::EmptySecret);
                }
                if secret.len() < MIN_HS_SECRET_LEN {
                    return Err(JwtSetupError::ShortSecret);
                }
                if weak_hs_secret(secret) {
                    tracing::warn!(
                        len = secret.len(),
                        "jwt: HMAC secret is shorter than 32 bytes; use a longer random secret"
                    );
                }
                initial.keys.push(VerifyingKey::hmac(secret));
            }
            KeySource::Pem(pems) => {
                reject_hmac(&allowed, "HS* needs a shared secret, not public keys")?;
                if pems.is_empty() {
                    return Err(JwtSetupError::NoKeys);
                }
                for (index, pem) in pems.iter().enumerate() {
                    let keys = keys::parse_pem(pem).map_err(|e| match e {
                        KeyError::Invalid(reason) => JwtSetupError::InvalidPem { index, reason },
                        KeyError::WeakRsa(bits) => JwtSetupError::WeakRsaKey { index, bits },
                    })?;
                    initial.keys.extend(keys);
                }
                for alg in &allowed {
                    if !initial.keys.iter().any(|k| k.supports(*alg)) {
                        tracing::warn!(algorithm = %alg, "jwt: no configured PEM key can verify this allowed algorithm");
                    }
                }
            }
            KeySource::Jwks {
                url,
                refresh_interval,
                min_refetch_interval,
                timeout,
                ca_file,
            } => {
                reject_hmac(&allowed, "symmetric keys are never taken from a JWKS")?;
                for (d, name) in [
                    (refresh_interval, "refresh_interval"),
                    (min_refetch_interval, "min_refetch_interval"),
                    (timeout, "timeout"),
                ] {
                    if d.is_zero() {
                        return Err(JwtSetupError::ZeroDuration(name));
                    }
                }
                let client = JwksClient::new(url, *timeout, ca_file.as_deref())?;
                // An identity provider's keys sign tokens for all its clients;
                // without an audience check any of them would be accepted here.
                if config.audience.as_ref().is_none_or(Vec::is_empty) && !config.allow_any_audience
                {
                    return Err(JwtSetupError::JwksWithoutAudience);
                }
                jwks = Some(JwksState {
                    client,
                    refresh_interval: *refresh_interval,
                    min_refetch_interval: *min_refetch_interval,
                    fetch_lock: tokio::sync::Mutex::new(None),
                    fetch_seq: AtomicU64::new(0),
                    loaded: std::sync::atomic::AtomicBool::new(false),
                });
            }
        }

        let cache = (config.cache_max_entries > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(config.cache_max_entries)
                .expire_after(CacheExpiry)
                .build()
        });

        let inner = Arc::new(Inner {
            allowed,
            issuer: config.issuer,
            audience: config.audience,
            leeway_secs: config.leeway.as_secs(),
            require_exp: config.require_exp,
            accept_guest: config.accept_guest,
            keys: ArcSwap::from_pointee(initial),
            jwks,
            cache,
            cache_generation: AtomicU64::new(0),
            counters: Counters::default(),
        });
        if inner.jwks.is_some() {
            if let Err(e) = inner.refresh_jwks().await {
                tracing::warn!(error = %e, "jwt: initial JWKS fetch failed; starting without keys");
            }
        }
        Ok(JwtVerifier { inner })
    }

    /// Verifies `token` (the compact JWS, without any `Bearer ` prefix).
    pub async fn verify(&self, token: &str) -> Result<Arc<VerifiedToken>, JwtError> {
        self.inner.verify(token).await
    }

    /// Spawns the background JWKS refresh loop (every `refresh_interval`;
    /// after a failed fetch it retries after `min_refetch_interval`). Returns
    /// `None` for non-JWKS sources or when called outside a Tokio runtime.
    /// The task ends by itself once every clone of the verifier is dropped;
    /// each call spawns a new loop.
    pub fn spawn_refresh(&self) -> Option<tokio::task::JoinHandle<()>> {
        let jwks = self.inner.jwks.as_ref()?;
        let handle = match tokio::runtime::Handle::try_current() {
            Ok(h) => h,
            Err(_) => {
                tracing::error!("jwt: spawn_refresh called outside a Tokio runtime");
                return None;
            }
        };
        let refresh = jwks.refresh_interval;
        let retry = jwks.min_refetch_interval.min(refresh);
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        Some(handle.spawn(async move {
            let mut delay = refresh;
            loop {
                tokio::time::sleep(delay).await;
                let Some(inner) = weak.upgrade() else { break };
                delay = match inner.refresh_jwks().await {
                    Ok(()) => refresh,
                    Err(e) => {
                        tracing::warn!(error = %e, "jwt: JWKS refresh failed; keeping previous keys");
                        retry
                    }
                };
            }
        }))
    }

    /// Current counters.
    pub fn stats(&self) -> JwtStats {
        let c = &self.inner.counters;
        JwtStats {
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            signature_verifications: c.signature_verifications.load(Ordering::Relaxed),
            jwks_fetches: c.jwks_fetches.load(Ordering::Relaxed),
            jwks_fetch_failures: c.jwks_fetch_failures.load(Ordering::Relaxed),
        }
    }

    /// Number of verified tokens currently cached (runs the cache's pending
    /// maintenance first, so call it for metrics/tests, not per request).
    pub fn cached_tokens(&self) -> u64 {
        match &self.inner.cache {
            Some(cache) => {
                cache.run_pending_tasks();
                cache.entry_count()
            }
            None => 0,
        }
    }

    /// Number of keys currently loaded (static or from the last successful
    /// JWKS fetch).
    pub fn key_count(&self) -> usize {
        self.inner.keys.load().keys.len()
    }
}

fn reject_hmac(allowed: &[Algorithm], reason: &'static str) -> Result<(), JwtSetupError> {
    match allowed.iter().find(|a| a.is_hmac()) {
        Some(&algorithm) => Err(JwtSetupError::AlgorithmKeyMismatch { algorithm, reason }),
        None => Ok(()),
    }
}

impl Inner {
    async fn verify(&self, token: &str) -> Result<Arc<VerifiedToken>, JwtError> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::Malformed);
        }
        let now = now_secs();

        let cache_key: Option<[u8; 32]> = self
            .cache
            .as_ref()
            .map(|_| Sha256::digest(token.as_bytes()).into());
        if let (Some(cache), Some(key)) = (&self.cache, &cache_key) {
            if let Some(hit) = cache.get(key) {
                // moka expires entries lazily at `ttl`; re-check anyway so a
                // cached token is never accepted past exp + leeway.
                if let Some(exp) = hit.token.expires_at {
                    if now > exp.saturating_add(self.leeway_secs) {
                        cache.invalidate(key);
                        return Err(JwtError::Expired);
                    }
                }
                self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(hit.token);
            }
        }

        // Noted before the keys are loaded (see `cache_generation`).
        let generation = self.cache_generation.load(Ordering::SeqCst);
        let verified = self.verify_uncached(token, now).await?;
        if let Some(key) = cache_key {
            self.remember(key, &verified, now, generation);
        }
        Ok(verified)
    }

    /// Signature and claims checks of `token` at `now`, without the cache.
    async fn verify_uncached(&self, token: &str, now: u64) -> Result<Arc<VerifiedToken>, JwtError> {
        // --- structure
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: Header = b64_json(h64)?;
        let alg = header
            .alg
            .as_str()
            .ok_or(JwtError::Malformed)?
            .parse::<Algorithm>()
            .map_err(|_| JwtError::AlgorithmNotAllowed)?;
        if !self.allowed.contains(&alg) {
            return Err(JwtError::AlgorithmNotAllowed);
        }
        if header.crit.is_some() {
            // RFC 7515 §4.1.11: we understand no extensions.
            return Err(JwtError::Malformed);
        }
        let kid = match header.kid {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err(JwtError::Malformed),
        };
        let claims: Map<String, Value> = b64_json(p64)?;
        if s64.is_empty() || URL_SAFE_NO_PAD.decode(s64).is_err() {
            return Err(JwtError::Malformed);
        }
        let signing_input = token
            .get(..h64.len() + 1 + p64.len())
            .ok_or(JwtError::Malformed)?;

        // --- signature
        self.check_signature(alg, kid.as_deref(), signing_input, s64)
            .await?;

        // --- claims
        let exp = self.validate_claims(&claims, now)?;

        Ok(Arc::new(VerifiedToken {
            subject: claims.get("sub").and_then(Value::as_str).map(str::to_owned),
            scopes: extract_scopes(&claims),
            expires_at: exp,
            claims,
        }))
    }

    /// Caches `verified`, whose keys were loaded at cache generation
    /// `generation`. If the cache was cleared since (keys removed while the
    /// token was being checked), the entry just inserted is removed again:
    /// re-checking after the insert leaves no gap between check and insert.
    fn remember(&self, key: [u8; 32], verified: &Arc<VerifiedToken>, now: u64, generation: u64) {
        let Some(cache) = &self.cache else {
            return;
        };
        let ttl = match verified.expires_at {
            Some(exp) => {
                Duration::from_secs(exp.saturating_add(self.leeway_secs).saturating_sub(now))
            }
            None => NO_EXP_CACHE_TTL,
        }
        .min(MAX_CACHE_TTL);
        if ttl.is_zero() {
            return;
        }
        cache.insert(
            key,
            CacheEntry {
                token: verified.clone(),
                ttl,
            },
        );
        if self.cache_generation.load(Ordering::SeqCst) != generation {
            cache.invalidate(&key);
        }
    }

    /// Installs a new key set. If a key of the old set is gone, tokens it
    /// verified must be verified again: the cache is cleared (and its
    /// generation bumped, after the new keys are visible).
    fn install_keys(&self, keys: Vec<VerifyingKey>) {
        let new_prints: HashSet<[u8; 32]> = keys.iter().map(|k| k.fingerprint).collect();
        let removed = self
            .keys
            .load()
            .keys
            .iter()
            .any(|k| !new_prints.contains(&k.fingerprint));
        self.keys.store(Arc::new(KeySet { keys }));
        if removed {
            self.clear_cache();
        }
    }

    /// Forgets every verified token, including those being verified right now
    /// (see [`Inner::remember`]).
    fn clear_cache(&self) {
        self.cache_generation.fetch_add(1, Ordering::SeqCst);
        if let Some(cache) = &self.cache {
            cache.invalidate_all();
        }
    }

    fn validate_claims(
        &self,
        claims: &Map<String, Value>,
        now: u64,
    ) -> Result<Option<u64>, JwtError> {
        let leeway = self.leeway_secs;
        let exp = numeric_claim(claims, "exp")?;
        match exp {
            None if self.require_exp => return Err(JwtError::MissingClaim("exp")),
            Some(exp) if now > exp.saturating_add(leeway) => return Err(JwtError::Expired),
            _ => {}
        }
        if let Some(nbf) = numeric_claim(claims, "nbf")? {
            if nbf > now.saturating_add(leeway) {
                return Err(JwtError::NotYetValid);
            }
        }
        if let Some(iat) = numeric_claim(claims, "iat")? {
            if iat > now.saturating_add(leeway) {
                return Err(JwtError::NotYetValid);
            }
        }
        if let Some(issuers) = &self.issuer {
            match claims.get("iss") {
                None => return Err(JwtError::MissingClaim("iss")),
                Some(Value::String(iss)) if issuers.iter().any(|i| i == iss) => {}
                Some(_) => return Err(JwtError::InvalidIssuer),
            }
        }
        if let Some(audiences) = &self.audience {
            let ok = match claims.get("aud") {
                None => return Err(JwtError::MissingClaim("aud")),
                Some(Value::String(aud)) => audiences.iter().any(|a| a == aud),
                Some(Value::Array(auds)) => auds
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|aud| audiences.iter().any(|a| a == aud)),
                Some(_) => false,
            };
            if !ok {
                return Err(JwtError::InvalidAudience);
            }
        }
        // `guest: true` marks guest tokens issued before `typ` existed.
        let guest = claims.get(TOKEN_TYPE_CLAIM).and_then(Value::as_str) == Some(GUEST_TOKEN_TYPE)
            || claims.get("guest").and_then(Value::as_bool) == Some(true);
        if !self.accept_guest && guest {
            return Err(JwtError::GuestNotAccepted);
        }
        Ok(exp)
    }

    /// Keys that may verify a token with this `alg`/`kid`. Static sources
    /// ignore `kid` (PEM keys and secrets carry none); JWKS requires a
    /// matching `kid` when the token has one.
    fn candidates(&self, set: &KeySet, alg: Algorithm, kid: Option<&str>) -> Vec<VerifyingKey> {
        set.keys
            .iter()
            .filter(|k| k.supports(alg))
            .filter(|k| match (self.jwks.is_some(), kid) {
                (true, Some(kid)) => k.kid.as_deref() == Some(kid),
                _ => true,
            })
            .cloned()
            .collect()
    }

    async fn check_signature(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
        signing_input: &str,
        signature: &str,
    ) -> Result<(), JwtError> {
        let mut candidates = self.candidates(&self.keys.load(), alg, kid);
        if candidates.is_empty() {
            if let Some(jwks) = &self.jwks {
                // Unknown kid (or no key for this alg): maybe the keys were
                // rotated. Refetch, rate limited and shared between callers.
                self.refetch_for_unknown_key(jwks).await;
                candidates = self.candidates(&self.keys.load(), alg, kid);
                if candidates.is_empty() && !jwks.loaded.load(Ordering::Acquire) {
                    return Err(JwtError::KeysUnavailable);
                }
            }
        }
        if candidates.is_empty() {
            return Err(JwtError::UnknownKey);
        }
        let jalg = alg.to_jsonwebtoken();
        for key in &candidates {
            self.counters
                .signature_verifications
                .fetch_add(1, Ordering::Relaxed);
            // Err here means the key could not be used (e.g. an invalid EC
            // point from a JWKS): treat like a non-matching key.
            if let Ok(true) =
                jsonwebtoken::crypto::verify(signature, signing_input.as_bytes(), &key.key, jalg)
            {
                return Ok(());
            }
        }
        Err(JwtError::BadSignature)
    }

    async fn refetch_for_unknown_key(&self, jwks: &JwksState) {
        let seq_before = jwks.fetch_seq.load(Ordering::Acquire);
        let mut last = jwks.fetch_lock.lock().await;
        if jwks.fetch_seq.load(Ordering::Acquire) != seq_before {
            return; // another caller fetched while we waited: use its result
        }
        if last.is_some_and(|t| t.elapsed() < jwks.min_refetch_interval) {
            return; // rate limited
        }
        if let Err(e) = self.fetch_locked(jwks, &mut last).await {
            tracing::warn!(error = %e, "jwt: JWKS refetch for unknown key failed; keeping previous keys");
        }
    }

    /// Fetches the JWKS now (waiting for any fetch in progress first).
    async fn refresh_jwks(&self) -> Result<(), String> {
        let Some(jwks) = &self.jwks else {
            return Ok(());
        };
        let mut last = jwks.fetch_lock.lock().await;
        self.fetch_locked(jwks, &mut last).await
    }

    async fn fetch_locked(
        &self,
        jwks: &JwksState,
        last: &mut Option<Instant>,
    ) -> Result<(), String> {
        self.counters.jwks_fetches.fetch_add(1, Ordering::Relaxed);
        let result = jwks.client.fetch().await;
        *last = Some(Instant::now());
        let outcome = match result {
            Ok(keys) if keys.is_empty() => Err("JWKS contains no usable signing keys".to_owned()),
            Ok(keys) => {
                tracing::debug!(keys = keys.len(), "jwt: JWKS loaded");
                self.install_keys(keys);
                jwks.loaded.store(true, Ordering::Release);
                Ok(())
            }
            Err(e) => Err(e),
        };
        if outcome.is_err() {
            self.counters
                .jwks_fetch_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        jwks.fetch_seq.fetch_add(1, Ordering::AcqRel);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn scopes_union_dedup() {
        let c = map(json!({
            "scope": "read write  read",
            "scopes": ["write", "admin", 5],
            "scp": "extra read",
        }));
        assert_eq!(extract_scopes(&c), vec!["read", "write", "admin", "extra"]);
        let c = map(json!({"scopes": "a b", "scp": ["c"]}));
        assert_eq!(extract_scopes(&c), vec!["a", "b", "c"]);
        assert!(extract_scopes(&map(json!({"scope": 1}))).is_empty());
    }

    #[test]
    fn algorithm_names_round_trip() {
        for a in Algorithm::ALL {
            assert_eq!(a.as_str().parse::<Algorithm>(), Ok(a));
        }
        assert!("none".parse::<Algorithm>().is_err());
        assert!("rs256".parse::<Algorithm>().is_err());
    }

    const EC256_PUB: &[u8] = include_bytes!("../../tests/fixtures/ec256.pub.pem");
    const EC256_KEY: &[u8] = include_bytes!("../../tests/fixtures/ec256.key.pem");
    const EC384_PUB: &[u8] = include_bytes!("../../tests/fixtures/ec384.pub.pem");

    fn pem_keys(pem: &[u8]) -> Vec<VerifyingKey> {
        keys::parse_pem(pem).unwrap_or_else(|e| panic!("fixture key: {e:?}"))
    }

    /// A JWKS verifier whose keys the test installs itself (nothing listens at
    /// the URL, so the initial fetch fails and leaves it without keys).
    async fn jwks_verifier() -> JwtVerifier {
        let mut config = JwtConfig::new(
            vec![Algorithm::ES256, Algorithm::ES384],
            KeySource::Jwks {
                url: "http://127.0.0.1:1/jwks".to_owned(),
                refresh_interval: Duration::from_secs(3600),
                min_refetch_interval: Duration::from_secs(3600),
                timeout: Duration::from_secs(1),
                ca_file: None,
            },
        );
        config.audience = Some(vec!["api".to_owned()]);
        let v = JwtVerifier::new(config)
            .await
            .unwrap_or_else(|e| panic!("verifier: {e}"));
        v.inner.install_keys(pem_keys(EC256_PUB));
        v
    }

    fn es256_token() -> String {
        let key = jsonwebtoken::EncodingKey::from_ec_pem(EC256_KEY)
            .unwrap_or_else(|e| panic!("fixture key: {e}"));
        let claims = json!({"sub": "alice", "aud": "api", "exp": now_secs() + 600});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &key,
        )
        .unwrap_or_else(|e| panic!("sign: {e}"))
    }

    /// What the first half of `verify` (keys loaded, token checked) leaves for
    /// the second.
    struct FirstHalf {
        cache_key: [u8; 32],
        now: u64,
        generation: u64,
        verified: Arc<VerifiedToken>,
    }

    impl FirstHalf {
        /// The second half of `verify`: cache the result.
        fn remember(self, v: &JwtVerifier) {
            v.inner
                .remember(self.cache_key, &self.verified, self.now, self.generation);
        }
    }

    async fn verify_first(v: &JwtVerifier, token: &str) -> FirstHalf {
        let now = now_secs();
        let generation = v.inner.cache_generation.load(Ordering::SeqCst);
        let verified = v
            .inner
            .verify_uncached(token, now)
            .await
            .unwrap_or_else(|e| panic!("verify: {e}"));
        FirstHalf {
            cache_key: Sha256::digest(token.as_bytes()).into(),
            now,
            generation,
            verified,
        }
    }

    /// A verification checks the signature with a key, a JWKS refresh removes
    /// that key and clears the cache, then the verification caches its result:
    /// the entry must not survive and the token must not verify any more.
    #[tokio::test]
    async fn verification_started_before_a_key_removal_does_not_cache_after_it() {
        let v = jwks_verifier().await;
        let token = es256_token();
        // verify, first half: keys loaded, signature and claims checked.
        let first = verify_first(&v, &token).await;
        // A refresh replaces the P-256 key by a P-384 one.
        v.inner.install_keys(pem_keys(EC384_PUB));
        // verify, second half: caches what it verified with the removed key.
        first.remember(&v);
        assert_eq!(v.cached_tokens(), 0, "stale entry left in the cache");
        assert!(v.verify(&token).await.is_err());
        assert_eq!(v.stats().cache_hits, 0);
    }

    /// Keys only added (none removed): the cache is kept, and a verification
    /// in flight caches normally.
    #[tokio::test]
    async fn adding_keys_keeps_the_cache() {
        let v = jwks_verifier().await;
        let token = es256_token();
        let first = verify_first(&v, &token).await;
        let mut both = pem_keys(EC256_PUB);
        both.extend(pem_keys(EC384_PUB));
        v.inner.install_keys(both);
        first.remember(&v);
        assert_eq!(v.cached_tokens(), 1);
        assert!(v.verify(&token).await.is_ok());
        assert_eq!(v.stats().cache_hits, 1);
    }

    #[test]
    fn numeric_claims() {
        let c = map(json!({"a": 5, "b": -3, "c": 7.9, "d": "x"}));
        assert_eq!(numeric_claim(&c, "a"), Ok(Some(5)));
        assert_eq!(numeric_claim(&c, "b"), Ok(Some(0)));
        assert_eq!(numeric_claim(&c, "c"), Ok(Some(7)));
        assert_eq!(numeric_claim(&c, "d"), Err(JwtError::Malformed));
        assert_eq!(numeric_claim(&c, "zz"), Ok(None));
    }
}
