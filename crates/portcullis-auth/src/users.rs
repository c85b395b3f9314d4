//! Local user accounts for the gateway's own login endpoint.
//!
//! [`Users`] keeps one [`UserRecord`] per user in a [`Store`] under the key
//! `user:<lower-cased username>`, with the password hashed with Argon2id
//! (crate `argon2`, its default parameters, a random 16-byte salt per hash).
//!
//! Credential records of the Metacogna gateway (`{ username, salt, hash, role }`,
//! "salted SHA-256") can be imported with [`Users::import_legacy`]; such a record is
//! upgraded to Argon2id the first time its password verifies.
//!
//! # Usernames
//!
//! 1 to 64 characters from `[A-Za-z0-9._@-]`. They are **case-insensitive**: the store
//! key uses the lower-cased name, so `Alice` and `alice` are the same user, while the
//! record keeps the name as it was first given (its display name).
//!
//! # Timing
//!
//! [`Users::verify`] does the same Argon2 work whether the user is unknown, the
//! username is malformed, the record is a legacy one or the password is wrong, and
//! answers all of them with `Ok(None)`, so a caller cannot tell them apart. All Argon2
//! work runs on Tokio's blocking pool, never on the async executor, with at most
//! as many jobs at once as there are CPUs (at least 2), which bounds the memory that a
//! burst of logins can take (~19 MiB per job with the default parameters).

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use argon2::{Argon2, PasswordHasher as _, PasswordVerifier as _};
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use portcullis_store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};
use tokio::sync::Semaphore;

/// Prefix of the store keys of user records.
pub const KEY_PREFIX: &str = "user:";
/// Longest username accepted (characters).
pub const MAX_USERNAME_LEN: usize = 64;
/// Shortest password accepted by [`Users::add`] and [`Users::set_password`]
/// (characters, i.e. Unicode scalar values). Imports are not checked.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Most records [`Users::list`] returns.
pub const MAX_LIST: usize = 100_000;
/// How often [`Users::set_password`] re-reads a record that changed under it before
/// giving up with [`UserError::Conflict`].
const MAX_WRITE_ATTEMPTS: usize = 8;

/// A stored user account.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserRecord {
    /// Display name, as first given (lookups are case-insensitive).
    pub username: String,
    pub role: String,
    pub password: PasswordHash,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// Seconds since the Unix epoch; changes with the password.
    pub updated_at: u64,
}

/// How a password is stored. Serialised as `{"scheme": "argon2id", "phc": …}` or
/// `{"scheme": "legacy_sha256", "salt": …, "hash": …}`.
///
/// `Debug` shows the scheme only, never salts or hashes.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "scheme", rename_all = "snake_case")]
pub enum PasswordHash {
    /// An Argon2id PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`).
    Argon2id { phc: String },
    /// An imported Metacogna record; see [`legacy_sha256_matches`].
    LegacySha256 { salt: String, hash: String },
}

impl PasswordHash {
    /// True for [`PasswordHash::LegacySha256`].
    pub fn is_legacy(&self) -> bool {
        matches!(self, PasswordHash::LegacySha256 { .. })
    }
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasswordHash::Argon2id { .. } => f.write_str("Argon2id([redacted])"),
            PasswordHash::LegacySha256 { .. } => f.write_str("LegacySha256([redacted])"),
        }
    }
}

/// A credential record of the Metacogna gateway (`auth/admins/{username}.json`):
/// `{ "username": …, "salt": …, "hash": …, "role": … }`. Unknown fields are ignored.
#[derive(Clone, Serialize, Deserialize)]
pub struct LegacyRecord {
    pub username: String,
    pub salt: String,
    pub hash: String,
    pub role: String,
}

impl fmt::Debug for LegacyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LegacyRecord")
            .field("username", &self.username)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Errors of [`Users`]. Messages never contain passwords or hashes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("user store: {0}")]
    Store(#[from] StoreError),
    #[error("user already exists")]
    Exists,
    #[error("user not found")]
    NotFound,
    #[error("invalid username (1-64 characters from A-Z a-z 0-9 . _ @ -)")]
    InvalidUsername,
    #[error("password is too short (minimum {MIN_PASSWORD_LEN} characters)")]
    WeakPassword,
    #[error("corrupt user data: {0}")]
    Corrupt(String),
    #[error("password hashing failed: {0}")]
    Hash(String),
    /// The record kept changing under a read-modify-write; nothing was written.
    #[error("user record changed concurrently; try again")]
    Conflict,
}

