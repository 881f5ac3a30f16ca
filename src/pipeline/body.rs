//! The body of every response the gateway sends, and the signal that ends every request.
//!
//! A response is either written by the gateway (hits, problems: `Full`) or streamed from the
//! origin (`Upstream`), whose connection goes back to its pool when the last byte has been read
//! and which is cut off when the origin stalls past `read_timeout`. The body tells its
//! [`Watcher`] — the request it belongs to — each origin chunk, the origin's clean end, and,
//! when hyper drops it (sent in full, or abandoned by a client that went away), the
//! [`Outcome`]. The pipeline's end step runs from that last call, so there is exactly one place
//! a request ends, whatever path it took. This module depends on no other step.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};

use crate::upstream::body::BoxError;
use crate::upstream::pool::Pooled;

/// A response body (see the module docs).
pub struct Body {
    kind: Kind,
    watcher: Option<Box<dyn Watcher>>,
    outcome: Outcome,
}

enum Kind {
    Full(Option<Bytes>),
    Upstream(Box<Streamed>),
}

/// An origin's response body on its way to the client.
struct Streamed {
    inner: Incoming,
    /// A frame already read from `inner` (to see that the body had not failed), sent first.
    first: Option<Frame<Bytes>>,
    /// Back to the pool after the last byte; dropped (closed) if the body is abandoned.
    connection: Option<Pooled>,
    read_timeout: Duration,
    /// Armed while waiting for the origin; past `read_timeout` the response is cut off.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// How a response body went, told to its [`Watcher`] when the body is dropped.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    /// Body bytes handed to the client.
    pub sent: u64,
    /// Why the origin's body failed, when it did (a `cachegate_upstream_errors_total` kind).
    pub error: Option<&'static str>,
    /// The body ended cleanly (so what it filled may be shared).
    pub complete: bool,
}

/// What the request behind a response hears from its body. The body knows nothing of caches or
/// logs: the pipeline's watcher turns these into the cache's capture and the request's end.
pub trait Watcher: Send {
    /// A chunk of the origin's body, on its way to the client.
    fn data(&mut self, chunk: &Bytes);
    /// The origin's body ended cleanly (before the client may have read it all).
    fn end(&mut self);
    /// The body is gone — sent, or abandoned by the client: the request is over.
    fn done(self: Box<Self>, outcome: Outcome);
}

impl Body {
    pub fn full(bytes: Bytes) -> Body {
        Body {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            watcher: None,
            outcome: Outcome::default(),
        }
    }

    pub fn empty() -> Body {
        Body {
            kind: Kind::Full(None),
            watcher: None,
            outcome: Outcome::default(),
        }
    }

    /// The origin's body, `first` (a frame already read from it) first; `connection` is
    /// released when it has been read.
    pub fn upstream(
        inner: Incoming,
        first: Option<Frame<Bytes>>,
        connection: Pooled,
        read_timeout: Duration,
    ) -> Body {
        Body {
            kind: Kind::Upstream(Box::new(Streamed {
                inner,
                first,
                connection: Some(connection),
                read_timeout,
                idle: None,
            })),
            watcher: None,
            outcome: Outcome::default(),
        }
    }

    /// Attaches the request that watches this body.
    pub fn watched_by(mut self, watcher: Box<dyn Watcher>) -> Body {
        self.watcher = Some(watcher);
        match &self.kind {
            Kind::Full(None) => self.outcome.complete = true,
            Kind::Full(Some(_)) => {}
            // Nothing to stream (HEAD, 204, 304): done already, and hyper may never poll it.
            Kind::Upstream(streamed)
                if streamed.first.is_none() && streamed.inner.is_end_stream() =>
            {
                self.end_of_stream();
            }
            Kind::Upstream(_) => {}
        }
        self
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Full(bytes) => {
                let Some(bytes) = bytes.take() else {
                    return Poll::Ready(None);
                };
                this.outcome.sent += bytes.len() as u64;
                this.outcome.complete = true;
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Kind::Upstream(streamed) => {
                let polled = match streamed.first.take() {
                    Some(frame) => Poll::Ready(Some(Ok(frame))),
                    None => Pin::new(&mut streamed.inner).poll_frame(cx),
                };
                match polled {
                    Poll::Pending => {
                        let read_timeout = streamed.read_timeout;
                        let idle = streamed
                            .idle
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep(read_timeout)));
                        if idle.as_mut().poll(cx).is_ready() {
                            streamed.connection = None;
                            this.outcome.error = Some("ReadTimedout");
                            return Poll::Ready(Some(Err(
                                "the origin's response body stalled past read_timeout".into(),
                            )));
                        }
                        Poll::Pending
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        streamed.idle = None;
                        if let Some(data) = frame.data_ref() {
                            this.outcome.sent += data.len() as u64;
                            if let Some(watcher) = &mut this.watcher {
                                watcher.data(data);
                            }
                        }
                        if streamed.inner.is_end_stream() {
                            this.end_of_stream();
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(None) => {
                        this.end_of_stream();
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(e))) => {
                        streamed.connection = None;
                        this.outcome.error = Some("ReadError");
                        Poll::Ready(Some(Err(Box::new(e))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(streamed) => streamed.first.is_none() && streamed.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(streamed) => {
                let mut hint = streamed.inner.size_hint();
                if let Some(data) = streamed.first.as_ref().and_then(Frame::data_ref) {
                    let len = data.len() as u64;
                    // Upper first: a lower bound may never pass the upper one.
                    if let Some(upper) = hint.upper() {
                        hint.set_upper(upper + len);
                    }
                    hint.set_lower(hint.lower() + len);
                }
                hint
            }
        }
    }
}

impl Body {
    /// The origin's body has been read to its end: store what was captured, release the
    /// connection.
    fn end_of_stream(&mut self) {
        if let Kind::Upstream(streamed) = &mut self.kind {
            if let Some(connection) = streamed.connection.take() {
                connection.release();
            }
        }
        if !self.outcome.complete {
            self.outcome.complete = true;
            if let Some(watcher) = &mut self.watcher {
                watcher.end();
            }
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.done(self.outcome);
        }
    }
}
