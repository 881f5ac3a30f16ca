//! Purge on write: a write (any method but GET, HEAD, OPTIONS and TRACE) that succeeds
//! invalidates the cached reads it changed, in every tier and on every instance, before its
//! response reaches the client.
//!
//! Invalidation is by *purge marks*, not by deleting entries. Every purge gets the next number
//! of one shared sequence (`INCR` in Redis; a counter without it) and marks each key it
//! invalidates — `path:/products/7`, `tag:products`, `prefix:/products/` — with that number.
//! Every entry records the sequence number known when its fill *started* (its stamp) and the keys
//! it depends on (its path and tags). An entry is served only while no key it depends on carries
//! a mark above its stamp. So:
//!
//! - a fill that began before a purge can never be served after it, whenever it is stored (its
//!   stamp is below the mark) — the race of cache-aside invalidation cannot happen;
//! - all variants, query strings and users of a path go at once, without listing them;
//! - L1 hits need no Redis I/O: each instance keeps the marks it knows in memory. A purge is
//!   published (Redis pub/sub) and the writer waits until every subscribed instance has applied
//!   it and acknowledged, within a bound, before releasing the write's response;
//! - an instance whose subscription dropped may have missed purges: when it resubscribes, every
//!   entry stamped before the current sequence is treated as stale (its L1 is cold again);
//! - entries read from Redis are checked against the marks stored in Redis, so an instance that
//!   just started needs no history;
//! - with Redis unreachable, a write still purges locally: the keys are marked as purged "until
//!   further notice" (never served) and the purge is replayed through Redis when it returns, so
//!   entries stored in Redis before the outage cannot come back.
//!
//! This file is the facade, [`Purger`]: purge, is this entry current, may a write go. The rest,
//! each depending only on those after it:
//! - `listener`: the subscription's events and lease renewals, resynchronisation;
//! - `spread`: recording a purge in Redis, the acknowledgements a write waits for, replays;
//! - [`coherence`]: the lease — whether this instance has heard every purge;
//! - `marks`: the marks per key, bounded, and the purges waiting for Redis;
//! - `rule` and [`template`]: which methods write, purge keys, a route's compiled rule;
//! - `headers`: the origin's tag headers.

pub mod coherence;
mod headers;
mod listener;
mod marks;
mod rule;
mod spread;
pub mod template;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use self::coherence::CoherenceSettings;
use self::coherence::Lease;
pub use self::headers::{
    invalidated_tags, response_tags, CACHE_GROUPS, CACHE_GROUP_INVALIDATION, SURROGATE_KEY,
};
use self::listener::{listen, renew};
use self::marks::Marks;
pub use self::rule::{is_write, path_key, prefix_key, tag_key, PurgeRule};
use self::spread::{replay_pending, Acks};
use crate::metrics::metrics;
use crate::store::Store;

/// This instance does not hear the other instances' purges yet (see [`Purger::readiness`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotSubscribed;

impl std::fmt::Display for NotSubscribed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not yet subscribed to the other instances' purges")
    }
}

/// The outcome of one purge, for the admin API and the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PurgeReport {
    /// The purge's sequence number; `None` when Redis could not be reached (local only).
    pub seq: Option<u64>,
    /// Live instances (this one included), and how many acknowledged within the wait.
    pub told: u64,
    pub acknowledged: u64,
    /// Set when, with strict coherence, other instances may not have heard of the purge.
    pub unconfirmed: Option<Unconfirmed>,
}

impl PurgeReport {
    /// The answer to an operator's purge (`POST /purge`, `PURGE`): what went, the purge's
    /// number, how many instances heard and confirmed it, and how many in-process entries this
    /// instance dropped.
    pub fn answer(
        &self,
        purged: serde_json::Value,
        memory_entries_removed: u64,
    ) -> serde_json::Value {
        serde_json::json!({
            "purged": purged,
            "sequence": self.seq,
            "instances_told": self.told,
            "instances_acknowledged": self.acknowledged,
            "memory_entries_removed": memory_entries_removed,
        })
    }
}

