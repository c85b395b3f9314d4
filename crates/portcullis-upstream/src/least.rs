//! Least request: two targets drawn at random, the one with the lower load wins
//! (power of two choices: near-best balance, no global scan, no herd on one
//! idle target). Load = (in-flight requests + 1) × EWMA of its latency, so a slow
//! target gets fewer requests even when its queue looks short.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Per-target counters, shared by every request using the group.
#[derive(Debug)]
struct Stats {
    in_flight: AtomicU64,
    /// EWMA of latency in microseconds (0 until the first response).
    ewma_us: AtomicU64,
}

pub struct LeastRequest {
    stats: Box<[Stats]>,
    /// xorshift state for the two draws (races only perturb randomness).
    seed: AtomicU64,
}

/// Held while a request is in flight on a target; [`InFlight::done`] records
/// its latency.
pub struct InFlight<'a> {
    stats: &'a Stats,
    finished: bool,
}

impl InFlight<'_> {
    /// Records the request's latency (EWMA, weight 1/8 for the new sample).
    pub fn done(mut self, latency: Duration) {
        let sample = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let old = self.stats.ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.stats.ewma_us.store(new, Ordering::Relaxed);
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.finished = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl LeastRequest {
    pub fn new(targets: usize) -> Self {
        LeastRequest {
            stats: (0..targets)
                .map(|_| Stats {
                    in_flight: AtomicU64::new(0),
                    ewma_us: AtomicU64::new(0),
                })
                .collect(),
            seed: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
        }
    }

    fn random(&self) -> u64 {
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::Relaxed);
        x
    }

    /// Whether `a` is less loaded than `b`: in-flight requests weighted by
    /// latency; a target without a latency yet is compared by in-flight alone.
    fn lighter(&self, a: usize, b: usize) -> bool {
        let (sa, sb) = (&self.stats[a], &self.stats[b]);
        let (fa, fb) = (
            u128::from(sa.in_flight.load(Ordering::Relaxed) + 1),
            u128::from(sb.in_flight.load(Ordering::Relaxed) + 1),
        );
        let (ea, eb) = (
            u128::from(sa.ewma_us.load(Ordering::Relaxed)),
            u128::from(sb.ewma_us.load(Ordering::Relaxed)),
        );
        if ea == 0 || eb == 0 {
            fa < fb
        } else {
            fa * ea < fb * eb
        }
    }

    /// Picks a usable target and counts the request on it.
    pub fn pick(&self, usable: impl Fn(usize) -> bool) -> Option<(usize, InFlight<'_>)> {
        let n = self.stats.len();
        if n == 0 {
            return None;
        }
        let r = self.random();
        let a = (r % n as u64) as usize;
        // Two distinct targets when there are two.
        let b = if n > 1 {
            (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n
        } else {
            a
        };
        let chosen = match (usable(a), usable(b)) {
            (true, true) => Some(if self.lighter(b, a) { b } else { a }),
            (true, false) => Some(a),
            (false, true) => Some(b),
            // Both draws unusable: the least loaded usable one, by scan.
            (false, false) => {
                (0..n)
                    .filter(|&i| usable(i))
                    .reduce(|best, i| if self.lighter(i, best) { i } else { best })
            }
        }?;
        let stats = &self.stats[chosen];
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Some((
            chosen,
            InFlight {
                stats,
                finished: false,
            },
        ))
    }

    pub fn in_flight(&self, i: usize) -> u64 {
        self.stats[i].in_flight.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_and_slow_targets_get_fewer_requests() {
        let lr = LeastRequest::new(3);
        // Target 0 holds 20 requests open: the others take the new ones.
        let held: Vec<_> = (0..20)
            .map(|_| {
                let (i, g) = lr.pick(|i| i == 0).unwrap();
                assert_eq!(i, 0);
                g
            })
            .collect();
        let mut counts = [0usize; 3];
        for _ in 0..1_000 {
            let (i, g) = lr.pick(|_| true).unwrap();
            counts[i] += 1;
            g.done(Duration::from_millis(1));
        }
        assert!(counts[0] < 100, "{counts:?}");
        drop(held);
        assert_eq!(lr.in_flight(0), 0);
        // Target 2 answers 50x slower: it gets a small share.
        let mut counts = [0usize; 3];
        for _ in 0..3_000 {
            let (i, g) = lr.pick(|_| true).unwrap();
            counts[i] += 1;
            let ms = if i == 2 { 50 } else { 1 };
            g.done(Duration::from_millis(ms));
        }
        assert!(counts[2] < counts[0] / 3, "{counts:?}");
    }

    #[test]
    fn unusable_targets_are_never_picked() {
        let lr = LeastRequest::new(4);
        for _ in 0..500 {
            let (i, _g) = lr.pick(|i| i == 3).unwrap();
            assert_eq!(i, 3);
        }
        assert!(lr.pick(|_| false).is_none());
        assert!(LeastRequest::new(0).pick(|_| true).is_none());
    }
}
