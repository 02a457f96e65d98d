//! Pools over loopback addresses: no namespace, no setup (all of
//! 127.0.0.0/8 is local on Linux).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use addrpool::{
    Assigner, ConnectError, Exclude, Family, Order, Outcome, Pool, PoolError, PoolOptions, Session,
    Source, Strategy,
};
use testbed::PeerServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn v4(d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, d))
}

fn server() -> PeerServer {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback server");
    PeerServer::start(l).expect("start server")
}

/// GET / and return the body (the peer address the server saw).
async fn fetch(pool: &Pool, dest: SocketAddr) -> (IpAddr, String) {
    let mut s = pool.connect(dest).await.expect("connect");
    let src = s.source();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    (src, testbed::body_of(&out).to_owned())
}

fn list(last: &[u8]) -> Source {
    Source::list(last.iter().map(|d| v4(*d))).expect("list")
}

#[tokio::test]
async fn loopback_pool_gives_each_connection_a_new_source() {
    let srv = server();
    let pool = Pool::start(
        "127.0.0.0/24".parse().unwrap(),
        Assigner::Static,
        PoolOptions::default(),
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    for _ in 0..20 {
        let (src, body) = fetch(&pool, srv.local_addr()).await;
        assert_eq!(body, src.to_string(), "server saw the leased source");
        seen.push(src);
    }
    let want: Vec<IpAddr> = (1..=20).map(v4).collect();
    assert_eq!(
        seen, want,
        "sequential, network address skipped, max_uses = 1"
    );
    assert_eq!(srv.peers(), want);
    let m = pool.metrics();
    assert_eq!(m.leased_total, 20);
    assert_eq!(m.retired_total, 20);
    assert_eq!(m.leased_now, 0);
    assert!(m.held <= 10, "working set bounded by keep_assigned: {m:?}");
    pool.shutdown().await;
    assert!(matches!(pool.lease().await, Err(PoolError::Closed)));
}

#[tokio::test]
async fn strategies_pick_as_documented() {
    let opts = |strategy| PoolOptions {
        strategy,
        max_uses: None,
        ..Default::default()
    };
    // Round robin: a, b, c, a, b, c.
    let pool = Pool::start(
        list(&[11, 12, 13]),
        Assigner::Static,
        opts(Strategy::RoundRobin),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(pool.lease().await.unwrap().source());
    }
    assert_eq!(got, [11, 12, 13, 11, 12, 13].map(v4));

    // Fresh: never-used first, then the least recently released.
    let pool = Pool::start(list(&[21, 22]), Assigner::Static, opts(Strategy::Fresh))
        .await
        .unwrap();
    let a = pool.lease().await.unwrap();
    let b = pool.lease().await.unwrap();
    assert_eq!((a.source(), b.source()), (v4(21), v4(22)));
    drop(b);
    drop(a);
    assert_eq!(pool.lease().await.unwrap().source(), v4(22));

    // Least used: the address held longest has the most uses.
    let pool = Pool::start(
        list(&[31, 32, 33]),
        Assigner::Static,
        opts(Strategy::LeastUsed),
    )
    .await
    .unwrap();
    let held = pool.lease().await.unwrap();
    assert_eq!(held.source(), v4(31));
    for _ in 0..4 {
        let l = pool.lease().await.unwrap();
        assert_ne!(l.source(), v4(31), "31 is leased: never handed out twice");
    }
    drop(held);
    assert_eq!(
        pool.lease().await.unwrap().source(),
        v4(31),
        "31 has 1 use, the others 2"
    );

    // Random: within the set, and not always the same.
    let pool = Pool::start(
        list(&[41, 42, 43, 44]),
        Assigner::Static,
        opts(Strategy::Random),
    )
    .await
    .unwrap();
    let mut seen = HashSet::new();
    for _ in 0..200 {
        seen.insert(pool.lease().await.unwrap().source());
    }
    assert_eq!(seen, [41, 42, 43, 44].map(v4).into_iter().collect());
}

#[tokio::test]
async fn a_lease_is_never_shared_and_waiters_get_released_addresses() {
    let opts = PoolOptions {
        max_uses: None,
        lease_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let pool = Pool::start(list(&[51, 52, 53]), Assigner::Static, opts)
        .await
        .unwrap();
    let held: Vec<_> = futures::future::join_all((0..3).map(|_| pool.lease())).await;
    let held: Vec<_> = held.into_iter().map(Result::unwrap).collect();
    let distinct: HashSet<_> = held.iter().map(|l| l.source()).collect();
    assert_eq!(distinct.len(), 3);
    let err = pool.lease().await.unwrap_err();
    assert!(
        matches!(err, PoolError::NoAddressAvailable { held: 3, .. }),
        "{err}"
    );
    // A waiter gets the address released while it waits.
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.lease().await.map(|l| l.source()) })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(held);
    let got = waiter.await.unwrap().unwrap();
    assert!(distinct.contains(&got));
}

