//! The hardening issue: every bypass found in review, attacked the way an attacker
//! would (raw sockets, hostile names and headers), against the real binary. One file
//! per part of the issue; the shared helpers are here.

mod auth;
mod authority;
mod connections;
mod headers;
mod paths;
mod upstreams;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

pub(super) const SECRET: &str = "hardening-secret-0123456789abcdef";

pub(super) fn hs256(claims: serde_json::Value) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub(super) fn exp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

/// A raw HTTP/1.1 request with extra header lines (each ending in `\r\n`).
pub(super) async fn raw_request(addr: SocketAddr, head: &str) -> RawResponse {
    raw(addr, head).await
}

/// Waits until the peer closes `stream` (EOF or reset); false if it stays open.
pub(super) async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

pub(super) fn check_file(yaml: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), yaml);
    run_cli(&["check", "-c", &path.display().to_string()], &[])
}
