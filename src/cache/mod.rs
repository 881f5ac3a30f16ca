//! Response caching, RFC 9111 for a shared cache. This is the groundwork the cache tiers will
//! build on, not yet wired into the request path (routes' `cache` sections are still refused):
//!
//! - [`directives`]: `Cache-Control` parsing.
//! - [`freshness`]: whether a response may be stored, its freshness lifetime and initial age.
//! - [`key`]: cache keys (query normalisation, variants, per-user separation).
//! - [`entry`]: the stored response and its versioned binary codec.

pub mod directives;
pub mod entry;
pub mod freshness;
pub mod key;
