//! The cache step's glue: look up after rate limiting and answer hits (and `304`s) directly; on a
//! miss, plan the fill from the origin's response and capture its body on the way to the client.
//!
//! When the origin's answer means "use what you have" — a `304` to a revalidation, or a 5xx while
//! a stale-if-error entry is kept — [`on_response`] returns the stored entry's response instead
//! of the origin's.

use std::sync::Arc;

use bytes::Bytes;
use std::ops::ControlFlow;

use http::header::{
    HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    LAST_MODIFIED, TRANSFER_ENCODING,
};
use http::request::Parts;
use http::{Method, Response};

use super::body::Body;
use super::forwarding::{add_validators, request_host};
use super::respond::{self, Serving, CACHE_STATUS, X_CACHE};
use super::{RequestCtx, Step};
use crate::cache::entry::Entry;
use crate::cache::key::CacheKey;
use crate::cache::range::{self, RangeAnswer};
use crate::cache::{Cache, CacheRequest, Decision, Fill, FillStart, FlightGuard, Hit, SharedWrite};

/// Where a request stands with the cache.
#[derive(Default)]
pub enum CachePhase {
    /// The route has no cache rule.
    #[default]
    Off,
    Bypass(crate::cache::Bypass),
    Hit,
    /// Served stale inside stale-while-revalidate (refreshed in the background).
    Stale,
    /// Forwarded to the origin.
    Miss(Box<Miss>),
}

/// A request the cache forwarded to the origin.
pub struct Miss {
    primary: crate::cache::key::CacheKey,
    /// When the request was forwarded, and the purge sequence then.
    start: FillStart,
    /// Captures the response when it may be stored.
    fill: Option<Fill>,
    /// Held while this request leads the fetch for its key. Dropped — waking the requests that
    /// wait for it — as soon as its entry is stored, or the response turns out not storable.
    flight: Option<FlightGuard>,
    /// A stale entry still kept: revalidated with the origin when it has a validator, served
    /// when the origin fails inside its stale-if-error window.
    stale: Option<Arc<Entry>>,
    /// The upstream request carries the stale entry's validators.
    revalidating: bool,
    /// This instance holds the cross-instance fill lease for the key.
    lease: bool,
    /// A stored entry answered instead of the origin's response: `Some(true)` the origin
    /// confirmed it (`304`), `Some(false)` stale-if-error.
    answered: Option<bool>,
    /// Stored in process; to be written to the shared tier when the request ends.
    shared_write: Option<SharedWrite>,
}

impl CachePhase {
    /// For the access log.
    pub fn label(&self) -> &'static str {
        match self {
            CachePhase::Off => "-",
            CachePhase::Bypass(_) => "bypass",
            CachePhase::Hit => "hit",
            CachePhase::Stale => "stale",
            CachePhase::Miss(miss) => match miss.answered {
                Some(true) => "revalidated",
                Some(false) => "stale",
                None => "miss",
            },
        }
    }
}

