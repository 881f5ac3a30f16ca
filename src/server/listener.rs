//! One listening socket: accepts connections, completes TLS (ALPN picks HTTP/2 or HTTP/1.1),
//! and serves each connection with hyper until it closes, its [`Clock`] runs out, or the gateway
//! drains.
//!
//! Plain TCP listeners speak HTTP/1.1 and HTTP/2 with prior knowledge (h2c): hyper-util's auto
//! builder reads the connection preface to tell them apart. TLS listeners offer `h2` by ALPN
//! only when `http2 = true`.
//!
//! A listener holds at most `[limits] max_connections`; past that it stops accepting (new
//! clients wait in the kernel's backlog) until one closes. An accept that fails — out of file
//! descriptors, most often — backs off and is logged once per [`ACCEPT_WARNING_INTERVAL`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use super::clock::{Clock, Load, Timeouts};
use crate::pipeline::{Connection, Gateway};
use crate::tls::{self, TlsError};

/// Most header fields a request may carry (hyper answers `431` past it).
const MAX_HEADERS: usize = 512;
/// How much hyper may buffer beyond `max_request_header_bytes` before it answers `431` itself:
/// the pipeline's own check (with problem+json) sees every head up to the limit.
const HEAD_BUFFER_MARGIN: u64 = 8 * 1024;
/// How long a listener waits after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Failed accepts are logged at most this often (with how many there were).
pub const ACCEPT_WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// How long a connection closed gracefully (`GOAWAY`, or `Connection: close` after the response
/// in flight) may take before it is dropped.
const CLOSING_GRACE: Duration = Duration::from_secs(1);

/// What a listener needs to serve connections, shared by all of them.
pub struct Serving {
    pub gateway: Arc<Gateway>,
    /// Becomes `true` when the gateway starts draining.
    pub draining: watch::Receiver<bool>,
    /// Held by every open connection: when the last clone is gone, the drain is over.
    pub open: mpsc::Sender<()>,
    /// The clock every connection runs on.
    pub timeouts: Timeouts,
    pub tls_handshake_timeout: Duration,
    /// The request-head limit hyper's buffers are sized for (`[limits]` at start).
    pub max_request_header_bytes: u64,
}

/// The hyper connection settings every listener uses: request heads buffered up to
/// `max_head_bytes` plus a margin, on HTTP/1.1 and HTTP/2 alike.
pub fn builder(http2: bool, max_head_bytes: u64) -> auto::Builder<TokioExecutor> {
    let buffer = (max_head_bytes + HEAD_BUFFER_MARGIN).max(8192);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Head and idle deadlines are the connection's clock's (see [`Clock`]); hyper's own
        // would also count the time between requests as head time.
        .header_read_timeout(None)
        .max_buf_size(buffer as usize)
        .max_headers(MAX_HEADERS)
        // One copy into hyper's buffer and one `write`, instead of `writev` of head and body:
        // cheaper for the small responses an API gateway mostly sends (measured in bench/).
        .writev(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(buffer).unwrap_or(u32::MAX));
    if !http2 {
        builder = builder.http1_only();
    }
    builder
}

/// Accepts until the gateway drains, then closes the socket.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    http2: bool,
    serving: Arc<Serving>,
    load: Arc<Load>,
) {
    let builder = Arc::new(builder(
        http2 || tls.is_none(),
        serving.max_request_header_bytes,
    ));
    let mut draining = serving.draining.clone();
    let mut failures = AcceptFailures::default();
    loop {
        let accepted = tokio::select! {
            accepted = async {
                let slot = load.admit().await;
                (listener.accept().await, slot)
            } => accepted,
            _ = draining.changed() => break,
        };
        let (stream, peer, slot) = match accepted {
            (Ok((stream, peer)), slot) => (stream, peer, slot),
            (Err(e), _) => {
                failures.record(&e);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let serving = serving.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let load = load.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let connection = Connection {
                peer,
                tls: tls.is_some(),
            };
            let clock = Clock::new(serving.timeouts);
            match tls {
                None => serve(stream, connection, &builder, &serving, clock, &load).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(
                        serving.tls_handshake_timeout,
                        acceptor.accept(stream),
                    );
                    match handshake.await {
                        Ok(Ok(stream)) => {
                            serve(stream, connection, &builder, &serving, clock, &load).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// Failed accepts since the last warning, so a flood of them is one log line per interval.
#[derive(Default)]
pub struct AcceptFailures {
    last_warning: Option<Instant>,
    unreported: u64,
}

impl AcceptFailures {
    pub fn record(&mut self, error: &std::io::Error) {
        self.unreported += 1;
        if self
            .last_warning
            .is_none_or(|at| at.elapsed() >= ACCEPT_WARNING_INTERVAL)
        {
            tracing::warn!(
                error = %error,
                failures = self.unreported,
                "accepting connections failed (out of file descriptors? see [limits] max_connections); backing off"
            );
            self.last_warning = Some(Instant::now());
            self.unreported = 0;
        }
    }
}

/// Serves one connection until it closes or its clock runs out; on drain, finishes its
/// in-flight requests first.
async fn serve<I>(
    io: I,
    connection: Connection,
    builder: &auto::Builder<TokioExecutor>,
    serving: &Serving,
    clock: Clock,
    load: &Load,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _open = serving.open.clone();
    let gateway = serving.gateway.clone();
    let requests = clock.clone();
    let service = service_fn(move |request| {
        let in_flight = requests.request_started();
        let gateway = gateway.clone();
        async move {
            let response = gateway.handle(connection, request).await;
            Ok::<_, Infallible>(response.map(|body| in_flight.watch(body)))
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(clock.io(io)), service);
    let mut conn = std::pin::pin!(conn);
    let mut draining = serving.draining.clone();
    let mut closing: Option<tokio::time::Instant> = None;
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break result,
            _ = draining.wait_for(|d| *d), if closing.is_none() => {
                // The drain has its own grace period: no deadline here.
                conn.as_mut().graceful_shutdown();
                closing = Some(tokio::time::Instant::now() + Duration::from_secs(86_400));
            }
            expiry = clock.expired(load), if closing.is_none() => {
                tracing::debug!(peer = %connection.peer, ?expiry, "closing the connection");
                if !expiry.graceful() {
                    return;
                }
                conn.as_mut().graceful_shutdown();
                closing = Some(tokio::time::Instant::now() + CLOSING_GRACE);
            }
            _ = tokio::time::sleep_until(closing.unwrap_or_else(tokio::time::Instant::now)), if closing.is_some() => {
                return;
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(peer = %connection.peer, error = %e, "connection ended with an error");
    }
}

/// The TLS acceptor of a listener: its certificate chain and key, with ALPN offering `h2` when
/// HTTP/2 is on.
pub fn tls_acceptor(
    cert_file: &str,
    key_file: &str,
    http2: bool,
) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let certs = tls::certificates(cert_file)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_file.to_owned(),
        });
    }
    let key = tls::private_key(key_file)?;
    let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Mismatch {
            cert: cert_file.to_owned(),
            key: key_file.to_owned(),
            source,
        })?;
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
