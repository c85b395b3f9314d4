//! The request path, in one place:
//! listener → normalise → built-in endpoints → route table → policy chain
//! (`on_request` …) → action (`on_upstream_request` per attempt) → `on_response`
//! in reverse, on error envelopes too.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use portcullis_routing::{normalize_path, Lookup};

use crate::body::{Body, BoxError};
use crate::context::RequestCtx;
use crate::error::{ErrorCode, GatewayError};
use crate::policy::Flow;
use crate::snapshot::{Route, Snapshot};
use crate::telemetry::AccessRecord;
use crate::Shared;

/// Facts about the client connection a request arrived on.
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub scheme: &'static str,
    pub peer_headers: Option<crate::forwarded::PeerHeaders>,
    /// Requests in flight, for the connection's idle deadline.
    pub activity: Arc<crate::server::ConnActivity>,
    pub tunnels: crate::tunnel::Tunnels,
}

impl ConnInfo {
    pub fn new(
        peer: SocketAddr,
        local: SocketAddr,
        scheme: &'static str,
        activity: Arc<crate::server::ConnActivity>,
        tunnels: crate::tunnel::Tunnels,
    ) -> Self {
        ConnInfo {
            peer,
            local,
            scheme,
            peer_headers: crate::forwarded::PeerHeaders::new(peer, scheme),
            activity,
            tunnels,
        }
    }
}

/// The response body as sent: counts bytes and completes the access record.
pub struct ResponseBody {
    body: Body,
    record: Option<AccessRecord>,
    in_flight: Option<crate::server::InFlight>,
}

impl Drop for ResponseBody {
    /// One clock read ends both the request's record and its connection's
    /// activity.
    fn drop(&mut self) {
        let now = Instant::now();
        if let Some(record) = self.record.as_mut() {
            record.end = Some(now);
        }
        if let Some(in_flight) = self.in_flight.take() {
            in_flight.end_at(now);
        }
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Some(record) = this.record.as_mut() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        record.bytes += d.len() as u64;
                    }
                }
                Poll::Ready(None) => record.completed = true,
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(request_id = %record.request_id, error = %e, "response body ended with an error");
                }
                Poll::Pending => {}
            }
        }
        if this.body.is_end_stream() {
            if let Some(record) = this.record.as_mut() {
                record.completed = true;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let start = Instant::now();
    let in_flight = conn.activity.begin();
    let snapshot = shared.snapshot.load_full();
    let request_id = request_id(&req, &snapshot.request_id_header);
    let client_ip =
        crate::forwarded::client_ip(conn.peer, req.headers(), &snapshot.trusted_proxies);
    let mut record = AccessRecord {
        shared: shared.clone(),
        start,
        end: None,
        method: req.method().clone(),
        path: String::new(),
        route: None,
        status: 0,
        upstream: None,
        request_id: String::new(),
        principal: None,
        client: client_ip,
        log: snapshot.access_log,
        bytes: 0,
        completed: false,
    };
    let request = Arrived {
        shared: &shared,
        snapshot: &snapshot,
        conn: &conn,
        request_id: &request_id,
        client_ip,
    };
    let mut res = dispatch(request, req, &mut record).await;
    if record
        .route
        .as_ref()
        .is_none_or(|r| Arc::ptr_eq(r, &shared.labels.builtin))
    {
        // No route's chain ran: the defaults' security headers still apply.
        if let Some(security) = &snapshot.security_headers {
            security.apply(conn.scheme, res.headers_mut());
        }
    }
    res.headers_mut()
        .insert(snapshot.request_id_header.clone(), request_id.clone());
    record.status = res.status().as_u16();
    if record.log {
        record.request_id = request_id.to_str().unwrap_or_default().to_owned();
    }
    // hyper never polls a body that is already at its end (redirects, 204, HEAD…).
    Ok(res.map(|body| {
        record.completed = body.is_end_stream();
        ResponseBody {
            body,
            record: Some(record),
            in_flight: Some(in_flight),
        }
    }))
}

/// A client's id is kept if it is short and plain; otherwise a new one is made.
fn request_id(req: &Request<Incoming>, name: &HeaderName) -> HeaderValue {
    if let Some(v) = req.headers().get(name) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
        {
            return v.clone();
        }
    }
    let id = uuid::Uuid::new_v4();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut buf);
    // One allocation holding the bytes; the clones for the upstream request and
    // the response share it (a copied value would allocate again when cloned).
    HeaderValue::from_maybe_shared(Bytes::from_owner(buf))
        .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// What is known of a request before its route: where it came from and its id.
