//! Schema of the `[cache]` table (the in-process tier) and of the per-route `cache` rule.

use serde::Deserialize;
use toml::Spanned;

use super::{ByteSize, Dur};

/// The in-process cache tier.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Bytes of responses (headers and bodies) kept in memory; admission and eviction are
    /// TinyUFO (pingora's S3-FIFO with TinyLFU admission), so a scan of cold URLs does not flush
    /// the hot set.
    pub memory_capacity: ByteSize,
    /// Entries larger than this are compressed (zstd) in the shared tier. `"0"` turns
    /// compression off.
    pub compress_above: ByteSize,
    /// The response field addressed to this gateway alone (RFC 9213 targeted cache control):
    /// when an origin sends it, it replaces `CDN-Cache-Control`, which in turn replaces
    /// `Cache-Control` and `Expires`. On routes with a cache rule neither reaches clients.
    #[schemars(with = "String")]
    pub cache_control_field: Spanned<String>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            memory_capacity: ByteSize(256 * 1024 * 1024),
            compress_above: ByteSize(4 * 1024),
            cache_control_field: Spanned::new(0..0, "Cachegate-Cache-Control".to_owned()),
        }
    }
}

/// What of the query string separates entries.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum QueryConfig {
    /// `"all"` (in the order sent), `"sorted"` or `"none"`.
    Keyword(String),
    /// Only these parameters, sorted.
    Only(Vec<String>),
}

/// Who an entry may be served to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    /// Everyone.
    #[default]
    Shared,
    /// Only the user (token subject) whose request filled it; requests without a user follow
    /// `anonymous`.
    User,
}

/// What a `scope = "user"` rule does with requests that carry no user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AnonymousCache {
    /// They bypass the cache.
    #[default]
    Bypass,
    /// Requests with no credentials at all (no `Authorization`, no `Cookie`) share one entry:
    /// for reads that work with or without a token (`auth = "optional"`), where the anonymous
    /// answer is the same for every anonymous caller. Not for routes whose origin tells callers
    /// apart by anything else (an API-key header, the client's address).
    Shared,
}

/// A route's `cache` rule. Only GET and HEAD are served from cache; HEAD from a stored GET.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CachePolicyConfig {
    /// Freshness when the origin gives none. Unset: store only what the origin marks fresh.
    pub ttl: Option<Dur>,
    /// Cap on any freshness lifetime, the origin's included.
    pub max_ttl: Option<Dur>,
    /// Freshness for 404 and 410 when the origin gives none (instead of `ttl`).
    pub negative_ttl: Option<Dur>,
    /// How long past freshness an entry may still be served when the origin cannot be reached
    /// or times out (RFC 5861 stale-if-error).
    pub stale_if_error: Option<Dur>,
    /// How long past freshness an entry is served at once while one background request
    /// refreshes it (RFC 5861 stale-while-revalidate).
    pub stale_while_revalidate: Option<Dur>,
    /// How long past freshness an entry with a validator (`ETag`, `Last-Modified`) is kept so
    /// it can be revalidated with a conditional request instead of refetched. Default 10m.
    pub keep: Option<Dur>,
    /// Request headers that select a variant, besides the origin's own `Vary`.
    #[serde(default)]
    pub vary: Vec<String>,
    /// `"all"` (default: every parameter, in the order sent), `"sorted"`, `"none"`, or a list of
    /// parameter names.
    #[schemars(with = "Option<QueryConfig>")]
    pub query: Option<Spanned<QueryConfig>>,
    #[serde(default)]
    pub scope: CacheScope,
    /// With `scope = "user"`: `"bypass"` (default) or `"shared"` (see [`AnonymousCache`]).
    #[serde(default)]
    pub anonymous: AnonymousCache,
    /// Let the origin's `Cache-Control` and `Expires` decide freshness (RFC 9111).
    #[serde(default = "super::default_true")]
    pub honor_origin: bool,
    /// Larger responses pass through uncached, streamed as usual.
    pub max_object: Option<ByteSize>,
    /// Statuses that may be stored.
    pub statuses: Option<Vec<u16>>,
    /// Store shared entries from requests that carry `Authorization` (content the gateway itself
    /// authorised). Without it such requests bypass the cache.
    #[serde(default)]
    pub allow_authorized: bool,
    /// Serve and fill shared entries for requests that carry `Cookie`, for content that does not
    /// depend on cookies. Without it such requests use only entries the origin marked `public`
    /// or gave `s-maxage`, and store only such responses.
    #[serde(default)]
    pub allow_cookies: bool,
    /// Tags of every entry the rule stores (`{name}` is the route's path parameter), which a
    /// write's `purge` rule or the admin API can invalidate together.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub tags: Vec<Spanned<String>>,
    /// Store responses with `Set-Cookie`, without the cookie. Without it they are not stored.
    #[serde(default)]
    pub strip_set_cookie: bool,
    /// Honour a client's `Cache-Control: no-cache` / `no-store` (skip the cache). Default: only
    /// on per-user routes, so clients cannot make a shared route's origin do extra work.
    pub honor_client_cache_control: Option<bool>,
}
