//! Purges through Redis: the sequence, the marks and the pub/sub channels of [`crate::purge`].
//!
//! Every purge key lives under one hash tag, `{cachegate-purge}`, so the scripts run on a Redis
//! Cluster too (all their keys in one slot). Pub/sub goes through a dedicated connection, to any
//! live node (a cluster forwards every message to every node): first the master of that slot,
//! then the others, so a dead node costs one reconnection, not a restart.
//!
//! Which instances are live is kept in Redis too: each renews its membership (a sorted set
//! scored by expiry, in Redis's own clock) with its lease, and a purge returns the members it
//! must hear from. A dead instance drops out when its membership expires, so it never holds a
//! write for longer than one lease.

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
/// A random id written when the purge keys are first created: a different one means Redis
/// lost its data (restarted empty, or failed over to a replica that had not heard of it).
pub const EPOCH_KEY: &str = "{cachegate-purge}:epoch";
/// Live instances: instance id scored by the time (ms, Redis's clock) its membership expires.
pub const MEMBERS_KEY: &str = "{cachegate-purge}:members";
/// Purges: `seq instance key...`, one per line.
pub const PURGE_CHANNEL: &str = "cachegate:purge";
/// Acknowledgements go to the writer's own channel, this prefix and its instance id (so a purge
/// costs one message per instance, not one per pair of instances): `seq writer acknowledger`.
pub const ACK_CHANNEL_PREFIX: &str = "cachegate:purge-ack:";

/// The channel where `instance` hears acknowledgements of its purges.
pub fn ack_channel(instance: &str) -> String {
    format!("{ACK_CHANNEL_PREFIX}{instance}")
}
/// How long a mark is kept: longer than any entry lives in Redis (see the cache's cap).
pub const MARK_TTL: Duration = Duration::from_secs(24 * 3600);

/// KEYS: seq, prefixes, members, then one mark key per purged key. ARGV: channel, mark ttl (s),
/// the highest sequence number the caller has seen, the message head (`instance`), then the
/// purged keys. Returns `{seq, subscribers told, live member...}`.
pub const PURGE_SCRIPT: &str = r"
local seq = redis.call('INCR', KEYS[1])
local seen = tonumber(ARGV[3])
if seq <= seen then
  seq = seen + 1
  redis.call('SET', KEYS[1], seq)
end
for i = 5, #ARGV do
  local key = ARGV[i]
  redis.call('SET', KEYS[i - 1], seq, 'EX', ARGV[2])
  if string.sub(key, 1, 7) == 'prefix:' then
    redis.call('HSET', KEYS[2], string.sub(key, 8), seq)
  end
end
local message = seq .. '\n' .. ARGV[4]
for i = 5, #ARGV do
  message = message .. '\n' .. ARGV[i]
end
local told = redis.call('PUBLISH', ARGV[1], message)
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local reply = {seq, told}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], ms, '+inf')) do
  table.insert(reply, member)
end
return reply
";

/// KEYS: seq, members, epoch. ARGV: instance, lease (ms), an epoch id to write if there is
/// none. Renews the instance's membership for one lease, forgets expired members, and returns
/// `{seq, epoch}`: the purge sequence is the renewal's proof that the instance has heard every
/// purge numbered up to it, the epoch that Redis still has the data it was heard from.
pub const RENEW_SCRIPT: &str = r"
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[2], ms + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms)
redis.call('PEXPIRE', KEYS[2], 86400000)
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[3]
  redis.call('SET', KEYS[3], epoch)
end
return {tonumber(redis.call('GET', KEYS[1]) or '0'), epoch}
";

/// KEYS: seq, epoch. ARGV: a sequence number already seen, an epoch id to write if there is
/// none. Raises the sequence to the number seen if lower (Redis lost its data), and returns
/// `{seq, epoch}`.
pub const RAISE_SCRIPT: &str = r"
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[2]
  redis.call('SET', KEYS[2], epoch)
end
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local seen = tonumber(ARGV[1])
if seq < seen then
  redis.call('SET', KEYS[1], seen)
  seq = seen
end
return {seq, epoch}
";

pub fn purge_script() -> Script {
    Script::new(PURGE_SCRIPT)
}

pub fn renew_script() -> Script {
    Script::new(RENEW_SCRIPT)
}

pub fn mark_key(key: &str) -> String {
    format!("{MARK_PREFIX}{key}")
}

/// Parses a message of either channel.
fn parse(channel: &str, payload: &str) -> Option<PurgeEvent> {
    let mut lines = payload.split('\n');
    let seq = lines.next()?.parse().ok()?;
    let instance = lines.next()?.to_owned();
    if channel == PURGE_CHANNEL {
        return Some(PurgeEvent::Purged {
            seq,
            instance,
            keys: lines.map(str::to_owned).collect(),
        });
    }
    channel
        .starts_with(ACK_CHANNEL_PREFIX)
        .then(|| {
            Some(PurgeEvent::Acknowledged {
                seq,
                instance,
                by: lines.next()?.to_owned(),
            })
        })
        .flatten()
}