#[derive(Clone, Copy)]
struct Arrived<'a> {
    shared: &'a Arc<Shared>,
    snapshot: &'a Snapshot,
    conn: &'a ConnInfo,
    request_id: &'a HeaderValue,
    client_ip: std::net::IpAddr,
}

/// The one place a [`GatewayError`] becomes the response a client sees.
fn error_response(e: GatewayError, request_id: &HeaderValue) -> Response<Body> {
    let request_id = request_id.to_str().unwrap_or_default();
    if e.code.status().is_server_error() {
        tracing::debug!(request_id, code = e.code.as_str(), "gateway error");
    }
    e.into_response(request_id)
}

async fn dispatch(
    at: Arrived<'_>,
    mut req: Request<Incoming>,
    record: &mut AccessRecord,
) -> Response<Body> {
    let Arrived {
        shared, snapshot, ..
    } = at;
    // A request that already passed through this gateway: a loop.
    if crate::sanitize::via_names(req.headers(), &snapshot.via.id) {
        shared.metrics.loops_detected.inc();
        return error_response(GatewayError::server(ErrorCode::LoopDetected), at.request_id);
    }
    let authority = match crate::authority::request_authority(&req) {
        Ok(a) => a,
        Err(e) => return error_response(e, at.request_id),
    };
    // Before anything of ours is added: `Connection`-named, underscored, identity and
    // rewrite headers of the client go.
    let upgrade = crate::action::proxy::upgrade_requested(&req);
    let peer_trusted = crate::forwarded::is_trusted(at.conn.peer, &snapshot.trusted_proxies);
    if let Err(e) =
        crate::sanitize::client_headers(req.headers_mut(), &snapshot.header_rules, peer_trusted)
    {
        return error_response(e, at.request_id);
    }
    // The URI is cheap to clone (shared bytes) and lets the path borrow outlive `req`.
    let uri = req.uri().clone();
    let path = match normalize_path(uri.path(), snapshot.normalize) {
        Ok(p) => p,
        Err(e) => {
            let e = GatewayError::new(ErrorCode::InvalidPath, e.to_string());
            return error_response(e, at.request_id);
        }
    };
    if record.log {
        record.path = path.to_string();
    }

    if let Some(res) = builtin(shared, snapshot, &path, req.headers()).await {
        record.route = Some(shared.labels.builtin.clone());
        return res.unwrap_or_else(|e| error_response(e, at.request_id));
    }

    // `port:` on a route is the listener's port, never what a client writes in Host.
    let host = authority.as_ref().map(|a| a.host());
    let port = Some(at.conn.local.port());
    let found = match snapshot.routes.lookup(host, port, req.method(), &path) {
        Lookup::Found(m) => m,
        Lookup::MethodNotAllowed { allowed } => {
            // A CORS preflight for a route that lists its methods: the route of the
            // method the browser asks about answers it, when that route has CORS.
            match preflight_route(&req).map(|m| snapshot.routes.lookup(host, port, &m, &path)) {
                Some(Lookup::Found(m)) if m.value.chain.cors().is_some() => m,
                _ => return error_response(method_not_allowed(&allowed), at.request_id),
            }
        }
        Lookup::NotFound => {
            let e = GatewayError::new(ErrorCode::NotFound, "no route matches this request");
            return error_response(e, at.request_id);
        }
    };
    let route: &Route = found.value;
    record.route = Some(route.metrics.clone());

    let mut ctx = RequestCtx {
        shared,
        snapshot,
        conn: at.conn,
        request_id: at.request_id,
        client_ip: at.client_ip,
        method: req.method().clone(),
        authority: authority.map(|a| a.value),
        upgrade,
        origin: req.headers().get(header::ORIGIN).cloned(),
        path: &path,
        path_changed: matches!(path, std::borrow::Cow::Owned(_)),
        query: uri.query().map(std::borrow::Cow::Borrowed),
        route,
        params: &found.params,
        rest: found.rest,
        identity: None,
        limits: Default::default(),
        cache: Default::default(),
        compress: Default::default(),
        cors: Default::default(),
        body: None,
        record,
    };
    run_chain(&mut ctx, req).await
}

