//! Compiles a parsed [`Config`] into the immutable runtime [`Snapshot`] that requests
//! read. Compilation checks everything the YAML types cannot (paths, URLs, route
//! conflicts, certificates) and reports each problem with its file and line.
//! A snapshot is swapped in atomically; requests keep the one they started with.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::{HeaderValue, Method};
use ipnet::IpNet;
use portcullis_config::{
    Config, ConfigError, ConfigErrors, EncodedSlashes, Location, MetricsListener, RouteConfig,
};
use portcullis_routing::{
    EncodedSlash, HostPattern, NormalizeOptions, PathPattern, RouteSpec, RouteTable,
    RouteTableBuilder,
};

use crate::auth::{AuthPolicy, Authenticator, TokenSources};
use crate::tls::CertStore;
use crate::upstream::{ClientRegistry, ClientSettings};

pub struct Snapshot {
    /// The config it was compiled from (served redacted by `/admin/config`).
    pub config: Config,
    pub source: PathBuf,
    pub routes: RouteTable<Arc<Route>>,
    pub route_count: usize,
    pub certs: HashMap<String, CertStore>,
    pub listeners: Vec<ListenerSpec>,
    pub admin: Option<AdminSpec>,
    pub trusted_proxies: Vec<IpNet>,
    pub request_id_header: HeaderName,
    pub normalize: NormalizeOptions,
    pub health: Option<HealthPaths>,
    pub metrics_path: Option<String>,
    pub metrics_on_main: bool,
    pub access_log: bool,
    pub shutdown_grace: Duration,
    pub header_read_timeout: Duration,
    /// Close client connections with no request in flight for this long.
    pub idle_timeout: Duration,
    /// Cut a client whose socket accepts no bytes for this long.
    pub send_timeout: Duration,
    pub used_clients: Vec<ClientSettings>,
    /// What clients may not send (identity, hop-by-hop, underscored, rewrite headers).
    pub header_rules: crate::sanitize::HeaderRules,
    /// Our `Via` element (loop detection).
    pub via: ViaHeaders,
    /// The API-key cache shared by the api_key authenticators and the admin API.
    pub api_keys: portcullis_auth::apikey::ApiKeys,
    /// `/auth/login` and `/auth/guest`, when `token_issuer` is configured.
    pub login: Option<crate::login::LoginService>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub name: String,
    pub address: String,
    pub tls: bool,
    pub h2c: bool,
}

#[derive(Debug, Clone)]
pub struct AdminSpec {
    pub address: String,
    pub token: Option<Arc<[u8]>>,
    pub metrics_token: Option<Arc<[u8]>>,
}

/// `Via: <version> <gateway-id>` for each protocol version a client may speak.
pub struct ViaHeaders {
    pub id: Arc<str>,
    http10: HeaderValue,
    http11: HeaderValue,
    http2: HeaderValue,
}

impl ViaHeaders {
    fn new(id: Arc<str>) -> Result<Self, String> {
        let make = |v: &str| {
            HeaderValue::from_str(&format!("{v} {id}"))
                .map_err(|_| format!("{id:?} is not usable in a Via header"))
        };
        Ok(ViaHeaders {
            http10: make("1.0")?,
            http11: make("1.1")?,
            http2: make("2.0")?,
            id,
        })
    }

    pub fn for_version(&self, v: http::Version) -> &HeaderValue {
        match v {
            http::Version::HTTP_10 | http::Version::HTTP_09 => &self.http10,
            http::Version::HTTP_2 | http::Version::HTTP_3 => &self.http2,
            _ => &self.http11,
        }
    }
}

#[derive(Debug, Clone)]
pub struct HealthPaths {
    pub health: String,
    pub liveness: String,
    pub readiness: String,
}

pub use crate::action::{
    Action, FixedTarget, ProxyAction, RedirectAction, RespondAction, StaticAction, Target,
};

pub struct Route {
    pub name: Arc<str>,
    pub auth: AuthPolicy,
    pub max_body: u64,
    pub action: Action,
}

/// Collects errors with positions.
pub(crate) struct Errors<'a> {
    pub(crate) file: &'a Path,
    list: Vec<ConfigError>,
}

