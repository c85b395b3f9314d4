//! The Portcullis data plane.
//!
//! A request reads top to bottom through [`service::handle`]: normalise the path,
//! answer built-in endpoints, look the route up, check auth, run the route's action
//! (proxy, static, respond, redirect). Everything a request needs comes from one
//! immutable [`snapshot::Snapshot`], swapped atomically on reload.

pub mod admin;
pub mod auth;
pub mod body;
pub mod error;
pub mod forwarded;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod telemetry;
pub mod template;
pub mod tls;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use portcullis_config::ConfigErrors;

use crate::snapshot::Snapshot;
use crate::telemetry::{Generation, Metrics, ResultLabels};
use crate::upstream::{CachingResolver, ClientRegistry};

pub use server::run;

/// State shared by every connection: the active snapshot and what outlives reloads
/// (metrics, upstream connection pools).
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Metrics,
    pub clients: ClientRegistry,
    pub config_path: PathBuf,
    generation: Generation,
    ready: AtomicBool,
    /// Serialises reloads; also remembers the last loaded file content.
    reload_lock: tokio::sync::Mutex<Option<u64>>,
    /// Shared state; opened by [`Shared::open_store`] when the gateway starts.
    store: OnceLock<Arc<dyn portcullis_store::Store>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config_path", &self.config_path)
            .finish()
    }
}

impl Shared {
    /// Loads and compiles the config at `path`.
    pub async fn load(path: &Path) -> Result<Arc<Shared>, ConfigErrors> {
        let config = portcullis_config::load(path)?;
        let resolver = CachingResolver::new(
            config.server.dns_cache_ttl.get(),
            config.server.dns_cache_size.0,
        );
        let clients = ClientRegistry::new(resolver);
        let snapshot = snapshot::compile(config, path, &clients).await?;
        let shared = Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics: Metrics::new(),
            clients,
            config_path: path.to_owned(),
            generation: Generation::new(),
            ready: AtomicBool::new(false),
            reload_lock: tokio::sync::Mutex::new(file_hash(path)),
            store: OnceLock::new(),
        };
        let generation = shared.generation.next();
        shared.metrics.config_generation.set(generation as i64);
        Ok(Arc::new(shared))
    }

    /// Opens the configured store (embedded file or Redis). A Redis that is down does
    /// not stop the gateway: it starts, reports not-ready and reconnects.
    pub async fn open_store(&self) -> Result<(), portcullis_store::StoreError> {
        let snapshot = self.snapshot.load();
        let cfg = &snapshot.config.store;
        let data_dir = std::path::PathBuf::from(cfg.data_dir.as_str());
        let store =
            portcullis_store::open(cfg.url.expose(), &data_dir, cfg.key_prefix.as_str()).await?;
        tracing::info!(backend = store.backend_name(), "store opened");
        let _ = self.store.set(store);
        Ok(())
    }

    pub fn store(&self) -> Option<&Arc<dyn portcullis_store::Store>> {
        self.store.get()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Ready: serving, and the store (if opened) answers.
    pub async fn check_ready(&self) -> bool {
        if !self.is_ready() {
            return false;
        }
        match self.store.get() {
            Some(store) => {
                match tokio::time::timeout(std::time::Duration::from_secs(2), store.ping()).await {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "readiness: store unavailable");
                        false
                    }
                    Err(_) => false,
                }
            }
            None => true,
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Validates and compiles the config file again, then swaps it in. On any error
    /// the running config stays. `only_if_changed` skips a file whose content is the
    /// same as last time (file-watch events for unrelated files).
    pub async fn reload(&self, only_if_changed: bool) -> Result<Option<u64>, ConfigErrors> {
        let mut last = self.reload_lock.lock().await;
        let hash = file_hash(&self.config_path);
        if only_if_changed && hash.is_some() && hash == *last {
            return Ok(None);
        }
        let result = match portcullis_config::load(&self.config_path) {
            Ok(config) => snapshot::compile(config, &self.config_path, &self.clients).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(new) => {
                let old = self.snapshot.load();
                if old.listeners != new.listeners
                    || old.admin.as_ref().map(|a| &a.address)
                        != new.admin.as_ref().map(|a| &a.address)
                {
                    tracing::warn!("listener addresses changed: they take effect after a restart");
                }
                self.clients.retain(&new.used_clients);
                self.snapshot.store(Arc::new(new));
                *last = hash;
                let generation = self.generation.next();
                self.metrics.config_generation.set(generation as i64);
                self.metrics
                    .reloads
                    .get_or_create(&ResultLabels { result: "success" })
                    .inc();
                tracing::info!(generation, "config reloaded");
                Ok(Some(generation))
            }
            Err(errors) => {
                self.metrics
                    .reloads
                    .get_or_create(&ResultLabels { result: "failure" })
                    .inc();
                for e in &errors.0 {
                    tracing::error!(error = %e, "config reload rejected; keeping the running config");
                }
                Err(errors)
            }
        }
    }
}

fn file_hash(path: &Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}
