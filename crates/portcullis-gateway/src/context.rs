//! [`RequestCtx`]: what one request carries through the policy chain and its action.
//! Typed fields only — no `Extensions`/`Any` maps on the hot path.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderValue, Method};

use crate::auth::Identity;
use crate::service::ConnInfo;
use crate::snapshot::{Route, Snapshot};
use crate::telemetry::AccessRecord;
use crate::Shared;

pub struct RequestCtx<'a> {
    pub shared: &'a Arc<Shared>,
    pub snapshot: &'a Snapshot,
    pub conn: &'a ConnInfo,
    pub request_id: &'a HeaderValue,
    /// The client's address (X-Forwarded-For honoured from trusted proxies only).
    pub client_ip: IpAddr,
    pub method: Method,
    /// The request's one canonical authority ([`crate::authority`]).
    pub authority: Option<HeaderValue>,
    /// The `Upgrade` protocol asked for, read before hop-by-hop removal.
    pub upgrade: Option<HeaderValue>,
    /// The client's `Origin`, when it sent one (CORS, CSRF).
    pub origin: Option<HeaderValue>,
    /// The normalised path.
    pub path: &'a str,
    /// Whether the path or query changed (else the original bytes are forwarded).
    pub path_changed: bool,
    pub query: Option<Cow<'a, str>>,
    pub route: &'a Route,
    pub params: &'a [(&'a str, &'a str)],
    pub rest: Option<&'a str>,
    /// Set by the auth policy.
    pub identity: Option<Identity>,
    /// Rate-limit and quota state for the response headers ([`crate::policy::ratelimit`]).
    pub limits: crate::policy::ratelimit::LimitState,
    /// The cache policy's lookup, for storing the response ([`crate::policy::cache`]).
    pub cache: crate::policy::cache::CacheState,
    /// What the client accepts, for the response ([`crate::policy::compress`]).
    pub compress: crate::policy::compress::CompressState,
    /// Whether CORS answered or matched this request's origin ([`crate::policy::cors`]).
    pub cors: crate::policy::cors::CorsState,
    /// The request body, when a policy already read it (OpenAPI validation): the
    /// action sends these bytes instead of the client's stream.
    pub body: Option<bytes::Bytes>,
    pub record: &'a mut AccessRecord,
}

impl RequestCtx<'_> {
    pub fn principal(&self) -> Option<&str> {
        self.identity.as_ref().map(|i| i.principal.as_str())
    }
}
