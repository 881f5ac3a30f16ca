//! The store boundary: where state shared between requests (and, with Redis, between gateway
//! instances) lives. Features use the [`Store`] trait and never talk to Redis directly.
//!
//! - [`MemoryStore`]: in process, needs nothing installed; the default.
//! - [`RedisStore`]: Redis through the `redis` crate's connection manager, chosen by
//!   `[store] redis_url`. The gateway starts without Redis being reachable and connects in the
//!   background.

pub mod gcra;
mod memory;
mod purge;
mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use self::gcra::{GcraOutcome, GcraRequest};
pub use self::memory::{GcraTable, MemoryStore};
pub use self::redis::{RedisOptions, RedisStore, BACKGROUND_THREADS};

/// Why a store operation failed. Callers degrade (bypass, fall back) rather than fail requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Not connected (yet, or any more).
    Unavailable(String),
    /// The store answered with an error.
    Backend(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable(why) => write!(f, "store unavailable: {why}"),
            StoreError::Backend(why) => write!(f, "store error: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// A key-value store with per-entry expiry.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// `"memory"` or `"redis"`, for logs and health reports.
    fn kind(&self) -> &'static str;
    /// Whether every gateway instance sees what this store holds (Redis), so cache entries and
    /// purges go through it; an in-process store is this instance's alone.
    fn is_shared(&self) -> bool;
    /// Whether calls on `key` are being refused for repeated failures (its circuit, on a
    /// cluster its node's, is open): callers skip work that needs the key.
    fn is_failing(&self, _key: &str) -> bool {
        false
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError>;
    /// Stores `value` under `key` for `ttl`, replacing any previous value.
    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<(), StoreError>;
    /// Stores `value` under `key` for `ttl` only if `key` is absent (a lease: `SET NX PX`);
    /// `true` when this call stored it.
    async fn set_if_absent(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError>;
    /// Removes `key`; `true` when it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;
    /// Checks that the store answers.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Checks one request against every limit in `limits`, atomically (see [`gcra`]), and with
    /// `consume` counts it when all admit it; the outcomes are in the same order.
    async fn rate_limit(
        &self,
        limits: &[GcraRequest],
        consume: bool,
    ) -> Result<Vec<GcraOutcome>, StoreError>;
    /// Keys under `prefix` and the bytes of their values, counting at most `limit` keys; the flag
    /// says whether the count stopped at the limit. For operators' statistics, not the request
    /// path. `None` where the store keeps nothing under prefixes (memory).
    async fn measure_prefix(
        &self,
        _prefix: &str,
        _limit: u64,
    ) -> Option<Result<(u64, u64, bool), StoreError>> {
        None
    }

    /// The last known health, without I/O: `Err` says why the store is not usable.
    fn health(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Records a purge of `keys` by `instance` (see [`crate::purge`]): takes the next purge
    /// sequence number — above `after`, the highest the instance has seen, even if the store
    /// lost its data — marks every key with it and publishes the purge to every instance.
    /// Shared stores only.
    async fn publish_purge(
        &self,
        _instance: &str,
        _keys: &[String],
        _after: u64,
    ) -> Result<Published, StoreError> {
        Err(StoreError::Unavailable("not a shared store".to_owned()))
    }

    /// The marks recorded for `keys`, in order (`None`: never purged, or forgotten), and every
    /// prefix mark.
    async fn purge_marks(&self, _keys: &[String]) -> Result<RecordedMarks, StoreError> {
        Err(StoreError::Unavailable("not a shared store".to_owned()))
    }

    /// The current purge sequence number — first raised to `at_least` if it is lower (the store
    /// lost its data: the sequence must never go back) —, the epoch and every prefix mark.
    async fn purge_state(&self, _at_least: u64) -> Result<PurgeState, StoreError> {
        Err(StoreError::Unavailable("not a shared store".to_owned()))
    }

    /// Keeps `instance` a live member for `lease` (a purge waits for its acknowledgement) and
    /// returns the current purge sequence number and epoch.
    async fn renew_membership(
        &self,
        _instance: &str,
        _lease: Duration,
    ) -> Result<(u64, String), StoreError> {
        Err(StoreError::Unavailable("not a shared store".to_owned()))
    }

    /// Removes `instance` from the live members (it is stopping).
    async fn leave_membership(&self, _instance: &str) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("not a shared store".to_owned()))
    }

    /// Tells `writer` that instance `by` has applied its purge `seq`.
    async fn acknowledge_purge(
        &self,
        _writer: &str,
        _seq: u64,
        _by: &str,
    ) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("not a shared store".to_owned()))
    }

    /// The stream of purge events from every instance, and acknowledgements of `instance`'s
    /// purges; `None` for stores that are not shared, and after the first call.
    fn purge_events(
        &self,
        _instance: &str,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<PurgeEvent>> {
        None
    }

    /// Replaces the purge subscription with a new one (the old one may be silently dead).
    fn resubscribe(&self) {}
}

/// A purge recorded in the shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub seq: u64,
    /// The live members (instance ids, the writer's own included) when it was recorded.
    pub members: Vec<String>,
}

/// The purge state of the shared store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeState {
    pub seq: u64,
    /// Changes when the store loses its data.
    pub epoch: String,
    pub prefixes: Vec<(String, u64)>,
}

/// Purge marks read from the shared store: one per key asked (`None`: never purged, or
/// forgotten), and every prefix mark.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordedMarks {
    pub keys: Vec<Option<u64>>,
    pub prefixes: Vec<(String, u64)>,
}

/// What the shared store reports about purges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeEvent {
    /// The subscription is (again) in place; purges published while it was not were missed.
    Subscribed,
    /// The subscription was lost (a new one is being made).
    Unsubscribed,
    /// An instance purged `keys` with sequence number `seq`.
    Purged {
        seq: u64,
        instance: String,
        keys: Vec<String>,
    },
    /// Instance `by` applied `instance`'s purge `seq`.
    Acknowledged {
        seq: u64,
        instance: String,
        by: String,
    },
}

/// Builds the configured store. A Redis store starts connecting in the background on the current
/// tokio runtime and is returned at once.
pub fn from_config(
    config: Option<&crate::config::StoreConfig>,
) -> Result<Arc<dyn Store>, StoreError> {
    let Some(config) = config else {
        return Ok(Arc::new(MemoryStore::new()));
    };
    let tls_ca_pem = match &config.tls_ca_file {
        Some(path) => {
            let path = path.get_ref().as_str();
            Some(
                std::fs::read(path)
                    .map_err(|e| StoreError::Backend(format!("cannot read {path:?}: {e}")))?,
            )
        }
        None => None,
    };
    let options = RedisOptions {
        budget: config.timeout.0,
        circuit_failures: config.circuit_failures,
        circuit_open: config.circuit_open.0,
        tls_ca_pem,
    };
    match (&config.redis_url, &config.redis_cluster) {
        (Some(url), _) => Ok(RedisStore::connect(url.get_ref().as_str(), options)?),
        (None, Some(nodes)) => {
            let nodes: Vec<String> = nodes
                .get_ref()
                .iter()
                .map(|n| n.as_str().to_owned())
                .collect();
            Ok(RedisStore::connect_cluster(&nodes, options)?)
        }
        (None, None) => Ok(Arc::new(MemoryStore::new())),
    }
}
