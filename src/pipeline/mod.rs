//! The request pipeline: one async function per request, calling each concern in order.
//!
//! ```text
//! framing → limits → canonical path → [PURGE] → route (once) → sanitise → auth → rate limit
//!         → cache lookup ──hit──────────────────────────────────────────────▶ respond
//!                        └─miss / bypass / no rule → upstream → fill / purge ─▶ respond
//!                                                     (body done) → end: cache, telemetry
//! ```
//!
//! Each step is a method that either lets the request go on (`ControlFlow::Continue`) or
//! answers it (`ControlFlow::Break` with the response): a refused request never reaches a later
//! step, and nothing is an error used as a signal. The matched route, the verified identity, the
//! rate-limit verdict and the cache's transaction travel in [`RequestCtx`]; the request's end —
//! the cache's shared-tier write, metrics, access log — is the end step (`Gateway::end`), run once
//! when its response body is done ([`body::Watcher`]).
//!
//! This file holds the order (`handle`, `admit`) and the end step; the steps live in the files,
//! each depending only on those listed after it:
//! - `explain`: `cachegate explain`, running the same steps without sending anything.
//! - `proxy`: the upstream step (send, answer, purge, tunnel).
//! - `purging`: the purge after a write, write-through, and the `PURGE` method.
//! - `caching`: the cache step's glue around [`crate::cache::txn`].
//! - `refreshing`: a stale-while-revalidate refresh, built from the request.
//! - `access`: the authentication and rate-limit steps.
//! - `admission`: framing, size limits, the canonical path, routing, sanitising.
//! - `forwarding`: framing checks, header sanitising, the forwarding headers.
//! - `respond`: the responses the gateway writes itself (problems, stored entries).
//! - `telemetry`: the request's metrics, access-log line and span.
//! - `context`: what a request's steps share (and the request as the cache sees it).
//! - `body`: the response body, and the watcher that hears it end.

mod access;
mod admission;
pub mod body;
mod caching;
mod context;
pub mod explain;
mod forwarding;
mod proxy;
mod purging;
mod refreshing;
mod respond;
mod telemetry;

use std::ops::ControlFlow;
use std::sync::Arc;

use http::request::Parts;
use http::{Method, Request, Response};
use hyper::body::Incoming;

use crate::cache::Cache;
use crate::header_rules::REQUEST_ID;
use crate::purge::Purger;
use crate::ratelimit::Limiter;
use crate::snapshot::SharedSnapshot;

use body::{Body, Outcome, Watcher};
use context::{request_id_from, Step};
pub use context::{Connection, RequestCtx};

/// The gateway: one instance serves every request of every listener.
pub struct Gateway {
    snapshot: SharedSnapshot,
    limiter: Limiter,
    cache: Arc<Cache>,
    purger: Arc<Purger>,
}

/// A request waiting for its response body to be done: the body's [`Watcher`].
struct RequestEnd {
    gateway: Arc<Gateway>,
    ctx: RequestCtx,
    status: u16,
    method: Method,
    uri: http::Uri,
}

impl Watcher for RequestEnd {
    fn data(&mut self, chunk: &bytes::Bytes) {
        self.ctx.cache.body(chunk);
    }

    fn end(&mut self) {
        self.ctx.cache.end(&self.gateway.cache);
    }

    fn done(self: Box<Self>, outcome: Outcome) {
        let gateway = self.gateway.clone();
        gateway.end(*self, outcome);
    }
}

impl Gateway {
    pub fn new(
        snapshot: SharedSnapshot,
        limiter: Limiter,
        cache: Arc<Cache>,
        purger: Arc<Purger>,
    ) -> Arc<Gateway> {
        Arc::new(Gateway {
            snapshot,
            limiter,
            cache,
            purger,
        })
    }

    /// Serves one request: the whole pipeline, start to end.
    pub async fn handle(
        self: &Arc<Self>,
        connection: Connection,
        request: Request<Incoming>,
    ) -> Response<Body> {
        let (mut head, body) = request.into_parts();
        let mut ctx = RequestCtx::new(
            self.snapshot.load_full(),
            request_id_from(head.headers.get(REQUEST_ID)),
            connection,
            crate::trace::TraceContext::from_headers(&head.headers),
        );
        let response = match self.admit(&mut head, &mut ctx).await {
            ControlFlow::Break(response) => response,
            ControlFlow::Continue(()) => {
                match caching::lookup(&self.cache, &head, &mut ctx).await {
                    ControlFlow::Break(response) => response,
                    ControlFlow::Continue(()) => self.forward(&mut head, body, &mut ctx).await,
                }
            }
        };
        let (parts, body) = response.into_parts();
        let end = Box::new(RequestEnd {
            gateway: self.clone(),
            status: parts.status.as_u16(),
            method: head.method,
            uri: head.uri,
            ctx,
        });
        Response::from_parts(parts, body.watched_by(end))
    }

    /// The end step, run once when the response body is gone (sent in full, or abandoned): the
    /// cache's work that waits for the response to be over (the shared-tier write — unless the
    /// response failed — and the fill lease), then the request's metrics and access-log line.
    fn end(&self, mut end: RequestEnd, outcome: Outcome) {
        let error = outcome.error.or(end.ctx.upstream_error);
        let failed = error.is_some() || !outcome.complete;
        if let Some(work) = end.ctx.cache.finish(failed) {
            tokio::spawn(work.run(self.cache.clone()));
        }
        let sent = telemetry::Sent {
            status: end.status,
            method: end.method,
            uri: end.uri,
            bytes: outcome.sent,
            error,
        };
        telemetry::record(&end.ctx, &sent);
    }

    /// Every step before the cache: framing and size limits, the canonical path, routing,
    /// sanitising, authentication, rate limiting.
    async fn admit(&self, head: &mut Parts, ctx: &mut RequestCtx) -> Step {
        Self::before_route(head, ctx)?;
        if head.method.as_str() == "PURGE" {
            if let Some(token) = &ctx.snapshot.purge_method_token {
                return ControlFlow::Break(
                    purging::purge_request(&self.purger, &self.cache, head, ctx, token).await,
                );
            }
        }
        Self::route(head, ctx)?;
        Self::identify_and_sanitize(head, ctx);
        self.authenticate(head, ctx).await?;
        self.rate_limit(head, ctx).await
    }
}
