//! API key tests against real stores: SQLite (`EmbeddedStore`) in temp dirs and a real
//! `redis-server` on a free loopback port.

#[path = "../../portcullis-store/tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use portcullis_auth::apikey::{
    looks_like_api_key, ApiKeyError, ApiKeys, NewKey, Quota, KEY_PREFIX,
};
use portcullis_store::{EmbeddedStore, RedisOptions, RedisStore, Store, StoreError, WindowCount};
use sha2::{Digest, Sha256};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Wraps a store, counts calls, and can be switched to fail.
struct CountingStore {
    inner: Arc<dyn Store>,
    gets: AtomicUsize,
    calls: AtomicUsize,
    fail: AtomicBool,
}

impl CountingStore {
    fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            gets: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            fail: AtomicBool::new(false),
        })
    }

    fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn check(&self) -> portcullis_store::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("test: store down".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl Store for CountingStore {
    async fn get(&self, key: &str) -> portcullis_store::Result<Option<Vec<u8>>> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.get(key).await
    }
    async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> portcullis_store::Result<()> {
        self.check()?;
        self.inner.set(key, value, ttl).await
    }
    async fn set_nx(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> portcullis_store::Result<bool> {
        self.check()?;
        self.inner.set_nx(key, value, ttl).await
    }
    async fn delete(&self, key: &str) -> portcullis_store::Result<bool> {
        self.check()?;
        self.inner.delete(key).await
    }
    async fn take(&self, key: &str) -> portcullis_store::Result<Option<Vec<u8>>> {
        self.check()?;
        self.inner.take(key).await
    }
    async fn compare_and_set(
        &self,
        key: &str,
        expected: &[u8],
        new: &[u8],
        ttl: Option<Duration>,
    ) -> portcullis_store::Result<bool> {
        self.check()?;
        self.inner.compare_and_set(key, expected, new, ttl).await
    }
    async fn compare_and_delete(
        &self,
        key: &str,
        expected: &[u8],
    ) -> portcullis_store::Result<bool> {
        self.check()?;
        self.inner.compare_and_delete(key, expected).await
    }
    async fn scan_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> portcullis_store::Result<Vec<(String, Vec<u8>)>> {
        self.check()?;
        self.inner.scan_prefix(prefix, limit).await
    }
    async fn consume_window(
        &self,
        key: &str,
        cost: u64,
        limit: u64,
        window: Duration,
    ) -> portcullis_store::Result<WindowCount> {
        self.check()?;
        self.inner.consume_window(key, cost, limit, window).await
    }
    async fn ping(&self) -> portcullis_store::Result<()> {
        self.check()?;
        self.inner.ping().await
    }
    fn unprefixed(&self) -> std::sync::Arc<dyn Store> {
        self.inner.unprefixed()
    }
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
}

fn embedded() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    (dir, store)
}

fn new_key(principal: &str) -> NewKey {
    NewKey {
        principal: principal.to_string(),
        name: Some("ci".to_string()),
        scopes: vec!["read".to_string(), "write".to_string()],
        expires_at: None,
        quota: None,
    }
}

