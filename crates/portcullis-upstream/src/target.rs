//! What the gateway knows about one target of a group, shared by every snapshot
//! and request that uses it: its health (active checks, passive ejection), its
//! circuit breaker and its requests in flight.
//!
//! Everything a pick reads is an atomic; the clock is read only while a target is
//! ejected or its breaker is open. The record behind a mutex (timestamps, latency)
//! is written by health checks and read by the admin API, never by a pick.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Passive health: eject a target after `failures` consecutive failed requests
/// (connect errors, resets, timeouts, 5xx) for `eject_for`, doubled at each
/// ejection in a row up to `max_eject`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassivePolicy {
    pub failures: u32,
    pub eject_for: Duration,
    pub max_eject: Duration,
}

/// Circuit breaker: at most `max_concurrent` requests in flight on a target; after
/// `failures` consecutive failures it opens for `open_for`, then lets one probe
/// through (half-open) — a success closes it, a failure opens it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    pub max_concurrent: u32,
    pub failures: u32,
    pub open_for: Duration,
}

/// How one request on a target ended, for passive health and the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// Why a target cannot take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    /// Active checks failing or passively ejected.
    Unhealthy,
    /// Breaker open or at its concurrency limit.
    Overloaded,
}

/// `up`, `down`, or `unknown` (no check has run yet), as seed 002 reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Status {
    #[default]
    Unknown,
    Up,
    Down,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Up => "up",
            Status::Down => "down",
        }
    }
}

/// The health record of seed 002's `/admin/health` (times in ms since the epoch).
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub status: Status,
    pub last_up: Option<u64>,
    pub first_down_at: Option<u64>,
    pub last_check: Option<u64>,
    pub latency_ms: Option<u64>,
    pub notified_down: bool,
    /// Why the last active check failed (never shown to clients).
    pub last_error: Option<String>,
    /// Active-check results in a row (positive: successes, negative: failures).
    pub streak: i32,
}

const CLOSED: u32 = 0;
const OPEN: u32 = 1;

#[derive(Debug)]
pub struct TargetState {
    pub url: Arc<str>,
    /// Active checks say it is healthy (true until checks say otherwise).
    active_healthy: AtomicBool,
    /// Failed requests in a row, for passive ejection and for the breaker (each
    /// resets its own count when it acts).
    passive_failures: AtomicU32,
    breaker_failures: AtomicU32,
    /// Passive ejection ends at this [`now_ms`]; 0 when not ejected.
    ejected_until: AtomicU64,
    /// Ejections in a row, for the exponential ejection time.
    ejections: AtomicU32,
    breaker: AtomicU32,
    /// While open: the next probe may start at this [`now_ms`].
    breaker_until: AtomicU64,
    in_flight: AtomicU32,
    record: Mutex<Record>,
}

