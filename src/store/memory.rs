//! The in-process store: a [`moka`] cache with per-entry expiry for values, and GCRA state in
//! sharded maps for rate limits. Needs nothing installed.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use moka::sync::Cache;
use moka::Expiry;

use super::gcra::{decide, GcraOutcome, GcraRequest};
use super::{Store, StoreError};

const SHARDS: usize = 64;
/// A shard holding more keys than this drops the fully replenished ones on its next write.
const SWEEP_ABOVE: usize = 4096;
/// Most keys a shard tracks (about 500,000 in all). Past it, with no replenished key to drop,
/// new keys share one bucket per limit and shard until room returns: a flood of distinct keys
/// can make new clients stricter-limited, never looser, and cannot grow memory without bound.
const SHARD_CAPACITY: usize = 8192;

/// Rate-limit state: TAT per key, in microseconds since `epoch`. Sharded so requests for
/// different keys rarely share a lock; a request's shards are locked in index order, so a
/// multi-limit decision is atomic and deadlock-free.
pub struct GcraTable {
    shards: Vec<Mutex<HashMap<String, u64>>>,
    hasher: RandomState,
    epoch: Instant,
    /// Keys per shard (see [`SHARD_CAPACITY`]).
    capacity: usize,
    /// Whether a key not in the table starts with its burst used up (a fallback's table).
    absent_is_exhausted: bool,
}

impl Default for GcraTable {
    fn default() -> Self {
        GcraTable::with_shard_capacity(SHARD_CAPACITY)
    }
}

impl GcraTable {
    fn with_shard_capacity(capacity: usize) -> GcraTable {
        GcraTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            epoch: Instant::now(),
            capacity,
            absent_is_exhausted: false,
        }
    }

    /// A table in which every key starts with its burst used up: a rate limit's fallback while
    /// the shared store fails. The fleet's shared bucket may have been empty when the store
    /// failed, so starting full would let every instance admit a fresh burst on top of it.
    pub fn starting_exhausted() -> GcraTable {
        GcraTable {
            absent_is_exhausted: true,
            ..GcraTable::default()
        }
    }

    /// Like [`GcraTable::check`], but only limits whose key is in the table and not yet
    /// replenished count (the others admit without a trace); `None` when none is. For the first
    /// moments after a fallback: the shared store's bucket has not seen what was admitted
    /// locally, so both must admit.
    pub fn check_live(&self, limits: &[GcraRequest], consume: bool) -> Option<Vec<GcraOutcome>> {
        let now = self.epoch.elapsed().as_micros() as u64;
        let live: Vec<GcraRequest> = limits
            .iter()
            .filter(|l| {
                let shard = self.shards[self.shard_of(&l.key)]
                    .lock()
                    .expect("gcra shard poisoned");
                shard.get(&l.key).is_some_and(|tat| *tat > now)
            })
            .cloned()
            .collect();
        if live.is_empty() {
            return None;
        }
        let decided = self.check(&live, consume);
        let mut decided = live.iter().zip(decided).peekable();
        Some(
            limits
                .iter()
                .map(|limit| match decided.peek() {
                    Some((l, _)) if l.key == limit.key => decided.next().expect("peeked").1,
                    _ => GcraOutcome {
                        allowed: true,
                        remaining: limit.burst,
                        reset_us: 0,
                        retry_after_us: 0,
                    },
                })
                .collect(),
        )
    }

    /// Forgets every key (the next fallback starts from scratch).
    pub fn clear(&self) {
        for shard in &self.shards {
            shard.lock().expect("gcra shard poisoned").clear();
        }
    }
}

