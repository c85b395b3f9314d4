//! Listeners (addresses, TLS certificates) and the admin listener.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use portcullis_config::{Config, Location, MetricsListener};

use super::{relative_to, Errors};
use crate::tls::CertStore;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub name: String,
    pub address: String,
    pub tls: bool,
    pub h2c: bool,
}

#[derive(Debug, Clone)]
pub struct AdminSpec {
    pub address: String,
    pub token: Option<Arc<[u8]>>,
    pub metrics_token: Option<Arc<[u8]>>,
}

pub(super) fn compile(
    config: &Config,
    source: &Path,
    errors: &mut Errors<'_>,
) -> (Vec<ListenerSpec>, HashMap<String, CertStore>) {
    let mut listeners = Vec::new();
    let mut certs = HashMap::new();
    let mut names = HashSet::new();
    if config.listeners.is_empty() {
        errors.push(
            Location::UNKNOWN,
            "listeners",
            "at least one listener is required",
        );
    }
    for (i, l) in config.listeners.iter().enumerate() {
        let field = format!("listeners[{i}]");
        let name = l.value.name.to_string();
        if !names.insert(name.clone()) {
            errors.push(
                l.referenced,
                format!("{field}.name"),
                format!("duplicate listener name {name:?}"),
            );
        }
        let address = l.value.address.value.to_string();
        if address.parse::<SocketAddr>().is_err() {
            errors.push(
                l.value.address.referenced,
                format!("{field}.address"),
                format!("{address:?} is not an IP:port address"),
            );
        }
        if let Some(tls) = &l.value.tls {
            let mut store = CertStore::default();
            if tls.certificates.is_empty() {
                errors.push(
                    l.referenced,
                    format!("{field}.tls.certificates"),
                    "at least one certificate is required",
                );
            }
            for (j, c) in tls.certificates.iter().enumerate() {
                let cert_file = relative_to(source, &c.value.cert_file);
                let key_file = relative_to(source, &c.value.key_file);
                match crate::tls::load_certified_key(&cert_file, &key_file) {
                    Ok(key) => {
                        let names: Vec<String> =
                            c.value.server_names.iter().map(|n| n.to_string()).collect();
                        store.add(key, &names);
                    }
                    Err(e) => {
                        errors.push(c.referenced, format!("{field}.tls.certificates[{j}]"), e)
                    }
                }
            }
            certs.insert(name.clone(), store);
        }
        listeners.push(ListenerSpec {
            name,
            address,
            tls: l.value.tls.is_some(),
            h2c: l.value.h2c.0,
        });
    }

    (listeners, certs)
}

pub(super) fn compile_admin(config: &Config, errors: &mut Errors<'_>) -> Option<AdminSpec> {
    let admin = config.admin.as_ref().map(|a| {
        let address = a.address.value.to_string();
        if address.parse::<SocketAddr>().is_err() {
            errors.push(
                a.address.referenced,
                "admin.address",
                format!("{address:?} is not an IP:port address"),
            );
        }
        let token = (!a.token.is_empty()).then(|| Arc::from(a.token.expose().as_bytes()));
        let metrics_token =
            (!a.metrics_token.is_empty()).then(|| Arc::from(a.metrics_token.expose().as_bytes()));
        AdminSpec {
            address,
            token,
            metrics_token,
        }
    });
    if config.metrics.enabled.0
        && config.metrics.listener == MetricsListener::Admin
        && admin.is_none()
    {
        // Not an error: metrics simply have nowhere to go. Say so in `check`.
        tracing::warn!("metrics.listener is `admin` but no admin listener is configured; /metrics is not served");
    }

    admin
}
