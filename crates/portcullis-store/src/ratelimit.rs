//! Rate-limit algorithms, as pure functions of a small state and a clock: the
//! gateway's in-process limiter and the embedded store run [`Rate::decide`]; the
//! Redis backend runs the same arithmetic in one Lua script.
//!
//! - **Sliding window** (two-window weighted counter, as Cloudflare's): windows of
//!   `period` aligned on the clock; a request is admitted while
//!   `previous × (1 − elapsed/period) + current + cost ≤ limit`.
//! - **Token bucket**: a bucket of `burst` tokens refilled at `limit` per `period`;
//!   a request takes `cost` tokens.

use std::time::Duration;

/// Which algorithm a [`Rate`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateAlgorithm {
    SlidingWindow,
    TokenBucket,
}

/// One limit: `limit` requests per `period` (token bucket: refill rate, holding at most
/// `burst` tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub algorithm: RateAlgorithm,
    pub limit: u64,
    pub period: Duration,
    /// Token bucket size; ignored by the sliding window.
    pub burst: u64,
}

/// What a limit decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the cost was admitted (and counted).
    pub allowed: bool,
    /// Requests (tokens) left after this decision.
    pub remaining: u64,
    /// Sliding window: until the current window ends (when refused: `retry_after`).
    /// Token bucket: until the bucket is full again.
    pub reset_after: Duration,
    /// When refused: how long until the same cost would be admitted. Zero if allowed.
    pub retry_after: Duration,
}

/// The state of one key. Sliding window: `stamp_ms` = start of the current window,
/// `a` = its count, `b` = the previous window's count. Token bucket: `stamp_ms` = last
/// refill, `a` = tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RateState {
    pub stamp_ms: u64,
    pub a: f64,
    pub b: f64,
}

/// Slack for floating-point token arithmetic (a token that is 0.9999999999 is whole).
const EPSILON: f64 = 1e-9;

/// Milliseconds, rounded up, forgiving floating-point dust (18000.000000000004 → 18000).
fn ceil_ms(x: f64) -> u64 {
    (x - 1e-6).ceil().max(0.0) as u64
}

