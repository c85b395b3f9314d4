//! Rate limits and API-key quotas.
//!
//! **Rate limits** (`rate_limits:` on a route or in `defaults:`): each limit counts
//! requests per key — the client IP (IPv6 by prefix), the principal, the API key, a
//! header, a cookie, a path param, or several joined with `+` — with a sliding window
//! or a token bucket ([`portcullis_store::ratelimit`]). `scope: local` counts in this
//! process ([`Registry`], bounded and sharded, kept across reloads); `scope: cluster`
//! counts in the store with one atomic operation per decision. Limits keyed only by
//! what is known before auth run before it ([`super::Policy::RateLimitClient`]); the
//! others after it ([`super::Policy::RateLimitPrincipal`]). A limit whose key part is
//! absent from a request (no principal, no such header/cookie) does not apply to it.
//!
//! The **quota** counts requests against the quota stored with the API key a request
//! authenticated with (`auth.quota: true` on the route); the store counts atomically,
//! so instances sharing a Redis never admit more than the limit together.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::Response;
use portcullis_config::{
    RateLimitAlgorithm, RateLimitConfig, RateLimitHeaders, RateLimitScope, StoreFailure,
};
use portcullis_store::{Rate, RateAlgorithm, RateDecision, WindowCount};

mod local;
mod quota;

pub use local::Registry;
pub use quota::Quota;

use super::Flow;
use crate::body::Body;
use crate::context::RequestCtx;
use crate::error::{ErrorCode, GatewayError};
use crate::telemetry::LimitLabels;

pub(super) static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub(super) static RATELIMIT_REMAINING: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining");
pub(super) static RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// Key parts longer than this are replaced by their SHA-256 (memory, Redis key size).
const MAX_KEY_PARTS: usize = 200;

/// One part of a limit's key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// The client IP; IPv6 by this prefix length.
    Ip(u8),
    Principal,
    ApiKey,
    Header(HeaderName),
    Cookie(Box<str>),
    Param(Box<str>),
}

impl Part {
    fn after_auth(&self) -> bool {
        matches!(self, Part::Principal | Part::ApiKey)
    }
}

/// One compiled limit.
struct Limit {
    name: Arc<str>,
    parts: Box<[Part]>,
    rate: Rate,
    cluster: bool,
    fail_closed: bool,
    headers: RateLimitHeaders,
    /// `rl:<route>␟<name>␟<algorithm>␟`, the start of every key of this limit.
    prefix: Box<str>,
    /// Metric labels for allowed, limited, store_error.
    labels: [LimitLabels; 3],
    /// Their counters, looked up once (the family's lock and hash stay off the
    /// request path after the first request).
    counters: [std::sync::OnceLock<prometheus_client::metrics::counter::Counter>; 3],
}

impl Limit {
    fn count(&self, metrics: &crate::telemetry::Metrics, result: usize) {
        self.counters[result]
            .get_or_init(|| {
                metrics
                    .ratelimit
                    .get_or_create(&self.labels[result])
                    .clone()
            })
            .inc();
    }
}

/// A route's rate limits of one phase (before or after auth).
pub struct RateLimits {
    limits: Box<[Limit]>,
    /// `RateLimit-Policy` listing every limit of the route with IETF headers (both
    /// phases), when there is one.
    policy: Option<HeaderValue>,
}

