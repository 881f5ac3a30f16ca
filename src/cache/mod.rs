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
//! client while [`Fill`] captures it (up to `max_object`) for [`Cache::store_local`] and
//! [`Cache::store_shared`].
//!
//! Past freshness an entry goes through these states (RFC 9111 §4, RFC 5861):
//! 1. inside `stale_while_revalidate`: served at once, and one background request refreshes it;
//! 2. while it has a validator and is inside `keep`: the origin is asked conditionally
//!    (`If-None-Match` / `If-Modified-Since`), and a `304` refreshes and serves the entry;
//! 3. inside `stale_if_error`: served when the origin is unreachable, times out or answers 5xx;
//! 4. then gone. `must-revalidate`, `proxy-revalidate` and `no-cache` responses skip 1 and 3.
//!
//! Misses are coalesced: in process, one request per key goes to the origin and the others wait
//! for it; with Redis, a short lease (`SET NX PX`) extends that across instances, and the
//! instances that do not hold it poll the shared tier for the entry.

pub mod directives;
pub mod entry;
pub mod freshness;
pub mod key;
pub mod memory;
pub mod policy;
pub mod range;

use std::sync::Arc;
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, AGE, COOKIE, SET_COOKIE, VARY};
use http::Method;

use self::directives::CacheControl;
use self::entry::Entry;
use self::freshness::{initial_age, storable, Exchange};
use self::key::{CacheKey, KeyParts};
use self::memory::MemoryTier;
use self::policy::CachePolicy;
use crate::config::CacheScope;
use crate::header_rules::OVERRIDE_HEADERS;
use crate::purge::{self, Purger};
use crate::store::Store;

/// Prefix of the shared tier's keys in the store.
const L2_PREFIX: &str = "cachegate:cache:";
/// Prefix of the shared tier's variant indexes (resource → the headers it varies on).
const VARY_PREFIX: &str = "cachegate:cache-vary:";
/// Prefix of the fill leases that coalesce misses across instances.
const LEASE_PREFIX: &str = "cachegate:cache-lease:";
/// How long a fill lease lasts: a holder that dies releases it by expiry.
const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often an instance waiting on another's lease looks for the entry in the shared tier.
const LEASE_POLL: Duration = Duration::from_millis(20);
/// The longest an entry lives in the shared tier; purge marks outlive it.
const MAX_SHARED_TTL: Duration = Duration::from_secs(23 * 3600);

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
enum Flight {
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

/// How long a resource whose last answer could not be stored is fetched without coalescing
/// (Varnish's hit-for-miss): concurrent requests for it go to the origin side by side.
const UNCACHEABLE_FOR: Duration = Duration::from_secs(60);

pub struct Cache {
    /// Misses being fetched, by primary key (in-process coalescing).
    flights: Flights,
    /// Resources whose last answer could not be stored (see [`UNCACHEABLE_FOR`]).
    uncacheable: moka::sync::Cache<String, ()>,
    memory: MemoryTier,
    /// The shared tier, when the store is shared (Redis).
    shared: Option<Arc<dyn Store>>,
    /// Shared-tier entries larger than this many bytes are compressed.
    compress_above: Option<u64>,
    /// Says whether an entry was purged since its fill started.
    purger: Arc<Purger>,
}

/// A request as the cache sees it.
pub struct CacheRequest<'a> {
    pub method: &'a Method,
    /// `http` or `https`, as the client connected.
    pub scheme: &'a str,
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The verified token's subject, if any.
    pub user: Option<&'a str>,
    /// The request is authorised (RFC 9111 §3.5): it carries `Authorization`, or the gateway
    /// verified its token, wherever the token came from and whether or not it is forwarded.
    pub authorized: bool,
    /// The request has a body (a GET or HEAD with one is never answered from or stored in the
    /// cache: the origin may read it).
    pub has_body: bool,
    /// The route rule's tags, filled in from the path.
    pub tags: &'a [String],
}

