//! The health check: pings Redis in the background, logs each change between reachable and
//! not, closes the circuit when it answers again, and re-reads a cluster's slots.

use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use super::{RedisStore, HEALTH_INTERVAL};
use crate::store::Store;

/// Pings Redis every [`HEALTH_INTERVAL`], logging each change between reachable and not. A
/// successful ping also closes the circuit, so recovery does not wait for traffic.
pub(super) async fn watch_health(store: Weak<RedisStore>) {
    loop {
        let Some(strong) = store.upgrade() else {
            return;
        };
        let reachable = match strong.ensure_cluster_connection().await {
            Ok(()) => strong.ping().await,
            Err(e) => Err(e),
        };
        if reachable.is_ok() {
            strong.own_circuit.record(true);
            if let Err(e) = strong.refresh_slots().await {
                tracing::debug!(error = %e, "store: could not read the cluster's slots");
            }
        }
        let was = strong.connected.swap(reachable.is_ok(), Ordering::Relaxed);
        match (&reachable, was) {
            (Ok(()), false) => {
                tracing::info!(url = %strong.display_url, "store: connected to Redis")
            }
            (Err(e), true) => {
                tracing::warn!(url = %strong.display_url, error = %e, "store: lost the Redis connection; retrying")
            }
            (Err(e), false) => {
                tracing::warn!(url = %strong.display_url, error = %e, "store: Redis is not reachable yet; retrying")
            }
            (Ok(()), true) => {}
        }
        // While a node's circuit is open, look at the slots often: a failover's new master
        // gets a fresh circuit as soon as the cluster names it.
        let pause = if strong.circuit_open() {
            Duration::from_millis(250)
        } else {
            HEALTH_INTERVAL
        };
        drop(strong);
        tokio::time::sleep(pause).await;
    }
}
