//! `ippool serve` with `[pools.*]` and `[egress.*]` on loopback: requests
//! through the forward proxy leave from pool addresses, the pools show in
//! `/probe` and `/metrics`, client feedback benches an address, and a
//! pool that cannot start stops the daemon with the fix in the message.

mod support;

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use support::{Daemon, PeerEcho, TempDir, http, metric};

const TOKEN: &str = "egress-admin-token-0123456789";
/// `alice:secret`, Base64.
const ALICE: &str = "Basic YWxpY2U6c2VjcmV0";

const CONFIG: &str = r#"
shutdown_timeout = "5s"

[admin]
listen = "127.0.0.1:0"
token_env = "IPPOOL_TEST_TOKEN"

# A fresh address per request: 127.0.10.1 to .6 (network and broadcast
# left out).
[pools.fresh]
source = "127.0.10.0/29"

# A working set of six addresses in rotation, never retired by use.
[pools.rr]
source = "127.0.11.0/29"
strategy = "round_robin"
max_uses = 0
keep_assigned = 6

[pools.rr.health]
consecutive_failures = 2
cooldown = "1h"

[egress.fresh]
listen = "127.0.0.1:0"
pool = "fresh"
allow = ["127.0.0.0/8"]

[egress.rr]
listen = "127.0.0.1:0"
pool = "rr"
allow = ["127.0.0.0/8"]
users_file = "users.txt"
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

