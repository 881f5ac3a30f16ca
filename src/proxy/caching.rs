//! The cache phase's glue: look up after rate limiting, answer hits (and `304`s) directly, and on
//! a miss capture the streamed response for the cache.
//!
//! When the origin's answer means "use what you have" — a `304` to a revalidation, or a 5xx while
//! a stale-if-error entry is kept — `upstream_response_filter` stops the proxying with an
//! [`answered_from_cache`] error before anything reached the client, and `fail_to_proxy` writes
//! the entry instead (pingora's filters cannot turn a body-less `304` into a `200` with a body).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{
    HeaderName, AGE, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, LAST_MODIFIED, TRANSFER_ENCODING,
};
use http::Method;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use pingora::{Error, ErrorType};

use super::forwarding::{add_validators, request_host};
use super::{RequestCtx, REQUEST_ID};
use crate::cache::entry::Entry;
use crate::cache::{
    Cache, CacheRequest, Fill, FillStart, Flight, FlightGuard, Hit, Lookup, SharedWrite,
    COALESCE_WAIT,
};
use crate::metrics::metrics;

/// The error that ends proxying when a stored entry answers instead of the origin's response.
const ANSWERED: ErrorType = ErrorType::Custom("answered from cache");

fn answered_from_cache() -> Box<Error> {
    Error::explain(
        ANSWERED,
        "the origin's response was replaced by a stored entry",
    )
}

/// Whether `error` is the [`answered_from_cache`] signal rather than a failure.
pub fn is_answer(error: &Error) -> bool {
    *error.etype() == ANSWERED
}

/// A stored entry chosen to answer instead of the origin's response.
pub struct Answer {
    entry: Arc<Entry>,
    /// `true`: the origin confirmed it (`304`); `false`: stale-if-error on a 5xx.
    revalidated: bool,
}

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
    /// A stored entry answers instead of the origin's response.
    answer: Option<Answer>,
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
            CachePhase::Miss(miss) => match &miss.answer {
                Some(answer) if answer.revalidated => "revalidated",
                Some(_) => "stale",
                None => "miss",
            },
        }
    }
}

