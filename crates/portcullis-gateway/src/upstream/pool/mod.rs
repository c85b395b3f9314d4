//! Per-target connection pools: the bookkeeping, with no I/O.
//!
//! A pool belongs to one [`super::UpstreamClient`] and keeps one [`Target`] per
//! (scheme, authority). A target holds the idle HTTP/1 senders and the shared HTTP/2
//! senders with their streams in flight, and counts every connection it opened
//! against `max_connections` until the connection's task ends. Each target has its
//! own `std::sync::Mutex`, held only to push, pop or count, never across an await.
//!
//! Connections are kept by the worker whose runtime drives them (`thread_per_core`
//! runs one runtime per worker): a request takes its own worker's connections first,
//! the most recently used one (the least likely to have been closed by the upstream),
//! and opens a new one rather than use another worker's, which would cost two
//! cross-thread wake-ups per request. Only at the cap does it borrow another
//! worker's connection rather than wait.
//!
//! Generic over the connection handles so the mechanics are tested without sockets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::uri::Authority;
use http::HeaderValue;
use tokio::sync::Notify;
use tokio::time::Instant;

/// What the pool asks of a connection handle.
pub(crate) trait Conn: Send + 'static {
    fn is_closed(&self) -> bool;
}

/// A target: one upstream origin within a client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub https: bool,
    pub authority: Authority,
}

impl Key {
    pub fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.https { 443 } else { 80 })
    }

    /// The host without IPv6 brackets.
    pub fn host(&self) -> &str {
        let h = self.authority.host();
        h.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(h)
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Idle connections older than this are never handed out, and are closed.
    pub idle_timeout: Duration,
    /// Idle HTTP/1 connections kept per target.
    pub max_idle: usize,
    /// Connections per target: connecting, idle, busy and closing.
    pub max_connections: usize,
    /// Streams in flight on one HTTP/2 connection before another is opened.
    pub max_streams: usize,
    /// Targets per pool (templated upstreams make targets from client input).
    pub max_targets: usize,
}

/// Which protocol a target's connections speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    Http1,
    Http2,
    /// `https` + `auto`: ALPN decides on each connect; the pool remembers the last answer.
    Negotiated,
}

/// Why a checkout gave up at its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waited {
    /// Every connection the target may have is busy.
    Overloaded,
    /// The HTTP/2 connection being opened for this target did not come up in time.
    Connecting,
}

/// What a checkout hands over.
pub(crate) enum Checkout<H1: Conn, H2: Conn + Clone> {
    /// An idle HTTP/1 connection, now the caller's, and the worker driving it.
    Http1(H1, usize),
    /// A shared HTTP/2 connection with one stream reserved.
    Http2(H2, Stream<H1, H2>),
    /// Room for a new connection: the caller connects.
    Connect(Connecting<H1, H2>),
}

pub(crate) struct Pool<H1: Conn, H2: Conn + Clone> {
    limits: Limits,
    targets: Mutex<HashMap<Key, Arc<Target<H1, H2>>>>,
}

