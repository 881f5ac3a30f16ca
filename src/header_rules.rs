//! Header names the gateway owns, and the request header families it treats specially: shared
//! by the error writer, the request sanitiser ([`crate::pipeline`]) and the cache (which must never
//! store an answer one of them changed).

use http::HeaderName;

/// The request id, set in both directions.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The rate-limit headers of draft-ietf-httpapi-ratelimit-headers.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Headers that make some origins (or their frameworks' middleware) act on another method or URL
/// than the request line's: a route's auth, limits and cache key would judge one request while
/// the origin served another. Removed unless `[server] forward_override_headers` names them (or
/// a cached route's `vary` keys on them).
pub const OVERRIDE_HEADERS: [&str; 6] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    "x-original-method",
];

/// Headers that describe the client's connection. Only the gateway, or a trusted proxy in
/// front of it, may set them; from anyone else they are removed (and the gateway sets its own).
pub const FORWARDING_HEADERS: [&str; 13] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-scheme",
    "x-forwarded-server",
    "x-forwarded-ssl",
    "x-forwarded-uri",
    "x-real-ip",
    "x-host",
    "x-original-host",
];

/// Headers whose underscore spelling is removed too, besides the families above and the
/// gateway's claim headers: `X_User_Id` reaches WSGI, CGI and Rack origins as `X-User-Id`.
pub const UNDERSCORE_GUARDED: [&str; 5] = [
    "x-request-id",
    "authorization",
    "host",
    "content-length",
    "transfer-encoding",
];

/// `Cache-Status` (RFC 9211) on every response of a cached route.
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// `X-Cache`: `HIT`, `MISS`, `STALE`, `REVALIDATED`, `BYPASS`, for humans and old tooling.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
