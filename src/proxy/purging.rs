//! The purge phase's glue: when a write succeeds, purge what it changed — before its response
//! goes to the client, so a read that starts after the write returned can never see the old
//! representation (see [`crate::purge`]).

use http::header::{CONTENT_LOCATION, LOCATION};
use http::Uri;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use super::caching::request_host;
use super::RequestCtx;
use crate::purge::{self, path_key, tag_key, Purger};
use crate::routes::normalize_path;

/// Reads the origin's purge headers (removing `Surrogate-Key`, which is for caches only), and
/// for a write answered with a triggering status purges: the request's own path, the route
/// rule's paths and tags, the tags in `Cache-Group-Invalidation`, and the `Location` and
/// `Content-Location` targets on the same host (RFC 9111 §4.4).
pub async fn on_response(
    purger: &Purger,
    session: &Session,
    ctx: &mut RequestCtx,
    response: &mut ResponseHeader,
) -> Result<()> {
    response.remove_header(&purge::SURROGATE_KEY);
    let req = session.req_header();
    if !purge::is_write(&req.method) {
        return Ok(());
    }
    let snapshot = ctx.snapshot.clone();
    let rule = &snapshot.routes.policy(ctx.route).purge;
    if !rule.triggers(response.status.as_u16()) {
        return Ok(());
    }
    let path = req.uri.path();
    let mut keys = vec![path_key(path)];
    if !rule.paths.is_empty() || !rule.tags.is_empty() {
        let params = snapshot.routes.params(path);
        keys.extend(rule.paths.iter().map(|t| path_key(&t.expand(&params))));
        keys.extend(rule.tags.iter().map(|t| tag_key(&t.expand(&params))));
    }
    keys.extend(purge::invalidated_tags(&response.headers).map(|t| tag_key(&t)));
    let host = request_host(req);
    for name in [LOCATION, CONTENT_LOCATION] {
        let target = response.headers.get(&name).and_then(|v| v.to_str().ok());
        if let Some(target) = target.and_then(|t| same_host_path(t, host)) {
            keys.push(path_key(&target));
        }
    }
    keys.sort_unstable();
    keys.dedup();
    ctx.purged = Some(purger.purge(keys).await);
    Ok(())
}

/// The normalised path of a `Location`-like URI reference when it points at `host` (a relative
/// reference always does).
fn same_host_path(target: &str, host: Option<&str>) -> Option<String> {
    let uri: Uri = target.parse().ok()?;
    if let Some(authority) = uri.authority() {
        let host = host?;
        if !authority.as_str().eq_ignore_ascii_case(host) {
            return None;
        }
    } else if !target.starts_with('/') {
        return None;
    }
    Some(normalize_path(uri.path()).into_owned())
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
        assert_eq!(
            same_host_path("/a/../products/./9", host).as_deref(),
            Some("/products/9")
        );
    }
}
