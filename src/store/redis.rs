//! The Redis store: one multiplexed connection per gateway (the `redis` crate's connection
//! manager, or its cluster connection for Redis Cluster), behind a per-request time budget and a
//! circuit breaker, so a slow or dead Redis costs a request at most the budget, and nothing at
//! all once the circuit is open.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, RedisError, Script};

use crate::metrics::metrics;

use super::gcra::{GcraOutcome, GcraRequest, REFUND_SCRIPT, SCRIPT};
use super::purge;
use super::{Published, PurgeEvent, PurgeState, RecordedMarks, Store, StoreError};

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

/// Closed: calls go through. After `threshold` consecutive failures: open for `open_for`, calls
/// fail at once. Then half-open: a single call is let through; its result closes or reopens it.
struct Circuit {
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which the circuit is open; 0 when closed.
    open_until: AtomicU64,
    threshold: u32,
    open_for: Duration,
    epoch: Instant,
    /// What it guards, for logs: `Redis`, or a cluster node's address.
    name: String,
}

impl Circuit {
    fn new(name: String, threshold: u32, open_for: Duration) -> Circuit {
        Circuit {
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            threshold: threshold.max(1),
            open_for,
            epoch: Instant::now(),
            name,
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = self.now();
        // Half-open: the caller that moves the deadline forward gets the one trial.
        now >= until
            && self
                .open_until
                .compare_exchange(
                    until,
                    now + self.open_for.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    fn record(&self, ok: bool) {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            if self.open_until.swap(0, Ordering::AcqRel) != 0 {
                metrics().store_circuit_open.dec();
                tracing::info!(node = %self.name, "store: circuit closed; using the store again");
            }
        } else if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= self.threshold {
            let until = self.now() + self.open_for.as_millis() as u64;
            if self.open_until.swap(until, Ordering::AcqRel) == 0 {
                metrics().store_circuit_open.inc();
                tracing::warn!(node = %self.name, open_for = ?self.open_for, "store: circuit open after repeated failures; bypassing it");
            }
        }
    }

    fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
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

/// Slots `start..=end` and the circuit of the master that serves them.
struct SlotRange {
    start: u16,
    end: u16,
    master: String,
    circuit: Arc<Circuit>,
}

/// The cluster slot of a key (CRC16 of its hash tag, or of the key, mod 16384).
fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|b| *b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(bytes)) % 16384
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

fn tls_certificates(ca_pem: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca_pem.to_vec()),
    }
}

