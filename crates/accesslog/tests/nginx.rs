//! End to end against a real nginx: it serves direct, failing, pooled and
//! `proxy_bind` paths on loopback, writes an access log in a custom
//! `log_format`, and the tailer reads it, across `mv` + `nginx -s reopen`.
//!
//! Needs the `nginx` binary (Debian/Ubuntu: `apt-get install -y nginx`), or
//! its path in `NGINX_BIN`. Without it the test fails.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use accesslog::{AddressSource, LogFormat, Mode, NginxConfig, Record, Tailer};
use common::TempDir;

const UA: &str = r#"probe "quoted" back\slash ua/1.0"#;

fn nginx_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NGINX_BIN") {
        return p.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"].map(PathBuf::from))
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nginx is not installed: this test needs a real nginx. \
                 Install it (Debian/Ubuntu: `apt-get install -y nginx`) or set NGINX_BIN."
            )
        })
}

fn free_port(ip: [u8; 4]) -> u16 {
    TcpListener::bind((IpAddr::from(ip), 0))
        .and_then(|l| l.local_addr())
        .expect("pick a free port")
        .port()
}

struct Ports {
    backend: u16,
    direct: u16,
    dead: u16,
    pooled: u16,
    alias: u16,
    closed: u16,
}

/// A running nginx, stopped (with its workers) on drop, even on failure.
struct Nginx {
    bin: PathBuf,
    dir: PathBuf,
    conf: PathBuf,
    child: Child,
}

