//! Per-address health inside the pool: benching, cooldown, probation, the
//! cap on benched addresses, typed errors. Loopback pools (all of
//! 127.0.0.0/8 is local on Linux); tests without sockets run on tokio's
//! paused clock, the others against a real local upstream with short
//! cooldowns.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use addrpool::health::{self, HealthOptions, State, Transition};
use addrpool::{
    Assigner, ConnectError, Outcome, Pool, PoolError, PoolOptions, Session, Source, Strategy,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn v4(d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, d))
}

fn list(last: &[u8]) -> Source {
    Source::list(last.iter().map(|d| v4(*d))).expect("list")
}

type Seen = Arc<Mutex<Vec<(IpAddr, Transition)>>>;

/// Round robin over `addrs`, never retired, health on with `failures`
/// consecutive failures, `cooldown`, and `max_benched_percent`.
fn opts(failures: u32, cooldown: Duration, cap: u8, seen: &Seen) -> PoolOptions {
    let sink = seen.clone();
    PoolOptions {
        strategy: Strategy::RoundRobin,
        max_uses: None,
        health: Some(HealthOptions {
            strategy: health::Strategy::Consecutive {
                consecutive_failures: failures,
            },
            cooldown,
            max_cooldown: cooldown * 8,
            max_benched_percent: cap,
            ..HealthOptions::default()
        }),
        transitions: Some(Arc::new(move |ip, t| sink.lock().unwrap().push((ip, t)))),
        ..Default::default()
    }
}

async fn lease_sources(pool: &Pool, n: usize) -> Vec<IpAddr> {
    let mut got = Vec::new();
    for _ in 0..n {
        got.push(pool.lease().await.expect("lease").source());
    }
    got
}

const MIN: Duration = Duration::from_secs(60);

#[tokio::test(start_paused = true)]
async fn consecutive_failures_bench_until_the_cooldown_then_one_probe() {
    let seen = Seen::default();
    let pool = Pool::start(
        list(&[1, 2, 3, 4]),
        Assigner::Static,
        opts(3, MIN, 50, &seen),
    )
    .await
    .unwrap();
    assert_eq!(lease_sources(&pool, 4).await, [1, 2, 3, 4].map(v4));
    // Two 429s do not bench; the third does.
    for i in 1..=3 {
        let t = pool
            .record_outcome(v4(2), health::Outcome::Status(429))
            .unwrap();
        assert_eq!(
            matches!(t, Some(Transition::Benched { .. })),
            i == 3,
            "{i}: {t:?}"
        );
    }
    assert!(matches!(
        pool.health_state(v4(2)),
        Some(State::Benched { .. })
    ));
    let got = lease_sources(&pool, 12).await;
    assert!(!got.contains(&v4(2)), "benched address leased: {got:?}");
    assert_eq!(pool.metrics().benched_now, 1);

    // Still benched a second before the cooldown ends.
    tokio::time::advance(MIN - Duration::from_secs(1)).await;
    assert!(!lease_sources(&pool, 6).await.contains(&v4(2)));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(pool.health_state(v4(2)), Some(State::Probation));

    // Exactly one probe: while it is out, the address is not leased again.
    let mut probe = None;
    let mut others = Vec::new();
    for _ in 0..4 {
        let l = pool.lease().await.unwrap();
        if l.source() == v4(2) {
            assert!(
                probe.is_none(),
                "a second lease of the address on probation"
            );
            probe = Some(l);
        } else {
            assert!(!l.is_probe());
            others.push(l);
        }
    }
    let probe = probe.expect("the address on probation is probed");
    assert!(probe.is_probe());
    // The probe fails: benched again, for twice as long.
    assert!(matches!(
        probe.record(health::Outcome::Status(403)),
        Some(Transition::Benched { cooldown, .. }) if cooldown == 2 * MIN
    ));
    drop((probe, others));
    tokio::time::advance(MIN).await;
    assert!(!lease_sources(&pool, 6).await.contains(&v4(2)));
    tokio::time::advance(MIN).await;
    // The next probe succeeds: restored, leased like any other.
    let mut restored = false;
    for _ in 0..4 {
        let l = pool.lease().await.unwrap();
        if l.source() == v4(2) {
            assert!(l.is_probe());
            assert_eq!(
                l.record(health::Outcome::Status(200)),
                Some(Transition::Restored)
            );
            restored = true;
        }
    }
    assert!(restored);
    assert_eq!(pool.health_state(v4(2)), Some(State::Available));
    let got = lease_sources(&pool, 8).await;
    assert_eq!(got.iter().filter(|ip| **ip == v4(2)).count(), 2, "{got:?}");

    let m = pool.metrics();
    assert_eq!(
        (m.benched_total, m.restored_total, m.benched_now),
        (2, 1, 0)
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.iter().all(|(ip, _)| *ip == v4(2)));
    assert_eq!(seen.last().map(|s| s.1), Some(Transition::Restored));

    // The admin view.
    let snap = pool.health_snapshot(10).unwrap();
    assert_eq!(snap.addresses.len(), 4);
    let a2 = &snap.addresses[1];
    assert_eq!(a2.health.key, v4(2));
    assert!(a2.held);
    assert_eq!(a2.health.counters.benched, 2);
    assert_eq!(a2.health.benches.len(), 2);
    assert_eq!(
        a2.health.recent.last().map(|h| h.observation.outcome),
        Some(health::Outcome::Status(200))
    );
    assert_eq!(snap.stats.total, 4);
}

