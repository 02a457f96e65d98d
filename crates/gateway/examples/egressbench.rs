//! Driver of `bench/egress.sh`: the egress proxy (`gateway::egress`) against
//! direct connections to the same upstream, and the netlink assigner of
//! `addrpool` in a network namespace.
//!
//! ```text
//! egressbench fresh   [rounds=5] [secs=2] [conns=32]   HTTP, a new connection and source per request
//! egressbench sticky  [rounds=5] [secs=2] [conns=32]   HTTP keep-alive, a sticky session per client connection
//! egressbench tunnels [rounds=5] [secs=2] [conns=32]   CONNECT tunnels opened per second
//! egressbench bulk    [rounds=5] [mb=512]              one CONNECT tunnel streaming `mb` MB down
//! egressbench netlink [leases=500] [burst=256] [rounds=3] [family=v6] [hold=0] [settle=1]   root: testbed namespaces
//! common: [layout=split|shared|pinned] [threads=2] [reference=0|1] [refbuf=8192] [sides=direct,ours,ref]
//! ```
//!
//! Every case prints one line of `key=value` fields: medians over the
//! rounds, per-round values in `*_rounds`, `ratio` = ours / direct.
//!
//! The HTTP and CONNECT cases run the upstream servers (a hyper HTTP/1.1
//! server answering a 64-byte body, and a byte source), the proxy and the
//! load client in separate multi-thread tokio runtimes of this process, as
//! three processes would (`layout=split`, the default, unpinned;
//! `shared`: one runtime; `pinned`: upstream and client on CPU 0, the proxy
//! on CPU 1). Each round runs every side back to back with the same client
//! code, request, concurrency and upstream, in an order rotating between
//! rounds. `reference=1` adds a third side: a minimal hyper forward proxy
//! and raw CONNECT relay without pool, policy or auth (upstream connections
//! from 127.0.0.1–254 in turn, copy buffers of `refbuf` bytes), what any
//! proxy of this shape costs on this machine.
//!
//! Client sockets close with SO_LINGER 0 (an RST, no TIME_WAIT) on every
//! side, so that no side runs out of ephemeral ports; the proxy's own
//! upstream connections leave from 254 loopback sources (127.0.0.0/24), so
//! their TIME_WAIT entries do not collide.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use addrpool::{Assigner, Exclude, NetlinkOptions, Order, Pool, PoolOptions, Source, Strategy};
use bytes::Bytes;
use gateway::egress::{EgressOptions, EgressProxy};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The upstream's response body.
const BODY: &[u8; 64] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";
/// Bound on one request or tunnel; a slower one counts as an error.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// What the byte source sends, in slices of this size.
static DATA: [u8; 256 * 1024] = [b'x'; 256 * 1024];
/// Leases measured but not counted at the start of the netlink case.
const NETLINK_WARMUP: usize = 20;
/// Connections the HTTP upstream accepted.
static UPSTREAM_CONNS: AtomicU64 = AtomicU64::new(0);

const USAGE: &str = "usage: egressbench fresh|sticky|tunnels|bulk|netlink [key=value ...]";

/// `key=value` arguments.
struct Args(Vec<(String, String)>);

impl Args {
    fn get<T: FromStr>(&self, key: &str, default: T) -> Result<T, BoxError> {
        match self.0.iter().rev().find(|(k, _)| k == key) {
            None => Ok(default),
            Some((_, v)) => v
                .parse()
                .map_err(|_| format!("bad value for {key}: {v:?}").into()),
        }
    }
}

fn main() -> Result<(), BoxError> {
    let mut argv = std::env::args().skip(1);
    let case = argv.next().unwrap_or_default();
    let mut pairs = Vec::new();
    for a in argv {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| format!("{USAGE} (got {a:?})"))?;
        pairs.push((k.to_owned(), v.to_owned()));
    }
    let args = Args(pairs);
    match case.as_str() {
        "fresh" | "sticky" | "tunnels" => load_case(&case, &args),
        "bulk" => bulk_case(&args),
        "netlink" => netlink_case(&args),
        _ => Err(USAGE.into()),
    }
}

// ---------------------------------------------------------------- set-up

