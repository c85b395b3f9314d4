//! Upstream HTTP clients: pooled, keep-alive, HTTP/1.1 and HTTP/2 (h2c or ALPN),
//! resolving names through [`crate::dns`] (cached, coalesced, off the blocking pool)
//! and, for templated upstreams, only to addresses their route's targets permit.
//!
//! Clients are shared across config reloads when their settings are unchanged, so a
//! reload keeps warm connection pools.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use portcullis_config::UpstreamProtocol;

use crate::body::Body;
use crate::dns::{Resolver, UpstreamResolver};
use crate::targets::TargetRules;

pub type UpstreamClient = Client<HttpsConnector<HttpConnector<UpstreamResolver>>, Body>;

/// Everything that makes two upstream clients different.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientSettings {
    pub protocol: UpstreamProtocol,
    pub ca_file: Option<String>,
    pub insecure_skip_verify: bool,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
    /// Templated upstreams: the addresses their names may resolve to.
    pub targets: Option<Arc<TargetRules>>,
}

/// Builds clients and hands out the same one for the same settings.
pub struct ClientRegistry {
    resolver: Arc<Resolver>,
    clients: Mutex<HashMap<ClientSettings, UpstreamClient>>,
}

impl ClientRegistry {
    pub fn new(resolver: Arc<Resolver>) -> Self {
        ClientRegistry {
            resolver,
            clients: Mutex::new(HashMap::new()),
        }
    }

    pub fn client(&self, settings: &ClientSettings) -> Result<UpstreamClient, String> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| "client registry poisoned")?;
        if let Some(c) = clients.get(settings) {
            return Ok(c.clone());
        }
        let resolver = UpstreamResolver {
            resolver: self.resolver.clone(),
            rules: settings.targets.clone(),
        };
        let client = build_client(settings, resolver)?;
        clients.insert(settings.clone(), client.clone());
        Ok(client)
    }

    /// Drops clients no snapshot uses any more (in-flight requests keep their clone).
    pub fn retain(&self, used: &[ClientSettings]) {
        if let Ok(mut clients) = self.clients.lock() {
            clients.retain(|k, _| used.contains(k));
        }
    }
}

fn build_client(
    settings: &ClientSettings,
    resolver: UpstreamResolver,
) -> Result<UpstreamClient, String> {
    let mut http = HttpConnector::new_with_resolver(resolver);
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));

    let tls = crate::tls::client_config(settings)?;
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let connector = match settings.protocol {
        UpstreamProtocol::Auto => builder.enable_http1().enable_http2().wrap_connector(http),
        UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(http),
        UpstreamProtocol::Http2 => builder.enable_http2().wrap_connector(http),
    };

    let mut client = Client::builder(TokioExecutor::new());
    client
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_max_idle_per_host(settings.pool_max_idle)
        .http1_preserve_header_case(false)
        .http2_adaptive_window(true)
        .retry_canceled_requests(true)
        .set_host(true);
    if settings.protocol == UpstreamProtocol::Http2 {
        client.http2_only(true);
    }
    Ok(client.build(connector))
}
