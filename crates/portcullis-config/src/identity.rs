//! Identity configuration: the store, named authenticators, and the token issuer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::interp::{Duration, Flag, Scalar, Secret, Text};

/// Where shared state lives (API keys, quota counters, users, sessions).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Empty: the embedded store (SQLite under `data_dir`). `redis://[:password@]host:port[/db]`,
    /// `redis-sentinel://…?sentinelServiceName=NAME`, `redis-cluster://host:port[,host:port]`
    /// or `rediss://…` (TLS): Valkey/Redis.
    #[serde(default)]
    pub url: Secret,
    /// Directory of the embedded store.
    #[serde(default = "default_data_dir")]
    pub data_dir: Text,
    /// Prefix of every Redis key.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: Text,
    /// Per-command timeout (Redis).
    #[serde(default = "default_store_timeout")]
    pub timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: Secret::default(),
            data_dir: default_data_dir(),
            key_prefix: default_key_prefix(),
            timeout: default_store_timeout(),
        }
    }
}

fn default_data_dir() -> Text {
    Text::from("./data")
}
fn default_key_prefix() -> Text {
    Text::from("portcullis:")
}
fn default_store_timeout() -> Duration {
    Duration::secs(2)
}

/// One named authenticator; written as a map with one key naming its kind:
/// `users: {jwt: {...}}`, `keys: {api_key: {...}}`, `admin: {static_token: {...}}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthenticatorConfig {
    Jwt(Box<JwtConfig>),
    ApiKey(ApiKeyConfig),
    StaticToken(StaticTokenConfig),
    /// Browser login with an OpenID Connect provider and server-side sessions.
    Oidc(Box<OidcConfig>),
    /// Another service decides (nginx `auth_request`, Traefik ForwardAuth, Envoy
    /// `ext_authz`): an HTTP subrequest or a gRPC `Authorization/Check`.
    External(Box<ExternalAuthConfig>),
}

/// `external:` — ask an authorization service whether a request may pass.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalAuthConfig {
    /// HTTP mode: the URL asked (2xx allows, 401/403 deny, anything else fails).
    #[serde(default)]
    pub url: Option<Spanned<Text>>,
    /// gRPC mode: the base URL of an Envoy `envoy.service.auth.v3.Authorization`
    /// server (`http://authz:9191`, HTTP/2).
    #[serde(default)]
    pub grpc: Option<Spanned<Text>>,
    /// HTTP mode: the method of the subrequest.
    #[serde(default = "default_external_method")]
    pub method: Text,
    /// Whole call, connect included.
    #[serde(default = "default_external_timeout")]
    pub timeout: Duration,
    /// When the service cannot answer (timeout, refused, 5xx, anything but
    /// 2xx/401/403): `fail_closed` (503) or `fail_open` (the request passes).
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// Where the credential is read (the cache key; a request without one is
    /// not sent to the service).
    #[serde(default)]
    pub token_sources: TokenSources,
    /// Request headers sent to the service besides the credential's own.
    #[serde(default)]
    pub forward_headers: Vec<Text>,
    /// Response header (gRPC: header the service adds) holding the principal.
    #[serde(default = "default_external_principal_from")]
    pub principal_from: Text,
    /// Response header holding the scopes (space- or comma-separated).
    #[serde(default)]
    pub scopes_from: Option<Text>,
    /// Response headers copied upstream as identity (stripped from clients).
    #[serde(default)]
    pub copy_headers: Vec<Text>,
    /// Upstream header carrying the principal.
    #[serde(default)]
    pub principal_header: Option<Text>,
    /// Decisions (allow and deny) are reused this long per credential: the bound
    /// on revocation. `0s` asks every time.
    #[serde(default = "default_external_cache_ttl")]
    pub cache_ttl: Duration,
    #[serde(default = "default_key_cache_size")]
    pub cache_size: Scalar<u64>,
    /// What a cached decision is reused for: `credential` (any request with the same
    /// credential; the HTTP mode's default) or `request` (the same credential, method,
    /// host, path and query; the gRPC mode's default, as policies there decide per
    /// path).
    #[serde(default)]
    pub cache_by: Option<CacheBy>,
    /// PEM roots for an `https` service.
    #[serde(default)]
    pub ca_file: Option<Text>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheBy {
    Credential,
    Request,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    #[default]
    FailClosed,
    FailOpen,
}