impl<H1: Conn, H2: Conn + Clone> Pool<H1, H2> {
    pub fn new(limits: Limits) -> Self {
        Pool {
            limits,
            targets: Mutex::new(HashMap::new()),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The target for `key`, created on first use. `None` when the pool already
    /// holds `max_targets` targets and none of them is idle enough to be evicted.
    pub fn target(&self, key: &Key) -> Option<Arc<Target<H1, H2>>> {
        let mut targets = lock(&self.targets);
        if let Some(t) = targets.get(key) {
            return Some(t.clone());
        }
        if targets.len() >= self.limits.max_targets {
            // Only targets nobody is using: their idle connections are closed.
            targets.retain(|_, t| !t.evict_if_unused());
            if targets.len() >= self.limits.max_targets {
                return None;
            }
        }
        let target = Arc::new(Target::new(key, self.limits));
        targets.insert(key.clone(), target.clone());
        Some(target)
    }

    /// Closes expired idle connections and forgets targets without connections.
    pub fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    fn sweep_at(&self, now: Instant) {
        let targets: Vec<_> = lock(&self.targets).values().cloned().collect();
        for t in &targets {
            t.sweep(now);
        }
        drop(targets);
        lock(&self.targets).retain(|_, t| !t.retire_if_empty());
    }

    /// Requests waiting for a connection to `authority` (either scheme).
    pub fn pending(&self, authority: &Authority) -> usize {
        self.sum(authority, |s| s.waiting)
    }

    /// Connections open to `authority` (either scheme): connecting, idle, busy.
    pub fn open(&self, authority: &Authority) -> usize {
        self.sum(authority, |s| s.open)
    }

    fn sum(&self, authority: &Authority, f: impl Fn(&State<H1, H2>) -> usize) -> usize {
        let targets = lock(&self.targets);
        [false, true]
            .into_iter()
            .filter_map(|https| {
                targets.get(&Key {
                    https,
                    authority: authority.clone(),
                })
            })
            .map(|t| f(&t.lock()))
            .sum()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.targets).len()
    }
}

impl<H1: Conn, H2: Conn + Clone> Drop for Pool<H1, H2> {
    /// The client is gone: its idle connections close now (each connection's task
    /// holds its target, so they would otherwise live until the upstream closes them).
    fn drop(&mut self) {
        for t in lock(&self.targets).values() {
            t.retire();
        }
    }
}

pub(crate) struct Target<H1: Conn, H2: Conn + Clone> {
    limits: Limits,
    /// `Host` for HTTP/1 requests: the authority without the scheme's default port.
    pub host: Option<HeaderValue>,
    state: Mutex<State<H1, H2>>,
    /// Wakes checkouts waiting for a connection (at the total cap, or while an HTTP/2
    /// connection is being opened).
    notify: Notify,
}

struct State<H1, H2> {
    /// Idle HTTP/1 connections by the worker that drives them, each stack LIFO.
    idle: Vec<Vec<Idle<H1>>>,
    idle_count: usize,
    h2: Vec<H2Conn<H2>>,
    /// Connections counted against `max_connections`, until their task ends.
    open: usize,
    /// Checkouts waiting for a connection.
    waiting: usize,
    /// Workers with an HTTP/2 connect under way: their other requests wait for it
    /// instead of opening their own (a burst would open one per request).
    h2_connecting: Vec<usize>,
    /// `Negotiated` targets: whether the last connection chose h2.
    learned_h2: Option<bool>,
    next_id: u64,
    /// Out of the pool's map: connections are used once and never pooled.
    retired: bool,
}

impl<H1: Conn, H2> State<H1, H2> {
    /// The most recently pooled usable connection of `worker`; closed or expired
    /// ones met on the way are dropped.
    fn pop_idle(&mut self, worker: usize, now: Instant, idle_timeout: Duration) -> Option<H1> {
        let stack = self.idle.get_mut(worker)?;
        while let Some(idle) = stack.pop() {
            self.idle_count -= 1;
            if now.saturating_duration_since(idle.since) < idle_timeout && !idle.tx.is_closed() {
                return Some(idle.tx);
            }
        }
        None
    }

