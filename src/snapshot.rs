//! The compiled configuration a request runs on: an immutable [`Snapshot`] of the route table,
//! the upstream group and the limits.
//!
//! A request takes the current snapshot once, when `Gateway::handle` builds its `RequestCtx`, and
//! keeps it to the end, so a reload that swaps in a new snapshot never changes the rules under a
//! request in flight.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::Authenticator;
use crate::client_ip::TrustedProxies;
use crate::config::{ConfigErrors, LoadedConfig, SpanError};
use crate::routing::canonical::PathRules;
use crate::routing::RouteTable;
use crate::upstream::{Resolve, UpstreamGroup};
use http::HeaderName;

#[derive(Debug)]
pub struct Limits {
    pub max_request_header_bytes: u64,
    pub max_request_body_bytes: u64,
    /// The slowest a request body may arrive; `None` for no minimum.
    pub min_request_body_rate: Option<crate::upstream::body::MinRate>,
}

#[derive(Debug)]
pub struct Snapshot {
    pub routes: RouteTable,
    /// Present when the configuration has an `[auth]` table.
    pub auth: Option<Arc<Authenticator>>,
    pub upstream: UpstreamGroup,
    pub limits: Limits,
    /// Who may tell us the client's address.
    pub trusted_proxies: TrustedProxies,
    /// The token that authorises `PURGE` requests on the main listeners, when they are on.
    pub purge_method_token: Option<String>,
    /// Override headers passed to the origin (lower case).
    pub forward_override_headers: Vec<String>,
}

impl Snapshot {
    /// Validates and compiles a parsed configuration to run; every error found points into its
    /// file.
    pub fn compile(loaded: &LoadedConfig) -> Result<Snapshot, ConfigErrors> {
        Snapshot::compile_resolving(loaded, Resolve::Now)
    }

    /// [`Snapshot::compile`], upstream host names resolved or not (see [`Resolve`]).
    pub fn compile_resolving(
        loaded: &LoadedConfig,
        names: Resolve,
    ) -> Result<Snapshot, ConfigErrors> {
        let config = &loaded.config;
        let mut errors = loaded.validate();
        let auth = match &config.auth {
            Some(auth) => Authenticator::compile(auth.get_ref())
                .map(|a| Some(Arc::new(a)))
                .map_err(|e| errors.extend(e)),
            None => Ok(None),
        };
        let routes = RouteTable::compile(
            &config.routes,
            &config.defaults,
            config.auth.is_some(),
            PathRules::from_config(&config.server),
        )
        .map_err(|e| errors.extend(e));
        let field = &config.cache.cache_control_field;
        let routes = match HeaderName::from_bytes(field.get_ref().trim().as_bytes()) {
            Ok(name) => routes.map(|mut routes| {
                routes.target_cache_control(&crate::cache::policy::targeted_fields(name));
                routes
            }),
            Err(_) => {
                errors.push(SpanError::new(
                    field.span(),
                    format!(
                        "cache_control_field: {:?} is not a header name",
                        field.get_ref()
                    ),
                ));
                Err(())
            }
        };
        let upstream =
            UpstreamGroup::compile(&config.upstream, names).map_err(|e| errors.extend(e));
        match (routes, upstream, auth) {
            (Ok(routes), Ok(upstream), Ok(auth)) if errors.is_empty() => Ok(Snapshot {
                routes,
                auth,
                upstream,
                limits: Limits {
                    max_request_header_bytes: config.limits.max_request_header_bytes.get_ref().0,
                    max_request_body_bytes: config.limits.max_request_body_bytes.0,
                    min_request_body_rate: (config.limits.min_request_body_rate.0 > 0).then_some(
                        crate::upstream::body::MinRate {
                            bytes_per_second: config.limits.min_request_body_rate.0,
                            grace: config.limits.request_head_timeout.0,
                        },
                    ),
                },
                trusted_proxies: TrustedProxies::compile(&config.server.trusted_proxies),
                purge_method_token: config
                    .admin
                    .as_ref()
                    .filter(|a| a.purge_method.as_ref().is_some_and(|p| *p.get_ref()))
                    .and_then(|a| a.token.as_ref())
                    .map(|t| t.as_str().to_owned()),
                forward_override_headers: config
                    .server
                    .forward_override_headers
                    .iter()
                    .map(|h| h.trim().to_ascii_lowercase())
                    .collect(),
            }),
            _ => {
                errors.sort_by_key(|e| e.span.start);
                Err(loaded.errors(errors))
            }
        }
    }
}

/// Reads, validates and compiles a configuration file to run; its warnings are logged.
pub fn load(path: &Path) -> Result<(LoadedConfig, Snapshot), ConfigErrors> {
    let loaded = LoadedConfig::from_file(path)?;
    let snapshot = Snapshot::compile(&loaded)?;
    for warning in &warnings(&loaded, &snapshot).0 {
        tracing::warn!("{warning}");
    }
    Ok((loaded, snapshot))
}

/// What `cachegate check` runs: [`load`] without resolving upstream host names, so a file can
/// be checked offline or away from the network it runs in. Returns the warnings too.
pub fn check(path: &Path) -> Result<(Snapshot, ConfigErrors), ConfigErrors> {
    let loaded = LoadedConfig::from_file(path)?;
    let snapshot = Snapshot::compile_resolving(&loaded, Resolve::Never)?;
    let warnings = warnings(&loaded, &snapshot);
    Ok((snapshot, warnings))
}

/// What a valid configuration likely does not mean, located in its file.
fn warnings(loaded: &LoadedConfig, snapshot: &Snapshot) -> ConfigErrors {
    loaded.errors(snapshot.routes.warnings.clone())
}

/// The snapshot currently in force, shared by every request.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;
