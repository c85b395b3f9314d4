//! Redis/Valkey backend via `fred`. Everything that must be exact across gateway
//! instances is one command (SET NX PX, GETDEL) or one Lua script (window counter,
//! compare-and-set, compare-and-delete).
//!
//! Redis Cluster (`redis-cluster://host:port[,host:port]`): every command and every
//! script touch exactly one key and are routed by that key's hash slot;
//! `scan_prefix` scans every primary node and reads values per hash slot; `ping`
//! requires every primary node to answer.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::{
    ClientLike, ClusterInterface, Config, Error as FredError, ErrorKind, Options, ReconnectPolicy,
    Server, Value,
};
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand};

mod notices;
mod scripts;
use scripts::{CAD_LUA, CAS_LUA, RATE_LUA, WINDOW_LUA};

use crate::{
    redact_url, ttl_millis, Rate, RateAlgorithm, RateDecision, Result, Store, StoreError,
    WindowCount,
};

/// Options for [`RedisStore::connect`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://[[user:]password@]host[:port][/db]` or `rediss://…` (TLS);
    /// `redis-sentinel://…` / `rediss-sentinel://…`; or
    /// `redis-cluster://[[user:]password@]host:port[,host:port]` /
    /// `rediss-cluster://…` (Redis Cluster; any reachable node is enough to discover
    /// the others).
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

/// Accepted URL schemes.
const SCHEMES: [&str; 6] = [
    "redis://",
    "rediss://",
    "redis-sentinel://",
    "rediss-sentinel://",
    "redis-cluster://",
    "rediss-cluster://",
];

