//! The clocks every client connection runs on, and the count of a listener's connections.
//!
//! hyper serves a connection for as long as the client keeps it open. A gateway is the first
//! thing an attacker touches, so each connection here runs on a [`Clock`] that ends it when the
//! client stops keeping its side of the exchange (all `[limits]` settings):
//!
//! | deadline | from | ends |
//! |---|---|---|
//! | `request_head_timeout` | accept, until the first request's head is in (TLS handshake and the HTTP/2 preface included) | the connection |
//! | `request_head_timeout` | the first byte of a later HTTP/1.1 request head | the connection |
//! | `keepalive_timeout` | the end of the last response, with nothing in flight | the connection, gracefully (HTTP/2: `GOAWAY`) |
//! | `send_timeout` | a response the client stopped reading: socket writes blocked, or on HTTP/2 a stream or connection window at zero | the connection, and so the origin connections its responses held |
//!
//! The clock sees the connection through two wrappers: [`Clock::io`] around its socket (reads
//! start head deadlines, blocked writes start the send deadline) and [`RequestGuard::watch`]
//! around each response body (a request is in flight from hyper's call to the service until its
//! body is dropped; a body that handed out data and was not asked for more is waiting for the
//! client). [`Clock::expired`] sleeps until the earliest deadline, looking again at least every
//! min(`request_head_timeout`, `send_timeout`): nothing on the request path wakes it, so the
//! clocks cost a request a few atomic operations and no task wake-up, and every deadline is still
//! kept to the millisecond (anything that starts between two looks ends after the second).
//!
//! A listener under pressure — more than half of its `max_connections` open — gives connections
//! that have nothing in flight only [`UNDER_PRESSURE`] for their first request and between
//! requests, so idle connections make room for new clients instead of locking them out (the
//! idea of Envoy's overload manager, which scales idle timeouts down the same way).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::framing::{FramingCheck, FramingViolation};

/// The first-request and keep-alive allowance of idle connections while their listener is under
/// pressure.
pub const UNDER_PRESSURE: Duration = Duration::from_secs(1);

/// The deadlines of the module docs' table.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub request_head: Duration,
    pub keepalive: Duration,
    pub send: Duration,
}

/// Why a connection's clock ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No complete first request within `request_head_timeout` (or [`UNDER_PRESSURE`]).
    FirstRequest,
    /// A request head took longer than `request_head_timeout`.
    RequestHead,
    /// Nothing in flight for `keepalive_timeout` (or [`UNDER_PRESSURE`]).
    Idle,
    /// The client read nothing of a response for `send_timeout`.
    SendStalled,
}

impl Expiry {
    /// Whether the connection is closed gracefully: between requests (an HTTP/2 client is told
    /// by `GOAWAY`). Every other expiry drops it at once.
    pub fn graceful(self) -> bool {
        self == Expiry::Idle
    }
}

/// How many connections a listener holds, and whether it is under pressure.
pub struct Load {
    slots: Arc<Semaphore>,
    max: usize,
    /// Woken when the listener comes under pressure, so idle clocks shorten at once.
    pressure: Notify,
}

impl Load {
    pub fn new(max: usize) -> Arc<Load> {
        Arc::new(Load {
            slots: Arc::new(Semaphore::new(max)),
            max,
            pressure: Notify::new(),
        })
    }

    /// A slot for one more connection, waiting while all `max` are taken (new connections then
    /// wait in the kernel's backlog).
    pub async fn admit(self: &Arc<Load>) -> OwnedSemaphorePermit {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        if self.under_pressure() {
            self.pressure.notify_waiters();
        }
        slot
    }

    fn under_pressure(&self) -> bool {
        self.slots.available_permits() * 2 < self.max
    }
}

/// One connection's clock (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct Clock {
    state: Arc<State>,
}

struct State {
    epoch: Instant,
    timeouts: Timeouts,
    /// Requests whose response body is not yet dropped.
    in_flight: AtomicUsize,
    /// Requests started on this connection.
    requests: AtomicU64,
    /// When the last request started or ended: idleness counts from here.
    last_edge: AtomicU64,
    /// When an HTTP/1.1 head began arriving with nothing in flight; 0 when none is.
    head_since: AtomicU64,
    /// When socket writes started to block; 0 when they do not.
    write_blocked_since: AtomicU64,
    /// The connection is HTTP/2 (it opened with the preface).
    http2: AtomicBool,
    /// The first bytes have been read (and `http2` decided).
    sniffed: AtomicBool,
    /// Response bodies that handed out data, each with when it did (0 while asked for more).
    waiting_bodies: Mutex<Vec<Weak<AtomicU64>>>,
}