impl Errors<'_> {
    pub(crate) fn push(
        &mut self,
        location: Location,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.list
            .push(ConfigError::at(self.file, location, field, message));
    }
}

pub async fn compile(
    config: Config,
    source: &Path,
    clients: &ClientRegistry,
    store: &Arc<dyn portcullis_store::Store>,
    instance_id: &Arc<str>,
) -> Result<Snapshot, ConfigErrors> {
    let mut errors = Errors {
        file: source,
        list: Vec::new(),
    };

    // Listeners and their certificates.
    let mut listeners = Vec::new();
    let mut certs = HashMap::new();
    let mut names = HashSet::new();
    if config.listeners.is_empty() {
        errors.push(
            Location::UNKNOWN,
            "listeners",
            "at least one listener is required",
        );
    }
    for (i, l) in config.listeners.iter().enumerate() {
        let field = format!("listeners[{i}]");
        let name = l.value.name.to_string();
        if !names.insert(name.clone()) {
            errors.push(
                l.referenced,
                format!("{field}.name"),
                format!("duplicate listener name {name:?}"),
            );
        }
        let address = l.value.address.value.to_string();
        if address.parse::<SocketAddr>().is_err() {
            errors.push(
                l.value.address.referenced,
                format!("{field}.address"),
                format!("{address:?} is not an IP:port address"),
            );
        }
        if let Some(tls) = &l.value.tls {
            let mut store = CertStore::default();
            if tls.certificates.is_empty() {
                errors.push(
                    l.referenced,
                    format!("{field}.tls.certificates"),
                    "at least one certificate is required",
                );
            }
            for (j, c) in tls.certificates.iter().enumerate() {
                let cert_file = relative_to(source, &c.value.cert_file);
                let key_file = relative_to(source, &c.value.key_file);
                match crate::tls::load_certified_key(&cert_file, &key_file) {
                    Ok(key) => {
                        let names: Vec<String> =
                            c.value.server_names.iter().map(|n| n.to_string()).collect();
                        store.add(key, &names);
                    }
                    Err(e) => {
                        errors.push(c.referenced, format!("{field}.tls.certificates[{j}]"), e)
                    }
                }
            }
            certs.insert(name.clone(), store);
        }
        listeners.push(ListenerSpec {
            name,
            address,
            tls: l.value.tls.is_some(),
            h2c: l.value.h2c.0,
        });
    }

    let admin = config.admin.as_ref().map(|a| {
        let address = a.address.value.to_string();
        if address.parse::<SocketAddr>().is_err() {
            errors.push(
                a.address.referenced,
                "admin.address",
                format!("{address:?} is not an IP:port address"),
            );
        }
        let token = (!a.token.is_empty()).then(|| Arc::from(a.token.expose().as_bytes()));
        let metrics_token =
            (!a.metrics_token.is_empty()).then(|| Arc::from(a.metrics_token.expose().as_bytes()));
        AdminSpec {
            address,
            token,
            metrics_token,
        }
    });
    if config.metrics.enabled.0
        && config.metrics.listener == MetricsListener::Admin
        && admin.is_none()
    {
        // Not an error: metrics simply have nowhere to go. Say so in `check`.
        tracing::warn!("metrics.listener is `admin` but no admin listener is configured; /metrics is not served");
    }

    let mut trusted_proxies = Vec::new();
    for (i, p) in config.server.trusted_proxies.iter().enumerate() {
        let s = p.value.trim();
        let parsed = s
            .parse::<IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => errors.push(
                p.referenced,
                format!("server.trusted_proxies[{i}]"),
                format!("{s:?} is not an IP address or CIDR"),
            ),
        }
    }

    let request_id_header = match HeaderName::from_bytes(config.server.request_id_header.as_bytes())
    {
        Ok(h) => h,
        Err(_) => {
            errors.push(
                Location::UNKNOWN,
                "server.request_id_header",
                "not a valid header name",
            );
            HeaderName::from_static("x-request-id")
        }
    };

    // `0` would mean "cut at once", never "off": refuse it where a deadline matters.
    for (field, d) in [
        (
            "server.header_read_timeout",
            config.server.header_read_timeout,
        ),
        ("server.idle_timeout", config.server.idle_timeout),
        ("server.send_timeout", config.server.send_timeout),
    ] {
        if d.get().is_zero() {
            errors.push(Location::UNKNOWN, field, "must be longer than 0");
        }
    }
    for (i, r) in config.routes.iter().enumerate() {
        let Some(p) = &r.value.proxy else { continue };
        let t = &p.timeouts;
        for (key, d) in [
            ("connect", Some(t.connect)),
            ("response", Some(t.response)),
            ("idle", Some(t.idle)),
            ("body", Some(t.body)),
            ("tunnel_idle", Some(t.tunnel_idle)),
            ("total", t.total),
        ] {
            if d.is_some_and(|d| d.get().is_zero()) {
                errors.push(
                    r.referenced,
                    format!("routes[{i}].proxy.timeouts.{key}"),
                    "must be longer than 0",
                );
            }
        }
    }

    for (field, path) in [
        ("health.health_path", &config.health.health_path),
        ("health.liveness_path", &config.health.liveness_path),
        ("health.readiness_path", &config.health.readiness_path),
        ("metrics.path", &config.metrics.path),
    ] {
        if !path.starts_with('/') {
            errors.push(Location::UNKNOWN, field, "must start with `/`");
        }
    }

    // Routes.
    let (authenticators, api_keys) =
        compile_authenticators(&config, source, store, &mut errors).await;
    let mut identity_headers: HashSet<HeaderName> = authenticators
        .values()
        .flat_map(|a| a.identity_headers())
        .collect();
    for h in &config.auth.identity_headers {
        match HeaderName::from_bytes(h.as_bytes()) {
            Ok(name) => {
                identity_headers.insert(name);
            }
            Err(_) => errors.push(
                Location::UNKNOWN,
                "auth.identity_headers",
                format!("{:?} is not a header name", h.as_str()),
            ),
        }
    }
    let mut strip = HashSet::new();
    let mut untrusted = HashSet::new();
    for (field, list, out) in [
        (
            "server.strip_headers",
            &config.server.strip_headers,
            &mut strip,
        ),
        (
            "server.untrusted_headers",
            &config.server.untrusted_headers,
            &mut untrusted,
        ),
    ] {
        for h in list {
            if let Some(name) = header_name(h, Location::UNKNOWN, field.to_owned(), &mut errors) {
                out.insert(name);
            }
        }
    }
    let header_rules = crate::sanitize::HeaderRules::new(
        crate::sanitize::gateway_headers(&request_id_header),
        &identity_headers,
        config.server.underscore_headers,
        strip,
        untrusted,
    );
    let gateway_id: Arc<str> = match config.server.gateway_id.as_ref().filter(|g| !g.is_empty()) {
        Some(id) => Arc::from(id.as_str()),
        None => instance_id.clone(),
    };
    let via = match ViaHeaders::new(gateway_id) {
        Ok(v) => Some(v),
        Err(e) => {
            errors.push(Location::UNKNOWN, "server.gateway_id", e);
            None
        }
    };
    if config
        .server
        .gateway_id
        .as_ref()
        .is_some_and(|g| g.contains(|c: char| c.is_whitespace() || c == ','))
    {
        errors.push(
            Location::UNKNOWN,
            "server.gateway_id",
            "must not contain spaces or commas",
        );
    }

    // `open: true` with a list of unset tokens is FnKit's "no token, open mode",
    // written down on purpose; without `open`, an all-empty list is an error.
    let all_empty = config.auth.tokens.iter().all(|t| t.is_empty());
    let global_static = if config.auth.open.0 && all_empty {
        None
    } else {
        match static_authenticator("auth.tokens", &config.auth.tokens) {
            Ok(a) => a,
            Err(e) => {
                errors.push(Location::UNKNOWN, "auth.tokens", e);
                None
            }
        }
    };
    let mut global_set: Vec<Arc<Authenticator>> = global_static.into_iter().collect();
    for (i, name) in config.auth.default.iter().enumerate() {
        match authenticators.get(name.value.as_str()) {
            Some(a) => global_set.push(a.clone()),
            None => errors.push(
                name.referenced,
                format!("auth.default[{i}]"),
                format!("no authenticator named {:?}", name.value.as_str()),
            ),
        }
    }
    if config.auth.open.0 && !global_set.is_empty() {
        errors.push(
            Location::UNKNOWN,
            "auth.open",
            "`open: true` cannot be combined with `tokens` or `default`",
        );
    }
    let mut open_routes = Vec::new();
    // Credentials configured somewhere: a route left without any is a mistake, not
    // open mode, unless `auth.open` says so.
    let credentials_configured = !config.authenticators.is_empty()
        || !global_set.is_empty()
        || config.routes.iter().any(|r| {
            r.value
                .auth
                .as_ref()
                .is_some_and(|a| !a.tokens.is_empty() || !a.authenticators.is_empty())
        });
    let mut table = RouteTableBuilder::new();
    let mut used_clients = Vec::new();
    let mut route_names = HashSet::new();
    for (i, r) in config.routes.iter().enumerate() {
        let field = format!("routes[{i}]");
        let route = &r.value;
        let name = route
            .name
            .as_ref()
            .map(|n| n.to_string())
            .unwrap_or_else(|| format!("route-{i}"));
        if !route_names.insert(name.clone()) {
            errors.push(
                r.referenced,
                format!("{field}.name"),
                format!("duplicate route name {name:?}"),
            );
        }
        let Some((pattern, params)) = path_pattern(route, r.referenced, &field, &mut errors) else {
            continue;
        };
        let methods = match parse_methods(route, &field, &mut errors) {
            Some(m) => m,
            None => continue,
        };
        let auth = route_policy(
            &config,
            route,
            r.referenced,
            &field,
            &authenticators,
            &global_set,
            &mut errors,
        );
        if matches!(auth, AuthPolicy::Open) {
            if credentials_configured && !config.auth.open.0 {
                errors.push(
                    r.referenced,
                    format!("{field}.auth"),
                    "no authenticator applies to this route while others are configured; give it `auth`, mark it `public: true`, or set `auth.open: true`",
                );
            }
            open_routes.push(name.clone());
        }
        let is_prefix = matches!(pattern, PathPattern::Prefix(_));
        let Some(action) = crate::action::compile(
            &config,
            route,
            r.referenced,
            &field,
            &params,
            is_prefix,
            clients,
            &mut used_clients,
            &mut errors,
        ) else {
            continue;
        };
        let compiled = Arc::new(Route {
            name: Arc::from(name.as_str()),
            auth,
            max_body: route
                .max_request_body
                .unwrap_or(config.server.max_request_body)
                .0,
            action,
        });
        let hosts: Vec<HostPattern> = if route.hosts.is_empty() {
            vec![HostPattern::Any]
        } else {
            route
                .hosts
                .iter()
                .enumerate()
                .filter_map(|(j, h)| match HostPattern::parse(&h.value) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        errors.push(h.referenced, format!("{field}.hosts[{j}]"), e.to_string());
                        None
                    }
                })
                .collect()
        };
        for host in hosts {
            let spec = RouteSpec {
                host,
                port: route.port.map(|p| p.0),
                path: pattern.clone(),
                methods: methods.clone(),
            };
            if let Err(e) = table.add(spec, compiled.clone()) {
                errors.push(r.referenced, field.clone(), format!("route {name:?}: {e}"));
            }
        }
    }

    let login = config
        .token_issuer
        .as_ref()
        .and_then(|t| compile_login(&t.value, t.referenced, source, store, &mut errors));

    if !errors.list.is_empty() {
        return Err(ConfigErrors(errors.list));
    }
    if !open_routes.is_empty() {
        tracing::warn!(
            routes = %open_routes.join(","),
            explicit = config.auth.open.0,
            "open mode: these routes accept requests without any credential"
        );
    }
    let routes = table.build();
    let health = config.health.enabled.0.then(|| HealthPaths {
        health: config.health.health_path.to_string(),
        liveness: config.health.liveness_path.to_string(),
        readiness: config.health.readiness_path.to_string(),
    });
    let metrics_path = config
        .metrics
        .enabled
        .0
        .then(|| config.metrics.path.to_string());
    Ok(Snapshot {
        route_count: config.routes.len(),
        routes,
        certs,
        listeners,
        admin,
        trusted_proxies,
        request_id_header,
        normalize: NormalizeOptions {
            encoded_slash: match config.server.encoded_slashes {
                EncodedSlashes::Reject => EncodedSlash::Reject,
                EncodedSlashes::Keep => EncodedSlash::Keep,
            },
            path_parameters: match config.server.path_parameters {
                portcullis_config::PathParameters::Reject => {
                    portcullis_routing::PathParameters::Reject
                }
                portcullis_config::PathParameters::Keep => portcullis_routing::PathParameters::Keep,
            },
        },
        health,
        metrics_on_main: config.metrics.listener == MetricsListener::Main,
        metrics_path,
        access_log: config.logging.access_log.0,
        shutdown_grace: config.server.shutdown_grace.get(),
        header_read_timeout: config.server.header_read_timeout.get(),
        idle_timeout: config.server.idle_timeout.get(),
        send_timeout: config.server.send_timeout.get(),
        used_clients,
        header_rules,
        via: via.ok_or_else(|| ConfigErrors(Vec::new()))?,
        api_keys,
        login,
        source: source.to_owned(),
        config,
    })
}

