//! The session cookie's `Set-Cookie` header. Its attributes come from the config
//! only: `Domain` is never taken from a request's `Host`.

use std::time::Duration;

use http::HeaderValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

impl SameSite {
    fn as_str(self) -> &'static str {
        match self {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
            SameSite::None => "None",
        }
    }
}

/// A cookie's fixed attributes, checked once when the config compiles.
#[derive(Debug, Clone)]
pub struct CookieSpec {
    name: String,
    path: String,
    secure: bool,
    same_site: SameSite,
    domain: Option<String>,
}

impl CookieSpec {
    /// `path` is the cookie's `Path` (`/` for the session). Errors say which
    /// attribute is wrong.
    pub fn new(
        name: &str,
        path: &str,
        secure: bool,
        same_site: SameSite,
        domain: Option<&str>,
    ) -> Result<Self, String> {
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(format!(
                "cookie name {name:?} must be a token (letters, digits, !#$%&'*+-.^_`|~)"
            ));
        }
        if !path.starts_with('/') || !path.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b';') {
            return Err(format!(
                "cookie path {path:?} must start with / and hold no ; or spaces"
            ));
        }
        let domain = domain.filter(|d| !d.is_empty());
        if let Some(d) = domain {
            let d = d.strip_prefix('.').unwrap_or(d);
            if d.is_empty()
                || !d
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                return Err(format!("cookie domain {d:?} is not a host name"));
            }
        }
        if same_site == SameSite::None && !secure {
            return Err("SameSite=None needs a Secure cookie (browsers drop it otherwise)".into());
        }
        if (name.starts_with("__Secure-") || name.starts_with("__Host-")) && !secure {
            return Err(format!("a cookie named {name:?} must be Secure"));
        }
        if name.starts_with("__Host-") && (domain.is_some() || path != "/") {
            return Err(format!(
                "a cookie named {name:?} must have no domain and path /"
            ));
        }
        Ok(CookieSpec {
            name: name.to_owned(),
            path: path.to_owned(),
            secure,
            same_site,
            domain: domain.map(str::to_owned),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the cookie to `value` (base64url or another token) for `max_age`.
    pub fn set(&self, value: &str, max_age: Duration) -> Option<HeaderValue> {
        if !value.bytes().all(is_cookie_octet) {
            return None;
        }
        HeaderValue::from_str(&self.render(value, max_age.as_secs())).ok()
    }

    /// Removes the cookie from the browser.
    pub fn clear(&self) -> HeaderValue {
        HeaderValue::from_str(&self.render("", 0))
            .unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
    }

    fn render(&self, value: &str, max_age: u64) -> String {
        let mut s = format!(
            "{}={}; Path={}; Max-Age={}; HttpOnly; SameSite={}",
            self.name,
            value,
            self.path,
            max_age,
            self.same_site.as_str()
        );
        if self.secure {
            s.push_str("; Secure");
        }
        if let Some(d) = &self.domain {
            s.push_str("; Domain=");
            s.push_str(d);
        }
        s
    }
}

/// RFC 6265 token characters (a cookie name).
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 6265 cookie-octet (a cookie value).
fn is_cookie_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lax(secure: bool) -> CookieSpec {
        CookieSpec::new("sid", "/", secure, SameSite::Lax, None).unwrap()
    }

    #[test]
    fn default_attributes() {
        let v = lax(true).set("abc", Duration::from_secs(3600)).unwrap();
        assert_eq!(
            v.to_str().unwrap(),
            "sid=abc; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax; Secure"
        );
        let dev = lax(false).set("abc", Duration::from_secs(1)).unwrap();
        assert!(!dev.to_str().unwrap().contains("Secure"));
        assert!(!dev.to_str().unwrap().contains("Domain"));
    }

    #[test]
    fn domain_only_when_configured_and_clear_expires() {
        let c = CookieSpec::new("sid", "/", true, SameSite::Strict, Some("example.com")).unwrap();
        let v = c.set("x", Duration::from_secs(5)).unwrap();
        assert!(
            v.to_str()
                .unwrap()
                .ends_with("; Secure; Domain=example.com"),
            "{v:?}"
        );
        assert!(v.to_str().unwrap().contains("SameSite=Strict"));
        let cleared = c.clear();
        assert!(cleared
            .to_str()
            .unwrap()
            .starts_with("sid=; Path=/; Max-Age=0;"));
    }

    #[test]
    fn values_that_would_inject_attributes_are_refused() {
        let c = lax(true);
        for bad in [
            "a;Domain=evil",
            "a b",
            "a\r\nSet-Cookie: x=y",
            "\"q\"",
            "a,b",
            "é",
        ] {
            assert!(c.set(bad, Duration::from_secs(1)).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn config_mistakes_are_refused() {
        assert!(CookieSpec::new("", "/", true, SameSite::Lax, None).is_err());
        assert!(CookieSpec::new("s id", "/", true, SameSite::Lax, None).is_err());
        assert!(CookieSpec::new("sid;", "/", true, SameSite::Lax, None).is_err());
        assert!(CookieSpec::new("sid", "x", true, SameSite::Lax, None).is_err());
        assert!(CookieSpec::new("sid", "/", false, SameSite::None, None).is_err());
        assert!(CookieSpec::new("sid", "/", true, SameSite::None, None).is_ok());
        assert!(CookieSpec::new("__Host-sid", "/", false, SameSite::Lax, None).is_err());
        assert!(CookieSpec::new("__Host-sid", "/", true, SameSite::Lax, Some("a.com")).is_err());
        assert!(CookieSpec::new("__Host-sid", "/", true, SameSite::Lax, None).is_ok());
        assert!(CookieSpec::new("sid", "/", true, SameSite::Lax, Some("a.com;x")).is_err());
        assert!(CookieSpec::new("sid", "/", true, SameSite::Lax, Some("")).is_ok());
    }
}
