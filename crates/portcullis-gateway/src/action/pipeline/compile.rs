//! The pipeline action's config compile: a YAML pipeline's steps (each a proxy of
//! its own) or a stored pipeline's function upstream (`http://{step}:8080`).

use std::sync::Arc;

use portcullis_config::{PipelineConfig, PipelineDefConfig, ProxyConfig, Spanned, Text};

use super::{PipelineAction, Source, Step};
use crate::action::{Clients, RouteSite};
use crate::pipelines::{name_ok, Mode};
use crate::snapshot::Errors;

pub(crate) fn compile(
    p: &PipelineConfig,
    site: &RouteSite<'_>,
    clients: &mut Clients<'_>,
    errors: &mut Errors<'_>,
) -> Option<PipelineAction> {
    let field = format!("{}.pipeline", site.field);
    let source = match (&p.name, &p.from_store) {
        (Some(name), None) => {
            if p.functions.is_some() {
                errors.push(
                    site.at,
                    format!("{field}.functions"),
                    "applies to stored pipelines (`from_store`) only",
                );
                return None;
            }
            let Some(def) = clients.pipelines.get(name.value.as_str()) else {
                errors.push(
                    name.referenced,
                    format!("{field}.name"),
                    format!("no pipeline {:?} under `pipelines`", name.value.as_str()),
                );
                return None;
            };
            declared(name.value.as_str(), def, p, site, clients, errors)?
        }
        (None, Some(param)) => {
            let param = param.value.as_str();
            if !site.params.iter().any(|k| k == param) {
                errors.push(
                    site.at,
                    format!("{field}.from_store"),
                    format!("the route's path does not capture {{{param}}}"),
                );
                return None;
            }
            let Some(functions) = &p.functions else {
                errors.push(
                    site.at,
                    format!("{field}.functions"),
                    "stored pipelines need `functions` (an upstream template using {step}, e.g. http://{step}:8080)",
                );
                return None;
            };
            // `{step}` names a host (one checked DNS label), never a path.
            let url = functions.upstream.value.as_str();
            let authority = url
                .split_once("://")
                .map(|(_, rest)| rest.split('/').next().unwrap_or(rest));
            let in_path = url
                .split_once("://")
                .and_then(|(_, rest)| rest.split_once('/'))
                .is_some_and(|(_, path)| path.contains("{step}"));
            if !authority.is_some_and(|a| a.contains("{step}")) || in_path {
                errors.push(
                    functions.upstream.referenced,
                    format!("{field}.functions.upstream"),
                    "must use {step} in its host, and only there (http://{step}:8080)",
                );
                return None;
            }
            let mut params = site.params.to_vec();
            params.push("step".to_owned());
            let fsite = RouteSite {
                at: site.at,
                field: &format!("{field}.functions"),
                params: &params,
                is_prefix: site.is_prefix,
            };
            let proxy = crate::action::proxy::compile(functions, &fsite, clients, errors)?;
            Source::Stored {
                param: param.to_owned(),
                functions: Box::new(proxy),
            }
        }
        _ => {
            errors.push(
                site.at,
                &field,
                "needs exactly one of `name` (a pipeline under `pipelines`) and `from_store` (a path param)",
            );
            return None;
        }
    };
    let positive = |d: std::time::Duration, key: &str, errors: &mut Errors<'_>| {
        if d.is_zero() {
            errors.push(site.at, format!("{field}.{key}"), "must be more than 0");
            false
        } else {
            true
        }
    };
    let ok = positive(p.timeout.get(), "timeout", errors)
        & positive(p.step_timeout.get(), "step_timeout", errors);
    if !ok {
        return None;
    }
    Some(PipelineAction {
        source,
        timeout: p.timeout.get(),
        step_timeout: p.step_timeout.get(),
        max_handoff: usize::try_from(p.max_handoff.0).unwrap_or(usize::MAX),
        partial: p.partial.0,
        cache_ttl: p.cache_ttl.get(),
    })
}

fn declared(
    name: &str,
    def: &Spanned<PipelineDefConfig>,
    p: &PipelineConfig,
    site: &RouteSite<'_>,
    clients: &mut Clients<'_>,
    errors: &mut Errors<'_>,
) -> Option<Source> {
    let field = format!("pipelines.{name}");
    let Some(mode) = Mode::parse(def.value.mode.value.as_str()) else {
        errors.push(
            def.value.mode.referenced,
            format!("{field}.mode"),
            "must be `sequential` or `parallel`",
        );
        return None;
    };
    if def.value.steps.is_empty() || def.value.steps.len() > crate::pipelines::MAX_STEPS {
        errors.push(
            def.referenced,
            format!("{field}.steps"),
            format!("a pipeline has 1 to {} steps", crate::pipelines::MAX_STEPS),
        );
        return None;
    }
    let mut steps = Vec::with_capacity(def.value.steps.len());
    let mut names = std::collections::HashSet::new();
    for (i, s) in def.value.steps.iter().enumerate() {
        let sf = format!("{field}.steps[{i}]");
        let step = &s.value;
        let step_name = step.name.value.as_str();
        if !name_ok(step_name) {
            errors.push(
                step.name.referenced,
                format!("{sf}.name"),
                "letters, digits, '-', '_' and '.', at most 128",
            );
            return None;
        }
        if !names.insert(step_name.to_owned()) {
            errors.push(
                step.name.referenced,
                format!("{sf}.name"),
                format!("duplicate step name {step_name:?}"),
            );
            return None;
        }
        let (method, headers) = crate::action::call_method_and_headers(
            step.method.as_ref(),
            &step.headers,
            s.referenced,
            &sf,
            errors,
        )
        .ok()?;
        let timeout = step.timeout.map_or(p.step_timeout.get(), |t| t.get());
        if timeout.is_zero() {
            errors.push(s.referenced, format!("{sf}.timeout"), "must be more than 0");
            return None;
        }
        let proxy_config = step_proxy(step.upstream.clone(), step.path.clone(), site, timeout);
        let ssite = RouteSite {
            at: s.referenced,
            field: &sf,
            params: site.params,
            is_prefix: site.is_prefix,
        };
        let proxy = crate::action::proxy::compile(&proxy_config, &ssite, clients, errors)?;
        steps.push(Step {
            name: Arc::from(step_name),
            proxy,
            method,
            headers,
            timeout,
        });
    }
    Some(Source::Declared {
        name: Arc::from(name),
        mode,
        steps: steps.into_boxed_slice(),
    })
}

/// A step as a proxy: its path replaces the request's, else the route's remainder
/// (prefix routes) or the request path is sent.
pub(crate) fn step_proxy(
    upstream: Spanned<Text>,
    path: Option<Spanned<Text>>,
    site: &RouteSite<'_>,
    timeout: std::time::Duration,
) -> ProxyConfig {
    let timeouts = portcullis_config::TimeoutsConfig {
        response: portcullis_config::Duration(timeout),
        ..Default::default()
    };
    ProxyConfig {
        upstream,
        strip_prefix: portcullis_config::Flag(path.is_none() && site.is_prefix),
        rewrite: path,
        preserve_host: portcullis_config::Flag(false),
        timeouts,
        protocol: None,
        tls: None,
        allow_names: Vec::new(),
        targets: None,
        upgrades: Vec::new(),
        retries: None,
        sse: None,
    }
}