fn default_external_method() -> Text {
    Text::from("GET")
}
fn default_external_timeout() -> Duration {
    Duration::secs(2)
}
fn default_external_principal_from() -> Text {
    Text::from("x-auth-principal")
}
fn default_external_cache_ttl() -> Duration {
    Duration::secs(30)
}

/// Browser login with an OpenID Connect provider (authorization code with PKCE
/// S256), server-side sessions behind an opaque cookie, refresh, logout; bearer
/// access tokens of the same provider for API clients. See docs/bff.md.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The provider's issuer URL; `/.well-known/openid-configuration` below it is read
    /// for the endpoints, and its `issuer` must equal this one.
    pub issuer: Spanned<Text>,
    pub client_id: Text,
    pub client_secret: Secret,
    /// How the gateway authenticates at the token endpoint.
    #[serde(default)]
    pub client_auth: OidcClientAuth,
    /// Space-separated scopes; must contain `openid`.
    #[serde(default = "default_oidc_scopes")]
    pub scopes: Text,
    /// Extra authorization-request parameters (`prompt: consent`, `audience: …`).
    #[serde(default)]
    pub authorize_params: BTreeMap<String, Text>,
    /// The gateway's own public origin (`https://app.example.com`): the redirect URI is
    /// this + `paths.callback`, and it is always an allowed return origin.
    pub public_url: Spanned<Text>,
    /// Origins a login may return to (`frontend_host`) and WebSockets may come from,
    /// port included; empty = only `public_url`. A comma-separated string is split.
    #[serde(default)]
    pub allowed_origins: Vec<Text>,
    #[serde(default)]
    pub paths: OidcPaths,
    /// Lifetime of a login's single-use state (state, nonce, PKCE verifier).
    #[serde(default = "default_state_ttl")]
    pub state_ttl: Duration,
    /// Maximum age of the provider's authentication (`max_age`, `auth_time` checked);
    /// 0 = not asked.
    #[serde(default = "zero_duration")]
    pub id_token_max_age: Duration,
    /// Clock skew allowed on token times.
    #[serde(default = "default_leeway")]
    pub leeway: Duration,
    /// Refresh the access token when it expires within this.
    #[serde(default = "default_refresh_skew")]
    pub refresh_skew: Duration,
    /// Deadline of each call to the provider.
    #[serde(default = "default_idp_timeout")]
    pub timeout: Duration,
    /// PEM roots trusted for the provider (default: the web PKI).
    #[serde(default)]
    pub ca_file: Option<Text>,
    /// Endpoints that win over discovery's (empty = discovered). With
    /// `authorization_endpoint`, `token_endpoint` and `jwks_uri` all set, no
    /// discovery document is read.
    #[serde(default)]
    pub authorization_endpoint: Text,
    #[serde(default)]
    pub token_endpoint: Text,
    #[serde(default)]
    pub jwks_uri: Text,
    #[serde(default)]
    pub revocation_endpoint: Text,
    #[serde(default)]
    pub end_session_endpoint: Text,
    /// Accepted for seed 002's `OIDC_USERINFO_ENDPOINT`; never called (the user
    /// comes from the ID token).
    #[serde(default)]
    pub userinfo_endpoint: Text,
    /// Logout redirects to the provider's `end_session_endpoint` (RP-initiated logout).
    #[serde(default)]
    pub end_session: Flag,
    /// Where the provider sends the browser after logout (default `public_url` + `/`).
    #[serde(default)]
    pub post_logout_redirect: Option<Text>,
    #[serde(default)]
    pub session: SessionConfig,
    /// Request headers carrying the user's identity upstream (client copies removed).
    #[serde(default)]
    pub identity_headers: IdentityHeadersConfig,
    /// Send the session's access token upstream as `Authorization: Bearer`.
    #[serde(default)]
    pub forward_access_token: Flag,
    /// Audiences a bearer access token of this provider may carry to be accepted by
    /// API clients; empty = bearer tokens are not accepted.
    #[serde(default)]
    pub bearer_audience: Vec<Text>,
    /// Limits on the login, callback and logout endpoints (default 60 a minute per
    /// client IP); `[]` turns them off.
    #[serde(default = "default_login_limits")]
    pub rate_limits: Vec<crate::RateLimitConfig>,
}

