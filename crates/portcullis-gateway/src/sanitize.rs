//! What a client may not send upstream. Runs once per request, before routing and
//! before the gateway adds any header of its own, so nothing a client writes (a name
//! listed in `Connection`, `X_Org_ID` for `X-Org-ID`, `X-Original-URL`, our own `Via`)
//! can remove, shadow or forge a header the gateway sets.

use std::collections::{HashMap, HashSet};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use portcullis_config::UnderscoreHeaders;

use crate::error::{ErrorCode, GatewayError};

/// What the gateway does with a request header name (bit flags: a name may be
/// several of these).
const PROTECTED: u8 = 1;
const IDENTITY: u8 = 2;
const STRIP: u8 = 4;
const UNTRUSTED: u8 = 8;
const HOP: u8 = 16;

/// FNV-1a: header names are short and not attacker-chosen keys of a growing map
/// (the map is built from the config), so a fast hash beats SipHash here.
#[derive(Default)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type FnvMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fnv>>;

/// The compiled header rules of a snapshot: one map from name to class, so each
/// request header costs one lookup.
pub struct HeaderRules {
    classes: FnvMap<HeaderName, u8>,
    underscore: UnderscoreHeaders,
}

impl HeaderRules {
    /// `protected`: headers the gateway sets (a client can never have them removed
    /// through `Connection`); `identity`: set by authenticators (a client's copies go);
    /// `strip`: removed from every request; `untrusted`: removed unless the peer is a
    /// trusted proxy.
    pub fn new(
        protected: HashSet<HeaderName>,
        identity: &HashSet<HeaderName>,
        underscore: UnderscoreHeaders,
        strip: HashSet<HeaderName>,
        untrusted: HashSet<HeaderName>,
    ) -> Self {
        let mut classes: FnvMap<HeaderName, u8> = FnvMap::default();
        let sets = [
            (PROTECTED, &protected),
            (PROTECTED | IDENTITY, identity),
            (STRIP, &strip),
            (UNTRUSTED, &untrusted),
        ];
        for (class, names) in sets {
            for n in names {
                *classes.entry(n.clone()).or_default() |= class;
            }
        }
        for n in &HOP_BY_HOP {
            *classes.entry(n.clone()).or_default() |= HOP;
        }
        HeaderRules {
            classes,
            underscore,
        }
    }

    /// Whether the gateway sets, replaces or removes this request header: the value
    /// the upstream sees is not the client's (the cache must not vary on it).
    pub fn set_by_gateway(&self, name: &HeaderName) -> bool {
        self.class(name) & (PROTECTED | IDENTITY | STRIP | UNTRUSTED | HOP) != 0
    }

    fn class(&self, name: &HeaderName) -> u8 {
        self.classes.get(name).copied().unwrap_or(0)
    }

    fn removed(&self, class: u8, peer_trusted: bool) -> bool {
        class & (IDENTITY | STRIP | HOP) != 0 || (!peer_trusted && class & UNTRUSTED != 0)
    }
}

/// The cookie's value, read as bytes: a non-ASCII byte elsewhere in the header
/// must not hide it.
pub fn cookie<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .filter_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            Some((&pair[..eq], pair[eq + 1..].trim_ascii()))
        })
        .find(|(n, _)| *n == name.as_bytes())
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// Headers the gateway sets on every proxied request, whatever the config.
pub fn gateway_headers(request_id: &HeaderName) -> HashSet<HeaderName> {
    [
        header::HOST,
        header::VIA,
        header::FORWARDED,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::TE,
        header::UPGRADE,
        HeaderName::from_static("x-forwarded-for"),
        HeaderName::from_static("x-forwarded-proto"),
        HeaderName::from_static("x-forwarded-host"),
        HeaderName::from_static("x-real-ip"),
        request_id.clone(),
    ]
    .into_iter()
    .collect()
}

static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::UPGRADE,
];

/// `Connection` tokens that name no end-to-end header: nothing to look up.
fn plain_connection_token(t: &str) -> bool {
    t.eq_ignore_ascii_case("keep-alive")
        || t.eq_ignore_ascii_case("close")
        || t.eq_ignore_ascii_case("upgrade")
}

