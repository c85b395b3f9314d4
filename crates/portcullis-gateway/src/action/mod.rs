//! The terminal action of a route. Each file holds its config compile and its
//! runtime: `proxy`, `static_files`, `respond`, `redirect`.

pub mod proxy;
pub mod redirect;
pub mod respond;
pub mod static_files;

use portcullis_config::{Config, Location, RouteConfig};

pub use proxy::{FixedTarget, ProxyAction, Target};
pub use redirect::RedirectAction;
pub use respond::RespondAction;
pub use static_files::StaticAction;

use crate::snapshot::Errors;
use crate::template::Template;
use crate::upstream::{ClientRegistry, ClientSettings};

pub enum Action {
    Proxy(Box<ProxyAction>),
    Static(StaticAction),
    Respond(RespondAction),
    Redirect(RedirectAction),
}

/// The params a route's path captures: what templates may use.
pub(crate) struct Known<'a> {
    params: &'a [String],
    is_prefix: bool,
}

impl Known<'_> {
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

/// Compiles the one action a route has.
#[allow(clippy::too_many_arguments)]
pub(crate) fn compile(
    config: &Config,
    route: &RouteConfig,
    at: Location,
    field: &str,
    params: &[String],
    is_prefix: bool,
    clients: &ClientRegistry,
    used_clients: &mut Vec<ClientSettings>,
    errors: &mut Errors<'_>,
) -> Option<Action> {
    let count = [
        route.proxy.is_some(),
        route.static_files.is_some(),
        route.respond.is_some(),
        route.redirect.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if count != 1 {
        errors.push(
            at,
            field,
            "a route needs exactly one of `proxy`, `static`, `respond`, `redirect`",
        );
        return None;
    }
    let known = Known { params, is_prefix };
    if let Some(p) = &route.proxy {
        return proxy::compile(
            config,
            p,
            at,
            field,
            is_prefix,
            &known,
            clients,
            used_clients,
            errors,
        )
        .map(|a| Action::Proxy(Box::new(a)));
    }
    if let Some(s) = &route.static_files {
        return static_files::compile(s, at, field, errors).map(Action::Static);
    }
    if let Some(r) = &route.respond {
        return respond::compile(r, at, field, errors).map(Action::Respond);
    }
    if let Some(r) = &route.redirect {
        return redirect::compile(r, at, field, &known, errors).map(Action::Redirect);
    }
    None
}
