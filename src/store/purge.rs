//! Purges through Redis: the sequence, the marks and the pub/sub channels of [`crate::purge`].
//!
//! Every purge key lives under one hash tag, `{cachegate-purge}`, so the purge script runs on a
//! Redis Cluster too (all its keys in one slot). Pub/sub goes through a dedicated connection. On
//! a cluster it goes to the master that owns that slot: the script publishes there, and
//! `PUBLISH` counts only the subscribers of the node it runs on — the number a writer waits
//! for in acknowledgements.

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
/// highest sequence number the caller has seen, the message head (`instance`), then the purged
/// keys. Returns `{seq, instances told}`.
pub const PURGE_SCRIPT: &str = r"
local seq = redis.call('INCR', KEYS[1])
local seen = tonumber(ARGV[3])
if seq <= seen then
  seq = seen + 1
  redis.call('SET', KEYS[1], seq)
end
for i = 5, #ARGV do
  local key = ARGV[i]
  redis.call('SET', KEYS[i - 2], seq, 'EX', ARGV[2])
  if string.sub(key, 1, 7) == 'prefix:' then
    redis.call('HSET', KEYS[2], string.sub(key, 8), seq)
  end
end
local message = seq .. '\n' .. ARGV[4]
for i = 5, #ARGV do
  message = message .. '\n' .. ARGV[i]
end
local told = redis.call('PUBLISH', ARGV[1], message)
return {seq, told}
";

/// KEYS: seq. ARGV: a sequence number already seen. Raises the sequence to it if lower (Redis
/// lost its data), and returns the sequence.
pub const RAISE_SCRIPT: &str = r"
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local seen = tonumber(ARGV[1])
if seq < seen then
  redis.call('SET', KEYS[1], seen)
  return seen
end
return seq
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

/// Where to subscribe: one server, or the cluster master owning the purge keys' slot.
#[derive(Clone)]
pub struct Subscription {
    /// A server URL (on a cluster, a seed node's).
    pub url: String,
    pub tls_ca_pem: Option<Vec<u8>>,
    pub cluster: bool,
}

impl Subscription {
    fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        match &self.tls_ca_pem {
            Some(pem) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
            None => redis::Client::open(url),
        }
    }

    /// The client to subscribe with: on a cluster, asks the seed which master owns the slot of
    /// the purge keys.
    async fn resolve(&self) -> redis::RedisResult<redis::Client> {
        let seed = self.client(&self.url)?;
        if !self.cluster {
            return Ok(seed);
        }
        let mut connection = seed.get_multiplexed_async_connection().await?;
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(SEQ_KEY)
            .query_async(&mut connection)
            .await?;
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut connection)
            .await?;
        for range in ranges {
            let redis::Value::Array(fields) = range else {
                continue;
            };
            let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
                (fields.first(), fields.get(1))
            else {
                continue;
            };
            if !(*start..=*end).contains(&slot) {
                continue;
            }
            if let Some(redis::Value::Array(master)) = fields.get(2) {
                let host = match master.first() {
                    Some(redis::Value::BulkString(bytes)) => {
                        String::from_utf8_lossy(bytes).into_owned()
                    }
                    _ => continue,
                };
                let Some(redis::Value::Int(port)) = master.get(1) else {
                    continue;
                };
                return self.client(&with_address(&self.url, &host, *port as u16));
            }
        }
        Ok(seed)
    }
}

/// `url` with its host and port replaced (credentials, scheme and database kept).
fn with_address(url: &str, host: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let end = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let credentials = authority
        .rsplit_once('@')
        .map_or(String::new(), |(c, _)| format!("{c}@"));
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    format!("{scheme}://{credentials}{host}:{port}{tail}")
}

/// Keeps a subscription to both channels, reconnecting when it drops, and forwards the events;
/// each (re)subscription is announced with [`PurgeEvent::Subscribed`]. Ends when the receiver
/// is dropped.
pub async fn subscribe(
    subscription: Subscription,
    events: tokio::sync::mpsc::UnboundedSender<PurgeEvent>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let client = subscription.resolve().await;
        match async { client?.get_async_pubsub().await }.await {
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
    fn cluster_subscriptions_keep_credentials_and_database() {
        assert_eq!(
            with_address("rediss://user:pw@seed:7000/2", "10.0.0.5", 7002),
            "rediss://user:pw@10.0.0.5:7002/2"
        );
        assert_eq!(
            with_address("redis://seed:7000", "::1", 7001),
            "redis://[::1]:7001"
        );
    }

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