/// Cleans a client's request headers in place. `Transfer-Encoding` is left to hyper
/// (it has already decoded the framing); `TE` keeps only `trailers`.
pub fn client_headers(
    headers: &mut HeaderMap,
    rules: &HeaderRules,
    peer_trusted: bool,
) -> Result<(), GatewayError> {
    // 1. Names listed in `Connection`, computed before anything is added; a name the
    //    gateway sets is never removed this way.
    let mut doomed: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let Ok(v) = value.to_str() else { continue };
        for t in v.split(',').map(str::trim) {
            if t.is_empty() || plain_connection_token(t) {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
                if rules.class(&n) & PROTECTED == 0 {
                    doomed.push(n);
                }
            }
        }
    }
    if let Some(te) = headers.get(header::TE) {
        let trailers = te.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }

    // 2. One pass over every name: hop-by-hop headers, names with `_` (proxies and
    //    frameworks — CGI, WSGI, Rack — fold them onto the dashed name, so `X_Org_ID`
    //    would reach an upstream as `X-Org-ID`), identity headers (ours to set),
    //    rewrite/override headers some upstreams believe, and client-address headers
    //    only a trusted proxy may send. Most requests have nothing to remove and
    //    allocate nothing.
    for name in headers.keys() {
        let remove = if name.as_str().contains('_') {
            match rules.underscore {
                UnderscoreHeaders::Reject => {
                    return Err(GatewayError::new(
                        ErrorCode::BadRequest,
                        "header names containing `_` are not accepted",
                    ))
                }
                UnderscoreHeaders::Drop => true,
                // Kept, unless its dashed form is a name we set, remove or distrust.
                UnderscoreHeaders::Allow => {
                    let dashed = name.as_str().replace('_', "-");
                    let dashed_class =
                        HeaderName::from_bytes(dashed.as_bytes()).map_or(0, |d| rules.class(&d));
                    let class = rules.class(name) | dashed_class;
                    class & PROTECTED != 0 || rules.removed(class, peer_trusted)
                }
            }
        } else {
            rules.removed(rules.class(name), peer_trusted)
        };
        if remove {
            doomed.push(name.clone());
        }
    }
    for name in doomed {
        headers.remove(&name);
    }
    Ok(())
}

/// Whether any `Via` element was received by `id` (this gateway): a loop.
pub fn via_names(headers: &HeaderMap, id: &str) -> bool {
    headers
        .get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|element| element.split_whitespace().nth(1) == Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(underscore: UnderscoreHeaders) -> HeaderRules {
        let rid = HeaderName::from_static("x-request-id");
        HeaderRules::new(
            gateway_headers(&rid),
            &[HeaderName::from_static("x-org-id")].into_iter().collect(),
            underscore,
            [HeaderName::from_static("x-original-url")]
                .into_iter()
                .collect(),
            [HeaderName::from_static("true-client-ip")]
                .into_iter()
                .collect(),
        )
    }

    #[test]
    fn connection_cannot_name_protected_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-forwarded-for, Host, x-custom, via"),
        );
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert(header::HOST, HeaderValue::from_static("a"));
        client_headers(&mut h, &rules(UnderscoreHeaders::Drop), false).unwrap();
        assert!(!h.contains_key("x-custom"));
        assert!(!h.contains_key(header::CONNECTION));
        assert_eq!(h[header::HOST], "a");
    }

    #[test]
    fn underscores() {
        let mut h = HeaderMap::new();
        h.insert("x_org_id", HeaderValue::from_static("victim"));
        h.insert("x_other", HeaderValue::from_static("1"));
        h.insert("x_original_url", HeaderValue::from_static("/admin"));
        h.insert("true_client_ip", HeaderValue::from_static("1.2.3.4"));
        let mut allow = h.clone();
        client_headers(&mut h, &rules(UnderscoreHeaders::Drop), false).unwrap();
        assert!(h.is_empty());
        client_headers(&mut allow, &rules(UnderscoreHeaders::Allow), false).unwrap();
        assert!(!allow.contains_key("x_org_id"));
        assert!(!allow.contains_key("x_original_url"));
        assert!(!allow.contains_key("true_client_ip"));
        assert!(allow.contains_key("x_other"));
        let mut r = HeaderMap::new();
        r.insert("x_other", HeaderValue::from_static("1"));
        assert!(client_headers(&mut r, &rules(UnderscoreHeaders::Reject), false).is_err());
    }

    #[test]
    fn strip_lists() {
        let mut h = HeaderMap::new();
        h.insert("x-original-url", HeaderValue::from_static("/admin"));
        h.insert("true-client-ip", HeaderValue::from_static("1.2.3.4"));
        let mut trusted = h.clone();
        client_headers(&mut h, &rules(UnderscoreHeaders::Drop), false).unwrap();
        assert!(h.is_empty());
        client_headers(&mut trusted, &rules(UnderscoreHeaders::Drop), true).unwrap();
        assert!(!trusted.contains_key("x-original-url"));
        assert!(trusted.contains_key("true-client-ip"));
    }

    #[test]
    fn via_loop() {
        let mut h = HeaderMap::new();
        h.append(
            header::VIA,
            HeaderValue::from_static("1.0 fred, 1.1 pc-1234"),
        );
        assert!(via_names(&h, "pc-1234"));
        assert!(!via_names(&h, "pc-12"));
        assert!(!via_names(&h, "fred1"));
    }
}
