//! Typed configuration. Each struct mirrors one YAML mapping; `docs/configuration.md`
//! documents every field. Unknown fields are errors.

use std::collections::BTreeMap;

use crate::Toggle;
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::interp::{ByteSize, Duration, Flag, Scalar, Secret, Text};
use crate::upstreams::{UpstreamConfig, UpstreamProtocol, UpstreamTlsConfig};

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the gateway accepts traffic. At least one.
    #[serde(default)]
    pub listeners: Vec<Spanned<ListenerConfig>>,
    /// The admin listener (config, routes, reload, metrics).
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    /// Shared state: embedded (default) or Valkey/Redis.
    #[serde(default)]
    pub store: crate::StoreConfig,
    /// Named authenticators that routes refer to.
    #[serde(default)]
    pub authenticators: BTreeMap<String, Spanned<crate::AuthenticatorConfig>>,
    /// Tokens the gateway issues itself (`/auth/login`, `/auth/guest`).
    #[serde(default)]
    pub token_issuer: Option<Spanned<crate::TokenIssuerConfig>>,
    /// Named upstreams that routes may reference by name instead of a URL.
    #[serde(default)]
    pub upstreams: BTreeMap<String, Spanned<UpstreamConfig>>,
    /// Pipelines declared here (routes run them with `pipeline: {name: …}`).
    #[serde(default)]
    pub pipelines: BTreeMap<String, Spanned<crate::PipelineDefConfig>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RouteConfig>>,
    /// Policies every route inherits unless it sets the key itself.
    #[serde(default)]
    pub defaults: crate::PolicyKeys,
    /// Storage of `cache` policies with `scope: local`.
    #[serde(default)]
    pub cache_storage: crate::CacheStorageConfig,
    /// Webhooks told when an upstream target is down for a while, and when it recovers.
    #[serde(default)]
    pub notifications: Option<crate::NotificationsConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    #[serde(default = "default_listener_name")]
    pub name: Text,
    /// `host:port`; port 0 picks a free port (logged at start).
    pub address: Spanned<Text>,
    /// Terminate TLS on this listener.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Accept HTTP/2 without TLS (h2c prior knowledge). TLS listeners negotiate by ALPN.
    #[serde(default = "yes")]
    pub h2c: Flag,
}