#[tokio::test]
async fn max_uses_then_exhaustion() {
    let opts = PoolOptions {
        max_uses: Some(2),
        ..Default::default()
    };
    let pool = Pool::start(
        "127.0.0.61-127.0.0.63".parse().unwrap(),
        Assigner::Static,
        opts,
    )
    .await
    .unwrap();
    let mut uses = std::collections::HashMap::new();
    for _ in 0..6 {
        *uses
            .entry(pool.lease().await.unwrap().source())
            .or_insert(0) += 1;
    }
    assert!(uses.values().all(|n| *n == 2), "{uses:?}");
    assert!(matches!(pool.lease().await, Err(PoolError::Exhausted)));
    assert_eq!(pool.metrics().retired_total, 3);
}

#[tokio::test]
async fn cycle_order_brings_retired_addresses_back() {
    let opts = PoolOptions {
        order: Order::Cycle,
        keep_assigned: 1,
        ..Default::default()
    };
    let pool = Pool::start(list(&[71, 72]), Assigner::Static, opts)
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(pool.lease().await.unwrap().source());
    }
    assert_eq!(got, [71, 72, 71, 72, 71].map(v4));
}

#[tokio::test]
async fn endless_iterator_source_as_in_the_seed() {
    // Endlessly cycle 3 addresses; each is retired after one use and comes
    // back when the iterator yields it again.
    let addrs = [201u8, 202, 203].into_iter().cycle().map(v4);
    let pool = Pool::start(
        Source::iter(addrs),
        Assigner::Static,
        PoolOptions::default(),
    )
    .await
    .unwrap();
    let srv = server();
    let mut got = Vec::new();
    for _ in 0..7 {
        got.push(fetch(&pool, srv.local_addr()).await.0);
    }
    assert_eq!(got, [201, 202, 203, 201, 202, 203, 201].map(v4));
}

#[tokio::test]
async fn static_addresses_are_kept_when_idle_and_retired_on_request() {
    let opts = PoolOptions {
        max_uses: None,
        max_idle: Some(Duration::from_millis(50)),
        sweep_interval: Duration::from_millis(20),
        keep_assigned: 2,
        ..Default::default()
    };
    let pool = Pool::start(list(&[81, 82]), Assigner::Static, opts)
        .await
        .unwrap();
    drop(pool.lease().await.unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        pool.held(),
        vec![v4(81), v4(82)],
        "idle static addresses are kept"
    );
    // Lease::retire works whatever max_uses says.
    let l = pool.lease().await.unwrap();
    assert_eq!(l.source(), v4(82));
    l.retire();
    drop(l);
    assert_eq!(pool.held(), vec![v4(81)]);
    assert_eq!(pool.metrics().retired_total, 1);
}

