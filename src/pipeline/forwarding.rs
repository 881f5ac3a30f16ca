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
    HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, TE, TRANSFER_ENCODING,
    UPGRADE,
};
use http::request::Parts;
use http::Version;
use std::net::IpAddr;

use crate::header_rules::{FORWARDING_HEADERS, OVERRIDE_HEADERS, REQUEST_ID, UNDERSCORE_GUARDED};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Always connection-specific, whether or not `Connection` lists them. `Transfer-Encoding` is
/// not here: hyper frames bodies itself and reads it to do so.
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
pub fn sanitize_request(headers: &mut HeaderMap, rules: &Sanitize<'_>) {
    let tokens = connection_tokens(headers);
    for name in nominated(&tokens, rules.upgrade) {
        headers.remove(name);
    }
    if !tokens.is_empty() {
        // What `Connection` named is gone; keep only the options that concern this connection,
        // so nothing after this (the HTTP engine included) strips a header the gateway sets.
        let options: Vec<&str> = tokens
            .iter()
            .map(String::as_str)
            .filter(|t| *t == "close" || *t == "keep-alive" || (rules.upgrade && *t == "upgrade"))
            .collect();
        headers.remove(CONNECTION);
        if let Ok(value) = HeaderValue::from_str(&options.join(", ")) {
            if !options.is_empty() {
                headers.insert(CONNECTION, value);
            }
        }
    }
    // One pass over the request's own (few) header names, instead of a removal per name the
    // gateway knows of: this runs on every request, hits included.
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| doomed(name, rules))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(&name);
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

/// Why a request's framing or host is refused: the request is answered by the gateway and the
/// connection closed, since where its body ends (or which host it is for) is what is in doubt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    /// A transfer coding other than `chunked` (RFC 9112 §6.1: a server answers `501`).
    UnknownCoding,
    /// `chunked` more than once.
    ChunkedTwice,
    /// `Content-Length` beside `Transfer-Encoding`.
    LengthAndCoding,
    /// A `Content-Length` that is not plain digits.
    BadLength,
    /// Several `Content-Length` values that differ.
    DifferentLengths,
    /// An HTTP/1.1 request without `Host` (RFC 9112 §3.2).
    NoHost,
    /// More than one `Host` field (RFC 9112 §3.2).
    TwoHosts,
}

impl FramingError {
    pub fn status(self) -> u16 {
        match self {
            FramingError::UnknownCoding => 501,
            _ => 400,
        }
    }

    pub fn detail(self) -> &'static str {
        match self {
            FramingError::UnknownCoding => {
                "the request uses a transfer coding this gateway does not implement; send the body with Content-Length or Transfer-Encoding: chunked alone"
            }
            FramingError::ChunkedTwice => {
                "Transfer-Encoding names chunked more than once; send it once"
            }
            FramingError::LengthAndCoding => {
                "the request has both Content-Length and Transfer-Encoding; send one"
            }
            FramingError::BadLength => "Content-Length is not a number",
            FramingError::DifferentLengths => {
                "the request has several different Content-Length values"
            }
            FramingError::NoHost => "an HTTP/1.1 request needs a Host header; send one",
            FramingError::TwoHosts => "the request has more than one Host header; send one",
        }
    }
}

