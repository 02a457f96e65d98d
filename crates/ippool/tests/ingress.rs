//! The reverse proxy end to end with real processes: static routes from
//! the config, backends registering themselves with `ippool agent`, a
//! killed agent's backend gone without failing a request, a stopped one
//! drained, and 404 once a registered host has no backend left.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::named_backend as backend;
use support::{Agent, Daemon, TempDir, http};

fn agent(dir: &TempDir, channel: SocketAddr, id: &str, service: SocketAddr) -> Agent {
    Agent::start(&dir.0, channel, id, &service.to_string(), "app.test/")
}

fn get(proxy: SocketAddr, host: &str) -> (u16, String) {
    let r = http(proxy, "GET", "/", &[("Host", host)], "");
    (r.status, r.body)
}

fn spread(proxy: SocketAddr, host: &str, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let (status, body) = get(proxy, host);
        *seen.entry(format!("{status} {body}")).or_default() += 1;
    }
    seen
}

#[test]
fn static_and_registered_backends_behind_the_ingress() {
    let (a, b, c) = (backend("a"), backend("b"), backend("c"));
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.0.join("keys")).expect("mkdir");
    for id in ["svc-b", "svc-c"] {
        support::keygen(&dir.0.join("keys"), id);
    }
    let cfg = dir.write(
        "ippool.toml",
        &format!(
            r#"
[admin]
listen = "127.0.0.1:0"

[ingress.web]
listen = "127.0.0.1:0"

[ingress.web.routes.static]
host = "static.test"
backends = ["{a}"]

[registry]
listen = "127.0.0.1:0"
keys_dir = "keys"
heartbeat_interval = "200ms"
heartbeat_timeout = "800ms"
drain_timeout = "300ms"
"#
        ),
    );
    let mut d = Daemon::start(&cfg, &[]);
    let proxy = d.ingress("web");
    let channel = d.registry();

    assert_eq!(get(proxy, "static.test"), (200, "a".into()));
    assert_eq!(get(proxy, "nowhere.test").0, 404);

    let mut ab = agent(&dir, channel, "svc-b", b);
    let _ac = agent(&dir, channel, "svc-c", c);
    let t0 = Instant::now();
    loop {
        let s = spread(proxy, "app.test", 4);
        if s.contains_key("200 b") && s.contains_key("200 c") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "agents not routed: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = spread(proxy, "app.test", 10);
    assert_eq!(
        (s.get("200 b"), s.get("200 c")),
        (Some(&5), Some(&5)),
        "round robin: {s:?}"
    );

    let r = http(d.admin, "GET", "/api/routes", &[], "");
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    let reg = v["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .find(|r| r["matches"][0]["host"] == "app.test")
        .expect("registered route");
    assert_eq!(reg["backends"].as_array().map(Vec::len), Some(2), "{reg}");

    // SIGKILL one agent: its backend goes within the heartbeat timeout.
    // The backend process itself still answers, so every request succeeds;
    // afterwards only c is used.
    ab.0.kill().expect("kill -9");
    let _ = ab.0.wait();
    let t0 = Instant::now();
    loop {
        let s = spread(proxy, "app.test", 4);
        assert_eq!(
            s.keys().filter(|k| !k.starts_with("200 ")).count(),
            0,
            "{s:?}"
        );
        if !s.contains_key("200 b") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "b still routed: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The last agent gone: its registered route goes too (the host is
    // unknown again: 404), and the table keeps no empty route behind.
    drop(_ac);
    let t0 = Instant::now();
    loop {
        let (status, _) = get(proxy, "app.test");
        if status == 404 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "still {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = http(d.admin, "GET", "/api/routes", &[], "");
    assert!(!r.body.contains("app.test"), "{}", r.body);
    assert!(
        r.body.contains("static.test"),
        "configured routes stay: {}",
        r.body
    );
    let m = http(d.admin, "GET", "/metrics", &[], "").body;
    assert!(
        m.contains("ippool_ingress_requests_total{listener=\"web\"}"),
        "{m}"
    );
    // Every request of this test was plain HTTP/1.1: all on the lean path.
    let value = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {m}"))
    };
    let all = value("ippool_ingress_requests_total{listener=\"web\"}");
    assert!(all > 0);
    assert_eq!(
        value("ippool_ingress_lean_requests_total{listener=\"web\"}"),
        all
    );
    assert!(d.terminate().success());
}

#[test]
fn ingress_rate_limit_answers_429_with_retry_after() {
    let a = backend("a");
    let dir = TempDir::new();
    let cfg = dir.write(
        "ippool.toml",
        &format!(
            r#"
[admin]
listen = "127.0.0.1:0"
[rules.clients]
default = "allow"
[rules.clients.rate_limit]
rate = 0.5
burst = 2
[ingress.web]
listen = "127.0.0.1:0"
rules = "clients"
[ingress.web.routes.all]
backends = ["{a}"]
"#
        ),
    );
    let mut d = Daemon::start(&cfg, &[]);
    let proxy = d.ingress("web");
    assert_eq!(get(proxy, "x.test"), (200, "a".into()));
    assert_eq!(get(proxy, "x.test"), (200, "a".into()));
    let r = http(proxy, "GET", "/", &[("Host", "x.test")], "");
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("2"), "{r:?}");
    assert!(d.terminate().success());
}

/// Both proxies write nginx `combined` lines that the `accesslog` crate
/// (ippool's own nginx log reader) parses back to what happened.
#[test]
fn access_logs_are_nginx_combined() {
    let a = backend("a");
    let upstream = support::PeerEcho::start();
    let dir = TempDir::new();
    let cfg = dir.write(
        "ippool.toml",
        &format!(
            r#"
[admin]
listen = "127.0.0.1:0"
[pools.loop]
source = "127.0.60.0/30"
[egress.main]
listen = "127.0.0.1:0"
pool = "loop"
allow = ["127.0.0.0/8"]
access_log = "egress.log"
[ingress.web]
listen = "127.0.0.1:0"
access_log = "ingress.log"
[ingress.web.routes.all]
host = "known.test"
backends = ["{a}"]
"#
        ),
    );
    let mut d = Daemon::start(&cfg, &[]);
    let proxy = d.ingress("web");
    let r = http(
        proxy,
        "GET",
        "/x?y=1",
        &[("Host", "known.test"), ("User-Agent", "probe/1")],
        "",
    );
    assert_eq!(r.status, 200);
    assert_eq!(get(proxy, "unknown.test").0, 404);
    let url = format!("http://{}/p", upstream.addr);
    assert_eq!(http(d.egress("main"), "GET", &url, &[], "").status, 200);
    assert!(d.terminate().success(), "lines are flushed on shutdown");

    let fmt = accesslog::LogFormat::combined();
    let ingress = std::fs::read_to_string(dir.0.join("ingress.log")).expect("ingress.log");
    let lines: Vec<&str> = ingress.lines().collect();
    assert_eq!(lines.len(), 2, "{ingress}");
    let first = fmt.parse(lines[0]).expect("a combined line");
    assert_eq!(first.status().unwrap(), Some(200));
    assert_eq!(first.value("request"), Some("GET /x?y=1 HTTP/1.1"));
    assert_eq!(first.value("http_user_agent"), Some("probe/1"));
    assert_eq!(first.body_bytes_sent().unwrap(), Some(1));
    assert_eq!(
        first.remote_addr().unwrap(),
        Some("127.0.0.1".parse().unwrap())
    );
    assert!(first.time().unwrap().is_some());
    assert_eq!(
        fmt.parse(lines[1]).expect("line").status().unwrap(),
        Some(404)
    );

    let egress = std::fs::read_to_string(dir.0.join("egress.log")).expect("egress.log");
    let rec = fmt.parse(egress.trim_end()).expect("a combined line");
    assert_eq!(rec.status().unwrap(), Some(200));
    assert_eq!(
        rec.value("request"),
        Some(format!("GET {url} HTTP/1.1").as_str())
    );
}

#[test]
fn backends_reached_over_tls_with_their_certificate_checked() {
    let plain = backend("behind-tls");
    let dir = TempDir::new();
    support::pki(&dir);
    // The HTTPS backend: another ippool terminating TLS for `localhost`.
    let tls_cfg = dir.write(
        "backend.toml",
        &format!(
            r#"
state_dir = "state-backend"
[admin]
listen = "127.0.0.1:0"
[ingress.tls]
listen = "127.0.0.1:0"
tls = [{{ cert = "cert.pem", key = "key.pem" }}]
[ingress.tls.routes.all]
backends = ["{plain}"]
"#
        ),
    );
    let mut b = Daemon::start(&tls_cfg, &[]);
    let https = b.ingress("tls");
    let cfg = dir.write(
        "ippool.toml",
        &format!(
            r#"
[admin]
listen = "127.0.0.1:0"
token_env = "IPPOOL_TEST_TOKEN"
[ingress.web]
listen = "127.0.0.1:0"
[ingress.web.routes.good]
host = "good.test"
backends = ["{https}"]
backend_tls = {{ ca = "ca.pem", server_name = "localhost" }}
[ingress.web.routes.untrusted]
host = "untrusted.test"
backends = ["{https}"]
backend_tls = {{ ca = "other.pem", server_name = "localhost" }}
[ingress.web.routes.h2]
host = "h2.test"
backends = ["{https}"]
backend_tls = {{ ca = "ca.pem", server_name = "localhost" }}
backend_http2 = true
[ingress.web.routes.h2plain]
host = "h2plain.test"
backends = ["{plain}"]
backend_http2 = true
"#
        ),
    );
    let mut d = Daemon::start(&cfg, &[("IPPOOL_TEST_TOKEN", "tls-test-token-0123456789")]);
    let web = d.ingress("web");
    assert_eq!(get(web, "good.test"), (200, "behind-tls".to_owned()));
    // HTTP/2 over TLS (ALPN h2) to the other ippool; and to a backend
    // that speaks only HTTP/1.1: refused.
    assert_eq!(get(web, "h2.test"), (200, "behind-tls".to_owned()));
    assert_eq!(get(web, "h2plain.test").0, 502);
    let r = http(web, "GET", "/", &[("Host", "untrusted.test")], "");
    assert_eq!(r.status, 502, "{r:?}");
    assert!(
        r.body.contains("TLS with backend") && r.body.contains("UnknownIssuer"),
        "{r:?}"
    );
    // `check` shows the setting.
    let out = std::process::Command::new(support::BIN)
        .args(["check", "-c"])
        .arg(&cfg)
        .env("IPPOOL_TEST_TOKEN", "tls-test-token-0123456789")
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("server_name = \"localhost\""),
        "{text}"
    );

    // A reload with the files unchanged changes no route; one after the CA
    // file was replaced (same name, another CA) applies it.
    let reload = || {
        let r = http(
            d.admin,
            "POST",
            "/api/reload",
            &[("Authorization", "Bearer tls-test-token-0123456789")],
            "",
        );
        assert_eq!(r.status, 200, "{r:?}");
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        v["routes"].as_array().expect("routes").clone()
    };
    assert_eq!(reload(), Vec::<serde_json::Value>::new());
    std::fs::copy(dir.0.join("other.pem"), dir.0.join("ca.pem")).expect("replace the CA");
    assert_eq!(
        reload(),
        vec![
            serde_json::json!("ingress.web.routes.good"),
            serde_json::json!("ingress.web.routes.h2")
        ],
        "both routes that read ca.pem"
    );
    let r = http(web, "GET", "/", &[("Host", "good.test")], "");
    assert!(r.status == 502 && r.body.contains("UnknownIssuer"), "{r:?}");
    assert!(d.terminate().success());
    assert!(b.terminate().success());
}

#[test]
fn backend_tls_config_errors_name_the_key() {
    let dir = TempDir::new();
    support::pki(&dir);
    for (tls, want) in [
        (r#"{ ca = "missing.pem" }"#, "missing.pem"),
        (
            r#"{ ca = "ca.pem", cert = "cert.pem" }"#,
            "cert and key go together",
        ),
        (
            r#"{ ca = "ca.pem", server_name = "bad name!" }"#,
            "server name \"bad name!\"",
        ),
        (r#"{ ca = "key.pem" }"#, "no CERTIFICATE"),
        (
            r#"{ ca = "ca.pem", verify = false }"#,
            "unknown field `verify`",
        ),
    ] {
        let cfg = dir.write(
            "bad.toml",
            &format!(
                r#"
[ingress.web]
listen = "127.0.0.1:0"
[ingress.web.routes.r]
backends = ["127.0.0.1:9"]
backend_tls = {tls}
"#
            ),
        );
        let err = support::serve_fails(&cfg, &[]);
        assert!(
            err.contains(want) && err.contains("ingress.web.routes.r"),
            "{tls}: {err}"
        );
    }
}
