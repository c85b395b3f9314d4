//! The `respond` action: a fixed response.

use http::header::HeaderName;
use http::{HeaderValue, Method, Response, StatusCode};
use portcullis_config::Location;

use crate::body::Body;
use crate::snapshot::Errors;

pub struct RespondAction {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: bytes::Bytes,
}

pub(crate) fn compile(
    r: &portcullis_config::RespondConfig,
    at: Location,
    field: &str,
    errors: &mut Errors<'_>,
) -> Option<RespondAction> {
    let status = match StatusCode::from_u16(r.status.0) {
        Ok(s) => s,
        Err(_) => {
            errors.push(
                at,
                format!("{field}.respond.status"),
                format!("{} is not an HTTP status", r.status.0),
            );
            return None;
        }
    };
    let mut headers = Vec::new();
    let content_type = r
        .content_type
        .as_ref()
        .map_or("text/plain; charset=utf-8", |c| c.as_str());
    for (k, v) in std::iter::once(("content-type", content_type))
        .chain(r.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    {
        match (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            (Ok(k), Ok(v)) => headers.push((k, v)),
            _ => {
                errors.push(
                    at,
                    format!("{field}.respond.headers.{k}"),
                    "invalid header name or value",
                );
                return None;
            }
        }
    }
    Some(RespondAction {
        status,
        headers,
        body: bytes::Bytes::from(r.body.to_string()),
    })
}

pub fn respond(action: &RespondAction, method: &Method) -> Response<Body> {
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::full(action.body.clone())
    };
    let mut res = Response::new(body);
    *res.status_mut() = action.status;
    for (k, v) in &action.headers {
        res.headers_mut().insert(k.clone(), v.clone());
    }
    res
}
