//! Whether this instance has heard every purge: its *lease*.
//!
//! With a shared store, an instance serves its in-process entries without asking Redis only
//! while it holds a lease, and it renews the lease only by proving to Redis that it has heard
//! every purge so far: a renewal reads the purge sequence number `S` (and renews the instance's
//! membership), and extends the lease to *the renewal's send time + the lease length* only once
//! every purge numbered up to `S` has come through its subscription, in order. A purge it missed
//! (a lost message, a dropped subscription, a partition) stops the renewals, so the lease runs
//! out at most one lease after that purge was recorded.
//!
//! A writer uses the same bound from the other side: when an instance listed as live does not
//! acknowledge a purge, the write's response is held until one lease after the purge was
//! recorded — by then that instance's lease has run out, and it asks Redis before serving. No
//! clocks are compared between machines: each side measures the lease on its own monotonic
//! clock, from a point the other side knows to be earlier.
//!
//! ```text
//! instance B:  renew ──(S ≥ P? heard P?)──► lease until send + L
//! writer W:    purge P recorded at t ──► all live acked? release : release at t + L
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics::metrics;

/// The coherence settings (`[store]`).
#[derive(Debug, Clone, Copy)]
pub struct CoherenceSettings {
    /// How long a proof of having heard every purge is trusted.
    pub lease: Duration,
    /// Extra time an instance may serve what it holds after losing its lease, and the longest
    /// a write waits for Redis before it returns without reaching the others (`0`: strict).
    pub may_serve_stale_for: Duration,
    /// Longest a write waits for its purge to reach Redis in strict mode.
    pub max_write_hold: Duration,
}

impl Default for CoherenceSettings {
    fn default() -> Self {
        CoherenceSettings {
            lease: Duration::from_millis(500),
            may_serve_stale_for: Duration::ZERO,
            max_write_hold: Duration::from_secs(10),
        }
    }
}

impl CoherenceSettings {
    /// Whether writes wait for every instance and incoherent instances ask Redis.
    pub fn strict(&self) -> bool {
        self.may_serve_stale_for.is_zero()
    }

    /// How often a lease is renewed: four times per lease, so one lost renewal costs nothing.
    pub fn renew_every(&self) -> Duration {
        self.lease / 4
    }
}

/// What a renewal proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Every purge up to the store's number was heard: the lease is extended.
    Extended,
    /// Purges up to the store's number have not all arrived yet: the lease is extended when
    /// they do.
    Waiting,
    /// A purge the store recorded a while ago never arrived: it was missed.
    Missed,
    /// The store's number is below what this instance heard, or its epoch changed: the store
    /// lost its data.
    StoreLostData,
}

/// This instance's lease. Read on every in-process hit: one atomic load and a clock read.
pub struct Lease {
    settings: CoherenceSettings,
    epoch: Instant,
    /// Milliseconds since `epoch` until which the lease holds; 0: not held.
    until_ms: AtomicU64,
    /// The highest purge number heard through the subscription, every earlier one heard too.
    heard: AtomicU64,
    /// A renewal waiting for purges to arrive: (its send time in ms, the number to reach).
    waiting: Mutex<Option<(u64, u64)>>,
    /// The store's epoch when the state was last read (see [`crate::store::PurgeState`]).
    store_epoch: Mutex<Option<String>>,
    /// Since when the lease has not been held (for the metric), or `None` while held.
    lost_at: Mutex<Option<Instant>>,
    /// Whether the last renewal failed (the purge keys cannot be reached): asking Redis about
    /// an entry's marks would fail too, so it is not tried.
    unreachable: AtomicBool,
    /// Whether the first renewal happened (before it the instance is not coherent, and it is
    /// not counted as time spent incoherent).
    started: AtomicBool,
}

impl Lease {
    pub fn new(settings: CoherenceSettings) -> Lease {
        Lease {
            settings,
            epoch: Instant::now(),
            until_ms: AtomicU64::new(0),
            heard: AtomicU64::new(0),
            waiting: Mutex::new(None),
            store_epoch: Mutex::new(None),
            lost_at: Mutex::new(None),
            unreachable: AtomicBool::new(false),
            started: AtomicBool::new(false),
        }
    }

