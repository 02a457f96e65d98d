//! Self-registration end to end with real processes: `ippool keygen`
//! writes a key pair, `ippool agent` registers a backend with `ippool
//! serve`, the service shows in the API; SIGTERM drains and deregisters,
//! SIGKILL is noticed within heartbeat_timeout, a revoked key is refused.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{Agent, Daemon, TempDir, http};

const TOKEN: &str = "registry-admin-token-0123456789";

fn agent(dir: &TempDir, channel: std::net::SocketAddr, id: &str, service: &str) -> Agent {
    Agent::start(&dir.0, channel, id, service, "example.com/api")
}

fn services(d: &Daemon) -> serde_json::Value {
    let r = http(d.admin, "GET", "/api/services", &[], "");
    assert_eq!(r.status, 200, "{r:?}");
    serde_json::from_str::<serde_json::Value>(&r.body).expect("JSON")["services"].clone()
}

fn wait_for(what: &str, d: &Daemon, f: impl Fn(&serde_json::Value) -> bool) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if f(&services(d)) {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what}: not within 10 s; services: {}", services(d));
}

#[test]
fn agents_register_drain_die_and_get_revoked() {
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.0.join("keys")).expect("mkdir");
    for id in ["web001", "web002"] {
        support::keygen(&dir.0.join("keys"), id);
    }
    let bad = Command::new(support::BIN)
        .args(["keygen", "--id", "../etc/passwd", "--dir"])
        .arg(&dir.0)
        .output()
        .expect("keygen");
    assert_eq!(bad.status.code(), Some(2), "ids are validated");

    let cfg = dir.write(
        "ippool.toml",
        r#"
[admin]
listen = "127.0.0.1:0"
token_env = "IPPOOL_TEST_TOKEN"

[registry]
listen = "127.0.0.1:0"
keys_dir = "keys"
heartbeat_interval = "200ms"
heartbeat_timeout = "800ms"
drain_timeout = "300ms"
"#,
    );
    let mut d = Daemon::start(&cfg, &[("IPPOOL_TEST_TOKEN", TOKEN)]);
    let channel = d.registry();

    let mut a1 = agent(&dir, channel, "web001", "127.0.0.1:8081");
    let mut a2 = agent(&dir, channel, "web002", "127.0.0.1:8082");
    wait_for("two services", &d, |s| {
        s.as_array().is_some_and(|a| a.len() == 2)
    });
    let s = services(&d);
    let one = s
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["agent"] == "web001")
        .expect("web001");
    assert_eq!(one["addr"], "127.0.0.1:8081");
    assert_eq!(one["weight"], 3);
    assert_eq!(one["routes"][0]["host"], "example.com");
    assert_eq!(one["routes"][0]["path_prefix"], "/api");

    // An agent may register only its own address: 10.9.9.9 is not its peer.
    let mut liar = agent(&dir, channel, "web002", "10.9.9.9:80");
    std::thread::sleep(Duration::from_millis(600));
    let s = services(&d);
    assert!(
        !s.to_string().contains("10.9.9.9"),
        "someone else's address registered: {s}"
    );
    let _ = liar.0.kill();
    let _ = liar.0.wait();
    // (web002 may have been superseded by the liar's connection; it comes back.)
    wait_for("web002 back", &d, |s| {
        s.to_string().contains("127.0.0.1:8082")
    });

    // SIGTERM: drained, then gone.
    let pid = a1.0.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let _ = a1.0.wait();
    wait_for("web001 gone", &d, |s| !s.to_string().contains("web001"));

    // SIGKILL: noticed within heartbeat_timeout (+ slack for a loaded machine).
    a2.0.kill().expect("kill -9");
    let _ = a2.0.wait();
    let took = wait_for("web002 gone", &d, |s| !s.to_string().contains("web002"));
    assert!(took < Duration::from_secs(3), "took {took:?}");

    // Revocation through the API: the key cannot come back.
    let bearer = format!("Bearer {TOKEN}");
    let r = http(
        d.admin,
        "DELETE",
        "/api/keys/web001",
        &[("Authorization", &bearer)],
        "",
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(dir.0.join("keys/revoked/web001.pub").exists());
    let _again = agent(&dir, channel, "web001", "127.0.0.1:8081");
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        !services(&d).to_string().contains("web001"),
        "revoked key registered"
    );
    let r = http(d.admin, "GET", "/api/keys", &[], "");
    assert!(
        r.body.contains("web002") && !r.body.contains("\"web001\""),
        "{}",
        r.body
    );

    // A key added while running is accepted after a reload.
    support::keygen(&dir.0.join("keys"), "web003");
    let _late = agent(&dir, channel, "web003", "127.0.0.1:8083");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !services(&d).to_string().contains("web003"),
        "unknown until reloaded"
    );
    let r = http(
        d.admin,
        "POST",
        "/api/reload",
        &[("Authorization", &bearer)],
        "",
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("\"keys\":2"), "{}", r.body);
    wait_for("web003 after reload", &d, |s| {
        s.to_string().contains("web003")
    });
    assert!(d.terminate().success());
}

