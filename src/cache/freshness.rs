//! RFC 9111 for a shared cache: whether a response may be stored (§3), how long it stays fresh
//! (§4.2.1) and how old it already is (§4.2.3).

use std::time::{Duration, SystemTime};

use http::header::{HeaderMap, AGE, COOKIE, DATE, EXPIRES, LAST_MODIFIED, SET_COOKIE, VARY};
use http::Method;

use super::directives::{delta_seconds, CacheControl, MAX_DELTA};

/// What a route's cache rule says about storing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRule {
    /// Freshness when the origin gives none. `None`: pure RFC 9111 mode, store only what the
    /// origin marks fresh.
    pub ttl: Option<Duration>,
    /// Upper bound on any freshness lifetime, the origin's included.
    pub max_ttl: Option<Duration>,
    /// Statuses that may be stored, when the rule lists them (the rule wins). `None`: RFC 9111
    /// §3 — any final status with explicit freshness, and only the heuristically cacheable ones
    /// ([`HEURISTICALLY_CACHEABLE`]) with a rule `ttl` or heuristic freshness.
    pub statuses: Option<Vec<u16>>,
    /// Let the origin's `Cache-Control` / `Expires` decide freshness (else only `ttl` does).
    pub honor_origin: bool,
    /// Entries are per user (keyed by the token's subject), so `private` responses and
    /// requests carrying `Authorization` may be stored.
    pub per_user: bool,
    /// Shared entries may come from requests carrying `Authorization` (content the gateway
    /// itself authorised).
    pub allow_authorized: bool,
    /// Shared entries may come from requests carrying `Cookie`.
    pub allow_cookies: bool,
    /// Store responses with `Set-Cookie` after removing it (else they are not stored).
    pub strip_set_cookie: bool,
}

/// Statuses RFC 9110 §15.1 lets a cache give heuristic freshness (206 left out: the gateway
/// stores complete representations only).
pub const HEURISTICALLY_CACHEABLE: [u16; 11] =
    [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// The statuses the gateway understands, for `must-understand` (§5.2.2.3): those RFC 9110
/// defines whose responses it can store and serve whole (not 206, not 304).
const UNDERSTOOD: [u16; 39] = [
    200, 201, 202, 203, 204, 205, 300, 301, 302, 303, 305, 307, 308, 400, 401, 402, 403, 404, 405,
    406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 421, 422, 426, 500, 501, 502, 503,
    504,
];

/// The most freshness a response gets from its `Last-Modified` alone (§4.2.2 heuristic).
pub const MAX_HEURISTIC: Duration = Duration::from_secs(24 * 3600);

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    Method,
    Status(u16),
    NoStore,
    Private,
    Authorized,
    /// A shared rule, a request with `Cookie`, and nothing saying the answer is for everyone.
    Cookie,
    VaryStar,
    SetCookie,
    /// Neither the origin nor the rule gives it a freshness lifetime.
    NoFreshness,
}

/// A request and the response to it, as the storing decision sees them.
#[derive(Debug, Clone, Copy)]
pub struct Exchange<'a> {
    pub method: &'a Method,
    pub request: &'a HeaderMap,
    /// The request was authorised: it carried `Authorization`, or the gateway verified a token
    /// (which may have come from a cookie, or been removed before the origin saw it).
    pub authorized: bool,
    pub request_cc: &'a CacheControl,
    pub status: u16,
    pub response: &'a HeaderMap,
    pub response_cc: &'a CacheControl,
}