    fn stop_connecting(&mut self, worker: usize) {
        self.h2_connecting.retain(|w| *w != worker);
    }
}

struct Idle<H1> {
    tx: H1,
    since: Instant,
}

struct H2Conn<H2> {
    tx: H2,
    id: u64,
    worker: usize,
    streams: usize,
    idle_since: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state is counters and handles, each update a single step: usable after a
    // panic elsewhere.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<H1: Conn, H2: Conn + Clone> Target<H1, H2> {
    fn new(key: &Key, limits: Limits) -> Self {
        // Host and port only (never userinfo), as the legacy client's `set_host` did.
        let default_port = if key.https { 443 } else { 80 };
        let host = match key.authority.port_u16() {
            Some(port) if port != default_port => {
                HeaderValue::from_str(&format!("{}:{port}", key.authority.host())).ok()
            }
            _ => HeaderValue::from_str(key.authority.host()).ok(),
        };
        Target {
            limits,
            host,
            state: Mutex::new(State {
                idle: Vec::new(),
                idle_count: 0,
                h2: Vec::new(),
                open: 0,
                waiting: 0,
                h2_connecting: Vec::new(),
                learned_h2: None,
                next_id: 0,
                retired: false,
            }),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<H1, H2>> {
        lock(&self.state)
    }

    /// A connection for one request on `worker`: an idle HTTP/1 one, a stream on an
    /// HTTP/2 one, or room to connect. At the cap (or while this worker's HTTP/2
    /// connection to the target is being opened) it waits until `deadline`. `fresh`:
    /// skip idle HTTP/1 connections when a new one may be opened (a retry after a
    /// stale one). `now` (the caller's clock read) ages idle connections.
    pub async fn checkout(
        self: &Arc<Self>,
        proto: Proto,
        fresh: bool,
        worker: usize,
        now: Instant,
        deadline: Instant,
    ) -> Result<Checkout<H1, H2>, Waited> {
        let mut counted = Counted {
            target: self,
            yes: false,
        };
        if let Ok(c) = self.try_checkout(proto, fresh, worker, now, &mut counted) {
            return Ok(c);
        }
        let sleep = tokio::time::sleep_until(deadline);
        tokio::pin!(sleep);
        let mut reason;
        loop {
            // Registered before looking, so a release between the look and the
            // await still wakes us.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_checkout(proto, fresh, worker, Instant::now(), &mut counted) {
                Ok(c) => return Ok(c),
                Err(r) => reason = r,
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = &mut sleep => return Err(reason),
            }
        }
    }

    fn try_checkout(
        self: &Arc<Self>,
        proto: Proto,
        fresh: bool,
        worker: usize,
        now: Instant,
        counted: &mut Counted<'_, H1, H2>,
    ) -> Result<Checkout<H1, H2>, Waited> {
        let mut st = self.lock();
        let use_h2 = match proto {
            Proto::Http1 => false,
            Proto::Http2 => true,
            Proto::Negotiated => st.learned_h2 != Some(false),
        };
        let room = st.open < self.limits.max_connections;
        let got = if use_h2 {
            self.checkout_h2(&mut st, worker, room)
        } else {
            self.checkout_h1(&mut st, worker, room, fresh, now)
        };
        match got {
            Some(c) => {
                if counted.yes {
                    st.waiting -= 1;
                    counted.yes = false;
                }
                Ok(c)
            }
            None => {
                if !counted.yes {
                    st.waiting += 1;
                    counted.yes = true;
                }
                Err(if use_h2 && st.h2_connecting.contains(&worker) {
                    Waited::Connecting
                } else {
                    Waited::Overloaded
                })
            }
        }
    }

    fn checkout_h2(
        self: &Arc<Self>,
        st: &mut State<H1, H2>,
        worker: usize,
        room: bool,
    ) -> Option<Checkout<H1, H2>> {
        let max = self.limits.max_streams;
        st.h2.retain(|c| !c.tx.is_closed());
        let may_connect = room && !st.h2_connecting.contains(&worker);
        // This worker's own connections; another worker's only when this one cannot
        // open one now.
        let pick = st
            .h2
            .iter()
            .position(|c| c.worker == worker && c.streams < max)
            .or_else(|| {
                if may_connect {
                    None
                } else {
                    st.h2.iter().position(|c| c.streams < max)
                }
            });
        if let Some(i) = pick {
            let c = &mut st.h2[i];
            c.streams += 1;
            return Some(Checkout::Http2(
                c.tx.clone(),
                Stream {
                    target: self.clone(),
                    id: c.id,
                },
            ));
        }
        if !may_connect {
            return None;
        }
        st.open += 1;
        st.h2_connecting.push(worker);
        Some(self.connecting(worker, true))
    }

    fn checkout_h1(
        self: &Arc<Self>,
        st: &mut State<H1, H2>,
        worker: usize,
        room: bool,
        fresh: bool,
        now: Instant,
    ) -> Option<Checkout<H1, H2>> {
        let idle_timeout = self.limits.idle_timeout;
        if !(fresh && room) {
            if let Some(tx) = st.pop_idle(worker, now, idle_timeout) {
                return Some(Checkout::Http1(tx, worker));
            }
        }
        if room {
            st.open += 1;
            return Some(self.connecting(worker, false));
        }
        // At the cap: another worker's idle connection beats waiting.
        (0..st.idle.len()).filter(|w| *w != worker).find_map(|w| {
            st.pop_idle(w, now, idle_timeout)
                .map(|tx| Checkout::Http1(tx, w))
        })
    }

    fn connecting(self: &Arc<Self>, worker: usize, claim: bool) -> Checkout<H1, H2> {
        Checkout::Connect(Connecting {
            slot: Some(Slot {
                target: self.clone(),
            }),
            claim,
            worker,
        })
    }

    /// An HTTP/1 connection (driven by `worker`) whose exchange finished and that
    /// is ready for another.
    pub fn put_h1(&self, tx: H1, worker: usize) {
        let mut st = self.lock();
        if st.retired
            || st.idle_count >= self.limits.max_idle
            || self.limits.idle_timeout.is_zero()
            || tx.is_closed()
        {
            drop(st);
            drop(tx);
            return;
        }
        if st.idle.len() <= worker {
            st.idle.resize_with(worker + 1, Vec::new);
        }
        st.idle[worker].push(Idle {
            tx,
            since: Instant::now(),
        });
        st.idle_count += 1;
        let wake = st.waiting > 0;
        drop(st);
        if wake {
            self.notify.notify_one();
        }
    }

    fn release_slot(&self) {
        let mut st = self.lock();
        st.open = st.open.saturating_sub(1);
        let wake = st.waiting > 0;
        drop(st);
        if wake {
            self.notify.notify_one();
        }
    }

    fn release_stream(&self, id: u64) {
        let mut st = self.lock();
        if let Some(c) = st.h2.iter_mut().find(|c| c.id == id) {
            c.streams = c.streams.saturating_sub(1);
            if c.streams == 0 {
                c.idle_since = Instant::now();
            }
        }
        let wake = st.waiting > 0;
        drop(st);
        if wake {
            self.notify.notify_one();
        }
    }

    fn sweep(&self, now: Instant) {
        let idle_timeout = self.limits.idle_timeout;
        let mut st = self.lock();
        for stack in &mut st.idle {
            stack.retain(|i| {
                now.saturating_duration_since(i.since) < idle_timeout && !i.tx.is_closed()
            });
        }
        st.idle_count = st.idle.iter().map(Vec::len).sum();
        st.h2.retain(|c| {
            !c.tx.is_closed()
                && (c.streams > 0 || now.saturating_duration_since(c.idle_since) < idle_timeout)
        });
    }

    fn retire(&self) {
        let mut st = self.lock();
        st.retired = true;
        st.idle_count = 0;
        let idle = std::mem::take(&mut st.idle);
        let h2 = std::mem::take(&mut st.h2);
        drop(st);
        drop((idle, h2));
    }

    /// Retires the target when it has no connection at all.
    fn retire_if_empty(&self) -> bool {
        let mut st = self.lock();
        let empty = st.open == 0 && st.waiting == 0 && st.h2_connecting.is_empty();
        st.retired |= empty;
        empty
    }

    /// Retires the target when nothing is using it, closing its idle connections.
    fn evict_if_unused(&self) -> bool {
        let mut st = self.lock();
        let idle = st.idle_count + st.h2.iter().filter(|c| c.streams == 0).count();
        if st.waiting > 0 || !st.h2_connecting.is_empty() || st.open > idle {
            return false;
        }
        st.retired = true;
        st.idle_count = 0;
        st.idle.clear();
        st.h2.clear();
        true
    }
}

/// Whether this checkout counts itself in `waiting`; uncounts on drop (a cancelled
/// request).
struct Counted<'a, H1: Conn, H2: Conn + Clone> {
    target: &'a Target<H1, H2>,
    yes: bool,
}

impl<H1: Conn, H2: Conn + Clone> Drop for Counted<'_, H1, H2> {
    fn drop(&mut self) {
        if self.yes {
            let mut st = self.target.lock();
            st.waiting = st.waiting.saturating_sub(1);
        }
    }
}