impl State {
    /// Milliseconds since the connection opened, plus one: 0 stays "never".
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

impl Clock {
    pub fn new(timeouts: Timeouts) -> Clock {
        Clock {
            state: Arc::new(State {
                epoch: Instant::now(),
                timeouts,
                in_flight: AtomicUsize::new(0),
                requests: AtomicU64::new(0),
                last_edge: AtomicU64::new(1),
                head_since: AtomicU64::new(0),
                write_blocked_since: AtomicU64::new(0),
                http2: AtomicBool::new(false),
                sniffed: AtomicBool::new(false),
                waiting_bodies: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The connection's socket, watched.
    pub fn io<I>(&self, io: I) -> WatchedIo<I> {
        WatchedIo {
            inner: io,
            state: self.state.clone(),
            framing: Some(FramingCheck::default()),
            refused: None,
        }
    }

    /// A request has arrived (hyper called the service): it is in flight until the
    /// [`RequestGuard`] (or the body it watches) is dropped.
    pub fn request_started(&self) -> RequestGuard {
        let state = &self.state;
        state.head_since.store(0, Ordering::Relaxed);
        state.requests.fetch_add(1, Ordering::Relaxed);
        state.last_edge.store(state.now(), Ordering::Relaxed);
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        RequestGuard {
            state: state.clone(),
        }
    }

    /// Resolves when a deadline of the module docs' table has passed, saying which.
    pub async fn expired(&self, load: &Load) -> Expiry {
        let state = &self.state;
        loop {
            let pressure = load.pressure.notified();
            let now = state.now();
            let check = match self.check(now, load.under_pressure()) {
                Ok(next) => next,
                Err(expiry) => return expiry,
            };
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(check.saturating_sub(now))) => {}
                _ = pressure => {}
            }
        }
    }

    /// `Err` with what expired, or `Ok` with when to look again (in [`State::now`] units).
    fn check(&self, now: u64, under_pressure: bool) -> Result<u64, Expiry> {
        let state = &self.state;
        let ms = |d: Duration| d.as_millis() as u64;
        let t = state.timeouts;
        let idle_allowance = |d: Duration| {
            if under_pressure {
                d.min(UNDER_PRESSURE)
            } else {
                d
            }
        };
        // Requests, heads and stalls never wake the clock (a task wake-up per request costs more
        // than the rest of the clock together). It looks again at least every
        // min(`request_head_timeout`, `send_timeout`): anything that started since has a
        // deadline no earlier than that, which the next look then times to the millisecond.
        let mut next = now + ms(t.request_head.min(t.send));
        let mut deadline = |at: u64, expiry: Expiry| {
            if now >= at {
                return Err(expiry);
            }
            next = next.min(at);
            Ok(())
        };
        let in_flight = state.in_flight.load(Ordering::Relaxed);
        if in_flight == 0 {
            if state.requests.load(Ordering::Relaxed) == 0 {
                deadline(1 + ms(idle_allowance(t.request_head)), Expiry::FirstRequest)?;
            } else {
                let edge = state.last_edge.load(Ordering::Relaxed);
                deadline(edge + ms(idle_allowance(t.keepalive)), Expiry::Idle)?;
                let head = state.head_since.load(Ordering::Relaxed);
                if head != 0 {
                    deadline(head + ms(t.request_head), Expiry::RequestHead)?;
                }
            }
        }
        let blocked = state.write_blocked_since.load(Ordering::Relaxed);
        if blocked != 0 {
            deadline(blocked + ms(t.send), Expiry::SendStalled)?;
        }
        if in_flight > 0 {
            let mut bodies = state
                .waiting_bodies
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            bodies.retain(|body| body.strong_count() > 0);
            for body in bodies.iter().filter_map(Weak::upgrade) {
                let since = body.load(Ordering::Relaxed);
                if since != 0 {
                    deadline(since + ms(t.send), Expiry::SendStalled)?;
                }
            }
        }
        Ok(next)
    }
}

/// One request in flight on a connection (see [`Clock::request_started`]).
pub struct RequestGuard {
    state: Arc<State>,
}

impl RequestGuard {
    /// The request's response body, watched for a client that stops reading it; the request
    /// ends when the body is dropped.
    pub fn watch<B>(self, body: B) -> WatchedBody<B> {
        // On HTTP/2 a body may never be asked for anything (its stream's window stays at zero):
        // it waits for the client from the start. On HTTP/1.1 it is always asked at once.
        let waiting = self.state.http2.load(Ordering::Relaxed).then(|| {
            let since = Arc::new(AtomicU64::new(self.state.now()));
            self.register(&since);
            since
        });
        WatchedBody {
            inner: body,
            waiting,
            guard: self,
        }
    }

    fn register(&self, since: &Arc<AtomicU64>) {
        self.state
            .waiting_bodies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(since));
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let state = &self.state;
        state.last_edge.store(state.now(), Ordering::Relaxed);
        state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body on a watched connection.
pub struct WatchedBody<B> {
    inner: B,
    /// When this body last handed out data that was not its last (0: asked again since);
    /// registered with the clock on first use.
    waiting: Option<Arc<AtomicU64>>,
    guard: RequestGuard,
}

impl<B: Body + Unpin> Body for WatchedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        if let Some(waiting) = &this.waiting {
            if waiting.load(Ordering::Relaxed) != 0 {
                waiting.store(0, Ordering::Relaxed);
            }
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            // A last frame needs nothing more from the body; the socket's clock covers it.
            if frame.is_data() && !this.inner.is_end_stream() {
                let now = this.guard.state.now();
                match &this.waiting {
                    Some(waiting) => waiting.store(now, Ordering::Relaxed),
                    None => {
                        let since = Arc::new(AtomicU64::new(now));
                        this.guard.register(&since);
                        this.waiting = Some(since);
                    }
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's socket on a [`Clock`], its HTTP/1.1 request framing checked strictly on the
/// way in ([`crate::framing`]).
pub struct WatchedIo<I> {
    inner: I,
    state: Arc<State>,
    /// `None` on HTTP/2, and once the check found a violation or the connection switched.
    framing: Option<FramingCheck>,
    /// The violation the next read reports.
    refused: Option<FramingViolation>,
}

impl<I> WatchedIo<I> {
    fn saw_bytes(&self, bytes: &[u8]) {
        let state = &self.state;
        if !state.sniffed.load(Ordering::Relaxed) {
            state.sniffed.store(true, Ordering::Relaxed);
            state
                .http2
                .store(bytes.starts_with(b"PRI * HTTP/2"), Ordering::Relaxed);
        }
        // A new HTTP/1.1 head starts arriving; the first request's deadline is the clock's own.
        if state.in_flight.load(Ordering::Relaxed) == 0
            && state.requests.load(Ordering::Relaxed) > 0
            && state.head_since.load(Ordering::Relaxed) == 0
            && !state.http2.load(Ordering::Relaxed)
        {
            state.head_since.store(state.now(), Ordering::Relaxed);
        }
    }

    fn write_outcome<T>(&self, polled: &Poll<T>) {
        let blocked = &self.state.write_blocked_since;
        match polled {
            Poll::Pending => {
                if blocked.load(Ordering::Relaxed) == 0 {
                    blocked.store(self.state.now(), Ordering::Relaxed);
                }
            }
            Poll::Ready(_) => {
                if blocked.load(Ordering::Relaxed) != 0 {
                    blocked.store(0, Ordering::Relaxed);
                }
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WatchedIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(violation) = this.refused {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                violation,
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.saw_bytes(&buf.filled()[before..]);
            if this.state.http2.load(Ordering::Relaxed) {
                this.framing = None;
            }
            if let Some(check) = &mut this.framing {
                if let Err((at, violation)) = check.feed(&buf.filled()[before..]) {
                    // hyper gets the bytes before the violation; the next read fails.
                    this.framing = None;
                    this.refused = Some(violation);
                    buf.set_filled(before + at);
                    if at == 0 {
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            violation,
                        )));
                    }
                }
            }
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WatchedIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.write_outcome(&polled);
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.write_outcome(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.write_outcome(&polled);
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        Timeouts {
            request_head: Duration::from_secs(10),
            keepalive: Duration::from_secs(60),
            send: Duration::from_secs(30),
        }
    }

    #[test]
    fn deadlines_follow_the_connections_state() {
        let clock = Clock::new(timeouts());
        // Before any request: the first-request deadline, shortened under pressure.
        assert_eq!(clock.check(1, false), Ok(10_001));
        assert_eq!(clock.check(10_001, false), Err(Expiry::FirstRequest));
        assert_eq!(clock.check(1_001, true), Err(Expiry::FirstRequest));
        // A request in flight: no idle deadline; looks again within the shorter timeout.
        let guard = clock.request_started();
        let edge = clock.state.last_edge.load(Ordering::Relaxed);
        assert_eq!(clock.check(edge + 100_000, false), Ok(edge + 110_000));
        drop(guard);
        let edge = clock.state.last_edge.load(Ordering::Relaxed);
        // Idle: it looks again within request_head_timeout (a head may start meanwhile).
        assert_eq!(clock.check(edge, false), Ok(edge + 10_000));
        assert_eq!(clock.check(edge + 55_000, false), Ok(edge + 60_000));
        assert_eq!(clock.check(edge + 60_000, false), Err(Expiry::Idle));
        // A head that began arriving has its own, shorter deadline.
        clock.state.head_since.store(edge + 5, Ordering::Relaxed);
        assert_eq!(clock.check(edge + 10_005, false), Err(Expiry::RequestHead));
        // Blocked writes.
        clock.state.head_since.store(0, Ordering::Relaxed);
        clock
            .state
            .write_blocked_since
            .store(edge, Ordering::Relaxed);
        assert_eq!(clock.check(edge + 30_000, false), Err(Expiry::SendStalled));
    }

    #[test]
    fn a_body_the_client_stops_reading_is_a_send_stall() {
        let clock = Clock::new(timeouts());
        let guard = clock.request_started();
        let since = Arc::new(AtomicU64::new(0));
        guard.register(&since);
        assert!(clock.check(50_000, false).is_ok(), "not waiting");
        since.store(1_000, Ordering::Relaxed);
        assert!(clock.check(30_999, false).is_ok());
        assert_eq!(clock.check(31_000, false), Err(Expiry::SendStalled));
        drop(since);
        assert!(
            clock.check(31_000, false).is_ok(),
            "a dropped body waits for nothing"
        );
        drop(guard);
    }
}
