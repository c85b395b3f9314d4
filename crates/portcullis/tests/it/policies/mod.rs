//! The policies issue: each policy proven against the real binary, real sockets and
//! real upstreams (and a real Redis where a policy is cluster-wide).

mod ratelimit;
