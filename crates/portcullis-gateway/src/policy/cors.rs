//! CORS, answered by the gateway: preflights (`OPTIONS` with
//! `Access-Control-Request-Method`) get a 204 here and never reach the upstream or
//! the auth policy; other responses get the `Access-Control-*` headers when the
//! origin is allowed. A disallowed origin gets no CORS headers and an otherwise
//! normal response (the browser enforces the rest). `Vary: Origin` is set on every
//! response of a route with CORS, so caches keep origins apart. Upstream
//! `Access-Control-*` headers are dropped: the gateway owns CORS on such a route.
//!
//! Origins are compared after parsing (scheme, host, port — default ports filled
//! in), never as strings; `https://*.example.com` matches subdomains at any depth
//! but not `example.com`; `null` (sandboxed frames, `file:`) only when listed.

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use portcullis_config::{CorsConfig, Text};

use super::{Flow, PolicySite};
use crate::body::Body;
use crate::context::RequestCtx;
use crate::error::GatewayError;
use crate::snapshot::Errors;

/// Per-request state: the origin to echo when it is allowed.
#[derive(Default)]
pub struct CorsState {
    allowed: Option<HeaderValue>,
    /// A preflight this policy answered (its headers are already set).
    answered: bool,
}

/// A parsed origin: `scheme://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

impl Origin {
    /// Parses an `Origin` header value or an allowlist entry (lower-cased; the
    /// default port filled in). A path, userinfo, query or anything else is refused.
    pub fn parse(s: &str) -> Option<Origin> {
        let (scheme, rest) = s.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme.is_empty()
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        {
            return None;
        }
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
            return None;
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (addr, after) = v6.split_once(']')?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':')?),
            };
            (format!("[{}]", addr.to_ascii_lowercase()), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_ascii_lowercase(), Some(p)),
                None => (rest.to_ascii_lowercase(), None),
            }
        };
        if host.is_empty() || host.contains(':') && !host.starts_with('[') {
            return None;
        }
        let port = match port {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
            Some(_) => return None,
            None => match scheme.as_str() {
                "http" | "ws" => 80,
                "https" | "wss" => 443,
                _ => 0,
            },
        };
        Some(Origin { scheme, host, port })
    }

    /// As a browser sends it: the default port of the scheme left out.
    fn serialized(&self) -> String {
        let default = matches!(
            (self.scheme.as_str(), self.port),
            ("http" | "ws", 80) | ("https" | "wss", 443)
        );
        if default {
            format!("{}://{}", self.scheme, self.host)
        } else {
            format!("{}://{}:{}", self.scheme, self.host, self.port)
        }
    }

    /// The origin of a URL (`Referer`): scheme, host and port, path dropped.
    pub fn of_url(url: &str) -> Option<Origin> {
        let (scheme, rest) = url.split_once("://")?;
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        Origin::parse(&format!("{scheme}://{}", &rest[..end]))
    }
}

/// An allowlist of origins.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    any: bool,
    null: bool,
    exact: Vec<Origin>,
    /// `exact` serialised as browsers send them (`https://a.com`, no default
    /// port): a byte comparison answers the common case without parsing.
    exact_raw: Vec<String>,
    /// `https://*.example.com`: scheme, the suffix `.example.com`, port.
    wildcard: Vec<(String, String, u16)>,
}

