//! Response cache (GET/HEAD), keyed per principal unless `shared`.
//!
//! - **Key**: route, canonical host, normalised path + raw query, the principal on
//!   authenticated routes (unless `shared: true`), then the values of the request
//!   headers the stored response `Vary`s on. GET and HEAD share entries (a HEAD is
//!   answered from a GET's entry; a HEAD miss is never stored). A response with `Vary`
//!   is stored under a secondary key; the primary key then holds the list of header
//!   names (the "vary index"), so a lookup costs at most two reads.
//! - **Freshness** follows RFC 9111 through `http-cache-semantics` as a shared cache
//!   (`no-store`, `private`, `no-cache`, `max-age`, `s-maxage`, `Expires`, `Age`,
//!   `Vary: *`); the route's `ttl` is the lifetime when the upstream gives none.
//!   `Set-Cookie` responses are never stored unless `cache_set_cookie: true`.
//! - **Clients** cannot force a refetch: request `no-cache`/`max-age=0` are served
//!   from the cache (purge through the admin API instead); request `no-store` is
//!   honoured as "do not store what this request fetches" (a stored entry is still
//!   served, a miss is fetched alone and not stored).
//! - **Coalescing**: concurrent misses for one key make one upstream request. The
//!   first becomes the leader; the others wait up to [`FOLLOW_WAIT`] for it to finish
//!   storing, then read the entry, or go upstream themselves if nothing was stored.
//! - **Bodies** are streamed to the client while being collected; past `max_body`
//!   collecting stops (nothing is buffered beyond it and the client is not delayed).
//! - **stale-while-revalidate**: within that window after expiry, one request
//!   refreshes the entry while the others get the stale copy (`X-Cache: STALE`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use portcullis_config::CacheScope;
use sha2::Digest;

use super::{Flow, PolicySite};
use crate::body::{Body, BoxError};
use crate::context::RequestCtx;
use crate::error::GatewayError;
use crate::snapshot::Errors;
use crate::telemetry::CacheLabels;

/// How long a request waits for another request fetching the same key.
pub const FOLLOW_WAIT: Duration = Duration::from_secs(10);

/// Once the leader has its response head, the others wait at most this much longer
/// for its body: a leader whose client reads slowly must not stall them.
pub const BODY_GRACE: Duration = Duration::from_secs(1);

static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Store keys of the `cluster` scope start with this.
const STORE_PREFIX: &str = "cache:";

/// Cached responses and in-flight locks that outlive snapshots.
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    local: ArcSwap<LocalCache>,
    flights: Mutex<HashMap<String, tokio::sync::watch::Receiver<bool>>>,
    /// Bytes held by bodies being collected for the cache (all of them), bounded by
    /// the local cache's size: past it, new collections give up.
    collecting: std::sync::atomic::AtomicU64,
}

struct LocalCache {
    max_bytes: u64,
    entries: moka::sync::Cache<String, Arc<Entry>>,
}

