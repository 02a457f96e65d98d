//! A raw HTTP/1.1 backend that answers by path with scripted bytes and
//! records exactly what it received, and a raw client reader that
//! decodes any framing: for comparing the fast paths (`ingress/h1.rs`,
//! `egress/h1.rs`) with the hyper ones.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on any single client exchange.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the raw backend received: the head (request line, then header
/// lines with lowercase names, sorted) and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Got {
    pub head: Vec<String>,
    pub body: Vec<u8>,
}

/// A backend that answers by path with scripted bytes, and records what
/// it received exactly.
pub struct RawBackend {
    pub addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    conns: Arc<AtomicUsize>,
    /// Responses whose writing failed (the proxy closed the connection).
    broken: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub const BIG: usize = 1 << 20;

pub fn big_body() -> Vec<u8> {
    (0..BIG).map(|i| (i % 251) as u8).collect()
}

/// The scripted answer to `path` (`None`: the request body echoed), and
/// whether the backend closes the connection after it.
pub fn script(method: &str, path: &str, body: &[u8]) -> (Vec<u8>, bool) {
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
        // A chunk extension ended by a bare LF, then what a lenient client
        // would read as a second response.
        "/smuggle" => fixed(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0;x\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Injected: 1\r\n\r\nevil",
        ),
        "/spoof" => {
            fixed("HTTP/1.1 200 OK\r\nX-Ippool-Source: 6.6.6.6\r\nContent-Length: 2\r\n\r\nok")
        }
        "/204" => fixed("HTTP/1.1 204 No Content\r\nx-kind: empty\r\n\r\n"),
        "/304" => fixed("HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n"),
        "/interim" => fixed(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ),
        "/hop" => fixed(
            "HTTP/1.1 200 OK\r\nConnection: x-secret\r\nx-secret: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok",
        ),
        "/huge" => {
            let n = 256 << 20;
            let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").into_bytes();
            r.resize(r.len() + n, b'h');
            (r, false)
        }
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
    pub async fn start() -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicUsize::new(0));
        let broken = Arc::new(AtomicUsize::new(0));
        let (g, c, b) = (got.clone(), conns.clone(), broken.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s, g.clone(), b.clone()));
            }
        });
        RawBackend {
            addr,
            got,
            conns,
            broken,
            task,
        }
    }

    pub fn take(&self) -> Vec<Got> {
        std::mem::take(&mut *self.got.lock().unwrap())
    }

    pub fn broken(&self) -> usize {
        self.broken.load(Ordering::SeqCst)
    }

    pub fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

pub async fn serve(mut s: TcpStream, got: Arc<Mutex<Vec<Got>>>, broken: Arc<AtomicUsize>) {
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
        if s.write_all(&resp).await.is_err() {
            broken.fetch_add(1, Ordering::SeqCst);
            return;
        }
        if close {
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
pub struct Seen {
    pub status: u16,
    pub headers: Vec<String>,
    pub body: Vec<u8>,
}

/// Reads one response (skipping 1xx) from `buf` + `s`.
pub async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, head_req: bool) -> Seen {
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

pub async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) {
    while buf.len() < n {
        let mut chunk = vec![0u8; 65536];
        let got = s.read(&mut chunk).await.unwrap();
        assert!(got > 0, "closed in a body");
        buf.extend_from_slice(&chunk[..got]);
    }
}

/// Decodes a chunked body (trailers dropped).
pub async fn dechunk(s: &mut TcpStream, buf: &mut Vec<u8>) -> Vec<u8> {
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
pub async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(3), s.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}
