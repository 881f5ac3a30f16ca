//! In-process coalescing: one request per missed resource goes to the origin (the leader) and
//! the others (followers) wait for its entry, released the moment it is stored or found not
//! storable. A resource whose last answer could not be stored is fetched without coalescing for a
//! while (Varnish's hit-for-miss), so requests for it never queue behind each other.

use std::sync::Arc;
use std::time::Duration;

use super::key::CacheKey;
use super::Cache;

/// How long a request waits for another request filling the same entry before going to the
/// origin itself.
pub const COALESCE_WAIT: Duration = Duration::from_secs(10);

pub(super) type Flights =
    Arc<std::sync::Mutex<std::collections::HashMap<String, tokio::sync::watch::Receiver<()>>>>;

/// Whether a missed request fetches from the origin itself or waits for one that already does.
pub(super) enum Flight {
    /// Fetch; dropping the guard (when the request ends, stored or not) wakes the followers.
    Leader(FlightGuard),
    /// Wait for the leader, then look up again.
    Follower(tokio::sync::watch::Receiver<()>),
}

pub struct FlightGuard {
    key: String,
    flights: Flights,
    _done: tokio::sync::watch::Sender<()>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        // Remove before `_done` drops, so a late arrival starts a new flight rather than waiting
        // on a finished one.
        if let Ok(mut flights) = self.flights.lock() {
            flights.remove(&self.key);
        }
    }
}

/// How long a resource whose last answer could not be stored is fetched without coalescing
/// (Varnish's hit-for-miss): concurrent requests for it go to the origin side by side.
pub(super) const UNCACHEABLE_FOR: Duration = Duration::from_secs(60);

impl Cache {
    /// Joins the flight for a missed key: the first request leads, the others follow — unless
    /// the resource's last answer could not be stored, in which case waiting would only queue
    /// requests behind each other: then `None`, and the request fetches on its own.
    pub(super) fn join_flight(&self, primary: &CacheKey) -> Option<Flight> {
        if self.uncacheable.contains_key(primary.local()) {
            return None;
        }
        Some(self.lead_or_follow(primary))
    }

    /// Remembers whether a resource's answer could be stored (see `join_flight`).
    pub fn note_storable(&self, primary: &CacheKey, storable: bool) {
        if storable {
            self.uncacheable.invalidate(primary.local());
        } else {
            self.uncacheable.insert(primary.local().to_owned(), ());
        }
    }

    /// The flight for a key, whatever its last answer was: the first request leads (a
    /// background refresh, for example), the others follow.
    pub(super) fn lead_or_follow(&self, primary: &CacheKey) -> Flight {
        let mut flights = self.flights.lock().expect("flights mutex poisoned");
        if let Some(receiver) = flights.get(primary.local()) {
            return Flight::Follower(receiver.clone());
        }
        let (done, receiver) = tokio::sync::watch::channel(());
        flights.insert(primary.local().to_owned(), receiver);
        Flight::Leader(FlightGuard {
            key: primary.local().to_owned(),
            flights: self.flights.clone(),
            _done: done,
        })
    }
}
