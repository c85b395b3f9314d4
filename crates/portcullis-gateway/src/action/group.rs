//! Upstream groups: several targets behind one named upstream, and the balancer
//! that picks one for each request ([`portcullis_upstream`]).

use std::cell::Cell;
use std::sync::Arc;

use http::HeaderName;
use portcullis_config::{BalancerConfig, Location, Spanned, UpstreamConfig};
use portcullis_upstream::{
    Attempt, BreakerPolicy, InFlight, LeastRequest, Maglev, Outcome, PassivePolicy, RoundRobin,
    TargetState, Unusable,
};

use super::proxy::{parse_fixed_target, FixedTarget};
use crate::context::RequestCtx;
use crate::error::{ErrorCode, GatewayError};
use crate::health::Upstreams;
use crate::snapshot::Errors;

pub struct Group {
    pub name: Arc<str>,
    pub targets: Box<[Arc<FixedTarget>]>,
    /// Health, breaker and in-flight count of each target, shared with every
    /// snapshot (they outlive reloads in [`Upstreams`]).
    pub states: Box<[Arc<TargetState>]>,
    balancer: Balancer,
    passive: Option<PassivePolicy>,
    /// Most targets passive health may eject at once.
    max_ejected: usize,
    breaker: Option<BreakerPolicy>,
    /// Breaker: most requests waiting for a pooled connection to one target.
    max_pending: Option<usize>,
    /// Try unhealthy targets when none is healthy.
    panic: bool,
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
    pub index: usize,
    pub target: &'a FixedTarget,
    in_flight: Option<InFlight<'a>>,
    group: &'a Group,
    attempt: Attempt,
}

impl Picked<'_> {
    /// The attempt ended: the response head arrived after `latency` (least-request's
    /// EWMA), or it failed. Feeds passive health and the breaker.
    /// (Dropping a `Picked` instead reports nothing: for attempts that say nothing
    /// about the target, such as one whose client body stalled.)
    pub fn done(self, outcome: Outcome, latency: std::time::Duration) {
        let g = self.group;
        let may_eject = outcome == Outcome::Success || g.may_eject();
        self.attempt
            .report(outcome, g.passive.as_ref(), g.breaker.as_ref(), may_eject);
        if let Some(f) = self.in_flight {
            f.done(latency);
        }
    }
}

pub(crate) fn compile(
    name: &str,
    u: &UpstreamConfig,
    at: Location,
    field: &str,
    route_params: &[String],
    registry: &Upstreams,
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
                targets.push(Arc::new(ft));
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
    let passive = u.health.passive.as_ref().map(|p| PassivePolicy {
        failures: p.failures.0,
        eject_for: p.eject_for.get(),
        max_eject: p.max_eject.get().max(p.eject_for.get()),
    });
    let breaker = u.breaker.as_ref().map(|b| BreakerPolicy {
        max_concurrent: b.max_concurrent.0,
        failures: b.failures.0,
        open_for: b.open_for.get(),
    });
    let mut max_ejected = targets.len();
    if let Some(p) = &u.health.passive {
        for (key, bad) in [
            ("failures", p.failures.0 == 0),
            ("eject_for", p.eject_for.get().is_zero()),
            (
                "max_ejected_percent",
                p.max_ejected_percent.0 == 0 || p.max_ejected_percent.0 > 100,
            ),
        ] {
            if bad {
                errors.push(
                    at,
                    format!("{field}.health.passive.{key}"),
                    "must be more than 0 (a percentage at most 100)",
                );
            }
        }
        // At least one target may always be ejected (a group of one included).
        max_ejected = (targets.len() * p.max_ejected_percent.0 as usize / 100).max(1);
    }
    if let Some(b) = &u.breaker {
        for (key, bad) in [
            ("max_concurrent", b.max_concurrent.0 == 0),
            ("max_pending", b.max_pending.0 == 0),
            ("failures", b.failures.0 == 0),
            ("open_for", b.open_for.get().is_zero()),
        ] {
            if bad {
                errors.push(at, format!("{field}.breaker.{key}"), "must be more than 0");
            }
        }
    }
    let name: Arc<str> = Arc::from(name);
    let states = names
        .iter()
        .map(|url| registry.target(&name, url))
        .collect();
    (errors.count() == before).then(|| Group {
        name,
        targets: targets.into_boxed_slice(),
        states,
        balancer,
        passive,
        max_ejected,
        breaker,
        max_pending: u.breaker.as_ref().map(|b| b.max_pending.0 as usize),
        panic: u.health.panic.0,
    })
}

