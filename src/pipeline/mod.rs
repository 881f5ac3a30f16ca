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
//! The files, each depending only on those listed after it:
//! - `explain`: `cachegate explain`, running the same steps without sending anything.
//! - `purging`: the purge after a write, write-through, and the `PURGE` method.
//! - `caching`: the cache step's glue around [`crate::cache::txn`].
//! - `forwarding`: framing checks, header sanitising, the forwarding headers.
//! - `respond`: the responses the gateway writes itself (problems, stored entries).
//! - `telemetry`: the request's metrics, access-log line and span.
//! - `context`: what a request's steps share.
//! - `body`: the response body, and the watcher that hears it end.

pub mod body;
mod caching;
mod context;
pub mod explain;
mod forwarding;
mod purging;
mod respond;
mod telemetry;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderValue, CONTENT_LENGTH, RETRY_AFTER, WWW_AUTHENTICATE};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body as _, Incoming};

use crate::auth::{self, Rejection};
use crate::cache::Cache;
use crate::config::Unmatched;
use crate::problem::Problem;
use crate::purge::Purger;
use crate::ratelimit::{Limiter, RequestFacts, Verdict};
use crate::routing::canonical::{canonical_method, canonical_path};
use crate::snapshot::SharedSnapshot;
use crate::upstream::body::RequestBody;
use crate::upstream::UpstreamError;

use crate::header_rules::{RATELIMIT, RATELIMIT_POLICY, REQUEST_ID};
use body::{Body, Outcome, Watcher};
use context::request_id_from;
use context::Step;
pub use context::{Connection, RequestCtx};

/// The gateway: one instance serves every request of every listener.
pub struct Gateway {
    snapshot: SharedSnapshot,
    limiter: Limiter,
    cache: Arc<Cache>,
    purger: Arc<Purger>,
}

fn header_bytes(head: &Parts) -> u64 {
    // "METHOD target HTTP/1.1\r\n", without formatting the target.
    let target = head.uri.path_and_query().map_or(1, |pq| pq.as_str().len())
        + head.uri.authority().map_or(0, |a| a.as_str().len());
    let line = head.method.as_str().len() + target + 12;
    let fields: usize = head
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    (line + fields) as u64
}

/// Replaces the request's target with `path` and its query, in origin form.
fn set_path(head: &mut Parts, path: &str) -> Result<(), Problem> {
    let target = match head.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    match target.parse() {
        Ok(uri) => {
            head.uri = uri;
            Ok(())
        }
        Err(_) => Err(Problem::new(400, "the request target is not valid")),
    }
}

