//! Test helpers: a proxy runner, a raw HTTP/1 client, a SOCKS5 client, an
//! outcome recorder and a keep-alive upstream.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use addrpool::{Outcome, OutcomeSink};
use gateway::egress::{EgressMetrics, EgressOptions, EgressProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on any single client exchange in the tests.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A running proxy; stopped (and awaited) by [`Running::stop`].
pub struct Running {
    pub addr: SocketAddr,
    pub metrics: Arc<EgressMetrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub async fn start(mut opts: EgressOptions) -> Running {
        opts.listen = "127.0.0.1:0".parse().unwrap();
        let proxy = EgressProxy::bind(opts).await.expect("bind proxy");
        Running::serve(proxy)
    }

    pub fn serve(proxy: EgressProxy) -> Running {
        let addr = proxy.local_addr();
        let metrics = proxy.metrics();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(proxy.serve(async {
            let _ = stopped.await;
        }));
        Running {
            addr,
            metrics,
            stop: Some(stop),
            task,
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("proxy stops within its drain timeout")
            .expect("proxy task");
    }
}

/// Records every outcome.
#[derive(Clone, Default)]
pub struct Outcomes(pub Arc<Mutex<Vec<(IpAddr, Outcome)>>>);

impl Outcomes {
    pub fn sink(&self) -> Arc<dyn OutcomeSink> {
        let v = self.0.clone();
        Arc::new(move |ip, o| v.lock().unwrap().push((ip, o)))
    }

    pub fn all(&self) -> Vec<(IpAddr, Outcome)> {
        self.0.lock().unwrap().clone()
    }

    pub fn has(&self, o: Outcome) -> bool {
        self.all().iter().any(|(_, x)| *x == o)
    }
}

/// A parsed HTTP/1 response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    pub fn source(&self) -> IpAddr {
        self.header("x-ippool-source")
            .unwrap_or_else(|| panic!("no X-Ippool-Source in {self:?}"))
            .parse()
            .unwrap()
    }
}

pub fn parse(raw: &str) -> Resp {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    Resp {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// Sends raw bytes to the proxy and reads until it closes.
pub async fn raw(proxy: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.expect("connect to proxy");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut out))
        .await
        .expect("response within the timeout")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

fn basic(creds: Option<(&str, &str)>) -> String {
    match creds {
        None => String::new(),
        Some((u, p)) => format!(
            "Proxy-Authorization: Basic {}\r\n",
            b64(format!("{u}:{p}").as_bytes())
        ),
    }
}

pub fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `GET url` through the proxy (absolute form, Connection: close).
pub async fn get(proxy: SocketAddr, url: &str, creds: Option<(&str, &str)>) -> Resp {
    let host = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("");
    let req = format!(
        "GET {url} HTTP/1.1\r\nHost: {host}\r\n{}Connection: close\r\n\r\n",
        basic(creds)
    );
    parse(&raw(proxy, req.as_bytes()).await)
}

/// CONNECT `target`; on 200, sends `GET /` through the tunnel and returns
/// (CONNECT response, tunnelled response).
pub async fn connect(
    proxy: SocketAddr,
    target: &str,
    creds: Option<(&str, &str)>,
) -> (Resp, Option<Resp>) {
    let mut s = TcpStream::connect(proxy).await.expect("connect to proxy");
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{}\r\n",
        basic(creds)
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read_head = async {
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            head.push(byte[0]);
        }
    };
    tokio::time::timeout(IO_TIMEOUT, read_head)
        .await
        .expect("CONNECT reply in time");
    let resp = parse(&String::from_utf8_lossy(&head));
    if resp.status != 200 {
        return (resp, None);
    }
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut out))
        .await
        .expect("tunnelled response in time")
        .unwrap();
    (resp, Some(parse(&String::from_utf8_lossy(&out))))
}

/// A SOCKS5 destination.
pub enum Dest<'a> {
    Ip(SocketAddr),
    Name(&'a str, u16),
}

/// SOCKS5 CONNECT; Ok((stream, BND address)) or Err(reply code, or
/// 0x100 + method/auth failure code).
pub async fn socks5(
    proxy: SocketAddr,
    creds: Option<(&str, &str)>,
    dest: Dest<'_>,
) -> Result<(TcpStream, SocketAddr), u16> {
    let mut s = TcpStream::connect(proxy).await.expect("connect to proxy");
    let fut = async {
        let method = if creds.is_some() { 0x02 } else { 0x00 };
        s.write_all(&[5, 1, method]).await.unwrap();
        let mut sel = [0u8; 2];
        s.read_exact(&mut sel).await.map_err(|_| 0x1FFu16)?;
        if sel[1] == 0xFF {
            return Err(0x1FF);
        }
        if let Some((u, p)) = creds {
            let mut m = vec![1, u.len() as u8];
            m.extend_from_slice(u.as_bytes());
            m.push(p.len() as u8);
            m.extend_from_slice(p.as_bytes());
            s.write_all(&m).await.unwrap();
            let mut st = [0u8; 2];
            s.read_exact(&mut st).await.map_err(|_| 0x1FEu16)?;
            if st[1] != 0 {
                return Err(0x100 + u16::from(st[1]));
            }
        }
        let mut req = vec![5, 1, 0];
        match dest {
            Dest::Ip(SocketAddr::V4(a)) => {
                req.push(1);
                req.extend_from_slice(&a.ip().octets());
                req.extend_from_slice(&a.port().to_be_bytes());
            }
            Dest::Ip(SocketAddr::V6(a)) => {
                req.push(4);
                req.extend_from_slice(&a.ip().octets());
                req.extend_from_slice(&a.port().to_be_bytes());
            }
            Dest::Name(n, port) => {
                req.push(3);
                req.push(n.len() as u8);
                req.extend_from_slice(n.as_bytes());
                req.extend_from_slice(&port.to_be_bytes());
            }
        }
        s.write_all(&req).await.unwrap();
        let mut rep = [0u8; 4];
        s.read_exact(&mut rep).await.map_err(|_| 0x1FDu16)?;
        let bound = match rep[3] {
            1 => {
                let mut a = [0u8; 6];
                s.read_exact(&mut a).await.unwrap();
                SocketAddr::from(([a[0], a[1], a[2], a[3]], u16::from_be_bytes([a[4], a[5]])))
            }
            4 => {
                let mut a = [0u8; 18];
                s.read_exact(&mut a).await.unwrap();
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&a[..16]);
                SocketAddr::from((ip, u16::from_be_bytes([a[16], a[17]])))
            }
            other => panic!("unexpected ATYP {other}"),
        };
        if rep[1] != 0 {
            return Err(u16::from(rep[1]));
        }
        Ok(bound)
    };
    let bound = tokio::time::timeout(IO_TIMEOUT, fut)
        .await
        .expect("SOCKS5 reply in time")?;
    Ok((s, bound))
}

/// Sends `GET /` over an open tunnel and returns the body.
pub async fn get_over(mut s: TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut out))
        .await
        .expect("tunnelled response in time")
        .unwrap();
    parse(&String::from_utf8_lossy(&out)).body
}

/// An HTTP/1.1 keep-alive upstream whose body is the peer `ip:port` (the
/// port tells connections apart).
pub async fn keepalive_upstream(listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                break;
            };
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        SocketAddr::new(peer.ip().to_canonical(), peer.port()).to_string(),
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}