/// The implicit authenticator of a `tokens:` list; None for no list. A list whose
/// every value is empty (an unset `${TOKEN:-}`) is an error: an empty secret never
/// opens a route. Open mode is `auth: {open: true}` or no tokens anywhere.
fn static_authenticator(
    name: &str,
    tokens: &[portcullis_config::Secret],
) -> Result<Option<Arc<Authenticator>>, String> {
    if tokens.is_empty() {
        return Ok(None);
    }
    let tokens: Vec<Box<[u8]>> = tokens
        .iter()
        .filter(|t| !t.is_empty())
        .map(|t| t.expose().as_bytes().into())
        .collect();
    if tokens.is_empty() {
        return Err(
            "every token is empty (an unset variable?); remove the list, or set `auth.open: true` for open mode"
                .to_owned(),
        );
    }
    Ok(Some(Arc::new(Authenticator::StaticToken {
        name: Arc::from(name),
        tokens,
        principal: "token".to_owned(),
        principal_header: None,
    })))
}

pub(crate) fn header_name(
    value: &str,
    at: Location,
    field: String,
    errors: &mut Errors<'_>,
) -> Option<HeaderName> {
    match HeaderName::from_bytes(value.as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            errors.push(at, field, format!("{value:?} is not a header name"));
            None
        }
    }
}