fn default_login_limits() -> Vec<crate::RateLimitConfig> {
    vec![crate::RateLimitConfig {
        name: Some(Text::from("oidc-login")),
        requests: 60,
        per: Duration::secs(60),
        by: Text::from("ip"),
        algorithm: Default::default(),
        burst: None,
        scope: Default::default(),
        on_store_error: Default::default(),
        ipv6_prefix: 64,
        headers: Default::default(),
    }]
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OidcClientAuth {
    #[default]
    ClientSecretBasic,
    ClientSecretPost,
}

/// Interpolated like any text (`${OIDC_CLIENT_AUTH:-client_secret_basic}`).
impl<'de> Deserialize<'de> for OidcClientAuth {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let t = Text::deserialize(d)?;
        match t.as_str() {
            "client_secret_basic" => Ok(OidcClientAuth::ClientSecretBasic),
            "client_secret_post" => Ok(OidcClientAuth::ClientSecretPost),
            other => Err(serde::de::Error::custom(format!(
                "{other:?} is not a client authentication: client_secret_basic or client_secret_post"
            ))),
        }
    }
}

/// Paths of the generated login endpoints.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OidcPaths {
    #[serde(default = "default_oidc_login")]
    pub login: Text,
    #[serde(default = "default_oidc_callback")]
    pub callback: Text,
    #[serde(default = "default_oidc_logout")]
    pub logout: Text,
    /// The session user as JSON (seed 002 also serves it at `/whoami/me`).
    #[serde(default = "default_oidc_me")]
    pub me: Vec<Text>,
}

impl Default for OidcPaths {
    fn default() -> Self {
        OidcPaths {
            login: default_oidc_login(),
            callback: default_oidc_callback(),
            logout: default_oidc_logout(),
            me: default_oidc_me(),
        }
    }
}

/// The session cookie and the server-side session record.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    #[serde(default = "default_cookie_name")]
    pub cookie_name: Text,
    /// `false` only for local development over plain http.
    #[serde(default = "yes")]
    pub cookie_secure: Flag,
    #[serde(default)]
    pub cookie_same_site: SameSite,
    /// `Domain` attribute; empty = host-only (never taken from the request).
    #[serde(default)]
    pub cookie_domain: Text,
    /// Rolling: a session unused this long ends.
    #[serde(default = "default_idle_ttl")]
    pub idle_ttl: Duration,
    /// Absolute: no session lives longer, however active.
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime: Duration,
    /// Base64 of 32 bytes: encrypts the tokens kept in the session record. Required.
    #[serde(default)]
    pub encryption_key: Secret,
    /// Earlier keys, still accepted for reading (rotation).
    #[serde(default)]
    pub previous_keys: Vec<Secret>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            cookie_name: default_cookie_name(),
            cookie_secure: yes(),
            cookie_same_site: SameSite::default(),
            cookie_domain: Text::default(),
            idle_ttl: default_idle_ttl(),
            max_lifetime: default_max_lifetime(),
            encryption_key: Secret::default(),
            previous_keys: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SameSite {
    #[default]
    Lax,
    Strict,
    None,
}

/// Interpolated like any text (`${SESSION_COOKIE_SAMESITE:-Lax}`), any case.
impl<'de> Deserialize<'de> for SameSite {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let t = Text::deserialize(d)?;
        match t.to_ascii_lowercase().as_str() {
            "lax" => Ok(SameSite::Lax),
            "strict" => Ok(SameSite::Strict),
            "none" => Ok(SameSite::None),
            other => Err(serde::de::Error::custom(format!(
                "{other:?} is not a SameSite value: lax, strict or none"
            ))),
        }
    }
}

