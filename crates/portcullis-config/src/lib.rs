//! Portcullis configuration: one YAML file parsed into plain typed structs.
//!
//! [`load`] reads and parses a file; structural errors (syntax, unknown fields, bad
//! types, unset `${VAR}`) carry the file, line and column. Semantic checks that need
//! the runtime (route conflicts, certificates) happen when the gateway compiles the
//! config, and report positions through [`ConfigError::at`].

mod compose;
mod identity;
mod interp;
mod policies;
mod types;
mod upstreams;

use std::fmt;
use std::path::{Path, PathBuf};

pub use compose::*;
pub use identity::*;
pub use interp::{
    interpolate, parse_size, ByteSize, Duration, EnvSource, Flag, ProcessEnv, Scalar, Secret, Text,
};
pub use policies::*;
pub use serde_saphyr::{Location, Spanned};
pub use types::*;
pub use upstreams::*;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when unknown.
    pub line: u64,
    pub column: u64,
    /// Dotted path of the field (`routes[2].proxy.upstream`), empty when unknown.
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn at(
        file: &Path,
        location: Location,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            file: file.to_owned(),
            line: location.line(),
            column: location.column(),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found, reported together.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            field: String::new(),
            message: format!("cannot read config file: {e}"),
        }])
    })?;
    parse(path, &text)
}

/// Parses YAML `text`; `path` is used in error messages.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    // serde_path_to_error tracks the field path (`routes[2].proxy.timeouts.connect`)
    // that a value error (bad duration, unset variable) occurred at.
    let mut field_path = String::new();
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize::<_, Config>(de).map_err(|e| {
            field_path = e.path().to_string();
            e.into_inner()
        })
    });
    result.map_err(|e| {
        let location = e.location().unwrap_or(Location::UNKNOWN);
        let message = plain_message(&e);
        // `Spanned` wrappers show up as a `value` segment; hide them.
        let cleaned = field_path
            .split('.')
            .filter(|s| !s.is_empty() && *s != "value")
            .collect::<Vec<_>>()
            .join(".")
            .replace(".[", "[");
        let field = if cleaned.is_empty() {
            field_from_message(&message)
        } else {
            cleaned
        };
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: location.line(),
            column: location.column(),
            field,
            message,
        }])
    })
}

/// serde-saphyr renders a source snippet; keep the first line of the message only,
/// because we print our own `file:line:col` prefix.
fn plain_message(e: &serde_saphyr::Error) -> String {
    let full = e.without_snippet().to_string();
    let first = full.lines().next().unwrap_or("").trim();
    // Drop a trailing " at line X, column Y" that duplicates our prefix.
    match first.find(" at line ") {
        Some(i) => first[..i].to_owned(),
        None => first.to_owned(),
    }
}

