//! The pingora phases. Each phase is glue: it calls into `routes`, `auth`, `ratelimit`, `cache`
//! (through `caching`), `purge` (through `purging`), `upstream`, `forwarding` and `problem`, and
//! holds no policy of its own. Data flows one way:
//!
//! `early_request_filter` (request id) → `request_filter` (limits, path normalisation, route
//! match, authentication, rate limit, cache lookup: a hit is answered here) → `upstream_peer`
//! (round robin) → `upstream_request_filter` (forwarding headers, revalidation conditions) →
//! `request_body_filter` (body limit) → `upstream_response_filter` (what to store; a write's
//! purge, before the response is released) → `response_body_filter` (capture for the cache) →
//! `response_filter` (headers back) → `logging` (shared-tier write, metrics, access log).
//! Failures end in `fail_to_proxy`, which answers with a stale entry when one may serve, or
//! problem+json.

mod caching;
mod forwarding;
mod purging;
mod refresh;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, RETRY_AFTER, WWW_AUTHENTICATE};
use http::Method;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::ErrorType;

use crate::auth::{self, Identity, Rejection};
use crate::cache::Cache;
use crate::config::Unmatched;
use crate::metrics::{method_label, metrics};
use crate::problem::Problem;
use crate::purge::Purger;
use crate::ratelimit::{Limiter, RequestFacts, Verdict};
use crate::routing::canonical::{canonical_method, canonical_path};
use crate::routing::RouteId;
use crate::snapshot::{SharedSnapshot, Snapshot};

use crate::header_rules::{RATELIMIT, RATELIMIT_POLICY, REQUEST_ID};

/// The longest client-supplied request id passed on; longer or odd ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The gateway: one instance serves every request of every listener.
pub struct Gateway {
    snapshot: SharedSnapshot,
    limiter: Limiter,
    cache: Arc<Cache>,
    purger: Arc<Purger>,
}

impl Gateway {
    pub fn new(
        snapshot: SharedSnapshot,
        limiter: Limiter,
        cache: Arc<Cache>,
        purger: Arc<Purger>,
    ) -> Gateway {
        Gateway {
            snapshot,
            limiter,
            cache,
            purger,
        }
    }
}

impl RequestCtx {
    /// The matched route's name, `-` when none matched.
    pub fn route_name(&self) -> &str {
        self.route
            .map_or("-", |id| self.snapshot.routes.route(id).name.as_str())
    }
}

/// Adds the request's `RateLimit-Policy` and `RateLimit` headers, when a limit was checked.
pub(crate) fn insert_rate_limit_headers(
    ctx: &RequestCtx,
    response: &mut ResponseHeader,
) -> Result<()> {
    if let Some(verdict) = ctx
        .rate_limit
        .as_ref()
        .filter(|v| !v.policy_header.is_empty())
    {
        response.insert_header(RATELIMIT_POLICY, verdict.policy_header.as_str())?;
        response.insert_header(RATELIMIT, verdict.status_header.as_str())?;
    }
    Ok(())
}

/// What the phases of one request share.
pub struct RequestCtx {
    /// The configuration this request runs on, from start to end.
    pub snapshot: Arc<Snapshot>,
    pub request_id: String,
    pub route: Option<RouteId>,
    /// The client's address: the peer, or what a trusted proxy says.
    pub client_ip: IpAddr,
    /// Where the request stands with the cache.
    pub cache: caching::CachePhase,
    /// The cache rule's tags for this request, filled in from its path.
    pub cache_tags: Vec<String>,
    /// What this request's write purged, for the access log.
    pub purged: Option<crate::purge::PurgeReport>,
    /// The rate-limit decision, whose headers go on the response.
    pub rate_limit: Option<Verdict>,
    /// The verified token's identity, when the route checked one and it was present.
    pub identity: Option<Arc<Identity>>,
    /// Why authentication refused the request, for logs.
    pub auth_failure: Option<&'static str>,
    pub started: Instant,
    /// When the first origin was chosen, and how long until its response header arrived.
    pub upstream_started: Option<Instant>,
    pub upstream_elapsed: Option<std::time::Duration>,
    /// Origin chosen for the current attempt, and how many connection attempts were made.
    pub origin: Option<usize>,
    pub connect_attempts: usize,
    pub request_body_bytes: u64,
}

