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
        // An IPv4 address carried inside IPv6 (NAT64, 6to4, IPv4-compatible) is judged
        // as that IPv4 address too: DNS64 turns 169.254.169.254 into 64:ff9b::a9fe:a9fe.
        let inner = embedded_v4(ip).map(IpAddr::V4);
        for addr in std::iter::once(ip).chain(inner) {
            if always_denied(addr) || self.deny.iter().any(|n| n.contains(&addr)) {
                return false;
            }
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }
}

/// The IPv4 address inside a NAT64 (`64:ff9b::/96`, `64:ff9b:1::/48`), 6to4
/// (`2002::/16`) or IPv4-compatible (`::a.b.c.d`) address.
fn embedded_v4(ip: IpAddr) -> Option<std::net::Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    let s = v6.segments();
    let o = v6.octets();
    let last = std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) {
        return Some(last);
    }
    if s[0] == 0x2002 {
        return Some(std::net::Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    if s[..6] == [0; 6] && !v6.is_unspecified() && !v6.is_loopback() {
        return Some(last);
    }
    None
}

/// Never a function: unspecified (`0.0.0.0/8`, `::`), link-local and cloud metadata
/// (`169.254.0.0/16`, `fe80::/10`, AWS `fd00:ec2::254`, Alibaba `100.100.100.200`),
/// multicast, broadcast.
fn always_denied(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.octets()[0] == 0
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.octets() == [100, 100, 100, 200]
        }
        IpAddr::V6(v6) => {
            v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.segments() == [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254]
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
            Some(re) => regex::Regex::new(&format!("(?i)^(?:{re})$"))
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

/// Names resolvers map to this machine (glibc, Debian and Red Hat `/etc/hosts`).
const LOOPBACK_NAMES: [&str; 4] = ["localhost", "localhost6", "ip6-localhost", "ip6-loopback"];

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
    if b.iter().all(u8::is_ascii_digit) || LOOPBACK_NAMES.iter().any(|n| s.eq_ignore_ascii_case(n))
    {
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
    if LOOPBACK_NAMES.contains(&lower.as_str())
        || lower.ends_with(".localhost")
        || lower.starts_with("localhost.")
    {
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
            "ip6-localhost",
            "localhost6",
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
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "::a9fe:a9fe",
            "fd00:ec2::254",
            "100.100.100.200",
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
        assert!(r.matches("API-V2"));
        assert!(!r.matches("api-v2x"));
        assert!(NamePattern::parse("~(").is_err());
    }
}
