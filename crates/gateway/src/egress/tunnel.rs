//! Byte tunnels (CONNECT, SOCKS5) with an idle timeout, byte counters and
//! early-EOF detection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use addrpool::{Outcome, PooledStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::metrics::EgressMetrics;

/// Whether bytes moved: [`touch`](Activity::touch) on every read and
/// write only sets a flag (no clock read); [`idle`](Activity::idle) checks
/// it in quarters of the idle time.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    moved: AtomicBool,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity::default())
    }

    pub(crate) fn touch(&self) {
        // Read first: most touches find the flag already set, and a load
        // does not take the cache line from the other side's core.
        if !self.moved.load(Ordering::Relaxed) {
            self.moved.store(true, Ordering::Relaxed);
        }
    }

    /// Resolves once nothing moved for `idle` (counted from the call; at
    /// most a quarter of `idle` late).
    pub(crate) async fn idle(&self, idle: Duration) {
        let step = (idle / 4).max(Duration::from_millis(1));
        let mut quiet = Duration::ZERO;
        self.moved.store(false, Ordering::Relaxed);
        let sleep = tokio::time::sleep(step.min(idle));
        tokio::pin!(sleep);
        loop {
            sleep.as_mut().await;
            if self.moved.swap(false, Ordering::Relaxed) {
                quiet = Duration::ZERO;
            } else {
                quiet += step.min(idle);
                if quiet >= idle {
                    return;
                }
            }
            let next = sleep.deadline() + step.min(idle - quiet);
            sleep.as_mut().reset(next);
        }
    }
}

/// Which side of a tunnel ended first.
const NOBODY: u8 = 0;
const CLIENT: u8 = 1;
const UPSTREAM: u8 = 2;

/// Direction of a metered stream's reads.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Side {
    /// Reads come from the client (bytes up).
    Client,
    /// Reads come from the destination (bytes down).
    Upstream,
}

/// What a [`Metered`] stream calls on an early end of stream, with the
/// stream.
type OnEarlyEof<T> = Box<dyn FnOnce(&T) + Send>;

/// A stream that records activity, counts the bytes read from it, and
/// notes which side of the tunnel reached end of stream first.
pub(crate) struct Metered<T> {
    pub(crate) io: T,
    side: Side,
    act: Arc<Activity>,
    metrics: Arc<EgressMetrics>,
    read: u64,
    first_end: Arc<AtomicU8>,
    count: bool,
    /// Called once, with the stream, if this (upstream) side ends before
    /// sending a byte and before the client ended.
    on_early_eof: Option<OnEarlyEof<T>>,
}

impl<T> Metered<T> {
    pub(crate) fn new(
        io: T,
        side: Side,
        act: Arc<Activity>,
        metrics: Arc<EgressMetrics>,
        first_end: Arc<AtomicU8>,
    ) -> Metered<T> {
        Metered {
            io,
            side,
            act,
            metrics,
            read: 0,
            first_end,
            count: true,
            on_early_eof: None,
        }
    }

    /// Records activity only (bytes are counted elsewhere).
    pub(crate) fn uncounted(mut self) -> Metered<T> {
        self.count = false;
        self
    }

    fn ended(&mut self) {
        let me = match self.side {
            Side::Client => CLIENT,
            Side::Upstream => UPSTREAM,
        };
        let first = self
            .first_end
            .compare_exchange(NOBODY, me, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if first
            && self.read == 0
            && let Some(f) = self.on_early_eof.take()
        {
            f(&self.io);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n == 0 {
                    self.ended();
                } else {
                    self.read += n as u64;
                    self.act.touch();
                    match self.side {
                        _ if !self.count => {}
                        Side::Client => self.metrics.up(n),
                        Side::Upstream => self.metrics.down(n),
                    }
                }
            }
            Poll::Ready(Err(_)) => self.ended(),
            Poll::Pending => {}
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r
            && *n > 0
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

/// Copies both ways between `client` and `upstream` until both ends close,
/// an error, or `idle` without a byte either way. Reports
/// [`Outcome::EarlyEof`] for the source when the destination closed (or
/// reset) before sending a byte and before the client closed (at once, not
/// when the tunnel ends), and [`Outcome::Success`] when it sent something.
///
/// Both go through the lease, so they settle its health permit and replace
/// the connector's deferred "connected": reported through the pool
/// instead, an early EOF would be followed by that "connected" success when
/// the lease is released, resetting the source's run of failures, and a
/// destination that drops every tunnel from a source would never get the
/// source benched.
pub(crate) async fn run<C>(
    client: C,
    upstream: PooledStream,
    idle: Duration,
    metrics: Arc<EgressMetrics>,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let _open = metrics.tunnel_opened();
    let act = Activity::new();
    act.touch();
    let first_end = Arc::new(AtomicU8::new(NOBODY));
    let mut client = Metered::new(
        client,
        Side::Client,
        act.clone(),
        metrics.clone(),
        first_end.clone(),
    );
    let mut up = Metered::new(
        upstream,
        Side::Upstream,
        act.clone(),
        metrics.clone(),
        first_end.clone(),
    );
    let source = up.io.source();
    let early = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let early = early.clone();
        up.on_early_eof = Some(Box::new(move |io: &PooledStream| {
            early.store(true, Ordering::Relaxed);
            io.lease().report(Outcome::EarlyEof);
        }));
    }
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut up) => {
            if let Err(e) = r {
                tracing::debug!(%source, error = %e, "tunnel ended with an error");
            }
        }
        () = act.idle(idle) => {
            tracing::debug!(%source, ?idle, "tunnel idle; closing");
        }
    }
    if up.read > 0 && !early.load(Ordering::Relaxed) {
        up.io.lease().report(Outcome::Success);
    }
}
