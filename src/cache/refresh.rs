//! stale-while-revalidate's background refresh: one request to the origin, made outside the
//! client's exchange, that revalidates (`304`) or replaces the stale entry.
//!
//! The cache does not know how to reach the origin: the pipeline hands it an [`Origin`] and the
//! request as it would have gone upstream (forwarding headers, forwarded claims, the triggering
//! request's trace context); the refresh adds the stale entry's validators.
//!
//! ```text
//! Begun::Serve { refresh: Some(ticket) } ─▶ Refresh::new(ticket, request, origin) ─▶ spawn(run)
//!     run: fill lease ─▶ GET with validators ─▶ 304: entry refreshed | 200: entry replaced
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};

use super::policy::CachePolicy;
use super::serve::add_validators;
use super::txn::RefreshTicket;
use super::{Cache, CacheRequest, FillStart, Tier};
use crate::metrics::metrics;

/// Why a refresh failed; the stale entry stays as it was.
#[derive(Debug)]
pub enum RefreshError {
    /// The origin could not be reached, or its response broke.
    Origin(Box<dyn std::error::Error + Send + Sync>),
    /// The origin's answer may not be stored.
    NotStorable(StatusCode),
    /// The body exceeds the rule's `max_object`.
    TooLarge,
}

impl std::fmt::Display for RefreshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefreshError::Origin(e) => write!(f, "the origin failed: {e}"),
            RefreshError::NotStorable(status) => write!(f, "the origin's {status} is not storable"),
            RefreshError::TooLarge => f.write_str("the body exceeds max_object"),
        }
    }
}

impl std::error::Error for RefreshError {}

/// An origin's answer: its head and, unless it is a `304`, its whole body.
pub struct Fetched {
    pub head: http::response::Parts,
    pub body: Bytes,
}

/// The future an [`Origin`] returns.
pub type Fetching<'a> = Pin<Box<dyn Future<Output = Result<Fetched, RefreshError>> + Send + 'a>>;

/// How a refresh reaches the origin.
pub trait Origin: Send + Sync {
    /// `GET uri` with `headers`; the body is read whole, up to `max_body` bytes (more is
    /// [`RefreshError::TooLarge`]).
    fn get(&self, uri: Uri, headers: HeaderMap, max_body: usize) -> Fetching<'_>;
}

/// The request a refresh repeats: the key's parts and the upstream request's head.
pub struct RefreshRequest {
    /// The canonical target (the entry's key).
    pub uri: Uri,
    /// The target and headers as they go upstream.
    pub origin_uri: Uri,
    pub upstream_headers: HeaderMap,
    /// The client's request headers (they select the variant).
    pub client_headers: HeaderMap,
    pub host: Option<String>,
    pub scheme: &'static str,
    pub authorized: bool,
    pub user: Option<String>,
    pub tags: Vec<String>,
    /// The route's name, for metrics.
    pub route: String,
}

/// A refresh of one stale entry, ready to run in the background.
pub struct Refresh {
    cache: Arc<Cache>,
    origin: Arc<dyn Origin>,
    policy: CachePolicy,
    ticket: RefreshTicket,
    request: RefreshRequest,
    timeout: Duration,
}

impl Refresh {
    /// `timeout` bounds the whole refresh (the upstream's read timeout).
    pub fn new(
        cache: Arc<Cache>,
        origin: Arc<dyn Origin>,
        policy: CachePolicy,
        ticket: RefreshTicket,
        mut request: RefreshRequest,
        timeout: Duration,
    ) -> Refresh {
        add_validators(&ticket.stale, &mut request.upstream_headers);
        Refresh {
            cache,
            origin,
            policy,
            ticket,
            request,
            timeout,
        }
    }

    /// Runs the refresh; failures leave the stale entry as it was (it keeps being served until
    /// its window ends) and are counted as `result="refresh_failed"`.
    pub async fn run(self) {
        let primary = &self.ticket.primary;
        if !self.cache.take_lease(primary).await {
            // Another instance is refreshing it.
            return;
        }
        let outcome = tokio::time::timeout(self.timeout, self.fetch()).await;
        let result = match outcome {
            Ok(Ok(())) => "refreshed",
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cache refresh failed");
                "refresh_failed"
            }
            Err(_) => "refresh_failed",
        };
        self.cache.release_lease(primary).await;
        metrics()
            .cache_results
            .with_label_values(&[&self.request.route, result, Tier::Origin.as_str()])
            .inc();
    }

    async fn fetch(&self) -> Result<(), RefreshError> {
        let request = &self.request;
        let start = FillStart {
            sent_at: SystemTime::now(),
            stamp: self.ticket.stamp,
        };
        let max_body = usize::try_from(self.policy.max_object).unwrap_or(usize::MAX);
        let fetched = self
            .origin
            .get(
                request.origin_uri.clone(),
                request.upstream_headers.clone(),
                max_body,
            )
            .await?;
        let cache_request = CacheRequest {
            method: &Method::GET,
            scheme: request.scheme,
            host: request.host.as_deref(),
            path: request.uri.path(),
            query: request.uri.query(),
            headers: &request.client_headers,
            user: request.user.as_deref(),
            authorized: request.authorized,
            has_body: false,
            tags: &request.tags,
        };
        let head = &fetched.head;
        if head.status == StatusCode::NOT_MODIFIED {
            let (_, shared) = self.cache.revalidated(
                &self.policy,
                &self.ticket.primary,
                &cache_request,
                &self.ticket.stale,
                &head.headers,
                start,
            );
            if let Some(shared) = shared {
                self.cache.store_shared(shared).await;
            }
            return Ok(());
        }
        let Some(mut fill) = self.cache.plan_fill(
            &self.policy,
            &self.ticket.primary,
            &cache_request,
            head.status.as_u16(),
            &head.headers,
            start,
        ) else {
            return Err(RefreshError::NotStorable(head.status));
        };
        if !fill.push(&fetched.body) {
            return Err(RefreshError::TooLarge);
        }
        fill.complete = true;
        if let Some((_, Some(shared))) = self.cache.store_local(fill) {
            self.cache.store_shared(shared).await;
        }
        Ok(())
    }
}
