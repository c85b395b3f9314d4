//! The auth policy: the first in every chain that has one. It checks the route's
//! authenticators (any of, optional, required scopes), removes every credential
//! source before the request goes further, and sets the identity headers.

use std::borrow::Cow;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::Request;
use hyper::body::Incoming;

use super::Flow;
use crate::auth::{
    find_credential, query_without_any, remove_credentials, Authenticator, CredentialSources,
    Failure, Identity, RequestView,
};
use crate::context::RequestCtx;
use crate::error::{ErrorCode, GatewayError};

/// A route's authentication rule.
#[derive(Clone)]
pub enum AuthPolicy {
    /// Nothing configured anywhere: open mode.
    Open,
    /// The route is marked `public`.
    Public,
    Required {
        /// A request passes if any of these accepts it.
        authenticators: Arc<[Arc<Authenticator>]>,
        /// No credential at all: continue anonymously.
        optional: bool,
        /// All of these must be granted.
        scopes: Arc<[String]>,
        forward_credential: bool,
        sources: Arc<CredentialSources>,
    },
}

impl AuthPolicy {
    /// Where credentials must be removed from before proxying; `None` when the
    /// route has no authenticator or forwards credentials.
    pub fn credential_sources(&self) -> Option<&CredentialSources> {
        match self {
            AuthPolicy::Required {
                forward_credential: false,
                sources,
                ..
            } => Some(sources),
            _ => None,
        }
    }

    /// For `portcullis routes` and `/admin/routes`.
    pub fn describe(&self) -> String {
        match self {
            AuthPolicy::Open => "open".to_owned(),
            AuthPolicy::Public => "public".to_owned(),
            AuthPolicy::Required {
                authenticators,
                optional,
                scopes,
                ..
            } => {
                let names: Vec<&str> = authenticators.iter().map(|a| a.name()).collect();
                let mut out = names.join("|");
                if *optional {
                    out.push_str(" (optional)");
                }
                if !scopes.is_empty() {
                    out.push_str(&format!(" scopes={}", scopes.join(",")));
                }
                out
            }
        }
    }

    /// The identity the request's credential proves (`None`: no auth, or optional
    /// and absent), or the error to answer with.
    pub async fn check(&self, req: &RequestView<'_>) -> Result<Option<Identity>, GatewayError> {
        let (headers, query) = (req.headers, req.query);
        let AuthPolicy::Required {
            authenticators,
            optional,
            scopes,
            ..
        } = self
        else {
            return Ok(None);
        };
        let mut presented = false;
        let mut expired = false;
        let mut unavailable = false;
        let mut store_down = false;
        let mut session_ended = None;
        let mut denied = None;
        for authenticator in authenticators.iter() {
            let Some((credential, source)) =
                find_credential(&authenticator.sources(), headers, query)
            else {
                continue;
            };
            presented = true;
            match authenticator.verify(&credential, &source, req).await {
                Ok(mut identity) => {
                    identity.source = source;
                    if let Some(missing) = scopes.iter().find(|s| !identity.scopes.contains(s)) {
                        return Err(insufficient_scope(scopes, missing));
                    }
                    return Ok(Some(identity));
                }
                Err(Failure::Expired) => expired = true,
                Err(Failure::KeysUnavailable) => unavailable = true,
                Err(Failure::StoreUnavailable) => store_down = true,
                Err(Failure::SessionEnded(clear)) => session_ended = Some(clear),
                Err(Failure::Denied(d)) => denied = Some(d),
                Err(Failure::ServiceUnavailable) => unavailable = true,
                Err(Failure::Invalid) => {}
            }
        }
        if !presented {
            if *optional {
                return Ok(None);
            }
            return Err(unauthorized(
                ErrorCode::Unauthorized,
                "missing credential",
                "Bearer",
            ));
        }
        if let Some(clear) = session_ended {
            return Err(GatewayError::new(
                ErrorCode::SessionExpired,
                "the session has ended; log in again",
            )
            .with_header(header::SET_COOKIE, clear));
        }
        if let Some(d) = denied {
            if let crate::auth::external::Decision::Deny(denial) = &*d {
                return Err(denial.to_error());
            }
        }
        if expired {
            return Err(unauthorized(
                ErrorCode::ExpiredToken,
                "the token has expired",
                "Bearer error=\"invalid_token\", error_description=\"the token has expired\"",
            ));
        }
        if unavailable || store_down {
            // A credential we could not check is neither accepted nor called invalid.
            tracing::warn!(
                "credential could not be verified (JWKS, store or authorization service unavailable)"
            );
            return Err(GatewayError::server(ErrorCode::ServiceUnavailable));
        }
        Err(unauthorized(
            ErrorCode::Unauthorized,
            "invalid credential",
            "Bearer error=\"invalid_token\"",
        ))
    }
}

fn unauthorized(code: ErrorCode, message: &str, challenge: &'static str) -> GatewayError {
    GatewayError::new(code, message).with_header(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    )
}

fn insufficient_scope(required: &[String], missing: &str) -> GatewayError {
    let challenge = format!(
        "Bearer error=\"insufficient_scope\", scope=\"{}\"",
        required.join(" ")
    );
    let mut e = GatewayError::new(
        ErrorCode::InsufficientScope,
        format!("the token lacks the scope {missing:?}"),
    );
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        e = e.with_header(header::WWW_AUTHENTICATE, v);
    }
    e
}

impl AuthPolicy {
    pub(super) async fn on_request(
        &self,
        ctx: &mut RequestCtx<'_>,
        req: &mut Request<Incoming>,
    ) -> Result<Flow, GatewayError> {
        let view = RequestView {
            method: &ctx.method,
            path: ctx.path,
            query: ctx.query.as_deref(),
            headers: req.headers(),
            host: ctx.authority.as_ref(),
            scheme: ctx.conn.scheme,
            client_ip: ctx.client_ip,
            request_id: (&ctx.snapshot.request_id_header, ctx.request_id),
        };
        let identity = self.check(&view).await?;
        // Every credential source the route knows goes, not just the one that matched.
        if let Some(sources) = self.credential_sources() {
            let params = remove_credentials(req.headers_mut(), sources);
            if let Some(q) = ctx.query.as_deref() {
                if let Some(stripped) = query_without_any(q, params) {
                    ctx.path_changed = true;
                    ctx.query = (!stripped.is_empty()).then_some(Cow::Owned(stripped));
                }
            }
        }
        if let Some(identity) = identity {
            ctx.record.principal = Some(identity.principal.clone());
            for (name, value) in &identity.headers {
                req.headers_mut().insert(name.clone(), value.clone());
            }
            ctx.identity = Some(identity);
        }
        Ok(Flow::Continue)
    }
}