/// What the client is told about a failure. Never the origin's address: that is for the logs,
/// not for whoever sent the request.
fn detail_for(error: &UpstreamError) -> String {
    match error.status() {
        504 => format!("the upstream did not answer in time ({})", error.label()),
        // These say nothing of the origin but its configured limit, or are the client's doing.
        400 | 408 | 413 | 503 => error.to_string(),
        _ => format!(
            "the gateway could not get a valid response from the upstream: {}",
            error.label()
        ),
    }
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

    /// The steps before routing: framing and size limits, the method's and the path's
    /// canonical forms.
    fn before_route(head: &mut Parts, ctx: &mut RequestCtx) -> Step {
        Self::check_framing(head, ctx)?;
        Self::check_size(head, ctx)?;
        if let Some(method) = canonical_method(&head.method) {
            head.method = method;
        }
        Self::canonicalize(head, ctx)
    }

    /// After routing: the client's address (the peer, or what a trusted proxy says), and the
    /// headers only the gateway may set removed.
    fn identify_and_sanitize(head: &mut Parts, ctx: &mut RequestCtx) {
        let peer = ctx.connection.peer.ip();
        let trusted_peer = ctx.snapshot.trusted_proxies.trusts(peer);
        ctx.client_ip = ctx.snapshot.trusted_proxies.client_ip(peer, &head.headers);
        sanitize(head, ctx, trusted_peer);
    }

    /// Host and body framing (RFC 9112 §3.2, §6): a missing or doubled `Host` and ambiguous
    /// framing are refused, and the connection closed, since where this request's body ends is
    /// exactly what is in doubt.
    fn check_framing(head: &mut Parts, ctx: &RequestCtx) -> Step {
        match forwarding::request_framing(head) {
            Ok(None) => ControlFlow::Continue(()),
            Ok(Some(length)) => {
                head.headers.insert(CONTENT_LENGTH, length);
                ControlFlow::Continue(())
            }
            Err(refused) => {
                let problem = Problem::new(refused.status(), refused.detail());
                let mut response = respond::problem(ctx, problem);
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                ControlFlow::Break(response)
            }
        }
    }

    /// `431` for a request head over `max_request_header_bytes`, `413` for a declared body over
    /// `max_request_body_bytes` (a streamed one is cut off when it passes the limit).
    fn check_size(head: &Parts, ctx: &RequestCtx) -> Step {
        let limits = &ctx.snapshot.limits;
        let size = header_bytes(head);
        if size > limits.max_request_header_bytes {
            return ControlFlow::Break(respond::problem(
                ctx,
                Problem::new(
                    431,
                    format!(
                        "the request line and headers are {size} bytes; this gateway accepts at most {}",
                        limits.max_request_header_bytes
                    ),
                ),
            ));
        }
        let declared = head
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(length) = declared.filter(|&l| l > limits.max_request_body_bytes) {
            return ControlFlow::Break(respond::problem(
                ctx,
                Problem::new(
                    413,
                    format!(
                        "the request body is {length} bytes; this gateway accepts at most {}",
                        limits.max_request_body_bytes
                    ),
                ),
            ));
        }
        ControlFlow::Continue(())
    }

    /// The canonical-path step: rewrites the request's path to its canonical form (see
    /// [`crate::routing::canonical`]), so everything after it — and the origin — sees one
    /// spelling. Refuses paths that have none with `400`. An absolute-form target (HTTP/1.1) or
    /// `:authority` (HTTP/2) names the request's host (RFC 9112 §3.2.2): it becomes `Host`, and
    /// the target becomes origin-form.
    fn canonicalize(head: &mut Parts, ctx: &mut RequestCtx) -> Step {
        let authority = head
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        let sent = head.uri.path();
        ctx.sent_slash = ctx.snapshot.routes.paths.ignore_trailing_slash
            && sent.len() > 1
            && sent.ends_with('/');
        let path = match canonical_path(head.uri.path(), &ctx.snapshot.routes.paths) {
            Ok(std::borrow::Cow::Borrowed(_)) if authority.is_none() => {
                return ControlFlow::Continue(())
            }
            Ok(path) => path.into_owned(),
            Err(e) => {
                return ControlFlow::Break(respond::problem(ctx, Problem::new(400, e.to_string())))
            }
        };
        if let Some(authority) = authority {
            // The target's authority is the host; a `Host` naming another leaves it open which
            // one the origin will believe (RFC 9112 §3.2.2 lets a proxy refuse the request).
            if let Some(host) = head.headers.get(http::header::HOST) {
                if !host.as_bytes().eq_ignore_ascii_case(authority.as_bytes()) {
                    return ControlFlow::Break(respond::problem(
                        ctx,
                        Problem::new(
                            400,
                            "the request target names a different host than the Host header; send one host",
                        ),
                    ));
                }
            }
            head.headers.insert(http::header::HOST, authority);
        }
        match set_path(head, &path) {
            Ok(()) => ControlFlow::Continue(()),
            Err(problem) => ControlFlow::Break(respond::problem(ctx, problem)),
        }
    }

    /// The routing step: matches the canonical path once, rewrites typed parameters into their
    /// canonical form, and refuses unmatched requests when `[defaults] unmatched = "deny"`.
    fn route(head: &mut Parts, ctx: &mut RequestCtx) -> Step {
        let resolution = ctx.snapshot.routes.resolve(&head.method, head.uri.path());
        ctx.origin_path = resolution.origin_path(head.uri.path(), ctx.sent_slash);
        if let Some(path) = &resolution.rewritten {
            if let Err(problem) = set_path(head, path) {
                return ControlFlow::Break(respond::problem(ctx, problem));
            }
        }
        ctx.route = resolution.matched;
        if ctx.route.id.is_some() || ctx.snapshot.routes.unmatched == Unmatched::Pass {
            return ControlFlow::Continue(());
        }
        let problem = if resolution.allowed.is_empty() {
            Problem::new(
                404,
                "no route of this gateway matches the request path, and unmatched requests are refused",
            )
        } else {
            let allowed: Vec<&str> = resolution.allowed.iter().map(Method::as_str).collect();
            Problem::new(
                405,
                format!(
                    "{} is not routed for this path; routed methods: {}",
                    head.method,
                    allowed.join(", ")
                ),
            )
            .with_header(http::header::ALLOW, allowed.join(", "))
        };
        ControlFlow::Break(respond::problem(ctx, problem))
    }

    /// The authentication step: checks the token against the route's policy, and either
    /// forwards the identity or answers 401/403 itself.
    async fn authenticate(&self, head: &mut Parts, ctx: &mut RequestCtx) -> Step {
        Self::check_credentials(Some(&self.limiter), head, ctx).await
    }

    /// The authentication step's body. `limiter` throttles addresses that fail too often and
    /// counts this request's failure; `None` is a dry run (`explain`), which changes nothing.
    async fn check_credentials(
        limiter: Option<&Limiter>,
        head: &mut Parts,
        ctx: &mut RequestCtx,
    ) -> Step {
        // `Authorization` is a singleton field: with two, the gateway and the origin could each
        // believe a different one.
        if head
            .headers
            .get_all(http::header::AUTHORIZATION)
            .iter()
            .nth(1)
            .is_some()
        {
            return ControlFlow::Break(respond::problem(
                ctx,
                Problem::new(
                    400,
                    "the request carries more than one Authorization header; send exactly one",
                ),
            ));
        }
        let snapshot = ctx.snapshot.clone();
        let Some(authenticator) = &snapshot.auth else {
            return ControlFlow::Continue(());
        };
        let policy = &snapshot.routes.policy(ctx.route.id).auth;
        // An address that has failed too often may not try new tokens for a while.
        let guard = limiter
            .filter(|l| policy.mode != crate::config::AuthMode::None && l.limits_auth_failures());
        let new_token = |limiter| {
            authenticator
                .token_from(&head.headers)
                .is_some_and(|t| !authenticator.is_remembered(t))
                .then_some(limiter)
        };
        if let Some(limiter) = guard.and_then(new_token) {
            if let Some(verdict) = limiter.auth_failures_exhausted(ctx.client_ip).await {
                ctx.auth_failure = Some("throttled");
                let problem = Problem::new(
                    429,
                    "too many failed authentication attempts from this address; try again later",
                );
                return ControlFlow::Break(limited(ctx, problem, &verdict));
            }
        }
        match authenticator.check(policy, &head.headers).await {
            Ok(identity) => {
                auth::forward(policy, identity.as_deref(), &mut head.headers);
                ctx.identity = identity;
                ControlFlow::Continue(())
            }
            Err(rejection) => {
                ctx.auth_failure = Some(rejection.label());
                if let Some(limiter) =
                    limiter.filter(|_| matches!(rejection, Rejection::Invalid(_)))
                {
                    limiter.record_auth_failure(ctx.client_ip).await;
                }
                let problem = Problem::new(rejection.status(), rejection.detail())
                    .with_header(WWW_AUTHENTICATE, rejection.challenge(&authenticator.realm));
                ControlFlow::Break(respond::problem(ctx, problem))
            }
        }
    }

    /// The rate-limit step: counts the request against its route's limits and answers `429`
    /// itself when one is exhausted.
    async fn rate_limit(&self, head: &Parts, ctx: &mut RequestCtx) -> Step {
        let snapshot = ctx.snapshot.clone();
        let Some(policy) = &snapshot.routes.policy(ctx.route.id).rate_limit else {
            return ControlFlow::Continue(());
        };
        let facts = RequestFacts {
            client_ip: ctx.client_ip,
            subject: ctx.identity.as_ref().and_then(|i| i.subject.as_deref()),
            headers: &head.headers,
        };
        let verdict = self.limiter.check(policy, &facts).await;
        if verdict.allowed {
            ctx.rate_limit = Some(verdict);
            return ControlFlow::Continue(());
        }
        let problem = Problem::new(
            429,
            "rate limit exceeded; retry after the time in Retry-After",
        );
        let response = limited(ctx, problem, &verdict);
        ctx.rate_limit = Some(verdict);
        ControlFlow::Break(response)
    }

    /// The upstream step: sends the request to an origin and turns its answer into the client's
    /// response — labelled for the cache, captured for a fill, purging what a write changed.
    async fn forward(
        &self,
        head: &mut Parts,
        body: Incoming,
        ctx: &mut RequestCtx,
    ) -> Response<Body> {
        if crate::purge::is_write(&head.method) && !self.purger.ready_for_write().await {
            // Sent now, its purge could not be recorded: refuse it before the origin sees it.
            let problem = Problem::new(
                503,
                "the gateway cannot reach Redis to invalidate what this write would change, so it did not send the write to the origin; retry later",
            )
            .with_header(RETRY_AFTER, "1");
            let mut response = respond::problem(ctx, problem);
            response
                .headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
        let upgrade = RequestCtx::is_upgrade(head);
        let client_upgrade = if upgrade {
            head.extensions.remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };
        let mut request = Request::new(RequestBody::Empty);
        *request.method_mut() = head.method.clone();
        *request.uri_mut() = ctx.origin_uri(&head.uri);
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() =
            if ctx.cache.needs_request_headers() || purging::may_write_through(head, ctx) {
                head.headers.clone()
            } else {
                // Nothing after this reads the client's headers but its host.
                let headers = std::mem::take(&mut head.headers);
                if let Some(host) = headers.get(http::header::HOST) {
                    head.headers.insert(http::header::HOST, host.clone());
                }
                headers
            };
        forwarding::upstream_request(
            request.headers_mut(),
            &forwarding::Forwarded {
                client_ip: ctx.connection.peer.ip(),
                proto: ctx.connection.scheme(),
                request_id: &ctx.request_id,
                upgrade,
            },
        );
        ctx.trace.propagate(request.headers_mut());
        ctx.cache.upstream_request(request.headers_mut());
        let progress = if body.is_end_stream() {
            None
        } else {
            let limits = &ctx.snapshot.limits;
            let (streamed, progress) = RequestBody::client(
                body,
                limits.max_request_body_bytes,
                limits.min_request_body_rate,
            );
            *request.body_mut() = streamed;
            Some(progress)
        };

        let started = Instant::now();
        let snapshot = ctx.snapshot.clone();
        let exchange = snapshot.upstream.send(request, progress.as_deref()).await;
        ctx.upstream_elapsed = Some(started.elapsed());
        let exchange = match exchange {
            Ok(exchange) => exchange,
            Err(e) => {
                // The client's doing, not the origin's: not an upstream error.
                if !matches!(
                    e,
                    UpstreamError::BodyTooLarge(_)
                        | UpstreamError::BodyTooSlow
                        | UpstreamError::BadFraming(_)
                ) {
                    ctx.upstream_error = Some(e.label());
                }
                let status = e.status();
                if let Some(response) = caching::origin_failed(ctx, head, status) {
                    return response;
                }
                let mut problem = Problem::new(status, detail_for(&e));
                if matches!(e, UpstreamError::Saturated(_)) {
                    problem = problem.with_header(RETRY_AFTER, "1");
                }
                let mut response = respond::problem(ctx, problem);
                if progress.is_some() {
                    // The rest of the client's body is unread.
                    response
                        .headers_mut()
                        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                }
                return response;
            }
        };

        let (mut parts, mut incoming) = exchange.response.into_parts();
        forwarding::upstream_response(&mut parts.headers, parts.status);
        // A body that is already broken when the head arrives (a bad first chunk in the same
        // packet) would reach the client as an empty reply: answer it as the failure it is.
        let first = match first_frame(&mut incoming).await {
            Ok(first) => first,
            Err(e) => {
                tracing::warn!(error = %e, "the origin's response body broke at once");
                ctx.upstream_error = Some("ReadError");
                if let Some(response) = caching::origin_failed(ctx, head, 502) {
                    return response;
                }
                return respond::problem(
                    ctx,
                    Problem::new(
                        502,
                        "the gateway could not get a valid response from the upstream: ReadError",
                    ),
                );
            }
        };
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            let origin_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
            if let (Some(client), Some(origin)) = (client_upgrade, origin_upgrade) {
                tokio::spawn(tunnel(client, origin));
            }
            respond::finish_headers(ctx, &mut parts.headers);
            return Response::from_parts(parts, Body::empty());
        }
        if parts.status.is_redirection() {
            warn_if_redirected_to_itself(head, ctx, &parts.headers);
        }
        if let Some(answer) = caching::response(&self.cache, head, ctx, &mut parts) {
            // A stored entry answers instead (a 304 confirmed it, or stale-if-error on a 5xx).
            if incoming.is_end_stream() {
                exchange.connection.release();
            }
            return answer;
        }
        purging::on_response(&self.purger, &self.cache, head, ctx, &mut parts).await;
        if ctx.purged.is_some_and(|p| p.unconfirmed.is_some()) {
            return respond::problem(
                ctx,
                Problem::new(
                    503,
                    format!(
                        "the origin applied this write (it answered {}), but the gateway could not reach Redis to invalidate the old version on every instance; reads elsewhere may see it until Redis is back",
                        parts.status.as_u16()
                    ),
                ),
            );
        }
        respond::finish_headers(ctx, &mut parts.headers);
        Response::from_parts(
            parts,
            Body::upstream(
                incoming,
                first,
                exchange.connection,
                snapshot.upstream.read_timeout,
            ),
        )
    }
}

