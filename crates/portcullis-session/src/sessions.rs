//! Sessions and login states in the shared store. Keys hold the SHA-256 of the id
//! (never the id); values are sealed JSON bound to their key.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portcullis_store::{Store, StoreError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ids::{self, RandomError};
use crate::record::{LoginState, SessionRecord};
use crate::seal::Sealer;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The store could not be reached: the caller answers 503, never 401.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Random(#[from] RandomError),
    #[error("session record could not be sealed")]
    Seal,
    /// The record is past its absolute end: it is not stored.
    #[error("the session has already ended")]
    Ended,
}

/// A loaded session and the exact stored bytes (for compare-and-set).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub record: SessionRecord,
    pub stored: Vec<u8>,
}

pub struct Sessions {
    store: Arc<dyn Store>,
    sealer: Sealer,
    idle_ttl: Duration,
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Sessions {
    pub fn new(store: Arc<dyn Store>, sealer: Sealer, idle_ttl: Duration) -> Self {
        Sessions {
            store,
            sealer,
            idle_ttl,
        }
    }

    fn session_key(sid: &str) -> String {
        format!("session:{}", ids::hashed(sid))
    }

    fn state_key(state: &str) -> String {
        format!("oidc:state:{}", ids::hashed(state))
    }

    /// The store TTL of a session: its idle time, cut at its absolute end.
    fn ttl(&self, record: &SessionRecord) -> Option<Duration> {
        let left = record.expires_at.checked_sub(now_secs())?;
        (left > 0).then(|| self.idle_ttl.min(Duration::from_secs(left)))
    }

    fn seal<T: Serialize>(&self, key: &str, value: &T) -> Result<Vec<u8>, SessionError> {
        let json = serde_json::to_vec(value).map_err(|_| SessionError::Seal)?;
        self.sealer
            .seal(key.as_bytes(), &json)
            .map_err(|_| SessionError::Seal)
    }

    /// `None` for a value that does not open or parse (another key, tampering).
    fn open<T: DeserializeOwned>(&self, key: &str, stored: &[u8]) -> Option<T> {
        let json = self.sealer.open(key.as_bytes(), stored).ok()?;
        serde_json::from_slice(&json).ok()
    }

    /// Stores a new session under a fresh id and returns the id.
    pub async fn create(&self, record: &SessionRecord) -> Result<String, SessionError> {
        let Some(ttl) = self.ttl(record) else {
            return Err(SessionError::Ended);
        };
        let sid = ids::session_id()?;
        let key = Self::session_key(&sid);
        let sealed = self.seal(&key, record)?;
        self.store.set(&key, &sealed, Some(ttl)).await?;
        Ok(sid)
    }

    /// The session of `sid`: `None` when unknown, expired, past its absolute end or
    /// unreadable (sealed with a key this instance does not have).
    pub async fn load(&self, sid: &str) -> Result<Option<Loaded>, SessionError> {
        if !ids::well_formed(sid, ids::SESSION_ID_BYTES) {
            return Ok(None);
        }
        let key = Self::session_key(sid);
        let Some(stored) = self.store.get(&key).await? else {
            return Ok(None);
        };
        let Some(record) = self.open::<SessionRecord>(&key, &stored) else {
            return Ok(None);
        };
        if record.expires_at <= now_secs() {
            return Ok(None);
        }
        Ok(Some(Loaded { record, stored }))
    }

    /// Extends a live session's idle time; false when it is gone.
    pub async fn touch(&self, sid: &str, record: &SessionRecord) -> Result<bool, SessionError> {
        let Some(ttl) = self.ttl(record) else {
            return Ok(false);
        };
        Ok(self.store.touch(&Self::session_key(sid), ttl).await?)
    }

    /// Replaces a session only if it still holds `previous` (a refresh racing a
    /// logout never brings the session back); true if replaced.
    pub async fn replace(
        &self,
        sid: &str,
        previous: &[u8],
        record: &SessionRecord,
    ) -> Result<bool, SessionError> {
        let Some(ttl) = self.ttl(record) else {
            return Ok(false);
        };
        let key = Self::session_key(sid);
        let sealed = self.seal(&key, record)?;
        Ok(self
            .store
            .compare_and_set(&key, previous, &sealed, Some(ttl))
            .await?)
    }

    /// Ends a session; returns it (for token revocation) if it was live and readable.
    pub async fn delete(&self, sid: &str) -> Result<Option<SessionRecord>, SessionError> {
        if !ids::well_formed(sid, ids::SESSION_ID_BYTES) {
            return Ok(None);
        }
        let key = Self::session_key(sid);
        Ok(self
            .store
            .take(&key)
            .await?
            .and_then(|stored| self.open(&key, &stored)))
    }

    fn lock_key(sid: &str) -> String {
        format!("session:lock:{}", ids::hashed(sid))
    }

    /// Takes the session's refresh lock for `ttl` (one refresh at a time, across
    /// instances); true if this caller holds it now.
    pub async fn try_lock(
        &self,
        sid: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, SessionError> {
        Ok(self
            .store
            .set_nx(&Self::lock_key(sid), token.as_bytes(), Some(ttl))
            .await?)
    }

    /// Releases the refresh lock if this caller still holds it.
    pub async fn unlock(&self, sid: &str, token: &str) -> Result<(), SessionError> {
        self.store
            .compare_and_delete(&Self::lock_key(sid), token.as_bytes())
            .await?;
        Ok(())
    }

    /// Keeps a login's state for `ttl` under `state`.
    pub async fn put_state(
        &self,
        state: &str,
        login: &LoginState,
        ttl: Duration,
    ) -> Result<(), SessionError> {
        let key = Self::state_key(state);
        let sealed = self.seal(&key, login)?;
        self.store.set(&key, &sealed, Some(ttl)).await?;
        Ok(())
    }

    /// Takes a login's state: at most one caller ever gets it.
    pub async fn take_state(&self, state: &str) -> Result<Option<LoginState>, SessionError> {
        if !ids::well_formed(state, ids::STATE_BYTES) {
            return Ok(None);
        }
        let key = Self::state_key(state);
        Ok(self
            .store
            .take(&key)
            .await?
            .and_then(|stored| self.open(&key, &stored)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_store::EmbeddedStore;

    const K1: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    const K2: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";

    fn record(lifetime: u64) -> SessionRecord {
        let now = now_secs();
        SessionRecord {
            sub: "alice".into(),
            name: Some("Alice".into()),
            email: None,
            email_verified: false,
            picture: None,
            scope: Some("openid".into()),
            created_at: now,
            expires_at: now + lifetime,
            access_token: "access-token-value".into(),
            access_expires_at: Some(now + 300),
            access_issued_at: now,
            refresh_token: Some("refresh-token-value".into()),
            id_token: None,
        }
    }

    fn sessions(store: Arc<dyn Store>, key: &str) -> Sessions {
        Sessions::new(
            store,
            Sealer::from_base64(key, &[]).unwrap(),
            Duration::from_secs(3600),
        )
    }

    fn embedded(dir: &tempfile::TempDir) -> Arc<dyn Store> {
        Arc::new(EmbeddedStore::open(dir.path()).unwrap())
    }

    #[tokio::test]
    async fn create_load_replace_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = embedded(&dir);
        let s = sessions(store.clone(), K1);
        let r = record(3600);
        let sid = s.create(&r).await.unwrap();
        let loaded = s.load(&sid).await.unwrap().unwrap();
        assert_eq!(loaded.record, r);
        // Nothing readable in the store: neither the id nor the tokens.
        let dump = store.scan_prefix("", 100).await.unwrap();
        assert_eq!(dump.len(), 1);
        assert!(!dump[0].0.contains(&sid));
        let raw = String::from_utf8_lossy(&dump[0].1).into_owned();
        assert!(!raw.contains("refresh-token-value") && !raw.contains("alice"));
        // Compare-and-set: only from the stored bytes.
        let mut newer = r.clone();
        newer.access_token = "second".into();
        assert!(s.replace(&sid, &loaded.stored, &newer).await.unwrap());
        assert!(!s.replace(&sid, &loaded.stored, &r).await.unwrap());
        assert_eq!(s.load(&sid).await.unwrap().unwrap().record, newer);
        assert!(s.touch(&sid, &newer).await.unwrap());
        // Delete returns the record once; a deleted session is not brought back.
        assert_eq!(s.delete(&sid).await.unwrap(), Some(newer.clone()));
        assert_eq!(s.delete(&sid).await.unwrap(), None);
        assert!(s.load(&sid).await.unwrap().is_none());
        assert!(!s.replace(&sid, &loaded.stored, &newer).await.unwrap());
        assert!(!s.touch(&sid, &newer).await.unwrap());
    }

    #[tokio::test]
    async fn unknown_forged_and_foreign_sessions_read_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = embedded(&dir);
        let a = sessions(store.clone(), K1);
        let b = sessions(store, K2);
        let sid = a.create(&record(3600)).await.unwrap();
        assert!(
            b.load(&sid).await.unwrap().is_none(),
            "another key opened it"
        );
        assert!(a.load(&ids::session_id().unwrap()).await.unwrap().is_none());
        for junk in ["", "x", "../../etc/passwd", &format!("{sid}x")] {
            assert!(a.load(junk).await.unwrap().is_none(), "{junk}");
        }
        // Ids are new every time.
        assert_ne!(sid, a.create(&record(3600)).await.unwrap());
    }

    #[tokio::test]
    async fn past_its_absolute_end_a_session_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let s = sessions(embedded(&dir), K1);
        let mut r = record(3600);
        let sid = s.create(&r).await.unwrap();
        let loaded = s.load(&sid).await.unwrap().unwrap();
        r.expires_at = now_secs() - 1;
        // A record that has reached its end is neither stored nor extended.
        assert!(!s.replace(&sid, &loaded.stored, &r).await.unwrap());
        assert!(!s.touch(&sid, &r).await.unwrap());
        assert!(matches!(s.create(&r).await, Err(SessionError::Ended)));
    }

    #[tokio::test]
    async fn the_refresh_lock_has_one_holder() {
        let dir = tempfile::tempdir().unwrap();
        let s = sessions(embedded(&dir), K1);
        let sid = ids::session_id().unwrap();
        let ttl = Duration::from_secs(60);
        assert!(s.try_lock(&sid, "a", ttl).await.unwrap());
        assert!(!s.try_lock(&sid, "b", ttl).await.unwrap());
        s.unlock(&sid, "b").await.unwrap(); // not the holder: nothing happens
        assert!(!s.try_lock(&sid, "c", ttl).await.unwrap());
        s.unlock(&sid, "a").await.unwrap();
        assert!(s.try_lock(&sid, "c", ttl).await.unwrap());
    }

    #[tokio::test]
    async fn login_state_is_single_use() {
        let dir = tempfile::tempdir().unwrap();
        let s = sessions(embedded(&dir), K1);
        let state = ids::state().unwrap();
        let login = LoginState {
            verifier: "v".into(),
            nonce: "n".into(),
            next: "/app".into(),
            return_to: "https://app.example.test".into(),
            binding: "b".into(),
        };
        s.put_state(&state, &login, Duration::from_secs(60))
            .await
            .unwrap();
        let (x, y) = tokio::join!(s.take_state(&state), s.take_state(&state));
        let got: Vec<_> = [x.unwrap(), y.unwrap()].into_iter().flatten().collect();
        assert_eq!(got, vec![login]);
        assert!(s.take_state(&state).await.unwrap().is_none());
        assert!(s.take_state("not-a-state").await.unwrap().is_none());
    }
}
