//! The proxy action: rewrite the request for the upstream, send it, stream the
//! response back. Bodies are never buffered; `Upgrade` (WebSocket) is tunnelled.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use portcullis_upstream::Outcome;

use super::retry::{target_outcome, RetryPolicy, MAX_ATTEMPTS};

use crate::body::{find_cause, Body, BodyTooLarge, DeadlineExceeded, IdleTimedOut, IdleTimeout};
use crate::context::RequestCtx;
use crate::error::{ErrorCode, GatewayError};
use crate::forwarded;
use crate::telemetry::UpstreamErrorLabels;
use crate::template::Template;
use crate::upstream::{PooledBody, UpstreamClient, UpstreamError};

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
    let mut next = upstream_uri(
        action,
        ctx,
        req.uri(),
        Some(req.headers()),
        &[],
        &Extra::default(),
    )?;

    let (mut parts, body) = req.into_parts();
    let original_uri = std::mem::take(&mut parts.uri);
    // Hop-by-hop headers were removed when the request arrived (crate::sanitize),
    // before the gateway added its own.
    if let Some(protocol) = &upgrade {
        parts.headers.insert(header::UPGRADE, protocol.clone());
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    set_upstream_headers(ctx, &mut parts.headers, parts.version, action.preserve_host);
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
    // A body a policy already read (validation) is sent as read.
    if let Some(bytes) = ctx.body.take() {
        replay = Some(bytes);
        body = None;
    }
    if let Some(r) = retry {
        let empty = body.as_ref().is_some_and(http_body::Body::is_end_stream);
        if empty {
            replay = Some(Bytes::new());
        } else if declared_len.is_some_and(|len| len <= r.replay_buffer) {
            if let Some(b) = body.take() {
                replay = Some(read_replay(streamed(b)).await?);
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
        // An event stream may be asked for again (resumption): GETs only.
        let again = match &action.sse {
            Some(s) if s.resume && head.method == http::Method::GET => Some(clone_head(&head)),
            _ => None,
        };
        let attempt_body = match (&replay, body.take()) {
            (Some(bytes), _) if bytes.is_empty() => Body::empty(),
            (Some(bytes), _) => Body::full(bytes.clone()),
            (None, Some(b)) => streamed(b),
            (None, None) => Body::empty(),
        };
        let upstream_req = Request::from_parts(head, attempt_body);

        // One clock read per attempt serves its deadline and its latency.
        let started = Instant::now();
        let respond_by = tokio::time::Instant::from_std(started) + action.response_timeout;
        let respond_by = deadline.map_or(respond_by, |d| d.min(respond_by));
        let result = tokio::time::timeout_at(respond_by, action.client.request(upstream_req)).await;
        let index = picked.as_ref().map(|p| p.index);
        // The attempt's result, and why it may be retried.
        let (outcome, reason): (Result<Response<PooledBody>, GatewayError>, &'static str) =
            match result {
                Ok(Ok(res)) => {
                    let status = res.status();
                    let took = started.elapsed();
                    if let Some(p) = picked {
                        p.done(target_outcome(status), took);
                    }
                    let retryable =
                        more && retry.is_some_and(|r| r.statuses.contains(&status.as_u16()));
                    if !retryable {
                        let res = respond(action, ctx, res, took, deadline, client_upgrade, tunnel);
                        return Ok(event_stream(action, ctx, res, again, deadline));
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
            Ok(res) => Ok(event_stream(
                action,
                ctx,
                respond(
                    action,
                    ctx,
                    res,
                    started.elapsed(),
                    deadline,
                    client_upgrade,
                    tunnel,
                ),
                again,
                deadline,
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
            &Extra::default(),
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

/// What every request the gateway sends upstream carries (proxy attempts and
/// pipeline steps): no session cookies, `Via`, the forwarding headers, the request
/// id, and `Host` only when the route preserves it.
pub(crate) fn set_upstream_headers(
    ctx: &RequestCtx<'_>,
    headers: &mut HeaderMap,
    version: Version,
    preserve_host: bool,
) {
    // No upstream ever sees a browser session's cookies, on any route (a public
    // route, another authenticator's, `forward_credential`): it could replay them.
    if !ctx.snapshot.session_cookies.cookies.is_empty() {
        crate::auth::remove_credentials(headers, &ctx.snapshot.session_cookies);
    }
    headers.append(header::VIA, ctx.snapshot.via.for_version(version).clone());
    forwarded::set_forwarding_headers(
        headers,
        ctx.conn.peer,
        ctx.client_ip,
        ctx.conn.scheme,
        ctx.authority.as_ref(),
        &ctx.snapshot.trusted_proxies,
        ctx.conn.peer_headers.as_ref(),
    );
    headers.insert(
        ctx.snapshot.request_id_header.clone(),
        ctx.request_id.clone(),
    );
    match (preserve_host, &ctx.authority) {
        (true, Some(h)) => {
            headers.insert(header::HOST, h.clone());
        }
        (true, None) => {}
        // hyper sets Host (or :authority) from the upstream URI.
        (false, _) => {
            headers.remove(header::HOST);
        }
    }
}

/// The response head arrived: hand tunnels over, strip hop-by-hop headers, stream.
fn respond(
    action: &ProxyAction,
    ctx: &RequestCtx<'_>,
    mut res: Response<PooledBody>,
    took: Duration,
    deadline: Option<tokio::time::Instant>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    tunnel: Option<crate::tunnel::Tunnel>,
) -> Response<Body> {
    let route = &ctx.route.name;
    ctx.route
        .metrics
        .observe_upstream(&ctx.shared.metrics, took.as_secs_f64());

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

/// On a route with `sse`, an event stream goes through [`sse::stream`].
fn event_stream(
    action: &ProxyAction,
    ctx: &RequestCtx<'_>,
    res: Response<Body>,
    again: Option<http::request::Parts>,
    deadline: Option<tokio::time::Instant>,
) -> Response<Body> {
    let Some(policy) = &action.sse else {
        return res;
    };
    if !sse::applies(&res) {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let Body::Upstream(upstream) = body else {
        return Response::from_parts(parts, body);
    };
    // The length of a stream cut into events and heartbeats is not the upstream's.
    parts.headers.remove(header::CONTENT_LENGTH);
    let again = again.map(|mut head| {
        // Asked again without a body.
        head.headers.remove(header::CONTENT_LENGTH);
        head.headers.remove(header::TRANSFER_ENCODING);
        sse::Again {
            client: action.client.clone(),
            head,
            idle: action.idle_timeout,
            response_timeout: action.response_timeout,
            deadline,
        }
    });
    let body = sse::stream(policy.clone(), upstream, again, ctx.route.name.clone());
    Response::from_parts(parts, body)
}

/// A copy of the request head for one attempt (extensions are not carried).
pub(crate) fn clone_head(p: &http::request::Parts) -> http::request::Parts {
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = p.method.clone();
    head.uri = p.uri.clone();
    head.version = p.version;
    head.headers = p.headers.clone();
    head
}

/// Reads a body of known, small length (its `Content-Length`, enforced by hyper, is
/// within the replay buffer) into memory so a retry can send it again.
async fn read_replay(body: Body) -> Result<Bytes, GatewayError> {
    use http_body_util::BodyExt;
    match body.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(body_error(&*e).unwrap_or_else(|| {
            GatewayError::new(ErrorCode::BadRequest, "the request body is incomplete")
        })),
    }
}

/// The answer when the client's body (its size, its silence) or the route's total
/// deadline ended the exchange; `None` when the error is the upstream's.
pub(crate) fn body_error(err: &(dyn std::error::Error + 'static)) -> Option<GatewayError> {
    if find_cause::<BodyTooLarge>(err).is_some() {
        return Some(GatewayError::new(
            ErrorCode::PayloadTooLarge,
            "request body too large",
        ));
    }
    if find_cause::<IdleTimedOut>(err).is_some() {
        return Some(GatewayError::new(
            ErrorCode::RequestTimeout,
            "request body not received in time",
        ));
    }
    if find_cause::<DeadlineExceeded>(err).is_some() {
        return Some(GatewayError::server(ErrorCode::UpstreamTimeout));
    }
    None
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
    if let Some(e) = body_error(err) {
        if e.code == ErrorCode::UpstreamTimeout {
            count_error(metrics, route, "timeout");
        }
        return e;
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

pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
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

/// What pipeline steps and aggregation parts add to a request's own URI inputs.
#[derive(Default)]
pub(crate) struct Extra<'a> {
    /// Params looked up before the route's (`{step}`, `{user.team_id}`).
    pub params: &'a [(&'a str, &'a str)],
    /// The client's query string is not sent (the path template carries its own).
    pub no_query: bool,
}

/// The URI of one attempt: a group's pick, a fixed target, or a rendered template.
pub(crate) fn upstream_uri<'a>(
    action: &'a ProxyAction,
    f: &RequestCtx<'_>,
    original: &Uri,
    headers: Option<&HeaderMap>,
    tried: &[usize],
    extra: &Extra<'_>,
) -> Result<(Uri, Arc<str>, Option<super::group::Picked<'a>>), GatewayError> {
    let lookup = |name: &str| {
        extra
            .params
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .or_else(|| crate::template::param_value(f.params, f.rest, name))
    };
    let query = if extra.no_query {
        None
    } else {
        f.query.as_deref()
    };
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
    let path_unchanged =
        action.rewrite.is_none() && !action.strip_prefix && !f.path_changed && !extra.no_query;

    let fixed = |t: &FixedTarget| -> Result<(Uri, Arc<str>), GatewayError> {
        let pq = if path_unchanged && t.base_path.is_empty() {
            original
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"))
        } else {
            build_pq(&t.base_path, &request_path, query)?
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
                build_pq("", parsed.path(), query)?
            } else {
                build_pq(parsed.path().trim_end_matches('/'), &request_path, query)?
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
    /// Event streams forwarded event by event, resumed, with heartbeats.
    pub sse: Option<sse::SsePolicy>,
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

mod compile;
pub mod sse;
pub(crate) use compile::compile;
pub use compile::parse_fixed_target;
