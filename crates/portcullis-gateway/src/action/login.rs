//! Tokens the gateway issues itself (Metacogna): `POST /auth/login` checks a user in
//! the store and returns a JWT; `POST /auth/guest` returns a short-lived guest token.
//! The tokens are signed with the `token_issuer` key, so a JWT authenticator with the
//! matching key accepts them.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use portcullis_auth::issuer::{TokenIssuer, TokenKind};
use portcullis_auth::users::Users;
use portcullis_config::Location;
use portcullis_store::Store;

use crate::body::Body;
use crate::error::{ErrorCode, GatewayError};
use crate::snapshot::{relative_to, Errors};

pub struct LoginService {
    pub issuer: TokenIssuer,
    pub users: Users,
    pub store: Arc<dyn Store>,
    pub login_path: String,
    pub guest_path: Option<String>,
    pub ttl: Duration,
    pub guest_ttl: Duration,
    pub guest_role: String,
    pub role_scopes: BTreeMap<String, Vec<String>>,
    pub claims: serde_json::Map<String, serde_json::Value>,
    pub per_ip: u64,
    pub per_username: u64,
    pub window: Duration,
}

/// Login bodies are tiny; anything bigger is refused before parsing.
const MAX_LOGIN_BODY: usize = 16 * 1024;

/// A username with this many times `login_per_username` failures in the window
/// (from all clients together) answers every attempt [`SLOWDOWN`] later.
const SLOWDOWN_FACTOR: u64 = 4;
const SLOWDOWN: Duration = Duration::from_secs(1);

/// Rate-limit key of a client: its address, IPv6 by /64 (one host's share).
fn client_key(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

#[derive(serde::Deserialize)]
struct LoginRequest {
    username: String,
    password: String,
}

/// A generated route's action: `POST <login_path>` or `POST <guest_path>`.
pub struct LoginAction {
    pub service: Arc<LoginService>,
    pub guest: bool,
}

impl LoginAction {
    pub async fn run(
        &self,
        req: Request<Incoming>,
        client: IpAddr,
    ) -> Result<Response<Body>, GatewayError> {
        if self.guest {
            self.service.guest(client).await
        } else {
            self.service.login(req, client).await
        }
    }

    pub fn describe(&self) -> &'static str {
        if self.guest {
            "guest token"
        } else {
            "login"
        }
    }
}

impl LoginService {
    async fn login(
        &self,
        req: Request<Incoming>,
        client: IpAddr,
    ) -> Result<Response<Body>, GatewayError> {
        let bytes = crate::body::read_small(req.into_body(), MAX_LOGIN_BODY).await?;
        let body: LoginRequest = serde_json::from_slice(&bytes).map_err(|_| {
            GatewayError::new(
                ErrorCode::BadRequest,
                "expected JSON {\"username\", \"password\"}",
            )
        })?;
        let ip = client_key(client);
        let ip_key = format!("login:ip:{ip}");
        // Checked before it becomes part of a store key (and counted: it is an attempt).
        if !portcullis_auth::users::valid_username(&body.username) {
            self.admit(&ip_key, self.per_ip).await?;
            return Err(GatewayError::new(
                ErrorCode::BadRequest,
                "a username is 1–64 letters, digits or . _ @ -",
            ));
        }
        let username = body.username.to_ascii_lowercase();
        let pair_key = format!("login:pair:{ip}:{username}");
        let user_key = format!("login:fail:user:{username}");
        // Attempts are admitted atomically before the (slow) password check, so
        // parallel guesses cannot overtake the counters: per client (IPv6 by /64), and
        // per (client, username) — cleared by a success, so it counts failures — so an
        // attack on a name from elsewhere never locks its owner out. Across all
        // clients, a name under attack is only slowed down.
        self.admit(&ip_key, self.per_ip).await?;
        self.admit(&pair_key, self.per_username).await?;
        if self.failures(&user_key).await >= self.per_username.saturating_mul(SLOWDOWN_FACTOR) {
            tokio::time::sleep(SLOWDOWN).await;
        }
        let user = self
            .users
            .verify(&body.username, &body.password)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "login: user store failed");
                GatewayError::server(ErrorCode::ServiceUnavailable)
            })?;
        // One message for unknown users and wrong passwords (and the same work: see Users::verify).
        let Some(user) = user else {
            tracing::info!(client = %client, "login failed");
            if let Err(e) = self
                .store
                .consume_window(&user_key, 1, u64::MAX, self.window)
                .await
            {
                tracing::warn!(error = %e, "login: cannot count a failure");
            }
            return Err(GatewayError::new(
                ErrorCode::Unauthorized,
                "invalid username or password",
            ));
        };
        if let Err(e) = self.store.delete(&pair_key).await {
            tracing::warn!(error = %e, "login: cannot clear the failure counter");
        }
        self.issue(&user.username, &user.role, false, self.ttl)
    }

    async fn guest(&self, client: IpAddr) -> Result<Response<Body>, GatewayError> {
        self.admit(&format!("login:guest:{}", client_key(client)), self.per_ip)
            .await?;
        let subject = format!("guest-{}", uuid::Uuid::new_v4());
        self.issue(&subject, &self.guest_role, true, self.guest_ttl)
    }

    /// Counts one attempt for `key`, atomically; beyond `limit` per window → 429.
    async fn admit(&self, key: &str, limit: u64) -> Result<(), GatewayError> {
        let window = self
            .store
            .consume_window(key, 1, limit, self.window)
            .await
            .map_err(|e| {
                // Fail closed: an uncounted login endpoint invites password guessing.
                tracing::warn!(error = %e, "login rate limit: store unavailable");
                GatewayError::server(ErrorCode::ServiceUnavailable)
            })?;
        if window.allowed {
            return Ok(());
        }
        let retry = window.reset_after.as_secs().max(1);
        Err(GatewayError::new(
            ErrorCode::RateLimited,
            "too many login attempts; try again later",
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from(retry)))
    }

    /// Failures counted for `key` in the current window (0 if the store cannot say:
    /// the slow-down is a courtesy, the admission counters above fail closed).
    async fn failures(&self, key: &str) -> u64 {
        self.store
            .consume_window(key, 0, u64::MAX, self.window)
            .await
            .map_or(0, |w| w.count)
    }

    fn issue(
        &self,
        subject: &str,
        role: &str,
        guest: bool,
        ttl: Duration,
    ) -> Result<Response<Body>, GatewayError> {
        let mut claims = self.claims.clone();
        claims.insert("role".into(), role.into());
        if let Some(scopes) = self.role_scopes.get(role) {
            claims.insert("scope".into(), scopes.join(" ").into());
        }
        let kind = if guest {
            claims.insert("guest".into(), true.into());
            TokenKind::Guest
        } else {
            TokenKind::User
        };
        let (token, expires_in) = self.issuer.issue(kind, subject, ttl, claims).map_err(|e| {
            tracing::error!(error = %e, "cannot sign a token");
            GatewayError::server(ErrorCode::InternalError)
        })?;
        let body =
            serde_json::json!({"token": token, "token_type": "Bearer", "expires_in": expires_in});
        let mut res = Response::new(Body::full(Bytes::from(
            serde_json::to_vec(&body).unwrap_or_default(),
        )));
        *res.status_mut() = StatusCode::OK;
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(res)
    }
}