impl Nginx {
    fn start(dir: &Path, ports: &Ports) -> Self {
        let bin = nginx_binary();
        for t in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(dir.join("tmp").join(t)).unwrap();
        }
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(dir, ports)).unwrap();
        let child = Command::new(&bin)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group: the workers are killed with the master.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting nginx ({}): {e}. Install nginx (Debian/Ubuntu: \
                     `apt-get install -y nginx`) or point NGINX_BIN at it.",
                    bin.display()
                )
            });
        let mut nginx = Self {
            bin,
            dir: dir.to_path_buf(),
            conf,
            child,
        };
        nginx.wait_listening(ports);
        nginx
    }

    fn wait_listening(&mut self, ports: &Ports) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let targets = [
            ([127, 0, 0, 1], ports.backend),
            ([127, 0, 0, 1], ports.direct),
            ([127, 0, 0, 1], ports.dead),
            ([127, 0, 0, 1], ports.pooled),
            ([127, 0, 0, 4], ports.alias),
        ];
        for (ip, port) in targets {
            let addr = SocketAddr::from((ip, port));
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("nginx exited ({status}):\n{}", self.error_log());
                }
                assert!(
                    Instant::now() < deadline,
                    "nginx not listening on {addr}:\n{}",
                    self.error_log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    fn reopen(&self) {
        let out = Command::new(&self.bin)
            .arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg(&self.conf)
            .arg("-e")
            .arg(self.dir.join("error.log"))
            .args(["-s", "reopen"])
            .output()
            .expect("nginx -s reopen");
        assert!(out.status.success(), "nginx -s reopen: {out:?}");
    }

    fn signal_group(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg("--")
            .arg(format!("-{}", self.child.id()))
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.signal_group("TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                // Workers may outlive the master by a moment.
                std::thread::sleep(Duration::from_millis(50));
                self.signal_group("KILL");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal_group("KILL");
        let _ = self.child.wait();
    }
}

fn config(dir: &Path, p: &Ports) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process on;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    log_format pool '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                    '"$http_user_agent" $server_addr:$server_port up=$upstream_addr '
                    'us=$upstream_status rt=$request_time urt=$upstream_response_time '
                    'id="$http_x_test_id"';
    access_log {d}/access.log pool;
    proxy_connect_timeout 2s;

    upstream pool {{
        server 127.0.0.1:{closed} max_fails=0;
        server 127.0.0.1:{backend} weight=2;
    }}
    # The backend every proxied request ends up at.
    server {{
        listen 127.0.0.1:{backend};
        location / {{ return 200 "backend\n"; }}
    }}
    # No upstream.
    server {{
        listen 127.0.0.1:{direct};
        location / {{ return 200 "direct\n"; }}
        location /missing {{ return 404; }}
    }}
    # Upstream refuses the connection: 502, leaving from 127.0.0.2.
    server {{
        listen 127.0.0.1:{dead};
        proxy_bind 127.0.0.2;
        location / {{ proxy_pass http://127.0.0.1:{closed}; }}
    }}
    # A pool with a dead member: some requests try two upstreams.
    server {{
        listen 127.0.0.1:{pooled};
        location / {{
            proxy_bind 127.0.0.3;
            proxy_pass http://pool;
        }}
    }}
    # Its own listen address, leaving from it.
    server {{
        listen 127.0.0.4:{alias};
        proxy_bind 127.0.0.4;
        location / {{ proxy_pass http://127.0.0.1:{backend}; }}
    }}
}}
"#,
        closed = p.closed,
        backend = p.backend,
        direct = p.direct,
        dead = p.dead,
        pooled = p.pooled,
        alias = p.alias,
    )
}

/// HTTP/1.0 GET; returns the status.
fn get(ip: [u8; 4], port: u16, path: &str, id: &str) -> u16 {
    let addr = SocketAddr::from((ip, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: test\r\nUser-Agent: {UA}\r\nX-Test-Id: {id}\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read response");
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response {resp:?}"))
}

/// Polls until `want` lines have arrived (or 10 s passed).
fn collect(t: &mut Tailer, lines: &mut Vec<String>, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while lines.len() < want && Instant::now() < deadline {
        t.poll_with(|l| lines.push(l.to_string())).unwrap();
        if lines.len() < want {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // Anything extra would show up now.
    std::thread::sleep(Duration::from_millis(100));
    t.poll_with(|l| lines.push(l.to_string())).unwrap();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Direct,
    Missing,
    Dead,
    Pooled,
    Alias,
}

#[test]
fn real_nginx_access_log() {
    let dir = TempDir::new("nginx");
    let ports = Ports {
        backend: free_port([127, 0, 0, 1]),
        direct: free_port([127, 0, 0, 1]),
        dead: free_port([127, 0, 0, 1]),
        pooled: free_port([127, 0, 0, 1]),
        alias: free_port([127, 0, 0, 4]),
        closed: free_port([127, 0, 0, 1]),
    };
    let log = dir.join("access.log");
    let nginx = Nginx::start(dir.path(), &ports);

    // The config reader sees what nginx runs with.
    let conf = NginxConfig::from_file(dir.join("nginx.conf")).unwrap();
    let decl = conf.log_format("pool").expect("log_format pool");
    let format = LogFormat::with_escape(&decl.format, decl.escape).unwrap();
    let port_map = conf.port_map().unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(port_map.len(), 3, "{port_map:?}");
    assert_eq!(port_map[&ports.dead], ip("127.0.0.2"));
    assert_eq!(port_map[&ports.pooled], ip("127.0.0.3"));
    assert_eq!(port_map[&ports.alias], ip("127.0.0.4"));
    assert_eq!(conf.upstreams[0].servers[0].max_fails, 0);

    // Serve mode: only what comes after this.
    let mut tailer = Tailer::open(&log, Mode::Serve, None).unwrap();

    // Phase 1: a bounded set of requests of every kind.
    let plan = [
        (Kind::Direct, 6),
        (Kind::Missing, 3),
        (Kind::Dead, 4),
        (Kind::Pooled, 12),
        (Kind::Alias, 5),
    ];
    let mut sent: HashMap<String, Kind> = HashMap::new();
    for (kind, n) in plan {
        for i in 0..n {
            let id = format!("{kind:?}-{i}");
            let (addr, port, path, want) = match kind {
                Kind::Direct => ([127, 0, 0, 1], ports.direct, "/", 200),
                Kind::Missing => ([127, 0, 0, 1], ports.direct, "/missing", 404),
                Kind::Dead => ([127, 0, 0, 1], ports.dead, "/x", 502),
                Kind::Pooled => ([127, 0, 0, 1], ports.pooled, "/p?q=1", 200),
                Kind::Alias => ([127, 0, 0, 4], ports.alias, "/a", 200),
            };
            assert_eq!(get(addr, port, path, &id), want, "{id}");
            sent.insert(id, kind);
        }
    }
    // Pooled and alias requests also log a line at the backend.
    let expected_lines = plan
        .iter()
        .map(|&(k, n)| {
            if matches!(k, Kind::Pooled | Kind::Alias) {
                2 * n
            } else {
                n
            }
        })
        .sum::<usize>();
    let mut lines = Vec::new();
    collect(&mut tailer, &mut lines, expected_lines);
    assert_eq!(lines.len(), expected_lines, "{lines:#?}");
    if std::env::var_os("ACCESSLOG_TEST_VERBOSE").is_some() {
        eprintln!("{}", lines.join("\n"));
    }

    let records: Vec<Record<'_>> = lines
        .iter()
        .map(|l| format.parse(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let mut front_seen = HashSet::new();
    let mut backend_seen = HashSet::new();
    let mut two_attempts = 0;
    let local = SocketAddr::from(([127, 0, 0, 1], ports.backend));
    let closed = SocketAddr::from(([127, 0, 0, 1], ports.closed));
    for r in &records {
        let id = r.value("http_x_test_id").expect("test id").to_string();
        let kind = sent[&id];
        assert_eq!(
            r.decoded("http_user_agent").as_deref(),
            Some(UA),
            "{}",
            r.line()
        );
        assert!(r.time().unwrap().is_some());
        assert!(r.request_time().unwrap().is_some());
        let port = r.server_port().unwrap().unwrap();
        if port == ports.backend {
            // The backend sees the proxy_bind address as the client.
            assert!(
                backend_seen.insert(id.clone()),
                "duplicate backend line {id}"
            );
            let want = if kind == Kind::Pooled {
                "127.0.0.3"
            } else {
                "127.0.0.4"
            };
            assert_eq!(r.remote_addr().unwrap(), Some(ip(want)), "{}", r.line());
            assert_eq!(r.status(), Ok(Some(200)));
            assert_eq!(r.upstream_addrs().count(), 0);
            continue;
        }
        assert!(front_seen.insert(id.clone()), "duplicate line {id}");
        assert!(r.remote_addr().unwrap().unwrap().is_loopback());
        let attempts: Vec<_> = r.attempts().map(Result::unwrap).collect();
        match kind {
            Kind::Direct | Kind::Missing => {
                assert_eq!(port, ports.direct);
                let want = if kind == Kind::Direct { 200 } else { 404 };
                assert_eq!(r.status(), Ok(Some(want)));
                assert!(attempts.is_empty(), "{}", r.line());
                assert_eq!(r.effective_status(), Ok(Some(want)));
            }
            Kind::Dead => {
                assert_eq!(port, ports.dead);
                assert_eq!(r.status(), Ok(Some(502)));
                assert_eq!(attempts.len(), 1, "{}", r.line());
                assert_eq!(attempts[0].socket_addr(), Some(closed));
                assert_eq!(attempts[0].status, Some(502));
            }
            Kind::Pooled => {
                assert_eq!(port, ports.pooled);
                assert_eq!(r.status(), Ok(Some(200)));
                assert_eq!(r.last_upstream_addr(), Some(local), "{}", r.line());
                assert_eq!(attempts.last().unwrap().status, Some(200));
                if attempts.len() == 2 {
                    two_attempts += 1;
                    assert_eq!(attempts[0].socket_addr(), Some(closed));
                    assert_eq!(attempts[0].status, Some(502));
                } else {
                    assert_eq!(attempts.len(), 1, "{}", r.line());
                }
            }
            Kind::Alias => {
                assert_eq!(port, ports.alias);
                assert_eq!(r.server_addr(), Ok(Some(ip("127.0.0.4"))));
                assert_eq!(r.last_upstream_addr(), Some(local));
            }
        }
    }
    assert_eq!(front_seen.len(), sent.len());
    assert!(
        two_attempts > 0,
        "no request tried the dead pool member first"
    );

    // Attribution to pool addresses: the seed's port → proxy_bind map.
    let mut by_port = accesslog::Summary::default();
    let source = AddressSource::ServerPort(port_map);
    for l in &lines {
        by_port.add_line(&format, &source, l);
    }
    assert_eq!(by_port.malformed.count(), 0);
    let a = &by_port.addresses[&ip("127.0.0.2")];
    assert_eq!((a.requests, a.failures()), (4, 4));
    let a = &by_port.addresses[&ip("127.0.0.3")];
    assert_eq!((a.requests, a.by_class[2]), (12, 12));
    assert_eq!(by_port.addresses[&ip("127.0.0.4")].requests, 5);
    assert_eq!(by_port.unattributed, 6 + 3 + 12 + 5);
    // …and per upstream attempt.
    let mut by_upstream = accesslog::Summary::default();
    for l in &lines {
        by_upstream.add_line(&format, &AddressSource::UpstreamAddr, l);
    }
    let a = &by_upstream.addresses[&ip("127.0.0.1")];
    assert_eq!(a.requests, 4 + 12 + two_attempts + 5);
    assert_eq!(a.failures(), 4 + two_attempts);

    // Phase 2: rotate (mv + nginx -s reopen) while requests keep coming.
    let offset_before = tailer.offset().unwrap();
    // The sender runs until told to stop (at most 2000 requests); each phase
    // waits for a number of responses, so every phase sees traffic however
    // slow the machine is.
    let sent_count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (sent_count, stop) = (sent_count.clone(), stop.clone());
        std::thread::spawn(move || {
            for i in 0..2000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let id = format!("rot-{i}");
                assert_eq!(get([127, 0, 0, 1], ports.direct, "/r", &id), 200);
                sent_count.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let wait_for = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while sent_count.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "sender stalled");
            std::thread::sleep(Duration::from_millis(1));
        }
        sent_count.load(Ordering::SeqCst)
    };
    let mut lines = Vec::new();
    let poll = |t: &mut Tailer, lines: &mut Vec<String>| {
        t.poll_with(|l| lines.push(l.to_string())).unwrap();
    };
    let n = wait_for(20);
    poll(&mut tailer, &mut lines);
    std::fs::rename(&log, dir.join("access.log.1")).unwrap();
    // These go to the renamed file: nginx has not reopened yet. The tailer
    // does not look until the new file exists, so it must finish the old one.
    let n = wait_for(n + 20);
    nginx.reopen();
    poll(&mut tailer, &mut lines);
    wait_for(n + 40);
    stop.store(true, Ordering::SeqCst);
    sender.join().expect("sender");
    let total = sent_count.load(Ordering::SeqCst);
    collect(&mut tailer, &mut lines, total);

    let ids: Vec<String> = lines
        .iter()
        .map(|l| {
            format
                .parse(l)
                .unwrap()
                .value("http_x_test_id")
                .unwrap()
                .to_string()
        })
        .collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "duplicated lines");
    assert_eq!(ids.len(), total, "lost lines");
    for i in 0..total {
        assert!(unique.contains(&format!("rot-{i}")), "rot-{i} missing");
    }
    assert_eq!(tailer.stats().rotations, 1);
    // The rotation really happened mid-stream: both files got some.
    let count = |p: &Path| {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .filter(|l| l.contains("rot-"))
            .count()
    };
    let (old, new) = (count(&dir.join("access.log.1")), count(&log));
    assert!(old > 0 && new > 0, "old {old}, new {new}");
    assert_eq!(old + new, total);
    let after = tailer.offset().unwrap();
    assert_ne!(after.inode, offset_before.inode);
    assert_eq!(after.pos, std::fs::metadata(&log).unwrap().len());
    drop(nginx);
}
