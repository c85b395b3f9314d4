//! One authority per request.
//!
//! An absolute-form request target (`GET http://a/ HTTP/1.1`) and HTTP/2's
//! `:authority` win over `Host` (RFC 9112 §3.2.2). A request whose `Host` disagrees
//! with them, carries two `Host` headers, or whose authority is malformed is refused,
//! so routing, `preserve_host`, `X-Forwarded-Host` and `Forwarded` all see the same
//! single value.

use http::header::{self, HeaderValue};
use http::{Request, Version};

use crate::error::{ErrorCode, GatewayError};

/// The request's authority, validated.
pub struct RequestAuthority {
    /// As the client wrote it (for `preserve_host`, `X-Forwarded-Host`, `Forwarded`).
    pub value: HeaderValue,
    /// Where, in `value`, the lower-case host without port, brackets or trailing
    /// dot is (for routing) — `value` is canonical, so it is a slice of it.
    host: std::ops::Range<usize>,
}

impl RequestAuthority {
    /// Lower-case host without port or trailing dot.
    pub fn host(&self) -> &str {
        self.value
            .to_str()
            .ok()
            .and_then(|v| v.get(self.host.clone()))
            .unwrap_or_default()
    }
}

/// The host's place in a canonical authority: `host`, `host:port`, `[v6]`,
/// `[v6]:port`.
fn host_range(value: &[u8]) -> std::ops::Range<usize> {
    match value.first() {
        Some(b'[') => 1..value.iter().position(|c| *c == b']').unwrap_or(value.len()),
        _ => 0..value.iter().position(|c| *c == b':').unwrap_or(value.len()),
    }
}

fn bad(message: &'static str) -> GatewayError {
    GatewayError::new(ErrorCode::BadRequest, message)
}

/// The single authority of `req`; `None` only for HTTP/1.0 and HTTP/2 requests that
/// name none.
pub fn request_authority<B>(req: &Request<B>) -> Result<Option<RequestAuthority>, GatewayError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(bad("more than one Host header"));
    }
    if let Some(h) = host_header {
        if !valid_authority(h.as_bytes()) {
            return Err(bad("malformed Host header"));
        }
    }
    let target = match req.uri().authority() {
        Some(a) => {
            if !valid_authority(a.as_str().as_bytes()) {
                return Err(bad("malformed request-target authority"));
            }
            Some(a.as_str())
        }
        None => None,
    };
    let value = match (target, host_header) {
        (Some(t), Some(h)) => {
            let default_port = match req.uri().scheme_str() {
                Some("https") => 443,
                _ => 80,
            };
            if !same_authority(t.as_bytes(), h.as_bytes(), default_port) {
                return Err(bad("Host disagrees with the request target"));
            }
            HeaderValue::from_str(t).map_err(|_| bad("malformed request-target authority"))?
        }
        (Some(t), None) => {
            HeaderValue::from_str(t).map_err(|_| bad("malformed request-target authority"))?
        }
        (None, Some(h)) => h.clone(),
        (None, None) => {
            if req.version() == Version::HTTP_11 {
                return Err(bad("HTTP/1.1 requests need a Host header"));
            }
            return Ok(None);
        }
    };
    let (host, port) = portcullis_routing::split_host_port(value.to_str().unwrap_or_default());
    // `.` or `..` pass the byte grammar but name no host.
    if host.is_empty() || host.starts_with('.') {
        return Err(bad("malformed Host"));
    }
    let rewritten = canonical(&value, &host, port);
    let value = rewritten.unwrap_or(value);
    let host = host_range(value.as_bytes());
    Ok(Some(RequestAuthority { value, host }))
}

/// The authority as forwarded: lower-case host without a trailing dot, the port as
/// given — the same host routing used. Already-canonical values are reused as is.
fn canonical(value: &HeaderValue, host: &str, port: Option<u16>) -> Option<HeaderValue> {
    let b = value.as_bytes();
    let host_part = match b.first() {
        Some(b'[') => b.split(|c| *c == b']').next().unwrap_or(b),
        _ => b.split(|c| *c == b':').next().unwrap_or(b),
    };
    if !host_part.ends_with(b".") && !host_part.iter().any(u8::is_ascii_uppercase) {
        return None;
    }
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let text = match port {
        Some(p) => format!("{host}:{p}"),
        None => host,
    };
    HeaderValue::from_str(&text).ok()
}