#[tokio::test]
async fn sticky_sessions_keep_their_source_for_the_ttl() {
    let opts = PoolOptions {
        strategy: Strategy::Sticky,
        sweep_interval: Duration::from_millis(20),
        ..Default::default()
    };
    let pool = Pool::start(
        "127.0.0.90-127.0.0.99".parse().unwrap(),
        Assigner::Static,
        opts,
    )
    .await
    .unwrap();
    let user = addrpool::parse_username("user1-session-abc123").unwrap();
    let a = user.session().unwrap();
    let b = Session::new("user2-session-x");
    let a1 = pool.lease_with(Some(&a)).await.unwrap();
    let a2 = pool.lease_with(Some(&a)).await.unwrap();
    let b1 = pool.lease_with(Some(&b)).await.unwrap();
    let plain = pool.lease().await.unwrap();
    assert_eq!(
        a1.source(),
        a2.source(),
        "same session, same source (even at once)"
    );
    assert_ne!(a1.source(), b1.source());
    assert_ne!(
        plain.source(),
        a1.source(),
        "a session's address is not handed to others"
    );
    assert_ne!(plain.source(), b1.source());
    let first = a1.source();
    drop((a1, a2, b1, plain));
    assert_eq!(
        pool.lease_with(Some(&a)).await.unwrap().source(),
        first,
        "still within the TTL"
    );
    // A short TTL from the username convention.
    let short = addrpool::parse_username("user3-session-q-ttl-1")
        .unwrap()
        .session()
        .unwrap();
    let s1 = pool.lease_with(Some(&short)).await.unwrap().source();
    assert_eq!(pool.lease_with(Some(&short)).await.unwrap().source(), s1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_ne!(
        pool.lease_with(Some(&short)).await.unwrap().source(),
        s1,
        "TTL expired: new source"
    );
    // A retired address (a bind failed on it, say) ends the session on it
    // at once, TTL or not, and is not handed out again.
    let l = pool.lease_with(Some(&a)).await.unwrap();
    assert_eq!(l.source(), first);
    l.retire();
    let moved = pool.lease_with(Some(&a)).await.unwrap();
    assert_ne!(
        moved.source(),
        first,
        "the session moved off the retired address"
    );
    drop((l, moved));
    assert!(
        !pool.held().contains(&first),
        "retired once its last lease ended: {:?}",
        pool.held()
    );
}

#[tokio::test]
async fn exclusions_and_network_broadcast() {
    let opts = PoolOptions {
        exclude: Some(Exclude::from_fn(|ip: IpAddr| {
            ip == v4(102) || ip == v4(104)
        })),
        keep_assigned: 1,
        ..Default::default()
    };
    let pool = Pool::start(
        "127.0.0.100/30".parse().unwrap(),
        Assigner::Static,
        opts.clone(),
    )
    .await
    .unwrap();
    // .100 network, .103 broadcast, .102 excluded: only .101.
    assert_eq!(pool.lease().await.unwrap().source(), v4(101));
    assert!(matches!(pool.lease().await, Err(PoolError::Exhausted)));
    let opts = PoolOptions {
        include_network_broadcast: true,
        ..opts
    };
    let pool = Pool::start("127.0.0.100/30".parse().unwrap(), Assigner::Static, opts)
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Ok(l) = pool.lease().await {
        got.push(l.source());
    }
    assert_eq!(got, [100, 101, 103].map(v4));
}

#[tokio::test]
async fn iprules_exclusions_apply_when_drawn_and_when_picked() {
    let mut rules = iprules::RuleSet::new();
    rules.add("127.0.0.120-127.0.0.124".parse().unwrap());
    let live = Arc::new(iprules::Shared::new(rules));
    let opts = PoolOptions {
        exclude: Some(Exclude::from(live.clone())),
        max_uses: None,
        strategy: Strategy::RoundRobin,
        keep_assigned: 3,
        ..Default::default()
    };
    let pool = Pool::start(
        "127.0.0.120-127.0.0.129".parse().unwrap(),
        Assigner::Static,
        opts,
    )
    .await
    .unwrap();
    let got: Vec<IpAddr> = vec![
        pool.lease().await.unwrap().source(),
        pool.lease().await.unwrap().source(),
    ];
    assert_eq!(got, [125, 126].map(v4));
    // Excluding a held address at run time: it is retired, not handed out.
    live.update(|r| r.add("127.0.0.127".parse().unwrap()));
    let mut next = Vec::new();
    for _ in 0..4 {
        next.push(pool.lease().await.unwrap().source());
    }
    assert!(!next.contains(&v4(127)), "{next:?}");
    assert!(!pool.held().contains(&v4(127)));
}

#[tokio::test]
async fn outcomes_are_reported_per_source() {
    let seen: Arc<Mutex<Vec<(IpAddr, Outcome)>>> = Arc::default();
    let sink = seen.clone();
    let opts = PoolOptions {
        outcomes: Some(Arc::new(move |ip, o| sink.lock().unwrap().push((ip, o)))),
        ..Default::default()
    };
    let pool = Pool::start(
        "127.0.0.110-127.0.0.119".parse().unwrap(),
        Assigner::Static,
        opts,
    )
    .await
    .unwrap();
    let srv = server();
    let (src, _) = fetch(&pool, srv.local_addr()).await;
    // A closed port: bind a listener, note its port, close it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = pool.connect(closed).await.unwrap_err();
    let ConnectError::Connect {
        src: failed, dest, ..
    } = err
    else {
        panic!("expected a connect error, got {err}")
    };
    assert_eq!(dest, closed);
    let lease = pool.lease().await.unwrap();
    lease.report(Outcome::Failure);
    pool.report(v4(1), Outcome::Success);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            (src, Outcome::Connected),
            (failed, Outcome::ConnectFailed),
            (lease.source(), Outcome::Failure),
            (v4(1), Outcome::Success)
        ]
    );
    assert_eq!(pool.metrics().connect_failures_total, 1);
}