/// The route's limits, split into those keyed before auth and those after.
pub(crate) fn compile(
    limits: &[RateLimitConfig],
    site: &super::PolicySite<'_>,
    _registries: &super::Registries,
    errors: &mut crate::snapshot::Errors<'_>,
) -> (Option<RateLimits>, Option<RateLimits>) {
    let base = site.field("rate_limits");
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut before = Vec::new();
    let mut after = Vec::new();
    let mut policies = Vec::new();
    for (i, c) in limits.iter().enumerate() {
        let field = format!("{base}[{i}]");
        let mut ok = true;
        let mut err = |key: &str, msg: String| {
            errors.push(site.at, format!("{field}.{key}"), msg);
            ok = false;
        };
        if c.requests == 0 {
            err("requests", "must be at least 1".into());
        }
        if c.per.get().is_zero() {
            err("per", "must be longer than 0".into());
        }
        match (c.algorithm, c.burst) {
            (_, Some(0)) => err("burst", "must be at least 1".into()),
            (RateLimitAlgorithm::SlidingWindow, Some(_)) => err(
                "burst",
                "only a token_bucket has a burst (set algorithm: token_bucket)".into(),
            ),
            _ => {}
        }
        if c.ipv6_prefix > 128 {
            err(
                "ipv6_prefix",
                format!("{} is not a prefix length (0-128)", c.ipv6_prefix),
            );
        }
        let name = match &c.name {
            Some(n) => {
                let n = n.as_str();
                if n.is_empty() || !n.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                    err("name", format!("{n:?} must be non-empty printable ASCII"));
                }
                n.to_owned()
            }
            None => format!("{}-{i}", site.route)
                .chars()
                .map(|ch| if (' '..='~').contains(&ch) { ch } else { '_' })
                .collect(),
        };
        if let Some(first) = names.insert(name.clone(), i) {
            err(
                "name",
                format!("duplicate limit name {name:?} (also {base}[{first}])"),
            );
        }
        let parts = match parse_by(c.by.as_str(), c.ipv6_prefix, site.params) {
            Ok(p) => p,
            Err(msg) => {
                err("by", msg);
                continue;
            }
        };
        if !ok {
            continue;
        }
        let algorithm = match c.algorithm {
            RateLimitAlgorithm::SlidingWindow => RateAlgorithm::SlidingWindow,
            RateLimitAlgorithm::TokenBucket => RateAlgorithm::TokenBucket,
        };
        let rate = Rate {
            algorithm,
            limit: c.requests,
            period: c.per.get(),
            burst: c.burst.unwrap_or(c.requests),
        };
        let name: Arc<str> = Arc::from(name);
        if matches!(c.headers, RateLimitHeaders::Ietf | RateLimitHeaders::Both) {
            policies.push(format!(
                "{};q={};w={}",
                sf_string(&name),
                rate.limit,
                secs_ceil(rate.period).max(1)
            ));
        }
        let label = |result| LimitLabels {
            route: site.route.clone(),
            limit: name.clone(),
            result,
        };
        let tag = match algorithm {
            RateAlgorithm::SlidingWindow => 's',
            RateAlgorithm::TokenBucket => 't',
        };
        let limit = Limit {
            prefix: format!("rl:{}\u{1f}{name}\u{1f}{tag}\u{1f}", site.route).into(),
            labels: [label("allowed"), label("limited"), label("store_error")],
            counters: Default::default(),
            name,
            rate,
            cluster: c.scope == RateLimitScope::Cluster,
            fail_closed: c.on_store_error == StoreFailure::FailClosed,
            headers: c.headers,
            parts: parts.into(),
        };
        if limit.parts.iter().any(Part::after_auth) {
            after.push(limit);
        } else {
            before.push(limit);
        }
    }
    let policy = (!policies.is_empty())
        .then(|| HeaderValue::from_str(&policies.join(", ")).ok())
        .flatten();
    let phase = |limits: Vec<Limit>| {
        (!limits.is_empty()).then(|| RateLimits {
            limits: limits.into(),
            policy: policy.clone(),
        })
    };
    (phase(before), phase(after))
}

/// `ip`, `principal`, `api_key`, `header:<name>`, `cookie:<name>`, `param:<name>`,
/// joined with `+`.
fn parse_by(by: &str, ipv6_prefix: u8, params: &[String]) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    for raw in by.split('+') {
        let s = raw.trim();
        let part = match s.split_once(':') {
            None if s == "ip" => Part::Ip(ipv6_prefix),
            None if s == "principal" => Part::Principal,
            None if s == "api_key" => Part::ApiKey,
            Some((kind, name)) if !name.trim().is_empty() => {
                let name = name.trim();
                match kind.trim() {
                    "header" => Part::Header(
                        HeaderName::from_bytes(name.as_bytes())
                            .map_err(|_| format!("{name:?} is not a header name"))?,
                    ),
                    "cookie" => Part::Cookie(name.into()),
                    "param" => {
                        if !params.iter().any(|p| p == name) {
                            return Err(format!(
                                "param {name:?} is not captured by the route's path{}",
                                if params.is_empty() {
                                    String::new()
                                } else {
                                    format!(" (it captures {})", params.join(", "))
                                }
                            ));
                        }
                        Part::Param(name.into())
                    }
                    other => return Err(unknown_key(&format!("{other}:"))),
                }
            }
            _ => return Err(unknown_key(s)),
        };
        if !parts.contains(&part) {
            parts.push(part);
        }
    }
    Ok(parts)
}

fn unknown_key(s: &str) -> String {
    format!(
        "unknown key {s:?} (expected ip, principal, api_key, header:<name>, cookie:<name> or param:<name>, several joined with +)"
    )
}

/// An RFC 8941 sf-string (names are printable ASCII).
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn secs_ceil(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000) as u64
}

/// Appends the key of `ip`: IPv4 whole (IPv4-mapped IPv6 too), IPv6 masked to
/// `prefix` bits.
fn push_ip(key: &mut String, ip: IpAddr, prefix: u8) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let _ = write!(key, "{v4}");
        }
        IpAddr::V6(v6) => {
            let bits = u32::from(prefix.min(128));
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            let net = std::net::Ipv6Addr::from(u128::from(v6) & mask);
            let _ = write!(key, "{net}/{bits}");
        }
    }
}

