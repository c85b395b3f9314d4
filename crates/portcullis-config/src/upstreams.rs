//! Named upstreams: their targets, balancer, protocol, TLS and pools, and their
//! resilience — health checks, circuit breakers, retries, down/recovery
//! notifications. `docs/upstreams.md` documents every field.

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::interp::{ByteSize, Duration, Flag, Scalar, Text};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `http://host:port[/base]` or `https://…`. May use `{param}` templates in routes.
    /// Exactly one of `url` and `targets`.
    #[serde(default)]
    pub url: Text,
    /// A group: several targets sharing the protocol, TLS and pool settings.
    #[serde(default)]
    pub targets: Vec<Spanned<GroupTargetConfig>>,
    /// How a group picks a target for each request.
    #[serde(default)]
    pub balancer: BalancerConfig,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default)]
    pub tls: UpstreamTlsConfig,
    /// Close pooled connections idle longer than this (keep it below the upstream's
    /// own keep-alive timeout).
    #[serde(default = "default_pool_idle")]
    pub pool_idle_timeout: Duration,
    /// Max idle pooled connections per host.
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle: Scalar<usize>,
    /// Active and passive health checks of the targets.
    #[serde(default)]
    pub health: crate::UpstreamHealthConfig,
    /// A circuit breaker per target.
    #[serde(default)]
    pub breaker: Option<crate::BreakerConfig>,
    /// Max connections per host in all (idle and busy); at the cap a request waits
    /// for one until the connect timeout, then gets a 503.
    #[serde(default = "default_pool_max_connections")]
    pub pool_max_connections: Scalar<usize>,
    /// Requests in flight on one HTTP/2 connection before another is opened.
    #[serde(default = "default_http2_max_streams")]
    pub http2_max_streams: Scalar<usize>,
}

/// One target of an upstream group.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GroupTargetConfig {
    /// `http://host:port[/base]` or `https://…` (no templates).
    pub url: Text,
    /// Share of requests under `round_robin` (0 takes none; at most 1000).
    #[serde(default = "default_weight")]
    pub weight: Scalar<u32>,
}

fn default_weight() -> Scalar<u32> {
    Scalar(1)
}

/// `round_robin` (smooth, weighted; default), `least_request`, or
/// `{hash: "header:x-user"}` (consistent hashing on `header:<name>`,
/// `cookie:<name>`, `ip` or `param:<name>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerConfig {
    #[default]
    RoundRobin,
    LeastRequest,
    Hash(Text),
}

pub fn default_pool_idle() -> Duration {
    Duration::secs(4)
}
pub fn default_pool_max_idle() -> Scalar<usize> {
    Scalar(256)
}
pub fn default_pool_max_connections() -> Scalar<usize> {
    Scalar(1024)
}
pub fn default_http2_max_streams() -> Scalar<usize> {
    Scalar(100)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 for `http://`, ALPN (h2 or HTTP/1.1) for `https://`.
    #[default]
    Auto,
    Http1,
    /// HTTP/2 only: h2c prior knowledge for `http://`, ALPN h2 for `https://`.
    Http2,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// Extra PEM CA bundle trusted for this upstream (besides the web PKI roots).
    #[serde(default)]
    pub ca_file: Option<Text>,
    /// Never use outside tests.
    #[serde(default)]
    pub insecure_skip_verify: Flag,
}

/// `health:` of a named upstream.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamHealthConfig {
    /// Periodic probes of every target.
    #[serde(default)]
    pub active: Option<ActiveCheckConfig>,
    /// Ejection of targets whose requests keep failing.
    #[serde(default)]
    pub passive: Option<PassiveCheckConfig>,
    /// When no target is healthy, try them all anyway (Envoy's panic mode)
    /// instead of answering 503.
    #[serde(default)]
    pub panic: Flag,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveCheckConfig {
    #[serde(default = "default_check_method")]
    pub method: Text,
    #[serde(default = "default_check_path")]
    pub path: Text,
    #[serde(default = "default_check_interval")]
    pub interval: Duration,
    #[serde(default = "default_check_timeout")]
    pub timeout: Duration,
    /// Statuses that count as healthy (default: any 2xx or 3xx).
    #[serde(default)]
    pub statuses: Vec<Scalar<u16>>,
    /// Successes in a row that bring a down target back.
    #[serde(default = "two")]
    pub healthy_threshold: Scalar<u32>,
    /// Failures in a row that take a target down.
    #[serde(default = "two")]
    pub unhealthy_threshold: Scalar<u32>,
    /// Random extra delay up to this before each round (default a tenth of the
    /// interval), so many gateways do not probe in step.
    #[serde(default)]
    pub jitter: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveCheckConfig {
    /// Failed requests in a row (connect errors, resets, timeouts, 5xx) that eject a target.
    #[serde(default = "five")]
    pub failures: Scalar<u32>,
    /// First ejection time; doubled at each ejection in a row.
    #[serde(default = "default_eject_for")]
    pub eject_for: Duration,
    #[serde(default = "default_max_eject")]
    pub max_eject: Duration,
    /// Most targets ejected at once, in percent of the group (at least one).
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: Scalar<u32>,
}

/// `breaker:` of a named upstream: per target.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Requests in flight on one target at most.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: Scalar<u32>,
    /// Requests waiting for a pooled connection to one target at most.
    #[serde(default = "default_max_concurrent")]
    pub max_pending: Scalar<u32>,
    /// Failures in a row that open the breaker.
    #[serde(default = "five")]
    pub failures: Scalar<u32>,
    /// How long it stays open before a probe request is let through.
    #[serde(default = "default_open_for")]
    pub open_for: Duration,
}

