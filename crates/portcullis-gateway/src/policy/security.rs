//! helmet-style security headers on every response, error envelopes included.

use http::{Request, Response};
use hyper::body::Incoming;

use super::{Flow, PolicySite};
use crate::body::Body;
use crate::context::RequestCtx;
use crate::error::GatewayError;
use crate::snapshot::Errors;

/// Not built yet: compiles to nothing.
pub struct SecurityHeaders;

pub(crate) fn compile(
    _config: &portcullis_config::SecurityHeadersConfig,
    _site: &PolicySite<'_>,
    _errors: &mut Errors<'_>,
) -> Option<SecurityHeaders> {
    None
}

impl SecurityHeaders {
    pub(super) fn on_request(
        &self,
        _ctx: &mut RequestCtx<'_>,
        _req: &mut Request<Incoming>,
    ) -> Result<Flow, GatewayError> {
        Ok(Flow::Continue)
    }

    pub(super) fn on_response(&self, _ctx: &mut RequestCtx<'_>, _res: &mut Response<Body>) {}
}
