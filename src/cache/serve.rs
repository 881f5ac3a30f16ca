//! Serving a stored entry: the client's own conditions (`If-None-Match`, `If-Modified-Since`)
//! and `Range` answered from it, its labels (`Cache-Status`, `X-Cache`, `Age`), and its response
//! head and body. Pure HTTP: the pipeline adds what belongs to the request (request id,
//! rate-limit state) when it sends it.
//!
//! ```text
//! Hit ─┐
//! 304 ─┼─▶ Served { entry, how } ──response()──▶ status, headers, body
//! 5xx ─┘
//! ```

use std::sync::Arc;

use bytes::Bytes;
use http::header::{
    HeaderMap, HeaderValue, AGE, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, TRANSFER_ENCODING,
};
use http::{Method, StatusCode};

use super::entry::Entry;
use super::range::{self, RangeAnswer};
use super::{Cache, CacheRequest, Hit, Tier};
use crate::header_rules::{CACHE_STATUS, X_CACHE};

/// A stored entry chosen to answer a request, and how.
pub struct Served {
    pub entry: Arc<Entry>,
    /// Where the answer comes from, for metrics.
    pub tier: Tier,
    /// The `Cache-Status` value (RFC 9211).
    pub cache_status: String,
    /// `HIT`, `STALE`, `REVALIDATED`.
    pub x_cache: &'static str,
    pub age_secs: u64,
    /// The client's own conditions matched: `304`, no body, no body headers.
    pub not_modified: bool,
    /// `HEAD`: headers only.
    pub head_only: bool,
    /// The part of the body the request's `Range` asks for.
    pub range: RangeAnswer,
}

/// The `Range` asked for lies outside the stored body (`416`, with `Content-Range: bytes */len`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable {
    pub length: u64,
}

impl std::fmt::Display for Unsatisfiable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the requested range is outside the representation's {} bytes",
            self.length
        )
    }
}

impl Served {
    /// A hit (`stale`: inside stale-while-revalidate).
    pub fn hit(request: &CacheRequest<'_>, hit: Hit, stale: bool) -> Served {
        let detail = if stale {
            "; detail=stale-while-revalidate"
        } else {
            ""
        };
        let cache_status = format!("cachegate; hit; ttl={}{detail}", hit.ttl_secs);
        let x_cache = if stale { "STALE" } else { "HIT" };
        Served::new(
            request,
            hit.entry,
            hit.tier,
            hit.age_secs,
            cache_status,
            x_cache,
        )
    }

    /// The entry the origin confirmed with a `304`.
    pub fn revalidated(request: &CacheRequest<'_>, entry: Arc<Entry>) -> Served {
        let ttl = entry.fresh_for_ms / 1000;
        let cache_status = format!("cachegate; fwd=stale; fwd-status=304; stored; ttl={ttl}");
        let age = Cache::age_secs(&entry);
        Served::new(
            request,
            entry,
            Tier::Origin,
            age,
            cache_status,
            "REVALIDATED",
        )
    }

    /// stale-if-error: the kept entry answers for an origin that failed. The client's
    /// conditions are not answered from it (it is not what the origin would say now).
    pub fn stale_on_error(request: &CacheRequest<'_>, entry: Arc<Entry>) -> Served {
        let age = Cache::age_secs(&entry);
        let head_only = *request.method == Method::HEAD;
        Served {
            range: range_of(request, &entry, false),
            // The entry kept in process.
            tier: Tier::Memory,
            cache_status: "cachegate; fwd=stale; detail=stale-if-error".to_owned(),
            x_cache: "STALE",
            age_secs: age,
            not_modified: false,
            head_only,
            entry,
        }
    }

    fn new(
        request: &CacheRequest<'_>,
        entry: Arc<Entry>,
        tier: Tier,
        age_secs: u64,
        cache_status: String,
        x_cache: &'static str,
    ) -> Served {
        let not_modified = not_modified(request.headers, &entry);
        Served {
            tier,
            range: range_of(request, &entry, not_modified),
            cache_status,
            x_cache,
            age_secs,
            not_modified,
            head_only: *request.method == Method::HEAD,
            entry,
        }
    }

    /// The response: the entry's headers (recomputed `Age` and length), the cache labels, and
    /// the body unless HEAD or 304. The stored `Date` is kept: a cache does not rewrite it (RFC
    /// 9110 §6.6.1); `Age` says how old the response is.
    pub fn response(&self) -> Result<http::Response<Option<Bytes>>, Unsatisfiable> {
        let entry = &self.entry;
        let length = entry.body.len() as u64;
        if self.range == RangeAnswer::Unsatisfiable {
            return Err(Unsatisfiable { length });
        }
        let mut headers = HeaderMap::with_capacity(entry.headers.len() + 6);
        for (name, value) in &entry.headers {
            let drop = name == AGE
                || name == TRANSFER_ENCODING
                || name == CONTENT_LENGTH
                || (self.not_modified && name == CONTENT_TYPE);
            if !drop {
                headers.append(name.clone(), value.clone());
            }
        }
        headers.insert(AGE, HeaderValue::from(self.age_secs));
        if let Ok(status) = HeaderValue::from_str(&self.cache_status) {
            headers.insert(CACHE_STATUS, status);
        }
        headers.insert(X_CACHE, HeaderValue::from_static(self.x_cache));
        let (status, body) = match self.range {
            RangeAnswer::Partial { first, last } => {
                if let Ok(range) = HeaderValue::from_str(&format!("bytes {first}-{last}/{length}"))
                {
                    headers.insert(CONTENT_RANGE, range);
                }
                // Bounded by the body's length (see `range::answer`).
                let part = entry.body.slice(first as usize..=last as usize);
                (StatusCode::PARTIAL_CONTENT, part)
            }
            _ if self.not_modified => (StatusCode::NOT_MODIFIED, Bytes::new()),
            _ => (
                StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK),
                entry.body.clone(),
            ),
        };
        if !self.not_modified {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let body = (!(self.not_modified || self.head_only)).then_some(body);
        let mut response = http::Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

/// `If-None-Match` (weak comparison, RFC 9110 §13.1.2) or, without it, `If-Modified-Since`.
fn not_modified(request: &HeaderMap, entry: &Entry) -> bool {
    if let Some(condition) = request.get(IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = entry.headers.get(ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let etag = etag.trim_start_matches("W/");
        return condition
            .split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag);
    }
    let since = request
        .get(IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    let modified = entry
        .headers
        .get(LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    matches!((since, modified), (Some(since), Some(modified)) if modified <= since)
}

/// The part of a stored complete `200` a `GET` asks for with `Range` (RFC 9110 §14).
fn range_of(request: &CacheRequest<'_>, entry: &Entry, not_modified: bool) -> RangeAnswer {
    if *request.method != Method::GET || not_modified || entry.status != 200 {
        return RangeAnswer::Full;
    }
    range::answer(request.headers, &entry.headers, entry.body.len() as u64)
}

/// Replaces a request's `If-None-Match` / `If-Modified-Since` with `entry`'s validators: the
/// upstream request of a revalidation.
pub fn add_validators(entry: &Entry, headers: &mut HeaderMap) {
    headers.remove(IF_NONE_MATCH);
    headers.remove(IF_MODIFIED_SINCE);
    if let Some(etag) = entry.headers.get(ETAG) {
        headers.insert(IF_NONE_MATCH, etag.clone());
    }
    if let Some(modified) = entry.headers.get(LAST_MODIFIED) {
        headers.insert(IF_MODIFIED_SINCE, modified.clone());
    }
}