/// Logs (at most once a minute) an origin redirect to another spelling of the path it was sent:
/// the client follows it, the gateway forwards the same spelling again, and the client loops.
/// It means the route's template does not spell the path the way the origin does.
fn warn_if_redirected_to_itself(head: &Parts, ctx: &RequestCtx, headers: &http::HeaderMap) {
    static LAST_WARNING: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let Some(target) = headers
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|t| purging::same_host_path(t, forwarding::request_host(head)))
    else {
        return;
    };
    let routes = &ctx.snapshot.routes;
    if routes.canonical_target(&target).as_deref() != Some(head.uri.path()) {
        return;
    }
    let mut last = LAST_WARNING.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_some_and(|at| at.elapsed() < Duration::from_secs(60)) {
        return;
    }
    *last = Some(Instant::now());
    let sent = ctx.origin_uri(&head.uri);
    tracing::warn!(
        route = ctx.route_name(),
        sent = sent.path(),
        location = %target,
        "the origin redirected a request to another spelling of its own path, so clients that follow it loop; write the route's template the way the origin spells the path (with or without its trailing slash)"
    );
}

/// The origin's first body frame if it is already there (`None` when it is not yet, or the body
/// is empty); an error when the body already failed.
async fn first_frame(
    incoming: &mut Incoming,
) -> Result<Option<hyper::body::Frame<bytes::Bytes>>, hyper::Error> {
    if incoming.is_end_stream() {
        return Ok(None);
    }
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut *incoming).poll_frame(cx) {
            std::task::Poll::Ready(Some(Ok(frame))) => Ok(Some(frame)),
            std::task::Poll::Ready(Some(Err(e))) => Err(e),
            std::task::Poll::Ready(None) | std::task::Poll::Pending => Ok(None),
        })
    })
    .await
}

