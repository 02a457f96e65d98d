//! nginx pool monitoring end to end: a real nginx serves a pool of
//! `proxy_bind` addresses on loopback (two of them failing: a closed port
//! answering 502, a target answering 429) and writes its access log in a
//! custom `log_format`; the real `ippool serve` follows that log across a
//! `mv` + `nginx -s reopen` rotation, and `/probe` must show exactly the
//! failing addresses benched. Also: client feedback, and `ippool logscan`.
//!
//! Needs the `nginx` binary (Debian/Ubuntu: `apt-get install -y nginx`), or
//! its path in `NGINX_BIN`. Without it the test fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ippool");
const TOKEN: &str = "monitor-test-token-0123456789abcdef";

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ippool-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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

fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("pick a free port")
        .port()
}

/// The pool: (proxy_bind address, listen port, whether it fails).
struct Layout {
    ok_backend: u16,
    blocked_backend: u16,
    closed: u16,
    members: Vec<([u8; 4], u16, bool)>,
}

/// A running nginx in its own prefix directory and process group, stopped
/// (workers included) on drop, even when the test fails.
struct Nginx {
    bin: PathBuf,
    dir: PathBuf,
    conf: PathBuf,
    child: Child,
}

impl Nginx {
    fn start(dir: &Path, layout: &Layout) -> Nginx {
        let bin = nginx_binary();
        for t in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(dir.join("tmp").join(t)).expect("mkdir");
        }
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, nginx_config(dir, layout)).expect("write nginx.conf");
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
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting nginx ({}): {e}", bin.display()));
        let mut nginx = Nginx {
            bin,
            dir: dir.to_path_buf(),
            conf,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut ports = vec![layout.ok_backend, layout.blocked_backend];
        ports.extend(layout.members.iter().map(|m| m.1));
        for port in ports {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                if let Ok(Some(status)) = nginx.child.try_wait() {
                    panic!("nginx exited ({status}):\n{}", nginx.error_log());
                }
                assert!(
                    Instant::now() < deadline,
                    "nginx not listening on {addr}:\n{}",
                    nginx.error_log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        nginx
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

fn nginx_config(dir: &Path, l: &Layout) -> String {
    let d = dir.display();
    let mut servers = String::new();
    for (ip, port, fails) in &l.members {
        let ip = IpAddr::from(*ip);
        let target = if *fails && ip.to_string().ends_with(".13") {
            l.closed
        } else if *fails {
            l.blocked_backend
        } else {
            l.ok_backend
        };
        servers.push_str(&format!(
            "    server {{ listen 127.0.0.1:{port}; proxy_bind {ip}; \
             location / {{ proxy_pass http://127.0.0.1:{target}; }} }}\n"
        ));
    }
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
                    'port=$server_port up=$upstream_addr us=$upstream_status '
                    'rt=$request_time urt=$upstream_response_time';
    access_log {d}/access.log pool;
    proxy_connect_timeout 2s;

    # The targets: one answers, one blocks.
    server {{ listen 127.0.0.1:{ok}; access_log off; location / {{ return 200 "ok\n"; }} }}
    server {{ listen 127.0.0.1:{blocked}; access_log off; location / {{ return 429; }} }}
    # The pool: one server block per address.
{servers}}}
"#,
        ok = l.ok_backend,
        blocked = l.blocked_backend,
    )
}

/// HTTP/1.0 GET through nginx; returns the status.
fn get(port: u16, path: &str) -> u16 {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read response");
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response {resp:?}"))
}

