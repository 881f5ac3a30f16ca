//! The upstream step: the request sent to an origin, its answer turned into the client's
//! response — labelled for the cache, captured for a fill, purging what a write changed — and
//! protocol upgrades joined into a tunnel.

use std::time::{Duration, Instant};

use http::header::{HeaderValue, RETRY_AFTER};
use http::request::Parts;
use http::{Request, Response, StatusCode, Version};
use hyper::body::{Body as _, Incoming};

use super::body::Body;
use super::context::RequestCtx;
use super::{caching, forwarding, purging, respond, Gateway};
use crate::problem::Problem;
use crate::upstream::body::RequestBody;
use crate::upstream::UpstreamError;

impl Gateway {
    /// The upstream step: sends the request to an origin and turns its answer into the client's
    /// response — labelled for the cache, captured for a fill, purging what a write changed.
    pub(super) async fn forward(
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

/// What the client is told about a failure. Never the origin's address: that is for the logs,
/// not for whoever sent the request.
pub(super) fn detail_for(error: &UpstreamError) -> String {
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

/// Logs (at most once a minute) an origin redirect to another spelling of the path it was sent:
/// the client follows it, the gateway forwards the same spelling again, and the client loops.
/// It means the route's template does not spell the path the way the origin does.
pub(super) fn warn_if_redirected_to_itself(
    head: &Parts,
    ctx: &RequestCtx,
    headers: &http::HeaderMap,
) {
    static LAST_WARNING: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let Some(target) = headers
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|t| purging::same_host_path(t, super::context::request_host(head)))
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
pub(super) async fn first_frame(
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

/// Joins a client and an origin after `101 Switching Protocols`, both ways, until either ends.
pub(super) async fn tunnel(client: hyper::upgrade::OnUpgrade, origin: hyper::upgrade::OnUpgrade) {
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
