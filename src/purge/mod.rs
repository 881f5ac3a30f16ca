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

pub mod coherence;
pub mod template;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderName};
use http::Method;
use toml::Spanned;

pub use self::coherence::CoherenceSettings;
use self::coherence::{Lease, Renewal};
use self::template::Template;
use crate::config::{PurgeConfigOrPaths, SpanError};
use crate::metrics::metrics;
use crate::store::{Published, PurgeEvent, Store, StoreError};

/// Marks kept exactly in memory; an evicted one is folded into [`Marks::buckets`].
const MARK_CAPACITY: u64 = 1_000_000;
/// Buckets evicted marks fold into (8 bytes each).
const MARK_BUCKETS: usize = 1 << 16;
/// Prefix marks kept; past it the oldest is folded into [`Marks::floor`].
const PREFIX_CAPACITY: usize = 4096;
/// Keys purged while Redis was unreachable that are remembered one by one; past it, everything
/// counts as purged until Redis takes a purge of everything.
const PENDING_CAPACITY: usize = 100_000;
/// Keys per published purge when the pending ones are replayed.
const REPLAY_BATCH: usize = 1000;
/// The mark of a key purged while Redis was unreachable, until the purge is replayed.
const PENDING: u64 = u64::MAX;
/// How often purges made while Redis was unreachable are retried.
const REPLAY_INTERVAL: Duration = Duration::from_millis(500);

/// Whether `method` writes: everything but the safe methods, extension methods included.
pub fn is_write(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// Tags the origin gives a response (space-separated); read, then removed before the client
/// sees the response.
pub const SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
/// Tags the origin gives a response (RFC 9875: a structured list of strings).
pub const CACHE_GROUPS: HeaderName = HeaderName::from_static("cache-groups");
/// Tags a write's response asks to invalidate (RFC 9875).
pub const CACHE_GROUP_INVALIDATION: HeaderName =
    HeaderName::from_static("cache-group-invalidation");

/// The members of RFC 9875 list fields (`"a", "b"`; parameters ignored).
fn group_list<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = String> + 'a {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|member| {
            let member = member.split(';').next().unwrap_or_default().trim();
            let member = member
                .strip_prefix('"')
                .and_then(|m| m.strip_suffix('"'))
                .unwrap_or(member);
            (!member.is_empty()).then(|| member.to_owned())
        })
}