async fn compile_authenticators(
    config: &Config,
    source: &Path,
    store: &Arc<dyn portcullis_store::Store>,
    errors: &mut Errors<'_>,
) -> (
    HashMap<String, Arc<Authenticator>>,
    portcullis_auth::apikey::ApiKeys,
) {
    use portcullis_config::AuthenticatorConfig;
    let mut out = HashMap::new();
    // One key cache per snapshot, shared by every api_key authenticator and the admin
    // API, so a key revoked through this instance is forgotten at once. Its TTL is the
    // shortest configured one (the revocation bound every authenticator promises).
    let api_key_configs = config
        .authenticators
        .values()
        .filter_map(|a| match &a.value {
            AuthenticatorConfig::ApiKey(k) => Some(k),
            _ => None,
        });
    let (ttl, size) = api_key_configs.fold((None, 0), |(ttl, size), k| {
        let t = k.cache_ttl.get();
        (
            Some(ttl.map_or(t, |x: std::time::Duration| x.min(t))),
            size.max(k.cache_size.0),
        )
    });
    let api_keys =
        portcullis_auth::apikey::ApiKeys::new(store.clone(), ttl.unwrap_or_default(), size);
    for (name, spec) in &config.authenticators {
        let field = format!("authenticators.{name}");
        let at = spec.referenced;
        let compiled = match &spec.value {
            AuthenticatorConfig::StaticToken(t) => {
                let tokens: Vec<Box<[u8]>> = t
                    .tokens
                    .iter()
                    .filter(|t| !t.is_empty())
                    .map(|t| t.expose().as_bytes().into())
                    .collect();
                if tokens.is_empty() {
                    // Open mode for this authenticator's routes would be a surprise: say so.
                    errors.push(
                        at,
                        format!("{field}.static_token.tokens"),
                        "no non-empty token",
                    );
                    continue;
                }
                let principal_header = match &t.principal_header {
                    Some(h) => header_name(
                        h,
                        at,
                        format!("{field}.static_token.principal_header"),
                        errors,
                    ),
                    None => None,
                };
                Authenticator::StaticToken {
                    name: Arc::from(name.as_str()),
                    tokens,
                    principal: t.principal.to_string(),
                    principal_header,
                }
            }
            AuthenticatorConfig::Jwt(j) => {
                match compile_jwt(name, j, at, &field, source, errors).await {
                    Some(a) => a,
                    None => continue,
                }
            }
            AuthenticatorConfig::ApiKey(k) => {
                let principal_header = match &k.principal_header {
                    Some(h) => match header_name(
                        h,
                        at,
                        format!("{field}.api_key.principal_header"),
                        errors,
                    ) {
                        Some(h) => Some(h),
                        None => continue,
                    },
                    None => None,
                };
                Authenticator::ApiKey {
                    name: Arc::from(name.as_str()),
                    enabled: k.enabled.0,
                    keys: api_keys.clone(),
                    sources: TokenSources::from(&k.token_sources),
                    principal_header,
                    quota_fail_open: k.quota_fail_open.0,
                }
            }
        };
        out.insert(name.clone(), Arc::new(compiled));
    }
    (out, api_keys)
}

