//! Redis/Valkey backend via `fred`. Everything that must be exact across gateway
//! instances is one command (SET NX PX, GETDEL) or one Lua script (window counter).

use std::time::Duration;

use bytes::Bytes;
use fred::prelude::{
    ClientLike, Config, Error as FredError, ErrorKind, Options, ReconnectPolicy, Value,
};
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand};

use crate::{redact_url, ttl_millis, Result, Store, StoreError, WindowCount};

/// Options for [`RedisStore::connect`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://[[user:]password@]host[:port][/db]` or `rediss://…` (TLS).
    pub url: String,
    /// Prepended to every key.
    pub key_prefix: String,
    /// TCP (+TLS) connect timeout, also the longest time `connect` waits for the first
    /// connection before returning a store that keeps reconnecting in the background.
    pub connect_timeout: Duration,
    /// Every command fails with [`StoreError::Unavailable`] after this long.
    pub command_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".to_string(),
            key_prefix: String::new(),
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(2),
        }
    }
}

/// Fixed-window counter. KEYS[1] = counter; ARGV = cost, limit, window_ms.
/// Returns {allowed (0/1), count, reset_after_ms}.
const WINDOW_LUA: &str = r#"
local cost = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local raw = redis.call('GET', KEYS[1])
local current = 0
local ttl = window
if raw then
  current = tonumber(raw)
  if current == nil then
    return redis.error_reply('PORTCULLIS_CORRUPT window counter is not a number')
  end
  ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then
    redis.call('PEXPIRE', KEYS[1], window)
    ttl = window
  end
end
if current + cost > limit then
  return {0, current, ttl}
end
if raw then
  if cost > 0 then
    redis.call('INCRBY', KEYS[1], cost)
  end
elseif cost > 0 then
  redis.call('SET', KEYS[1], cost, 'PX', window)
end
return {1, current + cost, ttl}
"#;

/// Accepted URL schemes. Cluster is not: `scan_prefix` would only see one node.
const SCHEMES: [&str; 4] = [
    "redis://",
    "rediss://",
    "redis-sentinel://",
    "rediss-sentinel://",
];

/// Redis/Valkey-backed [`Store`].
pub struct RedisStore {
    client: fred::clients::Client,
    prefix: String,
    options: Options,
    command_timeout: Duration,
    window_script: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .finish()
    }
}

impl RedisStore {
    /// Connect to Redis. Waits at most `connect_timeout` for the first connection; if
    /// Redis is not reachable by then, returns Ok anyway with a store that keeps
    /// reconnecting in the background (commands and `ping` return
    /// [`StoreError::Unavailable`] meanwhile). Invalid URLs are an error.
    pub async fn connect(opts: RedisOptions) -> Result<Self> {
        let url = opts.url.trim();
        if !SCHEMES.iter().any(|s| url.starts_with(s)) {
            return Err(StoreError::Backend(format!(
                "redis url must start with redis://, rediss://, redis-sentinel:// or rediss-sentinel://: {}",
                redact_url(url)
            )));
        }
        // `redis-sentinel://host:26379/db?sentinelServiceName=NAME`: fred asks the
        // sentinels for the current primary and follows fail-overs.
        let mut config = Config::from_url(url).map_err(|e| {
            StoreError::Backend(format!(
                "invalid redis url {}: {}",
                redact_url(url),
                e.details()
            ))
        })?;
        // Keep retrying in the background if Redis is down at start.
        config.fail_fast = false;
        // fred builds its TLS config from rustls' process default; make sure there is
        // one (two providers compiled in — ring and aws-lc — would leave it ambiguous).
        let _ = rustls::crypto::ring::default_provider().install_default();

        let connect_timeout = non_zero(opts.connect_timeout, Duration::from_secs(5));
        let command_timeout = non_zero(opts.command_timeout, Duration::from_secs(2));
        let client = fred::types::Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = connect_timeout;
                c.internal_command_timeout = connect_timeout;
                // Never replay a command after a connection drop: a counter increment
                // could be applied twice.
                c.max_command_attempts = 1;
                c.tcp.nodelay = Some(true);
            })
            .with_performance_config(|p| {
                p.default_command_timeout = command_timeout;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 1000, 2))
            .build()
            .map_err(|e| StoreError::Backend(format!("redis client: {}", e.details())))?;

        // Drives the connection (and reconnections) until `quit`.
        let _task = client.connect();
        match tokio::time::timeout(connect_timeout, client.wait_for_connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                url = %redact_url(url),
                error = %e,
                "redis not reachable yet; reconnecting in the background"
            ),
            Err(_) => tracing::warn!(
                url = %redact_url(url),
                "redis connect timed out; reconnecting in the background"
            ),
        }

        let options = Options {
            timeout: Some(command_timeout),
            max_attempts: Some(1),
            // Fail immediately instead of queueing while disconnected.
            fail_fast: true,
            ..Options::default()
        };
        Ok(Self {
            client,
            prefix: opts.key_prefix,
            options,
            command_timeout,
            window_script: Script::from_lua(WINDOW_LUA),
        })
    }

    /// Whether the client currently has a live connection.
    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    fn key(&self, key: &str) -> Value {
        let mut k = String::with_capacity(self.prefix.len() + key.len());
        k.push_str(&self.prefix);
        k.push_str(key);
        Value::from(k)
    }

    async fn cmd(&self, name: &'static str, args: Vec<Value>) -> Result<Value> {
        let command = CustomCommand::new_static(name, ClusterHash::FirstKey, false);
        let client = self.client.with_options(&self.options);
        let fut = client.custom::<Value, Value>(command, args);
        // fred enforces the timeout itself; this is a safety net so nothing ever hangs.
        match tokio::time::timeout(self.command_timeout + Duration::from_millis(250), fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_fred(name, &e)),
            Err(_) => Err(StoreError::Unavailable(format!("redis {name}: timed out"))),
        }
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        // Stop the background connection/reconnection task.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            handle.spawn(async move {
                let _ = client.quit().await;
            });
        }
    }
}