/// The executor: `on_request` front to back (any policy may answer), the action,
/// then `on_response` back to front for every policy that ran — error envelopes
/// included.
async fn run_chain(ctx: &mut RequestCtx<'_>, mut req: Request<Incoming>) -> Response<Body> {
    let route = ctx.route;
    let policies = route.chain.policies();
    let mut ran = 0;
    let mut answer = None;
    for policy in policies {
        ran += 1;
        match policy.on_request(ctx, &mut req).await {
            Ok(Flow::Continue) => {}
            Ok(Flow::Respond(res)) => {
                answer = Some(Ok(*res));
                break;
            }
            Err(e) => {
                answer = Some(Err(e));
                break;
            }
        }
    }
    let result = match answer {
        Some(a) => a,
        None => route.action.run(ctx, req).await,
    };
    let mut res = result.unwrap_or_else(|e| error_response(e, ctx.request_id));
    for policy in policies[..ran].iter().rev() {
        policy.on_response(ctx, &mut res);
    }
    res
}

/// The method a CORS preflight asks about.
fn preflight_route(req: &Request<Incoming>) -> Option<Method> {
    if req.method() != Method::OPTIONS || !req.headers().contains_key(header::ORIGIN) {
        return None;
    }
    let asked = req.headers().get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
    Method::from_bytes(asked.as_bytes()).ok()
}

fn method_not_allowed(allowed: &[Method]) -> GatewayError {
    let allow = allowed
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let mut err = GatewayError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this path",
    );
    if let Ok(v) = HeaderValue::from_str(&allow) {
        err = err.with_header(header::ALLOW, v);
    }
    err
}

/// Health, liveness, readiness and (when configured on the main listener) metrics.
async fn builtin(
    shared: &Shared,
    snapshot: &Snapshot,
    path: &str,
    headers: &http::HeaderMap,
) -> Option<Result<Response<Body>, GatewayError>> {
    if let Some(h) = &snapshot.health {
        if path == h.health || path == h.liveness {
            return Some(Ok(text(StatusCode::OK, "OK")));
        }
        if path == h.readiness {
            return Some(readiness(shared).await);
        }
    }
    if snapshot.metrics_on_main && snapshot.metrics_path.as_deref() == Some(path) {
        if let Some(token) = snapshot
            .admin
            .as_ref()
            .and_then(|a| a.metrics_token.as_ref())
        {
            if let Err(e) = crate::admin::bearer_matches(headers, token) {
                return Some(Err(e));
            }
        }
        return Some(Ok(metrics(shared)));
    }
    None
}

pub async fn readiness(shared: &Shared) -> Result<Response<Body>, GatewayError> {
    if shared.check_ready().await {
        Ok(text(StatusCode::OK, "ready"))
    } else {
        Err(GatewayError::server(ErrorCode::ServiceUnavailable))
    }
}

pub fn metrics(shared: &Shared) -> Response<Body> {
    crate::health::refresh_gauges(&shared.snapshot.load().groups, &shared.metrics);
    let mut res = Response::new(Body::full(shared.metrics.encode()));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    res
}

pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut res = Response::new(Body::full(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}
