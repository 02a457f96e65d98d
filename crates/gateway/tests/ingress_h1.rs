//! The HTTP/1.1 fast path of plain ingress listeners (`ingress/h1.rs`)
//! against the hyper path it stands in for: the same requests through a
//! proxy with `fast_h1` on and one with it off must reach a raw backend
//! as the same head and body, and come back as the same response. Then
//! what only the fast path does: pipelining, reuse of backend
//! connections, stale ones, close-delimited bodies, and the hand-over to
//! hyper for what it does not take.

mod ingress_util;
mod raw_util;

use std::net::SocketAddr;

use gateway::ingress::{
    Backend as B, IngressOptions, Route, RouteMatch, RouteTable, TrustForwarded,
};
use ingress_util::{IO_TIMEOUT, Running, opts, raw_status};
use raw_util::{BIG, Got, RawBackend, Seen, big_body, read_response, read_to_close};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The pair of proxies over one route `a.test` -> `backend`.
struct Pair {
    fast: Running,
    hyper: Running,
}

fn route(backend: &RawBackend) -> RouteTable {
    let t = RouteTable::default();
    t.upsert_route(
        Route::new("r", RouteMatch::host("a.test")).with_backend(B::new("raw", backend.addr)),
    )
    .unwrap();
    t
}

impl Pair {
    async fn start(backend: &RawBackend, tune: impl Fn(&mut IngressOptions)) -> Pair {
        let routes = route(backend);
        let mut fast = opts(&routes);
        tune(&mut fast);
        let mut slow = opts(&routes);
        tune(&mut slow);
        slow.fast_h1 = false;
        assert!(fast.fast_h1, "the fast path is the default");
        Pair {
            fast: Running::start(fast).await,
            hyper: Running::start(slow).await,
        }
    }

    async fn stop(self) {
        self.fast.stop().await;
        self.hyper.stop().await;
    }
}

/// One request on a new connection: the response, and what the backend
/// got.
async fn exchange(addr: SocketAddr, backend: &RawBackend, req: &[u8]) -> (Seen, Vec<Got>) {
    backend.take();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut buf = Vec::new();
    let seen = read_response(&mut s, &mut buf, req.starts_with(b"HEAD ")).await;
    (seen, backend.take())
}

