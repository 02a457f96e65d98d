//! The program behind `bench/rules_dataplane.sh`: what IP rules cost the
//! data plane.
//!
//! ```text
//! dataplanebench [RULES] [CONNS_PER_ROUND] [ROUNDS] [CONCURRENCY]
//! ```
//!
//! 1. Connections per second accepted by two loopback listeners served by
//!    one server thread: a plain `accept()` loop, and a
//!    [`Guard`](gateway::guard::Guard) over a policy of RULES deny rules
//!    (default 100,000: IPv4 addresses and ranges and IPv6 /48–/64, none
//!    covering the clients). A client thread opens CONCURRENCY connections
//!    at a time; each waits for the server's close (the connection was
//!    accepted) and resets (no TIME_WAIT). Rounds alternate plain and
//!    guarded; the medians are compared.
//! 2. Ban enforcement: [`AutoBlock::record`](gateway::guard::AutoBlock::record)
//!    with threshold 1 bans a client that was just served; the client
//!    connects again at once. `ban_enforce_ms` is the median time from
//!    before the `record` call to the client seeing the reset (one loopback
//!    handshake included).
//!
//! Ends with `RESULT name=rules_dataplane ratio_100k_rules_vs_none=…
//! ban_enforce_ms=… …`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gateway::guard::{AutoBlock, AutoBlockOptions, Guard, Offense};
use iprules::{Policy, Rule, Shared};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, default: usize| -> Result<usize, Box<dyn std::error::Error>> {
        match std::env::args().nth(i) {
            Some(a) => Ok(a.parse()?),
            None => Ok(default),
        }
    };
    let rules = arg(1, 100_000)?;
    let conns = arg(2, 20_000)?;
    let rounds = arg(3, 5)?.max(1);
    let concurrency = arg(4, 32)?.max(1);

    let t = Instant::now();
    let policy = Arc::new(Shared::new(big_policy(rules)));
    let live = policy.read(|p| p.deny.len());
    eprintln!("policy: {live} deny rules, built in {:?}", t.elapsed());
    let check_ns = check_cost(&policy);

    let guard = Arc::new(Guard::new(policy.clone()));
    let (addrs_tx, addrs_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = {
        let guard = guard.clone();
        std::thread::spawn(move || serve(guard, addrs_tx, stopped))
    };
    let (plain, guarded) = addrs_rx.recv()?;

    let client = runtime()?;
    let mut plain_cps = Vec::new();
    let mut guarded_cps = Vec::new();
    client.block_on(async {
        // Warm-up: fill caches, settle the scheduler.
        load(plain, conns / 4, concurrency).await?;
        load(guarded, conns / 4, concurrency).await?;
        for r in 0..rounds {
            let p = load(plain, conns, concurrency).await?;
            let g = load(guarded, conns, concurrency).await?;
            eprintln!("round {r}: plain {p:.0}/s, guarded {g:.0}/s");
            plain_cps.push(p);
            guarded_cps.push(g);
        }
        io::Result::Ok(())
    })?;
    let accepted = guard.metrics().accepted_total;

    let ab = AutoBlock::new(
        policy.clone(),
        AutoBlockOptions {
            threshold: 1,
            ..Default::default()
        },
    );
    let mut enforce_ms = Vec::new();
    let mut record_us = Vec::new();
    client.block_on(async {
        for i in 0..21u8 {
            let src = IpAddr::V4(Ipv4Addr::new(127, 0, 1, 10 + i));
            if !served(src, guarded).await? {
                return Err(io::Error::other(format!("{src} refused before its ban")));
            }
            let t0 = Instant::now();
            let ban = ab.record(src, Offense::AuthFailed, Instant::now());
            let t_ban = t0.elapsed();
            if ban.is_none() {
                return Err(io::Error::other("threshold 1 did not ban"));
            }
            if served(src, guarded).await? {
                return Err(io::Error::other(format!("{src} served after its ban")));
            }
            enforce_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            record_us.push(t_ban.as_secs_f64() * 1e6);
        }
        io::Result::Ok(())
    })?;
    let denied = guard.metrics().denied_total;
    let _ = stop.send(true);
    server
        .join()
        .map_err(|_| "server thread panicked")?
        .map_err(|e| format!("server: {e}"))?;

    let p = median(&mut plain_cps);
    let g = median(&mut guarded_cps);
    let ratio = g / p;
    let enforce = median(&mut enforce_ms);
    let record = median(&mut record_us);
    println!("rules        : {live} deny rules in the guarded listener's policy");
    println!("plain accept : {p:.0} connections/s (median of {rounds})");
    println!("guarded      : {g:.0} connections/s ({accepted} accepted, {denied} denied)");
    println!("ratio        : {ratio:.3} (guarded / plain)");
    println!("policy check : {check_ns:.0} ns per accept-time decision");
    println!(
        "ban enforce  : {enforce:.3} ms from record() to the client's reset (AutoBlock::record {record:.1} µs)"
    );
    println!(
        "RESULT name=rules_dataplane ratio_100k_rules_vs_none={ratio:.3} ban_enforce_ms={enforce:.3} \
         plain_cps={p:.0} guarded_cps={g:.0} check_ns={check_ns:.0} record_us={record:.1} rules={live}"
    );
    Ok(())
}

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// A deterministic mix of deny rules, none in 127.0.0.0/8.
fn big_policy(n: usize) -> Policy {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut rules = std::collections::HashSet::with_capacity(n);
    while rules.len() < n {
        let r = next();
        let a = (r >> 32) as u32;
        if a >> 24 == 127 {
            continue;
        }
        let rule = match r % 10 {
            0..=4 => Rule::address(IpAddr::V4(a.into())),
            5..=8 => {
                let end = a.saturating_add((r as u32 >> 8) & 0xff);
                if end >> 24 == 127 {
                    continue;
                }
                match Rule::range(IpAddr::V4(a.into()), IpAddr::V4(end.into())) {
                    Ok(rule) => rule,
                    Err(_) => continue,
                }
            }
            _ => {
                let net = (0x2001_0db8_u128 << 96) | (u128::from(a) << 64);
                match Rule::subnet(IpAddr::V6(net.into()), 64) {
                    Ok(rule) => rule,
                    Err(_) => continue,
                }
            }
        };
        rules.insert(rule);
    }
    let mut p = Policy::default();
    let mut rules: Vec<Rule> = rules.into_iter().collect();
    rules.sort_unstable(); // a fixed order: the same set every run
    p.deny.extend(rules);
    p
}

