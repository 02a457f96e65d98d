//! The ingress reverse proxy: clients connect to it, a [`RouteTable`]
//! picks the route by host and path, the route's [`Balance`] picks a
//! backend, and the request is forwarded over a kept-alive HTTP/1.1
//! connection.
//!
//! # Protocols
//!
//! - HTTP/1.1 and HTTP/2: over TLS, ALPN chooses (`h2`, `http/1.1`); on a
//!   plain listener, HTTP/2 with prior knowledge (h2c) is told apart from
//!   HTTP/1.1 by its preface. Backends are spoken to in HTTP/1.1.
//! - WebSocket (any HTTP/1.1 `Upgrade` but `h2c`): the upgrade is passed
//!   to the backend; on its `101` the two connections are joined and
//!   bytes copied both ways until either closes or nothing moves for
//!   [`IngressOptions::idle_timeout`].
//! - TLS: rustls (ring) with certificates from PEM files in a
//!   [`CertStore`]; the client's SNI picks the certificate, and
//!   [`CertStore::reload`] (or the file watch of [`TlsOptions::watch`])
//!   swaps them without a restart.
//!
//! # Routing and balancing
//!
//! A [`Route`] takes [`RouteMatch`]es (an exact host, `*.example.com`, or
//! any host, plus a path prefix; longest prefix wins) and balances over
//! its [`Backend`]s by [`Balance`]: weighted round robin (default), least
//! connections, power of two choices on a latency EWMA, weighted random,
//! or consistent hashing of the client address, a header or a cookie.
//!
//! The table is changed while serving: [`RouteTable::upsert_route`],
//! [`upsert_backend`](RouteTable::upsert_backend),
//! [`set_weight`](RouteTable::set_weight), [`drain`](RouteTable::drain)
//! (no new requests, in-flight ones finish within a timeout, then
//! removed), [`hold`](RouteTable::hold) / [`undrain`](RouteTable::undrain)
//! (an operator's drain: out of rotation but kept) and
//! [`remove`](RouteTable::remove). Static backends from the
//! config and registered ones live in the same table. Requests read a
//! snapshot with one atomic load; writers never block them.
//!
//! # What the proxy answers itself
//!
//! Each carries the reason in the body and in [`ERROR_HEADER`]:
//!
//! | status | when |
//! |---|---|
//! | 400 | malformed request (hyper), no `Host`; 405 for `CONNECT` |
//! | 404 | no route for the host and path |
//! | 413 | body over [`IngressOptions::max_body_bytes`] (by `Content-Length` at once, or as the streamed body goes over) |
//! | 431 | request head over [`IngressOptions::max_header_bytes`] |
//! | 502 | connect refused (after retries), or the backend closed without a response |
//! | 503 (the route's [`Route::no_backend_status`]) | no backend can take it (none, all benched, down or draining) |
//! | 504 | connect or response timeout |
//!
//! # Requests sent to backends
//!
//! Hop-by-hop headers (`Connection` and those it names, `Keep-Alive`,
//! `Proxy-Connection`, `Proxy-Authorization`, `TE`, `Trailer`,
//! `Transfer-Encoding`, `Upgrade` unless upgrading) are removed both ways;
//! `X-Forwarded-For/-Proto/-Host`, RFC 7239 `Forwarded` and `Via` are set
//! ([`Forwarding`]; incoming ones kept only from trusted clients,
//! [`TrustForwarded`]). Bodies are streamed both ways.
//!
//! Idempotent requests whose connect fails are retried on another backend
//! ([`Route::retries`]). Once sent, a request is not retried, with one
//! exception (RFC 9110 §9.2.2): an idempotent request without a body that
//! went out on a kept-alive connection the backend had closed meanwhile
//! (no response byte came back) is sent once more on a new connection.
//!
//! # Health
//!
//! Passive: every outcome feeds the route's [`health::Tracker`] (5xx,
//! connect errors, timeouts and early closes are failures, by
//! [`RouteTableOptions::classifier`]): a backend is benched after
//! consecutive failures, put on probation after its cooldown, restored by
//! a success, as egress addresses are. A backend with no failure run is
//! served without touching the tracker's lock. Active: a
//! [`HealthCheck`] per route (`GET path` every interval, `rise`/`fall`).
//!
//! # Timeouts and shutdown
//!
//! [`IngressOptions::header_read_timeout`] bounds the TLS handshake and
//! each request head (slowloris), `connect_timeout` each backend connect,
//! `request_timeout` each exchange, `idle_timeout` idle connections and
//! tunnels. [`IngressProxy::serve`] runs until its shutdown future
//! resolves, then stops accepting, lets requests in flight finish
//! (HTTP/1 connections close after their response, HTTP/2 ones get a
//! GOAWAY) for up to `drain_timeout`, and closes what is left.
//!
//! # Performance
//!
//! Requests read the route table with one atomic load; a clean backend
//! (no failure run) is picked without a lock. On HTTP/1.1 connections
//! (plain, or TLS with ALPN `http/1.1` or none), the common exchange (no request body or a `Content-Length` one)
//! takes a lean path (`h1.rs`, [`IngressOptions::fast_h1`]): the head is
//! parsed in place and rewritten into one write to a pooled backend
//! connection, and the response is copied back with its framing as it
//! came, in the client connection's task, with no allocation per request;
//! one read and one write per side, which is what nginx and HAProxy do.
//! Everything else (HTTP/2, upgrades, chunked request bodies,
//! HTTP/1.0, malformed heads) goes to hyper, which frames both sides;
//! its kept-alive backend connections are polled by the request that uses
//! them (no task hand-off per request, see `upstream.rs`). Both kinds of
//! connection return to a per-backend pool.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use gateway::ingress::{
//!     Backend, Balance, CertPaths, CertStore, HealthCheck, IngressOptions, IngressProxy,
//!     Route, RouteMatch, RouteTable, TlsOptions,
//! };
//!
//! let routes = RouteTable::default();
//! routes.upsert_route(
//!     Route::new("api", RouteMatch::new(Some("api.example.com"), "/"))
//!         .with_balance(Balance::LeastConnections)
//!         .with_health_check(HealthCheck::new("/healthz"))
//!         .with_backend(Backend::new("api-1", "10.0.0.1:8080".parse()?))
//!         .with_backend(Backend::new("api-2", "10.0.0.2:8080".parse()?).with_weight(2)),
//! )?;
//! let certs = CertStore::load([CertPaths::new("/etc/ippool/api.pem", "/etc/ippool/api.key")])?;
//! let mut opts = IngressOptions::new("0.0.0.0:443".parse()?, routes.clone());
//! opts.tls = Some(TlsOptions::new(certs));
//! let proxy = IngressProxy::bind(opts).await?;
//! let metrics = proxy.metrics();
//! // Later, from anywhere: routes.upsert_backend("api", …), routes.drain("api-1", …)
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! # drop(stop);
//! proxy.serve(async { let _ = stopped.await; }).await; // until `stop` is sent or dropped
//! println!("{:?} {:?}", metrics.snapshot(), routes.snapshot());
//! # Ok(()) }
//! ```

