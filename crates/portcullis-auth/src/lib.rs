//! Request authentication for Portcullis.
//!
//! Currently provides [`jwt`]: verification of JSON Web Tokens (JWS compact
//! serialisation) against an HMAC secret, static PEM public keys, or a remote
//! JWKS document that is cached and refreshed in the background.

pub mod apikey;
pub mod http_client;
pub mod issuer;
pub mod jwt;
pub mod users;
