//! Request and response header transforms: `remove`, then `set` (replaces every
//! value, the client's included), then `add` (appends).
//!
//! Values are templates: `{param}` (a path param, `{rest}` on prefix routes),
//! `{request_id}`, `{client_ip}`, `{principal}`, `{claim.<name>}` (a claim of the
//! verified JWT). A header whose template refers to something this request does not
//! have (no principal, no such claim) is not sent — and for `set` the client's own
//! copy is still removed, so a client can never supply a value the gateway promised
//! to set. Request transforms run once per upstream attempt; response transforms
//! run on the way back, error envelopes of later policies and the action included.

use std::borrow::Cow;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Response};
use portcullis_config::{HeaderOps, HeadersConfig};

use super::PolicySite;
use crate::body::Body;
use crate::context::RequestCtx;
use crate::snapshot::Errors;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Var {
    Param(String),
    RequestId,
    ClientIp,
    Principal,
    Claim(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Var(Var),
}

/// A header value template.
#[derive(Debug, Clone)]
struct ValueTemplate {
    pieces: Vec<Piece>,
    /// A literal value, precompiled.
    fixed: Option<HeaderValue>,
}

impl ValueTemplate {
    fn parse(s: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in {s:?}"))?;
            let name = &after[..close];
            let ok_name = |n: &str| {
                !n.is_empty()
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
            };
            let var = match name {
                "request_id" => Var::RequestId,
                "client_ip" => Var::ClientIp,
                "principal" => Var::Principal,
                n if n.starts_with("claim.") && ok_name(&n[6..]) => Var::Claim(n[6..].to_owned()),
                n if ok_name(n) && !n.contains('.') => Var::Param(n.to_owned()),
                n => return Err(format!("unknown placeholder {{{n}}} in {s:?}")),
            };
            pieces.push(Piece::Var(var));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched `}}` in {s:?}"));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest.to_owned()));
        }
        let fixed = match pieces.as_slice() {
            [] => Some(HeaderValue::from_static("")),
            [Piece::Literal(l)] => Some(
                HeaderValue::from_str(l)
                    .map_err(|_| format!("{l:?} is not a valid header value"))?,
            ),
            _ => None,
        };
        Ok(ValueTemplate { pieces, fixed })
    }

    fn params(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Var(Var::Param(n)) => Some(n.as_str()),
            _ => None,
        })
    }

    /// The value for this request; `None` when something it refers to is absent
    /// or the result is not a valid header value.
    fn render(&self, ctx: &RequestCtx<'_>) -> Option<HeaderValue> {
        if let Some(v) = &self.fixed {
            return Some(v.clone());
        }
        let mut out = String::with_capacity(64);
        for p in &self.pieces {
            match p {
                Piece::Literal(l) => out.push_str(l),
                Piece::Var(v) => {
                    let value: Cow<'_, str> = match v {
                        Var::Param(n) => {
                            Cow::Borrowed(crate::template::param_value(ctx.params, ctx.rest, n)?)
                        }
                        Var::RequestId => Cow::Borrowed(ctx.request_id.to_str().ok()?),
                        Var::ClientIp => Cow::Owned(ctx.client_ip.to_canonical().to_string()),
                        Var::Principal => Cow::Borrowed(ctx.principal()?),
                        Var::Claim(c) => ctx.identity.as_ref()?.claim_text(c)?,
                    };
                    out.push_str(&value);
                }
            }
        }
        HeaderValue::from_str(&out).ok()
    }
}

/// One direction's operations, compiled.
#[derive(Default)]
struct Ops {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, ValueTemplate)>,
    add: Vec<(HeaderName, ValueTemplate)>,
}

impl Ops {
    fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    fn apply(&self, ctx: &RequestCtx<'_>, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, t) in &self.set {
            headers.remove(name);
            match t.render(ctx) {
                Some(v) => {
                    headers.insert(name.clone(), v);
                }
                None => {
                    tracing::debug!(header = %name, "header template has no value for this request")
                }
            }
        }
        for (name, t) in &self.add {
            if let Some(v) = t.render(ctx) {
                headers.append(name.clone(), v);
            }
        }
    }
}

