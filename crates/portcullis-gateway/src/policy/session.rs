//! Guards of browser-session routes (the `oidc` authenticator), added to every
//! route that accepts its cookie, right after auth:
//!
//! - a WebSocket upgrade authenticated by the session cookie needs an `Origin`
//!   that is the application's (its `public_url` or an allowed origin): browsers
//!   apply no CORS to WebSockets, so this is the only
//!   guard against cross-site WebSocket hijacking → else 403 `ORIGIN_REJECTED`;
//! - an unsafe request (not GET/HEAD/OPTIONS/TRACE) authenticated by the cookie
//!   needs such an `Origin` (or `Referer`) too → else 403 `CSRF_REJECTED`. This is
//!   on whatever the route's `csrf` says: a session cookie is always a CSRF risk.
//!
//! Requests authenticated otherwise (a bearer token) are not affected.

use std::sync::Arc;

use http::{header, HeaderMap, Method, Request};
use hyper::body::Incoming;
use portcullis_session::redirect::Origin;

use super::Flow;
use crate::action::oidc::OidcService;
use crate::auth::CredentialSource;
use crate::context::RequestCtx;
use crate::error::{ErrorCode, GatewayError};

pub struct SessionGuard {
    service: Arc<OidcService>,
}

impl SessionGuard {
    pub fn new(service: Arc<OidcService>) -> Self {
        SessionGuard { service }
    }

    pub(super) fn on_request(
        &self,
        ctx: &mut RequestCtx<'_>,
        req: &mut Request<Incoming>,
    ) -> Result<Flow, GatewayError> {
        let by_cookie = ctx.identity.as_ref().is_some_and(
            |i| matches!(&i.source, CredentialSource::Cookie(n) if n == self.service.cookie_name()),
        );
        if !by_cookie {
            return Ok(Flow::Continue);
        }
        let websocket = ctx.upgrade.is_some();
        let safe = matches!(
            *req.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        );
        if !websocket && safe {
            return Ok(Flow::Continue);
        }
        // A WebSocket handshake is judged by its Origin alone (browsers always send
        // it); a plain request may fall back to its Referer. Only `public_url` and
        // the allowed origins count: the request's own Host is the client's to
        // choose (any name routed to the gateway would pass).
        let origin = request_origin(req.headers(), !websocket);
        let allowed = origin
            .as_ref()
            .is_some_and(|o| self.service.allows_origin(o));
        if allowed {
            return Ok(Flow::Continue);
        }
        if websocket {
            Err(GatewayError::new(
                ErrorCode::OriginRejected,
                "WebSocket from an origin this application does not allow",
            ))
        } else {
            Err(GatewayError::new(
                ErrorCode::CsrfRejected,
                "cross-site request refused: Origin is missing or not allowed",
            ))
        }
    }
}

/// `Origin` (never `null`), else — when allowed — the origin of `Referer`.
fn request_origin(headers: &HeaderMap, referer: bool) -> Option<Origin> {
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        Some("null") => None,
        Some(o) => Origin::parse(o).ok(),
        None if referer => headers
            .get(header::REFERER)
            .and_then(|v| v.to_str().ok())
            .and_then(Origin::of_url),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn origin_then_referer_never_null() {
        let mut h = HeaderMap::new();
        h.insert(
            header::REFERER,
            HeaderValue::from_static("https://a.test/x"),
        );
        assert_eq!(
            request_origin(&h, true).map(|o| o.url()).as_deref(),
            Some("https://a.test")
        );
        assert!(
            request_origin(&h, false).is_none(),
            "WebSockets: Origin only"
        );
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(request_origin(&h, true).is_none());
        h.insert(header::ORIGIN, HeaderValue::from_static("https://b.test"));
        assert_eq!(
            request_origin(&h, true).map(|o| o.url()).as_deref(),
            Some("https://b.test")
        );
    }
}