impl Origins {
    /// Entries may hold comma lists (`${ALLOWED_ORIGINS}`); empty entries are skipped.
    pub(crate) fn compile(
        list: &[Text],
        at: portcullis_config::Location,
        field: &str,
        errors: &mut Errors<'_>,
    ) -> Origins {
        let mut out = Origins::default();
        for (i, entry) in list.iter().enumerate() {
            let entries = entry.split(',').map(str::trim).filter(|s| !s.is_empty());
            // A listed origin may end in `/`; an `Origin` header never does.
            for raw in entries.map(|s| s.strip_suffix('/').unwrap_or(s)) {
                if raw == "*" {
                    out.any = true;
                } else if raw.eq_ignore_ascii_case("null") {
                    out.null = true;
                } else if let Some((scheme, rest)) = raw.split_once("://*.") {
                    match Origin::parse(&format!("{scheme}://{rest}")) {
                        Some(o) => out
                            .wildcard
                            .push((o.scheme, format!(".{}", o.host), o.port)),
                        None => errors.push(
                            at,
                            format!("{field}[{i}]"),
                            format!("{raw:?} is not an origin (scheme://host[:port])"),
                        ),
                    }
                } else {
                    match Origin::parse(raw) {
                        Some(o) if !o.host.contains('*') => {
                            out.exact_raw.push(o.serialized());
                            out.exact.push(o);
                        }
                        _ => errors.push(
                            at,
                            format!("{field}[{i}]"),
                            format!("{raw:?} is not an origin (scheme://host[:port])"),
                        ),
                    }
                }
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        !self.any && !self.null && self.exact.is_empty() && self.wildcard.is_empty()
    }

    pub fn allows_any(&self) -> bool {
        self.any
    }

    /// Whether the raw `Origin` value is allowed.
    pub fn allows(&self, value: &[u8]) -> bool {
        if value.eq_ignore_ascii_case(b"null") {
            return self.null;
        }
        if self
            .exact_raw
            .iter()
            .any(|e| e.as_bytes().eq_ignore_ascii_case(value))
        {
            return true;
        }
        let Some(origin) = std::str::from_utf8(value).ok().and_then(Origin::parse) else {
            return false;
        };
        self.allows_origin(&origin)
    }

    pub fn allows_origin(&self, o: &Origin) -> bool {
        self.any
            || self.exact.iter().any(|e| e == o)
            || self.wildcard.iter().any(|(scheme, suffix, port)| {
                *scheme == o.scheme
                    && *port == o.port
                    && o.host.len() > suffix.len()
                    && o.host.ends_with(suffix.as_str())
            })
    }
}

pub struct Cors {
    pub origins: Origins,
    credentials: bool,
    methods: HeaderValue,
    /// `None`: allow what the preflight asks for.
    headers: Option<HeaderValue>,
    exposed: Option<HeaderValue>,
    max_age: HeaderValue,
}

pub(crate) fn compile(
    c: &CorsConfig,
    site: &PolicySite<'_>,
    errors: &mut Errors<'_>,
) -> Option<Cors> {
    let field = site.field("cors");
    let before = errors.count();
    let origins = Origins::compile(
        &c.allowed_origins,
        site.at,
        &format!("{field}.allowed_origins"),
        errors,
    );
    if origins.any && c.allow_credentials.0 {
        errors.push(
            site.at,
            format!("{field}.allowed_origins"),
            "`*` cannot be combined with `allow_credentials` (browsers refuse it; list the origins)",
        );
    }
    let mut methods = Vec::new();
    for (i, m) in c.allowed_methods.iter().enumerate() {
        let upper = m.trim().to_ascii_uppercase();
        match Method::from_bytes(upper.as_bytes()) {
            Ok(_) if !upper.is_empty() => methods.push(upper),
            _ => errors.push(
                site.at,
                format!("{field}.allowed_methods[{i}]"),
                format!("{:?} is not an HTTP method", m.as_str()),
            ),
        }
    }
    let names = |key: &str, list: &[Text], errors: &mut Errors<'_>| -> Option<HeaderValue> {
        let mut out = Vec::new();
        for (i, h) in list.iter().enumerate() {
            match HeaderName::from_bytes(h.trim().as_bytes()) {
                Ok(n) => out.push(n.as_str().to_owned()),
                Err(_) => errors.push(
                    site.at,
                    format!("{field}.{key}[{i}]"),
                    format!("{:?} is not a header name", h.as_str()),
                ),
            }
        }
        (!out.is_empty())
            .then(|| HeaderValue::from_str(&out.join(", ")).ok())
            .flatten()
    };
    let headers = names("allowed_headers", &c.allowed_headers, errors);
    let exposed = names("exposed_headers", &c.exposed_headers, errors);
    if errors.count() != before {
        return None;
    }
    Some(Cors {
        origins,
        credentials: c.allow_credentials.0,
        methods: HeaderValue::from_str(&methods.join(", ")).ok()?,
        headers,
        exposed,
        max_age: HeaderValue::from(c.max_age.get().as_secs()),
    })
}

static VARY_PREFLIGHT: HeaderValue = HeaderValue::from_static(
    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
);

impl Cors {
    pub(super) fn on_request(
        &self,
        ctx: &mut RequestCtx<'_>,
        req: &mut Request<Incoming>,
    ) -> Result<Flow, GatewayError> {
        let Some(origin) = &ctx.origin else {
            return Ok(Flow::Continue);
        };
        if self.origins.allows(origin.as_bytes()) {
            ctx.cors.allowed = Some(if self.origins.any && !self.credentials {
                HeaderValue::from_static("*")
            } else {
                origin.clone()
            });
        }
        let preflight = req.method() == Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if !preflight {
            return Ok(Flow::Continue);
        }
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::NO_CONTENT;
        let h = res.headers_mut();
        h.insert(header::VARY, VARY_PREFLIGHT.clone());
        if let Some(allowed) = &ctx.cors.allowed {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed.clone());
            if self.credentials {
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
            let asked = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS);
            let allow_headers = match (&self.headers, asked) {
                (Some(list), _) => Some(list.clone()),
                // Reflected only when it is a plain list of header names.
                (None, Some(v)) if is_name_list(v.as_bytes()) => Some(v.clone()),
                _ => None,
            };
            if let Some(v) = allow_headers {
                h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
            }
            h.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        }
        ctx.cors.answered = true;
        Ok(Flow::Respond(Box::new(res)))
    }