impl LocalCache {
    fn new(max_bytes: u64) -> LocalCache {
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

struct EntryExpiry;

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

impl Inner {
    fn join(self: &Arc<Self>, key: &str) -> Join {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = flights.get(key) {
            return Join::Follower(rx.clone());
        }
        let (tx, rx) = tokio::sync::watch::channel(false);
        flights.insert(key.to_owned(), rx);
        Join::Leader(FlightGuard {
            inner: self.clone(),
            key: key.to_owned(),
            _tx: tx,
        })
    }

    /// Whether another request is fetching `key`.
    fn in_flight(&self, key: &str) -> Option<tokio::sync::watch::Receiver<bool>> {
        let flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        flights.get(key).cloned()
    }
}

enum Join {
    Leader(FlightGuard),
    Follower(tokio::sync::watch::Receiver<bool>),
}

/// Held by the request fetching a key; dropping it (stored, not cacheable, body cut
/// short) wakes the requests waiting for it.
struct FlightGuard {
    inner: Arc<Inner>,
    key: String,
    /// `true` once the response head is in and its body is being collected.
    _tx: tokio::sync::watch::Sender<bool>,
}

impl FlightGuard {
    fn streaming(&self) {
        self._tx.send_replace(true);
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut flights = self.inner.flights.lock().unwrap_or_else(|e| e.into_inner());
        flights.remove(&self.key);
    }
}

/// Waits until the leader's guard is gone (stored or given up), at most
/// [`FOLLOW_WAIT`] in all and [`BODY_GRACE`] once the leader's body streams.
async fn follow(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = tokio::time::timeout(FOLLOW_WAIT, async {
        loop {
            if *rx.borrow_and_update() {
                let _ =
                    tokio::time::timeout(BODY_GRACE, async { while rx.changed().await.is_ok() {} })
                        .await;
                return;
            }
            // `changed` ends with an error when the leader's guard drops.
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
}

/// One stored thing: a response, or the vary index of a primary key.
pub(crate) struct Entry {
    route: Arc<str>,
    target: Arc<str>,
    stored: SystemTime,
    /// Age the response already had when stored (upstream `Age`).
    age0: Duration,
    /// Freshness left when stored.
    ttl: Duration,
    swr: Duration,
    kind: Kind,
}

enum Kind {
    Response {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    Vary(Vec<HeaderName>),
}

enum Freshness {
    Fresh(Duration),
    Stale(Duration),
    Expired,
}

impl Entry {
    fn weight(&self) -> u64 {
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

    fn keep_for(&self) -> Duration {
        self.ttl + self.swr
    }

    fn freshness(&self, now: SystemTime) -> Freshness {
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

    fn encode(&self) -> Vec<u8> {
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

    fn decode(b: &[u8]) -> Option<Entry> {
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

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// First 16 hex digits of SHA-256: stable across instances and versions.
fn short_hash(s: &str) -> String {
    let d = sha2::Sha256::digest(s.as_bytes());
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn full_hash(s: &str) -> String {
    let d = sha2::Sha256::digest(s.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Length-prefixed, so no value can be mistaken for another's boundary.
fn push_part(key: &mut String, part: &[u8]) {
    use std::fmt::Write;
    let _ = write!(key, "{}:", part.len());
    // Header values may hold obs-text bytes: keep them distinct, losslessly.
    for &b in part {
        if b.is_ascii() && b != b'\\' {
            key.push(b as char);
        } else {
            let _ = write!(key, "\\x{b:02x}");
        }
    }
    key.push('|');
}

/// The key before `Vary`: route, scheme, host, path + query, principal.
pub(crate) fn primary_key(
    route: &str,
    scheme: &str,
    host: &[u8],
    target: &str,
    principal: Option<&str>,
) -> String {
    let mut key = String::with_capacity(route.len() + host.len() + target.len() + 40);
    push_part(&mut key, route.as_bytes());
    // An upstream may answer differently per scheme (X-Forwarded-Proto): a cached
    // redirect to https must never reach https clients.
    push_part(&mut key, scheme.as_bytes());
    push_part(&mut key, host);
    push_part(&mut key, target.as_bytes());
    match principal {
        Some(p) => {
            key.push('p');
            push_part(&mut key, p.as_bytes());
        }
        None => key.push('-'),
    }
    key
}

/// The primary key plus the request's values of the `Vary`'d headers.
pub(crate) fn vary_key(primary: &str, names: &[HeaderName], headers: &HeaderMap) -> String {
    let mut key = String::from(primary);
    key.push('v');
    for name in names {
        push_part(&mut key, name.as_str().as_bytes());
        let mut value = Vec::new();
        for (i, v) in headers.get_all(name).iter().enumerate() {
            if i > 0 {
                value.push(b',');
            }
            value.extend_from_slice(v.as_bytes().trim_ascii());
        }
        push_part(&mut key, &value);
    }
    key
}

/// `Vary` header names, lower-case and sorted; `None` for `Vary: *`.
fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for v in headers.get_all(header::VARY) {
        let Ok(v) = v.to_str() else { return None };
        for n in v.split(',') {
            let n = n.trim();
            if n.is_empty() {
                continue;
            }
            if n == "*" {
                return None;
            }
            let name = HeaderName::from_bytes(n.as_bytes()).ok()?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names.sort_by(|a: &HeaderName, b| a.as_str().cmp(b.as_str()));
    Some(names)
}

fn cache_control_has(headers: &HeaderMap, directive: &str) -> bool {
    headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|d| {
                d.split('=')
                    .next()
                    .is_some_and(|n| n.trim().eq_ignore_ascii_case(directive))
            })
        })
    })
}

/// Statuses stored with the route's `ttl` when the upstream gives no freshness.
fn cacheable_by_default(status: StatusCode) -> bool {
    matches!(status.as_u16(), 200 | 203)
}

/// Statuses stored only when the upstream gives explicit freshness.
fn cacheable_if_explicit(status: StatusCode) -> bool {
    matches!(status.as_u16(), 300 | 301 | 308 | 404 | 410)
}

/// How long a response may be stored (its freshness left now, and its age), or
/// `None` when it must not be: RFC 9111 for a shared cache, with `ttl` as the
/// lifetime when the upstream gives none.
pub(crate) fn storable(
    request: &http::request::Parts,
    status: StatusCode,
    headers: &HeaderMap,
    ttl: Duration,
    cache_set_cookie: bool,
    now: SystemTime,
) -> Option<(Duration, Duration)> {
    let explicit = cache_control_has(headers, "max-age")
        || cache_control_has(headers, "s-maxage")
        || headers.contains_key(header::EXPIRES);
    if !(cacheable_by_default(status) || explicit && cacheable_if_explicit(status)) {
        return None;
    }
    if headers.contains_key(header::SET_COOKIE) && !cache_set_cookie {
        return None;
    }
    vary_names(headers)?;
    // `Pragma: no-cache` counts as `no-cache` when there is no Cache-Control.
    if !headers.contains_key(header::CACHE_CONTROL)
        && headers.get_all(header::PRAGMA).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.to_ascii_lowercase().contains("no-cache"))
        })
    {
        return None;
    }
    let mut view = http::Response::new(());
    *view.status_mut() = status;
    *view.headers_mut() = headers.clone();
    let view_headers = view.headers_mut();
    if cache_set_cookie {
        // Allowed by the route: the library's own Set-Cookie rule would refuse it.
        view_headers.remove(header::SET_COOKIE);
    }
    if !explicit {
        let mut cc = headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        if !cc.is_empty() {
            cc.push_str(", ");
        }
        cc.push_str(&format!("max-age={}", ttl.as_secs().max(1)));
        view_headers.insert(header::CACHE_CONTROL, HeaderValue::from_str(&cc).ok()?);
        view_headers.remove(header::PRAGMA);
    }
    let options = http_cache_semantics::CacheOptions {
        shared: true,
        cache_heuristic: 0.0,
        ..Default::default()
    };
    let policy = http_cache_semantics::CachePolicy::new_options(request, &view, now, options);
    if !policy.is_storable() {
        return None;
    }
    let left = policy.time_to_live(now);
    (!left.is_zero()).then(|| (left, policy.age(now)))
}

/// Per-request state.
#[derive(Default)]
pub struct CacheState {
    /// `X-Cache` for the response (set on hits already).
    outcome: Option<Outcome>,
    /// A miss that may be stored.
    pending: Option<Box<Pending>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Hit,
    Stale,
    Miss,
    Bypass,
}

impl Outcome {
    fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Outcome::Hit => "HIT",
            Outcome::Stale => "STALE",
            Outcome::Miss => "MISS",
            Outcome::Bypass => "BYPASS",
        })
    }
    fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Stale => "stale",
            Outcome::Miss => "miss",
            Outcome::Bypass => "bypass",
        }
    }
}

/// What storing a miss's response needs.
struct Pending {
    primary: String,
    target: Arc<str>,
    /// The request as the cache rules see it (method GET, no credentials).
    request: http::request::Parts,
    guard: Option<FlightGuard>,
}

pub struct ResponseCache {
    route: Arc<str>,
    route_hash: String,
    ttl: Duration,
    swr: Duration,
    per_principal: bool,
    cache_set_cookie: bool,
    max_body: u64,
    scope: CacheScope,
    registry: Arc<Inner>,
    store: Arc<dyn portcullis_store::Store>,
}

pub(crate) fn compile(
    config: &portcullis_config::CacheConfig,
    site: &PolicySite<'_>,
    registries: &super::Registries,
    errors: &mut Errors<'_>,
) -> Option<ResponseCache> {
    let field = site.field("cache");
    let mut ok = true;
    if config.ttl.get().as_secs() == 0 {
        errors.push(site.at, format!("{field}.ttl"), "must be at least 1s");
        ok = false;
    }
    if config.max_body.0 == 0 {
        errors.push(site.at, format!("{field}.max_body"), "must be more than 0");
        ok = false;
    }
    if config.shared.0 && !site.authenticated {
        // Harmless: without auth every client shares the entries anyway.
        tracing::debug!(route = %site.route, "cache.shared on a route without auth has no effect");
    }
    ok.then(|| ResponseCache {
        route: site.route.clone(),
        route_hash: short_hash(&site.route),
        ttl: config.ttl.get(),
        swr: config
            .stale_while_revalidate
            .map(|d| d.get())
            .unwrap_or_default(),
        per_principal: site.authenticated && !config.shared.0,
        cache_set_cookie: config.cache_set_cookie.0,
        max_body: config.max_body.0,
        scope: config.scope,
        registry: registries.cache.inner.clone(),
        store: registries.store.clone(),
    })
}

impl ResponseCache {
    fn count(&self, ctx: &RequestCtx<'_>, outcome: Outcome) {
        ctx.shared
            .metrics
            .cache
            .get_or_create(&CacheLabels {
                route: self.route.clone(),
                result: outcome.label(),
            })
            .inc();
    }

    fn store_key(&self, target: &str, key: &str) -> String {
        format!(
            "{STORE_PREFIX}{}:{}:{}",
            self.route_hash,
            short_hash(target),
            // The whole digest: entries of different principals must never share
            // a store key.
            full_hash(key)
        )
    }

    async fn get(&self, target: &str, key: &str) -> Option<Arc<Entry>> {
        match self.scope {
            CacheScope::Local => self.registry.local.load().entries.get(key),
            CacheScope::Cluster => match self.store.get(&self.store_key(target, key)).await {
                Ok(Some(b)) => Entry::decode(&b).map(Arc::new),
                Ok(None) => None,
                Err(e) => {
                    tracing::debug!(error = %e, "cache: store read failed; treated as a miss");
                    None
                }
            },
        }
    }

    /// The entry for this request (following the vary index), and its full key.
    async fn lookup(
        &self,
        primary: &str,
        target: &str,
        headers: &HeaderMap,
    ) -> (Option<Arc<Entry>>, String) {
        match self.get(target, primary).await {
            None => (None, primary.to_owned()),
            Some(e) => match &e.kind {
                Kind::Response { .. } => (Some(e), primary.to_owned()),
                Kind::Vary(names) => {
                    let key = vary_key(primary, names, headers);
                    let found = self
                        .get(target, &key)
                        .await
                        .filter(|e| matches!(e.kind, Kind::Response { .. }));
                    (found, key)
                }
            },
        }
    }

    pub(super) async fn on_request(
        &self,
        ctx: &mut RequestCtx<'_>,
        req: &mut Request<Incoming>,
    ) -> Result<Flow, GatewayError> {
        let head = req.method() == Method::HEAD;
        if !(head || req.method() == Method::GET) || ctx.upgrade.is_some() {
            return Ok(self.bypass(ctx));
        }
        // Anonymous requests on an `auth.optional` route share one entry, apart from
        // every principal's.
        let principal = if self.per_principal {
            ctx.principal()
        } else {
            None
        };
        let target: Arc<str> = match &ctx.query {
            Some(q) => Arc::from(format!("{}?{q}", ctx.path)),
            None => Arc::from(ctx.path),
        };
        let host = ctx.authority.as_ref().map_or(&b""[..], |a| a.as_bytes());
        let primary = primary_key(&self.route, ctx.conn.scheme, host, &target, principal);
        let no_store = cache_control_has(req.headers(), "no-store");

        let (found, key) = self.lookup(&primary, &target, req.headers()).await;
        let now = SystemTime::now();
        let mut guard = None;
        match found.as_ref().map(|e| (e, e.freshness(now))) {
            Some((e, Freshness::Fresh(age))) => {
                return Ok(self.hit(ctx, e, age, head, Outcome::Hit));
            }
            Some((e, Freshness::Stale(age))) => {
                // One request refreshes; the others get the stale copy meanwhile.
                match self.registry_join(&key, head || no_store) {
                    Some(Join::Leader(g)) => guard = Some(g),
                    _ => return Ok(self.hit(ctx, e, age, head, Outcome::Stale)),
                }
            }
            _ if head || no_store => {
                // Never leads (its response is not stored), but a GET in flight
                // for the key is worth waiting for.
                if let Some(rx) = self.registry.in_flight(&key) {
                    follow(rx).await;
                    if let Some(res) = self.reread(ctx, &primary, &target, req, head).await {
                        return Ok(res);
                    }
                }
            }
            _ => match self.registry_join(&key, false) {
                Some(Join::Leader(g)) => guard = Some(g),
                Some(Join::Follower(rx)) => {
                    follow(rx).await;
                    if let Some(res) = self.reread(ctx, &primary, &target, req, head).await {
                        return Ok(res);
                    }
                    // Nothing stored (not cacheable, or the leader is slow): go
                    // upstream alone, storing the response if it can be.
                }
                None => {}
            },
        }
        self.count(ctx, Outcome::Miss);
        ctx.cache.outcome = Some(Outcome::Miss);
        if head || no_store {
            return Ok(Flow::Continue);
        }
        let mut request = Request::new(());
        *request.uri_mut() = target.parse().unwrap_or_default();
        *request.headers_mut() = req.headers().clone();
        // An `Authorization` the route's auth verified is keyed by its principal (or
        // the route says `shared`): it does not make the response private. Any other
        // `Authorization` reaches the upstream unchecked by us, so RFC 9111 §3.5
        // holds: stored only when the response says `public`, `s-maxage` or
        // `must-revalidate`.
        let verified_header = ctx
            .identity
            .as_ref()
            .is_some_and(|i| i.source == crate::auth::CredentialSource::Header);
        if verified_header {
            request.headers_mut().remove(header::AUTHORIZATION);
        }
        let (request, ()) = request.into_parts();
        ctx.cache.pending = Some(Box::new(Pending {
            primary,
            target,
            request,
            guard,
        }));
        Ok(Flow::Continue)
    }

    fn registry_join(&self, key: &str, never_lead: bool) -> Option<Join> {
        if never_lead {
            return None;
        }
        Some(self.registry.join(key))
    }

    /// After waiting for a leader: the entry it stored, if fresh.
    async fn reread(
        &self,
        ctx: &mut RequestCtx<'_>,
        primary: &str,
        target: &str,
        req: &Request<Incoming>,
        head: bool,
    ) -> Option<Flow> {
        let (found, _) = self.lookup(primary, target, req.headers()).await;
        let e = found?;
        match e.freshness(SystemTime::now()) {
            Freshness::Fresh(age) => Some(self.hit(ctx, &e, age, head, Outcome::Hit)),
            _ => None,
        }
    }

    fn bypass(&self, ctx: &mut RequestCtx<'_>) -> Flow {
        self.count(ctx, Outcome::Bypass);
        ctx.cache.outcome = Some(Outcome::Bypass);
        Flow::Continue
    }

    fn hit(
        &self,
        ctx: &mut RequestCtx<'_>,
        e: &Entry,
        age: Duration,
        head: bool,
        outcome: Outcome,
    ) -> Flow {
        self.count(ctx, outcome);
        ctx.cache.outcome = Some(outcome);
        let Kind::Response {
            status,
            headers,
            body,
        } = &e.kind
        else {
            return Flow::Continue;
        };
        let mut res = Response::new(if head {
            Body::empty()
        } else {
            Body::full(body.clone())
        });
        *res.status_mut() = *status;
        *res.headers_mut() = headers.clone();
        let h = res.headers_mut();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        h.insert(header::AGE, HeaderValue::from(age.as_secs()));
        h.insert(X_CACHE.clone(), outcome.header());
        Flow::Respond(Box::new(res))
    }

    pub(super) fn on_response(&self, ctx: &mut RequestCtx<'_>, res: &mut Response<Body>) {
        let outcome = ctx.cache.outcome;
        if let Some(o) = outcome.filter(|o| matches!(o, Outcome::Miss | Outcome::Bypass)) {
            res.headers_mut().insert(X_CACHE.clone(), o.header());
        }
        let Some(pending) = ctx.cache.pending.take() else {
            return;
        };
        // Dropping `pending` (and its flight guard) on every early return wakes
        // the requests waiting for this one.
        let now = SystemTime::now();
        let headers = res.headers();
        let Some((ttl, age0)) = storable(
            &pending.request,
            res.status(),
            headers,
            self.ttl,
            self.cache_set_cookie,
            now,
        ) else {
            return;
        };
        let known = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .or_else(|| res.body().size_hint().exact());
        if known.is_some_and(|n| n > self.max_body) {
            return;
        }
        let Some(vary) = vary_names(headers) else {
            return;
        };
        // A variant keyed by a header the gateway sets (X-Forwarded-*, identity,
        // transforms) would be keyed by the client's value, not the one the
        // upstream saw: one client's response would reach another. Not stored.
        if vary.iter().any(|n| {
            ctx.snapshot.header_rules.set_by_gateway(n) || ctx.route.chain.touches_request_header(n)
        }) {
            return;
        }
        let mut stored_headers = headers.clone();
        for h in [
            header::AGE,
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
            header::CONNECTION,
            X_CACHE.clone(),
        ] {
            stored_headers.remove(h);
        }
        let key = if vary.is_empty() {
            pending.primary.clone()
        } else {
            vary_key(&pending.primary, &vary, &pending.request.headers)
        };
        let commit = Commit {
            cache: CommitTarget {
                scope: self.scope,
                registry: self.registry.clone(),
                store: self.store.clone(),
                route: self.route.clone(),
                target: pending.target.clone(),
                primary_store_key: self.store_key(&pending.target, &pending.primary),
                store_key: self.store_key(&pending.target, &key),
                primary: pending.primary,
                key,
            },
            vary,
            status: res.status(),
            headers: stored_headers,
            stored: now,
            age0,
            ttl,
            // A shared cache must not serve these stale (RFC 9111 §4.2.4, §5.2.2).
            swr: if ["must-revalidate", "proxy-revalidate", "s-maxage"]
                .iter()
                .any(|d| cache_control_has(res.headers(), d))
            {
                Duration::ZERO
            } else {
                self.swr
            },
            _guard: pending.guard,
        };
        if res.body().is_end_stream() {
            // hyper never polls a body that is already over: store it now.
            commit.run(Bytes::new());
            return;
        }
        if let Some(g) = &commit._guard {
            g.streaming();
        }
        let inner = std::mem::replace(res.body_mut(), Body::empty());
        *res.body_mut() = Body::Tee(Box::new(TeeBody {
            inner,
            collected: Vec::new(),
            size: 0,
            limit: self.max_body,
            budget: self.registry.clone(),
            commit: Some(Box::new(commit)),
        }));
    }
}

struct CommitTarget {
    scope: CacheScope,
    registry: Arc<Inner>,
    store: Arc<dyn portcullis_store::Store>,
    route: Arc<str>,
    target: Arc<str>,
    primary: String,
    primary_store_key: String,
    key: String,
    store_key: String,
}

/// A response waiting for its body to be complete before it is stored.
struct Commit {
    cache: CommitTarget,
    vary: Vec<HeaderName>,
    status: StatusCode,
    headers: HeaderMap,
    stored: SystemTime,
    age0: Duration,
    ttl: Duration,
    swr: Duration,
    /// Released once stored (or given up), waking the waiting requests.
    _guard: Option<FlightGuard>,
}

impl Commit {
    fn run(self, body: Bytes) {
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

/// A response body streamed to the client while the cache collects it; stored when
/// complete, given up past `max_body`, on an error, trailers, or if dropped early.
pub struct TeeBody {
    inner: Body,
    collected: Vec<Bytes>,
    size: u64,
    limit: u64,
    /// The registry whose `collecting` counts `size` while collecting.
    budget: Arc<Inner>,
    commit: Option<Box<Commit>>,
}

impl TeeBody {
    fn give_up(&mut self) {
        self.commit = None;
        self.collected = Vec::new();
        self.release();
    }

    /// Returns the bytes this body reserved from the collecting budget.
    fn release(&mut self) {
        let held = std::mem::take(&mut self.size);
        self.budget
            .collecting
            .fetch_sub(held, std::sync::atomic::Ordering::Relaxed);
    }

    /// Reserves `n` more bytes; false when every collection together would exceed
    /// the local cache's size (slow readers must not pin unbounded memory).
    fn reserve(&mut self, n: u64) -> bool {
        let budget = self.budget.local.load().max_bytes;
        let before = self
            .budget
            .collecting
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        self.size += n;
        before + n <= budget
    }

    fn complete(&mut self) {
        let Some(commit) = self.commit.take() else {
            return;
        };
        let parts = std::mem::take(&mut self.collected);
        let capacity = self.size as usize;
        self.release();
        let body = match parts.len() {
            0 => Bytes::new(),
            1 => parts.into_iter().next().unwrap_or_default(),
            _ => {
                let mut b = BytesMut::with_capacity(capacity);
                for p in parts {
                    b.extend_from_slice(&p);
                }
                b.freeze()
            }
        };
        commit.run(body);
    }
}

impl HttpBody for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if this.commit.is_some() {
                    match frame.data_ref() {
                        Some(data) => {
                            let fits = this.reserve(data.len() as u64);
                            if !fits || this.size > this.limit {
                                this.give_up();
                            } else if !data.is_empty() {
                                this.collected.push(data.clone());
                            }
                        }
                        None => this.give_up(),
                    }
                }
                if this.inner.is_end_stream() {
                    this.complete();
                }
            }
            Poll::Ready(Some(Err(_))) => this.give_up(),
            Poll::Ready(None) => this.complete(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TeeBody {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn get(target: &str) -> http::request::Parts {
        let mut r = Request::new(());
        *r.uri_mut() = target.parse().unwrap();
        r.into_parts().0
    }

    const TTL: Duration = Duration::from_secs(60);

    fn ttl_of(status: u16, h: &[(&str, &str)]) -> Option<Duration> {
        storable(
            &get("/x"),
            StatusCode::from_u16(status).unwrap(),
            &headers(h),
            TTL,
            false,
            SystemTime::now(),
        )
        .map(|(ttl, _)| ttl)
    }

    #[test]
    fn keys_separate_hosts_paths_principals_and_variants() {
        let a = primary_key("r", "http", b"a.test", "/x?y=1", None);
        assert_ne!(a, primary_key("r", "https", b"a.test", "/x?y=1", None));
        assert_ne!(a, primary_key("r", "http", b"b.test", "/x?y=1", None));
        assert_ne!(a, primary_key("r", "http", b"a.test", "/x?y=2", None));
        assert_ne!(a, primary_key("r2", "http", b"a.test", "/x?y=1", None));
        assert_ne!(
            primary_key("r", "http", b"a.test", "/x", Some("alice")),
            primary_key("r", "http", b"a.test", "/x", Some("bob"))
        );
        assert_ne!(a, primary_key("r", "http", b"a.test", "/x?y=1", Some("")));
        // Length prefixes: no ambiguity between parts.
        assert_ne!(
            primary_key("r", "http", b"a|", "/x", None),
            primary_key("r", "http", b"a", "|/x", None)
        );
        let names = vec![HeaderName::from_static("accept-language")];
        let en = vary_key(&a, &names, &headers(&[("accept-language", "en")]));
        let fr = vary_key(&a, &names, &headers(&[("accept-language", "fr")]));
        let none = vary_key(&a, &names, &HeaderMap::new());
        assert_ne!(en, fr);
        assert_ne!(en, none);
        assert_eq!(
            en,
            vary_key(&a, &names, &headers(&[("accept-language", " en ")]))
        );
    }

    #[test]
    fn vary_names_are_normalised_and_star_refused() {
        let n = vary_names(&headers(&[("vary", "Accept-Language, accept-encoding")])).unwrap();
        assert_eq!(n, vec![header::ACCEPT_ENCODING, header::ACCEPT_LANGUAGE]);
        assert!(vary_names(&headers(&[("vary", "*")])).is_none());
        assert!(vary_names(&HeaderMap::new()).unwrap().is_empty());
    }

    #[test]
    fn cacheability_rules() {
        assert_eq!(ttl_of(200, &[]), Some(TTL));
        assert_eq!(
            ttl_of(200, &[("cache-control", "max-age=5")]),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            ttl_of(200, &[("cache-control", "max-age=5, s-maxage=100")]),
            Some(Duration::from_secs(100))
        );
        assert_eq!(ttl_of(200, &[("cache-control", "no-store")]), None);
        assert_eq!(ttl_of(200, &[("cache-control", "private")]), None);
        assert_eq!(ttl_of(200, &[("cache-control", "no-cache")]), None);
        assert_eq!(ttl_of(200, &[("cache-control", "max-age=0")]), None);
        assert_eq!(ttl_of(200, &[("cache-control", "public")]), Some(TTL));
        assert_eq!(ttl_of(200, &[("set-cookie", "a=b")]), None);
        assert_eq!(ttl_of(200, &[("vary", "*")]), None);
        assert_eq!(ttl_of(200, &[("pragma", "no-cache")]), None);
        assert_eq!(ttl_of(200, &[("expires", "0")]), None);
        // Upstream Age counts against max-age.
        assert_eq!(
            ttl_of(200, &[("cache-control", "max-age=50"), ("age", "20")]),
            Some(Duration::from_secs(30))
        );
        assert_eq!(ttl_of(500, &[]), None);
        assert_eq!(ttl_of(404, &[]), None);
        assert_eq!(
            ttl_of(404, &[("cache-control", "max-age=7")]),
            Some(Duration::from_secs(7))
        );
        assert_eq!(ttl_of(206, &[("cache-control", "max-age=7")]), None);
        // The route may allow cookies.
        let allowed = storable(
            &get("/x"),
            StatusCode::OK,
            &headers(&[("set-cookie", "a=b")]),
            TTL,
            true,
            SystemTime::now(),
        );
        assert!(allowed.is_some());
        // Request no-store.
        let mut r = get("/x");
        r.headers
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        assert!(storable(
            &r,
            StatusCode::OK,
            &HeaderMap::new(),
            TTL,
            false,
            SystemTime::now()
        )
        .is_none());
    }

    #[test]
    fn entries_round_trip_through_the_store_encoding() {
        let e = Entry {
            route: Arc::from("r"),
            target: Arc::from("/x?a=1"),
            stored: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            age0: Duration::from_secs(3),
            ttl: Duration::from_secs(60),
            swr: Duration::from_secs(5),
            kind: Kind::Response {
                status: StatusCode::OK,
                headers: headers(&[("content-type", "text/plain"), ("x-a", "1"), ("x-a", "2")]),
                body: Bytes::from_static(b"hello"),
            },
        };
        let d = Entry::decode(&e.encode()).unwrap();
        assert_eq!(d.stored, e.stored);
        assert_eq!((d.age0, d.ttl, d.swr), (e.age0, e.ttl, e.swr));
        assert_eq!(&*d.target, "/x?a=1");
        let Kind::Response {
            status,
            headers,
            body,
        } = d.kind
        else {
            panic!()
        };
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers.get_all("x-a").iter().count(), 2);
        assert_eq!(&body[..], b"hello");
        assert!(Entry::decode(b"nope").is_none());
    }

    #[test]
    fn freshness_windows() {
        let now = SystemTime::now();
        let e = Entry {
            route: Arc::from("r"),
            target: Arc::from("/"),
            stored: now - Duration::from_secs(10),
            age0: Duration::from_secs(2),
            ttl: Duration::from_secs(30),
            swr: Duration::from_secs(30),
            kind: Kind::Vary(Vec::new()),
        };
        assert!(matches!(e.freshness(now), Freshness::Fresh(a) if a.as_secs() == 12));
        assert!(matches!(
            e.freshness(now + Duration::from_secs(25)),
            Freshness::Stale(_)
        ));
        assert!(matches!(
            e.freshness(now + Duration::from_secs(55)),
            Freshness::Expired
        ));
    }

    #[tokio::test]
    async fn one_leader_per_key() {
        let reg = Registry::default().inner;
        let Join::Leader(guard) = reg.join("k") else {
            panic!("first leads")
        };
        let Join::Follower(rx) = reg.join("k") else {
            panic!("second follows")
        };
        assert!(matches!(reg.join("other"), Join::Leader(_)));
        let waiter = tokio::spawn(follow(rx));
        drop(guard);
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("woken when the leader is done")
            .unwrap();
        assert!(matches!(reg.join("k"), Join::Leader(_)));
    }
}
