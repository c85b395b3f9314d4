//! OpenID Connect login for browsers (the `oidc` authenticator): the generated
//! login, callback, logout and "me" endpoints, and the server-side session a cookie
//! names. The relying party itself (discovery, PKCE, token calls, ID-token checks)
//! and the session store live in `portcullis-session`.
//!
//! - `GET login?next=&frontend_host=` → 302 to the provider (code + PKCE S256,
//!   `state`, `nonce`), the login kept as a single-use record and bound to this
//!   browser by a second cookie.
//! - `GET callback` → the code exchanged, the ID token verified, a new session
//!   (any session the browser held is ended: no fixation), 302 back.
//! - `POST logout` → session deleted, tokens revoked, cookie cleared; 204, or 302
//!   to the provider's `end_session_endpoint`.
//! - `GET me` → `{sub, name, email, picture}` of the session, 401 without one.

mod compile;

pub(crate) use compile::compile;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use portcullis_session::cookie::CookieSpec;
use portcullis_session::ids;
use portcullis_session::oidc::{OidcClient, OidcError};
use portcullis_session::record::{LoginState, SessionRecord};
use portcullis_session::redirect::{safe_next, Origin, ReturnOrigins};
use portcullis_session::sessions::{now_secs, SessionError, Sessions};
use subtle::ConstantTimeEq as _;

use crate::body::Body;
use crate::error::{ErrorCode, GatewayError};

/// One `oidc` authenticator's login machinery, shared by its generated routes and
/// by the authenticator that reads the session cookie on other routes.
pub struct OidcService {
    client: OidcClient,
    sessions: Sessions,
    cookie: CookieSpec,
    /// Binds a login's callback to the browser that started it.
    binding: CookieSpec,
    origins: ReturnOrigins,
    pub paths: OidcPaths,
    state_ttl: Duration,
    max_lifetime: Duration,
    refresh_skew: Duration,
    forward_access_token: bool,
    end_session: bool,
    post_logout_redirect: String,
    /// Upstream identity headers: sub, email, name.
    pub headers: IdentityHeaders,
    /// Audiences of the provider's access tokens accepted as bearer credentials;
    /// empty: none are.
    bearer_audience: Vec<String>,
    /// Built on first use, from the discovered key set.
    bearer: tokio::sync::OnceCell<portcullis_auth::jwt::JwtVerifier>,
}

/// Why a bearer access token was not accepted.
pub enum BearerRefusal {
    Invalid,
    Expired,
    /// The provider's keys could not be had: neither accepted nor called invalid.
    Unavailable,
}

#[derive(Clone, Debug)]
pub struct OidcPaths {
    pub login: String,
    pub callback: String,
    pub logout: String,
    pub me: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct IdentityHeaders {
    pub sub: Option<HeaderName>,
    pub email: Option<HeaderName>,
    pub name: Option<HeaderName>,
}

impl IdentityHeaders {
    pub fn all(&self) -> Vec<HeaderName> {
        [&self.sub, &self.email, &self.name]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
}

/// Which generated endpoint a route serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Login,
    Callback,
    Logout,
    Me,
}

pub struct OidcAction {
    pub service: Arc<OidcService>,
    pub endpoint: Endpoint,
}

impl OidcAction {
    pub async fn run(&self, req: Request<Incoming>) -> Result<Response<Body>, GatewayError> {
        let s = &self.service;
        match self.endpoint {
            Endpoint::Login => s.login(&req).await,
            Endpoint::Callback => s.callback(&req).await,
            Endpoint::Logout => s.logout(&req).await,
            Endpoint::Me => s.me(&req).await,
        }
    }

    pub fn describe(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Login => "oidc login",
            Endpoint::Callback => "oidc callback",
            Endpoint::Logout => "oidc logout",
            Endpoint::Me => "oidc session user",
        }
    }
}

/// What a session cookie leads to.
pub enum SessionLookup {
    /// A live session (its access token refreshed when it was due).
    Live(Box<SessionRecord>),
    /// No such session (unknown, logged out, unreadable).
    Missing,
    /// The session ended now: its provider refused a refresh, or its access token
    /// expired with nothing to refresh it.
    Ended,
}

