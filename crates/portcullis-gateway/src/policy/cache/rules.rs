//! What may be stored, and for how long (RFC 9111 for a shared cache).

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;

use super::keys::vary_names;

pub(super) fn cache_control_has(headers: &HeaderMap, directive: &str) -> bool {
    headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|d| {
                d.split('=')
                    .next()
                    .is_some_and(|n| n.trim().eq_ignore_ascii_case(directive))
            })
        })
    })
}

/// Statuses stored with the route's `ttl` when the upstream gives no freshness.
pub(super) fn cacheable_by_default(status: StatusCode) -> bool {
    matches!(status.as_u16(), 200 | 203)
}

/// Statuses stored only when the upstream gives explicit freshness.
pub(super) fn cacheable_if_explicit(status: StatusCode) -> bool {
    matches!(status.as_u16(), 300 | 301 | 308 | 404 | 410)
}

/// How long a response may be stored (its freshness left now, and its age), or
/// `None` when it must not be: RFC 9111 for a shared cache, with `ttl` as the
/// lifetime when the upstream gives none.
pub(crate) fn storable(
    request: &http::request::Parts,
    status: StatusCode,
    headers: &HeaderMap,
    ttl: Duration,
    cache_set_cookie: bool,
    now: SystemTime,
) -> Option<(Duration, Duration)> {
    let explicit = cache_control_has(headers, "max-age")
        || cache_control_has(headers, "s-maxage")
        || headers.contains_key(header::EXPIRES);
    if !(cacheable_by_default(status) || explicit && cacheable_if_explicit(status)) {
        return None;
    }
    if headers.contains_key(header::SET_COOKIE) && !cache_set_cookie {
        return None;
    }
    vary_names(headers)?;
    // `Pragma: no-cache` counts as `no-cache` when there is no Cache-Control.
    if !headers.contains_key(header::CACHE_CONTROL)
        && headers.get_all(header::PRAGMA).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.to_ascii_lowercase().contains("no-cache"))
        })
    {
        return None;
    }
    let mut view = http::Response::new(());
    *view.status_mut() = status;
    *view.headers_mut() = headers.clone();
    let view_headers = view.headers_mut();
    if cache_set_cookie {
        // Allowed by the route: the library's own Set-Cookie rule would refuse it.
        view_headers.remove(header::SET_COOKIE);
    }
    if !explicit {
        let mut cc = headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        if !cc.is_empty() {
            cc.push_str(", ");
        }
        cc.push_str(&format!("max-age={}", ttl.as_secs().max(1)));
        view_headers.insert(header::CACHE_CONTROL, HeaderValue::from_str(&cc).ok()?);
        view_headers.remove(header::PRAGMA);
    }
    let options = http_cache_semantics::CacheOptions {
        shared: true,
        cache_heuristic: 0.0,
        ..Default::default()
    };
    let policy = http_cache_semantics::CachePolicy::new_options(request, &view, now, options);
    if !policy.is_storable() {
        return None;
    }
    let left = policy.time_to_live(now);
    (!left.is_zero()).then(|| (left, policy.age(now)))
}
