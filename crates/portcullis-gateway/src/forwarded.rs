//! Client address and `X-Forwarded-*` / `Forwarded` headers.
//!
//! Client-sent forwarding headers are believed only when the peer is a configured
//! trusted proxy; otherwise they are replaced.

use std::net::{IpAddr, SocketAddr};

use http::header::{HeaderName, FORWARDED};
use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    proxies.iter().any(|net| net.contains(&ip))
}

/// Whether the connection's peer is a configured trusted proxy.
pub fn is_trusted(peer: SocketAddr, proxies: &[IpNet]) -> bool {
    !proxies.is_empty() && trusted(peer.ip().to_canonical(), proxies)
}

/// `prior;host="authority"`: the one authority the request was routed by. The
/// authority was validated (no quotes, no backslashes), so quoting is enough.
fn with_host(element: &str, host: Option<&HeaderValue>) -> Option<HeaderValue> {
    let h = host?.to_str().ok()?;
    HeaderValue::from_str(&format!("{element};host=\"{h}\"")).ok()
}

/// The original client: the peer, or — when the peer is trusted — the right-most
/// address in `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, proxies: &[IpNet]) -> IpAddr {
    let peer_ip = peer.ip().to_canonical();
    if proxies.is_empty() || !trusted(peer_ip, proxies) {
        return peer_ip;
    }
    let mut client = peer_ip;
    for value in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let Ok(s) = value.to_str() else { return client };
        for part in s.rsplit(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = ip;
                    if !trusted(ip, proxies) {
                        return client;
                    }
                }
                Err(_) => return client,
            }
        }
    }
    client
}

/// Header values that depend only on the connection's peer, built once per
/// connection instead of once per request.
pub struct PeerHeaders {
    ip: HeaderValue,
    forwarded: HeaderValue,
    /// `Forwarded` with the last authority seen on this connection (nearly always
    /// the same one), so the common request builds nothing.
    last_host: std::sync::Mutex<Option<(HeaderValue, HeaderValue)>>,
}

impl PeerHeaders {
    pub fn new(peer: SocketAddr, scheme: &'static str) -> Option<Self> {
        let ip = peer.ip().to_canonical();
        Some(PeerHeaders {
            ip: HeaderValue::from_str(&ip.to_string()).ok()?,
            forwarded: HeaderValue::from_str(&forwarded_element(ip, scheme)).ok()?,
            last_host: std::sync::Mutex::new(None),
        })
    }

    fn forwarded_for(&self, host: Option<&HeaderValue>) -> HeaderValue {
        let Some(host) = host else {
            return self.forwarded.clone();
        };
        let Ok(mut last) = self.last_host.lock() else {
            return self.forwarded.clone();
        };
        if let Some((h, v)) = last.as_ref() {
            if h == host {
                return v.clone();
            }
        }
        let value = self
            .forwarded
            .to_str()
            .ok()
            .and_then(|e| with_host(e, Some(host)))
            .unwrap_or_else(|| self.forwarded.clone());
        *last = Some((host.clone(), value.clone()));
        value
    }
}

/// RFC 7239 element for one hop. IPv6 addresses are quoted and bracketed.
fn forwarded_element(ip: IpAddr, scheme: &str) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for={v4};proto={scheme}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto={scheme}"),
    }
}

/// Rewrites the forwarding headers of a request about to go upstream.
pub fn set_forwarding_headers(
    headers: &mut HeaderMap,
    peer: SocketAddr,
    client: IpAddr,
    scheme: &'static str,
    host: Option<&HeaderValue>,
    proxies: &[IpNet],
    precomputed: Option<&PeerHeaders>,
) {
    let peer_ip = peer.ip().to_canonical();
    let from_trusted = !proxies.is_empty() && trusted(peer_ip, proxies);

    // The common case: an untrusted peer, whose headers are all replaced.
    if let (false, Some(p)) = (from_trusted, precomputed) {
        headers.insert(X_FORWARDED_FOR.clone(), p.ip.clone());
        headers.insert(X_REAL_IP.clone(), p.ip.clone());
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(scheme));
        match host {
            Some(h) => headers.insert(X_FORWARDED_HOST.clone(), h.clone()),
            None => headers.remove(&X_FORWARDED_HOST),
        };
        headers.insert(FORWARDED, p.forwarded_for(host));
        return;
    }

    let prior_xff = if from_trusted {
        let joined: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!joined.is_empty()).then(|| joined.join(", "))
    } else {
        None
    };
    let xff = match prior_xff {
        Some(prior) => format!("{prior}, {peer_ip}"),
        None => peer_ip.to_string(),
    };
    set(headers, &X_FORWARDED_FOR, &xff);
    set(headers, &X_REAL_IP, &client.to_string());

    if !(from_trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(scheme));
    }
    if !(from_trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match host {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST.clone(), h.clone());
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }

    let mut element = forwarded_element(peer_ip, scheme);
    if let Some(v) = with_host(&element, host) {
        element = v.to_str().unwrap_or_default().to_owned();
    }
    let forwarded = if from_trusted {
        let prior: Vec<&str> = headers
            .get_all(FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if prior.is_empty() {
            element
        } else {
            format!("{}, {element}", prior.join(", "))
        }
    } else {
        element
    };
    set(headers, &FORWARDED, &forwarded);
}

fn set(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    match HeaderValue::from_str(value) {
        Ok(v) => {
            headers.insert(name.clone(), v);
        }
        Err(_) => {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str) -> SocketAddr {
        SocketAddr::new(s.parse().unwrap(), 1234)
    }

    #[test]
    fn untrusted_peer_headers_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let p = peer("1.2.3.4");
        assert_eq!(
            client_ip(p, &h, &proxies),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        set_forwarding_headers(&mut h, p, p.ip(), "http", None, &proxies, None);
        assert_eq!(h[&X_FORWARDED_FOR], "1.2.3.4");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_REAL_IP], "1.2.3.4");
    }

    #[test]
    fn trusted_peer_appends() {
        let mut h = HeaderMap::new();
        h.insert(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("9.9.9.9, 10.0.0.2"),
        );
        let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let p = peer("10.0.0.1");
        let client = client_ip(p, &h, &proxies);
        assert_eq!(client, "9.9.9.9".parse::<IpAddr>().unwrap());
        set_forwarding_headers(&mut h, p, client, "https", None, &proxies, None);
        assert_eq!(h[&X_FORWARDED_FOR], "9.9.9.9, 10.0.0.2, 10.0.0.1");
        assert_eq!(h[&X_REAL_IP], "9.9.9.9");
    }
}
