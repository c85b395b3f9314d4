//! Black-box integration tests: the real binary, real sockets, real upstreams.

mod harness;

mod auth;
mod basics;
mod config;
mod examples;
mod ops;
mod proxy;
mod reload;
mod routing;
mod tls_upstream;