/// How many of this instance's purges [`Purger::recent`] keeps (for the status page).
const RECENT_PURGES: usize = 20;

/// One purge this instance made.
#[derive(Debug, Clone)]
pub struct RecentPurge {
    pub at: std::time::SystemTime,
    /// Its purge keys (`path:/products/7`, `tag:products`, `prefix:/`).
    pub keys: Vec<String>,
    pub report: PurgeReport,
}

/// Whether an entry may be served, by what this instance knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Currency {
    /// No purge it depends on came after it.
    Current,
    /// A purge it depends on came after it.
    Purged,
    /// This instance may have missed purges (its lease ran out): ask the shared store.
    Unverified,
}

/// Why a write's purge could not be confirmed (strict coherence only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unconfirmed {
    /// The purge could not be recorded in Redis within `max_write_hold`: other instances may
    /// still serve what the write replaced.
    StoreUnreachable,
}

/// Applies and spreads purges, and says whether an entry is still current.
pub struct Purger {
    marks: Marks,
    /// The shared store (Redis), when there is one.
    shared: Option<Arc<dyn Store>>,
    /// Identifies this instance's purges in acknowledgements, and its membership.
    instance: String,
    acks: Mutex<Acks>,
    /// Whether this instance has heard every purge (see [`coherence`]).
    lease: Lease,
    /// A local sequence, used without a shared store.
    local_seq: AtomicU64,
    /// The last purges made here, for the status page.
    recent: Mutex<std::collections::VecDeque<RecentPurge>>,
}

impl std::fmt::Debug for Purger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Purger")
            .field("instance", &self.instance)
            .finish()
    }
}

impl Purger {
    /// A purger spreading purges through `store` when it is shared (Redis); it subscribes to the
    /// other instances' purges and keeps its lease on the current tokio runtime.
    pub fn new(store: Option<Arc<dyn Store>>, settings: CoherenceSettings) -> Arc<Purger> {
        let shared = store.filter(|s| s.is_shared());
        let purger = Arc::new(Purger {
            marks: Marks::new(),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            acks: Mutex::default(),
            lease: Lease::new(settings),
            local_seq: AtomicU64::new(0),
            shared,
            recent: Mutex::default(),
        });
        let events = purger
            .shared
            .as_ref()
            .and_then(|s| s.purge_events(&purger.instance));
        if let Some(events) = events {
            let (renewals, renewed) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(listen(Arc::downgrade(&purger), events, renewed));
            tokio::spawn(renew(Arc::downgrade(&purger), renewals));
            tokio::spawn(replay_pending(Arc::downgrade(&purger)));
        }
        purger
    }

