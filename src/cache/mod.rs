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
//! - `admit`: which requests the cache takes, and their primary key.
//! - `lookup`: finding the entry that answers ([`Cache::lookup`]), then coalescing
//!   ([`Cache::decide`]).
//!
//! This file is the facade: the [`Cache`] and the request as it sees it; [`Cache::begin`]
//! starts a request's [`txn::Transaction`].
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

mod admit;
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
mod lookup;
mod shared;
pub use shared::entry_key as shared_entry_key;

pub use coalesce::{FlightGuard, COALESCE_WAIT};
use coalesce::{Flights, UNCACHEABLE_FOR};
pub use fill::{Fill, FillStart};
use lookup::age_at;
pub use lookup::{Decision, Lookup};
pub use shared::SharedWrite;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{HeaderMap, COOKIE};
use http::Method;

use self::entry::Entry;
use self::memory::MemoryTier;
use crate::purge::Purger;
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

fn millis_since_epoch(t: SystemTime) -> u64 {
    directives::millis(t.duration_since(UNIX_EPOCH).unwrap_or_default())
}

fn now_ms() -> u64 {
    millis_since_epoch(SystemTime::now())
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
