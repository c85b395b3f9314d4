//! The proxy action: rewrite the request for the upstream, send it, stream the
//! response back. Bodies are never buffered; `Upgrade` (WebSocket) is tunnelled.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use portcullis_config::{RetryConfig, Toggle, UpstreamConfig, UpstreamProtocol, UpstreamTlsConfig};
use portcullis_upstream::Outcome;

use crate::body::{find_cause, Body, BodyTooLarge, DeadlineExceeded, IdleTimedOut, IdleTimeout};
use crate::context::RequestCtx;
use crate::error::{ErrorCode, GatewayError};
use crate::forwarded;
use crate::snapshot::relative_to;
use crate::telemetry::{RouteLabels, UpstreamErrorLabels};
use crate::template::Template;
use crate::upstream::{ClientSettings, PoolSettings, PooledBody, UpstreamClient, UpstreamError};

pub async fn forward(
    action: &ProxyAction,
    ctx: &mut RequestCtx<'_>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, GatewayError> {
    let this_route = ctx.route;
    let max_body = this_route.max_body;
    let route = &this_route.name;

    let declared_len = content_length(req.headers());
    if let Some(len) = declared_len {
        if len > max_body {
            return Err(too_large(max_body));
        }
    }

    // Only the protocols the route lists are tunnelled; any other `Upgrade` (h2c from
    // curl, say) is dropped and the request goes on as plain HTTP.
    let upgrade = ctx.upgrade.clone().filter(|p| action.allows_upgrade(p));
    let tunnel = match &upgrade {
        Some(protocol) => Some(crate::tunnel::admit(
            &ctx.conn.tunnels,
            protocol,
            req.headers(),
        )?),
        None => None,
    };
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    // The first target is picked on the client's own headers (hash keys such as
    // `header:host`), before the gateway adds or removes any.
    let mut next = upstream_uri(action, ctx, req.uri(), Some(req.headers()), &[])?;

    let original_host = ctx.authority.clone();
    let (mut parts, body) = req.into_parts();
    let original_uri = std::mem::take(&mut parts.uri);
    let headers = &mut parts.headers;
    // Hop-by-hop headers were removed when the request arrived (crate::sanitize),
    // before the gateway added its own.
    if let Some(protocol) = &upgrade {
        headers.insert(header::UPGRADE, protocol.clone());
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    headers.append(
        header::VIA,
        ctx.snapshot.via.for_version(parts.version).clone(),
    );
    forwarded::set_forwarding_headers(
        headers,
        ctx.conn.peer,
        ctx.client_ip,
        ctx.conn.scheme,
        original_host.as_ref(),
        &ctx.snapshot.trusted_proxies,
        ctx.conn.peer_headers.as_ref(),
    );
    headers.insert(
        ctx.snapshot.request_id_header.clone(),
        ctx.request_id.clone(),
    );
    if action.preserve_host {
        if let Some(h) = original_host {
            headers.insert(header::HOST, h);
        }
    } else {
        // hyper sets Host (or :authority) from the upstream URI.
        headers.remove(header::HOST);
    }
    parts.version = Version::HTTP_11;
    let deadline = action
        .total_timeout
        .map(|t| tokio::time::Instant::now() + t);
    let streamed = |body: Incoming| {
        Body::Client(
            IdleTimeout::new(body, action.body_timeout)
                .with_limit(max_body)
                .with_deadline(deadline)
                .without_trailers(),
        )
    };

    // A retry sends the request again: only when its method allows it and its body
    // (if any) is small enough to keep; anything else streams once.
    let mut retry = action
        .retry
        .as_ref()
        .filter(|r| upgrade.is_none() && r.allows(&parts.method));
    let mut replay: Option<Bytes> = None;
    let mut body = Some(body);
    if let Some(r) = retry {
        let empty = body.as_ref().is_some_and(http_body::Body::is_end_stream);
        if empty {
            replay = Some(Bytes::new());
        } else if declared_len.is_some_and(|len| len <= r.replay_buffer) {
            if let Some(b) = body.take() {
                replay = Some(read_replay(streamed(b), r.replay_buffer).await?);
            }
        } else {
            retry = None;
        }
    }
    if let Some(r) = retry {
        r.budget.deposit();
    }

    // Whether the request body streams from the client during the attempt: then a
    // timeout or a broken exchange may be the client's doing (a slow upload), and
    // it is not held against the target.
    let client_streams = replay.is_none() && body.is_some();
    let metrics = &ctx.shared.metrics;
    let mut template = Some(parts);
    let mut tried = [usize::MAX; MAX_ATTEMPTS as usize];
    let mut attempt: u32 = 1;
    loop {
        let more = retry.is_some_and(|r| attempt < r.attempts);
        let (uri, label, picked) = next;
        ctx.record.upstream = Some(label.clone());
        let mut head = if more {
            match &template {
                Some(p) => clone_head(p),
                None => return Err(GatewayError::server(ErrorCode::InternalError)),
            }
        } else {
            match template.take() {
                Some(p) => p,
                None => return Err(GatewayError::server(ErrorCode::InternalError)),
            }
        };
        head.uri = uri;
        ctx.route.chain.on_upstream_request(ctx, &mut head);
        let attempt_body = match (&replay, body.take()) {
            (Some(bytes), _) if bytes.is_empty() => Body::empty(),
            (Some(bytes), _) => Body::full(bytes.clone()),
            (None, Some(b)) => streamed(b),
            (None, None) => Body::empty(),
        };
        let upstream_req = Request::from_parts(head, attempt_body);

        let started = Instant::now();
        let response_timeout = match deadline {
            Some(d) => action
                .response_timeout
                .min(d.saturating_duration_since(tokio::time::Instant::now())),
            None => action.response_timeout,
        };
        let result =
            tokio::time::timeout(response_timeout, action.client.request(upstream_req)).await;
        let index = picked.as_ref().map(|p| p.index);
        // The attempt's result, and why it may be retried.
        let (outcome, reason): (Result<Response<PooledBody>, GatewayError>, &'static str) =
            match result {
                Ok(Ok(res)) => {
                    let status = res.status();
                    if let Some(p) = picked {
                        p.done(target_outcome(status), started.elapsed());
                    }
                    let retryable =
                        more && retry.is_some_and(|r| r.statuses.contains(&status.as_u16()));
                    if !retryable {
                        return Ok(respond(
                            action,
                            ctx,
                            res,
                            started,
                            deadline,
                            client_upgrade,
                            tunnel,
                        ));
                    }
                    (Ok(res), "status")
                }
                Ok(Err(err)) => {
                    if find_cause::<crate::targets::ForbiddenTarget>(&err).is_some() {
                        count_error(metrics, route, "forbidden");
                        tracing::warn!(route = %route, upstream = %label, "upstream name resolves only to forbidden addresses");
                        return Err(GatewayError::new(
                            ErrorCode::UpstreamForbidden,
                            format!("upstream {label:?} is not an allowed target"),
                        ));
                    }
                    let mut e = classify(&err, route, &label, metrics);
                    let upstream_fault = e.code == ErrorCode::UpstreamUnavailable
                        || e.code == ErrorCode::UpstreamTimeout;
                    let connect = err.is_connect();
                    if let Some(p) = picked {
                        if upstream_fault && (connect || !client_streams) {
                            p.done(Outcome::Failure, started.elapsed());
                        }
                    }
                    // A templated upstream (FnKit function) is named: the name came
                    // from the client's own path, so it reveals nothing internal.
                    if e.code == ErrorCode::UpstreamUnavailable
                        && matches!(action.target, Target::Template { .. })
                    {
                        e = GatewayError::new(
                            ErrorCode::UpstreamUnavailable,
                            unreachable_message(&label),
                        );
                    }
                    let kind = if connect { "connect" } else { "reset" };
                    // A full pool (nothing was sent) is retried like a connect
                    // failure, preferably on another target; it is not the target's
                    // fault, so it was not reported above.
                    let pool_full = err.is_overloaded();
                    let retryable = more
                        && (upstream_fault || pool_full)
                        && retry.is_some_and(|r| if connect { r.on_connect } else { r.on_reset });
                    if !retryable {
                        return Err(e);
                    }
                    (Err(e), kind)
                }
                Err(_) => {
                    count_error(metrics, route, "timeout");
                    tracing::warn!(route = %route, upstream = %label, "upstream timed out before responding");
                    if let Some(p) = picked {
                        if !client_streams {
                            p.done(Outcome::Failure, started.elapsed());
                        }
                    }
                    let e = GatewayError::server(ErrorCode::UpstreamTimeout);
                    if !(more && retry.is_some_and(|r| r.on_timeout)) {
                        return Err(e);
                    }
                    (Err(e), "timeout")
                }
            };
        // A retry: when the budget allows, the deadline leaves time for it and a
        // target can take it; else the client gets this attempt's own result.
        let give_up = |outcome: Result<Response<PooledBody>, GatewayError>,
                       client_upgrade,
                       tunnel| match outcome {
            Ok(res) => Ok(respond(
                action,
                ctx,
                res,
                started,
                deadline,
                client_upgrade,
                tunnel,
            )),
            Err(e) => Err(e),
        };
        let Some(r) = retry else {
            return give_up(outcome, client_upgrade, tunnel);
        };
        if let Some(i) = index {
            tried[(attempt - 1) as usize] = i;
        }
        let wait = portcullis_upstream::retry::backoff(r.backoff, r.max_backoff, attempt);
        if deadline.is_some_and(|d| tokio::time::Instant::now() + wait >= d) {
            return give_up(outcome, client_upgrade, tunnel);
        }
        let headers = template.as_ref().map(|p| &p.headers);
        next = match upstream_uri(
            action,
            ctx,
            &original_uri,
            headers,
            &tried[..attempt as usize],
        ) {
            Ok(n) => n,
            Err(_) => return give_up(outcome, client_upgrade, tunnel),
        };
        if !r.budget.withdraw() {
            tracing::debug!(route = %route, upstream = %label, reason, "retry budget spent");
            return give_up(outcome, client_upgrade, tunnel);
        }
        drop(outcome);
        metrics
            .upstream_retries
            .get_or_create(&UpstreamErrorLabels {
                route: route.clone(),
                kind: reason,
            })
            .inc();
        tracing::debug!(route = %route, upstream = %label, reason, attempt, "retrying upstream request");
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

/// What a response says about its target, for passive health and the breaker:
/// 502, 503 and 504 are the target failing; any other status (an application's
/// 500 included, which a client can often provoke) is the target working.
fn target_outcome(status: StatusCode) -> Outcome {
    match status.as_u16() {
        502..=504 => Outcome::Failure,
        _ => Outcome::Success,
    }
}

/// Most attempts a route may configure.
pub const MAX_ATTEMPTS: u32 = 10;

/// The response head arrived: hand tunnels over, strip hop-by-hop headers, stream.
fn respond(
    action: &ProxyAction,
    ctx: &RequestCtx<'_>,
    mut res: Response<PooledBody>,
    started: Instant,
    deadline: Option<tokio::time::Instant>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    tunnel: Option<crate::tunnel::Tunnel>,
) -> Response<Body> {
    let route = &ctx.route.name;
    ctx.shared
        .metrics
        .upstream_duration
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());

    if res.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let (Some(client_upgrade), Some(tunnel)) = (client_upgrade, tunnel) {
            let upstream_upgrade = hyper::upgrade::on(&mut res);
            let route = route.clone();
            let idle = action.tunnel_idle;
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client, upstream)) => {
                        tunnel
                            .run(TokioIo::new(client), TokioIo::new(upstream), idle, &route)
                            .await;
                    }
                    Err(e) => tracing::debug!(route = %route, error = %e, "upgrade failed"),
                }
            });
            return res.map(|_| Body::empty());
        }
    }

    remove_hop_by_hop(res.headers_mut());
    res.map(|b| Body::Upstream(IdleTimeout::new(b, action.idle_timeout).with_deadline(deadline)))
}

