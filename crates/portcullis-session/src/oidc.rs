//! The OpenID Connect relying party: discovery, the authorization request (code +
//! PKCE S256, state, nonce), the code exchange, refresh, revocation and ID-token
//! verification (signature against the provider's JWKS, then issuer, audience,
//! `azp`, expiry, nonce and `auth_time`).
//!
//! Discovery is lazy and retried at most every [`DISCOVERY_RETRY`]: the gateway
//! starts while its provider is down, and logins fail with [`OidcError::Unavailable`]
//! until the provider answers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::{HeaderValue, StatusCode, Uri};
use portcullis_auth::http_client::{parse_http_uri, HttpClient, HttpResponse};
use portcullis_auth::jwt::{Algorithm, JwtConfig, JwtVerifier, KeySource};
use serde::Deserialize;
use serde_json::{Map, Value};
use subtle::ConstantTimeEq as _;
use tokio::sync::Mutex;

use crate::sessions::now_secs;

/// Shortest time between two discovery attempts after a failure.
pub const DISCOVERY_RETRY: Duration = Duration::from_secs(10);
/// Largest document accepted from the provider.
const MAX_BODY: usize = 1024 * 1024;
/// Parameters the gateway sets itself; `authorize_params` may not replace them.
pub const RESERVED_PARAMS: [&str; 10] = [
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
    "max_age",
    "response_mode",
];

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The provider could not be reached or answered 5xx: try again later.
    #[error("identity provider unavailable: {0}")]
    Unavailable(String),
    /// The grant itself is dead (`invalid_grant`): expired, revoked or reused.
    #[error("identity provider refused the grant")]
    InvalidGrant,
    /// The provider refused for another reason (`invalid_client`, a 403 from a
    /// proxy…): the grant may still be good.
    #[error("identity provider refused: {0}")]
    Refused(String),
    /// The provider answered something a conforming provider does not.
    #[error("invalid answer from the identity provider: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    Basic,
    Post,
}

/// Fixed settings of the relying party.
pub struct OidcSettings {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    pub client_auth: ClientAuth,
    pub redirect_uri: String,
    pub scopes: String,
    pub authorize_params: Vec<(String, String)>,
    /// 0: `max_age` not sent, `auth_time` not checked.
    pub max_age: Duration,
    pub leeway: Duration,
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
    /// Endpoints set explicitly; they win over discovery's. With the authorization
    /// and token endpoints and the JWKS URI all set, discovery is not used.
    pub endpoints: Endpoints,
}

/// Explicit endpoint URLs (seed 002's `OIDC_*_ENDPOINT`, `OIDC_JWKS_URI`).
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    pub authorization: Option<String>,
    pub token: Option<String>,
    pub jwks_uri: Option<String>,
    pub revocation: Option<String>,
    pub end_session: Option<String>,
}

impl std::fmt::Debug for OidcSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcSettings")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("redirect_uri", &self.redirect_uri)
            .finish_non_exhaustive()
    }
}

/// What discovery said, and the ID-token verifier built on its key set.
pub struct Provider {
    pub authorization_endpoint: Uri,
    pub token_endpoint: Uri,
    pub revocation_endpoint: Option<Uri>,
    pub end_session_endpoint: Option<Uri>,
    /// The provider names itself in authorization responses (RFC 9207): the
    /// callback's `iss` is then required.
    pub iss_in_response: bool,
    id_tokens: JwtVerifier,
    jwks_uri: String,
    algorithms: Vec<Algorithm>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    revocation_endpoint: Option<String>,
    #[serde(default)]
    end_session_endpoint: Option<String>,
    #[serde(default)]
    id_token_signing_alg_values_supported: Vec<String>,
    #[serde(default)]
    authorization_response_iss_parameter_supported: bool,
}

/// A token endpoint's answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Tokens {
    pub access_token: String,
    pub token_type: String,
    #[serde(default)]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub refresh_token: Option<String>,
    #[serde(default)]
    pub id_token: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
}

/// The verified claims of an ID token.
#[derive(Debug, Clone)]
pub struct IdClaims {
    pub sub: String,
    pub claims: Map<String, Value>,
}

impl IdClaims {
    pub fn string(&self, name: &str) -> Option<String> {
        self.claims
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
    }
}

pub struct OidcClient {
    settings: OidcSettings,
    http: HttpClient,
    provider: Mutex<Discovered>,
}

#[derive(Default)]
struct Discovered {
    provider: Option<Arc<Provider>>,
    failed_at: Option<Instant>,
}