/// One connection's place under `max_connections`: held by the connection's task,
/// given back when the task ends.
pub(crate) struct Slot<H1: Conn, H2: Conn + Clone> {
    target: Arc<Target<H1, H2>>,
}

impl<H1: Conn, H2: Conn + Clone> Drop for Slot<H1, H2> {
    fn drop(&mut self) {
        self.target.release_slot();
    }
}

/// A stream in flight on a pooled HTTP/2 connection; ends on drop.
pub(crate) struct Stream<H1: Conn, H2: Conn + Clone> {
    target: Arc<Target<H1, H2>>,
    id: u64,
}

impl<H1: Conn, H2: Conn + Clone> Drop for Stream<H1, H2> {
    fn drop(&mut self) {
        self.target.release_stream(self.id);
    }
}

/// Room for a connection being opened. Dropped without [`Connecting::http1`] or
/// [`Connecting::http2`] (connect failed, request cancelled), it frees its slot.
pub(crate) struct Connecting<H1: Conn, H2: Conn + Clone> {
    slot: Option<Slot<H1, H2>>,
    /// This connect is its worker's pending HTTP/2 connect to the target.
    claim: bool,
    worker: usize,
}

impl<H1: Conn, H2: Conn + Clone> Connecting<H1, H2> {
    fn target(&self) -> Option<&Arc<Target<H1, H2>>> {
        self.slot.as_ref().map(|s| &s.target)
    }