/// `retries:` of a proxy route.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Tries in all, the first included (1 = no retry).
    #[serde(default = "two")]
    pub attempts: Scalar<u32>,
    /// What is retried: `connect`, `reset`, `timeout` and statuses (`502`).
    #[serde(default = "default_retry_on")]
    pub on: Vec<Text>,
    /// Retry non-idempotent methods (POST, PATCH) too, when their body fits
    /// `replay_buffer`.
    #[serde(default)]
    pub non_idempotent: Flag,
    /// Largest request body kept for a retry; larger (or chunked) bodies are
    /// streamed and never retried.
    #[serde(default = "default_replay_buffer")]
    pub replay_buffer: ByteSize,
    /// First backoff ceiling; doubled at each retry (full jitter).
    #[serde(default = "default_backoff")]
    pub backoff: Duration,
    #[serde(default = "default_max_backoff")]
    pub max_backoff: Duration,
    /// Retries may add at most this share of the route's requests…
    #[serde(default = "default_budget_percent")]
    pub budget_percent: Scalar<u32>,
    /// …plus this many per second.
    #[serde(default = "three")]
    pub min_per_second: Scalar<u32>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: two(),
            on: default_retry_on(),
            non_idempotent: Flag(false),
            replay_buffer: default_replay_buffer(),
            backoff: default_backoff(),
            max_backoff: default_max_backoff(),
            budget_percent: default_budget_percent(),
            min_per_second: three(),
        }
    }
}

/// Top-level `notifications:`: upstream targets down for `after`, and their recovery.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationsConfig {
    /// How long a target is down before the notification (seed 002: 6 h).
    #[serde(default = "default_notify_after")]
    pub after: Duration,
    pub webhooks: Vec<Spanned<WebhookConfig>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where to POST; an empty value (`${NOTIFY_URL:-}` unset) turns it off.
    pub url: Text,
    #[serde(default)]
    pub format: WebhookFormat,
    /// Apprise tags.
    #[serde(default)]
    pub tags: Vec<Text>,
    #[serde(default = "default_webhook_timeout")]
    pub timeout: Duration,
}

/// `apprise` (`{title, body, type, tags}`, Apprise API's `/notify`) or `json`
/// (the event as structured fields).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    #[default]
    Apprise,
    Json,
}

fn default_check_method() -> Text {
    Text::from("GET")
}
fn default_check_path() -> Text {
    Text::from("/")
}
fn default_check_interval() -> Duration {
    Duration::secs(5)
}
fn default_check_timeout() -> Duration {
    Duration::secs(2)
}
fn default_eject_for() -> Duration {
    Duration::secs(10)
}
fn default_max_eject() -> Duration {
    Duration::secs(300)
}
fn default_max_ejected_percent() -> Scalar<u32> {
    Scalar(50)
}
fn default_max_concurrent() -> Scalar<u32> {
    Scalar(1024)
}
fn default_open_for() -> Duration {
    Duration::secs(10)
}
fn default_retry_on() -> Vec<Text> {
    vec![Text::from("connect"), Text::from("reset")]
}
fn default_replay_buffer() -> ByteSize {
    ByteSize(64 * 1024)
}
fn default_backoff() -> Duration {
    Duration::millis(25)
}
fn default_max_backoff() -> Duration {
    Duration::millis(250)
}
fn default_budget_percent() -> Scalar<u32> {
    Scalar(20)
}
fn default_notify_after() -> Duration {
    Duration::secs(6 * 3600)
}
fn default_webhook_timeout() -> Duration {
    Duration::secs(10)
}
fn two() -> Scalar<u32> {
    Scalar(2)
}
fn three() -> Scalar<u32> {
    Scalar(3)
}
fn five() -> Scalar<u32> {
    Scalar(5)
}
