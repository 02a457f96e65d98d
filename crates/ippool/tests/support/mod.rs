//! Helpers shared by the end-to-end tests of the `ippool` binary: a temp
//! directory, the daemon as a child process, a tiny HTTP/1.1 client and an
//! upstream that answers with the peer address it saw.

#![allow(dead_code, reason = "each test file uses a subset")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ippool");

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ippool-e2e-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// Writes `text` to `name` inside the directory.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `ippool serve` as a child; killed on drop if the test failed first.
pub struct Daemon {
    /// The child process.
    pub child: Child,
    /// Where the admin API listens.
    pub admin: SocketAddr,
    /// The log lines seen before the admin API was up.
    pub startup: Vec<String>,
    stderr: mpsc::Receiver<String>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts `ippool serve -c config` and waits for the admin API.
    pub fn start(config: &Path, envs: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "-c"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn ippool serve");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if let Some(rest) = line.split("admin API listening on http://").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or("");
                        return Daemon {
                            child,
                            admin: addr.parse().expect("bound address in the log"),
                            startup: seen,
                            stderr: rx,
                        };
                    }
                    seen.push(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "daemon did not report its address; stderr:\n{}",
            seen.join("\n")
        );
    }

    /// The address logged after `needle` at start-up.
    fn logged(&self, needle: &str) -> SocketAddr {
        self.startup
            .iter()
            .find_map(|l| l.split(needle).nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no `{needle}` in:\n{}", self.startup.join("\n")))
    }

    /// The address `egress.<name>` listens on.
    pub fn egress(&self, name: &str) -> SocketAddr {
        self.logged(&format!(
            "egress.{name}: proxy (HTTP, CONNECT, SOCKS5) listening on "
        ))
    }

    /// The address `l4.<name>` listens on.
    pub fn l4(&self, name: &str) -> SocketAddr {
        self.logged(&format!("l4.{name}: TCP balancer listening on "))
    }

    /// The address `ingress.<name>` listens on.
    pub fn ingress(&self, name: &str) -> SocketAddr {
        self.logged(&format!("ingress.{name}: reverse proxy listening on "))
    }

    /// The address of the registration channel (`ws://` or `wss://`).
    pub fn registry(&self) -> SocketAddr {
        let tls = self
            .startup
            .iter()
            .any(|l| l.contains("registration channel listening on wss://"));
        self.logged(if tls {
            "registration channel listening on wss://"
        } else {
            "registration channel listening on ws://"
        })
    }

    /// Log lines that arrived since start-up, waiting up to `wait` for one
    /// containing `needle`.
    pub fn wait_for_log(&self, needle: &str, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(50))
                && line.contains(needle)
            {
                return Some(line);
            }
        }
        None
    }

    /// SIGTERM, then the exit status (within 15 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, and a clean exit (status 0) within 15 s.
    pub fn stop(mut self) {
        let status = self.terminate();
        assert_eq!(status.code(), Some(0), "clean stop on SIGTERM");
    }

    /// SIGKILL: no shutdown code runs (a crash, as far as state goes).
    pub fn kill_9(mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }
}

/// `ippool serve -c config` that must fail to start: its stderr.
pub fn serve_fails(config: &Path, envs: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "-c"]).arg(config);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run ippool serve");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "started anyway: {err}");
    err
}

/// `ippool keygen --id ID --dir DIR`, which must succeed.
pub fn keygen(dir: &Path, id: &str) {
    let out = Command::new(BIN)
        .args(["keygen", "--id", id, "--dir"])
        .arg(dir)
        .output()
        .expect("keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An `ippool agent` process, killed on drop.
pub struct Agent(pub Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Agent {
    /// Registers `service` for `route` (`HOST/PATH`) with the channel at
    /// `channel`, as `id` with `keys/ID.key` under `dir`.
    pub fn start(dir: &Path, channel: SocketAddr, id: &str, service: &str, route: &str) -> Agent {
        let child = Command::new(BIN)
            .args([
                "agent",
                "--proxy",
                &format!("ws://{channel}"),
                "--id",
                id,
                "--key",
            ])
            .arg(dir.join(format!("keys/{id}.key")))
            .args(["--service", service, "--route", route, "--weight", "3"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn agent");
        Agent(child)
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The header block, lower-cased.
    pub headers: String,
    /// The body.
    pub body: String,
}

impl Response {
    /// The value of header `name` (lower-case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim())
        })
    }
}

/// One HTTP/1.1 request with `Connection: close` to `addr` (the request
/// target may be absolute-form, for a proxy); reads to EOF.
pub fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let host = target
        .strip_prefix("http://")
        .and_then(|t| t.split('/').next())
        .map_or_else(|| addr.to_string(), str::to_owned);
    let mut req = format!("{method} {target} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {host}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    parse_response(&String::from_utf8_lossy(&raw))
}

/// Parses a whole `Connection: close` response.
pub fn parse_response(raw: &str) -> Response {
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header/body separator in {raw:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    Response {
        status,
        headers: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

/// An HTTP upstream on 127.0.0.1 that answers every request with the peer
/// address it saw as the body, one request per connection.
pub struct PeerEcho {
    /// Where it listens.
    pub addr: SocketAddr,
}

impl PeerEcho {
    /// Starts the server on a thread (it lives as long as the test).
    pub fn start() -> PeerEcho {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let addr = l.local_addr().expect("upstream addr");
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match conn.read(&mut b) {
                            Ok(1) => head.push(b[0]),
                            _ => return,
                        }
                    }
                    let peer = conn
                        .peer_addr()
                        .map(|a| a.ip().to_string())
                        .unwrap_or_default();
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{peer}",
                        peer.len()
                    );
                });
            }
        });
        PeerEcho { addr }
    }
}

