//! Response compression (gzip, br, zstd), streaming.

use http::{Request, Response};
use hyper::body::Incoming;

use super::{Flow, PolicySite};
use crate::body::Body;
use crate::context::RequestCtx;
use crate::error::GatewayError;
use crate::snapshot::Errors;

/// Per-request state. (Not built yet.)
#[derive(Default)]
pub struct CompressState;

/// Not built yet: compiles to nothing.
pub struct Compression;

pub(crate) fn compile(
    _config: &portcullis_config::CompressionConfig,
    _site: &PolicySite<'_>,
    _errors: &mut Errors<'_>,
) -> Option<Compression> {
    None
}

impl Compression {
    pub(super) fn on_request(
        &self,
        _ctx: &mut RequestCtx<'_>,
        _req: &mut Request<Incoming>,
    ) -> Result<Flow, GatewayError> {
        Ok(Flow::Continue)
    }

    pub(super) fn on_response(&self, _ctx: &mut RequestCtx<'_>, _res: &mut Response<Body>) {}
}