fn runtime(name: &str, workers: usize, cpu: Option<usize>) -> io::Result<Arc<Runtime>> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(workers).thread_name(name).enable_all();
    if let Some(cpu) = cpu {
        b.on_thread_start(move || pin_to(cpu));
    }
    b.build().map(Arc::new)
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: `set` is a plain bitmask on the stack, cleared by CPU_ZERO
    // before use; sched_setaffinity(0, …) only affects the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        eprintln!(
            "egressbench: cannot pin a thread to CPU {cpu}: {}",
            io::Error::last_os_error()
        );
    }
}

/// The upstream, proxy and client runtimes for `layout=`.
fn runtimes(args: &Args) -> Result<[Arc<Runtime>; 3], BoxError> {
    let threads = args.get("threads", 2usize)?;
    match args.get("layout", "split".to_owned())?.as_str() {
        "split" => Ok([
            runtime("upstream", threads, None)?,
            runtime("proxy", threads, None)?,
            runtime("client", threads, None)?,
        ]),
        "shared" => {
            let rt = runtime("shared", threads, None)?;
            Ok([rt.clone(), rt.clone(), rt])
        }
        "pinned" => Ok([
            runtime("upstream", 1, Some(0))?,
            runtime("proxy", 1, Some(1))?,
            runtime("client", 1, Some(0))?,
        ]),
        other => Err(format!("unknown layout {other:?} (split, shared, pinned)").into()),
    }
}

/// How the client reaches the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Direct,
    /// The egress proxy.
    Ours,
    /// The minimal reference proxy.
    Ref,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Ours => "ours",
            Via::Ref => "ref",
        }
    }
}

/// Upstream servers, the egress proxy over a 127.0.0.0/24 pool, the
/// reference proxy if asked for, and a client runtime.
struct Bed {
    upstream_rt: Arc<Runtime>,
    proxy_rt: Arc<Runtime>,
    client_rt: Arc<Runtime>,
    /// The HTTP upstream.
    http: SocketAddr,
    /// The byte source: reads `N\n`, sends N bytes, waits for EOF.
    blast: SocketAddr,
    proxy: SocketAddr,
    reference: Option<SocketAddr>,
    pool: Pool,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<()>,
}

impl Bed {
    fn start(pool_opts: PoolOptions, args: &Args) -> Result<Bed, BoxError> {
        let [upstream_rt, proxy_rt, client_rt] = runtimes(args)?;
        let (http, blast) = upstream_rt.block_on(async {
            let h = TcpListener::bind("127.0.0.1:0").await?;
            let b = TcpListener::bind("127.0.0.1:0").await?;
            let addrs = (h.local_addr()?, b.local_addr()?);
            tokio::spawn(accept_loop(h, serve_http));
            tokio::spawn(accept_loop(b, serve_blast));
            Ok::<_, io::Error>(addrs)
        })?;
        let (pool, proxy, stop, served) = proxy_rt.block_on(async {
            let source: Source = "127.0.0.0/24".parse()?;
            let pool = Pool::start(source, Assigner::Static, pool_opts).await?;
            let mut opts = EgressOptions::new(pool.clone());
            opts.listen = "127.0.0.1:0".parse()?;
            opts.drain_timeout = Duration::from_secs(1);
            // The default policy denies loopback destinations.
            opts.policy.update(|p| {
                p.allow.add("127.0.0.0/8".parse().expect("a valid rule"));
            });
            let proxy = EgressProxy::bind(opts).await?;
            let addr = proxy.local_addr();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let served = tokio::spawn(proxy.serve(async {
                let _ = stopped.await;
            }));
            Ok::<_, BoxError>((pool, addr, stop, served))
        })?;
        let reference = if args.get("reference", 0u8)? != 0 {
            let buf = args.get("refbuf", 8192usize)?;
            Some(proxy_rt.block_on(async {
                let l = TcpListener::bind("127.0.0.1:0").await?;
                let a = l.local_addr()?;
                tokio::spawn(accept_loop(l, move |s| ref_conn(s, buf)));
                Ok::<_, io::Error>(a)
            })?)
        } else {
            None
        };
        Ok(Bed {
            upstream_rt,
            proxy_rt,
            client_rt,
            http,
            blast,
            proxy,
            reference,
            pool,
            stop,
            served,
        })
    }

    /// The sides to measure (`sides=direct,ours,ref` limits them; direct
    /// first, the ratios need it).
    fn sides(&self, args: &Args) -> Result<Vec<Via>, BoxError> {
        let mut v = vec![Via::Direct, Via::Ours];
        if self.reference.is_some() {
            v.push(Via::Ref);
        }
        let only = args.get("sides", String::new())?;
        if !only.is_empty() {
            v.retain(|s| only.split(',').any(|o| o == s.name()));
        }
        if v.is_empty() {
            return Err(format!("no side left by sides={only}").into());
        }
        Ok(v)
    }

