//! CORS: preflight answered by the gateway, `Vary: Origin`.

use http::{Request, Response};
use hyper::body::Incoming;

use super::{Flow, PolicySite};
use crate::body::Body;
use crate::context::RequestCtx;
use crate::error::GatewayError;
use crate::snapshot::Errors;

/// Per-request state. (Not built yet.)
#[derive(Default)]
pub struct CorsState;

/// Not built yet: compiles to nothing.
pub struct Cors;

pub(crate) fn compile(
    _config: &portcullis_config::CorsConfig,
    _site: &PolicySite<'_>,
    _errors: &mut Errors<'_>,
) -> Option<Cors> {
    None
}

impl Cors {
    pub(super) fn on_request(
        &self,
        _ctx: &mut RequestCtx<'_>,
        _req: &mut Request<Incoming>,
    ) -> Result<Flow, GatewayError> {
        Ok(Flow::Continue)
    }

    pub(super) fn on_response(&self, _ctx: &mut RequestCtx<'_>, _res: &mut Response<Body>) {}
}
