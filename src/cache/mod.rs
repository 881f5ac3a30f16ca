//! Response caching for GET and HEAD, RFC 9111 for a shared cache (and per-user entries where a
//! route asks for them).
//!
//! - [`directives`]: `Cache-Control` parsing.
//! - [`freshness`]: whether a response may be stored, its freshness lifetime and initial age.
//! - [`key`]: cache keys (query normalisation, variants, per-user separation).
//! - [`entry`]: the stored response and its versioned binary codec.
//! - [`policy`]: a route's compiled cache rule.
//! - [`memory`]: the in-process tier (L1).
//!
//! With Redis as the store, entries are also written to Redis (L2) in the [`entry`] encoding and
//! shared by every gateway instance; an L2 hit fills L1. A corrupt or foreign L2 entry is a miss,
//! and a slow or unreachable Redis only means L2 is skipped (the store's budget and circuit
//! breaker bound the wait).
//!
//! The proxy asks [`Cache::lookup`] after authentication and rate limiting (so a refused request
//! never touches the cache), serves hits itself, and on a miss lets the response stream to the
//! client while [`Fill`] captures it (up to `max_object`) for [`Cache::store`].

pub mod directives;
pub mod entry;
pub mod freshness;
pub mod key;
pub mod memory;
pub mod policy;

use std::sync::Arc;
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, AGE, AUTHORIZATION, SET_COOKIE, VARY};
use http::Method;

use self::directives::CacheControl;
use self::entry::Entry;
use self::freshness::{initial_age, storable, Exchange};
use self::key::{CacheKey, KeyParts};
use self::memory::MemoryTier;
use self::policy::CachePolicy;
use crate::config::CacheScope;
use crate::store::Store;

/// Prefix of the shared tier's keys in the store.
const L2_PREFIX: &str = "cachegate:cache:";
/// Prefix of the shared tier's variant indexes (resource → the headers it varies on).
const VARY_PREFIX: &str = "cachegate:cache-vary:";

/// Response headers never stored: they describe one exchange, not the resource.
const PER_EXCHANGE: [&str; 5] = [
    "x-request-id",
    "ratelimit",
    "ratelimit-policy",
    "cache-status",
    "x-cache",
];

/// How long a request waits for another request filling the same entry before going to the
/// origin itself.
pub const COALESCE_WAIT: Duration = Duration::from_secs(10);

type Flights =
    Arc<std::sync::Mutex<std::collections::HashMap<String, tokio::sync::watch::Receiver<()>>>>;

/// Whether a missed request fetches from the origin itself or waits for one that already does.
pub enum Flight {
    /// Fetch; dropping the guard (when the request ends, stored or not) wakes the followers.
    Leader(FlightGuard),
    /// Wait for the leader, then look up again.
    Follower(tokio::sync::watch::Receiver<()>),
}

pub struct FlightGuard {
    key: String,
    flights: Flights,
    _done: tokio::sync::watch::Sender<()>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        // Remove before `_done` drops, so a late arrival starts a new flight rather than waiting
        // on a finished one.
        if let Ok(mut flights) = self.flights.lock() {
            flights.remove(&self.key);
        }
    }
}

pub struct Cache {
    /// Misses being fetched, by primary key (in-process coalescing).
    flights: Flights,
    memory: MemoryTier,
    /// The shared tier, when the store is shared (Redis).
    shared: Option<Arc<dyn Store>>,
}

/// A request as the cache sees it.
pub struct CacheRequest<'a> {
    pub method: &'a Method,
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The verified token's subject, if any.
    pub user: Option<&'a str>,
}

/// A fresh stored response for a request.
pub struct Hit {
    /// `memory` or `redis`.
    pub tier: &'static str,
    pub entry: Arc<Entry>,
    pub age_secs: u64,
    pub ttl_secs: u64,
}

pub enum Lookup {
    Hit(Hit),
    /// Not stored (or stale): forward, and maybe fill under `primary`. `stale` is an entry still
    /// inside its stale-if-error window, to answer with if the origin fails.
    Miss {
        primary: CacheKey,
        stale: Option<Arc<Entry>>,
    },
    /// The cache does not apply to this request; says why.
    Bypass(&'static str),
}

/// An entry stored in process that still has to be written to the shared tier.
pub struct SharedWrite {
    entry_key: String,
    entry: Bytes,
    vary_key: String,
    vary: String,
    ttl: Duration,
}

/// A response being captured for the cache while it streams to the client.
pub struct Fill {
    variant: CacheKey,
    primary: CacheKey,
    vary: Vec<HeaderName>,
    status: u16,
    headers: HeaderMap,
    stored_at_ms: u64,
    fresh_for_ms: u64,
    stale_if_error_ms: u64,
    max_object: u64,
    body: BytesMut,
    /// The whole body arrived.
    pub complete: bool,
}

impl Fill {
    /// Adds a body chunk; `false` once the body outgrows `max_object` (then drop the fill).
    pub fn push(&mut self, chunk: &Bytes) -> bool {
        if (self.body.len() + chunk.len()) as u64 > self.max_object {
            return false;
        }
        self.body.extend_from_slice(chunk);
        true
    }
}

fn millis_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn vary_names(response: &HeaderMap) -> Vec<HeaderName> {
    response
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes()).ok())
        .collect()
}

