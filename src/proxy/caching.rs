//! The cache phase's glue: look up after rate limiting, answer hits (and `304`s) directly, and on
//! a miss capture the streamed response for the cache.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{
    HeaderName, AGE, CONTENT_LENGTH, CONTENT_TYPE, ETAG, HOST, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    LAST_MODIFIED, TRANSFER_ENCODING,
};
use http::Method;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use super::{RequestCtx, REQUEST_ID};
use crate::cache::entry::Entry;
use crate::cache::{
    Cache, CacheRequest, Fill, Flight, FlightGuard, Hit, Lookup, SharedWrite, COALESCE_WAIT,
};
use crate::metrics::metrics;

pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Where a request stands with the cache.
#[derive(Default)]
pub enum CachePhase {
    /// The route has no cache rule.
    #[default]
    Off,
    Bypass(&'static str),
    Hit,
    /// Forwarded; `fill` captures the response when it may be stored.
    Miss {
        primary: crate::cache::key::CacheKey,
        sent_at: SystemTime,
        fill: Option<Box<Fill>>,
        /// Held while this request leads the fetch for its key; dropped at the end.
        flight: Option<FlightGuard>,
        /// An entry past freshness but inside its stale-if-error window.
        stale: Option<Arc<Entry>>,
        /// Stored in process; to be written to the shared tier when the request ends.
        shared_write: Option<SharedWrite>,
    },
}

impl CachePhase {
    /// For the access log.
    pub fn label(&self) -> &'static str {
        match self {
            CachePhase::Off => "-",
            CachePhase::Bypass(_) => "bypass",
            CachePhase::Hit => "hit",
            CachePhase::Miss { .. } => "miss",
        }
    }
}

fn cache_request<'a>(session: &'a Session, ctx: &'a RequestCtx) -> CacheRequest<'a> {
    let req = session.req_header();
    CacheRequest {
        method: &req.method,
        host: req
            .headers
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri.authority().map(|a| a.as_str())),
        path: req.uri.path(),
        query: req.uri.query(),
        headers: &req.headers,
        user: ctx.identity.as_ref().and_then(|i| i.subject.as_deref()),
    }
}

/// `If-None-Match` (weak comparison, RFC 9110 §13.1.2) or, without it, `If-Modified-Since`.
fn not_modified(req: &pingora::http::RequestHeader, entry: &Entry) -> bool {
    if let Some(condition) = req.headers.get(IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = entry.headers.get(ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let etag = etag.trim_start_matches("W/");
        return condition
            .split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag);
    }
    let since = req
        .headers
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

/// Looks the request up; answers a hit itself and returns `true`.
pub async fn lookup(cache: &Cache, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
    let snapshot = ctx.snapshot.clone();
    let Some(policy) = &snapshot.routes.policy(ctx.route).cache else {
        return Ok(false);
    };
    let outcome = cache.lookup(policy, &cache_request(session, ctx)).await;
    let route = ctx.route_name();
    match outcome {
        Lookup::Hit(hit) => {
            metrics()
                .cache_results
                .with_label_values(&[route, "hit", hit.tier])
                .inc();
            ctx.cache = CachePhase::Hit;
            serve_hit(session, ctx, hit).await?;
            Ok(true)
        }
        Lookup::Miss { primary, stale } => {
            let flight = match cache.join_flight(&primary) {
                Flight::Leader(guard) => Some(guard),
                Flight::Follower(mut done) => {
                    // Another request is fetching this resource: wait for it (bounded), then
                    // look again. Its sender is dropped when it ends, stored or not.
                    let _ = tokio::time::timeout(COALESCE_WAIT, done.changed()).await;
                    if let Lookup::Hit(hit) =
                        cache.lookup(policy, &cache_request(session, ctx)).await
                    {
                        metrics()
                            .cache_results
                            .with_label_values(&[route, "hit", "coalesced"])
                            .inc();
                        ctx.cache = CachePhase::Hit;
                        serve_hit(session, ctx, hit).await?;
                        return Ok(true);
                    }
                    None
                }
            };
            metrics()
                .cache_results
                .with_label_values(&[route, "miss", "memory"])
                .inc();
            ctx.cache = CachePhase::Miss {
                primary,
                sent_at: SystemTime::now(),
                fill: None,
                flight,
                stale,
                shared_write: None,
            };
            Ok(false)
        }
        Lookup::Bypass(reason) => {
            metrics()
                .cache_results
                .with_label_values(&[route, "bypass", "-"])
                .inc();
            ctx.cache = CachePhase::Bypass(reason);
            Ok(false)
        }
    }
}

/// How a stored entry is being served, for its labels.
struct Serving<'a> {
    status: u16,
    age_secs: u64,
    cache_status: &'a str,
    x_cache: &'static str,
    /// `304`: no body, no body headers.
    not_modified: bool,
}

