//! The admin listener: `/admin/config`, `/admin/routes`, `/admin/reload`,
//! `/admin/apikeys`, `/admin/cache` (purge), `/admin/upstreams`, `/admin/health`
//! (upstream targets), metrics and
//! health. Admin endpoints need the admin token; health and metrics do not.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::body::Body;
use crate::error::{ErrorCode, GatewayError};
use crate::service::{metrics, readiness, text};
use crate::Shared;

/// Connections the admin listener serves at once.
const ADMIN_MAX_CONNECTIONS: usize = 256;

/// The admin listener gets the main listeners' protections: accept back-off, the
/// header and idle deadlines, and the drain on shutdown.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    alive: tokio::sync::mpsc::Sender<()>,
) {
    // A cap of its own: the admin listener never shares the main listeners' slots
    // (traffic there must not lock operators out), but is bounded too.
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    while let Some((stream, peer)) = crate::server::accept(&listener, &mut stop).await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(peer = %peer, "admin connection limit reached; closed");
            continue;
        };
        let shared = shared.clone();
        let stop = stop.clone();
        let alive = alive.clone();
        tokio::spawn(async move {
            let _alive = alive;
            let _slot = slot;
            let (header_timeout, idle, send) = {
                let s = shared.snapshot.load();
                (s.header_read_timeout, s.idle_timeout, s.send_timeout)
            };
            let stream = crate::server::SendDeadline::new(stream, send);
            let activity = Arc::new(crate::server::ConnActivity::default());
            let in_service = activity.clone();
            let service = service_fn(move |req| {
                let shared = shared.clone();
                let in_flight = in_service.begin();
                async move {
                    let res = route(&shared, req).await;
                    drop(in_flight);
                    Ok::<_, Infallible>(res)
                }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            builder.http2().timer(TokioTimer::new());
            crate::drive!(
                builder.serve_connection(TokioIo::new(stream), service),
                stop,
                peer,
                activity,
                header_timeout,
                idle
            );
        });
    }
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let snapshot = shared.snapshot.load_full();
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/health" | "/healthz") => return text(StatusCode::OK, "OK"),
        (&Method::GET, "/readyz") => {
            return readiness(shared)
                .await
                .unwrap_or_else(|e| e.into_response(""))
        }
        (&Method::GET, p)
            if snapshot.metrics_path.as_deref() == Some(p) && !snapshot.metrics_on_main =>
        {
            let token = snapshot
                .admin
                .as_ref()
                .and_then(|a| a.metrics_token.as_ref());
            if let Some(token) = token {
                if let Err(e) = bearer_matches(req.headers(), token) {
                    return e.into_response("");
                }
            }
            return metrics(shared);
        }
        _ => {}
    }
    if !path.starts_with("/admin/") {
        return GatewayError::new(ErrorCode::NotFound, "no such admin endpoint").into_response("");
    }
    if let Err(e) = authorize(&snapshot, &req) {
        return e.into_response("");
    }
    match (req.method(), path) {
        (&Method::GET, "/admin/config") => {
            // Secrets serialise as "<redacted>".
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "source": snapshot.source.display().to_string(),
                    "config": &snapshot.config,
                }),
            )
        }
        (&Method::GET, "/admin/routes") => {
            let routes: Vec<_> = crate::snapshot::describe_routes(&snapshot)
                .into_iter()
                .map(|[name, host, path, methods, auth, action]| {
                    serde_json::json!({"name": name, "host": host, "path": path, "methods": methods, "auth": auth, "action": action})
                })
                .collect();
            json(StatusCode::OK, &serde_json::json!({ "routes": routes }))
        }
        (&Method::POST, "/admin/reload") => match shared.reload(false).await {
            Ok(generation) => json(
                StatusCode::OK,
                &serde_json::json!({"status": "reloaded", "generation": generation}),
            ),
            Err(errors) => {
                let list: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
                GatewayError::new(
                    ErrorCode::InvalidConfig,
                    "the new config is invalid; the running config was kept",
                )
                .with_details(list)
                .into_response("")
            }
        },
        (&Method::GET, "/admin/apikeys") => match api_keys(shared).list().await {
            Ok(list) => json(StatusCode::OK, &serde_json::json!({ "keys": list })),
            Err(e) => store_error(e),
        },
        (&Method::POST, "/admin/apikeys") => create_key(shared, req).await,
        (&Method::DELETE, p) if p.starts_with("/admin/apikeys/") => {
            let id = &p["/admin/apikeys/".len()..];
            match api_keys(shared).revoke(id).await {
                Ok(true) => json(
                    StatusCode::OK,
                    &serde_json::json!({"status": "revoked", "id": id}),
                ),
                Ok(false) | Err(portcullis_auth::apikey::ApiKeyError::InvalidFormat) => {
                    GatewayError::new(ErrorCode::NotFound, "no such key").into_response("")
                }
                Err(e) => store_error(e),
            }
        }
        (&Method::DELETE, "/admin/cache") => purge_cache(shared, req.uri().query()).await,
        (&Method::GET, "/admin/pipelines") => list_pipelines(shared).await,
        (_, p) if p.starts_with("/admin/pipelines/") => {
            let name = p["/admin/pipelines/".len()..].to_owned();
            pipeline(shared, req, &name).await
        }
        (&Method::GET, "/admin/upstreams") => json(
            StatusCode::OK,
            &crate::health::admin_view(&shared.snapshot.load().groups),
        ),
        (&Method::GET, "/admin/health") => json(
            StatusCode::OK,
            &crate::health::health_view(&shared.snapshot.load().groups),
        ),
        (
            _,
            "/admin/config" | "/admin/routes" | "/admin/reload" | "/admin/apikeys" | "/admin/cache"
            | "/admin/upstreams" | "/admin/health" | "/admin/pipelines",
        ) => GatewayError::new(ErrorCode::MethodNotAllowed, "method not allowed").into_response(""),
        _ => GatewayError::new(ErrorCode::NotFound, "no such admin endpoint").into_response(""),
    }
}

