//! Where a login may send the browser back to. `next` must be a path on the return
//! origin, and the return origin one of the allowed origins (port included) — with
//! an empty list, only the gateway's own. Nothing a client sends can make the
//! gateway redirect elsewhere.

/// Longest `next` accepted.
pub const MAX_NEXT: usize = 2048;

/// A web origin: scheme, lower-case host and port (explicit or the scheme's default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: &'static str,
    host: String,
    port: u16,
}

impl Origin {
    /// `https://app.example.com[:port]`, optionally with a trailing `/`; no path,
    /// query, fragment or user info.
    pub fn parse(text: &str) -> Result<Origin, String> {
        let t = text.trim();
        let t = t.strip_suffix('/').unwrap_or(t);
        let (scheme, rest) =
            split_scheme(t).ok_or_else(|| format!("{text:?} is not an http(s) origin"))?;
        if rest.contains(['/', '?', '#']) {
            return Err(format!("{text:?} is an origin: no path, query or fragment"));
        }
        Self::from_authority(scheme, rest).ok_or_else(|| format!("{text:?} has no valid host"))
    }

    /// The origin of an absolute http(s) URL (a `Referer`), if it has one.
    pub fn of_url(url: &str) -> Option<Origin> {
        let (scheme, rest) = split_scheme(url.trim())?;
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        Self::from_authority(scheme, &rest[..end])
    }

    /// `host[:port]` with `scheme`.
    pub fn with_scheme(scheme: &'static str, authority: &str) -> Option<Origin> {
        Self::from_authority(scheme, authority)
    }

    fn from_authority(scheme: &'static str, authority: &str) -> Option<Origin> {
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (addr, after) = v6.split_once(']')?;
                addr.parse::<std::net::Ipv6Addr>().ok()?;
                let port = match after {
                    "" => None,
                    p => Some(p.strip_prefix(':')?),
                };
                (format!("[{}]", addr.to_ascii_lowercase()), port)
            }
            None => {
                let (h, p) = match authority.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (authority, None),
                };
                let ok = !h.is_empty()
                    && h.len() <= 253
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                if !ok {
                    return None;
                }
                (h.to_ascii_lowercase(), p)
            }
        };
        let default = if scheme == "https" { 443 } else { 80 };
        let port = match port {
            None => default,
            Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u16>().ok().filter(|p| *p != 0)?
            }
            Some(_) => return None,
        };
        Some(Origin { scheme, host, port })
    }

    pub fn scheme(&self) -> &'static str {
        self.scheme
    }

    /// `https://host[:port]`, the port only when it is not the scheme's default.
    pub fn url(&self) -> String {
        let default = if self.scheme == "https" { 443 } else { 80 };
        if self.port == default {
            format!("{}://{}", self.scheme, self.host)
        } else {
            format!("{}://{}:{}", self.scheme, self.host, self.port)
        }
    }
}

fn split_scheme(t: &str) -> Option<(&'static str, &str)> {
    let (scheme, rest) = t.split_once("://")?;
    let scheme = if scheme.eq_ignore_ascii_case("https") {
        "https"
    } else if scheme.eq_ignore_ascii_case("http") {
        "http"
    } else {
        return None;
    };
    Some((scheme, rest))
}

/// `next` as a local path: absent or empty → `/`. Refused: anything not starting
/// with a single `/` (`//evil`, `/\evil`, URLs, `javascript:`), backslashes,
/// control, space and non-ASCII characters, and anything over [`MAX_NEXT`].
pub fn safe_next(next: Option<&str>) -> Result<String, &'static str> {
    let next = match next {
        None | Some("") => return Ok("/".to_owned()),
        Some(n) => n,
    };
    if next.len() > MAX_NEXT {
        return Err("next is too long");
    }
    if !next.starts_with('/') || next.starts_with("//") {
        return Err("next must be a path on this site");
    }
    if !next
        .bytes()
        .all(|b| (0x21..0x7f).contains(&b) && b != b'\\')
    {
        return Err("next holds characters a path may not");
    }
    Ok(next.to_owned())
}

/// The origins a login may return to: the gateway's own and the allowed ones.
#[derive(Debug, Clone)]
pub struct ReturnOrigins {
    own: Origin,
    allowed: Vec<Origin>,
}

impl ReturnOrigins {
    pub fn new(own: Origin, allowed: Vec<Origin>) -> Self {
        ReturnOrigins { own, allowed }
    }

    pub fn own(&self) -> &Origin {
        &self.own
    }

    pub fn allows(&self, o: &Origin) -> bool {
        *o == self.own || self.allowed.contains(o)
    }

