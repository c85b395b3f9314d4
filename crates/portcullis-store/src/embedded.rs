//! Embedded backend: SQLite in WAL mode, one file per data directory, shared safely by
//! several processes (busy timeout + WAL + immediate write transactions).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::{ttl_millis, Rate, RateDecision, RateState, Result, Store, StoreError, WindowCount};

/// File name of the database inside the data directory.
pub const DB_FILE_NAME: &str = "portcullis.db";

/// How long a connection waits for another writer (this or another process).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Minimum time between two purges of expired rows.
const PURGE_INTERVAL_MS: u64 = 30_000;
/// At most this many expired rows are deleted per purge (bounded work).
const PURGE_BATCH: i64 = 500;
/// How often a watched topic's change marker is read (changes made by other
/// processes sharing the file: the CLI, another gateway).
const WATCH_POLL: Duration = Duration::from_millis(200);
/// Key of a topic's change marker: a value that changes at every notice.
fn change_marker(topic: &str) -> String {
    format!("__changes:{topic}")
}

/// Idle read connections kept per store.
const MAX_IDLE_READERS: usize = 4;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    key        TEXT PRIMARY KEY NOT NULL,
    value      BLOB NOT NULL,
    expires_at INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_expires_at ON kv(expires_at) WHERE expires_at IS NOT NULL;
";

/// SQLite-backed [`Store`].
///
/// Cloning is cheap (shared connections).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    last_purge_ms: AtomicU64,
    /// Watched topics: this process's generation counters ([`Store::watch`]).
    topics: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl EmbeddedStore {
    /// Open (creating if needed) `data_dir/portcullis.db`. Blocking; call it before the
    /// executor is busy or inside `spawn_blocking`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create data dir {}: {e}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join(DB_FILE_NAME);
        let writer = open_connection(&path)?;
        // WAL is persistent in the file; setting it again is cheap.
        let mode: String = writer
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(map_sqlite)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "could not enable WAL on {} (journal_mode={mode})",
                path.display()
            )));
        }
        writer.execute_batch(SCHEMA).map_err(map_sqlite)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                writer: Mutex::new(writer),
                readers: Mutex::new(Vec::new()),
                last_purge_ms: AtomicU64::new(now_ms()),
                topics: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Delete up to `max_rows` expired rows now; returns how many were deleted.
    pub async fn purge_expired(&self, max_rows: usize) -> Result<usize> {
        let max = i64::try_from(max_rows).unwrap_or(i64::MAX);
        self.write(move |conn| purge(conn, now_ms(), max)).await
    }

    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        run_blocking(move || {
            let mut conn = lock(&inner.writer);
            let out = f(&mut conn)?;
            inner.maybe_purge(&mut conn);
            Ok(out)
        })
        .await
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        run_blocking(move || {
            let conn = match lock(&inner.readers).pop() {
                Some(c) => c,
                None => open_connection(&inner.path)?,
            };
            let out = f(&conn);
            let mut idle = lock(&inner.readers);
            if idle.len() < MAX_IDLE_READERS {
                idle.push(conn);
            }
            out
        })
        .await
    }
}

impl Inner {
    /// Opportunistic, bounded purge of expired rows, at most once per interval per
    /// process. Errors are ignored (expired rows are filtered on read anyway).
    fn maybe_purge(&self, conn: &mut Connection) {
        let now = now_ms();
        let last = self.last_purge_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < PURGE_INTERVAL_MS {
            return;
        }
        if self
            .last_purge_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        if let Err(e) = purge(conn, now, PURGE_BATCH) {
            tracing::debug!(error = %e, "purging expired store rows failed");
        }
    }
}

fn purge(conn: &Connection, now: u64, max: i64) -> Result<usize> {
    conn.execute(
        "DELETE FROM kv WHERE key IN (
             SELECT key FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ?1 LIMIT ?2)",
        params![to_i64(now), max],
    )
    .map_err(map_sqlite)
}

fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(map_sqlite)?;
    conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=OFF;")
        .map_err(map_sqlite)?;
    Ok(conn)
}

async fn run_blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
    // back on drop), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn expiry(now: u64, ttl: Option<Duration>) -> Option<i64> {
    ttl.map(|t| to_i64(now.saturating_add(ttl_millis(t))))
}

fn live(expires_at: Option<i64>, now: u64) -> bool {
    expires_at.is_none_or(|e| e > to_i64(now))
}

fn map_sqlite(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            StoreError::Unavailable(format!("sqlite busy: {e}"))
        }
        Some(ErrorCode::CannotOpen | ErrorCode::DiskFull | ErrorCode::SystemIoFailure) => {
            StoreError::Unavailable(format!("sqlite: {e}"))
        }
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            StoreError::Corrupt(format!("sqlite: {e}"))
        }
        _ => StoreError::Backend(format!("sqlite: {e}")),
    }
}

fn parse_counter(value: &[u8]) -> Result<u64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| StoreError::Corrupt("window counter is not an unsigned integer".into()))
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_string();
        self.read(move |conn| {
            let row: Option<(Vec<u8>, Option<i64>)> = conn
                .prepare_cached("SELECT value, expires_at FROM kv WHERE key = ?1")
                .and_then(|mut st| {
                    st.query_row([&key], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(map_sqlite)?;
            let now = now_ms();
            Ok(row.and_then(|(v, exp)| live(exp, now).then_some(v)))
        })
        .await
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<()> {
        let key = key.to_string();
        let value = value.to_vec();
        self.write(move |conn| {
            let exp = expiry(now_ms(), ttl);
            conn.prepare_cached(
                "INSERT INTO kv (key, value, expires_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value,
                                                expires_at = excluded.expires_at",
            )
            .and_then(|mut st| st.execute(params![key, value, exp]))
            .map_err(map_sqlite)?;
            Ok(())
        })
        .await
    }

    async fn set_nx(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        let key = key.to_string();
        let value = value.to_vec();
        self.write(move |conn| {
            let now = now_ms();
            let exp = expiry(now, ttl);
            // One statement = one write transaction: atomic across processes. An expired
            // row counts as absent and is overwritten.
            let changed = conn
                .prepare_cached(
                    "INSERT INTO kv (key, value, expires_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value,
                                                    expires_at = excluded.expires_at
                     WHERE kv.expires_at IS NOT NULL AND kv.expires_at <= ?4",
                )
                .and_then(|mut st| st.execute(params![key, value, exp, to_i64(now)]))
                .map_err(map_sqlite)?;
            Ok(changed > 0)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let key = key.to_string();
        self.write(move |conn| {
            let row: Option<Option<i64>> = conn
                .prepare_cached("DELETE FROM kv WHERE key = ?1 RETURNING expires_at")
                .and_then(|mut st| st.query_row([&key], |r| r.get(0)).optional())
                .map_err(map_sqlite)?;
            Ok(row.is_some_and(|exp| live(exp, now_ms())))
        })
        .await
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: &[u8],
        new: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool> {
        let key = key.to_string();
        let expected = expected.to_vec();
        let new = new.to_vec();
        self.write(move |conn| {
            let now = now_ms();
            let exp = expiry(now, ttl);
            // One statement = one write transaction: atomic across processes. An expired
            // row counts as absent (never matches).
            let changed = conn
                .prepare_cached(
                    "UPDATE kv SET value = ?3, expires_at = ?4
                     WHERE key = ?1 AND value = ?2
                       AND (expires_at IS NULL OR expires_at > ?5)",
                )
                .and_then(|mut st| st.execute(params![key, expected, new, exp, to_i64(now)]))
                .map_err(map_sqlite)?;
            Ok(changed > 0)
        })
        .await
    }

    async fn compare_and_delete(&self, key: &str, expected: &[u8]) -> Result<bool> {
        let key = key.to_string();
        let expected = expected.to_vec();
        self.write(move |conn| {
            let changed = conn
                .prepare_cached(
                    "DELETE FROM kv WHERE key = ?1 AND value = ?2
                       AND (expires_at IS NULL OR expires_at > ?3)",
                )
                .and_then(|mut st| st.execute(params![key, expected, to_i64(now_ms())]))
                .map_err(map_sqlite)?;
            Ok(changed > 0)
        })
        .await
    }

    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        let key = key.to_string();
        self.write(move |conn| {
            let now = now_ms();
            let exp = expiry(now, Some(ttl));
            let changed = conn
                .prepare_cached(
                    "UPDATE kv SET expires_at = ?2
                     WHERE key = ?1 AND (expires_at IS NULL OR expires_at > ?3)",
                )
                .and_then(|mut st| st.execute(params![key, exp, to_i64(now)]))
                .map_err(map_sqlite)?;
            Ok(changed > 0)
        })
        .await
    }

    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_string();
        self.write(move |conn| {
            // DELETE … RETURNING is a single write statement: only one caller (in any
            // process) can delete the row and see its value.
            let row: Option<(Vec<u8>, Option<i64>)> = conn
                .prepare_cached("DELETE FROM kv WHERE key = ?1 RETURNING value, expires_at")
                .and_then(|mut st| {
                    st.query_row([&key], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(map_sqlite)?;
            let now = now_ms();
            Ok(row.and_then(|(v, exp)| live(exp, now).then_some(v)))
        })
        .await
    }

    async fn scan_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let prefix = prefix.to_string();
        self.read(move |conn| {
            let now = to_i64(now_ms());
            // TEXT compares with memcmp (BINARY collation), so keys with `prefix` form a
            // contiguous run starting at `prefix`; stop at the first key outside it.
            let mut st = conn
                .prepare_cached(
                    "SELECT key, value, expires_at FROM kv WHERE key >= ?1 ORDER BY key",
                )
                .map_err(map_sqlite)?;
            let mut rows = st.query([&prefix]).map_err(map_sqlite)?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(map_sqlite)? {
                let key: String = row.get(0).map_err(map_sqlite)?;
                if !key.starts_with(&prefix) {
                    break;
                }
                let exp: Option<i64> = row.get(2).map_err(map_sqlite)?;
                if exp.is_some_and(|e| e <= now) {
                    continue;
                }
                out.push((key, row.get(1).map_err(map_sqlite)?));
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn consume_window(
        &self,
        key: &str,
        cost: u64,
        limit: u64,
        window: Duration,
    ) -> Result<WindowCount> {
        let key = key.to_string();
        self.write(move |conn| {
            // IMMEDIATE takes the database write lock up front, so the read-check-write
            // below is serialized with every other writer, in this or another process.
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(map_sqlite)?;
            let now = now_ms();
            let row: Option<(Vec<u8>, Option<i64>)> = tx
                .prepare_cached("SELECT value, expires_at FROM kv WHERE key = ?1")
                .and_then(|mut st| {
                    st.query_row([&key], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(map_sqlite)?;
            let window_ms = ttl_millis(window);
            // `no_expiry`: a counter written by `set` without a TTL; its window starts now
            // and must be stored even when the call is refused, or it never resets.
            let (current, expires_at, existing, no_expiry) = match row {
                Some((v, exp)) if live(exp, now) => {
                    let (exp, no_expiry) = match exp {
                        Some(e) => (e, false),
                        None => (to_i64(now.saturating_add(window_ms)), true),
                    };
                    (parse_counter(&v)?, exp, true, no_expiry)
                }
                _ => (0, to_i64(now.saturating_add(window_ms)), false, false),
            };
            let reset_after = Duration::from_millis(
                u64::try_from(expires_at.saturating_sub(to_i64(now))).unwrap_or(0),
            );
            let next = current.saturating_add(cost);
            if next > limit {
                if no_expiry {
                    tx.prepare_cached("UPDATE kv SET expires_at = ?2 WHERE key = ?1")
                        .and_then(|mut st| st.execute(params![key, expires_at]))
                        .map_err(map_sqlite)?;
                    tx.commit().map_err(map_sqlite)?;
                }
                return Ok(WindowCount {
                    allowed: false,
                    count: current,
                    limit,
                    reset_after,
                });
            }
            if cost > 0 || existing {
                tx.prepare_cached(
                    "INSERT INTO kv (key, value, expires_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value,
                                                    expires_at = excluded.expires_at",
                )
                .and_then(|mut st| {
                    st.execute(params![key, next.to_string().into_bytes(), expires_at])
                })
                .map_err(map_sqlite)?;
                tx.commit().map_err(map_sqlite)?;
            }
            Ok(WindowCount {
                allowed: true,
                count: next,
                limit,
                reset_after,
            })
        })
        .await
    }

    async fn rate_limit(&self, key: &str, rate: &Rate, cost: u64) -> Result<RateDecision> {
        let key = key.to_string();
        let rate = *rate;
        self.write(move |conn| {
            // IMMEDIATE: read-decide-write serialized with every other writer, in this
            // or another process.
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(map_sqlite)?;
            let now = now_ms();
            let row: Option<(Vec<u8>, Option<i64>)> = tx
                .prepare_cached("SELECT value, expires_at FROM kv WHERE key = ?1")
                .and_then(|mut st| {
                    st.query_row([&key], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(map_sqlite)?;
            let state = match row {
                Some((v, exp)) if live(exp, now) => {
                    Some(RateState::decode(&v).ok_or_else(|| {
                        StoreError::Corrupt("rate-limit state is not `stamp a b`".into())
                    })?)
                }
                _ => None,
            };
            let (decision, next) = rate.decide(state, cost, now);
            if decision.allowed || state.is_some() {
                let exp = to_i64(now.saturating_add(rate.idle_ms()));
                tx.prepare_cached(
                    "INSERT INTO kv (key, value, expires_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value,
                                                    expires_at = excluded.expires_at",
                )
                .and_then(|mut st| st.execute(params![key, next.encode().into_bytes(), exp]))
                .map_err(map_sqlite)?;
                tx.commit().map_err(map_sqlite)?;
            }
            Ok(decision)
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.read(|conn| {
            conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(map_sqlite)?;
            Ok(())
        })
        .await
    }

    async fn notify(&self, topic: &str) -> Result<()> {
        // A value no other notice writes: this process's id and a fresh timestamp.
        let marker = format!("{}-{}", std::process::id(), now_nanos());
        self.set(&change_marker(topic), marker.as_bytes(), None)
            .await?;
        if let Some(tx) = lock(&self.inner.topics).get(topic) {
            tx.send_modify(|g| *g += 1);
        }
        Ok(())
    }

    async fn watch(&self, topic: &str, _keys: Option<&str>) -> Result<watch::Receiver<u64>> {
        let (tx, rx) = {
            let mut topics = lock(&self.inner.topics);
            if let Some(tx) = topics.get(topic) {
                return Ok(tx.subscribe());
            }
            let (tx, rx) = watch::channel(0);
            topics.insert(topic.to_owned(), tx.clone());
            (tx, rx)
        };
        // Other processes' notices: poll the marker until nobody watches. Its value
        // now is the baseline (a notice right after this call must count).
        let key = change_marker(topic);
        let mut last = self.get(&key).await.ok().flatten();
        let store = self.clone();
        let topic = topic.to_owned();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(WATCH_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if tx.receiver_count() == 0 {
                    let mut topics = lock(&store.inner.topics);
                    if tx.receiver_count() == 0 {
                        topics.remove(&topic);
                        return;
                    }
                }
                match store.get(&key).await {
                    Ok(now) if now != last => {
                        last = now;
                        tx.send_modify(|g| *g += 1);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "reading a change marker failed"),
                }
            }
        });
        Ok(rx)
    }

    fn unprefixed(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }

    fn backend_name(&self) -> &'static str {
        "embedded"
    }
}