impl GcraTable {
    fn shard_of(&self, key: &str) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    /// Decides every limit, admitting all or none, like the Redis script; counts the request
    /// only with `consume`.
    pub fn check(&self, limits: &[GcraRequest], consume: bool) -> Vec<GcraOutcome> {
        let now = self.epoch.elapsed().as_micros() as u64;
        let mut shard_ids: Vec<usize> = limits.iter().map(|l| self.shard_of(&l.key)).collect();
        let order = {
            let mut o = shard_ids.clone();
            o.sort_unstable();
            o.dedup();
            o
        };
        let mut guards: Vec<(usize, MutexGuard<'_, HashMap<String, u64>>)> = order
            .iter()
            .map(|&i| (i, self.shards[i].lock().expect("gcra shard poisoned")))
            .collect();
        let mut decisions = Vec::with_capacity(limits.len());
        let mut keys: Vec<String> = Vec::with_capacity(limits.len());
        for (limit, shard) in limits.iter().zip(&shard_ids) {
            let map = &mut guards
                .iter_mut()
                .find(|(i, _)| i == shard)
                .expect("locked")
                .1;
            let key = if map.contains_key(&limit.key) || map.len() < self.capacity {
                limit.key.clone()
            } else {
                map.retain(|_, tat| *tat > now);
                if map.len() < self.capacity {
                    limit.key.clone()
                } else {
                    format!("\0overflow:{}:{}", limit.interval_us, limit.burst)
                }
            };
            let stored = map.get(&key).copied().or_else(|| {
                self.absent_is_exhausted
                    .then(|| now + limit.interval_us.max(1) * u64::from(limit.burst.max(1)))
            });
            decisions.push(decide(stored, now, limit));
            keys.push(key);
        }
        if consume && decisions.iter().all(|(o, _)| o.allowed) {
            for ((key, shard), (_, new_tat)) in
                keys.into_iter().zip(shard_ids.iter_mut()).zip(&decisions)
            {
                let map = &mut guards
                    .iter_mut()
                    .find(|(i, _)| i == shard)
                    .expect("locked")
                    .1;
                if map.len() > SWEEP_ABOVE {
                    map.retain(|_, tat| *tat > now);
                }
                map.insert(key, new_tat.expect("admitted"));
            }
        }
        decisions.into_iter().map(|(o, _)| o).collect()
    }
}

#[derive(Clone)]
struct Entry {
    value: Bytes,
    ttl: Duration,
}

struct PerEntryTtl;

impl Expiry<String, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _key: &String, entry: &Entry, _now: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }
    fn expire_after_update(
        &self,
        _key: &String,
        entry: &Entry,
        _now: Instant,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

pub struct MemoryStore {
    entries: Cache<String, Entry>,
    limits: GcraTable,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

/// Upper bound on what the memory store holds, in bytes of values.
const DEFAULT_CAPACITY_BYTES: u64 = 256 * 1024 * 1024;

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore {
            entries: Cache::builder()
                .max_capacity(DEFAULT_CAPACITY_BYTES)
                .weigher(|key: &String, entry: &Entry| {
                    (key.len() + entry.value.len())
                        .try_into()
                        .unwrap_or(u32::MAX)
                })
                .expire_after(PerEntryTtl)
                .build(),
            limits: GcraTable::default(),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn is_shared(&self) -> bool {
        false
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        Ok(self.entries.get(key).map(|e| e.value))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<(), StoreError> {
        self.entries.insert(key.to_owned(), Entry { value, ttl });
        Ok(())
    }

    async fn set_if_absent(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let entry = self
            .entries
            .entry(key.to_owned())
            .or_insert(Entry { value, ttl });
        Ok(entry.is_fresh())
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.entries.remove(key).is_some())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn rate_limit(
        &self,
        limits: &[GcraRequest],
        consume: bool,
    ) -> Result<Vec<GcraOutcome>, StoreError> {
        Ok(self.limits.check(limits, consume))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn values_round_trip_and_expire() {
        let store = MemoryStore::new();
        store
            .set("a", Bytes::from_static(b"1"), Duration::from_millis(50))
            .await
            .unwrap();
        store
            .set("b", Bytes::from_static(b"2"), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(store.get("a").await.unwrap().as_deref(), Some(&b"1"[..]));
        assert!(store.delete("b").await.unwrap());
        assert!(!store.delete("b").await.unwrap());
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(store.get("a").await.unwrap(), None);
    }

    #[test]
    fn a_flood_of_keys_is_bounded_and_never_loosens_a_limit() {
        const CAPACITY: usize = 32;
        let table = GcraTable::with_shard_capacity(CAPACITY);
        let limit = |key: String| GcraRequest {
            key,
            interval_us: 3_600_000_000,
            burst: 1,
        };
        let admit = |key: &str| table.check(&[limit(key.to_owned())], true)[0].allowed;
        assert!(admit("victim"));
        for i in 0..SHARDS * CAPACITY * 4 {
            table.check(&[limit(format!("flood-{i}"))], true);
        }
        let held: usize = table.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(held <= SHARDS * (CAPACITY + 1), "{held} keys held");
        assert!(!admit("victim"), "a tracked key keeps its state");
        // New keys now share their shard's overflow bucket: stricter, not looser.
        let newcomers = (0..SHARDS * 4)
            .filter(|i| admit(&format!("new-{i}")))
            .count();
        assert!(
            newcomers <= SHARDS,
            "{newcomers} of {} new keys admitted",
            SHARDS * 4
        );
    }
}
