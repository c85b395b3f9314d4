//! What the gateway knows about upstream targets across reloads: each target's
//! [`TargetState`] (health, breaker, in flight), the active health checkers of the
//! groups, and the views of them on the admin API and `/metrics`.
//!
//! A snapshot's groups hold `Arc`s to the states kept here, keyed by group name and
//! target URL, so a reload keeps what was learnt; [`Upstreams::sync`] (at each
//! snapshot install) drops states and checkers no group uses any more and starts
//! checkers for new or changed groups.

mod check;
pub mod notify;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use portcullis_upstream::TargetState;
use serde_json::{json, Value};

use crate::action::proxy::FixedTarget;
use crate::upstream::{ClientSettings, UpstreamClient};
pub use check::ActiveCheck;

/// One group of a snapshot, as the registry and the admin API see it.
pub struct GroupInfo {
    pub name: Arc<str>,
    pub balancer: &'static str,
    pub targets: Vec<GroupTarget>,
    pub active: Option<ActiveCheck>,
    pub client: UpstreamClient,
    pub settings: ClientSettings,
}

pub struct GroupTarget {
    pub target: Arc<FixedTarget>,
    pub weight: u32,
    pub state: Arc<TargetState>,
}

/// (group name, target URL).
type TargetKey = (Arc<str>, Arc<str>);

/// Registry of target states and health checkers; lives as long as the process.
#[derive(Default)]
pub struct Upstreams {
    states: Mutex<HashMap<TargetKey, Arc<TargetState>>>,
    checkers: Mutex<HashMap<Arc<str>, Checker>>,
}

struct Checker {
    /// What the running task was started with; a change restarts it.
    key: String,
    task: tokio::task::AbortHandle,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstreams {
    /// The state of `url` in group `group`, created on first use.
    pub fn target(&self, group: &Arc<str>, url: &str) -> Arc<TargetState> {
        let Ok(mut states) = self.states.lock() else {
            return Arc::new(TargetState::new(Arc::from(url)));
        };
        states
            .entry((group.clone(), Arc::from(url)))
            .or_insert_with(|| Arc::new(TargetState::new(Arc::from(url))))
            .clone()
    }

    /// Brings the registry in line with a snapshot about to be installed.
    pub fn sync(&self, groups: &[GroupInfo], notifier: Option<&Arc<notify::Notifier>>) {
        if let Ok(mut states) = self.states.lock() {
            states.retain(|(g, url), _| {
                groups
                    .iter()
                    .any(|info| info.name == *g && info.targets.iter().any(|t| t.state.url == *url))
            });
        }
        // Groups without active checks (now): whatever old checks said is void.
        for g in groups.iter().filter(|g| g.active.is_none()) {
            for t in &g.targets {
                if t.state.record().status != portcullis_upstream::Status::Unknown {
                    t.state.reset_active();
                }
            }
        }
        let Ok(mut checkers) = self.checkers.lock() else {
            return;
        };
        checkers.retain(|name, _| groups.iter().any(|g| g.name == *name && g.active.is_some()));
        for g in groups {
            let Some(active) = &g.active else { continue };
            let key = format!(
                "{active:?}|{:?}|{:?}|{}",
                g.settings,
                g.targets
                    .iter()
                    .map(|t| t.state.url.as_ref())
                    .collect::<Vec<_>>(),
                notifier.map_or(String::new(), |n| n.fingerprint().to_owned()),
            );
            if checkers.get(&g.name).is_some_and(|c| c.key == key) {
                continue;
            }
            let task = tokio::spawn(check::run(
                g.name.clone(),
                active.clone(),
                g.targets
                    .iter()
                    .map(|t| (t.target.clone(), t.state.clone()))
                    .collect(),
                g.client.clone(),
                notifier.cloned(),
            ))
            .abort_handle();
            checkers.insert(g.name.clone(), Checker { key, task });
        }
    }
}

/// `GET /admin/upstreams`: every group and the state of each target.
pub fn admin_view(groups: &[GroupInfo]) -> Value {
    let list: Vec<Value> = groups
        .iter()
        .map(|g| {
            let targets: Vec<Value> = g
                .targets
                .iter()
                .map(|t| {
                    let s = &t.state;
                    let r = s.record();
                    json!({
                        "url": s.url.as_ref(),
                        "weight": t.weight,
                        "healthy": s.healthy(),
                        "status": r.status.as_str(),
                        "ejected": s.ejected(),
                        "breaker": if s.breaker_open() { "open" } else { "closed" },
                        "in_flight": s.in_flight(),
                        "connections": g.client.open(&t.target.authority),
                        "pending": g.client.pending(&t.target.authority),
                        "last_check": r.last_check,
                        "last_up": r.last_up,
                        "first_down_at": r.first_down_at,
                        "latency_ms": r.latency_ms,
                        "notified_down": r.notified_down,
                        "last_error": r.last_error,
                    })
                })
                .collect();
            json!({
                "name": g.name.as_ref(),
                "balancer": g.balancer,
                "active_checks": g.active.as_ref().map(|a| json!({
                    "method": a.method.as_str(),
                    "path": a.path,
                    "interval_ms": a.interval.as_millis() as u64,
                })),
                "targets": targets,
            })
        })
        .collect();
    json!({ "upstreams": list })
}

/// `GET /admin/health` in seed 002's shape: one entry per target URL.
pub fn health_view(groups: &[GroupInfo]) -> Value {
    let mut out = serde_json::Map::new();
    for g in groups {
        for t in &g.targets {
            let r = t.state.record();
            out.insert(
                t.state.url.to_string(),
                json!({
                    "status": r.status.as_str(),
                    "lastUp": r.last_up,
                    "firstDownAt": r.first_down_at,
                    "notifiedDown": r.notified_down,
                    "lastCheck": r.last_check,
                    "latencyMs": r.latency_ms,
                    "upstream": g.name.as_ref(),
                }),
            );
        }
    }
    Value::Object(out)
}

/// Sets the per-target gauges from the states (at scrape time: nothing on the data
/// path); targets no group uses any more disappear.
pub fn refresh_gauges(groups: &[GroupInfo], metrics: &crate::telemetry::Metrics) {
    metrics.target_healthy.clear();
    metrics.target_breaker_open.clear();
    metrics.target_in_flight.clear();
    for g in groups {
        for t in &g.targets {
            let labels = crate::telemetry::TargetLabels {
                upstream: g.name.clone(),
                target: t.state.url.clone(),
            };
            let s = &t.state;
            metrics
                .target_healthy
                .get_or_create(&labels)
                .set(i64::from(s.healthy()));
            metrics
                .target_breaker_open
                .get_or_create(&labels)
                .set(i64::from(s.breaker_open()));
            metrics
                .target_in_flight
                .get_or_create(&labels)
                .set(i64::from(s.in_flight()));
        }
    }
}