async fn compile_jwt(
    name: &str,
    j: &portcullis_config::JwtConfig,
    at: Location,
    field: &str,
    source: &Path,
    errors: &mut Errors<'_>,
) -> Option<Authenticator> {
    use portcullis_auth::jwt::{Algorithm, JwtConfig, KeySource};
    let field = format!("{field}.jwt");
    let mut algorithms = Vec::new();
    for (i, a) in j.algorithms.iter().enumerate() {
        match a.value.parse::<Algorithm>() {
            Ok(alg) => algorithms.push(alg),
            Err(_) => {
                errors.push(
                    a.referenced,
                    format!("{field}.algorithms[{i}]"),
                    format!("unsupported algorithm {:?}", a.value.as_str()),
                );
                return None;
            }
        }
    }
    let key_sources = [
        j.secret.is_some(),
        !j.public_keys.is_empty(),
        j.jwks_url.is_some(),
    ];
    if key_sources.iter().filter(|x| **x).count() != 1 {
        errors.push(
            at,
            field,
            "set exactly one of `secret`, `public_keys`, `jwks_url`",
        );
        return None;
    }
    let keys = if let Some(secret) = &j.secret {
        if portcullis_auth::jwt::weak_hs_secret(secret.expose().as_bytes()) {
            tracing::warn!(
                authenticator = name,
                "jwt secret is shorter than 32 bytes; RFC 7518 §3.2 asks for at least the hash size"
            );
        }
        KeySource::Secret(secret.expose().as_bytes().to_vec())
    } else if let Some(url) = &j.jwks_url {
        if url.value.starts_with("http://") {
            // Keys fetched in clear can be replaced by anyone on the path.
            tracing::warn!(
                authenticator = name,
                "jwks_url uses plain http; use https outside tests"
            );
        }
        KeySource::Jwks {
            url: url.value.to_string(),
            refresh_interval: j.jwks_refresh.get(),
            min_refetch_interval: j.jwks_min_refetch.get(),
            timeout: std::time::Duration::from_secs(5),
            ca_file: None,
        }
    } else {
        let mut pems = Vec::new();
        for (i, p) in j.public_keys.iter().enumerate() {
            let path = relative_to(source, p);
            match std::fs::read(&path) {
                Ok(bytes) => pems.push(bytes),
                Err(e) => {
                    errors.push(
                        at,
                        format!("{field}.public_keys[{i}]"),
                        format!("{path}: {e}"),
                    );
                    return None;
                }
            }
        }
        KeySource::Pem(pems)
    };
    let mut config = JwtConfig::new(algorithms, keys);
    config.issuer =
        (!j.issuer.is_empty()).then(|| j.issuer.iter().map(|s| s.to_string()).collect());
    config.audience =
        (!j.audience.is_empty()).then(|| j.audience.iter().map(|s| s.to_string()).collect());
    config.leeway = j.leeway.get();
    config.accept_guest = j.accept_guest.0;
    config.allow_any_audience = j.allow_any_audience.0;
    config.cache_max_entries = j.cache_size.0;
    let verifier = match portcullis_auth::jwt::JwtVerifier::new(config).await {
        Ok(v) => v,
        Err(e) => {
            errors.push(at, field, e.to_string());
            return None;
        }
    };
    verifier.spawn_refresh();
    let mut claim_headers = Vec::new();
    for (claim, header) in &j.claim_headers {
        claim_headers.push((
            claim.clone(),
            header_name(header, at, format!("{field}.claim_headers.{claim}"), errors)?,
        ));
    }
    let principal_header = match &j.principal_header {
        Some(h) => Some(header_name(
            h,
            at,
            format!("{field}.principal_header"),
            errors,
        )?),
        None => None,
    };
    Some(Authenticator::Jwt {
        name: Arc::from(name),
        verifier,
        sources: TokenSources::from(&j.token_sources),
        claim_headers,
        principal_header,
    })
}

