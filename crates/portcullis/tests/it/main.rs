//! Black-box integration tests: the real binary, real sockets, real upstreams.

mod harness;
mod identity;
#[path = "../../../portcullis-auth/tests/support/mod.rs"]
mod jwt_support;
mod keys;
mod login;
#[path = "../../../portcullis-store/tests/common/mod.rs"]
mod redis_harness;

mod auth;
mod basics;
mod bff;
mod config;
mod examples;
mod external_auth;
mod hardening;
mod ops;
mod pipelines;
mod policies;
mod proxy;
mod reload;
mod resilience;
mod routing;
mod sse;
mod store;
mod tls_upstream;
mod upstreams;
mod validation;
