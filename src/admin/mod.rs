//! The admin listener: a separate address (loopback by default) for operators and
//! orchestrators, never for clients.
//!
//! - `GET /`: the status page (`status.rs`): live requests/s, hit ratio, per-route counts, tiers,
//!   recent purges and a purge form. The page itself is open; the data it polls
//!   (`GET /status.json`) needs the admin token when one is configured, like `/metrics`.
//! - `GET /healthz`: the process is alive. Always open.
//! - `GET /readyz`: `200` when every configured dependency is usable (configuration loaded, an
//!   upstream origin accepting connections, Redis reachable, JWKS loaded), else `503` with a JSON
//!   body naming what is not ready. Always open.
//! - `GET /cache/stats`: entries and bytes per cache tier (the Redis tier counted by SCAN, up to a
//!   limit), hits, misses, hit ratio. Always open.
//! - `GET /metrics`: Prometheus text format. Needs the admin token when one is configured.
//! - `POST /reload`: re-reads the configuration (like SIGHUP). Always needs the admin token;
//!   without a configured token it is refused.
//! - `POST /purge`: purges by exact URL (`{"url": "/products/7"}`, every query and variant of
//!   the path), by tag (`{"tag": "products"}`), by path prefix (`{"prefix": "/products/"}`) or
//!   everything (`{"all": true}`), on every instance; answers the purge's sequence number, how
//!   many instances acknowledged it, and how many in-process entries this instance dropped.
//!   Always needs the admin token.

mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;

use crate::auth::bears_token;
use crate::cache::entry::Entry;
use crate::cache::Cache;
use crate::metrics::metrics;
use crate::purge::{self, Purger};
use crate::reload::Reloader;
use crate::snapshot::SharedSnapshot;
use crate::store::Store;
use prometheus::core::Collector;

/// `/cache/stats` counts at most this many keys in the Redis tier.
const MEASURE_LIMIT: u64 = 1_000_000;

/// How long `/readyz` waits for an origin to accept a connection.
const ORIGIN_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

pub struct Admin {
    snapshot: SharedSnapshot,
    store: Arc<dyn Store>,
    cache: Arc<Cache>,
    purger: Arc<Purger>,
    reloader: Arc<Reloader>,
    token: Option<String>,
    started: Instant,
}

impl Admin {
    pub fn new(
        snapshot: SharedSnapshot,
        store: Arc<dyn Store>,
        cache: Arc<Cache>,
        purger: Arc<Purger>,
        reloader: Arc<Reloader>,
        token: Option<String>,
    ) -> Admin {
        Admin {
            snapshot,
            store,
            cache,
            purger,
            reloader,
            token: token.filter(|t| !t.is_empty()),
            started: Instant::now(),
        }
    }

