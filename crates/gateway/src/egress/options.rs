//! Typed options of an egress listener.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use addrpool::Pool;
use iprules::{Policy, Shared};

use super::policy::default_policy;

/// The future of [`Resolve::resolve`].
pub type Resolving<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = std::io::Result<Vec<std::net::IpAddr>>> + Send + 'a>,
>;

/// Resolves destination host names. The proxy calls it once per request
/// and dials only addresses it returned and the policy allowed, so a
/// resolver that changes its answer (DNS rebinding) cannot slip a refused
/// address past the check.
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `host` (the port is a hint for `getaddrinfo`).
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> Resolving<'a>;
}

/// The system resolver (`getaddrinfo` on tokio's blocking pool, so the
/// runtime's workers never wait on DNS). The default.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> Resolving<'a> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host, port))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// Where the sticky-session key of a request comes from (with
/// [`addrpool::Strategy::Sticky`] pools).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionFrom {
    /// The proxy username, in the rotating-proxy convention
    /// `USER-session-ID[-ttl-SECONDS]` (see [`addrpool::parse_username`]).
    #[default]
    Username,
    /// The destination host: every request to the same host leaves from the
    /// same address for the session TTL (keyed per user when there is one).
    Host,
}

/// Which pool a request's connections leave from.
///
/// One pool per listener for now; the enum leaves room for picking a pool
/// by a username suffix later without changing the listener.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PoolSelection {
    /// Every request uses this pool.
    Single(Pool),
}

impl PoolSelection {
    /// The pool for a request by `user` (if authenticated).
    pub(crate) fn pick(&self, _user: Option<&str>) -> &Pool {
        match self {
            PoolSelection::Single(p) => p,
        }
    }

    pub(crate) fn pools(&self) -> impl Iterator<Item = &Pool> {
        match self {
            PoolSelection::Single(p) => std::iter::once(p),
        }
    }
}

impl From<Pool> for PoolSelection {
    fn from(p: Pool) -> Self {
        PoolSelection::Single(p)
    }
}

/// Keep-alive of upstream HTTP connections.
///
/// Idle connections are keyed by (source address, destination authority):
/// a request first leases its source from the pool (so the pool's strategy
/// alone decides rotation), then reuses an idle connection from that source
/// to that destination if there is one. Nothing is kept when the pool
/// retires an address after one use (`max_uses = 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// Most idle upstream connections kept in all. 0 disables keep-alive.
    /// Default: 256.
    pub max_idle: usize,
    /// Most idle connections per (source, destination). Default: 8.
    pub max_idle_per_key: usize,
}

impl Default for KeepAlive {
    fn default() -> Self {
        KeepAlive {
            max_idle: 256,
            max_idle_per_key: 8,
        }
    }
}

/// Options of one egress listener. [`EgressOptions::new`] gives the
/// documented defaults.
#[derive(Clone)]
pub struct EgressOptions {
    /// Address the listener binds. One port serves HTTP and SOCKS5.
    /// Default: `127.0.0.1:3128`.
    pub listen: SocketAddr,
    /// Allow a listener on a non-loopback address without `users`
    /// (an open proxy). Default: false.
    pub open: bool,
    /// Proxy users, name → password (Basic for HTTP, RFC 1929 for SOCKS5).
    /// Empty: no authentication (the username, if a client sends one, still
    /// names a sticky session). Default: empty.
    pub users: HashMap<String, String>,
    /// The pool(s) connections leave from.
    pub pool: PoolSelection,
    /// Bound on resolving, leasing and connecting to the destination
    /// (the pool's own `connect_timeout` applies to each TCP connect too).
    /// Default: 10 s.
    pub connect_timeout: Duration,
    /// Idle timeout of tunnels (no byte either way) and of kept-alive client
    /// and upstream connections. Default: 60 s.
    pub idle_timeout: Duration,
    /// Time a client has to send a complete request head (or SOCKS5
    /// handshake). Default: 10 s.
    pub header_read_timeout: Duration,
    /// Largest request head accepted (at least 8 KiB). Default: 64 KiB.
    pub max_header_bytes: usize,
    /// Time open tunnels and requests get to finish on shutdown before they
    /// are aborted. Default: 30 s.
    pub drain_timeout: Duration,
    /// Where the sticky-session key comes from. Default: the username.
    pub session_from: SessionFrom,
    /// The destination policy, checked on every address the proxy dials;
    /// replace or update it at run time through the [`Shared`] handle.
    /// Default: [`default_policy`](super::default_policy).
    pub policy: Arc<Shared<Policy>>,
    /// Upstream HTTP keep-alive.
    pub keep_alive: KeepAlive,
    /// Who may connect to the listener (checked at accept, before a byte
    /// is read) and where misbehaviour (wrong credentials, malformed
    /// requests) is reported for auto-blocking. Default: everyone, no
    /// auto-blocking.
    pub guard: Arc<crate::guard::Guard>,
    /// How destination names are resolved. Default: [`SystemResolver`].
    pub resolver: Arc<dyn Resolve>,
    /// Receives one entry per HTTP request and CONNECT. Default: none.
    pub access_log: Option<Arc<dyn crate::access::AccessLog>>,
    /// Serve plain `http://` requests with no request body framing but
    /// `Content-Length` on the lean path of `h1.rs` instead of hyper
    /// (`CONNECT` and anything else still go to hyper). Answers and
    /// forwarded heads are the same either way; off is for comparing the
    /// two. Default: on.
    pub fast_h1: bool,
}

impl EgressOptions {
    /// The defaults, with connections leaving from `pool`.
    pub fn new(pool: impl Into<PoolSelection>) -> EgressOptions {
        EgressOptions {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 3128)),
            open: false,
            users: HashMap::new(),
            pool: pool.into(),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            drain_timeout: Duration::from_secs(30),
            session_from: SessionFrom::Username,
            policy: Arc::new(Shared::new(default_policy())),
            keep_alive: KeepAlive::default(),
            guard: Arc::new(crate::guard::Guard::default()),
            resolver: Arc::new(SystemResolver),
            access_log: None,
            fast_h1: true,
        }
    }
}

impl fmt::Debug for EgressOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut users: Vec<&str> = self.users.keys().map(String::as_str).collect();
        users.sort_unstable();
        f.debug_struct("EgressOptions")
            .field("listen", &self.listen)
            .field("open", &self.open)
            .field("users", &users)
            .field("pool", &self.pool)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("drain_timeout", &self.drain_timeout)
            .field("session_from", &self.session_from)
            .field("keep_alive", &self.keep_alive)
            .field("guard", &self.guard)
            .field("fast_h1", &self.fast_h1)
            .finish_non_exhaustive()
    }
}
