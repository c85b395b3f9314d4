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

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response};
use http_body::Body as HttpBody;
use hyper::body::Incoming;
use portcullis_config::CacheScope;

mod flight;
mod keys;
mod rules;
mod storage;
mod tee;

use flight::{follow, FlightGuard, Join};
pub use flight::{BODY_GRACE, FOLLOW_WAIT};
use keys::vary_names;
pub(crate) use keys::{primary_key, vary_key};
use rules::cache_control_has;
pub(crate) use rules::storable;
pub use storage::Registry;
use storage::{
    full_hash, short_hash, Commit, CommitTarget, Entry, Freshness, Inner, Kind, STORE_PREFIX,
};
pub use tee::TeeBody;

use super::{Flow, PolicySite};
use crate::body::Body;
use crate::context::RequestCtx;
use crate::error::GatewayError;
use crate::snapshot::Errors;
use crate::telemetry::CacheLabels;

/// How long a request waits for another request fetching the same key.
static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

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

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

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
