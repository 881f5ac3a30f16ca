//! What changes in headers as a request passes through: hop-by-hop headers removed (RFC 9110
//! §7.6.1), headers only the gateway may set removed, `X-Forwarded-*` added, the request id set
//! in both directions, a stale entry's validators put on a revalidation.
//!
//! Every header a client sends is input the origin may act on. [`sanitize_request`] runs once,
//! right after routing and before anything else reads the headers: it removes what the client
//! named hop-by-hop, the headers the gateway owns (claims it forwards, `X-Forwarded-*` from a
//! peer that is not a trusted proxy) in any spelling (`X_User_Id` reaches WSGI, CGI and Rack
//! origins as `X-User-Id`), and the headers that make some origins act on another method or URL
//! than the request line's. Only then does the gateway set its own, so no client header — not
//! even a `Connection` naming one — can remove or shadow them.

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, ETAG, HOST, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, LAST_MODIFIED, TE, TRANSFER_ENCODING, UPGRADE,
};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::Result;

use crate::cache::entry::Entry;
use crate::header_rules::{FORWARDING_HEADERS, OVERRIDE_HEADERS, UNDERSCORE_GUARDED};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Always connection-specific, whether or not `Connection` lists them. `Transfer-Encoding` is
/// not here: pingora frames bodies itself and reads it to do so.
const HOP_BY_HOP: [&str; 4] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
];

/// How [`sanitize_request`] treats one request.
pub struct Sanitize<'a> {
    /// The peer is a configured trusted proxy: its `X-Forwarded-*` stand.
    pub trusted_peer: bool,
    pub upgrade: bool,
    /// Headers the gateway sets from token claims (on any route).
    pub claim_headers: &'a [HeaderName],
    /// Override headers this request may carry to the origin.
    pub keep_override: &'a dyn Fn(&str) -> bool,
}

/// Removes from a client's request every header the origin must not take from the client (see
/// the module docs). Runs before the gateway sets any header of its own.
pub fn sanitize_request(req: &mut RequestHeader, rules: &Sanitize<'_>) {
    let tokens = connection_tokens(&req.headers);
    for name in nominated(&tokens, rules.upgrade) {
        req.remove_header(name);
    }
    if !tokens.is_empty() {
        // What `Connection` named is gone; keep only the options that concern this connection,
        // so nothing after this (the HTTP engine included) strips a header the gateway sets.
        let options: Vec<&str> = tokens
            .iter()
            .map(String::as_str)
            .filter(|t| *t == "close" || *t == "keep-alive" || (rules.upgrade && *t == "upgrade"))
            .collect();
        req.remove_header(&CONNECTION);
        if !options.is_empty() {
            // Tokens are plain ASCII: always a valid value.
            let _ = req.insert_header(CONNECTION, options.join(", "));
        }
    }
    // One pass over the request's own (few) header names, instead of a removal per name the
    // gateway knows of: this runs on every request, hits included.
    let doomed: Vec<HeaderName> = req
        .headers
        .keys()
        .filter(|name| doomed(name, rules))
        .cloned()
        .collect();
    for name in doomed {
        req.remove_header(&name);
    }
}

/// Whether a client's header `name` must not reach the origin (see [`sanitize_request`]).
fn doomed(name: &HeaderName, rules: &Sanitize<'_>) -> bool {
    let name_str = name.as_str();
    if HOP_BY_HOP.contains(&name_str) || rules.claim_headers.contains(name) {
        return true;
    }
    if OVERRIDE_HEADERS.contains(&name_str) {
        return !(rules.keep_override)(name_str);
    }
    if FORWARDING_HEADERS.contains(&name_str) {
        return !rules.trusted_peer;
    }
    if name_str.contains('_') {
        let dashed = name_str.replace('_', "-");
        return OVERRIDE_HEADERS
            .iter()
            .chain(&FORWARDING_HEADERS)
            .chain(&UNDERSCORE_GUARDED)
            .chain(&HOP_BY_HOP)
            .any(|h| *h == dashed)
            || rules.claim_headers.iter().any(|h| h.as_str() == dashed);
    }
    false
}

/// Checks a request's body framing (RFC 9112 §6): `Content-Length` and `Transfer-Encoding`
/// together, or `Content-Length` values that differ or are not numbers, are refused — an origin
/// could frame the body differently from the gateway (request smuggling). Several equal values
/// are one: `Ok(Some(value))` says to send that one alone.
pub fn request_framing(
    headers: &HeaderMap,
) -> std::result::Result<Option<HeaderValue>, &'static str> {
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter().peekable();
    if lengths.peek().is_none() {
        return Ok(None);
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        return Err("the request has both Content-Length and Transfer-Encoding; send one");
    }
    let mut value: Option<&str> = None;
    let mut count = 0;
    for field in lengths {
        let text = field
            .to_str()
            .map_err(|_| "Content-Length is not a number")?;
        for item in text.split(',') {
            let item = item.trim();
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err("Content-Length is not a number");
            }
            if value.is_some_and(|v| v != item) {
                return Err("the request has several different Content-Length values");
            }
            value = Some(item);
            count += 1;
        }
    }
    Ok(match (count, value) {
        (1, _) | (_, None) => None,
        (_, Some(v)) => Some(HeaderValue::from_str(v).expect("digits are a header value")),
    })
}

/// The options of a message's `Connection` header fields, lower case; empty without one (and
/// then nothing is allocated).
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The header names among `Connection`'s options (RFC 9110 §7.6.1), except the ones that frame
/// the message or name its host, and `Upgrade` on an upgrade.
fn nominated(tokens: &[String], upgrade: bool) -> impl Iterator<Item = &str> {
    tokens
        .iter()
        .map(String::as_str)
        .filter(move |name| match *name {
            "close" | "keep-alive" | "transfer-encoding" | "host" | "content-length" => false,
            "upgrade" => !upgrade,
            _ => true,
        })
}

