//! Consistent hashing with Maglev's lookup table (Eisenbud et al., NSDI 2016):
//! each target fills table slots in the order of its own permutation, turn by turn,
//! so every target owns about M/n slots and a target joining or leaving moves
//! about 1/n of the keys. A lookup is one hash and one array read.
//!
//! Targets are identified by name (their URL), so the table, and with it every
//! key's target, is the same on every instance and after every reload.

/// Table sizes (primes), the smallest with at least 100 slots per target is used.
const SIZES: [usize; 4] = [5_003, 10_007, 65_537, 655_373];

pub struct Maglev {
    table: Box<[u32]>,
    targets: usize,
}

/// FNV-1a, 64-bit, with a seed: stable across processes and versions.
pub fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // A final mix: FNV's low bits are weak for short keys.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

impl Maglev {
    /// `names[i]` identifies target `i`; names must be distinct.
    pub fn new<S: AsRef<[u8]>>(names: &[S]) -> Self {
        let n = names.len();
        if n == 0 {
            return Maglev {
                table: Box::new([]),
                targets: 0,
            };
        }
        let m = SIZES
            .iter()
            .copied()
            .find(|m| *m >= n * 100)
            .unwrap_or(SIZES[SIZES.len() - 1]);
        let perms: Vec<(usize, usize)> = names
            .iter()
            .map(|name| {
                let offset = (fnv1a(0x4d61_676c, name.as_ref()) % m as u64) as usize;
                let skip = (fnv1a(0x6576_2121, name.as_ref()) % (m as u64 - 1)) as usize + 1;
                (offset, skip)
            })
            .collect();
        let mut table = vec![u32::MAX; m];
        let mut next = vec![0usize; n];
        let mut filled = 0;
        'fill: loop {
            for (i, (offset, skip)) in perms.iter().enumerate() {
                let mut slot = (offset + next[i] * skip) % m;
                while table[slot] != u32::MAX {
                    next[i] += 1;
                    slot = (offset + next[i] * skip) % m;
                }
                table[slot] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Maglev {
            table: table.into_boxed_slice(),
            targets: n,
        }
    }

    /// The target for `key` (a header, cookie, client IP or path param value);
    /// when it is unusable, the next usable one along the table, so the keys of a
    /// down target spread over the others and come back when it does.
    pub fn pick(&self, key: &[u8], usable: impl Fn(usize) -> bool) -> Option<usize> {
        let m = self.table.len();
        if m == 0 {
            return None;
        }
        let h = fnv1a(0, key) as usize;
        (0..m.min(self.targets * 64 + 1))
            .map(|k| self.table[(h + k) % m] as usize)
            .find(|&i| usable(i))
            .or_else(|| (0..self.targets).find(|&i| usable(i)))
    }

    pub fn targets(&self) -> usize {
        self.targets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<String> {
        (0..20_000).map(|i| format!("user-{i}")).collect()
    }

    #[test]
    fn keys_spread_evenly() {
        let m = Maglev::new(&["http://a:80", "http://b:80", "http://c:80"]);
        let mut counts = [0usize; 3];
        for k in keys() {
            counts[m.pick(k.as_bytes(), |_| true).unwrap()] += 1;
        }
        for c in counts {
            assert!((6_000..=7_400).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn a_fourth_target_moves_about_a_quarter_of_the_keys() {
        let three = Maglev::new(&["http://a:80", "http://b:80", "http://c:80"]);
        let four = Maglev::new(&["http://a:80", "http://b:80", "http://c:80", "http://d:80"]);
        let keys = keys();
        let moved = keys
            .iter()
            .filter(|k| three.pick(k.as_bytes(), |_| true) != four.pick(k.as_bytes(), |_| true))
            .count();
        let share = moved as f64 / keys.len() as f64;
        assert!(share <= 0.30, "{share}");
        assert!(share >= 0.20, "{share}");
        // Keys that moved went to the new target (Maglev allows a little more).
        let to_new = keys
            .iter()
            .filter(|k| {
                let (a, b) = (
                    three.pick(k.as_bytes(), |_| true),
                    four.pick(k.as_bytes(), |_| true),
                );
                a != b && b == Some(3)
            })
            .count();
        assert!(to_new as f64 >= moved as f64 * 0.9, "{to_new} of {moved}");
    }

    #[test]
    fn a_down_target_moves_only_its_own_keys() {
        let m = Maglev::new(&["http://a:80", "http://b:80", "http://c:80"]);
        for k in keys() {
            let before = m.pick(k.as_bytes(), |_| true).unwrap();
            let after = m.pick(k.as_bytes(), |i| i != 1).unwrap();
            assert_ne!(after, 1);
            if before != 1 {
                assert_eq!(before, after);
            }
        }
        assert_eq!(m.pick(b"x", |_| false), None);
        assert_eq!(Maglev::new::<&str>(&[]).pick(b"x", |_| true), None);
    }

    #[test]
    fn the_table_is_the_same_everywhere() {
        let a = Maglev::new(&["http://a:80", "http://b:80"]);
        let b = Maglev::new(&["http://a:80", "http://b:80"]);
        assert_eq!(a.table, b.table);
    }
}
