//! The local limiter: counters in this process, sharded and bounded, kept across
//! reloads (keys carry the route, limit name and algorithm).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use portcullis_store::{Rate, RateDecision, RateState};

/// Shards of the local limiter (a key's shard is its hash).
pub(super) const SHARDS: usize = 64;
/// Keys the local limiter holds at most (all shards together).
pub(super) const MAX_LOCAL_KEYS: usize = 256 * 1024;
/// How often a shard drops its expired keys.
pub(super) const SWEEP_MS: u64 = 10_000;
/// When a shard is full of live keys, the one expiring first of this many is evicted.
pub(super) const EVICTION_SAMPLE: usize = 8;
/// State of the limits that outlives snapshots: the local counters (keyed by route,
/// limit name and algorithm, so a reload keeps them) and whether the store is down
/// (to log an outage once).
pub struct Registry {
    shards: Box<[Mutex<Shard>]>,
    max_per_shard: usize,
    hasher: RandomState,
    origin: Instant,
    store_down: AtomicBool,
}

#[derive(Default)]
pub(super) struct Shard {
    map: HashMap<Box<str>, Entry>,
    next_sweep_ms: u64,
}

pub(super) struct Entry {
    state: RateState,
    expires_ms: u64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::with_capacity(MAX_LOCAL_KEYS)
    }
}

impl Registry {
    /// A local limiter holding at most about `max_keys` keys.
    pub fn with_capacity(max_keys: usize) -> Self {
        Registry {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            max_per_shard: max_keys.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
            origin: Instant::now(),
            store_down: AtomicBool::new(false),
        }
    }

    /// The local clock: milliseconds since the registry was made (monotonic).
    pub(super) fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Decides `cost` for `key` at `now_ms`, counting it if admitted.
    pub fn decide(&self, key: &str, rate: &Rate, cost: u64, now_ms: u64) -> RateDecision {
        let shard = &self.shards[(self.hasher.hash_one(key) as usize) % self.shards.len()];
        let mut shard = lock(shard);
        if now_ms >= shard.next_sweep_ms {
            shard.map.retain(|_, e| e.expires_ms > now_ms);
            shard.next_sweep_ms = now_ms.saturating_add(SWEEP_MS);
        }
        let state = shard
            .map
            .get(key)
            .filter(|e| e.expires_ms > now_ms)
            .map(|e| e.state);
        let (decision, next) = rate.decide(state, cost, now_ms);
        if decision.allowed || state.is_some() {
            let expires_ms = now_ms.saturating_add(rate.idle_ms());
            if let Some(e) = shard.map.get_mut(key) {
                *e = Entry {
                    state: next,
                    expires_ms,
                };
            } else {
                if shard.map.len() >= self.max_per_shard {
                    shard.make_room(now_ms, self.max_per_shard);
                }
                shard.map.insert(
                    key.into(),
                    Entry {
                        state: next,
                        expires_ms,
                    },
                );
            }
        }
        decision
    }

    /// Keys held now (tests, bounds).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records a store failure; true if it starts an outage (log it then only).
    pub(super) fn store_failed(&self) -> bool {
        !self.store_down.swap(true, Ordering::Relaxed)
    }

    /// Records a store success; true if it ends an outage.
    pub(super) fn store_ok(&self) -> bool {
        self.store_down.load(Ordering::Relaxed) && self.store_down.swap(false, Ordering::Relaxed)
    }
}

impl Shard {
    /// Drops expired keys; if the shard is still full, evicts the key expiring first
    /// among a few (its counter starts over if it comes back).
    pub(super) fn make_room(&mut self, now_ms: u64, max: usize) {
        self.map.retain(|_, e| e.expires_ms > now_ms);
        while self.map.len() >= max {
            let victim = self
                .map
                .iter()
                .take(EVICTION_SAMPLE)
                .min_by_key(|(_, e)| e.expires_ms)
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => {
                    self.map.remove(&k);
                }
                None => break,
            }
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Counters stay consistent across a panic (each update is one assignment).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use portcullis_store::RateAlgorithm;

    use super::*;

    fn rate(algorithm: RateAlgorithm, limit: u64, ms: u64, burst: u64) -> Rate {
        Rate {
            algorithm,
            limit,
            period: Duration::from_millis(ms),
            burst,
        }
    }

    fn admitted(reg: &Registry, key: &str, r: &Rate, n: usize, now: u64) -> usize {
        (0..n)
            .filter(|_| reg.decide(key, r, 1, now).allowed)
            .count()
    }

    #[test]
    fn local_sliding_window_with_injected_clock() {
        let reg = Registry::default();
        let r = rate(RateAlgorithm::SlidingWindow, 10, 60_000, 10);
        let t0 = 6_000_000;
        assert_eq!(admitted(&reg, "a", &r, 15, t0 + 59_000), 10);
        // Keys count separately.
        assert_eq!(admitted(&reg, "b", &r, 3, t0 + 59_000), 3);
        // 15 s into the next window the previous 10 weigh 7.5.
        assert_eq!(admitted(&reg, "a", &r, 5, t0 + 75_000), 2);
        let d = reg.decide("a", &r, 1, t0 + 75_000);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_secs(3));
        assert_eq!(admitted(&reg, "a", &r, 1, t0 + 78_000), 1);
    }

    #[test]
    fn local_token_bucket_with_injected_clock() {
        let reg = Registry::default();
        // 2 per second, burst 5.
        let r = rate(RateAlgorithm::TokenBucket, 2, 1_000, 5);
        assert_eq!(admitted(&reg, "k", &r, 8, 1_000), 5);
        let d = reg.decide("k", &r, 1, 1_000);
        assert_eq!((d.allowed, d.remaining), (false, 0));
        assert_eq!(d.retry_after, Duration::from_millis(500));
        assert_eq!(admitted(&reg, "k", &r, 3, 1_499), 0);
        assert_eq!(admitted(&reg, "k", &r, 3, 1_500), 1);
        assert_eq!(admitted(&reg, "k", &r, 9, 60_000), 5);
    }

    #[test]
    fn local_memory_is_bounded_and_idle_keys_go() {
        let reg = Registry::with_capacity(SHARDS * 4);
        let r = rate(RateAlgorithm::SlidingWindow, 5, 1_000, 5);
        for i in 0..10_000 {
            assert!(reg.decide(&format!("k{i}"), &r, 1, 10).allowed);
        }
        assert!(reg.len() <= SHARDS * 4, "{} keys", reg.len());
        // Long idle: the next sweep of a shard drops its keys.
        for i in 0..10_000 {
            reg.decide(&format!("x{i}"), &r, 0, 1_000_000);
        }
        assert!(reg.len() <= SHARDS * 4);
        // A refused first hit stores nothing.
        let reg = Registry::default();
        let strict = rate(RateAlgorithm::SlidingWindow, 1, 1_000, 1);
        assert!(!reg.decide("big", &strict, 2, 5).allowed);
        assert!(reg.is_empty());
    }
}
