//! Idle keep-alive connections, timed: `--keep-alive-timeout-ms` closes a connection that has
//! had no request in flight and no byte in either direction for that long.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One connection's activity.
#[derive(Clone)]
pub struct Idle(Arc<State>);

struct State {
    start: Instant,
    /// Milliseconds since `start` of the last byte read or written.
    last: AtomicU64,
    in_flight: AtomicUsize,
}

/// A request in flight; the connection is not idle while one exists.
pub struct Busy(Idle);

impl Drop for Busy {
    fn drop(&mut self) {
        (self.0).0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl Idle {
    pub fn new() -> Idle {
        Idle(Arc::new(State {
            start: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }))
    }

    pub fn busy(&self) -> Busy {
        self.0.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    fn touch(&self) {
        let now = self.0.start.elapsed().as_millis() as u64;
        self.0.last.store(now, Ordering::Relaxed);
    }

    pub fn watch<T>(&self, io: T) -> Watched<T> {
        Watched {
            io,
            idle: self.clone(),
        }
    }

    /// Resolves once the connection has been idle for `timeout`.
    pub async fn expired(&self, timeout: Duration) {
        let step = (timeout / 10).max(Duration::from_millis(5));
        loop {
            tokio::time::sleep(step).await;
            let now = self.0.start.elapsed().as_millis() as u64;
            let idle_ms = now.saturating_sub(self.0.last.load(Ordering::Relaxed));
            if self.0.in_flight.load(Ordering::Relaxed) == 0
                && idle_ms >= timeout.as_millis() as u64
            {
                return;
            }
        }
    }
}

/// A connection's IO, noting when bytes move.
pub struct Watched<T> {
    io: T,
    idle: Idle,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.idle.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.idle.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
