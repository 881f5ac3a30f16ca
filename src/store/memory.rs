//! The in-process store: a [`moka`] cache with per-entry expiry. Needs nothing installed.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use moka::sync::Cache;
use moka::Expiry;

use super::{Store, StoreError};

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

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        Ok(self.entries.get(key).map(|e| e.value))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<(), StoreError> {
        self.entries.insert(key.to_owned(), Entry { value, ttl });
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.entries.remove(key).is_some())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
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
}
