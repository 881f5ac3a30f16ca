//! One listening socket: accepts connections, completes TLS (ALPN picks HTTP/2 or HTTP/1.1),
//! and serves each connection with hyper until it closes or the gateway drains.
//!
//! Plain TCP listeners speak HTTP/1.1 and HTTP/2 with prior knowledge (h2c): hyper-util's auto
//! builder reads the connection preface to tell them apart. TLS listeners offer `h2` by ALPN
//! only when `http2 = true`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::config::MAX_HEADER_LIMIT;
use crate::pipeline::{Connection, Gateway};

/// Most header fields a request may carry (hyper answers `431` past it).
const MAX_HEADERS: usize = 512;
/// How long a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What a listener needs to serve connections, shared by all of them.
pub struct Serving {
    pub gateway: Arc<Gateway>,
    /// Becomes `true` when the gateway starts draining.
    pub draining: watch::Receiver<bool>,
    /// Held by every open connection: when the last clone is gone, the drain is over.
    pub open: mpsc::Sender<()>,
}

/// The hyper connection settings every listener uses.
pub fn builder(http2: bool) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // The configured `max_request_header_bytes` is checked by the pipeline, which answers
        // with problem+json; hyper's own limit only has to be above any configurable value.
        .max_buf_size(MAX_HEADER_LIMIT as usize + 1)
        .max_headers(MAX_HEADERS)
        // One copy into hyper's buffer and one `write`, instead of `writev` of head and body:
        // cheaper for the small responses an API gateway mostly sends (measured in bench/).
        .writev(false);
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
) {
    let builder = Arc::new(builder(http2 || tls.is_none()));
    let mut draining = serving.draining.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = draining.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let serving = serving.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let connection = Connection {
                peer,
                tls: tls.is_some(),
            };
            match tls {
                None => serve(stream, connection, &builder, &serving).await,
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => serve(stream, connection, &builder, &serving).await,
                    Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                },
            }
        });
    }
}

/// Serves one connection until it closes; on drain, finishes its in-flight requests first.
async fn serve<I>(
    io: I,
    connection: Connection,
    builder: &auto::Builder<TokioExecutor>,
    serving: &Serving,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _open = serving.open.clone();
    let gateway = serving.gateway.clone();
    let service = service_fn(move |request| {
        let gateway = gateway.clone();
        async move { Ok::<_, Infallible>(gateway.handle(connection, request).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut draining = serving.draining.clone();
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = async { let _ = draining.wait_for(|d| *d).await; } => {
            conn.as_mut().graceful_shutdown();
            conn.await
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
) -> Result<tokio_rustls::TlsAcceptor, String> {
    let certs = std::fs::read(cert_file)
        .map_err(|e| format!("cannot read {cert_file:?}: {e}"))
        .and_then(|pem| {
            rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{cert_file:?} is not valid PEM: {e}"))
        })?;
    if certs.is_empty() {
        return Err(format!("{cert_file:?} holds no certificate"));
    }
    let key = std::fs::read(key_file)
        .map_err(|e| format!("cannot read {key_file:?}: {e}"))
        .and_then(|pem| {
            rustls_pemfile::private_key(&mut pem.as_slice())
                .map_err(|e| format!("{key_file:?} is not valid PEM: {e}"))
        })?
        .ok_or_else(|| format!("{key_file:?} holds no private key"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| {
        format!("the certificate and key in {cert_file:?} / {key_file:?} do not work together: {e}")
    })?;
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
