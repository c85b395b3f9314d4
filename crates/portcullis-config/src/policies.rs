//! Per-route policies and the gateway-wide `defaults:` they inherit from.
//!
//! A route's own key replaces the default's whole key; `false` (or `off`) turns an
//! inherited policy off for that route.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, value::MapAccessDeserializer, value::SeqAccessDeserializer, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use serde_saphyr::Spanned;

use crate::{ByteSize, Duration, Flag, Scalar, Text};

/// A policy key: `false`/`off` turns the policy off, `true` takes its preset, a map
/// (or a list, for list-valued policies) configures it.
#[derive(Debug, Clone, PartialEq)]
pub enum Toggle<T> {
    Off,
    On(T),
}

impl<T> Toggle<T> {
    pub fn as_ref(&self) -> Option<&T> {
        match self {
            Toggle::Off => None,
            Toggle::On(t) => Some(t),
        }
    }
}

impl<T: Serialize> Serialize for Toggle<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Toggle::Off => s.serialize_bool(false),
            Toggle::On(t) => t.serialize(s),
        }
    }
}

impl<'de, T: Deserialize<'de> + Default> Deserialize<'de> for Toggle<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de> + Default> Visitor<'de> for V<T> {
            type Value = Toggle<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("false, true, or the policy's settings")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Toggle<T>, E> {
                Ok(if v {
                    Toggle::On(T::default())
                } else {
                    Toggle::Off
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Toggle<T>, E> {
                match v.trim().to_ascii_lowercase().as_str() {
                    "false" | "off" | "no" => Ok(Toggle::Off),
                    "true" | "on" | "yes" => Ok(Toggle::On(T::default())),
                    other => Err(E::custom(format!(
                        "expected false, true or settings, got {other:?}"
                    ))),
                }
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Toggle<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Toggle::On)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Toggle<T>, A::Error> {
                T::deserialize(SeqAccessDeserializer::new(seq)).map(Toggle::On)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// The policy keys a route and `defaults:` share.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyKeys {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Toggle<IpRulesConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<Toggle<CorsConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_headers: Option<Toggle<SecurityHeadersConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csrf: Option<Toggle<CsrfConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<Toggle<Vec<RateLimitConfig>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Toggle<HeadersConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Toggle<CacheConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Toggle<CompressionConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openapi: Option<Toggle<OpenApiConfig>>,
}

/// Request validation against an OpenAPI 3.0 or 3.1 document.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OpenApiConfig {
    /// The document (YAML or JSON), relative to the config file (required).
    #[serde(default)]
    pub document: Option<Spanned<Text>>,
    /// A request whose operation the document lacks: 404, or 405 when the path is
    /// known (otherwise it passes unvalidated).
    #[serde(default)]
    pub strict: Flag,
    /// Prefix of request paths before the document's paths (`/api`).
    #[serde(default)]
    pub base_path: Text,
    /// Largest JSON body validated (413 beyond).
    #[serde(default = "default_openapi_max_body")]
    pub max_body: ByteSize,
    /// Most problems listed in a 400.
    #[serde(default = "default_openapi_max_errors")]
    pub max_errors: Scalar<u32>,
}

impl Default for OpenApiConfig {
    fn default() -> Self {
        OpenApiConfig {
            document: None,
            strict: Flag(false),
            base_path: Text::default(),
            max_body: default_openapi_max_body(),
            max_errors: default_openapi_max_errors(),
        }
    }
}

fn default_openapi_max_body() -> ByteSize {
    ByteSize::mib(1)
}
fn default_openapi_max_errors() -> Scalar<u32> {
    Scalar(10)
}

impl PolicyKeys {
    /// The route's keys over the defaults: a key the route sets (even to `false`)
    /// replaces the default's.
    pub fn over(&self, defaults: &PolicyKeys) -> PolicyKeys {
        fn pick<T: Clone>(own: &Option<Toggle<T>>, def: &Option<Toggle<T>>) -> Option<Toggle<T>> {
            own.clone().or_else(|| def.clone())
        }
        PolicyKeys {
            ip: pick(&self.ip, &defaults.ip),
            cors: pick(&self.cors, &defaults.cors),
            security_headers: pick(&self.security_headers, &defaults.security_headers),
            csrf: pick(&self.csrf, &defaults.csrf),
            rate_limits: pick(&self.rate_limits, &defaults.rate_limits),
            headers: pick(&self.headers, &defaults.headers),
            cache: pick(&self.cache, &defaults.cache),
            compression: pick(&self.compression, &defaults.compression),
            openapi: pick(&self.openapi, &defaults.openapi),
        }
    }
}

/// Client IP allow/deny lists (CIDRs or addresses, IPv4 and IPv6). Deny wins; a
/// non-empty `allow` admits only what it lists.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IpRulesConfig {
    #[serde(default)]
    pub allow: Vec<Text>,
    #[serde(default)]
    pub deny: Vec<Text>,
}

/// Cross-origin resource sharing, answered by the gateway.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// `https://app.example.com`, `https://*.example.com`, `*`, or `null`; an entry
    /// may hold a comma list (`${ALLOWED_ORIGINS}`).
    #[serde(default)]
    pub allowed_origins: Vec<Text>,
    #[serde(default)]
    pub allow_credentials: Flag,
    #[serde(default = "default_cors_methods")]
    pub allowed_methods: Vec<Text>,
    /// Empty: the headers a preflight asks for are allowed.
    #[serde(default)]
    pub allowed_headers: Vec<Text>,
    #[serde(default)]
    pub exposed_headers: Vec<Text>,
    #[serde(default = "default_cors_max_age")]
    pub max_age: Duration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allowed_origins: Vec::new(),
            allow_credentials: Flag(false),
            allowed_methods: default_cors_methods(),
            allowed_headers: Vec::new(),
            exposed_headers: Vec::new(),
            max_age: default_cors_max_age(),
        }
    }
}