/// Nanoseconds per policy decision for an allowed peer (what every accept
/// pays).
fn check_cost(policy: &Shared<Policy>) -> f64 {
    let peers: Vec<IpAddr> = (0..1024u32)
        .map(|i| {
            IpAddr::V4(Ipv4Addr::from(
                0x7f00_0000 | i.wrapping_mul(2_654_435_761) & 0x00ff_ffff,
            ))
        })
        .collect();
    let mut allowed = 0usize;
    let n = 2_000_000;
    let t = Instant::now();
    for i in 0..n {
        allowed += usize::from(policy.read(|p| p.allows(peers[i % peers.len()])));
    }
    let ns = t.elapsed().as_secs_f64() * 1e9 / n as f64;
    assert_eq!(allowed, n, "the clients' addresses are allowed");
    ns
}

type Addrs = (SocketAddr, SocketAddr);

/// The server thread: a plain and a guarded listener, each accepting and
/// closing at once, until `stop`.
fn serve(
    guard: Arc<Guard>,
    addrs: std::sync::mpsc::Sender<Addrs>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> io::Result<()> {
    runtime()?.block_on(async move {
        let plain = TcpListener::bind("127.0.0.1:0").await?;
        let guarded = TcpListener::bind("127.0.0.1:0").await?;
        addrs
            .send((plain.local_addr()?, guarded.local_addr()?))
            .map_err(io::Error::other)?;
        loop {
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                a = plain.accept() => drop(a?),
                a = guard.accept(&guarded) => drop(a?),
            }
        }
    })
}

/// Opens `conns` connections to `addr`, `concurrency` at a time; returns
/// connections per second.
async fn load(addr: SocketAddr, conns: usize, concurrency: usize) -> io::Result<f64> {
    let left = Arc::new(AtomicUsize::new(conns));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let left = left.clone();
        tasks.spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                one(addr).await?;
            }
            io::Result::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(io::Error::other)??;
    }
    Ok(conns as f64 / start.elapsed().as_secs_f64())
}

/// One accepted connection: connect, wait for the server's close, reset.
async fn one(addr: SocketAddr) -> io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let mut b = [0u8; 1];
    let n = s.read(&mut b).await?;
    if n != 0 {
        return Err(io::Error::other("unexpected data"));
    }
    reset(s);
    Ok(())
}

fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
}

/// Whether a connection from `src` is served (closed normally) rather than
/// reset by the guard.
async fn served(src: IpAddr, addr: SocketAddr) -> io::Result<bool> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))?;
    let mut s = match sock.connect(addr).await {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(false),
        Err(e) => return Err(e),
    };
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
    reset(s);
    match r {
        Ok(Ok(0)) => Ok(true),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => Ok(false),
        Ok(Ok(_)) => Err(io::Error::other("unexpected data")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other("no answer in 5 s")),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
