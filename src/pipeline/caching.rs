//! The cache step's glue: the request as the cache sees it, and the cache's
//! [`Transaction`](crate::cache::txn) driven at the pipeline's moments — lookup after rate
//! limiting, the origin's failure or response head, the write-through of a write. Everything the
//! cache decides stays in [`crate::cache`]; this file turns its answers into responses and
//! metrics, and lends it the upstream for background refreshes.

use std::ops::ControlFlow;
use std::sync::Arc;

use http::header::{AUTHORIZATION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, Response, Uri};

use super::body::Body;
use super::context::{RequestCtx, Step};
use super::forwarding::request_host;
use super::{forwarding, respond};
use crate::cache::refresh::{Fetching, Origin, Refresh, RefreshRequest};
use crate::cache::serve::Served;
use crate::cache::txn::{Begun, RefreshTicket, Transaction};
use crate::cache::{Cache, CacheRequest, Tier};
use crate::snapshot::Snapshot;

/// Whether a request announces a body: a length above zero, or chunked framing.
fn has_body(req: &Parts) -> bool {
    req.headers.contains_key(TRANSFER_ENCODING)
        || req
            .headers
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// The request as the cache sees it.
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

/// The cache step: begins the request's transaction; a hit (fresh, stale-while-revalidate, or
/// filled by the request this one waited for) is answered here.
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
    let (txn, begun) = cache.begin(policy, &cache_request(req, ctx)).await;
    ctx.cache = txn;
    match begun {
        Begun::Serve { served, refresh } => {
            count(ctx, Some(served.tier));
            if let Some(ticket) = refresh {
                let refresh = refresh_of(cache, &snapshot, policy, ticket, req, ctx);
                tokio::spawn(refresh.run());
            }
            ControlFlow::Break(respond::entry(ctx, &served))
        }
        Begun::Forward => {
            // A miss is counted against the in-process tier, where it was looked up first.
            let tier = ctx.cache.needs_request_headers().then_some(Tier::Memory);
            count(ctx, tier);
            ControlFlow::Continue(())
        }
    }
}

/// Counts the transaction's result, answered from `tier` (`None`: no tier, a bypass).
fn count(ctx: &RequestCtx, tier: Option<Tier>) {
    let metrics = ctx.snapshot.routes.metrics(ctx.route.id);
    match (&ctx.cache, tier) {
        (Transaction::Hit, Some(Tier::Memory)) => metrics.memory_hit(),
        (txn, tier) => metrics.cache_result(txn.label(), tier.map_or("-", Tier::as_str)),
    }
}

/// A stored entry that answers instead of the origin, counted and as the response.
fn answer(ctx: &RequestCtx, served: &Served) -> Response<Body> {
    count(ctx, Some(served.tier));
    respond::entry(ctx, served)
}

/// The origin could not be reached or timed out (`status` 502 or 504): the stale-if-error entry
/// answers, when there is one.
pub fn origin_failed(ctx: &mut RequestCtx, req: &Parts, status: u16) -> Option<Response<Body>> {
    // Taken out while the request borrows the context.
    let mut txn = std::mem::take(&mut ctx.cache);
    let served = txn.origin_failed(&cache_request(req, ctx), status);
    ctx.cache = txn;
    Some(answer(ctx, &served?))
}

/// The origin's response head: the transaction plans its fill and labels the response. Returns
/// the stored entry's response when it answers instead (a `304` to a revalidation,
/// stale-if-error on a 5xx).
pub fn response(
    cache: &Cache,
    req: &Parts,
    ctx: &mut RequestCtx,
    response: &mut http::response::Parts,
) -> Option<Response<Body>> {
    let snapshot = ctx.snapshot.clone();
    let policy = snapshot.routes.policy(ctx.route.id).cache.as_ref()?;
    let mut txn = std::mem::take(&mut ctx.cache);
    let served = txn.response(
        cache,
        policy,
        &cache_request(req, ctx),
        response.status.as_u16(),
        &mut response.headers,
    );
    ctx.cache = txn;
    Some(answer(ctx, &served?))
}

/// A background refresh of a stale entry, carrying the headers the proxied request would have
/// carried (forwarding headers, forwarded claims, this request's trace context).
fn refresh_of(
    cache: &Arc<Cache>,
    snapshot: &Arc<Snapshot>,
    policy: &crate::cache::policy::CachePolicy,
    ticket: RefreshTicket,
    req: &Parts,
    ctx: &RequestCtx,
) -> Refresh {
    let mut upstream_headers = req.headers.clone();
    forwarding::upstream_request(
        &mut upstream_headers,
        &forwarding::Forwarded {
            client_ip: ctx.connection.peer.ip(),
            proto: ctx.connection.scheme(),
            request_id: &ctx.request_id,
            upgrade: false,
        },
    );
    // The origin sees the refresh as part of the request that triggered it.
    ctx.trace.propagate(&mut upstream_headers);
    let request = RefreshRequest {
        uri: req.uri.clone(),
        origin_uri: ctx.origin_uri(&req.uri),
        upstream_headers,
        client_headers: req.headers.clone(),
        host: request_host(req).map(str::to_owned),
        scheme: ctx.connection.scheme(),
        authorized: ctx.identity.is_some() || req.headers.contains_key(AUTHORIZATION),
        user: ctx.identity.as_ref().and_then(|i| i.subject.clone()),
        tags: ctx.cache_tags.clone(),
        route: ctx.route_name().to_owned(),
    };
    Refresh::new(
        cache.clone(),
        Arc::new(Upstream(snapshot.clone())),
        policy.clone(),
        ticket,
        request,
        snapshot.upstream.read_timeout,
    )
}

/// A snapshot's upstream group, owned for as long as a refresh runs.
struct Upstream(Arc<Snapshot>);

impl Origin for Upstream {
    fn get(&self, uri: Uri, headers: HeaderMap, max_body: usize) -> Fetching<'_> {
        self.0.upstream.get(uri, headers, max_body)
    }
}
