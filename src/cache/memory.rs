//! The in-process tier: entries in a byte-bounded moka cache (TinyLFU admission, so one scan of
//! cold URLs cannot flush the hot set), each expiring when it can no longer be used (fresh,
//! served stale, or revalidated; see [`Entry::retained_ms`]), plus the variant index (primary key → the request headers its responses vary on).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderName;
use moka::sync::Cache;
use moka::Expiry;

use super::directives::MAX_DELTA;
use super::entry::Entry;

struct UntilUnusable;

impl Expiry<String, Arc<Entry>> for UntilUnusable {
    fn expire_after_create(
        &self,
        _key: &String,
        entry: &Arc<Entry>,
        _now: Instant,
    ) -> Option<Duration> {
        let stored = Duration::from_millis(entry.stored_at_ms);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // Kept past freshness for as long as it may still be served stale or revalidated.
        // Bounded: an entry's numbers may come from anywhere, and the tier adds this to an Instant.
        let usable_until = stored.saturating_add(Duration::from_millis(
            entry.fresh_for_ms.saturating_add(entry.retained_ms()),
        ));
        Some(usable_until.saturating_sub(now).min(MAX_DELTA))
    }
}

pub struct MemoryTier {
    entries: Cache<String, Arc<Entry>>,
    variants: Cache<String, Arc<Vec<HeaderName>>>,
}

impl MemoryTier {
    pub fn new(capacity_bytes: u64) -> MemoryTier {
        MemoryTier {
            entries: Cache::builder()
                .max_capacity(capacity_bytes)
                .weigher(|key: &String, entry: &Arc<Entry>| {
                    let headers: usize = entry
                        .headers
                        .iter()
                        .map(|(n, v)| n.as_str().len() + v.len())
                        .sum();
                    (key.len() + headers + entry.body.len() + 64)
                        .try_into()
                        .unwrap_or(u32::MAX)
                })
                .expire_after(UntilUnusable)
                .eviction_listener(|_key, _entry, cause| {
                    if cause == moka::notification::RemovalCause::Size {
                        crate::metrics::metrics().cache_memory_evictions.inc();
                    }
                })
                .build(),
            variants: Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        self.entries.get(key)
    }

    pub fn insert(&self, key: String, entry: Arc<Entry>) {
        self.entries.insert(key, entry);
    }

    pub fn vary_of(&self, primary: &str) -> Option<Arc<Vec<HeaderName>>> {
        self.variants.get(primary)
    }

    pub fn set_vary(&self, primary: String, names: Vec<HeaderName>) {
        self.variants.insert(primary, Arc::new(names));
    }

    /// Removes every entry `matches` selects; returns how many.
    pub fn remove_matching(&self, matches: impl Fn(&Entry) -> bool) -> u64 {
        let doomed: Vec<Arc<String>> = self
            .entries
            .iter()
            .filter(|(_, entry)| matches(entry))
            .map(|(key, _)| key)
            .collect();
        for key in &doomed {
            self.entries.invalidate(key.as_str());
        }
        doomed.len() as u64
    }

    /// Entries and their weighed bytes (after pending maintenance).
    pub fn stats(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        (self.entries.entry_count(), self.entries.weighted_size())
    }
}
