//! Outcomes per source address (the hook for per-address health) and
//! metrics counters.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What happened when a source address was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// An outbound connection from this address was established.
    Connected,
    /// The destination refused or reset the connection, or it failed
    /// otherwise after binding.
    ConnectFailed,
    /// The outbound connection timed out.
    ConnectTimeout,
    /// Binding the address failed (it is retired).
    BindFailed,
    /// Assigning the address to the interface failed or timed out (it is
    /// never handed out).
    AssignFailed,
    /// The caller reports that the exchange over the connection succeeded.
    Success,
    /// The caller reports that the exchange failed (e.g. the destination
    /// blocked this address).
    Failure,
    /// The destination closed the connection without sending a byte right
    /// after it was established (a tunnel, or a request with no response):
    /// a common sign that the destination blocks this address.
    EarlyEof,
    /// The destination answered an HTTP request with this status code.
    /// [`Outcome::is_failure`] counts 403 and 429 (the usual signs that a
    /// destination blocks or throttles an address); the destination's own
    /// 404 or 500 says nothing against the address.
    Status(u16),
}

impl Outcome {
    /// Whether this outcome counts as a failure of the address.
    pub fn is_failure(self) -> bool {
        match self {
            Outcome::Connected | Outcome::Success => false,
            Outcome::Status(code) => matches!(code, 403 | 429),
            _ => true,
        }
    }
}

/// Receives every outcome, keyed by source address. Implemented for any
/// `Fn(IpAddr, Outcome) + Send + Sync`.
///
/// Called synchronously on the path of the connection (never under the
/// pool's lock): keep it short (record and return).
pub trait OutcomeSink: Send + Sync + 'static {
    /// One outcome of one source address.
    fn report(&self, source: IpAddr, outcome: Outcome);
}

impl<F> OutcomeSink for F
where
    F: Fn(IpAddr, Outcome) + Send + Sync + 'static,
{
    fn report(&self, source: IpAddr, outcome: Outcome) {
        self(source, outcome)
    }
}

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) assigned: AtomicU64,
    pub(crate) removed: AtomicU64,
    pub(crate) leased: AtomicU64,
    pub(crate) retired: AtomicU64,
    pub(crate) assign_failures: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) assign_latency_us: AtomicU64,
    pub(crate) assign_latency_max_us: AtomicU64,
    pub(crate) assign_latency_buckets: [AtomicU64; ASSIGN_LATENCY_BOUNDS_US.len() + 1],
}

/// Upper bounds, in microseconds, of the buckets of the assignment latency
/// histogram ([`MetricsSnapshot::assign_latency_buckets`]); a last bucket
/// holds everything slower. From 100 µs (a NODAD netlink add) to 2 s (a
/// DAD wait near its timeout).
pub const ASSIGN_LATENCY_BOUNDS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 250_000, 1_000_000, 2_000_000,
];

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub(crate) fn assign_done(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        inc(&self.assigned);
        self.assign_latency_us.fetch_add(us, Ordering::Relaxed);
        self.assign_latency_max_us.fetch_max(us, Ordering::Relaxed);
        let i = ASSIGN_LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        inc(&self.assign_latency_buckets[i]);
    }

    pub(crate) fn snapshot(&self, held: usize, leased_now: usize) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            assigned_total: get(&self.assigned),
            removed_total: get(&self.removed),
            leased_total: get(&self.leased),
            retired_total: get(&self.retired),
            assign_failures_total: get(&self.assign_failures),
            connect_failures_total: get(&self.connect_failures),
            assign_latency_sum: Duration::from_micros(get(&self.assign_latency_us)),
            assign_latency_max: Duration::from_micros(get(&self.assign_latency_max_us)),
            assign_latency_buckets: std::array::from_fn(|i| get(&self.assign_latency_buckets[i])),
            held: held as u64,
            leased_now: leased_now as u64,
            ..MetricsSnapshot::default()
        }
    }
}

/// A point-in-time copy of a pool's counters (`_total` are monotonic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Addresses made usable (added over netlink, or taken into the working
    /// set by the static and freebind assigners; adopted ones included).
    pub assigned_total: u64,
    /// Addresses removed from the interface (netlink only).
    pub removed_total: u64,
    /// Leases handed out.
    pub leased_total: u64,
    /// Addresses retired (use limit, idle time, or bind failure).
    pub retired_total: u64,
    /// Assignments that failed or timed out.
    pub assign_failures_total: u64,
    /// Outbound connections that failed (bind, connect, timeout).
    pub connect_failures_total: u64,
    /// Sum of assignment latencies (divide by `assigned_total` for the mean).
    pub assign_latency_sum: Duration,
    /// Largest assignment latency seen.
    pub assign_latency_max: Duration,
    /// Assignments per latency bucket (not cumulative): entry `i` counts
    /// those slower than bound `i - 1` and at most
    /// [`ASSIGN_LATENCY_BOUNDS_US`]`[i]`; the last entry, the slower rest.
    pub assign_latency_buckets: [u64; ASSIGN_LATENCY_BOUNDS_US.len() + 1],
    /// Addresses the pool holds now (ready, leased, being assigned or removed).
    pub held: u64,
    /// Leases outstanding now.
    pub leased_now: u64,
    /// Benchings of addresses (per-address health; 0 when it is off).
    pub benched_total: u64,
    /// Addresses restored by a successful probe after their cooldown.
    pub restored_total: u64,
    /// Benchings suppressed because `max_benched_percent` of the pool was
    /// already out of service.
    pub bench_suppressed_total: u64,
    /// Addresses benched now (held, or retired and remembered until their
    /// cooldown ends).
    pub benched_now: u64,
    /// Addresses on probation now.
    pub probation_now: u64,
}