fn non_zero(d: Duration, default: Duration) -> Duration {
    if d.is_zero() {
        default
    } else {
        d
    }
}

fn map_fred(cmd: &str, e: &FredError) -> StoreError {
    let details = e.details();
    let msg = format!("redis {cmd}: {e}");
    // Server error replies start with an upper-case code ("ERR", "NOSCRIPT", ...).
    let code = details.split_whitespace().next().unwrap_or("");
    let server_reply =
        !code.is_empty() && code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
    if server_reply {
        return match code {
            "LOADING" | "MASTERDOWN" | "BUSY" | "TRYAGAIN" | "CLUSTERDOWN" | "NOAUTH" => {
                StoreError::Unavailable(msg)
            }
            _ if details.contains("PORTCULLIS_CORRUPT") || details.contains("not an integer") => {
                StoreError::Corrupt(msg)
            }
            _ => StoreError::Backend(msg),
        };
    }
    match e.kind() {
        ErrorKind::IO
        | ErrorKind::Canceled
        | ErrorKind::Timeout
        | ErrorKind::Routing
        | ErrorKind::Unknown
        | ErrorKind::Tls => StoreError::Unavailable(msg),
        _ if details.contains("PORTCULLIS_CORRUPT") => StoreError::Corrupt(msg),
        _ => StoreError::Backend(msg),
    }
}

fn value_bytes(v: Value) -> Result<Option<Vec<u8>>> {
    match v {
        Value::Null => Ok(None),
        Value::Bytes(b) => Ok(Some(b.to_vec())),
        Value::String(s) => Ok(Some(s.as_bytes().to_vec())),
        Value::Integer(i) => Ok(Some(i.to_string().into_bytes())),
        other => Err(StoreError::Backend(format!(
            "unexpected redis reply: {:?}",
            other.kind()
        ))),
    }
}

fn value_u64(v: &Value) -> Result<u64> {
    match v {
        Value::Integer(i) => {
            u64::try_from(*i).map_err(|_| StoreError::Backend(format!("negative reply {i}")))
        }
        other => other.as_u64().ok_or_else(|| {
            StoreError::Backend(format!("expected integer, got {:?}", other.kind()))
        }),
    }
}

fn value_i64(v: &Value) -> Result<i64> {
    v.as_i64()
        .ok_or_else(|| StoreError::Backend(format!("expected integer, got {:?}", v.kind())))
}