#[tokio::test(start_paused = true)]
async fn the_targets_own_404_and_500_do_not_bench() {
    let seen = Seen::default();
    let pool = Pool::start(list(&[1, 2]), Assigner::Static, opts(1, MIN, 50, &seen))
        .await
        .unwrap();
    for _ in 0..10 {
        let l = pool.lease().await.unwrap();
        l.report(Outcome::Status(404));
        assert_eq!(l.record(health::Outcome::Status(500)), None);
    }
    pool.report(v4(1), Outcome::Status(404));
    assert_eq!(pool.health_state(v4(1)), Some(State::Available));
    assert_eq!(pool.health_state(v4(2)), Some(State::Available));
    assert!(seen.lock().unwrap().is_empty());
    // A configured classifier can make 404 count.
    let strict = PoolOptions {
        classifier: health::Classifier::default()
            .with_blocked_statuses([404])
            .unwrap(),
        ..opts(1, MIN, 50, &seen)
    };
    let pool = Pool::start(list(&[1, 2]), Assigner::Static, strict)
        .await
        .unwrap();
    // Static addresses enter the working set (and the tracker) on demand.
    drop(pool.lease().await.unwrap());
    pool.report(v4(1), Outcome::Status(404));
    assert!(matches!(
        pool.health_state(v4(1)),
        Some(State::Benched { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn the_cap_keeps_a_pool_from_emptying_itself() {
    let seen = Seen::default();
    let pool = Pool::start(
        list(&[1, 2, 3, 4]),
        Assigner::Static,
        opts(2, MIN, 50, &seen),
    )
    .await
    .unwrap();
    drop(lease_sources(&pool, 4).await);
    for d in 1..=4 {
        for _ in 0..2 {
            pool.report(v4(d), Outcome::Failure);
        }
    }
    let m = pool.metrics();
    assert_eq!(
        (m.benched_total, m.bench_suppressed_total, m.benched_now),
        (2, 2, 2),
        "{m:?}"
    );
    let suppressed: Vec<IpAddr> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, t)| matches!(t, Transition::BenchSuppressed { .. }))
        .map(|(ip, _)| *ip)
        .collect();
    assert_eq!(suppressed, [3, 4].map(v4));
    let got: HashSet<IpAddr> = lease_sources(&pool, 10).await.into_iter().collect();
    assert_eq!(got, [3, 4].map(v4).into_iter().collect());
    // A suppressed address keeps its failure run: once room is made (a
    // benched address restored), its next failure benches it.
    tokio::time::advance(MIN).await;
    let l = pool.lease().await.unwrap();
    let probed = l.source();
    assert!(l.is_probe() && [v4(1), v4(2)].contains(&probed));
    l.report(Outcome::Success);
    drop(l);
    assert_eq!(pool.health_state(probed), Some(State::Available));
    assert!(matches!(
        pool.record_outcome(v4(3), health::Outcome::Timeout),
        Ok(Some(Transition::Benched { .. }))
    ));
}

#[tokio::test(start_paused = true)]
async fn none_available_is_a_typed_error() {
    let seen = Seen::default();
    let pool = Pool::start(list(&[1, 2]), Assigner::Static, opts(1, MIN, 100, &seen))
        .await
        .unwrap();
    drop(lease_sources(&pool, 2).await);
    pool.report(v4(1), Outcome::ConnectTimeout);
    pool.record_outcome(v4(2), health::Outcome::EarlyEof)
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let err = pool.lease().await.unwrap_err();
    assert!(
        matches!(
            err,
            PoolError::NoneAvailable {
                held: 2,
                benched: 2,
                probation_full: 0
            }
        ),
        "{err}"
    );
    assert_eq!(
        t0.elapsed(),
        Duration::ZERO,
        "no waiting when it cannot help"
    );
    assert!(
        err.to_string().contains("2 of 2 held addresses benched"),
        "{err}"
    );
    let dest: SocketAddr = "127.0.0.1:9".parse().unwrap();
    assert!(matches!(
        pool.connect(dest).await,
        Err(ConnectError::Pool(PoolError::NoneAvailable { .. }))
    ));
    // Client feedback for an address the pool does not hold.
    assert!(matches!(
        pool.record_outcome(v4(9), health::Outcome::Status(429)),
        Err(PoolError::UnknownAddress { ip }) if ip == v4(9)
    ));
    // Health off: no tracker, a typed error, leases as before.
    let plain = Pool::start(list(&[1]), Assigner::Static, PoolOptions::default())
        .await
        .unwrap();
    assert!(matches!(
        plain.record_outcome(v4(1), health::Outcome::Status(429)),
        Err(PoolError::HealthDisabled)
    ));
    assert!(plain.health_snapshot(10).is_none());
    // Invalid health options are rejected at start, naming the field.
    let bad = PoolOptions {
        health: Some(HealthOptions {
            probation_requests: 0,
            ..HealthOptions::default()
        }),
        ..Default::default()
    };
    match Pool::start(list(&[1]), Assigner::Static, bad).await {
        Err(PoolError::Health(e)) => assert_eq!(e.field(), "probation_requests"),
        other => panic!("expected a health option error, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn sticky_sessions_leave_benched_addresses_and_probes_are_limited() {
    let seen = Seen::default();
    let sticky = PoolOptions {
        strategy: Strategy::Sticky,
        session_ttl: 10 * MIN,
        ..opts(1, MIN, 50, &seen)
    };
    let pool = Pool::start(list(&[1, 2, 3]), Assigner::Static, sticky)
        .await
        .unwrap();
    let s = Session::new("user-session-a");
    let first = pool.lease_with(Some(&s)).await.unwrap().source();
    assert_eq!(pool.lease_with(Some(&s)).await.unwrap().source(), first);
    pool.report(first, Outcome::Failure);
    assert!(matches!(
        pool.health_state(first),
        Some(State::Benched { .. })
    ));
    let moved = pool.lease_with(Some(&s)).await.unwrap().source();
    assert_ne!(moved, first, "the session moved off the benched address");
    assert_eq!(pool.lease_with(Some(&s)).await.unwrap().source(), moved);

    // Probation: one probe slot. Keep the third address leased so the
    // address on probation is the only candidate besides `moved`.
    tokio::time::advance(MIN).await;
    let third = [1, 2, 3]
        .map(v4)
        .into_iter()
        .find(|ip| *ip != first && *ip != moved)
        .unwrap();
    let mut hold = None;
    while hold.is_none() {
        let l = pool.lease().await.unwrap();
        if l.source() == third {
            hold = Some(l);
        }
    }
    let p = Session::new("user-session-probe");
    let probe = pool.lease_with(Some(&p)).await.unwrap();
    assert_eq!((probe.source(), probe.is_probe()), (first, true));
    // The session's address has no free probe slot: the session moves to
    // the third address, released for it.
    drop(hold);
    let again = pool.lease_with(Some(&p)).await.unwrap();
    assert_eq!(again.source(), third, "probe slot full: the session moved");
    drop(again);
    // Dropping the probe without an outcome frees its slot.
    drop(probe);
    let q = Session::new("user-session-q");
    let probe = pool.lease_with(Some(&q)).await.unwrap();
    assert_eq!((probe.source(), probe.is_probe()), (first, true));
    // A plain "connected" counts only when nothing else was reported: here
    // it restores the address when the lease is released.
    probe.report(Outcome::Connected);
    assert_eq!(pool.health_state(first), Some(State::Probation));
    drop(probe);
    assert_eq!(pool.health_state(first), Some(State::Available));
}

#[tokio::test(start_paused = true)]
async fn benched_addresses_retired_are_remembered_until_their_cooldown() {
    // A cycling source with one use per address: a benched address is
    // retired, and must not come straight back from the source.
    let seen = Seen::default();
    let cycling = PoolOptions {
        order: addrpool::Order::Cycle,
        max_uses: Some(1),
        keep_assigned: 4,
        ..opts(1, MIN, 50, &seen)
    };
    let pool = Pool::start(list(&[1, 2, 3, 4]), Assigner::Static, cycling)
        .await
        .unwrap();
    let l = pool.lease().await.unwrap();
    assert_eq!(l.source(), v4(1));
    l.report(Outcome::Status(429));
    drop(l);
    assert!(!pool.held().contains(&v4(1)), "retired after its one use");
    assert!(matches!(
        pool.health_state(v4(1)),
        Some(State::Benched { .. })
    ));
    let got = lease_sources(&pool, 9).await;
    assert!(!got.contains(&v4(1)), "{got:?}");
    let snap = pool.health_snapshot(0).unwrap();
    let a1 = snap
        .addresses
        .iter()
        .find(|a| a.health.key == v4(1))
        .unwrap();
    assert!(!a1.held);
    // After the cooldown it is forgotten by the sweep and drawn again.
    tokio::time::advance(MIN).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let got = lease_sources(&pool, 4).await;
    assert!(got.contains(&v4(1)), "{got:?}");
}

/// What a [`addrpool::HealthJournal`] heard, in order: (address, what,
/// the bench's start, cooldown and strike for a benching).
type Heard = Vec<(
    IpAddr,
    &'static str,
    Option<(std::time::Instant, Duration, u32)>,
)>;

#[derive(Default)]
struct Journal(Mutex<Heard>);

impl addrpool::HealthJournal for Journal {
    fn transition(
        &self,
        source: IpAddr,
        transition: &Transition,
        tracker: &health::Tracker<IpAddr>,
        now: std::time::Instant,
    ) {
        let entry = match transition {
            Transition::Benched { .. } => {
                let Some(State::Benched { since, cooldown }) = tracker.state(&source, now) else {
                    panic!("benched but the tracker says otherwise");
                };
                let strike = tracker
                    .bench_history(&source)
                    .and_then(|h| h.last().map(|b| b.strike))
                    .unwrap_or(0);
                (source, "benched", Some((since, cooldown, strike)))
            }
            Transition::Restored => (source, "restored", None),
            Transition::BenchSuppressed { .. } => (source, "suppressed", None),
        };
        self.0.lock().unwrap().push(entry);
    }

    fn forgotten(&self, source: IpAddr) {
        self.0.lock().unwrap().push((source, "forgotten", None));
    }
}

#[tokio::test(start_paused = true)]
async fn restored_benches_keep_addresses_out_and_the_journal_hears_changes_in_order() {
    use health::BenchCause;
    let seen = Seen::default();
    let o = PoolOptions {
        keep_assigned: 6,
        ..opts(2, MIN, 50, &seen)
    };
    let pool = Pool::start(list(&[1, 2, 3, 4, 5, 6, 7, 8]), Assigner::Static, o)
        .await
        .unwrap();
    let journal = Arc::new(Journal::default());
    pool.set_health_journal(Some(journal.clone()));
    assert!(pool.held().is_empty(), "a static pool draws on demand");

    // Saved benches of addresses not held yet: one with 50 s of its minute
    // left, one whose cooldown ended while the process was down. Both are
    // applied although they are all the tracker knows (the cap is about
    // held addresses).
    let now = tokio::time::Instant::now().into_std();
    let since = now - Duration::from_secs(10);
    let cause = BenchCause::ConsecutiveFailures(2);
    assert!(pool.restore_bench(v4(2), since, MIN, cause, 1).unwrap());
    assert!(
        pool.restore_bench(v4(3), now - 2 * MIN, MIN, BenchCause::ProbationFailure, 2)
            .unwrap()
    );
    assert_eq!(
        pool.health_state(v4(2)),
        Some(State::Benched {
            since,
            cooldown: MIN
        })
    );
    assert_eq!(pool.health_state(v4(3)), Some(State::Probation));
    // Outside the source, of the other family, or with health off: errors.
    assert!(matches!(
        pool.restore_bench(v4(9), since, MIN, cause, 1),
        Err(PoolError::UnknownAddress { .. })
    ));
    assert!(matches!(
        pool.restore_bench("::1".parse().unwrap(), since, MIN, cause, 1),
        Err(PoolError::UnknownAddress { .. })
    ));
    let plain = Pool::start(list(&[1]), Assigner::Static, PoolOptions::default())
        .await
        .unwrap();
    assert!(matches!(
        plain.restore_bench(v4(1), since, MIN, cause, 1),
        Err(PoolError::HealthDisabled)
    ));
    // A restoration is no transition.
    assert!(seen.lock().unwrap().is_empty());
    assert!(journal.0.lock().unwrap().is_empty());

    // The source skips the benched address: never leased.
    let got = lease_sources(&pool, 18).await;
    assert!(!got.contains(&v4(2)), "{got:?}");
    assert!(!pool.held().contains(&v4(2)));
    assert!(pool.held().contains(&v4(3)), "drawn again, on probation");

    // A held address is restored under the cap: 2 out (2, 3) of 7
    // tracked, at most 3; a benching at run time takes the third place.
    let t0 = tokio::time::Instant::now().into_std();
    for _ in 0..2 {
        pool.record_outcome(v4(4), health::Outcome::Status(429))
            .unwrap();
    }
    assert!(!pool.restore_bench(v4(5), t0, MIN, cause, 1).unwrap());
    assert_eq!(pool.health_state(v4(5)), Some(State::Available));

    // The probe of 3 succeeds: restored.
    let mut probed = false;
    for _ in 0..8 {
        let l = pool.lease().await.unwrap();
        if l.source() == v4(3) {
            assert!(l.is_probe());
            assert_eq!(
                l.record(health::Outcome::Status(200)),
                Some(Transition::Restored)
            );
            probed = true;
            break;
        }
    }
    assert!(probed);

    // 2's cooldown ends while the pool does not hold it: the sweep forgets
    // it, and the journal hears so.
    tokio::time::advance(Duration::from_secs(50)).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(pool.health_state(v4(2)), None);

    let heard = journal.0.lock().unwrap().clone();
    assert_eq!(
        heard,
        [
            (v4(4), "benched", Some((t0, MIN, 1))),
            (v4(3), "restored", None),
            (v4(2), "forgotten", None),
        ]
    );
    pool.shutdown().await;
    plain.shutdown().await;
}

// ---- Against a real upstream -------------------------------------------

/// An HTTP server on 127.0.0.1 answering 429 to the `blocked` sources and
/// 200 to the others; counts requests per source.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<IpAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start(blocked: Vec<IpAddr>) -> Upstream {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Upstream::serve(l, blocked)
    }

    /// Serves `l` (which may belong to another network namespace).
    fn serve(l: std::net::TcpListener, blocked: Vec<IpAddr>) -> Upstream {
        l.set_nonblocking(true).unwrap();
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        let addr = l.local_addr().unwrap();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let seen = hits.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut s, peer)) = l.accept().await else {
                    continue;
                };
                let ip = peer.ip().to_canonical();
                seen.lock().unwrap().push(ip);
                let status = if blocked.contains(&ip) {
                    "429 Too Many Requests"
                } else {
                    "200 OK"
                };
                conns.spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let body = ip.to_string();
                    let res = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(res.as_bytes()).await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Upstream { addr, hits, task }
    }

    fn hits(&self, ip: IpAddr) -> usize {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|a| **a == ip)
            .count()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request through the pool, reporting the status like a proxy does.
async fn request(pool: &Pool, dest: SocketAddr) -> (IpAddr, u16) {
    let mut s = pool.connect(dest).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status: u16 = out
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    s.lease().report(Outcome::Status(status));
    (s.source(), status)
}

#[tokio::test]
async fn upstream_429s_bench_their_sources_until_the_cooldown() {
    let blocked = v4(32);
    let up = Upstream::start(vec![blocked]).await;
    let seen = Seen::default();
    let cooldown = Duration::from_secs(2);
    let pool = Pool::start(
        "127.0.0.31-127.0.0.34".parse().unwrap(),
        Assigner::Static,
        opts(2, cooldown, 50, &seen),
    )
    .await
    .unwrap();
    // Round robin: the blocked source gets a 429 every 4th request, and is
    // benched by its second (the connector's own "connected" does not
    // reset the run).
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(request(&pool, up.addr).await);
    }
    assert_eq!(up.hits(blocked), 2);
    assert!(
        statuses
            .iter()
            .all(|(ip, st)| (*st == 429) == (*ip == blocked))
    );
    assert!(matches!(
        pool.health_state(blocked),
        Some(State::Benched { .. })
    ));
    for _ in 0..12 {
        assert_ne!(request(&pool, up.addr).await.0, blocked);
    }
    assert_eq!(up.hits(blocked), 2, "not used while benched");
    tokio::time::sleep(cooldown + Duration::from_millis(100)).await;
    // On probation: exactly one probe, which fails and benches it again.
    for _ in 0..12 {
        request(&pool, up.addr).await;
    }
    assert_eq!(up.hits(blocked), 3, "one probe after the cooldown");
    let m = pool.metrics();
    assert_eq!((m.benched_total, m.benched_now), (2, 1), "{m:?}");
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .all(|(ip, t)| *ip == blocked && matches!(t, Transition::Benched { .. }))
    );
}