#[test]
fn egress_pools_through_the_daemon() {
    let dir = TempDir::new();
    dir.write("users.txt", "# proxy users\nalice:secret\n");
    let cfg = dir.write("ippool.toml", CONFIG);
    let upstream = PeerEcho::start();
    let mut d = Daemon::start(&cfg, &[("IPPOOL_TEST_TOKEN", TOKEN)]);
    let (fresh, rr) = (d.egress("fresh"), d.egress("rr"));
    let url = format!("http://{}/", upstream.addr);

    // Fresh: every request from a new pool address, told in the header.
    let mut seen = HashSet::new();
    for _ in 0..4 {
        let r = http(fresh, "GET", &url, &[], "");
        assert_eq!(r.status, 200, "{r:?}");
        let source = ip(r.header("x-ippool-source").expect("X-Ippool-Source"));
        assert_eq!(ip(&r.body), source, "upstream saw the announced source");
        let o = source.to_string();
        assert!(
            o.starts_with("127.0.10.") && o != "127.0.10.0" && o != "127.0.10.7",
            "{o}"
        );
        assert!(seen.insert(source), "{source} used twice with max_uses = 1");
    }

    // The destination policy: only the allow hole is open.
    let r = http(
        fresh,
        "GET",
        "http://169.254.169.254/latest/meta-data/",
        &[],
        "",
    );
    assert_eq!(r.status, 403, "{r:?}");
    // A malformed request gets 400 and the listener keeps serving.
    let r = http(fresh, "GET", "/origin-form", &[], "");
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(http(fresh, "GET", &url, &[], "").status, 200);

    // Authentication on the rr listener.
    let r = http(rr, "GET", &url, &[], "");
    assert_eq!(r.status, 407, "{r:?}");
    assert!(r.header("proxy-authenticate").is_some(), "{r:?}");
    let r = http(
        rr,
        "GET",
        &url,
        &[("Proxy-Authorization", "Basic YWxpY2U6d3Jvbmc=")],
        "",
    );
    assert_eq!(r.status, 407, "wrong password: {r:?}");
    let auth = [("Proxy-Authorization", ALICE)];
    let mut rotation = HashSet::new();
    for _ in 0..6 {
        let r = http(rr, "GET", &url, &auth, "");
        assert_eq!(r.status, 200, "{r:?}");
        rotation.insert(ip(&r.body));
    }
    assert_eq!(rotation.len(), 6, "round robin over the six: {rotation:?}");

    // /probe lists the egress pools.
    let r = http(d.admin, "GET", "/probe?pool=rr", &[], "");
    assert_eq!(r.status, 200, "{r:?}");
    let probe: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    let pool = &probe["pools"][0];
    assert_eq!(pool["kind"], "egress");
    assert_eq!(pool["size"], 6);
    assert_eq!(pool["available"], 6);
    assert_eq!(pool["addresses"][0]["held"], true);

    // Client feedback: a 429 twice benches the address (consecutive = 2).
    let target = "127.0.11.1";
    let path = format!("/api/egress/rr/addresses/{target}/outcome");
    let body = r#"{"outcome":"status","status":429,"detail":"captcha"}"#;
    let bearer = format!("Bearer {TOKEN}");
    let authz = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
    ];
    assert_eq!(
        http(d.admin, "POST", &path, &[], body).status,
        401,
        "no token"
    );
    let r = http(d.admin, "POST", &path, &authz, body);
    assert_eq!(r.status, 200, "{r:?}");
    let r = http(d.admin, "POST", &path, &authz, body);
    let answer: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(answer["transition"], "benched", "{answer}");
    assert_eq!(answer["state"], "benched", "{answer}");
    let r = http(
        d.admin,
        "POST",
        "/api/egress/rr/addresses/127.0.99.1/outcome",
        &authz,
        body,
    );
    assert_eq!(r.status, 404, "address outside the pool: {r:?}");
    let r = http(
        d.admin,
        "POST",
        "/api/egress/nope/addresses/127.0.11.1/outcome",
        &authz,
        body,
    );
    assert_eq!(r.status, 404, "unknown pool: {r:?}");

    // The benched address is never leased.
    for _ in 0..12 {
        let r = http(rr, "GET", &url, &auth, "");
        assert_eq!(r.status, 200, "{r:?}");
        assert_ne!(ip(&r.body), ip(target), "benched address leased");
    }
    let r = http(
        d.admin,
        "GET",
        &format!("/probe?pool=rr&ip={target}"),
        &[],
        "",
    );
    let probe: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    let a = &probe["pools"][0]["addresses"][0];
    assert_eq!(a["state"], "benched", "{a}");
    assert_eq!(a["reports"][1]["detail"], "captcha", "{a}");

    // Metrics of pools and listeners.
    let m = http(d.admin, "GET", "/metrics", &[], "").body;
    let v = |series: &str| metric(&m, series).unwrap_or_else(|| panic!("no {series} in\n{m}"));
    assert_eq!(v("ippool_egress_pool_leased_total{pool=\"fresh\"}"), 5.0);
    assert_eq!(v("ippool_egress_pool_leased_total{pool=\"rr\"}"), 18.0);
    assert_eq!(v("ippool_egress_pool_held{pool=\"rr\"}"), 6.0);
    assert_eq!(
        v("ippool_egress_requests_total{listener=\"fresh\",protocol=\"http\",result=\"ok\"}"),
        5.0
    );
    assert_eq!(
        v("ippool_egress_requests_total{listener=\"fresh\",protocol=\"http\",result=\"denied\"}"),
        1.0
    );
    assert_eq!(
        v("ippool_egress_requests_total{listener=\"rr\",protocol=\"http\",result=\"auth_failed\"}"),
        2.0
    );
    assert!(v("ippool_egress_pool_assign_latency_seconds_count{pool=\"fresh\"}") >= 5.0);
    assert_eq!(
        v("ippool_pool_addresses{pool=\"rr\",state=\"benched\"}"),
        1.0
    );
    assert_eq!(
        v("ippool_pool_transitions_total{pool=\"rr\",kind=\"benched\"}"),
        1.0
    );

    let st = d.terminate();
    assert!(st.success(), "exit status {st}");
}

#[test]
fn a_pool_that_cannot_start_stops_the_daemon_with_the_fix() {
    let dir = TempDir::new();
    // Nothing routes 198.51.100.0/28 locally: freebind cannot bind from it.
    let cfg = dir.write(
        "ippool.toml",
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[pools.fb]\nsource = \"198.51.100.0/28\"\nassigner = \"freebind\"\n",
    );
    let out = std::process::Command::new(support::BIN)
        .args(["serve", "-c"])
        .arg(&cfg)
        .output()
        .expect("run ippool");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve should fail: {err}");
    assert!(err.contains("pools.fb"), "{err}");
    assert!(
        err.contains("ip route add local 198.51.100.0/28 dev lo"),
        "{err}"
    );
    // And nothing was left listening or half-started: the admin API never
    // came up.
    assert!(!err.contains("admin API listening"), "{err}");
    let _ = Duration::ZERO;
}