/// A copy of the request head for one attempt (extensions are not carried).
fn clone_head(p: &http::request::Parts) -> http::request::Parts {
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = p.method.clone();
    head.uri = p.uri.clone();
    head.version = p.version;
    head.headers = p.headers.clone();
    head
}

/// Reads a body of known, small length into memory so a retry can send it again.
async fn read_replay(body: Body, limit: u64) -> Result<Bytes, GatewayError> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
    {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
                || find_cause::<BodyTooLarge>(e.as_ref()).is_some()
            {
                Err(GatewayError::new(
                    ErrorCode::PayloadTooLarge,
                    "request body too large",
                ))
            } else if find_cause::<IdleTimedOut>(e.as_ref()).is_some() {
                Err(GatewayError::new(
                    ErrorCode::RequestTimeout,
                    "request body not received in time",
                ))
            } else if find_cause::<DeadlineExceeded>(e.as_ref()).is_some() {
                Err(GatewayError::server(ErrorCode::UpstreamTimeout))
            } else {
                Err(GatewayError::new(
                    ErrorCode::BadRequest,
                    "request body could not be read",
                ))
            }
        }
    }
}

fn too_large(limit: u64) -> GatewayError {
    GatewayError::new(
        ErrorCode::PayloadTooLarge,
        format!("request body larger than {limit} bytes"),
    )
}

