//! What the steps of one request share: the client connection, the request's context (its
//! snapshot, match, identity, verdicts, cache transaction), and its id.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING, UPGRADE};
use http::request::Parts;
use http::Version;

use crate::auth::Identity;
use crate::cache::txn::Transaction;
use crate::cache::CacheRequest;
use crate::ratelimit::Verdict;
use crate::routing::Matched;
use crate::snapshot::Snapshot;

/// What a step decides: go on, or answer now with this response.
pub type Step = std::ops::ControlFlow<http::Response<super::body::Body>>;

/// Whether a request announces a body: a length above zero, or chunked framing.
fn has_body(req: &Parts) -> bool {
    req.headers.contains_key(TRANSFER_ENCODING)
        || req
            .headers
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// The request's host: its `Host` header, or the target's authority.
pub fn request_host(req: &Parts) -> Option<&str> {
    req.headers
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
}

/// The longest client-supplied request id passed on; longer or odd ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The client connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct Connection {
    pub peer: SocketAddr,
    pub tls: bool,
}

impl Connection {
    /// The scheme the client used: part of the cache key, and `X-Forwarded-Proto`.
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

/// What the steps of one request share.
pub struct RequestCtx {
    /// The configuration this request runs on, from start to end.
    pub snapshot: Arc<Snapshot>,
    pub request_id: String,
    /// The route step's match (route, read route, path parameters): made once, read by every
    /// later step.
    pub route: Matched,
    /// The client's address: the peer, or what a trusted proxy says.
    pub client_ip: IpAddr,
    pub connection: Connection,
    /// Where the request stands with the cache.
    pub cache: Transaction,
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
    /// How long the origin took to send its response header.
    pub upstream_elapsed: Option<std::time::Duration>,
    /// Why the exchange with the origin failed, when it did (a
    /// `cachegate_upstream_errors_total` kind; the body may report one later).
    pub upstream_error: Option<&'static str>,
    /// The request's trace (continued from the client's `traceparent`, or new).
    pub trace: crate::trace::TraceContext,
    /// The client's path ended in a slash that the canonical path dropped.
    pub sent_slash: bool,
    /// The path the origin receives, when it is not the canonical one: the origin's own
    /// trailing-slash spelling ([`crate::routing::Resolution::origin_path`]).
    pub origin_path: Option<String>,
}

impl RequestCtx {
    /// The request as the cache sees it.
    pub fn cache_request<'a>(&'a self, req: &'a Parts) -> CacheRequest<'a> {
        CacheRequest {
            method: &req.method,
            scheme: self.connection.scheme(),
            host: request_host(req),
            path: req.uri.path(),
            query: req.uri.query(),
            headers: &req.headers,
            user: self.identity.as_ref().and_then(|i| i.subject.as_deref()),
            authorized: self.identity.is_some() || req.headers.contains_key(AUTHORIZATION),
            has_body: has_body(req),
            tags: &self.cache_tags,
        }
    }

    /// A request's context before any step ran.
    pub fn new(
        snapshot: Arc<Snapshot>,
        request_id: String,
        connection: Connection,
        trace: crate::trace::TraceContext,
    ) -> RequestCtx {
        RequestCtx {
            trace,
            snapshot,
            request_id,
            route: Matched::default(),
            client_ip: connection.peer.ip(),
            connection,
            rate_limit: None,
            cache: Transaction::default(),
            cache_tags: Vec::new(),
            purged: None,
            identity: None,
            auth_failure: None,
            started: Instant::now(),
            upstream_elapsed: None,
            upstream_error: None,
            sent_slash: false,
            origin_path: None,
        }
    }

    /// `uri` (the request's canonical target) as the origin receives it.
    pub fn origin_uri(&self, uri: &http::Uri) -> http::Uri {
        let Some(path) = &self.origin_path else {
            return uri.clone();
        };
        let target = match uri.query() {
            Some(query) => format!("{path}?{query}"),
            None => path.clone(),
        };
        // Built from a valid path and query plus one `/`.
        target.parse().unwrap_or_else(|_| uri.clone())
    }

    /// The policy the request runs under: its route's, or the defaults'.
    pub fn route_policy(&self) -> &crate::routing::Policy {
        self.snapshot.routes.policy(self.route.id)
    }

    /// The matched route's name, `-` when none matched.
    pub fn route_name(&self) -> &str {
        self.route
            .id
            .map_or("-", |id| self.snapshot.routes.route(id).name.as_str())
    }

    /// Whether this is an HTTP/1.1 protocol upgrade (WebSocket).
    pub(super) fn is_upgrade(head: &Parts) -> bool {
        head.version == Version::HTTP_11 && head.headers.contains_key(UPGRADE)
    }
}

pub(super) fn request_id_from(header: Option<&HeaderValue>) -> String {
    match header.and_then(|v| v.to_str().ok()) {
        Some(id)
            if !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_LEN
                && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            id.to_owned()
        }
        _ => new_request_id(),
    }
}

/// A fresh request id: 32 hex digits, a random per-process prefix and a counter. Unique without
/// a random draw or UUID formatting per request; not a secret.
fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for word in [prefix, count] {
        for shift in (0..16).rev() {
            id.push(HEX[(word >> (shift * 4)) as usize & 0xf] as char);
        }
    }
    id
}
