//! Per-address health through the egress proxy, end to end on loopback: a
//! destination that answers 429 to some source addresses gets exactly
//! those benched; they are not leased while benched, probed after their
//! cooldown, benched again while the destination still refuses them, and
//! restored once it serves them again.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use addrpool::health::{self, BenchCause, HealthOptions, State, Transition};
use addrpool::{Assigner, Pool, PoolOptions, Strategy};
use gateway::egress::EgressOptions;
use http_body_util::Full;
use hyper::body::Bytes;
use support::{Resp, Running, get};
use tokio::task::JoinHandle;
use tokio::time::Instant;

fn v4(d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, d))
}

type Blocked = Arc<Mutex<HashSet<IpAddr>>>;

/// An HTTP/1.1 destination (keep-alive) that answers 429 to the sources in
/// `blocked` and 200 to the others, with the source in the body; records
/// the source of every request.
struct Destination {
    addr: SocketAddr,
    blocked: Blocked,
    requests: Arc<Mutex<Vec<IpAddr>>>,
    task: JoinHandle<()>,
}

impl Drop for Destination {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Destination {
    async fn start() -> Destination {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let blocked = Blocked::default();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (b, r) = (blocked.clone(), requests.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, peer)) = l.accept().await {
                let (b, r) = (b.clone(), r.clone());
                conns.spawn(async move {
                    let src = peer.ip().to_canonical();
                    let svc = hyper::service::service_fn(move |_req| {
                        r.lock().unwrap().push(src);
                        let status = if b.lock().unwrap().contains(&src) {
                            429
                        } else {
                            200
                        };
                        let resp = hyper::Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(src.to_string())))
                            .unwrap();
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Destination {
            addr,
            blocked,
            requests,
            task,
        }
    }

    fn block(&self, ips: &[IpAddr]) {
        *self.blocked.lock().unwrap() = ips.iter().copied().collect();
    }

    fn requests_from(&self, ip: IpAddr) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|s| **s == ip)
            .count()
    }
}

type Seen = Arc<Mutex<Vec<(IpAddr, Transition)>>>;

/// One request through the proxy; checks that the destination saw the
/// source the proxy reports.
async fn request(proxy: SocketAddr, url: &str) -> Resp {
    let r = get(proxy, url, None).await;
    assert!(r.status == 200 || r.status == 429, "{r:?}");
    let src = r.source();
    assert_eq!(
        r.body,
        src.to_string(),
        "the destination saw the told source"
    );
    r
}

/// Polls `f` every 10 ms for up to 5 s.
async fn until(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The address's state and how often it has been benched.
fn bench_state(pool: &Pool, ip: IpAddr) -> (State, u64) {
    let snap = pool.health_snapshot(0).expect("health on");
    let a = snap
        .addresses
        .iter()
        .find(|a| a.health.key == ip)
        .unwrap_or_else(|| panic!("{ip} not tracked"));
    (a.health.state, a.health.counters.benched)
}

fn is_benched(s: State) -> bool {
    matches!(s, State::Benched { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_the_destination_throttles_are_benched_probed_and_restored() {
    let seen = Seen::default();
    let sink = seen.clone();
    let cooldown = Duration::from_millis(400);
    // 127.0.0.0/29 without network and broadcast: .1 to .6, all in the
    // working set, round robin, never retired.
    let pool = Pool::start(
        "127.0.0.0/29".parse().unwrap(),
        Assigner::Static,
        PoolOptions {
            strategy: Strategy::RoundRobin,
            max_uses: None,
            keep_assigned: 6,
            health: Some(HealthOptions {
                strategy: health::Strategy::Consecutive {
                    consecutive_failures: 2,
                },
                cooldown,
                max_cooldown: cooldown * 8,
                max_benched_percent: 50,
                ..HealthOptions::default()
            }),
            transitions: Some(Arc::new(move |ip, t| sink.lock().unwrap().push((ip, t)))),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let opts = EgressOptions::new(pool.clone());
    opts.policy.update(|p| {
        p.allow.add("127.0.0.0/8".parse().unwrap());
    });
    let proxy = Running::start(opts).await;
    let dest = Destination::start().await;
    let url = format!("http://{}/", dest.addr);
    let throttled = [v4(2), v4(5)];
    dest.block(&throttled);
    let all: Vec<IpAddr> = (1..=6).map(v4).collect();

    // 1. Requests rotate over the six sources; .2 and .5 get 429 and are
    //    benched on their second.
    let mut statuses: HashMap<IpAddr, Vec<u16>> = HashMap::new();
    let mut n = 0;
    while !throttled
        .iter()
        .all(|ip| pool.health_state(*ip).is_some_and(is_benched))
    {
        let r = request(proxy.addr, &url).await;
        let src = r.source();
        assert!(all.contains(&src), "{src}");
        assert_eq!(r.status == 429, throttled.contains(&src), "{r:?}");
        statuses.entry(src).or_default().push(r.status);
        n += 1;
        assert!(n <= 30, "not benched after {n} requests: {statuses:?}");
    }
    for ip in throttled {
        assert_eq!(statuses[&ip], [429, 429], "{ip}");
    }
    assert_eq!(
        seen.lock()
            .unwrap()
            .iter()
            .map(|s| s.0)
            .collect::<Vec<_>>()
            .len(),
        2
    );
    for (ip, t) in seen.lock().unwrap().iter() {
        assert!(throttled.contains(ip), "{ip} benched");
        assert_eq!(
            *t,
            Transition::Benched {
                cause: BenchCause::ConsecutiveFailures(2),
                cooldown
            }
        );
    }
    let snap = pool.health_snapshot(10).unwrap();
    assert_eq!((snap.stats.total, snap.stats.benched), (6, 2));
    for a in &snap.addresses {
        let ip = a.health.key;
        assert!(a.held, "{ip}");
        if throttled.contains(&ip) {
            assert!(is_benched(a.health.state), "{ip}: {:?}", a.health.state);
            assert_eq!(a.health.counters.failures, 2);
            assert_eq!(
                a.health.recent.last().map(|h| h.observation.outcome),
                Some(health::Outcome::Status(429))
            );
        } else {
            assert_eq!(a.health.state, State::Available, "{ip}");
            assert_eq!(a.health.counters.failures, 0, "{ip}");
        }
    }

    // 2. While benched they are never leased: no response names them, and
    //    the destination sees no request from them.
    let before: Vec<usize> = throttled.iter().map(|ip| dest.requests_from(*ip)).collect();
    let mut inside = 0;
    let mut sources = HashSet::new();
    for _ in 0..16 {
        let r = request(proxy.addr, &url).await;
        // Still inside the first benching of both (nothing probed since)?
        if !throttled.iter().all(|ip| {
            let (s, benched) = bench_state(&pool, *ip);
            is_benched(s) && benched == 1
        }) {
            break;
        }
        inside += 1;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            !throttled.contains(&r.source()),
            "benched source leased: {r:?}"
        );
        sources.insert(r.source());
    }
    assert!(inside >= 6, "only {inside} requests inside the cooldown");
    assert_eq!(
        sources,
        [1, 3, 4, 6].map(v4).into_iter().collect(),
        "the others still rotate"
    );
    let after: Vec<usize> = throttled.iter().map(|ip| dest.requests_from(*ip)).collect();
    assert_eq!(before, after, "no request from a benched source");
    assert_eq!(pool.metrics().benched_now, 2);

    // 3. The cooldown ends; .5 is served again, .2 still throttled. The
    //    probes restore .5 and bench .2 again, for twice as long.
    dest.block(&[v4(2)]);
    until("both on probation", || {
        throttled
            .iter()
            .all(|ip| pool.health_state(*ip) == Some(State::Probation))
    })
    .await;
    let mut probes: HashMap<IpAddr, u16> = HashMap::new();
    let mut n = 0;
    while probes.len() < 2 {
        let r = request(proxy.addr, &url).await;
        let src = r.source();
        if throttled.contains(&src) {
            assert!(
                probes.insert(src, r.status).is_none(),
                "{src} leased twice: the second while on probation or benched"
            );
        } else {
            assert_eq!(r.status, 200);
        }
        n += 1;
        assert!(n <= 12, "not probed after {n} requests: {probes:?}");
    }
    assert_eq!(probes[&v4(5)], 200);
    assert_eq!(probes[&v4(2)], 429);
    assert_eq!(pool.health_state(v4(5)), Some(State::Available));
    assert!(matches!(
        pool.health_state(v4(2)),
        Some(State::Benched { cooldown: c, .. }) if c == 2 * cooldown
    ));
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(seen[2..].contains(&(v4(5), Transition::Restored)));
        assert!(seen[2..].contains(&(
            v4(2),
            Transition::Benched {
                cause: BenchCause::ProbationFailure,
                cooldown: 2 * cooldown
            }
        )));
    }

    // 4. .5 rotates again; .2 does not while benched.
    let mut sources = HashSet::new();
    let before = dest.requests_from(v4(2));
    let mut inside = 0;
    for _ in 0..10 {
        let r = request(proxy.addr, &url).await;
        let (s, benched) = bench_state(&pool, v4(2));
        if !(is_benched(s) && benched == 2) {
            break;
        }
        inside += 1;
        assert_eq!(r.status, 200, "{r:?}");
        sources.insert(r.source());
    }
    assert!(inside >= 5, "only {inside} requests inside the cooldown");
    assert!(sources.contains(&v4(5)), "{sources:?}");
    assert!(!sources.contains(&v4(2)), "{sources:?}");
    assert_eq!(dest.requests_from(v4(2)), before);

    // 5. The destination serves .2 again: the next probe restores it, and
    //    all six rotate.
    dest.block(&[]);
    until(".2 on probation", || {
        pool.health_state(v4(2)) == Some(State::Probation)
    })
    .await;
    let mut n = 0;
    while pool.health_state(v4(2)) != Some(State::Available) {
        let r = request(proxy.addr, &url).await;
        assert_eq!(r.status, 200, "{r:?}");
        n += 1;
        assert!(n <= 6, "not probed after {n} requests");
    }
    assert_eq!(
        seen.lock().unwrap().last().copied(),
        Some((v4(2), Transition::Restored))
    );
    let mut sources = HashSet::new();
    for _ in 0..12 {
        let r = request(proxy.addr, &url).await;
        assert_eq!(r.status, 200, "{r:?}");
        sources.insert(r.source());
    }
    assert_eq!(sources, all.iter().copied().collect());
    let m = pool.metrics();
    assert_eq!(
        (
            m.benched_total,
            m.restored_total,
            m.benched_now,
            m.probation_now
        ),
        (3, 2, 0, 0)
    );
    proxy.stop().await;
    pool.shutdown().await;
}

/// A CONNECT tunnel through the proxy to `target`: the source the proxy
/// reports, and what the destination sent before closing.
async fn tunnel(proxy: SocketAddr, target: SocketAddr) -> (IpAddr, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let fut = async {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut byte).await.unwrap(), 1, "head cut short");
            head.push(byte[0]);
        }
        let head = support::parse(&String::from_utf8_lossy(&head));
        assert_eq!(head.status, 200, "{head:?}");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        (head.source(), rest)
    };
    tokio::time::timeout(support::IO_TIMEOUT, fut)
        .await
        .expect("tunnel in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_closing_tunnels_at_once_gets_the_source_benched() {
    let seen = Seen::default();
    let sink = seen.clone();
    let pool = Pool::start(
        "127.0.0.0/29".parse().unwrap(),
        Assigner::Static,
        PoolOptions {
            strategy: Strategy::RoundRobin,
            max_uses: None,
            keep_assigned: 6,
            health: Some(HealthOptions {
                strategy: health::Strategy::Consecutive {
                    consecutive_failures: 2,
                },
                cooldown: Duration::from_secs(60),
                max_benched_percent: 50,
                ..HealthOptions::default()
            }),
            transitions: Some(Arc::new(move |ip, t| sink.lock().unwrap().push((ip, t)))),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let opts = EgressOptions::new(pool.clone());
    opts.policy.update(|p| {
        p.allow.add("127.0.0.0/8".parse().unwrap());
    });
    let proxy = Running::start(opts).await;
    // The destination closes at once on connections from .3, and sends the
    // source address to the others.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap();
    let dest = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, peer)) = l.accept().await {
            let src = peer.ip().to_canonical();
            if src != v4(3) {
                let _ = s.write_all(src.to_string().as_bytes()).await;
                let _ = s.shutdown().await;
            }
        }
    });
    let mut early = 0;
    let mut n = 0;
    while !pool.health_state(v4(3)).is_some_and(is_benched) {
        let (src, got) = tunnel(proxy.addr, target).await;
        if src == v4(3) {
            assert!(got.is_empty());
            early += 1;
        } else {
            assert_eq!(got, src.to_string().as_bytes());
        }
        // The tunnel's lease is released once the proxy saw both ends.
        until("the lease released", || pool.metrics().leased_now == 0).await;
        n += 1;
        assert!(
            n <= 24,
            "not benched after {early} early EOFs: {:?}",
            pool.health_snapshot(10)
                .unwrap()
                .addresses
                .iter()
                .find(|a| a.health.key == v4(3))
                .map(|a| a.health.recent.clone())
        );
    }
    assert_eq!(early, 2);
    assert_eq!(
        seen.lock().unwrap().clone(),
        [(
            v4(3),
            Transition::Benched {
                cause: BenchCause::ConsecutiveFailures(2),
                cooldown: Duration::from_secs(60)
            }
        )]
    );
    for _ in 0..10 {
        let (src, got) = tunnel(proxy.addr, target).await;
        assert_ne!(src, v4(3), "benched source leased");
        assert_eq!(got, src.to_string().as_bytes());
    }
    proxy.stop().await;
    dest.abort();
    pool.shutdown().await;
}
