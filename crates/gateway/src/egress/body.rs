//! Body types: request bodies going up, response bodies coming down.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use addrpool::Lease;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::metrics::EgressMetrics;
use super::upstream::{Conn, IdlePool};

/// A request body sent upstream.
pub(crate) enum UpBody {
    /// No body (such requests can be retried on a fresh connection).
    Empty,
    /// The client's body, counted as bytes up.
    Client(Incoming, Arc<EgressMetrics>),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpBody::Empty => Poll::Ready(None),
            UpBody::Client(b, m) => {
                let r = Pin::new(b).poll_frame(cx);
                if let Poll::Ready(Some(Ok(f))) = &r
                    && let Some(d) = f.data_ref()
                {
                    m.up(d.len());
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Empty => true,
            UpBody::Client(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Empty => SizeHint::with_exact(0),
            UpBody::Client(b, _) => b.size_hint(),
        }
    }
}

/// What a response body holds on to until it is finished: the lease (the
/// source stays leased for the whole exchange) and the upstream connection
/// (returned to the idle pool when the body ends, if allowed).
pub(crate) struct Exchange {
    pub(crate) lease: Lease,
    pub(crate) conn: Conn,
    /// Return the connection to the idle pool when the body is complete.
    pub(crate) reuse: Option<Arc<IdlePool>>,
}

/// A response body sent to the client.
pub(crate) enum ProxyBody {
    /// A body made by the proxy (errors).
    Full(Option<Bytes>),
    /// The destination's body.
    Upstream {
        /// The body.
        inner: Incoming,
        /// The exchange it belongs to.
        exchange: Option<Box<Exchange>>,
        /// Seen the end.
        done: bool,
        /// Counters (bytes down).
        metrics: Arc<EgressMetrics>,
    },
}

impl ProxyBody {
    pub(crate) fn full(text: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Full(Some(text.into()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream {
                inner,
                done,
                metrics,
                ..
            } => {
                let r = Pin::new(inner).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(f))) => {
                        if let Some(d) = f.data_ref() {
                            metrics.down(d.len());
                        }
                    }
                    Poll::Ready(None) => *done = true,
                    _ => {}
                }
                r
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
        if let ProxyBody::Upstream {
            inner,
            exchange,
            done,
            ..
        } = self
            && let Some(ex) = exchange.take()
        {
            let complete = *done || inner.is_end_stream();
            let Exchange { lease, conn, reuse } = *ex;
            if complete && let Some(pool) = reuse {
                pool.put(conn);
            } else {
                drop(conn);
            }
            // The lease is released here, after the connection went idle.
            drop(lease);
        }
    }
}
