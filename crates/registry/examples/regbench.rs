//! Registration latency and memory of a running `ippool serve` (driver of
//! `bench/ingress.sh`).
//!
//! ```text
//! regbench keygen DIR N
//!     agent key pairs a0 … a{N-1} into DIR (the daemon's keys_dir: it reads
//!     the `.pub` files at start and ignores the `.key` files)
//! regbench run registry=ws://ADDR ingress=ADDR admin=http://ADDR backend=ADDR
//!              keys=DIR pid=PID agents=1000 head=200 tail=50 [timeout_ms=5000]
//! ```
//!
//! `run`: agent `a{i}` registers one service at `backend` with the route
//! `a{i}.bench/`. The first `head` agents are started one after another,
//! each timed from `start()` to its first `200 ok` through the ingress for
//! `Host: a{i}.bench` (raw HTTP/1.1 GET on a kept-alive connection, every
//! 1 ms; 404 until its route exists, 503s while it has no backend yet are
//! counted and polled through); then the agents up to `agents - tail`
//! are started all at once and awaited (state `Registered`, then a 200 for
//! each of their hosts); then the last
//! `tail` are timed as the first ones, with the table near full. Every
//! agent stays connected; once the admin API's `/api/services` counts
//! `agents` services, the daemon's VmRSS is read from /proc/PID/status.
//! Prints one line of `key=value`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use registry::{Agent, AgentState, KeyId, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("keygen") if args.len() == 3 => keygen(Path::new(&args[1]), args[2].parse()?),
        Some("run") => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run(Args::parse(&args[1..])?))
        }
        _ => Err("usage: regbench keygen DIR N | regbench run key=value…".into()),
    }
}

/// Key pairs a0 … a{n-1}, 16 threads at a time (each file is synced).
fn keygen(dir: &Path, n: usize) -> Result<(), BoxError> {
    const THREADS: usize = 16;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || -> Result<(), String> {
                    for i in (t..n).step_by(THREADS) {
                        let id: KeyId = format!("a{i}").parse().map_err(|e| format!("{e}"))?;
                        registry::generate_keypair(dir, &id, Role::Agent)
                            .map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| "keygen thread panicked")??;
        }
        Ok(())
    })
}

struct Args {
    registry: String,
    ingress: SocketAddr,
    admin: SocketAddr,
    backend: SocketAddr,
    keys: PathBuf,
    pid: u32,
    agents: usize,
    head: usize,
    tail: usize,
    timeout: Duration,
}

