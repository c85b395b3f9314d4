//! Browser sessions (issue 9): a real OpenID Connect provider on loopback.

pub mod idp;

mod login;
mod smoke;
