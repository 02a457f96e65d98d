//! The egress forward proxy: clients ask for a destination, the proxy
//! connects from an address of an [`addrpool::Pool`].
//!
//! # Protocols, on one port
//!
//! A listener serves HTTP/1.1 and SOCKS5 on the same port: the first byte
//! of a connection decides (`0x05` is SOCKS5, anything else HTTP), as in
//! many production proxies.
//!
//! - **HTTP forwarding**: absolute-form requests (`GET http://host/path`).
//!   Hop-by-hop headers (`Connection` and the headers it names,
//!   `Proxy-Connection`, `Proxy-Authorization`, `Keep-Alive`, `TE`,
//!   `Trailer`, `Upgrade`) are removed both ways; hyper frames bodies.
//!   Only `http://` is forwarded; TLS goes through CONNECT.
//! - **CONNECT** tunnels: the proxy dials first and answers
//!   `200 Connection established` only once connected.
//! - **SOCKS5** (RFC 1928) CONNECT to IPv4, IPv6 and domain names, with no
//!   authentication or RFC 1929 username/password. The reply's BND.ADDR is
//!   the source address used.
//!
//! # What the client is told
//!
//! Every response of the destination, and the 200 of a CONNECT, carries
//! [`SOURCE_HEADER`] (`X-Ippool-Source`) with the source address. Errors
//! made by the proxy carry the reason in the body and in [`ERROR_HEADER`]
//! (`X-Ippool-Error`):
//!
//! | status | SOCKS5 reply | when |
//! |---|---|---|
//! | 400 | — (closed) | malformed request: origin-form, no host, bad CONNECT target, non-`http` scheme |
//! | 403 | `0x02` not allowed by ruleset | the destination policy refuses every address of the host |
//! | 407 + `Proxy-Authenticate: Basic realm="ippool"` | auth failure `0x01` | missing or wrong credentials |
//! | 502 | `0x05` refused, `0x03`, `0x04`, `0x01` | connect refused, DNS failure, no address of the pool's family, upstream closed without a response |
//! | 503 | `0x01` | the pool has no address to lease |
//! | 504 | `0x04` | resolving + leasing + connecting exceeded `connect_timeout`, or no response within `idle_timeout` |
//!
//! # Destination policy (no SSRF)
//!
//! Every destination is checked against [`EgressOptions::policy`] (an
//! [`iprules::Policy`] in an [`iprules::Shared`], changeable at run time).
//! A host name is resolved once; every address it resolves to is checked;
//! refused ones are skipped and the connection goes to an address that was
//! checked, never to a second resolution. The default policy,
//! [`default_policy`], refuses loopback, private, CGNAT, link-local
//! (cloud metadata), unique-local, multicast, unspecified and
//! documentation ranges ([`default_deny_rules`]), IPv4-mapped forms
//! included. Allow rules punch holes: to reach a private upstream on
//! purpose (tests in network namespaces use `10.x`, `fd00::/8` and
//! `2001:db8::/32`), add it to `policy.allow`.
//!
//! # Sources, sessions and keep-alive
//!
//! Each request (or tunnel) leases a source from the pool, so the pool's
//! [`addrpool::Strategy`] decides rotation. A sticky session comes from the
//! username (`USER-session-ID[-ttl-SECONDS]`) or from the destination host
//! ([`SessionFrom`]). Upstream HTTP connections are kept alive per
//! (source address, destination): a request leases its source first, then
//! reuses an idle connection from exactly that source to that destination,
//! so pooling never overrides rotation; with `max_uses = 1` nothing is
//! kept (every request gets a new source by design). See [`KeepAlive`].
//!
//! # Outcomes
//!
//! Every outcome goes to the pool's [`addrpool::OutcomeSink`] (set in
//! [`addrpool::PoolOptions::outcomes`]), per source address: `Connected`,
//! `ConnectFailed`, `ConnectTimeout` from the connector; then
//! `Status(code)` for each HTTP response, `EarlyEof` when the destination
//! closed without sending a byte (no response, or a tunnel it closed
//! first), `Success` for a tunnel that carried data back, `Failure` for
//! other upstream errors.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use addrpool::{Assigner, Pool, PoolOptions};
//! use gateway::egress::{EgressOptions, EgressProxy};
//!
//! let pool = Pool::start("127.0.0.0/24".parse()?, Assigner::Static, PoolOptions::default()).await?;
//! let mut opts = EgressOptions::new(pool.clone());
//! opts.listen = "127.0.0.1:3128".parse()?;
//! opts.users.insert("alice".into(), "secret".into());
//! let proxy = EgressProxy::bind(opts).await?;
//! // curl -x http://alice:secret@127.0.0.1:3128 http://example.com/
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! # drop(stop);
//! proxy.serve(async { let _ = stopped.await; }).await; // until `stop` is sent or dropped
//! pool.shutdown().await;
//! # Ok(()) }
//! ```

