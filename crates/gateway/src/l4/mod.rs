//! The L4 (TCP) balancer: a listener that forwards each client connection
//! to an upstream picked from a pool, and pipes bytes both ways.
//!
//! # Picking an upstream
//!
//! The pool is a list of [`Upstream`]s (address and weight, e.g. the
//! `server` lines of an nginx `upstream` block). Each accepted connection
//! gets one, by [`Strategy`]: weighted random, smooth weighted round robin,
//! or least connections (open connections and dials in progress, relative
//! to the weight). Only upstreams available by their health are picked.
//!
//! # Health
//!
//! Every upstream has a [`health`] state, kept by a [`health::Tracker`]:
//!
//! - Each dial feeds it: connected is a success, a connect error (refused,
//!   reset, unreachable) a failure, no connection within
//!   [`L4Options::dial_timeout`] a timeout (a failure by default; see
//!   [`L4Options::classifier`]). A dial that fails for a local reason (out
//!   of file descriptors, ephemeral ports, buffers) is recorded as neutral:
//!   it says nothing against the upstream.
//! - After the failures of [`L4Options::health`] (by default the 3rd in a
//!   row) the upstream is **benched** and never dialled until its cooldown
//!   ends; then it is on **probation**: at most `probation_requests` dials
//!   to it in flight, the first that connects restores it, a failure
//!   benches it again for longer.
//! - At most `max_benched_percent` of the pool is out of service at once.
//!
//! A failed dial is retried on another upstream not yet tried for that
//! client, up to [`L4Options::retries`] times; the client sees nothing of
//! it but the delay. When no upstream can be picked, the client connection
//! is closed at once and counted ([`L4MetricsSnapshot::no_upstream_total`]),
//! with a warning in the log that names the peer.
//!
//! # Forwarding
//!
//! Bytes are copied both ways as they come. An end of stream from one side
//! is passed on as a half-close (FIN) to the other and the other direction
//! keeps flowing, so protocols that half-close (a client that sends its
//! request and shuts down its write side) work. A connection with no byte
//! either way for [`L4Options::idle_timeout`] is closed. Bytes are counted
//! per upstream as they move.
//!
//! # Shutdown
//!
//! [`L4Proxy::serve`] runs until its shutdown future resolves, then stops
//! accepting, lets open connections finish for up to
//! [`L4Options::drain_timeout`], and closes what is left.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use gateway::l4::{L4Options, L4Proxy, Strategy, Upstream};
//!
//! let mut opts = L4Options::new([
//!     Upstream::new("10.0.0.1:5432".parse()?).with_weight(2),
//!     Upstream::new("10.0.0.2:5432".parse()?),
//! ]);
//! opts.strategy = Strategy::LeastConnections;
//! let proxy = L4Proxy::bind("0.0.0.0:5432".parse()?, opts).await?;
//! let metrics = proxy.metrics(); // live; snapshot() for counters and states
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! # drop(stop);
//! proxy.serve(async { let _ = stopped.await; }).await; // until `stop` is sent or dropped
//! println!("{:?}", metrics.snapshot());
//! # Ok(()) }
//! ```

mod balancer;
mod metrics;
mod options;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use health::{NoneAvailable, Observation, Outcome};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

pub use metrics::{L4HealthSnapshot, L4Metrics, L4MetricsSnapshot, UpstreamMetrics};
pub use options::{
    L4Options, L4OptionsError, MAX_WEIGHT, Strategy, TransitionSink, UnknownStrategy, Upstream,
};

use crate::activity::Activity;
use crate::relay::{self, Meter, Side};
use crate::tasks::Tasks;
use balancer::{Balancer, Pick, inc};
use metrics::Refused;

