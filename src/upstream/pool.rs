//! Keep-alive connections to one origin, on hyper's HTTP/1.1 client connections.
//!
//! A purpose-built pool rather than hyper-util's legacy `Client`, for two things that client
//! cannot give the proxy: the request (and its unread, streaming body) stays in the caller's hands
//! until a connection exists, so a refused connection can move on to the next origin for any
//! method; and the caller learns whether a connection was reused, so a request that a stale
//! pooled connection refused unsent is retried once on a fresh one.
//!
//! Checkout takes the most recently returned idle connection (the one least likely to have been
//! closed by the origin) and drops any that are closed, not ready or idle for longer than
//! `[upstream] idle_timeout`. A connection goes back when its response body has been read to the
//! end ([`Pooled::release`]); one whose response was abandoned is closed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::RequestBody;
use super::UpstreamError;

/// Idle connections kept per origin; more are closed when they come back.
const MAX_IDLE: usize = 256;

/// How to open a connection to one origin.
pub struct Connector {
    pub addr: SocketAddr,
    /// `Some` for `https://` origins: the TLS client and the name to verify.
    pub tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    pub connect_timeout: Duration,
}

/// The idle connections of one origin.
pub struct Pool {
    connector: Connector,
    idle_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// A connection checked out for one request.
pub struct Pooled {
    pub sender: SendRequest<RequestBody>,
    /// It served a request before: the origin may have closed it meanwhile.
    pub reused: bool,
    pool: Arc<Pool>,
}

impl Pool {
    pub fn new(connector: Connector, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            connector,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// An idle connection when one is usable, else a new one.
    pub async fn checkout(self: &Arc<Pool>) -> Result<Pooled, UpstreamError> {
        if let Some(sender) = self.take_idle() {
            return Ok(Pooled {
                sender,
                reused: true,
                pool: self.clone(),
            });
        }
        self.connect().await
    }

    fn take_idle(&self) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(conn) = idle.pop() {
            if conn.sender.is_ready() && conn.since.elapsed() < self.idle_timeout {
                return Some(conn.sender);
            }
        }
        None
    }

    /// A new connection, TLS included, within `connect_timeout`.
    pub async fn connect(self: &Arc<Pool>) -> Result<Pooled, UpstreamError> {
        let c = &self.connector;
        let tcp = match tokio::time::timeout(c.connect_timeout, TcpStream::connect(c.addr)).await {
            Err(_) => return Err(UpstreamError::ConnectTimeout),
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let sender = match &c.tls {
            None => handshake(tcp).await?,
            Some((tls, name)) => {
                let stream =
                    tokio::time::timeout(c.connect_timeout, tls.connect(name.clone(), tcp))
                        .await
                        .map_err(|_| UpstreamError::ConnectTimeout)?
                        .map_err(UpstreamError::Tls)?;
                handshake(stream).await?
            }
        };
        Ok(Pooled {
            sender,
            reused: false,
            pool: self.clone(),
        })
    }

    fn put(&self, sender: SendRequest<RequestBody>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

async fn handshake<T>(io: T) -> Result<SendRequest<RequestBody>, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = http1::Builder::new()
        // The request head and a small body go out in one `write` (see the listener's note).
        .writev(false)
        .handshake(TokioIo::new(io))
        .await
        .map_err(UpstreamError::Handshake)?;
    tokio::spawn(async move {
        // Upgrades (WebSocket) take the connection over; errors end it and are seen by the
        // request that was using it.
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

impl Pooled {
    /// Returns the connection for reuse once its exchange is over: at once when it is ready,
    /// or when the connection task has finished the exchange.
    pub fn release(self) {
        let Pooled {
            mut sender, pool, ..
        } = self;
        if sender.is_ready() {
            pool.put(sender);
        } else if !sender.is_closed() {
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.put(sender);
                }
            });
        }
    }
}