mod auth;
mod body;
mod dial;
mod h1;
mod http;
mod metrics;
mod options;
mod policy;
mod socks;
#[cfg(test)]
mod tests;
mod tunnel;
mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use addrpool::Pool;
use iprules::{Policy, Shared};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::tasks::Tasks;

pub use self::http::{ERROR_HEADER, SOURCE_HEADER};
pub use metrics::{EgressMetrics, EgressMetricsSnapshot, Protocol, RequestResult};
pub use options::{
    EgressOptions, KeepAlive, PoolSelection, Resolve, Resolving, SessionFrom, SystemResolver,
};
pub use policy::{default_deny_rules, default_policy};

use upstream::IdlePool;

/// Why an egress listener could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EgressError {
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A non-loopback listener without users and without `open = true`.
    #[error(
        "refusing to run an open proxy on {addr}: it is not a loopback address and no users \
         are configured (add users, listen on 127.0.0.1, or set open = true)"
    )]
    OpenProxy {
        /// The address.
        addr: SocketAddr,
    },
    /// The listener socket is unusable.
    #[error("listener: {0}")]
    Listener(#[source] std::io::Error),
}

/// What every connection of a listener shares.
pub(crate) struct Ctx {
    pub(crate) opts: EgressOptions,
    pub(crate) metrics: Arc<EgressMetrics>,
    pub(crate) idle: Arc<IdlePool>,
    /// Idle upstream connections of the HTTP/1.1 fast path (`h1.rs`).
    pub(crate) raw_idle: Arc<IdlePool<h1::RawConn>>,
    pub(crate) tasks: Tasks,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl Ctx {
    /// Whether upstream connections from `pool` may be kept alive: not
    /// when each address is retired after one use.
    pub(crate) fn keep_alive(&self, pool: &Pool) -> bool {
        self.opts.keep_alive.max_idle > 0 && pool.options().max_uses != Some(1)
    }
}

/// One egress listener. [`bind`](EgressProxy::bind) it, then
/// [`serve`](EgressProxy::serve) it until a shutdown signal.
pub struct EgressProxy {
    listener: TcpListener,
    ctx: Arc<Ctx>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressProxy")
            .field("local_addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl EgressProxy {
    /// Checks the options and binds `opts.listen`. A non-loopback address
    /// needs users or `open = true`.
    pub async fn bind(opts: EgressOptions) -> Result<EgressProxy, EgressError> {
        check_open(&opts, opts.listen)?;
        let listener =
            TcpListener::bind(opts.listen)
                .await
                .map_err(|source| EgressError::Bind {
                    addr: opts.listen,
                    source,
                })?;
        Ok(EgressProxy::with_listener(listener, opts))
    }

    /// Serves an already bound listener (made in another network
    /// namespace, or handed over by a supervisor); `opts.listen` is
    /// ignored. Must be called inside a tokio runtime.
    pub fn from_listener(
        listener: std::net::TcpListener,
        opts: EgressOptions,
    ) -> Result<EgressProxy, EgressError> {
        let addr = listener.local_addr().map_err(EgressError::Listener)?;
        check_open(&opts, addr)?;
        listener
            .set_nonblocking(true)
            .map_err(EgressError::Listener)?;
        let listener = TcpListener::from_std(listener).map_err(EgressError::Listener)?;
        Ok(EgressProxy::with_listener(listener, opts))
    }

    fn with_listener(listener: TcpListener, opts: EgressOptions) -> EgressProxy {
        let (stop, shutdown) = watch::channel(false);
        let idle = Arc::new(IdlePool::new(opts.keep_alive, opts.idle_timeout));
        let raw_idle = Arc::new(IdlePool::new(opts.keep_alive, opts.idle_timeout));
        EgressProxy {
            listener,
            ctx: Arc::new(Ctx {
                opts,
                metrics: Arc::new(EgressMetrics::default()),
                idle,
                raw_idle,
                tasks: Tasks::default(),
                shutdown,
            }),
            stop,
        }
    }

    /// A duplicate of the listening socket's descriptor (the same socket),
    /// e.g. to attach a [`crate::guard::KernelFilter`] while the proxy
    /// serves.
    pub fn socket(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.listener.as_fd().try_clone_to_owned()
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.ctx.opts.listen)
    }

