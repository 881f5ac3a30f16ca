//! What changes in headers as a request passes through: hop-by-hop headers removed (RFC 9110
//! §7.6.1), `X-Forwarded-*` added, the request id set in both directions.

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST, TE, UPGRADE};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::Result;

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

/// Removes hop-by-hop headers. For a protocol upgrade (WebSocket), `Connection: upgrade` and
/// `Upgrade` are kept, as the upgrade must reach the origin.
fn strip_hop_by_hop(headers: &HeaderMap, upgrade: bool, mut remove: impl FnMut(&str)) {
    let mut listed: Vec<String> = Vec::new();
    for value in headers.get_all(CONNECTION) {
        if let Ok(value) = value.to_str() {
            listed.extend(
                value
                    .split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive"),
            );
        }
    }
    for name in listed {
        if upgrade && name == "upgrade" {
            continue;
        }
        if name == "transfer-encoding" || name == "host" {
            continue;
        }
        remove(&name);
    }
    for name in HOP_BY_HOP {
        remove(name);
    }
    if !upgrade {
        remove(CONNECTION.as_str());
        remove(UPGRADE.as_str());
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

/// Rewrites the request that goes upstream.
pub fn upstream_request(req: &mut RequestHeader, fwd: &Forwarded<'_>) -> Result<()> {
    let headers = req.headers.clone();
    strip_hop_by_hop(&headers, fwd.upgrade, |name| {
        req.remove_header(name);
    });
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
    let headers = resp.headers.clone();
    strip_hop_by_hop(&headers, upgrade, |name| {
        resp.remove_header(name);
    });
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
        let fwd = Forwarded {
            client_ip: Some("127.0.0.1".into()),
            proto: "http",
            request_id: "rid",
            upgrade: false,
        };
        upstream_request(&mut req, &fwd).unwrap();
        for gone in ["connection", "x-secret", "keep-alive", "te"] {
            assert!(req.headers.get(gone).is_none(), "{gone} should be removed");
        }
        assert_eq!(req.headers["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(req.headers["x-forwarded-host"], "example.test");
        assert_eq!(req.headers["x-forwarded-proto"], "http");
        assert_eq!(req.headers["x-request-id"], "rid");
    }
}