/// Header names of the session user's identity; an empty name sends nothing.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityHeadersConfig {
    #[serde(default = "default_sub_header")]
    pub sub: Text,
    #[serde(default = "default_email_header")]
    pub email: Text,
    #[serde(default = "default_name_header")]
    pub name: Text,
}

impl Default for IdentityHeadersConfig {
    fn default() -> Self {
        IdentityHeadersConfig {
            sub: default_sub_header(),
            email: default_email_header(),
            name: default_name_header(),
        }
    }
}

fn zero_duration() -> Duration {
    Duration::secs(0)
}
fn default_oidc_scopes() -> Text {
    Text::from("openid profile email offline_access")
}
fn default_state_ttl() -> Duration {
    Duration::secs(600)
}
fn default_refresh_skew() -> Duration {
    Duration::secs(60)
}
fn default_idp_timeout() -> Duration {
    Duration::secs(10)
}
fn default_oidc_login() -> Text {
    Text::from("/auth/login")
}
fn default_oidc_callback() -> Text {
    Text::from("/auth/callback")
}
fn default_oidc_logout() -> Text {
    Text::from("/auth/logout")
}
fn default_oidc_me() -> Vec<Text> {
    vec![Text::from("/auth/me"), Text::from("/whoami/me")]
}
fn default_cookie_name() -> Text {
    Text::from("sid")
}
fn default_idle_ttl() -> Duration {
    Duration::secs(8 * 3600)
}
fn default_max_lifetime() -> Duration {
    Duration::secs(24 * 3600)
}
fn default_sub_header() -> Text {
    Text::from("x-user-sub")
}
fn default_email_header() -> Text {
    Text::from("x-user-email")
}
fn default_name_header() -> Text {
    Text::from("x-user-name")
}

/// Where a credential is read from. The `Authorization: Bearer` header is always tried
/// first unless `header: false`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSources {
    #[serde(default = "yes")]
    pub header: Flag,
    /// Cookie name holding the token.
    #[serde(default)]
    pub cookie: Option<Text>,
    /// Query parameter holding the token (for WebSockets); removed before proxying.
    #[serde(default)]
    pub query: Option<Text>,
}

impl Default for TokenSources {
    fn default() -> Self {
        TokenSources {
            header: yes(),
            cookie: None,
            query: None,
        }
    }
}

fn yes() -> Flag {
    Flag(true)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Accepted algorithms: HS256/384/512, RS256/384/512, PS256, ES256/384, EdDSA.
    pub algorithms: Vec<Spanned<Text>>,
    /// HMAC secret (HS*).
    #[serde(default)]
    pub secret: Option<Secret>,
    /// PEM public key files (RS*, PS*, ES*, EdDSA).
    #[serde(default)]
    pub public_keys: Vec<Text>,
    /// JWKS URL (cached, refreshed in the background, refetched on an unknown `kid`).
    #[serde(default)]
    pub jwks_url: Option<Spanned<Text>>,
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh: Duration,
    /// At most one refetch per this interval for unknown `kid`s.
    #[serde(default = "default_jwks_min_refetch")]
    pub jwks_min_refetch: Duration,
    /// Accepted issuers (any of); empty = not checked.
    #[serde(default)]
    pub issuer: Vec<Text>,
    /// Accepted audiences (any of). Required with `jwks_url` unless
    /// `allow_any_audience: true` (a shared IdP signs tokens for other apps too).
    #[serde(default)]
    pub audience: Vec<Text>,
    /// Accept any audience with `jwks_url` (explicit opt-out of the check).
    #[serde(default)]
    pub allow_any_audience: Flag,
    /// Accept guest tokens (payload claim `typ: guest`) the gateway issues.
    #[serde(default)]
    pub accept_guest: Flag,
    #[serde(default = "default_leeway")]
    pub leeway: Duration,
    #[serde(default)]
    pub token_sources: TokenSources,
    /// Claim → request header sent upstream (`org_id: X-Org-ID`).
    #[serde(default)]
    pub claim_headers: BTreeMap<String, Text>,
    /// Header carrying the principal (`sub`) upstream.
    #[serde(default)]
    pub principal_header: Option<Text>,
    /// Verified tokens cached (bounded, until `exp`); 0 disables.
    #[serde(default = "default_jwt_cache")]
    pub cache_size: Scalar<u64>,
}

