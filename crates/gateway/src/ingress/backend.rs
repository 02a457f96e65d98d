//! The run-time state of one backend: in-flight count, latency EWMA,
//! health flags, idle upstream connections, counters. Shared by every
//! snapshot of the route table that lists the backend.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::backend_tls::BackendTls;
use super::h1::RawUpstream;
use super::upstream::Upstream;

/// The decay time of the latency EWMA (Finagle's peak EWMA uses 10 s).
const EWMA_TAU_NS: f64 = 10e9;
/// The cost of a backend with requests in flight but no latency sample
/// yet, so that a new backend is not flooded before its first answer.
const EWMA_PENALTY_NS: f64 = 1e9;

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since a process-wide base instant.
pub(crate) fn nanos() -> u64 {
    u64::try_from(base().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

struct Idle {
    up: Box<Upstream>,
    since: Instant,
}

/// An idle connection of the HTTP/1.1 fast path.
struct IdleRaw {
    up: RawUpstream,
    since: Instant,
}

/// Streams a shared HTTP/2 backend connection carries before another one
/// is opened (the usual server limit, `SETTINGS_MAX_CONCURRENT_STREAMS`;
/// hyper queues what the server's own limit does not take).
pub(crate) const H2_STREAMS: usize = 100;

/// The sending half of a shared HTTP/2 backend connection.
pub(crate) type H2Sender = hyper::client::conn::http2::SendRequest<super::body::UpBody>;

/// A shared HTTP/2 connection and its open streams.
struct H2Conn {
    sender: H2Sender,
    streams: Arc<AtomicUsize>,
}

/// A stream's place on a shared HTTP/2 connection, until dropped (its
/// response ended, or failed).
pub(crate) struct H2Stream(Arc<AtomicUsize>);

impl H2Stream {
    fn new(streams: &Arc<AtomicUsize>) -> H2Stream {
        streams.fetch_add(1, Ordering::AcqRel);
        H2Stream(Arc::clone(streams))
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Consecutive results of active health checks.
#[derive(Debug, Default)]
pub(crate) struct CheckRun {
    /// When the next check is due (`None`: at once).
    pub(crate) next: Option<tokio::time::Instant>,
    /// A check is running.
    pub(crate) running: bool,
    pub(crate) ok: u32,
    pub(crate) failed: u32,
}

/// Counters of one backend (monotonic).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) requests: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) connect_errors: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) connections: AtomicU64,
    pub(crate) checks: AtomicU64,
    pub(crate) checks_failed: AtomicU64,
}

/// One backend at one address.
pub(crate) struct BackendRt {
    pub(crate) id: Arc<str>,
    pub(crate) addr: SocketAddr,
    /// Its route's TLS to backends (fixed: a change makes a new one).
    pub(crate) tls: Option<BackendTls>,
    /// Its route speaks HTTP/2 to backends (fixed, as `tls`).
    pub(crate) http2: bool,
    /// The HTTP/2 connections its requests share (each runs as a task of
    /// its own), with their streams open.
    h2: Mutex<Vec<H2Conn>>,
    /// Held while an HTTP/2 connection is being opened: requests arriving
    /// meanwhile wait for it rather than open one each.
    pub(crate) h2_opening: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    /// Requests sent to it and not finished (response body included), and
    /// open WebSocket tunnels.
    in_flight: AtomicU64,
    /// Passive health: available with no failure run, so a request needs
    /// no health permit (the lock-free fast path).
    pub(crate) clean: AtomicBool,
    /// Active health checks say it is up (ignored by routes without
    /// checks).
    pub(crate) check_up: AtomicBool,
    pub(crate) check: Mutex<CheckRun>,
    /// Draining: no new requests.
    pub(crate) draining: AtomicBool,
    drained: Notify,
    /// `true` once removed: its connections and tunnels are closed.
    pub(crate) kill: watch::Sender<bool>,
    /// Replaced by a backend with other connection settings: what is in
    /// flight finishes, nothing goes back to its pools.
    retired: AtomicBool,
    /// Peak EWMA of the response latency, in ns (`f64` bits; 0: none).
    ewma: AtomicU64,
    ewma_at: AtomicU64,
    idle: Mutex<Vec<Idle>>,
    /// Idle connections of the HTTP/1.1 fast path (`h1.rs`), most
    /// recently used last.
    raw_idle: Mutex<Vec<IdleRaw>>,
    /// Sockets of the connections driven by requests (registered while
    /// open), shut down when the backend is removed.
    sockets: Mutex<HashMap<u64, RawFd>>,
    next_socket: AtomicU64,
    pub(crate) stats: Stats,
}

impl std::fmt::Debug for BackendRt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendRt")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl BackendRt {
    pub(crate) fn new(
        id: Arc<str>,
        addr: SocketAddr,
        clean: bool,
        tls: Option<BackendTls>,
        http2: bool,
    ) -> BackendRt {
        BackendRt {
            id,
            addr,
            tls,
            http2,
            h2: Mutex::new(Vec::new()),
            h2_opening: tokio::sync::Mutex::new(None),
            in_flight: AtomicU64::new(0),
            clean: AtomicBool::new(clean),
            check_up: AtomicBool::new(true),
            check: Mutex::new(CheckRun::default()),
            draining: AtomicBool::new(false),
            drained: Notify::new(),
            kill: watch::Sender::new(false),
            retired: AtomicBool::new(false),
            ewma: AtomicU64::new(0),
            ewma_at: AtomicU64::new(0),
            idle: Mutex::new(Vec::new()),
            raw_idle: Mutex::new(Vec::new()),
            sockets: Mutex::new(HashMap::new()),
            next_socket: AtomicU64::new(0),
            stats: Stats::default(),
        }
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn idle_lock(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used idle connection younger than `ttl` and not
    /// known to be closed.
    pub(crate) fn take_idle(&self, ttl: Duration) -> Option<Box<Upstream>> {
        let mut idle = self.idle_lock();
        while let Some(i) = idle.pop() {
            if !i.up.is_done() && i.since.elapsed() < ttl {
                return Some(i.up);
            }
        }
        None
    }

    /// Keeps a connection whose exchange is complete, if there is room
    /// and the backend is still in service.
    pub(crate) fn put_idle(&self, up: Box<Upstream>, max: usize) {
        if max == 0 || up.is_done() || self.closing() {
            return;
        }
        let since = Instant::now();
        let mut idle = self.idle_lock();
        // Again under the lock: `retire` and `kill` set their flag before
        // they empty the pool, so nothing lands in it after (a pooled
        // connection holds its backend: it would never be freed).
        if idle.len() < max && !self.closing() {
            idle.push(Idle { up, since });
        }
    }

    fn raw_lock(&self) -> MutexGuard<'_, Vec<IdleRaw>> {
        self.raw_idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used idle fast-path connection younger than
    /// `ttl` at `now`.
    pub(crate) fn take_raw(&self, ttl: Duration, now: Instant) -> Option<RawUpstream> {
        let mut idle = self.raw_lock();
        while let Some(i) = idle.pop() {
            if now.saturating_duration_since(i.since) < ttl {
                return Some(i.up);
            }
        }
        None
    }

    /// Keeps a fast-path connection idle since `now` whose exchange is
    /// complete, if there is room and the backend is in service.
    pub(crate) fn put_raw(&self, up: RawUpstream, max: usize, now: Instant) {
        if max == 0 || self.closing() {
            return;
        }
        let mut idle = self.raw_lock();
        // Again under the lock, as in `put_idle`.
        if idle.len() < max && !self.closing() {
            idle.push(IdleRaw { up, since: now });
        }
    }

    /// Drops idle connections older than `ttl`.
    pub(crate) fn sweep_idle(&self, ttl: Duration) {
        let expired: Vec<Idle> = {
            let mut idle = self.idle_lock();
            let (keep, old): (Vec<Idle>, Vec<Idle>) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|i| !i.up.is_done() && i.since.elapsed() < ttl);
            *idle = keep;
            old
        };
        drop(expired);
        let expired: Vec<IdleRaw> = {
            let mut idle = self.raw_lock();
            let (keep, old): (Vec<IdleRaw>, Vec<IdleRaw>) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|i| i.since.elapsed() < ttl);
            *idle = keep;
            old
        };
        drop(expired);
    }

    pub(crate) fn idle_count(&self) -> usize {
        self.idle_lock().len() + self.raw_lock().len()
    }

    /// Drops every idle connection.
    pub(crate) fn clear_idle(&self) {
        // The shared HTTP/2 connection ends once its streams are done.
        let h2 = std::mem::take(&mut *self.h2.lock().unwrap_or_else(PoisonError::into_inner));
        drop(h2);
        let old = std::mem::take(&mut *self.idle_lock());
        drop(old);
        let old = std::mem::take(&mut *self.raw_lock());
        drop(old);
    }

    fn sockets(&self) -> MutexGuard<'_, HashMap<u64, RawFd>> {
        self.sockets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn register_socket(&self, fd: RawFd) -> u64 {
        let id = self.next_socket.fetch_add(1, Ordering::Relaxed);
        self.sockets().insert(id, fd);
        id
    }

    pub(crate) fn deregister_socket(&self, id: u64) {
        self.sockets().remove(&id);
    }

    /// A shared HTTP/2 connection with room for one more stream, and that
    /// stream's place ([`H2_STREAMS`] per connection: past that, the
    /// caller opens another connection rather than queue in it).
    pub(crate) fn h2_sender(&self) -> Option<(H2Sender, H2Stream)> {
        let mut conns = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        conns.retain(|c| !c.sender.is_closed());
        conns
            .iter()
            .find(|c| c.streams.load(Ordering::Acquire) < H2_STREAMS)
            .map(|c| (c.sender.clone(), H2Stream::new(&c.streams)))
    }

    /// Shares `sender` (a new HTTP/2 connection) with the next requests,
    /// unless the backend is closing; the place of the stream its opener
    /// sends.
    pub(crate) fn set_h2(&self, sender: H2Sender) -> H2Stream {
        let streams = Arc::new(AtomicUsize::new(0));
        let first = H2Stream::new(&streams);
        let mut conns = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.closing() {
            conns.push(H2Conn { sender, streams });
        }
        first
    }

    /// Killed or retired: connections are not kept.
    fn closing(&self) -> bool {
        *self.kill.borrow() || self.retired.load(Ordering::Acquire)
    }

    /// Out of the table for a successor with other connection settings
    /// (TLS): requests and tunnels in flight finish on their connections;
    /// idle ones close, and none is kept from now on.
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.clear_idle();
    }

    /// Closes every connection and tunnel to the backend (removed).
    pub(crate) fn kill(&self) {
        // The signal under the sockets lock, then the shutdowns: a request
        // woken by a shutdown sees the backend removed (not failing), and
        // no connection can deregister in between.
        {
            let sockets = self.sockets();
            self.kill.send_replace(true);
            for &fd in sockets.values() {
                // SAFETY: a socket is deregistered, under this lock, before
                // it is closed, so every registered descriptor is still
                // open and still this connection's. shutdown(2) only ends
                // the connection; the owner closes the descriptor.
                unsafe {
                    libc::shutdown(fd, libc::SHUT_RDWR);
                }
            }
        }
        self.clear_idle();
    }

    /// Resolves once the backend is removed.
    pub(crate) fn killed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.kill.subscribe();
        async move {
            let _ = rx.wait_for(|k| *k).await;
        }
    }

    /// Stops draining (added again), waking a drain in progress.
    pub(crate) fn undrain(&self) {
        self.draining.store(false, Ordering::Release);
        self.drained.notify_waiters();
    }

    /// Waits until nothing is in flight, the drain is cancelled, or
    /// `deadline`. Whether nothing is in flight.
    pub(crate) async fn wait_idle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 || !self.draining.load(Ordering::Acquire) {
                return self.in_flight() == 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.in_flight() == 0;
            }
        }
    }

    /// Records a response latency (peak EWMA: a slower sample is taken at
    /// once, faster ones decay in over `EWMA_TAU`).
    pub(crate) fn observe_latency(&self, rtt: Duration) {
        let now = nanos();
        let sample = rtt.as_nanos() as f64;
        let prev = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        let at = self.ewma_at.swap(now, Ordering::Relaxed);
        let next = if prev == 0.0 || sample > prev {
            sample
        } else {
            let w = (-(now.saturating_sub(at) as f64) / EWMA_TAU_NS).exp();
            prev * w + sample * (1.0 - w)
        };
        self.ewma.store(next.max(1.0).to_bits(), Ordering::Relaxed);
    }

    /// The latency EWMA, if any sample was seen.
    pub(crate) fn ewma(&self) -> Option<Duration> {
        let e = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        (e > 0.0).then(|| Duration::from_nanos(e as u64))
    }

    /// The p2c cost at `now`: the EWMA decayed since its last sample,
    /// times (requests in flight + 1), over the weight.
    pub(crate) fn cost(&self, now: u64, weight: u32) -> f64 {
        let e = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        let pending = self.in_flight() as f64;
        let w = f64::from(weight.max(1));
        if e == 0.0 {
            return pending * EWMA_PENALTY_NS / w;
        }
        let at = self.ewma_at.load(Ordering::Relaxed);
        let decayed = e * (-(now.saturating_sub(at) as f64) / EWMA_TAU_NS).exp();
        decayed * (pending + 1.0) / w
    }
}

