//! The purge phase's glue: when a write succeeds, purge what it changed — before its response
//! goes to the client, so a read that starts after the write returned can never see the old
//! representation (see [`crate::purge`]).

use http::header::{AUTHORIZATION, CONTENT_LOCATION, LOCATION};
use http::request::Parts;
use http::response;
use http::{Method, Response, Uri};

use super::body::Body;

use super::context::request_host;
use super::context::RequestCtx;
use super::respond;
use crate::cache::{Cache, CacheRequest};
use crate::problem::Problem;
use crate::purge::{self, path_key, tag_key, Purger};

/// Reads the origin's purge headers (removing `Surrogate-Key`, which is for caches only), and
/// for a write answered with a triggering status purges: the request's own path, the route
/// rule's paths and tags, the tags in `Cache-Group-Invalidation`, and the `Location` and
/// `Content-Location` targets on the same host (RFC 9111 §4.4).
pub async fn on_response(
    purger: &Purger,
    cache: &Cache,
    req: &Parts,
    ctx: &mut RequestCtx,
    response: &mut response::Parts,
) {
    response.headers.remove(&purge::SURROGATE_KEY);
    if !purge::is_write(&req.method) {
        return;
    }
    let snapshot = ctx.snapshot.clone();
    let rule = &snapshot.routes.policy(ctx.route.id).purge;
    if !rule.triggers(response.status.as_u16()) {
        return;
    }
    let path = req.uri.path();
    let mut keys = rule.keys_for(path, &ctx.route.params);
    keys.extend(purge::invalidated_tags(&response.headers).map(|t| tag_key(&t)));
    let host = request_host(req);
    for name in [LOCATION, CONTENT_LOCATION] {
        let target = response.headers.get(&name).and_then(|v| v.to_str().ok());
        let target = target.and_then(|t| same_host_path(t, host));
        if let Some(target) = target.and_then(|t| snapshot.routes.canonical_target(&t)) {
            keys.push(path_key(&target));
        }
    }
    keys.sort_unstable();
    keys.dedup();
    let report = purger.purge(keys).await;
    ctx.purged = Some(report);
    if let Some(seq) = report.seq {
        write_through(cache, req, ctx, rule.write_through, response, seq);
    }
}

/// Whether a write-through may need the client's request headers after the origin answered: a
/// `PUT` or `PATCH` to a path whose reads are cached.
pub fn may_write_through(req: &Parts, ctx: &RequestCtx) -> bool {
    matches!(req.method, Method::PUT | Method::PATCH)
        && ctx
            .snapshot
            .routes
            .policy(ctx.route.read_id)
            .cache
            .is_some()
}

/// Write-through (opt-in): a `PUT` or `PATCH` answered `200` whose body is the target's full new
/// representation — the rule says so, or `Content-Location` names the target — becomes the GET
/// entry of the target, under the GET route's cache rule, stamped with the write's own purge so
/// any later purge supersedes it.
fn write_through(
    cache: &Cache,
    req: &Parts,
    ctx: &mut RequestCtx,
    enabled: bool,
    response: &response::Parts,
    seq: u64,
) {
    if response.status.as_u16() != 200 || !matches!(req.method, Method::PUT | Method::PATCH) {
        return;
    }
    let path = req.uri.path();
    let names_target = response
        .headers
        .get(CONTENT_LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|t| same_host_path(t, request_host(req)))
        .and_then(|t| ctx.snapshot.routes.canonical_target(&t))
        .is_some_and(|target| target == path);
    if !(enabled || names_target) {
        return;
    }
    store_written(cache, req, ctx, response, seq);
}

/// The response to a write as the GET entry of its URL, under the read route's rule, stamped
/// with the write's purge sequence `stamp`.
fn store_written(
    cache: &Cache,
    req: &Parts,
    ctx: &mut RequestCtx,
    response: &http::response::Parts,
    stamp: u64,
) {
    let snapshot = ctx.snapshot.clone();
    let Some(policy) = &snapshot.routes.policy(ctx.route.read_id).cache else {
        return;
    };
    if !policy.tags.is_empty() {
        ctx.cache_tags = policy
            .tags
            .iter()
            .map(|t| t.expand(&ctx.route.params))
            .collect();
    }
    // The entry serves the read route's audience, not the writer: the writer's credentials do not
    // decide whether it may be stored (the rule's opt-in does).
    let mut headers = req.headers.clone();
    headers.remove(AUTHORIZATION);
    let request = CacheRequest {
        method: &http::Method::GET,
        headers: &headers,
        authorized: false,
        has_body: false,
        ..ctx.cache_request(req)
    };
    if let Some(txn) = cache.write_through(policy, &request, &response.headers, stamp) {
        ctx.cache = txn;
    }
}

/// `PURGE <url>` on a main listener (when `[admin] purge_method` is on): purges the URL's path
/// everywhere, like `POST /purge` with `{"url": ...}`, authorised by the admin token.
pub async fn purge_request(
    purger: &Purger,
    cache: &Cache,
    req: &Parts,
    ctx: &RequestCtx,
    token: &str,
) -> Response<Body> {
    if !crate::auth::bears_token(&req.headers, token) {
        let problem = Problem::new(401, "PURGE needs the admin token as a bearer token")
            .with_header(
                http::header::WWW_AUTHENTICATE,
                "Bearer realm=\"cachegate-purge\"".to_owned(),
            );
        return respond::problem(ctx, problem);
    }
    let Some(path) = ctx.snapshot.routes.canonical_target(req.uri.path()) else {
        return respond::problem(
            ctx,
            Problem::new(400, "the path to purge has no canonical form"),
        );
    };
    let report = purger.purge(vec![path_key(&path)]).await;
    let removed = cache.remove_from_memory(|entry| entry.path == path);
    let body = serde_json::to_vec(&report.answer(serde_json::json!({"url": path}), removed))
        .expect("JSON values serialize");
    let mut response = Response::new(Body::full(body.into()));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    respond::finish_headers(ctx, headers);
    response
}

/// The path of a `Location`-like URI reference when it points at `host` (a relative reference
/// always does), as written: callers make it canonical.
pub(super) fn same_host_path(target: &str, host: Option<&str>) -> Option<String> {
    let uri: Uri = target.parse().ok()?;
    if let Some(authority) = uri.authority() {
        let host = host?;
        if !authority.as_str().eq_ignore_ascii_case(host) {
            return None;
        }
    } else if !target.starts_with('/') {
        return None;
    }
    Some(uri.path().to_owned())
}

#[cfg(test)]
mod tests {
    use super::same_host_path;

    #[test]
    fn only_same_host_targets_are_purged() {
        let host = Some("api.example.test");
        assert_eq!(
            same_host_path("/products/9", host).as_deref(),
            Some("/products/9")
        );
        assert_eq!(
            same_host_path("http://API.example.test/products/9?x=1", host).as_deref(),
            Some("/products/9")
        );
        assert_eq!(
            same_host_path("https://elsewhere.test/products/9", host),
            None
        );
        assert_eq!(same_host_path("products/9", host), None);
    }
}
