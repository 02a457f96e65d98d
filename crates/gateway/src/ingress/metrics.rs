//! Counters of an ingress listener (plain atomics; the binary exports
//! them). Per-backend counters live in the route table
//! ([`RouteTable::snapshot`](super::RouteTable::snapshot)).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::StatusCode;

use super::backend::{get, inc};

/// What the proxy answered by itself, without a backend's response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Refusal {
    NoRoute,
    NoBackend,
    BadGateway,
    Timeout,
    TooLarge,
    BadRequest,
}

/// Live counters of one ingress listener. Keep the `Arc` after
/// [`serve`](super::IngressProxy::serve) returns.
#[derive(Debug, Default)]
pub struct IngressMetrics {
    connections: AtomicU64,
    open: AtomicU64,
    tls_errors: AtomicU64,
    malformed: AtomicU64,
    requests: AtomicU64,
    http2_requests: AtomicU64,
    status: [AtomicU64; 5],
    no_route: AtomicU64,
    no_backend: AtomicU64,
    bad_gateway: AtomicU64,
    timeouts: AtomicU64,
    too_large: AtomicU64,
    bad_request: AtomicU64,
    retries: AtomicU64,
    upgrades: AtomicU64,
    lean: AtomicU64,
}

/// Decrements the open-connections gauge when dropped.
pub(crate) struct OpenGuard(Arc<IngressMetrics>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl IngressMetrics {
    pub(crate) fn connection(self: &Arc<Self>) -> OpenGuard {
        inc(&self.connections);
        inc(&self.open);
        OpenGuard(self.clone())
    }

    pub(crate) fn tls_error(&self) {
        inc(&self.tls_errors);
    }

    pub(crate) fn malformed(&self) {
        inc(&self.malformed);
    }

    pub(crate) fn response(&self, status: StatusCode, http2: bool) {
        inc(&self.requests);
        if http2 {
            inc(&self.http2_requests);
        }
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        inc(&self.status[class]);
    }

    pub(crate) fn refused(&self, why: Refusal) {
        inc(match why {
            Refusal::NoRoute => &self.no_route,
            Refusal::NoBackend => &self.no_backend,
            Refusal::BadGateway => &self.bad_gateway,
            Refusal::Timeout => &self.timeouts,
            Refusal::TooLarge => &self.too_large,
            Refusal::BadRequest => &self.bad_request,
        });
    }

    pub(crate) fn retry(&self) {
        inc(&self.retries);
    }

    pub(crate) fn upgrade(&self) {
        inc(&self.upgrades);
    }

    /// A response on the lean HTTP/1.1 path (counted in `response` too).
    pub(crate) fn lean(&self) {
        inc(&self.lean);
    }

    /// A point-in-time copy of the counters.
    pub fn snapshot(&self) -> IngressMetricsSnapshot {
        IngressMetricsSnapshot {
            connections_total: get(&self.connections),
            connections_open: get(&self.open),
            tls_handshake_errors_total: get(&self.tls_errors),
            malformed_total: get(&self.malformed),
            requests_total: get(&self.requests),
            http2_requests_total: get(&self.http2_requests),
            responses_total: std::array::from_fn(|i| get(&self.status[i])),
            no_route_total: get(&self.no_route),
            no_backend_total: get(&self.no_backend),
            bad_gateway_total: get(&self.bad_gateway),
            timeouts_total: get(&self.timeouts),
            body_too_large_total: get(&self.too_large),
            bad_request_total: get(&self.bad_request),
            retries_total: get(&self.retries),
            upgrades_total: get(&self.upgrades),
            lean_requests_total: get(&self.lean),
        }
    }
}

/// A copy of a listener's counters (`_total` are monotonic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IngressMetricsSnapshot {
    /// Client connections accepted.
    pub connections_total: u64,
    /// Client connections open now.
    pub connections_open: u64,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_errors_total: u64,
    /// Connections closed on an unparsable request (hyper answered 400
    /// or 431), or a request head not complete within
    /// `header_read_timeout`.
    pub malformed_total: u64,
    /// Requests answered (by a backend or by the proxy).
    pub requests_total: u64,
    /// Of which over HTTP/2.
    pub http2_requests_total: u64,
    /// Responses by class: `[1xx, 2xx, 3xx, 4xx, 5xx]`.
    pub responses_total: [u64; 5],
    /// 404: no route for the host and path.
    pub no_route_total: u64,
    /// No backend could take the request (the route's `no_backend_status`).
    pub no_backend_total: u64,
    /// 502 made by the proxy: connect failed, or the backend closed or
    /// broke the connection without a response.
    pub bad_gateway_total: u64,
    /// 504 made by the proxy: connect or response timeout.
    pub timeouts_total: u64,
    /// 413: request body over `max_body_bytes`.
    pub body_too_large_total: u64,
    /// 400 made by the proxy (no host, CONNECT).
    pub bad_request_total: u64,
    /// Attempts on another backend after a connect failure.
    pub retries_total: u64,
    /// Protocol upgrades (WebSocket) passed through.
    pub upgrades_total: u64,
    /// Of `requests_total`, those served on the lean HTTP/1.1 path
    /// ([`IngressOptions::fast_h1`](super::IngressOptions::fast_h1)); the
    /// rest went through hyper.
    pub lean_requests_total: u64,
}