/// A stored response that answers a request.
pub struct Hit {
    /// `memory`, `redis`, or `coalesced` (filled while this request waited).
    pub tier: &'static str,
    pub entry: Arc<Entry>,
    pub age_secs: u64,
    /// Seconds of freshness left; negative when stale (RFC 9211 `ttl`).
    pub ttl_secs: i64,
}

pub enum Lookup {
    Hit(Hit),
    /// Past freshness but inside stale-while-revalidate: serve it now, and refresh `primary` in
    /// the background (see [`Cache::join_flight`], so only once).
    StaleWhileRevalidate {
        hit: Hit,
        primary: CacheKey,
    },
    /// Not stored (or stale): forward, and maybe fill under `primary`. `stale` is a stale entry
    /// still kept: to revalidate if it has a validator, to answer with inside its
    /// stale-if-error window if the origin fails.
    Miss {
        primary: CacheKey,
        stale: Option<Arc<Entry>>,
    },
    /// The cache does not apply to this request; says why.
    Bypass(&'static str),
}

/// What the cache decides for one request, coalescing included (see [`Cache::decide`]).
pub enum Decision {
    /// A fresh entry answers: from a tier, or filled meanwhile by the request this one waited
    /// for (`tier` is then `coalesced`).
    Hit(Hit),
    /// Inside stale-while-revalidate: serve `hit` now. `refresh` is `Some` for the one request
    /// that should refresh it in the background (hold the guard until the refresh ends).
    Stale {
        hit: Hit,
        primary: CacheKey,
        refresh: Option<FlightGuard>,
    },
    /// Forward to the origin, and maybe fill under `primary` (see [`Lookup::Miss`] for `stale`).
    /// `flight`: held by the request that leads this key's fetch — dropping it wakes the waiting
    /// requests, so drop it as soon as the entry is stored or found not storable. `lease`: this
    /// instance holds the cross-instance fill lease; release it ([`Cache::release_lease`]) when
    /// the fill is written.
    Miss {
        primary: CacheKey,
        stale: Option<Arc<Entry>>,
        flight: Option<FlightGuard>,
        lease: bool,
    },
    Bypass(&'static str),
}

/// An entry stored in process that still has to be written to the shared tier.
#[derive(Clone)]
pub struct SharedWrite {
    entry_key: String,
    entry: Bytes,
    vary_key: String,
    vary: String,
    ttl: Duration,
}

/// When a request went to the origin, and the purge sequence number known then: a purge after
/// it makes what it brings back stale (see [`crate::purge`]).
#[derive(Debug, Clone, Copy)]
pub struct FillStart {
    pub sent_at: SystemTime,
    pub stamp: u64,
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
    stale_while_revalidate_ms: u64,
    stale_if_error_ms: u64,
    keep_ms: u64,
    stamp: u64,
    path: String,
    depends_on: Vec<String>,
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
    directives::millis(t.duration_since(UNIX_EPOCH).unwrap_or_default())
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

/// Where an entry stands at a moment (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Fresh,
    WhileRevalidate,
    /// Kept for revalidation or stale-if-error.
    Stale,
    Gone,
}

fn state(entry: &Entry, now: u64) -> State {
    let fresh_until = entry.fresh_until_ms();
    if now < fresh_until {
        State::Fresh
    } else if now < fresh_until.saturating_add(entry.stale_while_revalidate_ms) {
        State::WhileRevalidate
    } else if now < fresh_until.saturating_add(entry.retained_ms()) {
        State::Stale
    } else {
        State::Gone
    }
}

fn hit(tier: &'static str, entry: Arc<Entry>, now: u64) -> Hit {
    let ttl_ms = i128::from(entry.fresh_until_ms()) - i128::from(now);
    Hit {
        tier,
        age_secs: age_at(&entry, now),
        // Rounded toward minus infinity: an entry 0.3 s past freshness has `ttl=-1`.
        ttl_secs: i64::try_from(ttl_ms.div_euclid(1000)).unwrap_or(i64::MAX),
        entry,
    }
}

/// The age of an entry at `now`, in seconds: its age when stored plus its time here.
fn age_at(entry: &Entry, now: u64) -> u64 {
    let stored_age = entry
        .headers
        .get(AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(directives::delta_seconds)
        .map_or(0, |d| d.as_secs());
    stored_age
        .saturating_add(now.saturating_sub(entry.stored_at_ms) / 1000)
        .min(directives::MAX_DELTA.as_secs())
}

/// Response headers a `304` must not change in the stored response (RFC 9111 §3.2): the body's
/// framing and coding stay those of the stored body.
const KEPT_ON_UPDATE: [HeaderName; 3] = [
    http::header::CONTENT_LENGTH,
    http::header::TRANSFER_ENCODING,
    http::header::CONTENT_ENCODING,
];

impl Cache {
    /// A cache with an in-process tier of `memory_capacity` bytes, and a shared tier in `store`
    /// when that store is shared between instances.
    /// Entries above `compress_above` bytes are compressed in the shared tier (`0`: never).
    pub fn new(
        memory_capacity: u64,
        compress_above: u64,
        store: Option<Arc<dyn Store>>,
        purger: Arc<Purger>,
    ) -> Cache {
        Cache {
            flights: Arc::default(),
            uncacheable: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(UNCACHEABLE_FOR)
                .build(),
            memory: MemoryTier::new(memory_capacity),
            shared: store.filter(|s| s.kind() == "redis"),
            compress_above: (compress_above > 0).then_some(compress_above),
            purger,
        }
    }

    /// Marks a fill starting now (before the request goes to the origin).
    pub fn fill_start(&self) -> FillStart {
        FillStart {
            sent_at: SystemTime::now(),
            stamp: self.purger.stamp(),
        }
    }

    fn is_current(&self, entry: &Entry) -> bool {
        self.purger
            .is_current(entry.stamp, &entry.path, &entry.depends_on)
    }

    /// Write-through: the response to a write that carries the target's full new
    /// representation, planned as the GET entry for the same URL (`request` is the write, seen
    /// as a GET). `start` must carry the write's own purge sequence number, so the entry is
    /// current after that purge and stale after any later one.
    pub fn plan_write_through(
        &self,
        policy: &CachePolicy,
        request: &CacheRequest<'_>,
        response: &HeaderMap,
        start: FillStart,
    ) -> Option<(CacheKey, Fill)> {
        if policy.scope == CacheScope::User && request.user.is_none() {
            return None;
        }
        let primary = Cache::primary_key(policy, request);
        let fill = self.plan_fill(policy, &primary, request, 200, response, start)?;
        Some((primary, fill))
    }

    fn primary_key(policy: &CachePolicy, request: &CacheRequest<'_>) -> CacheKey {
        CacheKey::primary(&KeyParts {
            scheme: request.scheme,
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
        if request.has_body {
            return Lookup::Bypass("body");
        }
        // §3.5: a request with credentials may be answered only by an entry whose origin said
        // any client may have it (`public`, `s-maxage`, `must-revalidate`) — unless the rule
        // makes entries per user or declares the route's authorised content shared.
        let authorized_bound =
            request.authorized && !(policy.rule.per_user || policy.rule.allow_authorized);
        // An override header the origin is allowed to see (`[server] forward_override_headers`)
        // changes its answer: unless the rule keys on it, the cache stays out of the way.
        let unkeyed_override = OVERRIDE_HEADERS
            .iter()
            .any(|h| request.headers.contains_key(*h) && !policy.vary.iter().any(|v| v == h));
        if unkeyed_override {
            return Lookup::Bypass("override-header");
        }
        if policy.honor_client_cache_control {
            let cc = CacheControl::parse(request.headers);
            if cc.no_cache || cc.no_store {
                return Lookup::Bypass("client-no-cache");
            }
        }
        let primary = Cache::primary_key(policy, request);
        let now = now_ms();
        let known_vary = self.memory.vary_of(primary.local());
        let vary: &[HeaderName] = known_vary.as_deref().map_or(&policy.vary, |v| v.as_slice());
        let variant = primary.variant(vary, request.headers);
        // A request with a cookie may be served only what the origin said is for everyone.
        let cookie_bound = request.headers.contains_key(COOKIE)
            && policy.scope == CacheScope::Shared
            && !policy.rule.allow_cookies;
        let for_this_request = |e: &Entry| {
            if !(cookie_bound || authorized_bound) {
                return true;
            }
            let cc = CacheControl::parse_response(&e.headers, &policy.targeted);
            (!cookie_bound || freshness::shared_for_everyone(&cc))
                && (!authorized_bound || freshness::shared_despite_authorization(&cc))
        };
        let in_memory = self
            .memory
            .get(variant.local())
            .filter(|e| state(e, now) != State::Gone && self.is_current(e) && for_this_request(e));
        if let Some(entry) = in_memory.as_ref().filter(|e| state(e, now) == State::Fresh) {
            return Lookup::Hit(hit("memory", entry.clone(), now));
        }
        // Not fresh in process: another instance may have stored a newer one.
        let shared = match self
            .lookup_shared(&primary, known_vary.is_none(), variant, request)
            .await
            .filter(|(_, e)| state(e, now) != State::Gone && for_this_request(e))
        {
            Some((key, entry))
                if self
                    .purger
                    .is_current_shared(entry.stamp, &entry.path, &entry.depends_on)
                    .await =>
            {
                Some((key, entry))
            }
            _ => None,
        };
        let (tier, entry) = match (in_memory, shared) {
            (Some(local), Some((key, remote))) => {
                if remote.stored_at_ms > local.stored_at_ms {
                    self.memory.insert(key, remote.clone());
                    ("redis", remote)
                } else {
                    ("memory", local)
                }
            }
            (Some(local), None) => ("memory", local),
            (None, Some((key, remote))) => {
                self.memory.insert(key, remote.clone());
                ("redis", remote)
            }
            (None, None) => {
                return Lookup::Miss {
                    primary,
                    stale: None,
                }
            }
        };
        match state(&entry, now) {
            State::Fresh => Lookup::Hit(hit(tier, entry, now)),
            State::WhileRevalidate => Lookup::StaleWhileRevalidate {
                hit: hit(tier, entry, now),
                primary,
            },
            State::Stale | State::Gone => Lookup::Miss {
                primary,
                stale: Some(entry),
            },
        }
    }

    /// The cache's whole answer for a request: [`Cache::lookup`], then on a miss the coalescing —
    /// in this process one request per key leads the fetch and the others wait for its entry
    /// (bounded by [`COALESCE_WAIT`]); across instances the leader takes a lease, and when
    /// another instance holds it, waits for that instance's entry in the shared tier. A resource
    /// whose last answer could not be stored is fetched without waiting (hit-for-miss).
    pub async fn decide(&self, policy: &CachePolicy, request: &CacheRequest<'_>) -> Decision {
        let (primary, stale) = match self.lookup(policy, request).await {
            Lookup::Hit(hit) => return Decision::Hit(hit),
            Lookup::Bypass(reason) => return Decision::Bypass(reason),
            Lookup::StaleWhileRevalidate { hit, primary } => {
                let refresh = match self.lead_or_follow(&primary) {
                    Flight::Leader(guard) => Some(guard),
                    Flight::Follower(_) => None,
                };
                return Decision::Stale {
                    hit,
                    primary,
                    refresh,
                };
            }
            Lookup::Miss { primary, stale } => (primary, stale),
        };
        let fetching = *request.method == Method::GET;
        let mut lease = false;
        let flight = match self.join_flight(&primary) {
            None => None,
            Some(Flight::Leader(guard)) if fetching => {
                lease = self.take_lease(&primary).await;
                if !lease {
                    if let Some(mut hit) = self.wait_for_shared(policy, request).await {
                        hit.tier = "coalesced";
                        return Decision::Hit(hit);
                    }
                }
                Some(guard)
            }
            Some(Flight::Leader(_)) => None,
            Some(Flight::Follower(mut done)) => {
                // The leader's sender is dropped the moment its entry is stored or found not
                // storable; then look again.
                let _ = tokio::time::timeout(COALESCE_WAIT, done.changed()).await;
                if let Lookup::Hit(mut hit) = self.lookup(policy, request).await {
                    hit.tier = "coalesced";
                    return Decision::Hit(hit);
                }
                None
            }
        };
        Decision::Miss {
            primary,
            stale,
            flight,
            lease,
        }
    }

    /// The age of an entry now, in seconds: its age when stored plus its time here.
    pub fn age_secs(entry: &Entry) -> u64 {
        age_at(entry, now_ms())
    }

    /// Whether a kept stale entry may still answer when the origin fails.
    pub fn usable_on_error(entry: &Entry) -> bool {
        now_ms()
            < entry
                .fresh_until_ms()
                .saturating_add(entry.stale_if_error_ms)
    }

    /// The shared tier: finds the variant (learning the resource's `Vary` from the tier when this
    /// instance has not seen it) and decodes it; returns it with its in-process key.
    async fn lookup_shared(
        &self,
        primary: &CacheKey,
        vary_unknown: bool,
        mut variant: CacheKey,
        request: &CacheRequest<'_>,
    ) -> Option<(String, Arc<Entry>)> {
        let store = self.shared.as_ref()?;
        if vary_unknown {
            if let Ok(Some(names)) = store
                .get(&format!("{VARY_PREFIX}{}", primary.shared()))
                .await
            {
                let names: Vec<HeaderName> = String::from_utf8_lossy(&names)
                    .split(',')
                    .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                    .collect();
                variant = primary.variant(&names, request.headers);
                self.memory.set_vary(primary.local().to_owned(), names);
            }
        }
        let raw = store
            .get(&format!("{L2_PREFIX}{}", variant.shared()))
            .await
            .ok()??;
        match Entry::decode(raw) {
            Ok(entry) => Some((variant.local().to_owned(), Arc::new(entry))),
            Err(e) => {
                tracing::debug!(error = %e, "cache: ignoring an unreadable shared entry");
                None
            }
        }
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
        start: FillStart,
    ) -> Option<Fill> {
        let FillStart { sent_at, stamp } = start;
        let received_at = SystemTime::now();
        let request_cc = if policy.honor_client_cache_control {
            CacheControl::parse(request.headers)
        } else {
            CacheControl::default()
        };
        let response_cc = CacheControl::parse_response(response, &policy.targeted);
        let exchange = Exchange {
            method: request.method,
            request: request.headers,
            authorized: request.authorized,
            request_cc: &request_cc,
            status,
            response,
            response_cc: &response_cc,
        };
        let lifetime = storable(&exchange, &policy.rule_for(status), received_at).ok()?;
        let age = initial_age(response, sent_at, received_at);
        // `no-cache`: stored, but revalidated before every reuse.
        let fresh_for = if response_cc.no_cache {
            Duration::ZERO
        } else {
            lifetime.saturating_sub(age)
        };
        // Stale serving, unless the origin forbids it (§4.2.4, §5.2.2.2, §5.2.2.8); the
        // origin's own RFC 5861 directives win over the rule's when the origin is honoured.
        let may_serve_stale =
            !(response_cc.no_cache || response_cc.must_revalidate || response_cc.proxy_revalidate);
        let window = |origin: Option<Duration>, rule: Option<Duration>| {
            let window = if policy.rule.honor_origin {
                origin.or(rule)
            } else {
                rule
            };
            match window {
                Some(w) if may_serve_stale => directives::millis(w),
                _ => 0,
            }
        };
        let stale_while_revalidate_ms = window(
            response_cc.stale_while_revalidate,
            policy.stale_while_revalidate,
        );
        let stale_if_error_ms = window(response_cc.stale_if_error, policy.stale_if_error);
        let keep_ms = directives::millis(policy.keep);
        let has_validator = response.contains_key(http::header::ETAG)
            || response.contains_key(http::header::LAST_MODIFIED);
        if fresh_for.is_zero() && !(has_validator && keep_ms > 0) {
            // Could never be used.
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
        headers.remove(purge::SURROGATE_KEY);
        // `no-cache="f"` and `private="f"` (§5.2.2.4, §5.2.2.7): the entry is kept without those
        // fields (a per-user entry is private already and keeps `private` ones).
        for name in &response_cc.no_cache_fields {
            headers.remove(name.as_str());
        }
        if policy.scope == CacheScope::Shared {
            for name in &response_cc.private_fields {
                headers.remove(name.as_str());
            }
        }
        let mut depends_on = vec![purge::path_key(request.path)];
        depends_on.extend(request.tags.iter().map(|t| purge::tag_key(t)));
        depends_on.extend(purge::response_tags(response).map(|t| purge::tag_key(&t)));
        depends_on.dedup();
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
            fresh_for_ms: directives::millis(fresh_for),
            stale_while_revalidate_ms,
            stale_if_error_ms,
            keep_ms,
            stamp,
            path: request.path.to_owned(),
            depends_on,
            max_object: policy.max_object,
            body: BytesMut::new(),
            complete: false,
        })
    }

    /// Stores a completely captured response in process, at once, and returns what remains to
    /// be written to the shared tier (if there is one) with [`Cache::store_shared`]. Called when
    /// the last body chunk arrives from the origin, before it is passed on, so the entry exists
    /// by the time the client has the response.
    pub fn store_local(&self, fill: Fill) -> Option<(Arc<Entry>, Option<SharedWrite>)> {
        if !fill.complete {
            return None;
        }
        let entry = Entry {
            status: fill.status,
            headers: fill.headers,
            body: fill.body.freeze(),
            stored_at_ms: fill.stored_at_ms,
            fresh_for_ms: fill.fresh_for_ms,
            stale_while_revalidate_ms: fill.stale_while_revalidate_ms,
            stale_if_error_ms: fill.stale_if_error_ms,
            keep_ms: fill.keep_ms,
            stamp: fill.stamp,
            path: fill.path,
            depends_on: fill.depends_on,
            vary: fill.vary.clone(),
        };
        let shared = self.shared.as_ref().map(|_| SharedWrite {
            entry_key: format!("{L2_PREFIX}{}", fill.variant.shared()),
            entry: entry.encode_compressed(self.compress_above),
            vary_key: format!("{VARY_PREFIX}{}", fill.primary.shared()),
            vary: fill
                .vary
                .iter()
                .map(HeaderName::as_str)
                .collect::<Vec<_>>()
                .join(","),
            ttl: Duration::from_millis(entry.fresh_for_ms.saturating_add(entry.retained_ms()))
                .min(MAX_SHARED_TTL),
        });
        let entry = Arc::new(entry);
        self.memory
            .set_vary(fill.primary.local().to_owned(), fill.vary);
        self.memory
            .insert(fill.variant.local().to_owned(), entry.clone());
        Some((entry, shared))
    }

    /// A stale entry the origin confirmed with `304 Not Modified`: the stored response updated
    /// with the `304`'s headers (§4.3.4) and stored again with new freshness when it still may
    /// be. Returns the entry to serve and what remains for the shared tier.
    pub fn revalidated(
        &self,
        policy: &CachePolicy,
        primary: &CacheKey,
        request: &CacheRequest<'_>,
        stale: &Entry,
        not_modified: &HeaderMap,
        start: FillStart,
    ) -> (Arc<Entry>, Option<SharedWrite>) {
        let mut headers = stale.headers.clone();
        for name in not_modified.keys() {
            if KEPT_ON_UPDATE.contains(name) || PER_EXCHANGE.contains(&name.as_str()) {
                continue;
            }
            headers.remove(name);
            for value in not_modified.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        if !not_modified.contains_key(AGE) {
            headers.remove(AGE);
        }
        let stored = self
            .plan_fill(policy, primary, request, stale.status, &headers, start)
            .and_then(|mut fill| {
                fill.body = BytesMut::from(stale.body.as_ref());
                fill.complete = true;
                self.store_local(fill)
            });
        match stored {
            Some((entry, shared)) => (entry, shared),
            // No longer storable: it answers this request only.
            None => (
                Arc::new(Entry {
                    headers,
                    fresh_for_ms: 0,
                    stored_at_ms: now_ms(),
                    ..stale.clone()
                }),
                None,
            ),
        }
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

    /// Takes the cross-instance fill lease for `primary` (the leader of this instance's flight
    /// asks). `true` when this instance should fetch: it holds the lease, there is no shared
    /// tier, or the store cannot say. `false`: another instance is fetching it.
    pub async fn take_lease(&self, primary: &CacheKey) -> bool {
        let Some(store) = &self.shared else {
            return true;
        };
        let key = format!("{LEASE_PREFIX}{}", primary.shared());
        store
            .set_if_absent(&key, Bytes::from_static(b"1"), LEASE_TTL)
            .await
            .unwrap_or(true)
    }

    /// Ends this instance's lease on `primary` (after its fill was written, or failed).
    pub async fn release_lease(&self, primary: &CacheKey) {
        if let Some(store) = &self.shared {
            let _ = store
                .delete(&format!("{LEASE_PREFIX}{}", primary.shared()))
                .await;
        }
    }

    /// While another instance holds the lease on `primary`, polls the shared tier for the entry
    /// it is filling; gives up when the lease ends or after [`LEASE_TTL`].
    async fn wait_for_shared(
        &self,
        policy: &CachePolicy,
        request: &CacheRequest<'_>,
    ) -> Option<Hit> {
        let store = self.shared.as_ref()?;
        let primary = Cache::primary_key(policy, request);
        let lease = format!("{LEASE_PREFIX}{}", primary.shared());
        let deadline = tokio::time::Instant::now() + LEASE_TTL;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(LEASE_POLL).await;
            if let Lookup::Hit(found) = self.lookup(policy, request).await {
                return Some(found);
            }
            if !matches!(store.get(&lease).await, Ok(Some(_))) {
                // Released (or expired, or Redis is unreachable): one last look, then fetch.
                return match self.lookup(policy, request).await {
                    Lookup::Hit(found) => Some(found),
                    _ => None,
                };
            }
        }
        None
    }

    /// Joins the flight for a missed key: the first request leads, the others follow — unless
    /// the resource's last answer could not be stored, in which case waiting would only queue
    /// requests behind each other: then `None`, and the request fetches on its own.
    fn join_flight(&self, primary: &CacheKey) -> Option<Flight> {
        if self.uncacheable.contains_key(primary.local()) {
            return None;
        }
        Some(self.lead_or_follow(primary))
    }

    /// Remembers whether a resource's answer could be stored (see [`Cache::join_flight`]).
    pub fn note_storable(&self, primary: &CacheKey, storable: bool) {
        if storable {
            self.uncacheable.invalidate(primary.local());
        } else {
            self.uncacheable.insert(primary.local().to_owned(), ());
        }
    }

    /// The flight for a key, whatever its last answer was: the first request leads (a
    /// background refresh, for example), the others follow.
    fn lead_or_follow(&self, primary: &CacheKey) -> Flight {
        let mut flights = self.flights.lock().expect("flights mutex poisoned");
        if let Some(receiver) = flights.get(primary.local()) {
            return Flight::Follower(receiver.clone());
        }
        let (done, receiver) = tokio::sync::watch::channel(());
        flights.insert(primary.local().to_owned(), receiver);
        Flight::Leader(FlightGuard {
            key: primary.local().to_owned(),
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

    /// Removes the in-process entries `matches` selects (for the admin API; purges themselves
    /// need no removal, see [`crate::purge`]); returns how many went.
    pub fn remove_from_memory(&self, matches: impl Fn(&Entry) -> bool) -> u64 {
        self.memory.remove_matching(matches)
    }

    /// Entries and bytes in the in-process tier.
    pub fn memory_stats(&self) -> (u64, u64) {
        self.memory.stats()
    }
}
