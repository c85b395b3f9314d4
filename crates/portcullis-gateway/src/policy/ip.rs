//! Client IP allow/deny lists (CIDRs or single addresses, IPv4 and IPv6) → 403
//! `FORBIDDEN`. The client address is the one [`crate::forwarded::client_ip`]
//! found (X-Forwarded-For only from trusted proxies); IPv4-mapped IPv6 addresses
//! are compared as IPv4. Deny wins; a non-empty `allow` admits only what it lists.

use std::net::IpAddr;

use ipnet::IpNet;
use portcullis_config::IpRulesConfig;

use super::{Flow, PolicySite};
use crate::context::RequestCtx;
use crate::error::{ErrorCode, GatewayError};
use crate::snapshot::Errors;
use crate::telemetry::RouteLabels;

pub struct IpRules {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

pub(crate) fn compile(
    c: &IpRulesConfig,
    site: &PolicySite<'_>,
    errors: &mut Errors<'_>,
) -> Option<IpRules> {
    let field = site.field("ip");
    let before = errors.count();
    let parse = |key: &str, list: &[portcullis_config::Text], errors: &mut Errors<'_>| {
        let mut out: Vec<IpNet> = Vec::new();
        for (i, s) in list.iter().enumerate() {
            let s = s.trim();
            match s
                .parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
            {
                Ok(net) => out.push(canonical(net.trunc())),
                Err(_) => {
                    errors.push(
                        site.at,
                        format!("{field}.{key}[{i}]"),
                        format!("{s:?} is not an IP address or CIDR"),
                    );
                }
            }
        }
        out
    };
    let allow = parse("allow", &c.allow, errors);
    let deny = parse("deny", &c.deny, errors);
    if c.allow.is_empty() && c.deny.is_empty() {
        errors.push(
            site.at,
            field,
            "list at least one address in `allow` or `deny`",
        );
        return None;
    }
    (errors.count() == before).then_some(IpRules { allow, deny })
}

/// An IPv4-mapped IPv6 rule (`::ffff:10.0.0.0/104`) as the IPv4 rule it means:
/// clients are compared as IPv4, so the mapped form would never match.
fn canonical(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96) {
                return IpNet::V4(n);
            }
        }
    }
    net
}

impl IpRules {
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }

    pub(super) fn on_request(&self, ctx: &mut RequestCtx<'_>) -> Result<Flow, GatewayError> {
        if self.admits(ctx.client_ip) {
            return Ok(Flow::Continue);
        }
        ctx.shared
            .metrics
            .ip_denied
            .get_or_create(&RouteLabels {
                route: ctx.route.name.clone(),
            })
            .inc();
        Err(GatewayError::new(
            ErrorCode::Forbidden,
            "the client address is not allowed on this route",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str], deny: &[&str]) -> IpRules {
        let p = |l: &[&str]| {
            l.iter()
                .map(|s| canonical(s.parse::<IpNet>().unwrap()))
                .collect()
        };
        IpRules {
            allow: p(allow),
            deny: p(deny),
        }
    }

    #[test]
    fn deny_wins_and_allow_restricts() {
        let r = rules(&["10.0.0.0/8", "2001:db8::/32"], &["10.1.0.0/16"]);
        assert!(r.admits("10.2.3.4".parse().unwrap()));
        assert!(!r.admits("10.1.3.4".parse().unwrap()));
        assert!(!r.admits("192.168.1.1".parse().unwrap()));
        assert!(r.admits("2001:db8:1::5".parse().unwrap()));
        assert!(!r.admits("2001:db9::5".parse().unwrap()));
        // IPv4-mapped IPv6 is the IPv4 address.
        assert!(r.admits("::ffff:10.2.3.4".parse().unwrap()));
        assert!(!r.admits("::ffff:10.1.3.4".parse().unwrap()));
        let only_deny = rules(&[], &["::1/128", "127.0.0.1/32"]);
        assert!(!only_deny.admits("::1".parse().unwrap()));
        assert!(!only_deny.admits("::ffff:127.0.0.1".parse().unwrap()));
        assert!(only_deny.admits("127.0.0.2".parse().unwrap()));
        // Rules written as IPv4-mapped IPv6 mean IPv4.
        let mapped = rules(&[], &["::ffff:203.0.113.0/120", "::ffff:127.0.0.1/128"]);
        assert!(!mapped.admits("203.0.113.7".parse().unwrap()));
        assert!(!mapped.admits("127.0.0.1".parse().unwrap()));
        assert!(mapped.admits("203.0.114.7".parse().unwrap()));
    }
}
