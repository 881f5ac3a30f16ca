//! Counts of what this backend served, so tests can prove whether a request reached it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde_json::{json, Value};

#[derive(Default)]
pub struct Stats {
    by_route: Mutex<BTreeMap<&'static str, u64>>,
    connections: AtomicU64,
}

impl Stats {
    /// Records one request for a route label such as `"GET /products/{id}"`.
    pub fn record(&self, route: &'static str) {
        *self
            .by_route
            .lock()
            .expect("stats mutex poisoned")
            .entry(route)
            .or_default() += 1;
    }

    /// Requests recorded so far for a route label.
    pub fn count(&self, route: &'static str) -> u64 {
        self.by_route
            .lock()
            .expect("stats mutex poisoned")
            .get(route)
            .copied()
            .unwrap_or(0)
    }

    pub fn connection_accepted(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// `{"requests": {"GET /products/{id}": 3, ...}, "total": 3, "connections": 1}`
    pub fn to_json(&self) -> Value {
        let by_route = self.by_route.lock().expect("stats mutex poisoned");
        let total: u64 = by_route.values().sum();
        json!({
            "requests": *by_route,
            "total": total,
            "connections": self.connections.load(Ordering::Relaxed),
        })
    }
}
