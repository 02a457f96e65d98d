//! Moving bytes both ways between a client and an upstream, for every
//! proxy that ends in a byte pipe (CONNECT and SOCKS5 tunnels, the L4
//! balancer): [`splice`] between two TCP sockets.
//!
//! [`splice`] moves a bulk flow with splice(2) through a pipe per
//! direction: the kernel hands socket buffer pages to the pipe and from
//! the pipe to the other socket, so the bytes never enter user space and
//! the proxy's CPU cost per byte is a fraction of a read/write copy (see
//! `bench/egress.sh`, "bulk": about twice the throughput of 8 KiB copies).
//! Short exchanges are copied through a small buffer instead: a pipe costs
//! system calls to set up, which a tunnel opened for one request and its
//! answer would feel ("tunnels"). Readiness comes from tokio's reactor as
//! for any socket.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::activity::Activity;

/// Bytes a pipe holds (F_SETPIPE_SZ; the kernel's default is 64 KiB, and
/// an unprivileged process may raise it to `/proc/sys/fs/pipe-max-size`,
/// 1 MiB by default). Larger means fewer system calls per megabyte.
const PIPE_BYTES: usize = 256 * 1024;

/// The buffer a direction copies through before it turns to splicing.
const COPY_BYTES: usize = 16 * 1024;

/// Which side of a relay bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The proxy's client (bytes going up).
    Client,
    /// The destination or backend (bytes coming down).
    Upstream,
}

/// What a relay reports as it runs.
pub(crate) trait Meter {
    /// `n` bytes were read from `from` (and are on their way to the other
    /// side).
    fn moved(&self, from: Side, n: usize);
    /// `from` reached end of stream, or reading from it failed. Called at
    /// most once per side.
    fn ended(&self, from: Side);
}

/// Copies both ways between `client` and `upstream` until both have
/// reached end of stream, or until either fails (the error is returned).
/// An end of stream on one side is passed on as a write shutdown (FIN) to
/// the other, and the other direction keeps flowing. Every read touches
/// `act` and is reported to `meter`.
///
/// The caller bounds it in time (an idle timeout, a shutdown signal) by
/// dropping the future; nothing is left behind but two closed pipes.
pub(crate) async fn splice<M: Meter>(
    client: &TcpStream,
    upstream: &TcpStream,
    act: &Activity,
    meter: &M,
) -> io::Result<()> {
    let up = one_way(client, upstream, Side::Client, act, meter);
    let down = one_way(upstream, client, Side::Upstream, act, meter);
    tokio::try_join!(up, down).map(|_| ())
}

