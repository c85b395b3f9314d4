//! The pipeline action (FnKit's `/orchestrate/<name>`): run steps in sequence, each
//! response becoming the next request, or in parallel with their answers merged.
//!
//! Everything runs inside the request's own future: when the client goes away the
//! future is dropped and so are the steps in flight (their connections closed).
//! The client's body streams into the first sequential step and the last step's
//! response streams back; hand-offs between steps are buffered up to `max_handoff`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use portcullis_upstream::Outcome;
use serde_json::{Map, Value};
use tokio::time::Instant;
use tracing::Instrument;

use super::proxy::{self, clone_head, content_length, ProxyAction};
use crate::body::{find_cause, Body, IdleTimeout};
use crate::context::RequestCtx;
use crate::error::{ErrorCode, GatewayError};
use crate::pipelines::{name_ok, Mode};
use crate::telemetry::PipelineStepLabels;

mod compile;
pub(crate) use compile::{compile, step_proxy};

pub struct PipelineAction {
    pub(crate) source: Source,
    /// The whole run, until the last response head (sequential) or every
    /// answer read (parallel).
    pub(crate) timeout: Duration,
    pub(crate) step_timeout: Duration,
    pub(crate) max_handoff: usize,
    pub(crate) partial: bool,
    pub(crate) cache_ttl: Duration,
}

pub(crate) enum Source {
    /// Declared under `pipelines:`, compiled with the route.
    Declared {
        name: Arc<str>,
        mode: Mode,
        steps: Box<[Step]>,
    },
    /// Read from the store by the name in a path param; each step is a function
    /// reached through `functions` with `{step}` set to its name.
    Stored {
        param: String,
        functions: Box<ProxyAction>,
    },
}

pub(crate) struct Step {
    pub name: Arc<str>,
    pub proxy: ProxyAction,
    pub method: Option<Method>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub timeout: Duration,
}

/// A step as the runner sees it, declared or stored.
struct StepRef<'a> {
    name: &'a str,
    proxy: &'a ProxyAction,
    /// `{step}` of a function upstream.
    function: Option<&'a str>,
    method: Option<&'a Method>,
    headers: &'a [(HeaderName, HeaderValue)],
    timeout: Duration,
}

/// Why a step produced no usable answer.
pub(crate) enum StepError {
    /// The client's side failed (its body too large or too slow): answered as is.
    Client(GatewayError),
    /// No connection or no valid exchange; the phrase is safe to show.
    Unreachable(&'static str),
    TimedOut,
    TooLarge,
    /// It answered non-2xx: its status and body.
    Status(StatusCode, Bytes),
}

impl PipelineAction {
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Declared { name, mode, steps } => {
                format!("pipeline {name} ({mode:?}, {} steps)", steps.len())
            }
            Source::Stored { param, .. } => format!("pipeline (stored, by {{{param}}})"),
        }
    }

    pub async fn run(
        &self,
        ctx: &mut RequestCtx<'_>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, GatewayError> {
        let deadline = Instant::now() + self.timeout;
        match &self.source {
            Source::Declared { name, mode, steps } => {
                let refs: Vec<StepRef<'_>> = steps
                    .iter()
                    .map(|s| StepRef {
                        name: &s.name,
                        proxy: &s.proxy,
                        function: None,
                        method: s.method.as_ref(),
                        headers: &s.headers,
                        timeout: s.timeout,
                    })
                    .collect();
                self.execute(ctx, req, name.clone(), *mode, &refs, deadline)
                    .await
            }
            Source::Stored { param, functions } => {
                let name = crate::template::param_value(ctx.params, ctx.rest, param)
                    .filter(|n| name_ok(n))
                    .ok_or_else(|| GatewayError::new(ErrorCode::NotFound, "no such pipeline"))?;
                let def = ctx
                    .shared
                    .pipelines
                    .get(name, self.cache_ttl)
                    .await
                    .map_err(|e| {
                        tracing::warn!(pipeline = name, error = %e, "cannot read a pipeline from the store");
                        GatewayError::server(ErrorCode::ServiceUnavailable)
                    })?
                    .ok_or_else(|| {
                        GatewayError::new(
                            ErrorCode::NotFound,
                            format!("pipeline not found: {name}"),
                        )
                    })?;
                if def.steps.is_empty() {
                    return Err(GatewayError::new(
                        ErrorCode::BadRequest,
                        "pipeline has no steps",
                    ));
                }
                // Another program may have written it: the same checks as ours.
                if let Err(e) = def.validate() {
                    return Err(GatewayError::new(
                        ErrorCode::BadRequest,
                        format!("pipeline definition is invalid: {e}"),
                    ));
                }
                let refs: Vec<StepRef<'_>> = def
                    .steps
                    .iter()
                    .map(|s| StepRef {
                        name: s,
                        proxy: functions,
                        function: Some(s),
                        method: None,
                        headers: &[],
                        timeout: self.step_timeout,
                    })
                    .collect();
                self.execute(ctx, req, Arc::from(name), def.mode, &refs, deadline)
                    .await
            }
        }
    }

    async fn execute(
        &self,
        ctx: &mut RequestCtx<'_>,
        req: Request<Incoming>,
        pipeline: Arc<str>,
        mode: Mode,
        steps: &[StepRef<'_>],
        deadline: Instant,
    ) -> Result<Response<Body>, GatewayError> {
        let (mut head, body) = req.into_parts();
        let max_body = ctx.route.max_body;
        if content_length(&head.headers).is_some_and(|len| len > max_body) {
            return Err(GatewayError::new(
                ErrorCode::PayloadTooLarge,
                format!("request body larger than {max_body} bytes"),
            ));
        }
        proxy::set_upstream_headers(ctx, &mut head.headers, head.version, false);
        head.version = Version::HTTP_11;
        let body_timeout = steps
            .first()
            .map_or(Duration::from_secs(60), |s| s.proxy.body_timeout);
        let client_body = match ctx.body.take() {
            // Already read by a policy (validation).
            Some(bytes) => Body::full(bytes),
            None => Body::Client(
                IdleTimeout::new(body, body_timeout)
                    .with_limit(max_body)
                    .with_deadline(Some(deadline))
                    .without_trailers(),
            ),
        };
        let run = Run {
            action: self,
            pipeline,
            deadline,
        };
        match mode {
            Mode::Sequential => run.sequential(ctx, head, client_body, steps).await,
            Mode::Parallel => run.parallel(ctx, head, client_body, steps).await,
        }
    }
}

