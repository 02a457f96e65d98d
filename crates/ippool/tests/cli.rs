//! End-to-end tests of the `ippool` binary: `check`, `rules check` and
//! `serve` with its admin API, over a tiny HTTP/1.1 client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ippool");
const TOKEN: &str = "s3cr3t-admin-token-9f8e7d6c5b4a";

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ippool-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
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

/// Kills the daemon if a test fails before it stopped it.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    stderr: mpsc::Receiver<String>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start(config: &Path, envs: &[(&str, &str)]) -> Daemon {
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
        let mut daemon = Daemon {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr: rx,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match daemon.stderr.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or("");
                        daemon.addr = addr.parse().expect("bound address in the log");
                        return daemon;
                    }
                    seen.push(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!(
            "daemon did not report its address; stderr:\n{}",
            seen.join("\n")
        );
    }

    fn get(&self, path: &str) -> Response {
        http(self.addr, "GET", path, &[])
    }
}

struct Response {
    status: u16,
    headers: String,
    body: String,
}

/// One HTTP/1.1 request with `Connection: close`; reads to EOF.
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).expect("send request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header/body separator");
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

fn run(args: &[&str], config: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("-c")
        .arg(config)
        .env_remove("IPT_TOKEN")
        .output()
        .expect("run ippool")
}

fn rules_check(config: &Path, set: &str, addrs: &[&str]) -> Output {
    Command::new(BIN)
        .args(["rules", "check", "-c"])
        .arg(config)
        .args(["--set", set])
        .args(addrs)
        .output()
        .expect("run ippool rules check")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const DAEMON_CONFIG: &str = r#"
shutdown_timeout = "5s"

[admin]
listen = "127.0.0.1:0"
token_env = "IPPOOL_TEST_TOKEN"

[rules.clients]
default = "allow"
deny = ["10.0.0.0/8"]
allow = ["10.1.2.3"]
deny_files = ["lists/deny.txt"]

[rules.strict]
default = "deny"
allow = ["192.0.2.0/24"]
"#;

fn daemon_dir() -> (TempDir, PathBuf) {
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.0.join("lists")).expect("mkdir");
    dir.write(
        "lists/deny.txt",
        "# bad\n198.51.100.7\n203.0.113.10-203.0.113.20\n",
    );
    let cfg = dir.write("ippool.toml", DAEMON_CONFIG);
    (dir, cfg)
}