pub fn ack_message(writer: &str, seq: u64, by: &str) -> String {
    format!("{seq}\n{writer}\n{by}")
}

/// Where to subscribe: one server, or any node of a cluster.
#[derive(Clone)]
pub struct Subscription {
    /// Server URLs (on a cluster, the seed nodes').
    pub urls: Vec<String>,
    pub tls_ca_pem: Option<Vec<u8>>,
    pub cluster: bool,
    /// Notified to drop the subscription and make a new one (it may be silently dead).
    pub reconnect: std::sync::Arc<tokio::sync::Notify>,
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

    /// The nodes to try, in order: on a cluster, the master owning the purge keys' slot (as
    /// the first seed that answers says), then every master and replica it knows, then the
    /// seeds; on one server, its URL.
    async fn candidates(&self) -> Vec<String> {
        if !self.cluster {
            return self.urls.clone();
        }
        let mut found = Vec::new();
        for seed in &self.urls {
            let Ok(client) = self.client(seed) else {
                continue;
            };
            let connect = tokio::time::timeout(
                Duration::from_millis(500),
                client.get_multiplexed_async_connection(),
            );
            let Ok(Ok(mut connection)) = connect.await else {
                continue;
            };
            let slots = async {
                let slot: i64 = redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(SEQ_KEY)
                    .query_async(&mut connection)
                    .await?;
                let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async(&mut connection)
                    .await?;
                Ok::<_, redis::RedisError>((slot, ranges))
            };
            let Ok(Ok((slot, ranges))) =
                tokio::time::timeout(Duration::from_millis(500), slots).await
            else {
                continue;
            };
            for range in ranges {
                let redis::Value::Array(fields) = range else {
                    continue;
                };
                let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
                    (fields.first(), fields.get(1))
                else {
                    continue;
                };
                let owner = (*start..=*end).contains(&slot);
                for (position, node) in fields.iter().skip(2).enumerate() {
                    let redis::Value::Array(node) = node else {
                        continue;
                    };
                    let (Some(redis::Value::BulkString(host)), Some(redis::Value::Int(port))) =
                        (node.first(), node.get(1))
                    else {
                        continue;
                    };
                    let url = with_address(seed, &String::from_utf8_lossy(host), *port as u16);
                    if owner && position == 0 {
                        found.retain(|u| *u != url);
                        found.insert(0, url);
                    } else if !found.contains(&url) {
                        found.push(url);
                    }
                }
            }
            break;
        }
        for seed in &self.urls {
            if !found.contains(seed) {
                found.push(seed.clone());
            }
        }
        found
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

/// Keeps a subscription to the purge channel and `instance`'s acknowledgement channel, and
/// forwards the events: each subscription made is
/// announced with [`PurgeEvent::Subscribed`], each one lost with [`PurgeEvent::Unsubscribed`].
/// A lost one is replaced at once through the next node that answers; only when none does, it
/// waits (100 ms, doubling up to 500 ms) before the next round. Ends when the receiver is dropped.
pub async fn subscribe(
    subscription: Subscription,
    instance: String,
    events: tokio::sync::mpsc::UnboundedSender<PurgeEvent>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        for url in subscription.candidates().await {
            let connect = async {
                let client = subscription.client(&url)?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(PURGE_CHANNEL).await?;
                pubsub.subscribe(ack_channel(&instance)).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let mut pubsub = match tokio::time::timeout(Duration::from_secs(1), connect).await {
                Ok(Ok(pubsub)) => pubsub,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, url = %crate::config::values::redact_url(&url), "purge: could not subscribe");
                    continue;
                }
                Err(_) => continue,
            };
            delay = Duration::from_millis(100);
            if events.send(PurgeEvent::Subscribed).is_err() {
                return;
            }
            let mut messages = pubsub.on_message();
            loop {
                let message = tokio::select! {
                    message = messages.next() => message,
                    () = subscription.reconnect.notified() => None,
                };
                let Some(message) = message else { break };
                let Ok(payload) = message.get_payload::<String>() else {
                    continue;
                };
                if let Some(event) = parse(message.get_channel_name(), &payload) {
                    if events.send(event).is_err() {
                        return;
                    }
                }
            }
            tracing::warn!(url = %crate::config::values::redact_url(&url), "purge: lost the Redis subscription; resubscribing");
            if events.send(PurgeEvent::Unsubscribed).is_err() {
                return;
            }
        }
        if events.is_closed() {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
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
            parse(&ack_channel("abc"), &ack_message("abc", 7, "def")),
            Some(PurgeEvent::Acknowledged {
                seq: 7,
                instance: "abc".into(),
                by: "def".into()
            })
        );
        assert_eq!(parse(PURGE_CHANNEL, "x\nabc"), None);
        assert_eq!(parse(PURGE_CHANNEL, ""), None);
    }
}
