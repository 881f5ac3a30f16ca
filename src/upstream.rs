//! The upstream group: origin addresses chosen in round robin, with the connection options
//! (timeouts, TLS, keep-alive) every request to them uses.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::Empty;

use crate::http_client::HttpsClient;
use pingora::upstreams::peer::HttpPeer;

use crate::config::{SpanError, UpstreamConfig};

/// One origin address, resolved when the configuration is loaded.
#[derive(Debug)]
pub struct Origin {
    /// As written in the configuration, for logs: `http://127.0.0.1:3000`.
    pub url: String,
    /// Where it was resolved to.
    pub addr: SocketAddr,
    peer: HttpPeer,
}

pub struct UpstreamGroup {
    origins: Vec<Origin>,
    next: AtomicUsize,
    /// For requests made outside the proxy path (the cache's background refreshes), with the
    /// same trusted CAs as the proxy's connections.
    client: HttpsClient<Empty<Bytes>>,
    /// The longest a background request may take, headers and body.
    read_timeout: Duration,
}

impl std::fmt::Debug for UpstreamGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamGroup")
            .field("origins", &self.origins)
            .finish()
    }
}

impl UpstreamGroup {
    /// Parses and resolves the configured addresses. Host names are resolved once here (at start
    /// and on reload), not per request, so a slow resolver never sits on the request path.
    pub fn compile(config: &UpstreamConfig) -> Result<UpstreamGroup, Vec<SpanError>> {
        let mut errors = Vec::new();
        let mut origins = Vec::new();
        if config.addresses.get_ref().is_empty() {
            errors.push(SpanError::new(
                config.addresses.span(),
                "the upstream needs at least one address, like \"http://127.0.0.1:3000\"",
            ));
        }
        for address in config.addresses.get_ref() {
            let url = address.get_ref().as_str();
            match parse_origin(url) {
                Ok((addr, tls, host)) => {
                    let mut peer = HttpPeer::new(addr, tls, host);
                    let options = &mut peer.options;
                    options.connection_timeout = Some(config.connect_timeout.0);
                    options.read_timeout = Some(config.read_timeout.0);
                    options.write_timeout = Some(config.write_timeout.0);
                    options.idle_timeout = Some(config.idle_timeout.0);
                    // TLS handshake included: a hung handshake must end as a timeout too.
                    options.total_connection_timeout =
                        Some(config.connect_timeout.0 + Duration::from_secs(5));
                    origins.push(Origin {
                        url: url.to_owned(),
                        addr,
                        peer,
                    });
                }
                Err(message) => errors.push(SpanError::new(address.span(), message)),
            }
        }
        let ca_file = config.tls_ca_file.as_ref();
        let client = crate::http_client::client(ca_file.map(|f| f.get_ref().as_str()))
            .map_err(|e| {
                errors.push(SpanError::new(
                    ca_file.map_or(config.addresses.span(), |f| f.span()),
                    format!("upstream TLS: {e}"),
                ))
            })
            .ok();
        if let (true, Some(client)) = (errors.is_empty(), client) {
            Ok(UpstreamGroup {
                origins,
                next: AtomicUsize::new(0),
                client,
                read_timeout: config.read_timeout.0,
            })
        } else {
            Err(errors)
        }
    }

    /// The next origin in round robin.
    pub fn pick(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.origins.len()
    }

    pub fn len(&self) -> usize {
        self.origins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    pub fn origin(&self, index: usize) -> &Origin {
        &self.origins[index]
    }

    /// The client for requests made outside the proxy path, and how long such a request may
    /// take.
    pub fn client(&self) -> (&HttpsClient<Empty<Bytes>>, Duration) {
        (&self.client, self.read_timeout)
    }

    /// A peer for one request to origin `index`.
    pub fn peer(&self, index: usize) -> Box<HttpPeer> {
        Box::new(self.origins[index].peer.clone())
    }
}

/// `http://host[:port]` or `https://host[:port]` → (address, tls, host name for SNI).
fn parse_origin(url: &str) -> Result<(SocketAddr, bool, String), String> {
    let uri: Uri = url.parse().map_err(|e| {
        format!(
            "invalid upstream address {url:?} ({e}): write http://host:port or https://host:port"
        )
    })?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(other) => {
            return Err(format!(
                "unknown upstream scheme `{other}` in {url:?}: use http:// or https://"
            ))
        }
        None => {
            return Err(format!(
                "upstream address {url:?} has no scheme: write http://{url} or https://{url}"
            ))
        }
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "upstream address {url:?} has a path: cachegate forwards the request's own path, so write only scheme, host and port"
        ));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("upstream address {url:?} has no host"))?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve upstream host `{host}`: {e}"))?
        .next()
        .ok_or_else(|| format!("upstream host `{host}` resolves to no address"))?;
    Ok((addr, tls, host.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::parse_origin;

    #[test]
    fn origins_parse_and_bad_ones_say_why() {
        let (addr, tls, host) = parse_origin("https://127.0.0.1:8443").unwrap();
        assert_eq!((addr.port(), tls, host.as_str()), (8443, true, "127.0.0.1"));
        assert_eq!(parse_origin("http://127.0.0.1").unwrap().0.port(), 80);
        assert!(parse_origin("ftp://x:1")
            .unwrap_err()
            .contains("unknown upstream scheme `ftp`"));
        assert!(parse_origin("127.0.0.1:3000")
            .unwrap_err()
            .contains("scheme"));
        assert!(parse_origin("http://127.0.0.1:3000/api")
            .unwrap_err()
            .contains("has a path"));
    }
}
