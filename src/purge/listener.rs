//! Hearing the other instances: the subscription's events and the lease renewals, judged in
//! order (see [`super::coherence`]), and the resynchronisation after a lost subscription or a
//! Redis that lost its data.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::coherence::Renewal;
use super::{prefix_key, Purger};
use crate::metrics::metrics;
use crate::store::{PurgeEvent, Store, StoreError};

impl Purger {
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
}

/// A renewal's outcome: when it was sent (the lease's clock), the last purge heard then, and
/// what the store said.
type Renewed = (u64, u64, Result<(u64, String), StoreError>);

/// Renews this instance's membership and lease several times per lease, for as long as the
/// purger lives; the listener judges each answer (in order with the purges it hears).
pub(super) async fn renew(
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
pub(super) async fn listen(
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
