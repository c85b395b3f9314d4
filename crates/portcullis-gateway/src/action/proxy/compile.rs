//! The proxy action's config compile: named upstream or inline URL, group, template,
//! rewrite, client settings, retries; and the fixed-target URL parser.

use std::sync::Arc;

use http::uri::Scheme;
use http::Uri;
use ipnet::IpNet;
use portcullis_config::{RetryConfig, Toggle, UpstreamConfig, UpstreamProtocol, UpstreamTlsConfig};

use super::{FixedTarget, ProxyAction, Target};
use crate::action::retry::RetryPolicy;
use crate::snapshot::relative_to;
use crate::template::Template;
use crate::upstream::{ClientSettings, PoolSettings};

pub(crate) fn compile(
    p: &portcullis_config::ProxyConfig,
    site: &crate::action::RouteSite<'_>,
    clients: &mut crate::action::Clients<'_>,
    errors: &mut crate::snapshot::Errors<'_>,
) -> Option<ProxyAction> {
    let (at, field) = (site.at, site.field);
    let f = format!("{field}.proxy.upstream");
    let raw = p.upstream.value.to_string();
    // A named upstream, or an inline URL.
    let (url, upstream_cfg): (String, Option<&UpstreamConfig>) = match clients.named.get(&raw) {
        Some(u) => (u.value.url.to_string(), Some(&u.value)),
        None => (raw.clone(), None),
    };
    let template = match Template::parse(&url) {
        Ok(t) => t,
        Err(e) => {
            errors.push(p.upstream.referenced, f, e);
            return None;
        }
    };
    if !site.check(&template, p.upstream.referenced, f.clone(), errors) {
        return None;
    }
    let group = match upstream_cfg {
        Some(u) if !u.targets.is_empty() => {
            if !u.url.is_empty() {
                errors.push(
                    p.upstream.referenced,
                    format!("upstreams.{raw}"),
                    "set either `url` or `targets`, not both",
                );
                return None;
            }
            Some(crate::action::group::compile(
                &raw,
                u,
                p.upstream.referenced,
                &format!("upstreams.{raw}"),
                site.params,
                clients.upstreams,
                errors,
            )?)
        }
        Some(u)
            if u.health.active.is_some() || u.health.passive.is_some() || u.breaker.is_some() =>
        {
            errors.push(
                p.upstream.referenced,
                format!("upstreams.{raw}"),
                "`health` and `breaker` apply to groups: list the URL under `targets`",
            );
            return None;
        }
        Some(u) if u.url.is_empty() => {
            errors.push(
                p.upstream.referenced,
                format!("upstreams.{raw}"),
                "needs a `url` or `targets`",
            );
            return None;
        }
        _ => None,
    };
    let target = if let Some(g) = group {
        Target::Group(Box::new(g))
    } else if template.is_literal() {
        match parse_fixed_target(&url) {
            Ok(t) => Target::Fixed(t),
            Err(e) => {
                errors.push(p.upstream.referenced, f, e);
                return None;
            }
        }
    } else {
        let after = match url.split_once("://") {
            Some((s, a)) if s == "http" || s == "https" => a,
            _ => {
                errors.push(
                    p.upstream.referenced,
                    f,
                    format!("{url:?} must start with http:// or https://"),
                );
                return None;
            }
        };
        let (authority, path) = match after.find('/') {
            Some(i) => (&after[..i], &after[i..]),
            None => (after, ""),
        };
        let authority_params = Template::parse(authority)
            .map(|t| t.params().map(str::to_owned).collect())
            .unwrap_or_default();
        Target::Template {
            template,
            authority_params,
            path_is_templated: path.contains('{'),
        }
    };
    let rewrite = match &p.rewrite {
        Some(r) => match Template::parse(&r.value) {
            Ok(t) if r.value.starts_with('/') => {
                if !site.check(&t, r.referenced, format!("{field}.proxy.rewrite"), errors) {
                    return None;
                }
                Some(t)
            }
            Ok(_) => {
                errors.push(
                    r.referenced,
                    format!("{field}.proxy.rewrite"),
                    "must start with `/`",
                );
                return None;
            }
            Err(e) => {
                errors.push(r.referenced, format!("{field}.proxy.rewrite"), e);
                return None;
            }
        },
        None => None,
    };
    if p.strip_prefix.0 && !site.is_prefix {
        errors.push(
            at,
            format!("{field}.proxy.strip_prefix"),
            "needs a `path_prefix` route",
        );
        return None;
    }
    let default_tls = UpstreamTlsConfig::default();
    let (protocol, tls) = match upstream_cfg {
        Some(u) => (u.protocol, &u.tls),
        None => (
            p.protocol.unwrap_or(UpstreamProtocol::Auto),
            p.tls.as_ref().unwrap_or(&default_tls),
        ),
    };
    let pool = match PoolSettings::of(upstream_cfg) {
        Ok(pool) => pool,
        Err((key, e)) => {
            errors.push(p.upstream.referenced, format!("upstreams.{raw}.{key}"), e);
            return None;
        }
    };
    let templated = matches!(target, Target::Template { .. });
    if !templated && (p.targets.is_some() || !p.allow_names.is_empty()) {
        errors.push(
            at,
            format!("{field}.proxy"),
            "`targets` and `allow_names` apply to templated upstreams (`http://{name}:8080`) only",
        );
        return None;
    }
    let mut allow_names = Vec::new();
    for (i, n) in p.allow_names.iter().enumerate() {
        match crate::targets::NamePattern::parse(&n.value) {
            Ok(pattern) => allow_names.push(pattern),
            Err(e) => {
                errors.push(n.referenced, format!("{field}.proxy.allow_names[{i}]"), e);
                return None;
            }
        }
    }
    // Templated upstreams always get address rules (the built-in denials at least).
    let targets = if templated {
        let mut rules = crate::targets::TargetRules::default();
        if let Some(t) = &p.targets {
            for (key, list, out) in [
                ("allow", &t.allow, &mut rules.allow),
                ("deny", &t.deny, &mut rules.deny),
            ] {
                for (i, c) in list.iter().enumerate() {
                    let text = c.value.trim();
                    match text
                        .parse::<IpNet>()
                        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                    {
                        Ok(net) => out.push(net),
                        Err(_) => errors.push(
                            c.referenced,
                            format!("{field}.proxy.targets.{key}[{i}]"),
                            format!("{text:?} is not an IP address or CIDR"),
                        ),
                    }
                }
            }
        }
        Some(Arc::new(rules))
    } else {
        None
    };
    let mut upgrades = Vec::new();
    for u in &p.upgrades {
        let u = u.trim().to_ascii_lowercase();
        if u.is_empty() || !u.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
            errors.push(
                at,
                format!("{field}.proxy.upgrades"),
                format!("{u:?} is not a protocol name"),
            );
            return None;
        }
        upgrades.push(u);
    }
    let settings = ClientSettings {
        protocol,
        ca_file: tls.ca_file.as_ref().map(|c| relative_to(errors.file, c)),
        insecure_skip_verify: tls.insecure_skip_verify.0,
        connect_timeout: p.timeouts.connect.get(),
        pool,
        targets,
    };
    let client = match clients.registry.client(&settings) {
        Ok(c) => c,
        Err(e) => {
            errors.push(p.upstream.referenced, format!("{field}.proxy.tls"), e);
            return None;
        }
    };
    let retry = match &p.retries {
        Some(Toggle::Off) => None,
        Some(Toggle::On(cfg)) => {
            let before = errors.count();
            let r = RetryPolicy::compile(cfg, at, &format!("{field}.proxy.retries"), errors);
            if errors.count() != before {
                return None;
            }
            r
        }
        // Groups of several targets retry on another one by default, like nginx.
        None => match &target {
            Target::Group(g) if g.targets.len() > 1 => {
                RetryPolicy::compile(&RetryConfig::default(), at, field, errors)
            }
            _ => None,
        },
    };
    if let (Target::Group(g), Some(u)) = (&target, upstream_cfg) {
        if !clients.groups.iter().any(|info| info.name == g.name) {
            let active = match &u.health.active {
                Some(a) => Some(crate::health::ActiveCheck::compile(
                    a,
                    p.upstream.referenced,
                    &format!("upstreams.{raw}.health.active"),
                    errors,
                )?),
                None => None,
            };
            clients.groups.push(crate::health::GroupInfo {
                name: g.name.clone(),
                balancer: g.balancer_name(),
                targets: g
                    .targets
                    .iter()
                    .zip(g.states.iter())
                    .zip(u.targets.iter())
                    .map(|((t, s), c)| crate::health::GroupTarget {
                        target: t.clone(),
                        weight: c.value.weight.0,
                        state: s.clone(),
                    })
                    .collect(),
                active,
                client: client.clone(),
                settings: settings.clone(),
            });
        }
    }
    if !clients.used.contains(&settings) {
        clients.used.push(settings);
    }
    let sse = p.sse.as_ref().map(|s| super::sse::SsePolicy {
        resume: s.resume.0,
        heartbeat: (!s.heartbeat.get().is_zero()).then(|| s.heartbeat.get()),
        attempts: s.attempts.0,
        backoff: s.backoff.get(),
        max_backoff: s.max_backoff.get(),
        max_event: usize::try_from(s.max_event.0).unwrap_or(usize::MAX),
    });
    Some(ProxyAction {
        target,
        sse,
        strip_prefix: p.strip_prefix.0,
        rewrite,
        preserve_host: p.preserve_host.0,
        response_timeout: p.timeouts.response.get(),
        idle_timeout: p.timeouts.idle.get(),
        total_timeout: p.timeouts.total.map(|d| d.get()),
        body_timeout: p.timeouts.body.get(),
        tunnel_idle: p.timeouts.tunnel_idle.get(),
        upgrades,
        allow_names,
        retry,
        client,
    })
}

pub fn parse_fixed_target(url: &str) -> Result<FixedTarget, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a valid URL: {e}"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        _ => return Err(format!("{url:?} must start with http:// or https://")),
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{url:?} has no host"))?;
    if authority.host().is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!(
            "{url:?}: an upstream URL cannot have a query string"
        ));
    }
    if authority.as_str().contains('@') {
        // They would never be sent, and would show up in logs as the upstream label.
        return Err("an upstream URL cannot carry credentials (user:password@)".to_owned());
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok(FixedTarget {
        scheme,
        label: Arc::from(authority.as_str()),
        authority,
        base_path,
    })
}