/// Redis/Valkey-backed [`Store`].
#[derive(Clone)]
pub struct RedisStore {
    client: fred::clients::Client,
    _connection: std::sync::Arc<QuitOnDrop>,
    /// What `config` connects to, for subscriber connections ([`Store::watch`]).
    config: Config,
    prefix: String,
    /// The configured prefix, kept by [`Store::unprefixed`] views for notice channels.
    channel_prefix: String,
    options: Options,
    command_timeout: Duration,
    window_script: Script,
    rate_script: Script,
    cas_script: Script,
    cad_script: Script,
    /// Redis Cluster deployment (commands routed by hash slot, scans per node).
    clustered: bool,
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
                "redis url must start with redis://, rediss://, redis-sentinel://, rediss-sentinel://, redis-cluster:// or rediss-cluster://: {}",
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
        let clustered = config.server.is_clustered();
        let subscriber_config = config.clone();
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
            _connection: std::sync::Arc::new(QuitOnDrop(client.clone())),
            client,
            config: subscriber_config,
            channel_prefix: opts.key_prefix.clone(),
            prefix: opts.key_prefix,
            options,
            command_timeout,
            window_script: Script::from_lua(WINDOW_LUA),
            rate_script: Script::from_lua(RATE_LUA),
            cas_script: Script::from_lua(CAS_LUA),
            cad_script: Script::from_lua(CAD_LUA),
            clustered,
        })
    }

    /// The notice channel of `topic`.
    fn channel(&self, topic: &str) -> String {
        format!("{}changes:{topic}", self.channel_prefix)
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

    /// Cluster hash slot of `key` (with the store prefix).
    fn slot(&self, key: &str) -> u16 {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(self.prefix.as_bytes());
        k.extend_from_slice(key.as_bytes());
        fred::util::redis_keyslot(&k)
    }

    /// Run `name` with `args`, routed (in a cluster) by the hash slot of the first
    /// string argument, which must be the key.
    async fn cmd(&self, name: &'static str, args: Vec<Value>) -> Result<Value> {
        self.run(name, ClusterHash::FirstKey, None, args).await
    }

    /// Run a command with an explicit cluster routing: on `node` if set, else by `hash`
    /// (for custom commands fred honours only `ClusterHash::Custom`; anything else
    /// routes by the first string argument).
    async fn run(
        &self,
        name: &'static str,
        hash: ClusterHash,
        node: Option<&Server>,
        args: Vec<Value>,
    ) -> Result<Value> {
        let command = CustomCommand::new_static(name, hash, false);
        let mut options = self.options.clone();
        options.cluster_node = node.cloned();
        let client = self.client.with_options(&options);
        let fut = client.custom::<Value, Value>(command, args);
        // fred enforces the timeout itself; this is a safety net so nothing ever hangs.
        match tokio::time::timeout(self.command_timeout + Duration::from_millis(250), fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_fred(name, &e)),
            Err(_) => Err(StoreError::Unavailable(format!("redis {name}: timed out"))),
        }
    }

    /// Run a Lua `script` on the single key `key` with `argv`: EVALSHA, falling back to
    /// EVAL (which caches the script on that node) on NOSCRIPT. Routed, in a cluster,
    /// by the key's hash slot (not by the SHA in the first argument; fred applies only
    /// `ClusterHash::Custom` to custom commands, other variants fall back to the first
    /// string argument).
    async fn eval(&self, script: &Script, key: &str, argv: Vec<Value>) -> Result<Value> {
        let mut args = Vec::with_capacity(argv.len() + 3);
        args.push(Value::from(script.sha1().clone()));
        args.push(Value::from(1_i64));
        args.push(self.key(key));
        args.extend(argv);
        let hash = ClusterHash::Custom(self.slot(key));
        match self.run("EVALSHA", hash.clone(), None, args.clone()).await {
            Err(StoreError::Backend(msg)) if msg.contains("NOSCRIPT") => {
                let lua = script
                    .lua()
                    .ok_or_else(|| StoreError::Backend("script source missing".into()))?;
                args[0] = Value::from(lua.clone());
                self.run("EVAL", hash, None, args).await
            }
            other => other,
        }
    }

    /// Nodes to scan or ping: every primary of a cluster (from fred's cached cluster
    /// state), or `[None]` (the one server) otherwise.
    fn nodes(&self) -> Result<Vec<Option<Server>>> {
        if !self.clustered {
            return Ok(vec![None]);
        }
        let primaries = self
            .client
            .cached_cluster_state()
            .map(|state| state.unique_primary_nodes())
            .unwrap_or_default();
        if primaries.is_empty() {
            return Err(StoreError::Unavailable(
                "redis cluster: cluster state not known yet".into(),
            ));
        }
        Ok(primaries.into_iter().map(Some).collect())
    }

    /// Keys (without the store prefix) on `node` matching `prefix`.
    async fn scan_node(
        &self,
        node: Option<&Server>,
        pattern: &str,
        prefix: &str,
        keys: &mut Vec<String>,
    ) -> Result<()> {
        let mut cursor = String::from("0");
        loop {
            let reply = self
                .run(
                    "SCAN",
                    ClusterHash::Random,
                    node,
                    vec![
                        Value::from(cursor.clone()),
                        Value::from("MATCH"),
                        Value::from(pattern.to_string()),
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
                return Ok(());
            }
        }
    }

    /// Values of `keys` (without the store prefix), in order; `None` for missing keys.
    /// In a cluster, one MGET per hash slot (MGET across slots fails with CROSSSLOT).
    async fn mget(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        if !self.clustered {
            let args = keys.iter().map(|k| self.key(k)).collect();
            let values = self.cmd("MGET", args).await?.into_array();
            if values.len() != keys.len() {
                return Err(StoreError::Backend(format!(
                    "MGET returned {} values for {} keys",
                    values.len(),
                    keys.len()
                )));
            }
            return values.into_iter().map(value_bytes).collect();
        }
        let mut by_slot: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (i, k) in keys.iter().enumerate() {
            by_slot.entry(self.slot(k)).or_default().push(i);
        }
        let mut out: Vec<Option<Vec<u8>>> = vec![None; keys.len()];
        for (slot, idxs) in by_slot {
            let args = idxs.iter().map(|&i| self.key(&keys[i])).collect();
            let values = self
                .run("MGET", ClusterHash::Custom(slot), None, args)
                .await?
                .into_array();
            if values.len() != idxs.len() {
                return Err(StoreError::Backend(format!(
                    "MGET returned {} values for {} keys",
                    values.len(),
                    idxs.len()
                )));
            }
            for (i, v) in idxs.into_iter().zip(values) {
                out[i] = value_bytes(v)?;
            }
        }
        Ok(out)
    }
}

/// Closes the connection when the last handle on it ([`RedisStore`] and its
/// [`Store::unprefixed`] views) is dropped.
struct QuitOnDrop(fred::clients::Client);