/// Whether `name` is a valid username (see the module docs).
pub fn valid_username(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_USERNAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
}

/// Store key of `name` (validated, lower-cased).
fn user_key(name: &str) -> Result<String, UserError> {
    if !valid_username(name) {
        return Err(UserError::InvalidUsername);
    }
    Ok(format!("{KEY_PREFIX}{}", name.to_ascii_lowercase()))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------
// Hashing primitives (blocking; call them through `Users::blocking`).

fn argon2_hash(password: &str) -> Result<String, UserError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| UserError::Hash(e.to_string()))
}

/// `Ok(true)` on a match, `Ok(false)` on a mismatch, `Err` if `phc` is unusable.
fn argon2_verify(password: &str, phc: &str) -> Result<bool, UserError> {
    let parsed = argon2::PasswordHash::new(phc)
        .map_err(|e| UserError::Corrupt(format!("argon2 hash: {e}")))?;
    if parsed.algorithm != argon2::ARGON2ID_IDENT {
        return Err(UserError::Corrupt(format!(
            "unexpected password hash algorithm `{}`",
            parsed.algorithm
        )));
    }
    match Argon2::default().verify_password(password.as_bytes(), &parsed) {
        Ok(()) => Ok(true),
        Err(argon2::password_hash::Error::PasswordInvalid) => Ok(false),
        Err(e) => Err(UserError::Corrupt(format!("argon2 hash: {e}"))),
    }
}

/// A fixed Argon2id hash (default parameters, fixed salt) of a password nobody has,
/// computed once per process with the same parameters as real hashes. Unknown users
/// are verified against it so that they cost the same as a wrong password.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        match Argon2::default().hash_password_with_salt(
            b"portcullis: no user has this password",
            b"portcullis-dummy-salt",
        ) {
            Ok(h) => h.to_string(),
            Err(e) => {
                tracing::error!(error = %e, "users: cannot compute the dummy password hash");
                String::new()
            }
        }
    })
}

/// Burns the same Argon2 work as checking a real password.
fn dummy_verify(password: &str) {
    let dummy = dummy_hash();
    if dummy.is_empty() {
        // No dummy hash: still spend one Argon2 computation, so unknown users are never
        // answered faster than wrong passwords.
        let _ = Argon2::default()
            .hash_password_with_salt(password.as_bytes(), b"portcullis-dummy-salt");
        return;
    }
    let _ = argon2_verify(password, dummy);
}

/// Standard base64, padding optional.
const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes a stored legacy digest: 64 hex digits (either case) or standard base64 of
/// the 32-byte digest.
fn decode_legacy_digest(hash: &str) -> Option<[u8; 32]> {
    let hash = hash.trim();
    let mut out = [0u8; 32];
    if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        for (i, pair) in hash.as_bytes().chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            *out.get_mut(i)? = u8::try_from(hi * 16 + lo).ok()?;
        }
        return Some(out);
    }
    let bytes = BASE64_LENIENT.decode(hash).ok()?;
    out = bytes.try_into().ok()?;
    Some(out)
}

/// Checks a password against a Metacogna "salted SHA-256" record.
///
/// Assumption: the Metacogna documentation only says "SHA-256 credential hashing"
/// with a `salt` and a `hash` field, not how they are combined. We take the salt as
/// its UTF-8 text (not hex-decoded) and accept **both** `SHA-256(salt ‖ password)` and
/// `SHA-256(password ‖ salt)`; the stored digest may be lower- or upper-case hex or
/// standard base64. Both candidates are always computed and compared in constant time.
/// Returns `None` if the stored digest cannot be decoded.
pub fn legacy_sha256_matches(salt: &str, hash: &str, password: &str) -> Option<bool> {
    let expected = decode_legacy_digest(hash)?;
    let salt_first: [u8; 32] = Sha256::new()
        .chain_update(salt.as_bytes())
        .chain_update(password.as_bytes())
        .finalize()
        .into();
    let salt_last: [u8; 32] = Sha256::new()
        .chain_update(password.as_bytes())
        .chain_update(salt.as_bytes())
        .finalize()
        .into();
    let ok: Choice = salt_first.ct_eq(&expected) | salt_last.ct_eq(&expected);
    Some(bool::from(ok))
}

fn check_password_strength(password: &str) -> Result<(), UserError> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(UserError::WeakPassword);
    }
    Ok(())
}