fn hex_sha256(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Same id, different (well-formed) secret.
fn tamper(raw: &str) -> String {
    let mut bytes = raw.as_bytes().to_vec();
    let last = bytes.len() - 5;
    bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap()
}

#[tokio::test]
async fn create_verify_revoke_lifecycle() {
    let (_dir, store) = embedded();
    // Long enough for b's entry to outlive the steps up to the revocation on a loaded
    // machine; its end is waited for below.
    let ttl = Duration::from_secs(2);
    let a = ApiKeys::new(store.clone(), ttl, 1000);
    let b = ApiKeys::new(store.clone(), ttl, 1000);

    let (raw, rec) = a.create(new_key("alice")).await.unwrap();
    assert!(raw.starts_with(KEY_PREFIX));
    assert_eq!(raw.len(), 4 + 12 + 1 + 43);
    assert!(looks_like_api_key(&raw));
    assert_eq!(&raw[4..16], rec.id);
    assert_eq!(rec.hash, hex_sha256(&raw));
    assert_eq!(rec.principal, "alice");
    assert_eq!(rec.name.as_deref(), Some("ci"));
    assert_eq!(rec.scopes, ["read", "write"]);
    assert!(rec.created_at.abs_diff(now()) <= 2);

    let v = a.verify(&raw).await.unwrap().expect("valid key");
    assert_eq!(v.id, rec.id);
    assert_eq!(v.principal, "alice");
    assert!(b.verify(&raw).await.unwrap().is_some()); // now cached on b

    let listed = a.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, rec.id);

    assert!(a.revoke(&raw).await.unwrap());
    // The revoking instance evicted its entry: invalid immediately.
    assert!(a.verify(&raw).await.unwrap().is_none());
    assert!(a.list().await.unwrap().is_empty());
    // Another instance may serve its cached entry until the cache TTL...
    assert!(b.verify(&raw).await.unwrap().is_some());
    // ...but not longer.
    let deadline = Instant::now() + ttl + Duration::from_secs(10);
    while b.verify(&raw).await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "b kept the revoked key past its TTL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Revoking again: nothing to delete.
    assert!(!a.revoke(&raw).await.unwrap());
}

