//! The HTTP/1.1 fast path of egress listeners (`egress/h1.rs`) against
//! the hyper path it stands in for: the same requests through a listener
//! with `fast_h1` on and one with it off, over the same loopback pool, must
//! reach a raw upstream as the same head and body and come back as the
//! same response (the source header aside, which must be there and name a
//! pool address). Then keep-alive per source and stale connections.

mod raw_util;
mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use addrpool::{Assigner, Pool, PoolOptions};
use gateway::egress::EgressOptions;
use raw_util::{Got, RawBackend, Seen, read_response, read_to_close};
use support::Running;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

async fn pool(range: &str, max_uses: Option<u64>) -> Pool {
    Pool::start(
        range.parse().unwrap(),
        Assigner::Static,
        PoolOptions {
            max_uses,
            ..Default::default()
        },
    )
    .await
    .expect("loopback pool")
}

fn options(pool: &Pool, tune: &impl Fn(&mut EgressOptions)) -> EgressOptions {
    let mut opts = EgressOptions::new(pool.clone());
    opts.policy.update(|p| {
        p.allow.add("127.0.0.0/8".parse().unwrap());
    });
    tune(&mut opts);
    opts
}

struct Pair {
    fast: Running,
    hyper: Running,
}

impl Pair {
    async fn start(pool: &Pool, tune: impl Fn(&mut EgressOptions)) -> Pair {
        let fast = options(pool, &tune);
        assert!(fast.fast_h1, "the fast path is the default");
        let mut slow = options(pool, &tune);
        slow.fast_h1 = false;
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

/// One request on a new connection: the response with the source header
/// taken out (and checked), and what the upstream got.
async fn exchange(
    proxy: SocketAddr,
    up: &RawBackend,
    req: &[u8],
) -> (Seen, Option<IpAddr>, Vec<Got>) {
    up.take();
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut buf = Vec::new();
    let mut seen = read_response(&mut s, &mut buf, req.starts_with(b"HEAD ")).await;
    let mut source = None;
    seen.headers
        .retain(|h| match h.strip_prefix("x-ippool-source: ") {
            Some(v) => {
                assert!(source.is_none(), "one source header: {h}");
                source = Some(v.parse().expect("an address"));
                false
            }
            None => true,
        });
    (seen, source, up.take())
}

/// `text` with the pool addresses it names (`from 127.0.0.N`) made
/// alike: two requests lease different sources.
fn unsourced(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("from 127.0.0.") {
        out.push_str(&rest[..i]);
        out.push_str("from SRC");
        rest = rest[i + "from 127.0.0.".len()..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

async fn same_both_ways(pair: &Pair, up: &RawBackend, req: &[u8]) -> Seen {
    let what = String::from_utf8_lossy(&req[..req.len().min(90)]).into_owned();
    let (mut fast, fast_src, fast_got) = exchange(pair.fast.addr, up, req).await;
    let (mut slow, slow_src, slow_got) = exchange(pair.hyper.addr, up, req).await;
    for seen in [&mut fast, &mut slow] {
        for h in &mut seen.headers {
            *h = unsourced(h);
        }
        if seen.status >= 400 {
            seen.body = unsourced(&String::from_utf8_lossy(&seen.body)).into_bytes();
        }
    }
    assert_eq!(fast.status, slow.status, "{what}");
    assert_eq!(fast.headers, slow.headers, "{what}");
    assert!(fast.body == slow.body, "{what}: bodies differ");
    assert_eq!(
        fast_got, slow_got,
        "{what}: the upstream got different requests"
    );
    assert_eq!(
        fast_src.is_some(),
        slow_src.is_some(),
        "{what}: source header"
    );
    if let Some(src) = fast_src {
        assert!(
            matches!(src, IpAddr::V4(a) if a.octets()[..3] == [127, 0, 0]),
            "{what}: source {src}"
        );
    }
    fast
}

/// `CONNECT target` with a request for the tunnel in the same write: the
/// CONNECT reply head and the tunnelled response.
async fn tunnel(proxy: SocketAddr, target: &str, up: &RawBackend) -> (String, Seen) {
    up.take();
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nGET /len HTTP/1.1\r\nHost: {target}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let need = buf.len() + 1;
        raw_util::fill(&mut s, &mut buf, need).await;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    let seen = read_response(&mut s, &mut buf, false).await;
    assert_eq!(
        up.take().len(),
        1,
        "the tunnelled request reached the upstream"
    );
    (head, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_fast_path_forwards_and_answers_as_hyper_does() {
    let up = RawBackend::start().await;
    let pool = pool("127.0.0.0/24", Some(1)).await;
    let pair = Pair::start(&pool, |_| {}).await;
    let u = up.addr;
    let plain = same_both_ways(
        &pair,
        &up,
        format!("GET http://{u}/len?x=1 HTTP/1.1\r\nHost: {u}\r\nUser-Agent: t\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!((plain.status, &plain.body[..]), (200, &b"hello"[..]));
    for req in [
        // Hop-by-hop headers and those `Connection` names go; `Host`
        // comes from the URI.
        format!(
            "GET http://{u}/len HTTP/1.1\r\nHost: elsewhere.test\r\nConnection: keep-alive, x-secret\r\nx-secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nx-kept: yes\r\n\r\n"
        ),
        format!("GET http://{u} HTTP/1.1\r\nHost: {u}\r\n\r\n"),
        format!(
            "POST http://{u}/echo HTTP/1.1\r\nHost: {u}\r\nContent-Length: 11\r\n\r\nhello world"
        ),
        format!("GET http://{u}/chunked HTTP/1.1\r\nHost: {u}\r\n\r\n"),
        format!("GET http://{u}/close HTTP/1.1\r\nHost: {u}\r\n\r\n"),
        format!("GET http://{u}/bye HTTP/1.1\r\nHost: {u}\r\n\r\n"),
        format!("GET http://{u}/204 HTTP/1.1\r\nHost: {u}\r\n\r\n"),
        format!("GET http://{u}/304 HTTP/1.1\r\nHost: {u}\r\n\r\n"),
        format!("HEAD http://{u}/len HTTP/1.1\r\nHost: {u}\r\n\r\n"),
        format!("GET http://{u}/interim HTTP/1.1\r\nHost: {u}\r\n\r\n"),
        format!("GET http://{u}/hop HTTP/1.1\r\nHost: {u}\r\n\r\n"),
        format!("GET http://{u}/spoof HTTP/1.1\r\nHost: {u}\r\n\r\n"),
        format!("GET http://{u}/big HTTP/1.1\r\nHost: {u}\r\n\r\n"),
        // Refused by the destination policy; nothing listens.
        "GET http://10.0.0.1/x HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n".to_owned(),
        "GET http://127.0.0.1:1/x HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n".to_owned(),
        // Handed to hyper on the fast path: the same either way.
        format!("GET http://{u}/len HTTP/1.0\r\nHost: {u}\r\n\r\n"),
        format!(
            "POST http://{u}/echo HTTP/1.1\r\nHost: {u}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        ),
        format!("GET /len HTTP/1.1\r\nHost: {u}\r\n\r\n"),
        format!("GET https://{u}/len HTTP/1.1\r\nHost: {u}\r\n\r\n"),
        format!("GET http://{u}?q HTTP/1.1\r\nHost: {u}\r\n\r\n"),
    ] {
        same_both_ways(&pair, &up, req.as_bytes()).await;
    }
    // CONNECT: dialled first, 200 with the source, then the tunnel (the
    // request sent with the CONNECT in one write reaches the upstream).
    for proxy in [pair.fast.addr, pair.hyper.addr] {
        let (head, tunnelled) = tunnel(proxy, &format!("{u}"), &up).await;
        assert!(
            head.starts_with("HTTP/1.1 200 Connection established\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("\r\nx-ippool-source: 127.0.0."),
            "{head}"
        );
        assert_eq!(
            (tunnelled.status, &tunnelled.body[..]),
            (200, &b"hello"[..])
        );
    }
    for req in [
        "CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n".to_owned(),
        "CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n".to_owned(),
        // No port; a path: hyper's 400s.
        "CONNECT 127.0.0.1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_owned(),
        format!("CONNECT http://{u}/ HTTP/1.1\r\nHost: {u}\r\n\r\n"),
    ] {
        same_both_ways(&pair, &up, req.as_bytes()).await;
    }
    pair.stop().await;

    // Proxy users: 407 without or with wrong credentials, through.
    let pair = Pair::start(&pool, |o| {
        o.users.insert("alice".into(), "s3cret".into());
    })
    .await;
    for creds in [
        "",
        "Proxy-Authorization: Basic YWxpY2U6d3Jvbmc=\r\n",
        "Proxy-Authorization: Bearer x\r\n",
    ] {
        let r = same_both_ways(
            &pair,
            &up,
            format!("GET http://{u}/len HTTP/1.1\r\nHost: {u}\r\n{creds}\r\n").as_bytes(),
        )
        .await;
        assert_eq!(r.status, 407, "{creds}");
        assert!(
            r.headers
                .contains(&"proxy-authenticate: Basic realm=\"ippool\"".to_owned())
        );
    }
    // alice:s3cret, and a session in the username.
    for creds in ["YWxpY2U6czNjcmV0", "YWxpY2Utc2Vzc2lvbi1hYmM6czNjcmV0"] {
        let r = same_both_ways(
            &pair,
            &up,
            format!("GET http://{u}/len HTTP/1.1\r\nHost: {u}\r\nProxy-Authorization: Basic {creds}\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200, "{creds}");
    }
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_keeps_its_upstream_connection_and_replaces_a_stale_one() {
    let up = RawBackend::start().await;
    // One address, never retired: every request leaves from it.
    let pool = pool("127.0.0.7/32", None).await;
    let proxy = Running::start(options(&pool, &|_| {})).await;
    let u = up.addr;
    let get = format!("GET http://{u}/len HTTP/1.1\r\nHost: {u}\r\n\r\n");
    for _ in 0..3 {
        // A new client connection each time.
        let (seen, src, _) = exchange(proxy.addr, &up, get.as_bytes()).await;
        assert_eq!(seen.status, 200);
        assert_eq!(src, Some("127.0.0.7".parse().unwrap()));
    }
    // Pipelined on one client connection.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(format!("{get}{get}").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut s, &mut buf, false).await.body, b"hello");
    assert_eq!(read_response(&mut s, &mut buf, false).await.body, b"hello");
    assert_eq!(up.conns(), 1, "one kept-alive upstream connection");
    // Closed by the upstream while idle: replaced without the client
    // seeing it.
    s.write_all(format!("GET http://{u}/linger HTTP/1.1\r\nHost: {u}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false).await.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(get.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false).await.status, 200);
    assert_eq!(up.conns(), 2);
    // `Connection: close` is honoured, on an answer of the proxy's own too.
    s.write_all(b"GET http://10.0.0.1/ HTTP/1.1\r\nHost: 10.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_close(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 403 "), "{text}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_let_go_after_the_idle_timeout() {
    let up = RawBackend::start().await;
    let pool = pool("127.0.0.0/24", Some(1)).await;
    let proxy = Running::start(options(&pool, &|o| o.idle_timeout = Duration::from_secs(1))).await;
    let u = up.addr;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    // 256 MiB asked for, none read.
    s.write_all(format!("GET http://{u}/huge HTTP/1.1\r\nHost: {u}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let t0 = std::time::Instant::now();
    while up.broken() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the proxy still holds the upstream connection"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(s);
    proxy.stop().await;
}