impl OidcClient {
    pub fn new(settings: OidcSettings) -> Result<Self, String> {
        parse_http_uri(&settings.issuer).map_err(|e| format!("issuer: {e}"))?;
        parse_http_uri(&settings.redirect_uri).map_err(|e| format!("redirect URI: {e}"))?;
        let http = HttpClient::new(settings.timeout, MAX_BODY, settings.ca_file.as_deref())
            .map_err(|e| e.to_string())?;
        Ok(OidcClient {
            settings,
            http,
            provider: Mutex::new(Discovered::default()),
        })
    }

    pub fn settings(&self) -> &OidcSettings {
        &self.settings
    }

    /// The provider's endpoints, discovered on first use.
    pub async fn provider(&self) -> Result<Arc<Provider>, OidcError> {
        let mut d = self.provider.lock().await;
        if let Some(p) = &d.provider {
            return Ok(p.clone());
        }
        if d.failed_at.is_some_and(|t| t.elapsed() < DISCOVERY_RETRY) {
            return Err(OidcError::Unavailable(
                "discovery failed recently; retrying shortly".into(),
            ));
        }
        match self.discover().await {
            Ok(p) => {
                let p = Arc::new(p);
                d.provider = Some(p.clone());
                d.failed_at = None;
                Ok(p)
            }
            Err(e) => {
                d.failed_at = Some(Instant::now());
                Err(e)
            }
        }
    }

    async fn discover(&self) -> Result<Provider, OidcError> {
        let s = &self.settings;
        let e = &s.endpoints;
        let mut doc = match (&e.authorization, &e.token, &e.jwks_uri) {
            // Everything needed is configured: no discovery document is read.
            (Some(a), Some(t), Some(j)) => Discovery {
                issuer: s.issuer.clone(),
                authorization_endpoint: a.clone(),
                token_endpoint: t.clone(),
                jwks_uri: j.clone(),
                revocation_endpoint: None,
                end_session_endpoint: None,
                id_token_signing_alg_values_supported: Vec::new(),
                authorization_response_iss_parameter_supported: false,
            },
            _ => self.fetch_discovery().await?,
        };
        let set = |target: &mut String, v: &Option<String>| {
            if let Some(v) = v {
                v.clone_into(target);
            }
        };
        set(&mut doc.authorization_endpoint, &e.authorization);
        set(&mut doc.token_endpoint, &e.token);
        set(&mut doc.jwks_uri, &e.jwks_uri);
        if e.revocation.is_some() {
            doc.revocation_endpoint.clone_from(&e.revocation);
        }
        if e.end_session.is_some() {
            doc.end_session_endpoint.clone_from(&e.end_session);
        }
        let endpoint = |name: &str, v: &str| {
            parse_http_uri(v).map_err(|e| OidcError::Invalid(format!("{name}: {e}")))
        };
        let optional = |name: &str, v: &Option<String>| match v {
            Some(v) => endpoint(name, v).map(Some),
            None => Ok(None),
        };
        // Asymmetric algorithms only: an ID token signed with the client secret
        // (HS256) could be minted by anyone who holds it. Without a discovery
        // document the usual ones are allowed (the key set decides).
        let mut algorithms: Vec<Algorithm> = doc
            .id_token_signing_alg_values_supported
            .iter()
            .filter_map(|a| a.parse::<Algorithm>().ok())
            .filter(|a| !a.is_hmac())
            .collect();
        if algorithms.is_empty() {
            algorithms = [
                "RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA",
            ]
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        }
        endpoint("jwks_uri", &doc.jwks_uri)?;
        let id_tokens = self
            .verifier(&doc.jwks_uri, &algorithms, vec![s.client_id.clone()], 0)
            .await?;
        Ok(Provider {
            authorization_endpoint: endpoint(
                "authorization_endpoint",
                &doc.authorization_endpoint,
            )?,
            token_endpoint: endpoint("token_endpoint", &doc.token_endpoint)?,
            revocation_endpoint: optional("revocation_endpoint", &doc.revocation_endpoint)?,
            end_session_endpoint: optional("end_session_endpoint", &doc.end_session_endpoint)?,
            iss_in_response: doc.authorization_response_iss_parameter_supported,
            id_tokens,
            jwks_uri: doc.jwks_uri,
            algorithms,
        })
    }

    async fn fetch_discovery(&self) -> Result<Discovery, OidcError> {
        let s = &self.settings;
        let url = format!(
            "{}/.well-known/openid-configuration",
            s.issuer.trim_end_matches('/')
        );
        let uri = parse_http_uri(&url).map_err(OidcError::Invalid)?;
        let res = self
            .http
            .get(&uri, "application/json")
            .await
            .map_err(OidcError::Unavailable)?;
        let doc: Discovery = json_ok(res)?;
        if doc.issuer != s.issuer {
            return Err(OidcError::Invalid(format!(
                "discovery names issuer {:?}, not the configured {:?}",
                doc.issuer, s.issuer
            )));
        }
        Ok(doc)
    }