fn count_error(metrics: &crate::telemetry::Metrics, route: &Arc<str>, kind: &'static str) {
    metrics
        .upstream_errors
        .get_or_create(&UpstreamErrorLabels {
            route: route.clone(),
            kind,
        })
        .inc();
}

fn classify(
    err: &UpstreamError,
    route: &Arc<str>,
    label: &Arc<str>,
    metrics: &crate::telemetry::Metrics,
) -> GatewayError {
    if find_cause::<BodyTooLarge>(err).is_some() {
        return GatewayError::new(ErrorCode::PayloadTooLarge, "request body too large");
    }
    if find_cause::<IdleTimedOut>(err).is_some() {
        return GatewayError::new(
            ErrorCode::RequestTimeout,
            "request body not received in time",
        );
    }
    if find_cause::<DeadlineExceeded>(err).is_some() {
        count_error(metrics, route, "timeout");
        return GatewayError::server(ErrorCode::UpstreamTimeout);
    }
    if err.is_overloaded() {
        count_error(metrics, route, "overloaded");
        tracing::warn!(route = %route, upstream = %label, error = %error_chain(err), "upstream connection pool at its cap");
        return GatewayError::server(ErrorCode::UpstreamOverloaded);
    }
    let kind = if err.is_connect() {
        "connect"
    } else {
        "protocol"
    };
    count_error(metrics, route, kind);
    tracing::warn!(route = %route, upstream = %label, kind, error = %error_chain(err), "upstream request failed");
    GatewayError::server(ErrorCode::UpstreamUnavailable)
}

