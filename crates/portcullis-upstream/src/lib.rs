//! Upstream groups: the choice of a target for each request, and what is known
//! about each target.
//!
//! Every balancer picks among the targets a predicate calls usable (healthy,
//! breaker closed) and never allocates or locks on a pick:
//! - [`RoundRobin`]: smooth weighted round-robin (nginx's sequence, precomputed),
//!   one atomic increment per pick;
//! - [`LeastRequest`]: power of two choices on in-flight requests weighted by an
//!   EWMA of latency;
//! - [`Maglev`]: consistent hashing with Maglev's lookup table — a target joining
//!   or leaving moves about 1/n of the keys.
//!
//! [`TargetState`] holds a target's health (active checks, passive ejection), its
//! circuit breaker and in-flight count; [`RetryBudget`] bounds retries.

mod hash;
mod least;
pub mod retry;
pub mod round_robin;
pub mod target;

pub use hash::Maglev;
pub use least::{InFlight, LeastRequest};
pub use retry::RetryBudget;
pub use round_robin::RoundRobin;
pub use target::{Attempt, BreakerPolicy, Outcome, PassivePolicy, Status, TargetState, Unusable};
