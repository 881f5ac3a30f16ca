//! Response caching for GET and HEAD, RFC 9111 for a shared cache (and per-user entries where a
//! route asks for them).
//!
//! - [`directives`]: `Cache-Control` parsing.
//! - [`freshness`]: whether a response may be stored, its freshness lifetime and initial age.
//! - [`key`]: cache keys (query normalisation, variants, per-user separation).
//! - [`entry`]: the stored response and its versioned binary codec.
//! - [`policy`]: a route's compiled cache rule.
//! - [`memory`]: the in-process tier (L1).
//! - [`range`]: byte ranges answered from a stored response.
//! - [`txn`]: one request's transaction, from lookup to stored entry — what the pipeline drives.
//! - [`serve`]: a stored entry as the response (conditions, ranges, labels).
//! - [`refresh`]: stale-while-revalidate's background refresh, through an [`refresh::Origin`].
//! - `shared`: the Redis tier (L2) and the fill leases between instances.
//! - `coalesce`: one origin request per missed resource in process (flights, hit-for-miss).
//! - `fill`: whether a response is stored, capturing it, storing it, `304` updates.
//!
//! This file is the facade: [`Cache::decide`] (lookup, then coalescing and leases) and the
//! entry states; [`Cache::begin`] starts a request's [`txn::Transaction`].
//!
//! With Redis as the store, entries are also written to Redis (L2) in the [`entry`] encoding and
//! shared by every gateway instance; an L2 hit fills L1. A corrupt or foreign L2 entry is a miss,
//! and a slow or unreachable Redis only means L2 is skipped (the store's budget and circuit
//! breaker bound the wait).
//!
//! The pipeline calls [`Cache::begin`] after authentication and rate limiting (so a refused
//! request never touches the cache), sends the [`serve::Served`] entry of a hit, and on a miss
//! hands the transaction the origin's response head and body chunks while it streams to the
//! client; the transaction's [`Fill`] captures it (up to `max_object`) for
//! [`Cache::store_local`] and [`Cache::store_shared`].
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
pub mod refresh;
pub mod serve;
pub mod txn;

mod coalesce;
mod fill;
mod shared;
pub use shared::entry_key as shared_entry_key;

use coalesce::{Flight, Flights, UNCACHEABLE_FOR};
pub use coalesce::{FlightGuard, COALESCE_WAIT};
pub use fill::{Fill, FillStart};
pub use shared::SharedWrite;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderName, AGE, COOKIE};
use http::Method;

use self::directives::CacheControl;
use self::entry::Entry;
use self::key::{CacheKey, KeyParts};
use self::memory::MemoryTier;
use self::policy::CachePolicy;
use crate::config::CacheScope;
use crate::header_rules::OVERRIDE_HEADERS;
use crate::purge::{Currency, Purger};
use crate::store::Store;

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

impl CacheRequest<'_> {
    /// No `Authorization`, no verified token, no `Cookie`: a caller the origin cannot tell
    /// from any other such caller by credentials.
    pub fn carries_no_credentials(&self) -> bool {
        !self.authorized && !self.headers.contains_key(COOKIE)
    }
}

/// Why the cache neither answers nor stores a request ([`Cache::admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// Not GET or HEAD.
    Method,
    /// A per-user rule and no user (and not an anonymous entry the rule shares).
    Anonymous,
    /// A GET or HEAD with a body, which the origin may read.
    Body,
    /// An override header the origin may honour and the rule does not key on.
    OverrideHeader,
    /// The client's `Cache-Control: no-cache` / `no-store`, on a rule that honours it.
    ClientNoCache,
}

impl Bypass {
    /// The reason's name in `Cache-Status`, logs and `cachegate explain`.
    pub fn as_str(self) -> &'static str {
        match self {
            Bypass::Method => "method",
            Bypass::Anonymous => "anonymous",
            Bypass::Body => "body",
            Bypass::OverrideHeader => "override-header",
            Bypass::ClientNoCache => "client-no-cache",
        }
    }
}

impl std::fmt::Display for Bypass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Limits on the entries that may answer a request, beyond its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// It carries credentials: only entries the origin marked `public`, `s-maxage` or
    /// `must-revalidate` (RFC 9111 §3.5), and only such answers are stored.
    pub authorized: bool,
    /// It carries a cookie: only entries the origin marked `public` or `s-maxage`.
    pub cookie: bool,
}

/// Where an answer came from: the `tier` label of `cachegate_cache_results_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// The in-process tier.
    Memory,
    /// The shared tier.
    Redis,
    /// Filled by another request while this one waited for it.
    Coalesced,
    /// The origin (a revalidation it confirmed, a refresh).
    Origin,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Redis => "redis",
            Tier::Coalesced => "coalesced",
            Tier::Origin => "origin",
        }
    }
}

/// A stored response that answers a request.
pub struct Hit {
    /// Where it was found.
    pub tier: Tier,
    pub entry: Arc<Entry>,
    pub age_secs: u64,
    /// Seconds of freshness left; negative when stale (RFC 9211 `ttl`).
    pub ttl_secs: i64,
}

pub enum Lookup {
    Hit(Hit),
    /// Past freshness but inside stale-while-revalidate: serve it now, and refresh `primary` in
    /// the background (see `lead_or_follow`, so only once).
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
    Bypass(Bypass),
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
    Bypass(Bypass),
}