/// The tags an origin's response carries: `Cache-Groups` members and `Surrogate-Key` words.
pub fn response_tags(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    let surrogate = headers
        .get_all(&SURROGATE_KEY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(str::split_whitespace)
        .map(str::to_owned);
    group_list(headers, &CACHE_GROUPS).chain(surrogate)
}

/// The tags a write's response asks to invalidate (`Cache-Group-Invalidation`).
pub fn invalidated_tags(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    group_list(headers, &CACHE_GROUP_INVALIDATION)
}

/// The mark key of a path (every query, variant and user of it).
pub fn path_key(path: &str) -> String {
    format!("path:{path}")
}

/// The mark key of a tag.
pub fn tag_key(tag: &str) -> String {
    format!("tag:{tag}")
}

/// The mark key of a path prefix (`""`: everything).
pub fn prefix_key(prefix: &str) -> String {
    format!("prefix:{prefix}")
}

/// A route's compiled `purge` rule.
#[derive(Debug, Clone, Default)]
pub struct PurgeRule {
    pub paths: Vec<Template>,
    pub tags: Vec<Template>,
    statuses: Option<Vec<u16>>,
    /// A `200` to `PUT`/`PATCH` carries the full new representation: store it as the GET entry.
    pub write_through: bool,
}

impl PurgeRule {
    /// Compiles a rule for a route whose path has `params`.
    pub fn compile(
        config: &Spanned<PurgeConfigOrPaths>,
        params: &[String],
    ) -> Result<PurgeRule, Vec<SpanError>> {
        let rule = &config.get_ref().0;
        let (paths, tags, statuses) = (&rule.paths, &rule.tags, rule.statuses.as_ref());
        let mut errors = Vec::new();
        let mut compile = |list: &[Spanned<String>]| -> Vec<Template> {
            list.iter()
                .filter_map(|t| {
                    Template::compile(t, params)
                        .map_err(|e| errors.push(e))
                        .ok()
                })
                .collect()
        };
        let paths = compile(paths);
        let tags = compile(tags);
        if let Some(statuses) = statuses {
            if statuses.iter().any(|s| !(100..=599).contains(s)) {
                errors.push(SpanError::new(
                    config.span(),
                    "purge statuses must be HTTP statuses (100-599)",
                ));
            }
        }
        if errors.is_empty() {
            Ok(PurgeRule {
                paths,
                tags,
                statuses: statuses.cloned(),
                write_through: rule.write_through,
            })
        } else {
            Err(errors)
        }
    }

    /// The keys a triggering write to `path` purges by the rule alone: the path itself, and the
    /// rule's paths and tags filled in from the path's parameters (the route step's
    /// [`crate::routing::Matched::params`]). The origin's answer can add more (`Cache-Group-Invalidation`,
    /// `Location`).
    pub fn keys_for(&self, path: &str, params: &[(String, String)]) -> Vec<String> {
        let mut keys = vec![path_key(path)];
        keys.extend(self.paths.iter().map(|t| path_key(&t.expand(params))));
        keys.extend(self.tags.iter().map(|t| tag_key(&t.expand(params))));
        keys
    }

    /// Whether [`PurgeRule::keys_for`] reads the path's parameters.
    pub fn expands_params(&self) -> bool {
        !self.paths.is_empty() || !self.tags.is_empty()
    }

    /// When a write purges, in words (for `cachegate explain`).
    pub fn trigger_description(&self) -> String {
        match &self.statuses {
            Some(list) => {
                let list: Vec<String> = list.iter().map(u16::to_string).collect();
                format!("when the origin answers {}", list.join(", "))
            }
            None => "when the origin answers 2xx or 3xx".to_owned(),
        }
    }

    /// Whether a write answered with `status` purges: the rule's statuses, or any 2xx and 3xx.
    pub fn triggers(&self, status: u16) -> bool {
        match &self.statuses {
            Some(list) => list.contains(&status),
            None => (200..400).contains(&status),
        }
    }
}

/// What an instance knows of the purges so far.
///
/// Bounded however many keys are purged, and never by forgetting a purge: an exact mark that
/// has to leave memory is folded into one of a fixed set of buckets (by the key's hash), which
/// keeps the highest mark folded into it. An entry whose key shares a bucket with a purged key
/// may then count as purged too — a few extra misses, never a stale hit, and never "everything
/// older is stale".
struct Marks {
    /// The highest purge sequence number known.
    seq: AtomicU64,
    /// Entries stamped below this are stale whatever their keys say: raised when a lost
    /// subscription may have missed purges, and by the oldest prefix mark when there are too
    /// many to keep.
    floor: AtomicU64,
    /// Key → sequence number of its last purge.
    by_key: moka::sync::Cache<String, u64>,
    /// Marks evicted from `by_key`, folded by key hash (highest mark per bucket).
    buckets: Arc<[AtomicU64]>,
    hasher: std::hash::RandomState,
    /// Prefix → sequence number of its last purge (few; checked against every entry's path).
    prefixes: RwLock<Vec<(String, u64)>>,
    /// Keys purged while Redis was unreachable: never served until the purge is replayed.
    pending: Mutex<Pending>,
    /// Whether `pending` holds anything: read without the lock on every hit.
    any_pending: std::sync::atomic::AtomicBool,
    /// `false` from a resubscription until the shared state is read again: nothing is current.
    synced: std::sync::atomic::AtomicBool,
    /// The sequence number from which this instance has seen every purge (its first subscription);
    /// entries stamped earlier may predate purges it never heard of.
    complete_from: AtomicU64,
}

/// Keys purged while Redis was unreachable.
#[derive(Default)]
struct Pending {
    keys: std::collections::HashSet<String>,
    /// Too many to remember: everything counts as purged until a purge of everything lands.
    overflowed: bool,
}

fn bucket_of(hasher: &std::hash::RandomState, key: &str) -> usize {
    use std::hash::BuildHasher;
    (hasher.hash_one(key) as usize) % MARK_BUCKETS
}

impl Marks {
    fn new() -> Marks {
        Marks::with_capacity(MARK_CAPACITY)
    }

    fn with_capacity(capacity: u64) -> Marks {
        let buckets: Arc<[AtomicU64]> = (0..MARK_BUCKETS).map(|_| AtomicU64::new(0)).collect();
        let hasher = std::hash::RandomState::new();
        let (folded, fold_hasher) = (buckets.clone(), hasher.clone());
        Marks {
            seq: AtomicU64::new(0),
            by_key: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .eviction_listener(move |key: Arc<String>, mark: u64, cause| {
                    if cause.was_evicted() {
                        folded[bucket_of(&fold_hasher, &key)].fetch_max(mark, Ordering::AcqRel);
                    }
                })
                .build(),
            buckets,
            hasher,
            floor: AtomicU64::new(0),
            prefixes: RwLock::default(),
            pending: Mutex::default(),
            any_pending: std::sync::atomic::AtomicBool::new(false),
            synced: std::sync::atomic::AtomicBool::new(true),
            complete_from: AtomicU64::new(u64::MAX),
        }
    }

    /// Records that `keys` were purged with sequence number `seq` (marks only rise); `PENDING`
    /// marks them purged until a numbered purge of theirs lands.
    fn apply(&self, seq: u64, keys: &[String]) {
        if seq == PENDING {
            let mut pending = self.pending.lock().expect("pending purges poisoned");
            for key in keys {
                if pending.keys.len() >= PENDING_CAPACITY {
                    pending.overflowed = true;
                    break;
                }
                pending.keys.insert(key.clone());
            }
            self.any_pending.store(true, Ordering::Release);
            return;
        }
        for key in keys {
            if let Some(prefix) = key.strip_prefix("prefix:") {
                let mut prefixes = self.prefixes.write().expect("prefix marks poisoned");
                match prefixes.iter_mut().find(|(p, _)| p == prefix) {
                    Some((_, mark)) => *mark = (*mark).max(seq),
                    None => prefixes.push((prefix.to_owned(), seq)),
                }
                if prefixes.len() > PREFIX_CAPACITY {
                    let oldest = (0..prefixes.len())
                        .min_by_key(|&i| prefixes[i].1)
                        .expect("not empty");
                    let (_, mark) = prefixes.swap_remove(oldest);
                    self.floor.fetch_max(mark, Ordering::AcqRel);
                }
            } else if self.by_key.get(key).is_none_or(|current| seq > current) {
                self.by_key.insert(key.clone(), seq);
            }
        }
        {
            let mut pending = self.pending.lock().expect("pending purges poisoned");
            if !pending.keys.is_empty() {
                for key in keys {
                    pending.keys.remove(key);
                }
            }
            if keys.iter().any(|k| k == "prefix:") {
                *pending = Pending::default();
            }
            self.any_pending.store(
                pending.overflowed || !pending.keys.is_empty(),
                Ordering::Release,
            );
        }
        // After the marks: a fill stamped with this number started after they were in place.
        self.seq.fetch_max(seq, Ordering::AcqRel);
    }

    fn mark_of(&self, key: &str) -> u64 {
        let exact = self.by_key.get(key).unwrap_or(0);
        exact.max(self.buckets[bucket_of(&self.hasher, key)].load(Ordering::Acquire))
    }

    fn is_current(&self, stamp: u64, path: &str, keys: &[String]) -> bool {
        if !self.synced.load(Ordering::Acquire) || stamp < self.floor.load(Ordering::Acquire) {
            return false;
        }
        // The hit path's usual case: no purge numbered above the entry's stamp has been applied
        // here, so no mark can exceed it (marks are applied before `seq` rises).
        if stamp >= self.seq.load(Ordering::Acquire) && !self.any_pending.load(Ordering::Acquire) {
            return true;
        }
        if keys.iter().any(|k| self.mark_of(k) > stamp) {
            return false;
        }
        {
            let pending = self.pending.lock().expect("pending purges poisoned");
            if pending.overflowed || keys.iter().any(|k| pending.keys.contains(k)) {
                return false;
            }
        }
        let prefixes = self.prefixes.read().expect("prefix marks poisoned");
        !prefixes
            .iter()
            .any(|(prefix, mark)| *mark > stamp && path.starts_with(prefix.as_str()))
    }

    /// The purges to replay: the pending keys, or a purge of everything after an overflow.
    fn pending(&self) -> Vec<String> {
        let pending = self.pending.lock().expect("pending purges poisoned");
        if pending.overflowed {
            vec![prefix_key("")]
        } else {
            pending.keys.iter().cloned().collect()
        }
    }
}

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

/// Acknowledgements of this instance's purges: who applied each, and who waits for them.
#[derive(Default)]
struct Acks {
    by: HashMap<u64, HashSet<String>>,
    waiting: HashMap<u64, Arc<tokio::sync::Notify>>,
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

    /// Records the purge in Redis: once for a replay, else retrying (a failover, a restart)
    /// until the write may wait no longer.
    async fn publish(
        &self,
        store: &dyn Store,
        keys: &[String],
        replay: bool,
    ) -> Result<Published, StoreError> {
        let settings = *self.lease.settings();
        let hold = if settings.strict() {
            settings.max_write_hold
        } else {
            settings.may_serve_stale_for
        };
        let deadline = tokio::time::Instant::now() + hold;
        let mut delay = Duration::from_millis(20);
        loop {
            let published = store
                .publish_purge(&self.instance, keys, self.stamp())
                .await;
            match published {
                Ok(published) => return Ok(published),
                Err(e) if replay || tokio::time::Instant::now() + delay >= deadline => {
                    return Err(e)
                }
                Err(e) => {
                    tracing::debug!(error = %e, "purge: Redis did not take the purge; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(250));
                }
            }
        }
    }

    /// [`Purger::purge`]; a `replay` that fails again is not counted again.
    async fn spread(&self, keys: Vec<String>, replay: bool) -> PurgeReport {
        let m = metrics();
        if keys.is_empty() {
            return PurgeReport::default();
        }
        let Some(store) = &self.shared else {
            let seq = self.local_seq.fetch_add(1, Ordering::AcqRel) + 1;
            self.marks.apply(seq, &keys);
            m.purges.with_label_values(&["local"]).inc();
            return PurgeReport {
                seq: Some(seq),
                told: 1,
                acknowledged: 1,
                unconfirmed: None,
            };
        };
        match self.publish(store.as_ref(), &keys, replay).await {
            Ok(published) => {
                let returned = tokio::time::Instant::now();
                self.marks.apply(published.seq, &keys);
                let others: HashSet<String> = published
                    .members
                    .into_iter()
                    .filter(|m| *m != self.instance)
                    .collect();
                let acknowledged = self
                    .wait_for_acks(published.seq, &others, self.lease.release_at(returned))
                    .await;
                let outcome = if acknowledged == others.len() {
                    "ok"
                } else {
                    tracing::info!(
                        seq = published.seq,
                        live = others.len() + 1,
                        acknowledged = acknowledged + 1,
                        "purge: not every live instance acknowledged; released the write once their leases ran out"
                    );
                    "unacknowledged"
                };
                m.purges.with_label_values(&[outcome]).inc();
                PurgeReport {
                    seq: Some(published.seq),
                    told: others.len() as u64 + 1,
                    acknowledged: acknowledged as u64 + 1,
                    unconfirmed: None,
                }
            }
            Err(e) => {
                let strict = self.lease.settings().strict();
                if !replay {
                    if strict {
                        tracing::error!(error = %e, "purge: Redis did not take the purge within max_write_hold; other instances may serve what the write replaced until it is replayed");
                    } else {
                        tracing::warn!(error = %e, "purge: Redis unreachable; purged in this instance only, to be replayed (may_serve_stale_for)");
                    }
                    m.purges.with_label_values(&["store_error"]).inc();
                }
                // Remembered (deduplicated, bounded) until the replay lands.
                self.marks.apply(PENDING, &keys);
                PurgeReport {
                    seq: None,
                    told: 1,
                    acknowledged: 1,
                    unconfirmed: (strict && !replay).then_some(Unconfirmed::StoreUnreachable),
                }
            }
        }
    }

    /// Waits until every instance in `others` acknowledged purge `seq`, or `deadline`; returns
    /// how many did.
    async fn wait_for_acks(
        &self,
        seq: u64,
        others: &HashSet<String>,
        deadline: tokio::time::Instant,
    ) -> usize {
        let notify = Arc::new(tokio::sync::Notify::new());
        self.acks
            .lock()
            .expect("acks poisoned")
            .waiting
            .insert(seq, notify.clone());
        let acknowledged = loop {
            let notified = notify.notified();
            let count = {
                let acks = self.acks.lock().expect("acks poisoned");
                acks.by
                    .get(&seq)
                    .map_or(0, |by| by.iter().filter(|i| others.contains(*i)).count())
            };
            if count >= others.len() || tokio::time::Instant::now() >= deadline {
                break count;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        };
        let mut acks = self.acks.lock().expect("acks poisoned");
        acks.waiting.remove(&seq);
        acks.by.remove(&seq);
        acknowledged
    }

    fn acknowledged(&self, seq: u64, by: String) {
        let mut acks = self.acks.lock().expect("acks poisoned");
        // Kept even when nobody waits yet: an acknowledgement can arrive before the writer has
        // the script's answer. Bounded: those of purges long past are dropped.
        acks.by.entry(seq).or_default().insert(by);
        if acks.by.len() > 10_000 {
            acks.by.retain(|s, _| *s + 1_000 > seq);
        }
        if let Some(notify) = acks.waiting.get(&seq) {
            notify.notify_one();
        }
    }

    /// Reads the shared state after (re)subscribing, retrying until it can. On the first
    /// subscription only fills started before this instance knew the sequence (stamp 0) may
    /// predate a purge. Later, purges may have been missed while unsubscribed — when the
    /// sequence moved past the last purge heard (or went back: Redis lost its data) a keyless
    /// purge opens a new epoch (its number is above anything seen) and everything stamped
    /// before it is stale; when it did not, nothing was missed and the in-process tier stays.
    async fn resync(self: &Arc<Self>, first: bool) {
        let Some(store) = &self.shared else { return };
        if !first {
            self.marks.synced.store(false, Ordering::Release);
        }
        let mut delay = Duration::from_millis(50);
        loop {
            match self.read_state(store.as_ref(), first).await {
                Ok(()) => {
                    self.marks.synced.store(true, Ordering::Release);
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "purge: could not read the purge sequence; retrying");
                    tokio::time::sleep(delay).await;
                    // Short: the state is one cheap call, and every instance waits on it.
                    delay = (delay * 2).min(Duration::from_millis(250));
                }
            }
        }
        let purger = self.clone();
        tokio::spawn(async move { purger.replay().await });
    }

    async fn read_state(&self, store: &dyn Store, first: bool) -> Result<(), StoreError> {
        let heard = self.lease.heard();
        let state = store.purge_state(self.stamp()).await?;
        for (prefix, mark) in &state.prefixes {
            self.marks.apply(*mark, &[prefix_key(prefix)]);
        }
        let seq = state.seq;
        let lost_data = self.lease.epoch_changed(&state.epoch);
        let floor = if first {
            seq.min(1)
        } else if seq != heard || lost_data {
            metrics().purges.with_label_values(&["resubscribed"]).inc();
            tracing::info!(
                heard,
                sequence = seq,
                lost_data,
                "purge: purges may have been missed; in-process entries from before now are stale"
            );
            store
                .publish_purge(&self.instance, &[], self.stamp())
                .await?
                .seq
        } else {
            0
        };
        self.marks.floor.fetch_max(floor, Ordering::AcqRel);
        self.marks.seq.fetch_max(seq.max(floor), Ordering::AcqRel);
        self.lease.caught_up(seq.max(floor));
        // Subscribed before the state was read: every purge numbered above `seq` reaches us.
        self.marks.complete_from.fetch_min(seq, Ordering::AcqRel);
        Ok(())
    }

    /// Sends the purges made while Redis was unreachable, in batches (they stay pending while
    /// Redis still fails).
    async fn replay(&self) {
        let pending = self.marks.pending();
        for batch in pending.chunks(REPLAY_BATCH) {
            let report = self.spread(batch.to_vec(), true).await;
            match report.seq {
                Some(seq) => {
                    tracing::info!(
                        seq,
                        keys = batch.len(),
                        "purge: replayed purges made while Redis was unreachable"
                    )
                }
                None => return,
            }
        }
    }
}

/// Retries pending purges every [`REPLAY_INTERVAL`]: Redis may come back without the
/// subscription ever dropping (a stalled server, a partition that heals quickly).
async fn replay_pending(purger: std::sync::Weak<Purger>) {
    loop {
        tokio::time::sleep(REPLAY_INTERVAL).await;
        let Some(purger) = purger.upgrade() else {
            return;
        };
        purger.replay().await;
    }
}

/// A renewal's outcome: when it was sent (the lease's clock), the last purge heard then, and
/// what the store said.
type Renewed = (u64, u64, Result<(u64, String), StoreError>);

/// Renews this instance's membership and lease several times per lease, for as long as the
/// purger lives; the listener judges each answer (in order with the purges it hears).
async fn renew(
    purger: std::sync::Weak<Purger>,
    renewed: tokio::sync::mpsc::UnboundedSender<Renewed>,
) {
    loop {
        let Some(strong) = purger.upgrade() else {
            return;
        };
        let settings = *strong.lease.settings();
        if let Some(store) = strong.shared.clone() {
            let sent = strong.lease.now_ms();
            let heard = strong.lease.heard();
            let instance = strong.instance.clone();
            drop(strong);
            let result = store.renew_membership(&instance, settings.lease).await;
            if renewed.send((sent, heard, result)).is_err() {
                return;
            }
        } else {
            return;
        }
        tokio::time::sleep(settings.renew_every()).await;
    }
}

/// Applies the purge events of the shared store, and judges the lease renewals, for as long as
/// the purger lives.
async fn listen(
    purger: std::sync::Weak<Purger>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<PurgeEvent>,
    mut renewals: tokio::sync::mpsc::UnboundedReceiver<Renewed>,
) {
    let mut first = true;
    loop {
        let (event, renewal) = tokio::select! {
            Some(event) = events.recv() => (Some(event), None),
            Some(renewal) = renewals.recv() => (None, Some(renewal)),
            else => return,
        };
        let Some(purger) = purger.upgrade() else {
            return;
        };
        match event {
            Some(PurgeEvent::Subscribed) => {
                purger.resync(first).await;
                first = false;
            }
            Some(PurgeEvent::Unsubscribed) => {
                // Until the state is read again, entries are not served on what Redis says
                // either: it may have lost its data (unless stale answers are allowed).
                purger.lease.lose();
                if purger.lease.settings().strict() {
                    purger.marks.synced.store(false, Ordering::Release);
                }
            }
            Some(PurgeEvent::Purged {
                seq,
                instance,
                keys,
            }) => {
                purger.marks.apply(seq, &keys);
                if !purger.lease.hear(seq) {
                    tracing::warn!(
                        seq,
                        heard = purger.lease.heard(),
                        "purge: a purge was missed; resubscribing"
                    );
                    purger.lease.lose();
                    if let Some(store) = &purger.shared {
                        store.resubscribe();
                    }
                }
                if let Some(store) = &purger.shared {
                    if let Err(e) = store
                        .acknowledge_purge(&instance, seq, &purger.instance)
                        .await
                    {
                        tracing::debug!(error = %e, "purge: could not acknowledge");
                    }
                }
            }
            Some(PurgeEvent::Acknowledged { seq, instance, by }) if instance == purger.instance => {
                purger.acknowledged(seq, by);
            }
            Some(PurgeEvent::Acknowledged { .. }) | None => {}
        }
        if let Some((_, _, result)) = &renewal {
            purger.lease.set_reachable(result.is_ok());
        }
        if let Some((sent, heard, Ok((store_seq, epoch)))) = renewal {
            match purger.lease.renewed(sent, heard, store_seq, &epoch) {
                Renewal::Extended | Renewal::Waiting => {}
                Renewal::Missed => {
                    tracing::warn!(
                        sequence = store_seq,
                        heard = purger.lease.heard(),
                        "purge: a purge recorded in Redis never arrived; resubscribing"
                    );
                    purger.lease.lose();
                    if let Some(store) = &purger.shared {
                        store.resubscribe();
                    }
                }
                Renewal::StoreLostData => {
                    tracing::warn!(
                        sequence = store_seq,
                        heard = purger.lease.heard(),
                        "purge: Redis lost its purge state (restarted empty, or failed over to a replica behind it); starting a new epoch"
                    );
                    purger.lease.lose();
                    purger.resync(false).await;
                }
            }
        }
        purger.lease.observe();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_invalidate_entries_stamped_before_them() {
        let marks = Marks::new();
        let keys = vec![path_key("/products/1"), tag_key("products")];
        assert!(marks.is_current(0, "/products/1", &keys));
        marks.apply(3, &[tag_key("products")]);
        assert!(!marks.is_current(2, "/products/1", &keys), "filled before");
        assert!(marks.is_current(3, "/products/1", &keys), "filled after");
        assert!(marks.is_current(0, "/other", &[path_key("/other")]));
        marks.apply(5, &[prefix_key("/products/")]);
        assert!(!marks.is_current(4, "/products/1", &keys));
        assert!(marks.is_current(4, "/orders/1", &[]));
        marks.apply(PENDING, &[path_key("/orders/1")]);
        assert!(!marks.is_current(u64::MAX - 1, "/orders/1", &[path_key("/orders/1")]));
        assert_eq!(
            marks.seq.load(Ordering::Relaxed),
            5,
            "pending marks move no sequence"
        );
    }

    #[test]
    fn evicted_marks_still_purge_and_make_only_their_bucket_stale() {
        let marks = Marks::with_capacity(100);
        let victim = path_key("/products/1");
        marks.apply(1, std::slice::from_ref(&victim));
        for i in 0..5_000u64 {
            marks.apply(2 + i, &[path_key(&format!("/flood/{i}"))]);
        }
        marks.by_key.run_pending_tasks();
        assert!(
            marks.by_key.entry_count() <= 100,
            "the exact marks are bounded"
        );
        assert!(
            !marks.is_current(0, "/products/1", std::slice::from_ref(&victim)),
            "an evicted mark still purges"
        );
        // Entries stamped before the flood whose keys were never purged mostly stay current:
        // only a key sharing a bucket with a purged one can go stale.
        let untouched = (0..1000)
            .filter(|i| {
                let key = path_key(&format!("/other/{i}"));
                marks.is_current(1, "/other", &[key])
            })
            .count();
        assert!(
            untouched > 900,
            "{untouched} of 1000 untouched entries still current"
        );
        assert_eq!(
            marks.floor.load(Ordering::Relaxed),
            0,
            "no floor was raised"
        );
    }

    #[test]
    fn pending_purges_are_deduplicated_bounded_and_cleared_by_their_replay() {
        let marks = Marks::new();
        let key = path_key("/a");
        marks.apply(PENDING, &[key.clone(), key.clone()]);
        assert_eq!(marks.pending(), vec![key.clone()]);
        assert!(!marks.is_current(7, "/a", std::slice::from_ref(&key)));
        marks.apply(3, std::slice::from_ref(&key));
        assert!(marks.pending().is_empty());
        assert!(marks.is_current(3, "/a", std::slice::from_ref(&key)));

        let flood: Vec<String> = (0..PENDING_CAPACITY + 10)
            .map(|i| path_key(&format!("/p/{i}")))
            .collect();
        marks.apply(PENDING, &flood);
        assert_eq!(
            marks.pending(),
            vec![prefix_key("")],
            "overflow: purge everything"
        );
        assert!(
            !marks.is_current(10, "/b", &[path_key("/b")]),
            "nothing served meanwhile"
        );
        marks.apply(11, &[prefix_key("")]);
        assert!(marks.pending().is_empty());
        assert!(marks.is_current(11, "/b", &[path_key("/b")]));
    }

    #[test]
    fn tags_come_from_cache_groups_and_surrogate_key() {
        let mut headers = HeaderMap::new();
        headers.append(
            CACHE_GROUPS,
            "\"products\", \"product:7\";x=1".parse().unwrap(),
        );
        headers.append(SURROGATE_KEY, "listing  shop:2".parse().unwrap());
        let tags: Vec<String> = response_tags(&headers).collect();
        assert_eq!(tags, ["products", "product:7", "listing", "shop:2"]);
        headers.append(CACHE_GROUP_INVALIDATION, "\"products\"".parse().unwrap());
        assert_eq!(invalidated_tags(&headers).collect::<Vec<_>>(), ["products"]);
    }

    #[test]
    fn writes_are_every_method_but_the_safe_ones() {
        for safe in ["GET", "HEAD", "OPTIONS", "TRACE"] {
            assert!(!is_write(&Method::from_bytes(safe.as_bytes()).unwrap()));
        }
        for write in ["POST", "PUT", "PATCH", "DELETE", "PROPPATCH", "PURGE"] {
            assert!(is_write(&Method::from_bytes(write.as_bytes()).unwrap()));
        }
    }
}