impl Limit {
    /// This request's key, or `None` when a part is absent (the limit does not apply).
    fn key(
        &self,
        ctx: &RequestCtx<'_>,
        req: &http::Request<hyper::body::Incoming>,
    ) -> Option<String> {
        let mut key = String::with_capacity(self.prefix.len() + 48);
        key.push_str(&self.prefix);
        let start = key.len();
        for part in self.parts.iter() {
            match part {
                Part::Ip(prefix) => push_ip(&mut key, ctx.client_ip, *prefix),
                Part::Principal => crate::policy::key::push_part(
                    &mut key,
                    ctx.principal().filter(|p| !p.is_empty())?.as_bytes(),
                ),
                Part::ApiKey => {
                    let id = ctx.identity.as_ref()?.api_key.as_ref()?;
                    crate::policy::key::push_part(&mut key, id.record.id.as_bytes());
                }
                Part::Header(name) => {
                    let v = req.headers().get(name)?;
                    if v.is_empty() {
                        return None;
                    }
                    crate::policy::key::push_part(&mut key, v.as_bytes());
                }
                Part::Cookie(name) => crate::policy::key::push_part(
                    &mut key,
                    crate::sanitize::cookie(req.headers(), name)?,
                ),
                Part::Param(name) => {
                    let v = ctx.params.iter().find(|(n, _)| *n == &**name)?.1;
                    crate::policy::key::push_part(&mut key, v.as_bytes());
                }
            }
            key.push('\u{1f}');
        }
        if key.len() - start > MAX_KEY_PARTS {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(&key.as_bytes()[start..]);
            key.truncate(start);
            key.push('#');
            for b in &digest[..16] {
                let _ = write!(key, "{b:02x}");
            }
        }
        Some(key)
    }
}

impl RateLimits {
    pub(super) async fn on_request(
        &self,
        ctx: &mut RequestCtx<'_>,
        req: &mut http::Request<hyper::body::Incoming>,
    ) -> Result<Flow, GatewayError> {
        let shared = ctx.shared;
        let registry = &shared.policies.ratelimit;
        for limit in self.limits.iter() {
            let Some(key) = limit.key(ctx, req) else {
                continue;
            };
            let decision = if limit.cluster {
                match shared.policies.store.rate_limit(&key, &limit.rate, 1).await {
                    Ok(d) => {
                        if registry.store_ok() {
                            tracing::info!("rate-limit store reachable again");
                        }
                        d
                    }
                    Err(e) => {
                        limit.count(&shared.metrics, 2);
                        if registry.store_failed() {
                            tracing::warn!(
                                error = %e,
                                route = %limit.labels[2].route,
                                limit = %limit.name,
                                "rate-limit store unavailable: limits with on_store_error fail_open admit requests uncounted, fail_closed ones refuse them, until it answers again"
                            );
                        }
                        if limit.fail_closed {
                            return Err(GatewayError::server(ErrorCode::ServiceUnavailable));
                        }
                        continue;
                    }
                }
            } else {
                registry.decide(&key, &limit.rate, 1, registry.now_ms())
            };
            limit.count(&shared.metrics, usize::from(!decision.allowed));
            ctx.limits.report(limit, &decision);
            if !decision.allowed {
                let retry = secs_ceil(decision.retry_after).max(1);
                return Err(GatewayError::new(
                    ErrorCode::RateLimited,
                    format!("rate limit {:?} exceeded; retry later", &*limit.name),
                )
                .with_header(header::RETRY_AFTER, HeaderValue::from(retry)));
            }
        }
        Ok(Flow::Continue)
    }

    /// Sets the headers once per response (the first phase to answer writes what
    /// both phases decided).
    pub(super) fn on_response(&self, ctx: &mut RequestCtx<'_>, res: &mut Response<Body>) {
        let state = &mut ctx.limits;
        if state.written {
            return;
        }
        state.written = true;
        let headers = res.headers_mut();
        if let Some(p) = &self.policy {
            headers.insert(RATELIMIT_POLICY.clone(), p.clone());
        }
        if let Some(r) = &state.ietf {
            let v = format!(
                "{};r={};t={}",
                sf_string(&r.name),
                r.remaining,
                r.reset_secs
            );
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert(RATELIMIT.clone(), v);
            }
        }
        // The API-key quota's own X-RateLimit-* headers win.
        if let (Some(r), None) = (&state.legacy, &state.quota) {
            headers.insert(RATELIMIT_LIMIT.clone(), HeaderValue::from(r.limit));
            headers.insert(RATELIMIT_REMAINING.clone(), HeaderValue::from(r.remaining));
            headers.insert(RATELIMIT_RESET.clone(), HeaderValue::from(r.reset_secs));
        }
    }
}

