//! The steps that admit a request, in order: framing and size limits, the canonical path,
//! routing (once), sanitising and the client's address. Each refuses a request it cannot pass with the
//! problem a client can act on.

use std::ops::ControlFlow;

use http::header::{HeaderValue, CONTENT_LENGTH};
use http::request::Parts;
use http::Method;

use super::context::{RequestCtx, Step};
use super::{forwarding, respond, Gateway};
use crate::config::Unmatched;
use crate::problem::Problem;
use crate::routing::canonical::{canonical_method, canonical_path};

impl Gateway {
    /// The steps before routing: framing and size limits, the method's and the path's
    /// canonical forms.
    pub(super) fn before_route(head: &mut Parts, ctx: &mut RequestCtx) -> Step {
        Self::check_framing(head, ctx)?;
        Self::check_size(head, ctx)?;
        if let Some(method) = canonical_method(&head.method) {
            head.method = method;
        }
        Self::canonicalize(head, ctx)
    }

    /// After routing: the client's address (the peer, or what a trusted proxy says), and the
    /// headers only the gateway may set removed.
    pub(super) fn identify_and_sanitize(head: &mut Parts, ctx: &mut RequestCtx) {
        let peer = ctx.connection.peer.ip();
        let trusted_peer = ctx.snapshot.trusted_proxies.trusts(peer);
        ctx.client_ip = ctx.snapshot.trusted_proxies.client_ip(peer, &head.headers);
        sanitize(head, ctx, trusted_peer);
    }

    /// Host and body framing (RFC 9112 §3.2, §6): a missing or doubled `Host` and ambiguous
    /// framing are refused, and the connection closed, since where this request's body ends is
    /// exactly what is in doubt.
    pub(super) fn check_framing(head: &mut Parts, ctx: &RequestCtx) -> Step {
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
    pub(super) fn check_size(head: &Parts, ctx: &RequestCtx) -> Step {
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
    pub(super) fn canonicalize(head: &mut Parts, ctx: &mut RequestCtx) -> Step {
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
    pub(super) fn route(head: &mut Parts, ctx: &mut RequestCtx) -> Step {
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
}

pub(super) fn header_bytes(head: &Parts) -> u64 {
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
pub(super) fn set_path(head: &mut Parts, path: &str) -> Result<(), Problem> {
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

/// The sanitising step (see [`forwarding::sanitize_request`]): an override header reaches the
/// origin only when `[server] forward_override_headers` names it, or the route's cache rule keys
/// on it.
pub(super) fn sanitize(head: &mut Parts, ctx: &RequestCtx, trusted_peer: bool) {
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
