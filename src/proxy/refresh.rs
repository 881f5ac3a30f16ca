//! stale-while-revalidate's background refresh: one request to the origin, made outside the
//! client's exchange with the gateway's own HTTP client, that revalidates (`304`) or replaces the
//! stale entry. It carries the headers the proxied request would have carried (forwarding
//! headers, forwarded claims), with the stale entry's validators.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body_util::{BodyExt, Empty, Limited};
use pingora::http::RequestHeader;
use pingora::proxy::Session;

use super::RequestCtx;
use crate::cache::entry::Entry;
use crate::cache::key::CacheKey;
use crate::cache::policy::CachePolicy;
use crate::cache::{Cache, CacheRequest, FillStart, FlightGuard};
use crate::metrics::metrics;
use crate::snapshot::Snapshot;

/// A refresh of one stale entry, ready to run in the background.
pub struct Refresh {
    cache: Arc<Cache>,
    snapshot: Arc<Snapshot>,
    policy: CachePolicy,
    primary: CacheKey,
    stale: Arc<Entry>,
    /// The request as it would go upstream.
    upstream_request: RequestHeader,
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
        session: &Session,
        ctx: &RequestCtx,
        flight: FlightGuard,
    ) -> Refresh {
        // Before the request is made: a purge from now on makes this refresh stale.
        let stamp = cache.fill_start().stamp;
        let client = session.req_header();
        let mut upstream_request = client.clone();
        upstream_request.set_method(Method::GET);
        let prepared = super::forwarding::upstream_request(
            &mut upstream_request,
            &super::forwarded(session, ctx),
        )
        .and_then(|()| super::forwarding::add_validators(&stale, &mut upstream_request));
        if let Err(e) = prepared {
            tracing::debug!(error = %e, "cache refresh: could not prepare the request");
        }
        Refresh {
            cache,
            snapshot: ctx.snapshot.clone(),
            policy,
            primary,
            stale,
            upstream_request,
            host: super::forwarding::request_host(client).map(str::to_owned),
            scheme: super::scheme(session),
            authorized: ctx.identity.is_some()
                || client.headers.contains_key(http::header::AUTHORIZATION),
            client_headers: client.headers.clone(),
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
        let (client, timeout) = self.snapshot.upstream.client();
        let outcome = tokio::time::timeout(timeout, self.fetch(client)).await;
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

    async fn fetch(
        &self,
        client: &crate::http_client::HttpsClient<Empty<Bytes>>,
    ) -> Result<(), String> {
        let upstream = &self.snapshot.upstream;
        let origin = upstream.origin(upstream.pick());
        let target = self
            .upstream_request
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str());
        let mut request = http::Request::builder()
            .method(Method::GET)
            .uri(format!("{}{target}", origin.url.trim_end_matches('/')));
        for (name, value) in &self.upstream_request.headers {
            request = request.header(name, value);
        }
        let request = request.body(Empty::new()).map_err(|e| e.to_string())?;
        let start = FillStart {
            sent_at: SystemTime::now(),
            stamp: self.stamp,
        };
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let (path, query) = (
            self.upstream_request.uri.path(),
            self.upstream_request.uri.query(),
        );
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