fn request_id_from(header: Option<&http::HeaderValue>) -> String {
    match header.and_then(|v| v.to_str().ok()) {
        Some(id)
            if !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_LEN
                && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            id.to_owned()
        }
        _ => uuid::Uuid::new_v4().to_string(),
    }
}

fn header_bytes(req: &RequestHeader) -> u64 {
    // "METHOD target HTTP/1.1\r\n", without formatting the target.
    let target = req.uri.path_and_query().map_or(1, |pq| pq.as_str().len())
        + req.uri.authority().map_or(0, |a| a.as_str().len());
    let line = req.method.as_str().len() + target + 12;
    let fields: usize = req
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    (line + fields) as u64
}

/// The sanitising phase (see [`forwarding::sanitize_request`]): an override header reaches the
/// origin only when `[server] forward_override_headers` names it, or the route's cache rule keys
/// on it.
fn sanitize(session: &mut Session, ctx: &RequestCtx, trusted_peer: bool) {
    let snapshot = &ctx.snapshot;
    let vary = snapshot
        .routes
        .policy(ctx.route)
        .cache
        .as_ref()
        .map_or(&[][..], |c| c.vary.as_slice());
    let keep_override = |name: &str| {
        snapshot.forward_override_headers.iter().any(|h| h == name)
            || vary.iter().any(|h| h == name)
    };
    let upgrade = session.is_upgrade_req();
    forwarding::sanitize_request(
        session.req_header_mut(),
        &forwarding::Sanitize {
            trusted_peer,
            upgrade,
            claim_headers: snapshot.routes.gateway_headers(),
            keep_override: &keep_override,
        },
    );
}

/// Replaces the request's target with `path` and its query, in origin form.
fn set_path(session: &mut Session, path: &str) -> Result<()> {
    let req = session.req_header();
    let target = match req.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    match target.parse() {
        Ok(uri) => {
            session.req_header_mut().set_uri(uri);
            Ok(())
        }
        Err(_) => Error::e_explain(
            ErrorType::HTTPStatus(400),
            "the request target is not valid",
        ),
    }
}

/// What the upstream request says about the client (see [`forwarding::upstream_request`]).
fn forwarded<'a>(session: &Session, ctx: &'a RequestCtx) -> forwarding::Forwarded<'a> {
    forwarding::Forwarded {
        client_ip: session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string()),
        proto: scheme(session),
        request_id: &ctx.request_id,
        upgrade: session.is_upgrade_req(),
    }
}

fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// The scheme the client used: part of the cache key, and `X-Forwarded-Proto`.
pub(crate) fn scheme(session: &Session) -> &'static str {
    if is_tls(session) {
        "https"
    } else {
        "http"
    }
}

/// The status for an error that ended a request: `504` for upstream timeouts, `502` for an
/// unreachable or broken upstream, `0` when the client is gone.
fn status_for(e: &Error) -> u16 {
    use ErrorType::*;
    match e.etype() {
        HTTPStatus(code) => *code,
        ConnectTimedout | TLSHandshakeTimedout if e.esource() == &ErrorSource::Upstream => 504,
        ReadTimedout | WriteTimedout if e.esource() == &ErrorSource::Upstream => 504,
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                WriteError | ReadError | ConnectionClosed => 0,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    }
}

/// What the client is told about a failure. Never the origin's address: that is for the logs
/// (pingora's error line names the peer), not for whoever sent the request.
fn detail_for(status: u16, e: &Error) -> String {
    match status {
        502 => format!(
            "the gateway could not get a valid response from the upstream: {}",
            e.etype().as_str()
        ),
        504 => format!(
            "the upstream did not answer in time ({})",
            e.etype().as_str()
        ),
        413 | 431 => e
            .context
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_else(|| "the request is too large".to_owned()),
        400 => "the request could not be read".to_owned(),
        _ => "the gateway failed to handle the request".to_owned(),
    }
}