impl Rate {
    pub fn period_ms(&self) -> u64 {
        u64::try_from(self.period.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// How long a key's state matters after it was last written: after this it is
    /// the same as no state (sliding window: two periods; token bucket: time to
    /// refill an empty bucket).
    pub fn idle_ms(&self) -> u64 {
        match self.algorithm {
            RateAlgorithm::SlidingWindow => self.period_ms().saturating_mul(2),
            RateAlgorithm::TokenBucket => {
                let per_ms = self.limit.max(1) as f64 / self.period_ms() as f64;
                ceil_ms(self.burst.max(1) as f64 / per_ms).max(1)
            }
        }
    }

    /// Decides `cost` at `now_ms` from `state` (`None`: a key never seen or expired);
    /// returns the decision and the state to keep.
    pub fn decide(
        &self,
        state: Option<RateState>,
        cost: u64,
        now_ms: u64,
    ) -> (RateDecision, RateState) {
        match self.algorithm {
            RateAlgorithm::SlidingWindow => self.sliding(state, cost, now_ms),
            RateAlgorithm::TokenBucket => self.bucket(state, cost, now_ms),
        }
    }

    fn sliding(&self, state: Option<RateState>, cost: u64, now: u64) -> (RateDecision, RateState) {
        let p = self.period_ms();
        let mut start = now - now % p;
        let (mut cur, prev) = match state {
            Some(s) if s.stamp_ms == start => (s.a, s.b),
            Some(s) if s.stamp_ms.saturating_add(p) == start => (0.0, s.a),
            // Another instance's clock ran ahead: count in its window.
            Some(s) if s.stamp_ms > start => {
                start = s.stamp_ms;
                (s.a, s.b)
            }
            _ => (0.0, 0.0),
        };
        let elapsed = now.saturating_sub(start).min(p);
        let pf = p as f64;
        let weight = (pf - elapsed as f64) / pf;
        let estimate = prev * weight + cur;
        let limit = self.limit as f64;
        let costf = cost as f64;
        let to_end = p - elapsed;
        if estimate + costf <= limit + EPSILON {
            cur += costf;
            let remaining = (limit - estimate - costf + EPSILON).floor().max(0.0) as u64;
            let decision = RateDecision {
                allowed: true,
                remaining,
                reset_after: Duration::from_millis(to_end),
                retry_after: Duration::ZERO,
            };
            return (
                decision,
                RateState {
                    stamp_ms: start,
                    a: cur,
                    b: prev,
                },
            );
        }
        // Refused: when would `cost` fit? While this window lasts, the previous
        // window's weight must fall to `room / prev`; else in the next window, where
        // this window's count is the one that decays.
        let room = limit - costf - cur;
        let retry = if room >= 0.0 && prev > 0.0 {
            let at = ceil_ms(pf * (1.0 - room / prev));
            at.saturating_sub(elapsed).max(1)
        } else if costf > limit {
            // Never fits; say one period.
            p
        } else {
            let room = limit - costf;
            let at = if cur > 0.0 {
                ceil_ms(pf * (1.0 - room / cur))
            } else {
                0
            };
            to_end + at
        };
        let remaining = (limit - estimate + EPSILON).floor().max(0.0) as u64;
        let decision = RateDecision {
            allowed: false,
            remaining,
            reset_after: Duration::from_millis(retry),
            retry_after: Duration::from_millis(retry),
        };
        (
            decision,
            RateState {
                stamp_ms: start,
                a: cur,
                b: prev,
            },
        )
    }

    fn bucket(&self, state: Option<RateState>, cost: u64, now: u64) -> (RateDecision, RateState) {
        let cap = self.burst.max(1) as f64;
        let per_ms = self.limit.max(1) as f64 / self.period_ms() as f64;
        let (mut tokens, mut last) = match state {
            Some(s) => (s.a, s.stamp_ms),
            None => (cap, now),
        };
        if now > last {
            tokens = (tokens + (now - last) as f64 * per_ms).min(cap);
            last = now;
        }
        let costf = cost as f64;
        let allowed = tokens + EPSILON >= costf;
        let retry = if allowed {
            0
        } else if costf > cap {
            self.period_ms()
        } else {
            ceil_ms((costf - tokens) / per_ms).max(1)
        };
        if allowed {
            tokens = (tokens - costf).max(0.0);
        }
        let full_in = ceil_ms((cap - tokens) / per_ms);
        let decision = RateDecision {
            allowed,
            remaining: (tokens + EPSILON).floor() as u64,
            reset_after: Duration::from_millis(full_in),
            retry_after: Duration::from_millis(retry),
        };
        (
            decision,
            RateState {
                stamp_ms: last,
                a: tokens,
                b: 0.0,
            },
        )
    }
}

impl RateState {
    /// `"<stamp> <a> <b>"`, as the embedded store keeps it.
    pub fn encode(&self) -> String {
        format!("{} {} {}", self.stamp_ms, self.a, self.b)
    }

    pub fn decode(s: &[u8]) -> Option<RateState> {
        let s = std::str::from_utf8(s).ok()?;
        let mut it = s.split_ascii_whitespace();
        let state = RateState {
            stamp_ms: it.next()?.parse().ok()?,
            a: it.next()?.parse().ok()?,
            b: it.next()?.parse().ok()?,
        };
        (it.next().is_none() && state.a.is_finite() && state.b.is_finite()).then_some(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sliding(limit: u64, secs: u64) -> Rate {
        Rate {
            algorithm: RateAlgorithm::SlidingWindow,
            limit,
            period: Duration::from_secs(secs),
            burst: limit,
        }
    }

    fn bucket(limit: u64, secs: u64, burst: u64) -> Rate {
        Rate {
            algorithm: RateAlgorithm::TokenBucket,
            limit,
            period: Duration::from_secs(secs),
            burst,
        }
    }

    /// Runs `n` requests at `now`, returning how many were admitted and the state.
    fn run(rate: &Rate, state: &mut Option<RateState>, n: u64, now: u64) -> u64 {
        let mut ok = 0;
        for _ in 0..n {
            let (d, s) = rate.decide(*state, 1, now);
            *state = Some(s);
            ok += u64::from(d.allowed);
        }
        ok
    }

    #[test]
    fn sliding_window_counts_exactly_within_a_window() {
        let r = sliding(10, 60);
        let mut st = None;
        let t0 = 600_000; // a window boundary
        assert_eq!(run(&r, &mut st, 15, t0 + 1_000), 10);
        let (d, _) = r.decide(st, 1, t0 + 1_000);
        assert!(!d.allowed);
        assert_eq!(d.remaining, 0);
        // In the next window these 10 weigh 10·(1 − e/60): one more fits at e = 6 s.
        assert_eq!(d.retry_after, Duration::from_millis(59_000 + 6_000));
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        let r = sliding(10, 60);
        let mut st = None;
        let t0 = 600_000;
        assert_eq!(run(&r, &mut st, 10, t0 + 59_000), 10);
        // 15 s into the next window the previous 10 weigh 7.5: two more fit.
        assert_eq!(run(&r, &mut st, 5, t0 + 75_000), 2);
        let (d, _) = r.decide(st, 1, t0 + 75_000);
        assert!(!d.allowed);
        // 10·(1 − e/60) + 2 + 1 ≤ 10 ⇔ e ≥ 18 s: 3 s from now.
        assert_eq!(d.retry_after, Duration::from_millis(3_000));
        assert_eq!(run(&r, &mut st, 1, t0 + 78_000), 1);
        // Two windows later everything is forgotten.
        assert_eq!(run(&r, &mut st, 20, t0 + 180_000), 10);
    }

    #[test]
    fn sliding_window_remaining_and_reset() {
        let r = sliding(100, 60);
        let (d, s) = r.decide(None, 1, 120_000 + 20_000);
        assert!(d.allowed);
        assert_eq!(d.remaining, 99);
        assert_eq!(d.reset_after, Duration::from_secs(40));
        assert_eq!(s.stamp_ms, 120_000);
    }

    #[test]
    fn token_bucket_bursts_then_refills() {
        let r = bucket(1, 1, 3);
        let mut st = None;
        assert_eq!(run(&r, &mut st, 5, 1_000), 3);
        let (d, _) = r.decide(st, 1, 1_000);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_millis(1_000));
        assert_eq!(d.reset_after, Duration::from_millis(3_000));
        assert_eq!(run(&r, &mut st, 2, 1_999), 0);
        assert_eq!(run(&r, &mut st, 2, 2_000), 1);
        // Never more than the burst, however long it rested.
        assert_eq!(run(&r, &mut st, 10, 100_000), 3);
    }

    #[test]
    fn token_bucket_steady_rate() {
        // 10 per second, burst 1: one every 100 ms.
        let r = bucket(10, 1, 1);
        let mut st = None;
        let mut ok = 0;
        for ms in 0..1_000 {
            ok += run(&r, &mut st, 1, 5_000 + ms);
        }
        assert_eq!(ok, 10);
    }

    #[test]
    fn idle_and_encoding() {
        assert_eq!(sliding(10, 60).idle_ms(), 120_000);
        assert_eq!(bucket(1, 1, 3).idle_ms(), 3_000);
        let s = RateState {
            stamp_ms: 1_700_000_000_123,
            a: 2.5,
            b: 7.0,
        };
        assert_eq!(RateState::decode(s.encode().as_bytes()), Some(s));
        assert_eq!(RateState::decode(b"1 2"), None);
        assert_eq!(RateState::decode(b"x 1 2"), None);
    }
}