#[tokio::test]
async fn revoke_by_id_and_forged_key() {
    let (_dir, store) = embedded();
    let keys = ApiKeys::new(store, Duration::from_secs(60), 1000);
    let (raw1, rec1) = keys.create(new_key("alice")).await.unwrap();
    let (raw2, rec2) = keys.create(new_key("bob")).await.unwrap();
    assert_ne!(rec1.id, rec2.id);
    assert!(keys.verify(&raw1).await.unwrap().is_some());
    assert!(keys.verify(&raw2).await.unwrap().is_some());

    // A forged key with the right id does not revoke anything.
    assert!(!keys.revoke(&tamper(&raw1)).await.unwrap());
    assert!(keys.verify(&raw1).await.unwrap().is_some());

    // Revoke by id evicts the cached positive entry too.
    assert!(keys.revoke(&rec1.id).await.unwrap());
    assert!(keys.verify(&raw1).await.unwrap().is_none());
    assert!(keys.verify(&raw2).await.unwrap().is_some());

    assert!(!keys.revoke("zzzzzzzzzzzz").await.unwrap());
    for bad in [
        "",
        "abc",
        "ABCDEFGHIJKL",
        "pcs_short",
        "apikey:zzzzzzzzzzzz",
    ] {
        assert!(
            matches!(keys.revoke(bad).await, Err(ApiKeyError::InvalidFormat)),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn raw_key_never_stored() {
    let (_dir, store) = embedded();
    let keys = ApiKeys::new(store.clone(), Duration::from_secs(60), 1000);
    let mut raws = Vec::new();
    for i in 0..5 {
        let mut nk = new_key(&format!("user{i}"));
        nk.quota = Some(Quota {
            limit: 10,
            window_secs: 60,
        });
        let (raw, rec) = keys.create(nk).await.unwrap();
        keys.consume_quota(&rec, 1).await.unwrap();
        raws.push(raw);
    }
    let all = store.scan_prefix("", 1_000_000).await.unwrap();
    assert!(all.len() >= 5);
    for raw in &raws {
        let secret = &raw[17..];
        for (k, v) in &all {
            let v = String::from_utf8_lossy(v);
            assert!(!k.contains(secret) && !v.contains(secret));
            assert!(!v.contains(raw.as_str()));
        }
        assert!(all
            .iter()
            .any(|(_, v)| String::from_utf8_lossy(v).contains(&hex_sha256(raw))));
    }
    // Debug output of records shows the hash, never the key.
    let listed = keys.list().await.unwrap();
    assert_eq!(listed.len(), 5);
    assert!(listed
        .windows(2)
        .all(|w| w[0].created_at <= w[1].created_at));
    for r in &listed {
        let dbg = format!("{r:?}");
        assert!(raws.iter().all(|raw| !dbg.contains(&raw[17..])));
    }
}

#[tokio::test]
async fn tampered_secret_is_rejected() {
    let (_dir, store) = embedded();
    let keys = ApiKeys::new(store, Duration::from_secs(60), 1000);
    let (raw, _) = keys.create(new_key("alice")).await.unwrap();
    let forged = tamper(&raw);
    assert!(looks_like_api_key(&forged));
    assert!(keys.verify(&forged).await.unwrap().is_none());
    // Negative entry for the forgery does not affect the real key, in either order.
    assert!(keys.verify(&raw).await.unwrap().is_some());
    assert!(keys.verify(&forged).await.unwrap().is_none());
    // Same secret under another id.
    let other_id = format!("{KEY_PREFIX}aaaaaaaaaaaa{}", &raw[16..]);
    assert!(keys.verify(&other_id).await.unwrap().is_none());
}

#[tokio::test]
async fn expired_keys_are_rejected() {
    let (_dir, store) = embedded();
    let keys = ApiKeys::new(store.clone(), Duration::from_secs(60), 1000);

    // Creating an already-expired key is refused.
    let mut nk = new_key("alice");
    nk.expires_at = Some(now().saturating_sub(10));
    assert!(matches!(
        keys.create(nk).await,
        Err(ApiKeyError::Invalid(_))
    ));

    // A key that expires while cached (cache TTL 60 s) stops verifying at expiry.
    let mut nk = new_key("alice");
    nk.expires_at = Some(now() + 3);
    let (raw, rec) = keys.create(nk).await.unwrap();
    assert!(rec.expires_at.is_some_and(|e| e > rec.created_at));
    assert!(keys.verify(&raw).await.unwrap().is_some());
    // Waited for: valid (from the cache) until expiry, then refused.
    let deadline = Instant::now() + Duration::from_secs(15);
    while keys.verify(&raw).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the key never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        now() >= rec.expires_at.unwrap(),
        "refused before its expiry"
    );
    let fresh = ApiKeys::new(store.clone(), Duration::from_secs(60), 1000);
    assert!(fresh.verify(&raw).await.unwrap().is_none());

    // A record whose expiry lies in the past (e.g. written by an older instance).
    let (raw2, mut rec2) = keys.create(new_key("bob")).await.unwrap();
    rec2.expires_at = Some(now() - 5);
    store
        .set(
            &format!("apikey:{}", rec2.id),
            &serde_json::to_vec(&rec2).unwrap(),
            None,
        )
        .await
        .unwrap();
    assert!(fresh.verify(&raw2).await.unwrap().is_none());
}

#[tokio::test]
async fn malformed_strings_never_reach_the_store() {
    let (_dir, inner) = embedded();
    let counting = CountingStore::new(inner);
    let keys = ApiKeys::new(counting.clone(), Duration::from_secs(60), 1000);
    let (raw, _) = keys.create(new_key("alice")).await.unwrap();
    let before = counting.calls();

    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlc2lnbmF0dXJlc2ln";
    let malformed = [
        String::new(),
        "pcs_".to_string(),
        jwt.to_string(),
        raw[..raw.len() - 1].to_string(),
        format!("{raw}A"),
        raw.replacen("pcs_", "pcx_", 1),
        raw.to_uppercase(),
        format!("{}={}", &raw[..16], &raw[17..]),
        format!("{}+", &raw[..raw.len() - 1]),
        format!("{}é", &raw[..raw.len() - 2]),
        format!(" {}", &raw[1..]),
    ];
    let start = Instant::now();
    for m in &malformed {
        assert!(!looks_like_api_key(m), "{m:?}");
        for _ in 0..100 {
            assert!(keys.verify(m).await.unwrap().is_none(), "{m:?}");
        }
    }
    assert_eq!(counting.calls(), before, "malformed keys hit the store");
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn cache_hits_avoid_the_store() {
    let (_dir, inner) = embedded();
    let counting = CountingStore::new(inner);
    let keys = ApiKeys::new(counting.clone(), Duration::from_secs(60), 1000);
    let (raw, _) = keys.create(new_key("alice")).await.unwrap();

    let g0 = counting.gets();
    for _ in 0..20 {
        assert!(keys.verify(&raw).await.unwrap().is_some());
    }
    assert_eq!(counting.gets(), g0 + 1, "positive entries are cached");

    // Negative entries: an unknown (well-formed) key and a forgery.
    let unknown = format!("{KEY_PREFIX}zzzzzzzzzzzz_{}", "A".repeat(43));
    let forged = tamper(&raw);
    for _ in 0..20 {
        assert!(keys.verify(&unknown).await.unwrap().is_none());
        assert!(keys.verify(&forged).await.unwrap().is_none());
    }
    assert_eq!(counting.gets(), g0 + 3, "negative entries are cached");

    // Without a cache every verify goes to the store.
    let uncached = ApiKeys::new(counting.clone(), Duration::ZERO, 1000);
    let g1 = counting.gets();
    for _ in 0..5 {
        assert!(uncached.verify(&raw).await.unwrap().is_some());
    }
    assert_eq!(counting.gets(), g1 + 5);
    assert_eq!(uncached.cached_entries(), 0);
}

#[tokio::test]
async fn store_errors_are_errors_and_not_cached() {
    let (_dir, inner) = embedded();
    let counting = CountingStore::new(inner);
    let keys = ApiKeys::new(counting.clone(), Duration::from_secs(60), 1000);
    let (raw, _) = keys.create(new_key("alice")).await.unwrap();

    counting.fail.store(true, Ordering::SeqCst);
    let err = keys.verify(&raw).await.unwrap_err();
    assert!(matches!(
        err,
        ApiKeyError::Store(StoreError::Unavailable(_))
    ));
    assert!(!err.to_string().contains(&raw[17..]));
    assert!(matches!(keys.list().await, Err(ApiKeyError::Store(_))));
    assert!(matches!(
        keys.revoke(&raw).await,
        Err(ApiKeyError::Store(_))
    ));

    counting.fail.store(false, Ordering::SeqCst);
    assert!(keys.verify(&raw).await.unwrap().is_some());
}

#[tokio::test]
async fn corrupt_records_are_reported_without_the_key() {
    let (_dir, store) = embedded();
    let keys = ApiKeys::new(store.clone(), Duration::from_secs(60), 1000);
    let (raw, rec) = keys.create(new_key("alice")).await.unwrap();
    let (_raw_ok, _) = keys.create(new_key("bob")).await.unwrap();
    store
        .set(&format!("apikey:{}", rec.id), b"{not json", None)
        .await
        .unwrap();
    let err = keys.verify(&raw).await.unwrap_err();
    assert!(matches!(err, ApiKeyError::Corrupt(_)), "{err:?}");
    assert!(!err.to_string().contains(&raw[17..]));
    // list skips the unreadable record; revoke by id deletes it.
    assert_eq!(keys.list().await.unwrap().len(), 1);
    assert!(keys.revoke(&rec.id).await.unwrap());
    assert!(keys.verify(&raw).await.unwrap().is_none());
}

#[tokio::test]
async fn cache_is_bounded() {
    let (_dir, inner) = embedded();
    let counting = CountingStore::new(inner);
    let keys = ApiKeys::new(counting.clone(), Duration::from_secs(60), 10);
    let mut raws = Vec::new();
    for i in 0..50 {
        raws.push(keys.create(new_key(&format!("u{i}"))).await.unwrap().0);
    }
    for raw in &raws {
        assert!(keys.verify(raw).await.unwrap().is_some());
    }
    for i in 0..200 {
        let unknown = format!("{KEY_PREFIX}{:0>12}_{}", i, "A".repeat(43));
        assert!(keys.verify(&unknown).await.unwrap().is_none());
    }
    assert!(keys.cached_entries() <= 10, "{}", keys.cached_entries());

    // At most 10 of the 50 keys can still be served from the cache.
    let g0 = counting.gets();
    for raw in &raws {
        assert!(keys.verify(raw).await.unwrap().is_some());
    }
    assert!(counting.gets() - g0 >= 40, "{}", counting.gets() - g0);
    assert!(keys.cached_entries() <= 10);
}

#[tokio::test]
async fn quota_admits_exactly_the_limit() {
    let (_dir, store) = embedded();
    let keys = ApiKeys::new(store, Duration::from_secs(60), 1000);
    let mut nk = new_key("alice");
    nk.quota = Some(Quota {
        limit: 5,
        window_secs: 60,
    });
    let (raw, _) = keys.create(nk).await.unwrap();
    let rec = keys.verify(&raw).await.unwrap().unwrap();
    assert_eq!(
        rec.quota,
        Some(Quota {
            limit: 5,
            window_secs: 60
        })
    );

    let mut allowed = 0;
    for _ in 0..8 {
        let w = keys.consume_quota(&rec, 1).await.unwrap();
        assert_eq!(w.limit, 5);
        assert!(w.reset_after > Duration::ZERO);
        assert!(w.reset_after <= Duration::from_secs(60));
        if w.allowed {
            allowed += 1;
            assert_eq!(w.count, allowed);
        } else {
            assert_eq!(w.count, 5);
        }
    }
    assert_eq!(allowed, 5);

    // Separate keys have separate counters.
    let mut nk = new_key("bob");
    nk.quota = Some(Quota {
        limit: 5,
        window_secs: 60,
    });
    let (_, rec_b) = keys.create(nk).await.unwrap();
    assert!(keys.consume_quota(&rec_b, 5).await.unwrap().allowed);
    assert!(!keys.consume_quota(&rec_b, 1).await.unwrap().allowed);

    // No quota: always allowed.
    let (_, free) = keys.create(new_key("carol")).await.unwrap();
    for _ in 0..100 {
        assert!(keys.consume_quota(&free, 1).await.unwrap().allowed);
    }

    // Invalid quotas are refused at creation.
    for q in [
        Quota {
            limit: 0,
            window_secs: 60,
        },
        Quota {
            limit: 1,
            window_secs: 0,
        },
    ] {
        let mut nk = new_key("dave");
        nk.quota = Some(q);
        assert!(matches!(
            keys.create(nk).await,
            Err(ApiKeyError::Invalid(_))
        ));
    }
    assert!(matches!(
        keys.create(new_key("  ")).await,
        Err(ApiKeyError::Invalid(_))
    ));
}

fn redis_opts(url: String) -> RedisOptions {
    RedisOptions {
        url,
        key_prefix: "pcstest:".to_string(),
        connect_timeout: Duration::from_secs(2),
        command_timeout: Duration::from_secs(2),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_redis_share_keys_and_quota() {
    let server = common::RedisServer::start();
    let s1: Arc<dyn Store> = Arc::new(RedisStore::connect(redis_opts(server.url())).await.unwrap());
    let s2: Arc<dyn Store> = Arc::new(RedisStore::connect(redis_opts(server.url())).await.unwrap());
    let a = ApiKeys::new(s1, Duration::from_millis(300), 1000);
    let b = ApiKeys::new(s2, Duration::from_millis(300), 1000);

    let mut nk = new_key("alice");
    nk.quota = Some(Quota {
        limit: 20,
        window_secs: 60,
    });
    let (raw, _) = a.create(nk).await.unwrap();
    let rec_a = a.verify(&raw).await.unwrap().expect("valid on a");
    let rec_b = b.verify(&raw).await.unwrap().expect("valid on b");
    assert_eq!(b.list().await.unwrap().len(), 1);

    let mut tasks = Vec::new();
    for i in 0..50 {
        let (keys, rec) = if i % 2 == 0 {
            (a.clone(), rec_a.clone())
        } else {
            (b.clone(), rec_b.clone())
        };
        tasks.push(tokio::spawn(async move {
            keys.consume_quota(&rec, 1).await.unwrap()
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        let w: WindowCount = t.await.unwrap();
        assert!(w.reset_after > Duration::ZERO);
        if w.allowed {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 20);

    // Revocation on a reaches b once b's cache entry (300 ms) expires.
    assert!(a.revoke(&raw).await.unwrap());
    assert!(a.verify(&raw).await.unwrap().is_none());
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.verify(&raw).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "b kept the revoked key");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(b.list().await.unwrap().is_empty());

    // Nothing stored in Redis contains the key.
    let all = a_store_values(&server).await;
    assert!(all.iter().all(|v| !v.contains(&raw[17..])));
}

async fn a_store_values(server: &common::RedisServer) -> Vec<String> {
    let s = RedisStore::connect(redis_opts(server.url())).await.unwrap();
    s.scan_prefix("", 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(&v)))
        .collect()
}
