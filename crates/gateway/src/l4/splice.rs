//! The byte pipe between a client and its upstream: both directions,
//! half-close passed on, bytes counted as they move, an idle timeout.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::metrics::L4Metrics;

/// Buffer per direction.
const BUF: usize = 32 * 1024;

/// The time of the last byte moved, in ms since `base`.
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let last = self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let until = last + idle;
            if Instant::now() >= until {
                return;
            }
            tokio::time::sleep_until(until).await;
        }
    }
}

/// A stream that counts the bytes read from it and records activity.
struct Counted<'a> {
    io: TcpStream,
    act: &'a Activity,
    metrics: &'a L4Metrics,
    idx: usize,
    /// Reads come from the client (bytes up).
    client: bool,
}

impl AsyncRead for Counted<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let n = buf.filled().len() - before;
            if n > 0 {
                self.act.touch();
                self.metrics.bytes(self.idx, self.client, n);
            }
        }
        r
    }
}

impl AsyncWrite for Counted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.act.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How a spliced connection ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Both sides closed (each end of stream passed on to the other side).
    Closed,
    /// A read or write failed (a reset, usually).
    Error(io::Error),
    /// No byte either way for the idle timeout.
    Idle,
}

/// Copies both ways between `client` and `upstream` (upstream `idx`) until
/// both have closed, an error, or `idle` without a byte moved. An end of
/// stream on one side is passed on as a write shutdown (FIN) to the other,
/// and the other direction keeps flowing.
pub(crate) async fn splice(
    client: TcpStream,
    upstream: TcpStream,
    idx: usize,
    idle: Duration,
    metrics: &L4Metrics,
) -> End {
    let act = Activity {
        base: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let mut c = Counted {
        io: client,
        act: &act,
        metrics,
        idx,
        client: true,
    };
    let mut u = Counted {
        io: upstream,
        act: &act,
        metrics,
        idx,
        client: false,
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, BUF, BUF) => match r {
            Ok(_) => End::Closed,
            Err(e) => End::Error(e),
        },
        () = act.idle(idle) => End::Idle,
    }
}
