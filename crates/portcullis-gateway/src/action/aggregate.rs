//! The aggregate action (KrakenD-style composite routes): call several upstreams —
//! in parallel, or after the parts they depend on — and merge their JSON answers
//! into one object, nested under each part's name or flattened. A failed optional
//! part is `null` (and named in `X-Partial-Response`); a failed required part fails
//! the request. Everything runs in the request's future: a client going away, or a
//! required part failing, drops the calls still in flight.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use portcullis_config::{AggregateConfig, MergeMode};
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::pipeline::{read_limited, send, Hop, StepError};
use super::proxy::{self, ProxyAction};
use super::{Clients, RouteSite};
use crate::body::Body;
use crate::context::RequestCtx;
use crate::error::{ErrorCode, GatewayError};
use crate::pipelines::name_ok;
use crate::snapshot::Errors;
use crate::template::Template;

/// Most parts one route may aggregate.
pub const MAX_PARTS: usize = 16;

/// Longest value from an answer placed in a path.
const MAX_SEGMENT: usize = 256;

/// A value from an earlier part placed in a path must be one plain segment:
/// unreserved characters only, not empty, `.` or `..` (encoded forms such as
/// `%2E%2E` or `%2F` are refused too: some upstreams decode them).
fn plain_segment(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_SEGMENT
        && v != "."
        && v != ".."
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

pub struct AggregateAction {
    parts: Box<[Part]>,
    merge: MergeMode,
    timeout: Duration,
    max_body: usize,
}

struct Part {
    name: Arc<str>,
    proxy: ProxyAction,
    method: Method,
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
    required: bool,
    /// Top-level fields kept (empty: all).
    fields: Vec<String>,
    /// Indexes of the parts that answer first.
    after: Vec<usize>,
    /// `{dep.field}` params of its path: (param, part index, field).
    refs: Vec<(String, usize, String)>,
}

/// How a part ended.
enum PartResult {
    Value(Value),
    Failed(&'static str, Option<StatusCode>),
}

impl AggregateAction {
    pub fn describe(&self) -> String {
        let names: Vec<&str> = self.parts.iter().map(|p| &*p.name).collect();
        format!("aggregate {}", names.join("+"))
    }

    pub async fn run(
        &self,
        ctx: &mut RequestCtx<'_>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, GatewayError> {
        let deadline = Instant::now() + self.timeout;
        // Parts are reads: the client's body (if any) is not forwarded.
        let (mut template, _body) = req.into_parts();
        // Answers are parsed and merged: asked for uncompressed.
        for h in [
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
            header::CONTENT_TYPE,
            header::CONTENT_ENCODING,
            header::ACCEPT_ENCODING,
        ] {
            template.headers.remove(h);
        }
        proxy::set_upstream_headers(ctx, &mut template.headers, template.version, false);
        template.version = Version::HTTP_11;
        let ctx: &RequestCtx<'_> = ctx;

        let n = self.parts.len();
        let mut results: Vec<Option<PartResult>> = (0..n).map(|_| None).collect();
        let mut started = vec![false; n];
        let mut running = FuturesUnordered::new();
        loop {
            // Start every part whose dependencies are done; fail those whose
            // dependencies failed.
            let mut progressed = true;
            while progressed {
                progressed = false;
                for i in 0..n {
                    if started[i] {
                        continue;
                    }
                    let part = &self.parts[i];
                    if part.after.iter().any(|d| results[*d].is_none()) {
                        continue;
                    }
                    started[i] = true;
                    progressed = true;
                    match self.params(part, &results) {
                        Some(params) => {
                            let head = proxy::clone_head(&template);
                            running.push(self.call(ctx, i, head, params, deadline));
                        }
                        None => {
                            results[i] =
                                Some(PartResult::Failed("a part it depends on failed", None));
                        }
                    }
                }
            }
            // A required part that failed ends the request now.
            if let Some((part, failure)) = self.required_failure(&results) {
                return Err(failure_error(part, failure));
            }
            match tokio::time::timeout_at(deadline, running.next()).await {
                Ok(Some((i, r))) => results[i] = Some(r),
                Ok(None) => break,
                Err(_) => {
                    // Out of time: what is still running failed.
                    for r in results.iter_mut().filter(|r| r.is_none()) {
                        *r = Some(PartResult::Failed("timed out", None));
                    }
                    if let Some((part, failure)) = self.required_failure(&results) {
                        return Err(failure_error(part, failure));
                    }
                    break;
                }
            }
        }
        Ok(self.merge(results))
    }

    /// The `{dep.field}` values of `part`'s path, percent-encoded; `None` when a
    /// dependency failed or lacks the field.
    fn params(&self, part: &Part, results: &[Option<PartResult>]) -> Option<Vec<(String, String)>> {
        if part
            .after
            .iter()
            .any(|d| !matches!(results[*d], Some(PartResult::Value(_))))
        {
            return None;
        }
        let mut out = Vec::with_capacity(part.refs.len());
        for (param, dep, field) in &part.refs {
            let Some(PartResult::Value(v)) = &results[*dep] else {
                return None;
            };
            let text = match v.get(field)? {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => return None,
            };
            if !plain_segment(&text) {
                return None;
            }
            out.push((param.clone(), text));
        }
        Some(out)
    }

    async fn call(
        &self,
        ctx: &RequestCtx<'_>,
        index: usize,
        mut head: http::request::Parts,
        params: Vec<(String, String)>,
        deadline: Instant,
    ) -> (usize, PartResult) {
        let part = &self.parts[index];
        head.method = part.method.clone();
        let borrowed: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let extra = proxy::Extra {
            params: &borrowed,
            no_query: true,
        };
        let hop = Hop {
            owner: &ctx.route.name,
            name: &part.name,
            proxy: &part.proxy,
            extra: &extra,
            headers: &part.headers,
            client_streams: false,
        };
        let until = deadline.min(Instant::now() + part.timeout);
        let result = async {
            let res = send(ctx, &hop, head, Body::empty(), until).await?;
            let status = res.status();
            if !status.is_success() {
                return Err(StepError::Status(status, bytes::Bytes::new()));
            }
            if super::pipeline::is_encoded(res.headers()) {
                return Err(StepError::Unreachable("compressed answer"));
            }
            read_limited(res.into_body(), self.max_body, until).await
        }
        .await;
        let r = match result {
            Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) => PartResult::Value(v),
                Err(_) => PartResult::Failed("the answer is not JSON", None),
            },
            Err(StepError::Status(s, _)) => {
                PartResult::Failed("answered with an error status", Some(s))
            }
            Err(StepError::TimedOut) => PartResult::Failed("timed out", None),
            Err(StepError::TooLarge) => {
                PartResult::Failed("answer larger than max_part_body", None)
            }
            Err(StepError::Unreachable(d)) => PartResult::Failed(d, None),
            Err(StepError::Client(_)) => PartResult::Failed("request refused", None),
        };
        (index, r)
    }

    fn required_failure<'a>(
        &'a self,
        results: &'a [Option<PartResult>],
    ) -> Option<(&'a Part, &'a PartResult)> {
        self.parts.iter().zip(results).find_map(|(p, r)| match r {
            Some(f @ PartResult::Failed(..)) if p.required => Some((p, f)),
            _ => None,
        })
    }

    fn merge(&self, results: Vec<Option<PartResult>>) -> Response<Body> {
        let mut out = Map::new();
        let mut missing = Vec::new();
        for (part, r) in self.parts.iter().zip(results) {
            // Dependents read every field; the answer shows the allowed ones.
            let value = match r {
                Some(PartResult::Value(v)) => Some(keep_fields(v, &part.fields)),
                _ => {
                    missing.push(&*part.name);
                    None
                }
            };
            match (self.merge, value) {
                (MergeMode::Flat, Some(Value::Object(fields))) => out.extend(fields),
                (MergeMode::Flat, None) => {}
                (_, v) => {
                    out.insert(part.name.to_string(), v.unwrap_or(Value::Null));
                }
            }
        }
        let mut bytes = serde_json::to_vec(&Value::Object(out)).unwrap_or_default();
        bytes.push(b'\n');
        let mut res = Response::new(Body::full(bytes));
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if !missing.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&missing.join(", ")) {
                res.headers_mut()
                    .insert(HeaderName::from_static("x-partial-response"), v);
            }
        }
        res
    }
}