/// Decides whether a response may be stored under `rule`, and for how long it is fresh if so.
pub fn storable(
    exchange: &Exchange<'_>,
    rule: &StoreRule,
    now: SystemTime,
) -> Result<Duration, NotStorable> {
    let Exchange {
        method,
        request,
        authorized,
        request_cc,
        status,
        response,
        response_cc,
    } = *exchange;
    // HEAD is answered from a stored GET; only GET responses carry the body to store.
    if *method != Method::GET {
        return Err(NotStorable::Method);
    }
    // 206 and 304 are never stored as a representation; `must-understand` limits storing to
    // the statuses the gateway understands, and then overrides `no-store` (§5.2.2.3).
    if status == 206
        || status == 304
        || (response_cc.must_understand && !UNDERSTOOD.contains(&status))
    {
        return Err(NotStorable::Status(status));
    }
    let explicit = origin_freshness(response, response_cc, rule, now);
    let status_allowed = match &rule.statuses {
        Some(listed) => listed.contains(&status),
        None => {
            explicit.is_some() || HEURISTICALLY_CACHEABLE.contains(&status) || response_cc.public
        }
    };
    if !status_allowed {
        return Err(NotStorable::Status(status));
    }
    if (response_cc.no_store && !response_cc.must_understand) || request_cc.no_store {
        return Err(NotStorable::NoStore);
    }
    if response_cc.private && !rule.per_user {
        return Err(NotStorable::Private);
    }
    // §3.5: a shared cache stores an authorised response only when the origin explicitly allows
    // it, or when the gateway's own rule says the content is shared (it did the authorising).
    if authorized
        && !(rule.per_user || rule.allow_authorized || shared_despite_authorization(response_cc))
    {
        return Err(NotStorable::Authorized);
    }
    // A cookie may select a user's answer the origin does not mark private; only what the origin
    // says is for everyone (`public`, `s-maxage`) is shared with other clients.
    if request.contains_key(COOKIE)
        && !rule.per_user
        && !rule.allow_cookies
        && !shared_for_everyone(response_cc)
    {
        return Err(NotStorable::Cookie);
    }
    let vary_star = response
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|f| f.trim() == "*"));
    if vary_star {
        return Err(NotStorable::VaryStar);
    }
    if response.contains_key(SET_COOKIE) && !rule.strip_set_cookie {
        return Err(NotStorable::SetCookie);
    }
    let lifetime = explicit
        .or_else(|| heuristic_freshness(response, rule, now))
        .map(|lifetime| cap(lifetime, rule))
        .ok_or(NotStorable::NoFreshness)?;
    // A zero lifetime is still worth storing when it can be revalidated (`no-cache`, or
    // validators) — the entry then serves conditional revalidations.
    if lifetime.is_zero() && !(response_cc.no_cache || has_validator(response)) {
        return Err(NotStorable::NoFreshness);
    }
    Ok(lifetime)
}

/// §3.5: the origin lets a shared cache store (and reuse for anyone) its answer to a request
/// with credentials: `public`, `s-maxage` or `must-revalidate`.
pub fn shared_despite_authorization(cc: &CacheControl) -> bool {
    cc.public || cc.s_maxage.is_some() || cc.must_revalidate
}

/// The origin says a response is for every client, cookies or not: `public` or `s-maxage`.
pub fn shared_for_everyone(cc: &CacheControl) -> bool {
    cc.public || cc.s_maxage.is_some()
}

fn has_validator(response: &HeaderMap) -> bool {
    response.contains_key(http::header::ETAG) || response.contains_key(http::header::LAST_MODIFIED)
}

fn http_date(headers: &HeaderMap, name: http::header::HeaderName) -> Option<SystemTime> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
}

/// §4.2.1 for a shared cache: `s-maxage`, then `max-age`, then `Expires - Date`; the rule's
/// `ttl` or the `Last-Modified` heuristic when the origin says nothing (or is not honoured);
/// capped by `max_ttl`.
pub fn freshness_lifetime(
    response: &HeaderMap,
    cc: &CacheControl,
    rule: &StoreRule,
    now: SystemTime,
) -> Option<Duration> {
    origin_freshness(response, cc, rule, now)
        .or_else(|| heuristic_freshness(response, rule, now))
        .map(|lifetime| cap(lifetime, rule))
}

/// The origin's explicit freshness (§4.2.1), when the rule honours it.
fn origin_freshness(
    response: &HeaderMap,
    cc: &CacheControl,
    rule: &StoreRule,
    now: SystemTime,
) -> Option<Duration> {
    if !rule.honor_origin {
        return None;
    }
    let expires = if cc.targeted {
        None
    } else {
        response.get(EXPIRES)
    };
    cc.s_maxage.or(cc.max_age).or_else(|| {
        expires.map(|_| {
            // An invalid Expires (like "0") means already expired (§5.3).
            let expires = http_date(response, EXPIRES).unwrap_or(SystemTime::UNIX_EPOCH);
            let date = http_date(response, DATE).unwrap_or(now);
            expires.duration_since(date).unwrap_or(Duration::ZERO)
        })
    })
}

