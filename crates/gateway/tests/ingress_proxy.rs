//! The ingress proxy end to end on loopback: routing, balancing,
//! forwarding headers, limits, timeouts, retries, HTTP/2 (h2c),
//! WebSocket, keep-alive, runtime changes and graceful shutdown.

mod ingress_util;

use std::time::Duration;

use bytes::Bytes;
use gateway::ingress::{
    Backend as B, Balance, HashKey, Route, RouteMatch, RouteTable, TrustForwarded,
};
use http::{HeaderName, Request, StatusCode, Version};
use http_body_util::Full;
use ingress_util::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn table(routes: Vec<Route>) -> RouteTable {
    let t = RouteTable::default();
    for r in routes {
        t.upsert_route(r).unwrap();
    }
    t
}

fn backend(b: &Backend) -> B {
    B::new(b.name(), b.addr)
}

/// One route `r` for host `a.test` over `backends`.
fn one_route(balance: Balance, backends: &[&Backend]) -> RouteTable {
    let mut r = Route::new("r", RouteMatch::host("a.test")).with_balance(balance);
    for b in backends {
        r = r.with_backend(backend(b));
    }
    table(vec![r])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_exact_host_wildcard_and_longest_prefix() {
    let (exact, api, v2, wild, deep, any) = (
        Backend::start("exact").await,
        Backend::start("api").await,
        Backend::start("v2").await,
        Backend::start("wild").await,
        Backend::start("deep").await,
        Backend::start("any").await,
    );
    let routes = table(vec![
        Route::new("exact", RouteMatch::host("a.test")).with_backend(backend(&exact)),
        Route::new("api", RouteMatch::new(Some("a.test"), "/api")).with_backend(backend(&api)),
        Route::new("v2", RouteMatch::new(Some("a.test"), "/api/v2")).with_backend(backend(&v2)),
        Route::new("wild", RouteMatch::host("*.w.test")).with_backend(backend(&wild)),
        Route::new("deep", RouteMatch::host("*.deep.w.test")).with_backend(backend(&deep)),
        Route::new("any", RouteMatch::path("/")).with_backend(backend(&any)),
    ]);
    let p = Running::start(opts(&routes)).await;
    for (host, path, want) in [
        ("a.test", "/", "exact"),
        ("A.TEST:8080", "/index.html", "exact"),
        ("a.test", "/api", "api"),
        ("a.test", "/api/users?id=1", "api"),
        ("a.test", "/apis", "exact"),
        ("a.test", "/api/v2/x", "v2"),
        ("a.test", "/api/v2", "v2"),
        ("a.test", "/api/v20", "api"),
        ("x.w.test", "/", "wild"),
        ("x.y.w.test", "/a", "wild"),
        ("x.deep.w.test", "/", "deep"),
        ("w.test", "/", "any"),
        ("unknown.test", "/x", "any"),
    ] {
        let r = get(p.addr, host, path).await;
        assert_eq!(r.status, 200, "{host}{path}: {}", r.error());
        assert_eq!(r.backend(), want, "{host}{path}");
    }
    // The path reaches the backend as sent.
    get(p.addr, "a.test", "/api/users?id=1").await;
    assert_eq!(api.seen().uri, "/api/users?id=1");
    assert_eq!(api.seen().headers["host"], "a.test");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_is_404_with_reason() {
    let a = Backend::start("a").await;
    let p = Running::start(opts(&one_route(Balance::RoundRobin, &[&a]))).await;
    let r = get(p.addr, "b.test", "/x").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error(), "no route for b.test/x");
    assert_eq!(a.hits(), 0);
    assert_eq!(p.metrics.snapshot().no_route_total, 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_gives_exact_counts() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let routes = table(vec![
        Route::new("r", RouteMatch::host("a.test"))
            .with_backend(backend(&a).with_weight(3))
            .with_backend(backend(&b))
            .with_backend(backend(&c).with_weight(2)),
    ]);
    let p = Running::start(opts(&routes)).await;
    let mut client = H1::connect(p.addr).await;
    let mut order = Vec::new();
    for _ in 0..18 {
        order.push(client.get("a.test", "/").await.backend());
    }
    let t = tally(order.iter().map(String::as_str));
    assert_eq!(t["a"], 9, "{order:?}");
    assert_eq!(t["b"], 3, "{order:?}");
    assert_eq!(t["c"], 6, "{order:?}");
    // Smooth: no backend twice in a row more than its share allows.
    assert!(
        !order.windows(3).any(|w| w[0] == w[1] && w[1] == w[2]),
        "{order:?}"
    );
    // A weight change applies at once.
    p.routes.set_weight("a", 0).unwrap();
    let mut later = Vec::new();
    for _ in 0..6 {
        later.push(client.get("a.test", "/").await.backend());
    }
    let t = tally(later.iter().map(String::as_str));
    assert_eq!((t.get("a"), t["b"], t["c"]), (None, 2, 4), "{later:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_prefers_the_idle_backend() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let p = Running::start(opts(&one_route(Balance::LeastConnections, &[&a, &b]))).await;
    let addr = p.addr;
    let held = tokio::spawn(async move { get(addr, "a.test", "/hold").await });
    wait_for("one held request", || {
        a.state.holding.load(std::sync::atomic::Ordering::SeqCst)
            + b.state.holding.load(std::sync::atomic::Ordering::SeqCst)
            == 1
    })
    .await;
    let busy = if a.state.holding.load(std::sync::atomic::Ordering::SeqCst) == 1 {
        "a"
    } else {
        "b"
    };
    let idle = if busy == "a" { "b" } else { "a" };
    let mut client = H1::connect(p.addr).await;
    for _ in 0..10 {
        assert_eq!(client.get("a.test", "/").await.backend(), idle);
    }
    a.release();
    b.release();
    let r = held.await.unwrap();
    assert_eq!(r.backend(), busy);
    // Both idle again: ties rotate.
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(client.get("a.test", "/").await.backend());
    }
    assert!(
        seen.contains(&"a".to_owned()) && seen.contains(&"b".to_owned()),
        "{seen:?}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_follows_weights() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let routes = table(vec![
        Route::new("r", RouteMatch::host("a.test"))
            .with_balance(Balance::Random)
            .with_backend(backend(&a))
            .with_backend(backend(&b).with_weight(3)),
    ]);
    let p = Running::start(opts(&routes)).await;
    let mut client = H1::connect(p.addr).await;
    let mut names = Vec::new();
    for _ in 0..400 {
        names.push(client.get("a.test", "/").await.backend());
    }
    let t = tally(names.iter().map(String::as_str));
    assert!((240..=360).contains(&t["b"]), "{t:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_on_a_header_is_sticky_and_consistent() {
    let bs = [
        Backend::start("h0").await,
        Backend::start("h1").await,
        Backend::start("h2").await,
        Backend::start("h3").await,
    ];
    let key = Balance::Hash(HashKey::Header(HeaderName::from_static("x-user")));
    let p = Running::start(opts(&one_route(key, &[&bs[0], &bs[1], &bs[2]]))).await;
    let mut client = H1::connect(p.addr).await;
    async fn assign(client: &mut H1, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for u in 0..n {
            let mut req = request("GET", "a.test", "/");
            req.headers_mut()
                .insert("x-user", format!("user-{u}").parse().unwrap());
            out.push(client.send(req).await.unwrap().backend());
        }
        out
    }
    let first = assign(&mut client, 90).await;
    assert_eq!(assign(&mut client, 90).await, first, "sticky");
    let t = tally(first.iter().map(String::as_str));
    assert!(t.values().all(|&n| n >= 15), "spread: {t:?}");
    // A fourth backend takes about a quarter, only from the others.
    p.routes.upsert_backend("r", backend(&bs[3])).unwrap();
    let second = assign(&mut client, 90).await;
    let moved: Vec<(&String, &String)> =
        first.iter().zip(&second).filter(|(a, b)| a != b).collect();
    assert!(moved.len() <= 36, "{} of 90 moved", moved.len());
    assert!(!moved.is_empty());
    assert!(moved.iter().all(|(_, to)| *to == "h3"), "{moved:?}");
    // A request without the header is still served.
    assert_eq!(client.get("a.test", "/").await.status, 200);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_on_a_cookie_and_on_the_client_address() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let routes = table(vec![
        Route::new("cookie", RouteMatch::host("c.test"))
            .with_balance(Balance::Hash(HashKey::Cookie("sid".into())))
            .with_backend(backend(&a))
            .with_backend(backend(&b))
            .with_backend(backend(&c)),
        Route::new("ip", RouteMatch::host("i.test"))
            .with_balance(Balance::Hash(HashKey::ClientIp))
            .with_backend(B::new("ia", a.addr))
            .with_backend(B::new("ib", b.addr))
            .with_backend(B::new("ic", c.addr)),
    ]);
    let p = Running::start(opts(&routes)).await;
    let mut client = H1::connect(p.addr).await;
    let mut by_sid = std::collections::BTreeMap::new();
    for round in 0..3 {
        for sid in 0..20 {
            let mut req = request("GET", "c.test", "/");
            req.headers_mut()
                .insert("cookie", format!("theme=dark; sid=s{sid}").parse().unwrap());
            let who = client.send(req).await.unwrap().backend();
            if round == 0 {
                by_sid.insert(sid, who);
            } else {
                assert_eq!(by_sid[&sid], who, "sid s{sid}");
            }
        }
    }
    assert!(tally(by_sid.values().map(String::as_str)).len() >= 2);
    let ip: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..10 {
            v.push(get(p.addr, "i.test", "/").await.backend());
        }
        v
    };
    assert!(ip.iter().all(|x| *x == ip[0]), "{ip:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_prefers_the_fast_backend() {
    let (fast, slow) = (Backend::start("fast").await, Backend::start("slow").await);
    slow.set_delay(40);
    let p = Running::start(opts(&one_route(Balance::P2cEwma, &[&fast, &slow]))).await;
    let mut client = H1::connect(p.addr).await;
    let mut names = Vec::new();
    for _ in 0..60 {
        names.push(client.get("a.test", "/").await.backend());
    }
    let t = tally(names.iter().map(String::as_str));
    assert!(t["fast"] >= 50, "{t:?}");
    let snap = p.routes.snapshot();
    let (f, s) = (
        snap.backend("fast").unwrap().latency_ewma.unwrap(),
        snap.backend("slow").unwrap().latency_ewma.unwrap(),
    );
    assert!(s > f, "slow {s:?} fast {f:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_replace_untrusted_ones() {
    let a = Backend::start("a").await;
    let p = Running::start(opts(&one_route(Balance::RoundRobin, &[&a]))).await;
    let mut req = request("GET", "a.test", "/");
    for (k, v) in [
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "gopher"),
        ("x-forwarded-host", "evil.test"),
        ("forwarded", "for=6.6.6.6"),
    ] {
        req.headers_mut().insert(k, v.parse().unwrap());
    }
    assert_eq!(send(p.addr, req).await.unwrap().status, 200);
    let h = a.seen().headers;
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "a.test");
    assert_eq!(h["forwarded"], "for=127.0.0.1;host=a.test;proto=http");
    assert_eq!(h["via"], "1.1 ippool");
    assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_append_to_trusted_ones() {
    let a = Backend::start("a").await;
    let routes = one_route(Balance::RoundRobin, &[&a]);
    let mut o = opts(&routes);
    let mut loopback = iprules::RuleSet::new();
    loopback.add("127.0.0.0/8".parse().unwrap());
    o.forwarding.trust = TrustForwarded::From(loopback);
    let p = Running::start(o).await;
    let mut req = request("GET", "a.test:8080", "/");
    for (k, v) in [
        ("x-forwarded-for", "192.0.2.1"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "www.example.com"),
        ("forwarded", "for=192.0.2.1;proto=https"),
        ("via", "1.1 edge"),
    ] {
        req.headers_mut().insert(k, v.parse().unwrap());
    }
    assert_eq!(send(p.addr, req).await.unwrap().status, 200);
    let h = a.seen().headers;
    assert_eq!(h["x-forwarded-for"], "192.0.2.1, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "www.example.com");
    assert_eq!(
        h["forwarded"],
        "for=192.0.2.1;proto=https, for=127.0.0.1;host=\"a.test:8080\";proto=http"
    );
    let via: Vec<_> = h
        .get_all("via")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(via, ["1.1 edge", "1.1 ippool"]);
    p.stop().await;

    // Trust from another network only: replaced.
    let mut o = opts(&routes);
    let mut s = iprules::RuleSet::new();
    s.add("10.0.0.0/8".parse().unwrap());
    o.forwarding.trust = TrustForwarded::From(s);
    let p = Running::start(o).await;
    let mut req = request("GET", "a.test", "/");
    req.headers_mut()
        .insert("x-forwarded-for", "192.0.2.1".parse().unwrap());
    send(p.addr, req).await.unwrap();
    assert_eq!(a.seen().headers["x-forwarded-for"], "127.0.0.1");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let a = Backend::start("a").await;
    let p = Running::start(opts(&one_route(Balance::RoundRobin, &[&a]))).await;
    let mut req = request("GET", "a.test", "/hop");
    for (k, v) in [
        ("connection", "keep-alive, x-secret"),
        ("keep-alive", "timeout=5"),
        ("x-secret", "1"),
        ("te", "trailers"),
        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ("proxy-connection", "keep-alive"),
        ("x-kept", "yes"),
    ] {
        req.headers_mut().insert(k, v.parse().unwrap());
    }
    let r = send(p.addr, req).await.unwrap();
    assert_eq!(r.status, 200);
    let h = a.seen().headers;
    for gone in [
        "x-secret",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(!h.contains_key(gone), "{gone} reached the backend: {h:?}");
    }
    assert_ne!(
        h.get("connection").map(|v| v.to_str().unwrap()),
        Some("keep-alive, x-secret")
    );
    assert_eq!(h["x-kept"], "yes");
    assert_eq!(h["via"], "1.1 ippool");
    // The backend's hop-by-hop response headers stay on its connection.
    assert!(!r.headers.contains_key("x-resp-secret"), "{:?}", r.headers);
    assert!(!r.headers.contains_key("keep-alive"), "{:?}", r.headers);
    assert_eq!(r.backend(), "a");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_headers_get_431() {
    let a = Backend::start("a").await;
    let p = Running::start(opts(&one_route(Balance::RoundRobin, &[&a]))).await;
    let big = "x".repeat(40 * 1024);
    let resp = raw(
        p.addr,
        format!("GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(raw_status(&resp), 431, "{resp}");
    assert_eq!(a.hits(), 0);
    // Just under the limit is fine.
    let ok = "x".repeat(20 * 1024);
    let mut req = request("GET", "a.test", "/");
    req.headers_mut().insert("x-big", ok.parse().unwrap());
    assert_eq!(send(p.addr, req).await.unwrap().status, 200);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_gets_413() {
    let a = Backend::start("a").await;
    let routes = one_route(Balance::RoundRobin, &[&a]);
    let mut o = opts(&routes);
    o.max_body_bytes = Some(1000);
    let p = Running::start(o).await;
    // Content-Length over the limit: refused before a byte of body is read.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5000\r\n\r\n")
        .await
        .unwrap();
    let resp = read_to_close(&mut s).await;
    assert_eq!(raw_status(&resp), 413, "{resp}");
    assert!(
        resp.contains("request body larger than 1000 bytes"),
        "{resp}"
    );
    assert_eq!(a.hits(), 0);
    // Chunked: cut once the streamed body goes over.
    let mut chunked =
        b"POST /echo HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..10 {
        chunked.extend_from_slice(b"1f4\r\n");
        chunked.extend_from_slice(&[b'y'; 500]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let resp = raw(p.addr, &chunked).await;
    assert_eq!(raw_status(&resp), 413, "{resp}");
    // Under the limit, chunked or not, bodies stream through.
    let mut small = b"POST /echo HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    small.extend_from_slice(b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n");
    let resp = raw(p.addr, &small).await;
    assert_eq!(raw_status(&resp), 200, "{resp}");
    assert!(resp.ends_with("abcdef"), "{resp}");
    assert_eq!(p.metrics.snapshot().body_too_large_total, 2);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways() {
    let a = Backend::start("a").await;
    let p = Running::start(opts(&one_route(Balance::RoundRobin, &[&a]))).await;
    let body: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let req = Request::builder()
        .method("POST")
        .uri("/echo")
        .header("host", "a.test")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let r = send(p.addr, req).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.body == body,
        "echoed body differs ({} bytes)",
        r.body.len()
    );
    let r = get(p.addr, "a.test", "/big/3000000").await;
    assert_eq!(r.body.len(), 3_000_000);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_at_the_header_read_timeout() {
    let a = Backend::start("a").await;
    let routes = one_route(Balance::RoundRobin, &[&a]);
    let mut o = opts(&routes);
    o.header_read_timeout = Duration::from_millis(500);
    let p = Running::start(o).await;
    let addr = p.addr;
    let slow = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let t0 = tokio::time::Instant::now();
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let trickle = b"Host: a.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for &byte in trickle.iter() {
            if s.write_all(&[byte]).await.is_err() {
                return t0.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            // Closed by the proxy?
            let mut buf = [0u8; 512];
            match tokio::time::timeout(Duration::from_millis(1), s.peek(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return t0.elapsed(),
                Ok(Ok(_)) => {
                    // Whatever hyper wrote (e.g. a 408) then close.
                    let _ = read_to_close(&mut s).await;
                    return t0.elapsed();
                }
                Err(_) => {}
            }
        }
        t0.elapsed()
    });
    // Others are served meanwhile.
    for _ in 0..5 {
        assert_eq!(get(p.addr, "a.test", "/").await.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cut_after = slow.await.unwrap();
    assert!(
        cut_after >= Duration::from_millis(400) && cut_after < Duration::from_millis(2000),
        "cut after {cut_after:?}"
    );
    assert!(p.metrics.snapshot().malformed_total >= 1);
    // A client that connects and sends nothing is closed too.
    let mut idle = TcpStream::connect(p.addr).await.unwrap();
    let t0 = tokio::time::Instant::now();
    let _ = read_to_close(&mut idle).await;
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_400_and_the_server_survives() {
    let a = Backend::start("a").await;
    let p = Running::start(opts(&one_route(Balance::RoundRobin, &[&a]))).await;
    for junk in [
        &b"NOT HTTP AT ALL\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost a.test\r\n\r\n",
        b"\x01\x02\x03\x04\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\n\r\n",
    ] {
        let resp = raw(p.addr, junk).await;
        assert_eq!(raw_status(&resp), 400, "{junk:?} -> {resp:?}");
    }
    // No Host at all (HTTP/1.0 allows it): 400 from the proxy.
    let resp = raw(p.addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(raw_status(&resp), 400, "{resp}");
    assert!(resp.contains("no Host header"), "{resp}");
    assert_eq!(get(p.addr, "a.test", "/").await.status, 200);
    assert!(p.metrics.snapshot().malformed_total >= 4);
    assert_eq!(a.hits(), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_without_backends_answers_503_with_a_reason() {
    let mut custom = Route::new("custom", RouteMatch::host("c.test"));
    custom.no_backend_status = StatusCode::BAD_GATEWAY;
    let routes = table(vec![
        Route::new("empty", RouteMatch::host("e.test")),
        custom,
    ]);
    let p = Running::start(opts(&routes)).await;
    let r = get(p.addr, "e.test", "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.error(), "route `empty` has no backends");
    assert_eq!(r.text(), "route `empty` has no backends\n");
    assert_eq!(get(p.addr, "c.test", "/").await.status, 502);
    // Every backend at weight 0: still 503, saying why.
    let a = Backend::start("a").await;
    p.routes
        .upsert_backend("empty", backend(&a).with_weight(0))
        .unwrap();
    let r = get(p.addr, "e.test", "/").await;
    assert_eq!(r.status, 503);
    assert!(
        r.error().contains("1 draining or weight 0"),
        "{}",
        r.error()
    );
    p.routes.set_weight("a", 1).unwrap();
    assert_eq!(get(p.addr, "e.test", "/").await.status, 200);
    assert_eq!(p.metrics.snapshot().no_backend_total, 3);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_is_retried_on_another_backend_after_a_connect_failure_post_is_not() {
    let dead = Dead::new();
    let live = Backend::start("live").await;
    let routes = table(vec![
        Route::new("r", RouteMatch::host("a.test"))
            .with_backend(B::new("dead", dead.addr))
            .with_backend(backend(&live)),
    ]);
    let p = Running::start(opts(&routes)).await;
    let mut client = H1::connect(p.addr).await;
    // Round robin starts with `dead`: refused, retried on `live`.
    let r = client.get("a.test", "/").await;
    assert_eq!((r.status, r.backend().as_str()), (200, "live"));
    assert_eq!(p.metrics.snapshot().retries_total, 1);
    // The next turn is `dead` again: a POST is not retried.
    let r = client.send(request("POST", "a.test", "/")).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.error());
    assert!(
        r.error().contains("cannot connect to backend dead"),
        "{}",
        r.error()
    );
    assert_eq!(live.hits(), 1);
    assert_eq!(p.metrics.snapshot().retries_total, 1);
    let snap = p.routes.snapshot();
    assert_eq!(snap.backend("dead").unwrap().connect_errors_total, 2);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge() {
    let a = Backend::start("a").await;
    let p = Running::start(opts(&one_route(Balance::RoundRobin, &[&a]))).await;
    let mut h2 = h2c(p.addr).await;
    let mut streams = Vec::new();
    for i in 0..5 {
        let req = Request::builder()
            .uri(format!("http://a.test/x/{i}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        streams.push(h2.send_request(req));
    }
    for s in streams {
        let r = read(s.await.unwrap()).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.version, Version::HTTP_2);
        assert_eq!(r.backend(), "a");
    }
    let seen = a.seen();
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.headers["host"], "a.test");
    assert_eq!(seen.headers["via"], "2 ippool");
    assert!(seen.uri.starts_with("/x/"), "{}", seen.uri);
    assert_eq!(p.metrics.snapshot().http2_requests_total, 5);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let echo = WsEcho::start().await;
    let routes = table(vec![
        Route::new("ws", RouteMatch::host("ws.test")).with_backend(B::new("echo", echo.addr)),
    ]);
    let p = Running::start(opts(&routes)).await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://ws.test/chat", stream)
        .await
        .expect("websocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let got = tokio::time::timeout(IO_TIMEOUT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let got = tokio::time::timeout(IO_TIMEOUT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.into_data().as_ref(), [0u8, 1, 2, 255]);
    assert_eq!(p.routes.snapshot().backend("echo").unwrap().in_flight, 1);
    ws.close(None).await.unwrap();
    drop(ws);
    let routes = p.routes.clone();
    wait_for("the tunnel to end", || {
        routes.snapshot().backend("echo").unwrap().in_flight == 0
    })
    .await;
    assert_eq!(p.metrics.snapshot().upgrades_total, 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive() {
    let a = Backend::start("a").await;
    let p = Running::start(opts(&one_route(Balance::RoundRobin, &[&a]))).await;
    for _ in 0..20 {
        // A new client connection each time: the upstream one is reused.
        assert_eq!(get(p.addr, "a.test", "/").await.status, 200);
    }
    assert_eq!(a.hits(), 20);
    assert!(a.conns() <= 2, "{} upstream connections", a.conns());
    // The client can read the last response before the proxy has put the
    // connection back in the pool: wait for that, then check.
    let routes = p.routes.clone();
    wait_for("the upstream connection back in the pool", || {
        let snap = routes.snapshot();
        let b = snap.backend("a").unwrap();
        b.in_flight == 0 && b.idle_connections >= 1
    })
    .await;
    let snap = p.routes.snapshot();
    let b = snap.backend("a").unwrap();
    assert!(b.connections_total <= 2 && b.idle_connections >= 1, "{b:?}");
    // Closed by the backend (its server stops): the proxy reconnects.
    let port = a.addr;
    drop(a);
    let mut again = None;
    for _ in 0..100 {
        // The old server's task is aborted asynchronously.
        match tokio::net::TcpListener::bind(port).await {
            Ok(l) => {
                again = Some(l);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let a2 = Backend::serve("a2", again.expect("rebind the backend's port"));
    let r = get(p.addr, "a.test", "/").await;
    assert_eq!((r.status, r.backend().as_str()), (200, "a2"));
    drop(a2);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_change_while_serving() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let routes = table(vec![
        Route::new("r", RouteMatch::host("a.test")).with_backend(backend(&a)),
    ]);
    let p = Running::start(opts(&routes)).await;
    let mut client = H1::connect(p.addr).await;
    assert_eq!(client.get("n.test", "/").await.status, 404);
    p.routes
        .upsert_route(Route::new("n", RouteMatch::host("n.test")).with_backend(backend(&b)))
        .unwrap();
    assert_eq!(client.get("n.test", "/").await.backend(), "b");
    p.routes.upsert_backend("r", backend(&b)).unwrap_err();
    p.routes.remove("a").unwrap();
    assert_eq!(client.get("a.test", "/").await.status, 503);
    p.routes
        .upsert_backend("r", B::new("a-again", a.addr))
        .unwrap();
    assert_eq!(client.get("a.test", "/").await.backend(), "a");
    p.routes.remove_route("n").unwrap();
    assert_eq!(client.get("n.test", "/").await.status, 404);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_requests_in_flight_finish() {
    let a = Backend::start("a").await;
    let mut p = Running::start(opts(&one_route(Balance::RoundRobin, &[&a]))).await;
    let addr = p.addr;
    let inflight = tokio::spawn(async move { get(addr, "a.test", "/sleep/600").await });
    wait_for("the request to reach the backend", || a.hits() == 1).await;
    p.signal();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No longer accepting.
    assert!(
        TcpStream::connect(addr).await.is_err() || {
            let r = send(addr, request("GET", "a.test", "/")).await;
            r.is_err()
        }
    );
    let r = inflight.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "a slept\n");
    tokio::time::timeout(Duration::from_secs(5), &mut p.task)
        .await
        .expect("serve returns once drained")
        .unwrap();
}