mod backend;
mod backend_tls;
mod balance;
mod body;
mod check;
mod h1;
mod headers;
mod metrics;
mod options;
mod proxy;
mod routes;
mod tls;
mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

pub use crate::egress::ERROR_HEADER;
pub use backend_tls::BackendTls;
pub use balance::{Balance, HashKey, UnknownBalance};
pub use check::{HealthCheck, InvalidHealthCheck};
pub use metrics::{IngressMetrics, IngressMetricsSnapshot};
pub use options::{
    Forwarding, IngressOptions, IngressOptionsError, KeepAlive, MAX_HEADER_BYTES, MIN_HEADER_BYTES,
    TlsOptions, TrustForwarded,
};
pub use routes::{
    Backend, BackendSnapshot, DrainOutcome, HealthSink, MAX_WEIGHT, Route, RouteError, RouteMatch,
    RouteSnapshot, RouteTable, RouteTableOptions, RoutesSnapshot, default_classifier,
};
pub use tls::{CertPaths, CertStore, TlsError, rustls_server_config};

use crate::activity::{Activity, Touched};
use crate::tasks::Tasks;
use crate::wire::Rewind;
use headers::{ClientInfo, ViaValues};

/// Why an ingress listener could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngressError {
    /// The options are invalid.
    #[error("invalid ingress options: {0}")]
    Options(#[from] IngressOptionsError),
    /// The TLS configuration is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The listener socket is unusable.
    #[error("listener: {0}")]
    Listener(#[source] std::io::Error),
}

/// What every connection of a listener shares.
pub(crate) struct Ctx {
    pub(crate) opts: IngressOptions,
    pub(crate) metrics: Arc<IngressMetrics>,
    /// Client connections and tunnels.
    pub(crate) tasks: Tasks,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) via: Option<ViaValues>,
    pub(crate) client: hyper::client::conn::http1::Builder,
    tls: Option<TlsAcceptor>,
    /// HTTP/1.1 or h2c by the preface.
    auto: auto::Builder<TokioExecutor>,
    h1: auto::Builder<TokioExecutor>,
    h2: auto::Builder<TokioExecutor>,
}

/// One client connection.
pub(crate) struct Conn {
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) peer: SocketAddr,
    pub(crate) client: ClientInfo,
    pub(crate) act: Arc<Activity>,
}