fn now_ms() -> u64 {
    millis_since_epoch(SystemTime::now())
}

fn hit(tier: &'static str, entry: Arc<Entry>, now: u64) -> Option<Hit> {
    if entry.stored_at_ms + entry.fresh_for_ms <= now {
        return None;
    }
    let stored_age = entry
        .headers
        .get(AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let resident = now.saturating_sub(entry.stored_at_ms) / 1000;
    let ttl_secs = (entry.stored_at_ms + entry.fresh_for_ms - now) / 1000;
    Some(Hit {
        tier,
        entry,
        age_secs: stored_age + resident,
        ttl_secs,
    })
}

impl Cache {
    /// A cache with an in-process tier of `memory_capacity` bytes, and a shared tier in `store`
    /// when that store is shared between instances.
    pub fn new(memory_capacity: u64, store: Option<Arc<dyn Store>>) -> Cache {
        Cache {
            flights: Arc::default(),
            memory: MemoryTier::new(memory_capacity),
            shared: store.filter(|s| s.kind() == "redis"),
        }
    }

    fn primary_key(policy: &CachePolicy, request: &CacheRequest<'_>) -> CacheKey {
        CacheKey::primary(&KeyParts {
            host: request.host,
            path: request.path,
            query: request.query,
            query_rule: &policy.query,
            user: match policy.scope {
                CacheScope::User => request.user,
                CacheScope::Shared => None,
            },
        })
    }

    /// Finds a fresh entry for a request (in process, then in the shared tier), or says why the
    /// cache does not apply.
    pub async fn lookup(&self, policy: &CachePolicy, request: &CacheRequest<'_>) -> Lookup {
        if *request.method != Method::GET && *request.method != Method::HEAD {
            return Lookup::Bypass("method");
        }
        if policy.scope == CacheScope::User && request.user.is_none() {
            return Lookup::Bypass("anonymous");
        }
        if request.headers.contains_key(AUTHORIZATION)
            && !(policy.rule.per_user || policy.rule.allow_authorized)
        {
            return Lookup::Bypass("authorization");
        }
        if policy.honor_client_cache_control {
            let cc = CacheControl::parse(request.headers);
            if cc.no_cache || cc.no_store {
                return Lookup::Bypass("client-no-cache");
            }
        }
        let primary = Cache::primary_key(policy, request);
        let now = now_ms();
        let known_vary = self.memory.vary_of(primary.as_str());
        let vary = known_vary
            .as_deref()
            .map_or_else(|| policy.vary.clone(), Clone::clone);
        let variant = primary.variant(&vary, request.headers);
        let in_memory = self.memory.get(variant.as_str());
        if let Some(found) = in_memory.clone().and_then(|e| hit("memory", e, now)) {
            return Lookup::Hit(found);
        }
        if let Some(found) = self
            .lookup_shared(&primary, known_vary.is_none(), variant, request, now)
            .await
        {
            return Lookup::Hit(found);
        }
        let stale =
            in_memory.filter(|e| e.stored_at_ms + e.fresh_for_ms + e.stale_if_error_ms > now);
        Lookup::Miss { primary, stale }
    }

    /// The age of an entry now, in seconds: its age when stored plus its time here.
    pub fn age_secs(entry: &Entry) -> u64 {
        let stored_age = entry
            .headers
            .get(AGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        stored_age + now_ms().saturating_sub(entry.stored_at_ms) / 1000
    }

    /// The shared tier: finds the variant (learning the resource's `Vary` from the tier when this
    /// instance has not seen it), decodes it, and keeps a fresh one in process too.
    async fn lookup_shared(
        &self,
        primary: &CacheKey,
        vary_unknown: bool,
        mut variant: CacheKey,
        request: &CacheRequest<'_>,
        now: u64,
    ) -> Option<Hit> {
        let store = self.shared.as_ref()?;
        if vary_unknown {
            if let Ok(Some(names)) = store
                .get(&format!("{VARY_PREFIX}{}", primary.as_str()))
                .await
            {
                let names: Vec<HeaderName> = String::from_utf8_lossy(&names)
                    .split(',')
                    .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                    .collect();
                variant = primary.variant(&names, request.headers);
                self.memory.set_vary(primary.as_str().to_owned(), names);
            }
        }
        let raw = store
            .get(&format!("{L2_PREFIX}{}", variant.as_str()))
            .await
            .ok()??;
        let entry = match Entry::decode(raw) {
            Ok(entry) => Arc::new(entry),
            Err(e) => {
                tracing::debug!(error = %e, "cache: ignoring an unreadable shared entry");
                return None;
            }
        };
        let found = hit("redis", entry.clone(), now)?;
        self.memory.insert(variant.as_str().to_owned(), entry);
        Some(found)
    }

    /// Decides whether the response to a missed request is stored; if so, returns the [`Fill`]
    /// that captures it.
    pub fn plan_fill(
        &self,
        policy: &CachePolicy,
        primary: &CacheKey,
        request: &CacheRequest<'_>,
        status: u16,
        response: &HeaderMap,
        sent_at: SystemTime,
    ) -> Option<Fill> {
        let received_at = SystemTime::now();
        let request_cc = if policy.honor_client_cache_control {
            CacheControl::parse(request.headers)
        } else {
            CacheControl::default()
        };
        let response_cc = CacheControl::parse(response);
        let exchange = Exchange {
            method: request.method,
            request: request.headers,
            request_cc: &request_cc,
            status,
            response,
            response_cc: &response_cc,
        };
        let lifetime = storable(&exchange, &policy.rule_for(status), received_at).ok()?;
        let age = initial_age(response, sent_at, received_at);
        // Entries that would need revalidation before any reuse are not kept yet.
        let fresh_for = lifetime.checked_sub(age).filter(|d| !d.is_zero())?;
        if response_cc.no_cache {
            return None;
        }
        let declared = response
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > policy.max_object) {
            return None;
        }

        let mut headers = response.clone();
        for name in PER_EXCHANGE {
            headers.remove(name);
        }
        headers.remove(SET_COOKIE);
        headers.insert(AGE, age.as_secs().into());
        let mut vary = policy.vary.clone();
        for name in vary_names(response) {
            if !vary.contains(&name) {
                vary.push(name);
            }
        }
        Some(Fill {
            variant: primary.variant(&vary, request.headers),
            primary: primary.clone(),
            vary,
            status,
            headers,
            stored_at_ms: millis_since_epoch(received_at),
            fresh_for_ms: fresh_for.as_millis() as u64,
            stale_if_error_ms: policy.stale_if_error.map_or(0, |d| d.as_millis() as u64),
            max_object: policy.max_object,
            body: BytesMut::new(),
            complete: false,
        })
    }

    /// Stores a completely captured response in process, at once, and returns what remains to
    /// be written to the shared tier (if there is one) with [`Cache::store_shared`]. Called when
    /// the last body chunk arrives from the origin, before it is passed on, so the entry exists
    /// by the time the client has the response.
    pub fn store_local(&self, fill: Fill) -> Option<SharedWrite> {
        if !fill.complete {
            return None;
        }
        let entry = Entry {
            status: fill.status,
            headers: fill.headers,
            body: fill.body.freeze(),
            stored_at_ms: fill.stored_at_ms,
            fresh_for_ms: fill.fresh_for_ms,
            stale_while_revalidate_ms: 0,
            stale_if_error_ms: fill.stale_if_error_ms,
            vary: fill.vary.clone(),
        };
        let shared = self.shared.as_ref().map(|_| SharedWrite {
            entry_key: format!("{L2_PREFIX}{}", fill.variant.as_str()),
            entry: entry.encode(),
            vary_key: format!("{VARY_PREFIX}{}", fill.primary.as_str()),
            vary: fill
                .vary
                .iter()
                .map(HeaderName::as_str)
                .collect::<Vec<_>>()
                .join(","),
            ttl: Duration::from_millis(fill.fresh_for_ms + fill.stale_if_error_ms),
        });
        self.memory
            .set_vary(fill.primary.as_str().to_owned(), fill.vary);
        self.memory
            .insert(fill.variant.as_str().to_owned(), Arc::new(entry));
        shared
    }

    /// Writes a stored entry to the shared tier; a failure there is counted by the store and
    /// otherwise ignored (the entry is still served in process).
    pub async fn store_shared(&self, write: SharedWrite) {
        let Some(store) = &self.shared else { return };
        // The variant index outlives its entries a little, so instances agree on variants.
        let _ = store
            .set(
                &write.vary_key,
                Bytes::from(write.vary),
                write.ttl + Duration::from_secs(60),
            )
            .await;
        let _ = store.set(&write.entry_key, write.entry, write.ttl).await;
    }

    /// Joins the flight for a missed key: the first request leads, the others follow.
    pub fn join_flight(&self, primary: &CacheKey) -> Flight {
        let mut flights = self.flights.lock().expect("flights mutex poisoned");
        if let Some(receiver) = flights.get(primary.as_str()) {
            return Flight::Follower(receiver.clone());
        }
        let (done, receiver) = tokio::sync::watch::channel(());
        flights.insert(primary.as_str().to_owned(), receiver);
        Flight::Leader(FlightGuard {
            key: primary.as_str().to_owned(),
            flights: self.flights.clone(),
            _done: done,
        })
    }

    /// Entries and value bytes in the shared tier, counting at most
    /// `limit` keys; `None` without a shared tier.
    pub async fn shared_stats(&self, limit: u64) -> Option<Result<(u64, u64, bool), String>> {
        let store = self.shared.as_ref()?;
        store
            .measure_prefix(L2_PREFIX, limit)
            .await
            .map(|r| r.map_err(|e| e.to_string()))
    }

    /// Entries and bytes in the in-process tier.
    pub fn memory_stats(&self) -> (u64, u64) {
        self.memory.stats()
    }
}