/// One run of a pipeline.
struct Run<'a> {
    action: &'a PipelineAction,
    pipeline: Arc<str>,
    deadline: Instant,
}

impl Run<'_> {
    async fn sequential(
        &self,
        ctx: &mut RequestCtx<'_>,
        template: http::request::Parts,
        client_body: Body,
        steps: &[StepRef<'_>],
    ) -> Result<Response<Body>, GatewayError> {
        let original_method = template.method.clone();
        let mut method = original_method.clone();
        let mut input = client_body;
        let mut content_type: Option<HeaderValue> = None;
        let mut content_encoding: Option<HeaderValue> = None;
        for (i, step) in steps.iter().enumerate() {
            let mut head = clone_head(&template);
            let last = i + 1 == steps.len();
            if !last {
                // Its answer is handed on as it is: ask for it uncompressed.
                head.headers.remove(header::ACCEPT_ENCODING);
            }
            if i > 0 {
                // The previous step's answer (type and encoding) is this request's body.
                head.headers.remove(header::CONTENT_LENGTH);
                head.headers.remove(header::TRANSFER_ENCODING);
                for (name, value) in [
                    (header::CONTENT_TYPE, &content_type),
                    (header::CONTENT_ENCODING, &content_encoding),
                ] {
                    match value {
                        Some(v) => head.headers.insert(name, v.clone()),
                        None => head.headers.remove(name),
                    };
                }
            }
            head.method = step.method.cloned().unwrap_or_else(|| method.clone());
            let started = Instant::now();
            let until = self.deadline.min(started + step.timeout);
            let span =
                tracing::debug_span!("pipeline_step", pipeline = %self.pipeline, step = step.name);
            let outcome = async {
                let res = self.call(ctx, step, head, input, until).await?;
                if !res.status().is_success() {
                    let status = res.status();
                    let text = read_limited(res.into_body(), self.action.max_handoff, until)
                        .await
                        .unwrap_or_default();
                    return Err(StepError::Status(status, text));
                }
                if last {
                    return Ok(Handoff::Last(res));
                }
                let ct = res.headers().get(header::CONTENT_TYPE).cloned();
                let ce = res.headers().get(header::CONTENT_ENCODING).cloned();
                let bytes = read_limited(res.into_body(), self.action.max_handoff, until).await?;
                Ok(Handoff::Next(ct, ce, bytes))
            }
            .instrument(span)
            .await;
            self.observe(ctx, step, started);
            match outcome {
                Err(e) => return Err(self.step_failed(step.name, e)),
                Ok(Handoff::Last(mut res)) => {
                    proxy::remove_hop_by_hop(res.headers_mut());
                    let idle = step.proxy.idle_timeout;
                    return Ok(res.map(|b| Body::Upstream(IdleTimeout::new(b, idle))));
                }
                Ok(Handoff::Next(ct, ce, bytes)) => {
                    // FnKit: POST when there is a body, else the client's method.
                    method = if bytes.is_empty() {
                        original_method.clone()
                    } else {
                        Method::POST
                    };
                    content_type = ct;
                    content_encoding = ce;
                    input = if bytes.is_empty() {
                        Body::empty()
                    } else {
                        Body::full(bytes)
                    };
                }
            }
        }
        Err(GatewayError::new(
            ErrorCode::BadRequest,
            "pipeline has no steps",
        ))
    }

    async fn parallel(
        &self,
        ctx: &mut RequestCtx<'_>,
        template: http::request::Parts,
        client_body: Body,
        steps: &[StepRef<'_>],
    ) -> Result<Response<Body>, GatewayError> {
        // Every step gets the same body: read it once.
        let limit = self.action.max_handoff;
        let body = read_client(client_body, limit).await?;
        let ctx_ref: &RequestCtx<'_> = ctx;
        let calls = steps.iter().map(|step| {
            let mut head = clone_head(&template);
            // Answers are parsed and merged: ask for them uncompressed.
            head.headers.remove(header::ACCEPT_ENCODING);
            if let Some(m) = step.method {
                head.method = m.clone();
            }
            let input = if body.is_empty() {
                Body::empty()
            } else {
                Body::full(body.clone())
            };
            let span =
                tracing::debug_span!("pipeline_step", pipeline = %self.pipeline, step = step.name);
            async move {
                let started = Instant::now();
                let until = self.deadline.min(started + step.timeout);
                let result = async {
                    let res = self.call(ctx_ref, step, head, input, until).await?;
                    let status = res.status();
                    let ct = res.headers().get(header::CONTENT_TYPE).cloned();
                    if is_encoded(res.headers()) {
                        return Err(StepError::Unreachable("compressed answer"));
                    }
                    let bytes = read_limited(res.into_body(), limit, until).await?;
                    if !status.is_success() {
                        return Err(StepError::Status(status, bytes));
                    }
                    Ok((ct, bytes))
                }
                .await;
                self.observe(ctx_ref, step, started);
                result
            }
            .instrument(span)
        });
        let results = futures_util::future::join_all(calls).await;

        let mut merged = Map::new();
        let mut failed = Map::new();
        for (step, result) in steps.iter().zip(results) {
            match result {
                Ok((ct, bytes)) => {
                    merged.insert(step.name.to_owned(), parse_answer(ct.as_ref(), &bytes));
                }
                Err(StepError::Client(e)) => return Err(e),
                Err(e) => {
                    merged.insert(step.name.to_owned(), Value::Null);
                    failed.insert(step.name.to_owned(), failure_json(&e));
                }
            }
        }
        if failed.is_empty() {
            return Ok(json_response(StatusCode::OK, &Value::Object(merged), None));
        }
        if !self.action.partial {
            let mut body = Map::new();
            body.insert("error".into(), "Parallel execution failed".into());
            body.insert("details".into(), Value::Object(failed));
            return Err(GatewayError::compat(
                ErrorCode::PipelineFailed,
                StatusCode::BAD_GATEWAY,
                body,
            ));
        }
        let names: Vec<&str> = failed.keys().map(String::as_str).collect();
        let header = HeaderValue::from_str(&names.join(", ")).ok();
        merged.insert("$errors".into(), Value::Object(failed));
        Ok(json_response(
            StatusCode::OK,
            &Value::Object(merged),
            header,
        ))
    }

    /// Sends one step's request and waits for its response head until `until`.
    async fn call(
        &self,
        ctx: &RequestCtx<'_>,
        step: &StepRef<'_>,
        head: http::request::Parts,
        body: Body,
        until: Instant,
    ) -> Result<Response<crate::upstream::PooledBody>, StepError> {
        let params = step.function.map(|f| [("step", f)]);
        let extra = proxy::Extra {
            params: params.as_ref().map_or(&[], |p| &p[..]),
            no_query: false,
        };
        let hop = Hop {
            owner: &self.pipeline,
            name: step.name,
            proxy: step.proxy,
            extra: &extra,
            headers: step.headers,
            client_streams: matches!(body, Body::Client(_)),
        };
        send(ctx, &hop, head, body, until).await
    }

    fn observe(&self, ctx: &RequestCtx<'_>, step: &StepRef<'_>, started: Instant) {
        ctx.shared
            .metrics
            .pipeline_step_duration
            .get_or_create(&PipelineStepLabels {
                pipeline: self.pipeline.clone(),
                step: Arc::from(step.name),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// FnKit's answer for a failed sequential step, with our code added.
    fn step_failed(&self, step: &str, e: StepError) -> GatewayError {
        if let StepError::Client(e) = e {
            return e;
        }
        let mut body = Map::new();
        body.insert("error".into(), "Step failed".into());
        body.insert("step".into(), step.into());
        let status = match &e {
            StepError::Status(status, _) => *status,
            StepError::TimedOut => StatusCode::GATEWAY_TIMEOUT,
            StepError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_GATEWAY,
        };
        for (k, v) in failure_json(&e).as_object().into_iter().flatten() {
            body.insert(k.clone(), v.clone());
        }
        GatewayError::compat(ErrorCode::StepFailed, status, body)
    }
}

/// One upstream call of a pipeline or an aggregation: its owner and name (logs),
/// how it is reached, and the headers it sets.
pub(crate) struct Hop<'a> {
    pub owner: &'a str,
    pub name: &'a str,
    pub proxy: &'a ProxyAction,
    pub extra: &'a proxy::Extra<'a>,
    pub headers: &'a [(HeaderName, HeaderValue)],
    /// The client's body streams into this call: a timeout or a broken exchange may
    /// be the client's doing and is not held against the target.
    pub client_streams: bool,
}

/// Sends `head` and `body` to the hop's upstream and waits for the response head
/// until `until`; a group's health and breakers hear the outcome, failures are
/// counted in `portcullis_upstream_errors_total`.
pub(crate) async fn send(
    ctx: &RequestCtx<'_>,
    hop: &Hop<'_>,
    mut head: http::request::Parts,
    body: Body,
    until: Instant,
) -> Result<Response<crate::upstream::PooledBody>, StepError> {
    let picked = proxy::upstream_uri(
        hop.proxy,
        ctx,
        &head.uri,
        Some(&head.headers),
        &[],
        hop.extra,
    );
    let (uri, label, picked) = match picked {
        Ok(p) => p,
        Err(e) if e.code == ErrorCode::NotFound => {
            return Err(StepError::Unreachable("function not found or not allowed"))
        }
        Err(e) if e.code == ErrorCode::BadRequest => {
            return Err(StepError::Unreachable("invalid upstream path"))
        }
        Err(_) => return Err(StepError::Unreachable("no target available")),
    };
    head.uri = uri;
    for (k, v) in hop.headers {
        head.headers.insert(k.clone(), v.clone());
    }
    ctx.route.chain.on_upstream_request(ctx, &mut head);
    let started = std::time::Instant::now();
    let sent = hop.proxy.client.request(Request::from_parts(head, body));
    let count = |kind: &'static str| {
        ctx.shared
            .metrics
            .upstream_errors
            .get_or_create(&crate::telemetry::UpstreamErrorLabels {
                route: ctx.route.name.clone(),
                kind,
            })
            .inc();
    };
    match tokio::time::timeout_at(until, sent).await {
        Ok(Ok(res)) => {
            if let Some(p) = picked {
                p.done(
                    super::retry::target_outcome(res.status()),
                    started.elapsed(),
                );
            }
            Ok(res)
        }
        Ok(Err(err)) => {
            if let Some(e) = proxy::body_error(&err) {
                if e.code != ErrorCode::UpstreamTimeout {
                    return Err(StepError::Client(e));
                }
                count("timeout");
                return Err(StepError::TimedOut);
            }
            if find_cause::<crate::targets::ForbiddenTarget>(&err).is_some() {
                count("forbidden");
                tracing::warn!(owner = hop.owner, step = hop.name, upstream = %label, "resolves only to forbidden addresses");
                return Err(StepError::Unreachable("not an allowed target"));
            }
            let connect = err.is_connect();
            count(if connect { "connect" } else { "protocol" });
            tracing::warn!(owner = hop.owner, step = hop.name, upstream = %label, error = %proxy::error_chain(&err), "upstream call failed");
            if let Some(p) = picked {
                if connect || !hop.client_streams {
                    p.done(Outcome::Failure, started.elapsed());
                }
            }
            Err(StepError::Unreachable(if connect {
                "function not found or not running"
            } else {
                "connection lost before a response"
            }))
        }
        Err(_) => {
            count("timeout");
            tracing::warn!(owner = hop.owner, step = hop.name, upstream = %label, "upstream call timed out");
            if let Some(p) = picked {
                if !hop.client_streams {
                    p.done(Outcome::Failure, started.elapsed());
                }
            }
            Err(StepError::TimedOut)
        }
    }
}

enum Handoff {
    /// The answer's content type and encoding, and its body.
    Next(Option<HeaderValue>, Option<HeaderValue>, Bytes),
    Last(Response<crate::upstream::PooledBody>),
}

/// Whether an answer is content-encoded (not `identity`): it cannot be merged.
pub(crate) fn is_encoded(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
}

/// `{"status", "body"}` for a step that answered, `{"detail"}` for one that did not.
fn failure_json(e: &StepError) -> Value {
    match e {
        StepError::Status(status, body) => serde_json::json!({
            "status": status.as_u16(),
            "body": String::from_utf8_lossy(body),
        }),
        StepError::TimedOut => serde_json::json!({"detail": "timed out"}),
        StepError::TooLarge => {
            serde_json::json!({"detail": "response larger than the hand-off limit"})
        }
        StepError::Unreachable(d) => serde_json::json!({"detail": d}),
        StepError::Client(e) => serde_json::json!({"detail": e.message()}),
    }
}

/// A parallel step's answer in the merged object: JSON when it is JSON, else text.
fn parse_answer(content_type: Option<&HeaderValue>, bytes: &Bytes) -> Value {
    let ct = content_type
        .and_then(|v| v.to_str().ok())
        .map(|v| v.to_ascii_lowercase());
    let jsonish = match &ct {
        None => true,
        Some(ct) => ct.contains("json"),
    };
    if jsonish {
        if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
            return v;
        }
    }
    Value::String(String::from_utf8_lossy(bytes).into_owned())
}

fn json_response(
    status: StatusCode,
    value: &Value,
    partial: Option<HeaderValue>,
) -> Response<Body> {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    let mut res = Response::new(Body::full(bytes));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(v) = partial {
        res.headers_mut()
            .insert(HeaderName::from_static("x-partial-response"), v);
    }
    res
}

/// Reads a step's body: at most `limit` bytes, by `until`.
pub(crate) async fn read_limited<B>(
    body: B,
    limit: usize,
    until: Instant,
) -> Result<Bytes, StepError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    match tokio::time::timeout_at(until, http_body_util::Limited::new(body, limit).collect()).await
    {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(StepError::TooLarge)
        }
        Ok(Err(_)) => Err(StepError::Unreachable(
            "connection lost during the response",
        )),
        Err(_) => Err(StepError::TimedOut),
    }
}

