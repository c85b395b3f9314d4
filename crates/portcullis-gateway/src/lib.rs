//! The Portcullis data plane.
//!
//! A request reads top to bottom through [`service::handle`]: normalise the path,
//! answer built-in endpoints, look the route up, check auth, run the route's action
//! ([`action`]: proxy, static, respond, redirect — each file holds its config compile
//! and its runtime). Everything a request needs comes from one
//! immutable [`snapshot::Snapshot`], swapped atomically on reload.

pub mod action;
pub mod admin;
pub mod alloc_count;
pub mod auth;
pub mod authority;
pub mod body;
pub mod context;
pub mod dns;
pub mod error;
pub mod forwarded;
pub mod health;
pub mod memory;
pub mod policy;

pub mod openapi;
pub mod pipelines;
pub mod reload;
pub mod sanitize;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod store;
pub mod targets;
pub mod telemetry;
pub mod template;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod workers;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use portcullis_config::ConfigErrors;

use crate::snapshot::Snapshot;
use crate::telemetry::{Generation, Metrics, ResultLabels};
use crate::upstream::ClientRegistry;

pub use server::run;

/// State shared by every connection: the active snapshot and what outlives reloads
/// (metrics, upstream connection pools).
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Metrics,
    pub labels: telemetry::FixedLabels,
    pub clients: ClientRegistry,
    /// Upstream target health, breakers and checkers (outlive snapshots).
    pub upstreams: health::Upstreams,
    pub config_path: PathBuf,
    /// This instance's `Via` name when the config sets none (loop detection).
    pub instance_id: Arc<str>,
    /// Connection slots (`server.max_connections`), shared by every listener.
    pub connection_slots: Arc<tokio::sync::Semaphore>,
    /// Size of `connection_slots`.
    pub max_connections: usize,
    generation: Generation,
    ready: AtomicBool,
    /// Serialises reloads; also remembers the last loaded file content.
    reload_lock: tokio::sync::Mutex<Option<u64>>,
    /// Shared state (API keys, counters, users).
    store: Arc<dyn portcullis_store::Store>,
    /// Policy state that outlives snapshots (rate-limit counters, cached responses).
    pub policies: policy::Registries,
    /// Stored pipelines' definitions, cached until a change is announced.
    pub pipelines: pipelines::PipelineCache,
}

/// Why the gateway could not load.
#[derive(Debug)]
pub enum LoadError {
    Config(ConfigErrors),
    Store(portcullis_store::StoreError),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Config(e) => e.fmt(f),
            LoadError::Store(e) => write!(f, "cannot open the store: {e}"),
        }
    }
}

impl From<ConfigErrors> for LoadError {
    fn from(e: ConfigErrors) -> Self {
        LoadError::Config(e)
    }
}

