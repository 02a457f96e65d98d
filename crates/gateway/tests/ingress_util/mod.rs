//! Helpers of the ingress tests: test backends, a proxy runner, HTTP
//! clients (hyper and raw bytes), dead ports.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gateway::ingress::{IngressMetrics, IngressOptions, IngressProxy, RouteTable};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Bound on any single client exchange.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What a backend saw of the last ordinary request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: Version,
    pub headers: HeaderMap,
}

/// Knobs and counters of a test backend.
#[derive(Debug)]
pub struct State {
    pub name: String,
    /// Requests (not health checks).
    pub hits: AtomicUsize,
    /// TCP connections accepted.
    pub conns: AtomicUsize,
    /// Answer every request with this status (0: normal).
    pub status: AtomicU16,
    /// The status of `/health`.
    pub health: AtomicU16,
    /// Health checks answered.
    pub checks: AtomicUsize,
    /// Delay before every answer.
    pub delay_ms: AtomicU64,
    /// Requests waiting in `/hold`.
    pub holding: AtomicUsize,
    release: watch::Sender<bool>,
    pub seen: Mutex<Option<Seen>>,
}

/// An HTTP/1.1 test backend; stopped when dropped.
///
/// Paths: `/hold` waits for [`Backend::release`]; `/sleep/MS`; `/echo`
/// echoes the body; `/big/N` answers N bytes; `/status/N`; `/health`
/// answers the `health` status; `/hop` adds hop-by-hop response headers;
/// anything else answers the backend's name. Every response carries
/// `x-backend: NAME`.
pub struct Backend {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Backend::serve(name, TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    pub fn serve(name: &str, listener: TcpListener) -> Backend {
        Backend::serve_with(name, listener, None)
    }

    /// A backend speaking HTTPS with `tls` (a connection that fails its
    /// handshake is counted in `conns` and dropped).
    pub fn serve_tls(
        name: &str,
        listener: TcpListener,
        tls: Arc<tokio_rustls::rustls::ServerConfig>,
    ) -> Backend {
        Backend::serve_with(name, listener, Some(tokio_rustls::TlsAcceptor::from(tls)))
    }

    fn serve_with(
        name: &str,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Backend {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            name: name.to_owned(),
            hits: AtomicUsize::new(0),
            conns: AtomicUsize::new(0),
            status: AtomicU16::new(0),
            health: AtomicU16::new(200),
            checks: AtomicUsize::new(0),
            delay_ms: AtomicU64::new(0),
            holding: AtomicUsize::new(0),
            release: watch::Sender::new(false),
            seen: Mutex::new(None),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                st.conns.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                let tls = tls.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(answer(&st, req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http
                                .serve_connection(TokioIo::new(stream), svc)
                                .with_upgrades()
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                let _ = http
                                    .serve_connection(TokioIo::new(s), svc)
                                    .with_upgrades()
                                    .await;
                            }
                        }
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Backend { addr, state, task }
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn conns(&self) -> usize {
        self.state.conns.load(Ordering::SeqCst)
    }

    pub fn set_status(&self, s: u16) {
        self.state.status.store(s, Ordering::SeqCst);
    }

    pub fn set_health(&self, s: u16) {
        self.state.health.store(s, Ordering::SeqCst);
    }

    pub fn set_delay(&self, ms: u64) {
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Lets every `/hold` request (now and later) answer.
    pub fn release(&self) {
        self.state.release.send_replace(true);
    }

    pub fn seen(&self) -> Seen {
        self.state
            .seen
            .lock()
            .unwrap()
            .clone()
            .expect("a request was seen")
    }

    /// Waits until `n` requests wait in `/hold`.
    pub async fn wait_holding(&self, n: usize) {
        wait_for("requests in /hold", || {
            self.state.holding.load(Ordering::SeqCst) == n
        })
        .await;
    }
}

async fn answer(st: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let mut status = StatusCode::OK;
    let mut extra: Vec<(&'static str, &'static str)> = Vec::new();
    let body: Bytes = if path == "/health" {
        st.checks.fetch_add(1, Ordering::SeqCst);
        status = StatusCode::from_u16(st.health.load(Ordering::SeqCst)).unwrap();
        Bytes::from_static(b"health\n")
    } else {
        st.hits.fetch_add(1, Ordering::SeqCst);
        let delay = st.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let forced = st.status.load(Ordering::SeqCst);
        if forced != 0 {
            status = StatusCode::from_u16(forced).unwrap();
            Bytes::from(format!("{} forced {forced}\n", st.name))
        } else if path == "/hold" {
            st.holding.fetch_add(1, Ordering::SeqCst);
            let mut rx = st.release.subscribe();
            let _ = rx.wait_for(|r| *r).await;
            st.holding.fetch_sub(1, Ordering::SeqCst);
            Bytes::from(format!("{} held\n", st.name))
        } else if let Some(ms) = path.strip_prefix("/sleep/") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
            Bytes::from(format!("{} slept\n", st.name))
        } else if path == "/echo" {
            req.into_body().collect().await.unwrap().to_bytes()
        } else if let Some(n) = path.strip_prefix("/big/") {
            Bytes::from(vec![b'x'; n.parse().unwrap()])
        } else if let Some(s) = path.strip_prefix("/status/") {
            status = StatusCode::from_u16(s.parse().unwrap()).unwrap();
            Bytes::from(format!("{} status {s}\n", st.name))
        } else {
            if path == "/hop" {
                extra = vec![
                    ("keep-alive", "timeout=5"),
                    ("x-resp-secret", "1"),
                    ("connection", "x-resp-secret"),
                ];
            }
            *st.seen.lock().unwrap() = Some(Seen {
                method: req.method().to_string(),
                uri: req.uri().to_string(),
                version: req.version(),
                headers: req.headers().clone(),
            });
            Bytes::from(format!("{}\n", st.name))
        }
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("x-backend", st.name.parse().unwrap());
    for (k, v) in extra {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    resp
}

/// A WebSocket echo backend; stopped when dropped.
pub struct WsEcho {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for WsEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WsEcho {
    pub async fn start() -> WsEcho {
        use futures_util::{SinkExt, StreamExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if msg.is_text() || msg.is_binary() {
                            if ws.send(msg).await.is_err() {
                                break;
                            }
                        } else if msg.is_close() {
                            break;
                        }
                    }
                });
            }
        });
        WsEcho { addr, task }
    }
}

/// A loopback port bound but not listening: connects are refused, and
/// nobody else can take it until [`Dead::revive`].
pub struct Dead {
    sock: socket2::Socket,
    pub addr: SocketAddr,
}

impl Dead {
    pub fn new() -> Dead {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        Dead { sock, addr }
    }

