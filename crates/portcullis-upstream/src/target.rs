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
    /// Failed requests in a row (passive health and breaker share the count).
    consecutive_failures: AtomicU32,
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
            consecutive_failures: AtomicU32::new(0),
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

    /// Whether a request may go to this target now. A breaker past its open time
    /// admits exactly one probe: the caller that gets `Ok` from this call must send
    /// it (the next probe is allowed `open_for` later if it never reports).
    pub fn admit(&self, breaker: Option<&BreakerPolicy>) -> Result<(), Unusable> {
        if !self.healthy() {
            return Err(Unusable::Unhealthy);
        }
        let Some(b) = breaker else { return Ok(()) };
        if self.breaker.load(Ordering::Relaxed) == OPEN {
            let until = self.breaker_until.load(Ordering::Relaxed);
            let now = now_ms();
            if now < until {
                return Err(Unusable::Overloaded);
            }
            // Half-open: one caller wins the probe.
            self.breaker_until
                .compare_exchange(
                    until,
                    now + ms(b.open_for),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .map_err(|_| Unusable::Overloaded)?;
            return Ok(());
        }
        if self.in_flight.load(Ordering::Relaxed) >= b.max_concurrent {
            return Err(Unusable::Overloaded);
        }
        Ok(())
    }

    /// Counts a request in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> Attempt {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Attempt {
            target: self.clone(),
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

    /// Passive health and breaker bookkeeping for one finished request.
    pub fn report(
        &self,
        outcome: Outcome,
        passive: Option<&PassivePolicy>,
        breaker: Option<&BreakerPolicy>,
    ) {
        match outcome {
            Outcome::Success => {
                if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                    self.consecutive_failures.store(0, Ordering::Relaxed);
                }
                if self.breaker.load(Ordering::Relaxed) == OPEN {
                    self.breaker.store(CLOSED, Ordering::Relaxed);
                }
            }
            Outcome::Failure => {
                let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                let now = now_ms();
                if let Some(b) = breaker {
                    let open = self.breaker.load(Ordering::Relaxed) == OPEN;
                    // A failed half-open probe, or the threshold reached.
                    if open || n >= b.failures {
                        self.breaker_until
                            .store(now + ms(b.open_for), Ordering::Relaxed);
                        self.breaker.store(OPEN, Ordering::Relaxed);
                    }
                }
                if let Some(p) = passive {
                    if n >= p.failures && !self.ejected() {
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
            .store(now + time.max(1), Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
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
            (true, s) if s > 0 => s.saturating_add(1),
            (true, _) => 1,
            (false, s) if s < 0 => s.saturating_sub(1),
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
            Status::Up | Status::Unknown if !ok && -r.streak >= unhealthy_after as i32 => {
                Status::Down
            }
            Status::Down | Status::Unknown if ok && r.streak >= healthy_after as i32 => Status::Up,
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

    /// Marks the down notification as sent (or not) for the current downtime.
    pub fn set_notified_down(&self, sent: bool) {
        if let Ok(mut r) = self.record.lock() {
            r.notified_down = sent;
        }
    }

    /// After recovery: forget the downtime once it has been reported.
    pub fn clear_downtime(&self) {
        if let Ok(mut r) = self.record.lock() {
            r.first_down_at = None;
            r.notified_down = false;
        }
    }
}

/// A request in flight on a target; drop it when the response head arrives or the
/// attempt fails.
pub struct Attempt {
    target: Arc<TargetState>,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.target.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Arc<TargetState> {
        Arc::new(TargetState::new(Arc::from("http://t")))
    }

    #[test]
    fn passive_ejection_doubles() {
        let t = target();
        let p = PassivePolicy {
            failures: 2,
            eject_for: Duration::from_millis(30),
            max_eject: Duration::from_secs(10),
        };
        t.report(Outcome::Failure, Some(&p), None);
        assert!(t.healthy());
        t.report(Outcome::Failure, Some(&p), None);
        assert!(!t.healthy());
        assert_eq!(t.admit(None), Err(Unusable::Unhealthy));
        let first = t.ejected_until.load(Ordering::Relaxed) - now_ms();
        while !t.healthy() {
            std::thread::sleep(Duration::from_millis(5));
        }
        t.report(Outcome::Failure, Some(&p), None);
        t.report(Outcome::Failure, Some(&p), None);
        let second = t.ejected_until.load(Ordering::Relaxed) - now_ms();
        assert!(second > first + 10, "{first} {second}");
    }

    #[test]
    fn breaker_opens_probes_once_and_closes() {
        let t = target();
        let b = BreakerPolicy {
            max_concurrent: 2,
            failures: 3,
            open_for: Duration::from_millis(20),
        };
        let (g1, g2) = (t.start(), t.start());
        assert_eq!(t.admit(Some(&b)), Err(Unusable::Overloaded));
        drop((g1, g2));
        assert_eq!(t.admit(Some(&b)), Ok(()));
        for _ in 0..3 {
            t.report(Outcome::Failure, None, Some(&b));
        }
        assert_eq!(t.admit(Some(&b)), Err(Unusable::Overloaded));
        std::thread::sleep(Duration::from_millis(25));
        assert_eq!(t.admit(Some(&b)), Ok(()), "one probe");
        assert_eq!(t.admit(Some(&b)), Err(Unusable::Overloaded), "only one");
        t.report(Outcome::Success, None, Some(&b));
        assert_eq!(t.admit(Some(&b)), Ok(()));
        assert!(!t.breaker_open());
    }

    #[test]
    fn active_thresholds() {
        let t = target();
        let d = Duration::from_millis(1);
        assert_eq!(t.checked(false, d, None, 2, 2), None);
        assert!(t.healthy(), "one failure is not enough");
        assert_eq!(t.checked(false, d, None, 2, 2), Some(Status::Down));
        assert!(!t.healthy());
        assert!(t.record().first_down_at.is_some());
        assert_eq!(t.checked(true, d, None, 2, 2), None);
        assert_eq!(t.checked(true, d, None, 2, 2), Some(Status::Up));
        assert!(t.healthy());
        assert_eq!(t.record().latency_ms, Some(1));
    }
}