async fn list_pipelines(shared: &Shared) -> Response<Body> {
    let store = crate::pipelines::PipelineStore::new(shared.store());
    match store.list(10_000).await {
        Ok(list) => {
            let mut out = serde_json::Map::new();
            for (name, def) in list {
                let v = match def {
                    Ok(d) => serde_json::json!(d),
                    Err(e) => serde_json::json!({"unreadable": e}),
                };
                out.insert(name, v);
            }
            json(StatusCode::OK, &serde_json::json!({ "pipelines": out }))
        }
        Err(e) => pipeline_store_error(&e),
    }
}

/// `GET`, `PUT` (body: `{"mode", "steps"}`) and `DELETE /admin/pipelines/<name>`.
async fn pipeline(shared: &Shared, req: Request<Incoming>, name: &str) -> Response<Body> {
    let store = crate::pipelines::PipelineStore::new(shared.store());
    if !crate::pipelines::name_ok(name) {
        return GatewayError::new(ErrorCode::NotFound, "no such pipeline").into_response("");
    }
    match req.method().clone() {
        Method::GET => match store.get(name).await {
            Ok(Some(def)) => json(StatusCode::OK, &serde_json::json!(def)),
            Ok(None) => {
                GatewayError::new(ErrorCode::NotFound, "no such pipeline").into_response("")
            }
            Err(e) => pipeline_store_error(&e),
        },
        Method::PUT => {
            let body = match crate::body::read_small(req.into_body(), 64 * 1024).await {
                Ok(b) => b,
                Err(e) => return e.into_response(""),
            };
            let def = match crate::pipelines::Definition::parse(&body) {
                Ok(d) => d,
                Err(e) => return GatewayError::new(ErrorCode::BadRequest, e).into_response(""),
            };
            match store.put(name, &def).await {
                Ok(()) => json(
                    StatusCode::OK,
                    &serde_json::json!({"status": "stored", "name": name, "pipeline": def}),
                ),
                Err(crate::pipelines::PutError::Invalid(e)) => {
                    GatewayError::new(ErrorCode::BadRequest, e).into_response("")
                }
                Err(crate::pipelines::PutError::Store(e)) => pipeline_store_error(&e),
            }
        }
        Method::DELETE => match store.delete(name).await {
            Ok(true) => json(
                StatusCode::OK,
                &serde_json::json!({"status": "removed", "name": name}),
            ),
            Ok(false) => {
                GatewayError::new(ErrorCode::NotFound, "no such pipeline").into_response("")
            }
            Err(e) => pipeline_store_error(&e),
        },
        _ => GatewayError::new(ErrorCode::MethodNotAllowed, "method not allowed").into_response(""),
    }
}

fn pipeline_store_error(e: &portcullis_store::StoreError) -> Response<Body> {
    tracing::warn!(error = %e, "pipeline store operation failed");
    GatewayError::server(ErrorCode::ServiceUnavailable).into_response("")
}