fn default_listener_name() -> Text {
    Text::from("main")
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificates chosen by SNI; the first one is the default.
    pub certificates: Vec<Spanned<CertificateConfig>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// PEM certificate chain.
    pub cert_file: Text,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Text,
    /// SNI names served with this certificate (`example.com`, `*.example.com`).
    #[serde(default)]
    pub server_names: Vec<Text>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub address: Spanned<Text>,
    /// Bearer token for every admin endpoint; empty disables the admin API's
    /// protected endpoints (only health stays open).
    #[serde(default)]
    pub token: Secret,
    /// Bearer token required for `/metrics` on the admin listener; empty = open.
    #[serde(default)]
    pub metrics_token: Secret,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Worker threads; default one per core (`--workers`, `PORTCULLIS_WORKERS` win).
    #[serde(default)]
    pub workers: Option<Scalar<usize>>,
    /// How several workers share the work (`--runtime`, `PORTCULLIS_RUNTIME` win).
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// Peers whose X-Forwarded-* / Forwarded headers are trusted (CIDRs or IPs).
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<Text>>,
    /// How long SIGTERM waits for in-flight requests.
    #[serde(default = "default_grace")]
    pub shutdown_grace: Duration,
    /// Default request body limit (per route `max_request_body` overrides).
    #[serde(default = "default_max_body")]
    pub max_request_body: ByteSize,
    /// The request id header read from clients and sent upstream.
    #[serde(default = "default_request_id_header")]
    pub request_id_header: Text,
    /// `reject` (400) or `keep` percent-encoded slashes (`%2F`) in paths.
    #[serde(default)]
    pub encoded_slashes: EncodedSlashes,
    /// Max time to read a request head from a client.
    #[serde(default = "default_header_timeout")]
    pub header_read_timeout: Duration,
    /// TTL of cached DNS answers for upstream hosts.
    #[serde(default = "default_dns_ttl")]
    pub dns_cache_ttl: Duration,
    /// Max number of cached DNS names.
    #[serde(default = "default_dns_size")]
    pub dns_cache_size: Scalar<u64>,
    /// Watch the config file's directory and reload on change.
    #[serde(default = "yes")]
    pub watch_config: Flag,
    /// How long a failed DNS lookup is remembered (templated upstreams).
    #[serde(default = "default_dns_negative_ttl")]
    pub dns_negative_ttl: Duration,
    /// Extra `hosts(5)`-format file consulted before DNS for upstream names.
    #[serde(default)]
    pub hosts_file: Option<Text>,
    /// This gateway's name in `Via` (loop detection); default random per instance.
    #[serde(default)]
    pub gateway_id: Option<Text>,
    /// Request headers whose name contains `_`: `drop` (default), `reject` (400) or `allow`.
    #[serde(default)]
    pub underscore_headers: UnderscoreHeaders,
    /// `reject` (default, 400) or `keep` `;` path parameters.
    #[serde(default)]
    pub path_parameters: PathParameters,
    /// Request headers removed from every request.
    #[serde(default = "default_strip_headers")]
    pub strip_headers: Vec<Text>,
    /// Request headers removed unless the peer is a trusted proxy.
    #[serde(default = "default_untrusted_headers")]
    pub untrusted_headers: Vec<Text>,
    /// Close a client connection with no request in flight for this long
    /// (HTTP/1 keep-alive and HTTP/2; HTTP/2 gets a GOAWAY).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Duration,
    /// Cut a client that accepts no response bytes for this long (it stopped reading).
    #[serde(default = "default_send_timeout")]
    pub send_timeout: Duration,
    /// Max client connections per process (also counts WebSocket tunnels);
    /// default 40 % of the open-files limit (two sockets per proxied connection).
    #[serde(default)]
    pub max_connections: Option<Scalar<usize>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            workers: None,
            runtime: RuntimeKind::default(),
            trusted_proxies: Vec::new(),
            shutdown_grace: default_grace(),
            max_request_body: default_max_body(),
            request_id_header: default_request_id_header(),
            encoded_slashes: EncodedSlashes::default(),
            header_read_timeout: default_header_timeout(),
            dns_cache_ttl: default_dns_ttl(),
            dns_cache_size: default_dns_size(),
            watch_config: yes(),
            dns_negative_ttl: default_dns_negative_ttl(),
            hosts_file: None,
            gateway_id: None,
            underscore_headers: UnderscoreHeaders::default(),
            path_parameters: PathParameters::default(),
            strip_headers: default_strip_headers(),
            untrusted_headers: default_untrusted_headers(),
            idle_timeout: default_idle_timeout(),
            send_timeout: default_send_timeout(),
            max_connections: None,
        }
    }
}

fn default_grace() -> Duration {
    Duration::secs(30)
}
fn default_max_body() -> ByteSize {
    ByteSize::mib(10)
}
fn default_request_id_header() -> Text {
    Text::from("x-request-id")
}
fn default_header_timeout() -> Duration {
    Duration::secs(30)
}
fn default_dns_ttl() -> Duration {
    Duration::secs(10)
}
fn default_dns_size() -> Scalar<u64> {
    Scalar(1024)
}
fn yes() -> Flag {
    Flag(true)
}
fn default_dns_negative_ttl() -> Duration {
    Duration::secs(2)
}
fn default_idle_timeout() -> Duration {
    Duration::secs(60)
}
fn default_send_timeout() -> Duration {
    Duration::secs(60)
}
fn default_strip_headers() -> Vec<Text> {
    [
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-method-override",
    ]
    .into_iter()
    .map(Text::from)
    .collect()
}
fn default_untrusted_headers() -> Vec<Text> {
    [
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-scheme",
        "x-forwarded-ssl",
        "x-host",
        "true-client-ip",
        "x-client-ip",
        "cf-connecting-ip",
    ]
    .into_iter()
    .map(Text::from)
    .collect()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnderscoreHeaders {
    #[default]
    Drop,
    Reject,
    Allow,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathParameters {
    #[default]
    Reject,
    Keep,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodedSlashes {
    #[default]
    Reject,
    Keep,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter: `info`, `debug`, `portcullis=debug,hyper=warn`. `RUST_LOG` wins.
    #[serde(default = "default_level")]
    pub level: Text,
    /// One line per request.
    #[serde(default = "yes")]
    pub access_log: Flag,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            format: LogFormat::default(),
            level: default_level(),
            access_log: yes(),
        }
    }
}

fn default_level() -> Text {
    Text::from("info")
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default = "yes")]
    pub enabled: Flag,
    #[serde(default = "default_metrics_path")]
    pub path: Text,
    /// `admin` (default; needs an `admin` listener) or `main`: serve on every listener.
    #[serde(default)]
    pub listener: MetricsListener,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: yes(),
            path: default_metrics_path(),
            listener: MetricsListener::default(),
        }
    }
}

