//! `portcullis`: the binary only parses the command line and wires the crates.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;
use portcullis_gateway::Shared;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "An API gateway: one binary, one YAML file"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (for the default `run` command).
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run {
        /// Worker threads; default one per core.
        #[arg(long, env = "PORTCULLIS_WORKERS")]
        workers: Option<usize>,
        /// `thread_per_core` (default) or `work_stealing`.
        #[arg(long, env = "PORTCULLIS_RUNTIME")]
        runtime: Option<portcullis_config::RuntimeKind>,
        /// Human-readable logs instead of JSON.
        #[arg(long)]
        pretty: bool,
    },
    /// Validate the config: exit 0, or 1 with every error (file:line:column: field: message).
    Check,
    /// Print the compiled route table in match order.
    Routes,
    /// Manage API keys in the store FILE configures.
    #[command(subcommand)]
    Apikey(cli::ApiKeyCommand),
    /// Manage login users in the store FILE configures.
    #[command(subcommand)]
    User(cli::UserCommand),
    /// Manage stored pipelines (FnKit's keys `fnkit:pipeline:<name>`) in the store FILE configures.
    #[command(subcommand)]
    Pipeline(cli::PipelineCommand),
}

#[cfg(feature = "alloc-count")]
#[global_allocator]
static ALLOC: portcullis_gateway::alloc_count::CountingAlloc =
    portcullis_gateway::alloc_count::CountingAlloc;

fn main() -> ExitCode {
    // One TLS crypto provider for the whole process (ring), whatever else is linked in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let Some(config) = cli.config else {
        eprintln!("error: a config file is required (-c FILE)");
        return ExitCode::from(2);
    };
    match cli.command.unwrap_or(Command::Run {
        workers: std::env::var("PORTCULLIS_WORKERS")
            .ok()
            .and_then(|w| w.parse().ok()),
        runtime: std::env::var("PORTCULLIS_RUNTIME")
            .ok()
            .and_then(|r| r.parse().ok()),
        pretty: false,
    }) {
        Command::Check => check(&config),
        Command::Routes => routes(&config),
        Command::Apikey(cmd) => cli::run_blocking(&config, |store| cli::apikey(store, cmd)),
        Command::User(cmd) => cli::run_blocking(&config, |store| cli::user(store, cmd)),
        Command::Pipeline(cmd) => cli::run_blocking(&config, |store| cli::pipeline(store, cmd)),
        Command::Run {
            workers,
            runtime,
            pretty,
        } => run(&config, workers, runtime, pretty),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    portcullis_gateway::telemetry::init_check_logging();
    match load_blocking(path) {
        Some(shared) => {
            let snapshot = shared.snapshot.load();
            println!(
                "{}: OK ({} routes, {} listeners)",
                path.display(),
                snapshot.route_count,
                snapshot.listeners.len()
            );
            ExitCode::SUCCESS
        }
        None => ExitCode::FAILURE,
    }
}

fn routes(path: &std::path::Path) -> ExitCode {
    let Some(shared) = load_blocking(path) else {
        return ExitCode::FAILURE;
    };
    let rows = portcullis_gateway::snapshot::describe_routes(&shared.snapshot.load());
    let header = ["NAME", "HOST", "PATH", "METHODS", "AUTH", "ACTION"].map(String::from);
    let mut widths = [0usize; 6];
    for row in std::iter::once(&header).chain(rows.iter()) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    ExitCode::SUCCESS
}

/// `load` on a small runtime of its own, for the commands that do not serve.
fn load_blocking(path: &std::path::Path) -> Option<std::sync::Arc<Shared>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    runtime.block_on(load(path, false))
}

/// Loads and compiles; prints every error to stderr.
async fn load(path: &std::path::Path, open_store: bool) -> Option<std::sync::Arc<Shared>> {
    match Shared::load(path, open_store).await {
        Ok(shared) => Some(shared),
        Err(portcullis_gateway::LoadError::Config(errors)) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("error: {e}");
            None
        }
    }
}

fn run(
    path: &std::path::Path,
    workers: Option<usize>,
    runtime_kind: Option<portcullis_config::RuntimeKind>,
    pretty: bool,
) -> ExitCode {
    // Logging first, from the raw config, so load errors are logged too.
    let logging = portcullis_config::load(path)
        .map(|c| c.logging)
        .unwrap_or_default();
    let format = if pretty {
        portcullis_config::LogFormat::Pretty
    } else {
        logging.format
    };
    portcullis_gateway::telemetry::init_logging(format, &logging.level);

    let raw_server = portcullis_config::load(path).ok().map(|c| c.server);
    let raw_workers = raw_server
        .as_ref()
        .and_then(|s| s.workers.as_ref().map(|w| w.0));
    let runtime_kind = runtime_kind
        .or(raw_server.map(|s| s.runtime))
        .unwrap_or_default();
    let workers = workers
        .or(raw_workers)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    // One worker, or thread-per-core: current-thread runtimes avoid the
    // work-stealing scheduler's cross-thread bookkeeping entirely.
    let per_core = workers > 1 && runtime_kind == portcullis_config::RuntimeKind::ThreadPerCore;
    let built = if workers == 1 || per_core {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    };
    let runtime = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let fd_limit = portcullis_gateway::raise_fd_limit();
    // Compiled inside the serving runtime: background tasks (JWKS refresh) live there.
    let Some(shared) = runtime.block_on(load(path, true)) else {
        return ExitCode::FAILURE;
    };
    let pool = if per_core {
        match WorkerPool::start(workers - 1) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("error: cannot start the worker threads: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let handles = match &pool {
        Some(p) => std::iter::once(runtime.handle().clone())
            .chain(p.handles.iter().cloned())
            .collect(),
        None => Vec::new(),
    };
    tracing::info!(
        workers,
        runtime = if workers == 1 {
            "single"
        } else if per_core {
            "thread_per_core"
        } else {
            "work_stealing"
        },
        config = %path.display(),
        version = env!("CARGO_PKG_VERSION"),
        open_files = fd_limit,
        max_connections = shared.connection_slots.available_permits(),
        "starting"
    );
    let result = runtime.block_on(async {
        // Signal handlers are registered before any listener binds.
        let shutdown = shutdown_signal();
        portcullis_gateway::run(
            shared,
            shutdown,
            portcullis_gateway::workers::Workers::new(handles),
        )
        .await
    });
    drop(pool);
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "fatal");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Registers SIGTERM/SIGINT handlers now; the returned future resolves on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::warn!("cannot install signal handlers; stop the gateway with SIGKILL");
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

/// The extra threads of `thread_per_core`: each runs its own current-thread runtime
/// until the pool is dropped (after the drain), which stops and joins them.
struct WorkerPool {
    handles: Vec<tokio::runtime::Handle>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl WorkerPool {
    fn start(count: usize) -> std::io::Result<WorkerPool> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut pool = WorkerPool {
            handles: Vec::new(),
            stop: Some(stop_tx),
            threads: Vec::new(),
        };
        for i in 1..=count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            pool.handles.push(runtime.handle().clone());
            let mut stop = stop_rx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("portcullis-worker-{i}"))
                .spawn(move || {
                    portcullis_gateway::workers::set_current(i);
                    runtime.block_on(async move {
                        while !*stop.borrow() {
                            if stop.changed().await.is_err() {
                                break;
                            }
                        }
                    });
                })?;
            pool.threads.push(thread);
        }
        Ok(pool)
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