    /// Starts listening on the port.
    pub fn revive(self) -> TcpListener {
        self.sock.listen(128).unwrap();
        self.sock.set_nonblocking(true).unwrap();
        TcpListener::from_std(self.sock.into()).unwrap()
    }
}

/// A running proxy.
pub struct Running {
    pub addr: SocketAddr,
    pub routes: RouteTable,
    pub metrics: Arc<IngressMetrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: JoinHandle<()>,
}

/// Options for a proxy on a free loopback port.
pub fn opts(routes: &RouteTable) -> IngressOptions {
    IngressOptions::new("127.0.0.1:0".parse().unwrap(), routes.clone())
}

impl Running {
    pub async fn start(opts: IngressOptions) -> Running {
        let proxy = IngressProxy::bind(opts).await.expect("bind the proxy");
        let addr = proxy.local_addr();
        let routes = proxy.routes();
        let metrics = proxy.metrics();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(proxy.serve(async {
            let _ = stopped.await;
        }));
        Running {
            addr,
            routes,
            metrics,
            stop: Some(stop),
            task,
        }
    }

    /// Signals shutdown (without waiting).
    pub fn signal(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    pub async fn stop(mut self) {
        self.signal();
        tokio::time::timeout(Duration::from_secs(40), &mut self.task)
            .await
            .expect("the proxy stops within its drain timeout")
            .expect("proxy task");
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    /// Who answered (`x-backend`), or `""`.
    pub fn backend(&self) -> String {
        self.headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn error(&self) -> String {
        self.headers
            .get("x-ippool-error")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    }
}

/// An HTTP/1.1 client on one kept-alive connection.
pub struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    _conn: JoinHandle<()>,
}

impl H1 {
    pub async fn connect(addr: SocketAddr) -> H1 {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        H1 {
            sender,
            _conn: tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            }),
        }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Resp, hyper::Error> {
        tokio::time::timeout(IO_TIMEOUT, async {
            self.sender.ready().await?;
            let resp = self.sender.send_request(req).await?;
            read(resp).await
        })
        .await
        .expect("response within IO_TIMEOUT")
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Resp {
        self.send(request("GET", host, path))
            .await
            .expect("response")
    }
}

pub async fn read(resp: Response<Incoming>) -> Result<Resp, hyper::Error> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Resp {
        status: parts.status.as_u16(),
        version: parts.version,
        headers: parts.headers,
        body,
    })
}

/// A request without body.
pub fn request(method: &str, host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// One request on a new connection.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Result<Resp, hyper::Error> {
    H1::connect(addr).await.send(req).await
}

/// `GET path` with `Host: host`, on a new connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Resp {
    send(addr, request("GET", host, path))
        .await
        .expect("response")
}

/// An HTTP/2 (prior knowledge) client.
pub async fn h2c(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// Writes `bytes`, then reads until the peer closes (or `IO_TIMEOUT`).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_to_close(&mut s).await
}

pub async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status of a raw HTTP/1 response (`HTTP/1.1 431 …`).
pub fn raw_status(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Polls `cond` every 10 ms for up to 10 s.
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Counts responses by backend name.
pub fn tally<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for n in names {
        *m.entry(n.to_owned()).or_insert(0) += 1;
    }
    m
}
