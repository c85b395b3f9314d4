//! The `redirect` action: `Location` rendered from the path's params.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::body::Body;
use crate::error::{ErrorCode, GatewayError};
use crate::snapshot::Errors;
use crate::template::Template;

pub struct RedirectAction {
    pub to: Template,
    pub status: StatusCode,
    pub keep_query: bool,
}

pub(crate) fn compile(
    r: &portcullis_config::RedirectConfig,
    site: &super::RouteSite<'_>,
    errors: &mut Errors<'_>,
) -> Option<RedirectAction> {
    let (at, field) = (site.at, site.field);
    let f = format!("{field}.redirect");
    let status = match StatusCode::from_u16(r.status.0) {
        Ok(s) if s.is_redirection() => s,
        _ => {
            errors.push(
                at,
                format!("{f}.status"),
                format!(
                    "{} is not a redirect status (301, 302, 303, 307, 308)",
                    r.status.0
                ),
            );
            return None;
        }
    };
    let to = match Template::parse(&r.to.value) {
        Ok(t) => t,
        Err(e) => {
            errors.push(r.to.referenced, format!("{f}.to"), e);
            return None;
        }
    };
    if !site.check(&to, r.to.referenced, format!("{f}.to"), errors) {
        return None;
    }
    Some(RedirectAction {
        to,
        status,
        keep_query: r.keep_query.0,
    })
}

pub fn redirect(
    action: &RedirectAction,
    params: &[(&str, &str)],
    rest: Option<&str>,
    query: Option<&str>,
) -> Result<Response<Body>, GatewayError> {
    let mut location = action
        .to
        .render(|name| crate::template::param_value(params, rest, name));
    if let (true, Some(q)) = (action.keep_query, query) {
        location.push(if location.contains('?') { '&' } else { '?' });
        location.push_str(q);
    }
    let mut res = Response::new(Body::empty());
    *res.status_mut() = action.status;
    // Captured params are normalised path bytes, so this only fails for a `to:` the
    // config check let through; it is logged, and the client gets the usual envelope.
    let location = HeaderValue::from_str(&location).map_err(|_| {
        tracing::error!(to = %location, "redirect target is not a valid Location header");
        GatewayError::server(ErrorCode::InternalError)
    })?;
    res.headers_mut().insert(header::LOCATION, location);
    Ok(res)
}