/// The value of the first Prometheus sample line starting with `series`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// An HTTP/1.1 backend (keep-alive) answering every request with `name`
/// as its body; runs until the test process ends.
pub fn named_backend(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            std::thread::spawn(move || {
                let mut w = c.try_clone().expect("clone");
                let mut r = BufReader::new(c);
                let mut line = String::new();
                loop {
                    // Read one head; bodies are not expected.
                    loop {
                        line.clear();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
                        name.len()
                    );
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The wall-clock end of a benching, from a `/probe` address entry.
pub fn benched_until(a: &serde_json::Value) -> std::time::SystemTime {
    let s = a["benched_until"].as_str().expect("benched_until");
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// Two wall-clock times within 5 ms (a restored benching keeps its end).
pub fn same_time(a: std::time::SystemTime, b: std::time::SystemTime) -> bool {
    let d = a
        .duration_since(b)
        .or_else(|_| b.duration_since(a))
        .unwrap_or_default();
    d <= Duration::from_millis(5)
}

/// The verdict (`allow`/`deny`) of rule set `set` for `ip`, from the
/// daemon's admin API.
pub fn verdict(d: &Daemon, set: &str, ip: &str) -> String {
    let r = http(
        d.admin,
        "GET",
        &format!("/api/rules/{set}/check?ip={ip}"),
        &[],
        "",
    );
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    v["verdict"].as_str().expect("verdict").to_owned()
}

/// What happened to a request sent from `src` ([`send_from`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Fate {
    /// An HTTP status came back.
    Status(u16),
    /// Reset or closed before any answer (refused at accept).
    Refused,
    /// No connection within the timeout (SYN dropped).
    NoConnection,
}

/// Sends `request` to `to` from source address `src` (any 127.0.0.0/8
/// address works on loopback) and reads the answer.
pub fn send_from(src: &str, to: SocketAddr, request: &str) -> Fate {
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let src: IpAddr = src.parse().expect("source");
    s.bind(&SocketAddr::new(src, 0).into())
        .expect("bind source");
    match s.connect_timeout(&to.into(), Duration::from_millis(400)) {
        Ok(()) => {}
        // The reset of a refused peer may beat connect() to userspace.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Fate::Refused,
        Err(_) => return Fate::NoConnection,
    }
    let mut s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    if s.write_all(request.as_bytes()).is_err() {
        return Fate::Refused;
    }
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) if buf.starts_with(b"HTTP/1.1 ") => {
            let code = String::from_utf8_lossy(&buf[9..12])
                .parse()
                .expect("status");
            Fate::Status(code)
        }
        _ => Fate::Refused,
    }
}

/// A forward-proxy request for `http://upstream/`, with Basic proxy
/// credentials `auth` (Base64) if given.
pub fn proxy_get(upstream: SocketAddr, auth: Option<&str>) -> String {
    let auth = auth.map_or(String::new(), |a| {
        format!("Proxy-Authorization: Basic {a}\r\n")
    });
    format!(
        "GET http://{upstream}/ HTTP/1.1\r\nHost: {upstream}\r\n{auth}Connection: close\r\n\r\n"
    )
}

/// A test CA and a certificate for `localhost` and 127.0.0.1 signed by it,
/// as PEM files in `dir`: [ca.pem, cert.pem, key.pem], and another CA's
/// certificate (other.pem).
pub fn pki(dir: &TempDir) -> [PathBuf; 4] {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let ca = |cn: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA")
    };
    let (ca, other) = (ca("test CA"), ca("another CA"));
    let leaf_key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf");
    [
        dir.write("ca.pem", &ca.pem()),
        dir.write("cert.pem", &leaf.pem()),
        dir.write("key.pem", &leaf_key.serialize_pem()),
        dir.write("other.pem", &other.pem()),
    ]
}