/// `req` through both proxies: the same response, the same request at
/// the backend.
async fn same_both_ways(pair: &Pair, backend: &RawBackend, req: &[u8]) -> Seen {
    let what = String::from_utf8_lossy(&req[..req.len().min(80)]).into_owned();
    eprintln!("-- {what:?}");
    let (fast, fast_got) = exchange(pair.fast.addr, backend, req).await;
    let (slow, slow_got) = exchange(pair.hyper.addr, backend, req).await;
    assert_eq!(fast.status, slow.status, "{what}");
    assert_eq!(fast.headers, slow.headers, "{what}");
    assert!(
        fast.body == slow.body,
        "{what}: bodies differ ({} vs {} bytes)",
        fast.body.len(),
        slow.body.len()
    );
    assert_eq!(
        fast_got, slow_got,
        "{what}: the backend got different requests"
    );
    fast
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_forwards_and_answers_as_hyper_does() {
    let backend = RawBackend::start().await;
    let pair = Pair::start(&backend, |o| {
        o.forwarding.via = Some("ippool".into());
    })
    .await;
    let plain = same_both_ways(
        &pair,
        &backend,
        b"GET /len?x=1 HTTP/1.1\r\nHost: a.test\r\nUser-Agent: t\r\n\r\n",
    )
    .await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.body, b"hello");
    assert!(
        plain.headers.contains(&"x-multi: a".to_owned())
            && plain.headers.contains(&"x-multi: b".to_owned())
    );
    for req in [
        // Untrusted forwarding headers are replaced; hop-by-hop ones and
        // those `Connection` names go.
        &b"GET /len HTTP/1.1\r\nHost: A.Test:8080\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: gopher\r\nX-Forwarded-Host: evil\r\nForwarded: for=6.6.6.6\r\nVia: 1.1 edge\r\n\r\n"[..],
        b"GET /len HTTP/1.1\r\nhost: a.test\r\nConnection: keep-alive, x-secret\r\nx-secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eDp5\r\nProxy-Connection: keep-alive\r\nx-kept: yes\r\n\r\n",
        // Bodies by Content-Length, small and over several reads.
        b"POST /echo HTTP/1.1\r\nHost: a.test\r\nContent-Length: 11\r\n\r\nhello world",
        b"PUT /echo HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n",
        // Responses framed every way, and without a body.
        b"GET /chunked HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET /close HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET /bye HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET /204 HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET /304 HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"HEAD /len HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET /interim HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET /hop HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n",
        // Answered by the proxy.
        b"GET /len HTTP/1.1\r\nHost: b.test\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: a.test\r\nContent-Length: 99999999999\r\n\r\n",
        // Handed to hyper on the fast path: the same either way.
        b"GET /len HTTP/1.0\r\nHost: a.test\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"GET /len HTTP/1.1\r\n\r\n",
        b"GET /len HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        b"GET http://a.test/len HTTP/1.1\r\nHost: a.test\r\n\r\n",
    ] {
        same_both_ways(&pair, &backend, req).await;
    }
    // A large body, sent in pieces.
    let body = big_body();
    let mut req = format!("POST /echo HTTP/1.1\r\nHost: a.test\r\nContent-Length: {BIG}\r\n\r\n")
        .into_bytes();
    req.extend_from_slice(&body);
    let echoed = same_both_ways(&pair, &backend, &req).await;
    assert_eq!(echoed.status, 201);
    assert!(echoed.body == body);
    // The lean path took what it could and handed the rest to hyper.
    let (fast, slow) = (pair.fast.metrics.snapshot(), pair.hyper.metrics.snapshot());
    assert_eq!(slow.lean_requests_total, 0);
    assert_eq!(fast.requests_total, slow.requests_total);
    assert!(
        fast.lean_requests_total >= 15 && fast.lean_requests_total < fast.requests_total,
        "{fast:?}"
    );
    pair.stop().await;

    // Trusted forwarding headers are kept and appended to.
    let pair = Pair::start(&backend, |o| o.forwarding.trust = TrustForwarded::Always).await;
    let (_, got) = exchange(
        pair.fast.addr,
        &backend,
        b"GET /len HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 192.0.2.1\r\nX-Forwarded-For: 192.0.2.9\r\nX-Forwarded-Proto: https\r\nForwarded: for=192.0.2.1;proto=https\r\n\r\n",
    )
    .await;
    let head = &got[0].head;
    assert!(
        head.contains(&"x-forwarded-for: 192.0.2.1, 192.0.2.9, 127.0.0.1".to_owned()),
        "{head:?}"
    );
    assert!(
        head.contains(&"x-forwarded-proto: https".to_owned()),
        "{head:?}"
    );
    assert!(
        head.contains(
            &"forwarded: for=192.0.2.1;proto=https, for=127.0.0.1;host=a.test;proto=http"
                .to_owned()
        ),
        "{head:?}"
    );
    same_both_ways(
        &pair,
        &backend,
        b"GET /len HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 192.0.2.1\r\nX-Forwarded-For: 192.0.2.9\r\nX-Forwarded-Proto: https\r\nForwarded: for=192.0.2.1;proto=https\r\n\r\n",
    )
    .await;
    pair.stop().await;
    // No forwarding headers at all, untrusted: incoming ones removed.
    let pair = Pair::start(&backend, |o| {
        o.forwarding.x_forwarded = false;
        o.forwarding.forwarded = false;
    })
    .await;
    let seen = same_both_ways(
        &pair,
        &backend,
        b"GET /len HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n\r\n",
    )
    .await;
    assert_eq!(seen.status, 200);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_and_kept_alive_requests_share_one_backend_connection() {
    let backend = RawBackend::start().await;
    let p = Running::start(opts(&route(&backend))).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    // Three requests in one write, the second with a body.
    s.write_all(
        b"GET /len HTTP/1.1\r\nHost: a.test\r\n\r\nPOST /echo HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\n\r\nabcdGET /chunked HTTP/1.1\r\nHost: a.test\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut s, &mut buf, false).await.body, b"hello");
    let echoed = read_response(&mut s, &mut buf, false).await;
    assert_eq!((echoed.status, &echoed.body[..]), (201, &b"abcd"[..]));
    assert_eq!(
        read_response(&mut s, &mut buf, false).await.body,
        b"hello world"
    );
    // And one at a time.
    for _ in 0..5 {
        s.write_all(b"GET /len HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut s, &mut buf, false).await.body, b"hello");
    }
    assert_eq!(backend.conns(), 1, "one kept-alive backend connection");
    assert_eq!(backend.take().len(), 8);
    let m = p.metrics.snapshot();
    assert_eq!((m.requests_total, m.lean_requests_total), (8, 8));
    // The backend closes after `/bye`: the next request takes a new
    // connection, and the client's stays open.
    s.write_all(b"GET /bye HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false).await.body, b"bye");
    s.write_all(b"GET /len HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false).await.body, b"hello");
    assert_eq!(backend.conns(), 2);
    // A body framed by the backend's close closes the client's connection
    // too (it is how the client knows where it ends).
    s.write_all(b"GET /close HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    buf.extend_from_slice(&rest);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close\r\n"),
        "{text}"
    );
    assert!(text.ends_with("\r\n\r\nuntil the backend closes"), "{text}");
    // `Connection: close` from the client is honoured.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /len HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_close(&mut s).await;
    assert_eq!(raw_status(&text), 200, "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close\r\n"),
        "{text}"
    );
    assert!(text.ends_with("hello"), "{text}");
    // Also on an answer of the proxy's own.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /len HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_close(&mut s).await;
    assert_eq!(raw_status(&text), 404, "{text}");
    assert!(text.ends_with("no route for b.test/len\n"), "{text}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_connection_closed_while_idle_is_replaced_unseen() {
    let backend = RawBackend::start().await;
    let p = Running::start(opts(&route(&backend))).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = Vec::new();
    // `/linger`: answered with a length and no `Connection: close`, then
    // the backend closes the connection while it sits in the pool.
    s.write_all(b"GET /linger HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false).await.body, b"hello");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    for _ in 0..3 {
        s.write_all(b"GET /len HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        let r = read_response(&mut s, &mut buf, false).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(
        backend.conns(),
        2,
        "one connection closed by the backend, one new"
    );
    assert_eq!(p.metrics.snapshot().bad_gateway_total, 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_a_client_could_end_elsewhere_is_cut_not_passed() {
    let backend = RawBackend::start().await;
    let p = Running::start(opts(&route(&backend))).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /smuggle HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    // The proxy refuses the framing: the client connection closes and
    // the planted response never reaches it.
    let text = read_to_close(&mut s).await;
    assert!(!text.contains("X-Injected"), "{text}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_time_between_requests_is_not_the_next_requests_time() {
    let backend = RawBackend::start().await;
    let mut o = opts(&route(&backend));
    o.header_read_timeout = std::time::Duration::from_secs(5);
    o.request_timeout = std::time::Duration::from_secs(1);
    let p = Running::start(o).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..2 {
        s.write_all(b"GET /len HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        let r = read_response(&mut s, &mut buf, false).await;
        assert_eq!(r.status, 200, "{r:?}");
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    }
    assert_eq!(p.metrics.snapshot().timeouts_total, 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_head_over_the_limit_gets_431_as_on_hyper() {
    let backend = RawBackend::start().await;
    let mut o = opts(&route(&backend));
    o.max_header_bytes = gateway::ingress::MIN_HEADER_BYTES;
    let p = Running::start(o).await;
    // One write, one read: complete at once, and over 8 KiB.
    let big = "x".repeat(12 * 1024);
    let req = format!("GET /len HTTP/1.1\r\nHost: a.test\r\nx-big: {big}\r\n\r\n");
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let text = read_to_close(&mut s).await;
    assert_eq!(raw_status(&text), 431, "{}", &text[..text.len().min(200)]);
    assert!(backend.take().is_empty(), "nothing forwarded");
    p.stop().await;
}