fn millis_since_epoch(t: SystemTime) -> u64 {
    directives::millis(t.duration_since(UNIX_EPOCH).unwrap_or_default())
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

fn hit(tier: Tier, entry: Arc<Entry>, now: u64) -> Hit {
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
            shared: store.filter(|s| s.is_shared()),
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

    /// Whether an in-process entry may be served: by what this instance knows of the purges
    /// when it holds its coherence lease, else by the marks in Redis (see
    /// [`crate::purge::coherence`]).
    async fn is_current(&self, entry: &Entry) -> bool {
        match self
            .purger
            .currency(entry.stamp, &entry.path, &entry.depends_on)
        {
            Currency::Current => true,
            Currency::Purged => false,
            Currency::Unverified => {
                self.purger
                    .verify(entry.stamp, &entry.path, &entry.depends_on)
                    .await
            }
        }
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

    /// Whether the cache applies to a request under `policy`: its primary key, or why not (the
    /// `Bypass` reason). Decided from the request alone, before any tier is read; `cachegate
    /// explain` reports exactly this.
    pub fn admit(policy: &CachePolicy, request: &CacheRequest<'_>) -> Result<CacheKey, Bypass> {
        if *request.method != Method::GET && *request.method != Method::HEAD {
            return Err(Bypass::Method);
        }
        if policy.scope == CacheScope::User
            && request.user.is_none()
            && !(policy.anonymous_shared && request.carries_no_credentials())
        {
            return Err(Bypass::Anonymous);
        }
        if request.has_body {
            return Err(Bypass::Body);
        }
        // An override header the origin is allowed to see (`[server] forward_override_headers`)
        // changes its answer: unless the rule keys on it, the cache stays out of the way.
        // One pass over the request's few names (a lookup per override name would parse and
        // hash six names on every hit).
        let unkeyed_override = request
            .headers
            .keys()
            .any(|name| OVERRIDE_HEADERS.contains(&name.as_str()) && !policy.vary.contains(name));
        if unkeyed_override {
            return Err(Bypass::OverrideHeader);
        }
        if policy.honor_client_cache_control {
            let cc = CacheControl::parse(request.headers);
            if cc.no_cache || cc.no_store {
                return Err(Bypass::ClientNoCache);
            }
        }
        Ok(Cache::primary_key(policy, request))
    }

    /// Which shared entries an admitted request may be answered with (`cachegate explain`
    /// reports the same).
    pub fn bounds(policy: &CachePolicy, request: &CacheRequest<'_>) -> Bounds {
        Bounds {
            // §3.5: a request with credentials may be answered only by an entry whose origin
            // said any client may have it (`public`, `s-maxage`, `must-revalidate`) — unless
            // the rule makes entries per user or declares the route's authorised content shared.
            authorized: request.authorized
                && !(policy.rule.per_user || policy.rule.allow_authorized),
            // A request with a cookie may be served only what the origin said is for everyone.
            cookie: request.headers.contains_key(COOKIE)
                && policy.scope == CacheScope::Shared
                && !policy.rule.allow_cookies,
        }
    }

    /// Finds a fresh entry for a request (in process, then in the shared tier), or says why the
    /// cache does not apply.
    pub async fn lookup(&self, policy: &CachePolicy, request: &CacheRequest<'_>) -> Lookup {
        let primary = match Cache::admit(policy, request) {
            Ok(primary) => primary,
            Err(reason) => return Lookup::Bypass(reason),
        };
        let Bounds {
            authorized: authorized_bound,
            cookie: cookie_bound,
        } = Cache::bounds(policy, request);
        let now = now_ms();
        let known_vary = self.memory.vary_of(primary.local());
        let vary: &[HeaderName] = known_vary.as_deref().map_or(&policy.vary, |v| v.as_slice());
        let variant = primary.variant(vary, request.headers);
        let for_this_request = |e: &Entry| {
            if !(cookie_bound || authorized_bound) {
                return true;
            }
            let cc = CacheControl::parse_response(&e.headers, &policy.targeted);
            (!cookie_bound || freshness::shared_for_everyone(&cc))
                && (!authorized_bound || freshness::shared_despite_authorization(&cc))
        };
        let in_memory = match self.memory.get(variant.local()) {
            Some(e) if state(&e, now) == State::Gone => {
                self.memory.remove(variant.local());
                None
            }
            Some(e) if for_this_request(&e) && self.is_current(&e).await => Some(e),
            _ => None,
        };
        if let Some(entry) = in_memory.as_ref().filter(|e| state(e, now) == State::Fresh) {
            return Lookup::Hit(hit(Tier::Memory, entry.clone(), now));
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
                    (Tier::Redis, remote)
                } else {
                    (Tier::Memory, local)
                }
            }
            (Some(local), None) => (Tier::Memory, local),
            (None, Some((key, remote))) => {
                self.memory.insert(key, remote.clone());
                (Tier::Redis, remote)
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
            // Waiting for another instance's entry that could not be used or stored would only
            // hold the read until the other's fill lease ends: fetch instead.
            Some(Flight::Leader(guard)) if fetching && !self.may_wait_for_others(&primary) => {
                Some(guard)
            }
            Some(Flight::Leader(guard)) if fetching => {
                lease = self.take_lease(&primary).await;
                if !lease {
                    if let Some(mut hit) = self.wait_for_shared(policy, request).await {
                        hit.tier = Tier::Coalesced;
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
                    hit.tier = Tier::Coalesced;
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

    /// Whether waiting for another instance's fill can pay off: not while this instance has no
    /// coherence lease (it could not serve the other's entry unverified), nor while the shared
    /// tier's node for the entry is failing (the other could not store it).
    fn may_wait_for_others(&self, primary: &CacheKey) -> bool {
        let Some(store) = &self.shared else {
            return true;
        };
        self.purger.coherent() != Some(false) && !store.is_failing(&shared::entry_key(primary))
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
