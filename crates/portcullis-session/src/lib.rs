//! Browser sessions for Portcullis (the backend-for-frontend pattern).
//!
//! - [`ids`]: session ids, login state, nonces and PKCE verifiers from the OS's
//!   random source; store keys are their SHA-256, so a store dump holds no live id.
//! - [`seal`]: tokens kept in a session record are encrypted (AES-256-GCM) and bound
//!   to their store key.
//! - [`cookie`]: the `Set-Cookie` header of the session cookie.
//! - [`redirect`]: where a login may send the browser back to (no open redirect).
//! - [`record`], [`sessions`]: sessions and login states in the shared store.
//! - [`oidc`]: the OpenID Connect relying party (discovery, code + PKCE, refresh,
//!   revocation, ID-token checks).

pub mod cookie;
pub mod ids;
pub mod oidc;
pub mod record;
pub mod redirect;
pub mod seal;
pub mod sessions;