/// One ingress listener. [`bind`](IngressProxy::bind) it, then
/// [`serve`](IngressProxy::serve) it until a shutdown signal.
pub struct IngressProxy {
    listener: TcpListener,
    ctx: Arc<Ctx>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for IngressProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngressProxy")
            .field("local_addr", &self.listener.local_addr().ok())
            .field("tls", &self.ctx.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl IngressProxy {
    /// Checks the options and binds `opts.listen`.
    pub async fn bind(opts: IngressOptions) -> Result<IngressProxy, IngressError> {
        opts.validate()?;
        let listener =
            TcpListener::bind(opts.listen)
                .await
                .map_err(|source| IngressError::Bind {
                    addr: opts.listen,
                    source,
                })?;
        IngressProxy::with_listener(listener, opts)
    }

    /// Serves an already bound listener (made in another network
    /// namespace, or handed over by a supervisor); `opts.listen` is
    /// ignored. Must be called inside a tokio runtime.
    pub fn from_listener(
        listener: std::net::TcpListener,
        opts: IngressOptions,
    ) -> Result<IngressProxy, IngressError> {
        opts.validate()?;
        listener
            .set_nonblocking(true)
            .map_err(IngressError::Listener)?;
        let listener = TcpListener::from_std(listener).map_err(IngressError::Listener)?;
        IngressProxy::with_listener(listener, opts)
    }

    fn with_listener(
        listener: TcpListener,
        opts: IngressOptions,
    ) -> Result<IngressProxy, IngressError> {
        let tls = match &opts.tls {
            Some(t) => Some(TlsAcceptor::from(Arc::new(tls::server_config(
                t.certs.clone(),
                opts.http2,
            )?))),
            None => None,
        };
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(opts.header_read_timeout)
            .max_buf_size(opts.max_header_bytes)
            .keep_alive(true);
        auto.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(opts.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(opts.max_concurrent_streams);
        let h1 = auto.clone().http1_only();
        let h2 = auto.clone().http2_only();
        let (stop, shutdown) = watch::channel(false);
        let via = opts.forwarding.via.as_deref().and_then(ViaValues::new);
        Ok(IngressProxy {
            listener,
            ctx: Arc::new(Ctx {
                metrics: Arc::new(IngressMetrics::default()),
                tasks: Tasks::default(),
                shutdown,
                via,
                client: hyper::client::conn::http1::Builder::new(),
                tls,
                auto,
                h1,
                h2,
                opts,
            }),
            stop,
        })
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

    /// The route table (a handle: change routes and backends through it
    /// while the proxy serves).
    pub fn routes(&self) -> RouteTable {
        self.ctx.opts.routes.clone()
    }

    /// The listener's counters (live; keep the `Arc` after `serve`).
    pub fn metrics(&self) -> Arc<IngressMetrics> {
        self.ctx.metrics.clone()
    }

    /// The options the listener runs with.
    pub fn options(&self) -> &IngressOptions {
        &self.ctx.opts
    }

    /// Accepts and serves clients until `shutdown` resolves; then stops
    /// accepting, lets requests in flight finish for up to
    /// `drain_timeout`, and closes what is left. Also runs the active
    /// health checks of the route table (one listener of several sharing
    /// a table does), drops expired idle upstream connections, and
    /// watches certificate files.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let IngressProxy {
            listener,
            ctx,
            stop,
        } = self;
        // Dropped mid-drain (the daemon's shutdown timeout): abort the rest.
        let _abort = ctx.tasks.abort_on_drop();
        tokio::pin!(shutdown);
        let mut background = JoinSet::new();
        // One listener of those sharing a table runs its active checks;
        // another takes over (at its next sweep) when that one stops, as
        // when a reload replaces a listener.
        let mut checking = false;
        let mut claim_checks = |background: &mut JoinSet<()>| {
            if checking {
                return;
            }
            if let Some(claim) = ctx.opts.routes.claim_checker() {
                let stopped = ctx.shutdown.clone();
                background.spawn(async move {
                    check::run(claim.table().clone(), stopped).await;
                    drop(claim);
                });
                checking = true;
            }
        };
        claim_checks(&mut background);
        let sweep_every = (ctx.opts.keep_alive.idle_timeout / 2)
            .clamp(Duration::from_millis(500), Duration::from_secs(10));
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch_certs = ctx
            .opts
            .tls
            .as_ref()
            .and_then(|t| Some((t.certs.clone(), tokio::time::interval(t.watch?))));
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = ctx.opts.guard.accept(&listener) => match accepted {
                    Ok((stream, peer)) => ctx.tasks.spawn(serve_conn(ctx.clone(), stream, peer)),
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "ingress accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = sweep.tick() => {
                    ctx.opts.routes.sweep_idle(ctx.opts.keep_alive.idle_timeout);
                    claim_checks(&mut background);
                }
                certs = async {
                    match &mut watch_certs {
                        Some((certs, every)) => {
                            every.tick().await;
                            certs.clone()
                        }
                        None => std::future::pending().await,
                    }
                } => match certs.reload_if_changed() {
                    Ok(true) => tracing::info!(names = ?certs.names(), "certificates reloaded"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "certificate reload failed; keeping the old ones"),
                },
            }
        }
        drop(listener);
        stop.send_replace(true);
        ctx.tasks.drain(ctx.opts.drain_timeout).await;
        background.shutdown().await;
        tracing::debug!("ingress listener stopped");
    }
}

