//! Down and recovery notifications (seed 002): when a target has been down for
//! `notifications.after`, and again when it recovers (with the downtime), every
//! webhook gets a POST — Apprise API's `{title, body, type, tag}` or a plain JSON
//! event. Sent from their own task with retries and backoff; the data path never
//! waits for them.

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::BodyExt;
use portcullis_config::{NotificationsConfig, WebhookFormat};
use portcullis_upstream::target::epoch_ms;
use portcullis_upstream::TargetState;
use serde_json::json;

use crate::body::Body;
use crate::upstream::UpstreamClient;

/// Attempts per webhook and notification; waits 1 s, 2 s, 4 s… between them.
const ATTEMPTS: u32 = 5;

pub struct Notifier {
    after: Duration,
    webhooks: Vec<Webhook>,
    client: UpstreamClient,
    fingerprint: String,
}

struct Webhook {
    uri: Uri,
    format: WebhookFormat,
    tags: String,
    timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Down {
        upstream: String,
        target: String,
        since_ms: u64,
        downtime: Duration,
    },
    Recovered {
        upstream: String,
        target: String,
        downtime: Duration,
    },
}

impl Notifier {
    /// Compiles `notifications:`; webhooks with an empty URL are left out (an unset
    /// `${NOTIFY_URL:-}`). `Ok(None)` when none is left.
    pub fn compile(
        cfg: &NotificationsConfig,
        client: UpstreamClient,
    ) -> Result<Option<Self>, (usize, String)> {
        let mut webhooks = Vec::new();
        for (i, w) in cfg.webhooks.iter().enumerate() {
            let url = w.value.url.trim();
            if url.is_empty() {
                continue;
            }
            let uri: Uri = url
                .parse()
                .map_err(|e| (i, format!("{url:?} is not a valid URL: {e}")))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err((i, format!("{url:?} must be an http:// or https:// URL")));
            }
            webhooks.push(Webhook {
                uri,
                format: w.value.format,
                tags: w
                    .value
                    .tags
                    .iter()
                    .map(|t| t.trim())
                    .collect::<Vec<_>>()
                    .join(","),
                timeout: w.value.timeout.get(),
            });
        }
        if webhooks.is_empty() {
            return Ok(None);
        }
        let fingerprint = format!(
            "{:?}|{:?}",
            cfg.after,
            webhooks
                .iter()
                .map(|w| (w.uri.to_string(), w.format, &w.tags, w.timeout))
                .collect::<Vec<_>>()
        );
        Ok(Some(Notifier {
            after: cfg.after.get(),
            webhooks,
            client,
            fingerprint,
        }))
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// After a round of checks: a target down for `after` and not yet reported is
    /// reported now.
    pub fn check_downtime(self: &Arc<Self>, upstream: &str, state: &TargetState) {
        let Some(since) = state.take_down_notice(self.after) else {
            return;
        };
        self.send(Event::Down {
            upstream: upstream.to_owned(),
            target: state.url.to_string(),
            since_ms: since,
            downtime: Duration::from_millis(epoch_ms().saturating_sub(since)),
        });
    }

    /// A target whose downtime (since `since`) was reported is up again.
    pub fn recovered(&self, upstream: &str, state: &TargetState, since: u64) {
        self.send(Event::Recovered {
            upstream: upstream.to_owned(),
            target: state.url.to_string(),
            downtime: Duration::from_millis(epoch_ms().saturating_sub(since)),
        });
    }

    fn send(&self, event: Event) {
        for w in &self.webhooks {
            let body = w.body(&event);
            let (uri, timeout, client) = (w.uri.clone(), w.timeout, self.client.clone());
            tokio::spawn(async move {
                for attempt in 1..=ATTEMPTS {
                    match post(&client, &uri, body.clone(), timeout).await {
                        Ok(()) => return,
                        Err(e) if attempt == ATTEMPTS => {
                            // The URL may carry a key (Apprise): log its host only.
                            tracing::warn!(webhook = uri.host().unwrap_or(""), error = %e, "notification not delivered");
                        }
                        Err(e) => {
                            tracing::debug!(webhook = uri.host().unwrap_or(""), error = %e, attempt, "notification failed; retrying");
                            tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
                        }
                    }
                }
            });
        }
    }
}

impl Webhook {
    fn body(&self, event: &Event) -> bytes::Bytes {
        let value = match self.format {
            WebhookFormat::Apprise => {
                let (title, body, kind) = match event {
                    Event::Down {
                        upstream,
                        target,
                        downtime,
                        ..
                    } => (
                        format!("Upstream down: {target}"),
                        format!(
                            "Target {target} of upstream {upstream} has been down for {}.",
                            human(*downtime)
                        ),
                        "failure",
                    ),
                    Event::Recovered {
                        upstream,
                        target,
                        downtime,
                    } => (
                        format!("Upstream recovered: {target}"),
                        format!(
                            "Target {target} of upstream {upstream} is up again after {} down.",
                            human(*downtime)
                        ),
                        "success",
                    ),
                };
                let mut v = json!({ "title": title, "body": body, "type": kind });
                if !self.tags.is_empty() {
                    v["tag"] = json!(self.tags);
                }
                v
            }
            WebhookFormat::Json => match event {
                Event::Down {
                    upstream,
                    target,
                    since_ms,
                    downtime,
                } => json!({
                    "event": "down",
                    "upstream": upstream,
                    "target": target,
                    "down_since": since_ms,
                    "downtime_ms": downtime.as_millis() as u64,
                }),
                Event::Recovered {
                    upstream,
                    target,
                    downtime,
                } => json!({
                    "event": "recovered",
                    "upstream": upstream,
                    "target": target,
                    "downtime_ms": downtime.as_millis() as u64,
                }),
            },
        };
        bytes::Bytes::from(value.to_string())
    }
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs().max(1))).to_string()
}

async fn post(
    client: &UpstreamClient,
    uri: &Uri,
    body: bytes::Bytes,
    timeout: Duration,
) -> Result<(), String> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(uri.clone())
        .body(Body::full(body))
        .map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let res = tokio::time::timeout(timeout, async {
        let res = client.request(req).await.map_err(|e| e.to_string())?;
        let status = res.status();
        let _ = http_body_util::Limited::new(res.into_body(), 64 * 1024)
            .collect()
            .await;
        Ok::<_, String>(status)
    })
    .await
    .map_err(|_| "timed out".to_owned())??;
    if res.is_success() {
        Ok(())
    } else {
        Err(format!("status {}", res.as_u16()))
    }
}