/// Why an L4 listener could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum L4Error {
    /// The options are invalid.
    #[error("invalid L4 options: {0}")]
    Options(#[from] L4OptionsError),
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

/// At most one warning a second about refused clients; the rest at debug.
const WARN_EVERY_MS: u64 = 1000;

/// What every connection of a listener shares.
struct Ctx {
    opts: L4Options,
    balancer: Arc<Balancer>,
    metrics: Arc<L4Metrics>,
    tasks: Tasks,
    base: Instant,
    /// ms since `base` of the last warning, plus 1 (0: never).
    last_warn: AtomicU64,
}

impl Ctx {
    /// Whether a warning may be logged now (rate limit).
    fn may_warn(&self) -> bool {
        let now = u64::try_from(self.base.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last_warn.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= WARN_EVERY_MS)
            && self
                .last_warn
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Counts and logs a client connection closed without an upstream:
    /// `none` says why no upstream could be picked, if that was the reason.
    fn refuse(&self, peer: SocketAddr, why: Refused, tried: usize, none: Option<&NoneAvailable>) {
        self.metrics.refused(why);
        let msg = match why {
            Refused::NoUpstream => "no upstream available: closing the client connection",
            Refused::Failed => "every dial failed: closing the client connection",
        };
        let reason = none.map(tracing::field::display);
        if self.may_warn() {
            tracing::warn!(%peer, tried, reason, "{msg}");
        } else {
            tracing::debug!(%peer, tried, reason, "{msg}");
        }
    }
}

/// One L4 listener. [`bind`](L4Proxy::bind) it, then
/// [`serve`](L4Proxy::serve) it until a shutdown signal.
pub struct L4Proxy {
    listener: TcpListener,
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for L4Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L4Proxy")
            .field("local_addr", &self.listener.local_addr().ok())
            .field("upstreams", &self.ctx.opts.upstreams)
            .field("strategy", &self.ctx.opts.strategy)
            .finish_non_exhaustive()
    }
}

impl L4Proxy {
    /// Checks the options and binds `addr`.
    pub async fn bind(addr: SocketAddr, opts: L4Options) -> Result<L4Proxy, L4Error> {
        opts.validate()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| L4Error::Bind { addr, source })?;
        L4Proxy::with_listener(listener, opts)
    }

    /// Serves an already bound listener (made in another network
    /// namespace, or handed over by a supervisor). Must be called inside a
    /// tokio runtime.
    pub fn from_listener(
        listener: std::net::TcpListener,
        opts: L4Options,
    ) -> Result<L4Proxy, L4Error> {
        opts.validate()?;
        listener.set_nonblocking(true).map_err(L4Error::Listener)?;
        let listener = TcpListener::from_std(listener).map_err(L4Error::Listener)?;
        L4Proxy::with_listener(listener, opts)
    }

    fn with_listener(listener: TcpListener, opts: L4Options) -> Result<L4Proxy, L4Error> {
        let balancer = Arc::new(Balancer::new(&opts).map_err(L4OptionsError::from)?);
        let metrics = Arc::new(L4Metrics::new(balancer.clone()));
        Ok(L4Proxy {
            listener,
            ctx: Arc::new(Ctx {
                opts,
                balancer,
                metrics,
                tasks: Tasks::default(),
                base: Instant::now(),
                last_warn: AtomicU64::new(0),
            }),
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
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The options the listener runs with.
    pub fn options(&self) -> &L4Options {
        &self.ctx.opts
    }

    /// The listener's counters and its upstreams' health (live; keep the
    /// `Arc` after `serve`).
    pub fn metrics(&self) -> Arc<L4Metrics> {
        self.ctx.metrics.clone()
    }

    /// Accepts and forwards clients until `shutdown` resolves; then stops
    /// accepting (the listening socket is closed at once), lets open
    /// connections finish for up to `drain_timeout`, and closes what is
    /// left.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let L4Proxy { listener, ctx } = self;
        // Dropped mid-drain (the daemon's shutdown timeout): abort the rest.
        let _abort = ctx.tasks.abort_on_drop();
        let guard = Arc::clone(&ctx.opts.guard);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = guard.accept(&listener) => match accepted {
                    Ok((stream, peer)) => {
                        let guard = ctx.metrics.accepted();
                        ctx.tasks.spawn(serve_conn(ctx.clone(), stream, peer, guard));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "L4 accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        ctx.tasks.drain(ctx.opts.drain_timeout).await;
        tracing::debug!("L4 listener stopped");
    }
}

/// Dials an upstream for one client (retrying on others), then splices.
async fn serve_conn(
    ctx: Arc<Ctx>,
    client: TcpStream,
    peer: SocketAddr,
    _open: metrics::ClientGuard,
) {
    let attempts = usize::try_from(ctx.opts.retries)
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    let mut tried: Vec<usize> = Vec::new();
    let (upstream, idx, _active) = loop {
        let pick = match ctx.balancer.pick(&tried, balancer::now()) {
            Ok(p) => p,
            Err(none) => {
                let why = if tried.is_empty() {
                    Refused::NoUpstream
                } else {
                    Refused::Failed
                };
                ctx.refuse(peer, why, tried.len(), Some(&none));
                return;
            }
        };
        if !tried.is_empty() {
            ctx.metrics.retry();
        }
        let Pick {
            idx,
            permit,
            active,
        } = pick;
        let up = &ctx.balancer.ups[idx];
        tried.push(idx);
        inc(&up.dials);
        let t0 = Instant::now();
        let dialled =
            tokio::time::timeout(ctx.opts.dial_timeout, TcpStream::connect(up.addr)).await;
        let outcome = match &dialled {
            Ok(Ok(_)) => Outcome::Connected,
            // Out of descriptors, ports or memory here is not the
            // upstream's fault: kept in its history but neutral.
            Ok(Err(e)) => Outcome::of_connect_error(e),
            Err(_) => Outcome::Timeout,
        };
        ctx.balancer.finish(
            idx,
            permit,
            Observation::new(outcome).with_latency(t0.elapsed()),
            balancer::now(),
        );
        match dialled {
            Ok(Ok(s)) => break (s, idx, active),
            Ok(Err(e)) => {
                inc(&up.connect_failures);
                if matches!(outcome, Outcome::ConnectError(_)) {
                    tracing::debug!(%peer, upstream = %up.addr, error = %e, "dial failed");
                } else if ctx.may_warn() {
                    tracing::warn!(%peer, upstream = %up.addr, error = %e, "dial failed for a local reason");
                }
            }
            Err(_) => {
                inc(&up.timeouts);
                tracing::debug!(%peer, upstream = %up.addr, timeout = ?ctx.opts.dial_timeout, "dial timed out");
            }
        }
        drop(active);
        if tried.len() >= attempts {
            ctx.refuse(peer, Refused::Failed, tried.len(), None);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    ctx.metrics.forwarded(idx);
    let addr = ctx.balancer.ups[idx].addr;
    let act = Activity::default();
    let meter = Counted {
        metrics: &ctx.metrics,
        idx,
    };
    tokio::select! {
        r = relay::splice(&client, &upstream, &act, &meter) => match r {
            Ok(()) => tracing::trace!(%peer, upstream = %addr, "connection closed"),
            Err(e) => tracing::debug!(%peer, upstream = %addr, error = %e, "connection ended with an error"),
        },
        () = act.idle(ctx.opts.idle_timeout) => {
            tracing::debug!(%peer, upstream = %addr, idle = ?ctx.opts.idle_timeout, "connection idle; closed")
        }
    }
}

/// Counts a connection's bytes per upstream.
struct Counted<'a> {
    metrics: &'a L4Metrics,
    idx: usize,
}

impl Meter for Counted<'_> {
    fn moved(&self, from: Side, n: usize) {
        self.metrics.bytes(self.idx, from == Side::Client, n);
    }

    fn ended(&self, _: Side) {}
}
