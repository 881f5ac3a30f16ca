//! cachegate: a reverse-proxy caching gateway for HTTP CRUD APIs, built on pingora.
//!
//! A request flows one way through the modules: [`routing`] makes its path canonical and
//! matches it against the [`snapshot`] of the configuration, [`proxy`] strips what the client
//! may not send (see [`header_rules`]), [`auth`] checks its token, [`ratelimit`] counts it,
//! [`cache`] may answer it, and otherwise [`proxy`] carries it through pingora's phases to the
//! [`upstream`] group; a write's response [`purge`]s what it changed; errors are answered by
//! [`problem`]. State shared between requests and instances lives behind the [`store`]
//! boundary. [`config`] parses and validates the TOML file; [`server`] starts and stops
//! everything; [`reload`] swaps configurations; [`admin`] answers operators on a separate
//! listener, including [`metrics`].

pub mod admin;
pub mod auth;
pub mod cache;
pub mod config;
pub mod header_rules;
pub mod http_client;
pub mod metrics;
pub mod pipeline;
pub mod problem;
pub mod purge;
pub mod ratelimit;
pub mod reload;
pub mod routing;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod upstream;