/// The daemon, killed on drop; its stderr collected by a thread.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start(config: &Path) -> Daemon {
        let mut child = Command::new(BIN)
            .args(["serve", "-c"])
            .arg(config)
            .env("IPPOOL_TEST_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ippool serve");
        let stderr = child.stderr.take().expect("stderr piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        {
            let logs = Arc::clone(&logs);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut l) = logs.lock() {
                        l.push(line);
                    }
                }
            });
        }
        let mut d = Daemon {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            logs,
        };
        let line = d.wait_log("listening on http://");
        let rest = line.split("listening on http://").nth(1).unwrap_or("");
        d.addr = rest
            .split_whitespace()
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        d
    }

    fn logs(&self) -> Vec<String> {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits (at most 15 s) for a log line containing every one of `parts`.
    fn wait_log_all(&mut self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(l) = self
                .logs()
                .into_iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return l;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("daemon exited ({status}):\n{}", self.logs().join("\n"));
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?}:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_log(&mut self, part: &str) -> String {
        self.wait_log_all(&[part])
    }

    fn get(&self, path: &str) -> (u16, String) {
        http(self.addr, "GET", path, &[], "")
    }

    fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// The value of one metric series, or `None` if absent.
    fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics");
        body.lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).expect("send request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header/body separator");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    (status, body.to_owned())
}

fn address<'a>(pool: &'a Value, ip: &str) -> &'a Value {
    pool["addresses"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["ip"] == ip))
        .unwrap_or_else(|| panic!("no {ip} in {pool:#}"))
}

const MONITOR_CONFIG: &str = r#"
shutdown_timeout = "5s"

[admin]
listen = "127.0.0.1:0"
token_env = "IPPOOL_TEST_TOKEN"

[monitor.web]
access_log = "nginx/access.log"
format_from = "nginx/nginx.conf"
format_name = "pool"
address = "server_port"
nginx_conf = "nginx/nginx.conf"
mode = "serve"
poll_interval = "50ms"

[monitor.web.health]
consecutive_failures = 3
cooldown = "10m"
blocked_statuses = [403, 429, 502, 504]

[monitor.feedback]
access_log = "feedback.log"
format = "$remote_addr $upstream_addr $upstream_status"
address = "upstream_addr"
addresses = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]

[monitor.feedback.health]
consecutive_failures = 3
"#;

