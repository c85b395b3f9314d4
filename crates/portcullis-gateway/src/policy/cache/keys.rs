//! Cache keys: route, scheme, host, target, principal, and the `Vary`'d values.

use http::header::{self, HeaderMap, HeaderName};

use crate::policy::key::push_part;

/// The key before `Vary`: route, scheme, host, path + query, principal.
pub(crate) fn primary_key(
    route: &str,
    scheme: &str,
    host: &[u8],
    target: &str,
    principal: Option<&str>,
) -> String {
    let mut key = String::with_capacity(route.len() + host.len() + target.len() + 40);
    push_part(&mut key, route.as_bytes());
    // An upstream may answer differently per scheme (X-Forwarded-Proto): a cached
    // redirect to https must never reach https clients.
    push_part(&mut key, scheme.as_bytes());
    push_part(&mut key, host);
    push_part(&mut key, target.as_bytes());
    match principal {
        Some(p) => {
            key.push('p');
            push_part(&mut key, p.as_bytes());
        }
        None => key.push('-'),
    }
    key
}

/// The primary key plus the request's values of the `Vary`'d headers.
pub(crate) fn vary_key(primary: &str, names: &[HeaderName], headers: &HeaderMap) -> String {
    let mut key = String::from(primary);
    key.push('v');
    for name in names {
        push_part(&mut key, name.as_str().as_bytes());
        let mut value = Vec::new();
        for (i, v) in headers.get_all(name).iter().enumerate() {
            if i > 0 {
                value.push(b',');
            }
            value.extend_from_slice(v.as_bytes().trim_ascii());
        }
        push_part(&mut key, &value);
    }
    key
}

/// `Vary` header names, lower-case and sorted; `None` for `Vary: *`.
pub(super) fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for v in headers.get_all(header::VARY) {
        let Ok(v) = v.to_str() else { return None };
        for n in v.split(',') {
            let n = n.trim();
            if n.is_empty() {
                continue;
            }
            if n == "*" {
                return None;
            }
            let name = HeaderName::from_bytes(n.as_bytes()).ok()?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names.sort_by(|a: &HeaderName, b| a.as_str().cmp(b.as_str()));
    Some(names)
}
