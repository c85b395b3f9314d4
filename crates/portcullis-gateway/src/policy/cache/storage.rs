//! Where entries live: the local cache (moka, bytes-bounded) or the store, the
//! entry encoding, and the commit of a collected response.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use portcullis_config::CacheScope;
use sha2::Digest;

use super::flight::FlightGuard;
/// Store keys of the `cluster` scope start with this.
pub(super) const STORE_PREFIX: &str = "cache:";

/// Cached responses and in-flight locks that outlive snapshots.
pub struct Registry {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) local: ArcSwap<LocalCache>,
    pub(super) flights: Mutex<HashMap<String, tokio::sync::watch::Receiver<bool>>>,
    /// Bytes held by bodies being collected for the cache (all of them), bounded by
    /// the local cache's size: past it, new collections give up.
    pub(super) collecting: std::sync::atomic::AtomicU64,
}

pub(super) struct LocalCache {
    pub(super) max_bytes: u64,
    pub(super) entries: moka::sync::Cache<String, Arc<Entry>>,
}

impl LocalCache {
    pub(super) fn new(max_bytes: u64) -> LocalCache {
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &String, v: &Arc<Entry>| {
                u32::try_from(k.len() as u64 + v.weight()).unwrap_or(u32::MAX)
            })
            .expire_after(EntryExpiry)
            .support_invalidation_closures()
            .build();
        LocalCache { max_bytes, entries }
    }
}

pub(super) struct EntryExpiry;

impl moka::Expiry<String, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.keep_for())
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Arc<Entry>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.keep_for())
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            inner: Arc::new(Inner {
                local: ArcSwap::from_pointee(LocalCache::new(
                    portcullis_config::CacheStorageConfig::default().max_bytes.0,
                )),
                flights: Mutex::new(HashMap::new()),
                collecting: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }
}

impl Registry {
    /// Applies `cache_storage.max_bytes`; a new size starts an empty local cache.
    pub fn set_capacity(&self, max_bytes: u64) {
        if self.inner.local.load().max_bytes != max_bytes {
            self.inner.local.store(Arc::new(LocalCache::new(max_bytes)));
        }
    }

    /// Deletes cached entries: all of them, a route's, or one path (`/p?q`, as
    /// requested) of a route — every host, principal and variant of it. Local and
    /// cluster (store) entries alike. Returns how many store entries were deleted
    /// (local deletions are not counted: they happen lazily).
    pub async fn purge(
        &self,
        store: &dyn portcullis_store::Store,
        route: Option<&str>,
        target: Option<&str>,
    ) -> Result<u64, portcullis_store::StoreError> {
        let local = self.inner.local.load_full();
        match (route, target) {
            (None, _) => local.entries.invalidate_all(),
            (Some(r), t) => {
                let (r, t): (Arc<str>, Option<Arc<str>>) = (Arc::from(r), t.map(Arc::from));
                // Only fails when closures are not enabled, which they are.
                let _ = local.entries.invalidate_entries_if(move |_, e| {
                    *e.route == *r && t.as_ref().is_none_or(|t| *e.target == **t)
                });
            }
        }
        let prefix = match (route, target) {
            (None, _) => STORE_PREFIX.to_owned(),
            (Some(r), None) => format!("{STORE_PREFIX}{}:", short_hash(r)),
            (Some(r), Some(t)) => format!("{STORE_PREFIX}{}:{}:", short_hash(r), short_hash(t)),
        };
        let mut deleted = 0;
        loop {
            let batch = store.scan_prefix(&prefix, 500).await?;
            let n = batch.len();
            for (key, _) in batch {
                if store.delete(&key).await? {
                    deleted += 1;
                }
            }
            if n < 500 {
                return Ok(deleted);
            }
        }
    }
}

/// One stored thing: a response, or the vary index of a primary key.
pub(crate) struct Entry {
    pub(super) route: Arc<str>,
    pub(super) target: Arc<str>,
    pub(super) stored: SystemTime,
    /// Age the response already had when stored (upstream `Age`).
    pub(super) age0: Duration,
    /// Freshness left when stored.
    pub(super) ttl: Duration,
    pub(super) swr: Duration,
    pub(super) kind: Kind,
}

pub(super) enum Kind {
    Response {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    Vary(Vec<HeaderName>),
}

pub(super) enum Freshness {
    Fresh(Duration),
    Stale(Duration),
    Expired,
}

impl Entry {
    pub(super) fn weight(&self) -> u64 {
        let kind = match &self.kind {
            Kind::Response { headers, body, .. } => {
                body.len() as u64
                    + headers
                        .iter()
                        .map(|(k, v)| (k.as_str().len() + v.len() + 32) as u64)
                        .sum::<u64>()
            }
            Kind::Vary(names) => names.iter().map(|n| n.as_str().len() as u64 + 16).sum(),
        };
        kind + self.target.len() as u64 + 128
    }

    pub(super) fn keep_for(&self) -> Duration {
        self.ttl + self.swr
    }

