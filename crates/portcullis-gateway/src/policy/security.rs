//! helmet-style security headers on every response of a route, error envelopes
//! included (the policy is first in the chain, so its `on_response` runs last).
//!
//! An upstream's own value wins unless `force: true`; `""` removes a preset header;
//! HSTS only goes out on connections that arrived over TLS; `remove` drops upstream
//! headers that advertise internals (`X-Powered-By`); `server` sets or drops `Server`.

use http::header::{self, HeaderName, HeaderValue};
use http::Response;
use portcullis_config::SecurityHeadersConfig;

use super::PolicySite;
use crate::body::Body;
use crate::context::RequestCtx;
use crate::snapshot::Errors;

pub struct SecurityHeaders {
    set: Vec<(HeaderName, HeaderValue)>,
    hsts: Option<HeaderValue>,
    remove: Vec<HeaderName>,
    /// `Some(None)`: drop `Server`; `Some(Some(v))`: set it.
    server: Option<Option<HeaderValue>>,
    force: bool,
}

pub(crate) fn compile(
    c: &SecurityHeadersConfig,
    site: &PolicySite<'_>,
    errors: &mut Errors<'_>,
) -> Option<SecurityHeaders> {
    compile_at(c, site.at, site.field("security_headers"), errors)
}

/// The defaults' headers, for responses made before a route is known. Errors are
/// reported when routes compile; this one stays quiet.
pub(crate) fn compile_defaults(
    c: &SecurityHeadersConfig,
    errors: &mut Errors<'_>,
) -> Option<SecurityHeaders> {
    let mut scratch = Errors::new(errors.file);
    compile_at(
        c,
        portcullis_config::Location::UNKNOWN,
        "defaults.security_headers".to_owned(),
        &mut scratch,
    )
}

fn compile_at(
    c: &SecurityHeadersConfig,
    at: portcullis_config::Location,
    field: String,
    errors: &mut Errors<'_>,
) -> Option<SecurityHeaders> {
    let before = errors.count();
    let value = |key: &str, v: &str, errors: &mut Errors<'_>| -> Option<HeaderValue> {
        if v.is_empty() {
            return None;
        }
        let parsed = HeaderValue::from_str(v).ok();
        if parsed.is_none() {
            errors.push(at, format!("{field}.{key}"), "not a valid header value");
        }
        parsed
    };
    let mut set = Vec::new();
    for (name, key, v) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "content_security_policy",
            &c.content_security_policy,
        ),
        (
            header::X_FRAME_OPTIONS,
            "x_frame_options",
            &c.x_frame_options,
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            "x_content_type_options",
            &c.x_content_type_options,
        ),
        (
            header::REFERRER_POLICY,
            "referrer_policy",
            &c.referrer_policy,
        ),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            "cross_origin_opener_policy",
            &c.cross_origin_opener_policy,
        ),
        (
            HeaderName::from_static("cross-origin-resource-policy"),
            "cross_origin_resource_policy",
            &c.cross_origin_resource_policy,
        ),
    ] {
        if let Some(v) = value(key, v.as_str(), errors) {
            set.push((name, v));
        }
    }
    let hsts = value(
        "strict_transport_security",
        c.strict_transport_security.as_str(),
        errors,
    );
    let server = c
        .server
        .as_ref()
        .map(|s| value("server", s.as_str(), errors));
    let mut extra = Vec::new();
    for (name, v) in &c.extra {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) => {
                if let Some(v) = value(&format!("extra.{name}"), v.as_str(), errors) {
                    extra.push((n, v));
                }
            }
            Err(_) => {
                errors.push(
                    at,
                    format!("{field}.extra"),
                    format!("{name:?} is not a header name"),
                );
            }
        }
    }
    set.extend(extra);
    let mut remove = Vec::new();
    for (i, name) in c.remove.iter().enumerate() {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) => remove.push(n),
            Err(_) => {
                errors.push(
                    at,
                    format!("{field}.remove[{i}]"),
                    format!("{:?} is not a header name", name.as_str()),
                );
            }
        }
    }
    (errors.count() == before).then_some(SecurityHeaders {
        set,
        hsts,
        remove,
        server,
        force: c.force.0,
    })
}

impl SecurityHeaders {
    pub(super) fn on_response(&self, ctx: &mut RequestCtx<'_>, res: &mut Response<Body>) {
        self.apply(ctx.conn.scheme, res.headers_mut());
    }

    /// `scheme` is the one the client's connection used (HSTS only over TLS).
    pub fn apply(&self, scheme: &str, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            if self.force || !headers.contains_key(name) {
                headers.insert(name.clone(), value.clone());
            }
        }
        if let Some(hsts) = &self.hsts {
            if scheme == "https"
                && (self.force || !headers.contains_key(header::STRICT_TRANSPORT_SECURITY))
            {
                headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
            }
        }
        match &self.server {
            Some(Some(v)) => {
                headers.insert(header::SERVER, v.clone());
            }
            Some(None) => {
                headers.remove(header::SERVER);
            }
            None => {}
        }
    }
}