/// A session could not be checked: its store or its provider is unavailable.
#[derive(Debug)]
pub struct LookupUnavailable;

impl From<SessionError> for LookupUnavailable {
    fn from(e: SessionError) -> Self {
        tracing::warn!(error = %e, "session store unavailable");
        LookupUnavailable
    }
}

/// How often a request waiting for another's refresh looks at the store.
const REFRESH_POLL: Duration = Duration::from_millis(100);

fn bad_request(message: &str) -> GatewayError {
    GatewayError::new(ErrorCode::BadRequest, message)
}

fn store_error(e: SessionError) -> GatewayError {
    tracing::warn!(error = %e, "session store unavailable");
    GatewayError::server(ErrorCode::ServiceUnavailable)
}

fn idp_error(e: OidcError) -> GatewayError {
    // The provider's answer goes to the log, never to the client.
    tracing::warn!(error = %e, "OpenID Connect login failed at the provider");
    GatewayError::server(ErrorCode::IdpError)
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn header_str(req: &Request<Incoming>, name: header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn no_store(res: &mut Response<Body>) {
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn redirect(location: &str) -> Result<Response<Body>, GatewayError> {
    let value = HeaderValue::from_str(location)
        .map_err(|_| GatewayError::server(ErrorCode::InternalError))?;
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::FOUND;
    res.headers_mut().insert(header::LOCATION, value);
    no_store(&mut res);
    Ok(res)
}

impl OidcService {
    /// The session cookie and the login-binding cookie.
    pub fn cookie_names(&self) -> [String; 2] {
        [
            self.cookie.name().to_owned(),
            self.binding.name().to_owned(),
        ]
    }

    pub fn cookie_name(&self) -> &str {
        self.cookie.name()
    }

    fn cookie_value<'r>(&self, req: &'r Request<Incoming>, spec: &CookieSpec) -> Option<&'r str> {
        crate::sanitize::cookie(req.headers(), spec.name())
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Whether API clients may send the provider's access tokens as bearer tokens.
    pub fn accepts_bearer(&self) -> bool {
        !self.bearer_audience.is_empty()
    }

    /// Verifies an access token of the provider (a JWT for one of
    /// `bearer_audience`) against its key set — never by calling the provider per
    /// request. ID tokens (they carry a `nonce`) are refused.
    pub async fn bearer(
        &self,
        token: &str,
    ) -> Result<Arc<portcullis_auth::jwt::VerifiedToken>, BearerRefusal> {
        use portcullis_auth::jwt::JwtError;
        let verifier = self
            .bearer
            .get_or_try_init(|| async {
                let p = self.client.provider().await?;
                self.client
                    .access_token_verifier(&p, self.bearer_audience.clone())
                    .await
            })
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "bearer tokens cannot be verified yet");
                BearerRefusal::Unavailable
            })?;
        // ID tokens are not access tokens: they carry a nonce (at login) or the
        // client as their audience.
        let client_id = self.client.settings().client_id.as_str();
        let for_client = |t: &portcullis_auth::jwt::VerifiedToken| match t.claims.get("aud") {
            Some(serde_json::Value::String(a)) => a == client_id,
            Some(serde_json::Value::Array(a)) => a.iter().any(|x| x == client_id),
            _ => false,
        };
        match verifier.verify(token).await {
            Ok(t) if t.claims.contains_key("nonce") || for_client(&t) => {
                Err(BearerRefusal::Invalid)
            }
            Ok(t) => Ok(t),
            Err(JwtError::Expired) => Err(BearerRefusal::Expired),
            Err(JwtError::KeysUnavailable) => Err(BearerRefusal::Unavailable),
            Err(_) => Err(BearerRefusal::Invalid),
        }
    }

    /// The application's own origin or one of the allowed ones.
    pub fn allows_origin(&self, o: &Origin) -> bool {
        self.origins.allows(o)
    }

    /// Whether the session's access token should be upstream with each request.
    pub fn forwards_access_token(&self) -> bool {
        self.forward_access_token
    }

    /// The `Set-Cookie` that removes the session cookie.
    pub fn clear_cookie(&self) -> HeaderValue {
        self.cookie.clear()
    }

    /// 401 `SESSION_EXPIRED`, and the cookie goes.
    pub fn session_expired(&self) -> GatewayError {
        GatewayError::new(
            ErrorCode::SessionExpired,
            "the session has ended; log in again",
        )
        .with_header(header::SET_COOKIE, self.cookie.clear())
    }

    /// Due within `refresh_skew` of expiry — or within half the token's lifetime
    /// when that is shorter (a 30 s token with a 60 s skew would otherwise be
    /// refreshed on every request).
    fn refresh_due(&self, r: &SessionRecord, now: u64) -> bool {
        r.access_expires_at.is_some_and(|t| {
            let half_life = t.saturating_sub(r.access_issued_at) / 2;
            t <= now + self.refresh_skew.as_secs().min(half_life)
        })
    }

    fn access_valid(r: &SessionRecord, now: u64) -> bool {
        r.access_expires_at.is_none_or(|t| t > now)
    }

    /// The session a cookie value names. Its access token is refreshed when it
    /// expires within `refresh_skew` — once per session however many requests
    /// arrive together, on this instance or another: one takes the store's lock and
    /// refreshes, the others use the current token while it is valid or wait for
    /// the new one.
    pub async fn session(self: &Arc<Self>, sid: &str) -> Result<SessionLookup, LookupUnavailable> {
        let Some(loaded) = self.sessions.load(sid).await? else {
            return Ok(SessionLookup::Missing);
        };
        let now = now_secs();
        let lookup = if self.refresh_due(&loaded.record, now) {
            self.refresh(sid, loaded.record).await?
        } else {
            SessionLookup::Live(Box::new(loaded.record))
        };
        if let SessionLookup::Live(r) = &lookup {
            // Rolling idle time: each use extends it (bounded by the absolute end).
            self.sessions.touch(sid, r).await?;
        }
        Ok(lookup)
    }

    async fn refresh(
        self: &Arc<Self>,
        sid: &str,
        current: SessionRecord,
    ) -> Result<SessionLookup, LookupUnavailable> {
        let token = ids::state().map_err(|_| LookupUnavailable)?;
        // Longer than everything a refresh may call: discovery, the key set and the
        // token endpoint, each bounded by `timeout`.
        let hold = self.client.settings().timeout * 3 + Duration::from_secs(5);
        let deadline = std::time::Instant::now() + hold;
        let mut record = current;
        loop {
            if self.sessions.try_lock(sid, &token, hold).await? {
                // In a task of its own: a client that goes away must not cancel a
                // refresh between the provider's answer (a rotated refresh token)
                // and the store write — the old token would be dead and the new one
                // lost.
                let this = self.clone();
                let (sid, token) = (sid.to_owned(), token.clone());
                let task = tokio::spawn(async move {
                    let result = this.refresh_locked(&sid).await;
                    if let Err(e) = this.sessions.unlock(&sid, &token).await {
                        tracing::warn!(error = %e, "session refresh lock not released");
                    }
                    result
                });
                return task.await.unwrap_or(Err(LookupUnavailable));
            }
            // Someone else is refreshing: the current token serves while it is valid.
            if Self::access_valid(&record, now_secs()) {
                return Ok(SessionLookup::Live(Box::new(record)));
            }
            if std::time::Instant::now() >= deadline {
                return Err(LookupUnavailable);
            }
            tokio::time::sleep(REFRESH_POLL).await;
            match self.sessions.load(sid).await? {
                None => return Ok(SessionLookup::Ended),
                Some(l) if !self.refresh_due(&l.record, now_secs()) => {
                    return Ok(SessionLookup::Live(Box::new(l.record)))
                }
                Some(l) => record = l.record,
            }
        }
    }

    /// The refresh itself, under the lock.
    async fn refresh_locked(&self, sid: &str) -> Result<SessionLookup, LookupUnavailable> {
        // Read again: a refresh may have finished just before the lock was taken.
        let Some(loaded) = self.sessions.load(sid).await? else {
            return Ok(SessionLookup::Ended);
        };
        let now = now_secs();
        if !self.refresh_due(&loaded.record, now) {
            return Ok(SessionLookup::Live(Box::new(loaded.record)));
        }
        let old = loaded.record;
        let Some(refresh_token) = old.refresh_token.clone() else {
            if Self::access_valid(&old, now) {
                return Ok(SessionLookup::Live(Box::new(old)));
            }
            self.sessions.delete(sid).await?;
            tracing::info!(sub = %old.sub, "session ended: access token expired, no refresh token");
            return Ok(SessionLookup::Ended);
        };
        let refreshed = match self.client.provider().await {
            Ok(p) => match self.client.refresh(&p, &refresh_token).await {
                Ok(tokens) => self.renewed(&p, &old, tokens, now).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match refreshed {
            Ok(record) => {
                if self.sessions.replace(sid, &loaded.stored, &record).await? {
                    return Ok(SessionLookup::Live(Box::new(record)));
                }
                // Changed meanwhile (a logout): what is stored now decides.
                Ok(match self.sessions.load(sid).await? {
                    Some(l) => SessionLookup::Live(Box::new(l.record)),
                    None => SessionLookup::Ended,
                })
            }
            Err(OidcError::InvalidGrant) => {
                // Only a dead grant ends the session: `invalid_client` after a
                // secret rotation or a proxy's 403 must not log every user out.
                self.sessions.delete(sid).await?;
                tracing::info!(sub = %old.sub, "session ended: the provider refused the refresh");
                Ok(SessionLookup::Ended)
            }
            Err(e) => {
                // The provider is down: the session stays; its current token serves
                // while it is valid.
                tracing::warn!(error = %e, "access token refresh failed");
                if Self::access_valid(&old, now) {
                    Ok(SessionLookup::Live(Box::new(old)))
                } else {
                    Err(LookupUnavailable)
                }
            }
        }
    }

    /// The session after a refresh: new access token and expiry, a rotated refresh
    /// token, and a new ID token when the provider sent one (verified, same user).
    async fn renewed(
        &self,
        provider: &portcullis_session::oidc::Provider,
        old: &SessionRecord,
        tokens: portcullis_session::oidc::Tokens,
        now: u64,
    ) -> Result<SessionRecord, OidcError> {
        let mut r = old.clone();
        if let Some(id) = &tokens.id_token {
            let claims = self
                .client
                .verify_id_token(provider, id, None, false)
                .await?;
            if claims.sub != old.sub {
                // Another user behind this session's grant: the session ends.
                tracing::warn!(sub = %old.sub, "a refreshed ID token names another user");
                return Err(OidcError::InvalidGrant);
            }
            r.id_token = Some(id.clone());
        }
        r.access_token = tokens.access_token;
        r.access_issued_at = now;
        r.access_expires_at = tokens.expires_in.map(|s| now + s);
        if let Some(rt) = tokens.refresh_token {
            r.refresh_token = Some(rt);
        }
        if tokens.scope.is_some() {
            r.scope = tokens.scope;
        }
        Ok(r)
    }

    async fn login(&self, req: &Request<Incoming>) -> Result<Response<Body>, GatewayError> {
        let query = req.uri().query();
        let next = safe_next(query_param(query, "next").as_deref()).map_err(bad_request)?;
        let return_to = self
            .origins
            .choose(
                query_param(query, "frontend_host").as_deref(),
                header_str(req, header::ORIGIN),
                header_str(req, header::REFERER),
            )
            .map_err(bad_request)?;
        let provider = self.client.provider().await.map_err(idp_error)?;
        let random = || ids::state().map_err(|_| GatewayError::server(ErrorCode::InternalError));
        let (state, nonce, binding) = (random()?, random()?, random()?);
        let verifier =
            ids::pkce_verifier().map_err(|_| GatewayError::server(ErrorCode::InternalError))?;
        let login = LoginState {
            verifier: verifier.clone(),
            nonce: nonce.clone(),
            next,
            return_to: return_to.url(),
            binding: ids::hashed(&binding),
        };
        self.sessions
            .put_state(&state, &login, self.state_ttl)
            .await
            .map_err(store_error)?;
        let url =
            self.client
                .authorize_url(&provider, &state, &nonce, &ids::pkce_challenge(&verifier));
        let mut res = redirect(&url)?;
        if let Some(c) = self.binding.set(&binding, self.state_ttl) {
            res.headers_mut().append(header::SET_COOKIE, c);
        }
        Ok(res)
    }

    async fn callback(&self, req: &Request<Incoming>) -> Result<Response<Body>, GatewayError> {
        let query = req.uri().query();
        let state = query_param(query, "state").ok_or_else(|| bad_request("state is missing"))?;
        // Taken first: whatever happens next, this state is used up.
        let login = self
            .sessions
            .take_state(&state)
            .await
            .map_err(store_error)?
            .ok_or_else(|| bad_request("unknown, expired or already used login state"))?;
        let binding = self.cookie_value(req, &self.binding).unwrap_or("");
        if !bool::from(
            ids::hashed(binding)
                .as_bytes()
                .ct_eq(login.binding.as_bytes()),
        ) {
            return Err(bad_request("this login was started in another browser"));
        }
        if query_param(query, "error").is_some() {
            return Err(bad_request(
                "the identity provider did not complete the login",
            ));
        }
        let code = query_param(query, "code").ok_or_else(|| bad_request("code is missing"))?;
        let provider = self.client.provider().await.map_err(idp_error)?;
        // RFC 9207: a provider that names itself must be the one we asked, and one
        // that says it always does must have.
        match query_param(query, "iss") {
            Some(iss) if iss != self.client.settings().issuer => {
                return Err(bad_request("the response comes from another issuer"));
            }
            None if provider.iss_in_response => {
                return Err(bad_request("the response does not name its issuer"));
            }
            _ => {}
        }
        let tokens = self
            .client
            .exchange(&provider, &code, &login.verifier)
            .await
            .map_err(idp_error)?;
        let id_token = tokens
            .id_token
            .as_deref()
            .ok_or_else(|| idp_error(OidcError::Invalid("no ID token".into())))?;
        let claims = self
            .client
            .verify_id_token(&provider, id_token, Some(&login.nonce), true)
            .await
            .map_err(idp_error)?;
        let now = now_secs();
        let record = SessionRecord {
            sub: claims.sub.clone(),
            name: claims.string("name"),
            email: claims.string("email"),
            email_verified: claims.claims.get("email_verified")
                == Some(&serde_json::Value::Bool(true)),
            picture: claims.string("picture"),
            scope: tokens.scope.clone(),
            created_at: now,
            expires_at: now + self.max_lifetime.as_secs(),
            access_token: tokens.access_token.clone(),
            access_expires_at: tokens.expires_in.map(|s| now + s),
            access_issued_at: now,
            refresh_token: tokens.refresh_token.clone(),
            id_token: Some(id_token.to_owned()),
        };
        // No fixation: a session this browser already had ends; the new one has a
        // new id.
        if let Some(old) = self.cookie_value(req, &self.cookie) {
            self.sessions.delete(old).await.map_err(store_error)?;
        }
        let sid = self.sessions.create(&record).await.map_err(store_error)?;
        let mut res = redirect(&format!("{}{}", login.return_to, login.next))?;
        let cookie = self
            .cookie
            .set(&sid, self.max_lifetime)
            .ok_or_else(|| GatewayError::server(ErrorCode::InternalError))?;
        res.headers_mut().append(header::SET_COOKIE, cookie);
        res.headers_mut()
            .append(header::SET_COOKIE, self.binding.clear());
        tracing::info!(sub = %record.sub, "OpenID Connect login");
        Ok(res)
    }

    async fn logout(&self, req: &Request<Incoming>) -> Result<Response<Body>, GatewayError> {
        // A cross-site page must not log the user out: the request's origin is
        // checked like CSRF's (browsers send Origin with every POST).
        // `Origin: null` (a sandboxed frame, a cross-origin redirect) is refused,
        // not replaced by the Referer.
        let origin = match header_str(req, header::ORIGIN) {
            Some(o) => Origin::parse(o).ok(),
            None => header_str(req, header::REFERER).and_then(Origin::of_url),
        };
        if !origin.is_some_and(|o| self.origins.allows(&o)) {
            return Err(GatewayError::new(
                ErrorCode::CsrfRejected,
                "logout must come from the application's own origin",
            ));
        }
        let ended = match self.cookie_value(req, &self.cookie) {
            Some(sid) => self.sessions.delete(sid).await.map_err(store_error)?,
            None => None,
        };
        let mut end_session = None;
        if let Some(record) = &ended {
            tracing::info!(sub = %record.sub, "OpenID Connect logout");
            match self.client.provider().await {
                Ok(provider) => {
                    // The refresh token first: revoking it ends the grant (RFC 7009
                    // §2.1). The access token too: an opaque one dies with it, a
                    // self-contained JWT cannot be revoked (the provider says so,
                    // which is only worth a debug line).
                    if let Some(rt) = &record.refresh_token {
                        if let Err(e) = self.client.revoke(&provider, rt, "refresh_token").await {
                            tracing::warn!(error = %e, "refresh token revocation failed");
                        }
                    }
                    if let Err(e) = self
                        .client
                        .revoke(&provider, &record.access_token, "access_token")
                        .await
                    {
                        tracing::debug!(error = %e, "access token not revoked");
                    }
                    if self.end_session {
                        end_session = provider.end_session_endpoint.as_ref().map(|e| {
                            let mut q = form_urlencoded::Serializer::new(String::new());
                            if let Some(id) = &record.id_token {
                                q.append_pair("id_token_hint", id);
                            }
                            q.append_pair("post_logout_redirect_uri", &self.post_logout_redirect)
                                .append_pair("client_id", &self.client.settings().client_id);
                            let base = e.to_string();
                            let sep = if base.contains('?') { '&' } else { '?' };
                            format!("{base}{sep}{}", q.finish())
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "tokens not revoked: provider unavailable"),
            }
        }
        let mut res = match end_session {
            Some(url) => redirect(&url)?,
            None => {
                let mut r = Response::new(Body::empty());
                *r.status_mut() = StatusCode::NO_CONTENT;
                no_store(&mut r);
                r
            }
        };
        res.headers_mut()
            .append(header::SET_COOKIE, self.cookie.clear());
        Ok(res)
    }

    async fn me(self: &Arc<Self>, req: &Request<Incoming>) -> Result<Response<Body>, GatewayError> {
        let unauthorized = || GatewayError::new(ErrorCode::Unauthorized, "no session");
        let sid = self
            .cookie_value(req, &self.cookie)
            .ok_or_else(unauthorized)?;
        let r = match self.session(sid).await {
            Ok(SessionLookup::Live(r)) => r,
            Ok(SessionLookup::Missing) => return Err(unauthorized()),
            Ok(SessionLookup::Ended) => return Err(self.session_expired()),
            Err(LookupUnavailable) => {
                return Err(GatewayError::server(ErrorCode::ServiceUnavailable))
            }
        };
        let body = serde_json::json!({
            "sub": r.sub,
            "name": r.name,
            "email": r.email,
            "email_verified": r.email_verified,
            "picture": r.picture,
        });
        let mut res = Response::new(Body::full(Bytes::from(body.to_string())));
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        no_store(&mut res);
        Ok(res)
    }
}

/// The methods each generated endpoint answers.
pub fn methods(endpoint: Endpoint) -> Vec<Method> {
    match endpoint {
        Endpoint::Login | Endpoint::Callback | Endpoint::Me => vec![Method::GET, Method::HEAD],
        Endpoint::Logout => vec![Method::POST],
    }
}
