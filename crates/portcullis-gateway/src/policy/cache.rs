//! Response cache (GET/HEAD), keyed per principal unless `shared`.

use http::{Request, Response};
use hyper::body::Incoming;

use super::{Flow, PolicySite};
use crate::body::Body;
use crate::context::RequestCtx;
use crate::error::GatewayError;
use crate::snapshot::Errors;

/// Cached responses and in-flight locks that outlive snapshots. (Not built yet.)
#[derive(Default)]
pub struct Registry;

/// Per-request state. (Not built yet.)
#[derive(Default)]
pub struct CacheState;

/// Not built yet: compiles to nothing.
pub struct ResponseCache;

pub(crate) fn compile(
    _config: &portcullis_config::CacheConfig,
    _site: &PolicySite<'_>,
    _registries: &super::Registries,
    _errors: &mut Errors<'_>,
) -> Option<ResponseCache> {
    None
}

impl ResponseCache {
    pub(super) async fn on_request(
        &self,
        _ctx: &mut RequestCtx<'_>,
        _req: &mut Request<Incoming>,
    ) -> Result<Flow, GatewayError> {
        Ok(Flow::Continue)
    }

    pub(super) fn on_response(&self, _ctx: &mut RequestCtx<'_>, _res: &mut Response<Body>) {}
}
