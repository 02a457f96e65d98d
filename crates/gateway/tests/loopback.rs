//! End-to-end tests over a 127.0.0.0/24 loopback pool (all of 127/8 is
//! local on Linux): no root, no namespace.

mod support;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use addrpool::{Assigner, Outcome, Pool, PoolOptions, Strategy};
use gateway::egress::{EgressOptions, EgressProxy, Protocol, RequestResult, SessionFrom};
use support::{Dest, Outcomes, Running, connect, get, get_over, raw, socks5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn pool_with(opts: PoolOptions) -> Pool {
    Pool::start("127.0.0.0/24".parse().unwrap(), Assigner::Static, opts)
        .await
        .expect("loopback pool")
}

/// Options allowing loopback destinations (the default policy denies them).
fn allowing_loopback(pool: &Pool) -> EgressOptions {
    let opts = EgressOptions::new(pool.clone());
    opts.policy.update(|p| {
        p.allow.add("127.0.0.0/8".parse().unwrap());
    });
    opts
}

fn upstream() -> testbed::PeerServer {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    testbed::PeerServer::start(l).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_forward_rotates_and_tells_the_source() {
    let outcomes = Outcomes::default();
    let pool = pool_with(PoolOptions {
        outcomes: Some(outcomes.sink()),
        ..Default::default()
    })
    .await;
    let proxy = Running::start(allowing_loopback(&pool)).await;
    let up = upstream();
    let url = format!("http://{}/x?y=1", up.local_addr());
    let mut seen = HashSet::new();
    for _ in 0..4 {
        let r = get(proxy.addr, &url, None).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            r.body,
            r.source().to_string(),
            "upstream saw the told source"
        );
        assert!(r.header("connection").is_none_or(|c| c == "close"));
        seen.insert(r.source());
    }
    assert_eq!(
        seen.len(),
        4,
        "fresh + max_uses = 1: a new source per request"
    );
    assert_eq!(up.peers().len(), 4);
    assert!(outcomes.has(Outcome::Status(200)));
    assert!(outcomes.has(Outcome::Connected));
    let m = proxy.metrics.snapshot();
    assert_eq!(m.requests(Protocol::Http, RequestResult::Ok), 4);
    assert!(m.bytes_down_total >= 4 * "127.0.0.1".len() as u64, "{m:?}");
    proxy.stop().await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_dials_first_and_tunnels() {
    let outcomes = Outcomes::default();
    let pool = pool_with(PoolOptions {
        outcomes: Some(outcomes.sink()),
        ..Default::default()
    })
    .await;
    let proxy = Running::start(allowing_loopback(&pool)).await;
    let up = upstream();
    let (head, tunnelled) = connect(proxy.addr, &up.local_addr().to_string(), None).await;
    assert_eq!(head.status, 200);
    assert!(
        head.head.starts_with("HTTP/1.1 200 Connection established"),
        "{}",
        head.head
    );
    let body = tunnelled.expect("tunnel").body;
    assert_eq!(body, head.source().to_string());
    // Connection refused: 502 with the reason, and the outcome reported.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (head, none) = connect(proxy.addr, &closed.to_string(), None).await;
    assert_eq!(head.status, 502, "{head:?}");
    assert!(none.is_none());
    assert!(
        head.header("x-ippool-error").unwrap().contains("refused"),
        "{head:?}"
    );
    assert!(outcomes.has(Outcome::ConnectFailed));
    assert!(outcomes.has(Outcome::Success));
    // A destination that accepts and closes at once: EarlyEof.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let early = l.local_addr().unwrap();
    let closer = tokio::spawn(async move {
        if let Ok((s, _)) = l.accept().await {
            drop(s);
        }
    });
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(format!("CONNECT {early} HTTP/1.1\r\nHost: {early}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(support::IO_TIMEOUT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    closer.await.unwrap();
    drop(s);
    for _ in 0..100 {
        if outcomes.has(Outcome::EarlyEof) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(outcomes.has(Outcome::EarlyEof), "{:?}", outcomes.all());
    proxy.stop().await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_ipv4_and_domain_names() {
    let pool = pool_with(PoolOptions::default()).await;
    let proxy = Running::start(allowing_loopback(&pool)).await;
    let up = upstream();
    let (s, bound) = socks5(proxy.addr, None, Dest::Ip(up.local_addr()))
        .await
        .unwrap();
    assert_eq!(
        get_over(s).await,
        bound.ip().to_string(),
        "BND.ADDR is the source"
    );
    let (s, bound) = socks5(
        proxy.addr,
        None,
        Dest::Name("localhost", up.local_addr().port()),
    )
    .await
    .unwrap();
    assert!(bound.ip().is_loopback());
    assert_eq!(get_over(s).await, bound.ip().to_string());
    // Refused by the destination: reply 0x05.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert_eq!(
        socks5(proxy.addr, None, Dest::Ip(closed))
            .await
            .unwrap_err(),
        0x05
    );
    // An unknown name: host unreachable.
    assert_eq!(
        socks5(proxy.addr, None, Dest::Name("no-such-host.invalid", 80))
            .await
            .unwrap_err(),
        0x04
    );
    let m = proxy.metrics.snapshot();
    assert_eq!(m.requests(Protocol::Socks5, RequestResult::Ok), 2);
    assert_eq!(m.requests(Protocol::Socks5, RequestResult::BadGateway), 2);
    proxy.stop().await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_get_407_and_socks_failure() {
    let pool = pool_with(PoolOptions::default()).await;
    let mut opts = allowing_loopback(&pool);
    opts.users.insert("alice".into(), "s3cret".into());
    let proxy = Running::start(opts).await;
    let up = upstream();
    let url = format!("http://{}/", up.local_addr());
    for creds in [None, Some(("alice", "wrong")), Some(("bob", "s3cret"))] {
        let r = get(proxy.addr, &url, creds).await;
        assert_eq!(r.status, 407, "{creds:?}: {r:?}");
        assert_eq!(
            r.header("proxy-authenticate").as_deref(),
            Some("Basic realm=\"ippool\"")
        );
        let (head, _) = connect(proxy.addr, &up.local_addr().to_string(), creds).await;
        assert_eq!(head.status, 407);
    }
    let r = get(proxy.addr, &url, Some(("alice", "s3cret"))).await;
    assert_eq!(r.status, 200);
    let r = get(
        proxy.addr,
        &url,
        Some(("alice-session-abc-ttl-30", "s3cret")),
    )
    .await;
    assert_eq!(r.status, 200);
    let (head, _) = connect(
        proxy.addr,
        &up.local_addr().to_string(),
        Some(("alice", "s3cret")),
    )
    .await;
    assert_eq!(head.status, 200);
    // SOCKS5: no-auth is not offered; a wrong password gets status 0x01.
    assert_eq!(
        socks5(proxy.addr, None, Dest::Ip(up.local_addr()))
            .await
            .unwrap_err(),
        0x1FF
    );
    assert_eq!(
        socks5(
            proxy.addr,
            Some(("alice", "nope")),
            Dest::Ip(up.local_addr())
        )
        .await
        .unwrap_err(),
        0x101
    );
    let (s, _) = socks5(
        proxy.addr,
        Some(("alice", "s3cret")),
        Dest::Ip(up.local_addr()),
    )
    .await
    .unwrap();
    assert!(!get_over(s).await.is_empty());
    assert_eq!(
        up.peers().len(),
        4,
        "no upstream connection for a refused client"
    );
    let m = proxy.metrics.snapshot();
    assert_eq!(m.requests(Protocol::Http, RequestResult::AuthFailed), 3);
    assert_eq!(m.requests(Protocol::Connect, RequestResult::AuthFailed), 3);
    assert_eq!(m.requests(Protocol::Socks5, RequestResult::AuthFailed), 2);
    proxy.stop().await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_policy_refuses_by_default_and_changes_at_run_time() {
    let pool = pool_with(PoolOptions::default()).await;
    let opts = EgressOptions::new(pool.clone()); // default policy
    let policy = opts.policy.clone();
    let proxy = Running::start(opts).await;
    let up = upstream();
    let port = up.local_addr().port();
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://localhost:{port}/"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/".to_owned(),
    ] {
        let r = get(proxy.addr, &url, None).await;
        assert_eq!(r.status, 403, "{url}: {r:?}");
        assert!(
            r.header("x-ippool-error").unwrap().contains("not allowed"),
            "{r:?}"
        );
    }
    let r = get(proxy.addr, &format!("http://127.0.0.1:{port}/"), None).await;
    assert!(
        r.body.contains("loopback"),
        "the reason names the rule: {r:?}"
    );
    let (head, _) = connect(proxy.addr, "169.254.169.254:443", None).await;
    assert_eq!(head.status, 403);
    assert_eq!(
        socks5(proxy.addr, None, Dest::Ip(up.local_addr()))
            .await
            .unwrap_err(),
        0x02,
        "connection not allowed by ruleset"
    );
    assert!(up.peers().is_empty(), "nothing reached the destination");
    // Punch a hole at run time.
    policy.update(|p| {
        p.allow.add("127.0.0.0/8".parse().unwrap());
    });
    let r = get(proxy.addr, &format!("http://127.0.0.1:{port}/"), None).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        proxy
            .metrics
            .snapshot()
            .requests(Protocol::Http, RequestResult::Denied),
        6
    );
    proxy.stop().await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_the_proxy_keeps_serving() {
    let pool = pool_with(PoolOptions::default()).await;
    let proxy = Running::start(allowing_loopback(&pool)).await;
    let up = upstream();
    let bad: [&[u8]; 9] = [
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"HELLO WORLD\r\n\r\n",
        b"CONNECT nohostport HTTP/1.1\r\n\r\n",
        b"CONNECT example.com:0 HTTP/1.1\r\n\r\n",
        b"GET https://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"GET http:/// HTTP/1.1\r\n\r\n",
        b"GET http://example.com/ HTTP/1.1\r\nBad Header\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
    ];
    for req in bad {
        let out = raw(proxy.addr, req).await;
        assert!(
            out.starts_with("HTTP/1.1 400"),
            "{:?} -> {out:?}",
            String::from_utf8_lossy(req)
        );
    }
    // A head larger than max_header_bytes.
    let big = format!(
        "GET http://{}/ HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        up.local_addr(),
        "a".repeat(100 * 1024)
    );
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let _ = s.write_all(big.as_bytes()).await;
    let mut out = Vec::new();
    // 431 then close; the unread rest of the head may turn the close into
    // a reset before the client reads the reply.
    let _ = tokio::time::timeout(support::IO_TIMEOUT, s.read_to_end(&mut out))
        .await
        .expect("closed");
    let out = String::from_utf8_lossy(&out);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 431"), "{out:?}");
    assert!(up.peers().is_empty());
    // SOCKS5 garbage and a wrong command are refused without harm.
    let out = raw(
        proxy.addr,
        b"\x05\x01\x00\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50",
    )
    .await;
    assert_eq!(
        out.as_bytes().get(3),
        Some(&0x07),
        "command not supported: {out:?}"
    );
    let out = raw(proxy.addr, b"\x05\x01\x00\x05\x01\x00\x07").await;
    assert_eq!(
        out.as_bytes().get(3),
        Some(&0x08),
        "address type not supported"
    );
    // A truncated greeting: closed once the client half-closes.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"\x05").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(support::IO_TIMEOUT, s.read_to_end(&mut out))
        .await
        .expect("closed")
        .unwrap();
    assert!(out.is_empty());
    // Still serving.
    let r = get(proxy.addr, &format!("http://{}/", up.local_addr()), None).await;
    assert_eq!(r.status, 200);
    assert!(
        proxy
            .metrics
            .snapshot()
            .requests(Protocol::Http, RequestResult::BadRequest)
            >= 4
    );
    proxy.stop().await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_sessions_by_username_and_by_host() {
    let pool = pool_with(PoolOptions {
        strategy: Strategy::Sticky,
        max_uses: None,
        ..Default::default()
    })
    .await;
    let proxy = Running::start(allowing_loopback(&pool)).await;
    let up = upstream();
    let url = format!("http://{}/", up.local_addr());
    let src = |r: support::Resp| {
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body, r.source().to_string());
        r.source()
    };
    let a1 = src(get(proxy.addr, &url, Some(("u-session-a", "x"))).await);
    let a2 = src(get(proxy.addr, &url, Some(("u-session-a", "x"))).await);
    let (s, bound) = socks5(
        proxy.addr,
        Some(("u-session-a", "x")),
        Dest::Ip(up.local_addr()),
    )
    .await
    .unwrap();
    drop(s);
    let b = src(get(proxy.addr, &url, Some(("u-session-b", "x"))).await);
    assert_eq!(a1, a2, "same session, same source");
    assert_eq!(bound.ip(), a1, "across protocols too");
    assert_ne!(a1, b, "another session, another source");
    // TTL: a new source once the session expired.
    let t1 = src(get(proxy.addr, &url, Some(("u-session-t-ttl-1", "x"))).await);
    let t2 = src(get(proxy.addr, &url, Some(("u-session-t-ttl-1", "x"))).await);
    assert_eq!(t1, t2);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let t3 = src(get(proxy.addr, &url, Some(("u-session-t-ttl-1", "x"))).await);
    assert_ne!(t1, t3, "expired session, new source");
    proxy.stop().await;

    // Session from the destination host.
    let mut opts = allowing_loopback(&pool);
    opts.session_from = SessionFrom::Host;
    let proxy = Running::start(opts).await;
    let by_ip = format!("http://127.0.0.1:{}/", up.local_addr().port());
    let by_name = format!("http://localhost:{}/", up.local_addr().port());
    let h1 = src(get(proxy.addr, &by_ip, None).await);
    let h2 = src(get(proxy.addr, &by_ip, None).await);
    let h3 = src(get(proxy.addr, &by_name, None).await);
    assert_eq!(h1, h2);
    assert_ne!(h1, h3);
    proxy.stop().await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_per_source_follows_rotation() {
    // Two sources, round robin: requests alternate sources, and each source
    // reuses its own upstream connection.
    let pool = Pool::start(
        "127.0.0.10-127.0.0.11".parse().unwrap(),
        Assigner::Static,
        PoolOptions {
            strategy: Strategy::RoundRobin,
            max_uses: None,
            keep_assigned: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let proxy = Running::start(allowing_loopback(&pool)).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let server = support::keepalive_upstream(l).await;
    let url = format!("http://{up}/");
    let mut seen: Vec<(IpAddr, SocketAddr)> = Vec::new();
    for _ in 0..6 {
        let r = get(proxy.addr, &url, None).await;
        assert_eq!(r.status, 200, "{r:?}");
        let peer: SocketAddr = r.body.parse().unwrap();
        assert_eq!(peer.ip(), r.source());
        seen.push((r.source(), peer));
    }
    let sources: HashSet<IpAddr> = seen.iter().map(|s| s.0).collect();
    let conns: HashSet<SocketAddr> = seen.iter().map(|s| s.1).collect();
    assert_eq!(sources.len(), 2, "rotation kept: {seen:?}");
    for w in seen.windows(2) {
        assert_ne!(w[0].0, w[1].0, "round robin alternates: {seen:?}");
    }
    assert_eq!(
        conns.len(),
        2,
        "one upstream connection per source: {seen:?}"
    );
    proxy.stop().await;
    server.abort();

    // Fresh + max_uses = 1: nothing is kept, a new connection every time.
    let pool1 = pool_with(PoolOptions::default()).await;
    let proxy = Running::start(allowing_loopback(&pool1)).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let server = support::keepalive_upstream(l).await;
    let mut conns = HashSet::new();
    for _ in 0..3 {
        let r = get(proxy.addr, &format!("http://{up}/"), None).await;
        conns.insert(r.body);
    }
    assert_eq!(conns.len(), 3);
    proxy.stop().await;
    server.abort();
    pool.shutdown().await;
    pool1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_without_address_gets_503_and_timeouts_504() {
    let pool = Pool::start(
        "127.0.0.20/32".parse().unwrap(),
        Assigner::Static,
        PoolOptions {
            lease_timeout: Duration::from_millis(200),
            connect_timeout: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut opts = allowing_loopback(&pool);
    opts.connect_timeout = Duration::from_millis(500);
    let proxy = Running::start(opts).await;
    let up = upstream();
    let url = format!("http://{}/", up.local_addr());
    assert_eq!(get(proxy.addr, &url, None).await.status, 200);
    let r = get(proxy.addr, &url, None).await;
    assert_eq!(r.status, 503, "the only address is used up: {r:?}");
    assert_eq!(
        socks5(proxy.addr, None, Dest::Ip(up.local_addr()))
            .await
            .unwrap_err(),
        0x01
    );
    proxy.stop().await;
    pool.shutdown().await;

    // A destination whose accept queue is full drops SYNs: connect times out.
    let pool = pool_with(PoolOptions {
        connect_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let mut opts = allowing_loopback(&pool);
    opts.connect_timeout = Duration::from_millis(500);
    let proxy = Running::start(opts).await;
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.listen(0).unwrap();
    let full = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(full),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let (head, _) = connect(proxy.addr, &full.to_string(), None).await;
    assert_eq!(head.status, 504, "{head:?}");
    assert!(head.header("x-ippool-error").unwrap().contains("timed out"));
    proxy.stop().await;
    pool.shutdown().await;
    drop(sock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_proxy_needs_opt_in_and_shutdown_drains_tunnels() {
    let pool = pool_with(PoolOptions::default()).await;
    let mut opts = allowing_loopback(&pool);
    opts.listen = "0.0.0.0:0".parse().unwrap();
    let err = EgressProxy::bind(opts.clone()).await.unwrap_err();
    assert!(err.to_string().contains("open proxy"), "{err}");
    opts.open = true;
    drop(EgressProxy::bind(opts.clone()).await.expect("open = true"));
    opts.open = false;
    opts.users.insert("u".into(), "p".into());
    drop(EgressProxy::bind(opts).await.expect("with users"));

    // A tunnel open at shutdown keeps working until it ends.
    let mut opts = allowing_loopback(&pool);
    opts.drain_timeout = Duration::from_secs(5);
    let proxy = Running::start(opts).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = l.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let (mut s, _) = socks5(proxy.addr, None, Dest::Ip(echo_addr)).await.unwrap();
    for _ in 0..100 {
        if proxy.metrics.snapshot().active_tunnels == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(proxy.metrics.snapshot().active_tunnels, 1);
    let metrics = proxy.metrics.clone();
    let addr = proxy.addr;
    let stopping = tokio::spawn(proxy.stop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    drop(s);
    stopping.await.unwrap();
    echo.await.unwrap();
    assert_eq!(metrics.snapshot().active_tunnels, 0);
    pool.shutdown().await;
}