/// Bytes of a reg-name host: letters, digits, `-._~`.
static HOST_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~');
        b += 1;
    }
    t
};

/// `host[:port]` where host is a reg-name of letters, digits and `-._~`, or a
/// bracketed IPv6 address; port is 1–5 digits. No userinfo, no second `:`.
pub fn valid_authority(bytes: &[u8]) -> bool {
    if bytes.is_empty() || bytes.len() > 262 {
        return false;
    }
    let (host_ok, rest) = if bytes[0] == b'[' {
        let Some(close) = bytes.iter().position(|&b| b == b']') else {
            return false;
        };
        let inside = &bytes[1..close];
        let ok = std::str::from_utf8(inside)
            .ok()
            .is_some_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok());
        (ok, &bytes[close + 1..])
    } else {
        let end = bytes.iter().position(|&b| b == b':').unwrap_or(bytes.len());
        let host = &bytes[..end];
        let ok =
            !host.is_empty() && host.len() <= 255 && host.iter().all(|&b| HOST_BYTE[b as usize]);
        (ok, &bytes[end..])
    };
    if !host_ok {
        return false;
    }
    match rest.split_first() {
        None => true,
        Some((b':', port)) => {
            !port.is_empty()
                && port.len() <= 5
                && port.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(port)
                    .ok()
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_some_and(|p| p <= 65535)
        }
        Some(_) => false,
    }
}

/// Same host (case-insensitive, trailing dot ignored) and same port, a missing port
/// standing for `default_port`.
fn same_authority(a: &[u8], b: &[u8], default_port: u16) -> bool {
    let a = portcullis_routing::split_host_port(std::str::from_utf8(a).unwrap_or_default());
    let b = portcullis_routing::split_host_port(std::str::from_utf8(b).unwrap_or_default());
    a.0 == b.0 && a.1.unwrap_or(default_port) == b.1.unwrap_or(default_port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_grammar() {
        for ok in [
            "example.com",
            "example.com:8080",
            "a-b.c_d~e",
            "[::1]",
            "[::1]:443",
            "127.0.0.1:80",
        ] {
            assert!(valid_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "user@example.com",
            "a:b:c",
            "example.com:",
            "example.com:x1",
            "example.com:99999",
            "exa mple.com",
            "[::1",
            "[zz]:80",
            "[::1]x",
            "a/b",
            "ex\u{e9}.com",
            ":80",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
    }

    fn req(uri: &str, hosts: &[&str], version: Version) -> Request<()> {
        let mut b = Request::builder().uri(uri).version(version);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn target_wins_and_must_agree() {
        let r = req("http://a.test/x", &["A.test:80"], Version::HTTP_11);
        let a = request_authority(&r).unwrap().unwrap();
        assert_eq!(a.value, "a.test");
        let r = req("/x", &["Example.COM.:8080"], Version::HTTP_11);
        assert_eq!(
            request_authority(&r).unwrap().unwrap().value,
            "example.com:8080"
        );
        let r = req("/x", &["[::FFFF:A]:80"], Version::HTTP_11);
        assert_eq!(
            request_authority(&r).unwrap().unwrap().value,
            "[::ffff:a]:80"
        );
        for host in [".", "..", ".:8080", ".example.com"] {
            assert!(
                request_authority(&req("/x", &[host], Version::HTTP_11)).is_err(),
                "{host}"
            );
        }
        assert_eq!(a.host(), "a.test");
        let r = req("http://a.test/x", &["b.test"], Version::HTTP_11);
        assert!(request_authority(&r).is_err());
        let r = req("/x", &["a.test", "b.test"], Version::HTTP_11);
        assert!(request_authority(&r).is_err());
        let r = req("/x", &[], Version::HTTP_11);
        assert!(request_authority(&r).is_err());
        let r = req("/x", &[], Version::HTTP_10);
        assert!(request_authority(&r).unwrap().is_none());
        let r = req("/x", &["Example.COM."], Version::HTTP_11);
        assert_eq!(
            request_authority(&r).unwrap().unwrap().host(),
            "example.com"
        );
    }
}