/// Freshness when the origin gives none: the rule's `ttl`; without one (pure RFC 9111 mode),
/// 10% of the time since `Last-Modified` (§4.2.2), at most [`MAX_HEURISTIC`].
fn heuristic_freshness(
    response: &HeaderMap,
    rule: &StoreRule,
    now: SystemTime,
) -> Option<Duration> {
    if rule.ttl.is_some() {
        return rule.ttl;
    }
    let modified = http_date(response, LAST_MODIFIED)?;
    let date = http_date(response, DATE).unwrap_or(now);
    let since = date.duration_since(modified).ok()?;
    Some((since / 10).min(MAX_HEURISTIC))
}

fn cap(lifetime: Duration, rule: &StoreRule) -> Duration {
    let lifetime = lifetime.min(MAX_DELTA);
    match rule.max_ttl {
        Some(max) => lifetime.min(max),
        None => lifetime,
    }
}

/// §4.2.3: the age of a response when it arrived, from its `Age` and `Date` headers and the
/// times the request was sent and the response received.
pub fn initial_age(
    response: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let date = http_date(response, DATE).unwrap_or(response_time);
    // Ages are whole seconds (§1.2.2), and `Date` is truncated to the second: without the floor a
    // response would look up to a second old the moment it arrives.
    let apparent_age = Duration::from_secs(
        response_time
            .duration_since(date)
            .unwrap_or(Duration::ZERO)
            .as_secs(),
    );
    let age_value = match response.get(AGE) {
        None => Duration::ZERO,
        Some(value) => age_field(value),
    };
    let response_delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    apparent_age
        .max(age_value.saturating_add(response_delay))
        .min(MAX_DELTA)
}