impl Gateway {
    /// The canonical-path phase: rewrites the request's path to its canonical form (see
    /// [`crate::routing::canonical`]), so everything after it — and the origin — sees one
    /// spelling. Refuses paths that have none with `400`.
    async fn canonicalize(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let req = session.req_header();
        // Absolute-form (`GET http://host/p HTTP/1.1`) keeps its target verbatim for the wire;
        // HTTP/2 carries `:authority` in the URI. Either way the target's authority is the
        // request's host (RFC 9112 §3.2.2), and the origin gets origin-form.
        let absolute_form = !req.raw_path().starts_with(b"/");
        let authority = match req.uri.authority() {
            Some(authority) => Some(authority.as_str().to_owned()),
            None if absolute_form => http::Uri::try_from(req.raw_path())
                .ok()
                .and_then(|uri| uri.authority().map(|a| a.as_str().to_owned())),
            None => None,
        };
        let path = match canonical_path(req.uri.path(), &ctx.snapshot.routes.paths) {
            Ok(std::borrow::Cow::Borrowed(_)) if authority.is_none() && !absolute_form => {
                return Ok(false)
            }
            Ok(path) => path.into_owned(),
            Err(e) => {
                Problem::new(400, e.to_string())
                    .send(session, &ctx.request_id)
                    .await?;
                return Ok(true);
            }
        };
        if let Some(authority) = authority {
            session
                .req_header_mut()
                .insert_header(http::header::HOST, authority)?;
        }
        set_path(session, &path).map(|()| false)
    }

    /// The routing phase: matches the canonical path once, rewrites typed parameters into their
    /// canonical form, and refuses unmatched requests when `[defaults] unmatched = "deny"`.
    async fn route(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let req = session.req_header();
        let resolution = ctx.snapshot.routes.resolve(&req.method, req.uri.path());
        if let Some(path) = &resolution.rewritten {
            set_path(session, path)?;
        }
        ctx.route = resolution.route;
        if ctx.route.is_some() || ctx.snapshot.routes.unmatched == Unmatched::Pass {
            return Ok(false);
        }
        let method = session.req_header().method.clone();
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
                    "{method} is not routed for this path; routed methods: {}",
                    allowed.join(", ")
                ),
            )
            .with_header(http::header::ALLOW, allowed.join(", "))
        };
        problem.send(session, &ctx.request_id).await?;
        Ok(true)
    }

    /// The authentication phase: strips gateway-set headers, checks the token against the
    /// route's policy, and either forwards the identity or answers 401/403 itself.
    async fn authenticate(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // `Authorization` is a singleton field: with two, the gateway and the origin could each
        // believe a different one.
        let authorizations = session
            .req_header()
            .headers
            .get_all(http::header::AUTHORIZATION);
        if authorizations.iter().nth(1).is_some() {
            Problem::new(
                400,
                "the request carries more than one Authorization header; send exactly one",
            )
            .send(session, &ctx.request_id)
            .await?;
            return Ok(true);
        }
        let snapshot = ctx.snapshot.clone();
        let Some(authenticator) = &snapshot.auth else {
            return Ok(false);
        };
        let policy = &snapshot.routes.policy(ctx.route).auth;
        // An address that has failed too often may not try new tokens for a while.
        let guarded =
            policy.mode != crate::config::AuthMode::None && self.limiter.limits_auth_failures();
        let new_token = guarded
            && authenticator
                .token_from(&session.req_header().headers)
                .is_some_and(|t| !authenticator.is_remembered(t));
        if new_token {
            if let Some(verdict) = self.limiter.auth_failures_exhausted(ctx.client_ip).await {
                ctx.auth_failure = Some("throttled");
                let problem = Problem::new(
                    429,
                    "too many failed authentication attempts from this address; try again later",
                );
                self.send_limited(session, ctx, problem, &verdict).await?;
                return Ok(true);
            }
        }
        match authenticator
            .check(policy, &session.req_header().headers)
            .await
        {
            Ok(identity) => {
                auth::forward(policy, identity.as_deref(), session.req_header_mut());
                ctx.identity = identity;
                Ok(false)
            }
            Err(rejection) => {
                ctx.auth_failure = Some(rejection.label());
                if matches!(rejection, Rejection::Invalid(_)) {
                    self.limiter.record_auth_failure(ctx.client_ip).await;
                }
                Problem::new(rejection.status(), rejection.detail())
                    .with_header(WWW_AUTHENTICATE, rejection.challenge(&authenticator.realm))
                    .send(session, &ctx.request_id)
                    .await?;
                Ok(true)
            }
        }
    }
}

