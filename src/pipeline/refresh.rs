//! stale-while-revalidate's background refresh: one request to the origin, made outside the
//! client's exchange through the same upstream pool, that revalidates (`304`) or replaces the
//! stale entry. It carries the headers the proxied request would have carried (forwarding
//! headers, forwarded claims, the triggering request's trace context), with the stale entry's
//! validators.

use std::sync::Arc;
use std::time::SystemTime;

use http::request::Parts;
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Body as _;

use super::RequestCtx;
use crate::cache::entry::Entry;
use crate::cache::key::CacheKey;
use crate::cache::policy::CachePolicy;
use crate::cache::{Cache, CacheRequest, FillStart, FlightGuard};
use crate::metrics::metrics;
use crate::snapshot::Snapshot;
use crate::upstream::body::RequestBody;

/// A refresh of one stale entry, ready to run in the background.
pub struct Refresh {
    cache: Arc<Cache>,
    snapshot: Arc<Snapshot>,
    policy: CachePolicy,
    primary: CacheKey,
    stale: Arc<Entry>,
    /// The canonical target (the entry's key).
    uri: Uri,
    /// The target and headers as they go upstream.
    origin_uri: Uri,
    upstream_headers: HeaderMap,
    /// The client's request headers (they select the variant).
    client_headers: HeaderMap,
    host: Option<String>,
    scheme: &'static str,
    authorized: bool,
    user: Option<String>,
    tags: Vec<String>,
    /// The purge sequence number when the refresh was decided.
    stamp: u64,
    /// The route's name, for metrics.
    route: String,
    /// Held to the end, so this instance refreshes the key once at a time.
    _flight: FlightGuard,
}

impl Refresh {
    pub fn new(
        cache: Arc<Cache>,
        policy: CachePolicy,
        primary: CacheKey,
        stale: Arc<Entry>,
        req: &Parts,
        ctx: &RequestCtx,
        flight: FlightGuard,
    ) -> Refresh {
        // Before the request is made: a purge from now on makes this refresh stale.
        let stamp = cache.fill_start().stamp;
        let mut upstream_headers = req.headers.clone();
        super::forwarding::upstream_request(
            &mut upstream_headers,
            &super::forwarding::Forwarded {
                client_ip: ctx.connection.peer.ip(),
                proto: ctx.connection.scheme(),
                request_id: &ctx.request_id,
                upgrade: false,
            },
        );
        // The origin sees the refresh as part of the request that triggered it.
        ctx.trace.propagate(&mut upstream_headers);
        super::forwarding::add_validators(&stale, &mut upstream_headers);
        Refresh {
            cache,
            snapshot: ctx.snapshot.clone(),
            policy,
            primary,
            stale,
            uri: req.uri.clone(),
            origin_uri: ctx.origin_uri(&req.uri),
            upstream_headers,
            host: super::forwarding::request_host(req).map(str::to_owned),
            scheme: ctx.connection.scheme(),
            authorized: ctx.identity.is_some()
                || req.headers.contains_key(http::header::AUTHORIZATION),
            client_headers: req.headers.clone(),
            user: ctx.identity.as_ref().and_then(|i| i.subject.clone()),
            route: ctx.route_name().to_owned(),
            tags: ctx.cache_tags.clone(),
            stamp,
            _flight: flight,
        }
    }

    /// Runs the refresh; failures leave the stale entry as it was (it keeps being served until
    /// its window ends) and are counted as `result="refresh_failed"`.
    pub async fn run(self) {
        if !self.cache.take_lease(&self.primary).await {
            // Another instance is refreshing it.
            return;
        }
        let timeout = self.snapshot.upstream.read_timeout;
        let outcome = tokio::time::timeout(timeout, self.fetch()).await;
        let result = match outcome {
            Ok(Ok(())) => "refreshed",
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cache refresh failed");
                "refresh_failed"
            }
            Err(_) => "refresh_failed",
        };
        self.cache.release_lease(&self.primary).await;
        metrics()
            .cache_results
            .with_label_values(&[&self.route, result, "origin"])
            .inc();
    }

    async fn fetch(&self) -> Result<(), String> {
        let mut request = Request::new(RequestBody::Empty);
        *request.uri_mut() = self.origin_uri.clone();
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = self.upstream_headers.clone();
        let start = FillStart {
            sent_at: SystemTime::now(),
            stamp: self.stamp,
        };
        let exchange = self
            .snapshot
            .upstream
            .send(request, None)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = exchange.response.into_parts();
        let (path, query) = (self.uri.path(), self.uri.query());
        let cache_request = CacheRequest {
            method: &Method::GET,
            scheme: self.scheme,
            host: self.host.as_deref(),
            path,
            query,
            headers: &self.client_headers,
            user: self.user.as_deref(),
            authorized: self.authorized,
            has_body: false,
            tags: &self.tags,
        };
        if parts.status == http::StatusCode::NOT_MODIFIED {
            let (_, shared) = self.cache.revalidated(
                &self.policy,
                &self.primary,
                &cache_request,
                &self.stale,
                &parts.headers,
                start,
            );
            if body.is_end_stream() {
                exchange.connection.release();
            }
            if let Some(shared) = shared {
                self.cache.store_shared(shared).await;
            }
            return Ok(());
        }
        let Some(mut fill) = self.cache.plan_fill(
            &self.policy,
            &self.primary,
            &cache_request,
            parts.status.as_u16(),
            &parts.headers,
            start,
        ) else {
            return Err(format!("the origin's {} is not storable", parts.status));
        };
        let limit = usize::try_from(self.policy.max_object).unwrap_or(usize::MAX);
        let body = Limited::new(body, limit)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        exchange.connection.release();
        if !fill.push(&body) {
            return Err("the body exceeds max_object".to_owned());
        }
        fill.complete = true;
        if let Some((_, Some(shared))) = self.cache.store_local(fill) {
            self.cache.store_shared(shared).await;
        }
        Ok(())
    }
}
