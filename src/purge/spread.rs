//! Spreading purges: recording each in Redis (retried through a failover), telling every
//! live instance and waiting for their acknowledgements before a write's response is
//! released, and replaying the purges made while Redis was unreachable.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::marks::PENDING;
use super::{PurgeReport, Purger, Unconfirmed};
use crate::metrics::metrics;
use crate::store::{Published, Store, StoreError};

/// Keys per published purge when the pending ones are replayed.
const REPLAY_BATCH: usize = 1000;
/// How often purges made while Redis was unreachable are retried.
const REPLAY_INTERVAL: Duration = Duration::from_millis(500);

/// Acknowledgements of this instance's purges: who applied each, and who waits for them.
#[derive(Default)]
pub(super) struct Acks {
    by: HashMap<u64, HashSet<String>>,
    waiting: HashMap<u64, Arc<tokio::sync::Notify>>,
}

impl Purger {
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
    pub(super) async fn spread(&self, keys: Vec<String>, replay: bool) -> PurgeReport {
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

    pub(super) fn acknowledged(&self, seq: u64, by: String) {
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

    /// Sends the purges made while Redis was unreachable, in batches (they stay pending while
    /// Redis still fails).
    pub(super) async fn replay(&self) {
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
pub(super) async fn replay_pending(purger: std::sync::Weak<Purger>) {
    loop {
        tokio::time::sleep(REPLAY_INTERVAL).await;
        let Some(purger) = purger.upgrade() else {
            return;
        };
        purger.replay().await;
    }
}
