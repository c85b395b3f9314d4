//! Upstream groups: several targets behind one named upstream, and the balancer
//! that picks one for each request ([`portcullis_upstream`]).

use http::HeaderName;
use portcullis_config::{BalancerConfig, Location, Spanned, UpstreamConfig};
use portcullis_upstream::{InFlight, LeastRequest, Maglev, RoundRobin};

use super::proxy::{parse_fixed_target, FixedTarget};
use crate::context::RequestCtx;
use crate::snapshot::Errors;

pub struct Group {
    pub targets: Box<[FixedTarget]>,
    balancer: Balancer,
}

enum Balancer {
    RoundRobin(RoundRobin),
    LeastRequest(LeastRequest),
    /// Consistent hashing on `by`; requests without that key go round-robin.
    Hash {
        by: HashKey,
        table: Maglev,
        fallback: RoundRobin,
    },
}

enum HashKey {
    Header(HeaderName),
    Cookie(String),
    Ip,
    Param(String),
}

/// The target a request goes to; for `least_request`, counted as in flight until
/// dropped or [`Picked::done`].
pub struct Picked<'a> {
    pub target: &'a FixedTarget,
    in_flight: Option<InFlight<'a>>,
}

impl Picked<'_> {
    /// The response head arrived after `latency` (least-request's EWMA).
    pub fn done(self, latency: std::time::Duration) {
        if let Some(f) = self.in_flight {
            f.done(latency);
        }
    }
}

pub(crate) fn compile(
    u: &UpstreamConfig,
    at: Location,
    field: &str,
    route_params: &[String],
    errors: &mut Errors<'_>,
) -> Option<Group> {
    let before = errors.count();
    let mut targets = Vec::new();
    let mut names = Vec::new();
    for (i, t) in u.targets.iter().enumerate() {
        let Spanned {
            value, referenced, ..
        } = t;
        match parse_fixed_target(value.url.as_str()) {
            Ok(ft) if !value.url.contains('{') => {
                if value.weight.0 > portcullis_upstream::round_robin::MAX_WEIGHT {
                    errors.push(
                        *referenced,
                        format!("{field}.targets[{i}].weight"),
                        format!("at most {}", portcullis_upstream::round_robin::MAX_WEIGHT),
                    );
                }
                if names.contains(&value.url.to_string()) {
                    errors.push(
                        *referenced,
                        format!("{field}.targets[{i}].url"),
                        "listed twice",
                    );
                }
                names.push(value.url.to_string());
                targets.push(ft);
            }
            Ok(_) => errors.push(
                *referenced,
                format!("{field}.targets[{i}].url"),
                "group targets cannot be templates",
            ),
            Err(e) => errors.push(*referenced, format!("{field}.targets[{i}].url"), e),
        }
    }
    let weights: Vec<u32> = u.targets.iter().map(|t| t.value.weight.0).collect();
    if weights.iter().all(|w| *w == 0) {
        errors.push(at, format!("{field}.targets"), "every weight is 0");
    }
    let balancer = match &u.balancer {
        BalancerConfig::RoundRobin => Balancer::RoundRobin(RoundRobin::new(&weights)),
        BalancerConfig::LeastRequest => Balancer::LeastRequest(LeastRequest::new(targets.len())),
        BalancerConfig::Hash(by) => {
            let by = by.trim();
            let key = if by == "ip" {
                Some(HashKey::Ip)
            } else if let Some(h) = by.strip_prefix("header:") {
                HeaderName::from_bytes(h.as_bytes())
                    .ok()
                    .map(HashKey::Header)
            } else if let Some(c) = by.strip_prefix("cookie:") {
                (!c.is_empty()).then(|| HashKey::Cookie(c.to_owned()))
            } else if let Some(p) = by.strip_prefix("param:") {
                if !route_params.iter().any(|r| r == p) {
                    errors.push(
                        at,
                        format!("{field}.balancer.hash"),
                        format!("param:{p} is not captured by this route's path"),
                    );
                }
                Some(HashKey::Param(p.to_owned()))
            } else {
                None
            };
            match key {
                Some(by) => Balancer::Hash {
                    by,
                    table: Maglev::new(&names),
                    fallback: RoundRobin::new(&weights),
                },
                None => {
                    errors.push(
                        at,
                        format!("{field}.balancer.hash"),
                        format!(
                            "{by:?}: expected ip, header:<name>, cookie:<name> or param:<name>"
                        ),
                    );
                    return None;
                }
            }
        }
    };
    (errors.count() == before).then(|| Group {
        targets: targets.into_boxed_slice(),
        balancer,
    })
}

impl Group {
    /// The target for this request. Every target is usable until health checks
    /// arrive.
    pub fn pick<'a>(
        &'a self,
        ctx: &RequestCtx<'_>,
        headers: &http::HeaderMap,
    ) -> Option<Picked<'a>> {
        let usable = |_: usize| true;
        let (i, in_flight) = match &self.balancer {
            Balancer::RoundRobin(rr) => (rr.pick(usable)?, None),
            Balancer::LeastRequest(lr) => {
                let (i, f) = lr.pick(usable)?;
                (i, Some(f))
            }
            Balancer::Hash {
                by,
                table,
                fallback,
            } => {
                let ip;
                let key: Option<&[u8]> = match by {
                    HashKey::Header(h) => headers.get(h).map(|v| v.as_bytes()),
                    HashKey::Cookie(c) => crate::sanitize::cookie(headers, c),
                    HashKey::Ip => {
                        ip = ctx.client_ip.to_canonical().to_string();
                        Some(ip.as_bytes())
                    }
                    HashKey::Param(p) => ctx
                        .params
                        .iter()
                        .find(|(n, _)| n == p)
                        .map(|(_, v)| v.as_bytes()),
                };
                match key.filter(|k| !k.is_empty()) {
                    Some(k) => (table.pick(k, usable)?, None),
                    None => (fallback.pick(usable)?, None),
                }
            }
        };
        Some(Picked {
            target: &self.targets[i],
            in_flight,
        })
    }

    pub fn describe(&self) -> String {
        let kind = match &self.balancer {
            Balancer::RoundRobin(_) => "round_robin",
            Balancer::LeastRequest(_) => "least_request",
            Balancer::Hash { .. } => "hash",
        };
        format!("proxy group of {} ({kind})", self.targets.len())
    }
}