/// Counts one request (or tunnel) in its backend's in-flight count until
/// dropped; wakes a drain when the count reaches zero.
pub(crate) struct InFlight(Arc<BackendRt>);

impl InFlight {
    pub(crate) fn new(b: &Arc<BackendRt>) -> InFlight {
        b.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(b.clone())
    }

    pub(crate) fn backend(&self) -> &Arc<BackendRt> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1
            && self.0.draining.load(Ordering::Acquire)
        {
            self.0.drained.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ewma_peaks_then_decays() {
        let b = BackendRt::new(
            "a".into(),
            "127.0.0.1:1".parse().unwrap(),
            true,
            None,
            false,
        );
        assert_eq!(b.ewma(), None);
        assert_eq!(b.cost(nanos(), 1), 0.0);
        b.observe_latency(Duration::from_millis(10));
        assert_eq!(b.ewma(), Some(Duration::from_millis(10)));
        b.observe_latency(Duration::from_millis(50));
        assert_eq!(b.ewma(), Some(Duration::from_millis(50)));
        // A fast sample right away barely moves it.
        b.observe_latency(Duration::from_millis(1));
        assert!(b.ewma().unwrap() > Duration::from_millis(45));
        // The cost decays with time since the last sample.
        let now = nanos();
        assert!(b.cost(now + 10_000_000_000, 1) < b.cost(now, 1) / 2.0);
        // In-flight requests raise it; weight lowers it.
        let g = InFlight::new(&Arc::new(BackendRt::new(
            "b".into(),
            "127.0.0.1:1".parse().unwrap(),
            true,
            None,
            false,
        )));
        assert!(g.backend().cost(now, 1) > 0.0);
    }
}
