//! Retry budget and backoff: retries may add at most `ratio` of the requests (plus a
//! small floor per second, so a quiet route can still retry), so when every target
//! fails they cannot multiply the load of an outage.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::target::now_ms;

/// Balance unit: one retry = `UNIT`; each request deposits `ratio × UNIT`.
const UNIT: i64 = 1000;
/// Savings kept at most (in retries), so a long calm does not fund a storm.
const MAX_SAVED: i64 = 10;

#[derive(Debug)]
pub struct RetryBudget {
    deposit: i64,
    min_per_second: u32,
    balance: AtomicI64,
    /// Second (of [`now_ms`]) and retries taken from the floor in it, packed.
    floor: AtomicU64,
}

impl RetryBudget {
    /// `ratio` in 0..=1 (0.2: retries at most 20 % of requests).
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        RetryBudget {
            deposit: (ratio.clamp(0.0, 1.0) * UNIT as f64) as i64,
            min_per_second,
            balance: AtomicI64::new(0),
            floor: AtomicU64::new(0),
        }
    }

    /// Every request that may be retried deposits its share.
    pub fn deposit(&self) {
        if self.deposit == 0 {
            return;
        }
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b + self.deposit).min(MAX_SAVED * UNIT))
            });
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        let paid = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= UNIT).then_some(b - UNIT)
            })
            .is_ok();
        paid || self.take_from_floor()
    }

    fn take_from_floor(&self) -> bool {
        if self.min_per_second == 0 {
            return false;
        }
        let second = now_ms() / 1000;
        self.floor
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |packed| {
                let (s, n) = (packed >> 32, packed & 0xffff_ffff);
                if s != second {
                    Some((second << 32) | 1)
                } else if n < u64::from(self.min_per_second) {
                    Some(packed + 1)
                } else {
                    None
                }
            })
            .is_ok()
    }
}

/// Exponential backoff with full jitter: a random wait in `0..=min(max, base × 2^(retry-1))`.
pub fn backoff(base: Duration, max: Duration, retry: u32) -> Duration {
    let cap = base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
        .min(max);
    let micros = u64::try_from(cap.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(fastrand::u64(0..=micros))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_caps_retries_at_the_ratio() {
        let b = RetryBudget::new(0.2, 0);
        let mut retries = 0;
        for _ in 0..100 {
            b.deposit();
            if b.withdraw() {
                retries += 1;
            }
        }
        assert_eq!(retries, 20);
    }

    #[test]
    fn floor_allows_a_few_per_second() {
        let b = RetryBudget::new(0.0, 3);
        let n = (0..10).filter(|_| b.withdraw()).count();
        assert_eq!(n, 3);
    }

    #[test]
    fn savings_are_capped() {
        let b = RetryBudget::new(0.5, 0);
        for _ in 0..1000 {
            b.deposit();
        }
        let n = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(n as i64, MAX_SAVED);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(10);
        let max = Duration::from_millis(100);
        for _ in 0..100 {
            assert!(backoff(base, max, 1) <= base);
            assert!(backoff(base, max, 3) <= base * 4);
            assert!(backoff(base, max, 10) <= max);
        }
    }
}
