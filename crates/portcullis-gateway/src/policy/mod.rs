//! The per-route policy chain: a closed enum run in a canonical order.
//!
//! The executor ([`crate::service`]) runs [`Policy::on_request`] front to back (any
//! policy may answer or fail and stop the chain), then the route's action (which
//! calls [`Policy::on_upstream_request`] once per upstream attempt), then
//! [`Policy::on_response`] back to front for every policy whose `on_request` ran —
//! on error envelopes too, so a 401 or 429 carries CORS and security headers.
//!
//! Canonical order (see `docs/policies.md`): auth → quota.

pub mod auth;
pub mod ratelimit;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::Body;
use crate::context::RequestCtx;
use crate::error::GatewayError;

/// What `on_request` decided.
pub enum Flow {
    Continue,
    /// Answer now; the action does not run.
    Respond(Box<Response<Body>>),
}

pub enum Policy {
    Auth(auth::AuthPolicy),
    Quota(ratelimit::Quota),
}

impl Policy {
    pub async fn on_request(
        &self,
        ctx: &mut RequestCtx<'_>,
        req: &mut Request<Incoming>,
    ) -> Result<Flow, GatewayError> {
        match self {
            Policy::Auth(p) => p.on_request(ctx, req).await,
            Policy::Quota(p) => p.on_request(ctx).await,
        }
    }

    /// Once per upstream attempt, on the request about to be sent.
    pub fn on_upstream_request(&self, _ctx: &RequestCtx<'_>, _parts: &mut http::request::Parts) {
        match self {
            Policy::Auth(_) | Policy::Quota(_) => {}
        }
    }

    pub fn on_response(&self, ctx: &mut RequestCtx<'_>, res: &mut Response<Body>) {
        match self {
            Policy::Auth(_) => {}
            Policy::Quota(p) => p.on_response(ctx, res),
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

    pub fn on_upstream_request(&self, ctx: &RequestCtx<'_>, parts: &mut http::request::Parts) {
        for p in self.0.iter() {
            p.on_upstream_request(ctx, parts);
        }
    }
}

impl Policy {
    /// Position in the canonical order.
    fn rank(&self) -> u8 {
        match self {
            Policy::Auth(_) => 40,
            Policy::Quota(_) => 60,
        }
    }
}
