//! Rate limits and API-key quotas.
//!
//! The quota counts requests against the quota stored with the API key a request
//! authenticated with (`auth.quota: true` on the route); the store counts atomically,
//! so instances sharing a Redis never admit more than the limit together.

use http::header::{self, HeaderName, HeaderValue};
use http::Response;
use portcullis_store::WindowCount;

use super::Flow;
use crate::body::Body;
use crate::context::RequestCtx;
use crate::error::{ErrorCode, GatewayError};

static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Local counters that outlive snapshots. (Not built yet.)
#[derive(Default)]
pub struct Registry;

/// A route's rate limits of one phase. (Not built yet.)
pub struct RateLimits;

/// The route's limits, split into those keyed before auth and those after.
pub(crate) fn compile(
    _limits: &[portcullis_config::RateLimitConfig],
    _site: &super::PolicySite<'_>,
    _registries: &super::Registries,
    _errors: &mut crate::snapshot::Errors<'_>,
) -> (Option<RateLimits>, Option<RateLimits>) {
    (None, None)
}

impl RateLimits {
    pub(super) async fn on_request(
        &self,
        _ctx: &mut RequestCtx<'_>,
        _req: &mut http::Request<hyper::body::Incoming>,
    ) -> Result<Flow, GatewayError> {
        Ok(Flow::Continue)
    }

    pub(super) fn on_response(&self, _ctx: &mut RequestCtx<'_>, _res: &mut Response<Body>) {}
}

/// What the limits of this request decided, for its response headers.
#[derive(Default)]
pub struct LimitState {
    quota: Option<WindowCount>,
}

/// The API-key quota of a route.
pub struct Quota;

impl Quota {
    pub(super) async fn on_request(&self, ctx: &mut RequestCtx<'_>) -> Result<Flow, GatewayError> {
        let Some(key) = ctx.identity.as_ref().and_then(|i| i.api_key.as_ref()) else {
            return Ok(Flow::Continue);
        };
        if key.record.quota.is_none() {
            return Ok(Flow::Continue);
        }
        let window = match key.keys.consume_quota(&key.record, 1).await {
            Ok(w) => w,
            Err(e) => {
                if key.fail_open {
                    tracing::warn!(error = %e, key = %key.record.id, "quota store unavailable; letting the request through uncounted");
                    return Ok(Flow::Continue);
                }
                tracing::warn!(error = %e, key = %key.record.id, "quota store unavailable; refusing the request");
                return Err(GatewayError::server(ErrorCode::ServiceUnavailable));
            }
        };
        ctx.limits.quota = Some(window);
        if window.allowed {
            return Ok(Flow::Continue);
        }
        Err(GatewayError::new(
            ErrorCode::QuotaExceeded,
            "the API key's quota is used up for this window",
        )
        .with_header(
            header::RETRY_AFTER,
            HeaderValue::from(reset_secs(&window).max(1)),
        ))
    }

    pub(super) fn on_response(&self, ctx: &mut RequestCtx<'_>, res: &mut Response<Body>) {
        let Some(window) = ctx.limits.quota else {
            return;
        };
        let headers = res.headers_mut();
        headers.insert(RATELIMIT_LIMIT.clone(), HeaderValue::from(window.limit));
        headers.insert(
            RATELIMIT_REMAINING.clone(),
            HeaderValue::from(window.limit.saturating_sub(window.count)),
        );
        headers.insert(
            RATELIMIT_RESET.clone(),
            HeaderValue::from(reset_secs(&window)),
        );
    }
}

fn reset_secs(window: &WindowCount) -> u64 {
    window.reset_after.as_secs_f64().ceil() as u64
}