impl Args {
    fn parse(kv: &[String]) -> Result<Args, BoxError> {
        let get = |k: &str| -> Result<&str, BoxError> {
            kv.iter()
                .find_map(|a| a.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
                .ok_or_else(|| format!("missing {k}=").into())
        };
        let num = |k: &str, d: usize| -> Result<usize, BoxError> {
            match get(k) {
                Ok(v) => Ok(v.parse()?),
                Err(_) => Ok(d),
            }
        };
        let a = Args {
            registry: get("registry")?.to_owned(),
            ingress: get("ingress")?.parse()?,
            admin: get("admin")?
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .parse()?,
            backend: get("backend")?.parse()?,
            keys: get("keys")?.into(),
            pid: get("pid")?.parse()?,
            agents: num("agents", 1000)?,
            head: num("head", 200)?,
            tail: num("tail", 50)?,
            timeout: Duration::from_millis(num("timeout_ms", 5000)? as u64),
        };
        if a.head + a.tail > a.agents {
            return Err("head + tail must not exceed agents".into());
        }
        Ok(a)
    }
}

/// A kept-alive HTTP/1.1 client connection, reopened when it closes.
struct Probe {
    addr: SocketAddr,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Probe {
    fn new(addr: SocketAddr) -> Probe {
        Probe {
            addr,
            conn: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// `GET /` with this host: the status and body.
    async fn get(&mut self, host: &str) -> Result<(u16, Vec<u8>), BoxError> {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: regbench\r\n\r\n");
        for attempt in 0..2 {
            if self.conn.is_none() {
                let s = TcpStream::connect(self.addr).await?;
                s.set_nodelay(true)?;
                self.conn = Some(s);
            }
            match self.exchange(req.as_bytes()).await {
                Ok(r) => return Ok(r),
                Err(e) => {
                    self.conn = None;
                    if attempt == 1 {
                        return Err(e);
                    }
                }
            }
        }
        unreachable!()
    }

    async fn exchange(&mut self, req: &[u8]) -> Result<(u16, Vec<u8>), BoxError> {
        let s = self.conn.as_mut().ok_or("no connection")?;
        s.write_all(req).await?;
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p + 4;
            }
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Err("connection closed".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_ascii_lowercase();
        let status: u16 = head.split_whitespace().nth(1).ok_or("no status")?.parse()?;
        let mut close = false;
        let mut len = None;
        let mut chunked = false;
        for line in head.lines() {
            if let Some(v) = line.strip_prefix("content-length:") {
                len = Some(v.trim().parse::<usize>()?);
            } else if line.starts_with("transfer-encoding:") && line.contains("chunked") {
                chunked = true;
            } else if line.starts_with("connection:") && line.contains("close") {
                close = true;
            }
        }
        let body = if chunked {
            while find(&self.buf[head_end..], b"0\r\n\r\n").is_none() {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err("closed in a chunked body".into());
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
            Vec::new() // only statuses and `ok` bodies (with a length) matter here
        } else {
            let len = len.unwrap_or(0);
            while self.buf.len() < head_end + len {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err("closed in a body".into());
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
            self.buf[head_end..head_end + len].to_vec()
        };
        if close {
            self.conn = None;
        }
        Ok((status, body))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn agent(a: &Args, i: usize) -> Result<Agent, BoxError> {
    let id = format!("a{i}");
    let key = registry::load_signing_key(&a.keys.join(format!("{id}.key")))?;
    Ok(Agent::builder(a.registry.clone(), id, key)
        .service(a.backend)
        .route(format!("a{i}.bench"), "/")
        .start()?)
}

/// Starts agent `i` and waits for its first routed `200 ok`: (ms to the
/// registry's ack, ms to the first routed response).
async fn timed(
    a: &Args,
    probe: &mut Probe,
    i: usize,
    no_backend: &mut u32,
) -> Result<(Agent, f64, f64), BoxError> {
    let host = format!("a{i}.bench");
    // The connection is open before the clock starts (as a client's would be).
    let (status, _) = probe.get(&host).await?;
    if status == 200 {
        return Err(format!("{host} answered 200 before its agent started").into());
    }
    let t0 = Instant::now();
    let agent = agent(a, i)?;
    let mut ack = None;
    loop {
        if ack.is_none() && agent.state() == AgentState::Registered {
            ack = Some(ms(t0.elapsed()));
        }
        let (status, body) = probe.get(&host).await?;
        if status == 200 {
            let routed = ms(t0.elapsed());
            if body != b"ok" {
                return Err(format!("{host}: unexpected body {body:?}").into());
            }
            return Ok((agent, ack.unwrap_or(routed), routed));
        }
        match status {
            404 => {}
            // The route exists, its backend not yet (the daemon adds a
            // registered service's route and its backend in two steps).
            503 => *no_backend += 1,
            _ => return Err(format!("{host}: status {status} while waiting for the route").into()),
        }
        if t0.elapsed() > a.timeout {
            return Err(format!(
                "{host}: not routed within {:?} ({:?})",
                a.timeout,
                agent.state()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn rss_kb(pid: u32) -> Result<u64, BoxError> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).ok_or("bad VmRSS")?.parse()?)
}

/// The `services` count of the admin API's `/api/services`.
async fn services(admin: SocketAddr) -> Result<u64, BoxError> {
    let mut s = TcpStream::connect(admin).await?;
    s.write_all(b"GET /api/services HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let at = find(&buf, b"\r\n\r\n").ok_or("no response head")? + 4;
    let body = &buf[at..];
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("/api/services: {e} (chunked?)"))?;
    v["metrics"]["services"]
        .as_u64()
        .ok_or_else(|| "/api/services: no metrics.services".into())
}

async fn run(a: Args) -> Result<(), BoxError> {
    let rss_before = rss_kb(a.pid)?;
    let mut probe = Probe::new(a.ingress);
    let mut agents = Vec::with_capacity(a.agents);
    let (mut head, mut tail, mut acks) = (Vec::new(), Vec::new(), Vec::new());
    let mut no_backend = 0u32;

    for i in 0..a.head {
        let (agent, ack, routed) = timed(&a, &mut probe, i, &mut no_backend).await?;
        agents.push(agent);
        acks.push(ack);
        head.push(routed);
    }

    let bulk_start = Instant::now();
    let bulk_end = a.agents - a.tail;
    let mut watches = Vec::new();
    for i in a.head..bulk_end {
        let agent = agent(&a, i)?;
        watches.push(agent.watch());
        agents.push(agent);
    }
    for mut w in watches {
        tokio::time::timeout(
            Duration::from_secs(60),
            w.wait_for(|s| *s == AgentState::Registered),
        )
        .await
        .map_err(|_| "bulk agents: not all registered within 60 s")??;
    }
    let bulk_s = bulk_start.elapsed().as_secs_f64();
    // Acknowledged is not yet routed: the daemon applies the registrations
    // to its route table one after another. Wait until every bulk host
    // answers, so that the last agents are timed on a quiet daemon.
    for i in a.head..bulk_end {
        let host = format!("a{i}.bench");
        loop {
            if probe.get(&host).await?.0 == 200 {
                break;
            }
            if bulk_start.elapsed() > Duration::from_secs(60) {
                return Err(format!("bulk agents: {host} not routed within 60 s").into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let bulk_routed_s = bulk_start.elapsed().as_secs_f64();

    for i in bulk_end..a.agents {
        let (agent, ack, routed) = timed(&a, &mut probe, i, &mut no_backend).await?;
        agents.push(agent);
        acks.push(ack);
        tail.push(routed);
    }

    let wait = Instant::now();
    let mut n = services(a.admin).await?;
    while n < a.agents as u64 {
        if wait.elapsed() > Duration::from_secs(30) {
            return Err(format!("/api/services counts {n} services, not {}", a.agents).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        n = services(a.admin).await?;
    }
    // Let the heartbeats of every agent go round once before reading.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss = rss_kb(a.pid)?;
    let still = agents
        .iter()
        .filter(|g| g.state() == AgentState::Registered)
        .count();

    let mut all: Vec<f64> = head.iter().chain(&tail).copied().collect();
    for v in [&mut all, &mut head, &mut tail, &mut acks] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "measured={} reg_p50_ms={:.2} reg_p99_ms={:.2} reg_max_ms={:.2} \
         head_p50_ms={:.2} head_p99_ms={:.2} tail_p50_ms={:.2} tail_p99_ms={:.2} \
         ack_p50_ms={:.2} ack_p99_ms={:.2} bulk_agents={} bulk_s={:.2} bulk_routed_s={:.2} \
         agents={} registered={} services={} no_backend_503={} rss_before_mb={:.1} rss_mb={:.1} rss_per_agent_kb={:.1}",
        all.len(),
        pct(&all, 50.0),
        pct(&all, 99.0),
        all.last().copied().unwrap_or(f64::NAN),
        pct(&head, 50.0),
        pct(&head, 99.0),
        pct(&tail, 50.0),
        pct(&tail, 99.0),
        pct(&acks, 50.0),
        pct(&acks, 99.0),
        bulk_end - a.head,
        bulk_s,
        bulk_routed_s,
        agents.len(),
        still,
        n,
        no_backend,
        rss_before as f64 / 1024.0,
        rss as f64 / 1024.0,
        (rss.saturating_sub(rss_before)) as f64 / agents.len() as f64,
    );
    Ok(())
}
