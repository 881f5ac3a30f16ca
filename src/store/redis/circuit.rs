//! The circuit breaker: after `circuit_failures` consecutive failures a circuit opens and
//! refuses calls at once for `circuit_open`, then lets one trial call through. One per Redis
//! server, or per master of a cluster.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::metrics;

/// Closed: calls go through. After `threshold` consecutive failures: open for `open_for`, calls
/// fail at once. Then half-open: a single call is let through; its result closes or reopens it.
pub(super) struct Circuit {
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which the circuit is open; 0 when closed.
    open_until: AtomicU64,
    threshold: u32,
    open_for: Duration,
    epoch: Instant,
    /// What it guards, for logs: `Redis`, or a cluster node's address.
    name: String,
}

impl Circuit {
    pub(super) fn new(name: String, threshold: u32, open_for: Duration) -> Circuit {
        Circuit {
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            threshold: threshold.max(1),
            open_for,
            epoch: Instant::now(),
            name,
        }
    }

    pub(super) fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    pub(super) fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = self.now();
        // Half-open: the caller that moves the deadline forward gets the one trial.
        now >= until
            && self
                .open_until
                .compare_exchange(
                    until,
                    now + self.open_for.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    pub(super) fn record(&self, ok: bool) {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            if self.open_until.swap(0, Ordering::AcqRel) != 0 {
                metrics().store_circuit_open.dec();
                tracing::info!(node = %self.name, "store: circuit closed; using the store again");
            }
        } else if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= self.threshold {
            let until = self.now() + self.open_for.as_millis() as u64;
            if self.open_until.swap(until, Ordering::AcqRel) == 0 {
                metrics().store_circuit_open.inc();
                tracing::warn!(node = %self.name, open_for = ?self.open_for, "store: circuit open after repeated failures; bypassing it");
            }
        }
    }

    pub(super) fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuit_opens_after_failures_and_lets_one_trial_through() {
        let circuit = Circuit::new("test".to_owned(), 2, Duration::from_millis(30));
        circuit.record(false);
        assert!(circuit.allow(), "one failure is below the threshold");
        circuit.record(false);
        assert!(!circuit.allow(), "open");
        std::thread::sleep(Duration::from_millis(40));
        assert!(circuit.allow(), "half-open: one trial");
        assert!(!circuit.allow(), "only one");
        circuit.record(true);
        assert!(circuit.allow() && !circuit.is_open(), "closed again");
    }
}