/// Serves one client connection: TLS (ALPN) or plain (HTTP/1.1 or h2c).
async fn serve_conn(ctx: Arc<Ctx>, stream: TcpStream, peer: SocketAddr) {
    let _open = ctx.metrics.connection();
    let _ = stream.set_nodelay(true);
    let act = Arc::new(Activity::default());
    let limit = ctx.opts.header_read_timeout;
    match &ctx.tls {
        Some(acceptor) => {
            let tls = match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    ctx.metrics.tls_error();
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    ctx.metrics.tls_error();
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let h2 = ctx.opts.http2 && tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let conn = Conn::new(&ctx, peer, true, act.clone());
            if h2 {
                run_conn(&ctx, &ctx.h2, Touched::new(tls, act.clone()), conn, act).await;
                return;
            }
            let (tls, pre) = if ctx.opts.fast_h1 {
                // HTTP/1.1 over TLS: the lean path too, until hyper is needed.
                match h1::serve(&conn, tls).await {
                    h1::Served::Done => return,
                    h1::Served::Fallback(tls, pre) => (tls, pre.freeze()),
                }
            } else {
                (tls, bytes::Bytes::new())
            };
            let io = Touched::new(Rewind::new(pre, tls), act.clone());
            run_conn(&ctx, &ctx.h1, io, conn, act).await;
        }
        None => {
            let conn = Conn::new(&ctx, peer, false, act.clone());
            let (stream, pre) = if ctx.opts.fast_h1 {
                // The HTTP/1.1 fast path, until a request needs hyper.
                match h1::serve(&conn, stream).await {
                    h1::Served::Done => return,
                    h1::Served::Fallback(stream, pre) => (stream, pre.freeze()),
                }
            } else {
                // A first byte within the head timeout: connections that
                // send nothing are not held.
                let mut first = [0u8; 1];
                match tokio::time::timeout(limit, stream.peek(&mut first)).await {
                    Ok(Ok(1..)) => {}
                    _ => return,
                }
                (stream, bytes::Bytes::new())
            };
            let builder = if ctx.opts.http2 { &ctx.auto } else { &ctx.h1 };
            let io = Touched::new(Rewind::new(pre, stream), act.clone());
            run_conn(&ctx, builder, io, conn, act).await;
        }
    }
}

impl Conn {
    fn new(ctx: &Arc<Ctx>, peer: SocketAddr, tls: bool, act: Arc<Activity>) -> Arc<Conn> {
        let trusted = ctx.opts.forwarding.trust.trusts(peer.ip());
        Arc::new(Conn {
            ctx: ctx.clone(),
            peer,
            client: ClientInfo::new(peer, tls, trusted),
            act,
        })
    }
}

async fn run_conn<I>(
    ctx: &Arc<Ctx>,
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    conn: Arc<Conn>,
    act: Arc<Activity>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = conn.peer;
    let svc = service_fn(move |req| proxy::handle(conn.clone(), req));
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(served);
    let mut shutdown = ctx.shutdown.clone();
    let mut draining = *shutdown.borrow();
    if draining {
        served.as_mut().graceful_shutdown();
    }
    let idle = act.idle(ctx.opts.idle_timeout);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r {
                    connection_error(ctx, peer, &*e);
                }
                break;
            }
            _ = shutdown.changed(), if !draining => {
                draining = true;
                served.as_mut().graceful_shutdown();
            }
            () = &mut idle => {
                tracing::debug!(%peer, "client connection idle; closing");
                break;
            }
        }
    }
}

/// Counts (and reports to the guard) a connection that ended on a
/// malformed request or a head not sent in time.
fn connection_error(ctx: &Ctx, peer: SocketAddr, e: &(dyn std::error::Error + 'static)) {
    let Some(h) = e.downcast_ref::<hyper::Error>() else {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
        return;
    };
    if h.is_parse() || h.is_timeout() {
        ctx.metrics.malformed();
        if h.is_parse() {
            ctx.opts
                .guard
                .offense(peer.ip(), crate::guard::Offense::Malformed);
        }
        tracing::debug!(%peer, error = %h, "client connection closed: malformed or slow request");
    } else {
        tracing::debug!(%peer, error = %h, "client connection ended with an error");
    }
}
