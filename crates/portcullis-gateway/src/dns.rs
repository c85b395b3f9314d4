//! Upstream name resolution.
//!
//! - Lookups run `getaddrinfo` on a small dedicated thread pool with a bounded queue,
//!   never on tokio's blocking pool (shared with SQLite and Argon2), so a slow DNS
//!   server cannot starve logins or the store.
//! - Concurrent lookups of one name share one query; answers are cached for
//!   `dns_cache_ttl`, failures for `dns_negative_ttl`, in a bounded cache.
//! - An optional hosts file (`server.hosts_file`) is consulted first.
//! - A route's [`crate::targets::TargetRules`] filter the addresses on every connect
//!   ([`crate::upstream`]).

use std::collections::HashMap;
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

const THREADS: usize = 4;
const QUEUE: usize = 1024;

type Answer = Result<Arc<[IpAddr]>, Arc<str>>;

struct Job {
    host: String,
    reply: tokio::sync::oneshot::Sender<Result<Vec<IpAddr>, LookupFailure>>,
    /// A templated lookup's share of the queue, held until a worker is done with it
    /// (not until the caller gives up).
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

enum LookupFailure {
    /// The name does not resolve: cached for `dns_negative_ttl`.
    Permanent(String),
    /// The resolver could not answer now (`EAI_AGAIN`): not cached.
    Temporary,
}

struct AnswerExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl moka::Expiry<String, Answer> for AnswerExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Answer,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(if value.is_ok() {
            self.ttl
        } else {
            self.negative_ttl
        })
    }
}

/// The process-wide resolver (outlives config snapshots).
pub struct Resolver {
    cache: moka::future::Cache<String, Answer>,
    jobs: mpsc::SyncSender<Job>,
    hosts: HashMap<String, Vec<IpAddr>>,
    /// Queue share of lookups for names clients chose (templated upstreams).
    templated_slots: Arc<tokio::sync::Semaphore>,
}

impl Resolver {
    pub fn new(
        ttl: Duration,
        negative_ttl: Duration,
        max_entries: u64,
        hosts_file: Option<&str>,
    ) -> std::io::Result<Self> {
        let hosts = match hosts_file {
            Some(path) => parse_hosts(&std::fs::read_to_string(path)?),
            None => HashMap::new(),
        };
        Ok(Resolver {
            cache: moka::future::Cache::builder()
                .max_capacity(max_entries)
                .expire_after(AnswerExpiry { ttl, negative_ttl })
                .build(),
            jobs: spawn_pool()?,
            hosts,
            templated_slots: Arc::new(tokio::sync::Semaphore::new(QUEUE / 2)),
        })
    }

    /// The addresses of `host` (coalesced, cached). Lookups for templated upstreams
    /// (names a client chose) may use at most half of the queue, so a flood of
    /// random names never starves the fixed upstreams' lookups.
    pub async fn lookup(
        &self,
        host: &str,
        templated: bool,
    ) -> Result<Arc<[IpAddr]>, std::io::Error> {
        let host = host.to_ascii_lowercase();
        if let Some(addrs) = self.hosts.get(&host) {
            return Ok(Arc::from(addrs.as_slice()));
        }
        if let Some(answer) = self.cache.get(&host).await {
            return answer.map_err(not_found);
        }
        let jobs = self.jobs.clone();
        let slots = self.templated_slots.clone();
        // Real answers (including "no such name") are cached; a full queue, a
        // stopped pool or a temporary resolver failure is not. Coalesced callers
        // share the one lookup (and its one queue slot).
        let answer = self
            .cache
            .try_get_with(host.clone(), async move {
                let slot = if templated {
                    Some(slots.try_acquire_owned().map_err(|_| "resolver busy")?)
                } else {
                    None
                };
                let (tx, rx) = tokio::sync::oneshot::channel();
                let job = Job {
                    host,
                    reply: tx,
                    _slot: slot,
                };
                if jobs.try_send(job).is_err() {
                    return Err("resolver queue is full");
                }
                match rx.await {
                    Ok(Ok(addrs)) if !addrs.is_empty() => Ok(Ok(Arc::from(addrs))),
                    Ok(Ok(_)) => Ok(Err(Arc::from("no addresses"))),
                    Ok(Err(LookupFailure::Permanent(e))) => Ok(Err(Arc::from(e))),
                    Ok(Err(LookupFailure::Temporary)) => Err("temporary resolver failure"),
                    Err(_) => Err("resolver stopped"),
                }
            })
            .await
            .map_err(|_| busy())?;
        answer.map_err(not_found)
    }
}

fn not_found(e: Arc<str>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string())
}

fn busy() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::WouldBlock, "resolver busy")
}

fn spawn_pool() -> std::io::Result<mpsc::SyncSender<Job>> {
    let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..THREADS {
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("portcullis-dns-{i}"))
            .spawn(move || loop {
                let job = match rx.lock() {
                    Ok(rx) => match rx.recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    },
                    Err(_) => return,
                };
                // Its caller gave up (timeout, reset stream): no lookup for nobody.
                if job.reply.is_closed() {
                    continue;
                }
                let answer = (job.host.as_str(), 0)
                    .to_socket_addrs()
                    .map(|it| it.map(|a| a.ip()).collect())
                    .map_err(|e| {
                        // glibc's EAI_AGAIN ("Temporary failure in name resolution").
                        let text = e.to_string();
                        if text.contains("Temporary failure") || text.contains("try again") {
                            LookupFailure::Temporary
                        } else {
                            LookupFailure::Permanent(text)
                        }
                    });
                let _ = job.reply.send(answer);
            })?;
    }
    Ok(tx)
}

/// `hosts(5)`: `address name [alias…]`, `#` comments.
fn parse_hosts(text: &str) -> HashMap<String, Vec<IpAddr>> {
    let mut out: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        for name in words {
            out.entry(name.to_ascii_lowercase()).or_default().push(ip);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file() {
        let h = parse_hosts("# c\n127.0.0.1 Hello fn-a # x\n::1 hello\nbogus line\n");
        assert_eq!(h["hello"].len(), 2);
        assert_eq!(h["fn-a"], vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
    }

    #[tokio::test]
    async fn coalesces_and_caches_failures() {
        let r = Arc::new(
            Resolver::new(Duration::from_secs(5), Duration::from_secs(5), 100, None).unwrap(),
        );
        let name = "no-such-name.invalid";
        let (a, b) = tokio::join!(r.lookup(name, true), r.lookup(name, false));
        assert!(a.is_err() && b.is_err());
        r.cache.run_pending_tasks().await;
        assert_eq!(r.cache.entry_count(), 1);
        let ok = r.lookup("localhost", false).await.unwrap();
        assert!(ok.iter().any(|ip| ip.is_loopback()));
    }
}
