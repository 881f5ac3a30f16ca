//! Redis Cluster: which master serves a key (its slot, CRC16 like Redis), the circuit per
//! master (slots read from `CLUSTER SLOTS`, refreshed with the health check, so one dead master
//! opens only its own circuit), and the cluster connection.

use std::sync::Arc;

use super::circuit::Circuit;
use super::connection::{backend_error, tls_certificates};
use super::{Backend, RedisStore, CONNECT_TIMEOUT, RESPONSE_TIMEOUT};
use crate::store::StoreError;

/// Slots `start..=end` and the circuit of the master that serves them.
pub(super) struct SlotRange {
    pub(super) start: u16,
    pub(super) end: u16,
    pub(super) master: String,
    pub(super) circuit: Arc<Circuit>,
}

/// The cluster slot of a key (CRC16 of its hash tag, or of the key, mod 16384).
pub(super) fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|b| *b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(bytes)) % 16384
}

impl RedisStore {
    /// The circuit guarding calls on `key`: on a cluster, that of the master serving its slot
    /// (the store's own until the slots are known).
    pub(super) fn circuit_for(&self, key: &str) -> Arc<Circuit> {
        if let Backend::Cluster { slots, .. } = &self.backend {
            let slot = slot_of(key);
            let ranges = slots.load();
            if let Some(range) = ranges.iter().find(|r| (r.start..=r.end).contains(&slot)) {
                return range.circuit.clone();
            }
        }
        self.own_circuit.clone()
    }

    /// Learns which master serves which slots (after a failover, the promoted replica).
    /// Circuits are kept per master address.
    pub(super) async fn refresh_slots(&self) -> Result<(), StoreError> {
        let Backend::Cluster { slots, .. } = &self.backend else {
            return Ok(());
        };
        let Some(mut connection) = self.health_connection() else {
            return Ok(());
        };
        let reply = tokio::time::timeout(
            RESPONSE_TIMEOUT,
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Vec<redis::Value>>(&mut connection),
        )
        .await
        .map_err(|_| StoreError::Unavailable("CLUSTER SLOTS timed out".to_owned()))?
        .map_err(backend_error)?;
        let known = slots.load();
        let mut ranges = Vec::new();
        for range in reply {
            let redis::Value::Array(fields) = range else {
                continue;
            };
            let (
                Some(redis::Value::Int(start)),
                Some(redis::Value::Int(end)),
                Some(redis::Value::Array(master)),
            ) = (fields.first(), fields.get(1), fields.get(2))
            else {
                continue;
            };
            let (Some(redis::Value::BulkString(host)), Some(redis::Value::Int(port))) =
                (master.first(), master.get(1))
            else {
                continue;
            };
            let master = format!("{}:{port}", String::from_utf8_lossy(host));
            let circuit = known
                .iter()
                .chain(ranges.iter())
                .find(|r: &&SlotRange| r.master == master)
                .map(|r| r.circuit.clone())
                .unwrap_or_else(|| {
                    Arc::new(Circuit::new(
                        master.clone(),
                        self.options.circuit_failures,
                        self.options.circuit_open,
                    ))
                });
            ranges.push(SlotRange {
                start: *start as u16,
                end: *end as u16,
                master,
                circuit,
            });
        }
        if !ranges.is_empty() {
            slots.store(Arc::new(ranges));
        }
        Ok(())
    }

    pub(super) async fn ensure_cluster_connection(&self) -> Result<(), StoreError> {
        let Backend::Cluster {
            nodes, connection, ..
        } = &self.backend
        else {
            return Ok(());
        };
        if connection.load().is_some() {
            return Ok(());
        }
        let mut builder = redis::cluster::ClusterClient::builder(nodes.clone());
        if let Some(pem) = &self.options.tls_ca_pem {
            builder = builder.certs(tls_certificates(pem));
        }
        // Few, quick retries inside the client (its defaults wait over a second between them):
        // every call has its own budget above, and a failover's new master should be found
        // as soon as the cluster reports it.
        let client = builder
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(2)
            .min_retry_wait(20)
            .max_retry_wait(200)
            .build()
            .map_err(backend_error)?;
        let conn = client.get_async_connection().await.map_err(backend_error)?;
        connection.store(Some(Arc::new(conn)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_those_redis_computes() {
        // `CLUSTER KEYSLOT` on a real server gives these.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{cachegate-purge}:seq"), 8129);
        assert_eq!(slot_of("{}x"), 10595, "an empty tag: the whole key");
        assert_eq!(slot_of("a{user1000}.following"), 3443);
        assert_eq!(slot_of("x{}y{z}"), 15453, "only the first braces count");
    }
}