/// A `429` with `Retry-After` and the limit's headers.
fn limited(ctx: &RequestCtx, problem: Problem, verdict: &Verdict) -> Response<Body> {
    let mut problem = problem.with_header(RETRY_AFTER, verdict.retry_after_secs.to_string());
    if !verdict.policy_header.is_empty() {
        problem = problem
            .with_header(RATELIMIT_POLICY, verdict.policy_header.clone())
            .with_header(RATELIMIT, verdict.status_header.clone());
    }
    respond::problem(ctx, problem)
}

/// The sanitising step (see [`forwarding::sanitize_request`]): an override header reaches the
/// origin only when `[server] forward_override_headers` names it, or the route's cache rule keys
/// on it.
fn sanitize(head: &mut Parts, ctx: &RequestCtx, trusted_peer: bool) {
    let snapshot = &ctx.snapshot;
    let vary = snapshot
        .routes
        .policy(ctx.route.id)
        .cache
        .as_ref()
        .map_or(&[][..], |c| c.vary.as_slice());
    let keep_override = |name: &str| {
        snapshot.forward_override_headers.iter().any(|h| h == name)
            || vary.iter().any(|h| h == name)
    };
    // Only the protocols the route allows may be asked of the origin (never h2c).
    let allowed = &snapshot.routes.policy(ctx.route.id).upgrades;
    let upgrade =
        forwarding::filter_upgrade(&mut head.headers, allowed) && RequestCtx::is_upgrade(head);
    forwarding::sanitize_request(
        &mut head.headers,
        &forwarding::Sanitize {
            trusted_peer,
            upgrade,
            claim_headers: snapshot.routes.gateway_headers(),
            keep_override: &keep_override,
        },
    );
}

/// Joins a client and an origin after `101 Switching Protocols`, both ways, until either ends.
async fn tunnel(client: hyper::upgrade::OnUpgrade, origin: hyper::upgrade::OnUpgrade) {
    let (client, origin) = match tokio::try_join!(client, origin) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "protocol upgrade failed");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut origin = hyper_util::rt::TokioIo::new(origin);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut origin).await;
}
