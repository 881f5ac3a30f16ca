//! Which requests the cache takes, and under what key: the method, the route's scope and the
//! request's credentials, a body, override headers, the client's own `no-cache` — decided from
//! the request alone, before any tier is read (`cachegate explain` reports exactly this).

use http::header::COOKIE;
use http::Method;

use super::directives::CacheControl;
use super::key::{CacheKey, KeyParts};
use super::policy::CachePolicy;
use super::{Bounds, Bypass, Cache, CacheRequest};
use crate::config::CacheScope;
use crate::header_rules::OVERRIDE_HEADERS;

impl Cache {
    pub(super) fn primary_key(policy: &CachePolicy, request: &CacheRequest<'_>) -> CacheKey {
        CacheKey::primary(&KeyParts {
            scheme: request.scheme,
            host: request.host,
            path: request.path,
            query: request.query,
            query_rule: &policy.query,
            user: match policy.scope {
                CacheScope::User => request.user,
                CacheScope::Shared => None,
            },
        })
    }

    /// Whether the cache applies to a request under `policy`: its primary key, or why not (the
    /// `Bypass` reason). Decided from the request alone, before any tier is read; `cachegate
    /// explain` reports exactly this.
    pub fn admit(policy: &CachePolicy, request: &CacheRequest<'_>) -> Result<CacheKey, Bypass> {
        if *request.method != Method::GET && *request.method != Method::HEAD {
            return Err(Bypass::Method);
        }
        if policy.scope == CacheScope::User
            && request.user.is_none()
            && !(policy.anonymous_shared && request.carries_no_credentials())
        {
            return Err(Bypass::Anonymous);
        }
        if request.has_body {
            return Err(Bypass::Body);
        }
        // An override header the origin is allowed to see (`[server] forward_override_headers`)
        // changes its answer: unless the rule keys on it, the cache stays out of the way.
        // One pass over the request's few names (a lookup per override name would parse and
        // hash six names on every hit).
        let unkeyed_override = request
            .headers
            .keys()
            .any(|name| OVERRIDE_HEADERS.contains(&name.as_str()) && !policy.vary.contains(name));
        if unkeyed_override {
            return Err(Bypass::OverrideHeader);
        }
        if policy.honor_client_cache_control {
            let cc = CacheControl::parse(request.headers);
            if cc.no_cache || cc.no_store {
                return Err(Bypass::ClientNoCache);
            }
        }
        Ok(Cache::primary_key(policy, request))
    }

    /// Which shared entries an admitted request may be answered with (`cachegate explain`
    /// reports the same).
    pub fn bounds(policy: &CachePolicy, request: &CacheRequest<'_>) -> Bounds {
        Bounds {
            // §3.5: a request with credentials may be answered only by an entry whose origin
            // said any client may have it (`public`, `s-maxage`, `must-revalidate`) — unless
            // the rule makes entries per user or declares the route's authorised content shared.
            authorized: request.authorized
                && !(policy.rule.per_user || policy.rule.allow_authorized),
            // A request with a cookie may be served only what the origin said is for everyone.
            cookie: request.headers.contains_key(COOKIE)
                && policy.scope == CacheScope::Shared
                && !policy.rule.allow_cookies,
        }
    }
}
