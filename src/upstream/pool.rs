//! Keep-alive connections to one origin, on hyper's HTTP/1.1 client connections.
//!
//! A purpose-built pool rather than hyper-util's legacy `Client`, for two things that client
//! cannot give the proxy: the request (and its unread, streaming body) stays in the caller's hands
//! until a connection exists, so a refused connection can move on to the next origin for any
//! method; and the caller learns whether a connection was reused, so a request that a stale
//! pooled connection refused unsent is retried once on a fresh one.
//!
//! Checkout takes the most recently returned idle connection (the one least likely to have been
//! closed by the origin) and drops any that are closed, not ready or idle for longer than the
//! origin keeps them: what it announced in `Keep-Alive: timeout=N` less a margin, else
//! `[upstream] idle_timeout` (1.5 s by default, below gunicorn's 2 s, uvicorn's and Node's 5 s).
//! A request sent as the origin closes its connection fails, and only requests without a body
//! and idempotent ones can be sent again, so the pool never uses a connection the origin may
//! already have let go. A connection goes back when its response body has been read to the
//! end ([`Pooled::release`]); one whose response was abandoned is closed.
//!
//! At most `[upstream] max_connections` exchanges run on one origin at a time (each on its own
//! connection, so that is also the connections in use); a request beyond that waits in a queue
//! of at most `max_pending` for up to `connect_timeout`, and is refused with
//! [`UpstreamError::Saturated`] (`503`) when the queue is full or the wait runs out — so a flood
//! of slow clients cannot open unbounded connections to the origin.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

/// How many exchanges may run on one origin, and how many requests may wait for one.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_pending: usize,
}

/// The idle connections of one origin, and its exchange slots.
pub struct Pool {
    connector: Connector,
    idle_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
    slots: Arc<Semaphore>,
    limits: Limits,
    waiting: AtomicUsize,
}

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
    /// How long it may stay idle and still be used.
    keep: Duration,
}

/// What is kept off an origin's announced keep-alive, for the time a request takes to reach it:
/// a connection is used only while the origin is sure to still hold it open.
pub const KEEP_ALIVE_MARGIN: Duration = Duration::from_secs(1);

/// How long a connection may stay idle by its origin's `Keep-Alive: timeout=N` (Node sends
/// one; uvicorn and gunicorn do not): N less [`KEEP_ALIVE_MARGIN`], and at least half of N.
pub fn announced_keep_alive(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("keep-alive")?.to_str().ok()?;
    let seconds: u64 = value.split(',').find_map(|part| {
        let (name, n) = part.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("timeout")
            .then(|| n.trim().parse().ok())?
    })?;
    let announced = Duration::from_secs(seconds);
    Some(
        announced
            .saturating_sub(KEEP_ALIVE_MARGIN)
            .max(announced / 2),
    )
}

/// A connection checked out for one request.
pub struct Pooled {
    pub sender: SendRequest<RequestBody>,
    /// It served a request before: the origin may have closed it meanwhile.
    pub reused: bool,
    /// How long it may stay idle, when its origin said ([`announced_keep_alive`]).
    pub keep: Option<Duration>,
    pool: Arc<Pool>,
    /// This exchange's slot among the origin's `max_connections`; freed with the connection or
    /// when it goes back to the idle list.
    _slot: OwnedSemaphorePermit,
}

impl Pool {
    pub fn new(connector: Connector, idle_timeout: Duration, limits: Limits) -> Arc<Pool> {
        Arc::new(Pool {
            connector,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            waiting: AtomicUsize::new(0),
        })
    }

    /// An idle connection when one is usable, else a new one; first a slot among the origin's
    /// `max_connections`, waiting in the bounded queue when all are taken.
    pub async fn checkout(self: &Arc<Pool>) -> Result<Pooled, UpstreamError> {
        let slot = self.slot().await?;
        if let Some(sender) = self.take_idle() {
            return Ok(Pooled {
                sender,
                reused: true,
                keep: None,
                pool: self.clone(),
                _slot: slot,
            });
        }
        self.connect_with(slot).await
    }

    /// A slot for one exchange: at once when one is free, else after waiting in the queue.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, UpstreamError> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Ok(slot);
        }
        let saturated = UpstreamError::Saturated(self.limits.max_connections);
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.limits.max_pending {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(saturated);
        }
        let waited = tokio::time::timeout(
            self.connector.connect_timeout,
            self.slots.clone().acquire_owned(),
        )
        .await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        match waited {
            Ok(Ok(slot)) => Ok(slot),
            _ => Err(saturated),
        }
    }

    fn take_idle(&self) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(conn) = idle.pop() {
            if conn.sender.is_ready() && conn.since.elapsed() < conn.keep {
                return Some(conn.sender);
            }
        }
        None
    }

    /// A new connection, TLS included, within `connect_timeout` (after a slot, as for
    /// [`Pool::checkout`]).
    pub async fn connect(self: &Arc<Pool>) -> Result<Pooled, UpstreamError> {
        let slot = self.slot().await?;
        self.connect_with(slot).await
    }

    async fn connect_with(
        self: &Arc<Pool>,
        slot: OwnedSemaphorePermit,
    ) -> Result<Pooled, UpstreamError> {
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
            keep: None,
            pool: self.clone(),
            _slot: slot,
        })
    }

    fn put(&self, sender: SendRequest<RequestBody>, keep: Option<Duration>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE.min(self.limits.max_connections) {
            idle.push(Idle {
                sender,
                since: Instant::now(),
                keep: keep.unwrap_or(self.idle_timeout),
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
            mut sender,
            pool,
            _slot,
            keep,
            ..
        } = self;
        if sender.is_ready() {
            pool.put(sender, keep);
        } else if !sender.is_closed() {
            tokio::spawn(async move {
                // The slot is held until the exchange is over, then freed with the connection
                // or as it goes idle.
                let _slot = _slot;
                if sender.ready().await.is_ok() {
                    pool.put(sender, keep);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announced_keep_alive_is_kept_with_a_margin() {
        let keep = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("keep-alive", value.parse().unwrap());
            announced_keep_alive(&headers)
        };
        assert_eq!(keep("timeout=5"), Some(Duration::from_secs(4)));
        assert_eq!(keep("max=100, Timeout = 2"), Some(Duration::from_secs(1)));
        assert_eq!(keep("timeout=1"), Some(Duration::from_millis(500)));
        assert_eq!(keep("max=100"), None);
        assert_eq!(keep("timeout=soon"), None);
        assert_eq!(announced_keep_alive(&http::HeaderMap::new()), None);
    }
}
