//! Connections: one multiplexed connection of either kind (a server's connection manager, or the
//! cluster's connection), and what a Redis error means for the caller.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::RedisError;

use super::{Backend, RedisStore};
use crate::store::StoreError;

/// A connection of either kind; both speak the same commands.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisStore {
    pub(super) fn connection(&self) -> Option<Connection> {
        match &self.backend {
            Backend::Single { requests, .. } => Some(Connection::Single(requests.clone())),
            Backend::Cluster { connection, .. } => connection
                .load_full()
                .map(|c| Connection::Cluster((*c).clone())),
        }
    }

    pub(super) fn health_connection(&self) -> Option<Connection> {
        match &self.backend {
            Backend::Single { health, .. } => Some(Connection::Single(health.clone())),
            Backend::Cluster { .. } => self.connection(),
        }
    }
}

pub(super) fn tls_certificates(ca_pem: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca_pem.to_vec()),
    }
}

/// What a Redis error means for the caller: the store (or, on a cluster, a node) is not there —
/// counted by the circuit breaker —, or it answered with an error.
pub(super) fn backend_error(e: RedisError) -> StoreError {
    use redis::{ErrorKind, ServerErrorKind};
    // A cluster mid-failover answers with these (or the client finds no connection for the
    // slot) until the replica takes over: the node is unavailable, not the request wrong.
    let failing_over = e.is_cluster_error()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::MasterDown
                        | ServerErrorKind::BusyLoading
                        | ServerErrorKind::ReadOnly
                )
        );
    if failing_over
        || e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
    {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Backend(e.to_string())
    }
}