    /// The return origin of a login: `frontend_host` (an origin, or `host[:port]`
    /// taken with the gateway's scheme) when given, else the request's `Origin`, else
    /// its `Referer`'s origin, else the gateway's own. A named origin that is not
    /// allowed is refused, never replaced by another.
    pub fn choose(
        &self,
        frontend_host: Option<&str>,
        origin: Option<&str>,
        referer: Option<&str>,
    ) -> Result<Origin, &'static str> {
        let named = if let Some(f) = frontend_host.filter(|f| !f.is_empty()) {
            let o = if f.contains("://") {
                Origin::parse(f).ok()
            } else {
                Origin::with_scheme(self.own.scheme, f)
            };
            Some(o.ok_or("frontend_host is not a host or origin")?)
        } else if let Some(o) = origin.filter(|o| !o.is_empty() && *o != "null") {
            Some(Origin::parse(o).map_err(|_| "Origin is not an origin")?)
        } else {
            referer.and_then(Origin::of_url)
        };
        match named {
            None => Ok(self.own.clone()),
            Some(o) if self.allows(&o) => Ok(o),
            Some(_) => Err("the return origin is not allowed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(allowed: &[&str]) -> ReturnOrigins {
        ReturnOrigins::new(
            Origin::parse("https://gw.example.test").unwrap(),
            allowed.iter().map(|a| Origin::parse(a).unwrap()).collect(),
        )
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        let a = Origin::parse("https://App.Example.test").unwrap();
        assert_eq!(a, Origin::parse("https://app.example.test:443/").unwrap());
        assert_ne!(a, Origin::parse("http://app.example.test").unwrap());
        assert_ne!(a, Origin::parse("https://app.example.test:8443").unwrap());
        assert_eq!(a.url(), "https://app.example.test");
        assert_eq!(
            Origin::parse("http://localhost:5173").unwrap().url(),
            "http://localhost:5173"
        );
        assert_eq!(
            Origin::parse("http://[::1]:8080").unwrap().url(),
            "http://[::1]:8080"
        );
        for bad in [
            "app.example.test",
            "ftp://x",
            "https://",
            "https://a@evil.test",
            "https://x/path",
            "https://x?q",
            "https://x:99999",
            "https://x:0",
            "https://x:",
            "https://ex ample.test",
            "javascript://x",
        ] {
            assert!(Origin::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn next_is_a_local_path_only() {
        assert_eq!(safe_next(None).unwrap(), "/");
        assert_eq!(safe_next(Some("")).unwrap(), "/");
        assert_eq!(safe_next(Some("/app?x=1#y")).unwrap(), "/app?x=1#y");
        for bad in [
            "//evil.test",
            "/\\evil.test",
            "https://evil.test",
            "javascript:alert(1)",
            "evil.test",
            "/a\r\nSet-Cookie:x=y",
            "/a b",
            "/é",
            "/a\\b",
        ] {
            assert!(safe_next(Some(bad)).is_err(), "{bad:?}");
        }
        assert!(safe_next(Some(&format!("/{}", "a".repeat(MAX_NEXT)))).is_err());
    }

    #[test]
    fn return_origin_is_own_or_allowed() {
        let r = origins(&["https://app.example.test", "http://localhost:5173"]);
        assert_eq!(
            r.choose(None, None, None).unwrap().url(),
            "https://gw.example.test"
        );
        assert_eq!(
            r.choose(Some("app.example.test"), None, None)
                .unwrap()
                .url(),
            "https://app.example.test"
        );
        assert_eq!(
            r.choose(Some("http://localhost:5173"), None, None)
                .unwrap()
                .url(),
            "http://localhost:5173"
        );
        assert_eq!(
            r.choose(None, Some("https://app.example.test"), None)
                .unwrap()
                .url(),
            "https://app.example.test"
        );
        assert_eq!(
            r.choose(None, None, Some("https://app.example.test/page?q"))
                .unwrap()
                .url(),
            "https://app.example.test"
        );
        for (f, o, re) in [
            (Some("evil.test"), None, None),
            (Some("app.example.test:444"), None, None),
            (Some("app.example.test@evil.test"), None, None),
            (Some("localhost:5173"), None, None), // https, not the allowed http
            (None, Some("https://evil.test"), None),
            (None, None, Some("https://evil.test/x")),
            // frontend_host wins: an allowed Origin does not rescue it
            (Some("evil.test"), Some("https://app.example.test"), None),
        ] {
            assert!(r.choose(f, o, re).is_err(), "{f:?} {o:?} {re:?}");
        }
    }

    #[test]
    fn an_empty_allowlist_means_the_gateway_only() {
        let r = origins(&[]);
        assert!(r.choose(Some("app.example.test"), None, None).is_err());
        assert_eq!(
            r.choose(Some("gw.example.test"), None, None).unwrap().url(),
            "https://gw.example.test"
        );
        assert!(r.choose(None, Some("https://evil.test"), None).is_err());
    }
}
