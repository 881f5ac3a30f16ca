//! The body of a request sent upstream: nothing, or the client's body streamed through as it
//! arrives, counted against `[limits] max_request_body_bytes` and watched for progress (the
//! write timeout is "no byte moved for `write_timeout`", not a cap on a long upload) and for
//! pace: with `[limits] min_request_body_rate`, a body that, past its grace period, has not
//! averaged that rate is cut off (`408`) — a slow trickle would otherwise hold an origin
//! connection for as long as the client likes (Apache's mod_reqtimeout `MinRate` works alike).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::framing::FramingViolation;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How far a streamed request body has got, shared with whoever waits for the response.
#[derive(Default, Debug)]
pub struct Progress {
    /// The most the body may carry.
    pub limit: u64,
    pub bytes: AtomicU64,
    pub done: AtomicBool,
    /// The body passed the size limit, and was cut off.
    pub exceeded: AtomicBool,
    /// The body fell below the minimum rate, and was cut off.
    pub too_slow: AtomicBool,
    /// The client's body broke its framing (see [`crate::framing`]).
    pub bad_framing: std::sync::OnceLock<FramingViolation>,
}

/// The slowest pace a request body may keep.
#[derive(Debug, Clone, Copy)]
pub struct MinRate {
    pub bytes_per_second: u64,
    /// Time the body gets before the rate applies (the first `grace` is free).
    pub grace: Duration,
}

/// A body's pace, against its [`MinRate`]: measured from the first time the body waits for the
/// client (most bodies never do: they arrive with the head, and cost nothing here).
pub struct Pace {
    started: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl MinRate {
    /// By when a body that started waiting at `started` must have carried more than `bytes`.
    fn deadline(&self, started: Instant, bytes: u64) -> Instant {
        let earned = Duration::from_secs_f64(bytes as f64 / self.bytes_per_second as f64);
        started + self.grace + earned
    }
}

/// A request body on its way upstream.
pub enum RequestBody {
    Empty,
    Client {
        inner: Incoming,
        limit: u64,
        progress: Arc<Progress>,
        min_rate: Option<MinRate>,
        pace: Option<Box<Pace>>,
    },
}

/// The body arrived slower than its minimum rate.
#[derive(Debug)]
pub struct TooSlow;

impl std::fmt::Display for TooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body arrived slower than min_request_body_rate")
    }
}

impl std::error::Error for TooSlow {}

/// The body went past `[limits] max_request_body_bytes`.
#[derive(Debug)]
pub struct TooLarge(pub u64);

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the request body exceeds the limit of {} bytes", self.0)
    }
}

impl std::error::Error for TooLarge {}

impl RequestBody {
    /// The client's body, limited to `limit` bytes and kept to `min_rate`; the progress handle
    /// goes to the waiter.
    pub fn client(
        inner: Incoming,
        limit: u64,
        min_rate: Option<MinRate>,
    ) -> (RequestBody, Arc<Progress>) {
        let progress = Arc::new(Progress {
            limit,
            ..Progress::default()
        });
        let body = RequestBody::Client {
            inner,
            limit,
            progress: progress.clone(),
            min_rate,
            pace: None,
        };
        (body, progress)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Client {
                inner,
                limit,
                progress,
                min_rate,
                pace,
            } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        let total = progress
                            .bytes
                            .fetch_add(data.len() as u64, Ordering::Relaxed)
                            + data.len() as u64;
                        if total > *limit {
                            progress.exceeded.store(true, Ordering::Relaxed);
                            return Poll::Ready(Some(Err(Box::new(TooLarge(*limit)))));
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(None) => {
                    progress.done.store(true, Ordering::Relaxed);
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Err(e))) => {
                    if let Some(violation) = FramingViolation::within(&e) {
                        let _ = progress.bad_framing.set(violation);
                    }
                    Poll::Ready(Some(Err(Box::new(e))))
                }
                Poll::Pending => {
                    let Some(rate) = min_rate else {
                        return Poll::Pending;
                    };
                    // Waiting for the client: it must have sent more by the deadline its bytes
                    // so far earned.
                    let pace = pace.get_or_insert_with(|| {
                        let started = Instant::now();
                        Box::new(Pace {
                            started,
                            timer: Box::pin(tokio::time::sleep_until(
                                rate.deadline(started, 0).into(),
                            )),
                        })
                    });
                    let deadline =
                        rate.deadline(pace.started, progress.bytes.load(Ordering::Relaxed));
                    let timer = &mut pace.timer;
                    if timer.deadline() != deadline.into() {
                        timer.as_mut().reset(deadline.into());
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        progress.too_slow.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(TooSlow))));
                    }
                    Poll::Pending
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Client { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Client { inner, .. } => inner.size_hint(),
        }
    }
}
