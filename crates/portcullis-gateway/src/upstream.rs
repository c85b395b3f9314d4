//! Upstream HTTP clients: pooled, keep-alive, HTTP/1.1 and HTTP/2 (h2c or ALPN), with a
//! bounded DNS cache so templated upstreams (`http://{name}:8080`) resolve per request
//! without a lookup per request.
//!
//! Clients are shared across config reloads when their settings are unchanged, so a
//! reload keeps warm connection pools.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use portcullis_config::UpstreamProtocol;

use crate::body::Body;

pub type UpstreamClient = Client<HttpsConnector<HttpConnector<CachingResolver>>, Body>;

/// Everything that makes two upstream clients different.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientSettings {
    pub protocol: UpstreamProtocol,
    pub ca_file: Option<String>,
    pub insecure_skip_verify: bool,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
}

/// Resolves host names through the system resolver, caching answers for a short TTL
/// in a bounded cache.
#[derive(Clone)]
pub struct CachingResolver {
    cache: moka::sync::Cache<String, Arc<Vec<SocketAddr>>>,
}

impl CachingResolver {
    pub fn new(ttl: Duration, max_entries: u64) -> Self {
        CachingResolver {
            cache: moka::sync::Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .build(),
        }
    }
}

type ResolveFuture =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, std::io::Error>> + Send>>;

impl tower::Service<Name> for CachingResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = ResolveFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let cache = self.cache.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            if let Some(addrs) = cache.get(&host) {
                return Ok(Vec::clone(&addrs).into_iter());
            }
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{host} has no addresses"),
                ));
            }
            cache.insert(host, Arc::new(addrs.clone()));
            Ok(addrs.into_iter())
        })
    }
}

/// Builds clients and hands out the same one for the same settings.
pub struct ClientRegistry {
    resolver: CachingResolver,
    clients: Mutex<HashMap<ClientSettings, UpstreamClient>>,
}

impl ClientRegistry {
    pub fn new(resolver: CachingResolver) -> Self {
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
        let client = build_client(settings, self.resolver.clone())?;
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
    resolver: CachingResolver,
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