    /// The connection speaks HTTP/1: the caller uses it; the slot goes to its task.
    pub fn http1(mut self) -> Option<Slot<H1, H2>> {
        let claim = std::mem::take(&mut self.claim);
        let slot = self.slot.take()?;
        let mut st = slot.target.lock();
        st.learned_h2 = Some(false);
        if claim {
            st.stop_connecting(self.worker);
        }
        drop(st);
        if claim {
            // Those waiting for an h2 connection open their own HTTP/1 ones.
            slot.target.notify.notify_waiters();
        }
        Some(slot)
    }

    /// The connection speaks HTTP/2: shared from now on, with one stream reserved
    /// for the caller; the slot goes to its task.
    pub fn http2(mut self, tx: H2) -> Option<(Slot<H1, H2>, Stream<H1, H2>)> {
        let slot = self.slot.take()?;
        let target = slot.target.clone();
        let mut st = target.lock();
        st.learned_h2 = Some(true);
        if std::mem::take(&mut self.claim) {
            st.stop_connecting(self.worker);
        }
        let id = st.next_id;
        st.next_id += 1;
        if !st.retired {
            st.h2.push(H2Conn {
                tx,
                id,
                worker: self.worker,
                streams: 1,
                idle_since: Instant::now(),
            });
        }
        drop(st);
        target.notify.notify_waiters();
        let stream = Stream {
            target: target.clone(),
            id,
        };
        Some((slot, stream))
    }
}

impl<H1: Conn, H2: Conn + Clone> Drop for Connecting<H1, H2> {
    fn drop(&mut self) {
        if !self.claim {
            return;
        }
        if let Some(t) = self.target() {
            t.lock().stop_connecting(self.worker);
            // One of the waiters takes over the connect.
            t.notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests;
