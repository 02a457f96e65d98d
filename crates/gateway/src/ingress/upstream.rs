//! HTTP/1.1 connections to backends, driven by the request that uses them.
//!
//! hyper's client connection is a future that must be polled for the
//! connection to make progress. Spawning it as a task of its own (the
//! usual way) costs two task hand-offs per request and more per body
//! chunk, often across threads. Here the request's own task polls it:
//! while waiting for the response head, and, through the response body,
//! until the body is complete; then the connection goes back to its
//! backend's idle pool with nobody polling it, and the next request that
//! takes it polls it again (noticing then if the backend closed it).
//!
//! Upgrades (WebSocket) use a connection spawned as a task, since the
//! upgraded stream outlives the request.

use std::future::{Future, poll_fn};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::backend::BackendRt;
use super::backend_tls::BackendStream;
use super::body::UpBody;

type Conn = Connection<TokioIo<BackendStream>, UpBody>;

/// Keeps a connection's socket in its backend's registry, so that removing
/// the backend can shut it down, until dropped (before the socket closes).
pub(crate) struct Registration {
    backend: Arc<BackendRt>,
    id: u64,
}

impl Registration {
    pub(crate) fn new(backend: &Arc<BackendRt>, fd: RawFd) -> Registration {
        Registration {
            backend: backend.clone(),
            id: backend.register_socket(fd),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.backend.deregister_socket(self.id);
    }
}

/// A connection's IO that deregisters its socket from the backend before
/// the descriptor closes (fields drop in order): for IO that hyper owns
/// and closes in a task of its own (HTTP/2).
pub(crate) struct Registered {
    _reg: Registration,
    io: BackendStream,
}

impl Registered {
    pub(crate) fn new(backend: &Arc<BackendRt>, io: BackendStream) -> Registered {
        Registered {
            _reg: Registration::new(backend, io.tcp().as_raw_fd()),
            io,
        }
    }
}

impl tokio::io::AsyncRead for Registered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Registered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// One connection to a backend, with the state hyper needs polled.
pub(crate) struct Upstream {
    // Dropped first: deregistered while the socket is still open.
    _reg: Registration,
    sender: SendRequest<UpBody>,
    conn: Conn,
    /// The connection future completed (closed or failed).
    done: bool,
}

impl Upstream {
    /// Handshakes HTTP/1.1 on a connected stream.
    pub(crate) async fn new(
        builder: &hyper::client::conn::http1::Builder,
        b: &Arc<BackendRt>,
        stream: BackendStream,
    ) -> hyper::Result<Box<Upstream>> {
        let reg = Registration::new(b, stream.tcp().as_raw_fd());
        let (sender, conn) = builder.handshake(TokioIo::new(stream)).await?;
        // Boxed: hyper's connection state is several hundred bytes, and a
        // connection moves between the pool, requests and bodies.
        Ok(Box::new(Upstream {
            _reg: reg,
            sender,
            conn,
            done: false,
        }))
    }

    /// Polls the connection; whether it is still open.
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.done
            && let Poll::Ready(r) = Pin::new(&mut self.conn).poll(cx)
        {
            self.done = true;
            if let Err(e) = r {
                tracing::debug!(error = %e, "backend connection ended with an error");
            }
        }
        !self.done
    }

    /// Whether the connection has ended.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// Whether the connection can take a request (an idle one from the
    /// pool may have been closed by the backend meanwhile).
    pub(crate) async fn ready(&mut self) -> bool {
        let mut wait = std::pin::pin!(poll_fn(|cx| {
            if !self.drive(cx) {
                return Poll::Ready(false);
            }
            self.sender.poll_ready(cx).map(|r| r.is_ok())
        }));
        // Usually ready at once: no timer then.
        if let Poll::Ready(ok) = poll_fn(|cx| Poll::Ready(wait.as_mut().poll(cx))).await {
            return ok;
        }
        matches!(
            tokio::time::timeout(Duration::from_secs(1), wait).await,
            Ok(true)
        )
    }

    /// Sends a request and waits for the response head until `deadline`
    /// (`None` if it passed), driving the connection meanwhile.
    pub(crate) async fn send(
        &mut self,
        req: Request<UpBody>,
        deadline: Instant,
    ) -> Option<Result<Response<Incoming>, TrySendError<Request<UpBody>>>> {
        let mut fut = std::pin::pin!(self.sender.try_send_request(req));
        let (conn, done) = (&mut self.conn, &mut self.done);
        let exchange = poll_fn(|cx| {
            if !*done && let Poll::Ready(r) = Pin::new(&mut *conn).poll(cx) {
                *done = true;
                if let Err(e) = r {
                    tracing::debug!(error = %e, "backend connection ended with an error");
                }
            }
            fut.as_mut().poll(cx)
        });
        tokio::time::timeout_at(deadline, exchange).await.ok()
    }
}