/// What one limit reported, for the response headers.
#[derive(Debug, Clone)]
struct Reported {
    name: Arc<str>,
    limit: u64,
    remaining: u64,
    reset_secs: u64,
}

impl Reported {
    /// Closest to exhaustion: fewest remaining, then the longest wait.
    fn closer_than(&self, other: &Reported) -> bool {
        (self.remaining, std::cmp::Reverse(self.reset_secs))
            < (other.remaining, std::cmp::Reverse(other.reset_secs))
    }
}

/// What the limits of this request decided, for its response headers.
#[derive(Default)]
pub struct LimitState {
    quota: Option<WindowCount>,
    /// The limit closest to exhaustion among those with IETF headers.
    ietf: Option<Reported>,
    /// … and among those with legacy headers.
    legacy: Option<Reported>,
    written: bool,
}

impl LimitState {
    fn report(&mut self, limit: &Limit, d: &RateDecision) {
        let (ietf, legacy) = match limit.headers {
            RateLimitHeaders::Ietf => (true, false),
            RateLimitHeaders::Legacy => (false, true),
            RateLimitHeaders::Both => (true, true),
            RateLimitHeaders::None => return,
        };
        let r = Reported {
            name: limit.name.clone(),
            limit: limit.rate.limit,
            remaining: d.remaining,
            reset_secs: secs_ceil(d.reset_after),
        };
        for (on, slot) in [(ietf, &mut self.ietf), (legacy, &mut self.legacy)] {
            if on && slot.as_ref().is_none_or(|old| r.closer_than(old)) {
                *slot = Some(r.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_keys_group_ipv6_by_prefix() {
        let key = |ip: &str, prefix| {
            let mut k = String::new();
            push_ip(&mut k, ip.parse().unwrap(), prefix);
            k
        };
        assert_eq!(key("192.0.2.7", 64), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7", 64), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1", 64), "2001:db8:1:2::/64");
        assert_eq!(
            key("2001:db8:1:2:aaaa::1", 64),
            key("2001:db8:1:2:ffff:1:2:3", 64)
        );
        assert_ne!(key("2001:db8:1:2::1", 64), key("2001:db8:1:3::1", 64));
        assert_eq!(key("2001:db8:1:2::1", 48), "2001:db8:1::/48");
        assert_eq!(key("2001:db8::1", 128), "2001:db8::1/128");
        assert_eq!(key("2001:db8::1", 0), "::/0");
    }

    #[test]
    fn by_parses_kinds_and_combinations() {
        let params = vec!["tenant".to_owned()];
        assert_eq!(parse_by("ip", 64, &params).unwrap(), vec![Part::Ip(64)]);
        assert_eq!(
            parse_by(
                "principal + header:X-Tenant + param:tenant + cookie:sid",
                56,
                &params
            )
            .unwrap(),
            vec![
                Part::Principal,
                Part::Header(HeaderName::from_static("x-tenant")),
                Part::Param("tenant".into()),
                Part::Cookie("sid".into()),
            ]
        );
        assert!(parse_by("api_key", 64, &params).unwrap()[0].after_auth());
        assert!(parse_by("host", 64, &params)
            .unwrap_err()
            .contains("unknown key"));
        assert!(parse_by("query:x", 64, &params)
            .unwrap_err()
            .contains("unknown key"));
        assert!(parse_by("header:", 64, &params)
            .unwrap_err()
            .contains("unknown key"));
        assert!(parse_by("ip+", 64, &params)
            .unwrap_err()
            .contains("unknown key"));
        assert!(parse_by("header:a b", 64, &params)
            .unwrap_err()
            .contains("not a header name"));
        assert!(parse_by("param:user", 64, &params)
            .unwrap_err()
            .contains("captures tenant"));
    }

    #[test]
    fn cookies_read_as_bytes_and_headers_are_structured_fields() {
        let mut h = http::HeaderMap::new();
        h.insert(
            header::COOKIE,
            http::HeaderValue::from_bytes(b"x=\xff\xfe; sid=abc").unwrap(),
        );
        assert_eq!(crate::sanitize::cookie(&h, "sid"), Some(&b"abc"[..]));
        assert_eq!(sf_string("per-ip"), "\"per-ip\"");
        assert_eq!(sf_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(secs_ceil(Duration::from_millis(1)), 1);
        assert_eq!(secs_ceil(Duration::from_millis(60_000)), 60);
    }

    #[test]
    fn closest_to_exhaustion_is_reported() {
        let mk = |remaining, reset_secs| Reported {
            name: Arc::from("x"),
            limit: 10,
            remaining,
            reset_secs,
        };
        assert!(mk(1, 5).closer_than(&mk(2, 60)));
        assert!(mk(1, 60).closer_than(&mk(1, 5)));
        assert!(!mk(3, 60).closer_than(&mk(1, 5)));
    }
}