fn default_metrics_path() -> Text {
    Text::from("/metrics")
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsListener {
    #[default]
    Admin,
    Main,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Built-in health endpoints on the main listeners; answered before routing.
    #[serde(default = "yes")]
    pub enabled: Flag,
    #[serde(default = "default_health_path")]
    pub health_path: Text,
    #[serde(default = "default_liveness_path")]
    pub liveness_path: Text,
    #[serde(default = "default_readiness_path")]
    pub readiness_path: Text,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            enabled: yes(),
            health_path: default_health_path(),
            liveness_path: default_liveness_path(),
            readiness_path: default_readiness_path(),
        }
    }
}

fn default_health_path() -> Text {
    Text::from("/health")
}
fn default_liveness_path() -> Text {
    Text::from("/healthz")
}
fn default_readiness_path() -> Text {
    Text::from("/readyz")
}

/// Gateway-wide authentication defaults.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Static bearer tokens accepted on every non-public route. Empty strings are
    /// ignored, so `${TOKEN:-}` unset means open mode.
    #[serde(default)]
    pub tokens: Vec<Secret>,
    /// Pass the gateway's own credential (`Authorization`) to the upstream.
    #[serde(default)]
    pub forward_credential: Flag,
    /// Authenticators applied to routes that have no `auth` of their own.
    #[serde(default)]
    pub default: Vec<Spanned<Text>>,
    /// Open mode on purpose: routes without auth of their own need no credential.
    #[serde(default)]
    pub open: Flag,
    /// Extra identity headers removed from every incoming request (the ones the
    /// configured authenticators set are always removed).
    #[serde(default)]
    pub identity_headers: Vec<Text>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Used in logs and metrics; default `route-<index>`.
    #[serde(default)]
    pub name: Option<Text>,
    /// Host patterns (`api.example.com`, `*.example.com`); empty = any host.
    #[serde(default)]
    pub hosts: Vec<Spanned<Text>>,
    /// Only requests that arrived on a listener bound to this local port (never
    /// the port a client writes in `Host`).
    #[serde(default)]
    pub port: Option<Scalar<u16>>,
    /// Exact path or template (`/users/{id}`, `/files/{*rest}`).
    #[serde(default)]
    pub path: Option<Spanned<Text>>,
    /// Prefix on a segment boundary, may hold params (`/fn/{name}`).
    #[serde(default)]
    pub path_prefix: Option<Spanned<Text>>,
    /// Allowed methods; empty = any.
    #[serde(default)]
    pub methods: Vec<Spanned<Text>>,
    /// No authentication on this route.
    #[serde(default)]
    pub public: Flag,
    /// Route-level auth, replacing the global `auth` for this route.
    #[serde(default)]
    pub auth: Option<RouteAuthConfig>,
    /// Request body limit (413 beyond it); default `server.max_request_body`.
    #[serde(default)]
    pub max_request_body: Option<ByteSize>,
    #[serde(default)]
    pub proxy: Option<ProxyConfig>,
    #[serde(default, rename = "static")]
    pub static_files: Option<StaticConfig>,
    #[serde(default)]
    pub respond: Option<RespondConfig>,
    #[serde(default)]
    pub redirect: Option<RedirectConfig>,
    /// Run a pipeline (sequential or parallel steps) and answer with its result.
    #[serde(default)]
    pub pipeline: Option<crate::PipelineConfig>,
    /// Call several upstreams and merge their JSON answers.
    #[serde(default)]
    pub aggregate: Option<crate::AggregateConfig>,
    // Policies (see `PolicyKeys`): each replaces the `defaults:` key of its name.
    #[serde(default)]
    pub ip: Option<Toggle<crate::IpRulesConfig>>,
    #[serde(default)]
    pub cors: Option<Toggle<crate::CorsConfig>>,
    #[serde(default)]
    pub security_headers: Option<Toggle<crate::SecurityHeadersConfig>>,
    #[serde(default)]
    pub csrf: Option<Toggle<crate::CsrfConfig>>,
    #[serde(default)]
    pub rate_limits: Option<Toggle<Vec<crate::RateLimitConfig>>>,
    #[serde(default)]
    pub headers: Option<Toggle<crate::HeadersConfig>>,
    #[serde(default)]
    pub cache: Option<Toggle<crate::CacheConfig>>,
    #[serde(default)]
    pub compression: Option<Toggle<crate::CompressionConfig>>,
    #[serde(default)]
    pub openapi: Option<Toggle<crate::OpenApiConfig>>,
}

