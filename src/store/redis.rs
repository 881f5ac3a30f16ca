//! The Redis store: one multiplexed connection per gateway, managed (and re-established after
//! failures) by the `redis` crate's `ConnectionManager`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;

use super::{Store, StoreError};

/// How often the background task checks that Redis answers.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

pub struct RedisStore {
    /// The URL without credentials, for logs.
    display_url: String,
    connection: ConnectionManager,
    connected: AtomicBool,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.display_url)
            .field("connected", &self.connected.load(Ordering::Relaxed))
            .finish()
    }
}

impl RedisStore {
    /// Creates the store without waiting for Redis, and starts a task on the current tokio
    /// runtime that connects, then keeps checking the connection.
    pub fn connect(url: &str) -> Result<Arc<RedisStore>, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Backend(format!("invalid redis_url: {e}")))?;
        let display_url = redact(url);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let store = Arc::new(RedisStore {
            display_url,
            connection,
            connected: AtomicBool::new(false),
        });
        tokio::spawn(watch_health(Arc::downgrade(&store)));
        Ok(store)
    }

    /// Whether the last health check reached Redis.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

fn backend_error(e: redis::RedisError) -> StoreError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Backend(e.to_string())
    }
}

/// Pings Redis every [`HEALTH_INTERVAL`], logging each change between reachable and not.
async fn watch_health(store: Weak<RedisStore>) {
    loop {
        let Some(strong) = store.upgrade() else {
            return;
        };
        let reachable = strong.ping().await;
        let was = strong.connected.swap(reachable.is_ok(), Ordering::Relaxed);
        match (&reachable, was) {
            (Ok(()), false) => {
                tracing::info!(url = %strong.display_url, "store: connected to Redis")
            }
            (Err(e), true) => {
                tracing::warn!(url = %strong.display_url, error = %e, "store: lost the Redis connection; retrying")
            }
            (Err(e), false) => {
                tracing::warn!(url = %strong.display_url, error = %e, "store: Redis is not reachable yet; retrying")
            }
            (Ok(()), true) => {}
        }
        drop(strong);
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let value: Option<Vec<u8>> = self.connection().get(key).await.map_err(backend_error)?;
        Ok(value.map(Bytes::from))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<(), StoreError> {
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        redis::cmd("SET")
            .arg(key)
            .arg(value.as_ref())
            .arg("PX")
            .arg(millis)
            .query_async::<()>(&mut self.connection())
            .await
            .map_err(backend_error)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let removed: u64 = self.connection().del(key).await.map_err(backend_error)?;
        Ok(removed > 0)
    }

    fn health(&self) -> Result<(), String> {
        if self.is_connected() {
            Ok(())
        } else {
            Err(format!("Redis at {} is not reachable", self.display_url))
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.connection())
            .await
            .map(drop)
            .map_err(backend_error)
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn credentials_never_reach_logs() {
        assert_eq!(redact("redis://user:pw@h:6379/0"), "redis://***@h:6379/0");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }
}
