//! Request and response header transforms.

use http::{Request, Response};
use hyper::body::Incoming;

use super::{Flow, PolicySite};
use crate::body::Body;
use crate::context::RequestCtx;
use crate::error::GatewayError;
use crate::snapshot::Errors;

/// Not built yet: compiles to nothing.
pub struct HeaderTransforms;

pub(crate) fn compile(
    _config: &portcullis_config::HeadersConfig,
    _site: &PolicySite<'_>,
    _errors: &mut Errors<'_>,
) -> Option<HeaderTransforms> {
    None
}

impl HeaderTransforms {
    pub(super) fn on_request(
        &self,
        _ctx: &mut RequestCtx<'_>,
        _req: &mut Request<Incoming>,
    ) -> Result<Flow, GatewayError> {
        Ok(Flow::Continue)
    }

    pub(super) fn on_upstream_request(
        &self,
        _ctx: &RequestCtx<'_>,
        _parts: &mut http::request::Parts,
    ) {
    }

    pub(super) fn on_response(&self, _ctx: &mut RequestCtx<'_>, _res: &mut Response<Body>) {}
}
