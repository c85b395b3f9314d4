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

use crate::auth::{AuthPolicy, Authenticator};
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
        crate::auth::compile::compile_authenticators(&config, source, store, &mut errors).await;
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
    let mut action_clients = crate::action::Clients {
        named: &config.upstreams,
        registry: clients,
        used: Vec::new(),
    };
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
        let auth = crate::auth::compile::route_policy(
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
        let site = crate::action::RouteSite {
            at: r.referenced,
            field: &field,
            params: &params,
            is_prefix: matches!(pattern, PathPattern::Prefix(_)),
        };
        let Some(action) = crate::action::compile(route, &site, &mut action_clients, &mut errors)
        else {
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
        .and_then(|t| crate::login::compile(&t.value, t.referenced, source, store, &mut errors));

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
        used_clients: action_clients.used,
        header_rules,
        via: via.ok_or_else(|| ConfigErrors(Vec::new()))?,
        api_keys,
        login,
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
