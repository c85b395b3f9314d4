//! Stored pipelines: FnKit's definitions at `fnkit:pipeline:<name>` (JSON
//! `{"mode": "sequential" | "parallel", "steps": ["fn-a", "fn-b"]}`), read by the
//! `pipeline` action through a short-lived cache that a store notice clears at once,
//! and written by `portcullis pipeline …` and `/admin/pipelines/<name>`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis_store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// FnKit's key prefix (not under `store.key_prefix`: the keys are FnKit's).
pub const KEY_PREFIX: &str = "fnkit:pipeline:";
/// The notice topic every writer announces a change on.
pub const TOPIC: &str = "pipelines";
/// Definitions kept in memory at most.
const MAX_CACHED: usize = 1024;
/// Largest stored definition read.
const MAX_DEFINITION: usize = 64 * 1024;
/// Most steps a stored pipeline may have.
pub const MAX_STEPS: usize = 32;
/// How long after a failed subscription the next lookup tries again.
const WATCH_RETRY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Sequential,
    Parallel,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "sequential" => Some(Mode::Sequential),
            "parallel" => Some(Mode::Parallel),
            _ => None,
        }
    }
}

/// One stored pipeline, as FnKit's CLI writes it (other fields are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Definition {
    pub mode: Mode,
    #[serde(default)]
    pub steps: Vec<String>,
}

impl Definition {
    /// Parses a stored value (what FnKit or another writer put there).
    pub fn parse(bytes: &[u8]) -> Result<Definition, String> {
        if bytes.len() > MAX_DEFINITION {
            return Err(format!("definition larger than {MAX_DEFINITION} bytes"));
        }
        serde_json::from_slice(bytes).map_err(|e| format!("invalid pipeline definition: {e}"))
    }

    /// What the CLI and the admin API refuse to store: no steps, too many, or a
    /// step that is not a function name (one DNS label).
    pub fn validate(&self) -> Result<(), String> {
        if self.steps.is_empty() {
            return Err("a pipeline needs at least one step".into());
        }
        if self.steps.len() > MAX_STEPS {
            return Err(format!("a pipeline has at most {MAX_STEPS} steps"));
        }
        for s in &self.steps {
            if !crate::targets::host_label_ok(s) {
                return Err(format!(
                    "step {s:?} is not a function name (letters, digits, '-' and '_', at most 63)"
                ));
            }
        }
        if self.mode == Mode::Parallel {
            let mut seen = std::collections::HashSet::new();
            if let Some(dup) = self.steps.iter().find(|s| !seen.insert(s.as_str())) {
                return Err(format!(
                    "step {dup:?} appears twice: a parallel result has one entry per step"
                ));
            }
        }
        Ok(())
    }
}

/// Pipeline names: what FnKit's URL carries (`[A-Za-z0-9_.-]`, at most 128).
pub fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Reads and writes definitions; every write announces itself ([`TOPIC`]).
pub struct PipelineStore {
    /// Unprefixed view of the store (FnKit's keys).
    keys: Arc<dyn Store>,
    notices: Arc<dyn Store>,
}

impl PipelineStore {
    pub fn new(store: &Arc<dyn Store>) -> Self {
        PipelineStore {
            keys: store.unprefixed(),
            notices: store.clone(),
        }
    }

    pub async fn get(&self, name: &str) -> Result<Option<Definition>, StoreError> {
        match self.keys.get(&format!("{KEY_PREFIX}{name}")).await? {
            None => Ok(None),
            Some(v) => Definition::parse(&v).map(Some).map_err(StoreError::Corrupt),
        }
    }

    /// Every stored pipeline (at most `limit`), by name; unreadable ones as errors.
    pub async fn list(
        &self,
        limit: usize,
    ) -> Result<Vec<(String, Result<Definition, String>)>, StoreError> {
        let rows = self.keys.scan_prefix(KEY_PREFIX, limit).await?;
        Ok(rows
            .into_iter()
            .map(|(k, v)| {
                let name = k.strip_prefix(KEY_PREFIX).unwrap_or(&k).to_owned();
                (name, Definition::parse(&v))
            })
            .collect())
    }

    /// Validates and stores `def` under `name`, then announces the change.
    pub async fn put(&self, name: &str, def: &Definition) -> Result<(), PutError> {
        if !name_ok(name) {
            return Err(PutError::Invalid(format!(
                "pipeline name {name:?}: letters, digits, '-', '_' and '.', at most 128"
            )));
        }
        def.validate().map_err(PutError::Invalid)?;
        let json = serde_json::to_vec(def).map_err(|e| PutError::Invalid(e.to_string()))?;
        self.keys
            .set(&format!("{KEY_PREFIX}{name}"), &json, None)
            .await?;
        self.announce().await;
        Ok(())
    }

    /// Removes `name`; true if it existed.
    pub async fn delete(&self, name: &str) -> Result<bool, StoreError> {
        let existed = self.keys.delete(&format!("{KEY_PREFIX}{name}")).await?;
        self.announce().await;
        Ok(existed)
    }