    /// A JWT verifier on the provider's key set: its issuer, `audience`, the
    /// provider's asymmetric algorithms.
    async fn verifier(
        &self,
        jwks_uri: &str,
        algorithms: &[Algorithm],
        audience: Vec<String>,
        cache: u64,
    ) -> Result<JwtVerifier, OidcError> {
        let s = &self.settings;
        let mut config = JwtConfig::new(
            algorithms.to_vec(),
            KeySource::Jwks {
                url: jwks_uri.to_owned(),
                refresh_interval: Duration::from_secs(300),
                min_refetch_interval: Duration::from_secs(10),
                timeout: s.timeout,
                ca_file: s.ca_file.clone(),
            },
        );
        config.issuer = Some(vec![s.issuer.clone()]);
        config.audience = Some(audience);
        config.leeway = s.leeway;
        config.cache_max_entries = cache;
        JwtVerifier::new(config)
            .await
            .map_err(|e| OidcError::Invalid(e.to_string()))
    }

    /// A verifier of the provider's JWT access tokens for `audience` (API clients
    /// sending `Authorization: Bearer`), with a verified-token cache.
    pub async fn access_token_verifier(
        &self,
        p: &Provider,
        audience: Vec<String>,
    ) -> Result<JwtVerifier, OidcError> {
        self.verifier(&p.jwks_uri, &p.algorithms, audience, 10_000)
            .await
    }

    /// The authorization request's URL.
    pub fn authorize_url(&self, p: &Provider, state: &str, nonce: &str, challenge: &str) -> String {
        let s = &self.settings;
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("response_type", "code")
            .append_pair("client_id", &s.client_id)
            .append_pair("redirect_uri", &s.redirect_uri)
            .append_pair("scope", &s.scopes)
            .append_pair("state", state)
            .append_pair("nonce", nonce)
            .append_pair("code_challenge", challenge)
            .append_pair("code_challenge_method", "S256");
        if !s.max_age.is_zero() {
            q.append_pair("max_age", &s.max_age.as_secs().to_string());
        }
        for (k, v) in &s.authorize_params {
            q.append_pair(k, v);
        }
        let base = p.authorization_endpoint.to_string();
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}{}", q.finish())
    }

    /// Exchanges an authorization code (with its PKCE verifier).
    pub async fn exchange(
        &self,
        p: &Provider,
        code: &str,
        verifier: &str,
    ) -> Result<Tokens, OidcError> {
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", self.settings.redirect_uri.as_str()),
            ("code_verifier", verifier),
        ];
        self.token_request(p, &form).await
    }

    /// Refreshes the access token.
    pub async fn refresh(&self, p: &Provider, refresh_token: &str) -> Result<Tokens, OidcError> {
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ];
        self.token_request(p, &form).await
    }

    async fn token_request(
        &self,
        p: &Provider,
        form: &[(&str, &str)],
    ) -> Result<Tokens, OidcError> {
        let res = self.post_authenticated(&p.token_endpoint, form).await?;
        let tokens: Tokens = json_ok(res)?;
        if !tokens.token_type.eq_ignore_ascii_case("bearer") || tokens.access_token.is_empty() {
            return Err(OidcError::Invalid("not a bearer access token".into()));
        }
        Ok(tokens)
    }

    /// Revokes a token at the provider's revocation endpoint, when it has one.
    pub async fn revoke(&self, p: &Provider, token: &str, hint: &str) -> Result<(), OidcError> {
        let Some(endpoint) = &p.revocation_endpoint else {
            return Ok(());
        };
        let form = [("token", token), ("token_type_hint", hint)];
        let res = self.post_authenticated(endpoint, &form).await?;
        if res.status.is_success() {
            Ok(())
        } else {
            Err(classify(res.status, &res.body))
        }
    }

    async fn post_authenticated(
        &self,
        uri: &Uri,
        form: &[(&str, &str)],
    ) -> Result<HttpResponse, OidcError> {
        let s = &self.settings;
        let mut fields: Vec<(&str, &str)> = form.to_vec();
        let authorization = match s.client_auth {
            ClientAuth::Basic => {
                // RFC 6749 §2.3.1: both parts form-urlencoded before base64.
                let enc =
                    |v: &str| form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
                let raw = format!("{}:{}", enc(&s.client_id), enc(&s.client_secret));
                let value = HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(raw)))
                    .map_err(|_| OidcError::Invalid("client credentials".into()))?;
                Some(value)
            }
            ClientAuth::Post => {
                fields.push(("client_id", &s.client_id));
                fields.push(("client_secret", &s.client_secret));
                None
            }
        };
        self.http
            .post_form(uri, &fields, authorization)
            .await
            .map_err(OidcError::Unavailable)
    }

    /// Verifies an ID token: signature and standard claims, then `nonce` (when one
    /// was sent), `azp` and — at login (`fresh`) — `auth_time` against `max_age`
    /// (a refreshed ID token keeps the original `auth_time`).
    pub async fn verify_id_token(
        &self,
        p: &Provider,
        token: &str,
        nonce: Option<&str>,
        fresh: bool,
    ) -> Result<IdClaims, OidcError> {
        let verified = p
            .id_tokens
            .verify(token)
            .await
            .map_err(|e| OidcError::Invalid(format!("ID token: {e}")))?;
        let claims = verified.claims.clone();
        let sub = verified
            .subject
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| OidcError::Invalid("ID token has no sub".into()))?;
        let s = &self.settings;
        if let Some(expected) = nonce {
            let got = claims.get("nonce").and_then(Value::as_str).unwrap_or("");
            if !bool::from(got.as_bytes().ct_eq(expected.as_bytes())) {
                return Err(OidcError::Invalid("ID token nonce does not match".into()));
            }
        }
        let several_audiences = claims
            .get("aud")
            .and_then(Value::as_array)
            .is_some_and(|a| a.len() > 1);
        match claims.get("azp").and_then(Value::as_str) {
            Some(azp) if azp != s.client_id => {
                return Err(OidcError::Invalid("ID token azp is another client".into()))
            }
            None if several_audiences => {
                return Err(OidcError::Invalid(
                    "ID token has several audiences and no azp".into(),
                ))
            }
            _ => {}
        }
        if fresh && !s.max_age.is_zero() {
            let auth_time = claims
                .get("auth_time")
                .and_then(Value::as_u64)
                .ok_or_else(|| OidcError::Invalid("ID token has no auth_time".into()))?;
            if now_secs().saturating_sub(auth_time) > (s.max_age + s.leeway).as_secs() {
                return Err(OidcError::Invalid(
                    "the provider's authentication is older than max_age".into(),
                ));
            }
        }
        Ok(IdClaims { sub, claims })
    }
}

