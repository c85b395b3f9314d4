//! Shared state store for Portcullis: API keys, quota and rate-limit counters, user
//! records, sessions, single-use OIDC state, pipelines and cached responses.
//!
//! Two backends implement [`Store`]:
//! - [`EmbeddedStore`]: SQLite in WAL mode, one file (`portcullis.db`) under a data
//!   directory; safe for several processes on the same file.
//! - [`RedisStore`]: Redis/Valkey via `fred`; every operation that must be exact across
//!   gateway instances is one atomic command or Lua script.
//!
//! Use [`open`] to pick the backend from a URL.

mod embedded;
pub mod ratelimit;
mod redis;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use crate::embedded::EmbeddedStore;
pub use crate::ratelimit::{Rate, RateAlgorithm, RateDecision, RateState};
pub use crate::redis::{RedisOptions, RedisStore};

/// Errors returned by a [`Store`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The backend is down, unreachable, busy past its timeout, or did not answer in
    /// time. Callers decide whether to fail open or closed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend answered with an error (bad configuration, bad command, ...).
    #[error("store backend error: {0}")]
    Backend(String),
    /// Stored data could not be interpreted (e.g. a counter that is not a number).
    #[error("store data corrupt: {0}")]
    Corrupt(String),
}

/// Result type of store operations.
pub type Result<T> = std::result::Result<T, StoreError>;

/// Outcome of [`Store::consume_window`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowCount {
    /// Whether the cost was admitted (and counted).
    pub allowed: bool,
    /// Counter value of the current window after this call (unchanged if not allowed).
    pub count: u64,
    /// The limit that was checked.
    pub limit: u64,
    /// Time until the current window ends and the counter resets.
    pub reset_after: Duration,
}

/// One store interface for all shared gateway state. Dyn-compatible: the gateway keeps
/// it as `Arc<dyn Store>`.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Value of `key`, if present and not expired.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Set with optional TTL (millisecond precision; expired keys are never returned).
    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<()>;
    /// Set only if absent (or expired); true if it was set.
    async fn set_nx(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<bool>;
    /// Delete `key`; true if a live value was deleted.
    async fn delete(&self, key: &str) -> Result<bool>;
    /// Get and delete atomically (single-use records): two concurrent takes never both
    /// get the value.
    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Keys starting with `prefix` and their values, ordered by key, at most `limit`.
    async fn scan_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>>;
    /// Fixed-window counter, atomic: add `cost` to the counter of `key` for the current
    /// window of length `window` (the window starts at the first hit; the key expires
    /// with the window), but only if `count + cost <= limit`; otherwise returns
    /// `allowed == false` without counting. Exact across instances sharing a backend.
    async fn consume_window(
        &self,
        key: &str,
        cost: u64,
        limit: u64,
        window: Duration,
    ) -> Result<WindowCount>;
    /// Compare-and-set, atomic: if `key` holds exactly `expected` (and has not expired),
    /// replace it with `new` and return true; if the key is missing, expired or holds
    /// anything else, change nothing and return false. Like [`Store::set`], the new
    /// value gets `ttl` (`None` = no expiry, even if the old value had one). Exact
    /// across processes and instances sharing a backend: of several concurrent calls
    /// from the same `expected` value, at most one succeeds.
    ///
    /// The default implementation refuses with [`StoreError::Backend`] (it cannot be
    /// emulated atomically with the other methods); both real backends override it.
    async fn compare_and_set(
        &self,
        key: &str,
        expected: &[u8],
        new: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool> {
        let _ = (key, expected, new, ttl);
        Err(StoreError::Backend(format!(
            "compare_and_set is not supported by the {} store",
            self.backend_name()
        )))
    }
    /// Compare-and-delete, atomic: delete `key` only if it holds exactly `expected`
    /// (and has not expired); true if it was deleted.
    ///
    /// The default implementation refuses with [`StoreError::Backend`], as for
    /// [`Store::compare_and_set`].
    async fn compare_and_delete(&self, key: &str, expected: &[u8]) -> Result<bool> {
        let _ = (key, expected);
        Err(StoreError::Backend(format!(
            "compare_and_delete is not supported by the {} store",
            self.backend_name()
        )))
    }
    /// Gives a live `key` a new time to live (`ttl` from now) without touching its
    /// value; true if the key was live. Rolling expiry (sessions): a key that already
    /// expired or was deleted is never brought back.
    ///
    /// The default implementation refuses with [`StoreError::Backend`], as for
    /// [`Store::compare_and_set`].
    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        let _ = (key, ttl);
        Err(StoreError::Backend(format!(
            "touch is not supported by the {} store",
            self.backend_name()
        )))
    }
    /// Rate limit, atomic: decides `cost` for `key` under `rate` (sliding window or
    /// token bucket, see [`ratelimit`]) by the backend's clock (Redis: `TIME`;
    /// embedded: the system clock), counting it only if admitted. Exact across
    /// instances and processes sharing a backend. The key expires once its state no
    /// longer matters ([`Rate::idle_ms`]).
    ///
    /// The default implementation refuses with [`StoreError::Backend`], as for
    /// [`Store::compare_and_set`].
    async fn rate_limit(&self, key: &str, rate: &Rate, cost: u64) -> Result<RateDecision> {
        let _ = (key, rate, cost);
        Err(StoreError::Backend(format!(
            "rate_limit is not supported by the {} store",
            self.backend_name()
        )))
    }
    /// Tells every instance and process watching `topic` (see [`Store::watch`]) that
    /// what it caches for that topic changed. Redis: `PUBLISH` on the store prefix's
    /// `changes:<topic>` channel; embedded: this process's watchers at once, other
    /// processes sharing the file within their poll interval.
    ///
    /// The default implementation refuses with [`StoreError::Backend`], as for
    /// [`Store::compare_and_set`].
    async fn notify(&self, topic: &str) -> Result<()> {
        let _ = topic;
        Err(StoreError::Backend(format!(
            "notify is not supported by the {} store",
            self.backend_name()
        )))
    }
    /// A generation counter for `topic`: it advances at every [`Store::notify`] of the
    /// topic from any instance or process, and whenever notices may have been missed
    /// (a lost Redis connection), so a cache entry read at generation `g` is stale once
    /// the counter has moved on. With `keys`, a change of any key starting with that
    /// (store-relative) prefix advances it too, where the backend reports key changes
    /// (Redis keyspace notifications, when the server has them enabled): writes by
    /// programs that do not notify are seen at once.
    ///
    /// The default implementation refuses with [`StoreError::Backend`], as for
    /// [`Store::compare_and_set`].
    async fn watch(
        &self,
        topic: &str,
        keys: Option<&str>,
    ) -> Result<tokio::sync::watch::Receiver<u64>> {
        let _ = (topic, keys);
        Err(StoreError::Backend(format!(
            "watch is not supported by the {} store",
            self.backend_name()
        )))
    }
    /// The same backend and connections with no key prefix, for keys another program
    /// owns under its own names (FnKit's `fnkit:pipeline:<name>`). Notices
    /// ([`Store::notify`], [`Store::watch`]) keep the configured prefix's channel.
    /// The embedded store has no prefix: it returns itself.
    fn unprefixed(&self) -> Arc<dyn Store>;
    /// Readiness: Ok if the backend answers.
    async fn ping(&self) -> Result<()>;
    /// `"embedded"` or `"redis"`.
    fn backend_name(&self) -> &'static str;
}

