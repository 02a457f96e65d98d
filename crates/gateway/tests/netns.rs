//! End-to-end tests against the real kernel in network namespaces made by
//! `testbed` (needs root: without it these tests fail, they do not skip).
//!
//! The upstream lives at 10.250.0.2 / fd00:250::2, private addresses the
//! default destination policy refuses: every test allows them explicitly.

mod support;

use std::net::{IpAddr, SocketAddr};

use addrpool::{Assigner, FreebindOptions, NetlinkOptions, Outcome, Pool, PoolOptions, Source};
use gateway::egress::EgressOptions;
use support::{Dest, Outcomes, Running, connect, get, get_over, socks5};
use testbed::{POOL_V4, POOL_V6, PROXY_IF, Testbed, UPSTREAM_V4, UPSTREAM_V6};

const PORT: u16 = 8080;

fn bed() -> Testbed {
    Testbed::new().expect("testbed (these tests need root)")
}

fn options(pool: &Pool) -> EgressOptions {
    let opts = EgressOptions::new(pool.clone());
    opts.policy.update(|p| {
        p.allow.add("10.250.0.0/24".parse().unwrap());
        p.allow.add("fd00:250::/64".parse().unwrap());
    });
    opts
}

fn in_range(ip: IpAddr, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').unwrap();
    let len: u32 = len.parse().unwrap();
    match (net.parse::<IpAddr>().unwrap(), ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let m = u32::MAX << (32 - len);
            u32::from(n) & m == u32::from(a) & m
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let m = u128::MAX << (128 - len);
            u128::from(n) & m == u128::from(a) & m
        }
        _ => false,
    }
}

/// HTTP, CONNECT and SOCKS5 through a proxy over `pool` to `upstream`;
/// every exchange must leave from a pool address, and the upstream must
/// see the address the client was told.
async fn all_protocols(pool: &Pool, upstream: SocketAddr, cidr: &str) -> Vec<IpAddr> {
    let outcomes_seen = pool.metrics().leased_total;
    let proxy = Running::start(options(pool)).await;
    let host = match upstream {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    let mut used = Vec::new();
    let r = get(proxy.addr, &format!("http://{host}/"), None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, r.source().to_string());
    used.push(r.source());
    let (head, tunnelled) = connect(proxy.addr, &host, None).await;
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(tunnelled.unwrap().body, head.source().to_string());
    used.push(head.source());
    let (s, bound) = socks5(proxy.addr, None, Dest::Ip(upstream)).await.unwrap();
    assert_eq!(get_over(s).await, bound.ip().to_string());
    used.push(bound.ip());
    for ip in &used {
        assert!(in_range(*ip, cidr), "{ip} is a pool address of {cidr}");
    }
    assert!(pool.metrics().leased_total >= outcomes_seen + 3);
    proxy.stop().await;
    used
}

#[test]
fn netlink_ipv6_pool_all_protocols() {
    let bed = bed();
    let server = bed.start_upstream_server(PORT).unwrap();
    bed.proxy().run(|| async {
        let pool = Pool::start(
            POOL_V6.parse().unwrap(),
            Assigner::Netlink(NetlinkOptions::new(PROXY_IF)),
            PoolOptions {
                keep_assigned: 3,
                ..Default::default()
            },
        )
        .await
        .expect("netlink pool");
        let used = all_protocols(&pool, SocketAddr::new(UPSTREAM_V6.into(), PORT), POOL_V6).await;
        assert_eq!(used.len(), 3);
        assert_ne!(
            used[0], used[1],
            "fresh, max_uses = 1: a new source each time"
        );
        pool.shutdown().await;
    });
    assert_eq!(server.peers().len(), 3);
}

#[test]
fn freebind_ipv4_pool_all_protocols() {
    let bed = bed();
    let server = bed.start_upstream_server(PORT).unwrap();
    bed.proxy().run(|| async {
        let pool = Pool::start(
            POOL_V4.parse().unwrap(),
            Assigner::Freebind(FreebindOptions {
                add_local_route: true,
                ..Default::default()
            }),
            PoolOptions::default(),
        )
        .await
        .expect("freebind pool");
        all_protocols(&pool, SocketAddr::new(UPSTREAM_V4.into(), PORT), POOL_V4).await;
        pool.shutdown().await;
    });
    assert_eq!(server.peers().len(), 3);
}

#[test]
fn static_ipv4_pool_all_protocols() {
    let bed = bed();
    let server = bed.start_upstream_server(PORT).unwrap();
    let addrs: Vec<IpAddr> = ["10.251.0.7", "10.251.0.8"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    for a in &addrs {
        bed.proxy()
            .ip(&["addr", "add", &format!("{a}/32"), "dev", PROXY_IF])
            .unwrap();
    }
    bed.proxy().run(|| async {
        let pool = Pool::start(
            Source::list(addrs.clone()).unwrap(),
            Assigner::Static,
            PoolOptions {
                max_uses: None,
                strategy: addrpool::Strategy::RoundRobin,
                ..Default::default()
            },
        )
        .await
        .expect("static pool");
        let used = all_protocols(&pool, SocketAddr::new(UPSTREAM_V4.into(), PORT), POOL_V4).await;
        assert!(used.iter().all(|u| addrs.contains(u)));
        pool.shutdown().await;
    });
    assert_eq!(server.peers().len(), 3);
}

#[test]
fn ipv6_pool_to_ipv4_only_destination_is_a_clear_502() {
    let bed = bed();
    let server = bed.start_upstream_server(PORT).unwrap();
    bed.proxy().run(|| async {
        let outcomes = Outcomes::default();
        let pool = Pool::start(
            POOL_V6.parse().unwrap(),
            Assigner::Freebind(FreebindOptions {
                add_local_route: true,
                ..Default::default()
            }),
            PoolOptions {
                outcomes: Some(outcomes.sink()),
                ..Default::default()
            },
        )
        .await
        .expect("freebind v6 pool");
        let proxy = Running::start(options(&pool)).await;
        let v4 = SocketAddr::new(UPSTREAM_V4.into(), PORT);
        let r = get(proxy.addr, &format!("http://{v4}/"), None).await;
        assert_eq!(r.status, 502, "{r:?}");
        let why = r.header("x-ippool-error").unwrap();
        assert!(why.contains("IPv6") && why.contains("refusing"), "{why}");
        let (head, _) = connect(proxy.addr, &v4.to_string(), None).await;
        assert_eq!(head.status, 502);
        assert_eq!(
            socks5(proxy.addr, None, Dest::Ip(v4)).await.unwrap_err(),
            0x03
        );
        assert!(
            !outcomes.all().iter().any(|(_, o)| *o == Outcome::Connected),
            "no connection was made"
        );
        // The same pool reaches the IPv6 address of the same upstream.
        let r = get(proxy.addr, &format!("http://[{UPSTREAM_V6}]:{PORT}/"), None).await;
        assert_eq!(r.status, 200);
        proxy.stop().await;
        pool.shutdown().await;
    });
    let peers = server.peers();
    assert_eq!(peers.len(), 1, "only the IPv6 request arrived: {peers:?}");
    assert!(peers[0].is_ipv6());
}
