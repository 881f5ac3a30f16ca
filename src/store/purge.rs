//! Purges through Redis: the sequence, the marks and the pub/sub channels of [`crate::purge`].
//!
//! Every purge key lives under one hash tag, `{cachegate-purge}`, so the purge script runs on a
//! Redis Cluster too (all its keys in one slot). Pub/sub goes through a dedicated connection to
//! one server (on a cluster, classic pub/sub reaches every node's subscribers).

use std::time::Duration;

use futures_util::StreamExt;
use redis::Script;

use super::PurgeEvent;

/// The purge sequence counter.
pub const SEQ_KEY: &str = "{cachegate-purge}:seq";
/// Prefix → sequence number of its last purge (a hash: read whole on subscribe).
pub const PREFIXES_KEY: &str = "{cachegate-purge}:prefixes";
/// Purge marks, one per key.
pub const MARK_PREFIX: &str = "{cachegate-purge}:mark:";
/// Purges: `seq instance key...`, one per line.
pub const PURGE_CHANNEL: &str = "cachegate:purge";
/// Acknowledgements: `seq instance`.
pub const ACK_CHANNEL: &str = "cachegate:purge-ack";
/// How long a mark is kept: longer than any entry lives in Redis (see the cache's cap).
pub const MARK_TTL: Duration = Duration::from_secs(24 * 3600);

/// KEYS: seq, prefixes, then one mark key per purged key. ARGV: channel, mark ttl (s), the
/// message head (`instance`), then the purged keys. Returns `{seq, instances told}`.
pub const PURGE_SCRIPT: &str = r"
local seq = redis.call('INCR', KEYS[1])
for i = 4, #ARGV do
  local key = ARGV[i]
  redis.call('SET', KEYS[i - 1], seq, 'EX', ARGV[2])
  if string.sub(key, 1, 7) == 'prefix:' then
    redis.call('HSET', KEYS[2], string.sub(key, 8), seq)
  end
end
local message = seq .. '\n' .. ARGV[3]
for i = 4, #ARGV do
  message = message .. '\n' .. ARGV[i]
end
local told = redis.call('PUBLISH', ARGV[1], message)
return {seq, told}
";

pub fn purge_script() -> Script {
    Script::new(PURGE_SCRIPT)
}

pub fn mark_key(key: &str) -> String {
    format!("{MARK_PREFIX}{key}")
}

/// Parses a message of either channel.
fn parse(channel: &str, payload: &str) -> Option<PurgeEvent> {
    let mut lines = payload.split('\n');
    let seq = lines.next()?.parse().ok()?;
    let instance = lines.next()?.to_owned();
    match channel {
        PURGE_CHANNEL => Some(PurgeEvent::Purged {
            seq,
            instance,
            keys: lines.map(str::to_owned).collect(),
        }),
        ACK_CHANNEL => Some(PurgeEvent::Acknowledged { seq, instance }),
        _ => None,
    }
}

pub fn ack_message(instance: &str, seq: u64) -> String {
    format!("{seq}\n{instance}")
}

/// Keeps a subscription to both channels, reconnecting when it drops, and forwards the events;
/// each (re)subscription is announced with [`PurgeEvent::Subscribed`]. Ends when the receiver
/// is dropped.
pub async fn subscribe(
    client: redis::Client,
    events: tokio::sync::mpsc::UnboundedSender<PurgeEvent>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                let subscribed = async {
                    pubsub.subscribe(PURGE_CHANNEL).await?;
                    pubsub.subscribe(ACK_CHANNEL).await
                };
                match subscribed.await {
                    Ok(()) => {
                        delay = Duration::from_millis(100);
                        if events.send(PurgeEvent::Subscribed).is_err() {
                            return;
                        }
                        let mut messages = pubsub.on_message();
                        while let Some(message) = messages.next().await {
                            let Ok(payload) = message.get_payload::<String>() else {
                                continue;
                            };
                            if let Some(event) = parse(message.get_channel_name(), &payload) {
                                if events.send(event).is_err() {
                                    return;
                                }
                            }
                        }
                        tracing::warn!("purge: lost the Redis subscription; resubscribing");
                    }
                    Err(e) => tracing::debug!(error = %e, "purge: could not subscribe"),
                }
            }
            Err(e) => tracing::debug!(error = %e, "purge: could not connect to subscribe"),
        }
        if events.is_closed() {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_and_foreign_ones_are_ignored() {
        assert_eq!(
            parse(PURGE_CHANNEL, "7\nabc\npath:/a\ntag:x"),
            Some(PurgeEvent::Purged {
                seq: 7,
                instance: "abc".into(),
                keys: vec!["path:/a".into(), "tag:x".into()]
            })
        );
        assert_eq!(
            parse(ACK_CHANNEL, &ack_message("abc", 7)),
            Some(PurgeEvent::Acknowledged {
                seq: 7,
                instance: "abc".into()
            })
        );
        assert_eq!(parse(PURGE_CHANNEL, "x\nabc"), None);
        assert_eq!(parse(PURGE_CHANNEL, ""), None);
    }
}