/// Compiles `token_issuer` (the login and guest endpoints).
pub(crate) fn compile(
    t: &portcullis_config::TokenIssuerConfig,
    at: Location,
    source: &Path,
    store: &Arc<dyn portcullis_store::Store>,
    errors: &mut Errors<'_>,
) -> Option<LoginService> {
    use portcullis_auth::issuer::{IssuerConfig, SigningKey, TokenIssuer};
    let field = "token_issuer";
    let algorithm = match t.algorithm.parse::<portcullis_auth::jwt::Algorithm>() {
        Ok(a) => a,
        Err(_) => {
            errors.push(
                at,
                format!("{field}.algorithm"),
                format!("unsupported algorithm {:?}", t.algorithm.as_str()),
            );
            return None;
        }
    };
    let key = match (&t.secret, &t.private_key) {
        (Some(secret), None) => {
            if portcullis_auth::jwt::weak_hs_secret(secret.expose().as_bytes()) {
                tracing::warn!("token_issuer.secret is shorter than 32 bytes; RFC 7518 §3.2 asks for at least the hash size");
            }
            SigningKey::Secret(secret.expose().as_bytes().to_vec())
        }
        (None, Some(file)) => {
            let path = relative_to(source, file);
            match std::fs::read(&path) {
                Ok(pem) => SigningKey::PrivatePem(pem),
                Err(e) => {
                    errors.push(at, format!("{field}.private_key"), format!("{path}: {e}"));
                    return None;
                }
            }
        }
        _ => {
            errors.push(at, field, "set exactly one of `secret`, `private_key`");
            return None;
        }
    };
    let issuer = match TokenIssuer::new(IssuerConfig {
        algorithm,
        key,
        issuer: t.issuer.as_ref().map(|s| s.to_string()),
        audience: t.audience.as_ref().map(|s| s.to_string()),
        kid: None,
    }) {
        Ok(i) => i,
        Err(e) => {
            errors.push(at, field, e.to_string());
            return None;
        }
    };
    for (name, path) in [("login_path", &t.login_path), ("guest_path", &t.guest_path)] {
        if !path.is_empty() && !path.starts_with('/') {
            errors.push(at, format!("{field}.{name}"), "must start with `/`");
        }
    }
    Some(LoginService {
        issuer,
        users: portcullis_auth::users::Users::new(store.clone()),
        store: store.clone(),
        login_path: t.login_path.to_string(),
        guest_path: (!t.guest_path.is_empty()).then(|| t.guest_path.to_string()),
        ttl: t.ttl.get(),
        guest_ttl: t.guest_ttl.get(),
        guest_role: t.guest_role.to_string(),
        role_scopes: t
            .role_scopes
            .iter()
            .map(|(role, scopes)| (role.clone(), scopes.iter().map(|s| s.to_string()).collect()))
            .collect(),
        claims: t
            .claims
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.to_string())))
            .collect(),
        per_ip: t.login_per_ip.0,
        per_username: t.login_per_username.0,
        window: t.login_window.get(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_keyed_by_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_eq!(client_key(a), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), "10.0.0.1");
    }
}