impl Group {
    /// The target for this request among the healthy ones whose breaker admits it,
    /// avoiding `tried` (earlier attempts) while another target is usable. None
    /// healthy: 503 `SERVICE_UNAVAILABLE` (or any target, in panic mode); healthy
    /// ones all refused by their breakers: 503 `UPSTREAM_OVERLOADED`.
    pub fn pick<'a>(
        &'a self,
        ctx: &RequestCtx<'_>,
        headers: &http::HeaderMap,
        tried: &[usize],
        client: &crate::upstream::UpstreamClient,
    ) -> Result<Picked<'a>, GatewayError> {
        let overloaded = Cell::new(false);
        let queue_full = |i: usize| {
            self.max_pending
                .is_some_and(|m| client.pending(&self.targets[i].authority) >= m)
        };
        let admits = |i: usize| match self.states[i].usable(self.breaker.as_ref()) {
            Ok(()) if queue_full(i) => {
                overloaded.set(true);
                false
            }
            Ok(()) => true,
            Err(Unusable::Overloaded) => {
                overloaded.set(true);
                false
            }
            Err(Unusable::Unhealthy) => false,
        };
        let fresh = |i: usize| !tried.contains(&i) && admits(i);
        if let Some(p) = self.pick_with(ctx, headers, fresh) {
            return Ok(p);
        }
        if !tried.is_empty() {
            if let Some(p) = self.pick_with(ctx, headers, admits) {
                return Ok(p);
            }
        }
        if overloaded.get() {
            return Err(GatewayError::server(ErrorCode::UpstreamOverloaded));
        }
        if self.panic {
            let breaker_ok = |i: usize| {
                !self.states[i].breaker_open()
                    && self
                        .breaker
                        .as_ref()
                        .is_none_or(|b| self.states[i].in_flight() < b.max_concurrent)
            };
            if let Some(p) = self.pick_with(ctx, headers, breaker_ok) {
                return Ok(p);
            }
        }
        Err(GatewayError::server(ErrorCode::ServiceUnavailable))
    }

    /// Whether passive health may eject one more target now.
    fn may_eject(&self) -> bool {
        self.states.iter().filter(|s| s.ejected()).count() < self.max_ejected
    }

    fn pick_with<'a>(
        &'a self,
        ctx: &RequestCtx<'_>,
        headers: &http::HeaderMap,
        usable: impl Fn(usize) -> bool,
    ) -> Option<Picked<'a>> {
        let (i, in_flight) = match &self.balancer {
            Balancer::RoundRobin(rr) => (rr.pick(&usable)?, None),
            Balancer::LeastRequest(lr) => {
                let (i, f) = lr.pick(&usable)?;
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
                    Some(k) => (table.pick(k, &usable)?, None),
                    None => (fallback.pick(&usable)?, None),
                }
            }
        };
        // Claim the chosen target (the half-open probe, or a concurrency slot); lost
        // to another request in the meantime: the next usable target instead.
        let attempt = match self.states[i].claim(self.breaker.as_ref()) {
            Ok(a) => a,
            Err(_) => {
                drop(in_flight);
                let (j, a) = (0..self.targets.len())
                    .filter(|&j| j != i && usable(j))
                    .find_map(|j| Some((j, self.states[j].claim(self.breaker.as_ref()).ok()?)))?;
                return Some(Picked {
                    index: j,
                    target: &self.targets[j],
                    in_flight: None,
                    group: self,
                    attempt: a,
                });
            }
        };
        Some(Picked {
            index: i,
            target: &self.targets[i],
            in_flight,
            group: self,
            attempt,
        })
    }

    pub fn balancer_name(&self) -> &'static str {
        match &self.balancer {
            Balancer::RoundRobin(_) => "round_robin",
            Balancer::LeastRequest(_) => "least_request",
            Balancer::Hash { .. } => "hash",
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "proxy group of {} ({})",
            self.targets.len(),
            self.balancer_name()
        )
    }
}
