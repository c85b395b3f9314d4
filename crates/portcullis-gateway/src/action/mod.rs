//! The terminal action of a route. Each file holds its config compile and its
//! runtime: `proxy`, `static_files`, `respond`, `redirect`, `login`.

pub mod aggregate;
pub mod group;
pub mod login;
pub mod oidc;
pub mod pipeline;
pub mod proxy;
pub mod redirect;
pub mod respond;
pub mod retry;
pub mod static_files;

use std::collections::BTreeMap;

use portcullis_config::{Location, RouteConfig, Spanned, UpstreamConfig};

pub use proxy::{FixedTarget, ProxyAction, Target};
pub use redirect::RedirectAction;
pub use respond::RespondAction;
pub use static_files::StaticAction;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::Body;
use crate::context::RequestCtx;
use crate::error::GatewayError;
use crate::snapshot::Errors;
use crate::template::Template;
use crate::upstream::{ClientRegistry, ClientSettings};

pub enum Action {
    Proxy(Box<ProxyAction>),
    Static(StaticAction),
    Respond(RespondAction),
    Redirect(RedirectAction),
    /// `token_issuer`'s login and guest endpoints, on routes the compiler generates.
    Login(login::LoginAction),
    /// An `oidc` authenticator's login, callback, logout and user endpoints.
    Oidc(oidc::OidcAction),
    /// Steps in sequence or in parallel (FnKit's `/orchestrate/<name>`).
    Pipeline(Box<pipeline::PipelineAction>),
    /// Several upstreams' JSON answers merged into one.
    Aggregate(Box<aggregate::AggregateAction>),
}

impl Action {
    pub async fn run(
        &self,
        ctx: &mut RequestCtx<'_>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, GatewayError> {
        match self {
            Action::Proxy(action) => proxy::forward(action, ctx, req).await,
            Action::Static(action) => {
                static_files::serve_static(action, ctx.rest.unwrap_or(ctx.path), req).await
            }
            Action::Respond(action) => Ok(respond::respond(action, req.method())),
            Action::Redirect(action) => {
                redirect::redirect(action, ctx.params, ctx.rest, req.uri().query())
            }
            Action::Login(action) => action.run(req, ctx.client_ip).await,
            Action::Oidc(action) => action.run(req).await,
            Action::Pipeline(action) => action.run(ctx, req).await,
            Action::Aggregate(action) => action.run(ctx, req).await,
        }
    }

    /// One line for `portcullis routes` and `/admin/routes`.
    pub fn describe(&self) -> String {
        match self {
            Action::Proxy(p) => match &p.target {
                Target::Fixed(t) => format!("proxy {}://{}{}", t.scheme, t.authority, t.base_path),
                Target::Template { .. } => "proxy (templated)".to_owned(),
                Target::Group(g) => g.describe(),
            },
            Action::Static(s) => format!("static {}", s.dir.display()),
            Action::Respond(r) => format!("respond {}", r.status.as_u16()),
            Action::Redirect(r) => format!("redirect {}", r.status.as_u16()),
            Action::Login(l) => l.describe().to_owned(),
            Action::Oidc(o) => o.describe().to_owned(),
            Action::Pipeline(p) => p.describe(),
            Action::Aggregate(a) => a.describe(),
        }
    }
}

/// Where a route sits in the config: the position and field its errors name, and
/// the params its path captures (what its templates may use).
pub(crate) struct RouteSite<'a> {
    pub at: Location,
    pub field: &'a str,
    pub params: &'a [String],
    pub is_prefix: bool,
}

impl RouteSite<'_> {
    /// False (with an error) if `t` uses a param the path does not capture.
    pub(crate) fn check(
        &self,
        t: &Template,
        loc: Location,
        field: String,
        errors: &mut Errors<'_>,
    ) -> bool {
        for p in t.params() {
            let known = self.params.iter().any(|k| k == p) || (self.is_prefix && p == "rest");
            if !known {
                errors.push(
                    loc,
                    field,
                    format!("template uses {{{p}}}, which the route's path does not capture"),
                );
                return false;
            }
        }
        true
    }
}

/// What proxy actions share while a snapshot compiles: the named `upstreams:`, the
/// client registry (pools outlive snapshots) and the client settings in use.
pub(crate) struct Clients<'a> {
    pub named: &'a BTreeMap<String, Spanned<UpstreamConfig>>,
    pub registry: &'a ClientRegistry,
    pub used: Vec<ClientSettings>,
    /// Target states outlive snapshots; groups compiled so far (one per name).
    pub upstreams: &'a crate::health::Upstreams,
    pub groups: Vec<crate::health::GroupInfo>,
    /// Pipelines declared under `pipelines:`.
    pub pipelines: &'a BTreeMap<String, Spanned<portcullis_config::PipelineDefConfig>>,
}

/// Compiles the one action a route has.
pub(crate) fn compile(
    route: &RouteConfig,
    site: &RouteSite<'_>,
    clients: &mut Clients<'_>,
    errors: &mut Errors<'_>,
) -> Option<Action> {
    let count = [
        route.proxy.is_some(),
        route.static_files.is_some(),
        route.respond.is_some(),
        route.redirect.is_some(),
        route.pipeline.is_some(),
        route.aggregate.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if count != 1 {
        errors.push(
            site.at,
            site.field,
            "a route needs exactly one of `proxy`, `static`, `respond`, `redirect`, `pipeline`, `aggregate`",
        );
        return None;
    }
    if let Some(p) = &route.proxy {
        return proxy::compile(p, site, clients, errors).map(|a| Action::Proxy(Box::new(a)));
    }
    if let Some(s) = &route.static_files {
        return static_files::compile(s, site.at, site.field, errors).map(Action::Static);
    }
    if let Some(r) = &route.respond {
        return respond::compile(r, site.at, site.field, errors).map(Action::Respond);
    }
    if let Some(r) = &route.redirect {
        return redirect::compile(r, site, errors).map(Action::Redirect);
    }
    if let Some(p) = &route.pipeline {
        return pipeline::compile(p, site, clients, errors).map(|a| Action::Pipeline(Box::new(a)));
    }
    if let Some(a) = &route.aggregate {
        return aggregate::compile(a, site, clients, errors)
            .map(|a| Action::Aggregate(Box::new(a)));
    }
    None
}

/// A pipeline step's or aggregation part's method (`None`: the caller's default) and
/// the headers it sets.
pub(crate) type CallSettings = (
    Option<http::Method>,
    Vec<(http::HeaderName, http::HeaderValue)>,
);

/// A call's `method` and `headers` (pipeline steps, aggregation parts): `Err(())`
/// once the error is pushed.
pub(crate) fn call_method_and_headers(
    method: Option<&Spanned<portcullis_config::Text>>,
    headers: &BTreeMap<String, portcullis_config::Text>,
    at: Location,
    field: &str,
    errors: &mut Errors<'_>,
) -> Result<CallSettings, ()> {
    let method = match method {
        None => None,
        Some(m) => match http::Method::from_bytes(m.value.trim().to_ascii_uppercase().as_bytes()) {
            Ok(m) => Some(m),
            Err(_) => {
                errors.push(
                    m.referenced,
                    format!("{field}.method"),
                    "not an HTTP method",
                );
                return Err(());
            }
        },
    };
    let mut out = Vec::with_capacity(headers.len());
    for (k, v) in headers {
        match (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v.as_str()),
        ) {
            (Ok(k), Ok(v)) => out.push((k, v)),
            _ => {
                errors.push(
                    at,
                    format!("{field}.headers.{k}"),
                    "not a valid header name and value",
                );
                return Err(());
            }
        }
    }
    Ok((method, out))
}