/// Opens the store a config names: `""` embedded under `data_dir`, `redis://…` Redis.
pub async fn open_store(
    config: &portcullis_config::StoreConfig,
) -> Result<Arc<dyn portcullis_store::Store>, portcullis_store::StoreError> {
    let data_dir = std::path::PathBuf::from(config.data_dir.as_str());
    let url = config.url.expose();
    if url.is_empty() {
        return Ok(Arc::new(portcullis_store::EmbeddedStore::open(&data_dir)?));
    }
    let store = portcullis_store::RedisStore::connect(portcullis_store::RedisOptions {
        url: url.to_owned(),
        key_prefix: config.key_prefix.to_string(),
        connect_timeout: std::time::Duration::from_secs(5),
        command_timeout: config.timeout.get(),
    })
    .await?;
    Ok(Arc::new(store))
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
    /// `open_store: false` (for `check` and `routes`) validates without touching the
    /// store: features that need it fail until a real one is opened.
    pub async fn load(path: &Path, open_store: bool) -> Result<Arc<Shared>, LoadError> {
        let config = portcullis_config::load(path)?;
        let store: Arc<dyn portcullis_store::Store> = if open_store {
            let store = crate::open_store(&config.store)
                .await
                .map_err(LoadError::Store)?;
            tracing::info!(backend = store.backend_name(), "store opened");
            store
        } else {
            Arc::new(store::Unopened)
        };
        let hosts_file = config
            .server
            .hosts_file
            .as_ref()
            .filter(|f| !f.is_empty())
            .map(|f| snapshot::relative_to(path, f));
        let resolver = dns::Resolver::new(
            config.server.dns_cache_ttl.get(),
            config.server.dns_negative_ttl.get(),
            config.server.dns_cache_size.0,
            hosts_file.as_deref(),
        )
        .map_err(|e| {
            LoadError::Config(ConfigErrors(vec![portcullis_config::ConfigError::at(
                path,
                portcullis_config::Location::UNKNOWN,
                "server.hosts_file",
                e.to_string(),
            )]))
        })?;
        let clients = ClientRegistry::new(Arc::new(resolver));
        let max_connections = max_connections(config.server.max_connections.map(|m| m.0));
        let connection_slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
        let instance_id: Arc<str> = Arc::from(format!(
            "portcullis-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        let policies = policy::Registries::new(store.clone());
        policies
            .cache
            .set_capacity(config.cache_storage.max_bytes.0);
        let upstreams = health::Upstreams::default();
        let snapshot =
            snapshot::compile(config, path, &clients, &upstreams, &policies, &instance_id).await?;
        upstreams.sync(&snapshot.groups, snapshot.notifier.as_ref());
        let shared = Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics: Metrics::new(),
            labels: telemetry::FixedLabels::default(),
            clients,
            upstreams,
            config_path: path.to_owned(),
            instance_id,
            connection_slots,
            max_connections,
            generation: Generation::new(),
            ready: AtomicBool::new(false),
            reload_lock: tokio::sync::Mutex::new(file_hash(path)),
            pipelines: pipelines::PipelineCache::new(&store),
            store,
            policies,
        };
        let generation = shared.generation.next();
        shared.metrics.config_generation.set(generation as i64);
        Ok(Arc::new(shared))
    }

    pub fn store(&self) -> &Arc<dyn portcullis_store::Store> {
        &self.store
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Ready: serving, and the store (if opened) answers.
    pub async fn check_ready(&self) -> bool {
        if !self.is_ready() {
            return false;
        }
        match tokio::time::timeout(std::time::Duration::from_secs(2), self.store.ping()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness: store unavailable");
                false
            }
            Err(_) => false,
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
            Ok(config) => {
                snapshot::compile(
                    config,
                    &self.config_path,
                    &self.clients,
                    &self.upstreams,
                    &self.policies,
                    &self.instance_id,
                )
                .await
            }
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
                let (a, b) = (&old.config.server, &new.config.server);
                if a.max_connections != b.max_connections
                    || a.hosts_file != b.hosts_file
                    || a.dns_cache_ttl != b.dns_cache_ttl
                    || a.dns_negative_ttl != b.dns_negative_ttl
                    || a.dns_cache_size != b.dns_cache_size
                    || a.workers != b.workers
                {
                    tracing::warn!("server.max_connections, workers, hosts_file and dns_* changed: they take effect after a restart");
                }
                self.clients.retain(&new.used_clients);
                self.upstreams.sync(&new.groups, new.notifier.as_ref());
                self.policies
                    .cache
                    .set_capacity(new.config.cache_storage.max_bytes.0);
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

/// `server.max_connections`, or 40 % of the open-files limit (raised to its hard
/// maximum at start by the binary): each proxied client connection also holds an
/// upstream socket, so this keeps the pair within 80 % of the limit.
fn max_connections(configured: Option<usize>) -> usize {
    if let Some(n) = configured {
        return n.max(1);
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    let soft = usize::try_from(soft).unwrap_or(usize::MAX).min(1 << 20);
    (soft / 10 * 4).max(16)
}

/// Raises the soft open-files limit to the hard limit (a gateway holds two sockets
/// per proxied request). Returns the new soft limit.
pub fn raise_fd_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        // An unlimited hard limit is still capped by the kernel's nr_open.
        let target = limit.rlim_max.min(1 << 20);
        if limit.rlim_cur < target {
            let raised = libc::rlimit {
                rlim_cur: target,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return Some(raised.rlim_cur);
            }
        }
    }
    Some(limit.rlim_cur)
}

fn file_hash(path: &Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}
