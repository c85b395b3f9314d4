//! Where client connections run. `thread_per_core` (the default with several
//! workers): one current-thread runtime per worker thread, and the accept loop hands
//! each new connection to the next worker, which serves it to the end — no work
//! stealing, no cross-thread wake-ups per request (nginx's and Envoy's model).
//! `work_stealing`: tokio's multi-thread runtime schedules every task anywhere.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker this thread runs (0 for the main thread).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// Marks this thread as worker `i` (called once at the start of a worker thread).
pub fn set_current(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// The runtimes that serve connections; empty: the caller's own runtime.
#[derive(Default)]
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Workers {
    pub fn new(handles: Vec<Handle>) -> Self {
        Workers {
            handles,
            next: AtomicUsize::new(0),
        }
    }

    /// Connections go to per-core runtimes (else they stay on the caller's).
    pub fn per_core(&self) -> bool {
        !self.handles.is_empty()
    }

    /// Runs a connection on the next worker (round-robin); on the caller's runtime
    /// when there are none.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if self.handles.is_empty() {
            tokio::spawn(fut);
        } else {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
            self.handles[i].spawn(fut);
        }
    }
}
