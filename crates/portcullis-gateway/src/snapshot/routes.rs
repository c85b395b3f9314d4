//! Routes: path patterns, methods, hosts, each route's policy chain and action, and
//! the routes the compiler generates (`token_issuer`'s login and guest endpoints).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use http::Method;
use portcullis_config::{Config, Location, RouteConfig};
use portcullis_routing::{HostPattern, PathPattern, RouteSpec, RouteTable, RouteTableBuilder};

use super::{Errors, Route, Snapshot};
use crate::action::Action;
use crate::auth::Authenticator;
use crate::policy::auth::AuthPolicy;
use crate::policy::{Chain, Policy};
use crate::upstream::{ClientRegistry, ClientSettings};

pub(super) struct CompiledRoutes {
    pub table: RouteTable<Arc<Route>>,
    pub used_clients: Vec<ClientSettings>,
    pub groups: Vec<crate::health::GroupInfo>,
    /// Routes that accept requests without any credential (open mode).
    pub open_routes: Vec<String>,
}

/// `errors.file` is the config's path; `policies.store` the store.
pub(super) fn compile(
    config: &Config,
    authenticators: &HashMap<String, Arc<Authenticator>>,
    global_set: &[Arc<Authenticator>],
    clients: &ClientRegistry,
    upstreams: &crate::health::Upstreams,
    policies: &crate::policy::Registries,
    errors: &mut Errors<'_>,
) -> CompiledRoutes {
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
        upstreams,
        groups: Vec::new(),
        pipelines: &config.pipelines,
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
        let Some((pattern, params)) = path_pattern(route, r.referenced, &field, errors) else {
            continue;
        };
        let methods = match parse_methods(route, &field, errors) {
            Some(m) => m,
            None => continue,
        };
        let auth = crate::auth::compile::route_policy(
            config,
            route,
            r.referenced,
            &field,
            authenticators,
            global_set,
            errors,
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
        let Some(action) = crate::action::compile(route, &site, &mut action_clients, errors) else {
            continue;
        };
        let own = route.policies(&Default::default());
        let policy_site = crate::policy::PolicySite {
            at: r.referenced,
            route_field: &field,
            route: Arc::from(name.as_str()),
            own: &own,
            params: &params,
            is_prefix: matches!(pattern, PathPattern::Prefix(_)),
            authenticated: matches!(auth, AuthPolicy::Required { .. }),
        };
        let mut chain = crate::policy::compile(
            &route.policies(&config.defaults),
            &policy_site,
            policies,
            errors,
        );
        if route.auth.as_ref().is_some_and(|a| a.quota.0) {
            chain.push(Policy::Quota(crate::policy::ratelimit::Quota));
        }
        let unauthenticated = match auth {
            AuthPolicy::Open => "open",
            AuthPolicy::Public => "public",
            AuthPolicy::Required {
                ref authenticators, ..
            } => {
                // Routes a browser session may authenticate get its origin checks.
                for a in authenticators.iter() {
                    if let Authenticator::Oidc { service, .. } = a.as_ref() {
                        chain.push(Policy::Session(crate::policy::session::SessionGuard::new(
                            service.clone(),
                        )));
                    }
                }
                chain.push(Policy::Auth(auth));
                ""
            }
        };
        let label: Arc<str> = Arc::from(name.as_str());
        let compiled = Arc::new(Route {
            metrics: crate::telemetry::RouteMetrics::new(label.clone()),
            name: label,
            chain: Chain::new(chain),
            unauthenticated,
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

    login_routes(config, &policies.store, &mut table, errors);
    oidc_routes(config, authenticators, policies, &mut table, errors);
    CompiledRoutes {
        table: table.build(),
        used_clients: action_clients.used,
        groups: action_clients.groups,
        open_routes,
    }
}

/// `token_issuer`'s endpoints become ordinary routes (any host, POST only): a user
/// route on the same path is a conflict reported like any other.
fn login_routes(
    config: &Config,
    store: &Arc<dyn portcullis_store::Store>,
    table: &mut RouteTableBuilder<Arc<Route>>,
    errors: &mut Errors<'_>,
) {
    let Some(t) = &config.token_issuer else {
        return;
    };
    let Some(service) =
        crate::action::login::compile(&t.value, t.referenced, errors.file, store, errors)
    else {
        return;
    };
    let service = Arc::new(service);
    let paths = [
        Some((service.login_path.clone(), false)),
        service.guest_path.clone().map(|p| (p, true)),
    ];
    for (path, guest) in paths.into_iter().flatten() {
        // A user route on the same exact path would share it by method; refuse it
        // instead of letting one silently shadow the other.
        for (i, r) in config.routes.iter().enumerate() {
            if r.value
                .path
                .as_ref()
                .is_some_and(|p| p.value.as_str() == path)
            {
                errors.push(
                    r.referenced,
                    format!("routes[{i}].path"),
                    format!(
                        "{path:?} is token_issuer's endpoint; pick another path for one of them"
                    ),
                );
            }
        }
        let route = Arc::new(Route {
            name: Arc::from("(login)"),
            metrics: crate::telemetry::RouteMetrics::new(Arc::from("(login)")),
            chain: Chain::default(),
            unauthenticated: "public",
            max_body: config.server.max_request_body.0,
            action: Action::Login(crate::action::login::LoginAction {
                service: service.clone(),
                guest,
            }),
        });
        let spec = RouteSpec {
            host: HostPattern::Any,
            port: None,
            path: PathPattern::Exact(path.clone()),
            methods: Some(vec![Method::POST]),
        };
        if let Err(e) = table.add(spec, route) {
            errors.push(
                t.referenced,
                "token_issuer",
                format!("endpoint {path:?}: {e}"),
            );
        }
    }
}

/// An `oidc` authenticator's endpoints become routes (any host): login, callback,
/// logout and the session user. A user route on one of those paths is refused.
fn oidc_routes(
    config: &Config,
    authenticators: &HashMap<String, Arc<Authenticator>>,
    policies: &crate::policy::Registries,
    table: &mut RouteTableBuilder<Arc<Route>>,
    errors: &mut Errors<'_>,
) {
    use crate::action::oidc::{methods, Endpoint, OidcAction};
    for (name, a) in authenticators {
        let Authenticator::Oidc { service, .. } = a.as_ref() else {
            continue;
        };
        let Some(spec) = config.authenticators.get(name) else {
            continue;
        };
        let at = spec.referenced;
        let portcullis_config::AuthenticatorConfig::Oidc(oidc) = &spec.value else {
            continue;
        };
        // The defaults' security headers, IP rules and CORS apply (a front end on an
        // allowed origin reads /auth/me cross-origin); the login, callback and logout
        // routes share one set of limits (a client's budget covers the whole flow),
        // the session-user route has none.
        let route_field = format!("authenticators.{name}.oidc");
        let limited = portcullis_config::Toggle::On(oidc.rate_limits.clone());
        let own = portcullis_config::PolicyKeys {
            rate_limits: Some(limited.clone()),
            ..Default::default()
        };
        let keys = |with_limits: bool| portcullis_config::PolicyKeys {
            security_headers: config.defaults.security_headers.clone(),
            ip: config.defaults.ip.clone(),
            cors: config.defaults.cors.clone(),
            rate_limits: with_limits.then(|| limited.clone()),
            ..Default::default()
        };
        let site = crate::policy::PolicySite {
            at,
            route_field: &route_field,
            route: Arc::from("(oidc)"),
            own: &own,
            params: &[],
            is_prefix: false,
            authenticated: false,
        };
        // Errors are reported once; each route gets its own compiled chain.
        let before = errors.count();
        drop(crate::policy::compile(&keys(true), &site, policies, errors));
        if errors.count() > before {
            continue;
        }
        let mut quiet = Errors::new(errors.file);
        let p = &service.paths;
        let endpoints = [
            (p.login.clone(), Endpoint::Login),
            (p.callback.clone(), Endpoint::Callback),
            (p.logout.clone(), Endpoint::Logout),
        ]
        .into_iter()
        .chain(p.me.iter().map(|m| (m.clone(), Endpoint::Me)));
        for (path, endpoint) in endpoints {
            for (i, r) in config.routes.iter().enumerate() {
                if r.value
                    .path
                    .as_ref()
                    .is_some_and(|rp| rp.value.as_str() == path)
                {
                    errors.push(
                        r.referenced,
                        format!("routes[{i}].path"),
                        format!("{path:?} is the oidc authenticator {name:?}'s endpoint"),
                    );
                }
            }
            let label: Arc<str> = Arc::from("(oidc)");
            let chain = Chain::new(crate::policy::compile(
                &keys(endpoint != Endpoint::Me),
                &site,
                policies,
                &mut quiet,
            ));
            let route = Arc::new(Route {
                metrics: crate::telemetry::RouteMetrics::new(label.clone()),
                name: label,
                chain,
                unauthenticated: "public",
                max_body: 0,
                action: Action::Oidc(OidcAction {
                    service: service.clone(),
                    endpoint,
                }),
            });
            let spec = RouteSpec {
                host: HostPattern::Any,
                port: None,
                path: PathPattern::Exact(path.clone()),
                methods: Some(methods(endpoint)),
            };
            if let Err(e) = table.add(spec, route) {
                errors.push(
                    at,
                    format!("authenticators.{name}.oidc.paths"),
                    format!("endpoint {path:?}: {e}"),
                );
            }
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
            [
                route.name.to_string(),
                host,
                spec.path.to_string(),
                methods,
                route
                    .chain
                    .auth()
                    .map_or_else(|| route.unauthenticated.to_owned(), |a| a.describe()),
                route.action.describe(),
            ]
        })
        .collect()
}
