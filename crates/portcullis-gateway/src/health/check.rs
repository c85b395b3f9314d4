//! Active health checks: one task per group probes every target each interval
//! (plus jitter), updates its [`TargetState`] and tells the notifier about long
//! downtimes and recoveries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;
use portcullis_upstream::{Status, TargetState};

use super::notify::Notifier;
use crate::action::proxy::FixedTarget;
use crate::body::Body;
use crate::upstream::UpstreamClient;

/// A group's `health.active`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveCheck {
    pub method: Method,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Empty: any 2xx or 3xx.
    pub statuses: Vec<u16>,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub jitter: Duration,
}

impl ActiveCheck {
    fn passes(&self, status: StatusCode) -> bool {
        if self.statuses.is_empty() {
            status.is_success() || status.is_redirection()
        } else {
            self.statuses.contains(&status.as_u16())
        }
    }
}

/// Largest check response body read (the rest is dropped with the connection).
const MAX_CHECK_BODY: usize = 64 * 1024;

pub(super) async fn run(
    group: Arc<str>,
    check: ActiveCheck,
    targets: Vec<(Arc<FixedTarget>, Arc<TargetState>)>,
    client: UpstreamClient,
    notifier: Option<Arc<Notifier>>,
) {
    loop {
        let probes = targets.iter().map(|(target, state)| {
            probe_one(&group, &check, target, state, &client, notifier.as_deref())
        });
        futures_util::future::join_all(probes).await;
        if let Some(n) = &notifier {
            for (_, state) in &targets {
                n.check_downtime(&group, state);
            }
        }
        let jitter = if check.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_millis(fastrand::u64(
                0..=u64::try_from(check.jitter.as_millis()).unwrap_or(0),
            ))
        };
        tokio::time::sleep(check.interval + jitter).await;
    }
}

async fn probe_one(
    group: &Arc<str>,
    check: &ActiveCheck,
    target: &FixedTarget,
    state: &TargetState,
    client: &UpstreamClient,
    notifier: Option<&Notifier>,
) {
    let started = Instant::now();
    let result = tokio::time::timeout(check.timeout, probe(check, target, client)).await;
    let (ok, error) = match result {
        Ok(Ok(status)) if check.passes(status) => (true, None),
        Ok(Ok(status)) => (false, Some(format!("status {}", status.as_u16()))),
        Ok(Err(e)) => (false, Some(e)),
        Err(_) => (false, Some(format!("no answer within {:?}", check.timeout))),
    };
    let Some(changed) = state.checked(
        ok,
        started.elapsed(),
        error.clone(),
        check.healthy_threshold,
        check.unhealthy_threshold,
    ) else {
        return;
    };
    match changed {
        Status::Down => tracing::warn!(
            upstream = %group, target = %state.url, error = error.as_deref().unwrap_or(""),
            "upstream target is down"
        ),
        Status::Up => {
            tracing::info!(upstream = %group, target = %state.url, "upstream target is up");
            let owed = state.clear_downtime();
            if let (Some(n), Some(since)) = (notifier, owed) {
                n.recovered(group, state, since);
            }
        }
        Status::Unknown => {}
    }
}

async fn probe(
    check: &ActiveCheck,
    target: &FixedTarget,
    client: &UpstreamClient,
) -> Result<StatusCode, String> {
    let uri = format!(
        "{}://{}{}{}",
        target.scheme, target.authority, target.base_path, check.path
    );
    let mut req = Request::builder()
        .method(check.method.clone())
        .uri(uri)
        .body(Body::empty())
        .map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        header::USER_AGENT,
        HeaderValue::from_static("portcullis-health-check"),
    );
    let res = client
        .request(req)
        .await
        .map_err(|e| crate::action::proxy::error_chain(&e))?;
    let status = res.status();
    // Read (a bounded part of) the body so the connection can be reused.
    let _ = http_body_util::Limited::new(res.into_body(), MAX_CHECK_BODY)
        .collect()
        .await;
    Ok(status)
}

impl ActiveCheck {
    /// Compiles `health.active`; problems go to `errors` (then `None`).
    pub(crate) fn compile(
        a: &portcullis_config::ActiveCheckConfig,
        at: portcullis_config::Location,
        field: &str,
        errors: &mut crate::snapshot::Errors<'_>,
    ) -> Option<Self> {
        let before = errors.count();
        let method = match Method::from_bytes(a.method.trim().to_ascii_uppercase().as_bytes()) {
            Ok(m) => m,
            Err(_) => {
                errors.push(at, format!("{field}.method"), "not an HTTP method");
                Method::GET
            }
        };
        let path = a.path.trim().to_owned();
        if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
            errors.push(
                at,
                format!("{field}.path"),
                "must be a path starting with `/`",
            );
        }
        for (key, d) in [("interval", a.interval), ("timeout", a.timeout)] {
            if d.get().is_zero() {
                errors.push(at, format!("{field}.{key}"), "must be more than 0");
            }
        }
        for (key, n) in [
            ("healthy_threshold", a.healthy_threshold.0),
            ("unhealthy_threshold", a.unhealthy_threshold.0),
        ] {
            if n == 0 {
                errors.push(at, format!("{field}.{key}"), "must be at least 1");
            }
        }
        let mut statuses = Vec::new();
        for (i, s) in a.statuses.iter().enumerate() {
            if !(100..=599).contains(&s.0) {
                errors.push(at, format!("{field}.statuses[{i}]"), "not an HTTP status");
            }
            statuses.push(s.0);
        }
        let interval = a.interval.get();
        (errors.count() == before).then(|| ActiveCheck {
            method,
            path,
            interval,
            timeout: a.timeout.get(),
            statuses,
            healthy_threshold: a.healthy_threshold.0,
            unhealthy_threshold: a.unhealthy_threshold.0,
            jitter: a.jitter.map_or(interval / 10, |j| j.get()),
        })
    }
}
