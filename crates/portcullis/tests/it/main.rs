//! Black-box integration tests: the real binary, real sockets, real upstreams.

mod harness;

mod auth;
mod basics;
mod config;
mod ops;
mod proxy;
mod reload;
mod routing;