impl Drop for QuitOnDrop {
    fn drop(&mut self) {
        // Stop the background connection/reconnection task.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let client = self.0.clone();
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

    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        let ms = Value::from(to_i64(ttl_millis(ttl)));
        let v = self.cmd("PEXPIRE", vec![self.key(key), ms]).await?;
        Ok(value_u64(&v)? == 1)
    }

    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>> {
        value_bytes(self.cmd("GETDEL", vec![self.key(key)]).await?)
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: &[u8],
        new: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool> {
        let mut argv = vec![
            Value::Bytes(Bytes::copy_from_slice(expected)),
            Value::Bytes(Bytes::copy_from_slice(new)),
        ];
        if let Some(t) = ttl {
            argv.push(Value::from(to_i64(ttl_millis(t))));
        }
        let reply = self.eval(&self.cas_script, key, argv).await?;
        Ok(value_i64(&reply)? == 1)
    }

    async fn compare_and_delete(&self, key: &str, expected: &[u8]) -> Result<bool> {
        let argv = vec![Value::Bytes(Bytes::copy_from_slice(expected))];
        let reply = self.eval(&self.cad_script, key, argv).await?;
        Ok(value_i64(&reply)? > 0)
    }

    async fn scan_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let pattern = format!("{}*", glob_escape(&format!("{}{}", self.prefix, prefix)));
        // SCAN returns keys in no particular order, so collect every match, sort, and
        // keep the first `limit`.
        // In a cluster every primary holds its own part of the keyspace.
        let mut keys: Vec<String> = Vec::new();
        for node in self.nodes()? {
            self.scan_node(node.as_ref(), &pattern, prefix, &mut keys)
                .await?;
        }
        keys.sort_unstable();
        keys.dedup();
        let mut out = Vec::with_capacity(limit.min(keys.len()));
        // Keys may expire or be deleted between SCAN and MGET: fetch in chunks and skip
        // missing values until `limit` live entries are collected.
        for chunk in keys.chunks(limit.clamp(1, 500)) {
            let values = self.mget(chunk).await?;
            for (k, v) in chunk.iter().zip(values) {
                if let Some(v) = v {
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
        let argv = vec![
            Value::from(cost.to_string()),
            Value::from(limit.to_string()),
            Value::from(to_i64(ttl_millis(window))),
        ];
        let reply = self.eval(&self.window_script, key, argv).await?;
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

    async fn rate_limit(&self, key: &str, rate: &Rate, cost: u64) -> Result<RateDecision> {
        let algorithm = match rate.algorithm {
            RateAlgorithm::SlidingWindow => 0_i64,
            RateAlgorithm::TokenBucket => 1,
        };
        let argv = vec![
            Value::from(algorithm),
            Value::from(rate.limit.to_string()),
            Value::from(to_i64(rate.period_ms())),
            Value::from(rate.burst.to_string()),
            Value::from(cost.to_string()),
            Value::from(to_i64(rate.idle_ms())),
        ];
        let parts = self.eval(&self.rate_script, key, argv).await?.into_array();
        if parts.len() != 4 {
            return Err(StoreError::Backend(format!(
                "unexpected rate-limit script reply ({} items)",
                parts.len()
            )));
        }
        let ms = |v: &Value| -> Result<Duration> {
            Ok(Duration::from_millis(
                u64::try_from(value_i64(v)?.max(0)).unwrap_or(0),
            ))
        };
        Ok(RateDecision {
            allowed: value_i64(&parts[0])? == 1,
            remaining: u64::try_from(value_i64(&parts[1])?.max(0)).unwrap_or(0),
            reset_after: ms(&parts[2])?,
            retry_after: ms(&parts[3])?,
        })
    }

    /// In a cluster, every primary node must answer (each owns part of the keys).
    async fn ping(&self) -> Result<()> {
        for node in self.nodes()? {
            let v = self
                .run("PING", ClusterHash::Random, node.as_ref(), Vec::new())
                .await?;
            if v.as_str().as_deref() != Some("PONG") {
                return Err(StoreError::Backend(format!(
                    "unexpected PING reply: {:?}",
                    v.kind()
                )));
            }
        }
        Ok(())
    }

    async fn notify(&self, topic: &str) -> Result<()> {
        self.publish_change(topic).await
    }

    async fn watch(
        &self,
        topic: &str,
        keys: Option<&str>,
    ) -> Result<tokio::sync::watch::Receiver<u64>> {
        self.subscribe_changes(topic, keys).await
    }

    fn unprefixed(&self) -> std::sync::Arc<dyn Store> {
        let mut view = self.clone();
        view.prefix = String::new();
        std::sync::Arc::new(view)
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
