//! Dev-only test harness: two network namespaces joined by a veth pair, and
//! an upstream server that answers with the peer address it saw; and a real
//! Redis ([`redis::RedisServer`]).
//!
//! ```text
//!   namespace "proxy"                      namespace "upstream"
//!   lo (up)                                lo (up)
//!   vproxy  10.250.0.1/24   <== veth ==>   vupstream  10.250.0.2/24
//!           fd00:250::1/64                            fd00:250::2/64
//!                                          route 10.251.0.0/24     via 10.250.0.1
//!                                          route 2001:db8:251::/64 via fd00:250::1
//! ```
//!
//! The pool ranges [`POOL_V4`] and [`POOL_V6`] are routed from the upstream
//! namespace to the proxy namespace, so a connection from the proxy side with
//! any source address in them reaches the upstream side, and the reply comes
//! back once the proxy side owns the source address (assigned to an
//! interface, or covered by a `local` route for IP(V6)_FREEBIND).
//!
//! Everything lives in namespaces with unique names (the process id and a
//! counter), so tests run in parallel; [`Testbed`] and [`Netns`] delete their
//! namespaces when dropped, also when a test panics. The veth pair is created
//! directly inside the namespaces and disappears with them. Namespaces left by
//! a process that died (killed test run) are removed by the next
//! [`Testbed::new`].
//!
//! Code runs inside a namespace with [`Netns::run`]: a dedicated thread
//! enters the namespace with `setns(2)` and drives a current-thread tokio
//! runtime; every socket (and rtnetlink handle) created there belongs to that
//! namespace, wherever it is used later.
//!
//! Needs root (`CAP_SYS_ADMIN`); without it [`Testbed::new`] fails with
//! [`io::ErrorKind::PermissionDenied`], so tests that use it fail rather than
//! skip.
//!
//! ```no_run
//! let bed = testbed::Testbed::new().unwrap();
//! let listener = bed.upstream().tcp_listener("[::]:8080".parse().unwrap()).unwrap();
//! let server = testbed::PeerServer::start(listener).unwrap();
//! let peer = bed.proxy().run(|| async {
//!     use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!     let mut s = tokio::net::TcpStream::connect("[fd00:250::2]:8080").await.unwrap();
//!     s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
//!     let mut out = String::new();
//!     s.read_to_string(&mut out).await.unwrap();
//!     testbed::body_of(&out).to_owned()
//! });
//! assert_eq!(peer, "fd00:250::1");
//! assert_eq!(server.peers().len(), 1);
//! ```

pub mod redis;

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Name prefix of every namespace this crate creates.
const NS_PREFIX: &str = "ippt";

/// Proxy-side veth interface name (inside the proxy namespace).
pub const PROXY_IF: &str = "vproxy";
/// Upstream-side veth interface name (inside the upstream namespace).
pub const UPSTREAM_IF: &str = "vupstream";
/// Proxy-side IPv4 link address.
pub const PROXY_V4: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
/// Upstream-side IPv4 link address.
pub const UPSTREAM_V4: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);
/// Proxy-side IPv6 link address.
pub const PROXY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, 1);
/// Upstream-side IPv6 link address.
pub const UPSTREAM_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, 2);
/// IPv4 pool range, routed from the upstream namespace to the proxy namespace.
pub const POOL_V4: &str = "10.251.0.0/24";
/// IPv6 pool range, routed from the upstream namespace to the proxy namespace.
pub const POOL_V6: &str = "2001:db8:251::/64";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `ip ARGS`, returning stdout, or an error carrying the command line and
/// its stderr.
pub fn ip(args: &[&str]) -> io::Result<String> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a unique name built from `hint`, with its
    /// loopback interface up.
    pub fn create(hint: &str) -> io::Result<Netns> {
        if !is_root() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "testbed needs root to create network namespaces",
            ));
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NS_PREFIX}-{}-{n}-{hint}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (for `ip -n NAME …`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Addresses (without prefix length) currently on interface `dev`.
    pub fn addresses(&self, dev: &str) -> io::Result<Vec<IpAddr>> {
        let out = self.ip(&["-o", "addr", "show", "dev", dev])?;
        // "2: vproxy    inet6 2001:db8::5/128 scope global ..."
        Ok(out
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words.find(|w| *w == "inet" || *w == "inet6")?;
                let cidr = words.next()?;
                cidr.split('/').next()?.parse().ok()
            })
            .collect())
    }

    /// Addresses on `dev` that lie inside `cidr` (e.g. [`POOL_V6`]).
    pub fn addresses_in(&self, dev: &str, cidr: &str) -> io::Result<Vec<IpAddr>> {
        let (net, len) = parse_cidr(cidr)?;
        Ok(self
            .addresses(dev)?
            .into_iter()
            .filter(|a| cidr_contains(net, len, *a))
            .collect())
    }

    /// Runs `f` on a dedicated thread that has entered this namespace, inside
    /// a current-thread tokio runtime (time and I/O enabled), and returns its
    /// output. A panic inside `f` is propagated to the caller.
    pub fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        std::thread::scope(|scope| {
            let handle = scope.spawn(|| {
                if let Err(e) = self.enter() {
                    panic!("cannot enter namespace {}: {e}", self.name);
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => panic!("cannot build a tokio runtime: {e}"),
                };
                rt.block_on(f())
            });
            match handle.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A TCP listener bound to `addr` inside this namespace (`[::]:port`
    /// listens on IPv4 and IPv6). The socket stays in the namespace and can be
    /// served from any thread.
    pub fn tcp_listener(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter()?;
                    let l = std::net::TcpListener::bind(addr)?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("listener thread panicked")))
        })
    }

    /// Moves the calling thread into this namespace.
    fn enter(&self) -> io::Result<()> {
        let file = std::fs::File::open(format!("/var/run/netns/{}", self.name))?;
        // SAFETY: `file` is an open namespace file descriptor for the duration
        // of the call; setns only affects the calling thread's network
        // namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("testbed: {e}");
        }
    }
}