#[tokio::test]
async fn connect_errors_bench_sources_within_the_cap() {
    let seen = Seen::default();
    let pool = Pool::start(
        "127.0.0.41-127.0.0.44".parse().unwrap(),
        Assigner::Static,
        opts(2, Duration::from_secs(60), 50, &seen),
    )
    .await
    .unwrap();
    // A closed port: bind a listener, note its port, close it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    for _ in 0..8 {
        let err = pool.connect(closed).await.unwrap_err();
        assert!(matches!(err, ConnectError::Connect { .. }), "{err}");
    }
    let m = pool.metrics();
    assert_eq!(
        (
            m.benched_total,
            m.bench_suppressed_total,
            m.connect_failures_total
        ),
        (2, 2, 8),
        "{m:?}"
    );
    // The two benched sources are not used; the other two still are.
    let up = Upstream::start(vec![]).await;
    let mut used = HashSet::new();
    for _ in 0..8 {
        used.insert(request(&pool, up.addr).await.0);
    }
    assert_eq!(used.len(), 2, "{used:?}");
    for ip in &used {
        assert_eq!(pool.health_state(*ip), Some(State::Available));
    }
    let snap = pool.health_snapshot(5).unwrap();
    let benched: Vec<_> = snap
        .addresses
        .iter()
        .filter(|a| matches!(a.health.state, State::Benched { .. }))
        .collect();
    assert_eq!(benched.len(), 2);
    for a in benched {
        assert!(!used.contains(&a.health.key));
        assert!(
            a.health
                .recent
                .iter()
                .all(|h| matches!(h.observation.outcome, health::Outcome::ConnectError(_)))
        );
    }
}

