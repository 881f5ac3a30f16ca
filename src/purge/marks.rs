//! What an instance knows of the purges so far: a mark (purge sequence number) per key, folded
//! into buckets past a bound, prefix marks, the floor, and the purges made while Redis was
//! unreachable. Pure bookkeeping, no I/O: [`super::Purger`] applies purges and asks it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use super::rule::prefix_key;

/// Marks kept exactly in memory; an evicted one is folded into [`Marks::buckets`].
pub(super) const MARK_CAPACITY: u64 = 1_000_000;
/// Buckets evicted marks fold into (8 bytes each).
pub(super) const MARK_BUCKETS: usize = 1 << 16;
/// Locks the exact marks are spread over.
const MARK_SHARDS: usize = 64;
/// Prefix marks kept; past it the oldest is folded into [`Marks::floor`].
pub(super) const PREFIX_CAPACITY: usize = 4096;
/// Keys purged while Redis was unreachable that are remembered one by one; past it, everything
/// counts as purged until Redis takes a purge of everything.
pub(super) const PENDING_CAPACITY: usize = 100_000;
/// The mark of a key purged while Redis was unreachable, until the purge is replayed.
pub(super) const PENDING: u64 = u64::MAX;

/// What an instance knows of the purges so far.
///
/// Bounded however many keys are purged, and never by forgetting a purge: exact marks that
/// have to leave memory are folded into a fixed set of buckets (by the key's hash), each of which
/// keeps the highest mark folded into it. An entry whose key shares a bucket with a purged key
/// may then count as purged too — a few extra misses, never a stale hit, and never "everything
/// older is stale".
pub(super) struct Marks {
    /// The highest purge sequence number known.
    pub(super) seq: AtomicU64,
    /// Entries stamped below this are stale whatever their keys say: raised when a lost
    /// subscription may have missed purges, and by the oldest prefix mark when there are too
    /// many to keep.
    pub(super) floor: AtomicU64,
    /// Key → sequence number of its last purge, in shards by key hash. A shard that outgrows
    /// its share of [`MARK_CAPACITY`] is folded whole into `buckets` and emptied: a write marks
    /// its keys with one short lock (an LRU's bookkeeping cost a write about 1 µs, measured), and
    /// nothing folded is lost.
    pub(super) by_key: Box<[Mutex<HashMap<String, u64>>]>,
    /// Marks per shard before it is folded.
    per_shard: usize,
    /// Marks folded out of `by_key`, by key hash (highest mark per bucket).
    pub(super) buckets: Box<[AtomicU64]>,
    pub(super) hasher: std::hash::RandomState,
    /// Prefix → sequence number of its last purge (few; checked against every entry's path).
    pub(super) prefixes: RwLock<Vec<(String, u64)>>,
    /// Keys purged while Redis was unreachable: never served until the purge is replayed.
    pub(super) pending: Mutex<Pending>,
    /// Whether `pending` holds anything: read without the lock on every hit.
    pub(super) any_pending: std::sync::atomic::AtomicBool,
    /// `false` from a resubscription until the shared state is read again: nothing is current.
    pub(super) synced: std::sync::atomic::AtomicBool,
    /// The sequence number from which this instance has seen every purge (its first subscription);
    /// entries stamped earlier may predate purges it never heard of.
    pub(super) complete_from: AtomicU64,
}

/// Keys purged while Redis was unreachable.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) keys: std::collections::HashSet<String>,
    /// Too many to remember: everything counts as purged until a purge of everything lands.
    pub(super) overflowed: bool,
}

/// Where a key's mark lives: its shard of `by_key`, and its bucket when folded.
#[derive(Clone, Copy)]
struct Slot {
    shard: usize,
    bucket: usize,
}

impl Marks {
    pub(super) fn new() -> Marks {
        Marks::with_capacity(MARK_CAPACITY)
    }

    pub(super) fn with_capacity(capacity: u64) -> Marks {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
        Marks {
            seq: AtomicU64::new(0),
            by_key: (0..MARK_SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: (capacity / MARK_SHARDS).max(1),
            buckets: (0..MARK_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::hash::RandomState::new(),
            floor: AtomicU64::new(0),
            prefixes: RwLock::default(),
            pending: Mutex::default(),
            any_pending: std::sync::atomic::AtomicBool::new(false),
            synced: std::sync::atomic::AtomicBool::new(true),
            complete_from: AtomicU64::new(u64::MAX),
        }
    }

    fn slot(&self, key: &str) -> Slot {
        use std::hash::BuildHasher;
        let hash = self.hasher.hash_one(key);
        Slot {
            // Different bits for the two, so a shard's keys spread over every bucket.
            shard: (hash >> 48) as usize % MARK_SHARDS,
            bucket: hash as usize % MARK_BUCKETS,
        }
    }

    /// Raises `key`'s exact mark to `seq`; a shard past its share folds into the buckets.
    fn mark(&self, key: &str, seq: u64) {
        let slot = self.slot(key);
        let mut shard = self.by_key[slot.shard]
            .lock()
            .expect("purge marks poisoned");
        match shard.get_mut(key) {
            Some(mark) => *mark = (*mark).max(seq),
            None => {
                shard.insert(key.to_owned(), seq);
            }
        }
        if shard.len() > self.per_shard {
            for (key, mark) in shard.drain() {
                self.buckets[self.slot(&key).bucket].fetch_max(mark, Ordering::AcqRel);
            }
        }
    }

    /// How many exact marks are kept.
    #[cfg(test)]
    fn exact_marks(&self) -> usize {
        self.by_key
            .iter()
            .map(|s| s.lock().expect("purge marks poisoned").len())
            .sum()
    }

    /// Records that `keys` were purged with sequence number `seq` (marks only rise); `PENDING`
    /// marks them purged until a numbered purge of theirs lands.
    pub(super) fn apply(&self, seq: u64, keys: &[String]) {
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
            } else {
                self.mark(key, seq);
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

    pub(super) fn mark_of(&self, key: &str) -> u64 {
        let slot = self.slot(key);
        let exact = self.by_key[slot.shard]
            .lock()
            .expect("purge marks poisoned")
            .get(key)
            .copied()
            .unwrap_or(0);
        exact.max(self.buckets[slot.bucket].load(Ordering::Acquire))
    }

    pub(super) fn is_current(&self, stamp: u64, path: &str, keys: &[String]) -> bool {
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
    pub(super) fn pending(&self) -> Vec<String> {
        let pending = self.pending.lock().expect("pending purges poisoned");
        if pending.overflowed {
            vec![prefix_key("")]
        } else {
            pending.keys.iter().cloned().collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::purge::{path_key, tag_key};
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
        assert!(marks.exact_marks() <= 100, "the exact marks are bounded");
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
}