    /// The listener's counters (live; keep the `Arc` after `serve`).
    pub fn metrics(&self) -> Arc<EgressMetrics> {
        self.ctx.metrics.clone()
    }

    /// The destination policy (update it to change what may be reached).
    pub fn policy(&self) -> Arc<Shared<Policy>> {
        self.ctx.opts.policy.clone()
    }

    /// Accepts and serves clients until `shutdown` resolves; then stops
    /// accepting, lets open requests and tunnels finish for up to
    /// `drain_timeout`, and aborts what is left. Pools are not shut down
    /// (they may be shared).
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let EgressProxy {
            listener,
            ctx,
            stop,
        } = self;
        // Dropped mid-drain (the daemon's shutdown timeout): abort the rest.
        let _abort = ctx.tasks.abort_on_drop();
        tokio::pin!(shutdown);
        let sweep_every =
            (ctx.opts.idle_timeout / 2).clamp(Duration::from_millis(500), Duration::from_secs(10));
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = ctx.opts.guard.accept(&listener) => match accepted {
                    Ok((stream, peer)) => {
                        ctx.metrics.connection();
                        let _ = stream.set_nodelay(true);
                        ctx.tasks.spawn(serve_conn(ctx.clone(), stream, peer));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = sweep.tick() => {
                    ctx.idle.sweep();
                    ctx.raw_idle.sweep();
                }
            }
        }
        drop(listener);
        let _ = stop.send(true);
        ctx.idle.clear();
        ctx.raw_idle.clear();
        ctx.tasks.drain(ctx.opts.drain_timeout).await;
        ctx.idle.clear();
        ctx.raw_idle.clear();
        for pool in ctx.opts.pool.pools() {
            tracing::debug!(held = pool.held().len(), "egress listener stopped");
        }
    }
}

fn check_open(opts: &EgressOptions, addr: SocketAddr) -> Result<(), EgressError> {
    if !addr.ip().to_canonical().is_loopback() && opts.users.is_empty() && !opts.open {
        return Err(EgressError::OpenProxy { addr });
    }
    Ok(())
}

/// Peeks the first byte: `0x05` is SOCKS5, anything else HTTP.
async fn serve_conn(ctx: Arc<Ctx>, stream: TcpStream, peer: SocketAddr) {
    let mut first = [0u8; 1];
    match tokio::time::timeout(ctx.opts.header_read_timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return,
    }
    match first[0] {
        0x05 => socks::serve(ctx, stream, peer).await,
        // Request lines start with a method token (leading CRLFs are
        // tolerated by HTTP/1.1); anything else gets a 400 at once instead
        // of waiting for a head that will never parse.
        b'A'..=b'Z' | b'a'..=b'z' | b'\r' | b'\n' => {
            let (stream, pre) = if ctx.opts.fast_h1 {
                // The HTTP/1.1 fast path, until a request needs hyper.
                match h1::serve(&ctx, stream, peer).await {
                    h1::Served::Done => return,
                    h1::Served::Fallback(stream, pre) => (stream, pre.freeze()),
                }
            } else {
                (stream, bytes::Bytes::new())
            };
            http::serve(ctx, stream, peer, pre).await;
        }
        other => {
            let why = if other == 0x16 {
                "TLS handshake on a plain proxy port: use http:// for the proxy URL"
            } else if other == 0x04 {
                "SOCKS4 is not supported: use SOCKS5"
            } else {
                "not an HTTP request or a SOCKS5 greeting"
            };
            tracing::debug!(%peer, first = other, why, "refusing connection");
            ctx.metrics
                .request(Protocol::Http, RequestResult::BadRequest);
            ctx.opts
                .guard
                .offense(peer.ip(), crate::guard::Offense::Malformed);
            http::refuse_raw(stream, why).await;
        }
    }
}
