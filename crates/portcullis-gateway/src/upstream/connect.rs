//! Opening an upstream connection: DNS (with a templated route's address rules),
//! TCP, TLS with ALPN. The HTTP handshake is the caller's ([`super`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use portcullis_config::UpstreamProtocol;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::pool::Key;
use crate::dns::Resolver;
use crate::targets::{ForbiddenTarget, TargetRules};

/// TCP keep-alive probes on upstream sockets start after this much silence.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

pub(crate) struct Connector {
    pub resolver: Arc<Resolver>,
    /// Templated upstreams: the addresses their names may resolve to.
    pub rules: Option<Arc<TargetRules>>,
    pub tls: TlsConnector,
}

/// A connected socket, and whether ALPN chose h2.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>, bool),
}

/// Why a connect failed (the source of an [`super::UpstreamError`]).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {host}")]
    Dns {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TCP connect to {addr}")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {host}")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    #[error("the upstream did not negotiate HTTP/2 (ALPN)")]
    NoH2,
    #[error("HTTP handshake")]
    Handshake(#[source] hyper::Error),
    #[error("connect timed out")]
    TimedOut,
}

/// The ALPN list a client offers: `auto` lets the upstream choose.
pub(crate) fn alpn(protocol: UpstreamProtocol) -> Vec<Vec<u8>> {
    match protocol {
        UpstreamProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
        UpstreamProtocol::Http2 => vec![b"h2".to_vec()],
    }
}

impl Connector {
    /// DNS, TCP and (for `https`) TLS, all before `deadline`.
    pub async fn connect(&self, key: &Key, deadline: Instant) -> Result<Stream, ConnectError> {
        let tcp = self.tcp(key, deadline).await?;
        if !key.https {
            return Ok(Stream::Plain(tcp));
        }
        let host = key.host();
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| ConnectError::ServerName(host.to_owned()))?;
        let tls = tokio::time::timeout_at(deadline, self.tls.connect(name, tcp))
            .await
            .map_err(|_| ConnectError::TimedOut)?
            .map_err(|source| ConnectError::Tls {
                host: host.to_owned(),
                source,
            })?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok(Stream::Tls(Box::new(tls), h2))
    }

    async fn tcp(&self, key: &Key, deadline: Instant) -> Result<TcpStream, ConnectError> {
        let host = key.host();
        let port = key.port();
        let addrs = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => {
                let templated = self.rules.is_some();
                let lookup = self.resolver.lookup(host, templated);
                tokio::time::timeout_at(deadline, lookup)
                    .await
                    .map_err(|_| ConnectError::TimedOut)?
                    .map_err(|source| ConnectError::Dns {
                        host: host.to_owned(),
                        source,
                    })?
                    .to_vec()
            }
        };
        let permitted: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|ip| self.rules.as_ref().is_none_or(|r| r.permits(*ip)))
            .map(|ip| SocketAddr::new(ip, port))
            .collect();
        if permitted.is_empty() {
            // The proxy finds `ForbiddenTarget` in the error's sources (403).
            return Err(ConnectError::Dns {
                host: host.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, ForbiddenTarget),
            });
        }
        // In order; each address gets an equal share of the time left, so one
        // black-holed address cannot use up the whole connect timeout.
        let mut last = None;
        for (i, addr) in permitted.iter().enumerate() {
            let left = (permitted.len() - i) as u32;
            let share = deadline.saturating_duration_since(Instant::now()) / left;
            match tokio::time::timeout(share, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    // Best effort: a socket without them still works.
                    let _ = stream.set_nodelay(true);
                    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
                    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
                    return Ok(stream);
                }
                Ok(Err(source)) => {
                    last = Some(ConnectError::Tcp {
                        addr: *addr,
                        source,
                    })
                }
                Err(_) => last = Some(ConnectError::TimedOut),
            }
        }
        Err(last.unwrap_or(ConnectError::TimedOut))
    }
}