impl Gateway {
    /// The rate-limit phase: counts the request against its route's limits and answers `429`
    /// itself when one is exhausted.
    async fn rate_limit(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let snapshot = ctx.snapshot.clone();
        let Some(policy) = &snapshot.routes.policy(ctx.route).rate_limit else {
            return Ok(false);
        };
        let facts = RequestFacts {
            client_ip: ctx.client_ip,
            subject: ctx.identity.as_ref().and_then(|i| i.subject.as_deref()),
            headers: &session.req_header().headers,
        };
        let verdict = self.limiter.check(policy, &facts).await;
        if verdict.allowed {
            ctx.rate_limit = Some(verdict);
            return Ok(false);
        }
        let problem = Problem::new(
            429,
            "rate limit exceeded; retry after the time in Retry-After",
        );
        self.send_limited(session, ctx, problem, &verdict).await?;
        ctx.rate_limit = Some(verdict);
        Ok(true)
    }

    async fn send_limited(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        problem: Problem,
        verdict: &Verdict,
    ) -> Result<()> {
        let mut problem = problem.with_header(RETRY_AFTER, verdict.retry_after_secs.to_string());
        if !verdict.policy_header.is_empty() {
            problem = problem
                .with_header(RATELIMIT_POLICY, verdict.policy_header.clone())
                .with_header(RATELIMIT, verdict.status_header.clone());
        }
        problem.send(session, &ctx.request_id).await
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            snapshot: self.snapshot.load_full(),
            request_id: String::new(),
            route: None,
            client_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            rate_limit: None,
            cache: caching::CachePhase::default(),
            cache_tags: Vec::new(),
            purged: None,
            identity: None,
            auth_failure: None,
            started: Instant::now(),
            upstream_started: None,
            upstream_elapsed: None,
            origin: None,
            connect_attempts: 0,
            request_body_bytes: 0,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.request_id = request_id_from(session.req_header().headers.get(REQUEST_ID));
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        match forwarding::request_framing(&session.req_header().headers) {
            Ok(None) => {}
            Ok(Some(length)) => {
                session
                    .req_header_mut()
                    .insert_header(CONTENT_LENGTH, length)?;
            }
            Err(detail) => {
                Problem::new(400, detail)
                    .send(session, &ctx.request_id)
                    .await?;
                return Ok(true);
            }
        }
        let limits = &ctx.snapshot.limits;
        let req = session.req_header();

        let head = header_bytes(req);
        if head > limits.max_request_header_bytes {
            let problem = Problem::new(
                431,
                format!(
                    "the request line and headers are {head} bytes; this gateway accepts at most {}",
                    limits.max_request_header_bytes
                ),
            );
            problem.send(session, &ctx.request_id).await?;
            return Ok(true);
        }

        let declared = req
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(length) = declared.filter(|&l| l > limits.max_request_body_bytes) {
            let problem = Problem::new(
                413,
                format!(
                    "the request body is {length} bytes; this gateway accepts at most {}",
                    limits.max_request_body_bytes
                ),
            );
            problem.send(session, &ctx.request_id).await?;
            return Ok(true);
        }

        if let Some(method) = canonical_method(&req.method) {
            session.req_header_mut().set_method(method);
        }
        if self.canonicalize(session, ctx).await? {
            return Ok(true);
        }

        if let Some(token) = ctx.snapshot.purge_method_token.clone() {
            if session.req_header().method.as_str() == "PURGE" {
                purging::purge_request(&self.purger, &self.cache, session, ctx, &token).await?;
                return Ok(true);
            }
        }

        if self.route(session, ctx).await? {
            return Ok(true);
        }
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let trusted_peer = peer.is_some_and(|p| ctx.snapshot.trusted_proxies.trusts(p));
        if let Some(peer) = peer {
            ctx.client_ip = ctx
                .snapshot
                .trusted_proxies
                .client_ip(peer, &session.req_header().headers);
        }
        sanitize(session, ctx, trusted_peer);

        if self.authenticate(session, ctx).await? {
            return Ok(true);
        }
        if self.rate_limit(session, ctx).await? {
            return Ok(true);
        }
        caching::lookup(&self.cache, session, ctx).await
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let upstream = &ctx.snapshot.upstream;
        let origin = upstream.pick();
        ctx.origin = Some(origin);
        ctx.connect_attempts += 1;
        ctx.upstream_started.get_or_insert_with(Instant::now);
        Ok(upstream.peer(origin))
    }

