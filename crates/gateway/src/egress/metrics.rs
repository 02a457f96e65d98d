//! Counters of an egress listener (plain atomics; the binary exports them).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// How a client asked for a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// An HTTP/1.1 absolute-form request, forwarded.
    Http,
    /// An HTTP CONNECT tunnel.
    Connect,
    /// A SOCKS5 CONNECT.
    Socks5,
}

impl Protocol {
    /// Every protocol, in index order.
    pub const ALL: [Protocol; 3] = [Protocol::Http, Protocol::Connect, Protocol::Socks5];

    /// The metric label value (`http`, `connect`, `socks5`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Connect => "connect",
            Protocol::Socks5 => "socks5",
        }
    }
}

/// How a request ended, as seen by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestResult {
    /// Forwarded (any upstream status) or tunnel established.
    Ok,
    /// Malformed request (400, SOCKS5 protocol error).
    BadRequest,
    /// Missing or wrong credentials (407, SOCKS5 auth failure).
    AuthFailed,
    /// The destination policy refused the destination (403, SOCKS5 0x02).
    Denied,
    /// Resolution, family or connect failure (502).
    BadGateway,
    /// The pool had no address (503).
    Unavailable,
    /// Connecting timed out (504).
    Timeout,
    /// Over the client's rate limit (429 / SOCKS5 reply 2).
    RateLimited,
}

impl RequestResult {
    /// Every result, in index order.
    pub const ALL: [RequestResult; 8] = [
        RequestResult::Ok,
        RequestResult::BadRequest,
        RequestResult::AuthFailed,
        RequestResult::Denied,
        RequestResult::BadGateway,
        RequestResult::Unavailable,
        RequestResult::Timeout,
        RequestResult::RateLimited,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestResult::Ok => "ok",
            RequestResult::BadRequest => "bad_request",
            RequestResult::AuthFailed => "auth_failed",
            RequestResult::Denied => "denied",
            RequestResult::BadGateway => "bad_gateway",
            RequestResult::Unavailable => "unavailable",
            RequestResult::Timeout => "timeout",
            RequestResult::RateLimited => "rate_limited",
        }
    }
}

const NP: usize = Protocol::ALL.len();
const NR: usize = RequestResult::ALL.len();

/// Live counters of one egress listener.
#[derive(Debug, Default)]
pub struct EgressMetrics {
    requests: [[AtomicU64; NR]; NP],
    connections: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    active_tunnels: AtomicI64,
}

impl EgressMetrics {
    pub(crate) fn request(&self, p: Protocol, r: RequestResult) {
        self.requests[p as usize][r as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn up(&self, n: usize) {
        self.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn down(&self, n: usize) {
        self.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn tunnel_opened(&self) -> TunnelGuard<'_> {
        self.active_tunnels.fetch_add(1, Ordering::Relaxed);
        TunnelGuard(self)
    }

    /// A point-in-time copy.
    pub fn snapshot(&self) -> EgressMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut requests = [[0; NR]; NP];
        for (p, row) in requests.iter_mut().enumerate() {
            for (r, v) in row.iter_mut().enumerate() {
                *v = get(&self.requests[p][r]);
            }
        }
        EgressMetricsSnapshot {
            requests,
            connections_total: get(&self.connections),
            bytes_up_total: get(&self.bytes_up),
            bytes_down_total: get(&self.bytes_down),
            active_tunnels: self.active_tunnels.load(Ordering::Relaxed).max(0) as u64,
        }
    }
}

/// Decrements the active tunnel gauge when dropped.
pub(crate) struct TunnelGuard<'a>(&'a EgressMetrics);

impl Drop for TunnelGuard<'_> {
    fn drop(&mut self) {
        self.0.active_tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A copy of the counters (`_total` are monotonic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EgressMetricsSnapshot {
    requests: [[u64; NR]; NP],
    /// Client connections accepted.
    pub connections_total: u64,
    /// Bytes from clients to destinations (request bodies, tunnel traffic).
    pub bytes_up_total: u64,
    /// Bytes from destinations to clients (response bodies, tunnel traffic).
    pub bytes_down_total: u64,
    /// Tunnels (CONNECT and SOCKS5) open now.
    pub active_tunnels: u64,
}

impl EgressMetricsSnapshot {
    /// Requests of `protocol` that ended with `result`.
    pub fn requests(&self, protocol: Protocol, result: RequestResult) -> u64 {
        self.requests[protocol as usize][result as usize]
    }

    /// Every (protocol, result, count), for export.
    pub fn iter_requests(&self) -> impl Iterator<Item = (Protocol, RequestResult, u64)> + '_ {
        Protocol::ALL.into_iter().flat_map(move |p| {
            RequestResult::ALL
                .into_iter()
                .map(move |r| (p, r, self.requests(p, r)))
        })
    }
}
