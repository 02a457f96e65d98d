//! The L4 balancer end to end, on loopback with real sockets: strategies,
//! health (benching, probation, restoration), dial timeouts, retries,
//! half-close, idle timeout and shutdown.
//!
//! A "dead" upstream is a socket bound to a loopback port but not
//! listening: connecting to it is refused, and nobody else can take the
//! port, so it can come back on the same address by listening. A
//! "blackhole" is a listener with a backlog of 0 whose accept queue is
//! full: the kernel drops further SYNs and a connect hangs until the dial
//! timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway::l4::{
    L4Error, L4Metrics, L4Options, L4OptionsError, L4Proxy, Strategy, Upstream as Up,
};
use health::{BenchCause, HealthOptions, Outcome, State, Transition};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Bound on any single client exchange.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- upstreams

/// What a test upstream does with a connection.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Echoes until end of stream, then half-closes.
    Echo,
    /// Reads to end of stream, then sends everything back and closes.
    ReplyAfterEof,
    /// Sends `bye` and half-closes at once, then reads to end of stream and
    /// records how many bytes it got.
    HalfCloseFirst,
}

/// A test upstream server; stopped when dropped.
struct Server {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<usize>>>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start(mode: Mode) -> Server {
        Server::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), mode)
    }

    fn serve(listener: TcpListener, mode: Mode) -> Server {
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (a, r) = (accepts.clone(), received.clone());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((s, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                conns.spawn(handle(s, mode, r.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        Server {
            addr,
            accepts,
            received,
            task,
        }
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

async fn handle(mut s: TcpStream, mode: Mode, received: Arc<Mutex<Vec<usize>>>) {
    match mode {
        Mode::Echo => {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        }
        Mode::ReplyAfterEof => {
            let mut buf = Vec::new();
            if s.read_to_end(&mut buf).await.is_ok() {
                let _ = s.write_all(&buf).await;
                let _ = s.shutdown().await;
            }
        }
        Mode::HalfCloseFirst => {
            let _ = s.write_all(b"bye").await;
            let _ = s.shutdown().await;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            received.lock().unwrap().push(buf.len());
        }
    }
}

/// A loopback port bound but not listening: connects are refused.
struct Dead {
    sock: socket2::Socket,
    addr: SocketAddr,
}

impl Dead {
    fn new() -> Dead {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        Dead { sock, addr }
    }

    /// Starts listening on the same address.
    fn revive(self, mode: Mode) -> Server {
        self.sock.listen(128).unwrap();
        let l: std::net::TcpListener = self.sock.into();
        l.set_nonblocking(true).unwrap();
        Server::serve(TcpListener::from_std(l).unwrap(), mode)
    }
}

/// A listener whose accept queue is full: connects to it hang.
struct Blackhole {
    _sock: socket2::Socket,
    _fillers: Vec<TcpStream>,
    addr: SocketAddr,
}

impl Blackhole {
    async fn new() -> Blackhole {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        sock.listen(0).unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(100), TcpStream::connect(addr)).await
            {
                fillers.push(s);
            }
        }
        assert!(!fillers.is_empty(), "the accept queue takes one connection");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr))
                .await
                .is_err(),
            "a connect to a full accept queue hangs"
        );
        Blackhole {
            _sock: sock,
            _fillers: fillers,
            addr,
        }
    }
}

// -------------------------------------------------------------------- proxy

