//! The Redis store: one multiplexed connection per gateway (the `redis` crate's connection
//! manager, or its cluster connection for Redis Cluster), behind a per-request time budget and a
//! circuit breaker, so a slow or dead Redis costs a request at most the budget, and nothing at
//! all once the circuit is open.
//!
//! This file holds the store and its operations (the [`Store`] implementation: the shared
//! tier's values, the purge protocol's scripts and channels); the rest, each used only from here:
//! - `connection`: a connection of either kind, and what a Redis error means;
//! - `cluster`: slots, the circuit per master, the cluster connection;
//! - `circuit`: the circuit breaker;
//! - `health`: the background health check;
//! - `gcra`: the rate-limit script.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, RedisError, Script};

use crate::metrics::metrics;

use super::gcra::{GcraOutcome, GcraRequest, REFUND_SCRIPT, SCRIPT};

mod circuit;
mod cluster;
mod connection;
mod gcra;
mod health;

use super::purge;
use super::{Published, PurgeEvent, PurgeState, RecordedMarks, Store, StoreError};
use circuit::Circuit;
use cluster::SlotRange;
use connection::{backend_error, tls_certificates, Connection};
use health::watch_health;

/// How often the background task checks that Redis answers.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Name prefix of the gateway's background runtime's threads (see `server`).
pub const BACKGROUND_THREADS: &str = "cachegate-control";
/// Budget of the purge operations: a write waits for them, but a write is not a cache hit.
const PURGE_BUDGET: Duration = Duration::from_millis(500);

/// Limits on how long the request path waits for Redis.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Longest a request waits for one store operation.
    pub budget: Duration,
    /// Consecutive failures that open the circuit.
    pub circuit_failures: u32,
    /// How long an open circuit refuses calls before one is tried again.
    pub circuit_open: Duration,
    /// PEM CA certificates trusted for `rediss://`, instead of the system roots.
    pub tls_ca_pem: Option<Vec<u8>>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            budget: Duration::from_millis(25),
            circuit_failures: 3,
            circuit_open: Duration::from_secs(2),
            tls_ca_pem: None,
        }
    }
}

enum Backend {
    /// Two connections to one server. The request path's is first used by a request, so its
    /// I/O driver runs on the proxy's runtime and a command does not hop threads; the health
    /// check's lives on the background runtime.
    Single {
        requests: ConnectionManager,
        health: ConnectionManager,
    },
    /// Connected in the background; `None` until the first connection succeeds.
    Cluster {
        nodes: Vec<String>,
        connection: ArcSwapOption<ClusterConnection>,
        /// Slot ranges and the circuit of the master serving each (from `CLUSTER SLOTS`,
        /// refreshed with every health check), so one dead master opens only its own circuit.
        slots: arc_swap::ArcSwap<Vec<SlotRange>>,
    },
}

pub struct RedisStore {
    /// Where Redis is, without credentials, for logs.
    display_url: String,
    backend: Backend,
    connected: AtomicBool,
    options: RedisOptions,
    /// The circuit of a single server (on a cluster, used until the slots are known).
    own_circuit: Arc<Circuit>,
    gcra: Script,
    refund: Script,
    purge: Script,
    purge_raise: Script,
    renew: Script,
    /// Where the purge subscription connects.
    pubsub: purge::Subscription,
    subscribed: AtomicBool,
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
    fn new(
        display_url: String,
        backend: Backend,
        options: RedisOptions,
        pubsub: purge::Subscription,
    ) -> Arc<RedisStore> {
        let store = Arc::new(RedisStore {
            display_url,
            backend,
            connected: AtomicBool::new(false),
            own_circuit: Arc::new(Circuit::new(
                "Redis".to_owned(),
                options.circuit_failures,
                options.circuit_open,
            )),
            options,
            gcra: Script::new(SCRIPT),
            refund: Script::new(REFUND_SCRIPT),
            purge: super::purge::purge_script(),
            purge_raise: Script::new(super::purge::RAISE_SCRIPT),
            renew: super::purge::renew_script(),
            pubsub,
            subscribed: AtomicBool::new(false),
        });
        tokio::spawn(watch_health(Arc::downgrade(&store)));
        store
    }

