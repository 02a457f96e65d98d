//! A quick self-check of the ingress proxy's throughput: a small HTTP/1.1
//! backend and the proxy, in one process or two.
//!
//! ```text
//! ingressbench backend LISTEN [THREADS]           # answers 13 bytes, keep-alive
//! ingressbench proxy LISTEN BACKEND... [--threads N] [--balance NAME] [--per-core]
//! ingressbench both LISTEN BACKEND_LISTEN [THREADS]
//! ```
//!
//! Then e.g. `wrk -t2 -c32 -d10s --latency http://LISTEN/`. The proxy
//! routes every host and path to the backends (`balance` by name, e.g.
//! `round_robin`, `least_connections`, `p2c_ewma`).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use gateway::ingress::{
    Backend, Balance, IngressOptions, IngressProxy, Route, RouteMatch, RouteTable,
};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, BoxError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?)
}

async fn backend(listen: SocketAddr) -> Result<(), BoxError> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!("backend on {}", listener.local_addr()?);
    let body = Bytes::from_static(b"hello, world\n");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req: Request<Incoming>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn table(backends: &[SocketAddr], balance: Balance) -> Result<RouteTable, BoxError> {
    let routes = RouteTable::default();
    let mut route = Route::new("bench", RouteMatch::path("/")).with_balance(balance);
    for (i, b) in backends.iter().enumerate() {
        route = route.with_backend(Backend::new(format!("b{i}"), *b));
    }
    routes.upsert_route(route)?;
    Ok(routes)
}

/// One single-threaded runtime per thread, each with its own
/// `SO_REUSEPORT` listener, sharing one route table.
fn per_core(listen: SocketAddr, routes: RouteTable, threads: usize) -> Result<(), BoxError> {
    let mut handles = Vec::new();
    for _ in 0..threads {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(listen),
            socket2::Type::STREAM,
            None,
        )?;
        sock.set_reuse_address(true)?;
        sock.set_reuse_port(true)?;
        sock.bind(&listen.into())?;
        sock.listen(1024)?;
        let routes = routes.clone();
        handles.push(std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let opts = IngressOptions::new(listen, routes);
                let proxy =
                    IngressProxy::from_listener(sock.into(), opts).map_err(|e| e.to_string())?;
                proxy.serve(std::future::pending()).await;
                Ok(())
            })
        }));
    }
    eprintln!("ingress proxy on {listen} ({threads} single-threaded runtimes)");
    for h in handles {
        h.join().map_err(|_| "a proxy thread panicked")??;
    }
    Ok(())
}

async fn proxy(
    listen: SocketAddr,
    backends: Vec<SocketAddr>,
    balance: Balance,
) -> Result<(), BoxError> {
    let routes = table(&backends, balance)?;
    let mut opts = IngressOptions::new(listen, routes);
    if std::env::var_os("IB_NOFWD").is_some() {
        opts.forwarding.x_forwarded = false;
        opts.forwarding.forwarded = false;
        opts.forwarding.via = None;
    }
    let proxy = IngressProxy::bind(opts).await?;
    eprintln!("ingress proxy on {}", proxy.local_addr());
    // Runs until the process is killed.
    proxy.serve(std::future::pending()).await;
    Ok(())
}

/// The least a hyper proxy can do: each client connection gets its own
/// upstream connection (spawned), requests are forwarded as they are.
async fn reference(listen: SocketAddr, upstream: SocketAddr) -> Result<(), BoxError> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!("reference proxy on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                return;
            };
            let _ = up.set_nodelay(true);
            let Ok((sender, conn)) =
                hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(up)).await
            else {
                return;
            };
            tokio::spawn(conn);
            let sender = std::sync::Arc::new(tokio::sync::Mutex::new(sender));
            let svc = service_fn(move |req: Request<Incoming>| {
                let sender = sender.clone();
                async move {
                    let mut s = sender.lock().await;
                    s.ready().await?;
                    s.send_request(req).await
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: ingressbench backend LISTEN [THREADS] | proxy LISTEN BACKEND... [--threads N] [--balance NAME] [--per-core] | both LISTEN BACKEND_LISTEN [THREADS]";
    let threads_default = std::thread::available_parallelism().map_or(2, |n| n.get());
    match args.first().map(String::as_str) {
        Some("backend") => {
            let listen: SocketAddr = args.get(1).ok_or(usage)?.parse()?;
            let threads = args.get(2).map_or(Ok(threads_default), |t| t.parse())?;
            runtime(threads)?.block_on(backend(listen))
        }
        Some("proxy") => {
            let listen: SocketAddr = args.get(1).ok_or(usage)?.parse()?;
            let mut backends = Vec::new();
            let (mut threads, mut balance) = (threads_default, Balance::RoundRobin);
            let mut reuseport = false;
            let mut rest = args[2..].iter();
            while let Some(a) = rest.next() {
                match a.as_str() {
                    "--threads" => threads = rest.next().ok_or(usage)?.parse()?,
                    "--balance" => balance = rest.next().ok_or(usage)?.parse()?,
                    "--per-core" => reuseport = true,
                    addr => backends.push(addr.parse()?),
                }
            }
            if backends.is_empty() {
                return Err(usage.into());
            }
            if reuseport {
                return per_core(listen, table(&backends, balance)?, threads);
            }
            runtime(threads)?.block_on(proxy(listen, backends, balance))
        }
        Some("reference") => {
            let listen: SocketAddr = args.get(1).ok_or(usage)?.parse()?;
            let upstream: SocketAddr = args.get(2).ok_or(usage)?.parse()?;
            let threads = args.get(3).map_or(Ok(threads_default), |t| t.parse())?;
            runtime(threads)?.block_on(reference(listen, upstream))
        }
        Some("both") => {
            let listen: SocketAddr = args.get(1).ok_or(usage)?.parse()?;
            let upstream: SocketAddr = args.get(2).ok_or(usage)?.parse()?;
            let threads = args.get(3).map_or(Ok(threads_default), |t| t.parse())?;
            runtime(threads)?.block_on(async move {
                let b = tokio::spawn(backend(upstream));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                proxy(listen, vec![upstream], Balance::RoundRobin).await?;
                b.abort();
                Ok(())
            })
        }
        _ => Err(usage.into()),
    }
}
