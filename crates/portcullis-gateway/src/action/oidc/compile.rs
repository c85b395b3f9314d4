//! Compiles an `oidc` authenticator's config into its [`OidcService`]: every
//! mistake is a located error, and nothing half-configured is served.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use portcullis_config::{Location, OidcClientAuth, OidcConfig, SameSite as CfgSameSite};
use portcullis_session::cookie::{CookieSpec, SameSite};
use portcullis_session::oidc::{ClientAuth, OidcClient, OidcSettings, RESERVED_PARAMS};
use portcullis_session::redirect::{Origin, ReturnOrigins};
use portcullis_session::seal::Sealer;
use portcullis_session::sessions::Sessions;
use portcullis_store::Store;

use super::{IdentityHeaders, OidcPaths, OidcService};
use crate::snapshot::{header_name, relative_to, Errors};

/// Compiles an `oidc` authenticator; `None` (with errors) when it is unusable.
pub(crate) fn compile(
    c: &OidcConfig,
    at: Location,
    field: &str,
    source: &Path,
    store: &Arc<dyn Store>,
    errors: &mut Errors<'_>,
) -> Option<Arc<OidcService>> {
    let before = errors.count();
    let f = |name: &str| format!("{field}.oidc.{name}");
    if c.client_id.is_empty() {
        errors.push(at, f("client_id"), "must not be empty");
    }
    // Fail closed: an empty secret never authenticates to the provider.
    if c.client_secret.is_empty() {
        errors.push(at, f("client_secret"), "must not be empty");
    }
    if !c.scopes.split_ascii_whitespace().any(|s| s == "openid") {
        errors.push(at, f("scopes"), "must contain `openid`");
    }
    for k in c.authorize_params.keys() {
        if RESERVED_PARAMS.contains(&k.as_str()) {
            errors.push(
                at,
                f(&format!("authorize_params.{k}")),
                "is set by the gateway itself",
            );
        }
    }
    for (name, v) in [
        ("authorization_endpoint", &c.authorization_endpoint),
        ("token_endpoint", &c.token_endpoint),
        ("jwks_uri", &c.jwks_uri),
        ("revocation_endpoint", &c.revocation_endpoint),
        ("end_session_endpoint", &c.end_session_endpoint),
    ] {
        if !v.is_empty() {
            if let Err(e) = portcullis_auth::http_client::parse_http_uri(v) {
                errors.push(at, f(name), e);
            }
        }
    }
    let own = match Origin::parse(&c.public_url.value) {
        Ok(o) => Some(o),
        Err(e) => {
            errors.push(c.public_url.referenced, f("public_url"), e);
            None
        }
    };
    let mut allowed = Vec::new();
    for (i, entry) in c.allowed_origins.iter().enumerate() {
        for o in entry.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            if o == "*" {
                errors.push(
                    at,
                    f(&format!("allowed_origins[{i}]")),
                    "`*` would let any site receive the login; list the origins",
                );
                continue;
            }
            match Origin::parse(o) {
                Ok(o) => allowed.push(o),
                Err(e) => errors.push(at, f(&format!("allowed_origins[{i}]")), e),
            }
        }
    }
    let paths = OidcPaths {
        login: c.paths.login.to_string(),
        callback: c.paths.callback.to_string(),
        logout: c.paths.logout.to_string(),
        me: c.paths.me.iter().map(|p| p.to_string()).collect(),
    };
    let mut all: Vec<&str> = vec![&paths.login, &paths.callback, &paths.logout];
    all.extend(paths.me.iter().map(String::as_str));
    for (i, p) in all.iter().enumerate() {
        if !p.starts_with('/') {
            errors.push(at, f("paths"), format!("{p:?} must start with /"));
        }
        if all[..i].contains(p) {
            errors.push(at, f("paths"), format!("{p:?} is used twice"));
        }
    }
    let s = &c.session;
    let same_site = match s.cookie_same_site {
        CfgSameSite::Lax => SameSite::Lax,
        CfgSameSite::Strict => SameSite::Strict,
        CfgSameSite::None => SameSite::None,
    };
    let domain = Some(s.cookie_domain.as_str()).filter(|d| !d.is_empty());
    let cookie = CookieSpec::new(&s.cookie_name, "/", s.cookie_secure.0, same_site, domain)
        .map_err(|e| errors.push(at, f("session.cookie_name"), e))
        .ok();
    // Lax: the callback is a top-level navigation from the provider's site.
    let binding = CookieSpec::new(
        &format!("{}_login", s.cookie_name.as_str()),
        "/",
        s.cookie_secure.0,
        SameSite::Lax,
        domain,
    )
    .map_err(|e| errors.push(at, f("session.cookie_name"), e))
    .ok();
    let previous: Vec<&str> = s.previous_keys.iter().map(|k| k.expose()).collect();
    let sealer = if s.encryption_key.is_empty() {
        errors.push(
            at,
            f("session.encryption_key"),
            "required: base64 of 32 random bytes (e.g. `openssl rand -base64 32`)",
        );
        None
    } else {
        Sealer::from_base64(s.encryption_key.expose(), &previous)
            .map_err(|e| errors.push(at, f("session.encryption_key"), e.to_string()))
            .ok()
    };
    if s.idle_ttl.get().is_zero() || s.max_lifetime.get().is_zero() {
        errors.push(
            at,
            f("session"),
            "idle_ttl and max_lifetime must be above 0",
        );
    }
    let header = |v: &str, name: &str, errors: &mut Errors<'_>| {
        if v.is_empty() {
            None
        } else {
            header_name(v, at, f(&format!("identity_headers.{name}")), errors)
        }
    };
    let headers = IdentityHeaders {
        sub: header(&c.identity_headers.sub, "sub", errors),
        email: header(&c.identity_headers.email, "email", errors),
        name: header(&c.identity_headers.name, "name", errors),
    };
    // An ID token's audience is the client: accepting it as a bearer would let
    // anyone holding an ID token (it travels in logout URLs) call the API.
    if c.bearer_audience
        .iter()
        .any(|a| a.as_str() == c.client_id.as_str())
    {
        errors.push(
            at,
            f("bearer_audience"),
            "must be the API's audience, not client_id (that is the ID tokens' audience)",
        );
    }
    let (Some(own), Some(cookie), Some(binding), Some(sealer)) = (own, cookie, binding, sealer)
    else {
        return None;
    };
    if errors.count() > before {
        return None;
    }
    let settings = OidcSettings {
        issuer: c.issuer.value.to_string(),
        client_id: c.client_id.to_string(),
        client_secret: c.client_secret.expose().to_owned(),
        client_auth: match c.client_auth {
            OidcClientAuth::ClientSecretBasic => ClientAuth::Basic,
            OidcClientAuth::ClientSecretPost => ClientAuth::Post,
        },
        redirect_uri: format!("{}{}", own.url(), paths.callback),
        scopes: c.scopes.to_string(),
        authorize_params: c
            .authorize_params
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
        max_age: c.id_token_max_age.get(),
        leeway: c.leeway.get(),
        timeout: c.timeout.get(),
        ca_file: c
            .ca_file
            .as_ref()
            .map(|p| PathBuf::from(relative_to(source, p))),
        endpoints: {
            let opt = |t: &portcullis_config::Text| Some(t.to_string()).filter(|v| !v.is_empty());
            portcullis_session::oidc::Endpoints {
                authorization: opt(&c.authorization_endpoint),
                token: opt(&c.token_endpoint),
                jwks_uri: opt(&c.jwks_uri),
                revocation: opt(&c.revocation_endpoint),
                end_session: opt(&c.end_session_endpoint),
            }
        },
    };
    let client = match OidcClient::new(settings) {
        Ok(client) => client,
        Err(e) => {
            errors.push(c.issuer.referenced, f("issuer"), e);
            return None;
        }
    };
    let post_logout_redirect = c
        .post_logout_redirect
        .as_ref()
        .map(|p| p.to_string())
        .unwrap_or_else(|| format!("{}/", own.url()));
    Some(Arc::new(OidcService {
        client,
        sessions: Sessions::new(store.clone(), sealer, s.idle_ttl.get()),
        cookie,
        binding,
        origins: ReturnOrigins::new(own, allowed),
        paths,
        state_ttl: c.state_ttl.get(),
        max_lifetime: s.max_lifetime.get(),
        refresh_skew: c.refresh_skew.get(),
        forward_access_token: c.forward_access_token.0,
        end_session: c.end_session.0,
        post_logout_redirect,
        headers,
        bearer_audience: c.bearer_audience.iter().map(|a| a.to_string()).collect(),
        bearer: tokio::sync::OnceCell::new(),
    }))
}