/// Escape glob metacharacters for SCAN MATCH.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn px_args(ttl: Option<Duration>) -> Vec<Value> {
    match ttl {
        Some(t) => vec![Value::from("PX"), Value::from(to_i64(ttl_millis(t)))],
        None => Vec::new(),
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl Store for RedisStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        value_bytes(self.cmd("GET", vec![self.key(key)]).await?)
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<()> {
        let mut args = vec![self.key(key), Value::Bytes(Bytes::copy_from_slice(value))];
        args.extend(px_args(ttl));
        self.cmd("SET", args).await?;
        Ok(())
    }

    async fn set_nx(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        let mut args = vec![
            self.key(key),
            Value::Bytes(Bytes::copy_from_slice(value)),
            Value::from("NX"),
        ];
        args.extend(px_args(ttl));
        Ok(!self.cmd("SET", args).await?.is_null())
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let v = self.cmd("DEL", vec![self.key(key)]).await?;
        Ok(value_u64(&v)? > 0)
    }

    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>> {
        value_bytes(self.cmd("GETDEL", vec![self.key(key)]).await?)
    }

    async fn scan_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let pattern = format!("{}*", glob_escape(&format!("{}{}", self.prefix, prefix)));
        // SCAN returns keys in no particular order, so collect every match, sort, and
        // keep the first `limit`.
        let mut keys: Vec<String> = Vec::new();
        let mut cursor = String::from("0");
        loop {
            let reply = self
                .cmd(
                    "SCAN",
                    vec![
                        Value::from(cursor.clone()),
                        Value::from("MATCH"),
                        Value::from(pattern.clone()),
                        Value::from("COUNT"),
                        Value::from(1000_i64),
                    ],
                )
                .await?;
            let mut parts = match reply {
                Value::Array(parts) if parts.len() == 2 => parts,
                other => {
                    return Err(StoreError::Backend(format!(
                        "unexpected SCAN reply: {:?}",
                        other.kind()
                    )))
                }
            };
            let batch = parts.pop().unwrap_or(Value::Null);
            let next = parts.pop().unwrap_or(Value::Null);
            for k in batch.into_array() {
                if let Some(Ok(s)) = value_bytes(k).ok().flatten().map(String::from_utf8) {
                    if let Some(stripped) = s.strip_prefix(&self.prefix) {
                        if stripped.starts_with(prefix) {
                            keys.push(stripped.to_string());
                        }
                    }
                }
            }
            cursor = next
                .into_string()
                .ok_or_else(|| StoreError::Backend("SCAN cursor is not a string".into()))?;
            if cursor == "0" {
                break;
            }
        }
        keys.sort_unstable();
        keys.dedup();
        let mut out = Vec::with_capacity(limit.min(keys.len()));
        // Keys may expire or be deleted between SCAN and MGET: fetch in chunks and skip
        // missing values until `limit` live entries are collected.
        for chunk in keys.chunks(limit.clamp(1, 500)) {
            let args = chunk.iter().map(|k| self.key(k)).collect();
            let values = self.cmd("MGET", args).await?.into_array();
            for (k, v) in chunk.iter().zip(values) {
                if let Some(v) = value_bytes(v)? {
                    out.push((k.clone(), v));
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn consume_window(
        &self,
        key: &str,
        cost: u64,
        limit: u64,
        window: Duration,
    ) -> Result<WindowCount> {
        let mut args = vec![
            Value::from(self.window_script.sha1().clone()),
            Value::from(1_i64),
            self.key(key),
            Value::from(cost.to_string()),
            Value::from(limit.to_string()),
            Value::from(to_i64(ttl_millis(window))),
        ];
        let reply = match self.cmd("EVALSHA", args.clone()).await {
            Err(StoreError::Backend(msg)) if msg.contains("NOSCRIPT") => {
                // EVAL caches the script, so later EVALSHA calls hit.
                args[0] = Value::from(WINDOW_LUA);
                self.cmd("EVAL", args).await?
            }
            other => other?,
        };
        let parts = reply.into_array();
        if parts.len() != 3 {
            return Err(StoreError::Backend(format!(
                "unexpected window script reply ({} items)",
                parts.len()
            )));
        }
        let allowed = value_i64(&parts[0])? == 1;
        let count = value_u64(&parts[1])?;
        let reset_ms = value_i64(&parts[2])?.max(0);
        Ok(WindowCount {
            allowed,
            count,
            limit,
            reset_after: Duration::from_millis(u64::try_from(reset_ms).unwrap_or(0)),
        })
    }

    async fn ping(&self) -> Result<()> {
        let v = self.cmd("PING", Vec::new()).await?;
        match v.as_str().as_deref() {
            Some("PONG") => Ok(()),
            _ => Err(StoreError::Backend(format!(
                "unexpected PING reply: {:?}",
                v.kind()
            ))),
        }
    }

    fn backend_name(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_glob() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert_eq!(glob_escape("plain:key"), "plain:key");
    }
}