#[test]
fn failed_handshakes_ban_the_peer() {
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.0.join("keys")).expect("mkdir");
    for id in ["web001", "web002"] {
        support::keygen(&dir.0.join("keys"), id);
    }
    // web001's id with web002's key: every handshake fails (4001).
    std::fs::copy(dir.0.join("keys/web002.key"), dir.0.join("keys/web001.key")).expect("copy");
    let cfg = dir.write(
        "ippool.toml",
        r#"
[admin]
listen = "127.0.0.1:0"

[rules.agents]
default = "allow"
[rules.agents.autoblock]
threshold = 2
window = "1m"
ban = "1h"

[registry]
listen = "127.0.0.1:0"
keys_dir = "keys"
rules = "agents"
"#,
    );
    let mut d = Daemon::start(&cfg, &[]);
    let channel = d.registry();
    let _forger = agent(&dir, channel, "web001", "127.0.0.1:8081");
    let t0 = Instant::now();
    loop {
        let r = http(d.admin, "GET", "/api/bans", &[], "");
        if r.body.contains("127.0.0.1") {
            assert!(r.body.contains("registration_auth_failed"), "{}", r.body);
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "no ban: {}", r.body);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Banned: the channel now refuses the peer at accept.
    let refused = std::net::TcpStream::connect(channel).map_or(true, |mut s| {
        use std::io::{Read, Write};
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buf = [0u8; 16];
        s.read(&mut buf).map_or(true, |n| n == 0)
    });
    assert!(refused, "a banned peer still reaches the channel");
    assert!(d.terminate().success());
}

