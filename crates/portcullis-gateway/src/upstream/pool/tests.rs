//! Pool mechanics without sockets: checkout order, caps, waiting, HTTP/2 sharing,
//! expiry, eviction, worker affinity.
use super::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// A connection handle: closed when its flag says so.
#[derive(Clone, Default)]
struct Fake {
    id: u32,
    closed: Arc<AtomicBool>,
}

impl Conn for Fake {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

fn fake(id: u32) -> Fake {
    Fake {
        id,
        ..Fake::default()
    }
}

type TestPool = Pool<Fake, Fake>;
type TestTarget = Target<Fake, Fake>;

fn limits() -> Limits {
    Limits {
        idle_timeout: Duration::from_secs(4),
        max_idle: 2,
        max_connections: 3,
        max_streams: 2,
        max_targets: 4,
    }
}

fn key(authority: &str) -> Key {
    Key {
        https: false,
        authority: authority.parse().unwrap(),
    }
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

fn open(t: &TestTarget) -> usize {
    t.lock().open
}

/// Connects (the pool says so) and returns the slot of the new HTTP/1 connection.
async fn connect_h1(t: &Arc<TestTarget>) -> Slot<Fake, Fake> {
    match t
        .checkout(Proto::Http1, false, 0, Instant::now(), far())
        .await
    {
        Ok(Checkout::Connect(c)) => c.http1().unwrap(),
        _ => panic!("expected a connect"),
    }
}

#[tokio::test]
async fn idle_http1_connections_are_reused_last_in_first_out() {
    let pool = TestPool::new(limits());
    let t = pool.target(&key("a:80")).unwrap();
    let _s1 = connect_h1(&t).await;
    let _s2 = connect_h1(&t).await;
    t.put_h1(fake(1), 0);
    t.put_h1(fake(2), 0);
    for want in [2, 1] {
        match t
            .checkout(Proto::Http1, false, 0, Instant::now(), far())
            .await
        {
            Ok(Checkout::Http1(c, _)) => assert_eq!(c.id, want),
            _ => panic!("expected an idle connection"),
        }
    }
    // None idle any more: room for a third connection.
    assert!(matches!(
        t.checkout(Proto::Http1, false, 0, Instant::now(), far())
            .await,
        Ok(Checkout::Connect(_))
    ));
}

#[tokio::test]
async fn closed_and_expired_idle_connections_are_skipped() {
    let pool = TestPool::new(limits());
    let t = pool.target(&key("a:80")).unwrap();
    let _slots = [connect_h1(&t).await, connect_h1(&t).await];
    t.put_h1(fake(1), 0);
    let closed = fake(2);
    t.put_h1(closed.clone(), 0);
    closed.closed.store(true, Ordering::SeqCst);
    // The closed one is dropped, the one below it is used.
    assert!(matches!(
        t.checkout(Proto::Http1, false, 0, Instant::now(), far())
            .await,
        Ok(Checkout::Http1(Fake { id: 1, .. }, 0))
    ));
    assert!(t.lock().idle_count == 0);

    t.put_h1(fake(3), 0);
    {
        let mut st = t.lock();
        st.idle[0][0].since = st.idle[0][0]
            .since
            .checked_sub(Duration::from_secs(5))
            .unwrap();
    }
    // Idle for longer than the idle timeout: never handed out.
    assert!(matches!(
        t.checkout(Proto::Http1, false, 0, Instant::now(), far())
            .await,
        Ok(Checkout::Connect(_))
    ));
    assert!(t.lock().idle_count == 0);
}

#[tokio::test]
async fn at_most_max_idle_are_kept_and_retries_skip_them() {
    let pool = TestPool::new(limits());
    let t = pool.target(&key("a:80")).unwrap();
    let _slots = [connect_h1(&t).await, connect_h1(&t).await];
    t.put_h1(fake(1), 0);
    t.put_h1(fake(2), 0);
    t.put_h1(fake(3), 0);
    assert_eq!(t.lock().idle_count, 2, "max_idle is 2");
    // A retry opens a fresh connection while the cap allows it…
    let Ok(Checkout::Connect(c)) = t
        .checkout(Proto::Http1, true, 0, Instant::now(), far())
        .await
    else {
        panic!("a retry took an idle connection");
    };
    let _third = c.http1().unwrap();
    assert_eq!(open(&t), 3);
    // … and at the cap takes an idle one after all.
    assert!(matches!(
        t.checkout(Proto::Http1, true, 0, Instant::now(), far())
            .await,
        Ok(Checkout::Http1(..))
    ));
}

#[tokio::test]
async fn the_total_cap_waits_for_a_returned_connection() {
    let pool = TestPool::new(limits());
    let t = pool.target(&key("a:80")).unwrap();
    let slots = [
        connect_h1(&t).await,
        connect_h1(&t).await,
        connect_h1(&t).await,
    ];
    assert_eq!(open(&t), 3);
    let waiter = {
        let t = t.clone();
        tokio::spawn(async move {
            t.checkout(Proto::Http1, false, 0, Instant::now(), far())
                .await
        })
    };
    while pool.pending(&"a:80".parse().unwrap()) == 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(pool.open(&"a:80".parse().unwrap()), 3);
    t.put_h1(fake(7), 0);
    match waiter.await.unwrap() {
        Ok(Checkout::Http1(c, _)) => assert_eq!(c.id, 7),
        _ => panic!("the waiter did not get the returned connection"),
    }
    assert_eq!(t.lock().waiting, 0);
    // A connection's task ending frees its slot for a waiter, too.
    let waiter = {
        let t = t.clone();
        tokio::spawn(async move {
            t.checkout(Proto::Http1, false, 0, Instant::now(), far())
                .await
        })
    };
    while t.lock().waiting == 0 {
        tokio::task::yield_now().await;
    }
    drop(slots);
    assert!(matches!(waiter.await.unwrap(), Ok(Checkout::Connect(_))));
}

#[tokio::test]
async fn the_total_cap_times_out_as_overloaded() {
    let pool = TestPool::new(limits());
    let t = pool.target(&key("a:80")).unwrap();
    let _slots = [
        connect_h1(&t).await,
        connect_h1(&t).await,
        connect_h1(&t).await,
    ];
    let deadline = Instant::now() + Duration::from_millis(30);
    let r = t
        .checkout(Proto::Http1, false, 0, Instant::now(), deadline)
        .await;
    assert!(matches!(r, Err(Waited::Overloaded)));
    assert_eq!(t.lock().waiting, 0, "a gone waiter is not counted");
}

#[tokio::test]
async fn http2_streams_share_a_connection_up_to_max_streams() {
    let pool = TestPool::new(limits());
    let t = pool.target(&key("a:80")).unwrap();
    let Ok(Checkout::Connect(c)) = t
        .checkout(Proto::Http2, false, 0, Instant::now(), far())
        .await
    else {
        panic!("expected a connect");
    };
    // While it connects, others wait for it rather than open their own.
    let waiter = {
        let t = t.clone();
        tokio::spawn(async move {
            t.checkout(Proto::Http2, false, 0, Instant::now(), far())
                .await
        })
    };
    while t.lock().waiting == 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(open(&t), 1);
    let (_slot, s1) = c.http2(fake(1)).unwrap();
    let Ok(Checkout::Http2(tx, s2)) = waiter.await.unwrap() else {
        panic!("the waiter did not share the new connection");
    };
    assert_eq!(tx.id, 1);
    // Two streams in flight (max_streams): the next request opens a second one.
    let Ok(Checkout::Connect(c2)) = t
        .checkout(Proto::Http2, false, 0, Instant::now(), far())
        .await
    else {
        panic!("expected a second connection");
    };
    let (_slot2, s3) = c2.http2(fake(2)).unwrap();
    drop(s1);
    // A finished stream makes room on the first connection again.
    let Ok(Checkout::Http2(tx, _s4)) = t
        .checkout(Proto::Http2, false, 0, Instant::now(), far())
        .await
    else {
        panic!("expected a stream");
    };
    assert_eq!(tx.id, 1);
    drop((s2, s3));
}

#[tokio::test]
async fn a_failed_http2_connect_lets_a_waiter_try() {
    let pool = TestPool::new(limits());
    let t = pool.target(&key("a:80")).unwrap();
    let Ok(Checkout::Connect(c)) = t
        .checkout(Proto::Http2, false, 0, Instant::now(), far())
        .await
    else {
        panic!("expected a connect");
    };
    let waiter = {
        let t = t.clone();
        tokio::spawn(async move {
            t.checkout(Proto::Http2, false, 0, Instant::now(), far())
                .await
        })
    };
    while t.lock().waiting == 0 {
        tokio::task::yield_now().await;
    }
    drop(c);
    assert!(matches!(waiter.await.unwrap(), Ok(Checkout::Connect(_))));
    assert_eq!(open(&t), 0, "both connects were abandoned");
}

#[tokio::test]
async fn negotiated_targets_learn_http1_and_release_the_waiters() {
    let pool = TestPool::new(limits());
    let t = pool.target(&key("a:443")).unwrap();
    let Ok(Checkout::Connect(c)) = t
        .checkout(Proto::Negotiated, false, 0, Instant::now(), far())
        .await
    else {
        panic!("expected a connect");
    };
    let waiter = {
        let t = t.clone();
        tokio::spawn(async move {
            t.checkout(Proto::Negotiated, false, 0, Instant::now(), far())
                .await
        })
    };
    while t.lock().waiting == 0 {
        tokio::task::yield_now().await;
    }
    let _slot = c.http1().unwrap();
    // ALPN chose HTTP/1.1: the waiter opens its own connection.
    assert!(matches!(
        waiter.await.unwrap(),
        Ok(Checkout::Connect(Connecting { claim: false, .. }))
    ));
}

#[tokio::test]
async fn idle_connections_expire_in_a_sweep() {
    let pool = TestPool::new(limits());
    let t = pool.target(&key("a:80")).unwrap();
    let s = connect_h1(&t).await;
    let idle = fake(1);
    t.put_h1(idle, 0);
    pool.sweep();
    assert_eq!(t.lock().idle_count, 1);
    pool.sweep_at(Instant::now() + Duration::from_secs(5));
    assert!(t.lock().idle_count == 0, "expired connection kept");
    // The target stays while its connection's task runs, then goes.
    assert_eq!(pool.len(), 1);
    drop(s);
    pool.sweep();
    assert_eq!(pool.len(), 0);
    assert!(t.lock().retired);
    // A retired target never pools again.
    t.put_h1(fake(2), 0);
    assert!(t.lock().idle_count == 0);
}

#[tokio::test]
async fn idle_http2_connections_expire_in_a_sweep() {
    let pool = TestPool::new(limits());
    let t = pool.target(&key("a:80")).unwrap();
    let Ok(Checkout::Connect(c)) = t
        .checkout(Proto::Http2, false, 0, Instant::now(), far())
        .await
    else {
        panic!("expected a connect");
    };
    let (_slot, stream) = c.http2(fake(1)).unwrap();
    let later = || Instant::now() + Duration::from_secs(5);
    pool.sweep_at(later());
    assert_eq!(t.lock().h2.len(), 1, "a connection with a stream is kept");
    drop(stream);
    pool.sweep();
    assert_eq!(t.lock().h2.len(), 1, "idle for less than the idle timeout");
    pool.sweep_at(later());
    assert!(t.lock().h2.is_empty());
}

#[tokio::test]
async fn targets_are_bounded_and_only_unused_ones_are_evicted() {
    let pool = TestPool::new(limits());
    let busy = pool.target(&key("busy:80")).unwrap();
    let _held = connect_h1(&busy).await;
    let idle = pool.target(&key("idle:80")).unwrap();
    let _s = connect_h1(&idle).await;
    for name in ["c:80", "d:80"] {
        pool.target(&key(name)).unwrap();
    }
    assert_eq!(pool.len(), 4);
    drop(_s);
    // Full: a new target evicts every unused one (not the busy one).
    assert!(pool.target(&key("e:80")).is_some());
    assert_eq!(pool.len(), 2);
    assert!(idle.lock().retired && !busy.lock().retired);
    for name in ["f:80", "g:80"] {
        pool.target(&key(name)).unwrap();
    }
    let _held: Vec<_> = ["e:80", "f:80", "g:80"]
        .iter()
        .map(|n| pool.target(&key(n)).unwrap())
        .collect();
    let mut slots = Vec::new();
    for t in &_held {
        slots.push(connect_h1(t).await);
    }
    // Every target busy: a fifth cannot be added.
    assert!(pool.target(&key("h:80")).is_none());
}

#[tokio::test]
async fn workers_keep_their_own_connections_and_borrow_only_at_the_cap() {
    let pool = TestPool::new(Limits {
        max_connections: 2,
        ..limits()
    });
    let t = pool.target(&key("a:80")).unwrap();
    let Ok(Checkout::Connect(c)) = t
        .checkout(Proto::Http1, false, 1, Instant::now(), far())
        .await
    else {
        panic!("expected a connect");
    };
    let _s1 = c.http1().unwrap();
    t.put_h1(fake(1), 1);
    // Worker 2 opens its own rather than drive worker 1's…
    let Ok(Checkout::Connect(c)) = t
        .checkout(Proto::Http1, false, 2, Instant::now(), far())
        .await
    else {
        panic!("worker 2 took worker 1's connection under the cap");
    };
    let _s2 = c.http1().unwrap();
    // … and at the cap borrows it, and it goes back to worker 1's stack.
    let Ok(Checkout::Http1(tx, home)) = t
        .checkout(Proto::Http1, false, 2, Instant::now(), far())
        .await
    else {
        panic!("expected worker 1's idle connection");
    };
    assert_eq!((tx.id, home), (1, 1));
    t.put_h1(tx, home);
    assert_eq!(t.lock().idle[1].len(), 1);
    assert!(matches!(
        t.checkout(Proto::Http1, false, 1, Instant::now(), far())
            .await,
        Ok(Checkout::Http1(Fake { id: 1, .. }, 1))
    ));
}

#[tokio::test]
async fn each_worker_opens_its_own_http2_connection() {
    let pool = TestPool::new(Limits {
        max_connections: 2,
        ..limits()
    });
    let t = pool.target(&key("a:80")).unwrap();
    let mut held = Vec::new();
    for (worker, id) in [(1, 1), (2, 2)] {
        let Ok(Checkout::Connect(c)) = t
            .checkout(Proto::Http2, false, worker, Instant::now(), far())
            .await
        else {
            panic!("worker {worker} did not open its own connection");
        };
        held.push(c.http2(fake(id)).unwrap());
    }
    // At the cap: a worker's own connection first, then another's.
    let Ok(Checkout::Http2(tx, _s3)) = t
        .checkout(Proto::Http2, false, 2, Instant::now(), far())
        .await
    else {
        panic!("expected a stream");
    };
    assert_eq!(tx.id, 2, "its own connection first");
    let Ok(Checkout::Http2(tx, _s4)) = t
        .checkout(Proto::Http2, false, 2, Instant::now(), far())
        .await
    else {
        panic!("expected a stream");
    };
    assert_eq!(tx.id, 1, "worker 2's own is full (max_streams 2)");
    // Every stream of every connection busy, no room for another: overloaded.
    let soon = Instant::now() + Duration::from_millis(20);
    assert!(matches!(
        t.checkout(Proto::Http2, false, 3, Instant::now(), soon)
            .await,
        Err(Waited::Overloaded)
    ));
}

#[tokio::test]
async fn a_dropped_pool_lets_go_of_its_idle_connections() {
    let pool = TestPool::new(limits());
    let t = pool.target(&key("a:80")).unwrap();
    let _slot = connect_h1(&t).await;
    t.put_h1(fake(1), 0);
    drop(pool);
    assert!(t.lock().idle_count == 0 && t.lock().retired);
}

#[test]
fn host_header_leaves_out_the_default_port() {
    let t = TestTarget::new(&key("example.com:80"), limits());
    assert_eq!(t.host.unwrap(), "example.com");
    let t = TestTarget::new(&key("example.com:8080"), limits());
    assert_eq!(t.host.unwrap(), "example.com:8080");
    let t = TestTarget::new(&key("user:pw@example.com:8080"), limits());
    assert_eq!(t.host.unwrap(), "example.com:8080");
    let k = Key {
        https: true,
        authority: "[::1]:443".parse().unwrap(),
    };
    assert_eq!(TestTarget::new(&k, limits()).host.unwrap(), "[::1]");
    assert_eq!((k.host(), k.port()), ("::1", 443));
}
