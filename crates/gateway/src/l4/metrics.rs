//! Counters of an L4 listener and snapshots of its upstreams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use health::{KeySnapshot, PoolStats, State};

use super::balancer::{self, Balancer, get, inc};

/// Live counters of one L4 listener and a view of its upstreams' health.
/// Cheap to read; keep the `Arc` after [`serve`](super::L4Proxy::serve)
/// returns.
pub struct L4Metrics {
    accepted: AtomicU64,
    active: AtomicU64,
    forwarded: AtomicU64,
    no_upstream: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    pub(crate) balancer: Arc<Balancer>,
}

impl std::fmt::Debug for L4Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L4Metrics")
            .field("accepted", &get(&self.accepted))
            .field("active", &get(&self.active))
            .finish_non_exhaustive()
    }
}

/// What a client connection ended with, before any byte was forwarded.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refused {
    /// No upstream could be picked for the first dial.
    NoUpstream,
    /// Every dial failed.
    Failed,
}

impl L4Metrics {
    pub(crate) fn new(balancer: Arc<Balancer>) -> L4Metrics {
        L4Metrics {
            accepted: AtomicU64::new(0),
            active: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            no_upstream: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            balancer,
        }
    }

    /// Counts an accepted client connection as open until the guard drops.
    pub(crate) fn accepted(self: &Arc<Self>) -> ClientGuard {
        inc(&self.accepted);
        inc(&self.active);
        ClientGuard(self.clone())
    }

    pub(crate) fn refused(&self, why: Refused) {
        match why {
            Refused::NoUpstream => inc(&self.no_upstream),
            Refused::Failed => inc(&self.failed),
        }
    }

    pub(crate) fn retry(&self) {
        inc(&self.retries);
    }

    pub(crate) fn forwarded(&self, idx: usize) {
        inc(&self.forwarded);
        if let Some(up) = self.balancer.ups.get(idx) {
            inc(&up.forwarded);
        }
    }

    /// Bytes read from the client (`up`) or from the upstream.
    pub(crate) fn bytes(&self, idx: usize, up: bool, n: usize) {
        let n = n as u64;
        let Some(u) = self.balancer.ups.get(idx) else {
            return;
        };
        let (total, per) = if up {
            (&self.bytes_up, &u.bytes_up)
        } else {
            (&self.bytes_down, &u.bytes_down)
        };
        total.fetch_add(n, Ordering::Relaxed);
        per.fetch_add(n, Ordering::Relaxed);
    }

    /// A point-in-time copy of the counters, with each upstream's state.
    pub fn snapshot(&self) -> L4MetricsSnapshot {
        let at = balancer::now();
        let (health, states) = self.balancer.states(at);
        let upstreams = self
            .balancer
            .ups
            .iter()
            .zip(states)
            .map(|(u, state)| UpstreamMetrics {
                addr: u.addr,
                weight: u.weight,
                state,
                active: get(&u.active),
                dials_total: get(&u.dials),
                forwarded_total: get(&u.forwarded),
                connect_failures_total: get(&u.connect_failures),
                timeouts_total: get(&u.timeouts),
                bytes_up_total: get(&u.bytes_up),
                bytes_down_total: get(&u.bytes_down),
            })
            .collect();
        L4MetricsSnapshot {
            at,
            accepted_total: get(&self.accepted),
            active: get(&self.active),
            forwarded_total: get(&self.forwarded),
            no_upstream_total: get(&self.no_upstream),
            failed_total: get(&self.failed),
            retries_total: get(&self.retries),
            bytes_up_total: get(&self.bytes_up),
            bytes_down_total: get(&self.bytes_down),
            health,
            upstreams,
        }
    }

    /// Per-upstream health for an admin view: state, failure run, counters,
    /// the `recent` newest outcomes (connected, connect error, timeout, with
    /// the connect latency) and benchings of every upstream.
    pub fn health(&self, recent: usize) -> L4HealthSnapshot {
        let at = balancer::now();
        let (stats, upstreams) = self.balancer.health(at, recent);
        L4HealthSnapshot {
            at,
            stats,
            upstreams,
        }
    }

    /// The health state of `upstream` now; `None` if it is not one of the
    /// listener's upstreams.
    pub fn state(&self, upstream: SocketAddr) -> Option<State> {
        self.balancer.state(upstream, balancer::now())
    }
}

/// Decrements the open-connections gauge when dropped.
pub(crate) struct ClientGuard(Arc<L4Metrics>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A copy of a listener's counters (`_total` are monotonic).
#[derive(Debug, Clone, PartialEq)]
pub struct L4MetricsSnapshot {
    /// When the copy was taken (the clock of the health states).
    pub at: Instant,
    /// Client connections accepted.
    pub accepted_total: u64,
    /// Client connections open now (dialling or forwarding).
    pub active: u64,
    /// Client connections forwarded to an upstream.
    pub forwarded_total: u64,
    /// Client connections closed at once because no upstream was available
    /// (all benched, or on probation with every probe slot in use).
    pub no_upstream_total: u64,
    /// Client connections closed because every dial (the first and its
    /// retries) failed or timed out, or no untried upstream was left to
    /// retry on.
    pub failed_total: u64,
    /// Dials made after a failed one (retries).
    pub retries_total: u64,
    /// Bytes from clients to upstreams.
    pub bytes_up_total: u64,
    /// Bytes from upstreams to clients.
    pub bytes_down_total: u64,
    /// Upstreams by health state, and health totals.
    pub health: PoolStats,
    /// Every upstream, in configured order.
    pub upstreams: Vec<UpstreamMetrics>,
}

impl L4MetricsSnapshot {
    /// The counters of `addr`, if it is an upstream of the listener.
    pub fn upstream(&self, addr: SocketAddr) -> Option<&UpstreamMetrics> {
        self.upstreams.iter().find(|u| u.addr == addr)
    }
}

/// The counters and state of one upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamMetrics {
    /// The upstream's address.
    pub addr: SocketAddr,
    /// Its weight.
    pub weight: u32,
    /// Its health state.
    pub state: State,
    /// Connections to it open or being dialled now.
    pub active: u64,
    /// Dials made to it.
    pub dials_total: u64,
    /// Connections forwarded to it (dials that connected).
    pub forwarded_total: u64,
    /// Dials to it that failed (refused, reset, unreachable).
    pub connect_failures_total: u64,
    /// Dials to it that took longer than `dial_timeout`.
    pub timeouts_total: u64,
    /// Bytes from clients to it.
    pub bytes_up_total: u64,
    /// Bytes from it to clients.
    pub bytes_down_total: u64,
}

/// The health of a listener's upstreams, for an admin view (`/probe`).
#[derive(Debug, Clone)]
pub struct L4HealthSnapshot {
    /// The instant the states were evaluated at (subtract the `Instant`s of
    /// the snapshots from it to show ages).
    pub at: Instant,
    /// Counts by state and totals over every upstream.
    pub stats: PoolStats,
    /// Every upstream, in configured order (the key is its address).
    pub upstreams: Vec<KeySnapshot<SocketAddr>>,
}
