//! Body types: request bodies going to a backend (with the size limit),
//! response bodies coming back (returning the connection to the pool when
//! complete).

use std::error::Error as StdError;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

use super::backend::InFlight;
use super::upstream::Upstream;

pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

/// The request body went over `max_body_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {limit} bytes")]
pub(crate) struct TooLarge {
    pub(crate) limit: u64,
}

/// The response took longer than `request_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("response not complete within the request timeout")]
pub(crate) struct Overtime;

/// Reading the client's request body failed (it went away, or sent a
/// malformed chunk).
#[derive(Debug, thiserror::Error)]
#[error("client request body: {0}")]
pub(crate) struct ClientBody(hyper::Error);

/// Whether `e` (or a cause of it) is a `T`.
pub(crate) fn caused_by<T: StdError + 'static>(e: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(c) = cur {
        if c.is::<T>() {
            return true;
        }
        cur = c.source();
    }
    false
}

/// Why a request body failed on the client's side, kept for the proxy:
/// an HTTP/2 connection to the backend resets the stream and reports only
/// that, not the body's own error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFault {
    /// Over the limit (413).
    TooLarge(u64),
    /// The client's body broke off or was malformed (400).
    Client,
}

/// Where an [`UpBody`] leaves its [`BodyFault`].
pub(crate) type FaultSlot = std::sync::Arc<std::sync::OnceLock<BodyFault>>;

/// A request body sent to a backend: the client's, counted against the
/// limit.
pub(crate) struct UpBody {
    inner: Option<Incoming>,
    seen: u64,
    limit: u64,
    fault: Option<FaultSlot>,
}

impl UpBody {
    pub(crate) fn new(inner: Incoming, limit: Option<u64>) -> UpBody {
        let inner = (!inner.is_end_stream()).then_some(inner);
        UpBody {
            inner,
            seen: 0,
            limit: limit.unwrap_or(u64::MAX),
            fault: None,
        }
    }

    /// Also leaves a failure of the client's side in `slot`.
    pub(crate) fn watched(mut self, slot: FaultSlot) -> UpBody {
        self.fault = Some(slot);
        self
    }

    /// No body (health checks).
    pub(crate) fn empty() -> UpBody {
        UpBody {
            inner: None,
            seen: 0,
            limit: u64::MAX,
            fault: None,
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.seen = this.seen.saturating_add(d.len() as u64);
                    if this.seen > this.limit {
                        this.inner = None;
                        if let Some(f) = &this.fault {
                            let _ = f.set(BodyFault::TooLarge(this.limit));
                        }
                        return Poll::Ready(Some(Err(Box::new(TooLarge { limit: this.limit }))));
                    }
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(f) = &this.fault {
                    let _ = f.set(BodyFault::Client);
                }
                Poll::Ready(Some(Err(Box::new(ClientBody(e)))))
            }
            Poll::Ready(None) => {
                this.inner = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            None => SizeHint::with_exact(0),
            Some(b) => b.size_hint(),
        }
    }
}

/// What a response body holds until it is finished: its share of the
/// backend's in-flight count, and the connection (polled while the body
/// streams), returned to the backend's pool once the body is complete.
pub(crate) struct Exchange {
    pub(crate) up: Option<Box<Upstream>>,
    /// Its stream's place on a shared HTTP/2 connection.
    pub(crate) stream: Option<super::backend::H2Stream>,
    pub(crate) guard: InFlight,
    pub(crate) max_idle: usize,
}

impl Exchange {
    fn complete(&mut self) {
        // The stream is over: its place on the shared connection is free.
        drop(self.stream.take());
        if let Some(up) = self.up.take() {
            self.guard.backend().put_idle(up, self.max_idle);
        }
    }

    /// Polls the connection (it feeds the body); drops it once ended.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(up) = &mut self.up
            && !up.drive(cx)
        {
            self.up = None;
        }
    }
}

/// A response body sent to the client.
pub(crate) enum ProxyBody {
    /// A body made by the proxy (errors, 101).
    Full(Option<Bytes>),
    /// A backend's body.
    Upstream {
        inner: Incoming,
        exchange: Exchange,
        deadline: Instant,
    },
}

impl ProxyBody {
    pub(crate) fn full(text: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Full(Some(text.into()))
    }

    pub(crate) fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream {
                inner,
                exchange,
                deadline,
            } => {
                let mut r = Pin::new(&mut *inner).poll_frame(cx);
                if r.is_pending() && exchange.up.is_some() {
                    // The connection delivers the body when polled.
                    exchange.drive(cx);
                    r = Pin::new(&mut *inner).poll_frame(cx);
                }
                match r {
                    Poll::Ready(Some(Ok(f))) => {
                        if Instant::now() > *deadline {
                            exchange.up = None;
                            return Poll::Ready(Some(Err(Box::new(Overtime))));
                        }
                        if inner.is_end_stream() {
                            exchange.complete();
                        }
                        Poll::Ready(Some(Ok(f)))
                    }
                    Poll::Ready(Some(Err(e))) => {
                        exchange.up = None;
                        Poll::Ready(Some(Err(Box::new(e))))
                    }
                    Poll::Ready(None) => {
                        exchange.complete();
                        Poll::Ready(None)
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // A body never polled because it was empty (204, HEAD, length 0)
        // is complete too.
        if let ProxyBody::Upstream {
            inner, exchange, ..
        } = self
            && inner.is_end_stream()
        {
            exchange.complete();
        }
    }
}
