//! Compiles a parsed [`Config`] into the immutable runtime [`Snapshot`] that requests
//! read. Compilation checks everything the YAML types cannot (paths, URLs, route
//! conflicts, certificates) and reports each problem with its file and line.
//! A snapshot is swapped in atomically; requests keep the one they started with.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::HeaderValue;
use ipnet::IpNet;
use portcullis_config::{
    Config, ConfigError, ConfigErrors, EncodedSlashes, Location, MetricsListener,
};
use portcullis_routing::{EncodedSlash, NormalizeOptions, RouteTable};

use crate::auth::Authenticator;
use crate::tls::CertStore;

mod listeners;
mod routes;

use crate::upstream::{ClientRegistry, ClientSettings};
pub use listeners::{AdminSpec, ListenerSpec};
pub use routes::describe_routes;

pub struct Snapshot {
    /// The config it was compiled from (served redacted by `/admin/config`).
    pub config: Config,
    /// Browser-session cookies (the `oidc` authenticator's session and login
    /// cookies): removed from every proxied request, whatever the route.
    pub session_cookies: crate::auth::CredentialSources,
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
    /// The upstream groups routes use (health checks, admin API, gauges).
    pub groups: Vec<crate::health::GroupInfo>,
    /// Down/recovery webhooks (`notifications:`).
    pub notifier: Option<Arc<crate::health::notify::Notifier>>,
    /// What clients may not send (identity, hop-by-hop, underscored, rewrite headers).
    pub header_rules: crate::sanitize::HeaderRules,
    /// Our `Via` element (loop detection).
    pub via: ViaHeaders,
    /// `defaults.security_headers`, for responses made before a route is known
    /// (400, 404, 405, health).
    pub security_headers: Option<crate::policy::security::SecurityHeaders>,
    /// The API-key cache shared by the api_key authenticators and the admin API.
    pub api_keys: portcullis_auth::apikey::ApiKeys,
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
    /// Request and upstream metrics of this route, resolved on first use.
    pub metrics: Arc<crate::telemetry::RouteMetrics>,
    pub chain: crate::policy::Chain,
    /// `open` or `public` when the chain has no auth policy (`portcullis routes`).
    pub unauthenticated: &'static str,
    pub max_body: u64,
    pub action: Action,
}

/// Collects errors with positions.
pub(crate) struct Errors<'a> {
    pub(crate) file: &'a Path,
    list: Vec<ConfigError>,
}

impl<'a> Errors<'a> {
    pub(crate) fn new(file: &'a Path) -> Self {
        Errors {
            file,
            list: Vec::new(),
        }
    }

    /// How many errors so far (a compile step compares before and after).
    pub(crate) fn count(&self) -> usize {
        self.list.len()
    }

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
    upstreams: &crate::health::Upstreams,
    policies: &crate::policy::Registries,
    instance_id: &Arc<str>,
) -> Result<Snapshot, ConfigErrors> {
    let store = &policies.store;
    let mut errors = Errors::new(source);

    let (listeners, certs) = listeners::compile(&config, source, &mut errors);
    let admin = listeners::compile_admin(&config, &mut errors);

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
        crate::auth::compile::compile_authenticators(&config, source, store, clients, &mut errors)
            .await;
    let session_cookies = crate::auth::CredentialSources {
        authorization: false,
        cookies: authenticators
            .values()
            .filter_map(|a| match a.as_ref() {
                crate::auth::Authenticator::Oidc { service, .. } => Some(service.cookie_names()),
                _ => None,
            })
            .flatten()
            .collect(),
        query: Vec::new(),
    };
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
        match crate::auth::compile::static_authenticator("auth.tokens", &config.auth.tokens) {
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
    let compiled = routes::compile(
        &config,
        &authenticators,
        &global_set,
        clients,
        upstreams,
        policies,
        &mut errors,
    );
    let notifier = compile_notifier(&config, clients, &mut errors);
    let security_headers = match &config.defaults.security_headers {
        Some(portcullis_config::Toggle::On(c)) => {
            crate::policy::security::compile_defaults(c, &mut errors)
        }
        _ => None,
    };
    if !errors.list.is_empty() {
        return Err(ConfigErrors(errors.list));
    }
    if !compiled.open_routes.is_empty() {
        tracing::warn!(
            routes = %compiled.open_routes.join(","),
            explicit = config.auth.open.0,
            "open mode: these routes accept requests without any credential"
        );
    }
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
        session_cookies,
        route_count: config.routes.len(),
        routes: compiled.table,
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
        used_clients: compiled.used_clients,
        groups: compiled.groups,
        notifier,
        header_rules,
        security_headers,
        via: via.ok_or_else(|| ConfigErrors(Vec::new()))?,
        api_keys,
        source: source.to_owned(),
        config,
    })
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

/// `notifications:`: the webhooks told about long downtimes and recoveries.
fn compile_notifier(
    config: &Config,
    clients: &ClientRegistry,
    errors: &mut Errors<'_>,
) -> Option<Arc<crate::health::notify::Notifier>> {
    let cfg = config.notifications.as_ref()?;
    let settings = ClientSettings {
        protocol: portcullis_config::UpstreamProtocol::Auto,
        ca_file: None,
        insecure_skip_verify: false,
        connect_timeout: std::time::Duration::from_secs(5),
        pool: crate::upstream::PoolSettings {
            max_idle: 4,
            ..Default::default()
        },
        targets: None,
    };
    let client = match clients.client(&settings) {
        Ok(c) => c,
        Err(e) => {
            errors.push(Location::UNKNOWN, "notifications", e);
            return None;
        }
    };
    match crate::health::notify::Notifier::compile(cfg, client) {
        Ok(n) => n.map(Arc::new),
        Err((i, e)) => {
            let at = cfg
                .webhooks
                .get(i)
                .map_or(Location::UNKNOWN, |w| w.referenced);
            errors.push(at, format!("notifications.webhooks[{i}].url"), e);
            None
        }
    }
}
