//! Smooth weighted round-robin.
//!
//! nginx's algorithm (each pick: every target gains its weight, the largest
//! current value wins and loses the total) spreads a heavy target's turns evenly
//! (weights 5,1,1 give `a a b a c a a`, not `a a a a a b c`). The sequence is
//! periodic with period = the sum of the weights, so it is computed once and a
//! pick is one atomic increment into it.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Weights are capped so the precomputed sequence stays small.
pub const MAX_WEIGHT: u32 = 1_000;

pub struct RoundRobin {
    sequence: Box<[u32]>,
    next: AtomicUsize,
    targets: usize,
}

impl RoundRobin {
    /// `weights[i]` is target `i`'s weight (0 = never picked; capped at
    /// [`MAX_WEIGHT`]).
    pub fn new(weights: &[u32]) -> Self {
        let weights: Vec<i64> = weights
            .iter()
            .map(|w| i64::from((*w).min(MAX_WEIGHT)))
            .collect();
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; weights.len()];
        let mut sequence = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (i, w) in weights.iter().enumerate() {
                current[i] += w;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            sequence.push(best as u32);
        }
        RoundRobin {
            sequence: sequence.into_boxed_slice(),
            next: AtomicUsize::new(0),
            targets: weights.len(),
        }
    }

    /// The next usable target, or `None` when none is (or all weights are 0).
    pub fn pick(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.sequence.len();
        if len == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // Skipping unusable targets keeps the others' proportions.
        (0..len)
            .map(|k| self.sequence[(start + k) % len] as usize)
            .find(|&i| usable(i))
    }

    pub fn targets(&self) -> usize {
        self.targets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_is_smooth() {
        let rr = RoundRobin::new(&[5, 1, 1]);
        let picks: Vec<usize> = (0..7).map(|_| rr.pick(|_| true).unwrap()).collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weights_hold_over_many_picks() {
        let rr = RoundRobin::new(&[1, 1, 2]);
        let mut counts = [0usize; 3];
        for _ in 0..4_000 {
            counts[rr.pick(|_| true).unwrap()] += 1;
        }
        assert_eq!(counts, [1_000, 1_000, 2_000]);
    }

    #[test]
    fn unusable_targets_are_skipped_and_zero_weights_never_picked() {
        let rr = RoundRobin::new(&[1, 0, 3]);
        for _ in 0..100 {
            assert_ne!(rr.pick(|_| true), Some(1));
            assert_eq!(rr.pick(|i| i != 2), Some(0));
        }
        assert_eq!(rr.pick(|_| false), None);
        assert_eq!(RoundRobin::new(&[]).pick(|_| true), None);
        assert_eq!(RoundRobin::new(&[0, 0]).pick(|_| true), None);
    }
}
