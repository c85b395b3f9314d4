//! What the store keeps: a session (the user and the provider's tokens) and a login
//! in progress (its PKCE verifier, nonce and where to return). Both are stored
//! sealed (see [`crate::seal`]).

use serde::{Deserialize, Serialize};

/// A signed-in browser's session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The provider says it verified `email` (only then is it an identity header).
    #[serde(default)]
    pub email_verified: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picture: Option<String>,
    /// Scopes the provider granted (space-separated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Unix seconds: when the session began and when it ends whatever its activity.
    pub created_at: u64,
    pub expires_at: u64,
    pub access_token: String,
    /// Unix seconds; `None` when the provider did not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_expires_at: Option<u64>,
    /// Unix seconds: when the current access token was issued.
    #[serde(default)]
    pub access_issued_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// For RP-initiated logout (`id_token_hint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
}

/// A login between the redirect to the provider and its callback; single use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginState {
    pub verifier: String,
    pub nonce: String,
    /// Local path to return to.
    pub next: String,
    /// Origin to return to (`https://app.example.com`).
    pub return_to: String,
    /// SHA-256 of the browser-binding cookie set with the redirect: the callback must
    /// come from the browser that started the login.
    pub binding: String,
}