    /// Each readiness check by name, with `None` when it passes or the reason it does not.
    async fn readiness(&self) -> Vec<(&'static str, Option<String>)> {
        let snapshot = self.snapshot.load_full();
        let mut checks = vec![("config", None)];

        let upstream = &snapshot.upstream;
        let mut reachable = false;
        for i in 0..upstream.len() {
            let addr = upstream.origin(i).addr;
            if let Ok(Ok(_)) =
                tokio::time::timeout(ORIGIN_PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr))
                    .await
            {
                reachable = true;
                break;
            }
        }
        let origins: Vec<&str> = (0..upstream.len())
            .map(|i| upstream.origin(i).url.as_str())
            .collect();
        checks.push((
            "upstream",
            (!reachable).then(|| format!("no origin accepts connections: {}", origins.join(", "))),
        ));
        checks.push(("store", self.store.health().err().map(|e| e.to_string())));
        if let Some(purge) = self.purger.readiness() {
            checks.push(("purge", purge.err().map(|e| e.to_string())));
        }
        if let Some(auth) = &snapshot.auth {
            checks.push(("auth", auth.ready().err().map(|e| e.to_string())));
        }
        checks
    }

    /// Entries and bytes per tier, and hits, misses and the hit ratio from the metrics.
    async fn cache_stats(&self) -> Response<Vec<u8>> {
        // Sums cache_results over every label set with this result (and tier, when given).
        let count = |result: &str, tier: Option<&str>| -> u64 {
            metrics()
                .cache_results
                .collect()
                .iter()
                .flat_map(|family| family.get_metric())
                .filter(|m| {
                    let labels = m.get_label();
                    let has = |name: &str, value: &str| {
                        labels
                            .iter()
                            .any(|l| l.name() == name && l.value() == value)
                    };
                    has("result", result) && tier.is_none_or(|t| has("tier", t))
                })
                .map(|m| m.get_counter().get_value() as u64)
                .sum()
        };
        let (entries, bytes) = self.cache.memory_stats();
        let mut tiers = json!({
            "memory": {"entries": entries, "bytes": bytes, "hits": count("hit", Some("memory"))},
        });
        match self.cache.shared_stats(MEASURE_LIMIT).await {
            Some(Ok((entries, bytes, truncated))) => {
                tiers["redis"] = json!({
                    "entries": entries,
                    "bytes": bytes,
                    "counted_up_to_limit": truncated,
                    "hits": count("hit", Some("redis")),
                });
            }
            Some(Err(e)) => tiers["redis"] = json!({"error": e.to_string()}),
            None => {}
        }
        let (hits, misses) = (count("hit", None), count("miss", None));
        let ratio = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + misses) as f64
        };
        json_response(
            StatusCode::OK,
            json!({
                "tiers": tiers,
                "hits": hits,
                "misses": misses,
                "stale": count("stale", None),
                "revalidated": count("revalidated", None),
                "bypasses": count("bypass", None),
                "hit_ratio": ratio,
            }),
        )
    }

    /// `POST /purge` with a JSON body naming what to purge.
    async fn purge(&self, body: Incoming) -> Response<Vec<u8>> {
        let body = match Limited::new(body, MAX_PURGE_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return json_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    json!({"error": "the purge request is too large"}),
                )
            }
            Err(e) => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("could not read the request body: {e}")}),
                )
            }
        };
        let routes = &self.snapshot.load().routes;
        let target = match PurgeTarget::parse(&body, |path| routes.canonical_target(path)) {
            Ok(target) => target,
            Err(message) => {
                let message = message.to_string();
                return json_response(StatusCode::BAD_REQUEST, json!({"error": message}));
            }
        };
        let key = target.key();
        let report = self.purger.purge(vec![key]).await;
        let removed = self.cache.remove_from_memory(|entry| target.selects(entry));
        json_response(StatusCode::OK, report.answer(target.describe(), removed))
    }

    /// Reading operational data: open without a token, else only with it.
    fn refuse_read(&self, headers: &http::HeaderMap, what: &str) -> Option<Response<Vec<u8>>> {
        (self.token.is_some() && !self.authorized(headers))
            .then(|| unauthorized(&format!("{what} needs the admin token as a bearer token")))
    }

    /// Changing state: never without a configured token, and only with it.
    fn refuse_change(&self, headers: &http::HeaderMap, what: &str) -> Option<Response<Vec<u8>>> {
        if self.token.is_none() {
            return Some(json_response(
                StatusCode::FORBIDDEN,
                json!({"error": "state-changing admin endpoints are off: set [admin] token to enable them"}),
            ));
        }
        (!self.authorized(headers))
            .then(|| unauthorized(&format!("{what} needs the admin token as a bearer token")))
    }

    fn authorized(&self, headers: &http::HeaderMap) -> bool {
        self.token
            .as_deref()
            .is_some_and(|token| bears_token(headers, token))
    }
}

/// Largest `POST /purge` body accepted.
const MAX_PURGE_BODY: usize = 64 * 1024;