pub struct HeaderTransforms {
    request: Ops,
    response: Ops,
}

/// Headers that frame the message or belong to one hop: a transform would break
/// the connection, not change the request.
const FRAMING: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "content-length",
    "te",
    "trailer",
    "upgrade",
    "host",
];

fn compile_ops(
    ops: &HeaderOps,
    field: &str,
    site: &PolicySite<'_>,
    errors: &mut Errors<'_>,
) -> Ops {
    let name = |key: &str, n: &str, errors: &mut Errors<'_>| -> Option<HeaderName> {
        match HeaderName::from_bytes(n.trim().as_bytes()) {
            Ok(h) if FRAMING.contains(&h.as_str()) => {
                errors.push(
                    site.at,
                    format!("{field}.{key}"),
                    format!(
                        "{:?} frames the message and cannot be transformed",
                        h.as_str()
                    ),
                );
                None
            }
            Ok(h) => Some(h),
            Err(_) => {
                errors.push(
                    site.at,
                    format!("{field}.{key}"),
                    format!("{n:?} is not a header name"),
                );
                None
            }
        }
    };
    let mut out = Ops::default();
    for (i, n) in ops.remove.iter().enumerate() {
        if let Some(h) = name(&format!("remove[{i}]"), n, errors) {
            out.remove.push(h);
        }
    }
    for (key, map, list) in [
        ("set", &ops.set, &mut out.set),
        ("add", &ops.add, &mut out.add),
    ] {
        for (n, v) in map {
            let Some(h) = name(key, n, errors) else {
                continue;
            };
            match ValueTemplate::parse(v.as_str()) {
                Ok(t) => {
                    for p in t.params() {
                        let known =
                            site.params.iter().any(|k| k == p) || (site.is_prefix && p == "rest");
                        if !known {
                            errors.push(
                                site.at,
                                format!("{field}.{key}.{n}"),
                                format!("uses {{{p}}}, which the route's path does not capture"),
                            );
                        }
                    }
                    list.push((h, t));
                }
                Err(e) => errors.push(site.at, format!("{field}.{key}.{n}"), e),
            }
        }
    }
    out
}

pub(crate) fn compile(
    c: &HeadersConfig,
    site: &PolicySite<'_>,
    errors: &mut Errors<'_>,
) -> Option<HeaderTransforms> {
    let field = site.field("headers");
    let before = errors.count();
    let request = compile_ops(&c.request, &format!("{field}.request"), site, errors);
    let response = compile_ops(&c.response, &format!("{field}.response"), site, errors);
    if errors.count() != before || (request.is_empty() && response.is_empty()) {
        return None;
    }
    Some(HeaderTransforms { request, response })
}

impl HeaderTransforms {
    /// Whether the request transforms set, add or remove `name`.
    pub fn touches_request_header(&self, name: &HeaderName) -> bool {
        let r = &self.request;
        r.remove.contains(name)
            || r.set.iter().any(|(n, _)| n == name)
            || r.add.iter().any(|(n, _)| n == name)
    }

    pub(super) fn on_upstream_request(
        &self,
        ctx: &RequestCtx<'_>,
        parts: &mut http::request::Parts,
    ) {
        self.request.apply(ctx, &mut parts.headers);
    }

    pub(super) fn on_response(&self, ctx: &mut RequestCtx<'_>, res: &mut Response<Body>) {
        self.response.apply(ctx, res.headers_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse() {
        let t = ValueTemplate::parse("tenant-{claim.org_id}/{id}/{request_id}").unwrap();
        assert_eq!(t.params().collect::<Vec<_>>(), ["id"]);
        assert!(t.fixed.is_none());
        assert!(ValueTemplate::parse("plain").unwrap().fixed.is_some());
        assert!(ValueTemplate::parse("{nope.x}").is_err());
        assert!(ValueTemplate::parse("{open").is_err());
        assert!(ValueTemplate::parse("bad\nvalue").is_err());
    }
}
