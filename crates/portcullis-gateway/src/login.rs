//! Tokens the gateway issues itself (Metacogna): `POST /auth/login` checks a user in
//! the store and returns a JWT; `POST /auth/guest` returns a short-lived guest token.
//! The tokens are signed with the `token_issuer` key, so a JWT authenticator with the
//! matching key accepts them.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use portcullis_auth::issuer::TokenIssuer;
use portcullis_auth::users::Users;
use portcullis_store::Store;

use crate::body::Body;
use crate::error::{ErrorCode, GatewayError};

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

#[derive(serde::Deserialize)]
struct LoginRequest {
    username: String,
    password: String,
}

impl LoginService {
    /// Whether `path` is one of ours.
    pub fn handles(&self, path: &str) -> bool {
        path == self.login_path || self.guest_path.as_deref() == Some(path)
    }

    pub async fn handle(
        &self,
        path: &str,
        req: Request<Incoming>,
        client: IpAddr,
    ) -> Result<Response<Body>, GatewayError> {
        if req.method() != Method::POST {
            return Err(GatewayError::new(ErrorCode::MethodNotAllowed, "use POST")
                .with_header(header::ALLOW, HeaderValue::from_static("POST")));
        }
        if path == self.login_path {
            self.login(req, client).await
        } else {
            self.guest(client).await
        }
    }

    async fn login(
        &self,
        req: Request<Incoming>,
        client: IpAddr,
    ) -> Result<Response<Body>, GatewayError> {
        let bytes = Limited::new(req.into_body(), MAX_LOGIN_BODY)
            .collect()
            .await
            .map_err(|_| {
                GatewayError::new(
                    ErrorCode::BadRequest,
                    "the login body is too large or incomplete",
                )
            })?
            .to_bytes();
        let body: LoginRequest = serde_json::from_slice(&bytes).map_err(|_| {
            GatewayError::new(
                ErrorCode::BadRequest,
                "expected JSON {\"username\", \"password\"}",
            )
        })?;
        self.limit(&format!("login:ip:{client}"), self.per_ip)
            .await?;
        self.limit(
            &format!("login:user:{}", body.username.to_lowercase()),
            self.per_username,
        )
        .await?;
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
            return Err(GatewayError::new(
                ErrorCode::Unauthorized,
                "invalid username or password",
            ));
        };
        self.issue(&user.username, &user.role, false, self.ttl)
    }

    async fn guest(&self, client: IpAddr) -> Result<Response<Body>, GatewayError> {
        self.limit(&format!("login:ip:{client}"), self.per_ip)
            .await?;
        let subject = format!("guest-{}", uuid::Uuid::new_v4());
        self.issue(&subject, &self.guest_role, true, self.guest_ttl)
    }

    /// Counts one attempt for `key`; beyond `limit` per window → 429.
    async fn limit(&self, key: &str, limit: u64) -> Result<(), GatewayError> {
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
        if guest {
            claims.insert("guest".into(), true.into());
        }
        let (token, expires_in) = self.issuer.issue(subject, ttl, claims).map_err(|e| {
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