fn default_cors_methods() -> Vec<Text> {
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
        .into_iter()
        .map(Text::from)
        .collect()
}

fn default_cors_max_age() -> Duration {
    Duration::secs(600)
}

/// helmet-style response headers. Each value replaces the preset; `""` removes it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityHeadersConfig {
    #[serde(default = "default_csp")]
    pub content_security_policy: Text,
    /// Sent only on connections that arrived over TLS.
    #[serde(default = "default_hsts")]
    pub strict_transport_security: Text,
    #[serde(default = "default_frame_options")]
    pub x_frame_options: Text,
    #[serde(default = "default_nosniff")]
    pub x_content_type_options: Text,
    #[serde(default = "default_referrer_policy")]
    pub referrer_policy: Text,
    #[serde(default = "default_same_origin")]
    pub cross_origin_opener_policy: Text,
    #[serde(default = "default_same_origin")]
    pub cross_origin_resource_policy: Text,
    /// Further headers to set (`Permissions-Policy`, …).
    #[serde(default)]
    pub extra: BTreeMap<String, Text>,
    /// Upstream response headers to drop (default `X-Powered-By`).
    #[serde(default = "default_security_remove")]
    pub remove: Vec<Text>,
    /// `Server` on every response: a value sets it, `""` drops it; unset keeps the
    /// upstream's.
    #[serde(default)]
    pub server: Option<Text>,
    /// Replace the upstream's own values (default: an upstream's header wins).
    #[serde(default)]
    pub force: Flag,
}

impl Default for SecurityHeadersConfig {
    fn default() -> Self {
        SecurityHeadersConfig {
            content_security_policy: default_csp(),
            strict_transport_security: default_hsts(),
            x_frame_options: default_frame_options(),
            x_content_type_options: default_nosniff(),
            referrer_policy: default_referrer_policy(),
            cross_origin_opener_policy: default_same_origin(),
            cross_origin_resource_policy: default_same_origin(),
            extra: BTreeMap::new(),
            remove: default_security_remove(),
            server: None,
            force: Flag(false),
        }
    }
}

