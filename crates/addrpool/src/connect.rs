//! The outbound connector: bind a leased source, then connect.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use crate::error::ConnectError;
use crate::source::Family;
use crate::{Lease, Outcome, Pool, Session};

/// Attempts with a fresh address when binding fails.
const BIND_ATTEMPTS: usize = 3;

/// A TCP connection from a pool address. Implements `AsyncRead` and
/// `AsyncWrite`; the address is released when this is dropped.
#[derive(Debug)]
pub struct PooledStream {
    stream: TcpStream,
    lease: Lease,
}

impl PooledStream {
    /// The source address the connection leaves from.
    pub fn source(&self) -> IpAddr {
        self.lease.source()
    }

    /// The lease (to report outcomes or retire the address).
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The TCP stream.
    pub fn get_ref(&self) -> &TcpStream {
        &self.stream
    }

    /// The TCP stream and its lease; the address is released when the lease
    /// is dropped.
    pub fn into_parts(self) -> (TcpStream, Lease) {
        (self.stream, self.lease)
    }
}

impl AsyncRead for PooledStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PooledStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connection for PooledStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// IPv4-mapped IPv6 destinations are IPv4 destinations.
fn canonical(dest: SocketAddr) -> SocketAddr {
    SocketAddr::new(dest.ip().to_canonical(), dest.port())
}

fn set_bind_address_no_port(sock: &TcpSocket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the fd is a valid open socket owned by `sock` for the duration
    // of the call; the option value is a c_int living on the stack with the
    // length passed alongside.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn bound_socket(src: IpAddr, freebind: bool) -> io::Result<TcpSocket> {
    let sock = match src {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    let sref = socket2::SockRef::from(&sock);
    if freebind {
        match src {
            IpAddr::V4(_) => sref.set_freebind_v4(true)?,
            IpAddr::V6(_) => sref.set_freebind_v6(true)?,
        }
    }
    set_bind_address_no_port(&sock)?;
    sock.bind(SocketAddr::new(src, 0))?;
    Ok(sock)
}

impl Pool {
    /// Connects to `dest` from a leased pool address (bind before connect,
    /// with IP_BIND_ADDRESS_NO_PORT, and IP(V6)_FREEBIND for a freebind
    /// pool). A destination of the other family fails with
    /// [`ConnectError::FamilyMismatch`] before any socket is made.
    pub async fn connect(&self, dest: SocketAddr) -> Result<PooledStream, ConnectError> {
        self.connect_with(dest, None).await
    }

    /// [`Pool::connect`] for a sticky `session`.
    pub async fn connect_with(
        &self,
        dest: SocketAddr,
        session: Option<&Session>,
    ) -> Result<PooledStream, ConnectError> {
        let dest = canonical(dest);
        self.check_family(dest)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let lease = self.lease_with(session).await?;
            match self.connect_from(lease, dest).await {
                Err(ConnectError::Bind { .. }) if attempt < BIND_ATTEMPTS => continue,
                other => return other,
            }
        }
    }

    /// Connects to `dest` from the address of `lease` (obtained from this
    /// pool with [`Pool::lease`] or [`Pool::lease_with`]). Reports the
    /// outcome like [`Pool::connect`]; a bind failure retires the address
    /// and is returned (no retry with another address).
    pub async fn connect_from(
        &self,
        lease: Lease,
        dest: SocketAddr,
    ) -> Result<PooledStream, ConnectError> {
        let dest = canonical(dest);
        self.check_family(dest)?;
        let timeout = self.inner.opts.connect_timeout;
        let src = lease.source();
        let sock = match bound_socket(src, self.inner.mode.freebind()) {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(%src, %error, "cannot bind pool address; retiring it");
                lease.report(Outcome::BindFailed);
                lease.retire();
                return Err(ConnectError::Bind { src, error });
            }
        };
        match tokio::time::timeout(timeout, sock.connect(dest)).await {
            Ok(Ok(stream)) => {
                lease.report(Outcome::Connected);
                Ok(PooledStream { stream, lease })
            }
            Ok(Err(error)) => {
                lease.report(Outcome::ConnectFailed);
                Err(ConnectError::Connect { src, dest, error })
            }
            Err(_) => {
                lease.report(Outcome::ConnectTimeout);
                Err(ConnectError::Timeout { src, dest, timeout })
            }
        }
    }

    fn check_family(&self, dest: SocketAddr) -> Result<(), ConnectError> {
        match self.family() {
            Some(f) if f != Family::of(dest.ip()) => {
                Err(ConnectError::FamilyMismatch { pool: f, dest })
            }
            _ => Ok(()),
        }
    }

    /// A `tower::Service<Uri>` connecting through this pool, for
    /// `hyper_util::client::legacy::Client`.
    pub fn connector(&self) -> PoolConnector {
        PoolConnector {
            pool: self.clone(),
            session: None,
        }
    }
}

/// A `tower::Service<Uri>` that resolves the URI's host, keeps the addresses
/// of the pool's family, and connects from a pool address.
///
/// Hyper's client pools connections per host, and a pooled connection keeps
/// its source: for one source address per request, build the client with
/// `pool_max_idle_per_host(0)`.
#[derive(Debug, Clone)]
pub struct PoolConnector {
    pool: Pool,
    session: Option<Session>,
}

impl PoolConnector {
    /// Every connection of this connector uses `session` (sticky pools).
    pub fn with_session(mut self, session: Session) -> PoolConnector {
        self.session = Some(session);
        self
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<Uri> for PoolConnector {
    type Response = TokioIo<PooledStream>;
    type Error = ConnectError;
    type Future = BoxFuture<Result<Self::Response, ConnectError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let pool = self.pool.clone();
        let session = self.session.clone();
        Box::pin(async move {
            let dest = resolve(&pool, &uri).await?;
            let stream = pool.connect_with(dest, session.as_ref()).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// The first address of `uri`'s host in the pool's family.
async fn resolve(pool: &Pool, uri: &Uri) -> Result<SocketAddr, ConnectError> {
    let bad = |reason| ConnectError::Uri {
        uri: uri.to_string(),
        reason,
    };
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = match (uri.port_u16(), uri.scheme_str()) {
        (Some(p), _) => p,
        (None, Some("http")) | (None, None) => 80,
        (None, Some("https")) => 443,
        (None, Some(_)) => return Err(bad("unknown scheme and no port")),
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|error| ConnectError::Resolve {
            host: host.to_owned(),
            error,
        })?
        .map(canonical)
        .collect();
    let Some(family) = pool.family() else {
        return addrs
            .first()
            .copied()
            .ok_or_else(|| bad("host resolves to nothing"));
    };
    addrs
        .iter()
        .copied()
        .find(|a| Family::of(a.ip()) == family)
        .ok_or_else(|| ConnectError::NoAddressOfFamily {
            host: host.to_owned(),
            family,
            found: addrs
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}
