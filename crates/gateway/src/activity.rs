//! Whether a connection is in use, for idle timeouts: [`Activity`] is
//! touched by every read or write that moved bytes ([`Touched`] wraps an
//! IO to do it) and counts requests waiting for an answer ([`Busy`]);
//! [`Activity::idle`] resolves once neither happened for the idle time.
//! One type for every proxy: the HTTP connections of ingress and egress,
//! their tunnels and upgrades, and the spliced relays.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What moved on one connection. [`touch`](Activity::touch) only sets a
/// flag (no clock read, and no write at all when it is already set);
/// [`idle`](Activity::idle) looks at it in quarters of the idle time.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    moved: AtomicBool,
    busy: AtomicU64,
}

impl Activity {
    /// Records that bytes moved.
    pub(crate) fn touch(&self) {
        // Read first: most touches find the flag already set, and a load
        // does not take the cache line from the other side's core.
        if !self.moved.load(Ordering::Relaxed) {
            self.moved.store(true, Ordering::Relaxed);
        }
    }

    /// Counts a request as waiting (for its backend, say) until the guard
    /// drops: the connection is not idle meanwhile though no byte moves.
    pub(crate) fn busy(&self) -> Busy<'_> {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self)
    }

    /// Resolves once nothing moved and no request waited for `idle`
    /// (counted from the call; at most a quarter of `idle` late).
    pub(crate) async fn idle(&self, idle: Duration) {
        let step = (idle / 4).max(Duration::from_millis(1)).min(idle);
        let mut quiet = Duration::ZERO;
        self.moved.store(false, Ordering::Relaxed);
        let sleep = tokio::time::sleep(step);
        tokio::pin!(sleep);
        loop {
            sleep.as_mut().await;
            let moved = self.moved.swap(false, Ordering::Relaxed);
            if moved || self.busy.load(Ordering::Relaxed) > 0 {
                quiet = Duration::ZERO;
            } else {
                quiet += step;
                if quiet >= idle {
                    return;
                }
            }
            let next = sleep.deadline() + step.min(idle - quiet);
            sleep.as_mut().reset(next);
        }
    }
}

/// A waiting request (see [`Activity::busy`]).
pub(crate) struct Busy<'a>(&'a Activity);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        // The end of a wait is activity too: the idle time counts from it.
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An IO that touches its [`Activity`] on every read and write that moved
/// bytes.
pub(crate) struct Touched<T> {
    pub(crate) io: T,
    act: Arc<Activity>,
}

impl<T> Touched<T> {
    pub(crate) fn new(io: T, act: Arc<Activity>) -> Touched<T> {
        Touched { io, act }
    }

    fn touch_if<R>(&self, r: &Poll<io::Result<R>>, moved: impl FnOnce(&R) -> bool) {
        if let Poll::Ready(Ok(v)) = r
            && moved(v)
        {
            self.act.touch();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Touched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let after = buf.filled().len();
        self.touch_if(&r, |_| after > before);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Touched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.touch_if(&r, |n| *n > 0);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.touch_if(&r, |n| *n > 0);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;

    use super::*;

    const IDLE: Duration = Duration::from_millis(40);
    const HELD: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn idle_resolves_after_a_quiet_idle_time_and_not_before() {
        let act = Activity::default();
        act.touch(); // before the call: does not count
        let t0 = Instant::now();
        act.idle(IDLE).await;
        let took = t0.elapsed();
        assert!(took >= IDLE, "idle after {took:?}");
        assert!(took < Duration::from_secs(2), "idle after {took:?}");
    }

    #[tokio::test]
    async fn bytes_moving_through_touched_keep_the_connection_in_use() {
        let act = Arc::new(Activity::default());
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = Touched::new(a, act.clone());
        let t0 = Instant::now();
        let traffic = async {
            while t0.elapsed() < HELD {
                a.write_all(b"x").await.unwrap();
                let mut one = [0u8; 1];
                b.read_exact(&mut one).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let idle = async {
            act.idle(IDLE).await;
            t0.elapsed()
        };
        let ((), took) = tokio::join!(traffic, idle);
        assert!(took >= HELD, "idle after {took:?} while bytes moved");
    }

    #[tokio::test]
    async fn a_waiting_request_keeps_the_connection_in_use() {
        let act = Activity::default();
        let t0 = Instant::now();
        let waiting = async {
            let _busy = act.busy();
            tokio::time::sleep(HELD).await;
        };
        let idle = async {
            act.idle(IDLE).await;
            t0.elapsed()
        };
        let ((), took) = tokio::join!(waiting, idle);
        assert!(
            took >= HELD + IDLE,
            "idle after {took:?} with a request waiting"
        );
        assert!(took < HELD + Duration::from_secs(2), "idle after {took:?}");
    }

    #[tokio::test]
    async fn reads_and_writes_that_move_nothing_do_not_count() {
        let act = Arc::new(Activity::default());
        let (a, b) = tokio::io::duplex(64);
        let mut a = Touched::new(a, act.clone());
        assert_eq!(a.write(b"").await.unwrap(), 0);
        assert!(!act.moved.load(Ordering::Relaxed));
        drop(b);
        let mut buf = [0u8; 8];
        assert_eq!(a.read(&mut buf).await.unwrap(), 0); // end of stream
        assert!(!act.moved.load(Ordering::Relaxed));
        // ...while one that moves a byte does.
        let (c, mut d) = tokio::io::duplex(64);
        let mut c = Touched::new(c, act.clone());
        d.write_all(b"x").await.unwrap();
        assert_eq!(c.read(&mut buf).await.unwrap(), 1);
        assert!(act.moved.load(Ordering::Relaxed));
    }
}