/// An error and its sources, for logs (never for clients).
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// An HTTP/1.1 `Upgrade` request (WebSocket and friends): returns the protocol.
pub fn upgrade_requested<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let upgrade = req.headers().get(header::UPGRADE)?;
    let connection_says_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    connection_says_upgrade.then(|| upgrade.clone())
}

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1) from an upstream's response,
/// including those named in `Connection` (`TE` is a request header: an upstream's
/// is dropped too). Requests are cleaned on arrival by [`crate::sanitize`].
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        remove_connection_named(headers);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::TE);
}

/// Removes the headers that `Connection` names as hop-by-hop for this message.
fn remove_connection_named(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
}

fn upstream_uri<'a>(
    action: &'a ProxyAction,
    f: &RequestCtx<'_>,
    original: &Uri,
    headers: Option<&HeaderMap>,
    tried: &[usize],
) -> Result<(Uri, Arc<str>, Option<super::group::Picked<'a>>), GatewayError> {
    let lookup = |name: &str| crate::template::param_value(f.params, f.rest, name);
    // The path the upstream sees, before any base path.
    let request_path: Cow<'_, str> = if let Some(rewrite) = &action.rewrite {
        Cow::Owned(rewrite.render(lookup))
    } else if action.strip_prefix {
        match f.rest {
            Some(r) if !r.is_empty() => Cow::Borrowed(r),
            _ => Cow::Borrowed("/"),
        }
    } else {
        Cow::Borrowed(f.path)
    };
    let path_unchanged = action.rewrite.is_none() && !action.strip_prefix && !f.path_changed;

    let fixed = |t: &FixedTarget| -> Result<(Uri, Arc<str>), GatewayError> {
        let pq = if path_unchanged && t.base_path.is_empty() {
            original
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"))
        } else {
            build_pq(&t.base_path, &request_path, f.query.as_deref())?
        };
        let uri = build_uri(t.scheme.clone(), t.authority.clone(), pq)?;
        Ok((uri, t.label.clone()))
    };
    match &action.target {
        Target::Fixed(t) => fixed(t).map(|(u, l)| (u, l, None)),
        Target::Group(g) => {
            let empty = HeaderMap::new();
            let picked = g.pick(f, headers.unwrap_or(&empty), tried, &action.client)?;
            let (uri, label) = fixed(picked.target)?;
            Ok((uri, label, Some(picked)))
        }
        Target::Template {
            template,
            authority_params,
            path_is_templated,
        } => {
            // The client picks these: one DNS label each, never readable as an
            // address, and within `allow_names` (checked before any DNS query).
            for p in authority_params {
                let ok = lookup(p).is_some_and(|v| {
                    crate::targets::host_label_ok(v)
                        && (action.allow_names.is_empty()
                            || action.allow_names.iter().any(|n| n.matches(v)))
                });
                if !ok {
                    return Err(GatewayError::new(ErrorCode::NotFound, "no such upstream"));
                }
            }
            let rendered = template.render(lookup);
            let parsed: Uri = rendered
                .parse()
                .map_err(|_| GatewayError::new(ErrorCode::NotFound, "no such upstream"))?;
            let (Some(scheme), Some(authority)) =
                (parsed.scheme().cloned(), parsed.authority().cloned())
            else {
                return Err(GatewayError::new(ErrorCode::NotFound, "no such upstream"));
            };
            if crate::targets::host_is_address_like(authority.host()) {
                return Err(GatewayError::new(ErrorCode::NotFound, "no such upstream"));
            }
            let label: Arc<str> = Arc::from(authority.host());
            let pq = if *path_is_templated {
                build_pq("", parsed.path(), f.query.as_deref())?
            } else {
                build_pq(
                    parsed.path().trim_end_matches('/'),
                    &request_path,
                    f.query.as_deref(),
                )?
            };
            Ok((build_uri(scheme, authority, pq)?, label, None))
        }
    }
}

