//! A route's per-request policy, compiled once from its `[[routes]]` entry over `[defaults]`:
//! authentication, rate limits, the cache rule, what a write purges, the upgrades it allows.

use super::canonical::PathRules;
use super::template::fold_static;
use crate::auth::AuthPolicy;
use crate::cache::policy::CachePolicy;
use crate::config::{PolicyConfig, RouteConfig, SpanError};
use crate::purge::template::path_params;
use crate::purge::PurgeRule;
use crate::ratelimit::RateLimitPolicy;

/// A route's per-request policy; a request that matches no route gets the table's default.
#[derive(Debug, Default, Clone)]
pub struct Policy {
    pub auth: AuthPolicy,
    pub rate_limit: Option<RateLimitPolicy>,
    pub cache: Option<CachePolicy>,
    /// What a successful write on this route purges besides its own path.
    pub purge: PurgeRule,
    /// Protocols (lower case) a request may ask the origin to upgrade to.
    pub upgrades: Vec<String>,
}

impl Policy {
    /// A route's policy: each section it sets replaces the default's.
    pub(super) fn compile(
        route: Option<&RouteConfig>,
        defaults: &PolicyConfig,
        auth_configured: bool,
        paths: &PathRules,
    ) -> Result<Policy, Vec<SpanError>> {
        let mut errors = Vec::new();
        let params = route.map_or_else(Vec::new, |r| path_params(r.path.get_ref()));
        let auth = route
            .and_then(|r| r.auth.as_ref())
            .or(defaults.auth.as_ref());
        let auth = match auth {
            Some(config) => AuthPolicy::compile(config, auth_configured).unwrap_or_else(|e| {
                errors.extend(e);
                AuthPolicy::default()
            }),
            None => AuthPolicy::default(),
        };
        // Counters are scoped by route name: routes sharing a name share counters.
        let (rate_limit, scope) = match route.and_then(|r| r.rate_limit.as_ref()) {
            Some(config) => (
                Some(config),
                route.map_or("default", RouteConfig::display_name),
            ),
            None => (defaults.rate_limit.as_ref(), "default"),
        };
        let rate_limit = rate_limit.and_then(|config| {
            RateLimitPolicy::compile(config, scope)
                .map_err(|e| errors.extend(e))
                .ok()
        });
        let cache = route
            .and_then(|r| r.cache.as_ref())
            .or(defaults.cache.as_ref())
            .and_then(|config| {
                CachePolicy::compile(config, &params)
                    .map_err(|e| errors.extend(e))
                    .ok()
            });
        let mut purge = route
            .and_then(|r| r.purge.as_ref())
            .or(defaults.purge.as_ref())
            .map(|config| {
                PurgeRule::compile(config, &params).unwrap_or_else(|e| {
                    errors.extend(e);
                    PurgeRule::default()
                })
            })
            .unwrap_or_default();
        // Purge targets are keys: spelled as canonical paths are (`/items/` is `/items`).
        for template in &mut purge.paths {
            template.respell(|text| fold_static(text, paths), paths.ignore_trailing_slash);
        }
        let upgrades = match route
            .and_then(|r| r.upgrades.as_ref())
            .or(defaults.upgrades.as_ref())
        {
            Some(list) => {
                let names: Vec<String> = list
                    .get_ref()
                    .iter()
                    .map(|n| n.to_ascii_lowercase())
                    .collect();
                if names.iter().any(|n| n == "h2c") {
                    errors.push(SpanError::new(
                        list.span(),
                        "`h2c` cannot be allowed: an origin that accepts it would hand the client an HTTP/2 connection past every check of the gateway; clients reach HTTP/2 through the listener instead",
                    ));
                }
                names
            }
            None => vec!["websocket".to_owned()],
        };
        if errors.is_empty() {
            Ok(Policy {
                auth,
                rate_limit,
                cache,
                purge,
                upgrades,
            })
        } else {
            Err(errors)
        }
    }
}
