//! End-to-end tests against the real kernel, in network namespaces made by
//! `testbed` (needs root: without it these tests fail, they do not skip).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use addrpool::{
    Assigner, ConnectError, FreebindOptions, Interface, NetlinkOptions, Order, Pool, PoolError,
    PoolOptions, Source, Strategy,
};
use futures::StreamExt;
use testbed::{POOL_V4, POOL_V6, PROXY_IF, Testbed, UPSTREAM_V4, UPSTREAM_V6};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u16 = 8080;

fn up6() -> SocketAddr {
    SocketAddr::new(UPSTREAM_V6.into(), PORT)
}

fn up4() -> SocketAddr {
    SocketAddr::new(UPSTREAM_V4.into(), PORT)
}

fn bed() -> Testbed {
    Testbed::new().expect("testbed (these tests need root)")
}

/// GET / through the pool; returns (leased source, body = peer seen upstream).
async fn fetch(pool: &Pool, dest: SocketAddr) -> (IpAddr, String) {
    let mut s = pool.connect(dest).await.expect("connect");
    let src = s.source();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    (src, testbed::body_of(&out).to_owned())
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the pool addresses on the proxy interface from another thread and
/// records the largest count seen.
struct Monitor {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    fn start(bed: &Testbed, cidr: &'static str) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicUsize::new(0));
        let ns = bed.proxy().name().to_owned();
        let (s, m) = (stop.clone(), max.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let out = testbed::ip(&["-n", &ns, "-o", "addr", "show", "dev", PROXY_IF])
                    .unwrap_or_default();
                let prefix = cidr.split("::").next().unwrap_or(cidr);
                let n = out
                    .lines()
                    .filter(|l| l.contains(&format!(" {prefix}:")))
                    .count();
                m.fetch_max(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Monitor {
            stop,
            max,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.max.load(Ordering::Relaxed)
    }
}

#[test]
fn netlink_200_connections_200_sources_within_bounds() {
    let bed = bed();
    let server = bed.start_upstream_server(PORT).unwrap();
    let monitor = Monitor::start(&bed, POOL_V6);
    let proxy = bed.proxy();
    let sources = proxy.run(|| async {
        let opts = PoolOptions {
            order: Order::Random,
            ..Default::default()
        };
        let pool = Pool::start(
            POOL_V6.parse().unwrap(),
            Assigner::Netlink(NetlinkOptions::new(PROXY_IF)),
            opts,
        )
        .await
        .expect("start netlink pool");
        // Warm-up: keep_assigned addresses on the interface before demand.
        wait_until(
            "10 addresses are assigned ahead",
            Duration::from_secs(3),
            || proxy.addresses_in(PROXY_IF, POOL_V6).unwrap().len() >= 10,
        )
        .await;
        let results: Vec<(IpAddr, String)> = futures::stream::iter(0..200)
            .map(|_| fetch(&pool, up6()))
            .buffer_unordered(25)
            .collect()
            .await;
        for (src, seen) in &results {
            assert_eq!(&src.to_string(), seen, "upstream saw the leased source");
        }
        let used: HashSet<IpAddr> = results.iter().map(|r| r.0).collect();
        // Used addresses are removed (max_uses = 1); the keep-ahead set stays.
        wait_until("used addresses are removed", Duration::from_secs(3), || {
            let on = proxy.addresses_in(PROXY_IF, POOL_V6).unwrap();
            on.iter().all(|a| !used.contains(a)) && on.len() >= 10
        })
        .await;
        let m = pool.metrics();
        assert_eq!(m.leased_total, 200);
        assert_eq!(m.assign_failures_total, 0);
        assert!(m.removed_total >= 200, "{m:?}");
        pool.shutdown().await;
        assert_eq!(
            proxy.addresses_in(PROXY_IF, POOL_V6).unwrap(),
            Vec::<IpAddr>::new(),
            "no pool address left after shutdown"
        );
        used
    });
    let max_on_interface = monitor.stop();
    eprintln!("most pool addresses seen on the interface at once: {max_on_interface}");
    assert_eq!(sources.len(), 200, "200 distinct sources");
    let seen: HashSet<IpAddr> = server.peers().into_iter().collect();
    assert_eq!(seen, sources, "upstream saw exactly those 200 sources");
    let net: ipnet::IpNet = POOL_V6.parse().unwrap();
    assert!(sources.iter().all(|a| net.contains(a)));
    assert!(
        max_on_interface <= 50,
        "never more than max_assigned: saw {max_on_interface}"
    );
    assert!(
        max_on_interface >= 10,
        "monitor saw the keep-ahead set: {max_on_interface}"
    );
}

#[test]
fn netlink_idle_removal_adoption_and_failures() {
    let bed = bed();
    let proxy = bed.proxy();
    // Present before start: one added by an operator.
    proxy
        .ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:251::aa/128",
            "dev",
            PROXY_IF,
            "nodad",
        ])
        .unwrap();
    let operator: IpAddr = "2001:db8:251::aa".parse().unwrap();
    proxy.run(|| async {
        let opts = PoolOptions {
            max_uses: None,
            max_idle: Some(Duration::from_millis(300)),
            sweep_interval: Duration::from_millis(50),
            keep_assigned: 3,
            max_assigned: 5,
            ..Default::default()
        };
        let pool = Pool::start(
            "2001:db8:251::/64".parse().unwrap(),
            Assigner::Netlink(NetlinkOptions::new(PROXY_IF)),
            opts,
        )
        .await
        .unwrap();
        assert!(pool.held().contains(&operator), "adopted at start");
        wait_until("3 ready", Duration::from_secs(2), || pool.held().len() >= 3).await;
        let first: Vec<IpAddr> = pool.held();
        // Idle: every first address is retired; ours are removed, the
        // operator's stays on the interface.
        wait_until("idle addresses replaced", Duration::from_secs(3), || {
            let on = proxy.addresses_in(PROXY_IF, POOL_V6).unwrap();
            first.iter().all(|a| *a == operator || !on.contains(a)) && pool.held().len() >= 3
        })
        .await;
        assert!(
            proxy
                .addresses_in(PROXY_IF, POOL_V6)
                .unwrap()
                .contains(&operator)
        );
        assert!(pool.metrics().retired_total >= 3);
        pool.shutdown().await;
        assert_eq!(
            proxy.addresses_in(PROXY_IF, POOL_V6).unwrap(),
            vec![operator]
        );

        // use_existing = false: the existing address is neither adopted nor
        // handed out; the failure is counted and the next one is tried.
        let no = NetlinkOptions {
            use_existing: false,
            ..NetlinkOptions::new(PROXY_IF)
        };
        let opts = PoolOptions {
            keep_assigned: 1,
            max_assigned: 2,
            ..Default::default()
        };
        let pool = Pool::start(
            "2001:db8:251::a9-2001:db8:251::ab".parse().unwrap(),
            Assigner::Netlink(no),
            opts,
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        while let Ok(l) = pool.lease().await {
            got.push(l.source());
        }
        let want: Vec<IpAddr> = ["2001:db8:251::a9", "2001:db8:251::ab"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
        assert_eq!(pool.metrics().assign_failures_total, 1);
        pool.shutdown().await;
        assert_eq!(
            proxy.addresses_in(PROXY_IF, POOL_V6).unwrap(),
            vec![operator]
        );

        // Unknown interface, by name and by index.
        for iface in [Interface::from("nope0"), Interface::Index(9999)] {
            let err = Pool::start(
                POOL_V6.parse().unwrap(),
                Assigner::Netlink(NetlinkOptions::new(iface.clone())),
                PoolOptions::default(),
            )
            .await
            .unwrap_err();
            assert!(
                matches!(err, PoolError::InterfaceNotFound { .. }),
                "{iface}: {err}"
            );
        }
    });
}

#[test]
fn netlink_ipv4_with_dad_wait_and_interface_index() {
    let bed = bed();
    let server = bed.start_upstream_server(PORT).unwrap();
    let proxy = bed.proxy();
    proxy.run(|| async {
        let out = proxy.ip(&["-o", "link", "show", "dev", PROXY_IF]).unwrap();
        let index: u32 = out.split(':').next().unwrap().trim().parse().unwrap();
        // IPv4 by interface index.
        let opts = PoolOptions {
            keep_assigned: 2,
            max_assigned: 4,
            ..Default::default()
        };
        let pool = Pool::start(
            POOL_V4.parse().unwrap(),
            Assigner::Netlink(NetlinkOptions::new(index)),
            opts,
        )
        .await
        .unwrap();
        for i in 1..=5u8 {
            let (src, seen) = fetch(&pool, up4()).await;
            assert_eq!(src, IpAddr::from([10, 251, 0, i]));
            assert_eq!(seen, src.to_string());
        }
        pool.shutdown().await;
        assert!(proxy.addresses_in(PROXY_IF, POOL_V4).unwrap().is_empty());

        // IPv6 with DAD: the lease waits until the address is no longer
        // tentative, so it binds and connects at once.
        let no = NetlinkOptions {
            skip_dad: false,
            assign_timeout: Duration::from_secs(5),
            ..NetlinkOptions::new(PROXY_IF)
        };
        let opts = PoolOptions {
            keep_assigned: 1,
            max_assigned: 1,
            lease_timeout: Duration::from_secs(6),
            ..Default::default()
        };
        let pool = Pool::start(
            "2001:db8:251::d0/124".parse().unwrap(),
            Assigner::Netlink(no),
            opts,
        )
        .await
        .unwrap();
        let (src, seen) = fetch(&pool, up6()).await;
        assert_eq!(seen, src.to_string());
        let m = pool.metrics();
        assert!(
            m.assign_latency_max >= Duration::from_millis(100),
            "waited for DAD: {m:?}"
        );
        pool.shutdown().await;
        assert!(proxy.addresses_in(PROXY_IF, POOL_V6).unwrap().is_empty());
    });
    assert_eq!(server.peers().len(), 6);
}

/// Whether `local CIDR dev lo` is in the proxy namespace's routing tables.
fn local_route(ns: &testbed::Netns, cidr: &str) -> bool {
    let all = ns.ip(&["route", "show", "table", "all"]).unwrap()
        + &ns.ip(&["-6", "route", "show", "table", "all"]).unwrap();
    all.lines()
        .any(|l| l.starts_with(&format!("local {cidr} dev lo table local")))
}

#[test]
fn freebind_checks_or_adds_the_local_route() {
    let bed = bed();
    let server = bed.start_upstream_server(PORT).unwrap();
    let proxy = bed.proxy();
    proxy.run(|| async {
        for (cidr, dest) in [(POOL_V4, up4()), (POOL_V6, up6())] {
            let err = Pool::start(
                cidr.parse().unwrap(),
                Assigner::Freebind(FreebindOptions::default()),
                PoolOptions::default(),
            )
            .await
            .unwrap_err();
            let want = format!("ip route add local {cidr} dev lo");
            assert!(matches!(err, PoolError::NoLocalRoute { .. }), "{err}");
            assert!(err.to_string().contains(&want), "{err}");

            let fb = FreebindOptions {
                add_local_route: true,
                ..Default::default()
            };
            let opts = PoolOptions {
                order: Order::Random,
                ..Default::default()
            };
            let pool = Pool::start(cidr.parse().unwrap(), Assigner::Freebind(fb), opts)
                .await
                .unwrap();
            assert!(local_route(proxy, cidr), "route added");
            let mut seen = HashSet::new();
            for _ in 0..20 {
                let (src, body) = fetch(&pool, dest).await;
                assert_eq!(body, src.to_string());
                seen.insert(src);
            }
            assert_eq!(seen.len(), 20);
            assert!(
                proxy.addresses_in(PROXY_IF, cidr).unwrap().is_empty(),
                "freebind assigns nothing"
            );
            pool.shutdown().await;
            assert!(!local_route(proxy, cidr), "route removed on exit");
        }
        // A route added by the operator is accepted and left alone.
        proxy
            .ip(&["route", "add", "local", POOL_V4, "dev", "lo"])
            .unwrap();
        let pool = Pool::start(
            POOL_V4.parse().unwrap(),
            Assigner::Freebind(FreebindOptions::default()),
            PoolOptions::default(),
        )
        .await
        .unwrap();
        let (src, _) = fetch(&pool, up4()).await;
        assert_eq!(src, IpAddr::from([10, 251, 0, 1]));
        pool.shutdown().await;
        assert!(
            local_route(proxy, POOL_V4),
            "the operator's route is left alone"
        );
    });
    assert_eq!(server.peers().len(), 41);
}

#[test]
fn static_pool_uses_addresses_already_there() {
    let bed = bed();
    let server = bed.start_upstream_server(PORT).unwrap();
    let proxy = bed.proxy();
    for a in ["10.251.0.10/32", "10.251.0.11/32", "10.251.0.12/32"] {
        proxy.ip(&["addr", "add", a, "dev", PROXY_IF]).unwrap();
    }
    let seen = proxy.run(|| async {
        let opts = PoolOptions {
            strategy: Strategy::RoundRobin,
            max_uses: None,
            ..Default::default()
        };
        let pool = Pool::start(
            "10.251.0.10-10.251.0.12".parse::<Source>().unwrap(),
            Assigner::Static,
            opts,
        )
        .await
        .unwrap();
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(fetch(&pool, up4()).await.0);
        }
        pool.shutdown().await;
        seen
    });
    let want: Vec<IpAddr> = [10, 11, 12, 10, 11, 12]
        .iter()
        .map(|d| IpAddr::from([10, 251, 0, *d]))
        .collect();
    assert_eq!(seen, want);
    assert_eq!(server.peers(), want);
    assert_eq!(
        proxy.addresses_in(PROXY_IF, POOL_V4).unwrap().len(),
        3,
        "static leaves addresses alone"
    );
}

#[test]
fn ipv6_pool_and_ipv4_only_destination_fail_closed() {
    let bed = bed();
    // The upstream listens on IPv4 only.
    let listener = bed
        .upstream()
        .tcp_listener(SocketAddr::new(UPSTREAM_V4.into(), PORT))
        .unwrap();
    let server = testbed::PeerServer::start(listener).unwrap();
    let proxy = bed.proxy();
    proxy.run(|| async {
        let pool = Pool::start(
            POOL_V6.parse().unwrap(),
            Assigner::Netlink(NetlinkOptions::new(PROXY_IF)),
            PoolOptions::default(),
        )
        .await
        .unwrap();
        let err = pool.connect(up4()).await.unwrap_err();
        assert!(matches!(err, ConnectError::FamilyMismatch { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "a pool of IPv6 addresses cannot reach {}; refusing to connect from the host's default address",
                up4()
            )
        );
        let uri: http::Uri = format!("http://{}/", up4()).parse().unwrap();
        let mut connector = pool.connector();
        let err = tower::Service::call(&mut connector, uri).await.unwrap_err();
        assert!(matches!(err, ConnectError::FamilyMismatch { .. }), "{err}");
        assert_eq!(pool.metrics().leased_total, 0);
        pool.shutdown().await;
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        server.peers().is_empty(),
        "no connection reached the upstream"
    );
}
