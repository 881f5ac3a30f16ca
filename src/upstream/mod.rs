//! The upstream group: origin addresses chosen in round robin, each with its pool of keep-alive
//! connections ([`pool`]), and [`UpstreamGroup::send`], which carries one request to an origin
//! under the configured timeouts.
//!
//! Retries, only where nothing of the request can have reached an origin: a refused or timed-out
//! connection moves on to the next origin (each is tried once per request), and a request that a
//! pooled connection gave back unsent — the origin closed it while idle, which uvicorn and Node do
//! after 5 s — is sent once more on a fresh connection.

pub mod body;
pub mod pool;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;

use http_body_util::{BodyExt, Limited};

use crate::cache::refresh::{Fetched, Fetching, RefreshError};
use crate::config::Invalid;
use crate::config::{SpanError, UpstreamConfig};
use body::{Progress, RequestBody};
use pool::{Connector, Pool, Pooled};

/// One origin address, resolved when the configuration is loaded.
pub struct Origin {
    /// As written in the configuration, for logs: `http://127.0.0.1:3000`.
    pub url: String,
    /// Where it was resolved to.
    pub addr: SocketAddr,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin").field("url", &self.url).finish()
    }
}

/// Why a request got no response from the upstream.
#[derive(Debug)]
pub enum UpstreamError {
    /// No origin accepted a connection.
    Connect(std::io::Error),
    ConnectTimeout,
    Tls(std::io::Error),
    Handshake(hyper::Error),
    /// The response header did not arrive within `read_timeout`.
    ReadTimeout,
    /// The request body made no progress for `write_timeout`.
    WriteTimeout,
    /// The request body passed `[limits] max_request_body_bytes` on its way.
    BodyTooLarge(u64),
    /// The request body arrived slower than `[limits] min_request_body_rate`.
    BodyTooSlow,
    /// The client's request body broke its framing (see [`crate::framing`]).
    BadFraming(crate::framing::FramingViolation),
    /// Every one of the origin's `max_connections` slots was busy, and the queue full or the
    /// wait for a slot over.
    Saturated(usize),
    /// The exchange failed: the origin closed the connection, sent a broken response, or the
    /// client's body ended early.
    Exchange(hyper::Error),
}

impl UpstreamError {
    /// The status the client gets.
    pub fn status(&self) -> u16 {
        match self {
            UpstreamError::ConnectTimeout
            | UpstreamError::ReadTimeout
            | UpstreamError::WriteTimeout => 504,
            UpstreamError::BodyTooLarge(_) => 413,
            UpstreamError::BodyTooSlow => 408,
            UpstreamError::BadFraming(_) => 400,
            UpstreamError::Saturated(_) => 503,
            _ => 502,
        }
    }

    /// The `kind` label of `cachegate_upstream_errors_total`.
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamError::Connect(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                "ConnectRefused"
            }
            UpstreamError::Connect(_) => "ConnectError",
            UpstreamError::ConnectTimeout => "ConnectTimedout",
            UpstreamError::Tls(_) => "TLSHandshakeFailure",
            UpstreamError::Handshake(_) => "HandshakeError",
            UpstreamError::ReadTimeout => "ReadTimedout",
            UpstreamError::WriteTimeout => "WriteTimedout",
            UpstreamError::BodyTooLarge(_) => "RequestBodyTooLarge",
            UpstreamError::BodyTooSlow => "RequestBodyTooSlow",
            UpstreamError::BadFraming(_) => "RequestFramingInvalid",
            UpstreamError::Saturated(_) => "OriginSaturated",
            UpstreamError::Exchange(_) => "ExchangeError",
        }
    }

    /// Nothing was sent: the next origin may be tried.
    fn before_sending(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_)
                | UpstreamError::ConnectTimeout
                | UpstreamError::Tls(_)
                | UpstreamError::Saturated(_)
        )
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "cannot connect: {e}"),
            UpstreamError::ConnectTimeout => f.write_str("connecting timed out"),
            UpstreamError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            UpstreamError::Handshake(e) => write!(f, "HTTP handshake failed: {e}"),
            UpstreamError::ReadTimeout => f.write_str("no response header within read_timeout"),
            UpstreamError::WriteTimeout => {
                f.write_str("the request body made no progress within write_timeout")
            }
            UpstreamError::BodyTooLarge(limit) => {
                write!(f, "the request body exceeds the limit of {limit} bytes")
            }
            UpstreamError::BodyTooSlow => f.write_str(
                "the request body arrived slower than min_request_body_rate; send it faster",
            ),
            UpstreamError::BadFraming(violation) => write!(f, "{violation}"),
            UpstreamError::Saturated(max) => write!(
                f,
                "the origin has {max} requests in flight (max_connections) and no slot freed in time"
            ),
            UpstreamError::Exchange(e) => write!(f, "the exchange failed: {e}"),
        }
    }
}