    /// A store on one Redis server. Returns at once; a task on the current tokio runtime
    /// connects, then keeps checking the connection.
    pub fn connect(url: &str, options: RedisOptions) -> Result<Arc<RedisStore>, StoreError> {
        let client = match &options.tls_ca_pem {
            Some(pem) => redis::Client::build_with_tls(url, tls_certificates(pem)),
            None => redis::Client::open(url),
        }
        .map_err(|e| StoreError::Backend(format!("invalid redis_url: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let manager = || {
            ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                .map_err(|e| StoreError::Backend(e.to_string()))
        };
        let backend = Backend::Single {
            requests: manager()?,
            health: manager()?,
        };
        let pubsub = purge::Subscription {
            urls: vec![url.to_owned()],
            tls_ca_pem: options.tls_ca_pem.clone(),
            cluster: false,
            reconnect: Arc::default(),
        };
        Ok(RedisStore::new(
            crate::config::values::redact_url(url),
            backend,
            options,
            pubsub,
        ))
    }

    /// A store on a Redis Cluster, from its seed nodes. Returns at once, like [`RedisStore::connect`].
    pub fn connect_cluster(
        nodes: &[String],
        options: RedisOptions,
    ) -> Result<Arc<RedisStore>, StoreError> {
        redis::cluster::ClusterClient::new(nodes.to_vec())
            .map_err(|e| StoreError::Backend(format!("invalid redis_cluster: {e}")))?;
        let pubsub = purge::Subscription {
            urls: nodes.to_vec(),
            tls_ca_pem: options.tls_ca_pem.clone(),
            cluster: true,
            reconnect: Arc::default(),
        };
        let display = format!(
            "cluster[{}]",
            nodes
                .iter()
                .map(|n| crate::config::values::redact_url(n))
                .collect::<Vec<_>>()
                .join(",")
        );
        let backend = Backend::Cluster {
            nodes: nodes.to_vec(),
            connection: ArcSwapOption::empty(),
            slots: arc_swap::ArcSwap::from_pointee(Vec::new()),
        };
        Ok(RedisStore::new(display, backend, options, pubsub))
    }

    /// Whether the last health check reached Redis.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Whether failures opened a circuit (the store, or on a cluster one node, is being
    /// bypassed).
    pub fn circuit_open(&self) -> bool {
        match &self.backend {
            Backend::Cluster { slots, .. } => {
                self.own_circuit.is_open() || slots.load().iter().any(|r| r.circuit.is_open())
            }
            Backend::Single { .. } => self.own_circuit.is_open(),
        }
    }

    /// Runs `op` (named for metrics) on a connection within the budget, through the circuit
    /// breaker of the node serving `key`.
    async fn guarded<T, F, Fut>(
        &self,
        name: &'static str,
        budget: Duration,
        key: &str,
        op: F,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let circuit = self.circuit_for(key);
        self.run(name, budget, Some(&circuit), op).await
    }

    /// Runs an operation of the purge protocol: within its budget but past the circuit breaker,
    /// which is there to spare requests the wait on a failing store. The protocol's calls are
    /// few, and each answer matters: a renewal keeps this instance coherent, a purge releases a
    /// write. On a cluster the breaker may be open because another node failed.
    async fn coherence_op<T, F, Fut>(
        &self,
        name: &'static str,
        budget: Duration,
        op: F,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.run(name, budget, None, op).await
    }

    async fn run<T, F, Fut>(
        &self,
        name: &'static str,
        budget: Duration,
        circuit: Option<&Circuit>,
        op: F,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let m = metrics();
        if circuit.is_some_and(|c| !c.allow()) {
            m.store_operations
                .with_label_values(&[name, "circuit_open"])
                .inc();
            return Err(StoreError::Unavailable(
                "circuit open after repeated failures".to_owned(),
            ));
        }
        // Background work (purge subscription bookkeeping, replays) keeps off the request
        // connection: its I/O driver belongs on the proxy runtime, where a request first uses it.
        let background = std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with(BACKGROUND_THREADS));
        let connection = if background {
            self.health_connection()
        } else {
            self.connection()
        };
        let Some(connection) = connection else {
            if let Some(circuit) = circuit {
                circuit.record(false);
            }
            m.store_operations
                .with_label_values(&[name, "not_connected"])
                .inc();
            return Err(StoreError::Unavailable("not connected yet".to_owned()));
        };
        let started = Instant::now();
        let (result, label) = match tokio::time::timeout(budget, op(connection)).await {
            Ok(Ok(value)) => (Ok(value), "ok"),
            Ok(Err(e)) => (Err(backend_error(e)), "error"),
            Err(_) => (
                Err(StoreError::Unavailable(format!(
                    "no answer within {budget:?}"
                ))),
                "timeout",
            ),
        };
        m.store_duration
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        m.store_operations.with_label_values(&[name, label]).inc();
        if let Some(circuit) = circuit {
            circuit.record(!matches!(result, Err(StoreError::Unavailable(_))));
        }
        result
    }
}

/// A fresh epoch id, written by whichever script finds none.
fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn is_failing(&self, key: &str) -> bool {
        self.circuit_for(key).is_open()
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let value: Option<Vec<u8>> = self
            .guarded("get", self.options.budget, key, |mut c| async move {
                c.get(key).await
            })
            .await?;
        Ok(value.map(Bytes::from))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<(), StoreError> {
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.guarded("set", self.options.budget, key, |mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value.as_ref())
                .arg("PX")
                .arg(millis)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    async fn set_if_absent(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let reply: Option<String> = self
            .guarded("set_nx", self.options.budget, key, |mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(value.as_ref())
                    .arg("NX")
                    .arg("PX")
                    .arg(millis)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(reply.is_some())
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let removed: u64 = self
            .guarded("delete", self.options.budget, key, |mut c| async move {
                c.del(key).await
            })
            .await?;
        Ok(removed > 0)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self
            .health_connection()
            .ok_or_else(|| StoreError::Unavailable("not connected yet".to_owned()))?;
        let reply = tokio::time::timeout(
            RESPONSE_TIMEOUT,
            redis::cmd("PING").query_async::<String>(&mut connection),
        )
        .await;
        match reply {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(backend_error(e)),
            Err(_) => Err(StoreError::Unavailable("PING timed out".to_owned())),
        }
    }

    async fn publish_purge(
        &self,
        instance: &str,
        keys: &[String],
        after: u64,
    ) -> Result<Published, StoreError> {
        let script = &self.purge;
        let reply: Vec<redis::Value> = self
            .coherence_op(
                "purge",
                PURGE_BUDGET.max(self.options.budget),
                |mut c| async move {
                    let mut invocation = script.prepare_invoke();
                    invocation
                        .key(purge::SEQ_KEY)
                        .key(purge::PREFIXES_KEY)
                        .key(purge::MEMBERS_KEY)
                        .arg(purge::PURGE_CHANNEL)
                        .arg(purge::MARK_TTL.as_secs())
                        .arg(after)
                        .arg(instance);
                    for key in keys {
                        invocation.key(purge::mark_key(key)).arg(key);
                    }
                    invocation.invoke_async(&mut c).await
                },
            )
            .await?;
        let malformed =
            || StoreError::Backend("the purge script answered in a bad shape".to_owned());
        let seq = match reply.first() {
            Some(redis::Value::Int(seq)) => u64::try_from(*seq).map_err(|_| malformed())?,
            _ => return Err(malformed()),
        };
        let members = reply
            .iter()
            .skip(2)
            .filter_map(|v| redis::from_redis_value::<String>(v.clone()).ok())
            .collect();
        Ok(Published { seq, members })
    }

    async fn purge_marks(&self, keys: &[String]) -> Result<RecordedMarks, StoreError> {
        let marks: Vec<String> = keys.iter().map(|k| purge::mark_key(k)).collect();
        let marks = &marks;
        let (keys, prefixes): (Vec<Option<u64>>, Vec<(String, u64)>) = self
            .coherence_op("purge_marks", self.options.budget, |mut c| async move {
                let keys = if marks.is_empty() {
                    Vec::new()
                } else {
                    redis::cmd("MGET").arg(marks).query_async(&mut c).await?
                };
                let prefixes = c.hgetall(purge::PREFIXES_KEY).await?;
                Ok((keys, prefixes))
            })
            .await?;
        Ok(RecordedMarks { keys, prefixes })
    }

    async fn purge_state(&self, at_least: u64) -> Result<PurgeState, StoreError> {
        let raise = &self.purge_raise;
        let candidate = new_epoch();
        let candidate = &candidate;
        self.coherence_op("purge_state", PURGE_BUDGET, |mut c| async move {
            let (seq, epoch): (u64, String) = raise
                .key(purge::SEQ_KEY)
                .key(purge::EPOCH_KEY)
                .arg(at_least)
                .arg(candidate)
                .invoke_async(&mut c)
                .await?;
            let prefixes: Vec<(String, u64)> = c.hgetall(purge::PREFIXES_KEY).await?;
            Ok(PurgeState {
                seq,
                epoch,
                prefixes,
            })
        })
        .await
    }

    async fn renew_membership(
        &self,
        instance: &str,
        lease: Duration,
    ) -> Result<(u64, String), StoreError> {
        let renew = &self.renew;
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        let candidate = new_epoch();
        let candidate = &candidate;
        self.coherence_op("purge_renew", lease, |mut c| async move {
            renew
                .key(purge::SEQ_KEY)
                .key(purge::MEMBERS_KEY)
                .key(purge::EPOCH_KEY)
                .arg(instance)
                .arg(lease_ms)
                .arg(candidate)
                .invoke_async(&mut c)
                .await
        })
        .await
    }

    async fn leave_membership(&self, instance: &str) -> Result<(), StoreError> {
        self.coherence_op("purge_leave", PURGE_BUDGET, |mut c| async move {
            redis::cmd("ZREM")
                .arg(purge::MEMBERS_KEY)
                .arg(instance)
                .query_async::<u64>(&mut c)
                .await
                .map(drop)
        })
        .await
    }

    async fn acknowledge_purge(&self, writer: &str, seq: u64, by: &str) -> Result<(), StoreError> {
        let message = purge::ack_message(writer, seq, by);
        let message = &message;
        self.coherence_op("purge_ack", PURGE_BUDGET, |mut c| async move {
            redis::cmd("PUBLISH")
                .arg(purge::ack_channel(writer))
                .arg(message)
                .query_async::<u64>(&mut c)
                .await
                .map(drop)
        })
        .await
    }

    fn resubscribe(&self) {
        self.pubsub.reconnect.notify_one();
    }

    fn purge_events(
        &self,
        instance: &str,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<PurgeEvent>> {
        if self.subscribed.swap(true, Ordering::AcqRel) {
            return None;
        }
        let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(purge::subscribe(
            self.pubsub.clone(),
            instance.to_owned(),
            events,
        ));
        Some(receiver)
    }

    /// SCANs (never KEYS) and sums STRLEN in pipelines of one SCAN page. On a cluster only the
    /// node behind the seed connection is scanned, so the figure covers that node.
    async fn measure_prefix(
        &self,
        prefix: &str,
        limit: u64,
    ) -> Option<Result<(u64, u64, bool), StoreError>> {
        let mut connection = self.health_connection()?;
        let pattern = format!("{prefix}*");
        let measure = async {
            let (mut cursor, mut keys, mut bytes) = (0u64, 0u64, 0u64);
            loop {
                let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut connection)
                    .await?;
                if !page.is_empty() {
                    let mut pipe = redis::pipe();
                    for key in &page {
                        pipe.cmd("STRLEN").arg(key);
                    }
                    let lengths: Vec<u64> = pipe.query_async(&mut connection).await?;
                    keys += page.len() as u64;
                    bytes += lengths.iter().sum::<u64>();
                }
                if next == 0 || keys >= limit {
                    return Ok::<_, RedisError>((keys, bytes, next != 0));
                }
                cursor = next;
            }
        };
        Some(
            tokio::time::timeout(Duration::from_secs(5), measure)
                .await
                .map_err(|_| StoreError::Unavailable("measuring took over 5 s".to_owned()))
                .and_then(|r| r.map_err(backend_error)),
        )
    }

    fn health(&self) -> Result<(), StoreError> {
        if self.is_connected() {
            Ok(())
        } else {
            Err(StoreError::Unavailable(format!(
                "Redis at {} is not reachable",
                self.display_url
            )))
        }
    }

    async fn rate_limit(
        &self,
        limits: &[GcraRequest],
        consume: bool,
    ) -> Result<Vec<GcraOutcome>, StoreError> {
        self.gcra(limits, consume).await
    }
}