/// Checks a request's host and body framing (RFC 9112 §3.2, §6): no `Host` on HTTP/1.1 or two of
/// them, a transfer coding other than exactly `chunked`, `Content-Length` and `Transfer-Encoding`
/// together, or `Content-Length` values that differ or are not numbers, are refused — an origin
/// could read the message differently from the gateway (request smuggling). Several equal
/// lengths are one: `Ok(Some(value))` says to send that one alone.
pub fn request_framing(head: &Parts) -> Result<Option<HeaderValue>, FramingError> {
    let headers = &head.headers;
    let mut hosts = headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return Err(FramingError::TwoHosts),
        // HTTP/2's `:authority` and an absolute-form target name the host without the field.
        (None, None) if head.version == Version::HTTP_11 && head.uri.authority().is_none() => {
            return Err(FramingError::NoHost)
        }
        _ => {}
    }
    let mut chunked = 0;
    for coding in headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty())
    {
        if !coding.eq_ignore_ascii_case(b"chunked") {
            // hyper refuses a coding after chunked; one before it (`x, chunked`, or in a field
            // of its own) would reach the origin, which might decode it.
            return Err(FramingError::UnknownCoding);
        }
        chunked += 1;
    }
    if chunked > 1 {
        // RFC 9112 §6.1: chunked is applied once; a second one is read differently by different
        // parsers.
        return Err(FramingError::ChunkedTwice);
    }
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter().peekable();
    if lengths.peek().is_none() {
        return Ok(None);
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        return Err(FramingError::LengthAndCoding);
    }
    let mut value: Option<&str> = None;
    let mut count = 0;
    for field in lengths {
        let text = field.to_str().map_err(|_| FramingError::BadLength)?;
        for item in text.split(',') {
            let item = item.trim();
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err(FramingError::BadLength);
            }
            if value.is_some_and(|v| v != item) {
                return Err(FramingError::DifferentLengths);
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

/// `HTTP2-Settings` only means something beside `Upgrade: h2c`, which is never passed on.
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Keeps of a request's `Upgrade` only the protocols `allowed` names (lower-case names, such as
/// `websocket`; a protocol's `/version` is kept with it), and removes `HTTP2-Settings`. Returns
/// whether an upgrade is still asked for. `h2c` is never allowed: an origin that accepts it
/// hands the client a raw HTTP/2 connection past every check of the gateway (h2c smuggling).
pub fn filter_upgrade(headers: &mut HeaderMap, allowed: &[String]) -> bool {
    headers.remove(HTTP2_SETTINGS);
    if !headers.contains_key(UPGRADE) {
        return false;
    }
    let kept: Vec<String> = headers
        .get_all(UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|protocol| {
            let name = protocol.split('/').next().unwrap_or("").trim();
            !name.eq_ignore_ascii_case("h2c")
                && allowed.iter().any(|a| name.eq_ignore_ascii_case(a))
        })
        .map(str::to_owned)
        .collect();
    headers.remove(UPGRADE);
    match HeaderValue::from_str(&kept.join(", ")) {
        Ok(value) if !kept.is_empty() => {
            headers.insert(UPGRADE, value);
            true
        }
        _ => false,
    }
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
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let tokens = connection_tokens(headers);
    for name in nominated(&tokens, upgrade) {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if !upgrade {
        headers.remove(CONNECTION);
        headers.remove(UPGRADE);
    }
}

/// Everything the upstream request needs beyond the client's own headers.
pub struct Forwarded<'a> {
    pub client_ip: IpAddr,
    /// `https` when the client connection was TLS.
    pub proto: &'static str,
    pub request_id: &'a str,
    pub upgrade: bool,
}

/// Rewrites the headers that go upstream. The client's headers were sanitised when the request
/// arrived ([`sanitize_request`]) and an HTTP/2 `:authority` became `Host`; what is left here is
/// the connection's own header and the gateway's forwarding headers, set last so nothing can
/// remove them.
pub fn upstream_request(headers: &mut HeaderMap, fwd: &Forwarded<'_>) {
    if !fwd.upgrade {
        headers.remove(CONNECTION);
        headers.remove(UPGRADE);
    }
    // `TE: trailers` is the one value a proxy may pass on.
    if let Some(te) = headers.get(TE) {
        if !te.as_bytes().eq_ignore_ascii_case(b"trailers") {
            headers.remove(TE);
        }
    }
    // A client's own `X-Forwarded-For` was removed unless its peer is a trusted proxy.
    let ip = fwd.client_ip.to_string();
    let chain = match headers.get(X_FORWARDED_FOR).map(HeaderValue::to_str) {
        Some(Ok(existing)) if !existing.trim().is_empty() => format!("{existing}, {ip}"),
        _ => ip,
    };
    if let Ok(chain) = HeaderValue::from_str(&chain) {
        headers.insert(X_FORWARDED_FOR, chain);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(fwd.proto));
    match headers.get(HOST).cloned() {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST, host);
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
    if let Ok(id) = HeaderValue::from_str(fwd.request_id) {
        headers.insert(REQUEST_ID, id);
    }
}

/// Removes hop-by-hop headers from the origin's response (kept for a `101 Switching Protocols`).
pub fn upstream_response(headers: &mut HeaderMap, status: http::StatusCode) {
    strip_hop_by_hop(headers, status == http::StatusCode::SWITCHING_PROTOCOLS);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut req = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "gzip"),
            ("host", "example.test"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-user-id", "forged"),
            ("x_user_id", "forged"),
            ("x-http-method-override", "DELETE"),
        ] {
            req.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
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
            client_ip: IpAddr::from([127, 0, 0, 1]),
            proto: "http",
            request_id: "rid",
            upgrade: false,
        };
        upstream_request(&mut req, &fwd);
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "te",
            "x-user-id",
            "x_user_id",
            "x-http-method-override",
        ] {
            assert!(req.get(gone).is_none(), "{gone} should be removed");
        }
        assert_eq!(req["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(req["x-forwarded-host"], "example.test");
        assert_eq!(req["x-forwarded-proto"], "http");
        assert_eq!(req["x-request-id"], "rid");
    }
}
