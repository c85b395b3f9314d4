//! Upstream groups: the choice of a target for each request.
//!
//! This crate starts with the balancers (issue 8 §1); pools, health checks and
//! breakers join it. Every balancer picks among the targets a predicate calls
//! usable (healthy, breaker closed) and never allocates or locks on a pick:
//! - [`RoundRobin`]: smooth weighted round-robin (nginx's sequence, precomputed),
//!   one atomic increment per pick;
//! - [`LeastRequest`]: power of two choices on in-flight requests weighted by an
//!   EWMA of latency;
//! - [`Maglev`]: consistent hashing with Maglev's lookup table — a target joining
//!   or leaving moves about 1/n of the keys.

mod hash;
mod least;
pub mod round_robin;

pub use hash::Maglev;
pub use least::{InFlight, LeastRequest};
pub use round_robin::RoundRobin;
