//! Retries of the proxy action: the route's compiled `retries` and what an attempt's
//! result says about its target. The retry loop itself is in [`super::proxy`].

use std::time::Duration;

use http::{Method, StatusCode};
use portcullis_config::RetryConfig;
use portcullis_upstream::Outcome;

/// Most attempts a route may configure.
pub const MAX_ATTEMPTS: u32 = 10;

/// What a response says about its target, for passive health and the breaker:
/// 502, 503 and 504 are the target failing; any other status (an application's
/// 500 included, which a client can often provoke) is the target working.
pub(super) fn target_outcome(status: StatusCode) -> Outcome {
    match status.as_u16() {
        502..=504 => Outcome::Failure,
        _ => Outcome::Success,
    }
}

/// A route's `retries`, compiled.
pub struct RetryPolicy {
    /// Tries in all, the first included (2..=[`MAX_ATTEMPTS`]).
    pub attempts: u32,
    pub on_connect: bool,
    pub on_reset: bool,
    pub on_timeout: bool,
    pub statuses: Vec<u16>,
    pub non_idempotent: bool,
    pub replay_buffer: u64,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub budget: portcullis_upstream::RetryBudget,
}

impl RetryPolicy {
    /// Idempotent methods (RFC 9110 §9.2.2) always; others when the route says so.
    pub(super) fn allows(&self, method: &Method) -> bool {
        self.non_idempotent
            || matches!(
                *method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::PUT
                    | Method::DELETE
            )
    }

    pub(super) fn compile(
        cfg: &RetryConfig,
        at: portcullis_config::Location,
        field: &str,
        errors: &mut crate::snapshot::Errors<'_>,
    ) -> Option<Self> {
        let attempts = cfg.attempts.0;
        if attempts == 0 || attempts > MAX_ATTEMPTS {
            errors.push(
                at,
                format!("{field}.attempts"),
                format!("must be between 1 and {MAX_ATTEMPTS}"),
            );
            return None;
        }
        if cfg.budget_percent.0 > 100 {
            errors.push(at, format!("{field}.budget_percent"), "at most 100");
            return None;
        }
        let mut policy = RetryPolicy {
            attempts,
            on_connect: false,
            on_reset: false,
            on_timeout: false,
            statuses: Vec::new(),
            non_idempotent: cfg.non_idempotent.0,
            replay_buffer: cfg.replay_buffer.0,
            backoff: cfg.backoff.get(),
            max_backoff: cfg.max_backoff.get().max(cfg.backoff.get()),
            budget: portcullis_upstream::RetryBudget::new(
                f64::from(cfg.budget_percent.0) / 100.0,
                cfg.min_per_second.0,
            ),
        };
        for (i, on) in cfg.on.iter().enumerate() {
            match on.trim() {
                "connect" => policy.on_connect = true,
                "reset" => policy.on_reset = true,
                "timeout" => policy.on_timeout = true,
                s => match s.parse::<u16>() {
                    Ok(code) if (500..=599).contains(&code) => policy.statuses.push(code),
                    _ => {
                        errors.push(
                            at,
                            format!("{field}.on[{i}]"),
                            format!("{s:?}: expected connect, reset, timeout or a 5xx status"),
                        );
                        return None;
                    }
                },
            }
        }
        (attempts > 1).then_some(policy)
    }
}
