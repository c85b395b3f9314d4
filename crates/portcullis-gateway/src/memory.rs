//! Giving memory back after a burst of connections. glibc keeps freed memory in
//! its arenas; after thousands of connections close, the process would stay at its
//! peak RSS. A task watches the number of open connections and, when it has fallen
//! well below its recent peak, asks the allocator to return free pages
//! (`malloc_trim`). It never runs on the data path, and only after a large drop.

use std::sync::Arc;
use std::time::Duration;

use crate::Shared;

/// How often the connection count is looked at.
const TICK: Duration = Duration::from_secs(5);
/// A trim needs at least this many connections closed since the peak…
const MIN_DROP: usize = 512;

pub fn spawn_trimmer(shared: Arc<Shared>, max_connections: usize) {
    tokio::spawn(async move {
        let mut peak = 0usize;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let open = max_connections.saturating_sub(shared.connection_slots.available_permits());
            peak = peak.max(open);
            // …and the count down to half of its peak.
            if peak - open >= MIN_DROP && open <= peak / 2 {
                trim();
                tracing::debug!(peak, open, "returned free memory to the system");
                peak = open;
            }
        }
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
