//! The policies issue: each policy proven against the real binary, real sockets and
//! real upstreams (and a real Redis where a policy is cluster-wide).

mod cache;
mod compression;
mod cors;
mod edge;
mod ratelimit;

use std::time::Duration;

use crate::harness::*;

pub(super) const SECRET: &str = "policies-secret-0123456789abcdef";

pub(super) fn hs256(claims: serde_json::Value) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

pub(super) fn exp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() + 600)
        .unwrap_or(0)
}

/// `portcullis check` on `yaml`: exit code and stderr.
pub(super) fn check(yaml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write_config(dir.path(), yaml);
    let (code, _out, err) = run_cli(&["check", "-c", &p.display().to_string()], &[]);
    (code, err)
}