/// Removes a response's hop-by-hop headers. For a protocol upgrade (WebSocket), `Connection:
/// upgrade` and `Upgrade` are kept, as the upgrade must reach the client.
fn strip_hop_by_hop(resp: &mut ResponseHeader, upgrade: bool) {
    let tokens = connection_tokens(&resp.headers);
    for name in nominated(&tokens, upgrade) {
        resp.remove_header(name);
    }
    for name in HOP_BY_HOP {
        resp.remove_header(name);
    }
    if !upgrade {
        resp.remove_header(&CONNECTION);
        resp.remove_header(&UPGRADE);
    }
}

/// Everything the upstream request needs beyond the client's own headers.
pub struct Forwarded<'a> {
    pub client_ip: Option<String>,
    /// `https` when the client connection was TLS.
    pub proto: &'static str,
    pub request_id: &'a str,
    pub upgrade: bool,
}

/// Rewrites the request that goes upstream. The client's headers were sanitised when it
/// arrived ([`sanitize_request`]); what is left here is the connection's own header and the
/// gateway's forwarding headers, set last so nothing can remove them.
pub fn upstream_request(req: &mut RequestHeader, fwd: &Forwarded<'_>) -> Result<()> {
    if !fwd.upgrade {
        req.remove_header(&CONNECTION);
        req.remove_header(&UPGRADE);
    }
    // `TE: trailers` is the one value a proxy may pass on.
    if let Some(te) = req.headers.get(TE) {
        if !te.as_bytes().eq_ignore_ascii_case(b"trailers") {
            req.remove_header(&TE);
        }
    }

    // HTTP/2 clients send `:authority` instead of `Host`; an HTTP/1.1 origin needs `Host` and an
    // origin-form target.
    let authority = req.uri.authority().map(|a| a.as_str().to_owned());
    if let Some(authority) = &authority {
        if !req.headers.contains_key(HOST) {
            req.insert_header(HOST, authority.as_str())?;
        }
        let target = req
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .parse()
            .expect("a path-and-query is a valid URI");
        req.set_uri(target);
    }

    // A client's own `X-Forwarded-For` was removed unless its peer is a trusted proxy.
    if let Some(ip) = &fwd.client_ip {
        let chain = match req.headers.get(X_FORWARDED_FOR).map(HeaderValue::to_str) {
            Some(Ok(existing)) if !existing.trim().is_empty() => format!("{existing}, {ip}"),
            _ => ip.clone(),
        };
        req.insert_header(X_FORWARDED_FOR, chain)?;
    }
    req.insert_header(X_FORWARDED_PROTO, fwd.proto)?;
    let host = req
        .headers
        .get(HOST)
        .cloned()
        .or_else(|| authority.and_then(|a| HeaderValue::from_str(&a).ok()));
    match host {
        Some(host) => req.insert_header(X_FORWARDED_HOST, host)?,
        None => {
            req.remove_header(&X_FORWARDED_HOST);
        }
    }
    req.insert_header(super::REQUEST_ID, fwd.request_id)?;
    Ok(())
}

/// Removes hop-by-hop headers from the origin's response (kept for a `101 Switching Protocols`).
pub fn upstream_response(resp: &mut ResponseHeader) {
    let upgrade = resp.status == http::StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(resp, upgrade);
}

/// The request's host: `Host`, or the HTTP/2 `:authority`.
pub fn request_host(req: &pingora::http::RequestHeader) -> Option<&str> {
    req.headers
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
}

/// Replaces a request's `If-None-Match` / `If-Modified-Since` with `entry`'s validators.
pub fn add_validators(entry: &Entry, request: &mut pingora::http::RequestHeader) -> Result<()> {
    request.remove_header(&IF_NONE_MATCH);
    request.remove_header(&IF_MODIFIED_SINCE);
    if let Some(etag) = entry.headers.get(ETAG) {
        request.insert_header(IF_NONE_MATCH, etag.clone())?;
    }
    if let Some(modified) = entry.headers.get(LAST_MODIFIED) {
        request.insert_header(IF_MODIFIED_SINCE, modified.clone())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.insert_header("connection", "keep-alive, x-secret")
            .unwrap();
        req.insert_header("x-secret", "1").unwrap();
        req.insert_header("keep-alive", "timeout=5").unwrap();
        req.insert_header("te", "gzip").unwrap();
        req.insert_header("host", "example.test").unwrap();
        req.insert_header("x-forwarded-for", "10.0.0.1").unwrap();
        req.insert_header("x-user-id", "forged").unwrap();
        req.insert_header("x_user_id", "forged").unwrap();
        req.insert_header("x-http-method-override", "DELETE")
            .unwrap();
        let claim_headers = [HeaderName::from_static("x-user-id")];
        sanitize_request(
            &mut req,
            &Sanitize {
                trusted_peer: true,
                upgrade: false,
                claim_headers: &claim_headers,
                keep_override: &|_| false,
            },
        );
        let fwd = Forwarded {
            client_ip: Some("127.0.0.1".into()),
            proto: "http",
            request_id: "rid",
            upgrade: false,
        };
        upstream_request(&mut req, &fwd).unwrap();
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "te",
            "x-user-id",
            "x_user_id",
            "x-http-method-override",
        ] {
            assert!(req.headers.get(gone).is_none(), "{gone} should be removed");
        }
        assert_eq!(req.headers["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(req.headers["x-forwarded-host"], "example.test");
        assert_eq!(req.headers["x-forwarded-proto"], "http");
        assert_eq!(req.headers["x-request-id"], "rid");
    }
}