impl std::error::Error for UpstreamError {}

pub struct UpstreamGroup {
    origins: Vec<Origin>,
    next: AtomicUsize,
    /// Longest wait for the response header once the request is sent, and for each body chunk.
    pub read_timeout: Duration,
    /// Longest a streamed request body may make no progress.
    pub write_timeout: Duration,
}

impl std::fmt::Debug for UpstreamGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamGroup")
            .field("origins", &self.origins)
            .finish()
    }
}

/// A request that reached an origin: its response header, and the connection that carries the
/// body (give it back with [`Pooled::release`] when the body has been read).
pub struct Exchange {
    pub response: Response<Incoming>,
    pub connection: Pooled,
    /// The origin that answered, for logs.
    pub origin: usize,
}

/// The group as the origin of the cache's background refreshes.
impl crate::cache::refresh::Origin for UpstreamGroup {
    fn get(&self, uri: Uri, headers: http::HeaderMap, max_body: usize) -> Fetching<'_> {
        Box::pin(async move {
            let mut request = Request::new(RequestBody::Empty);
            *request.uri_mut() = uri;
            *request.version_mut() = http::Version::HTTP_11;
            *request.headers_mut() = headers;
            let exchange = self
                .send(request, None)
                .await
                .map_err(|e| RefreshError::Origin(Box::new(e)))?;
            let (head, body) = exchange.response.into_parts();
            let body = Limited::new(body, max_body)
                .collect()
                .await
                .map_err(|e| match e.downcast::<http_body_util::LengthLimitError>() {
                    Ok(_) => RefreshError::TooLarge,
                    Err(e) => RefreshError::Origin(e),
                })?
                .to_bytes();
            exchange.connection.release();
            Ok(Fetched { head, body })
        })
    }
}

