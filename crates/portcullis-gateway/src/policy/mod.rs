//! The per-route policy chain: a closed enum run in a canonical order.
//!
//! The executor ([`crate::service`]) runs [`Policy::on_request`] front to back (any
//! policy may answer or fail and stop the chain), then the route's action (which
//! calls [`Policy::on_upstream_request`] once per upstream attempt), then
//! [`Policy::on_response`] back to front for every policy whose `on_request` ran —
//! on error envelopes too, so a 401 or 429 carries CORS and security headers.
//!
//! Each policy is one file holding its config compile, its phases and its unit
//! tests. Canonical order ([`Policy::rank`], `docs/policies.md` says why):
//! security headers → IP rules → CORS → rate limits by client → auth → session
//! origin checks → CSRF →
//! rate limits by principal / quota → header transforms → compression → cache.

pub mod auth;
pub mod cache;
pub mod compress;
pub mod cors;
pub mod csrf;
pub mod headers;
pub mod ip;
mod key;
pub mod ratelimit;
pub mod security;
pub mod session;
pub mod validate;

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use portcullis_config::{Location, PolicyKeys, Toggle};

use crate::body::Body;
use crate::context::RequestCtx;
use crate::error::GatewayError;
use crate::snapshot::Errors;

/// What `on_request` decided.
pub enum Flow {
    Continue,
    /// Answer now; the action does not run.
    Respond(Box<Response<Body>>),
}

pub enum Policy {
    Security(Box<security::SecurityHeaders>),
    Ip(ip::IpRules),
    Cors(Box<cors::Cors>),
    /// Limits keyed by what is known before auth (client IP, headers, cookies, params).
    RateLimitClient(ratelimit::RateLimits),
    Auth(auth::AuthPolicy),
    /// Origin checks of requests a browser session authenticated.
    Session(session::SessionGuard),
    Csrf(csrf::Csrf),
    /// Limits keyed by the principal or API key (after auth).
    RateLimitPrincipal(ratelimit::RateLimits),
    Quota(ratelimit::Quota),
    Headers(Box<headers::HeaderTransforms>),
    Compress(compress::Compression),
    Cache(Box<cache::ResponseCache>),
    /// Requests checked against an OpenAPI document.
    Validate(Box<validate::Validate>),
}

impl Policy {
    /// Position in the canonical order.
    fn rank(&self) -> u8 {
        match self {
            Policy::Security(_) => 5,
            Policy::Ip(_) => 10,
            Policy::Cors(_) => 20,
            Policy::RateLimitClient(_) => 30,
            Policy::Auth(_) => 40,
            Policy::Session(_) => 45,
            Policy::Csrf(_) => 50,
            Policy::RateLimitPrincipal(_) => 55,
            Policy::Quota(_) => 60,
            Policy::Validate(_) => 70,
            Policy::Headers(_) => 80,
            Policy::Compress(_) => 90,
            Policy::Cache(_) => 100,
        }
    }

    pub async fn on_request(
        &self,
        ctx: &mut RequestCtx<'_>,
        req: &mut Request<Incoming>,
    ) -> Result<Flow, GatewayError> {
        match self {
            Policy::Security(_) => Ok(Flow::Continue),
            Policy::Ip(p) => p.on_request(ctx),
            Policy::Cors(p) => p.on_request(ctx, req),
            Policy::RateLimitClient(p) | Policy::RateLimitPrincipal(p) => {
                p.on_request(ctx, req).await
            }
            Policy::Auth(p) => p.on_request(ctx, req).await,
            Policy::Session(p) => p.on_request(ctx, req),
            Policy::Csrf(p) => p.on_request(ctx, req),
            Policy::Quota(p) => p.on_request(ctx).await,
            Policy::Headers(_) => Ok(Flow::Continue),
            Policy::Compress(p) => p.on_request(ctx, req),
            Policy::Cache(p) => p.on_request(ctx, req).await,
            Policy::Validate(p) => p.on_request(ctx, req).await,
        }
    }

    /// Once per upstream attempt, on the request about to be sent.
    pub fn on_upstream_request(&self, ctx: &RequestCtx<'_>, parts: &mut http::request::Parts) {
        if let Policy::Headers(p) = self {
            p.on_upstream_request(ctx, parts);
        }
    }

    pub fn on_response(&self, ctx: &mut RequestCtx<'_>, res: &mut Response<Body>) {
        match self {
            Policy::Security(p) => p.on_response(ctx, res),
            Policy::Ip(_)
            | Policy::Auth(_)
            | Policy::Session(_)
            | Policy::Csrf(_)
            | Policy::Validate(_) => {}
            Policy::Cors(p) => p.on_response(ctx, res),
            Policy::RateLimitClient(p) | Policy::RateLimitPrincipal(p) => p.on_response(ctx, res),
            Policy::Quota(p) => p.on_response(ctx, res),
            Policy::Headers(p) => p.on_response(ctx, res),
            Policy::Compress(p) => p.on_response(ctx, res),
            Policy::Cache(p) => p.on_response(ctx, res),
        }
    }
}

/// A route's policies, in canonical order.
#[derive(Default)]
pub struct Chain(Box<[Policy]>);

impl Chain {
    pub fn new(mut policies: Vec<Policy>) -> Self {
        policies.sort_by_key(Policy::rank);
        Chain(policies.into_boxed_slice())
    }