/// One direction of [`splice`]. It starts by copying through a small
/// buffer, which costs nothing to set up; the first read that fills the
/// buffer shows a bulk flow, and the direction switches to `src` into a
/// pipe, the pipe into `dst`. A tunnel that carries a request and its
/// answer never pays for the pipe's system calls.
async fn one_way<M: Meter>(
    src: &TcpStream,
    dst: &TcpStream,
    from: Side,
    act: &Activity,
    meter: &M,
) -> io::Result<()> {
    let mut buf = Vec::new();
    loop {
        src.readable().await?;
        if buf.is_empty() {
            buf = vec![0; COPY_BYTES];
        }
        let n = match got(src.try_read(&mut buf), from, dst, act, meter) {
            Got::Bytes(n) => n,
            Got::Again => continue,
            Got::Done(r) => return r,
        };
        write_all(dst, &buf[..n], act).await?;
        if n == buf.len() {
            break;
        }
    }
    drop(buf);
    let pipe = match Pipe::new() {
        Ok(p) => p,
        Err(e) => {
            meter.ended(from);
            return Err(e);
        }
    };
    loop {
        // The pipe is empty here: fill it from the source.
        src.readable().await?;
        let read = src.try_io(Interest::READABLE, || {
            splice_fds(src.as_raw_fd(), pipe.write.as_raw_fd(), pipe.size)
        });
        let n = match got(read, from, dst, act, meter) {
            Got::Bytes(n) => n,
            Got::Again => continue,
            Got::Done(r) => return r,
        };
        // Drain it into the destination.
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice_fds(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)
            }) {
                Ok(m) => {
                    left -= m;
                    act.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// What a read from `from` means for its direction.
enum Got {
    /// Bytes to pass on (touched and metered already).
    Bytes(usize),
    /// Not ready after all: wait again.
    Again,
    /// The direction is over: end of stream (passed on) or an error.
    Done(io::Result<()>),
}

/// Sorts out one read of `from`'s direction (a copy or a splice).
fn got<M: Meter>(
    read: io::Result<usize>,
    from: Side,
    dst: &TcpStream,
    act: &Activity,
    meter: &M,
) -> Got {
    match read {
        Ok(0) => {
            end_of_stream(from, dst, meter);
            Got::Done(Ok(()))
        }
        Ok(n) => {
            act.touch();
            meter.moved(from, n);
            Got::Bytes(n)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Got::Again,
        Err(e) => {
            meter.ended(from);
            Got::Done(Err(e))
        }
    }
}

/// `from` reached end of stream: pass it on to `dst` as a FIN.
fn end_of_stream<M: Meter>(from: Side, dst: &TcpStream, meter: &M) {
    meter.ended(from);
    // The other side may already be gone; its own direction reports that.
    let _ = socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write);
}

/// Writes all of `bytes` to `dst`.
async fn write_all(dst: &TcpStream, mut bytes: &[u8], act: &Activity) -> io::Result<()> {
    while !bytes.is_empty() {
        dst.writable().await?;
        match dst.try_write(bytes) {
            Ok(m) => {
                bytes = &bytes[m..];
                act.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One non-blocking splice(2) of up to `len` bytes from `from` to `to`.
fn splice_fds(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (the
    // caller holds the sockets and the pipe); null offsets are required
    // for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A non-blocking pipe, closed on drop.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What it holds.
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors we own.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own; a refusal (a lower
        // pipe-max-size) leaves the default size, which F_GETPIPE_SZ reads.
        let size = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_BYTES as libc::c_int,
            );
            libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        let size = usize::try_from(size).unwrap_or(0).max(4096);
        Ok(Pipe { read, write, size })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[derive(Default)]
    struct Log {
        up: Mutex<usize>,
        down: Mutex<usize>,
        ended: Mutex<Vec<Side>>,
    }

    impl Meter for Log {
        fn moved(&self, from: Side, n: usize) {
            match from {
                Side::Client => *self.up.lock().unwrap() += n,
                Side::Upstream => *self.down.lock().unwrap() += n,
            }
        }
        fn ended(&self, from: Side) {
            self.ended.lock().unwrap().push(from);
        }
    }

    /// Two connected loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn moves_every_byte_both_ways_and_passes_half_close_on() {
        // client_app <-> [client | relay | upstream] <-> server_app
        let (mut client_app, client) = pair().await;
        let (upstream, mut server_app) = pair().await;
        let log = Log::default();
        let act = Activity::default();
        let down: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let up: Vec<u8> = (0..100_000u32).map(|i| (i % 13) as u8).collect();
        let relay = splice(&client, &upstream, &act, &log);
        let server = async {
            let mut got = Vec::new();
            // The client's FIN arrives as end of stream after its bytes...
            server_app.read_to_end(&mut got).await.unwrap();
            // ...and this side can still send.
            server_app.write_all(&down).await.unwrap();
            server_app.shutdown().await.unwrap();
            got
        };
        let app = async {
            client_app.write_all(&up).await.unwrap();
            client_app.shutdown().await.unwrap();
            let mut got = Vec::new();
            client_app.read_to_end(&mut got).await.unwrap();
            got
        };
        let (r, got_up, got_down) = tokio::join!(relay, server, app);
        r.unwrap();
        assert_eq!(got_up, up);
        assert_eq!(got_down, down);
        assert_eq!(*log.up.lock().unwrap(), up.len());
        assert_eq!(*log.down.lock().unwrap(), down.len());
        assert_eq!(
            *log.ended.lock().unwrap(),
            vec![Side::Client, Side::Upstream]
        );
    }

    #[tokio::test]
    async fn a_reset_ends_the_relay_with_an_error() {
        let (client_app, client) = pair().await;
        let (upstream, server_app) = pair().await;
        let log = Log::default();
        let act = Activity::default();
        // The server resets: linger 0 then close.
        socket2::SockRef::from(&server_app)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(server_app);
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            splice(&client, &upstream, &act, &log),
        )
        .await
        .expect("the relay ends");
        assert!(r.is_err(), "a reset is an error, got {r:?}");
        assert!(log.ended.lock().unwrap().contains(&Side::Upstream));
        drop(client_app);
    }
}
