//! The cache step's glue: the cache's [`Transaction`](crate::cache::txn) driven at the
//! pipeline's moments — lookup after rate limiting, then the origin's failure or response head
//! (its body and end reach the transaction through the body's watcher). Everything the cache
//! decides stays in [`crate::cache`]; this file turns its answers into responses and metrics.
//! Background refreshes are built in `refreshing`, write-through in `purging`.

use std::ops::ControlFlow;
use std::sync::Arc;

use http::request::Parts;
use http::Response;

use super::body::Body;
use super::context::{RequestCtx, Step};
use super::{refreshing, respond};
use crate::cache::serve::Served;
use crate::cache::txn::{Begun, Transaction};
use crate::cache::{Cache, Tier};

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
    let (txn, begun) = cache.begin(policy, &ctx.cache_request(req)).await;
    ctx.cache = txn;
    match begun {
        Begun::Serve { served, refresh } => {
            count(ctx, Some(served.tier));
            if let Some(ticket) = refresh {
                let refresh = refreshing::refresh_of(cache, &snapshot, policy, ticket, req, ctx);
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
    let served = txn.origin_failed(&ctx.cache_request(req), status);
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
        &ctx.cache_request(req),
        response.status.as_u16(),
        &mut response.headers,
    );
    ctx.cache = txn;
    Some(answer(ctx, &served?))
}