fn decode_record(key: &str, bytes: &[u8]) -> Result<UserRecord, UserError> {
    serde_json::from_slice(bytes).map_err(|e| UserError::Corrupt(format!("record {key}: {e}")))
}

fn encode_record(record: &UserRecord) -> Result<Vec<u8>, UserError> {
    serde_json::to_vec(record).map_err(|e| UserError::Corrupt(format!("encode record: {e}")))
}

// ---------------------------------------------------------------------------
// Users

/// User accounts in a [`Store`]. Cheap to clone.
#[derive(Clone)]
pub struct Users {
    store: Arc<dyn Store>,
    /// Bounds concurrent Argon2 jobs (each needs ~19 MiB and a blocking thread).
    hash_permits: Arc<Semaphore>,
}

impl fmt::Debug for Users {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Users")
            .field("store", &self.store.backend_name())
            .finish()
    }
}

impl Users {
    /// Users in `store`. At most [`std::thread::available_parallelism`] (at least 2)
    /// Argon2 jobs run at once; further logins wait for a slot.
    pub fn new(store: Arc<dyn Store>) -> Self {
        // Computed now rather than at the first unknown-user login (which would take
        // twice as long as every other failed login).
        let _ = dummy_hash();
        let slots = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        Users {
            store,
            hash_permits: Arc::new(Semaphore::new(slots)),
        }
    }

