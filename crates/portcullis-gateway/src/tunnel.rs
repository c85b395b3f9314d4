//! Upgraded connections (WebSocket and any protocol a route lists in `upgrades`).
//!
//! A tunnel is a connection like any other: it takes a slot of
//! `server.max_connections`, is counted in `open_connections`, holds the drain
//! open (so SIGTERM waits for it up to the grace period), and is closed when neither
//! side has sent a byte for the route's `timeouts.tunnel_idle`.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::error::{ErrorCode, GatewayError};

/// What a connection lends the tunnels it upgrades into.
#[derive(Clone)]
pub struct Tunnels {
    pub slots: Arc<Semaphore>,
    /// The connection's own slot: an HTTP/1 connection ends when it upgrades, so its
    /// tunnel takes the slot over instead of needing a second one.
    pub own_slot: Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>,
    pub gauge: Gauge,
    /// Held while the tunnel is open: the drain waits for it.
    pub alive: Option<tokio::sync::mpsc::Sender<()>>,
}

/// An admitted tunnel, before the upgrade completes.
pub struct Tunnel {
    slot: Option<OwnedSemaphorePermit>,
    /// Where an inherited slot goes back if the upgrade does not happen (the
    /// connection goes on serving requests).
    home: Option<Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>>,
    gauge: Gauge,
    _alive: Option<tokio::sync::mpsc::Sender<()>>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        if let (Some(slot), Some(home)) = (self.slot.take(), &self.home) {
            if let Ok(mut home) = home.lock() {
                *home = Some(slot);
            }
        }
    }
}

/// Checks an upgrade request and takes a connection slot for it.
pub fn admit(
    tunnels: &Tunnels,
    protocol: &HeaderValue,
    headers: &HeaderMap,
) -> Result<Tunnel, GatewayError> {
    // `websocket/13` names the same protocol (see ProxyAction::allows_upgrade).
    let p = protocol.as_bytes();
    let name = p.split(|b| *b == b'/').next().unwrap_or(p).trim_ascii();
    if name.eq_ignore_ascii_case(b"websocket") {
        if !valid_key(headers) {
            return Err(GatewayError::new(
                ErrorCode::BadRequest,
                "invalid WebSocket handshake (Sec-WebSocket-Key)",
            ));
        }
        // RFC 6455 §4.4: 426 naming the version we speak.
        if headers
            .get("sec-websocket-version")
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(GatewayError::new(
                ErrorCode::UpgradeRequired,
                "unsupported WebSocket version",
            )
            .with_header(
                http::header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            ));
        }
    }
    let inherited = tunnels.own_slot.lock().ok().and_then(|mut s| s.take());
    let (slot, home) = match inherited {
        Some(slot) => (slot, Some(tunnels.own_slot.clone())),
        None => {
            let slot = tunnels.slots.clone().try_acquire_owned().map_err(|_| {
                tracing::warn!("max_connections reached; refusing an upgrade");
                GatewayError::server(ErrorCode::ServiceUnavailable)
            })?;
            (slot, None)
        }
    };
    Ok(Tunnel {
        slot: Some(slot),
        home,
        gauge: tunnels.gauge.clone(),
        _alive: tunnels.alive.clone(),
    })
}

/// RFC 6455 §4.1: a base64 nonce of 16 bytes.
fn valid_key(headers: &HeaderMap) -> bool {
    headers
        .get("sec-websocket-key")
        .map(|k| k.as_bytes())
        .is_some_and(|k| {
            k.len() == 24
                && k.ends_with(b"==")
                && k[..22]
                    .iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/'))
        })
}

impl Tunnel {
    /// Copies both ways until either side closes or both stay silent for `idle`.
    pub async fn run<A, B>(mut self, client: A, upstream: B, idle: Duration, route: &str)
    where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        // Held until the tunnel ends; never handed back to the finished connection.
        let _slot = self.slot.take();
        self.gauge.inc();
        let start = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let mut client = Activity {
            io: client,
            start,
            last: last.clone(),
        };
        let mut upstream = Activity {
            io: upstream,
            start,
            last: last.clone(),
        };
        let watch = async {
            loop {
                let since_start = start.elapsed();
                let last_ms = Duration::from_millis(last.load(Ordering::Relaxed));
                let silent = since_start.saturating_sub(last_ms);
                if silent >= idle {
                    return;
                }
                tokio::time::sleep(idle - silent).await;
            }
        };
        tokio::select! {
            result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Err(e) = result {
                    tracing::debug!(route, error = %e, "upgraded connection ended with an error");
                }
            }
            _ = watch => tracing::debug!(route, idle = ?idle, "upgraded connection idle; closed"),
        }
        self.gauge.dec();
    }
}

/// Records when bytes last arrived from either side.
struct Activity<T> {
    io: T,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = this.start.elapsed().as_millis() as u64;
            this.last.store(ms, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_handshake_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "sec-websocket-key",
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert!(valid_key(&h));
        h.insert("sec-websocket-key", HeaderValue::from_static("short"));
        assert!(!valid_key(&h));
    }
}
