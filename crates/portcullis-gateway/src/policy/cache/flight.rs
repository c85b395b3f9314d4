//! Coalescing: one request fetches a key, the others wait for it (bounded).

use std::sync::Arc;
use std::time::Duration;

use super::storage::Inner;

pub const FOLLOW_WAIT: Duration = Duration::from_secs(10);

/// Once the leader has its response head, the others wait at most this much longer
/// for its body: a leader whose client reads slowly must not stall them.
pub const BODY_GRACE: Duration = Duration::from_secs(1);

impl Inner {
    pub(super) fn join(self: &Arc<Self>, key: &str) -> Join {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = flights.get(key) {
            return Join::Follower(rx.clone());
        }
        let (tx, rx) = tokio::sync::watch::channel(false);
        flights.insert(key.to_owned(), rx);
        Join::Leader(FlightGuard {
            inner: self.clone(),
            key: key.to_owned(),
            _tx: tx,
        })
    }

    /// Whether another request is fetching `key`.
    pub(super) fn in_flight(&self, key: &str) -> Option<tokio::sync::watch::Receiver<bool>> {
        let flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        flights.get(key).cloned()
    }
}

pub(super) enum Join {
    Leader(FlightGuard),
    Follower(tokio::sync::watch::Receiver<bool>),
}

/// Held by the request fetching a key; dropping it (stored, not cacheable, body cut
/// short) wakes the requests waiting for it.
pub(super) struct FlightGuard {
    pub(super) inner: Arc<Inner>,
    pub(super) key: String,
    /// `true` once the response head is in and its body is being collected.
    pub(super) _tx: tokio::sync::watch::Sender<bool>,
}

impl FlightGuard {
    pub(super) fn streaming(&self) {
        self._tx.send_replace(true);
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut flights = self.inner.flights.lock().unwrap_or_else(|e| e.into_inner());
        flights.remove(&self.key);
    }
}

/// Waits until the leader's guard is gone (stored or given up), at most
/// [`FOLLOW_WAIT`] in all and [`BODY_GRACE`] once the leader's body streams.
pub(super) async fn follow(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = tokio::time::timeout(FOLLOW_WAIT, async {
        loop {
            if *rx.borrow_and_update() {
                let _ =
                    tokio::time::timeout(BODY_GRACE, async { while rx.changed().await.is_ok() {} })
                        .await;
                return;
            }
            // `changed` ends with an error when the leader's guard drops.
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
}
