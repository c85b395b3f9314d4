//! Backends as the tests open them: Redis clients with short timeouts, two handles
//! on one SQLite file, two clients of one Redis (two gateway instances).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use portcullis_store::{EmbeddedStore, RedisOptions, RedisStore, Store};

use crate::common::RedisServer;

/// Longest wait for a value or window to expire.
pub const EXPIRY_WAIT: Duration = Duration::from_secs(15);

pub fn redis_opts(url: String, prefix: &str) -> RedisOptions {
    RedisOptions {
        url,
        key_prefix: prefix.to_string(),
        connect_timeout: Duration::from_millis(500),
        command_timeout: Duration::from_millis(500),
    }
}

pub async fn redis_store(server: &RedisServer, prefix: &str) -> Arc<dyn Store> {
    Arc::new(
        RedisStore::connect(redis_opts(server.url(), prefix))
            .await
            .expect("connect"),
    )
}

/// Two handles on one SQLite file.
pub fn two_embedded(dir: &tempfile::TempDir) -> (Arc<dyn Store>, Arc<dyn Store>) {
    let a = EmbeddedStore::open(dir.path()).unwrap();
    let b = EmbeddedStore::open(dir.path()).unwrap();
    (Arc::new(a), Arc::new(b))
}

/// Two clients of one Redis, as two gateway instances.
pub async fn two_redis(server: &RedisServer) -> (Arc<dyn Store>, Arc<dyn Store>) {
    (
        redis_store(server, "gw:").await,
        redis_store(server, "gw:").await,
    )
}