    /// The address a client of `via` dials (the upstream itself or a proxy).
    fn entry(&self, via: Via, upstream: SocketAddr) -> SocketAddr {
        match via {
            Via::Direct => upstream,
            Via::Ours => self.proxy,
            Via::Ref => self.reference.unwrap_or(self.proxy),
        }
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.proxy_rt.block_on(self.served);
        self.proxy_rt.block_on(self.pool.shutdown());
        drop(self.client_rt);
        // Servers and the reference proxy loop forever: do not wait for them.
        for rt in [self.proxy_rt, self.upstream_rt] {
            if let Ok(rt) = Arc::try_unwrap(rt) {
                rt.shutdown_background();
            }
        }
    }
}

async fn accept_loop<F, Fut>(listener: TcpListener, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(serve(s));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// HTTP/1.1 with keep-alive (closes after `Connection: close`).
async fn serve_http(s: TcpStream) {
    UPSTREAM_CONNS.fetch_add(1, Ordering::Relaxed);
    let svc = service_fn(|_req| async {
        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(BODY))))
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(s), svc)
        .await;
}

/// Reads `N\n`, sends N bytes, then waits for the client to close.
async fn serve_blast(mut s: TcpStream) {
    let mut line = Vec::with_capacity(32);
    while !line.contains(&b'\n') {
        if line.len() > 32 || read_more(&mut s, &mut line).await.is_err() {
            return;
        }
    }
    let Some(mut left) = std::str::from_utf8(&line)
        .ok()
        .and_then(|l| l.trim().parse::<u64>().ok())
    else {
        return;
    };
    while left > 0 {
        let k = left.min(DATA.len() as u64) as usize;
        if s.write_all(&DATA[..k]).await.is_err() {
            return;
        }
        left -= k as u64;
    }
    let mut sink = [0u8; 256];
    while let Ok(n) = s.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

// ---------------------------------------------------------------- reference proxy

/// The next loopback source of the reference proxy.
static REF_SOURCE: AtomicU64 = AtomicU64::new(0);

/// Connects from the next of 127.0.0.1–127.0.0.254 (as the egress proxy's
/// pool does), with IP_BIND_ADDRESS_NO_PORT so that the port is picked for
/// the whole 4-tuple.
async fn ref_connect(dest: SocketAddr) -> io::Result<TcpStream> {
    let n = REF_SOURCE.fetch_add(1, Ordering::Relaxed) % 254 + 1;
    let sock = tokio::net::TcpSocket::new_v4()?;
    let one: libc::c_int = 1;
    // SAFETY: the fd is a valid open socket owned by `sock` for the duration
    // of the call; the option value is a c_int on the stack with its length.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    sock.bind(SocketAddr::from(([127, 0, 0, n as u8], 0)))?;
    let s = sock.connect(dest).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One client of the reference proxy: CONNECT is relayed raw, anything else
/// goes to hyper.
async fn ref_conn(client: TcpStream, buf: usize) {
    let mut first = [0u8; 8];
    let is_connect = loop {
        match client.peek(&mut first).await {
            Ok(n) if n >= 8 || n == 0 => break first.starts_with(b"CONNECT "),
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(_) => return,
        }
    };
    if is_connect {
        let _ = ref_tunnel(client, buf).await;
    } else {
        ref_http(client).await;
    }
}

async fn ref_tunnel(mut client: TcpStream, buf: usize) -> Result<(), BoxError> {
    let mut head = Vec::with_capacity(512);
    let end = read_head(&mut client, &mut head).await?;
    let line = std::str::from_utf8(&head[..end])?;
    let target: SocketAddr = line.split(' ').nth(1).ok_or("no CONNECT target")?.parse()?;
    let mut up = ref_connect(target).await?;
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut up, buf, buf).await?;
    Ok(())
}

/// The upstream connection of one reference-proxy client connection.
type RefUpstream = Arc<tokio::sync::Mutex<Option<SendRequest<Empty<Bytes>>>>>;

/// Absolute-form requests forwarded over one upstream connection per
/// client connection (kept while the client keeps its own).
async fn ref_http(client: TcpStream) {
    let upstream = RefUpstream::default();
    let svc = service_fn(move |req| ref_forward(upstream.clone(), req));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), svc)
        .await;
}