/// Milliseconds on a monotonic clock (since the first call), never 0.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// Wall-clock milliseconds since the Unix epoch (for records shown to people).
pub fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl TargetState {
    pub fn new(url: Arc<str>) -> Self {
        TargetState {
            url,
            active_healthy: AtomicBool::new(true),
            passive_failures: AtomicU32::new(0),
            breaker_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            breaker: AtomicU32::new(CLOSED),
            breaker_until: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            record: Mutex::new(Record::default()),
        }
    }

    /// Healthy: active checks pass and it is not passively ejected.
    pub fn healthy(&self) -> bool {
        if !self.active_healthy.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || now_ms() >= until
    }

    /// Whether a request could go to this target now (read-only: balancers call it
    /// for every candidate). An open breaker past its time is usable: the target
    /// actually picked then [`TargetState::claim`]s the single half-open probe.
    pub fn usable(&self, breaker: Option<&BreakerPolicy>) -> Result<(), Unusable> {
        if !self.healthy() {
            return Err(Unusable::Unhealthy);
        }
        let Some(b) = breaker else { return Ok(()) };
        if self.breaker.load(Ordering::Relaxed) == OPEN {
            if now_ms() < self.breaker_until.load(Ordering::Relaxed) {
                return Err(Unusable::Overloaded);
            }
            return Ok(());
        }
        if self.in_flight.load(Ordering::Relaxed) >= b.max_concurrent {
            return Err(Unusable::Overloaded);
        }
        Ok(())
    }

    /// Takes a slot on the picked target: the half-open probe when its breaker is
    /// open (one caller wins), else one of `max_concurrent` (reserved atomically).
    pub fn claim(self: &Arc<Self>, breaker: Option<&BreakerPolicy>) -> Result<Attempt, Unusable> {
        let Some(b) = breaker else {
            return Ok(self.attempt(false));
        };
        if self.breaker.load(Ordering::Relaxed) == OPEN {
            let until = self.breaker_until.load(Ordering::Relaxed);
            let now = now_ms();
            if now < until {
                return Err(Unusable::Overloaded);
            }
            self.breaker_until
                .compare_exchange(
                    until,
                    now.saturating_add(ms(b.open_for)),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .map_err(|_| Unusable::Overloaded)?;
            return Ok(self.attempt(true));
        }
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < b.max_concurrent).then_some(n + 1)
            })
            .map_err(|_| Unusable::Overloaded)?;
        Ok(Attempt {
            target: self.clone(),
            probe: false,
            reported: false,
        })
    }

    fn attempt(self: &Arc<Self>, probe: bool) -> Attempt {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Attempt {
            target: self.clone(),
            probe,
            reported: false,
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn breaker_open(&self) -> bool {
        self.breaker.load(Ordering::Relaxed) == OPEN
    }

    pub fn ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// Passive health and breaker bookkeeping for one finished request. Only the
    /// half-open probe moves an open breaker (late answers of requests sent before it
    /// opened do not); `may_eject` is false when the group already has as many
    /// targets ejected as it allows.
    fn report(
        &self,
        outcome: Outcome,
        probe: bool,
        passive: Option<&PassivePolicy>,
        breaker: Option<&BreakerPolicy>,
        may_eject: bool,
    ) {
        let open = self.breaker.load(Ordering::Relaxed) == OPEN;
        match outcome {
            Outcome::Success => {
                if self.passive_failures.load(Ordering::Relaxed) != 0 {
                    self.passive_failures.store(0, Ordering::Relaxed);
                }
                if self.breaker_failures.load(Ordering::Relaxed) != 0 {
                    self.breaker_failures.store(0, Ordering::Relaxed);
                }
                if open && probe {
                    self.breaker.store(CLOSED, Ordering::Relaxed);
                }
            }
            Outcome::Failure => {
                let now = now_ms();
                if let Some(b) = breaker {
                    let n = self.breaker_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    // A failed half-open probe, or the threshold reached.
                    if (open && probe) || (!open && n >= b.failures) {
                        self.breaker_until
                            .store(now.saturating_add(ms(b.open_for)), Ordering::Relaxed);
                        self.breaker.store(OPEN, Ordering::Relaxed);
                        self.breaker_failures.store(0, Ordering::Relaxed);
                    }
                }
                if let Some(p) = passive {
                    let n = self.passive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    if n >= p.failures && may_eject && !self.ejected() {
                        self.eject(p, now);
                    }
                }
            }
        }
    }

    fn eject(&self, p: &PassivePolicy, now: u64) {
        let until = self.ejected_until.load(Ordering::Relaxed);
        // Ejections in a row double the time; a target healthy for `max_eject`
        // since its last ejection starts again from `eject_for`.
        let in_a_row = if until != 0 && now.saturating_sub(until) < ms(p.max_eject) {
            self.ejections.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.ejections.store(1, Ordering::Relaxed);
            1
        };
        let factor = 1u64 << (in_a_row - 1).min(20);
        let time = ms(p.eject_for).saturating_mul(factor).min(ms(p.max_eject));
        self.ejected_until
            .store(now.saturating_add(time.max(1)), Ordering::Relaxed);
        self.passive_failures.store(0, Ordering::Relaxed);
    }

    /// Active checks were turned off: forget what they said.
    pub fn reset_active(&self) {
        self.active_healthy.store(true, Ordering::Relaxed);
        if let Ok(mut r) = self.record.lock() {
            *r = Record::default();
        }
    }

    /// One active check's result. Returns the new status when it changed.
    pub fn checked(
        &self,
        ok: bool,
        latency: Duration,
        error: Option<String>,
        healthy_after: u32,
        unhealthy_after: u32,
    ) -> Option<Status> {
        let now = epoch_ms();
        let Ok(mut r) = self.record.lock() else {
            return None;
        };
        r.last_check = Some(now);
        r.streak = match (ok, r.streak) {
            (true, s) if s > 0 => s.saturating_add(1).min(1_000_000),
            (true, _) => 1,
            (false, s) if s < 0 => s.saturating_sub(1).max(-1_000_000),
            (false, _) => -1,
        };
        if ok {
            r.last_up = Some(now);
            r.latency_ms = Some(ms(latency));
            r.last_error = None;
        } else {
            r.last_error = error;
        }
        let before = r.status;
        let after = match before {
            Status::Up | Status::Unknown
                if !ok && -i64::from(r.streak) >= i64::from(unhealthy_after) =>
            {
                Status::Down
            }
            Status::Down | Status::Unknown
                if ok && i64::from(r.streak) >= i64::from(healthy_after) =>
            {
                Status::Up
            }
            // The first check decides an unknown target's direction only once its
            // threshold is met; until then it keeps serving.
            s => s,
        };
        if after == Status::Down && before != Status::Down {
            r.first_down_at = Some(now);
            r.notified_down = false;
        }
        r.status = after;
        self.active_healthy
            .store(after != Status::Down, Ordering::Relaxed);
        (after != before).then_some(after)
    }

    pub fn record(&self) -> Record {
        self.record.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Down for at least `after`, and not reported yet: marks it reported (one
    /// test-and-set, so two checkers never both report) and returns when the
    /// downtime began.
    pub fn take_down_notice(&self, after: Duration) -> Option<u64> {
        let mut r = self.record.lock().ok()?;
        let since = r.first_down_at?;
        let due = r.status == Status::Down
            && !r.notified_down
            && epoch_ms().saturating_sub(since) >= ms(after);
        due.then(|| {
            r.notified_down = true;
            since
        })
    }

    /// After recovery: forgets the downtime; returns when it began if its down
    /// notice was sent (then a recovery notice is owed).
    pub fn clear_downtime(&self) -> Option<u64> {
        let mut r = self.record.lock().ok()?;
        let owed = r.notified_down.then_some(r.first_down_at).flatten();
        r.first_down_at = None;
        r.notified_down = false;
        owed
    }
}

/// A request in flight on a target, from [`TargetState::claim`] until the response
/// head arrives or the attempt fails. Dropped without [`Attempt::report`] (the
/// client went away, its body failed), it counts for nothing, and a half-open probe
/// is handed back so the next request can probe.
pub struct Attempt {
    target: Arc<TargetState>,
    probe: bool,
    reported: bool,
}

impl Attempt {
    pub fn report(
        mut self,
        outcome: Outcome,
        passive: Option<&PassivePolicy>,
        breaker: Option<&BreakerPolicy>,
        may_eject: bool,
    ) {
        self.reported = true;
        self.target
            .report(outcome, self.probe, passive, breaker, may_eject);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.target.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.probe && !self.reported && self.target.breaker_open() {
            self.target.breaker_until.store(now_ms(), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Arc<TargetState> {
        Arc::new(TargetState::new(Arc::from("http://t")))
    }

    fn fail(t: &Arc<TargetState>, p: Option<&PassivePolicy>, b: Option<&BreakerPolicy>) {
        t.claim(b).unwrap().report(Outcome::Failure, p, b, true);
    }

    fn ejection_ms(t: &TargetState) -> u64 {
        t.ejected_until
            .load(Ordering::Relaxed)
            .saturating_sub(now_ms())
    }

    #[test]
    fn passive_ejection_doubles() {
        let t = target();
        let p = PassivePolicy {
            failures: 2,
            eject_for: Duration::from_secs(10),
            max_eject: Duration::from_secs(100),
        };
        fail(&t, Some(&p), None);
        assert!(t.healthy());
        fail(&t, Some(&p), None);
        assert!(!t.healthy());
        assert_eq!(t.usable(None), Err(Unusable::Unhealthy));
        let first = ejection_ms(&t);
        assert!((9_000..=10_000).contains(&first), "{first}");
        // Pretend the ejection is over; the next one in a row lasts twice as long.
        t.ejected_until.store(now_ms(), Ordering::Relaxed);
        assert!(t.healthy());
        fail(&t, Some(&p), None);
        fail(&t, Some(&p), None);
        let second = ejection_ms(&t);
        assert!((19_000..=20_000).contains(&second), "{second}");
    }

    #[test]
    fn ejection_respects_may_eject() {
        let t = target();
        let p = PassivePolicy {
            failures: 1,
            eject_for: Duration::from_secs(10),
            max_eject: Duration::from_secs(10),
        };
        t.claim(None)
            .unwrap()
            .report(Outcome::Failure, Some(&p), None, false);
        assert!(t.healthy());
    }

    #[test]
    fn breaker_opens_probes_once_and_closes() {
        let t = target();
        let b = BreakerPolicy {
            max_concurrent: 2,
            failures: 3,
            open_for: Duration::from_secs(60),
        };
        let (g1, g2) = (t.claim(Some(&b)).unwrap(), t.claim(Some(&b)).unwrap());
        assert_eq!(t.usable(Some(&b)), Err(Unusable::Overloaded));
        assert!(
            t.claim(Some(&b)).is_err(),
            "max_concurrent is reserved atomically"
        );
        drop((g1, g2));
        assert_eq!(t.in_flight(), 0);
        for _ in 0..3 {
            fail(&t, None, Some(&b));
        }
        assert!(t.breaker_open());
        assert_eq!(t.usable(Some(&b)), Err(Unusable::Overloaded));
        // open_for elapses.
        t.breaker_until.store(now_ms(), Ordering::Relaxed);
        assert_eq!(t.usable(Some(&b)), Ok(()), "usable does not take the probe");
        assert_eq!(t.usable(Some(&b)), Ok(()));
        let probe = t.claim(Some(&b)).unwrap();
        assert!(t.claim(Some(&b)).is_err(), "only one probe");
        // A probe dropped without an outcome hands the probe back.
        drop(probe);
        let probe = t.claim(Some(&b)).unwrap();
        probe.report(Outcome::Success, None, Some(&b), true);
        assert!(!t.breaker_open());
        assert!(t.claim(Some(&b)).is_ok());
    }

    #[test]
    fn only_the_probe_moves_an_open_breaker() {
        let t = target();
        let b = BreakerPolicy {
            max_concurrent: 10,
            failures: 1,
            open_for: Duration::from_secs(60),
        };
        let late = t.claim(Some(&b)).unwrap();
        fail(&t, None, Some(&b));
        assert!(t.breaker_open());
        late.report(Outcome::Success, None, Some(&b), true);
        assert!(t.breaker_open(), "a late success of an older request");
    }

    #[test]
    fn breaker_and_passive_count_apart() {
        let t = target();
        let p = PassivePolicy {
            failures: 2,
            eject_for: Duration::from_millis(1),
            max_eject: Duration::from_millis(1),
        };
        let b = BreakerPolicy {
            max_concurrent: 10,
            failures: 3,
            open_for: Duration::from_secs(60),
        };
        for _ in 0..3 {
            let a = t.claim(Some(&b)).unwrap();
            a.report(Outcome::Failure, Some(&p), Some(&b), true);
        }
        assert!(
            t.breaker_open(),
            "the ejection did not reset the breaker's count"
        );
    }

    #[test]
    fn active_thresholds_and_notices() {
        let t = target();
        let d = Duration::from_millis(1);
        assert_eq!(t.checked(false, d, None, 2, 2), None);
        assert!(t.healthy(), "one failure is not enough");
        assert_eq!(t.checked(false, d, None, 2, 2), Some(Status::Down));
        assert!(!t.healthy());
        assert!(t.record().first_down_at.is_some());
        assert!(t.take_down_notice(Duration::from_secs(3600)).is_none());
        assert!(t.take_down_notice(Duration::ZERO).is_some());
        assert!(t.take_down_notice(Duration::ZERO).is_none(), "once");
        assert_eq!(t.checked(true, d, None, 2, 2), None);
        assert_eq!(t.checked(true, d, None, 2, 2), Some(Status::Up));
        assert!(t.healthy());
        assert_eq!(t.record().latency_ms, Some(1));
        assert!(t.clear_downtime().is_some(), "a recovery notice is owed");
        assert!(t.clear_downtime().is_none());
        t.checked(false, d, None, 1, 1);
        t.reset_active();
        assert!(t.healthy());
        assert_eq!(t.record().status, Status::Unknown);
    }
}