/// Picks the backend: `""` → [`EmbeddedStore`] under `data_dir`; `redis://…`,
/// `rediss://…`, `redis-sentinel://…`, `rediss-sentinel://…`, `redis-cluster://…` or
/// `rediss-cluster://…` → [`RedisStore`] with `key_prefix` (default timeouts:
/// connect 5 s, command 2 s).
pub async fn open(url: &str, data_dir: &Path, key_prefix: &str) -> Result<Arc<dyn Store>> {
    let url = url.trim();
    if url.is_empty() {
        let dir = data_dir.to_path_buf();
        let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&dir))
            .await
            .map_err(|e| StoreError::Backend(format!("open task failed: {e}")))??;
        return Ok(Arc::new(store));
    }
    if url.starts_with("redis://")
        || url.starts_with("rediss://")
        || url.starts_with("redis-sentinel://")
        || url.starts_with("rediss-sentinel://")
        || url.starts_with("redis-cluster://")
        || url.starts_with("rediss-cluster://")
    {
        let store = RedisStore::connect(RedisOptions {
            url: url.to_string(),
            key_prefix: key_prefix.to_string(),
            ..RedisOptions::default()
        })
        .await?;
        return Ok(Arc::new(store));
    }
    Err(StoreError::Backend(format!(
        "unsupported store url scheme (expected empty, redis://, rediss://, redis-sentinel://, rediss-sentinel://, redis-cluster:// or rediss-cluster://): {}",
        redact_url(url)
    )))
}

/// TTL in whole milliseconds, at least 1 (a zero TTL would mean "no expiry" or an error
/// on some backends; treat it as "expires immediately").
pub(crate) fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Strip credentials from a URL for messages.
pub(crate) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials() {
        assert_eq!(
            redact_url("redis://:secret@host:1/2"),
            "redis://***@host:1/2"
        );
        assert_eq!(redact_url("redis://host:1"), "redis://host:1");
    }

    #[test]
    fn ttl_rounds_up_to_one_ms() {
        assert_eq!(ttl_millis(Duration::ZERO), 1);
        assert_eq!(ttl_millis(Duration::from_micros(1500)), 1);
        assert_eq!(ttl_millis(Duration::from_secs(2)), 2000);
    }
}