async fn ref_forward(
    upstream: RefUpstream,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Incoming>, BoxError> {
    let Some(authority) = req.uri().authority().cloned() else {
        return Err("no authority".into());
    };
    let mut slot = upstream.lock().await;
    let mut reused = slot.take();
    if let Some(s) = reused.as_mut()
        && s.ready().await.is_err()
    {
        reused = None;
    }
    let mut sender = match reused {
        Some(s) => s,
        None => {
            let s = ref_connect(authority.as_str().parse()?).await?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
            tokio::spawn(conn);
            sender
        }
    };
    let (parts, _) = req.into_parts();
    let mut out = hyper::Request::new(Empty::<Bytes>::new());
    *out.method_mut() = parts.method;
    *out.uri_mut() = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()?;
    *out.headers_mut() = parts.headers;
    for h in [http::header::CONNECTION, http::header::PROXY_AUTHORIZATION] {
        out.headers_mut().remove(h);
    }
    out.headers_mut()
        .insert(http::header::HOST, authority.as_str().parse()?);
    let resp = sender.send_request(out).await?;
    *slot = Some(sender);
    Ok(resp)
}

// ---------------------------------------------------------------- client

/// A client connection: TCP_NODELAY, and SO_LINGER 0 so that closing sends
/// an RST and leaves no TIME_WAIT (the same for every side).
async fn dial(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    Ok(s)
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.reserve(8192);
    if s.read_buf(buf).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads until the end of a head; returns its length.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            return Ok(i + 4);
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::other("head too long"));
        }
        read_more(s, buf).await?;
    }
}

struct Reply {
    status: u16,
    close: bool,
}

/// Reads one whole response (Content-Length, chunked, or until EOF).
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Reply> {
    buf.clear();
    let head_end = read_head(s, buf).await?;
    let (status, length, chunked, mut close) = {
        let head = std::str::from_utf8(&buf[..head_end])
            .map_err(|_| io::Error::other("response head is not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| io::Error::other("no status line"))?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        for l in lines {
            let Some((name, value)) = l.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            }
        }
        (status, length, chunked, close)
    };
    match (length, chunked) {
        (Some(n), false) => {
            while buf.len() < head_end + n {
                read_more(s, buf).await?;
            }
        }
        (_, true) => {
            while !buf[head_end..].ends_with(b"0\r\n\r\n") {
                read_more(s, buf).await?;
            }
        }
        (None, false) => {
            while s.read_buf(buf).await? > 0 {}
            close = true;
        }
    }
    Ok(Reply { status, close })
}

/// Successes, latencies and errors of one load run.
#[derive(Default)]
struct Sample {
    ok: u64,
    errors: u64,
    /// Latency of each success, in µs.
    lat_us: Vec<u32>,
    first_error: Option<String>,
}