    pub fn settings(&self) -> &CoherenceSettings {
        &self.settings
    }

    /// Milliseconds since this lease's epoch (never 0).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether this instance may trust what it knows of the purges now.
    pub fn is_held(&self) -> bool {
        self.now_ms() < self.until_ms.load(Ordering::Acquire)
    }

    /// Records whether the last renewal reached Redis.
    pub fn set_reachable(&self, reachable: bool) {
        self.unreachable.store(!reachable, Ordering::Release);
    }

    /// Whether the purge keys could be reached at the last renewal.
    pub fn reachable(&self) -> bool {
        !self.unreachable.load(Ordering::Acquire)
    }

    /// The highest purge number heard in order.
    pub fn heard(&self) -> u64 {
        self.heard.load(Ordering::Acquire)
    }

    /// A purge arrived through the subscription. `false` when it skips numbers: purges between
    /// were missed.
    pub fn hear(&self, seq: u64) -> bool {
        let heard = self.heard.load(Ordering::Acquire);
        if seq <= heard {
            return true;
        }
        if seq > heard + 1 {
            return false;
        }
        self.heard.store(seq, Ordering::Release);
        let mut waiting = self.waiting.lock().expect("lease poisoned");
        if let Some((sent, target)) = *waiting {
            if seq >= target {
                *waiting = None;
                self.extend(sent);
            }
        }
        true
    }

    /// Every purge up to `seq` is known (the shared state was read after subscribing).
    pub fn caught_up(&self, seq: u64) {
        self.heard.fetch_max(seq, Ordering::AcqRel);
    }

    /// The store's epoch as the shared state was read; `true` when it differs from the one
    /// known before (the store lost its data since).
    pub fn epoch_changed(&self, epoch: &str) -> bool {
        let mut known = self.store_epoch.lock().expect("lease poisoned");
        let changed = known.as_deref().is_some_and(|k| k != epoch);
        *known = Some(epoch.to_owned());
        changed
    }

    /// A renewal sent at `sent_ms`, when purges up to `heard_then` had been heard, found the
    /// store's sequence at `store_seq`, in `epoch`. (Purges heard since may be numbered above
    /// what the store said: the renewal ran before them.)
    pub fn renewed(&self, sent_ms: u64, heard_then: u64, store_seq: u64, epoch: &str) -> Renewal {
        let known = self.store_epoch.lock().expect("lease poisoned").clone();
        if store_seq < heard_then || known.as_deref().is_some_and(|k| k != epoch) {
            return Renewal::StoreLostData;
        }
        let heard = self.heard();
        let mut waiting = self.waiting.lock().expect("lease poisoned");
        if store_seq <= heard {
            *waiting = None;
            self.extend(sent_ms);
            return Renewal::Extended;
        }
        // Messages take a moment; a number still missing half a lease later was missed.
        if let Some((since, target)) = *waiting {
            let patience = self.settings.lease.as_millis() as u64 / 2;
            if heard < target && sent_ms > since + patience {
                *waiting = None;
                return Renewal::Missed;
            }
            return Renewal::Waiting;
        }
        *waiting = Some((sent_ms, store_seq));
        Renewal::Waiting
    }

    fn extend(&self, sent_ms: u64) {
        let grace = self.settings.may_serve_stale_for;
        let until = sent_ms + (self.settings.lease + grace).as_millis() as u64;
        self.until_ms.fetch_max(until, Ordering::AcqRel);
        self.started.store(true, Ordering::Release);
        self.observe();
    }

    /// The subscription was lost or a purge was missed: stop trusting what is known now, and
    /// forget renewals in flight (they proved nothing about the purges to come).
    pub fn lose(&self) {
        // With `may_serve_stale_for`, what is held may still be served for that long.
        let grace = self.settings.may_serve_stale_for.as_millis() as u64;
        let until = if grace == 0 { 0 } else { self.now_ms() + grace };
        self.until_ms.fetch_min(until, Ordering::AcqRel);
        *self.waiting.lock().expect("lease poisoned") = None;
        self.observe();
    }