/// Writes a stored entry as the response: its headers (recomputed `Age` and length), the cache
/// labels, the request id and rate-limit headers, and the body unless HEAD or 304.
async fn write_entry(
    session: &mut Session,
    ctx: &RequestCtx,
    entry: &Entry,
    serving: Serving<'_>,
) -> Result<()> {
    let mut header = ResponseHeader::build(serving.status, Some(entry.headers.len() + 6))?;
    for (name, value) in &entry.headers {
        let drop = name == AGE
            || name == TRANSFER_ENCODING
            || name == CONTENT_LENGTH
            || (serving.not_modified && name == CONTENT_TYPE);
        if !drop {
            header.append_header(name.clone(), value.clone())?;
        }
    }
    header.insert_header(AGE, serving.age_secs.to_string())?;
    header.insert_header(CACHE_STATUS, serving.cache_status)?;
    header.insert_header(X_CACHE, serving.x_cache)?;
    header.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
    super::insert_rate_limit_headers(ctx, &mut header)?;
    if !serving.not_modified {
        header.insert_header(CONTENT_LENGTH, entry.body.len().to_string())?;
    }
    let no_body = serving.not_modified
        || session.req_header().method == Method::HEAD
        || entry.body.is_empty();
    session
        .write_response_header(Box::new(header), no_body)
        .await?;
    if !no_body {
        session
            .write_response_body(Some(entry.body.clone()), true)
            .await?;
    }
    Ok(())
}

async fn serve_hit(session: &mut Session, ctx: &RequestCtx, hit: Hit) -> Result<()> {
    let unchanged = not_modified(session.req_header(), &hit.entry);
    let cache_status = format!("cachegate; hit; ttl={}", hit.ttl_secs);
    let serving = Serving {
        status: if unchanged { 304 } else { hit.entry.status },
        age_secs: hit.age_secs,
        cache_status: &cache_status,
        x_cache: "HIT",
        not_modified: unchanged,
    };
    write_entry(session, ctx, &hit.entry, serving).await
}

/// stale-if-error: when the origin could not be reached or timed out (`status` 502 or 504) and
/// no response has started, answers with the stale entry kept for that. Returns whether it did.
pub async fn serve_stale_on_error(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
) -> Result<bool> {
    if !matches!(status, 502 | 504) || session.response_written().is_some() {
        return Ok(false);
    }
    let CachePhase::Miss {
        stale: Some(entry), ..
    } = &ctx.cache
    else {
        return Ok(false);
    };
    let entry = entry.clone();
    metrics()
        .cache_results
        .with_label_values(&[ctx.route_name(), "stale", "memory"])
        .inc();
    let serving = Serving {
        status: entry.status,
        age_secs: Cache::age_secs(&entry),
        cache_status: "cachegate; fwd=stale; detail=stale-if-error",
        x_cache: "STALE",
        not_modified: false,
    };
    write_entry(session, ctx, &entry, serving).await?;
    Ok(true)
}

/// On a miss, decides from the origin's response whether to capture it, and labels the
/// response for the client (`Cache-Status`, `X-Cache`).
pub fn on_response(
    cache: &Cache,
    session: &Session,
    ctx: &mut RequestCtx,
    response: &mut ResponseHeader,
) -> Result<()> {
    let snapshot = ctx.snapshot.clone();
    let Some(policy) = &snapshot.routes.policy(ctx.route).cache else {
        return Ok(());
    };
    match &ctx.cache {
        CachePhase::Miss {
            primary, sent_at, ..
        } => {
            let (primary, sent_at) = (primary.clone(), *sent_at);
            let fill = cache.plan_fill(
                policy,
                &primary,
                &cache_request(session, ctx),
                response.status.as_u16(),
                &response.headers,
                sent_at,
            );
            let status = if fill.is_some() {
                "cachegate; fwd=miss; stored"
            } else {
                "cachegate; fwd=miss"
            };
            response.insert_header(CACHE_STATUS, status)?;
            response.insert_header(X_CACHE, "MISS")?;
            if let CachePhase::Miss { fill: slot, .. } = &mut ctx.cache {
                *slot = fill.map(Box::new);
            }
        }
        CachePhase::Bypass(reason) => {
            response.insert_header(
                CACHE_STATUS,
                format!("cachegate; fwd=bypass; detail={reason}"),
            )?;
            response.insert_header(X_CACHE, "BYPASS")?;
        }
        CachePhase::Off | CachePhase::Hit => {}
    }
    Ok(())
}

/// Captures a body chunk of a response being filled, giving up past `max_object`; when the last
/// chunk has arrived, stores the entry in process before that chunk goes to the client.
pub fn on_body(cache: &Cache, ctx: &mut RequestCtx, body: &Option<Bytes>, end_of_stream: bool) {
    if let CachePhase::Miss {
        fill, shared_write, ..
    } = &mut ctx.cache
    {
        if let (Some(f), Some(chunk)) = (fill.as_mut(), body) {
            if !f.push(chunk) {
                *fill = None;
            }
        }
        if end_of_stream {
            if let Some(mut f) = fill.take() {
                f.complete = true;
                *shared_write = cache.store_local(*f);
            }
        }
    }
}

/// Writes the entry to the shared tier once the response is done (unless it failed).
pub async fn on_done(cache: &Cache, ctx: &mut RequestCtx, failed: bool) {
    if let CachePhase::Miss { shared_write, .. } = &mut ctx.cache {
        if let Some(write) = shared_write.take().filter(|_| !failed) {
            cache.store_shared(write).await;
        }
    }
}