/// What a Redis error means for the caller: the store (or, on a cluster, a node) is not there —
/// counted by the circuit breaker —, or it answered with an error.
fn backend_error(e: RedisError) -> StoreError {
    use redis::{ErrorKind, ServerErrorKind};
    // A cluster mid-failover answers with these (or the client finds no connection for the
    // slot) until the replica takes over: the node is unavailable, not the request wrong.
    let failing_over = e.is_cluster_error()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::MasterDown
                        | ServerErrorKind::BusyLoading
                        | ServerErrorKind::ReadOnly
                )
        );
    if failing_over
        || e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
    {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Backend(e.to_string())
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

    /// The circuit guarding calls on `key`: on a cluster, that of the master serving its slot
    /// (the store's own until the slots are known).
    fn circuit_for(&self, key: &str) -> Arc<Circuit> {
        if let Backend::Cluster { slots, .. } = &self.backend {
            let slot = slot_of(key);
            let ranges = slots.load();
            if let Some(range) = ranges.iter().find(|r| (r.start..=r.end).contains(&slot)) {
                return range.circuit.clone();
            }
        }
        self.own_circuit.clone()
    }

    /// Learns which master serves which slots (after a failover, the promoted replica).
    /// Circuits are kept per master address.
    async fn refresh_slots(&self) -> Result<(), StoreError> {
        let Backend::Cluster { slots, .. } = &self.backend else {
            return Ok(());
        };
        let Some(mut connection) = self.health_connection() else {
            return Ok(());
        };
        let reply = tokio::time::timeout(
            RESPONSE_TIMEOUT,
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Vec<redis::Value>>(&mut connection),
        )
        .await
        .map_err(|_| StoreError::Unavailable("CLUSTER SLOTS timed out".to_owned()))?
        .map_err(backend_error)?;
        let known = slots.load();
        let mut ranges = Vec::new();
        for range in reply {
            let redis::Value::Array(fields) = range else {
                continue;
            };
            let (
                Some(redis::Value::Int(start)),
                Some(redis::Value::Int(end)),
                Some(redis::Value::Array(master)),
            ) = (fields.first(), fields.get(1), fields.get(2))
            else {
                continue;
            };
            let (Some(redis::Value::BulkString(host)), Some(redis::Value::Int(port))) =
                (master.first(), master.get(1))
            else {
                continue;
            };
            let master = format!("{}:{port}", String::from_utf8_lossy(host));
            let circuit = known
                .iter()
                .chain(ranges.iter())
                .find(|r: &&SlotRange| r.master == master)
                .map(|r| r.circuit.clone())
                .unwrap_or_else(|| {
                    Arc::new(Circuit::new(
                        master.clone(),
                        self.options.circuit_failures,
                        self.options.circuit_open,
                    ))
                });
            ranges.push(SlotRange {
                start: *start as u16,
                end: *end as u16,
                master,
                circuit,
            });
        }
        if !ranges.is_empty() {
            slots.store(Arc::new(ranges));
        }
        Ok(())
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

    fn connection(&self) -> Option<Connection> {
        match &self.backend {
            Backend::Single { requests, .. } => Some(Connection::Single(requests.clone())),
            Backend::Cluster { connection, .. } => connection
                .load_full()
                .map(|c| Connection::Cluster((*c).clone())),
        }
    }

    fn health_connection(&self) -> Option<Connection> {
        match &self.backend {
            Backend::Single { health, .. } => Some(Connection::Single(health.clone())),
            Backend::Cluster { .. } => self.connection(),
        }
    }

    async fn ensure_cluster_connection(&self) -> Result<(), StoreError> {
        let Backend::Cluster {
            nodes, connection, ..
        } = &self.backend
        else {
            return Ok(());
        };
        if connection.load().is_some() {
            return Ok(());
        }
        let mut builder = redis::cluster::ClusterClient::builder(nodes.clone());
        if let Some(pem) = &self.options.tls_ca_pem {
            builder = builder.certs(tls_certificates(pem));
        }
        // Few, quick retries inside the client (its defaults wait over a second between them):
        // every call has its own budget above, and a failover's new master should be found
        // as soon as the cluster reports it.
        let client = builder
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(2)
            .min_retry_wait(20)
            .max_retry_wait(200)
            .build()
            .map_err(backend_error)?;
        let conn = client.get_async_connection().await.map_err(backend_error)?;
        connection.store(Some(Arc::new(conn)));
        Ok(())
    }
}

/// A connection of either kind; both speak the same commands.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// Pings Redis every [`HEALTH_INTERVAL`], logging each change between reachable and not. A
/// successful ping also closes the circuit, so recovery does not wait for traffic.
async fn watch_health(store: Weak<RedisStore>) {
    loop {
        let Some(strong) = store.upgrade() else {
            return;
        };
        let reachable = match strong.ensure_cluster_connection().await {
            Ok(()) => strong.ping().await,
            Err(e) => Err(e),
        };
        if reachable.is_ok() {
            strong.own_circuit.record(true);
            if let Err(e) = strong.refresh_slots().await {
                tracing::debug!(error = %e, "store: could not read the cluster's slots");
            }
        }
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
        // While a node's circuit is open, look at the slots often: a failover's new master
        // gets a fresh circuit as soon as the cluster names it.
        let pause = if strong.circuit_open() {
            Duration::from_millis(250)
        } else {
            HEALTH_INTERVAL
        };
        drop(strong);
        tokio::time::sleep(pause).await;
    }
}

/// A fresh epoch id, written by whichever script finds none.
fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn outcomes_from(values: &[i64]) -> Vec<GcraOutcome> {
    values
        .chunks_exact(4)
        .map(|v| GcraOutcome {
            allowed: v[0] == 1,
            remaining: u32::try_from(v[1].max(0)).unwrap_or(u32::MAX),
            reset_us: v[2].max(0) as u64,
            retry_after_us: v[3].max(0) as u64,
        })
        .collect()
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

    /// One `EVALSHA` (reloading on `NOSCRIPT`) for all limits on a single Redis. On a cluster the
    /// limits' keys live in different slots, so each limit is one `EVALSHA`, all sent at once
    /// (still one round trip of waiting, each limit exact); when one refuses, the units the
    /// others took are given back in a second round trip, so a refused request counts nowhere.
    async fn rate_limit(
        &self,
        limits: &[GcraRequest],
        consume: bool,
    ) -> Result<Vec<GcraOutcome>, StoreError> {
        let script = &self.gcra;
        let budget = self.options.budget;
        // On a cluster, the breaker of the first limit's node guards the call.
        let first_key = limits.first().map_or("", |l| l.key.as_str());
        match &self.backend {
            Backend::Single { .. } => {
                let values: Vec<i64> = self
                    .guarded("rate_limit", budget, first_key, |mut c| async move {
                        let mut invocation = script.prepare_invoke();
                        invocation.arg(u8::from(consume));
                        for limit in limits {
                            invocation
                                .key(&limit.key)
                                .arg(limit.interval_us)
                                .arg(limit.burst);
                        }
                        invocation.invoke_async(&mut c).await
                    })
                    .await?;
                Ok(outcomes_from(&values))
            }
            Backend::Cluster { .. } => {
                let values: Vec<Vec<i64>> = self
                    .guarded("rate_limit", budget, first_key, |c| async move {
                        let calls = limits.iter().map(|limit| {
                            let mut c = c.clone();
                            async move {
                                script
                                    .key(&limit.key)
                                    .arg(u8::from(consume))
                                    .arg(limit.interval_us)
                                    .arg(limit.burst)
                                    .invoke_async::<Vec<i64>>(&mut c)
                                    .await
                            }
                        });
                        futures_util::future::try_join_all(calls).await
                    })
                    .await?;
                let outcomes: Vec<GcraOutcome> =
                    values.iter().flat_map(|v| outcomes_from(v)).collect();
                if consume && outcomes.iter().any(|o| !o.allowed) {
                    // All or nothing, as on a single Redis: give back what the admitting limits took.
                    let refund = &self.refund;
                    let admitted: Vec<&GcraRequest> = limits
                        .iter()
                        .zip(&outcomes)
                        .filter(|(_, o)| o.allowed)
                        .map(|(l, _)| l)
                        .collect();
                    let refunded = self
                        .guarded("rate_limit_refund", budget, first_key, |c| async move {
                            let calls = admitted.into_iter().map(|limit| {
                                let mut c = c.clone();
                                async move {
                                    refund
                                        .key(&limit.key)
                                        .arg(limit.interval_us)
                                        .invoke_async::<i64>(&mut c)
                                        .await
                                }
                            });
                            futures_util::future::try_join_all(calls).await
                        })
                        .await;
                    if let Err(e) = refunded {
                        tracing::debug!(error = %e, "rate limit: refund after a refusal failed");
                    }
                }
                Ok(outcomes)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_logs() {
        assert_eq!(
            crate::config::values::redact_url("redis://user:pw@h:6379/0"),
            "redis://***@h:6379/0"
        );
        assert_eq!(
            crate::config::values::redact_url("redis://h:6379"),
            "redis://h:6379"
        );
    }

    #[test]
    fn slots_are_those_redis_computes() {
        // `CLUSTER KEYSLOT` on a real server gives these.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{cachegate-purge}:seq"), 8129);
        assert_eq!(slot_of("{}x"), 10595, "an empty tag: the whole key");
        assert_eq!(slot_of("a{user1000}.following"), 3443);
        assert_eq!(slot_of("x{}y{z}"), 15453, "only the first braces count");
    }

    #[test]
    fn circuit_opens_after_failures_and_lets_one_trial_through() {
        let circuit = Circuit::new("test".to_owned(), 2, Duration::from_millis(30));
        circuit.record(false);
        assert!(circuit.allow(), "one failure is below the threshold");
        circuit.record(false);
        assert!(!circuit.allow(), "open");
        std::thread::sleep(Duration::from_millis(40));
        assert!(circuit.allow(), "half-open: one trial");
        assert!(!circuit.allow(), "only one");
        circuit.record(true);
        assert!(circuit.allow() && !circuit.is_open(), "closed again");
    }
}