/// Whether a request announces a body: a length above zero, or chunked framing.
fn has_body(req: &Parts) -> bool {
    req.headers.contains_key(TRANSFER_ENCODING)
        || req
            .headers
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

pub(super) fn cache_request<'a>(req: &'a Parts, ctx: &'a RequestCtx) -> CacheRequest<'a> {
    CacheRequest {
        method: &req.method,
        scheme: ctx.connection.scheme(),
        host: request_host(req),
        path: req.uri.path(),
        query: req.uri.query(),
        headers: &req.headers,
        user: ctx.identity.as_ref().and_then(|i| i.subject.as_deref()),
        authorized: ctx.identity.is_some() || req.headers.contains_key(AUTHORIZATION),
        has_body: has_body(req),
        tags: &ctx.cache_tags,
    }
}

/// `If-None-Match` (weak comparison, RFC 9110 §13.1.2) or, without it, `If-Modified-Since`.
fn not_modified(req: &Parts, entry: &Entry) -> bool {
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

/// Asks the cache ([`Cache::decide`], which owns coalescing and leases); a hit (fresh,
/// stale-while-revalidate, or filled by the request this one waited for) is answered here.
pub async fn lookup(cache: &Arc<Cache>, req: &Parts, ctx: &mut RequestCtx) -> Step {
    let snapshot = ctx.snapshot.clone();
    let Some(policy) = &snapshot.routes.policy(ctx.route.id).cache else {
        return ControlFlow::Continue(());
    };
    if !policy.tags.is_empty() {
        ctx.cache_tags = policy
            .tags
            .iter()
            .map(|t| t.expand(&ctx.route.params))
            .collect();
    }
    let decision = cache.decide(policy, &cache_request(req, ctx)).await;
    match decision {
        Decision::Hit(hit) => {
            count(ctx, "hit", hit.tier);
            ctx.cache = CachePhase::Hit;
            ControlFlow::Break(serve_hit(req, ctx, hit, false))
        }
        Decision::Stale {
            hit,
            primary,
            refresh,
        } => {
            count(ctx, "stale", hit.tier);
            if let Some(guard) = refresh {
                let refresh = super::refresh::Refresh::new(
                    cache.clone(),
                    policy.clone(),
                    primary,
                    hit.entry.clone(),
                    req,
                    ctx,
                    guard,
                );
                tokio::spawn(refresh.run());
            }
            ctx.cache = CachePhase::Stale;
            ControlFlow::Break(serve_hit(req, ctx, hit, true))
        }
        Decision::Miss {
            primary,
            stale,
            flight,
            lease,
        } => {
            count(ctx, "miss", "memory");
            ctx.cache = CachePhase::Miss(Box::new(Miss {
                primary,
                start: cache.fill_start(),
                fill: None,
                flight,
                stale,
                revalidating: false,
                lease,
                answered: None,
                shared_write: None,
            }));
            ControlFlow::Continue(())
        }
        Decision::Bypass(reason) => {
            count(ctx, "bypass", "-");
            ctx.cache = CachePhase::Bypass(reason);
            ControlFlow::Continue(())
        }
    }
}

/// Whether the steps after the upstream read the client's request headers (a miss plans its
/// fill from them).
pub fn needs_request_headers(ctx: &RequestCtx) -> bool {
    matches!(ctx.cache, CachePhase::Miss(_))
}

fn count(ctx: &RequestCtx, result: &str, tier: &str) {
    ctx.snapshot
        .routes
        .metrics(ctx.route.id)
        .cache_result(result, tier);
}

/// On a miss with a kept stale entry that has a validator, turns the upstream request into a
/// revalidation: the entry's `ETag` / `Last-Modified` replace the client's own conditions (the
/// client's are answered from the refreshed entry).
pub fn on_upstream_request(ctx: &mut RequestCtx, upstream_headers: &mut HeaderMap) {
    if let CachePhase::Miss(miss) = &mut ctx.cache {
        if let Some(entry) = miss.stale.as_ref().filter(|e| e.has_validator()) {
            add_validators(entry, upstream_headers);
            miss.revalidating = true;
        }
    }
}

/// Serves a stored entry as a hit (`stale`: inside stale-while-revalidate), answering the
/// client's own conditions from it.
fn serve_hit(req: &Parts, ctx: &RequestCtx, hit: Hit, stale: bool) -> Response<Body> {
    let unchanged = not_modified(req, &hit.entry);
    let (detail, x_cache) = if stale {
        ("; detail=stale-while-revalidate", "STALE")
    } else {
        ("", "HIT")
    };
    let cache_status = format!("cachegate; hit; ttl={}{detail}", hit.ttl_secs);
    let serving = Serving {
        status: if unchanged { 304 } else { hit.entry.status },
        age_secs: hit.age_secs,
        cache_status: &cache_status,
        x_cache,
        not_modified: unchanged,
        head_only: req.method == Method::HEAD,
        range: range_of(req, &hit.entry, unchanged),
    };
    respond::entry(ctx, &hit.entry, serving)
}

/// The part of a stored complete `200` a `GET` asks for with `Range` (RFC 9110 §14).
fn range_of(req: &Parts, entry: &Entry, not_modified: bool) -> RangeAnswer {
    if req.method != Method::GET || not_modified || entry.status != 200 {
        return RangeAnswer::Full;
    }
    range::answer(&req.headers, &entry.headers, entry.body.len() as u64)
}

/// The entry the origin confirmed with a `304`, as the response.
fn serve_revalidated(req: &Parts, ctx: &RequestCtx, entry: &Entry) -> Response<Body> {
    count(ctx, "revalidated", "origin");
    let unchanged = not_modified(req, entry);
    let ttl = entry.fresh_for_ms / 1000;
    let cache_status = format!("cachegate; fwd=stale; fwd-status=304; stored; ttl={ttl}");
    let serving = Serving {
        status: if unchanged { 304 } else { entry.status },
        age_secs: Cache::age_secs(entry),
        cache_status: &cache_status,
        x_cache: "REVALIDATED",
        not_modified: unchanged,
        head_only: req.method == Method::HEAD,
        range: range_of(req, entry, unchanged),
    };
    respond::entry(ctx, entry, serving)
}

/// stale-if-error: when the origin could not be reached or timed out (`status` 502 or 504),
/// the stale entry kept for that answers. `None` when there is none.
pub fn serve_stale_on_error(
    ctx: &mut RequestCtx,
    req: &Parts,
    status: u16,
) -> Option<Response<Body>> {
    if !matches!(status, 502 | 504) {
        return None;
    }
    let CachePhase::Miss(miss) = &mut ctx.cache else {
        return None;
    };
    let entry = miss.stale.clone().filter(|e| Cache::usable_on_error(e))?;
    miss.answered = Some(false);
    miss.flight = None;
    Some(stale_on_error(req, ctx, &entry))
}

fn stale_on_error(req: &Parts, ctx: &RequestCtx, entry: &Entry) -> Response<Body> {
    count(ctx, "stale", "memory");
    let serving = Serving {
        status: entry.status,
        age_secs: Cache::age_secs(entry),
        cache_status: "cachegate; fwd=stale; detail=stale-if-error",
        x_cache: "STALE",
        not_modified: false,
        head_only: req.method == Method::HEAD,
        range: range_of(req, entry, false),
    };
    respond::entry(ctx, entry, serving)
}

/// On a miss, decides from the origin's response whether to capture it, and labels the
/// response for the client (`Cache-Status`, `X-Cache`). Returns the stored entry's response
/// when it answers instead of the origin's (a `304` to a revalidation, stale-if-error on a 5xx).
pub fn on_response(
    cache: &Cache,
    req: &Parts,
    ctx: &mut RequestCtx,
    response: &mut http::response::Parts,
) -> Option<Response<Body>> {
    let snapshot = ctx.snapshot.clone();
    let policy = snapshot.routes.policy(ctx.route.id).cache.as_ref()?;
    match &ctx.cache {
        CachePhase::Miss(miss) => {
            let (primary, start) = (miss.primary.clone(), miss.start);
            let status = response.status.as_u16();
            if let Some(entry) = miss.stale.clone() {
                if miss.revalidating && status == 304 {
                    let (entry, shared) = cache.revalidated(
                        policy,
                        &primary,
                        &cache_request(req, ctx),
                        &entry,
                        &response.headers,
                        start,
                    );
                    if let CachePhase::Miss(miss) = &mut ctx.cache {
                        miss.answered = Some(true);
                        miss.shared_write = shared;
                        miss.flight = None;
                    }
                    return Some(serve_revalidated(req, ctx, &entry));
                }
                if status >= 500 && Cache::usable_on_error(&entry) {
                    if let CachePhase::Miss(miss) = &mut ctx.cache {
                        miss.answered = Some(false);
                        miss.flight = None;
                    }
                    return Some(stale_on_error(req, ctx, &entry));
                }
            }
            let fill = cache.plan_fill(
                policy,
                &primary,
                &cache_request(req, ctx),
                status,
                &response.headers,
                start,
            );
            let label = if fill.is_some() {
                "cachegate; fwd=miss; stored"
            } else {
                "cachegate; fwd=miss"
            };
            response
                .headers
                .insert(CACHE_STATUS, HeaderValue::from_static(label));
            response
                .headers
                .insert(X_CACHE, HeaderValue::from_static("MISS"));
            cache.note_storable(&primary, fill.is_some());
            if let CachePhase::Miss(miss) = &mut ctx.cache {
                if fill.is_none() {
                    // Nothing will be stored: the waiting requests go to the origin now.
                    miss.flight = None;
                }
                miss.fill = fill;
            }
        }
        CachePhase::Bypass(reason) => {
            if let Ok(value) =
                HeaderValue::from_str(&format!("cachegate; fwd=bypass; detail={reason}"))
            {
                response.headers.insert(CACHE_STATUS, value);
            }
            response
                .headers
                .insert(X_CACHE, HeaderValue::from_static("BYPASS"));
        }
        CachePhase::Off | CachePhase::Hit | CachePhase::Stale => {}
    }
    None
}

/// Write-through: captures the response to a write as the GET entry of its URL, stamped with the
/// write's purge sequence number `stamp`. Returns whether it will be stored.
pub fn write_through(
    cache: &Cache,
    req: &Parts,
    ctx: &mut RequestCtx,
    policy: &crate::cache::policy::CachePolicy,
    response: &http::response::Parts,
    stamp: u64,
) -> bool {
    // The entry serves the read route's audience, not the writer: the writer's credentials do not
    // decide whether it may be stored (the rule's opt-in does).
    let mut headers = req.headers.clone();
    headers.remove(AUTHORIZATION);
    let request = CacheRequest {
        method: &Method::GET,
        scheme: ctx.connection.scheme(),
        host: request_host(req),
        path: req.uri.path(),
        query: req.uri.query(),
        headers: &headers,
        user: ctx.identity.as_ref().and_then(|i| i.subject.as_deref()),
        authorized: false,
        has_body: false,
        tags: &ctx.cache_tags,
    };
    let start = FillStart {
        sent_at: std::time::SystemTime::now(),
        stamp,
    };
    let Some((primary, fill)) =
        cache.plan_write_through(policy, &request, &response.headers, start)
    else {
        return false;
    };
    ctx.cache = CachePhase::Miss(Box::new(Miss {
        primary,
        start,
        fill: Some(fill),
        flight: None,
        stale: None,
        revalidating: false,
        lease: false,
        answered: None,
        shared_write: None,
    }));
    true
}

/// Captures a body chunk of a response being filled, giving up past `max_object`; when the last
/// chunk has arrived, stores the entry in process — before the client has read it, and waking
/// the requests that wait for this fill at once.
pub fn on_body(cache: &Cache, ctx: &mut RequestCtx, chunk: Option<&Bytes>, end_of_stream: bool) {
    if let CachePhase::Miss(miss) = &mut ctx.cache {
        if let (Some(f), Some(chunk)) = (miss.fill.as_mut(), chunk) {
            if !f.push(chunk) {
                miss.fill = None;
                miss.flight = None;
            }
        }
        if end_of_stream {
            if let Some(mut f) = miss.fill.take() {
                f.complete = true;
                miss.shared_write = cache.store_local(f).and_then(|(_, shared)| shared);
            }
            miss.flight = None;
        }
    }
}

/// What is left to do once the response is over: the shared-tier write (unless it failed), then
/// the end of the fill lease.
pub struct AfterResponse {
    shared_write: Option<SharedWrite>,
    lease: Option<CacheKey>,
}

impl AfterResponse {
    pub async fn run(self, cache: Arc<Cache>) {
        if let Some(write) = self.shared_write {
            cache.store_shared(write).await;
        }
        if let Some(primary) = self.lease {
            cache.release_lease(&primary).await;
        }
    }
}

/// The request is over: what remains for the cache, if anything (see [`AfterResponse`]).
pub fn on_done(ctx: &mut RequestCtx, failed: bool) -> Option<AfterResponse> {
    let CachePhase::Miss(miss) = &mut ctx.cache else {
        return None;
    };
    miss.flight = None;
    let shared_write = miss.shared_write.take().filter(|_| !failed);
    let lease = std::mem::take(&mut miss.lease).then(|| miss.primary.clone());
    (shared_write.is_some() || lease.is_some()).then_some(AfterResponse {
        shared_write,
        lease,
    })
}
