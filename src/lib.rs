//! cachegate: a reverse-proxy caching gateway for HTTP CRUD APIs, on hyper and tokio.
//!
//! A request flows one way, through one async function ([`pipeline::Gateway::handle`]):
//! [`routing`] makes its path canonical and matches it once against the [`snapshot`] of the
//! configuration; the [`pipeline`] strips what the client may not send (see [`header_rules`])
//! and finds who sent it ([`client_ip`]); [`auth`] checks its token; [`ratelimit`] counts it;
//! [`cache`] may answer it (its [`cache::txn`] carries the request from lookup to stored entry);
//! otherwise it goes to the [`upstream`] group over pooled connections; a write's response
//! [`purge`]s what it changed; errors are answered by [`problem`]. State shared between requests and instances lives
//! behind the [`store`] boundary. [`config`] parses and validates the TOML file; [`server`]
//! binds, serves and drains; [`reload`] swaps configurations; [`admin`] answers operators on a
//! separate listener, including [`metrics`]. [`tls`] reads certificates and keys for listeners
//! and clients alike.

pub mod admin;
pub mod auth;
pub mod cache;
pub mod client_ip;
pub mod config;
pub mod descriptors;
pub mod framing;
pub mod header_rules;
pub mod http_client;
pub mod metrics;
pub mod openapi;
pub mod pipeline;
pub mod problem;
pub mod purge;
pub mod ratelimit;
pub mod reload;
pub mod routing;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod tls;
pub mod trace;
pub mod upstream;