fn default_csp() -> Text {
    Text::from("default-src 'self';base-uri 'self';font-src 'self' https: data:;form-action 'self';frame-ancestors 'self';img-src 'self' data:;object-src 'none';script-src 'self';script-src-attr 'none';style-src 'self' https: 'unsafe-inline';upgrade-insecure-requests")
}
fn default_hsts() -> Text {
    Text::from("max-age=31536000; includeSubDomains")
}
fn default_frame_options() -> Text {
    Text::from("SAMEORIGIN")
}
fn default_nosniff() -> Text {
    Text::from("nosniff")
}
fn default_referrer_policy() -> Text {
    Text::from("no-referrer")
}
fn default_same_origin() -> Text {
    Text::from("same-origin")
}
fn default_security_remove() -> Vec<Text> {
    vec![Text::from("x-powered-by")]
}

/// Cross-site request forgery protection for cookie-authenticated requests.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CsrfConfig {
    /// Origins allowed to send unsafe requests besides the gateway's own; empty
    /// takes the route's CORS origins.
    #[serde(default)]
    pub allowed_origins: Vec<Text>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitAlgorithm {
    #[default]
    SlidingWindow,
    TokenBucket,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitScope {
    /// In this process.
    #[default]
    Local,
    /// Through the store: exact across instances sharing a Valkey/Redis.
    Cluster,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreFailure {
    /// Admit the request uncounted.
    #[default]
    FailOpen,
    /// Refuse it with 503.
    FailClosed,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitHeaders {
    /// IETF `RateLimit-Policy` and `RateLimit`.
    #[default]
    Ietf,
    /// `X-RateLimit-Limit`, `-Remaining`, `-Reset`.
    Legacy,
    Both,
    None,
}

/// One limit: `{requests: 60, per: 1m, by: ip}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Named in metrics and in `RateLimit-Policy`; default `<route>-<index>`.
    #[serde(default)]
    pub name: Option<Text>,
    pub requests: u64,
    pub per: Duration,
    /// What is counted: `ip`, `principal`, `api_key`, `header:<name>`,
    /// `cookie:<name>`, `param:<name>`, or several joined with `+`.
    #[serde(default = "default_rate_key")]
    pub by: Text,
    #[serde(default)]
    pub algorithm: RateLimitAlgorithm,
    /// Token bucket: the bucket's size (default `requests`).
    #[serde(default)]
    pub burst: Option<u64>,
    #[serde(default)]
    pub scope: RateLimitScope,
    #[serde(default)]
    pub on_store_error: StoreFailure,
    /// IPv6 clients are counted by this prefix (default 64).
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
    #[serde(default)]
    pub headers: RateLimitHeaders,
}

fn default_rate_key() -> Text {
    Text::from("ip")
}
fn default_ipv6_prefix() -> u8 {
    64
}

/// Header transforms, request (to the upstream) and response (to the client).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeadersConfig {
    #[serde(default)]
    pub request: HeaderOps,
    #[serde(default)]
    pub response: HeaderOps,
}

/// Values are templates: `{param}`, `{request_id}`, `{client_ip}`, `{principal}`,
/// `{claim.<name>}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    #[serde(default)]
    pub add: BTreeMap<String, Text>,
    #[serde(default)]
    pub set: BTreeMap<String, Text>,
    #[serde(default)]
    pub remove: Vec<Text>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheScope {
    /// In this process, bounded by `cache_storage.max_bytes`.
    #[default]
    Local,
    /// In the store (shared by instances on one Valkey/Redis).
    Cluster,
}

/// Response cache for GET and HEAD.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Freshness when the upstream gives none (`max-age`/`s-maxage` win).
    #[serde(default = "default_cache_ttl")]
    pub ttl: Duration,
    /// The response is the same for every principal (else the key includes it).
    #[serde(default)]
    pub shared: Flag,
    /// Cache responses that set cookies (never by default).
    #[serde(default)]
    pub cache_set_cookie: Flag,
    /// Serve stale for this long while one request refreshes.
    #[serde(default)]
    pub stale_while_revalidate: Option<Duration>,
    /// Bodies larger than this are passed through uncached.
    #[serde(default = "default_cache_max_body")]
    pub max_body: ByteSize,
    #[serde(default)]
    pub scope: CacheScope,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            ttl: default_cache_ttl(),
            shared: Flag(false),
            cache_set_cookie: Flag(false),
            stale_while_revalidate: None,
            max_body: default_cache_max_body(),
            scope: CacheScope::Local,
        }
    }
}

