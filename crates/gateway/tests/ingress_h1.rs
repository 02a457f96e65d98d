//! The HTTP/1.1 fast path of plain ingress listeners (`ingress/h1.rs`)
//! against the hyper path it stands in for: the same requests through a
//! proxy with `fast_h1` on and one with it off must reach a raw backend
//! as the same head and body, and come back as the same response. Then
//! what only the fast path does: pipelining, reuse of backend
//! connections, stale ones, close-delimited bodies, and the hand-over to
//! hyper for what it does not take.

mod ingress_util;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use gateway::ingress::{
    Backend as B, IngressOptions, Route, RouteMatch, RouteTable, TrustForwarded,
};
use ingress_util::{IO_TIMEOUT, Running, opts, raw_status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the raw backend received: the head (request line, then header
/// lines with lowercase names, sorted) and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Got {
    head: Vec<String>,
    body: Vec<u8>,
}

/// A backend that answers by path with scripted bytes, and records what
/// it received exactly.
struct RawBackend {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    conns: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const BIG: usize = 1 << 20;

fn big_body() -> Vec<u8> {
    (0..BIG).map(|i| (i % 251) as u8).collect()
}

/// The scripted answer to `path` (`None`: the request body echoed), and
/// whether the backend closes the connection after it.
fn script(method: &str, path: &str, body: &[u8]) -> (Vec<u8>, bool) {
    let p = path.split('?').next().unwrap_or(path);
    let fixed = |s: &str| (s.as_bytes().to_vec(), false);
    match p {
        "/chunked" => fixed(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-t\r\nx-kind: chunked\r\n\r\n5\r\nhello\r\n6;e=1\r\n world\r\n0\r\nx-t: 1\r\n\r\n",
        ),
        "/close" => (
            b"HTTP/1.1 200 OK\r\nx-kind: close\r\n\r\nuntil the backend closes".to_vec(),
            true,
        ),
        "/bye" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbye".to_vec(),
            true,
        ),
        "/204" => fixed("HTTP/1.1 204 No Content\r\nx-kind: empty\r\n\r\n"),
        "/304" => fixed("HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n"),
        "/interim" => fixed(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ),
        "/hop" => fixed(
            "HTTP/1.1 200 OK\r\nConnection: x-secret\r\nx-secret: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok",
        ),
        "/big" => {
            let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n").into_bytes();
            r.extend_from_slice(&big_body());
            (r, false)
        }
        "/echo" => {
            let mut r = format!(
                "HTTP/1.1 201 Created\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(body);
            (r, false)
        }
        _ => {
            let mut r =
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: raw\r\nx-multi: a\r\nx-multi: b\r\n\r\n"
                    .to_vec();
            if method != "HEAD" {
                r.extend_from_slice(b"hello");
            }
            (r, false)
        }
    }
}

impl RawBackend {
    async fn start() -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicUsize::new(0));
        let (g, c) = (got.clone(), conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s, g.clone()));
            }
        });
        RawBackend {
            addr,
            got,
            conns,
            task,
        }
    }

    fn take(&self) -> Vec<Got> {
        std::mem::take(&mut *self.got.lock().unwrap())
    }

    fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

async fn serve(mut s: TcpStream, got: Arc<Mutex<Vec<Got>>>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // A head, then a Content-Length body.
        let (method, path, head_len, len, head) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut hs);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                let mut lines: Vec<String> = req
                    .headers
                    .iter()
                    .map(|h| {
                        format!(
                            "{}: {}",
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value)
                        )
                    })
                    .collect();
                lines.sort();
                let line = format!(
                    "{} {} HTTP/1.{}",
                    req.method.unwrap(),
                    req.path.unwrap(),
                    req.version.unwrap()
                );
                lines.insert(0, line);
                let len: usize = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |h| {
                        std::str::from_utf8(h.value).unwrap().parse().unwrap()
                    });
                break (
                    req.method.unwrap().to_owned(),
                    req.path.unwrap().to_owned(),
                    n,
                    len,
                    lines,
                );
            }
            let mut chunk = vec![0u8; 65536];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let chunked = head
            .iter()
            .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
        // A chunked body (small in these tests): up to its last chunk.
        let len = if chunked {
            loop {
                let body = &buf[head_len..];
                if let Some(i) = body.windows(5).position(|w| w == b"0\r\n\r\n")
                    && (i == 0 || body[i - 2..i] == *b"\r\n")
                {
                    break i + 5;
                }
                let mut chunk = vec![0u8; 65536];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        } else {
            len
        };
        while buf.len() < head_len + len {
            let mut chunk = vec![0u8; 65536];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_len..head_len + len].to_vec();
        buf.drain(..head_len + len);
        let (resp, close) = script(&method, &path, &body);
        got.lock().unwrap().push(Got { head, body });
        if s.write_all(&resp).await.is_err() || close {
            return;
        }
        if path == "/linger" {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            return;
        }
    }
}

/// A response as a client sees it: status, headers (lowercase names,
/// sorted; `date` and the framing ones left out) and the decoded body;
/// and whether the connection was left open.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    status: u16,
    headers: Vec<String>,
    body: Vec<u8>,
}

/// Reads one response (skipping 1xx) from `buf` + `s`.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, head_req: bool) -> Seen {
    tokio::time::timeout(IO_TIMEOUT, async {
        loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut hs);
            if let Ok(httparse::Status::Complete(n)) = resp.parse(buf) {
                let status = resp.code.unwrap();
                let mut headers = Vec::new();
                let mut len = None;
                let mut chunked = false;
                for h in resp.headers.iter() {
                    let name = h.name.to_ascii_lowercase();
                    let value = String::from_utf8_lossy(h.value).into_owned();
                    match name.as_str() {
                        "content-length" => len = Some(value.parse::<usize>().unwrap()),
                        "transfer-encoding" => chunked = value.contains("chunked"),
                        "date" | "connection" => {}
                        _ => headers.push(format!("{name}: {value}")),
                    }
                }
                headers.sort();
                buf.drain(..n);
                if (100..200).contains(&status) {
                    continue;
                }
                let body = if head_req || status == 204 || status == 304 {
                    Vec::new()
                } else if chunked {
                    dechunk(s, buf).await
                } else if let Some(len) = len {
                    fill(s, buf, len).await;
                    buf.drain(..len).collect()
                } else {
                    let mut rest = Vec::new();
                    s.read_to_end(&mut rest).await.unwrap();
                    buf.extend_from_slice(&rest);
                    std::mem::take(buf)
                };
                return Seen {
                    status,
                    headers,
                    body,
                };
            }
            let mut chunk = vec![0u8; 65536];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "closed before a response head: {:?}",
                String::from_utf8_lossy(buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("a response within IO_TIMEOUT")
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) {
    while buf.len() < n {
        let mut chunk = vec![0u8; 65536];
        let got = s.read(&mut chunk).await.unwrap();
        assert!(got > 0, "closed in a body");
        buf.extend_from_slice(&chunk[..got]);
    }
}

/// Decodes a chunked body (trailers dropped).
async fn dechunk(s: &mut TcpStream, buf: &mut Vec<u8>) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            let need = buf.len() + 1;
            fill(s, buf, need).await;
        };
        let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailer lines up to an empty one.
            loop {
                let i = loop {
                    if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    let need = buf.len() + 1;
                    fill(s, buf, need).await;
                };
                buf.drain(..i + 2);
                if i == 0 {
                    return body;
                }
            }
        }
        fill(s, buf, size + 2).await;
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

/// Reads until the proxy closes the connection, which it must do soon.
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(3), s.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

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
