//! CSRF for cookie-authenticated requests: an unsafe method (anything but GET,
//! HEAD, OPTIONS, TRACE) needs an `Origin` — or, when a browser sent none, a
//! `Referer` — that is the gateway's own origin or among the allowed origins;
//! otherwise 403 `CSRF_REJECTED`.
//!
//! It applies when the request's credential came from a cookie, or when it carries
//! cookies and no credential was verified (an anonymous or public route still sees
//! ambient cookies). A request authenticated by a bearer token, header or query
//! credential is not forgeable by a third-party page and passes.

use http::header::{self, HeaderValue};
use http::{Method, Request};
use hyper::body::Incoming;
use portcullis_config::CsrfConfig;

use super::cors::{Cors, Origin, Origins};
use super::{Flow, PolicySite};
use crate::auth::CredentialSource;
use crate::context::RequestCtx;
use crate::error::{ErrorCode, GatewayError};
use crate::snapshot::Errors;
use crate::telemetry::RouteLabels;

pub struct Csrf {
    origins: Origins,
}

pub(crate) fn compile(
    c: &CsrfConfig,
    cors: Option<&Cors>,
    site: &PolicySite<'_>,
    errors: &mut Errors<'_>,
) -> Option<Csrf> {
    let field = format!("{}.allowed_origins", site.field("csrf"));
    let before = errors.count();
    let mut origins = Origins::compile(&c.allowed_origins, site.at, &field, errors);
    if origins.is_empty() {
        if let Some(cors) = cors {
            origins = cors.origins.clone();
        }
    }
    if origins.allows_any() {
        errors.push(
            site.at,
            field,
            "`*` would let any site send unsafe requests; list the origins",
        );
    }
    (errors.count() == before).then_some(Csrf { origins })
}

impl Csrf {
    pub(super) fn on_request(
        &self,
        ctx: &mut RequestCtx<'_>,
        req: &mut Request<Incoming>,
    ) -> Result<Flow, GatewayError> {
        if matches!(
            *req.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        ) {
            return Ok(Flow::Continue);
        }
        let applies = match &ctx.identity {
            Some(identity) => matches!(identity.source, CredentialSource::Cookie(_)),
            None => req.headers().contains_key(header::COOKIE),
        };
        if !applies || self.admits(ctx, req.headers()) {
            return Ok(Flow::Continue);
        }
        ctx.shared
            .metrics
            .csrf_rejected
            .get_or_create(&RouteLabels {
                route: ctx.route.name.clone(),
            })
            .inc();
        Err(GatewayError::new(
            ErrorCode::CsrfRejected,
            "cross-site request refused: Origin is missing or not allowed",
        ))
    }

    fn admits(&self, ctx: &RequestCtx<'_>, headers: &http::HeaderMap) -> bool {
        let origin = match headers.get(header::ORIGIN) {
            Some(v) if v.as_bytes().eq_ignore_ascii_case(b"null") => {
                return self.origins.allows(b"null")
            }
            Some(v) => v.to_str().ok().and_then(Origin::parse),
            None => headers
                .get(header::REFERER)
                .and_then(|v| v.to_str().ok())
                .and_then(Origin::of_url),
        };
        let Some(origin) = origin else {
            return false;
        };
        same_origin(&origin, ctx.authority.as_ref(), ctx.conn.scheme)
            || self.origins.allows_origin(&origin)
    }
}

/// The request's own origin: the host and port it was sent to, over the scheme it
/// arrived on.
fn same_origin(o: &Origin, authority: Option<&HeaderValue>, scheme: &str) -> bool {
    let Some(authority) = authority.and_then(|a| a.to_str().ok()) else {
        return false;
    };
    Origin::parse(&format!("{scheme}://{authority}")).is_some_and(|own| own == *o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_compares_scheme_host_port() {
        let own = HeaderValue::from_static("gw.example.com:8443");
        let o = |s: &str| Origin::parse(s).unwrap();
        assert!(same_origin(
            &o("https://gw.example.com:8443"),
            Some(&own),
            "https"
        ));
        assert!(!same_origin(
            &o("http://gw.example.com:8443"),
            Some(&own),
            "https"
        ));
        assert!(!same_origin(
            &o("https://gw.example.com"),
            Some(&own),
            "https"
        ));
        let plain = HeaderValue::from_static("gw.example.com");
        assert!(same_origin(
            &o("https://gw.example.com"),
            Some(&plain),
            "https"
        ));
        assert!(!same_origin(&o("https://gw.example.com"), None, "https"));
    }
}
