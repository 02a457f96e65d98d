//! DNS rebinding: a resolver that changes its answers cannot make the
//! proxy dial a refused address. The proxy resolves once per request,
//! checks every address returned, and dials only a checked one, for HTTP,
//! CONNECT and SOCKS5 alike.

mod support;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use addrpool::{Assigner, Pool, PoolOptions};
use gateway::egress::{EgressOptions, Resolve, Resolving};
use support::{Dest, Running, connect, get, socks5};

/// Answers `rebind.test` with each of `answers` in turn; counts calls.
struct Flipping {
    answers: Vec<Vec<IpAddr>>,
    calls: AtomicUsize,
}

impl Resolve for Flipping {
    fn resolve<'a>(&'a self, host: &'a str, _port: u16) -> Resolving<'a> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let answer = if host == "rebind.test" {
            Ok(self.answers[n % self.answers.len()].clone())
        } else {
            Err(std::io::Error::other("unknown host"))
        };
        Box::pin(async move { answer })
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebinding_resolver_never_gets_a_refused_address_dialled() {
    // The allowed destination and the "internal" one share a port.
    let good = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = good.local_addr().unwrap().port();
    let internal = std::net::TcpListener::bind(("127.0.0.2", port)).unwrap();
    let good = testbed::PeerServer::start(good).unwrap();
    let internal = testbed::PeerServer::start(internal).unwrap();

    let pool = Pool::start(
        "127.0.0.0/24".parse().unwrap(),
        Assigner::Static,
        PoolOptions::default(),
    )
    .await
    .unwrap();
    let resolver = Arc::new(Flipping {
        answers: vec![
            vec![ip("127.0.0.1")],                  // looks harmless
            vec![ip("127.0.0.2")],                  // then points inside
            vec![ip("127.0.0.2"), ip("127.0.0.1")], // or both at once
        ],
        calls: AtomicUsize::new(0),
    });
    let mut opts = EgressOptions::new(pool.clone());
    // Only 127.0.0.1 is a hole in the default deny list (loopback).
    opts.policy.update(|p| {
        p.allow.add("127.0.0.1".parse().unwrap());
    });
    opts.resolver = resolver.clone();
    let proxy = Running::start(opts).await;
    let url = format!("http://rebind.test:{port}/");

    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(get(proxy.addr, &url, None).await.status);
    }
    assert_eq!(
        statuses,
        [200, 403, 200, 200, 403, 200],
        "one resolution per request"
    );
    assert_eq!(resolver.calls.load(Ordering::SeqCst), 6);

    let target = format!("rebind.test:{port}");
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        tunnels.push(connect(proxy.addr, &target, None).await.0.status);
    }
    assert_eq!(tunnels, [200, 403, 200]);
    let mut socks = Vec::new();
    for _ in 0..3 {
        let r = socks5(proxy.addr, None, Dest::Name("rebind.test", port)).await;
        socks.push(r.map(|_| 0u16).unwrap_or_else(|code| code));
    }
    assert_eq!(
        socks,
        [0x00, 0x02, 0x00],
        "SOCKS5: ruleset refusal in the middle"
    );

    // The upstream records a peer on its own thread, a moment after the
    // proxy reported the tunnel up: wait for the count (bounded).
    let t0 = std::time::Instant::now();
    while good.peers().len() < 4 + 2 + 2 && t0.elapsed() < std::time::Duration::from_secs(5) {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(good.peers().len(), 4 + 2 + 2);
    assert!(
        internal.peers().is_empty(),
        "the internal address was never dialled"
    );
    proxy.stop().await;
    pool.shutdown().await;
}