/// serde names the offending field in backticks in "unknown field `x`" and
/// "missing field `x`" messages.
fn field_from_message(message: &str) -> String {
    for marker in ["unknown field `", "missing field `", "duplicate field `"] {
        if let Some(start) = message.find(marker) {
            let rest = &message[start + marker.len()..];
            if let Some(end) = rest.find('`') {
                return rest[..end].to_owned();
            }
        }
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Config, ConfigErrors> {
        parse(Path::new("test.yaml"), s)
    }

    #[test]
    fn minimal_config_parses() {
        let c = parse_str(
            "listeners:\n  - address: 127.0.0.1:0\nroutes:\n  - path_prefix: /\n    proxy:\n      upstream: http://127.0.0.1:1\n",
        )
        .unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].value.name.as_str(), "main");
        assert_eq!(
            c.routes[0]
                .value
                .proxy
                .as_ref()
                .unwrap()
                .upstream
                .value
                .as_str(),
            "http://127.0.0.1:1"
        );
        assert_eq!(c.routes[0].referenced.line(), 4);
    }

    #[test]
    fn unknown_field_names_line_and_field() {
        let err = parse_str(
            "listeners:\n  - address: 127.0.0.1:0\nroutes:\n  - path: /x\n    proxi: {}\n",
        )
        .unwrap_err();
        let e = &err.0[0];
        assert_eq!(e.line, 5, "{err}");
        assert!(e.field.ends_with("proxi"), "{err}");
        assert!(err.to_string().starts_with("test.yaml:5:"), "{err}");
    }

    #[test]
    fn bad_duration_is_located() {
        let err = parse_str("server:\n  shutdown_grace: soon\n").unwrap_err();
        assert_eq!(err.0[0].line, 2, "{err}");
        assert!(err.0[0].message.contains("invalid duration"), "{err}");
        assert_eq!(err.0[0].field, "server.shutdown_grace", "{err}");
    }

    #[test]
    fn oidc_authenticator_defaults() {
        let c = parse_str(
            "authenticators:\n  web:\n    oidc:\n      issuer: https://idp.example.test\n      client_id: app\n      client_secret: s3cret\n      public_url: https://app.example.test\n      session: {encryption_key: k3y}\n",
        )
        .unwrap();
        let AuthenticatorConfig::Oidc(o) = &c.authenticators["web"].value else {
            panic!("not oidc");
        };
        assert_eq!(o.issuer.value.as_str(), "https://idp.example.test");
        assert_eq!(o.client_auth, OidcClientAuth::ClientSecretBasic);
        assert_eq!(o.scopes.as_str(), "openid profile email offline_access");
        assert_eq!(o.paths.login.as_str(), "/auth/login");
        assert_eq!(o.paths.callback.as_str(), "/auth/callback");
        assert_eq!(o.paths.logout.as_str(), "/auth/logout");
        assert_eq!(o.paths.me.len(), 2);
        assert_eq!(o.state_ttl.get().as_secs(), 600);
        assert_eq!(o.refresh_skew.get().as_secs(), 60);
        assert_eq!(o.id_token_max_age.get().as_secs(), 0);
        assert_eq!(o.session.cookie_name.as_str(), "sid");
        assert!(o.session.cookie_secure.0);
        assert_eq!(o.session.cookie_same_site, SameSite::Lax);
        assert!(o.session.cookie_domain.as_str().is_empty());
        assert_eq!(o.session.idle_ttl.get().as_secs(), 8 * 3600);
        assert_eq!(o.identity_headers.sub.as_str(), "x-user-sub");
        assert!(!o.forward_access_token.0);
        // Secrets stay out of debug output and serialisation.
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("s3cret") && !json.contains("k3y"));
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn oidc_enums_are_interpolated() {
        let c = parse_str(
            "authenticators:\n  web:\n    oidc:\n      issuer: https://i.test\n      client_id: a\n      client_secret: s\n      public_url: https://a.test\n      client_auth: \"${PORTCULLIS_TEST_UNSET_CA:-client_secret_post}\"\n      session: {encryption_key: k, cookie_same_site: \"${PORTCULLIS_TEST_UNSET_SS:-None}\"}\n",
        )
        .unwrap();
        let AuthenticatorConfig::Oidc(o) = &c.authenticators["web"].value else {
            panic!("not oidc");
        };
        assert_eq!(o.client_auth, OidcClientAuth::ClientSecretPost);
        assert_eq!(o.session.cookie_same_site, SameSite::None);
        let err = parse_str(
            "authenticators:\n  web:\n    oidc:\n      issuer: https://i.test\n      client_id: a\n      client_secret: s\n      public_url: https://a.test\n      client_auth: basic\n",
        )
        .unwrap_err();
        assert_eq!(err.0[0].line, 8, "{err}");
    }

    #[test]
    fn oidc_unknown_field_is_located() {
        let err = parse_str(
            "authenticators:\n  web:\n    oidc:\n      issuer: https://idp.example.test\n      client_id: app\n      client_secret: s\n      public_url: https://app.example.test\n      sesion: {}\n",
        )
        .unwrap_err();
        assert_eq!(err.0[0].line, 8, "{err}");
        assert!(err.0[0].field.ends_with("sesion"), "{err}");
    }

    #[test]
    fn secrets_are_redacted_when_serialised() {
        let c = parse_str("auth:\n  tokens: [\"s3cret\"]\n").unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("s3cret"));
        assert!(format!("{c:?}").find("s3cret").is_none());
    }
}