/// A 2xx JSON document, or the error the status says.
fn json_ok<T: serde::de::DeserializeOwned>(res: HttpResponse) -> Result<T, OidcError> {
    if !res.status.is_success() {
        return Err(classify(res.status, &res.body));
    }
    serde_json::from_slice(&res.body).map_err(|e| OidcError::Invalid(format!("JSON: {e}")))
}

/// 5xx and 429 are the provider's trouble; other statuses refuse. The provider's
/// `error` code is kept (it is a short registered token); its description is not.
fn classify(status: StatusCode, body: &[u8]) -> OidcError {
    let code = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
        .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_default();
    let what = format!("status {status} {code}").trim_end().to_owned();
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        OidcError::Unavailable(what)
    } else if code == "invalid_grant" {
        OidcError::InvalidGrant
    } else {
        OidcError::Refused(what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_errors_are_classified_without_their_descriptions() {
        let body = br#"{"error":"invalid_grant","error_description":"secret detail"}"#;
        let e = classify(StatusCode::BAD_REQUEST, body);
        assert!(matches!(&e, OidcError::InvalidGrant));
        assert!(!e.to_string().contains("secret detail"));
        let client = classify(StatusCode::UNAUTHORIZED, br#"{"error":"invalid_client"}"#);
        assert!(matches!(&client, OidcError::Refused(m) if m.contains("invalid_client")));
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, b"<html>"),
            OidcError::Unavailable(_)
        ));
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, b""),
            OidcError::Unavailable(_)
        ));
        let junk = classify(StatusCode::UNAUTHORIZED, br#"{"error":"a\nb"}"#);
        assert_eq!(
            junk.to_string(),
            "identity provider refused: status 401 Unauthorized"
        );
    }

    #[test]
    fn settings_never_print_the_secret() {
        let s = OidcSettings {
            issuer: "https://idp.example.test".into(),
            client_id: "app".into(),
            client_secret: "hunter2".into(),
            client_auth: ClientAuth::Basic,
            redirect_uri: "https://app.example.test/auth/callback".into(),
            scopes: "openid".into(),
            authorize_params: vec![],
            max_age: Duration::ZERO,
            leeway: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            ca_file: None,
            endpoints: Endpoints::default(),
        };
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