fn failure_error(part: &Part, failure: &PartResult) -> GatewayError {
    let PartResult::Failed(why, status) = failure else {
        return GatewayError::server(ErrorCode::InternalError);
    };
    let code = if *why == "timed out" {
        ErrorCode::UpstreamTimeout
    } else {
        ErrorCode::UpstreamUnavailable
    };
    let message = match status {
        Some(s) => format!("required part {:?} {why} ({})", &*part.name, s.as_u16()),
        None => format!("required part {:?}: {why}", &*part.name),
    };
    GatewayError::new(code, message)
}

/// Keeps only `fields` of an object answer (all when empty).
fn keep_fields(v: Value, fields: &[String]) -> Value {
    match v {
        Value::Object(mut m) if !fields.is_empty() => {
            m.retain(|k, _| fields.iter().any(|f| f == k));
            Value::Object(m)
        }
        other => other,
    }
}

pub(crate) fn compile(
    c: &AggregateConfig,
    site: &RouteSite<'_>,
    clients: &mut Clients<'_>,
    errors: &mut Errors<'_>,
) -> Option<AggregateAction> {
    let field = format!("{}.aggregate", site.field);
    if c.parts.is_empty() || c.parts.len() > MAX_PARTS {
        errors.push(
            site.at,
            format!("{field}.parts"),
            format!("an aggregation has 1 to {MAX_PARTS} parts"),
        );
        return None;
    }
    if c.timeout.get().is_zero() {
        errors.push(site.at, format!("{field}.timeout"), "must be more than 0");
        return None;
    }
    let mut parts: Vec<Part> = Vec::with_capacity(c.parts.len());
    for (i, spec) in c.parts.iter().enumerate() {
        let pf = format!("{field}.parts[{i}]");
        let p = &spec.value;
        let name = p.name.value.as_str();
        if !name_ok(name) || parts.iter().any(|q| &*q.name == name) {
            errors.push(
                p.name.referenced,
                format!("{pf}.name"),
                "a unique name of letters, digits, '-', '_' and '.'",
            );
            return None;
        }
        let mut after = Vec::new();
        for a in &p.after {
            match parts.iter().position(|q| &*q.name == a.as_str()) {
                Some(j) => after.push(j),
                None => {
                    errors.push(
                        spec.referenced,
                        format!("{pf}.after"),
                        format!("{:?} is not a part declared before this one", a.as_str()),
                    );
                    return None;
                }
            }
        }
        // `{dep.field}` params must name a part in `after`.
        let mut refs = Vec::new();
        if let Some(path) = &p.path {
            let t = match Template::parse(&path.value) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(path.referenced, format!("{pf}.path"), e);
                    return None;
                }
            };
            for param in t.params().filter(|x| x.contains('.')) {
                let (dep, f) = param.split_once('.').unwrap_or((param, ""));
                match parts.iter().position(|q| &*q.name == dep) {
                    Some(j) if after.contains(&j) && !f.is_empty() => {
                        refs.push((param.to_owned(), j, f.to_owned()));
                    }
                    _ => {
                        errors.push(
                            path.referenced,
                            format!("{pf}.path"),
                            format!("{{{param}}}: {dep:?} must be a part listed in `after`"),
                        );
                        return None;
                    }
                }
            }
        }
        let (method, headers) = super::call_method_and_headers(
            p.method.as_ref(),
            &p.headers,
            spec.referenced,
            &pf,
            errors,
        )
        .ok()?;
        let method = method.unwrap_or(Method::GET);
        let timeout = p.timeout.map_or(c.timeout.get(), |t| t.get());
        if timeout.is_zero() {
            errors.push(
                spec.referenced,
                format!("{pf}.timeout"),
                "must be more than 0",
            );
            return None;
        }
        let proxy_config =
            super::pipeline::step_proxy(p.upstream.clone(), p.path.clone(), site, timeout);
        let mut params = site.params.to_vec();
        params.extend(refs.iter().map(|(param, _, _)| param.clone()));
        let psite = RouteSite {
            at: spec.referenced,
            field: &pf,
            params: &params,
            is_prefix: site.is_prefix,
        };
        let proxy = super::proxy::compile(&proxy_config, &psite, clients, errors)?;
        parts.push(Part {
            name: Arc::from(name),
            proxy,
            method,
            headers,
            timeout,
            required: p.required.0,
            fields: p.fields.iter().map(|f| f.to_string()).collect(),
            after,
            refs,
        });
    }
    Some(AggregateAction {
        parts: parts.into_boxed_slice(),
        merge: c.merge,
        timeout: c.timeout.get(),
        max_body: usize::try_from(c.max_part_body.0).unwrap_or(usize::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_filtered_on_objects_only() {
        let v = serde_json::json!({"a": 1, "b": 2, "c": 3});
        assert_eq!(
            keep_fields(v.clone(), &["a".into(), "c".into()]),
            serde_json::json!({"a": 1, "c": 3})
        );
        assert_eq!(keep_fields(v.clone(), &[]), v);
        assert_eq!(
            keep_fields(serde_json::json!([1]), &["a".into()]),
            serde_json::json!([1])
        );
    }

    #[test]
    fn values_from_answers_stay_one_plain_segment() {
        for ok in ["42", "t7", "a.b", "x_y-z~"] {
            assert!(plain_segment(ok), "{ok}");
        }
        for bad in [
            "", ".", "..", "../admin", "a/b", "%2E%2E", "a b", "a?x=1", "é",
        ] {
            assert!(!plain_segment(bad), "{bad}");
        }
        assert!(!plain_segment(&"x".repeat(MAX_SEGMENT + 1)));
    }
}