/// A running L4 proxy; stopped (and awaited) by [`Running::stop`].
struct Running {
    addr: SocketAddr,
    metrics: Arc<L4Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    async fn start(opts: L4Options) -> Running {
        let proxy = L4Proxy::bind("127.0.0.1:0".parse().unwrap(), opts)
            .await
            .expect("bind");
        let addr = proxy.local_addr().unwrap();
        let metrics = proxy.metrics();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(proxy.serve(async {
            let _ = stopped.await;
        }));
        Running {
            addr,
            metrics,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("proxy stops within its drain timeout")
            .expect("proxy task");
    }

    fn up(&self, addr: SocketAddr) -> gateway::l4::UpstreamMetrics {
        *self.metrics.snapshot().upstream(addr).expect("an upstream")
    }
}

type Seen = Arc<Mutex<Vec<(SocketAddr, Transition)>>>;

/// Options over `ups` with `strategy`, health benching on `failures`
/// consecutive failures for `cooldown`, at most `cap` % benched; records
/// transitions in `seen`.
fn options(
    ups: impl IntoIterator<Item = SocketAddr>,
    strategy: Strategy,
    failures: u32,
    cooldown: Duration,
    cap: u8,
    seen: &Seen,
) -> L4Options {
    let sink = seen.clone();
    L4Options {
        strategy,
        health: HealthOptions {
            strategy: health::Strategy::Consecutive {
                consecutive_failures: failures,
            },
            cooldown,
            max_cooldown: cooldown * 8,
            max_benched_percent: cap,
            ..HealthOptions::default()
        },
        transitions: Some(Arc::new(move |a, t| sink.lock().unwrap().push((a, t)))),
        ..L4Options::new(ups)
    }
}

// ------------------------------------------------------------------ clients

/// Connects through the proxy, sends `msg`, reads the echo; the open stream.
async fn roundtrip(proxy: SocketAddr, msg: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(proxy)
        .await
        .expect("connect to the proxy");
    let fut = async {
        s.write_all(msg).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.expect("echo");
        assert_eq!(back, msg, "echoed intact");
    };
    tokio::time::timeout(IO_TIMEOUT, fut)
        .await
        .expect("echo in time");
    s
}

/// One echoed exchange, then close.
async fn exchange(proxy: SocketAddr, i: usize) {
    drop(roundtrip(proxy, format!("hello {i}").as_bytes()).await);
}

/// Connects and waits for the proxy to close the connection; how long it
/// took.
async fn closed_by_proxy(proxy: SocketAddr) -> Duration {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(proxy)
        .await
        .expect("connect to the proxy");
    let mut buf = [0u8; 16];
    match tokio::time::timeout(IO_TIMEOUT, s.read(&mut buf))
        .await
        .expect("closed in time")
    {
        Ok(0) => {}
        Ok(n) => panic!("got {n} bytes from a connection that should be closed"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    t0.elapsed()
}

/// Polls `f` every 10 ms for up to 5 s.
async fn until(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < IO_TIMEOUT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Which upstream's `active` gauge went up by one between two snapshots.
fn grew(before: &[u64], after: &[u64]) -> usize {
    let changed: Vec<usize> = (0..before.len())
        .filter(|i| after[*i] != before[*i])
        .collect();
    assert_eq!(changed.len(), 1, "{before:?} -> {after:?}");
    assert_eq!(after[changed[0]], before[changed[0]] + 1);
    changed[0]
}

fn actives(m: &L4Metrics) -> Vec<u64> {
    m.snapshot().upstreams.iter().map(|u| u.active).collect()
}

// -------------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly_and_by_weight() {
    let servers = [
        Server::start(Mode::Echo).await,
        Server::start(Mode::Echo).await,
        Server::start(Mode::Echo).await,
    ];
    let seen = Seen::default();
    let proxy = Running::start(options(
        servers.iter().map(|s| s.addr),
        Strategy::RoundRobin,
        3,
        Duration::from_secs(60),
        50,
        &seen,
    ))
    .await;
    let mut sent = 0;
    for i in 0..30 {
        exchange(proxy.addr, i).await;
        sent += format!("hello {i}").len() as u64;
    }
    assert_eq!(servers.each_ref().map(Server::accepts), [10, 10, 10]);
    until("every connection closed", || {
        proxy.metrics.snapshot().active == 0
    })
    .await;
    let m = proxy.metrics.snapshot();
    assert_eq!(
        (m.accepted_total, m.forwarded_total, m.retries_total),
        (30, 30, 0)
    );
    assert_eq!((m.bytes_up_total, m.bytes_down_total), (sent, sent));
    for (u, s) in m.upstreams.iter().zip(&servers) {
        assert_eq!(u.addr, s.addr);
        assert_eq!((u.dials_total, u.forwarded_total, u.active), (10, 10, 0));
        assert_eq!(u.state, State::Available);
    }
    assert_eq!(
        m.upstreams.iter().map(|u| u.bytes_up_total).sum::<u64>(),
        sent
    );
    assert!(seen.lock().unwrap().is_empty());
    proxy.stop().await;

    // Weights 3 and 1: three connections out of four to the first.
    let mut opts = L4Options::new([
        Up::new(servers[0].addr).with_weight(3),
        Up::new(servers[1].addr),
    ]);
    opts.strategy = Strategy::RoundRobin;
    let proxy = Running::start(opts).await;
    for i in 0..8 {
        exchange(proxy.addr, i).await;
    }
    assert_eq!(
        servers.each_ref().map(Server::accepts),
        [10 + 6, 10 + 2, 10]
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_prefers_the_idle_upstreams() {
    let servers = [
        Server::start(Mode::Echo).await,
        Server::start(Mode::Echo).await,
        Server::start(Mode::Echo).await,
    ];
    let mut opts = L4Options::new(servers.iter().map(|s| s.addr));
    opts.strategy = Strategy::LeastConnections;
    let proxy = Running::start(opts).await;
    // Six long connections, two per upstream; note where each went.
    let mut held: Vec<(usize, TcpStream)> = Vec::new();
    for i in 0..6 {
        let before = actives(&proxy.metrics);
        let s = roundtrip(proxy.addr, format!("long {i}").as_bytes()).await;
        held.push((grew(&before, &actives(&proxy.metrics)), s));
    }
    assert_eq!(actives(&proxy.metrics), [2, 2, 2]);
    // Close those on upstreams 1 and 2: upstream 0 holds two, the others
    // none.
    held.retain(|(i, _)| *i == 0);
    until("upstreams 1 and 2 idle", || {
        actives(&proxy.metrics) == [2, 0, 0]
    })
    .await;
    // New connections go to the idle ones until they hold as many.
    let mut placed = Vec::new();
    for i in 0..4 {
        let before = actives(&proxy.metrics);
        let s = roundtrip(proxy.addr, format!("new {i}").as_bytes()).await;
        let at = grew(&before, &actives(&proxy.metrics));
        placed.push(at);
        held.push((at, s));
    }
    placed.sort_unstable();
    assert_eq!(placed, [1, 1, 2, 2], "never the busy upstream 0");
    assert_eq!(actives(&proxy.metrics), [2, 2, 2]);
    assert_eq!(servers.each_ref().map(Server::accepts), [2, 4, 4]);
    drop(held);
    until("all closed", || proxy.metrics.snapshot().active == 0).await;
    assert_eq!(actives(&proxy.metrics), [0, 0, 0]);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_hits_every_upstream() {
    let servers = [
        Server::start(Mode::Echo).await,
        Server::start(Mode::Echo).await,
        Server::start(Mode::Echo).await,
    ];
    let mut opts = L4Options::new(servers.iter().map(|s| s.addr));
    opts.strategy = Strategy::Random;
    let proxy = Running::start(opts).await;
    for i in 0..90 {
        exchange(proxy.addr, i).await;
    }
    let got = servers.each_ref().map(Server::accepts);
    assert_eq!(got.iter().sum::<usize>(), 90);
    // Each expects 30; any below 10 has a probability below 1e-6.
    assert!(got.iter().all(|n| *n >= 10), "{got:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_is_benched_probed_and_restored() {
    let a = Server::start(Mode::Echo).await;
    let b = Server::start(Mode::Echo).await;
    let dead = Dead::new();
    let d = dead.addr;
    assert_eq!(
        TcpStream::connect(d).await.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    let seen = Seen::default();
    let cooldown = Duration::from_millis(600);
    let proxy = Running::start(options(
        [a.addr, b.addr, d],
        Strategy::RoundRobin,
        2,
        cooldown,
        50,
        &seen,
    ))
    .await;

    // Round robin reaches the dead one every third connection; each of
    // those is retried on a live one. The second failure benches it.
    for i in 0..6 {
        exchange(proxy.addr, i).await;
    }
    let m = proxy.up(d);
    assert_eq!(
        (m.dials_total, m.connect_failures_total, m.forwarded_total),
        (2, 2, 0)
    );
    assert!(matches!(m.state, State::Benched { .. }), "{m:?}");
    assert_eq!(a.accepts() + b.accepts(), 6);
    assert_eq!(
        seen.lock().unwrap().clone(),
        [(
            d,
            Transition::Benched {
                cause: BenchCause::ConsecutiveFailures(2),
                cooldown
            }
        )]
    );
    let snap = proxy.metrics.snapshot();
    assert_eq!(
        (
            snap.retries_total,
            snap.failed_total,
            snap.no_upstream_total
        ),
        (2, 0, 0)
    );
    assert_eq!(snap.health.benched, 1);
    let h = proxy.metrics.health(10);
    let dh = h.upstreams.iter().find(|k| k.key == d).unwrap();
    assert_eq!(dh.counters.failures, 2);
    assert!(
        dh.recent.iter().all(|e| e.observation.outcome
            == Outcome::ConnectError(std::io::ErrorKind::ConnectionRefused)
            && e.observation.latency.is_some()),
        "{:?}",
        dh.recent
    );

    // While benched it is never dialled.
    let benched_once = || {
        let h = proxy.metrics.health(0);
        let dh = h.upstreams.iter().find(|k| k.key == d).unwrap().clone();
        matches!(dh.state, State::Benched { .. }) && dh.counters.benched == 1
    };
    let mut inside = 0;
    for i in 0..12 {
        exchange(proxy.addr, 100 + i).await;
        if !benched_once() {
            break;
        }
        inside += 1;
        assert_eq!(proxy.up(d).dials_total, 2, "a benched upstream was dialled");
    }
    assert!(inside >= 4, "only {inside} connections inside the cooldown");
    assert_eq!(a.accepts() + b.accepts(), 6 + inside);

    // After the cooldown, one probe; still dead: benched again, for twice
    // as long. The client does not notice.
    until("probation", || {
        proxy.metrics.state(d) == Some(State::Probation)
    })
    .await;
    let mut n = 0;
    while proxy.up(d).dials_total < 3 {
        exchange(proxy.addr, 200 + n).await;
        n += 1;
        assert!(n <= 3, "the upstream on probation was not probed");
    }
    assert!(matches!(
        proxy.metrics.state(d),
        Some(State::Benched { cooldown: c, .. }) if c == 2 * cooldown
    ));
    assert_eq!(
        seen.lock().unwrap().get(1).copied(),
        Some((
            d,
            Transition::Benched {
                cause: BenchCause::ProbationFailure,
                cooldown: 2 * cooldown
            }
        ))
    );

    // It comes back: the next probe restores it, and it takes its share.
    let d_server = dead.revive(Mode::Echo);
    until("probation again", || {
        proxy.metrics.state(d) == Some(State::Probation)
    })
    .await;
    let mut n = 0;
    while d_server.accepts() == 0 {
        exchange(proxy.addr, 300 + n).await;
        n += 1;
        assert!(n <= 3, "the upstream on probation was not probed");
    }
    assert_eq!(proxy.metrics.state(d), Some(State::Available));
    assert_eq!(
        seen.lock().unwrap().last().copied(),
        Some((d, Transition::Restored))
    );
    for i in 0..9 {
        exchange(proxy.addr, 400 + i).await;
    }
    assert!(d_server.accepts() >= 3, "{}", d_server.accepts());
    let snap = proxy.metrics.snapshot();
    assert_eq!((snap.failed_total, snap.no_upstream_total), (0, 0));
    assert_eq!(
        (snap.health.counters.benched, snap.health.counters.restored),
        (2, 1)
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_timeout_fires_and_the_client_closes_or_moves_on() {
    let hole = Blackhole::new().await;
    let dial_timeout = Duration::from_millis(300);

    // The only upstream hangs, no retry: the client is closed after the
    // dial timeout.
    let mut opts = L4Options::new([hole.addr]);
    opts.dial_timeout = dial_timeout;
    opts.retries = 0;
    let proxy = Running::start(opts).await;
    let took = closed_by_proxy(proxy.addr).await;
    assert!(took >= dial_timeout, "{took:?}");
    assert!(took < dial_timeout + Duration::from_secs(2), "{took:?}");
    until("the timeout counted", || {
        proxy.metrics.snapshot().failed_total == 1
    })
    .await;
    let m = proxy.up(hole.addr);
    assert_eq!(
        (m.dials_total, m.timeouts_total, m.connect_failures_total),
        (1, 1, 0)
    );
    let h = proxy.metrics.health(5);
    assert_eq!(
        h.upstreams[0].recent.last().map(|e| e.observation.outcome),
        Some(Outcome::Timeout)
    );
    assert_eq!(h.upstreams[0].consecutive_failures, 1);
    proxy.stop().await;

    // With a live upstream next to it: the client is served after one
    // timed-out dial, the upstream benched (one failure is enough here).
    let live = Server::start(Mode::Echo).await;
    let seen = Seen::default();
    let mut opts = options(
        [hole.addr, live.addr],
        Strategy::RoundRobin,
        1,
        Duration::from_secs(60),
        50,
        &seen,
    );
    opts.dial_timeout = dial_timeout;
    let proxy = Running::start(opts).await;
    let t0 = Instant::now();
    exchange(proxy.addr, 0).await;
    assert!(t0.elapsed() >= dial_timeout);
    let t0 = Instant::now();
    for i in 1..5 {
        exchange(proxy.addr, i).await;
    }
    assert!(
        t0.elapsed() < dial_timeout,
        "no further dial to the benched upstream: {:?}",
        t0.elapsed()
    );
    assert_eq!(live.accepts(), 5);
    let m = proxy.up(hole.addr);
    assert_eq!((m.dials_total, m.timeouts_total), (1, 1));
    assert_eq!(
        seen.lock().unwrap().clone(),
        [(
            hole.addr,
            Transition::Benched {
                cause: BenchCause::ConsecutiveFailures(1),
                cooldown: Duration::from_secs(60)
            }
        )]
    );
    assert_eq!(proxy.metrics.snapshot().retries_total, 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probation_allows_one_probe_in_flight() {
    let hole = Blackhole::new().await;
    let live = Server::start(Mode::Echo).await;
    let seen = Seen::default();
    let cooldown = Duration::from_millis(300);
    let dial_timeout = Duration::from_millis(500);
    let mut opts = options(
        [hole.addr, live.addr],
        Strategy::RoundRobin,
        1,
        cooldown,
        50,
        &seen,
    );
    opts.dial_timeout = dial_timeout;
    opts.retries = 1;
    let proxy = Running::start(opts).await;
    exchange(proxy.addr, 0).await;
    assert!(matches!(
        proxy.metrics.state(hole.addr),
        Some(State::Benched { .. })
    ));
    until("probation", || {
        proxy.metrics.state(hole.addr) == Some(State::Probation)
    })
    .await;
    // Five clients at once: one of them probes the hanging upstream (and is
    // served after its timeout), the others go to the live one at once.
    let mut clients = JoinSet::new();
    for i in 0..5 {
        let addr = proxy.addr;
        clients.spawn(async move {
            let t0 = Instant::now();
            exchange(addr, 10 + i).await;
            t0.elapsed()
        });
    }
    let took: Vec<Duration> = clients.join_all().await;
    let slow = took.iter().filter(|t| **t >= dial_timeout).count();
    assert_eq!(slow, 1, "exactly one probe: {took:?}");
    let m = proxy.up(hole.addr);
    assert_eq!((m.dials_total, m.timeouts_total), (2, 2));
    assert_eq!(live.accepts(), 6);
    assert_eq!(
        seen.lock().unwrap().get(1).copied(),
        Some((
            hole.addr,
            Transition::Benched {
                cause: BenchCause::ProbationFailure,
                cooldown: 2 * cooldown
            }
        ))
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_upstreams_dead_closes_clients_at_once() {
    let (d1, d2) = (Dead::new(), Dead::new());
    let seen = Seen::default();
    let proxy = Running::start(options(
        [d1.addr, d2.addr],
        Strategy::RoundRobin,
        1,
        Duration::from_secs(60),
        100,
        &seen,
    ))
    .await;
    // The first client costs a dial to each (both benched), then is closed.
    closed_by_proxy(proxy.addr).await;
    until("counted", || proxy.metrics.snapshot().failed_total == 1).await;
    let m = proxy.metrics.snapshot();
    assert_eq!(m.no_upstream_total, 0);
    assert_eq!((m.health.benched, m.retries_total), (2, 1));
    // The next ones are closed without any dial.
    for _ in 0..3 {
        let took = closed_by_proxy(proxy.addr).await;
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
    until("counted", || {
        proxy.metrics.snapshot().no_upstream_total == 3
    })
    .await;
    let m = proxy.metrics.snapshot();
    assert_eq!(
        (m.accepted_total, m.failed_total, m.forwarded_total),
        (4, 1, 0)
    );
    assert!(m.upstreams.iter().all(|u| u.dials_total == 1), "{m:?}");
    assert_eq!(seen.lock().unwrap().len(), 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_pass_intact_with_half_close_both_ways() {
    let pattern = |n: usize| -> Vec<u8> { (0..n).map(|i| (i % 251) as u8).collect() };

    // The client sends 1 MiB and half-closes; the upstream answers only
    // after it saw the end of stream; the client still reads it all.
    let after_eof = Server::start(Mode::ReplyAfterEof).await;
    let proxy = Running::start(L4Options::new([after_eof.addr])).await;
    let data = pattern(1 << 20);
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let back = tokio::time::timeout(IO_TIMEOUT, async {
        s.write_all(&data).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        back
    })
    .await
    .expect("in time");
    assert!(back == data, "{} bytes back, not the same", back.len());
    until("closed", || proxy.metrics.snapshot().active == 0).await;
    let m = proxy.up(after_eof.addr);
    assert_eq!((m.bytes_up_total, m.bytes_down_total), (1 << 20, 1 << 20));
    proxy.stop().await;

    // The upstream half-closes first; the client still sends, and the
    // upstream gets it all.
    let first = Server::start(Mode::HalfCloseFirst).await;
    let proxy = Running::start(L4Options::new([first.addr])).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let data = pattern(100 * 1024);
    tokio::time::timeout(IO_TIMEOUT, async {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        s.write_all(&data).await.unwrap();
        s.shutdown().await.unwrap();
    })
    .await
    .expect("in time");
    until("the upstream read to the end", || {
        !first.received.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(*first.received.lock().unwrap(), [100 * 1024]);
    until("closed", || proxy.metrics.snapshot().active == 0).await;
    let m = proxy.up(first.addr);
    assert_eq!((m.bytes_up_total, m.bytes_down_total), (100 * 1024, 3));
    proxy.stop().await;

    // Both ways at once through an echo: 4 MiB written while reading.
    let echo = Server::start(Mode::Echo).await;
    let proxy = Running::start(L4Options::new([echo.addr])).await;
    let s = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let data = pattern(4 << 20);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(10_000) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut back))
        .await
        .expect("in time")
        .unwrap();
    writer.await.unwrap();
    assert!(back == data, "{} bytes back, not the same", back.len());
    until("closed", || proxy.metrics.snapshot().active == 0).await;
    let m = proxy.metrics.snapshot();
    assert_eq!((m.bytes_up_total, m.bytes_down_total), (4 << 20, 4 << 20));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let echo = Server::start(Mode::Echo).await;
    let mut opts = L4Options::new([echo.addr]);
    opts.idle_timeout = Duration::from_millis(300);
    let proxy = Running::start(opts).await;
    let mut s = roundtrip(proxy.addr, b"ping").await;
    let t0 = Instant::now();
    // Activity resets the timer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(b"pong").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    let mut rest = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut rest))
        .await
        .expect("closed by the idle timeout")
        .unwrap();
    assert!(rest.is_empty());
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(450), "{took:?}");
    assert_eq!(proxy.metrics.snapshot().active, 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_drains() {
    let echo = Server::start(Mode::Echo).await;
    let mut opts = L4Options::new([echo.addr]);
    opts.drain_timeout = Duration::from_secs(5);
    let proxy = Running::start(opts).await;
    let mut s = roundtrip(proxy.addr, b"before").await;
    let (addr, metrics) = (proxy.addr, proxy.metrics.clone());
    let stopping = tokio::spawn(proxy.stop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        TcpStream::connect(addr).await.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused,
        "no longer accepting"
    );
    // The open connection keeps working ...
    s.write_all(b"during").await.unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"during");
    assert!(!stopping.is_finished(), "serve waits for open connections");
    // ... and serve returns once it ends.
    drop(s);
    tokio::time::timeout(Duration::from_secs(2), stopping)
        .await
        .expect("stopped once drained")
        .unwrap();
    assert_eq!(metrics.snapshot().active, 0);

    // A connection still open at the drain deadline is closed.
    let mut opts = L4Options::new([echo.addr]);
    opts.drain_timeout = Duration::from_millis(300);
    let proxy = Running::start(opts).await;
    let mut s = roundtrip(proxy.addr, b"held").await;
    let t0 = Instant::now();
    proxy.stop().await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let mut rest = Vec::new();
    let r = tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut rest))
        .await
        .expect("closed by the drain");
    assert!(r.is_err() || rest.is_empty(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_options_are_refused_at_bind() {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let none: [SocketAddr; 0] = [];
    let e = L4Proxy::bind(any, L4Options::new(none)).await.unwrap_err();
    assert!(
        matches!(e, L4Error::Options(L4OptionsError::NoUpstreams)),
        "{e}"
    );
    let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut opts = L4Options::new([up]);
    opts.dial_timeout = Duration::ZERO;
    let e = L4Proxy::bind(any, opts).await.unwrap_err();
    assert!(e.to_string().contains("dial_timeout"), "{e}");
    // A port in use.
    let taken = TcpListener::bind(any).await.unwrap();
    let e = L4Proxy::bind(taken.local_addr().unwrap(), L4Options::new([up]))
        .await
        .unwrap_err();
    assert!(matches!(e, L4Error::Bind { .. }), "{e}");
}
