//! stale-while-revalidate's background refresh, as the pipeline builds it: the request the origin
//! would have received for the stale entry (forwarding headers, forwarded claims, this request's
//! trace context), and the snapshot's upstream group lent to the cache as its
//! [`Origin`](crate::cache::refresh::Origin).

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::request::Parts;
use http::{HeaderMap, Uri};

use super::context::{request_host, RequestCtx};
use super::forwarding;
use crate::cache::refresh::{Fetching, Origin, Refresh, RefreshRequest};
use crate::cache::txn::RefreshTicket;
use crate::cache::Cache;
use crate::snapshot::Snapshot;

/// A background refresh of a stale entry, carrying the headers the proxied request would have
/// carried (forwarding headers, forwarded claims, this request's trace context).
pub(super) fn refresh_of(
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