    /// A connection that was never established carries no request, so trying the next origin is
    /// safe for every method; each origin is tried at most once per request.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if ctx.connect_attempts < ctx.snapshot.upstream.len() {
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        forwarding::upstream_request(upstream_request, &forwarded(session, ctx))?;
        caching::on_upstream_request(ctx, upstream_request)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(chunk) = body {
            ctx.request_body_bytes += chunk.len() as u64;
            let limit = ctx.snapshot.limits.max_request_body_bytes;
            if ctx.request_body_bytes > limit {
                return Error::e_explain(
                    ErrorType::HTTPStatus(413),
                    format!("the request body exceeds the limit of {limit} bytes"),
                );
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_elapsed = ctx.upstream_started.map(|t| t.elapsed());
        forwarding::upstream_response(upstream_response);
        caching::on_response(&self.cache, session, ctx, upstream_response)?;
        purging::on_response(&self.purger, &self.cache, session, ctx, upstream_response).await
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        caching::on_body(&self.cache, ctx, body, end_of_stream);
        Ok(None)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        insert_rate_limit_headers(ctx, response)?;
        response.insert_header(REQUEST_ID, ctx.request_id.as_str())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if caching::is_answer(e) {
            return match caching::serve_answer(session, ctx).await {
                Ok(_) => FailToProxy {
                    error_code: 200,
                    can_reuse_downstream: true,
                },
                Err(write_error) => {
                    tracing::debug!(request_id = %ctx.request_id, error = %write_error, "could not send the stored response");
                    FailToProxy {
                        error_code: 0,
                        can_reuse_downstream: false,
                    }
                }
            };
        }
        let status = status_for(e);
        match caching::serve_stale_on_error(session, ctx, status).await {
            Ok(true) => {
                return FailToProxy {
                    error_code: 200,
                    can_reuse_downstream: false,
                }
            }
            Ok(false) => {}
            Err(write_error) => {
                tracing::debug!(request_id = %ctx.request_id, error = %write_error, "could not send the stale response")
            }
        }
        if status > 0 && session.response_written().is_none() {
            let problem = Problem::new(status, detail_for(status, e));
            if let Err(write_error) = problem.send(session, &ctx.request_id).await {
                tracing::debug!(request_id = %ctx.request_id, error = %write_error, "could not send the error response");
            }
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    /// A client that goes away mid-request is routine, not an error worth an ERROR line.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        caching::is_answer(error)
            || error.esource() == &ErrorSource::Downstream
                && matches!(
                    error.etype(),
                    ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
                )
    }

    /// One access-log event and the request's metrics.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // A stored entry answering instead of the origin is a success, not an error.
        let e = e.filter(|e| !caching::is_answer(e));
        caching::on_done(&self.cache, ctx, e.is_some()).await;
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let req = session.req_header();
        let route = ctx
            .route
            .map_or("-", |id| ctx.snapshot.routes.route(id).name.as_str());
        let duration = ctx.started.elapsed();

        let m = metrics();
        let status_text = status.to_string();
        m.requests
            .with_label_values(&[route, method_label(&req.method), &status_text])
            .inc();
        m.request_duration
            .with_label_values(&[route])
            .observe(duration.as_secs_f64());
        if let Some(upstream) = ctx.upstream_elapsed {
            m.upstream_duration
                .with_label_values(&[route])
                .observe(upstream.as_secs_f64());
        }
        if let Some(e) = e.filter(|e| e.esource() == &ErrorSource::Upstream) {
            m.upstream_errors
                .with_label_values(&[e.etype().as_str()])
                .inc();
        }
        if let Some(reason) = ctx.auth_failure {
            m.auth_failures.with_label_values(&[reason]).inc();
        }
        let rate_limit = match &ctx.rate_limit {
            Some(v) => {
                let outcome = if v.allowed { "allowed" } else { "limited" };
                m.rate_limit_decisions
                    .with_label_values(&[route, outcome, v.decided_by])
                    .inc();
                outcome
            }
            None => "-",
        };

        tracing::info!(
            target: "access",
            request_id = %ctx.request_id,
            client_ip = %ctx.client_ip,
            method = %req.method,
            path = %req.uri.path(),
            route,
            status,
            bytes = session.body_bytes_sent(),
            duration_ms = duration.as_secs_f64() * 1000.0,
            upstream_ms = ctx.upstream_elapsed.map(|d| d.as_secs_f64() * 1000.0),
            cache = ctx.cache.label(),
            rate_limit,
            subject = ctx.identity.as_ref().and_then(|i| i.subject.as_deref()),
            auth_failure = ctx.auth_failure,
            purge = ctx.purged.and_then(|p| p.seq),
            error = e.map(|e| e.etype().as_str()),
        );
    }
}