/// What `POST /purge` names.
#[derive(Debug, PartialEq, Eq)]
enum PurgeTarget {
    Path(String),
    Tag(String),
    Prefix(String),
    All,
}

/// How a purge request is written, for the errors that explain it.
const PURGE_USAGE: &str = r#"send one of {"url": "/products/7"}, {"tag": "products"}, {"prefix": "/products/"}, {"all": true}"#;

/// Why a `POST /purge` body names no target (answered `400` with the message).
#[derive(Debug, thiserror::Error)]
enum BadPurgeRequest {
    #[error("the body is not JSON ({0}); {PURGE_USAGE}")]
    NotJson(serde_json::Error),
    #[error("{PURGE_USAGE}")]
    Usage,
    #[error("name exactly one target; {PURGE_USAGE}")]
    NotOne,
    #[error("{url:?} is not a URL or path: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{url:?} has no absolute path; {PURGE_USAGE}")]
    NotAbsolute { url: String },
    #[error("{url:?} is not a path this gateway accepts")]
    NoCanonicalForm { url: String },
}

impl PurgeTarget {
    /// Reads a purge request; `canonical` gives a URL's path the form entries are stored under.
    fn parse(
        body: &[u8],
        canonical: impl Fn(&str) -> Option<String>,
    ) -> Result<PurgeTarget, BadPurgeRequest> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(BadPurgeRequest::NotJson)?;
        let object = value.as_object().ok_or(BadPurgeRequest::Usage)?;
        if object.len() != 1 {
            return Err(BadPurgeRequest::NotOne);
        }
        let text =
            |v: &serde_json::Value| v.as_str().map(str::to_owned).ok_or(BadPurgeRequest::Usage);
        match object.iter().next() {
            Some((k, v)) if k == "url" => {
                let url = text(v)?;
                let uri: http::Uri = match url.parse() {
                    Ok(uri) => uri,
                    Err(e) => {
                        let reason = http::uri::InvalidUri::to_string(&e);
                        return Err(BadPurgeRequest::BadUrl { url, reason });
                    }
                };
                if !uri.path().starts_with('/') {
                    return Err(BadPurgeRequest::NotAbsolute { url });
                }
                canonical(uri.path())
                    .map(PurgeTarget::Path)
                    .ok_or(BadPurgeRequest::NoCanonicalForm { url })
            }
            Some((k, v)) if k == "tag" => Ok(PurgeTarget::Tag(text(v)?)),
            Some((k, v)) if k == "prefix" => Ok(PurgeTarget::Prefix(text(v)?)),
            Some((k, v)) if k == "all" && v.as_bool() == Some(true) => Ok(PurgeTarget::All),
            _ => Err(BadPurgeRequest::Usage),
        }
    }

    fn key(&self) -> String {
        match self {
            PurgeTarget::Path(path) => purge::path_key(path),
            PurgeTarget::Tag(tag) => purge::tag_key(tag),
            PurgeTarget::Prefix(prefix) => purge::prefix_key(prefix),
            PurgeTarget::All => purge::prefix_key(""),
        }
    }

    fn selects(&self, entry: &Entry) -> bool {
        match self {
            PurgeTarget::Path(path) => entry.path == *path,
            PurgeTarget::Tag(tag) => entry.depends_on.contains(&purge::tag_key(tag)),
            PurgeTarget::Prefix(prefix) => entry.path.starts_with(prefix.as_str()),
            PurgeTarget::All => true,
        }
    }

    fn describe(&self) -> serde_json::Value {
        match self {
            PurgeTarget::Path(path) => json!({"url": path}),
            PurgeTarget::Tag(tag) => json!({"tag": tag}),
            PurgeTarget::Prefix(prefix) => json!({"prefix": prefix}),
            PurgeTarget::All => json!({"all": true}),
        }
    }
}

