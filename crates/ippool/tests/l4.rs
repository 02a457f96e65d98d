//! `[l4.<name>]`: a TCP balancer over the servers of an nginx `upstream`
//! block, run by `ippool serve`: connections spread by weight, a dead
//! upstream benched and shown in `/probe` and `/metrics`.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use support::{Daemon, TempDir, http, metric};

/// A TCP server that answers every connection with its own name.
fn named_server(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let _ = c.write_all(name.as_bytes());
        }
    });
    addr
}

fn ask(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn balancer_over_an_nginx_upstream_block() {
    let a = named_server("a");
    let b = named_server("b");
    // A port with nothing listening: connections are refused.
    let dead = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let dir = TempDir::new();
    dir.write(
        "nginx.conf",
        &format!(
            "http {{\n  upstream backends {{\n    server {a} weight=3;\n    server {b};\n    \
             server {dead};\n    server 127.0.0.1:1 down;\n    server 127.0.0.1:2 backup;\n  }}\n}}\n"
        ),
    );
    let cfg = dir.write(
        "ippool.toml",
        r#"
[admin]
listen = "127.0.0.1:0"
token_env = "IPPOOL_TEST_TOKEN"

[l4.web]
listen = "127.0.0.1:0"
nginx_conf = "nginx.conf"
upstream = "backends"
strategy = "round_robin"
dial_timeout = "1s"

[l4.web.health]
consecutive_failures = 1
cooldown = "1h"
"#,
    );
    let token = "l4-admin-token-0123456789";
    let check = std::process::Command::new(support::BIN)
        .args(["check", "-c"])
        .arg(&cfg)
        .env("IPPOOL_TEST_TOKEN", token)
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains("# l4.web: 127.0.0.1:0 to 3 upstreams from upstream backends"),
        "{text}"
    );

    let mut d = Daemon::start(&cfg, &[("IPPOOL_TEST_TOKEN", token)]);
    let lb = d.l4("web");
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..20 {
        *seen.entry(ask(lb)).or_default() += 1;
    }
    // Every client got an answer (the dead upstream's turn was retried
    // elsewhere), and weight 3:1 holds between the live ones.
    assert_eq!(seen.values().sum::<u32>(), 20, "{seen:?}");
    assert_eq!(
        seen.get("").copied(),
        None,
        "a client was dropped: {seen:?}"
    );
    let (na, nb) = (seen["a"], seen["b"]);
    assert!(
        na >= 2 * nb && nb >= 3,
        "weights 3:1 between a and b: {seen:?}"
    );

    let r = http(d.admin, "GET", "/probe?pool=web", &[], "");
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    let pool = &v["pools"][0];
    assert_eq!(pool["kind"], "l4", "{pool}");
    assert_eq!(pool["size"], 3, "down and backup servers left out: {pool}");
    let states: HashMap<u64, String> = pool["addresses"]
        .as_array()
        .expect("addresses")
        .iter()
        .map(|a| {
            (
                a["port"].as_u64().unwrap(),
                a["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(states[&u64::from(dead.port())], "benched", "{pool}");
    assert_eq!(states[&u64::from(a.port())], "available", "{pool}");

    let m = http(d.admin, "GET", "/metrics", &[], "").body;
    let v = |series: &str| metric(&m, series).unwrap_or_else(|| panic!("no {series} in\n{m}"));
    assert_eq!(v("ippool_l4_forwarded_total{listener=\"web\"}"), 20.0);
    assert_eq!(
        v("ippool_pool_addresses{pool=\"web\",state=\"benched\"}"),
        1.0
    );
    assert_eq!(
        v("ippool_pool_transitions_total{pool=\"web\",kind=\"benched\"}"),
        1.0
    );
    assert!(
        v(&format!(
            "ippool_l4_upstream_connect_failures_total{{listener=\"web\",upstream=\"{dead}\"}}"
        )) >= 1.0
    );

    // Balancers take no client feedback: their health comes from dials.
    let bearer = format!("Bearer {token}");
    let r = http(
        d.admin,
        "POST",
        "/api/pools/web/addresses/127.0.0.1/outcome",
        &[("Authorization", &bearer)],
        r#"{"outcome":"failure"}"#,
    );
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.body.contains("TCP balancer"), "{}", r.body);
    assert!(d.terminate().success());
}

#[test]
fn l4_config_errors_name_the_key() {
    let dir = TempDir::new();
    dir.write(
        "nginx.conf",
        "http { upstream other { server 127.0.0.1:9; } }\n",
    );
    for (body, key, what) in [
        (
            "listen = \"127.0.0.1:0\"\nnginx_conf = \"nginx.conf\"\nupstream = \"backends\"\n",
            "l4.web.upstream",
            "no upstream `backends` (found: other)",
        ),
        ("listen = \"127.0.0.1:0\"\n", "l4.web", "no upstreams"),
        (
            "listen = \"127.0.0.1:0\"\nupstreams = [\"127.0.0.1:9\"]\ndial_timeout = \"0s\"\n",
            "l4.web.dial_timeout",
            "longer than zero",
        ),
        (
            "listen = \"127.0.0.1:0\"\nupstreams = [\"127.0.0.1:9\", \"127.0.0.1:9\"]\n",
            "l4.web.upstreams",
            "127.0.0.1:9",
        ),
        (
            "listen = \"127.0.0.1:0\"\nupstream = \"backends\"\n",
            "l4.web.upstream",
            "needs `nginx_conf`",
        ),
    ] {
        let cfg = dir.write("bad.toml", &format!("[l4.web]\n{body}"));
        let out = std::process::Command::new(support::BIN)
            .args(["check", "-c"])
            .arg(&cfg)
            .output()
            .expect("check");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(&format!("{key}: ")), "want key {key}: {err}");
        assert!(err.contains(what), "want `{what}`: {err}");
    }
}