fn build_pq(base: &str, path: &str, query: Option<&str>) -> Result<PathAndQuery, GatewayError> {
    let mut s = String::with_capacity(base.len() + path.len() + query.map_or(0, |q| q.len() + 1));
    s.push_str(base);
    if !path.starts_with('/') {
        s.push('/');
    }
    s.push_str(path);
    if let Some(q) = query {
        s.push('?');
        s.push_str(q);
    }
    PathAndQuery::try_from(s)
        .map_err(|_| GatewayError::new(ErrorCode::BadRequest, "invalid upstream path"))
}

fn build_uri(scheme: Scheme, authority: Authority, pq: PathAndQuery) -> Result<Uri, GatewayError> {
    Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(pq)
        .build()
        .map_err(|_| GatewayError::server(ErrorCode::InternalError))
}

/// For the FnKit-style message naming the upstream a templated route tried.
pub fn unreachable_message(label: &str) -> String {
    format!("upstream {label:?} is not found or not running")
}

pub struct ProxyAction {
    pub target: Target,
    pub strip_prefix: bool,
    pub rewrite: Option<Template>,
    pub preserve_host: bool,
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
    pub total_timeout: Option<Duration>,
    /// Max silence while reading the client's body.
    pub body_timeout: Duration,
    /// Max silence on an upgraded tunnel.
    pub tunnel_idle: Duration,
    /// `Upgrade` protocols tunnelled (lowercase).
    pub upgrades: Vec<String>,
    /// Templated upstreams: names a host param may take (empty: any DNS label).
    pub allow_names: Vec<crate::targets::NamePattern>,
    pub retry: Option<RetryPolicy>,
    pub client: UpstreamClient,
}

/// A route's `retries`, compiled.
pub struct RetryPolicy {
    /// Tries in all, the first included (2..=[`MAX_ATTEMPTS`]).
    pub attempts: u32,
    pub on_connect: bool,
    pub on_reset: bool,
    pub on_timeout: bool,
    pub statuses: Vec<u16>,
    pub non_idempotent: bool,
    pub replay_buffer: u64,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub budget: portcullis_upstream::RetryBudget,
}

