//! Paths the integration tests do not reach: the retry of a request on a
//! kept-alive connection the destination closed, and the drain deadline.

use std::net::SocketAddr;
use std::time::Duration;

use addrpool::{Assigner, Pool, PoolOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{EgressOptions, EgressProxy};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

async fn proxy(
    pool: &Pool,
    drain: Duration,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let mut opts = EgressOptions::new(pool.clone());
    opts.listen = "127.0.0.1:0".parse().unwrap();
    opts.drain_timeout = drain;
    opts.policy.update(|p| {
        p.allow.add("127.0.0.0/8".parse().unwrap());
    });
    let proxy = EgressProxy::bind(opts).await.unwrap();
    let addr = proxy.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(proxy.serve(async {
        let _ = stopped.await;
    }));
    (addr, stop, task)
}

async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(1) => buf.push(b[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

async fn get(proxy: SocketAddr, up: SocketAddr) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(
        format!("GET http://{up}/ HTTP/1.1\r\nHost: {up}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_on_a_kept_alive_connection_closed_meanwhile_is_retried() {
    let pool = Pool::start(
        "127.0.0.30/32".parse().unwrap(),
        Assigner::Static,
        PoolOptions {
            max_uses: None,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (addr, stop, task) = proxy(&pool, Duration::from_secs(1)).await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        // First connection: one response, then the next request is read
        // and the connection closed without an answer.
        let (mut s, _) = l.accept().await.unwrap();
        read_head(&mut s).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nc1")
            .await
            .unwrap();
        read_head(&mut s).await.unwrap();
        drop(s);
        // Second connection: answers.
        let (mut s, _) = l.accept().await.unwrap();
        while read_head(&mut s).await.is_some() {
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nc2")
                .await
                .unwrap();
        }
    });
    let first = get(addr, up).await;
    assert!(
        first.starts_with("HTTP/1.1 200") && first.ends_with("c1"),
        "{first}"
    );
    let second = get(addr, up).await;
    assert!(
        second.starts_with("HTTP/1.1 200") && second.ends_with("c2"),
        "{second}"
    );
    let _ = stop.send(());
    tokio::time::timeout(IO_TIMEOUT, task)
        .await
        .unwrap()
        .unwrap();
    server.abort();
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_closes_open_tunnels() {
    let pool = Pool::start(
        "127.0.0.31/32".parse().unwrap(),
        Assigner::Static,
        PoolOptions::default(),
    )
    .await
    .unwrap();
    let (addr, stop, task) = proxy(&pool, Duration::from_millis(200)).await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        // Holds every connection open.
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("CONNECT {up} HTTP/1.1\r\nHost: {up}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let started = std::time::Instant::now();
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("serve returns after the drain deadline")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(IO_TIMEOUT, s.read(&mut b))
        .await
        .expect("tunnel closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    server.abort();
    pool.shutdown().await;
}
