//! Byte tunnels (CONNECT, SOCKS5): spliced both ways with an idle
//! timeout, byte counters and early-EOF detection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use addrpool::{Outcome, PooledStream};
use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::metrics::EgressMetrics;
use crate::activity::Activity;
use crate::relay::{self, Meter, Side};

/// Which side of a tunnel ended first.
const NOBODY: u8 = 0;
const CLIENT: u8 = 1;
const UPSTREAM: u8 = 2;

/// Counts a tunnel's bytes and notices an early end of stream from the
/// destination.
struct TunnelMeter<'a> {
    metrics: &'a EgressMetrics,
    upstream: &'a PooledStream,
    /// Bytes read from the destination.
    down: AtomicU64,
    first_end: AtomicU8,
    early: AtomicBool,
}

impl Meter for TunnelMeter<'_> {
    fn moved(&self, from: Side, n: usize) {
        match from {
            Side::Client => self.metrics.up(n),
            Side::Upstream => {
                self.down.fetch_add(n as u64, Ordering::Relaxed);
                self.metrics.down(n);
            }
        }
    }

    fn ended(&self, from: Side) {
        let me = match from {
            Side::Client => CLIENT,
            Side::Upstream => UPSTREAM,
        };
        let first = self
            .first_end
            .compare_exchange(NOBODY, me, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if first && from == Side::Upstream && self.down.load(Ordering::Relaxed) == 0 {
            self.early.store(true, Ordering::Relaxed);
            self.upstream.lease().report(Outcome::EarlyEof);
        }
    }
}

/// Splices both ways between `client` and `upstream` (after passing on
/// `early_bytes`, what the client sent ahead) until both ends close,
/// an error, or `idle` without a byte either way. Reports
/// [`Outcome::EarlyEof`] for the source when the destination closed (or
/// reset) before sending a byte and before the client closed (at once, not
/// when the tunnel ends), and [`Outcome::Success`] when it sent something.
///
/// Both go through the lease, so they settle its health permit and replace
/// the connector's deferred "connected": reported through the pool
/// instead, an early EOF would be followed by that "connected" success when
/// the lease is released, resetting the source's run of failures, and a
/// destination that drops every tunnel from a source would never get the
/// source benched.
pub(crate) async fn run(
    client: TcpStream,
    early_bytes: Bytes,
    mut upstream: PooledStream,
    idle: Duration,
    metrics: Arc<EgressMetrics>,
) {
    let _open = metrics.tunnel_opened();
    let source = upstream.source();
    // What the client sent after its request, before the tunnel existed.
    if !early_bytes.is_empty() {
        if let Err(e) = upstream.write_all(&early_bytes).await {
            tracing::debug!(%source, error = %e, "tunnel ended with an error");
            return;
        }
        metrics.up(early_bytes.len());
    }
    let act = Activity::default();
    let meter = TunnelMeter {
        metrics: &metrics,
        upstream: &upstream,
        down: AtomicU64::new(0),
        first_end: AtomicU8::new(NOBODY),
        early: AtomicBool::new(false),
    };
    tokio::select! {
        r = relay::splice(&client, upstream.get_ref(), &act, &meter) => {
            if let Err(e) = r {
                tracing::debug!(%source, error = %e, "tunnel ended with an error");
            }
        }
        () = act.idle(idle) => {
            tracing::debug!(%source, ?idle, "tunnel idle; closing");
        }
    }
    if meter.down.load(Ordering::Relaxed) > 0 && !meter.early.load(Ordering::Relaxed) {
        upstream.lease().report(Outcome::Success);
    }
}