impl RetryPolicy {
    /// Idempotent methods (RFC 9110 §9.2.2) always; others when the route says so.
    fn allows(&self, method: &Method) -> bool {
        self.non_idempotent
            || matches!(
                *method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::PUT
                    | Method::DELETE
            )
    }

    fn compile(
        cfg: &RetryConfig,
        at: portcullis_config::Location,
        field: &str,
        errors: &mut crate::snapshot::Errors<'_>,
    ) -> Option<Self> {
        let attempts = cfg.attempts.0;
        if attempts == 0 || attempts > MAX_ATTEMPTS {
            errors.push(
                at,
                format!("{field}.attempts"),
                format!("must be between 1 and {MAX_ATTEMPTS}"),
            );
            return None;
        }
        if cfg.budget_percent.0 > 100 {
            errors.push(at, format!("{field}.budget_percent"), "at most 100");
            return None;
        }
        let mut policy = RetryPolicy {
            attempts,
            on_connect: false,
            on_reset: false,
            on_timeout: false,
            statuses: Vec::new(),
            non_idempotent: cfg.non_idempotent.0,
            replay_buffer: cfg.replay_buffer.0,
            backoff: cfg.backoff.get(),
            max_backoff: cfg.max_backoff.get().max(cfg.backoff.get()),
            budget: portcullis_upstream::RetryBudget::new(
                f64::from(cfg.budget_percent.0) / 100.0,
                cfg.min_per_second.0,
            ),
        };
        for (i, on) in cfg.on.iter().enumerate() {
            match on.trim() {
                "connect" => policy.on_connect = true,
                "reset" => policy.on_reset = true,
                "timeout" => policy.on_timeout = true,
                s => match s.parse::<u16>() {
                    Ok(code) if (500..=599).contains(&code) => policy.statuses.push(code),
                    _ => {
                        errors.push(
                            at,
                            format!("{field}.on[{i}]"),
                            format!("{s:?}: expected connect, reset, timeout or a 5xx status"),
                        );
                        return None;
                    }
                },
            }
        }
        (attempts > 1).then_some(policy)
    }
}

impl ProxyAction {
    pub fn allows_upgrade(&self, protocol: &HeaderValue) -> bool {
        let p = protocol.as_bytes();
        // `websocket/13`-style versions name the same protocol.
        let name = p.split(|b| *b == b'/').next().unwrap_or(p);
        self.upgrades
            .iter()
            .any(|u| u.as_bytes().eq_ignore_ascii_case(name))
    }
}

/// Where a proxy route sends requests.
pub enum Target {
    Fixed(FixedTarget),
    /// A named upstream with `targets`: a balancer picks one per request.
    Group(Box<super::group::Group>),
    /// Rendered per request from path params (FnKit: `http://{name}:8080`).
    Template {
        template: Template,
        /// Params that land in the host part: must be one DNS label each.
        authority_params: Vec<String>,
        /// The upstream URL's path is templated: it replaces the request path.
        path_is_templated: bool,
    },
}

pub struct FixedTarget {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Upstream URL path prefix without a trailing slash; empty for none.
    pub base_path: String,
    pub label: Arc<str>,
}