#[tokio::test]
async fn ipv6_pool_refuses_an_ipv4_destination() {
    let srv = server();
    let pool = Pool::start(
        "::1".parse().unwrap(),
        Assigner::Static,
        PoolOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(pool.family(), Some(Family::V6));
    let err = pool.connect(srv.local_addr()).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::FamilyMismatch {
                pool: Family::V6,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("refusing to connect from the host's default address"),
        "{err}"
    );
    // IPv4-mapped IPv6 is IPv4 too.
    let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{}", srv.local_addr().port())
        .parse()
        .unwrap();
    assert!(matches!(
        pool.connect(mapped).await,
        Err(ConnectError::FamilyMismatch { .. })
    ));
    // Through the tower service as well.
    let uri: http::Uri = format!("http://{}/", srv.local_addr()).parse().unwrap();
    let mut connector = pool.connector();
    let err = tower::Service::call(&mut connector, uri).await.unwrap_err();
    assert!(matches!(err, ConnectError::FamilyMismatch { .. }), "{err}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(srv.peers().is_empty(), "no connection was made");
    assert_eq!(pool.metrics().leased_total, 0, "no address was even leased");
}

#[tokio::test]
async fn hyper_client_uses_the_pool() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let srv = server();
    let pool = Pool::start(
        "127.0.0.0/24".parse().unwrap(),
        Assigner::Static,
        PoolOptions::default(),
    )
    .await
    .unwrap();
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(pool.connector());
    let mut bodies = Vec::new();
    for _ in 0..5 {
        let uri: http::Uri = format!("http://{}/", srv.local_addr()).parse().unwrap();
        let res = client.get(uri).await.expect("request");
        assert_eq!(res.status(), 200);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        bodies.push(String::from_utf8(body.to_vec()).unwrap());
    }
    assert_eq!(
        bodies,
        (1..=5).map(|d| v4(d).to_string()).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn invalid_options_are_rejected() {
    let bad = PoolOptions {
        keep_assigned: 60,
        ..Default::default()
    };
    let err = Pool::start(list(&[1]), Assigner::Static, bad)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("keep_assigned (60) exceeds max_assigned (50)"),
        "{err}"
    );
}
