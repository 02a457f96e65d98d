//! Activity tracking on a connection's IO, for idle timeouts.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What moved on one connection: IO operations that moved bytes, and
/// requests waiting for their response.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    ticks: AtomicU64,
    busy: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.ticks.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request as waiting until the guard drops.
    pub(crate) fn busy(&self) -> Busy<'_> {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self)
    }

    /// Resolves once a whole `timeout` passed with no byte moved and no
    /// request waiting.
    pub(crate) async fn idle(&self, timeout: Duration) {
        loop {
            let seen = self.ticks.load(Ordering::Relaxed);
            tokio::time::sleep(timeout).await;
            if self.ticks.load(Ordering::Relaxed) == seen && self.busy.load(Ordering::Relaxed) == 0
            {
                return;
            }
        }
    }
}

/// A waiting request.
pub(crate) struct Busy<'a>(&'a Activity);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An IO that counts its activity.
pub(crate) struct Watched<S> {
    inner: S,
    act: Arc<Activity>,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: S, act: Arc<Activity>) -> Watched<S> {
        Watched { inner, act }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.act.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.act.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.act.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