fn default_jwks_refresh() -> Duration {
    Duration::secs(300)
}
fn default_jwks_min_refetch() -> Duration {
    Duration::secs(10)
}
fn default_leeway() -> Duration {
    Duration::secs(30)
}
fn default_jwt_cache() -> Scalar<u64> {
    Scalar(10_000)
}

/// Per-user API keys kept (hashed) in the store, with optional quotas.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Turn the authenticator off without removing it (`${API_KEYS_ENABLED:-false}`).
    #[serde(default = "yes")]
    pub enabled: Flag,
    /// Verified keys are cached this long: the bound on revocation latency.
    #[serde(default = "default_key_cache_ttl")]
    pub cache_ttl: Duration,
    #[serde(default = "default_key_cache_size")]
    pub cache_size: Scalar<u64>,
    #[serde(default)]
    pub token_sources: TokenSources,
    /// Header carrying the key's principal upstream (FoldForge: `ff-principal`).
    #[serde(default)]
    pub principal_header: Option<Text>,
    /// When the store cannot be reached to count a quota: `false` (default) answers 503,
    /// `true` lets the request through uncounted.
    #[serde(default)]
    pub quota_fail_open: Flag,
}

fn default_key_cache_ttl() -> Duration {
    Duration::secs(30)
}
fn default_key_cache_size() -> Scalar<u64> {
    Scalar(10_000)
}

/// The gateway issues its own JWTs: `POST /auth/login` (users in the store) and
/// `POST /auth/guest`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenIssuerConfig {
    /// Signing algorithm (HS256/384/512 with `secret`; RS*/PS*/ES*/EdDSA with `private_key`).
    #[serde(default = "default_issuer_alg")]
    pub algorithm: Text,
    #[serde(default)]
    pub secret: Option<Secret>,
    /// PEM private key file.
    #[serde(default)]
    pub private_key: Option<Text>,
    #[serde(default)]
    pub issuer: Option<Text>,
    #[serde(default)]
    pub audience: Option<Text>,
    #[serde(default = "default_login_path")]
    pub login_path: Text,
    /// Where guest tokens are issued (`/auth/guest`); unset or empty = no guest tokens.
    #[serde(default)]
    pub guest_path: Text,
    #[serde(default = "default_token_ttl")]
    pub ttl: Duration,
    #[serde(default = "default_guest_ttl")]
    pub guest_ttl: Duration,
    #[serde(default = "default_guest_role")]
    pub guest_role: Text,
    /// Scopes granted per role (the `scope` claim).
    #[serde(default)]
    pub role_scopes: BTreeMap<String, Vec<Text>>,
    /// Static claims added to every issued token.
    #[serde(default)]
    pub claims: BTreeMap<String, Text>,
    /// Login attempts allowed per client IP and per username in `login_window`.
    #[serde(default = "default_login_per_ip")]
    pub login_per_ip: Scalar<u64>,
    #[serde(default = "default_login_per_user")]
    pub login_per_username: Scalar<u64>,
    #[serde(default = "default_login_window")]
    pub login_window: Duration,
}

fn default_issuer_alg() -> Text {
    Text::from("HS256")
}
fn default_login_path() -> Text {
    Text::from("/auth/login")
}
fn default_token_ttl() -> Duration {
    Duration::secs(3600)
}
fn default_guest_ttl() -> Duration {
    Duration::secs(900)
}
fn default_guest_role() -> Text {
    Text::from("guest")
}
fn default_login_per_ip() -> Scalar<u64> {
    Scalar(20)
}
fn default_login_per_user() -> Scalar<u64> {
    Scalar(5)
}
fn default_login_window() -> Duration {
    Duration::secs(60)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticTokenConfig {
    /// Accepted bearer tokens; empty strings ignored.
    pub tokens: Vec<Secret>,
    /// Principal reported for these tokens.
    #[serde(default = "default_static_principal")]
    pub principal: Text,
    #[serde(default)]
    pub principal_header: Option<Text>,
}

fn default_static_principal() -> Text {
    Text::from("admin")
}