    /// With a shared store, whether this instance hears every purge (`None` without one): not
    /// until its subscription is up and the shared state was read.
    pub fn readiness(&self) -> Option<Result<(), NotSubscribed>> {
        self.shared.as_ref()?;
        let subscribed = self.marks.complete_from.load(Ordering::Acquire) != u64::MAX;
        Some(if subscribed && self.marks.synced.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(NotSubscribed)
        })
    }

    /// With a shared store, whether this instance holds its coherence lease (`None` without
    /// one): while it does not, in-process entries are checked against Redis before they are
    /// served, and writes wait.
    pub fn coherent(&self) -> Option<bool> {
        self.shared.as_ref()?;
        Some(self.lease.is_held())
    }

    /// Leaves the live members (a stopping instance): writes no longer wait for it.
    pub async fn leave(&self) {
        if let Some(store) = &self.shared {
            if let Err(e) = store.leave_membership(&self.instance).await {
                tracing::debug!(error = %e, "purge: could not leave the live members");
            }
        }
    }

    /// The stamp of a fill starting now.
    pub fn stamp(&self) -> u64 {
        self.marks.seq.load(Ordering::Acquire)
    }

    /// Whether an entry stamped `stamp`, for `path`, depending on `keys`, may be served by what
    /// this instance knows (no I/O).
    pub fn currency(&self, stamp: u64, path: &str, keys: &[String]) -> Currency {
        let current = self.marks.is_current(stamp, path, keys);
        match (current, self.shared.is_some() && !self.lease.is_held()) {
            (false, _) => Currency::Purged,
            (true, false) => Currency::Current,
            (true, true) => Currency::Unverified,
        }
    }

    /// Whether an entry is current by the marks recorded in the shared store (for this
    /// instance when it may have missed purges): `false` when the store cannot say.
    pub async fn verify(&self, stamp: u64, path: &str, keys: &[String]) -> bool {
        let Some(store) = &self.shared else {
            return self.marks.is_current(stamp, path, keys);
        };
        if !self.lease.reachable() {
            // The last renewal could not reach the purge keys: neither would this (a failover
            // in progress); miss at once rather than wait out the store's budget per read.
            return false;
        }
        match store.purge_marks(keys).await {
            Ok(recorded) => {
                for (key, mark) in keys.iter().zip(recorded.keys) {
                    if let Some(mark) = mark {
                        self.marks.apply(mark, std::slice::from_ref(key));
                    }
                }
                for (prefix, mark) in recorded.prefixes {
                    self.marks.apply(mark, &[prefix_key(&prefix)]);
                }
                self.marks.is_current(stamp, path, keys)
            }
            Err(_) => false,
        }
    }

    /// Like [`Purger::currency`] for an entry read from Redis, settled: an entry stamped before
    /// this instance subscribed may predate purges it never heard of, and without the lease any
    /// entry may; for those the marks Redis holds are read first (if Redis cannot say, the entry
    /// is not served).
    pub async fn is_current_shared(&self, stamp: u64, path: &str, keys: &[String]) -> bool {
        match self.currency(stamp, path, keys) {
            Currency::Purged => false,
            Currency::Current if stamp >= self.marks.complete_from.load(Ordering::Acquire) => true,
            Currency::Current | Currency::Unverified => self.verify(stamp, path, keys).await,
        }
    }

    /// Waits until a write may be sent to the origin: with strict coherence on a shared store,
    /// until this instance holds its lease (it can reach the purge sequence, so the write's
    /// purge can be recorded), at most `max_write_hold`. `false` when it still cannot.
    pub async fn ready_for_write(&self) -> bool {
        let settings = *self.lease.settings();
        if self.shared.is_none() || !settings.strict() || self.lease.is_held() {
            return true;
        }
        let deadline = tokio::time::Instant::now() + settings.max_write_hold;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if self.lease.is_held() {
                return true;
            }
        }
        false
    }

    /// Purges `keys` everywhere: marks them here, records them in Redis, tells every instance,
    /// and holds until every live instance has applied them or must have lost its lease. With
    /// Redis unreachable it keeps trying for `max_write_hold` (or `may_serve_stale_for`), then
    /// purges locally and replays through Redis later.
    pub async fn purge(&self, keys: Vec<String>) -> PurgeReport {
        let at = std::time::SystemTime::now();
        let started = Instant::now();
        let report = self.spread(keys.clone(), false).await;
        if (self.shared.is_some() && report.seq.is_some()) || report.unconfirmed.is_some() {
            metrics()
                .write_hold
                .observe(started.elapsed().as_secs_f64());
        }
        let mut recent = self.recent.lock().expect("recent purges poisoned");
        if recent.len() == RECENT_PURGES {
            recent.pop_front();
        }
        recent.push_back(RecentPurge { at, keys, report });
        report
    }

    /// The last purges this instance made (writes and operators'), oldest first.
    pub fn recent(&self) -> Vec<RecentPurge> {
        let recent = self.recent.lock().expect("recent purges poisoned");
        recent.iter().cloned().collect()
    }
}