    pub(super) fn freshness(&self, now: SystemTime) -> Freshness {
        let resident = now.duration_since(self.stored).unwrap_or_default();
        let age = self.age0 + resident;
        if resident < self.ttl {
            Freshness::Fresh(age)
        } else if resident < self.ttl + self.swr {
            Freshness::Stale(age)
        } else {
            Freshness::Expired
        }
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.weight() as usize + 64);
        out.extend_from_slice(b"PCC1");
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let stored = self
            .stored
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        for v in [ms(stored), ms(self.age0), ms(self.ttl), ms(self.swr)] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        let put = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(b);
        };
        put(&mut out, self.route.as_bytes());
        put(&mut out, self.target.as_bytes());
        match &self.kind {
            Kind::Response {
                status,
                headers,
                body,
            } => {
                out.push(0);
                out.extend_from_slice(&status.as_u16().to_be_bytes());
                out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
                for (k, v) in headers {
                    put(&mut out, k.as_str().as_bytes());
                    put(&mut out, v.as_bytes());
                }
                out.extend_from_slice(body);
            }
            Kind::Vary(names) => {
                out.push(1);
                out.extend_from_slice(&(names.len() as u32).to_be_bytes());
                for n in names {
                    put(&mut out, n.as_str().as_bytes());
                }
            }
        }
        out
    }

    pub(super) fn decode(b: &[u8]) -> Option<Entry> {
        let mut r = Reader(b);
        if r.take(4)? != b"PCC1" {
            return None;
        }
        let stored = SystemTime::UNIX_EPOCH + Duration::from_millis(r.u64()?);
        let age0 = Duration::from_millis(r.u64()?);
        let ttl = Duration::from_millis(r.u64()?);
        let swr = Duration::from_millis(r.u64()?);
        let route = Arc::from(std::str::from_utf8(r.bytes()?).ok()?);
        let target = Arc::from(std::str::from_utf8(r.bytes()?).ok()?);
        let kind = match r.take(1)?[0] {
            0 => {
                let status =
                    StatusCode::from_u16(u16::from_be_bytes(r.take(2)?.try_into().ok()?)).ok()?;
                let n = r.u32()?;
                let mut headers = HeaderMap::new();
                for _ in 0..n {
                    let k = HeaderName::from_bytes(r.bytes()?).ok()?;
                    let v = HeaderValue::from_bytes(r.bytes()?).ok()?;
                    headers.append(k, v);
                }
                Kind::Response {
                    status,
                    headers,
                    body: Bytes::copy_from_slice(r.0),
                }
            }
            1 => {
                let n = r.u32()?;
                let mut names = Vec::new();
                for _ in 0..n {
                    names.push(HeaderName::from_bytes(r.bytes()?).ok()?);
                }
                Kind::Vary(names)
            }
            _ => return None,
        };
        Some(Entry {
            route,
            target,
            stored,
            age0,
            ttl,
            swr,
            kind,
        })
    }
}

pub(super) struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    pub(super) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    pub(super) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    pub(super) fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// First 16 hex digits of SHA-256: stable across instances and versions.
pub(super) fn short_hash(s: &str) -> String {
    let d = sha2::Sha256::digest(s.as_bytes());
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn full_hash(s: &str) -> String {
    let d = sha2::Sha256::digest(s.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) struct CommitTarget {
    pub(super) scope: CacheScope,
    pub(super) registry: Arc<Inner>,
    pub(super) store: Arc<dyn portcullis_store::Store>,
    pub(super) route: Arc<str>,
    pub(super) target: Arc<str>,
    pub(super) primary: String,
    pub(super) primary_store_key: String,
    pub(super) key: String,
    pub(super) store_key: String,
}

/// A response waiting for its body to be complete before it is stored.
pub(super) struct Commit {
    pub(super) cache: CommitTarget,
    pub(super) vary: Vec<HeaderName>,
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) stored: SystemTime,
    pub(super) age0: Duration,
    pub(super) ttl: Duration,
    pub(super) swr: Duration,
    /// Released once stored (or given up), waking the waiting requests.
    pub(super) _guard: Option<FlightGuard>,
}

impl Commit {
    pub(super) fn run(self, body: Bytes) {
        let Commit {
            cache: t,
            vary,
            status,
            headers,
            stored,
            age0,
            ttl,
            swr,
            _guard,
        } = self;
        let entry = |kind| Entry {
            route: t.route.clone(),
            target: t.target.clone(),
            stored,
            age0,
            ttl,
            swr,
            kind,
        };
        let index = (!vary.is_empty()).then(|| entry(Kind::Vary(vary)));
        let response = entry(Kind::Response {
            status,
            headers,
            body,
        });
        match t.scope {
            CacheScope::Local => {
                let local = t.registry.local.load();
                // The variant first: a reader following the index finds it.
                local.entries.insert(t.key, Arc::new(response));
                if let Some(index) = index {
                    local.entries.insert(t.primary, Arc::new(index));
                }
                drop(_guard);
            }
            CacheScope::Cluster => {
                tokio::spawn(async move {
                    let keep = Some(response.keep_for());
                    if let Err(e) = t.store.set(&t.store_key, &response.encode(), keep).await {
                        tracing::debug!(error = %e, "cache: store write failed");
                    } else if let Some(index) = index {
                        if let Err(e) = t
                            .store
                            .set(&t.primary_store_key, &index.encode(), keep)
                            .await
                        {
                            tracing::debug!(error = %e, "cache: store write failed");
                        }
                    }
                    drop(_guard);
                });
            }
        }
    }
}
