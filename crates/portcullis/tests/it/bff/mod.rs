//! Browser sessions (issue 9): a real OpenID Connect provider on loopback.

mod bearer;
mod browser;
mod evil_idp;
mod example;
pub mod idp;

pub mod login;
mod proxying;
mod refresh;
mod smoke;
mod stores;
