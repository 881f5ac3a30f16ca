//! The body of a request sent upstream: nothing, or the client's body streamed through as it
//! arrives, counted against `[limits] max_request_body_bytes` and watched for progress (the
//! write timeout is "no byte moved for `write_timeout`", not a cap on a long upload).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

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
}

/// A request body on its way upstream.
pub enum RequestBody {
    Empty,
    Client {
        inner: Incoming,
        limit: u64,
        progress: Arc<Progress>,
    },
}

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
    /// The client's body, limited to `limit` bytes; the progress handle goes to the waiter.
    pub fn client(inner: Incoming, limit: u64) -> (RequestBody, Arc<Progress>) {
        let progress = Arc::new(Progress {
            limit,
            ..Progress::default()
        });
        let body = RequestBody::Client {
            inner,
            limit,
            progress: progress.clone(),
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
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Pending => Poll::Pending,
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
