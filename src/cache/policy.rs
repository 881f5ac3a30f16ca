//! A route's cache rule, compiled from its `cache` section.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use toml::Spanned;

use super::freshness::StoreRule;
use super::key::QueryRule;
use crate::config::{AnonymousCache, CachePolicyConfig, CacheScope, QueryConfig, SpanError};
use crate::purge::template::Template;

const DEFAULT_MAX_OBJECT: u64 = 1024 * 1024;
const DEFAULT_KEEP: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct CachePolicy {
    pub rule: StoreRule,
    /// Freshness for 404/410 when the origin gives none.
    pub negative_ttl: Option<Duration>,
    /// Window past freshness in which an entry answers when the origin fails.
    pub stale_if_error: Option<Duration>,
    /// Window past freshness in which an entry is served while being refreshed in the background.
    pub stale_while_revalidate: Option<Duration>,
    /// Window past freshness in which an entry with validators is kept for revalidation.
    pub keep: Duration,
    /// Request headers that always select a variant (lower case).
    pub vary: Vec<HeaderName>,
    pub query: QueryRule,
    pub scope: CacheScope,
    /// A per-user rule shares one entry among requests without credentials.
    pub anonymous_shared: bool,
    pub max_object: u64,
    pub honor_client_cache_control: bool,
    /// Tags of every stored entry; `{name}` is filled from the route's path.
    pub tags: Vec<Template>,
    /// The targeted cache-control fields the gateway obeys instead of `Cache-Control` (RFC
    /// 9213), most specific first; never passed on to clients.
    pub targeted: Arc<[HeaderName]>,
}

/// The gateway's own targeted field unless `[cache] cache_control_field` names another.
pub const GATEWAY_CACHE_CONTROL: &str = "cachegate-cache-control";

/// The targeted fields for a gateway whose own field is `own`: it, then `CDN-Cache-Control`.
pub fn targeted_fields(own: HeaderName) -> Arc<[HeaderName]> {
    Arc::from([own, HeaderName::from_static("cdn-cache-control")])
}

impl CachePolicy {
    /// Compiles a rule for a route whose path has `params` (none for `[defaults]`).
    pub fn compile(
        config: &Spanned<CachePolicyConfig>,
        params: &[String],
    ) -> Result<CachePolicy, Vec<SpanError>> {
        let c = config.get_ref();
        let mut errors = Vec::new();
        let tags = c
            .tags
            .iter()
            .filter_map(|t| {
                Template::compile(t, params)
                    .map_err(|e| errors.push(e))
                    .ok()
            })
            .collect();
        let mut vary = Vec::new();
        for name in &c.vary {
            match HeaderName::from_bytes(name.trim().as_bytes()) {
                Ok(h) => vary.push(h),
                Err(_) => errors.push(SpanError::new(
                    config.span(),
                    format!("vary: {name:?} is not a header name"),
                )),
            }
        }
        let query = match c.query.as_ref().map(|q| (q.get_ref(), q.span())) {
            None => QueryRule::All,
            Some((QueryConfig::Keyword(k), _)) if k == "all" => QueryRule::All,
            Some((QueryConfig::Keyword(k), _)) if k == "sorted" => QueryRule::Sorted,
            Some((QueryConfig::Keyword(k), _)) if k == "none" => QueryRule::Ignore,
            Some((QueryConfig::Keyword(k), span)) => {
                errors.push(SpanError::new(
                    span,
                    format!("unknown query rule {k:?}: use \"all\", \"sorted\", \"none\" or a list of parameter names"),
                ));
                QueryRule::All
            }
            Some((QueryConfig::Only(names), _)) => QueryRule::Only(names.clone()),
        };
        let statuses = c.statuses.clone();
        if statuses.iter().flatten().any(|s| !(200..=599).contains(s)) {
            errors.push(SpanError::new(
                config.span(),
                "statuses must be final HTTP statuses (200-599)",
            ));
        }
        if c.anonymous == AnonymousCache::Shared && c.scope != CacheScope::User {
            errors.push(SpanError::new(
                config.span(),
                "`anonymous = \"shared\"` applies to per-user rules: add `scope = \"user\"` (a shared rule already serves everyone)",
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let per_user = c.scope == CacheScope::User;
        Ok(CachePolicy {
            rule: StoreRule {
                ttl: c.ttl.map(|d| d.0),
                max_ttl: c.max_ttl.map(|d| d.0),
                statuses,
                honor_origin: c.honor_origin,
                per_user,
                allow_authorized: c.allow_authorized,
                allow_cookies: c.allow_cookies,
                strip_set_cookie: c.strip_set_cookie,
            },
            negative_ttl: c.negative_ttl.map(|d| d.0),
            stale_if_error: c.stale_if_error.map(|d| d.0),
            stale_while_revalidate: c.stale_while_revalidate.map(|d| d.0),
            keep: c.keep.map_or(DEFAULT_KEEP, |d| d.0),
            vary,
            query,
            scope: c.scope,
            anonymous_shared: c.anonymous == AnonymousCache::Shared,
            max_object: c.max_object.map_or(DEFAULT_MAX_OBJECT, |b| b.0),
            honor_client_cache_control: c.honor_client_cache_control.unwrap_or(per_user),
            tags,
            targeted: targeted_fields(HeaderName::from_static(GATEWAY_CACHE_CONTROL)),
        })
    }

    /// The store rule for a response with `status`: 404 and 410 use `negative_ttl` when set.
    pub fn rule_for(&self, status: u16) -> StoreRule {
        match (status, self.negative_ttl) {
            (404 | 410, Some(ttl)) => StoreRule {
                ttl: Some(ttl),
                ..self.rule.clone()
            },
            _ => self.rule.clone(),
        }
    }
}