pub(crate) fn compile(
    p: &portcullis_config::ProxyConfig,
    site: &super::RouteSite<'_>,
    clients: &mut super::Clients<'_>,
    errors: &mut crate::snapshot::Errors<'_>,
) -> Option<ProxyAction> {
    let (at, field) = (site.at, site.field);
    let f = format!("{field}.proxy.upstream");
    let raw = p.upstream.value.to_string();
    // A named upstream, or an inline URL.
    let (url, upstream_cfg): (String, Option<&UpstreamConfig>) = match clients.named.get(&raw) {
        Some(u) => (u.value.url.to_string(), Some(&u.value)),
        None => (raw.clone(), None),
    };
    let template = match Template::parse(&url) {
        Ok(t) => t,
        Err(e) => {
            errors.push(p.upstream.referenced, f, e);
            return None;
        }
    };
    if !site.check(&template, p.upstream.referenced, f.clone(), errors) {
        return None;
    }
    let group = match upstream_cfg {
        Some(u) if !u.targets.is_empty() => {
            if !u.url.is_empty() {
                errors.push(
                    p.upstream.referenced,
                    format!("upstreams.{raw}"),
                    "set either `url` or `targets`, not both",
                );
                return None;
            }
            Some(super::group::compile(
                &raw,
                u,
                p.upstream.referenced,
                &format!("upstreams.{raw}"),
                site.params,
                clients.upstreams,
                errors,
            )?)
        }
        Some(u)
            if u.health.active.is_some() || u.health.passive.is_some() || u.breaker.is_some() =>
        {
            errors.push(
                p.upstream.referenced,
                format!("upstreams.{raw}"),
                "`health` and `breaker` apply to groups: list the URL under `targets`",
            );
            return None;
        }
        Some(u) if u.url.is_empty() => {
            errors.push(
                p.upstream.referenced,
                format!("upstreams.{raw}"),
                "needs a `url` or `targets`",
            );
            return None;
        }
        _ => None,
    };
    let target = if let Some(g) = group {
        Target::Group(Box::new(g))
    } else if template.is_literal() {
        match parse_fixed_target(&url) {
            Ok(t) => Target::Fixed(t),
            Err(e) => {
                errors.push(p.upstream.referenced, f, e);
                return None;
            }
        }
    } else {
        let after = match url.split_once("://") {
            Some((s, a)) if s == "http" || s == "https" => a,
            _ => {
                errors.push(
                    p.upstream.referenced,
                    f,
                    format!("{url:?} must start with http:// or https://"),
                );
                return None;
            }
        };
        let (authority, path) = match after.find('/') {
            Some(i) => (&after[..i], &after[i..]),
            None => (after, ""),
        };
        let authority_params = Template::parse(authority)
            .map(|t| t.params().map(str::to_owned).collect())
            .unwrap_or_default();
        Target::Template {
            template,
            authority_params,
            path_is_templated: path.contains('{'),
        }
    };
    let rewrite = match &p.rewrite {
        Some(r) => match Template::parse(&r.value) {
            Ok(t) if r.value.starts_with('/') => {
                if !site.check(&t, r.referenced, format!("{field}.proxy.rewrite"), errors) {
                    return None;
                }
                Some(t)
            }
            Ok(_) => {
                errors.push(
                    r.referenced,
                    format!("{field}.proxy.rewrite"),
                    "must start with `/`",
                );
                return None;
            }
            Err(e) => {
                errors.push(r.referenced, format!("{field}.proxy.rewrite"), e);
                return None;
            }
        },
        None => None,
    };
    if p.strip_prefix.0 && !site.is_prefix {
        errors.push(
            at,
            format!("{field}.proxy.strip_prefix"),
            "needs a `path_prefix` route",
        );
        return None;
    }
    let default_tls = UpstreamTlsConfig::default();
    let (protocol, tls) = match upstream_cfg {
        Some(u) => (u.protocol, &u.tls),
        None => (
            p.protocol.unwrap_or(UpstreamProtocol::Auto),
            p.tls.as_ref().unwrap_or(&default_tls),
        ),
    };
    let pool = match PoolSettings::of(upstream_cfg) {
        Ok(pool) => pool,
        Err((key, e)) => {
            errors.push(p.upstream.referenced, format!("upstreams.{raw}.{key}"), e);
            return None;
        }
    };
    let templated = matches!(target, Target::Template { .. });
    if !templated && (p.targets.is_some() || !p.allow_names.is_empty()) {
        errors.push(
            at,
            format!("{field}.proxy"),
            "`targets` and `allow_names` apply to templated upstreams (`http://{name}:8080`) only",
        );
        return None;
    }
    let mut allow_names = Vec::new();
    for (i, n) in p.allow_names.iter().enumerate() {
        match crate::targets::NamePattern::parse(&n.value) {
            Ok(pattern) => allow_names.push(pattern),
            Err(e) => {
                errors.push(n.referenced, format!("{field}.proxy.allow_names[{i}]"), e);
                return None;
            }
        }
    }
    // Templated upstreams always get address rules (the built-in denials at least).
    let targets = if templated {
        let mut rules = crate::targets::TargetRules::default();
        if let Some(t) = &p.targets {
            for (key, list, out) in [
                ("allow", &t.allow, &mut rules.allow),
                ("deny", &t.deny, &mut rules.deny),
            ] {
                for (i, c) in list.iter().enumerate() {
                    let text = c.value.trim();
                    match text
                        .parse::<IpNet>()
                        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                    {
                        Ok(net) => out.push(net),
                        Err(_) => errors.push(
                            c.referenced,
                            format!("{field}.proxy.targets.{key}[{i}]"),
                            format!("{text:?} is not an IP address or CIDR"),
                        ),
                    }
                }
            }
        }
        Some(Arc::new(rules))
    } else {
        None
    };
    let mut upgrades = Vec::new();
    for u in &p.upgrades {
        let u = u.trim().to_ascii_lowercase();
        if u.is_empty() || !u.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
            errors.push(
                at,
                format!("{field}.proxy.upgrades"),
                format!("{u:?} is not a protocol name"),
            );
            return None;
        }
        upgrades.push(u);
    }
    let settings = ClientSettings {
        protocol,
        ca_file: tls.ca_file.as_ref().map(|c| relative_to(errors.file, c)),
        insecure_skip_verify: tls.insecure_skip_verify.0,
        connect_timeout: p.timeouts.connect.get(),
        pool,
        targets,
    };
    let client = match clients.registry.client(&settings) {
        Ok(c) => c,
        Err(e) => {
            errors.push(p.upstream.referenced, format!("{field}.proxy.tls"), e);
            return None;
        }
    };
    let retry = match &p.retries {
        Some(Toggle::Off) => None,
        Some(Toggle::On(cfg)) => {
            let before = errors.count();
            let r = RetryPolicy::compile(cfg, at, &format!("{field}.proxy.retries"), errors);
            if errors.count() != before {
                return None;
            }
            r
        }
        // Groups of several targets retry on another one by default, like nginx.
        None => match &target {
            Target::Group(g) if g.targets.len() > 1 => {
                RetryPolicy::compile(&RetryConfig::default(), at, field, errors)
            }
            _ => None,
        },
    };
    if let (Target::Group(g), Some(u)) = (&target, upstream_cfg) {
        if !clients.groups.iter().any(|info| info.name == g.name) {
            let active = match &u.health.active {
                Some(a) => Some(crate::health::ActiveCheck::compile(
                    a,
                    p.upstream.referenced,
                    &format!("upstreams.{raw}.health.active"),
                    errors,
                )?),
                None => None,
            };
            clients.groups.push(crate::health::GroupInfo {
                name: g.name.clone(),
                balancer: g.balancer_name(),
                targets: g
                    .targets
                    .iter()
                    .zip(g.states.iter())
                    .zip(u.targets.iter())
                    .map(|((t, s), c)| crate::health::GroupTarget {
                        target: t.clone(),
                        weight: c.value.weight.0,
                        state: s.clone(),
                    })
                    .collect(),
                active,
                client: client.clone(),
                settings: settings.clone(),
            });
        }
    }
    if !clients.used.contains(&settings) {
        clients.used.push(settings);
    }
    Some(ProxyAction {
        target,
        strip_prefix: p.strip_prefix.0,
        rewrite,
        preserve_host: p.preserve_host.0,
        response_timeout: p.timeouts.response.get(),
        idle_timeout: p.timeouts.idle.get(),
        total_timeout: p.timeouts.total.map(|d| d.get()),
        body_timeout: p.timeouts.body.get(),
        tunnel_idle: p.timeouts.tunnel_idle.get(),
        upgrades,
        allow_names,
        retry,
        client,
    })
}

pub fn parse_fixed_target(url: &str) -> Result<FixedTarget, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a valid URL: {e}"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        _ => return Err(format!("{url:?} must start with http:// or https://")),
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{url:?} has no host"))?;
    if authority.host().is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!(
            "{url:?}: an upstream URL cannot have a query string"
        ));
    }
    if authority.as_str().contains('@') {
        // They would never be sent, and would show up in logs as the upstream label.
        return Err("an upstream URL cannot carry credentials (user:password@)".to_owned());
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok(FixedTarget {
        scheme,
        label: Arc::from(authority.as_str()),
        authority,
        base_path,
    })
}