    pub fn policies(&self) -> &[Policy] {
        &self.0
    }

    /// The route's auth policy, if it has one (for `portcullis routes`).
    pub fn auth(&self) -> Option<&auth::AuthPolicy> {
        self.0.iter().find_map(|p| match p {
            Policy::Auth(a) => Some(a),
            _ => None,
        })
    }

    /// The route's CORS policy (CSRF takes its origins when it lists none).
    pub fn cors(&self) -> Option<&cors::Cors> {
        self.0.iter().find_map(|p| match p {
            Policy::Cors(c) => Some(&**c),
            _ => None,
        })
    }

    /// Whether a policy of the chain changes this request header on its way upstream.
    pub fn touches_request_header(&self, name: &http::HeaderName) -> bool {
        self.0.iter().any(|p| match p {
            Policy::Headers(h) => h.touches_request_header(name),
            _ => false,
        })
    }

    pub fn on_upstream_request(&self, ctx: &RequestCtx<'_>, parts: &mut http::request::Parts) {
        for p in self.0.iter() {
            p.on_upstream_request(ctx, parts);
        }
    }
}

/// State of policies that outlives snapshots: local rate-limit counters, cached
/// responses and their in-flight locks. Kept in [`crate::Shared`].
pub struct Registries {
    pub store: Arc<dyn portcullis_store::Store>,
    pub ratelimit: ratelimit::Registry,
    pub cache: cache::Registry,
    /// OpenAPI documents compiled once per content.
    pub openapi: validate::Documents,
}

impl Registries {
    pub fn new(store: Arc<dyn portcullis_store::Store>) -> Self {
        Registries {
            store,
            ratelimit: ratelimit::Registry::default(),
            cache: cache::Registry::default(),
            openapi: validate::Documents::default(),
        }
    }
}

/// Where a route's policies come from, for compile errors and templates.
pub(crate) struct PolicySite<'a> {
    pub at: Location,
    /// `routes[3]`.
    pub route_field: &'a str,
    pub route: Arc<str>,
    /// The keys the route sets itself (the rest come from `defaults:`).
    pub own: &'a PolicyKeys,
    /// Params the route's path captures.
    pub params: &'a [String],
    pub is_prefix: bool,
    /// Whether the route has an auth policy (cache keys, CSRF).
    pub authenticated: bool,
}

impl PolicySite<'_> {
    /// `routes[3].cors` when the route sets `cors`, else `defaults.cors`.
    pub fn field(&self, key: &str) -> String {
        let own = match key {
            "ip" => self.own.ip.is_some(),
            "cors" => self.own.cors.is_some(),
            "security_headers" => self.own.security_headers.is_some(),
            "csrf" => self.own.csrf.is_some(),
            "rate_limits" => self.own.rate_limits.is_some(),
            "headers" => self.own.headers.is_some(),
            "cache" => self.own.cache.is_some(),
            "compression" => self.own.compression.is_some(),
            "openapi" => self.own.openapi.is_some(),
            _ => true,
        };
        if own {
            format!("{}.{key}", self.route_field)
        } else {
            format!("defaults.{key}")
        }
    }
}

/// Compiles the policies a route's keys (over `defaults:`) turn on.
pub(crate) fn compile(
    keys: &PolicyKeys,
    site: &PolicySite<'_>,
    registries: &Registries,
    errors: &mut Errors<'_>,
) -> Vec<Policy> {
    let mut out = Vec::new();
    if let Some(Toggle::On(c)) = &keys.security_headers {
        if let Some(p) = security::compile(c, site, errors) {
            out.push(Policy::Security(Box::new(p)));
        }
    }
    if let Some(Toggle::On(c)) = &keys.ip {
        if let Some(p) = ip::compile(c, site, errors) {
            out.push(Policy::Ip(p));
        }
    }
    let cors = match &keys.cors {
        Some(Toggle::On(c)) => cors::compile(c, site, errors),
        _ => None,
    };
    if let Some(Toggle::On(c)) = &keys.csrf {
        if let Some(p) = csrf::compile(c, cors.as_ref(), site, errors) {
            out.push(Policy::Csrf(p));
        }
    }
    if let Some(c) = cors {
        out.push(Policy::Cors(Box::new(c)));
    }
    if let Some(Toggle::On(limits)) = &keys.rate_limits {
        let (client, principal) = ratelimit::compile(limits, site, registries, errors);
        if let Some(p) = client {
            out.push(Policy::RateLimitClient(p));
        }
        if let Some(p) = principal {
            out.push(Policy::RateLimitPrincipal(p));
        }
    }
    if let Some(Toggle::On(c)) = &keys.headers {
        if let Some(p) = headers::compile(c, site, errors) {
            out.push(Policy::Headers(Box::new(p)));
        }
    }
    if let Some(Toggle::On(c)) = &keys.compression {
        if let Some(p) = compress::compile(c, site, errors) {
            out.push(Policy::Compress(p));
        }
    }
    if let Some(Toggle::On(c)) = &keys.openapi {
        if let Some(p) = validate::compile(c, site, &registries.openapi, errors) {
            out.push(Policy::Validate(Box::new(p)));
        }
    }
    if let Some(Toggle::On(c)) = &keys.cache {
        if let Some(p) = cache::compile(c, site, registries, errors) {
            out.push(Policy::Cache(Box::new(p)));
        }
    }
    out
}
