//! Change notices on Redis ([`crate::Store::notify`], [`crate::Store::watch`]): PUBLISH on the
//! store prefix's `changes:<topic>` channel, and a subscriber that also hears keyspace
//! events for watched keys when the server reports them.

use fred::prelude::{ClientLike, ReconnectPolicy, Value};
use fred::types::ClusterHash;

use super::{glob_escape, map_fred, RedisStore};
use crate::{Result, StoreError};

impl RedisStore {
    /// [`crate::Store::notify`]: PUBLISH on the topic's channel.
    pub(super) async fn publish_change(&self, topic: &str) -> Result<()> {
        let channel = Value::from(self.channel(topic));
        self.run(
            "PUBLISH",
            ClusterHash::Random,
            None,
            vec![channel, Value::from("1")],
        )
        .await?;
        Ok(())
    }

    /// [`crate::Store::watch`]: a subscriber connection of its own, bounded while it is
    /// set up, whose task bumps the generation at every notice, keyspace event and
    /// reconnection.
    pub(super) async fn subscribe_changes(
        &self,
        topic: &str,
        keys: Option<&str>,
    ) -> Result<tokio::sync::watch::Receiver<u64>> {
        use fred::prelude::{EventInterface, PubsubInterface};
        let timeout = self.command_timeout;
        let subscriber = fred::types::Builder::from_config(self.config.clone())
            .with_connection_config(|c| {
                c.connection_timeout = timeout;
                c.internal_command_timeout = timeout;
            })
            .with_performance_config(|p| p.default_command_timeout = timeout)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 1000, 2))
            .build_subscriber_client()
            .map_err(|e| StoreError::Backend(format!("redis subscriber: {}", e.details())))?;
        // Every step bounded; on any failure the subscriber is closed (it would
        // otherwise keep reconnecting in the background).
        let setup = async {
            subscriber
                .init()
                .await
                .map_err(|e| map_fred("SUBSCRIBE", &e))?;
            subscriber
                .subscribe(self.channel(topic))
                .await
                .map_err(|e| map_fred("SUBSCRIBE", &e))?;
            if let Some(keys) = keys {
                // Keyspace notifications (`notify-keyspace-events` with `K` and the
                // command classes), when the server has them on; harmless otherwise.
                let pattern = format!(
                    "__keyspace@*__:{}*",
                    glob_escape(&format!("{}{keys}", self.prefix))
                );
                subscriber
                    .psubscribe(pattern)
                    .await
                    .map_err(|e| map_fred("PSUBSCRIBE", &e))?;
            }
            Ok::<(), StoreError>(())
        };
        let messages_rx = subscriber.message_rx();
        let key_events_rx = subscriber.keyspace_event_rx();
        let reconnects_rx = subscriber.reconnect_rx();
        let ready = tokio::time::timeout(timeout * 2, setup).await;
        if let Err(e) = ready
            .map_err(|_| StoreError::Unavailable("redis SUBSCRIBE: timed out".into()))
            .and_then(|r| r)
        {
            let _ = subscriber.quit().await;
            return Err(e);
        }
        // Re-subscribes after every reconnect.
        let _manager = subscriber.manage_subscriptions();
        let (mut messages, mut key_events, mut reconnects) =
            (messages_rx, key_events_rx, reconnects_rx);
        let (tx, rx) = tokio::sync::watch::channel(0_u64);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = messages.recv() => match m {
                        // A lagged receiver missed notices: stale either way.
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    },
                    e = key_events.recv() => if let Err(tokio::sync::broadcast::error::RecvError::Closed) = e {
                        break;
                    },
                    // Notices sent while disconnected are lost: count a change.
                    r = reconnects.recv() => if let Err(tokio::sync::broadcast::error::RecvError::Closed) = r {
                        break;
                    },
                    () = tx.closed() => break,
                }
                tx.send_modify(|g| *g += 1);
            }
            let _ = subscriber.quit().await;
        });
        Ok(rx)
    }
}