#[test]
fn agents_register_over_wss_and_plain_ws_is_refused() {
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.0.join("keys")).expect("mkdir");
    support::keygen(&dir.0.join("keys"), "web001");
    let [ca, ..] = support::pki(&dir);
    let cfg = dir.write(
        "ippool.toml",
        r#"
[admin]
listen = "127.0.0.1:0"

[registry]
listen = "127.0.0.1:0"
keys_dir = "keys"
tls = [{ cert = "cert.pem", key = "key.pem" }]
heartbeat_interval = "200ms"
heartbeat_timeout = "800ms"
"#,
    );
    let mut d = Daemon::start(&cfg, &[]);
    let channel = d.registry();
    assert!(
        d.startup
            .iter()
            .any(|l| l.contains("registration channel listening on wss://")),
        "{:?}",
        d.startup
    );

    // ws:// to a TLS channel: never registers.
    let plain = agent(&dir, channel, "web001", "127.0.0.1:8081");
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(services(&d), serde_json::json!([]), "plain ws registered");
    drop(plain);

    // wss:// with the CA: registers.
    let key = dir.0.join("keys/web001.key");
    let child = Command::new(support::BIN)
        .args(["agent", "--proxy", &format!("wss://{channel}")])
        .args(["--id", "web001", "--key"])
        .arg(&key)
        .arg("--ca")
        .arg(&ca)
        .args(["--service", "127.0.0.1:8081", "--route", "example.com/api"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn agent");
    let _tls_agent = Agent(child);
    wait_for("the wss agent", &d, |s| {
        s.as_array()
            .is_some_and(|a| a.len() == 1 && a[0]["agent"] == "web001")
    });
    assert!(d.terminate().success());
}

#[test]
fn registry_tls_config_errors_name_the_key() {
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.0.join("keys")).expect("mkdir");
    for (body, want) in [
        (
            "tls = [{ cert = \"missing.pem\", key = \"missing.key\" }]\n",
            "registry.tls",
        ),
        (
            "advertised = [\"ws://proxy.lan:3042\"]\ntls = [{ cert = \"cert.pem\", key = \"key.pem\" }]\n",
            "registry.advertised[0]",
        ),
    ] {
        support::pki(&dir);
        let cfg = dir.write(
            "ippool.toml",
            &format!("[registry]\nlisten = \"127.0.0.1:0\"\nkeys_dir = \"keys\"\n{body}"),
        );
        let out = Command::new(support::BIN)
            .args(["check", "-c"])
            .arg(&cfg)
            .output()
            .expect("check");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(want), "want {want}: {err}");
    }
}

#[test]
fn one_agent_registers_with_every_proxy_of_a_fleet() {
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.0.join("keys")).expect("mkdir");
    support::keygen(&dir.0.join("keys"), "web001");
    let config = r#"
[admin]
listen = "127.0.0.1:0"

[registry]
listen = "127.0.0.1:0"
keys_dir = "keys"
heartbeat_interval = "200ms"
heartbeat_timeout = "800ms"
drain_timeout = "200ms"
"#;
    let a_dir = TempDir::new();
    std::fs::create_dir_all(a_dir.0.join("keys")).expect("mkdir");
    std::fs::copy(
        dir.0.join("keys/web001.pub"),
        a_dir.0.join("keys/web001.pub"),
    )
    .expect("copy");
    let mut a = Daemon::start(&a_dir.write("ippool.toml", config), &[]);
    let mut b = Daemon::start(&dir.write("ippool.toml", config), &[]);
    let key = dir.0.join("keys/web001.key");
    let sidecar = |proxies: &[std::net::SocketAddr]| {
        let mut cmd = Command::new(support::BIN);
        cmd.arg("agent");
        for p in proxies {
            cmd.args(["--proxy", &format!("ws://{p}")]);
        }
        cmd.args(["--id", "web001", "--key"])
            .arg(&key)
            .args(["--service", "127.0.0.1:8081", "--route", "example.com/api"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        cmd
    };

    // The same proxy twice is a mistake.
    let out = sidecar(&[a.registry(), a.registry()])
        .output()
        .expect("agent");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("twice"));

    let mut child = Agent(
        sidecar(&[a.registry(), b.registry()])
            .spawn()
            .expect("agent"),
    );
    for (name, d) in [("a", &a), ("b", &b)] {
        wait_for(&format!("registered with {name}"), d, |s| {
            s.to_string().contains("127.0.0.1:8081")
        });
    }
    // One proxy going away leaves the registration with the other alone.
    assert!(a.terminate().success());
    std::thread::sleep(Duration::from_millis(1200)); // > heartbeat_timeout
    assert!(
        services(&b).to_string().contains("127.0.0.1:8081"),
        "{}",
        services(&b)
    );
    // SIGTERM: deregistered from the one that is left.
    let pid = child.0.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let status = child.0.wait().expect("agent exits");
    assert!(status.success(), "{status:?}");
    wait_for("gone from b", &b, |s| !s.to_string().contains("web001"));
    assert!(b.terminate().success());
}