#[test]
fn nginx_pool_is_monitored() {
    let dir = TempDir::new("monitor");
    let ngx_dir = dir.join("nginx");
    std::fs::create_dir_all(&ngx_dir).expect("mkdir");
    let members: Vec<([u8; 4], u16, bool)> = (11u8..=15)
        .map(|i| ([127, 0, 0, i], free_port(), i == 13 || i == 14))
        .collect();
    let layout = Layout {
        ok_backend: free_port(),
        blocked_backend: free_port(),
        closed: free_port(),
        members,
    };
    let nginx = Nginx::start(&ngx_dir, &layout);
    let cfg = dir.join("ippool.toml");
    std::fs::write(&cfg, MONITOR_CONFIG).expect("write config");
    let mut d = Daemon::start(&cfg);
    // Serve mode reads new lines only: wait until the log is followed.
    d.wait_log_all(&["monitor following", "nginx/access.log"]);

    let round = |n: usize| {
        for _ in 0..n {
            for (ip, port, fails) in &layout.members {
                let status = get(*port, "/x");
                let want = match (fails, ip[3]) {
                    (false, _) => 200,
                    (true, 13) => 502,
                    (true, _) => 429,
                };
                assert_eq!(status, want, "through {ip:?}");
            }
        }
    };
    let log = ngx_dir.join("access.log");
    round(4);
    // A line nginx did not write: counted as malformed, never fatal.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .and_then(|mut f| f.write_all(b"this is not an access log line\n"))
        .expect("append garbage");
    round(2);
    // Rotation mid-stream: these rounds go to the renamed file, the next
    // ones to the new file once nginx reopens.
    std::fs::rename(&log, ngx_dir.join("access.log.1")).expect("mv");
    round(2);
    nginx.reopen();
    round(2);
    let sent = 10 * layout.members.len();

    // Every line arrives exactly once.
    let parsed = "ippool_accesslog_lines_total{monitor=\"web\",result=\"parsed\"}";
    let malformed = "ippool_accesslog_lines_total{monitor=\"web\",result=\"malformed\"}";
    let deadline = Instant::now() + Duration::from_secs(15);
    while d.metric(parsed) != Some(sent as f64) {
        assert!(
            Instant::now() < deadline,
            "lines parsed: {:?} of {sent}\n{}",
            d.metric(parsed),
            d.logs().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.metric(parsed), Some(sent as f64), "lines counted twice");
    assert_eq!(d.metric(malformed), Some(1.0));
    // The rotation really happened mid-stream.
    let lines_in = |p: &Path| std::fs::read_to_string(p).map_or(0, |t| t.lines().count());
    let (old, new) = (lines_in(&ngx_dir.join("access.log.1")), lines_in(&log));
    assert!(old > 0 && new > 0, "old {old}, new {new}");
    assert_eq!(old + new, sent + 1);

    // Exactly the failing addresses are benched (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(10);
    let pool = loop {
        let probe = d.get_json("/probe?pool=web&recent=3");
        let pool = probe["pools"][0].clone();
        if pool["benched"] == 2 {
            break pool;
        }
        assert!(Instant::now() < deadline, "not benched: {probe:#}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(pool["name"], "web");
    assert_eq!(pool["kind"], "nginx");
    assert_eq!(
        (pool["size"].as_u64(), pool["available"].as_u64()),
        (Some(5), Some(3))
    );
    for (ip, _, fails) in &layout.members {
        let ip = IpAddr::from(*ip).to_string();
        let a = address(&pool, &ip);
        let c = &a["counters"];
        assert_eq!(
            c["successes"].as_u64().unwrap_or(0) + c["failures"].as_u64().unwrap_or(0),
            10,
            "{a:#}"
        );
        if *fails {
            assert_eq!(a["state"], "benched", "{a:#}");
            assert!(a["benched_until"].is_string(), "{a:#}");
            assert!(
                a["remaining_seconds"].as_f64().unwrap_or(0.0) > 500.0,
                "{a:#}"
            );
            assert_eq!(c["failures"], 10, "{a:#}");
            assert_eq!(c["benched"], 1, "{a:#}");
            // Outcomes after the benching are kept but change nothing.
            assert_eq!(c["ignored"], 7, "{a:#}");
            let recent = a["recent"].as_array().expect("recent");
            assert_eq!(recent.len(), 3, "{a:#}");
            let want = if ip.ends_with(".13") { 502 } else { 429 };
            assert!(
                recent
                    .iter()
                    .all(|o| o["status"] == want && o["verdict"] == "failure")
            );
        } else {
            assert_eq!(a["state"], "available", "{a:#}");
            assert_eq!(c["successes"], 10, "{a:#}");
        }
    }
    let logs = d.logs().join("\n");
    for ip in ["127.0.0.13", "127.0.0.14"] {
        assert!(
            d.logs()
                .iter()
                .any(|l| l.contains("address benched") && l.contains(ip)),
            "{logs}"
        );
    }
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains("malformed access-log line") && l.contains("WARN")),
        "{logs}"
    );

    // Filters and errors.
    let one = d.get_json("/probe?ip=127.0.0.13");
    assert_eq!(one["pools"].as_array().map(Vec::len), Some(1), "{one:#}");
    assert_eq!(
        one["pools"][0]["addresses"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(one["pools"][0]["addresses"][0]["state"], "benched");
    let (status, body) = d.get("/probe?ip=127.0.0.300");
    assert_eq!(status, 400);
    assert!(body.contains("127.0.0.300"), "{body}");
    let (status, body) = d.get("/probe?pool=nope");
    assert_eq!(status, 404);
    assert!(body.contains("nope") && body.contains("web"), "{body}");
    let (status, _) = d.get("/probe?ip=198.51.100.1");
    assert_eq!(status, 404);
    assert_eq!(
        d.get_json("/probe")["pools"].as_array().map(Vec::len),
        Some(2)
    );

    // Metrics of the pool.
    for (series, want) in [
        ("ippool_pool_addresses{pool=\"web\",state=\"benched\"}", 2.0),
        (
            "ippool_pool_addresses{pool=\"web\",state=\"available\"}",
            3.0,
        ),
        (
            "ippool_pool_addresses{pool=\"web\",state=\"probation\"}",
            0.0,
        ),
        (
            "ippool_pool_transitions_total{pool=\"web\",kind=\"benched\"}",
            2.0,
        ),
        (
            "ippool_pool_transitions_total{pool=\"web\",kind=\"restored\"}",
            0.0,
        ),
        (
            "ippool_pool_addresses{pool=\"feedback\",state=\"available\"}",
            3.0,
        ),
    ] {
        assert_eq!(d.metric(series), Some(want), "{series}");
    }

    // Client feedback.
    let path = "/api/pools/feedback/addresses/192.0.2.1/outcome";
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let failure = r#"{"outcome": "failure", "detail": "captcha"}"#;
    let (status, _) = http(d.addr, "POST", path, &[], failure);
    assert_eq!(status, 401, "mutations need the token, even from loopback");
    let (status, body) = http(d.addr, "POST", path, &auth, "{not json");
    assert_eq!(status, 400);
    assert!(body.contains("bad JSON"), "{body}");
    let (status, body) = http(d.addr, "POST", path, &auth, r#"{"outcome": "maybe"}"#);
    assert_eq!(status, 400);
    assert!(body.contains("maybe"), "{body}");
    let (status, body) = http(d.addr, "POST", path, &auth, r#"{"outcome": "status"}"#);
    assert_eq!(status, 400);
    assert!(body.contains("status"), "{body}");
    let (status, body) = http(
        d.addr,
        "POST",
        "/api/pools/nope/addresses/192.0.2.1/outcome",
        &auth,
        failure,
    );
    assert_eq!(status, 404, "{body}");
    let (status, body) = http(
        d.addr,
        "POST",
        "/api/pools/feedback/addresses/192.0.2.9/outcome",
        &auth,
        failure,
    );
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("192.0.2.9"), "{body}");
    let reports = [
        failure,
        r#"{"outcome": "status", "status": 429}"#,
        r#"{"outcome": "failure"}"#,
    ];
    for (i, report) in reports.iter().enumerate() {
        let (status, body) = http(d.addr, "POST", path, &auth, report);
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("JSON answer");
        assert_eq!(v["verdict"], "failure", "{v}");
        if i < 2 {
            assert_eq!(v["state"], "available", "{v}");
            assert!(v["transition"].is_null(), "{v}");
        } else {
            assert_eq!(v["state"], "benched", "{v}");
            assert_eq!(v["transition"], "benched", "{v}");
        }
    }
    let fb = d.get_json("/probe?pool=feedback&ip=192.0.2.1");
    let a = &fb["pools"][0]["addresses"][0];
    assert_eq!(a["state"], "benched", "{fb:#}");
    assert_eq!(a["reports"][0]["detail"], "captcha", "{fb:#}");
    assert_eq!(a["reports"][1]["status"], 429, "{fb:#}");
    assert_eq!(
        d.metric("ippool_pool_transitions_total{pool=\"feedback\",kind=\"benched\"}"),
        Some(1.0)
    );

    // SIGTERM: a clean stop, the monitors included.
    let status = Command::new("kill")
        .args(["-TERM", &d.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let code = loop {
        if let Some(s) = d.child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code.code(), Some(0), "{}", d.logs().join("\n"));
    d.wait_log_all(&["monitor stopped", "web"]);
    drop(nginx);
}

const SCAN_FORMAT: &str = r#"$remote_addr [$time_local] "$request" $status up=$upstream_addr us=$upstream_status urt=$upstream_response_time"#;

#[test]
fn logscan_table_and_json() {
    let dir = TempDir::new("logscan");
    let line = |status: u16, up: &str, us: &str, urt: &str| {
        format!(
            "192.0.2.7 [10/Oct/2024:13:55:36 +0000] \"GET / HTTP/1.1\" {status} up={up} us={us} urt={urt}\n"
        )
    };
    let mut text = String::new();
    for _ in 0..6 {
        text.push_str(&line(200, "10.0.0.1:80", "200", "0.010"));
    }
    for _ in 0..2 {
        text.push_str(&line(429, "10.0.0.1:80", "429", "0.040"));
    }
    text.push_str(&line(301, "10.0.0.1:80", "301", "0.010"));
    for _ in 0..3 {
        text.push_str(&line(502, "10.0.0.2:80", "502", "0.100"));
    }
    // Two attempts: 10.0.0.2 fails, 10.0.0.3 answers.
    for _ in 0..2 {
        text.push_str(&line(
            200,
            "10.0.0.2:80, 10.0.0.3:80",
            "502, 200",
            "0.100, 0.020",
        ));
    }
    text.push_str(&line(200, "-", "-", "-"));
    text.push_str("garbage\n");
    let log = dir.join("access.log");
    std::fs::write(&log, text).expect("write log");

    let out = Command::new(BIN)
        .arg("logscan")
        .arg(&log)
        .args(["--format", SCAN_FORMAT, "--json"])
        .output()
        .expect("run logscan");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("line 16: malformed"), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        (
            &v["lines"],
            &v["attributed"],
            &v["unattributed"],
            &v["malformed"]
        ),
        (
            &Value::from(16),
            &Value::from(14),
            &Value::from(1),
            &Value::from(1)
        )
    );
    let rows = v["addresses"].as_array().expect("addresses");
    let order: Vec<&str> = rows.iter().filter_map(|r| r["address"].as_str()).collect();
    assert_eq!(order, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    let r = &rows[0];
    assert_eq!(
        (
            &r["requests"],
            &r["status_2xx"],
            &r["status_3xx"],
            &r["status_4xx"],
            &r["failures"]
        ),
        (
            &Value::from(9),
            &Value::from(6),
            &Value::from(1),
            &Value::from(2),
            &Value::from(2)
        )
    );
    assert_eq!(r["failure_percent"], 22.22);
    // (6 × 10 + 2 × 40 + 10) / 9 ms
    assert_eq!(r["mean_time_ms"], 16.667);
    let r = &rows[1];
    assert_eq!(
        (&r["requests"], &r["status_5xx"]),
        (&Value::from(5), &Value::from(5))
    );
    assert_eq!(
        r["failures"], 0,
        "502 is not in the default blocked statuses"
    );
    assert_eq!(r["mean_time_ms"], 100.0);
    assert_eq!(
        (&rows[2]["requests"], &rows[2]["mean_time_ms"]),
        (&Value::from(2), &Value::from(20.0))
    );

    // The table, with 502 counted as a failure.
    let out = Command::new(BIN)
        .arg("logscan")
        .arg(&log)
        .args(["--format", SCAN_FORMAT, "--blocked-statuses", "403,429,502"])
        .output()
        .expect("run logscan");
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let table: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        table,
        [
            vec![
                "ADDRESS", "REQUESTS", "2XX", "3XX", "4XX", "5XX", "FAILURES", "FAIL%", "MEAN_MS"
            ],
            vec!["10.0.0.1", "9", "6", "1", "2", "0", "2", "22.2", "16.667"],
            vec!["10.0.0.2", "5", "0", "0", "0", "5", "5", "100.0", "100.000"],
            vec!["10.0.0.3", "2", "2", "0", "0", "0", "0", "0.0", "20.000"],
        ],
        "{stdout}"
    );
    assert!(
        stdout.contains("16 lines, 14 attributed, 1 naming no pool address, 1 malformed"),
        "{stdout}"
    );
    // Not a terminal: no progress bar on stderr.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().all(|l| l.starts_with("warning:")),
        "{stderr}"
    );

    // A format without the address variable is a usage error.
    let out = Command::new(BIN)
        .arg("logscan")
        .arg(&log)
        .args(["--format", "combined"])
        .output()
        .expect("run logscan");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("$upstream_addr"));
    let out = Command::new(BIN)
        .arg("logscan")
        .arg(dir.join("missing.log"))
        .args(["--format", SCAN_FORMAT])
        .output()
        .expect("run logscan");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn example_monitor_config_is_valid() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/nginx-monitor.toml");
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&cfg)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("# monitor.egress:") && stdout.contains("3 addresses"),
        "{stdout}"
    );
}
