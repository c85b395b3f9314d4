//! Fetching JWKS documents over http/https with the identity-provider client.

use std::path::Path;
use std::time::Duration;

use super::keys::{parse_jwks, VerifyingKey};
use super::JwtSetupError;
use crate::http_client::{parse_http_uri, HttpClient, HttpSetupError};

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

pub(crate) struct JwksClient {
    client: HttpClient,
    uri: http::Uri,
}

impl JwksClient {
    pub(crate) fn new(
        url: &str,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<Self, JwtSetupError> {
        let uri = parse_http_uri(url).map_err(JwtSetupError::InvalidJwksUrl)?;
        let client = HttpClient::new(timeout, MAX_JWKS_BYTES, ca_file).map_err(|e| match e {
            HttpSetupError::CaFile { path, reason } => JwtSetupError::CaFile { path, reason },
            HttpSetupError::Tls(reason) => JwtSetupError::Tls(reason),
        })?;
        Ok(JwksClient { client, uri })
    }

    /// Fetches and parses the key set. The error string never contains
    /// response bodies.
    pub(crate) async fn fetch(&self) -> Result<Vec<VerifyingKey>, String> {
        let resp = self
            .client
            .get(&self.uri, "application/jwk-set+json, application/json")
            .await?;
        if !resp.status.is_success() {
            return Err(format!("unexpected status {}", resp.status));
        }
        parse_jwks(&resp.body)
    }
}