fn default_cache_ttl() -> Duration {
    Duration::secs(60)
}
fn default_cache_max_body() -> ByteSize {
    ByteSize(1024 * 1024)
}

/// Response compression.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    /// In order of preference when the client accepts several.
    #[serde(default = "default_encodings")]
    pub algorithms: Vec<Text>,
    /// Responses known to be smaller are sent as they are.
    #[serde(default = "default_min_size")]
    pub min_size: ByteSize,
    /// Compressible media types (`text/*` style prefixes allowed).
    #[serde(default = "default_compressible")]
    pub content_types: Vec<Text>,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            algorithms: default_encodings(),
            min_size: default_min_size(),
            content_types: default_compressible(),
        }
    }
}

fn default_encodings() -> Vec<Text> {
    ["br", "zstd", "gzip"].into_iter().map(Text::from).collect()
}
fn default_min_size() -> ByteSize {
    ByteSize(1024)
}
fn default_compressible() -> Vec<Text> {
    [
        "text/*",
        "application/json",
        "application/javascript",
        "application/xml",
        "application/problem+json",
        "image/svg+xml",
    ]
    .into_iter()
    .map(Text::from)
    .collect()
}

/// Storage behind `cache` policies with `scope: local`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheStorageConfig {
    #[serde(default = "default_cache_bytes")]
    pub max_bytes: ByteSize,
}

impl Default for CacheStorageConfig {
    fn default() -> Self {
        CacheStorageConfig {
            max_bytes: default_cache_bytes(),
        }
    }
}

fn default_cache_bytes() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_keys(yaml: &str) -> PolicyKeys {
        serde_saphyr::from_str(yaml).expect("parses")
    }

    #[test]
    fn toggles_parse_off_on_and_settings() {
        let k = route_keys("cors: false\nsecurity_headers: true\ncompression: {min_size: 10}\nrate_limits: [{requests: 60, per: 1m, by: ip}]\n");
        assert_eq!(k.cors, Some(Toggle::Off));
        assert_eq!(
            k.security_headers,
            Some(Toggle::On(SecurityHeadersConfig::default()))
        );
        let Some(Toggle::On(c)) = &k.compression else {
            panic!("compression on")
        };
        assert_eq!(c.min_size, ByteSize(10));
        let Some(Toggle::On(limits)) = &k.rate_limits else {
            panic!("limits on")
        };
        assert_eq!(limits[0].requests, 60);
        assert_eq!(limits[0].per, Duration::secs(60));
        assert!(serde_saphyr::from_str::<PolicyKeys>("cors: maybe\n").is_err());
        assert!(serde_saphyr::from_str::<PolicyKeys>("cors: {origins: [x]}\n").is_err());
    }

    #[test]
    fn route_keys_replace_defaults_and_false_turns_off() {
        let defaults = route_keys("cors: {allowed_origins: [a]}\nsecurity_headers: true\n");
        let own = route_keys("cors: false\n");
        let merged = own.over(&defaults);
        assert_eq!(merged.cors, Some(Toggle::Off));
        assert!(matches!(merged.security_headers, Some(Toggle::On(_))));
        assert_eq!(merged.cache, None);
    }
}