impl Sample {
    fn merge(&mut self, o: Sample) {
        self.ok += o.ok;
        self.errors += o.errors;
        self.lat_us.extend(o.lat_us);
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }

    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }

    fn ok(&mut self, since: Instant) {
        self.ok += 1;
        self.lat_us
            .push(u32::try_from(since.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
}

/// One request on `conn` (or on a new connection to `target`).
async fn exchange(
    conn: Option<TcpStream>,
    target: SocketAddr,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> io::Result<(Reply, TcpStream)> {
    let mut s = match conn {
        Some(s) => s,
        None => dial(target).await?,
    };
    s.write_all(req).await?;
    let reply = read_response(&mut s, buf).await?;
    Ok((reply, s))
}

/// Sends `req` to `target` until `deadline`, one at a time, on one
/// keep-alive connection or on a new connection each.
async fn http_worker(
    target: SocketAddr,
    req: Vec<u8>,
    keep_alive: bool,
    deadline: Instant,
) -> Sample {
    let mut out = Sample::default();
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut conn = None;
    while Instant::now() < deadline {
        let t0 = Instant::now();
        match tokio::time::timeout(IO_TIMEOUT, exchange(conn.take(), target, &req, &mut buf)).await
        {
            Ok(Ok((reply, s))) if reply.status == 200 => {
                out.ok(t0);
                if keep_alive && !reply.close {
                    conn = Some(s);
                }
            }
            Ok(Ok((reply, _))) => out.error(format!(
                "status {}: {}",
                reply.status,
                String::from_utf8_lossy(&buf[..buf.len().min(300)])
            )),
            Ok(Err(e)) => out.error(e.to_string()),
            Err(_) => out.error("timed out".into()),
        }
    }
    out
}

/// Opens a CONNECT tunnel through `proxy` (`connect` is the request).
async fn open_tunnel(proxy: SocketAddr, connect: &[u8]) -> io::Result<TcpStream> {
    let mut s = dial(proxy).await?;
    s.write_all(connect).await?;
    let mut buf = Vec::with_capacity(512);
    read_head(&mut s, &mut buf).await?;
    if !buf.starts_with(b"HTTP/1.1 200") {
        let line = buf.split(|b| *b == b'\r').next().unwrap_or_default();
        return Err(io::Error::other(format!(
            "CONNECT refused: {}",
            String::from_utf8_lossy(line)
        )));
    }
    Ok(s)
}

fn connect_request(dest: SocketAddr) -> Vec<u8> {
    format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n").into_bytes()
}

/// Opens tunnels through `proxy` (or direct connections to the byte source)
/// until `deadline`: set up, one byte down, close.
async fn tunnel_worker(
    entry: SocketAddr,
    proxied: bool,
    connect: Arc<[u8]>,
    deadline: Instant,
) -> Sample {
    let mut out = Sample::default();
    while Instant::now() < deadline {
        let t0 = Instant::now();
        let once = async {
            let mut s = if proxied {
                open_tunnel(entry, &connect).await?
            } else {
                dial(entry).await?
            };
            s.write_all(b"1\n").await?;
            let mut one = [0u8; 1];
            s.read_exact(&mut one).await?;
            Ok::<_, io::Error>(())
        };
        match tokio::time::timeout(IO_TIMEOUT, once).await {
            Ok(Ok(())) => out.ok(t0),
            Ok(Err(e)) => out.error(e.to_string()),
            Err(_) => out.error("timed out".into()),
        }
    }
    out
}

/// Runs the workers to completion; returns the merged sample and the time
/// from start until the last worker finished.
async fn run_workers(workers: Vec<BoxFuture<Sample>>) -> (Sample, f64) {
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    for w in workers {
        set.spawn(w);
    }
    let mut all = Sample::default();
    while let Some(r) = set.join_next().await {
        if let Ok(s) = r {
            all.merge(s);
        }
    }
    (all, t0.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------- statistics

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// The `p`th percentile (nearest rank) of `v`, sorted in place.
fn percentile<T: Copy + Ord>(v: &mut [T], p: f64) -> Option<T> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

fn list(v: &[f64], decimals: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.decimals$}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The rounds of one side.
#[derive(Default)]
struct Side {
    /// Successes per second, per round.
    rates: Vec<f64>,
    lat_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
    /// Connections the HTTP upstream accepted during the rounds.
    upstream_conns: u64,
}

impl Side {
    fn add(&mut self, s: Sample, secs: f64) {
        self.rates.push(s.ok as f64 / secs);
        self.lat_us.extend(s.lat_us);
        self.errors += s.errors;
        if self.first_error.is_none() {
            self.first_error = s.first_error;
        }
    }

    /// `P=median P_p50_ms=… P_p99_ms=… P_errors=… P_upstream_conns=… P_rounds=…`
    fn fields(&mut self, p: &str) -> String {
        let ms = |us: Option<u32>| us.map_or(f64::NAN, |u| f64::from(u) / 1000.0);
        let p50 = ms(percentile(&mut self.lat_us, 50.0));
        let p99 = ms(percentile(&mut self.lat_us, 99.0));
        format!(
            "{p}={:.0} {p}_p50_ms={p50:.2} {p}_p99_ms={p99:.2} {p}_errors={} {p}_upstream_conns={} {p}_rounds={}",
            median(&self.rates),
            self.errors,
            self.upstream_conns,
            list(&self.rates, 0)
        )
    }
}

/// `rounds` rounds; each runs every side once, in an order rotating from
/// round to round. `run` measures one side.
fn rounds_of<F>(sides: &[Via], rounds: usize, mut run: F) -> Vec<Side>
where
    F: FnMut(Via) -> (Sample, f64),
{
    let mut out: Vec<Side> = sides.iter().map(|_| Side::default()).collect();
    for r in 0..rounds {
        for k in 0..sides.len() {
            let i = (r + k) % sides.len();
            let before = UPSTREAM_CONNS.load(Ordering::Relaxed);
            let (s, t) = run(sides[i]);
            out[i].add(s, t);
            out[i].upstream_conns += UPSTREAM_CONNS.load(Ordering::Relaxed) - before;
        }
    }
    out
}

/// The fields of every side, the ratios to direct, and errors reported on
/// stderr.
fn side_fields(case: &str, sides: &[Via], mut stats: Vec<Side>) -> String {
    let direct = if sides[0] == Via::Direct {
        median(&stats[0].rates)
    } else {
        f64::NAN
    };
    let mut out = Vec::new();
    for (via, side) in sides.iter().zip(stats.iter_mut()) {
        if let Some(e) = &side.first_error {
            eprintln!(
                "egressbench {case}: {} errors via {}, first: {e}",
                side.errors,
                via.name()
            );
        }
        out.push(side.fields(via.name()));
        match via {
            Via::Direct => {}
            Via::Ours => out.push(format!("ratio={:.3}", median(&side.rates) / direct)),
            Via::Ref => out.push(format!("ref_ratio={:.3}", median(&side.rates) / direct)),
        }
    }
    out.join(" ")
}

// ---------------------------------------------------------------- cases

/// `fresh`: a new connection per request, a new source per request
/// (strategy `fresh`, `max_uses = 1`). `sticky`: keep-alive client
/// connections, each its own sticky session (username `bench-session-cN`),
/// upstream connections kept per (source, destination). `tunnels`: CONNECT
/// tunnels (set up, one byte down, close) from a `fresh`, `max_uses = 1`
/// pool.
fn load_case(case: &str, args: &Args) -> Result<(), BoxError> {
    let rounds = args.get("rounds", 5usize)?;
    let secs = args.get("secs", 2.0f64)?;
    let conns = args.get("conns", 32usize)?;
    let sticky = case == "sticky";
    let pool_opts = if sticky {
        PoolOptions {
            strategy: Strategy::Sticky,
            max_uses: None,
            max_assigned: 250,
            ..Default::default()
        }
    } else {
        PoolOptions {
            strategy: Strategy::Fresh,
            max_uses: Some(1),
            order: Order::Cycle,
            ..Default::default()
        }
    };
    let bed = Bed::start(pool_opts, args)?;
    let sides = bed.sides(args)?;
    let host = bed.http.to_string();
    let close = if sticky { "" } else { "Connection: close\r\n" };
    let request = |via: Via, i: usize| -> Vec<u8> {
        if via == Via::Direct {
            return format!("GET /bench HTTP/1.1\r\nHost: {host}\r\n{close}\r\n").into_bytes();
        }
        let auth = if sticky {
            format!(
                "Proxy-Authorization: Basic {}\r\n",
                b64(format!("bench-session-c{i}:x").as_bytes())
            )
        } else {
            String::new()
        };
        format!("GET http://{host}/bench HTTP/1.1\r\nHost: {host}\r\n{auth}{close}\r\n")
            .into_bytes()
    };
    let connect: Arc<[u8]> = connect_request(bed.blast).into();
    let run = |via: Via, dur: Duration| {
        let deadline = Instant::now() + dur;
        let workers: Vec<BoxFuture<Sample>> = (0..conns)
            .map(|i| -> BoxFuture<Sample> {
                if case == "tunnels" {
                    let entry = bed.entry(via, bed.blast);
                    Box::pin(tunnel_worker(
                        entry,
                        via != Via::Direct,
                        connect.clone(),
                        deadline,
                    ))
                } else {
                    let entry = bed.entry(via, bed.http);
                    Box::pin(http_worker(entry, request(via, i), sticky, deadline))
                }
            })
            .collect();
        bed.client_rt.block_on(run_workers(workers))
    };
    // Warm-up (sessions, idle upstream connections, allocator), not counted.
    for via in &sides {
        run(*via, Duration::from_millis(300));
    }
    let dur = Duration::from_secs_f64(secs);
    let stats = rounds_of(&sides, rounds, |via| run(via, dur));
    let held = bed.pool.held().len();
    let leases = bed.pool.metrics().leased_total;
    bed.stop();
    let unit = if case == "tunnels" { "conn/s" } else { "req/s" };
    println!(
        "case={case} unit={unit} {} rounds={rounds} secs={secs} conns={conns} pool_held={held} leases={leases}",
        side_fields(case, &sides, stats)
    );
    Ok(())
}

/// One tunnel streaming `mb` MB from the byte source, against one direct
/// connection doing the same (`direct` etc. are MB/s).
fn bulk_case(args: &Args) -> Result<(), BoxError> {
    let rounds = args.get("rounds", 5usize)?;
    let mb = args.get("mb", 512u64)?;
    let bed = Bed::start(
        PoolOptions {
            order: Order::Cycle,
            ..Default::default()
        },
        args,
    )?;
    let sides = bed.sides(args)?;
    let bytes = mb * 1_000_000;
    let connect = connect_request(bed.blast);
    let once = |via: Via| -> Result<f64, BoxError> {
        let entry = bed.entry(via, bed.blast);
        let connect = connect.clone();
        // Spawned, not run in block_on: block_on would run the reading
        // loop on this (unpinned) main thread, off the client's CPU.
        let read = bed.client_rt.spawn(async move {
            let t0 = Instant::now();
            let mut s = match via {
                Via::Direct => dial(entry).await?,
                _ => open_tunnel(entry, &connect).await?,
            };
            s.write_all(format!("{bytes}\n").as_bytes()).await?;
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            while got < bytes {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Err(format!("stream ended after {got} of {bytes} bytes").into());
                }
                got += n as u64;
            }
            Ok::<f64, BoxError>(bytes as f64 / 1e6 / t0.elapsed().as_secs_f64())
        });
        bed.client_rt.block_on(read)?
    };
    for via in &sides {
        once(*via)?;
    }
    let mut rates: Vec<Vec<f64>> = sides.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        for k in 0..sides.len() {
            let i = (r + k) % sides.len();
            rates[i].push(once(sides[i])?);
        }
    }
    let tunnels = bed.pool.metrics().leased_total;
    bed.stop();
    let direct = if sides[0] == Via::Direct {
        median(&rates[0])
    } else {
        f64::NAN
    };
    let mut fields = Vec::new();
    for (via, r) in sides.iter().zip(&rates) {
        let name = via.name();
        fields.push(format!(
            "{name}={:.0} {name}_rounds={}",
            median(r),
            list(r, 0)
        ));
        match via {
            Via::Direct => {}
            Via::Ours => fields.push(format!("ratio={:.3}", median(r) / direct)),
            Via::Ref => fields.push(format!("ref_ratio={:.3}", median(r) / direct)),
        }
    }
    println!(
        "case=bulk unit=MB/s {} mb={mb} rounds={rounds} tunnels={tunnels}",
        fields.join(" ")
    );
    Ok(())
}

/// The netlink assigner on the veth of a `testbed` namespace (IPv6 /64 by
/// default, `skip_dad`): lease latency with `keep_assigned = 0` (every
/// lease waits for its address to be added, and the time includes binding a
/// socket to it) while `hold` other pool addresses sit on the interface, and
/// a burst of `burst` concurrent leases (assignments per second, after one
/// warm-up burst).
fn netlink_case(args: &Args) -> Result<(), BoxError> {
    let leases = args.get("leases", 500usize)?;
    let burst = args.get("burst", 256usize)?;
    let rounds = args.get("rounds", 3usize)?;
    let hold = args.get("hold", 0usize)?;
    let cidr = match args.get("family", "v6".to_owned())?.as_str() {
        "v6" => testbed::POOL_V6,
        "v4" => testbed::POOL_V4,
        other => return Err(format!("family={other}: v4 or v6").into()),
    };
    let bed = testbed::Testbed::new()?;
    // A link just brought up is not yet in its steady IPv6 (MLD) state and
    // takes addresses faster than a settled one: wait as a running host would.
    let settle = Duration::from_secs_f64(args.get("settle", 1.0f64)?);
    let line = bed.proxy().run(|| async move {
        tokio::time::sleep(settle).await;
        netlink_run(cidr, leases, hold, burst, rounds)
            .await
            .map_err(|e| e.to_string())
    })?;
    println!("{line}");
    Ok(())
}

async fn netlink_run(
    cidr: &str,
    leases: usize,
    hold: usize,
    burst: usize,
    rounds: usize,
) -> Result<String, BoxError> {
    let assigner = Assigner::Netlink(NetlinkOptions::new(testbed::PROXY_IF));
    let source = || cidr.parse::<Source>();
    let v6 = cidr.contains(':');
    if !v6 && (hold > 126 || burst > 127) {
        return Err(
            "family=v4 (10.251.0.0/24, upper half for hold): hold <= 126, burst <= 127".into(),
        );
    }
    // Addresses kept on the interface meanwhile (a loaded pool), from the
    // end of the range.
    let mut background = None;
    if hold > 0 {
        let last: Source = if v6 {
            "2001:db8:251::ffff:0/112".parse()?
        } else {
            "10.251.0.128/25".parse()?
        };

        let pool = Pool::start(
            last,
            assigner.clone(),
            PoolOptions {
                keep_assigned: 0,
                max_assigned: hold,
                max_uses: None,
                lease_timeout: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await?;
        let mut held = Vec::with_capacity(hold);
        for _ in 0..hold {
            held.push(pool.lease().await?);
        }
        background = Some((pool, held));
    }
    // Latency: one lease at a time, nothing assigned ahead. The background
    // range is excluded (it would be adopted at start otherwise).
    let pool = Pool::start(
        source()?,
        assigner.clone(),
        PoolOptions {
            keep_assigned: 0,
            max_assigned: 16,
            max_uses: Some(1),
            order: Order::Cycle,
            exclude: Some(Exclude::from_fn(in_background)),
            ..Default::default()
        },
    )
    .await?;
    let mut lat_us = Vec::with_capacity(leases);
    let mut bind_failures = 0u64;
    for i in 0..leases + NETLINK_WARMUP {
        let t0 = Instant::now();
        let lease = pool.lease().await?;
        let sock = if v6 {
            tokio::net::TcpSocket::new_v6()?
        } else {
            tokio::net::TcpSocket::new_v4()?
        };
        if sock.bind(SocketAddr::new(lease.source(), 0)).is_err() {
            bind_failures += 1;
        }
        let took = t0.elapsed();
        if i >= NETLINK_WARMUP {
            lat_us.push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
        }
        drop(sock);
        drop(lease);
    }
    let m = pool.metrics();
    pool.shutdown().await;
    if let Some((pool, held)) = background {
        drop(held);
        pool.shutdown().await;
    }
    let want = (leases + NETLINK_WARMUP) as u64;
    if m.assigned_total < want || m.leased_total != want {
        return Err(format!(
            "expected {want} assignments and leases, got {} and {}",
            m.assigned_total, m.leased_total
        )
        .into());
    }
    let add_mean_ms = m.assign_latency_sum.as_secs_f64() * 1000.0 / m.assigned_total as f64;
    // Throughput: `burst` leases at once.
    let mut rates = Vec::new();
    for round in 0..=rounds {
        let pool = Pool::start(
            source()?,
            assigner.clone(),
            PoolOptions {
                keep_assigned: 0,
                max_assigned: burst,
                max_uses: Some(1),
                lease_timeout: Duration::from_secs(20),
                exclude: Some(Exclude::from_fn(in_background)),
                ..Default::default()
            },
        )
        .await?;
        let t0 = Instant::now();
        let mut set = JoinSet::new();
        for _ in 0..burst {
            let p = pool.clone();
            set.spawn(async move { p.lease().await });
        }
        let mut held = Vec::with_capacity(burst);
        while let Some(r) = set.join_next().await {
            held.push(r??);
        }
        // Round 0 warms up (the first burst on a fresh interface is slower).
        if round > 0 {
            rates.push(burst as f64 / t0.elapsed().as_secs_f64());
        }
        let assigned = pool.metrics().assigned_total;
        if assigned != burst as u64 {
            return Err(format!("burst: {assigned} assignments for {burst} leases").into());
        }
        drop(held);
        pool.shutdown().await;
    }
    let ms = |us: Option<u32>| us.map_or(f64::NAN, |u| f64::from(u) / 1000.0);
    Ok(format!(
        "case=netlink family={} assign_p50_ms={:.3} assign_p99_ms={:.3} assign_max_ms={:.3} netlink_add_mean_ms={add_mean_ms:.3} assigns_per_s={:.0} assigns_per_s_rounds={} bind_failures={bind_failures} leases={leases} hold={hold} burst={burst}",
        if v6 { "v6" } else { "v4" },
        ms(percentile(&mut lat_us, 50.0)),
        ms(percentile(&mut lat_us, 99.0)),
        ms(lat_us.last().copied()),
        median(&rates),
        list(&rates, 0),
    ))
}

/// The range of the background addresses of the netlink case
/// (2001:db8:251::ffff:0/112, 10.251.0.128/25).
fn in_background(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(a) => a.segments()[6] == 0xffff,
        IpAddr::V4(a) => a.octets()[3] >= 128,
    }
}

/// Standard base64 with padding.
fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