fn compile_login(
    t: &portcullis_config::TokenIssuerConfig,
    at: Location,
    source: &Path,
    store: &Arc<dyn portcullis_store::Store>,
    errors: &mut Errors<'_>,
) -> Option<crate::login::LoginService> {
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
    Some(crate::login::LoginService {
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

/// A route's policy: `public`, its own `auth`, or the gateway-wide default.
fn route_policy(
    config: &Config,
    route: &RouteConfig,
    at: Location,
    field: &str,
    authenticators: &HashMap<String, Arc<Authenticator>>,
    global_set: &[Arc<Authenticator>],
    errors: &mut Errors<'_>,
) -> AuthPolicy {
    if route.public.0 {
        if route.auth.is_some() {
            errors.push(
                at,
                format!("{field}.auth"),
                "a `public` route cannot have `auth`",
            );
        }
        return AuthPolicy::Public;
    }
    let quota = route.auth.as_ref().is_some_and(|a| a.quota.0);
    let (set, optional, scopes, forward) = match &route.auth {
        Some(a) => {
            let own = match static_authenticator(&format!("{field}.auth.tokens"), &a.tokens) {
                Ok(s) => s,
                Err(e) => {
                    errors.push(at, format!("{field}.auth.tokens"), e);
                    None
                }
            };
            let mut set: Vec<Arc<Authenticator>> = own.into_iter().collect();
            for (i, name) in a.authenticators.iter().enumerate() {
                match authenticators.get(name.value.as_str()) {
                    Some(auth) => set.push(auth.clone()),
                    None => errors.push(
                        name.referenced,
                        format!("{field}.auth.authenticators[{i}]"),
                        format!("no authenticator named {:?}", name.value.as_str()),
                    ),
                }
            }
            // Only `optional`/`scopes` given: the gateway-wide authenticators apply.
            if set.is_empty() && a.tokens.is_empty() && a.authenticators.is_empty() {
                set = global_set.to_vec();
            }
            let forward = a
                .forward_credential
                .map_or(config.auth.forward_credential.0, |f| f.0);
            (
                set,
                a.optional.0,
                a.scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                forward,
            )
        }
        None => (
            global_set.to_vec(),
            false,
            Vec::new(),
            config.auth.forward_credential.0,
        ),
    };
    if optional && !scopes.is_empty() {
        // Anonymous requests would pass where a token without the scope fails.
        errors.push(
            at,
            format!("{field}.auth"),
            "`optional: true` cannot be combined with `scopes` (anonymous requests would be more privileged than tokens without the scope)",
        );
    }
    if set.is_empty() {
        if !scopes.is_empty() {
            errors.push(
                at,
                format!("{field}.auth.scopes"),
                "scopes need an authenticator",
            );
        }
        return AuthPolicy::Open;
    }
    if quota
        && !set
            .iter()
            .any(|a| matches!(**a, Authenticator::ApiKey { .. }))
    {
        errors.push(
            at,
            format!("{field}.auth.quota"),
            "quotas need an `api_key` authenticator on the route",
        );
    }
    let sources = Arc::new(crate::auth::CredentialSources::of(&set));
    AuthPolicy::Required {
        authenticators: set.into(),
        optional,
        scopes: scopes.into(),
        forward_credential: forward,
        quota,
        sources,
    }
}

/// The route's path pattern and the names of its params.
fn path_pattern(
    route: &RouteConfig,
    at: Location,
    field: &str,
    errors: &mut Errors<'_>,
) -> Option<(PathPattern, Vec<String>)> {
    let (raw, location, exact) = match (&route.path, &route.path_prefix) {
        (Some(_), Some(_)) => {
            errors.push(at, field, "set either `path` or `path_prefix`, not both");
            return None;
        }
        (Some(p), None) => (p.value.to_string(), p.referenced, true),
        (None, Some(p)) => (p.value.to_string(), p.referenced, false),
        (None, None) => ("/".to_owned(), at, false),
    };
    let key = if exact { "path" } else { "path_prefix" };
    if !raw.starts_with('/') {
        errors.push(
            location,
            format!("{field}.{key}"),
            format!("{raw:?} must start with `/`"),
        );
        return None;
    }
    let params = raw
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|s| s.trim_start_matches('*').to_owned())
        .collect();
    let pattern = if exact {
        PathPattern::Exact(raw)
    } else {
        PathPattern::Prefix(raw)
    };
    Some((pattern, params))
}

fn parse_methods(
    route: &RouteConfig,
    field: &str,
    errors: &mut Errors<'_>,
) -> Option<Option<Vec<Method>>> {
    if route.methods.is_empty() {
        return Some(None);
    }
    let mut out = Vec::new();
    for (j, m) in route.methods.iter().enumerate() {
        let upper = m.value.to_ascii_uppercase();
        if upper == "*" || upper == "ANY" {
            return Some(None);
        }
        match Method::from_bytes(upper.as_bytes()) {
            Ok(method) if upper.chars().all(|c| c.is_ascii_uppercase()) => out.push(method),
            _ => {
                errors.push(
                    m.referenced,
                    format!("{field}.methods[{j}]"),
                    format!("{:?} is not an HTTP method", m.value.as_str()),
                );
                return None;
            }
        }
    }
    Some(Some(out))
}

/// Relative file paths in the config are relative to the config file's directory,
/// so a config works whatever the working directory.
pub(crate) fn relative_to(config: &Path, path: &str) -> String {
    let p = Path::new(path);
    if p.is_absolute() {
        return path.to_owned();
    }
    match config.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p).display().to_string(),
        _ => path.to_owned(),
    }
}

/// Pretty table for `portcullis routes`: name, host, path, methods, auth, action.
pub fn describe_routes(snapshot: &Snapshot) -> Vec<[String; 6]> {
    snapshot
        .routes
        .entries()
        .into_iter()
        .map(|(spec, route)| {
            let methods = spec.methods.as_ref().map_or("*".to_owned(), |m| {
                m.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(",")
            });
            let host = match spec.port {
                Some(p) => format!("{}:{p}", spec.host),
                None => spec.host.to_string(),
            };
            let action = match &route.action {
                Action::Proxy(p) => match &p.target {
                    Target::Fixed(t) => {
                        format!("proxy {}://{}{}", t.scheme, t.authority, t.base_path)
                    }
                    Target::Template { .. } => "proxy (templated)".to_owned(),
                },
                Action::Static(s) => format!("static {}", s.dir.display()),
                Action::Respond(r) => format!("respond {}", r.status.as_u16()),
                Action::Redirect(r) => format!("redirect {}", r.status.as_u16()),
            };
            [
                route.name.to_string(),
                host,
                spec.path.to_string(),
                methods,
                route.auth.describe(),
                action,
            ]
        })
        .collect()
}
