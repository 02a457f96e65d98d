//! Accept-time and kernel filtering of real peers in network namespaces
//! made by `testbed` (needs root: without it these tests fail, they do not
//! skip).
//!
//! The listener lives in the upstream namespace on `[::]` (dual stack);
//! clients connect from the proxy namespace, from its link addresses
//! 10.250.0.1 / fd00:250::1 (denied) or the extra 10.250.0.3 / fd00:250::3
//! (allowed), added to the same veth for these tests.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::guard::{FilterState, Guard, KernelFilter};
use iprules::{Policy, Shared};
use testbed::{PROXY_IF, Testbed, UPSTREAM_V4, UPSTREAM_V6};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const PORT: u16 = 9100;
const IO: Duration = Duration::from_secs(5);
/// Far above a veth round trip, far below the first SYN retransmission.
const SYN_TIMEOUT: Duration = Duration::from_millis(300);

fn bed() -> Testbed {
    let bed = Testbed::new().expect("testbed (these tests need root)");
    bed.proxy()
        .ip(&["addr", "add", "10.250.0.3/24", "dev", PROXY_IF])
        .unwrap();
    bed.proxy()
        .ip(&[
            "-6",
            "addr",
            "add",
            "fd00:250::3/64",
            "dev",
            PROXY_IF,
            "nodad",
        ])
        .unwrap();
    bed
}

fn policy() -> Arc<Shared<Policy>> {
    let mut p = Policy::default();
    p.deny.add("10.250.0.1".parse().unwrap());
    // A range that ends inside the last word: exercises the full 128-bit
    // comparison of the IPv6 branch.
    p.deny.add("fd00:250::1-fd00:250::2".parse().unwrap());
    Arc::new(Shared::new(p))
}

fn upstream(v6: bool) -> SocketAddr {
    let ip: IpAddr = if v6 {
        UPSTREAM_V6.into()
    } else {
        UPSTREAM_V4.into()
    };
    SocketAddr::new(ip, PORT)
}

async fn connect_from(src: &str, to: SocketAddr) -> io::Result<TcpStream> {
    let sock = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(src.parse().unwrap(), 0))?;
    sock.connect(to).await
}

/// Runs `guard.accept` on `listener` on its own thread until `stop` fires;
/// every admitted client gets its own address back.
fn serve(
    guard: Arc<Guard>,
    listener: std::net::TcpListener,
) -> (
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    accepted = guard.accept(&listener) => {
                        let (mut s, peer) = accepted.unwrap();
                        let _ = s.write_all(peer.ip().to_string().as_bytes()).await;
                    }
                }
            }
        });
    });
    (stop, thread)
}

/// What a client from `src` reads: the address the server saw, or the
/// error that ended the connection.
async fn read_from(src: &str, to: SocketAddr) -> Result<String, io::ErrorKind> {
    // The reset can come before connect() returns, and it then reports it.
    let mut s = match connect_from(src, to).await {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(e.kind()),
        Err(e) => panic!("connect from {src}: {e}"),
    };
    let mut out = String::new();
    match tokio::time::timeout(IO, s.read_to_string(&mut out))
        .await
        .expect("answered in time")
    {
        Ok(_) => Ok(out),
        Err(e) => Err(e.kind()),
    }
}

#[test]
fn accept_time_filter_resets_denied_namespace_peers() {
    let bed = bed();
    let guard = Arc::new(Guard::new(policy()));
    let listener = bed
        .upstream()
        .tcp_listener(SocketAddr::from(([0u16; 8], PORT)))
        .unwrap();
    let (stop, server) = serve(guard.clone(), listener);
    bed.proxy().run(|| async {
        let reset = Err(io::ErrorKind::ConnectionReset);
        assert_eq!(read_from("10.250.0.1", upstream(false)).await, reset);
        assert_eq!(
            read_from("10.250.0.3", upstream(false)).await,
            Ok("::ffff:10.250.0.3".to_owned()),
            "a dual-stack listener sees IPv4 peers as mapped"
        );
        assert_eq!(read_from("fd00:250::1", upstream(true)).await, reset);
        assert_eq!(
            read_from("fd00:250::3", upstream(true)).await,
            Ok("fd00:250::3".to_owned())
        );
    });
    let m = guard.metrics();
    assert_eq!((m.accepted_total, m.denied_total), (2, 2));
    let _ = stop.send(());
    server.join().unwrap();
}

#[test]
fn kernel_filter_gives_denied_namespace_peers_no_syn_ack() {
    let bed = bed();
    let policy = policy();
    let listener = bed
        .upstream()
        .tcp_listener(SocketAddr::from(([0u16; 8], PORT)))
        .unwrap();
    // Every source reaches the listener before the filter goes on (the
    // first IPv6 packets on a fresh veth wait about a second for the link
    // to settle), so a timeout below can only be the filter's doing.
    bed.proxy().run(|| async {
        for src in ["10.250.0.1", "10.250.0.3", "fd00:250::1", "fd00:250::3"] {
            let to = upstream(src.contains(':'));
            let c = tokio::time::timeout(IO, connect_from(src, to)).await;
            assert!(matches!(c, Ok(Ok(_))), "{src} reaches {to} unfiltered");
        }
    });
    let filter = KernelFilter::new(policy.clone());
    let report = filter.refresh(&listener, Instant::now()).unwrap();
    assert!(
        matches!(report.state, FilterState::Attached { ranges: 2, .. }),
        "{report:?}"
    );
    // Nobody accepts: the kernel completes allowed handshakes in the backlog.
    let syn_answered = |src: &'static str, v6: bool| async move {
        match tokio::time::timeout(SYN_TIMEOUT, connect_from(src, upstream(v6))).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => panic!("connect from {src}: {e}"),
            Err(_) => false,
        }
    };
    bed.proxy().run(|| async {
        assert!(!syn_answered("10.250.0.1", false).await, "IPv4 SYN dropped");
        assert!(syn_answered("10.250.0.3", false).await);
        assert!(!syn_answered("fd00:250::1", true).await, "IPv6 SYN dropped");
        assert!(syn_answered("fd00:250::3", true).await);
    });

    // Changed at run time: fd00:250::1 allowed again, 10.250.0.3 denied.
    policy.update(|p| {
        p.deny.clear();
        p.deny.add("10.250.0.3".parse().unwrap());
    });
    filter.refresh(&listener, Instant::now()).unwrap();
    bed.proxy().run(|| async {
        assert!(syn_answered("fd00:250::1", true).await);
        assert!(syn_answered("10.250.0.1", false).await);
        assert!(!syn_answered("10.250.0.3", false).await);
    });
    drop(listener);
}