impl RouteConfig {
    /// This route's policy keys over the gateway's `defaults:`.
    pub fn policies(&self, defaults: &crate::PolicyKeys) -> crate::PolicyKeys {
        crate::PolicyKeys {
            ip: self.ip.clone(),
            cors: self.cors.clone(),
            security_headers: self.security_headers.clone(),
            csrf: self.csrf.clone(),
            rate_limits: self.rate_limits.clone(),
            headers: self.headers.clone(),
            cache: self.cache.clone(),
            compression: self.compression.clone(),
            openapi: self.openapi.clone(),
        }
        .over(defaults)
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAuthConfig {
    /// Bearer tokens for this route (empty entries ignored; none = open).
    #[serde(default)]
    pub tokens: Vec<Secret>,
    #[serde(default)]
    pub forward_credential: Option<Flag>,
    /// Named authenticators; a request passes if any of them accepts it.
    #[serde(default)]
    pub authenticators: Vec<Spanned<Text>>,
    /// Verify a credential if one is sent; otherwise continue anonymously.
    #[serde(default)]
    pub optional: Flag,
    /// Scopes the credential must carry (all of them).
    #[serde(default)]
    pub scopes: Vec<Text>,
    /// Count requests against the API key's quota (429 `QUOTA_EXCEEDED` beyond it).
    #[serde(default)]
    pub quota: Flag,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// A URL (`http://svc:8080`, `${SVC_URL}`), a template using path params
    /// (`http://{name}:8080`), or the name of an entry in `upstreams`.
    pub upstream: Spanned<Text>,
    /// Remove the matched `path_prefix` before forwarding (`/fn/x/a` → `/a`).
    #[serde(default)]
    pub strip_prefix: Flag,
    /// Replace the path with this template (`/v2/users/{id}`, `{rest}` for a prefix's remainder).
    #[serde(default)]
    pub rewrite: Option<Spanned<Text>>,
    /// Send the client's Host header upstream instead of the upstream's own.
    #[serde(default)]
    pub preserve_host: Flag,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Overrides for an inline URL upstream (ignored when `upstream` names an entry).
    #[serde(default)]
    pub protocol: Option<UpstreamProtocol>,
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
    /// Templated upstreams: names a host param may take (globs with `*`/`?`, or
    /// regexes starting with `~`); empty = any DNS name.
    #[serde(default)]
    pub allow_names: Vec<Spanned<Text>>,
    /// Templated upstreams: addresses a resolved name may connect to.
    #[serde(default)]
    pub targets: Option<TargetsConfig>,
    /// `Upgrade` protocols forwarded (case-insensitive); default `[websocket]`.
    #[serde(default = "default_upgrades")]
    pub upgrades: Vec<Text>,
    /// Retries of failed attempts (default: groups of several targets retry
    /// idempotent requests once on connect failures and resets; `false` turns off).
    #[serde(default)]
    pub retries: Option<crate::Toggle<crate::RetryConfig>>,
    /// Event streams (`text/event-stream`): forwarded event by event, resumed with
    /// `Last-Event-ID` when the upstream breaks, heartbeats to the client.
    #[serde(default)]
    pub sse: Option<SseConfig>,
}

/// `proxy.sse`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SseConfig {
    /// Reconnect a broken upstream stream (GET requests).
    #[serde(default = "yes")]
    pub resume: Flag,
    /// Consecutive reconnection attempts before the client's stream fails.
    #[serde(default = "default_sse_attempts")]
    pub attempts: Scalar<u32>,
    #[serde(default = "default_sse_backoff")]
    pub backoff: Duration,
    #[serde(default = "default_sse_max_backoff")]
    pub max_backoff: Duration,
    /// A comment line after this much silence; `0s` turns heartbeats off.
    #[serde(default = "default_sse_heartbeat")]
    pub heartbeat: Duration,
    /// Largest single event.
    #[serde(default = "default_sse_max_event")]
    pub max_event: ByteSize,
}

fn default_sse_attempts() -> Scalar<u32> {
    Scalar(5)
}
fn default_sse_backoff() -> Duration {
    Duration(std::time::Duration::from_millis(250))
}
fn default_sse_max_backoff() -> Duration {
    Duration::secs(5)
}
fn default_sse_heartbeat() -> Duration {
    Duration::secs(15)
}
fn default_sse_max_event() -> ByteSize {
    ByteSize::mib(1)
}

fn default_upgrades() -> Vec<Text> {
    vec![Text::from("websocket")]
}

/// Address rules checked on every connect of a templated upstream.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetsConfig {
    /// When set, only these CIDRs (default: any address not denied).
    #[serde(default)]
    pub allow: Vec<Spanned<Text>>,
    /// Refused CIDRs, on top of the built-in ones (unspecified, link-local and
    /// metadata, multicast, broadcast).
    #[serde(default)]
    pub deny: Vec<Spanned<Text>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// TCP (+TLS) connect.
    #[serde(default = "default_connect")]
    pub connect: Duration,
    /// Until the upstream's response head arrives (504 beyond).
    #[serde(default = "default_response")]
    pub response: Duration,
    /// Max silence between body chunks in either direction; a stream that keeps
    /// sending is never cut by it.
    #[serde(default = "default_idle")]
    pub idle: Duration,
    /// Whole exchange including the body; unset = no limit (streams may run forever).
    #[serde(default)]
    pub total: Option<Duration>,
    /// Max silence while reading the client's request body (408 if no response yet).
    #[serde(default = "default_body")]
    pub body: Duration,
    /// Max silence on an upgraded (WebSocket) tunnel, both directions.
    #[serde(default = "default_tunnel_idle")]
    pub tunnel_idle: Duration,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            connect: default_connect(),
            response: default_response(),
            idle: default_idle(),
            total: None,
            body: default_body(),
            tunnel_idle: default_tunnel_idle(),
        }
    }
}