fn response(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("a valid response")
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Vec<u8>> {
    response(
        status,
        "application/json",
        serde_json::to_vec(&body).expect("JSON values serialize"),
    )
}

fn unauthorized(why: &str) -> Response<Vec<u8>> {
    let mut resp = json_response(StatusCode::UNAUTHORIZED, json!({"error": why}));
    resp.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer realm=\"cachegate-admin\""),
    );
    resp
}

impl Admin {
    /// Answers one admin request.
    pub async fn serve(&self, request: Request<Incoming>) -> Response<Vec<u8>> {
        let (head, body) = request.into_parts();
        let (method, path) = (&head.method, head.uri.path());
        match (method.as_str(), path) {
            ("GET" | "HEAD", "/healthz") => {
                json_response(StatusCode::OK, json!({"status": "alive"}))
            }
            ("GET" | "HEAD", "/readyz") => {
                let checks = self.readiness().await;
                let ready = checks.iter().all(|(_, problem)| problem.is_none());
                let detail: serde_json::Map<String, serde_json::Value> = checks
                    .into_iter()
                    .map(|(name, problem)| {
                        (
                            name.to_owned(),
                            json!(problem.unwrap_or_else(|| "ok".to_owned())),
                        )
                    })
                    .collect();
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let mut body = json!({"ready": ready, "checks": detail});
                // Informative, not a readiness condition: an instance without its lease still
                // answers correctly (it asks Redis, or the origin), and taking every instance
                // out while a Redis master fails over would turn a slowdown into an outage.
                if let Some(coherent) = self.purger.coherent() {
                    body["coherent"] = json!(coherent);
                }
                json_response(status, body)
            }
            ("GET", "/") => {
                let mut page = response(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    status::page(self.token.is_some()),
                );
                // Nothing but itself: no external script, style, font or frame can load.
                page.headers_mut().insert(
                    http::header::CONTENT_SECURITY_POLICY,
                    http::HeaderValue::from_static(
                        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                         connect-src 'self'; img-src data:; frame-ancestors 'none'",
                    ),
                );
                page
            }
            ("GET", "/status.json") => {
                if let Some(refusal) = self.refuse_read(&head.headers, "/status.json") {
                    return refusal;
                }
                json_response(
                    StatusCode::OK,
                    status::snapshot(&self.cache, self.store.as_ref(), &self.purger, self.started),
                )
            }
            ("GET", "/cache/stats") => self.cache_stats().await,
            ("GET", "/metrics") => {
                if let Some(refusal) = self.refuse_read(&head.headers, "/metrics") {
                    return refusal;
                }
                let (entries, bytes) = self.cache.memory_stats();
                metrics().cache_memory_entries.set(entries as i64);
                metrics().cache_memory_bytes.set(bytes as i64);
                response(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    metrics().render().into_bytes(),
                )
            }
            ("POST", "/purge") => {
                if let Some(refusal) = self.refuse_change(&head.headers, "POST /purge") {
                    return refusal;
                }
                self.purge(body).await
            }
            ("POST", "/reload") => {
                if let Some(refusal) = self.refuse_change(&head.headers, "POST /reload") {
                    return refusal;
                }
                let reloader = self.reloader.clone();
                match tokio::task::spawn_blocking(move || reloader.reload()).await {
                    Ok(Ok(done)) => json_response(
                        StatusCode::OK,
                        json!({"reloaded": true, "routes": done.routes, "needs_restart": done.needs_restart}),
                    ),
                    Ok(Err(errors)) => json_response(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!({
                            "reloaded": false,
                            "errors": errors.0.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        }),
                    ),
                    Err(e) => json_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        json!({"error": e.to_string()}),
                    ),
                }
            }
            (_, "/healthz" | "/readyz" | "/metrics" | "/reload") => json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "use GET for /healthz, /readyz and /metrics, POST for /reload"}),
            ),
            (_, other) => json_response(
                StatusCode::NOT_FOUND,
                json!({"error": format!("no admin endpoint at {other}; try /healthz, /readyz, /metrics or POST /reload")}),
            ),
        }
    }
}