/// Reads the client's body for a parallel run (the route's limits apply as it
/// streams; `limit` on top of them).
async fn read_client(body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Err(GatewayError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("request body larger than {limit} bytes"),
                ));
            }
            Err(proxy::body_error(&*e).unwrap_or_else(|| {
                GatewayError::new(ErrorCode::BadRequest, "the request body is incomplete")
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_by_content_type() {
        let json = HeaderValue::from_static("application/json; charset=utf-8");
        let text = HeaderValue::from_static("text/plain");
        assert_eq!(
            parse_answer(Some(&json), &Bytes::from_static(b"{\"a\":1}")),
            serde_json::json!({"a": 1})
        );
        assert_eq!(
            parse_answer(Some(&text), &Bytes::from_static(b"42")),
            Value::String("42".into())
        );
        assert_eq!(
            parse_answer(None, &Bytes::from_static(b"[1]")),
            serde_json::json!([1])
        );
        assert_eq!(
            parse_answer(Some(&json), &Bytes::from_static(b"not json")),
            Value::String("not json".into())
        );
    }

    #[test]
    fn failures_never_show_internals() {
        let v = failure_json(&StepError::Unreachable("function not found or not running"));
        assert_eq!(
            v,
            serde_json::json!({"detail": "function not found or not running"})
        );
        let v = failure_json(&StepError::Status(
            StatusCode::IM_A_TEAPOT,
            Bytes::from_static(b"short and stout"),
        ));
        assert_eq!(
            v,
            serde_json::json!({"status": 418, "body": "short and stout"})
        );
    }
}
