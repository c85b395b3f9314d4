//! What a templated upstream (`http://{name}:8080`, FnKit) may reach.
//!
//! The client chooses `name`, so it is checked twice: before any DNS query it must be
//! a DNS name that no resolver could read as an address (`127.1`, `2130706433`,
//! `0x7f000001`, `017700000001`, `localhost`) and match the route's `allow_names`;
//! after resolution, on every connect, each address must pass the route's
//! [`TargetRules`] (so a name that later resolves elsewhere — DNS rebinding — is
//! still refused).

use std::net::IpAddr;

use ipnet::IpNet;

/// Why a connect was refused: every resolved address is forbidden.
#[derive(Debug)]
pub struct ForbiddenTarget;

impl std::fmt::Display for ForbiddenTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("every address of the upstream name is forbidden by the route's targets")
    }
}

impl std::error::Error for ForbiddenTarget {}

/// Address rules for the connections of one templated route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TargetRules {
    /// When non-empty, only these networks.
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

impl TargetRules {
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if always_denied(ip) || self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }
}

/// Never a function: unspecified (`0.0.0.0/8`, `::`), link-local and cloud metadata
/// (`169.254.0.0/16`, `fe80::/10`), multicast, broadcast.
fn always_denied(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.octets()[0] == 0 || v4.is_link_local() || v4.is_multicast() || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_unspecified() || v6.is_multicast() || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// A pattern from `allow_names`: a glob (`fn-*`, `?` one character) or, starting
/// with `~`, a regular expression matched against the whole name.
#[derive(Debug, Clone)]
pub enum NamePattern {
    Glob(String),
    Regex(regex::Regex),
}

impl NamePattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.strip_prefix('~') {
            Some(re) => regex::Regex::new(&format!("^(?:{re})$"))
                .map(NamePattern::Regex)
                .map_err(|e| format!("invalid regex: {e}")),
            None => Ok(NamePattern::Glob(s.to_ascii_lowercase())),
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Glob(g) => glob(g.as_bytes(), name.as_bytes()),
            NamePattern::Regex(r) => r.is_match(name),
        }
    }
}

fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n].to_ascii_lowercase() => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// A param value that may be placed in an upstream host: one DNS label (letters,
/// digits, `-`, `_`; not starting or ending with `-`), not `localhost`, not a
/// number in any base (`2130706433`, `017700000001`, `0x7f000001`).
pub fn host_label_ok(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 63 || b[0] == b'-' || b[b.len() - 1] == b'-' {
        return false;
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_'))
    {
        return false;
    }
    if b.iter().all(u8::is_ascii_digit) || s.eq_ignore_ascii_case("localhost") {
        return false;
    }
    // inet_aton reads `0x…` as hexadecimal (`0x` alone is 0).
    let hex = b.len() >= 2 && b[0] == b'0' && (b[1] | 0x20) == b'x';
    !(hex && b[2..].iter().all(u8::is_ascii_hexdigit))
}

/// A rendered upstream host that a resolver could read as an address or as this
/// machine, whatever the params were: any `inet_aton` spelling (`127.1`, `0x7f.1`),
/// an IPv6 literal, `localhost` or `*.localhost`.
pub fn host_is_address_like(host: &str) -> bool {
    let host = host.trim_end_matches('.');
    let lower = host.to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") {
        return true;
    }
    if host.starts_with('[') || host.parse::<std::net::Ipv6Addr>().is_ok() {
        return true;
    }
    let parts: Vec<&str> = host.split('.').collect();
    parts.len() <= 4 && parts.iter().all(|p| inet_aton_number(p))
}

fn inet_aton_number(p: &str) -> bool {
    let b = p.as_bytes();
    if b.is_empty() {
        return false;
    }
    if b.len() >= 2 && b[0] == b'0' && (b[1] | 0x20) == b'x' {
        return b[2..].iter().all(u8::is_ascii_hexdigit);
    }
    b.iter().all(u8::is_ascii_digit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in ["hello", "fn-1", "my_func", "a", "x0x1"] {
            assert!(host_label_ok(ok), "{ok}");
        }
        for bad in [
            "",
            "2130706433",
            "017700000001",
            "0x7f000001",
            "0X7F000001",
            "0x",
            "localhost",
            "LocalHost",
            "-a",
            "a-",
            "a.b",
            "127.1",
            "a%2eb",
            "a:1",
        ] {
            assert!(!host_label_ok(bad), "{bad}");
        }
    }

    #[test]
    fn address_like_hosts() {
        for a in [
            "127.1",
            "2130706433",
            "0x7f.0.0.1",
            "017700000001",
            "10.0.0.1",
            "::1",
            "[::1]",
            "localhost.",
            "fn.localhost",
        ] {
            assert!(host_is_address_like(a), "{a}");
        }
        for n in ["hello", "fn.svc.cluster.local", "1a.example", "x.1"] {
            assert!(!host_is_address_like(n), "{n}");
        }
    }

    #[test]
    fn rules() {
        let default = TargetRules::default();
        for denied in [
            "0.0.0.0",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "fe80::1",
            "ff02::1",
            "::ffff:169.254.169.254",
        ] {
            assert!(!default.permits(denied.parse().unwrap()), "{denied}");
        }
        for allowed in ["127.0.0.1", "10.1.2.3", "::1", "192.168.1.1"] {
            assert!(default.permits(allowed.parse().unwrap()), "{allowed}");
        }
        let strict = TargetRules {
            allow: vec!["10.0.0.0/8".parse().unwrap()],
            deny: vec!["10.9.0.0/16".parse().unwrap()],
        };
        assert!(strict.permits("10.1.1.1".parse().unwrap()));
        assert!(!strict.permits("10.9.1.1".parse().unwrap()));
        assert!(!strict.permits("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn patterns() {
        let g = NamePattern::parse("fn-*").unwrap();
        assert!(g.matches("fn-hello"));
        assert!(g.matches("FN-x"));
        assert!(!g.matches("admin"));
        let q = NamePattern::parse("a?c").unwrap();
        assert!(q.matches("abc") && !q.matches("abbc"));
        let r = NamePattern::parse("~[a-z]+-v[0-9]").unwrap();
        assert!(r.matches("api-v2"));
        assert!(!r.matches("api-v2x"));
        assert!(NamePattern::parse("~(").is_err());
    }
}