#[test]
fn serve_admin_api_and_sigterm() {
    let (_dir, cfg) = daemon_dir();
    let mut d = Daemon::start(&cfg, &[("IPPOOL_TEST_TOKEN", TOKEN)]);

    let r = d.get("/ping");
    assert_eq!((r.status, r.body.as_str()), (200, "pong"));

    let r = d.get("/config");
    assert_eq!(r.status, 200);
    assert!(
        r.headers.contains("content-type: application/json"),
        "{}",
        r.headers
    );
    assert!(
        r.body.contains(r#""token_env":"IPPOOL_TEST_TOKEN""#),
        "{}",
        r.body
    );
    assert!(
        r.body.contains(r#""deny_files":["lists/deny.txt"]"#),
        "{}",
        r.body
    );
    assert!(
        !r.body.contains(TOKEN),
        "token leaked in /config: {}",
        r.body
    );

    let r = d.get("/api/rules");
    assert_eq!(r.status, 200);
    assert!(
        r.body
            .contains(r#"{"name":"clients","default":"allow","allow":1,"deny":3}"#),
        "{}",
        r.body
    );
    assert!(r.body.contains(r#""name":"strict""#), "{}", r.body);

    let r = d.get("/api/rules/clients/check?ip=10.9.9.9");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        r#"{"ip":"10.9.9.9","verdict":"deny","rule":"10.0.0.0/8","list":"deny"}"#
    );
    let r = d.get("/api/rules/clients/check?ip=10.1.2.3");
    assert_eq!(
        r.body,
        r#"{"ip":"10.1.2.3","verdict":"allow","rule":"10.1.2.3","list":"allow"}"#
    );
    let r = d.get("/api/rules/clients/check?ip=203.0.113.15");
    assert_eq!(
        r.body,
        r#"{"ip":"203.0.113.15","verdict":"deny","rule":"203.0.113.10-203.0.113.20","list":"deny"}"#
    );
    let r = d.get("/api/rules/clients/check?ip=2001:db8::1");
    assert_eq!(
        r.body,
        r#"{"ip":"2001:db8::1","verdict":"allow","rule":null,"list":null}"#
    );
    let r = d.get("/api/rules/strict/check?ip=198.51.100.1");
    assert_eq!(
        r.body,
        r#"{"ip":"198.51.100.1","verdict":"deny","rule":null,"list":null}"#
    );

    let r = d.get("/api/rules/clients/check?ip=not-an-ip");
    assert_eq!(r.status, 400);
    assert!(r.body.contains("not-an-ip"), "{}", r.body);
    let r = d.get("/api/rules/clients/check");
    assert_eq!(r.status, 400);
    assert!(r.body.contains("`ip`"), "{}", r.body);
    let r = d.get("/api/rules/nosuch/check?ip=10.0.0.1");
    assert_eq!(r.status, 404);
    assert!(r.body.contains("nosuch"), "{}", r.body);

    // Mutations need the token even from loopback.
    let r = http(d.addr, "POST", "/api/rules", &[]);
    assert_eq!(r.status, 401);
    let bearer = format!("Bearer {TOKEN}");
    let r = http(d.addr, "POST", "/api/rules", &[("Authorization", &bearer)]);
    assert_eq!(
        r.status, 405,
        "authorized, but there is no such mutation yet"
    );

    let r = d.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(
        r.headers
            .contains("content-type: application/openmetrics-text"),
        "{}",
        r.headers
    );
    for line in [
        "# TYPE ippool_build info",
        &format!(
            "ippool_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
        "# TYPE ippool_rule_checks counter",
        "ippool_rule_checks_total{set=\"clients\",verdict=\"deny\"} 2",
        "ippool_rule_checks_total{set=\"clients\",verdict=\"allow\"} 2",
        "ippool_rule_checks_total{set=\"strict\",verdict=\"deny\"} 1",
        "ippool_rule_checks_total{set=\"strict\",verdict=\"allow\"} 0",
        "# TYPE ippool_rules gauge",
        "ippool_rules{set=\"clients\",list=\"deny\"} 3",
        "ippool_rules{set=\"clients\",list=\"allow\"} 1",
        "# EOF",
    ] {
        assert!(
            r.body.lines().any(|l| l == line),
            "missing `{line}` in:\n{}",
            r.body
        );
    }

    // SIGTERM: a prompt, clean exit.
    let pid = d.child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let code = loop {
        if let Some(s) = d.child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "daemon still running 5 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code.code(), Some(0), "exit status after SIGTERM");
    let logs: Vec<String> = d.stderr.try_iter().collect();
    assert!(logs.iter().any(|l| l.contains("SIGTERM")), "{logs:?}");
    assert!(
        logs.iter().all(|l| !l.contains(TOKEN)),
        "token leaked in logs: {logs:?}"
    );
}

#[test]
fn json_logs() {
    let (_dir, cfg) = daemon_dir();
    let mut child = Command::new(BIN)
        .args(["--log-format", "json", "serve", "-c"])
        .arg(&cfg)
        .env("IPPOOL_TEST_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut guard = KillOnDrop(child);
    // Every line is JSON; the admin listener's carries its address.
    let mut found = None;
    for line in BufReader::new(stderr).lines().take(20) {
        let line = line.expect("a log line");
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["fields"]["addr"].is_string() {
            found = Some((v, line));
            break;
        }
    }
    let (v, line) = found.expect("a log line with the admin address");
    assert_eq!(v["level"], "INFO", "{line}");
    let addr = v["fields"]["addr"].as_str().expect("addr field");
    let addr: SocketAddr = addr.parse().expect("an address");
    assert!(addr.ip().is_loopback(), "{line}");
    assert_eq!(http(addr, "GET", "/ping", &[]).body, "pong");
    let _ = guard.0.kill();
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn check_prints_effective_config_without_secrets() {
    let (dir, _) = daemon_dir();
    let cfg = dir.write(
        "c.toml",
        &DAEMON_CONFIG.replace("127.0.0.1:0", "0.0.0.0:9095"),
    );
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&cfg)
        .env("IPPOOL_TEST_TOKEN", TOKEN)
        .output()
        .expect("run");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.contains("listen = \"0.0.0.0:9095\""), "{stdout}");
    assert!(
        stdout.contains("state_dir = \"state\""),
        "defaults filled in: {stdout}"
    );
    assert!(
        stdout.contains("admin token: set, from env IPPOOL_TEST_TOKEN (redacted)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("rules.clients: 1 allow and 3 deny rules"),
        "{stdout}"
    );
    assert!(!stdout.contains(TOKEN), "token leaked: {stdout}");

    // The effective config is itself a valid config.
    let again = dir.write("again.toml", &stdout);
    let out2 = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&again)
        .env("IPPOOL_TEST_TOKEN", TOKEN)
        .output()
        .expect("run");
    assert_eq!(out2.status.code(), Some(0), "{}", text(&out2.stderr));
}

#[test]
fn check_errors_name_key_and_line() {
    let dir = TempDir::new();
    dir.write("bad.txt", "10.0.0.1\n\n# comment\n10.0.0.1/8\n");
    let cases: &[(&str, &[&str])] = &[
        (
            "[admin]\nlisten = \"127.0.0.1:9095\"\nlisen = 1\n",
            &["bad.toml:3:1: admin.lisen: unknown field `lisen`"],
        ),
        (
            "state_dir = \"s\"\n[rules.clients]\ndefault = \"allow\"\ndeny = [\n  \"10.0.0.0/8\",\n  \"10.0.0.1/8\",\n]\n",
            &[
                "bad.toml:6:3: rules.clients.deny[1]: 10.0.0.1/8 has host bits set",
                "10.0.0.0/8",
            ],
        ),
        (
            "[rules.clients]\ndefault = \"allow\"\ndeny = 7\n",
            &["bad.toml:3:8: rules.clients.deny: invalid type: integer `7`"],
        ),
        (
            "[rules.clients]\ndefault = \"allow\"\ndeny_files = [\"missing.txt\", \"bad.txt\"]\n",
            &[
                "bad.toml:3:15: rules.clients.deny_files[0]:",
                "missing.txt: cannot read",
            ],
        ),
        (
            "[rules.clients]\ndefault = \"allow\"\ndeny_files = [\"bad.txt\"]\n",
            &[
                "bad.toml:3:15: rules.clients.deny_files[0]: ",
                "bad.txt: line 4: `10.0.0.1/8`",
            ],
        ),
        (
            "[rules.clients]\ndeny = []\n",
            &["bad.toml:1:1: rules.clients: missing field `default`"],
        ),
        (
            "[admin]\nlisten = \"0.0.0.0:9095\"\n",
            &[
                "bad.toml:2:10: admin.listen: 0.0.0.0:9095 is not a loopback address",
                "token_file",
            ],
        ),
        (
            "[admin]\ntoken_env = \"IPT_TOKEN\"\n",
            &["bad.toml:2:13: admin.token_env: environment variable IPT_TOKEN is not set"],
        ),
        (
            "shutdown_timeout = \"soon\"\n",
            &["bad.toml:1:20: shutdown_timeout: bad duration `soon`"],
        ),
        ("[admin\n", &["bad.toml:1:7:"]),
    ];
    for (toml, wanted) in cases {
        let cfg = dir.write("bad.toml", toml);
        let out = run(&["check"], &cfg);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "config {toml:?}: {stderr}");
        assert!(out.stdout.is_empty(), "config {toml:?}");
        for w in *wanted {
            assert!(
                stderr.contains(w),
                "config {toml:?}: expected `{w}` in:\n{stderr}"
            );
        }
    }
}

#[test]
fn rules_check_offline() {
    let (_dir, cfg) = daemon_dir();
    let out = rules_check(&cfg, "clients", &["10.1.2.3", "192.0.2.1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec!["10.1.2.3", "allow", "allow", "list:", "10.1.2.3"],
            vec!["192.0.2.1", "allow", "default"]
        ]
    );

    let out = rules_check(&cfg, "clients", &["10.1.2.3", "::ffff:10.9.9.9"]);
    assert_eq!(out.status.code(), Some(1), "a denied address exits 1");
    assert!(
        text(&out.stdout).contains("deny list: 10.0.0.0/8"),
        "{}",
        text(&out.stdout)
    );

    let out = rules_check(&cfg, "nosuch", &["10.1.2.3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no rule set `nosuch` (known: clients, strict)"));

    let out = rules_check(&cfg, "clients", &["10.1.2.300"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`10.1.2.300`"));
}

#[test]
fn help_and_version() {
    let out = Command::new(BIN).arg("--version").output().expect("run");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("ippool {}", env!("CARGO_PKG_VERSION"))
    );
    for args in [
        &["serve", "--help"][..],
        &["check", "--help"],
        &["rules", "check", "--help"],
    ] {
        let out = Command::new(BIN).args(args).output().expect("run");
        assert_eq!(out.status.code(), Some(0));
        let help = text(&out.stdout);
        assert!(help.contains("Example"), "{args:?}: {help}");
        assert!(help.contains("examples/loopback.toml"), "{args:?}: {help}");
    }
}

#[test]
fn example_config_is_valid() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/loopback.toml");
    let out = run(&["check"], &cfg);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = rules_check(&cfg, "clients", &["10.1.2.3", "10.9.9.9"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("allow  allow list: 10.1.2.3"), "{stdout}");
    assert!(stdout.contains("deny   deny list: 10.0.0.0/8"), "{stdout}");
    // Every shipped config checks.
    for name in ["ingress.toml", "nginx-monitor.toml"] {
        let cfg = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .join(name);
        let out = run(&["check"], &cfg);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out.stderr));
    }
}

/// The shipped systemd unit: hardened as documented, and valid for
/// `systemd-analyze verify` with the binary at its place.
#[test]
fn systemd_unit_is_hardened_and_valid() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/ippool.service"),
    )
    .expect("examples/ippool.service");
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        value("CapabilityBoundingSet"),
        ["CAP_NET_ADMIN CAP_NET_BIND_SERVICE"]
    );
    for (k, v) in [
        ("PrivateTmp", "yes"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("ProtectHome", "yes"),
    ] {
        assert_eq!(value(k), [v], "{k}");
    }
    assert!(value("ExecStart")[0].contains(" serve -c "), "{unit}");
    assert!(value("ExecStartPre")[0].contains(" check -c "), "{unit}");
    assert_eq!(
        value("ExecReload"),
        ["/bin/kill -HUP $MAINPID"],
        "reload is SIGHUP"
    );
    // systemd-analyze ships with systemd; where it is, the unit must pass.
    if let Ok(out) = Command::new("systemd-analyze").arg("--version").output()
        && out.status.success()
    {
        let dir = TempDir::new();
        let patched = unit.replace("/usr/local/bin/ippool", BIN);
        let path = dir.write("ippool.service", &patched);
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .expect("systemd-analyze");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.trim().is_empty(),
            "systemd-analyze verify: {err}"
        );
    }
}