    async fn announce(&self) {
        // The write landed; a lost notice only delays other instances by the TTL.
        if let Err(e) = self.notices.notify(TOPIC).await {
            tracing::warn!(error = %e, "pipeline change stored but not announced");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PutError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The gateway's cache of stored definitions (outlives snapshots): an entry is used
/// while younger than the route's TTL and no change was announced since it was read.
/// Entries are kept only while a notice subscription works (it is made in the
/// background; meanwhile every run reads the store).
pub struct PipelineCache {
    store: PipelineStore,
    notices: Arc<dyn Store>,
    /// Bounded, frequency-aware: random names cannot push out the pipelines in use.
    entries: moka::sync::Cache<String, Cached>,
    watch: Arc<Mutex<WatchState>>,
}

#[derive(Clone)]
struct Cached {
    def: Option<Arc<Definition>>,
    read_at: Instant,
    generation: u64,
}

enum WatchState {
    Unstarted,
    Subscribing,
    Failed(Instant),
    Watching(watch::Receiver<u64>),
}

/// Longest wait for a notice subscription.
const WATCH_TIMEOUT: Duration = Duration::from_secs(5);

impl PipelineCache {
    pub fn new(store: &Arc<dyn Store>) -> Self {
        PipelineCache {
            store: PipelineStore::new(store),
            // Unprefixed: keyspace events name FnKit's keys as they are.
            notices: store.unprefixed(),
            entries: moka::sync::Cache::new(MAX_CACHED as u64),
            watch: Arc::new(Mutex::new(WatchState::Unstarted)),
        }
    }

    /// The definition of `name` (`None`: there is none), at most `ttl` old.
    pub async fn get(
        &self,
        name: &str,
        ttl: Duration,
    ) -> Result<Option<Arc<Definition>>, StoreError> {
        let generation = self.generation();
        if let (Some(hit), Some(g)) = (self.entries.get(name), generation) {
            if hit.read_at.elapsed() < ttl && hit.generation == g {
                return Ok(hit.def);
            }
        }
        let def = self.store.get(name).await?.map(Arc::new);
        if let Some(generation) = generation {
            self.entries.insert(
                name.to_owned(),
                Cached {
                    def: def.clone(),
                    read_at: Instant::now(),
                    generation,
                },
            );
        }
        Ok(def)
    }

    /// The current notice generation; `None` while no subscription works (one is
    /// started in the background, again after a failure or a lost watcher).
    fn generation(&self) -> Option<u64> {
        let mut state = self.watch.lock().unwrap_or_else(|p| p.into_inner());
        match &*state {
            // A watcher whose task ended says nothing any more.
            WatchState::Watching(rx) if rx.has_changed().is_ok() => return Some(*rx.borrow()),
            WatchState::Subscribing => return None,
            WatchState::Failed(at) if at.elapsed() < WATCH_RETRY => return None,
            _ => {}
        }
        *state = WatchState::Subscribing;
        drop(state);
        self.entries.invalidate_all();
        let (notices, shared) = (self.notices.clone(), self.watch.clone());
        tokio::spawn(async move {
            let watched =
                tokio::time::timeout(WATCH_TIMEOUT, notices.watch(TOPIC, Some(KEY_PREFIX))).await;
            let next = match watched {
                Ok(Ok(rx)) => WatchState::Watching(rx),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot watch pipeline changes; reading the store on every run");
                    WatchState::Failed(Instant::now())
                }
                Err(_) => {
                    tracing::warn!(
                        "watching pipeline changes timed out; reading the store on every run"
                    );
                    WatchState::Failed(Instant::now())
                }
            };
            *shared.lock().unwrap_or_else(|p| p.into_inner()) = next;
        });
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fnkit_definitions() {
        let d = Definition::parse(br#"{"mode":"sequential","steps":["a","b"],"x":1}"#).unwrap();
        assert_eq!(d.mode, Mode::Sequential);
        assert_eq!(d.steps, ["a", "b"]);
        assert!(Definition::parse(br#"{"mode":"both","steps":[]}"#).is_err());
        assert!(Definition::parse(b"not json").is_err());
        // No steps parses (the run answers 400) but is never stored by us.
        let empty = Definition::parse(br#"{"mode":"parallel"}"#).unwrap();
        assert!(empty.validate().is_err());
    }

    #[test]
    fn validation_refuses_bad_steps() {
        let def = |mode, steps: &[&str]| Definition {
            mode,
            steps: steps.iter().map(|s| s.to_string()).collect(),
        };
        assert!(def(Mode::Sequential, &["a", "a"]).validate().is_ok());
        assert!(def(Mode::Parallel, &["a", "a"]).validate().is_err());
        for bad in ["", "a.b", "a/b", "127.0.0.1", "a:80", &"x".repeat(64)] {
            assert!(def(Mode::Sequential, &[bad]).validate().is_err(), "{bad}");
        }
        let many: Vec<String> = (0..=MAX_STEPS).map(|i| format!("s{i}")).collect();
        let d = Definition {
            mode: Mode::Sequential,
            steps: many,
        };
        assert!(d.validate().is_err());
    }

    #[test]
    fn names() {
        assert!(name_ok("etl-v2.daily_1"));
        for bad in ["", "a/b", "a b", "%2e", &"n".repeat(129)] {
            assert!(!name_ok(bad), "{bad}");
        }
    }
}