    /// Updates the coherence metrics (called on every change and by the renewal loop, so the
    /// time spent incoherent is counted while it lasts).
    pub fn observe(&self) {
        let held = self.is_held();
        let m = metrics();
        m.coherent.set(i64::from(held));
        if !self.started.load(Ordering::Acquire) {
            return;
        }
        let mut lost_at = self.lost_at.lock().expect("lease poisoned");
        match (held, *lost_at) {
            (true, Some(since)) => {
                m.incoherent_seconds.inc_by(since.elapsed().as_secs_f64());
                *lost_at = None;
                tracing::info!("purge: coherent again");
            }
            (false, Some(since)) => {
                m.incoherent_seconds.inc_by(since.elapsed().as_secs_f64());
                *lost_at = Some(Instant::now());
            }
            (false, None) => {
                *lost_at = Some(Instant::now());
                tracing::info!("purge: not coherent: in-process entries are checked against Redis until the lease is renewed");
            }
            (true, None) => {}
        }
    }

    /// When a writer may release a purge recorded by a call that returned at `returned`, if some
    /// live instance did not acknowledge it: one lease (and the grace) later, with a margin for
    /// timers and clock rates.
    pub fn release_at(&self, returned: tokio::time::Instant) -> tokio::time::Instant {
        returned + self.settings.lease + self.settings.may_serve_stale_for + LEASE_MARGIN
    }
}

/// Slack on top of a lease for timers firing late and clocks running at slightly different
/// rates.
const LEASE_MARGIN: Duration = Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> Lease {
        Lease::new(CoherenceSettings {
            lease: Duration::from_millis(400),
            ..CoherenceSettings::default()
        })
    }

    #[test]
    fn a_renewal_extends_only_once_every_purge_it_saw_has_been_heard() {
        let lease = lease();
        assert!(!lease.is_held(), "not held before the first renewal");
        lease.caught_up(3);
        assert!(!lease.epoch_changed("e1"), "the first epoch seen");
        assert_eq!(lease.renewed(lease.now_ms(), 3, 3, "e1"), Renewal::Extended);
        assert!(lease.is_held());
        lease.lose();
        assert!(!lease.is_held());
        // Purge 4 is recorded but not heard yet: no extension until it arrives.
        assert_eq!(lease.renewed(lease.now_ms(), 3, 4, "e1"), Renewal::Waiting);
        assert!(!lease.is_held());
        assert!(lease.hear(4));
        assert!(lease.is_held(), "extended from the renewal's send time");
    }

    #[test]
    fn a_purge_that_never_arrives_is_missed_and_a_skipped_number_is_a_gap() {
        let lease = lease();
        lease.caught_up(1);
        let sent = lease.now_ms();
        assert_eq!(lease.renewed(sent, 1, 2, "e"), Renewal::Waiting);
        assert_eq!(
            lease.renewed(sent + 100, 1, 2, "e"),
            Renewal::Waiting,
            "patience"
        );
        assert_eq!(lease.renewed(sent + 300, 1, 2, "e"), Renewal::Missed);
        assert!(!lease.hear(3), "2 was skipped");
        // Heard after the renewal was sent: not a sign of lost data.
        assert_eq!(lease.renewed(sent + 400, 1, 1, "e"), Renewal::Extended);
        assert!(lease.hear(2) && lease.hear(3));
        assert_eq!(
            lease.renewed(lease.now_ms(), 3, 1, "e"),
            Renewal::StoreLostData
        );
        lease.epoch_changed("e");
        assert_eq!(lease.renewed(lease.now_ms(), 3, 3, "e"), Renewal::Extended);
        assert_eq!(
            lease.renewed(lease.now_ms(), 3, 3, "f"),
            Renewal::StoreLostData,
            "a new epoch"
        );
    }

    #[test]
    fn a_lease_runs_out() {
        let lease = Lease::new(CoherenceSettings {
            lease: Duration::from_millis(30),
            ..CoherenceSettings::default()
        });
        assert_eq!(lease.renewed(lease.now_ms(), 0, 0, "e"), Renewal::Extended);
        assert!(lease.is_held());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!lease.is_held());
    }
}