/// Two namespaces, "proxy" and "upstream", joined by a veth pair, with the
/// pool ranges routed to the proxy side (see the crate docs for the layout).
#[derive(Debug)]
pub struct Testbed {
    proxy: Netns,
    upstream: Netns,
}

impl Testbed {
    /// Builds the namespaces, the veth pair, the link addresses and routes.
    pub fn new() -> io::Result<Testbed> {
        remove_stale_namespaces();
        let proxy = Netns::create("p")?;
        let upstream = Netns::create("u")?;
        proxy.ip(&[
            "link",
            "add",
            PROXY_IF,
            "type",
            "veth",
            "peer",
            "name",
            UPSTREAM_IF,
            "netns",
            upstream.name(),
        ])?;
        let pv4 = format!("{PROXY_V4}/24");
        let uv4 = format!("{UPSTREAM_V4}/24");
        let pv6 = format!("{PROXY_V6}/64");
        let uv6 = format!("{UPSTREAM_V6}/64");
        proxy.ip(&["addr", "add", &pv4, "dev", PROXY_IF])?;
        proxy.ip(&["-6", "addr", "add", &pv6, "dev", PROXY_IF, "nodad"])?;
        upstream.ip(&["addr", "add", &uv4, "dev", UPSTREAM_IF])?;
        upstream.ip(&["-6", "addr", "add", &uv6, "dev", UPSTREAM_IF, "nodad"])?;
        proxy.ip(&["link", "set", PROXY_IF, "up"])?;
        upstream.ip(&["link", "set", UPSTREAM_IF, "up"])?;
        upstream.ip(&["route", "add", POOL_V4, "via", &PROXY_V4.to_string()])?;
        upstream.ip(&["-6", "route", "add", POOL_V6, "via", &PROXY_V6.to_string()])?;
        Ok(Testbed { proxy, upstream })
    }

    /// The proxy-side namespace (holds [`PROXY_IF`]).
    pub fn proxy(&self) -> &Netns {
        &self.proxy
    }

    /// The upstream-side namespace (holds [`UPSTREAM_IF`]).
    pub fn upstream(&self) -> &Netns {
        &self.upstream
    }

    /// Starts a [`PeerServer`] in the upstream namespace on `[::]:port`
    /// (reachable at [`UPSTREAM_V4`] and [`UPSTREAM_V6`]).
    pub fn start_upstream_server(&self, port: u16) -> io::Result<PeerServer> {
        let l = self
            .upstream
            .tcp_listener(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))?;
        PeerServer::start(l)
    }
}

/// Deletes `ippt-<pid>-…` namespaces whose process is gone.
fn remove_stale_namespaces() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let mut parts = name.split('-');
        if parts.next() != Some(NS_PREFIX) {
            continue;
        }
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

fn parse_cidr(cidr: &str) -> io::Result<(IpAddr, u8)> {
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("bad CIDR {cidr:?}"));
    let (net, len) = cidr.split_once('/').ok_or_else(bad)?;
    Ok((
        net.parse().map_err(|_| bad())?,
        len.parse().map_err(|_| bad())?,
    ))
}

fn cidr_contains(net: IpAddr, len: u8, a: IpAddr) -> bool {
    match (net, a) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// The body of an HTTP/1 response (everything after the blank line).
pub fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// A TCP server answering every connection with a minimal HTTP/1.1 response
/// whose body is the peer address it saw (IPv4-mapped addresses shown as
/// IPv4), and recording every peer. It reads the request up to the blank line
/// (or 1 s, or end of stream) before answering, then closes the connection.
///
/// Runs on its own thread with its own runtime; stopped and joined on drop.
#[derive(Debug)]
pub struct PeerServer {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<IpAddr>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl PeerServer {
    /// Serves `listener` (which may belong to any namespace).
    pub fn start(listener: std::net::TcpListener) -> io::Result<PeerServer> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let seen = peers.clone();
        let thread = std::thread::Builder::new()
            .name(format!("peer-server-{addr}"))
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let mut conns = tokio::task::JoinSet::new();
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            accepted = listener.accept() => {
                                let Ok((stream, peer)) = accepted else { continue };
                                let ip = peer.ip().to_canonical();
                                if let Ok(mut p) = seen.lock() {
                                    p.push(ip);
                                }
                                conns.spawn(answer(stream, ip));
                            }
                            Some(_) = conns.join_next(), if !conns.is_empty() => {}
                        }
                    }
                    conns.shutdown().await;
                });
            })?;
        Ok(PeerServer {
            addr,
            peers,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address the server listens on (inside its namespace).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every peer address seen so far, in accept order.
    pub fn peers(&self) -> Vec<IpAddr> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

async fn answer(mut stream: tokio::net::TcpStream, peer: IpAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let read_request = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 64 * 1024 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), read_request).await;
    let body = peer.to_string();
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
