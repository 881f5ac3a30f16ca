//! The shared tier (L2): entries in Redis in the [`super::entry`] encoding, shared by every
//! instance, with each resource's `Vary` names beside them; and the fill leases (`SET NX PX`)
//! that let one instance fetch a missed resource while the others poll for its entry.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;

use super::entry::Entry;
use super::key::CacheKey;
use super::policy::CachePolicy;
use super::{Cache, CacheRequest, Hit, Lookup};

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

/// An entry stored in process that still has to be written to the shared tier.
#[derive(Clone)]
pub struct SharedWrite {
    entry_key: String,
    entry: Bytes,
    vary_key: String,
    vary: String,
    ttl: Duration,
}

/// The shared tier's key of the entry for `variant`.
pub fn entry_key(variant: &CacheKey) -> String {
    format!("{L2_PREFIX}{}", variant.shared())
}

impl SharedWrite {
    /// The write of `entry`, the variant `variant` of `primary` varying on `vary`.
    pub(super) fn new(
        variant: &CacheKey,
        primary: &CacheKey,
        entry: &Entry,
        vary: &[HeaderName],
        compress_above: Option<u64>,
    ) -> SharedWrite {
        SharedWrite {
            entry_key: entry_key(variant),
            entry: entry.encode_compressed(compress_above),
            vary_key: format!("{VARY_PREFIX}{}", primary.shared()),
            vary: vary
                .iter()
                .map(HeaderName::as_str)
                .collect::<Vec<_>>()
                .join(","),
            ttl: Duration::from_millis(entry.fresh_for_ms.saturating_add(entry.retained_ms()))
                .min(MAX_SHARED_TTL),
        }
    }
}

impl Cache {
    /// The shared tier: finds the variant (learning the resource's `Vary` from the tier when this
    /// instance has not seen it) and decodes it; returns it with its in-process key.
    pub(super) async fn lookup_shared(
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
                self.memory
                    .set_vary(primary.local().to_owned(), Some(names));
            }
        }
        let raw = store.get(&entry_key(&variant)).await.ok()??;
        match Entry::decode(raw) {
            Ok(entry) => Some((variant.local().to_owned(), Arc::new(entry))),
            Err(e) => {
                tracing::debug!(error = %e, "cache: ignoring an unreadable shared entry");
                None
            }
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
    pub(super) async fn wait_for_shared(
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
            if self.purger.coherent() == Some(false) {
                // The other's entry could not be served here now (see `Cache::decide`).
                return None;
            }
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

    /// Entries and value bytes in the shared tier, counting at most
    /// `limit` keys; `None` without a shared tier.
    pub async fn shared_stats(
        &self,
        limit: u64,
    ) -> Option<Result<(u64, u64, bool), crate::store::StoreError>> {
        let store = self.shared.as_ref()?;
        store.measure_prefix(L2_PREFIX, limit).await
    }
}
