//! The API-key quota (`auth.quota: true`): requests counted against the quota
//! stored with the key a request authenticated with; the store counts atomically,
//! so instances sharing a Redis never admit more than the limit together.

use http::header::{self, HeaderValue};
use http::Response;
use portcullis_store::WindowCount;

use super::super::Flow;
use super::{RATELIMIT_LIMIT, RATELIMIT_REMAINING, RATELIMIT_RESET};
use crate::body::Body;
use crate::context::RequestCtx;
use crate::error::{ErrorCode, GatewayError};

/// The API-key quota of a route.
pub struct Quota;

impl Quota {
    pub(in crate::policy) async fn on_request(
        &self,
        ctx: &mut RequestCtx<'_>,
    ) -> Result<Flow, GatewayError> {
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

    pub(in crate::policy) fn on_response(
        &self,
        ctx: &mut RequestCtx<'_>,
        res: &mut Response<Body>,
    ) {
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