    pub(super) fn on_response(&self, ctx: &mut RequestCtx<'_>, res: &mut Response<Body>) {
        if ctx.cors.answered {
            return;
        }
        let h = res.headers_mut();
        for name in [
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            header::ACCESS_CONTROL_ALLOW_METHODS,
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            header::ACCESS_CONTROL_MAX_AGE,
        ] {
            h.remove(name);
        }
        add_vary_origin(h);
        let Some(allowed) = ctx.cors.allowed.take() else {
            return;
        };
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
        if self.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(exposed) = &self.exposed {
            h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, exposed.clone());
        }
    }
}

/// Appends `Origin` to `Vary` unless it is there (or `*`).
fn add_vary_origin(h: &mut http::HeaderMap) {
    let present = h.get_all(header::VARY).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim() == "*" || t.trim().eq_ignore_ascii_case("origin"))
        })
    });
    if !present {
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

fn is_name_list(v: &[u8]) -> bool {
    v.len() <= 1024
        && v.split(|b| *b == b',').all(|n| {
            let n = n.trim_ascii();
            !n.is_empty() && HeaderName::from_bytes(n).is_ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(list: &[&str]) -> Origins {
        let path = std::path::Path::new("t.yaml");
        let mut errors = Errors::new(path);
        let list: Vec<Text> = list.iter().map(|s| Text::from(*s)).collect();
        let o = Origins::compile(
            &list,
            portcullis_config::Location::UNKNOWN,
            "o",
            &mut errors,
        );
        assert_eq!(errors.count(), 0);
        o
    }

    #[test]
    fn origins_compare_parsed() {
        let o = origins(&[
            "https://app.example.com",
            "http://localhost:3000,https://*.example.org",
        ]);
        assert!(o.allows(b"https://app.example.com"));
        assert!(o.allows(b"https://APP.example.com:443"));
        assert!(!o.allows(b"http://app.example.com"));
        assert!(!o.allows(b"https://app.example.com:8443"));
        assert!(!o.allows(b"https://app.example.com.evil.com"));
        assert!(!o.allows(b"https://evilapp.example.com"));
        assert!(o.allows(b"http://localhost:3000"));
        assert!(!o.allows(b"http://localhost:3001"));
        assert!(o.allows(b"https://a.b.example.org"));
        assert!(!o.allows(b"https://example.org"));
        assert!(!o.allows(b"https://xexample.org"));
        assert!(!o.allows(b"null"));
        assert!(!o.allows(b"https://app.example.com/path"));
        assert!(!o.allows(b"https://user@app.example.com"));
        assert!(origins(&["null"]).allows(b"null"));
        assert!(!origins(&["*"]).allows(b"null"));
    }

    #[test]
    fn referer_gives_its_origin() {
        assert_eq!(
            Origin::of_url("https://App.example.com/a/b?c#d"),
            Origin::parse("https://app.example.com:443")
        );
        assert_eq!(Origin::of_url("not a url"), None);
    }

    #[test]
    fn bad_entries_are_errors() {
        let path = std::path::Path::new("t.yaml");
        let mut errors = Errors::new(path);
        let list = vec![Text::from("app.example.com"), Text::from("https://a.com/x")];
        Origins::compile(
            &list,
            portcullis_config::Location::UNKNOWN,
            "o",
            &mut errors,
        );
        assert_eq!(errors.count(), 2);
    }
}