impl UpstreamGroup {
    /// Parses and resolves the configured addresses. Host names are resolved once here (at start
    /// and on reload), not per request, so a slow resolver never sits on the request path.
    pub fn compile(
        config: &UpstreamConfig,
        names: Resolve,
    ) -> Result<UpstreamGroup, Vec<SpanError>> {
        let mut errors = Vec::new();
        let mut origins = Vec::new();
        if config.addresses.get_ref().is_empty() {
            errors.push(SpanError::new(
                config.addresses.span(),
                "the upstream needs at least one address, like \"http://127.0.0.1:3000\"",
            ));
        }
        let ca_file = config.tls_ca_file.as_ref();
        let mut tls_config = None;
        for address in config.addresses.get_ref() {
            let url = address.get_ref().as_str();
            match parse_origin(url, names) {
                Ok((addr, tls, host)) => {
                    let tls = if tls {
                        if tls_config.is_none() {
                            match crate::http_client::tls_config(
                                ca_file.map(|f| f.get_ref().as_str()),
                            ) {
                                Ok(c) => tls_config = Some(Arc::new(c)),
                                Err(e) => {
                                    errors.push(SpanError::new(
                                        ca_file.map_or(address.span(), |f| f.span()),
                                        format!("upstream TLS: {e}"),
                                    ));
                                    continue;
                                }
                            }
                        }
                        let Ok(name) = rustls::pki_types::ServerName::try_from(host.clone()) else {
                            errors.push(SpanError::new(
                                address.span(),
                                format!("`{host}` is not a name a TLS certificate can be checked against"),
                            ));
                            continue;
                        };
                        let connector = tokio_rustls::TlsConnector::from(
                            tls_config.clone().expect("set above"),
                        );
                        Some((connector, name))
                    } else {
                        None
                    };
                    let connector = Connector {
                        addr,
                        tls,
                        connect_timeout: config.connect_timeout.0,
                    };
                    let max_connections = config.max_connections.unwrap_or_else(|| {
                        let share = crate::descriptors::half_share(
                            crate::descriptors::open_file_limit(),
                            config.addresses.get_ref().len(),
                        );
                        share.min(1024)
                    });
                    let limits = pool::Limits {
                        max_connections: max_connections.max(1),
                        max_pending: config.max_pending_requests,
                    };
                    origins.push(Origin {
                        url: url.to_owned(),
                        addr,
                        pool: Pool::new(connector, config.idle_timeout.0, limits),
                    });
                }
                Err(message) => errors.push(SpanError::new(address.span(), message)),
            }
        }
        if errors.is_empty() {
            Ok(UpstreamGroup {
                origins,
                next: AtomicUsize::new(0),
                read_timeout: config.read_timeout.0,
                write_timeout: config.write_timeout.0,
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

    /// Sends `request` (origin-form target, `Host` set) to the next origin and waits for its
    /// response header. `progress` is the streamed body's, when it has one.
    pub async fn send(
        &self,
        request: Request<RequestBody>,
        progress: Option<&Progress>,
    ) -> Result<Exchange, UpstreamError> {
        let mut tried = 0;
        loop {
            let index = self.pick();
            let origin = &self.origins[index];
            tried += 1;
            let mut connection = match origin.pool.checkout().await {
                Ok(c) => c,
                Err(e) => {
                    if matches!(e, UpstreamError::Saturated(_)) {
                        // Under a flood this is every request: the metric counts them
                        // (`cachegate_upstream_errors_total{kind="OriginSaturated"}`).
                        tracing::debug!(origin = %origin.url, error = %e, "origin saturated");
                    } else {
                        tracing::warn!(origin = %origin.url, error = %e, "upstream connection failed");
                    }
                    if e.before_sending() && tried < self.origins.len() {
                        continue;
                    }
                    return Err(e);
                }
            };
            // An idempotent request without a body may be sent again if a reused connection
            // turns out closed after it was written (RFC 9110 §9.2.2): the origin closed it
            // while idle at the moment it was taken.
            let replay = (progress.is_none()
                && connection.reused
                && request.method().is_idempotent())
            .then(|| {
                (
                    request.method().clone(),
                    request.uri().clone(),
                    request.headers().clone(),
                )
            });
            match self.exchange(&mut connection, request, progress).await {
                Ok(response) => {
                    return Ok(Exchange {
                        response,
                        connection,
                        origin: index,
                    })
                }
                Err(Failure::Unsent(unsent, _)) if connection.reused => {
                    // The pooled connection was closed under us before a byte was written.
                    return self.once_more(index, *unsent, progress).await;
                }
                Err(Failure::Error(UpstreamError::Exchange(e)))
                    if replay.is_some() && closed_under_us(&e) =>
                {
                    let (method, uri, headers) = replay.expect("checked");
                    let mut again = Request::new(RequestBody::Empty);
                    *again.method_mut() = method;
                    *again.uri_mut() = uri;
                    *again.headers_mut() = headers;
                    *again.version_mut() = http::Version::HTTP_11;
                    drop(connection);
                    return self.once_more(index, again, None).await;
                }
                Err(failure) => return Err(self.failed(origin, failure)),
            }
        }
    }

    /// The last attempt: `request` on a fresh connection to origin `index`.
    async fn once_more(
        &self,
        index: usize,
        request: Request<RequestBody>,
        progress: Option<&Progress>,
    ) -> Result<Exchange, UpstreamError> {
        let origin = &self.origins[index];
        let mut fresh = origin.pool.connect().await?;
        match self.exchange(&mut fresh, request, progress).await {
            Ok(response) => Ok(Exchange {
                response,
                connection: fresh,
                origin: index,
            }),
            Err(failure) => Err(self.failed(origin, failure)),
        }
    }

    fn failed(&self, origin: &Origin, failure: Failure) -> UpstreamError {
        let error = match failure {
            Failure::Unsent(_, e) => UpstreamError::Exchange(e),
            Failure::Error(e) => e,
        };
        if !matches!(
            error,
            UpstreamError::BodyTooLarge(_)
                | UpstreamError::BodyTooSlow
                | UpstreamError::BadFraming(_)
        ) {
            tracing::warn!(origin = %origin.url, error = %error, "upstream request failed");
        }
        error
    }

    /// One attempt on one connection, under the timeouts.
    async fn exchange(
        &self,
        connection: &mut Pooled,
        request: Request<RequestBody>,
        progress: Option<&Progress>,
    ) -> Result<Response<Incoming>, Failure> {
        if !connection.reused {
            // A fresh connection is ready once its task has started.
            if let Err(e) = connection.sender.ready().await {
                return Err(Failure::Error(UpstreamError::Handshake(e)));
            }
        }
        let mut sending = std::pin::pin!(connection.sender.try_send_request(request));
        let outcome = match progress {
            None => tokio::time::timeout(self.read_timeout, &mut sending)
                .await
                .map_err(|_| UpstreamError::ReadTimeout),
            Some(progress) => loop {
                let before = progress.bytes.load(Ordering::Relaxed);
                match tokio::time::timeout(self.write_timeout, &mut sending).await {
                    Ok(outcome) => break Ok(outcome),
                    Err(_) if progress.done.load(Ordering::Relaxed) => {
                        // Sent: what is left is waiting for the answer.
                        break tokio::time::timeout(self.read_timeout, &mut sending)
                            .await
                            .map_err(|_| UpstreamError::ReadTimeout);
                    }
                    Err(_) if progress.bytes.load(Ordering::Relaxed) == before => {
                        break Err(UpstreamError::WriteTimeout)
                    }
                    Err(_) => continue,
                }
            },
        };
        match outcome {
            Err(e) => Err(Failure::Error(e)),
            Ok(Ok(response)) => {
                connection.keep = pool::announced_keep_alive(response.headers());
                Ok(response)
            }
            Ok(Err(mut e)) => {
                if let Some(p) = progress.filter(|p| p.exceeded.load(Ordering::Relaxed)) {
                    return Err(Failure::Error(UpstreamError::BodyTooLarge(p.limit)));
                }
                if progress.is_some_and(|p| p.too_slow.load(Ordering::Relaxed)) {
                    return Err(Failure::Error(UpstreamError::BodyTooSlow));
                }
                if let Some(violation) = progress.and_then(|p| p.bad_framing.get()) {
                    return Err(Failure::Error(UpstreamError::BadFraming(*violation)));
                }
                match e.take_message() {
                    Some(request) => Err(Failure::Unsent(Box::new(request), e.into_error())),
                    None => Err(Failure::Error(UpstreamError::Exchange(e.into_error()))),
                }
            }
        }
    }
}

/// Whether an exchange failed because the connection closed before any response: what an
/// origin closing an idle connection looks like from the other end.
fn closed_under_us(error: &hyper::Error) -> bool {
    error.is_incomplete_message()
        || error.is_canceled()
        || std::error::Error::source(error).is_some_and(|e| e.is::<std::io::Error>())
}

/// How one attempt failed: with the request handed back unsent, or for good.
enum Failure {
    Unsent(Box<Request<RequestBody>>, hyper::Error),
    Error(UpstreamError),
}

/// Whether upstream host names are resolved when a configuration is compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// Now: to run.
    Now,
    /// Not at all: `cachegate check` validates a file offline, and a name that resolves only
    /// where the gateway runs (a container network) is no error there.
    Never,
}

/// `http://host[:port]` or `https://host[:port]` → (address, tls, host name for SNI). With
/// [`Resolve::Never`] a host name gets the unspecified address.
fn parse_origin(url: &str, names: Resolve) -> Result<(SocketAddr, bool, String), Invalid> {
    let uri: Uri = url.parse().map_err(|e| {
        Invalid(format!(
            "invalid upstream address {url:?} ({e}): write http://host:port or https://host:port"
        ))
    })?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(other) => {
            return Err(Invalid(format!(
                "unknown upstream scheme `{other}` in {url:?}: use http:// or https://"
            )))
        }
        None => {
            return Err(Invalid(format!(
                "upstream address {url:?} has no scheme: write http://{url} or https://{url}"
            )))
        }
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(Invalid(format!(
            "upstream address {url:?} has a path: cachegate forwards the request's own path, so write only scheme, host and port"
        )));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| Invalid(format!("upstream address {url:?} has no host")))?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    if names == Resolve::Never && host.parse::<std::net::IpAddr>().is_err() {
        return Ok((([0, 0, 0, 0], port).into(), tls, host.to_owned()));
    }
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve upstream host `{host}`: {e}"))?
        .next()
        .ok_or_else(|| format!("upstream host `{host}` resolves to no address"))?;
    Ok((addr, tls, host.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::{parse_origin, Resolve};

    #[test]
    fn origins_parse_and_bad_ones_say_why() {
        let (addr, tls, host) = parse_origin("https://127.0.0.1:8443", Resolve::Now).unwrap();
        assert_eq!((addr.port(), tls, host.as_str()), (8443, true, "127.0.0.1"));
        assert_eq!(
            parse_origin("http://127.0.0.1", Resolve::Now)
                .unwrap()
                .0
                .port(),
            80
        );
        assert!(parse_origin("ftp://x:1", Resolve::Now)
            .unwrap_err()
            .0
            .contains("unknown upstream scheme `ftp`"));
        assert!(parse_origin("127.0.0.1:3000", Resolve::Now)
            .unwrap_err()
            .0
            .contains("scheme"));
        assert!(parse_origin("http://127.0.0.1:3000/api", Resolve::Never)
            .unwrap_err()
            .0
            .contains("has a path"));
        // Offline, a host name is checked for form only.
        let (_, tls, host) = parse_origin("https://api.invalid", Resolve::Never).unwrap();
        assert_eq!((tls, host.as_str()), (true, "api.invalid"));
        assert!(parse_origin("https://api.invalid", Resolve::Now)
            .unwrap_err()
            .0
            .contains("cannot resolve"));
    }
}