fn default_connect() -> Duration {
    Duration::secs(10)
}
fn default_response() -> Duration {
    Duration::secs(60)
}
fn default_idle() -> Duration {
    Duration::secs(300)
}
fn default_body() -> Duration {
    Duration::secs(60)
}
fn default_tunnel_idle() -> Duration {
    Duration::secs(3600)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticConfig {
    pub dir: Spanned<Text>,
    #[serde(default = "default_index")]
    pub index: Text,
    /// Serve `index` for unknown paths that look like pages (no file extension).
    #[serde(default)]
    pub spa_fallback: Flag,
    /// `Cache-Control` sent with files.
    #[serde(default)]
    pub cache_control: Option<Text>,
    /// `deny` (default: any path segment starting with `.` is a 404) or `allow`.
    #[serde(default)]
    pub dotfiles: Dotfiles,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dotfiles {
    #[default]
    Deny,
    Allow,
}

fn default_index() -> Text {
    Text::from("index.html")
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RespondConfig {
    #[serde(default = "default_status")]
    pub status: Scalar<u16>,
    #[serde(default)]
    pub headers: BTreeMap<String, Text>,
    #[serde(default)]
    pub body: Text,
    /// Content-Type; default `text/plain; charset=utf-8`.
    #[serde(default)]
    pub content_type: Option<Text>,
}

fn default_status() -> Scalar<u16> {
    Scalar(200)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// Target URL or path; `{param}` templates allowed.
    pub to: Spanned<Text>,
    #[serde(default = "default_redirect_status")]
    pub status: Scalar<u16>,
    /// Append the request's query string.
    #[serde(default = "yes")]
    pub keep_query: Flag,
}

fn default_redirect_status() -> Scalar<u16> {
    Scalar(302)
}

/// `thread_per_core`: one single-threaded runtime per worker, each serving the
/// connections handed to it; `work_stealing`: tokio's multi-thread scheduler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    #[default]
    ThreadPerCore,
    WorkStealing,
}

impl std::str::FromStr for RuntimeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "thread_per_core" => Ok(RuntimeKind::ThreadPerCore),
            "work_stealing" => Ok(RuntimeKind::WorkStealing),
            other => Err(format!(
                "{other:?}: expected thread_per_core or work_stealing"
            )),
        }
    }
}