    /// Runs `f` (Argon2 work) on the blocking pool once a hashing slot is free. The
    /// slot stays taken until `f` ends, even if the caller's future is dropped.
    async fn blocking<T, F>(&self, f: F) -> Result<T, UserError>
    where
        F: FnOnce() -> Result<T, UserError> + Send + 'static,
        T: Send + 'static,
    {
        let permit = self
            .hash_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| UserError::Hash("hashing slots closed".to_owned()))?;
        tokio::task::spawn_blocking(move || {
            let result = f();
            drop(permit);
            result
        })
        .await
        .map_err(|e| UserError::Hash(format!("hashing task failed: {e}")))?
    }

    async fn load(&self, key: &str) -> Result<Option<UserRecord>, UserError> {
        Ok(self.load_raw(key).await?.map(|(_, record)| record))
    }

    /// The record under `key` and its exact stored bytes (the `expected` value of a
    /// later `compare_and_set`).
    async fn load_raw(&self, key: &str) -> Result<Option<(Vec<u8>, UserRecord)>, UserError> {
        match self.store.get(key).await? {
            Some(bytes) => {
                let record = decode_record(key, &bytes)?;
                Ok(Some((bytes, record)))
            }
            None => Ok(None),
        }
    }

    /// Creates a user with an Argon2id password hash. [`UserError::Exists`] if a user
    /// with that name (in any case) exists; the check and the write are one atomic
    /// `set_nx`.
    pub async fn add(&self, username: &str, password: &str, role: &str) -> Result<(), UserError> {
        let key = user_key(username)?;
        check_password_strength(password)?;
        if self.store.get(&key).await?.is_some() {
            // Cheap early answer; `set_nx` below is what makes it exact.
            return Err(UserError::Exists);
        }
        let pw = password.to_owned();
        let phc = self.blocking(move || argon2_hash(&pw)).await?;
        let now = now_secs();
        let record = UserRecord {
            username: username.to_owned(),
            role: role.to_owned(),
            password: PasswordHash::Argon2id { phc },
            created_at: now,
            updated_at: now,
        };
        if self
            .store
            .set_nx(&key, &encode_record(&record)?, None)
            .await?
        {
            Ok(())
        } else {
            Err(UserError::Exists)
        }
    }

    /// Replaces the password of an existing user (Argon2id); [`UserError::NotFound`]
    /// if there is none.
    ///
    /// The write is a `compare_and_set` against the exact record read, so it never
    /// brings back a user removed meanwhile ([`UserError::NotFound`]). If the record
    /// changed otherwise (another password change, a legacy upgrade at login), the new
    /// password is applied to the record as it now is; after a few such rounds in a
    /// row it gives up with [`UserError::Conflict`].
    pub async fn set_password(&self, username: &str, password: &str) -> Result<(), UserError> {
        let key = user_key(username)?;
        check_password_strength(password)?;
        let Some(read) = self.load_raw(&key).await? else {
            return Err(UserError::NotFound);
        };
        let pw = password.to_owned();
        let phc = self.blocking(move || argon2_hash(&pw)).await?;
        self.write_password(&key, read, phc).await
    }

    /// Second half of [`Users::set_password`]: stores `phc` into the record `read`
    /// (bytes as stored, decoded record) with `compare_and_set`, re-reading it while
    /// it changes under us; a missing record is [`UserError::NotFound`].
    async fn write_password(
        &self,
        key: &str,
        mut read: (Vec<u8>, UserRecord),
        phc: String,
    ) -> Result<(), UserError> {
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let (bytes, mut record) = read;
            record.password = PasswordHash::Argon2id { phc: phc.clone() };
            record.updated_at = now_secs();
            let new = encode_record(&record)?;
            if self.store.compare_and_set(key, &bytes, &new, None).await? {
                return Ok(());
            }
            read = self.load_raw(key).await?.ok_or(UserError::NotFound)?;
        }
        Err(UserError::Conflict)
    }

    /// Deletes a user; true if it existed.
    pub async fn remove(&self, username: &str) -> Result<bool, UserError> {
        let key = user_key(username)?;
        Ok(self.store.delete(&key).await?)
    }

    /// The record of `username` (case-insensitive), if any.
    pub async fn get(&self, username: &str) -> Result<Option<UserRecord>, UserError> {
        let key = user_key(username)?;
        self.load(&key).await
    }

    /// All users, ordered by lower-cased name (at most [`MAX_LIST`]).
    pub async fn list(&self) -> Result<Vec<UserRecord>, UserError> {
        self.store
            .scan_prefix(KEY_PREFIX, MAX_LIST)
            .await?
            .iter()
            .map(|(key, bytes)| decode_record(key, bytes))
            .collect()
    }

    /// Imports Metacogna credential records as [`PasswordHash::LegacySha256`] (no
    /// password policy applies). The whole batch is validated first — usernames,
    /// decodable digests, no name twice (case-insensitive) — and nothing is written if
    /// any record is invalid ([`UserError::InvalidUsername`] or
    /// [`UserError::Corrupt`]). Existing users are replaced if `overwrite`, otherwise
    /// left alone. Returns the number of records written.
    pub async fn import_legacy(
        &self,
        records: Vec<LegacyRecord>,
        overwrite: bool,
    ) -> Result<usize, UserError> {
        let mut seen = std::collections::HashSet::new();
        let mut prepared = Vec::with_capacity(records.len());
        for r in records {
            let key = user_key(&r.username)?;
            if !seen.insert(key.clone()) {
                return Err(UserError::Corrupt(format!(
                    "username `{}` appears more than once in the import",
                    r.username
                )));
            }
            if decode_legacy_digest(&r.hash).is_none() {
                return Err(UserError::Corrupt(format!(
                    "user `{}`: hash is neither 64 hex digits nor base64 of a SHA-256 digest",
                    r.username
                )));
            }
            prepared.push((key, r));
        }
        let now = now_secs();
        let mut written = 0;
        for (key, r) in prepared {
            let record = UserRecord {
                username: r.username,
                role: r.role,
                password: PasswordHash::LegacySha256 {
                    salt: r.salt,
                    hash: r.hash,
                },
                created_at: now,
                updated_at: now,
            };
            let bytes = encode_record(&record)?;
            if overwrite {
                self.store.set(&key, &bytes, None).await?;
                written += 1;
            } else if self.store.set_nx(&key, &bytes, None).await? {
                written += 1;
            }
        }
        Ok(written)
    }

    /// Checks a password. Constant-time failure path: an unknown user costs the same
    /// argon2 work as a wrong password (verify against a fixed dummy argon2id hash),
    /// and the caller cannot tell them apart: both, and a malformed username, give
    /// `Ok(None)`. A legacy record that does not match also does the dummy argon2
    /// work. Errors are only store failures and corrupt stored hashes.
    ///
    /// A legacy record that verifies is upgraded to argon2id in the store before
    /// returning (the returned record is the upgraded one). The upgrade is a
    /// `compare_and_set` against the exact bytes read, so it is skipped if the record
    /// changed or was removed in the meantime (a concurrent `set_password` or `remove`
    /// is never undone); the login then succeeds with the record as read. If writing
    /// fails, a warning is logged and the login still succeeds with the legacy record,
    /// to be upgraded next time.
    pub async fn verify(
        &self,
        username: &str,
        password: &str,
    ) -> Result<Option<UserRecord>, UserError> {
        let pw = password.to_owned();
        let found = match user_key(username) {
            Ok(key) => self.load_raw(&key).await?.map(|read| (key, read)),
            Err(_) => None,
        };
        let Some((key, (read, record))) = found else {
            self.blocking(move || {
                dummy_verify(&pw);
                Ok(())
            })
            .await?;
            return Ok(None);
        };
        match &record.password {
            PasswordHash::Argon2id { phc } => {
                let phc = phc.clone();
                let ok = self.blocking(move || argon2_verify(&pw, &phc)).await?;
                Ok(ok.then_some(record))
            }
            PasswordHash::LegacySha256 { salt, hash } => {
                let (salt, hash) = (salt.clone(), hash.clone());
                // On a match the new hash is the Argon2 work; otherwise the dummy.
                let upgraded = self
                    .blocking(move || match legacy_sha256_matches(&salt, &hash, &pw) {
                        Some(true) => argon2_hash(&pw).map(Some),
                        Some(false) => {
                            dummy_verify(&pw);
                            Ok(None)
                        }
                        None => {
                            dummy_verify(&pw);
                            Err(UserError::Corrupt(
                                "legacy hash is neither hex nor base64 of a SHA-256 digest"
                                    .to_owned(),
                            ))
                        }
                    })
                    .await?;
                match upgraded {
                    Some(phc) => Ok(Some(self.upgrade(&key, &read, record, phc).await)),
                    None => Ok(None),
                }
            }
        }
    }

    /// Stores `record` with its password replaced by `phc`, only if the stored bytes
    /// are still exactly `read` (the bytes `record` was decoded from): one
    /// `compare_and_set`, so a record changed or removed meanwhile is left alone.
    /// Returns the upgraded record, or `record` if nothing was written.
    async fn upgrade(&self, key: &str, read: &[u8], record: UserRecord, phc: String) -> UserRecord {
        let mut new = record.clone();
        new.password = PasswordHash::Argon2id { phc };
        new.updated_at = now_secs();
        let result = async {
            let bytes = encode_record(&new)?;
            Ok::<_, UserError>(self.store.compare_and_set(key, read, &bytes, None).await?)
        }
        .await;
        match result {
            Ok(true) => new,
            Ok(false) => record,
            Err(e) => {
                tracing::warn!(error = %e, "users: could not upgrade a legacy password hash");
                record
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn usernames() {
        assert!(valid_username("a"));
        assert!(valid_username("Alice.B_c-d@example.org"));
        assert!(valid_username(&"x".repeat(64)));
        assert!(!valid_username(""));
        assert!(!valid_username(&"x".repeat(65)));
        assert!(!valid_username("a b"));
        assert!(!valid_username("a/b"));
        assert!(!valid_username("a:b"));
        assert!(!valid_username("ä"));
        assert_eq!(user_key("AlIcE").ok().as_deref(), Some("user:alice"));
    }

    #[test]
    fn legacy_digest_forms() {
        let d: [u8; 32] = Sha256::digest(b"saltpassword").into();
        let lower = hex(&d);
        let upper = lower.to_uppercase();
        let b64 = base64::engine::general_purpose::STANDARD.encode(d);
        for h in [&lower, &upper, &b64, &b64.trim_end_matches('=').to_owned()] {
            assert_eq!(legacy_sha256_matches("salt", h, "password"), Some(true));
            assert_eq!(legacy_sha256_matches("salt", h, "passwore"), Some(false));
        }
        let rev: [u8; 32] = Sha256::digest(b"passwordsalt").into();
        assert_eq!(
            legacy_sha256_matches("salt", &hex(&rev), "password"),
            Some(true)
        );
        assert_eq!(legacy_sha256_matches("salt", "zz", "password"), None);
        assert_eq!(
            legacy_sha256_matches("salt", &lower[..62], "password"),
            None
        );
    }

    async fn users_in_temp_store() -> (tempfile::TempDir, Users) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = portcullis_store::EmbeddedStore::open(dir.path()).expect("open store");
        (dir, Users::new(Arc::new(store)))
    }

    async fn import_legacy_user(users: &Users, name: &str, password: &str) {
        let digest: [u8; 32] = Sha256::digest(format!("salt{password}").as_bytes()).into();
        let record = LegacyRecord {
            username: name.to_owned(),
            salt: "salt".to_owned(),
            hash: hex(&digest),
            role: "user".to_owned(),
        };
        assert_eq!(users.import_legacy(vec![record], false).await, Ok(1));
    }

    async fn logs_in(users: &Users, name: &str, password: &str) -> bool {
        users
            .verify(name, password)
            .await
            .expect("verify")
            .is_some()
    }

    /// The interleaving `verify` (legacy record read) → `set_password` → upgrade write:
    /// the upgrade must not put the old password back.
    #[tokio::test]
    async fn legacy_upgrade_never_undoes_a_password_change() {
        let (_dir, users) = users_in_temp_store().await;
        import_legacy_user(&users, "Ivy", "old-password").await;
        let key = user_key("ivy").expect("key");
        // verify, first half: the legacy record is read and the password matches.
        let (read, record) = users.load_raw(&key).await.expect("load").expect("user");
        let PasswordHash::LegacySha256 { salt, hash } = &record.password else {
            panic!("not a legacy record");
        };
        assert_eq!(
            legacy_sha256_matches(salt, hash, "old-password"),
            Some(true)
        );
        let phc = argon2_hash("old-password").expect("hash");
        // Meanwhile an admin changes the password.
        users
            .set_password("ivy", "new-password")
            .await
            .expect("set_password");
        // verify, second half: the upgrade write finds the record changed.
        let returned = users.upgrade(&key, &read, record, phc).await;
        assert!(returned.password.is_legacy(), "nothing was upgraded");
        assert!(logs_in(&users, "ivy", "new-password").await);
        assert!(!logs_in(&users, "ivy", "old-password").await);
    }

    /// `verify` (legacy record read) → `remove` → upgrade write: the user stays gone.
    #[tokio::test]
    async fn legacy_upgrade_never_brings_back_a_removed_user() {
        let (_dir, users) = users_in_temp_store().await;
        import_legacy_user(&users, "jo", "jo-password").await;
        let key = user_key("jo").expect("key");
        let (read, record) = users.load_raw(&key).await.expect("load").expect("user");
        assert_eq!(users.remove("jo").await, Ok(true));
        let phc = argon2_hash("jo-password").expect("hash");
        let _ = users.upgrade(&key, &read, record, phc).await;
        assert!(users.get("jo").await.expect("get").is_none());
        assert!(!logs_in(&users, "jo", "jo-password").await);
    }

    /// `set_password` (record read) → `remove` → password write: NotFound, and the user
    /// stays gone.
    #[tokio::test]
    async fn set_password_never_brings_back_a_removed_user() {
        let (_dir, users) = users_in_temp_store().await;
        users.add("kai", "kai-password", "user").await.expect("add");
        let key = user_key("kai").expect("key");
        let read = users.load_raw(&key).await.expect("load").expect("user");
        assert_eq!(users.remove("kai").await, Ok(true));
        let phc = argon2_hash("other-password").expect("hash");
        assert_eq!(
            users.write_password(&key, read, phc).await,
            Err(UserError::NotFound)
        );
        assert!(users.get("kai").await.expect("get").is_none());
    }

    /// Two password changes that overlap: the later write wins and keeps the record's
    /// other fields.
    #[tokio::test]
    async fn overlapping_password_changes_last_write_wins() {
        let (_dir, users) = users_in_temp_store().await;
        users
            .add("Lu", "first-password", "admin")
            .await
            .expect("add");
        let key = user_key("lu").expect("key");
        let read = users.load_raw(&key).await.expect("load").expect("user");
        users
            .set_password("lu", "second-password")
            .await
            .expect("set_password");
        let phc = argon2_hash("third-password").expect("hash");
        assert_eq!(users.write_password(&key, read, phc).await, Ok(()));
        assert!(logs_in(&users, "lu", "third-password").await);
        assert!(!logs_in(&users, "lu", "second-password").await);
        let record = users.get("lu").await.expect("get").expect("user");
        assert_eq!(
            (record.username.as_str(), record.role.as_str()),
            ("Lu", "admin")
        );
    }

    #[test]
    fn password_hash_serde_and_debug() {
        let p = PasswordHash::LegacySha256 {
            salt: "s".into(),
            hash: "h".into(),
        };
        let v = serde_json::to_value(&p).ok();
        assert_eq!(
            v,
            Some(serde_json::json!({"scheme": "legacy_sha256", "salt": "s", "hash": "h"}))
        );
        let a = PasswordHash::Argon2id { phc: "$x".into() };
        assert_eq!(
            serde_json::to_value(&a).ok(),
            Some(serde_json::json!({"scheme": "argon2id", "phc": "$x"}))
        );
        assert!(!format!("{a:?}").contains("$x"));
    }
}
