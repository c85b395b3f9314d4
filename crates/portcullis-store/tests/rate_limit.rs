//! `Store::rate_limit` on both backends: both algorithms, refusals not counted,
//! and exact across two handles (two processes, two gateway instances).

mod backends;
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::{redis_store, two_embedded, two_redis, EXPIRY_WAIT};
use common::{data_dir, RedisServer};
use portcullis_store::{EmbeddedStore, Rate, RateAlgorithm, Store};

fn rate(algorithm: RateAlgorithm, limit: u64, period: Duration, burst: u64) -> Rate {
    Rate {
        algorithm,
        limit,
        period,
        burst,
    }
}

/// `rate_limit`, the same on every backend: both algorithms, refusals not counted,
/// keys independent, token refill waited for (not slept on), bad state reported.
async fn rate_limit_suite(s: &dyn Store) {
    let hour = rate(
        RateAlgorithm::SlidingWindow,
        5,
        Duration::from_secs(3600),
        5,
    );
    for i in 1..=5u64 {
        let d = s.rate_limit("rlw:a", &hour, 1).await.unwrap();
        assert!(d.allowed, "hit {i}");
        assert_eq!(d.remaining, 5 - i);
        assert!(d.reset_after <= Duration::from_secs(3600));
        assert_eq!(d.retry_after, Duration::ZERO);
    }
    let d = s.rate_limit("rlw:a", &hour, 1).await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.remaining, 0);
    assert!(d.retry_after > Duration::ZERO);
    // Another key counts on its own; a cost above what is left is refused whole.
    let d = s.rate_limit("rlw:b", &hour, 4).await.unwrap();
    assert!(d.allowed);
    assert_eq!(d.remaining, 1);
    let d = s.rate_limit("rlw:b", &hour, 2).await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.remaining, 1, "refused calls do not count");
    assert!(s.rate_limit("rlw:b", &hour, 1).await.unwrap().allowed);

    // Token bucket: a burst of 3, then one token per 500 ms.
    let bucket = rate(RateAlgorithm::TokenBucket, 1, Duration::from_millis(500), 3);
    for i in 0..3 {
        let d = s.rate_limit("rlb:a", &bucket, 1).await.unwrap();
        assert!(d.allowed, "burst {i}");
    }
    let d = s.rate_limit("rlb:a", &bucket, 1).await.unwrap();
    assert!(!d.allowed);
    assert!(d.retry_after > Duration::ZERO && d.retry_after <= Duration::from_millis(500));
    let deadline = Instant::now() + EXPIRY_WAIT;
    while !s.rate_limit("rlb:a", &bucket, 1).await.unwrap().allowed {
        assert!(Instant::now() < deadline, "the bucket never refilled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A value that is not rate-limit state is an error, not a fresh start.
    s.set("rlw:bad", b"not state", None).await.unwrap();
    assert!(s.rate_limit("rlw:bad", &hour, 1).await.is_err());
}

/// 200 concurrent `rate_limit` calls over two stores, 50 per hour → exactly 50.
async fn rate_limit_exact_across(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    for algorithm in [RateAlgorithm::SlidingWindow, RateAlgorithm::TokenBucket] {
        let r = rate(algorithm, 50, Duration::from_secs(3600), 50);
        let key = format!("exact:rate:{algorithm:?}");
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
            let st = if i % 2 == 0 { a.clone() } else { b.clone() };
            let key = key.clone();
            tasks.spawn(async move { st.rate_limit(&key, &r, 1).await });
        }
        let mut allowed = 0;
        while let Some(res) = tasks.join_next().await {
            allowed += usize::from(res.unwrap().unwrap().allowed);
        }
        assert_eq!(allowed, 50, "{algorithm:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_rate_limit() {
    let dir = data_dir();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    rate_limit_suite(&store).await;
    let (a, b) = two_embedded(&dir);
    rate_limit_exact_across(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_rate_limit() {
    let server = RedisServer::start();
    let store = redis_store(&server, "pc:rl:").await;
    rate_limit_suite(store.as_ref()).await;
    let (a, b) = two_redis(&server).await;
    rate_limit_exact_across(a, b).await;
}
