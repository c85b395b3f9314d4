//! Compiling the `auth`, `authenticators` and route `auth` config into
//! [`Authenticator`]s and [`AuthPolicy`]s.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use portcullis_config::{Config, Location, RouteConfig};

use super::{Authenticator, TokenSources};
use crate::policy::auth::AuthPolicy;
use crate::snapshot::{header_name, relative_to, Errors};

/// The implicit authenticator of a `tokens:` list; None for no list. A list whose
/// every value is empty (an unset `${TOKEN:-}`) is an error: an empty secret never
/// opens a route. Open mode is `auth: {open: true}` or no tokens anywhere.
pub(crate) fn static_authenticator(
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

pub(crate) async fn compile_authenticators(
    config: &Config,
    source: &Path,
    store: &Arc<dyn portcullis_store::Store>,
    clients: &crate::upstream::ClientRegistry,
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
            AuthenticatorConfig::Oidc(o) => {
                if config
                    .authenticators
                    .iter()
                    .filter(|(_, a)| matches!(a.value, AuthenticatorConfig::Oidc(_)))
                    .count()
                    > 1
                {
                    errors.push(
                        at,
                        format!("{field}.oidc"),
                        "at most one oidc authenticator",
                    );
                    continue;
                }
                match crate::action::oidc::compile(o, at, &field, source, store, errors) {
                    Some(service) => Authenticator::Oidc {
                        name: Arc::from(name.as_str()),
                        service,
                    },
                    None => continue,
                }
            }
            AuthenticatorConfig::External(x) => {
                match super::external::compile(x, at, &field, source, clients, errors) {
                    Some(auth) => Authenticator::External {
                        name: Arc::from(name.as_str()),
                        auth: Arc::new(auth),
                    },
                    None => continue,
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

/// A route's policy: `public`, its own `auth`, or the gateway-wide default.
pub(crate) fn route_policy(
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
        sources,
    }
}
