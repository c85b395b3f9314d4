//! The `static` action: files from a directory, with SPA fallback.

use std::path::PathBuf;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use portcullis_config::Location;

use crate::body::Body;
use crate::error::{ErrorCode, GatewayError};
use crate::snapshot::{relative_to, Errors};

pub struct StaticAction {
    pub dir: PathBuf,
    pub index: String,
    pub spa_fallback: bool,
    pub cache_control: Option<HeaderValue>,
    /// Serve paths with a segment starting with `.` (`.env`, `.git/`).
    pub dotfiles: bool,
}

pub(crate) fn compile(
    s: &portcullis_config::StaticConfig,
    at: Location,
    field: &str,
    errors: &mut Errors<'_>,
) -> Option<StaticAction> {
    let dir = PathBuf::from(relative_to(errors.file, &s.dir.value));
    if !dir.is_dir() {
        errors.push(
            s.dir.referenced,
            format!("{field}.static.dir"),
            format!("{} is not a directory", dir.display()),
        );
        return None;
    }
    let cache_control = match &s.cache_control {
        Some(c) => match HeaderValue::from_str(c) {
            Ok(v) => Some(v),
            Err(_) => {
                errors.push(
                    at,
                    format!("{field}.static.cache_control"),
                    "not a valid header value",
                );
                return None;
            }
        },
        None => None,
    };
    Some(StaticAction {
        dir,
        index: s.index.to_string(),
        spa_fallback: s.spa_fallback.0,
        cache_control,
        dotfiles: s.dotfiles == portcullis_config::Dotfiles::Allow,
    })
}

pub async fn serve_static(
    action: &StaticAction,
    path: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, GatewayError> {
    use tower::ServiceExt;
    use tower_http::services::{ServeDir, ServeFile};

    let path = if path.is_empty() { "/" } else { path };
    // `.env`, `.git/config`, `.htpasswd`: never served unless the route says so.
    if !action.dotfiles && path.split('/').any(|seg| seg.starts_with('.')) {
        return Err(GatewayError::new(ErrorCode::NotFound, "file not found"));
    }
    let (mut parts, _body) = req.into_parts();
    parts.uri = path
        .parse()
        .map_err(|_| GatewayError::new(ErrorCode::InvalidPath, "invalid path"))?;
    let request = Request::from_parts(parts, http_body_util::Empty::<Bytes>::new());
    let dir = ServeDir::new(&action.dir)
        .append_index_html_on_directories(true)
        .precompressed_gzip()
        .precompressed_br();
    let response = if action.spa_fallback && !has_extension(path) {
        let index = ServeFile::new(action.dir.join(&action.index));
        dir.fallback(index).oneshot(request).await
    } else {
        dir.oneshot(request).await
    };
    let response = response.map_err(|e| {
        tracing::warn!(error = %e, "static file error");
        GatewayError::server(ErrorCode::InternalError)
    })?;
    // Every error goes out in the one envelope, not as ServeDir's empty bodies.
    match response.status() {
        StatusCode::NOT_FOUND => {
            return Err(GatewayError::new(ErrorCode::NotFound, "file not found"))
        }
        StatusCode::METHOD_NOT_ALLOWED => {
            return Err(GatewayError::new(
                ErrorCode::MethodNotAllowed,
                "static files answer GET and HEAD only",
            )
            .with_header(header::ALLOW, HeaderValue::from_static("GET, HEAD")))
        }
        s if s.is_server_error() => {
            tracing::warn!(status = s.as_u16(), "static file could not be served");
            return Err(GatewayError::server(ErrorCode::InternalError));
        }
        s if s.is_client_error() && s != StatusCode::RANGE_NOT_SATISFIABLE => {
            return Err(GatewayError::new(
                ErrorCode::BadRequest,
                "the request cannot be served from files",
            ));
        }
        _ => {}
    }
    let mut response = response.map(Body::boxed);
    if let Some(cc) = &action.cache_control {
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, cc.clone());
    }
    Ok(response)
}

/// SPA fallback applies to page-like paths only: a missing `/app.js` stays a 404.
fn has_extension(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|last| last.contains('.'))
}