/// `DELETE /admin/cache[?route=NAME[&path=/p?q]]`: everything, a route's entries, or
/// one path of a route (every host, principal and variant of it).
async fn purge_cache(shared: &Shared, query: Option<&str>) -> Response<Body> {
    let mut route = None;
    let mut path = None;
    for (k, v) in query.map(parse_query).unwrap_or_default() {
        match k.as_str() {
            "route" => route = Some(v),
            "path" => path = Some(v),
            _ => {
                return GatewayError::new(
                    ErrorCode::BadRequest,
                    format!("unknown parameter {k:?} (expected route, path)"),
                )
                .into_response("")
            }
        }
    }
    if path.is_some() && route.is_none() {
        return GatewayError::new(ErrorCode::BadRequest, "`path` needs `route`").into_response("");
    }
    if let Some(r) = &route {
        let snapshot = shared.snapshot.load();
        if !crate::snapshot::describe_routes(&snapshot)
            .iter()
            .any(|[name, ..]| name == r)
        {
            return GatewayError::new(ErrorCode::NotFound, format!("no route named {r:?}"))
                .into_response("");
        }
    }
    match shared
        .policies
        .cache
        .purge(&**shared.store(), route.as_deref(), path.as_deref())
        .await
    {
        Ok(deleted) => json(
            StatusCode::OK,
            &serde_json::json!({"status": "purged", "route": route, "path": path, "store_entries_deleted": deleted}),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "admin: cache purge in the store failed");
            GatewayError::server(ErrorCode::ServiceUnavailable).into_response("")
        }
    }
}

/// `a=1&b=%2Fx` → pairs, percent-decoded (`+` is a space).
fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

fn authorize(
    snapshot: &crate::snapshot::Snapshot,
    req: &Request<Incoming>,
) -> Result<(), GatewayError> {
    let Some(token) = snapshot.admin.as_ref().and_then(|a| a.token.as_ref()) else {
        return Err(GatewayError::new(
            ErrorCode::Forbidden,
            "the admin API is disabled: set admin.token",
        ));
    };
    bearer_matches(req.headers(), token)
}

/// `Authorization: Bearer <token>`, compared in constant time.
pub fn bearer_matches(headers: &http::HeaderMap, token: &[u8]) -> Result<(), GatewayError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .filter(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
        .map(|v| v[7..].trim_ascii());
    match presented {
        Some(p) if bool::from(p.ct_eq(token)) => Ok(()),
        _ => Err(
            GatewayError::new(ErrorCode::Unauthorized, "admin token required")
                .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")),
        ),
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut res = Response::new(Body::full(Bytes::from(
        serde_json::to_vec_pretty(value).unwrap_or_default(),
    )));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// The running snapshot's keys: revoking through them also clears the cache the
/// authenticators verify with.
fn api_keys(shared: &Shared) -> portcullis_auth::apikey::ApiKeys {
    shared.snapshot.load().api_keys.clone()
}

fn store_error(e: portcullis_auth::apikey::ApiKeyError) -> Response<Body> {
    tracing::warn!(error = %e, "admin: API key store operation failed");
    GatewayError::server(ErrorCode::ServiceUnavailable).into_response("")
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    principal: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    /// Unix timestamp.
    #[serde(default)]
    expires_at: Option<u64>,
    #[serde(default)]
    limit: Option<u64>,
    /// Seconds.
    #[serde(default)]
    window: Option<u64>,
}

/// `POST /admin/apikeys` `{principal, name?, scopes?, expires_at?, limit?, window?}` →
/// 201 `{key, record}`; the raw key is in this response only.
async fn create_key(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let bytes = match crate::body::read_small(req.into_body(), 64 * 1024).await {
        Ok(b) => b,
        Err(e) => return e.into_response(""),
    };
    let body: CreateKey = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        Err(e) => {
            return GatewayError::new(ErrorCode::BadRequest, format!("invalid request: {e}"))
                .into_response("")
        }
    };
    let quota = match (body.limit, body.window) {
        (Some(limit), Some(window_secs)) => {
            Some(portcullis_auth::apikey::Quota { limit, window_secs })
        }
        (None, None) => None,
        _ => {
            return GatewayError::new(
                ErrorCode::BadRequest,
                "set both `limit` and `window`, or neither",
            )
            .into_response("")
        }
    };
    let new = portcullis_auth::apikey::NewKey {
        principal: body.principal,
        name: body.name,
        scopes: body.scopes,
        expires_at: body.expires_at,
        quota,
    };
    match api_keys(shared).create(new).await {
        Ok((key, record)) => json(
            StatusCode::CREATED,
            &serde_json::json!({"key": key, "record": record}),
        ),
        Err(portcullis_auth::apikey::ApiKeyError::Invalid(m)) => {
            GatewayError::new(ErrorCode::BadRequest, m).into_response("")
        }
        Err(e) => store_error(e),
    }
}