/// Whether a request announces a body: a length above zero, or chunked framing.
fn has_body(req: &pingora::http::RequestHeader) -> bool {
    req.headers.contains_key(TRANSFER_ENCODING)
        || req
            .headers
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

fn cache_request<'a>(session: &'a Session, ctx: &'a RequestCtx) -> CacheRequest<'a> {
    let req = session.req_header();
    CacheRequest {
        method: &req.method,
        scheme: super::scheme(session),
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
pub async fn lookup(
    cache: &Arc<Cache>,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<bool> {
    let snapshot = ctx.snapshot.clone();
    let Some(policy) = &snapshot.routes.policy(ctx.route).cache else {
        return Ok(false);
    };
    if !policy.tags.is_empty() {
        let params = snapshot.routes.params(session.req_header().uri.path());
        ctx.cache_tags = policy.tags.iter().map(|t| t.expand(&params)).collect();
    }
    let outcome = cache.lookup(policy, &cache_request(session, ctx)).await;
    let route = ctx.route_name();
    match outcome {
        Lookup::Hit(hit) => {
            count(route, "hit", hit.tier);
            ctx.cache = CachePhase::Hit;
            serve_hit(session, ctx, hit, false).await?;
            Ok(true)
        }
        Lookup::StaleWhileRevalidate { hit, primary } => {
            count(route, "stale", hit.tier);
            if let Flight::Leader(guard) = cache.lead_or_follow(&primary) {
                let refresh = super::refresh::Refresh::new(
                    cache.clone(),
                    policy.clone(),
                    primary,
                    hit.entry.clone(),
                    session,
                    ctx,
                    guard,
                );
                tokio::spawn(refresh.run());
            }
            ctx.cache = CachePhase::Stale;
            serve_hit(session, ctx, hit, true).await?;
            Ok(true)
        }
        Lookup::Miss { primary, stale } => {
            let fetching = session.req_header().method == Method::GET;
            let mut lease = false;
            let flight = match cache.join_flight(&primary) {
                // Its last answer could not be stored: nothing to wait for.
                None => None,
                Some(Flight::Leader(guard)) if fetching => {
                    lease = cache.take_lease(&primary).await;
                    if !lease {
                        // Another instance is filling it: wait for its entry in the shared tier.
                        if let Some(hit) = cache
                            .wait_for_shared(policy, &cache_request(session, ctx))
                            .await
                        {
                            count(route, "hit", "coalesced");
                            ctx.cache = CachePhase::Hit;
                            serve_hit(session, ctx, hit, false).await?;
                            return Ok(true);
                        }
                    }
                    Some(guard)
                }
                Some(Flight::Leader(_)) => None,
                Some(Flight::Follower(mut done)) => {
                    // Another request is fetching this resource: wait for it (bounded), then
                    // look again. Its sender is dropped when it ends, stored or not.
                    let _ = tokio::time::timeout(COALESCE_WAIT, done.changed()).await;
                    if let Lookup::Hit(hit) =
                        cache.lookup(policy, &cache_request(session, ctx)).await
                    {
                        count(route, "hit", "coalesced");
                        ctx.cache = CachePhase::Hit;
                        serve_hit(session, ctx, hit, false).await?;
                        return Ok(true);
                    }
                    None
                }
            };
            count(route, "miss", "memory");
            ctx.cache = CachePhase::Miss(Box::new(Miss {
                primary,
                start: cache.fill_start(),
                fill: None,
                flight,
                stale,
                revalidating: false,
                lease,
                answer: None,
                shared_write: None,
            }));
            Ok(false)
        }
        Lookup::Bypass(reason) => {
            count(route, "bypass", "-");
            ctx.cache = CachePhase::Bypass(reason);
            Ok(false)
        }
    }
}

fn count(route: &str, result: &str, tier: &str) {
    metrics()
        .cache_results
        .with_label_values(&[route, result, tier])
        .inc();
}

/// On a miss with a kept stale entry that has a validator, turns the upstream request into a
/// revalidation: the entry's `ETag` / `Last-Modified` replace the client's own conditions (the
/// client's are answered from the refreshed entry).
pub fn on_upstream_request(
    ctx: &mut RequestCtx,
    upstream_request: &mut pingora::http::RequestHeader,
) -> Result<()> {
    if let CachePhase::Miss(miss) = &mut ctx.cache {
        if let Some(entry) = miss.stale.as_ref().filter(|e| e.has_validator()) {
            add_validators(entry, upstream_request)?;
            miss.revalidating = true;
        }
    }
    Ok(())
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
    // A failed write means the client went away: a downstream error, logged as routine.
    session
        .write_response_header(Box::new(header), no_body)
        .await
        .map_err(Error::into_down)?;
    if !no_body {
        session
            .write_response_body(Some(entry.body.clone()), true)
            .await
            .map_err(Error::into_down)?;
    }
    Ok(())
}

/// Serves a stored entry as a hit (`stale`: inside stale-while-revalidate), answering the
/// client's own conditions from it.
async fn serve_hit(session: &mut Session, ctx: &RequestCtx, hit: Hit, stale: bool) -> Result<()> {
    let unchanged = not_modified(session.req_header(), &hit.entry);
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
    };
    write_entry(session, ctx, &hit.entry, serving).await
}

/// Writes the entry chosen by [`on_response`] to answer instead of the origin. Returns whether
/// there was one.
pub async fn serve_answer(session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
    let CachePhase::Miss(miss) = &ctx.cache else {
        return Ok(false);
    };
    let Some(answer) = &miss.answer else {
        return Ok(false);
    };
    let (entry, revalidated) = (answer.entry.clone(), answer.revalidated);
    if revalidated {
        count(ctx.route_name(), "revalidated", "origin");
        let unchanged = not_modified(session.req_header(), &entry);
        let ttl = (entry.fresh_for_ms / 1000).to_string();
        let cache_status = format!("cachegate; fwd=stale; fwd-status=304; stored; ttl={ttl}");
        let serving = Serving {
            status: if unchanged { 304 } else { entry.status },
            age_secs: Cache::age_secs(&entry),
            cache_status: &cache_status,
            x_cache: "REVALIDATED",
            not_modified: unchanged,
        };
        write_entry(session, ctx, &entry, serving).await?;
    } else {
        write_stale_on_error(session, ctx, &entry).await?;
    }
    Ok(true)
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
    let CachePhase::Miss(miss) = &ctx.cache else {
        return Ok(false);
    };
    let Some(entry) = &miss.stale else {
        return Ok(false);
    };
    if !Cache::usable_on_error(entry) {
        return Ok(false);
    }
    let entry = entry.clone();
    write_stale_on_error(session, ctx, &entry).await?;
    Ok(true)
}

async fn write_stale_on_error(
    session: &mut Session,
    ctx: &RequestCtx,
    entry: &Entry,
) -> Result<()> {
    count(ctx.route_name(), "stale", "memory");
    let serving = Serving {
        status: entry.status,
        age_secs: Cache::age_secs(entry),
        cache_status: "cachegate; fwd=stale; detail=stale-if-error",
        x_cache: "STALE",
        not_modified: false,
    };
    write_entry(session, ctx, entry, serving).await
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
        CachePhase::Miss(miss) => {
            let (primary, start) = (miss.primary.clone(), miss.start);
            let status = response.status.as_u16();
            if let Some(entry) = miss.stale.clone() {
                let answer = if miss.revalidating && status == 304 {
                    let (entry, shared) = cache.revalidated(
                        policy,
                        &primary,
                        &cache_request(session, ctx),
                        &entry,
                        &response.headers,
                        start,
                    );
                    Some((
                        Answer {
                            entry,
                            revalidated: true,
                        },
                        shared,
                    ))
                } else if status >= 500 && Cache::usable_on_error(&entry) {
                    Some((
                        Answer {
                            entry,
                            revalidated: false,
                        },
                        None,
                    ))
                } else {
                    None
                };
                if let Some((answer, shared)) = answer {
                    if let CachePhase::Miss(miss) = &mut ctx.cache {
                        miss.answer = Some(answer);
                        miss.shared_write = shared;
                        miss.flight = None;
                    }
                    return Err(answered_from_cache());
                }
            }
            let fill = cache.plan_fill(
                policy,
                &primary,
                &cache_request(session, ctx),
                response.status.as_u16(),
                &response.headers,
                start,
            );
            let status = if fill.is_some() {
                "cachegate; fwd=miss; stored"
            } else {
                "cachegate; fwd=miss"
            };
            response.insert_header(CACHE_STATUS, status)?;
            response.insert_header(X_CACHE, "MISS")?;
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
            response.insert_header(
                CACHE_STATUS,
                format!("cachegate; fwd=bypass; detail={reason}"),
            )?;
            response.insert_header(X_CACHE, "BYPASS")?;
        }
        CachePhase::Off | CachePhase::Hit | CachePhase::Stale => {}
    }
    Ok(())
}

/// Write-through: captures the response to a write as the GET entry of its URL, stamped with the
/// write's purge sequence number `stamp`. Returns whether it will be stored.
pub fn write_through(
    cache: &Cache,
    session: &Session,
    ctx: &mut RequestCtx,
    policy: &crate::cache::policy::CachePolicy,
    response: &ResponseHeader,
    stamp: u64,
) -> bool {
    let req = session.req_header();
    // The entry serves the read route's audience, not the writer: the writer's credentials do not
    // decide whether it may be stored (the rule's opt-in does).
    let mut headers = req.headers.clone();
    headers.remove(http::header::AUTHORIZATION);
    let request = CacheRequest {
        method: &Method::GET,
        scheme: super::scheme(session),
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
        answer: None,
        shared_write: None,
    }));
    true
}

/// Captures a body chunk of a response being filled, giving up past `max_object`; when the last
/// chunk has arrived, stores the entry in process before that chunk goes to the client.
pub fn on_body(cache: &Cache, ctx: &mut RequestCtx, body: &Option<Bytes>, end_of_stream: bool) {
    if let CachePhase::Miss(miss) = &mut ctx.cache {
        if let (Some(f), Some(chunk)) = (miss.fill.as_mut(), body) {
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
            // Stored (or not): the waiting requests look again now, not when this client has
            // read the whole response.
            miss.flight = None;
        }
    }
}

/// Writes the entry to the shared tier once the response is done (unless it failed), then ends
/// the fill lease.
pub async fn on_done(cache: &Cache, ctx: &mut RequestCtx, failed: bool) {
    if let CachePhase::Miss(miss) = &mut ctx.cache {
        if let Some(write) = miss.shared_write.take().filter(|_| !failed) {
            cache.store_shared(write).await;
        }
        if std::mem::take(&mut miss.lease) {
            cache.release_lease(&miss.primary).await;
        }
    }
}