/// End to end in network namespaces (needs root): a static pool of three
/// addresses on the proxy side, an upstream that answers 429 to one of them.
#[test]
fn netns_upstream_429s_bench_that_source_only() {
    use testbed::{PROXY_IF, Testbed, UPSTREAM_V4};
    let bed = Testbed::new().expect("testbed (this test needs root)");
    let proxy = bed.proxy();
    for a in ["10.251.0.20/32", "10.251.0.21/32", "10.251.0.22/32"] {
        proxy.ip(&["addr", "add", a, "dev", PROXY_IF]).unwrap();
    }
    let blocked: IpAddr = "10.251.0.21".parse().unwrap();
    let listener = bed
        .upstream()
        .tcp_listener("[::]:8080".parse().unwrap())
        .unwrap();
    let dest = SocketAddr::new(UPSTREAM_V4.into(), 8080);
    let (hits, snap, used) = proxy.run(|| async move {
        let up = Upstream::serve(listener, vec![blocked]);
        let seen = Seen::default();
        let pool = Pool::start(
            "10.251.0.20-10.251.0.22".parse().unwrap(),
            Assigner::Static,
            opts(2, MIN, 50, &seen),
        )
        .await
        .unwrap();
        let mut used = Vec::new();
        for _ in 0..15 {
            used.push(request(&pool, dest).await);
        }
        let snap = pool.health_snapshot(10).unwrap();
        pool.shutdown().await;
        (up.hits(blocked), snap, used)
    });
    assert_eq!(hits, 2, "benched by its second 429, then never used");
    assert!(used.iter().all(|(ip, st)| (*st == 429) == (*ip == blocked)));
    assert_eq!(used.iter().filter(|(ip, _)| *ip != blocked).count(), 13);
    let b = snap
        .addresses
        .iter()
        .find(|a| a.health.key == blocked)
        .unwrap();
    assert!(matches!(b.health.state, State::Benched { .. }));
    assert_eq!(b.health.recent.len(), 2);
    assert_eq!(snap.stats.benched, 1);
}