/// An `Age` value (§5.1): of a list (`Age: 1, 2`) the first member counts. A value that is not
/// a non-negative integer (`3a`, `-1`, `1.5`) is ignored, as §5.1 says a cache should.
fn age_field(value: &http::HeaderValue) -> Duration {
    value
        .to_str()
        .ok()
        .and_then(|v| v.split(',').next())
        .and_then(|first| {
            let first = first.trim();
            (!first.is_empty() && first.bytes().all(|b| b.is_ascii_digit()))
                .then(|| delta_seconds(first))
                .flatten()
        })
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    fn rule() -> StoreRule {
        StoreRule {
            ttl: Some(Duration::from_secs(60)),
            max_ttl: Some(Duration::from_secs(3600)),
            statuses: Some(vec![200, 404]),
            honor_origin: true,
            per_user: false,
            allow_authorized: false,
            allow_cookies: false,
            strip_set_cookie: false,
        }
    }

    fn check(
        req: &[(&str, &str)],
        status: u16,
        resp: &[(&str, &str)],
        rule: &StoreRule,
    ) -> Result<Duration, NotStorable> {
        let (req, resp) = (headers(req), headers(resp));
        let exchange = Exchange {
            method: &Method::GET,
            request: &req,
            authorized: req.contains_key(http::header::AUTHORIZATION),
            request_cc: &CacheControl::parse(&req),
            status,
            response: &resp,
            response_cc: &CacheControl::parse(&resp),
        };
        storable(&exchange, rule, SystemTime::now())
    }

    #[test]
    fn origin_freshness_wins_then_rule_ttl_then_the_cap() {
        let r = rule();
        assert_eq!(
            check(
                &[],
                200,
                &[("cache-control", "max-age=10, s-maxage=20")],
                &r
            ),
            Ok(Duration::from_secs(20))
        );
        assert_eq!(
            check(&[], 200, &[("cache-control", "max-age=10")], &r),
            Ok(Duration::from_secs(10))
        );
        assert_eq!(
            check(&[], 200, &[], &r),
            Ok(Duration::from_secs(60)),
            "rule ttl when the origin is silent"
        );
        assert_eq!(
            check(&[], 200, &[("cache-control", "max-age=999999")], &r),
            Ok(Duration::from_secs(3600))
        );
        let date = httpdate::fmt_http_date(SystemTime::now());
        let expires = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let lifetime = check(&[], 200, &[("date", &date), ("expires", &expires)], &r).unwrap();
        assert!((119..=121).contains(&lifetime.as_secs()), "{lifetime:?}");
        assert_eq!(
            check(&[], 200, &[("expires", "0")], &r),
            Err(NotStorable::NoFreshness),
            "an invalid Expires is already expired"
        );
        let pure = StoreRule {
            ttl: None,
            ..rule()
        };
        assert_eq!(
            check(&[], 200, &[], &pure),
            Err(NotStorable::NoFreshness),
            "pure RFC mode stores only what is marked fresh"
        );
        let ignoring = StoreRule {
            honor_origin: false,
            ..rule()
        };
        assert_eq!(
            check(&[], 200, &[("cache-control", "max-age=5")], &ignoring),
            Ok(Duration::from_secs(60))
        );
    }

    #[test]
    fn what_a_shared_cache_never_stores() {
        let r = rule();
        assert_eq!(check(&[], 500, &[], &r), Err(NotStorable::Status(500)));
        assert_eq!(
            check(&[], 200, &[("cache-control", "no-store")], &r),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            check(&[("cache-control", "no-store")], 200, &[], &r),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            check(&[], 200, &[("cache-control", "private, max-age=60")], &r),
            Err(NotStorable::Private)
        );
        assert_eq!(
            check(&[], 200, &[("vary", "accept, *")], &r),
            Err(NotStorable::VaryStar)
        );
        assert_eq!(
            check(&[], 200, &[("set-cookie", "a=1")], &r),
            Err(NotStorable::SetCookie)
        );
        assert_eq!(
            check(&[("authorization", "Bearer x")], 200, &[], &r),
            Err(NotStorable::Authorized)
        );
        assert!(check(
            &[("authorization", "Bearer x")],
            200,
            &[("cache-control", "public, max-age=5")],
            &r
        )
        .is_ok());
        assert_eq!(
            check(&[("cookie", "session=alice")], 200, &[], &r),
            Err(NotStorable::Cookie),
            "a cookie may have selected a user's answer"
        );
        for shared in ["public", "s-maxage=30"] {
            assert!(check(&[("cookie", "a=1")], 200, &[("cache-control", shared)], &r).is_ok());
        }
        let cookies_allowed = StoreRule {
            allow_cookies: true,
            ..rule()
        };
        assert!(check(&[("cookie", "a=1")], 200, &[], &cookies_allowed).is_ok());
        let per_user = StoreRule {
            per_user: true,
            ..rule()
        };
        assert!(check(
            &[("authorization", "Bearer x")],
            200,
            &[("cache-control", "private, max-age=5")],
            &per_user
        )
        .is_ok());
        let stripping = StoreRule {
            strip_set_cookie: true,
            ..rule()
        };
        assert!(check(&[], 200, &[("set-cookie", "a=1")], &stripping).is_ok());
        assert_eq!(
            check(
                &[],
                200,
                &[("cache-control", "no-cache, max-age=0"), ("etag", "\"v1\"")],
                &r
            ),
            Ok(Duration::ZERO),
            "no-cache is stored, to be revalidated before each reuse"
        );
        let empty = HeaderMap::new();
        let none = CacheControl::default();
        let exchange = Exchange {
            method: &Method::HEAD,
            request: &empty,
            authorized: false,
            request_cc: &none,
            status: 200,
            response: &empty,
            response_cc: &none,
        };
        let head = storable(&exchange, &r, SystemTime::now());
        assert_eq!(head, Err(NotStorable::Method));
    }

    #[test]
    fn age_counts_the_origin_age_and_the_trip() {
        let sent = SystemTime::now();
        let received = sent + Duration::from_secs(2);
        let resp = headers(&[("age", "30"), ("date", &httpdate::fmt_http_date(received))]);
        assert_eq!(initial_age(&resp, sent, received), Duration::from_secs(32));
        let old_date = headers(&[(
            "date",
            &httpdate::fmt_http_date(received - Duration::from_secs(100)),
        )]);
        assert_eq!(initial_age(&old_date, sent, received).as_secs(), 100);
    }
}
