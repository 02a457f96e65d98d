//! What an egress pool keeps across restarts of a real `ippool serve`:
//! which of its source addresses are benched (client feedback says the
//! destination blocks them), with the cooldown they have left, not a
//! fresh one, after SIGTERM and after `kill -9`. Requests through the
//! egress proxy never leave from a benched address, before or after the
//! restart. The pool is a static one over 127.0.13.0/29 (all of
//! 127.0.0.0/8 is local on Linux: no root, no setup).

mod support;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use support::{Daemon, PeerEcho, TempDir, benched_until, http, same_time};

const TOKEN: &str = "egress-state-token-0123456789";

/// Six addresses (127.0.13.1 to .6) in rotation, never retired by use;
/// two 429s bench one.
fn config(cooldown: &str) -> String {
    format!(
        r#"
shutdown_timeout = "5s"

[admin]
listen = "127.0.0.1:0"
token_env = "IPPOOL_TEST_TOKEN"

[pools.rr]
source = "127.0.13.0/29"
strategy = "round_robin"
max_uses = 0
keep_assigned = 6

[pools.rr.health]
consecutive_failures = 2
cooldown = "{cooldown}"

[egress.rr]
listen = "127.0.0.1:0"
pool = "rr"
allow = ["127.0.0.0/8"]
"#
    )
}

fn start(cfg: &Path) -> Daemon {
    Daemon::start(cfg, &[("IPPOOL_TEST_TOKEN", TOKEN)])
}

/// `n` requests through the egress proxy; the source addresses the
/// upstream saw.
fn sources(d: &Daemon, upstream: &PeerEcho, n: usize) -> Vec<IpAddr> {
    let (proxy, url) = (d.egress("rr"), format!("http://{}/", upstream.addr));
    (0..n)
        .map(|_| {
            let r = http(proxy, "GET", &url, &[], "");
            assert_eq!(r.status, 200, "{r:?}");
            r.body.parse().expect("the upstream answers the source")
        })
        .collect()
}

/// Client feedback: a 429 of `ip`; the answer.
fn report_429(d: &Daemon, ip: &str) -> Value {
    let bearer = format!("Bearer {TOKEN}");
    let r = http(
        d.admin,
        "POST",
        &format!("/api/pools/rr/addresses/{ip}/outcome"),
        &[
            ("Authorization", bearer.as_str()),
            ("Content-Type", "application/json"),
        ],
        r#"{"outcome":"status","status":429,"detail":"captcha"}"#,
    );
    assert_eq!(r.status, 200, "{r:?}");
    serde_json::from_str(&r.body).expect("JSON")
}

/// Benches `ip` through client feedback.
fn bench(d: &Daemon, ip: &str) {
    assert_eq!(report_429(d, ip)["transition"], Value::Null);
    let answer = report_429(d, ip);
    assert_eq!(answer["transition"], "benched", "{answer}");
}

/// `/probe`'s view of `ip` in pool `rr`, if the pool knows it.
fn probe(d: &Daemon, ip: &str) -> Option<Value> {
    let r = http(d.admin, "GET", &format!("/probe?pool=rr&ip={ip}"), &[], "");
    if r.status == 404 {
        return None;
    }
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).expect("JSON");
    v["pools"][0]["addresses"]
        .as_array()
        .and_then(|a| a.first().cloned())
}

fn address(d: &Daemon, ip: &str) -> Value {
    probe(d, ip).unwrap_or_else(|| panic!("{ip} not in pool rr"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

/// Asserts that none of `n` requests leaves from `benched`.
fn never_from(d: &Daemon, upstream: &PeerEcho, n: usize, benched: &[&str]) -> HashSet<IpAddr> {
    let got = sources(d, upstream, n);
    for b in benched {
        assert!(!got.contains(&ip(b)), "benched {b} used: {got:?}");
    }
    got.into_iter().collect()
}

#[test]
fn egress_benches_survive_sigterm_and_kill_9_with_their_remaining_cooldown() {
    const COOLDOWN: f64 = 60.0;
    let (x, y) = ("127.0.13.1", "127.0.13.2");
    let dir = TempDir::new();
    let cfg = dir.write("ippool.toml", &config("60s"));
    let upstream = PeerEcho::start();

    // Run 1: the pool takes its six addresses; feedback benches x.
    let d = start(&cfg);
    let used: HashSet<IpAddr> = sources(&d, &upstream, 6).into_iter().collect();
    assert_eq!(used.len(), 6, "round robin over the six: {used:?}");
    bench(&d, x);
    let a = address(&d, x);
    assert_eq!(a["state"], "benched", "{a:#}");
    let until_x = benched_until(&a);
    never_from(&d, &upstream, 12, &[x]);
    std::thread::sleep(Duration::from_millis(1200));
    d.stop();

    // Run 2 (after SIGTERM): x is still benched, with the same end, so
    // less than a full cooldown left; the pool does not draw it.
    let d = start(&cfg);
    let a = address(&d, x);
    assert_eq!(a["state"], "benched", "{a:#}");
    assert_eq!(a["held"], false, "{a:#}");
    assert!(same_time(benched_until(&a), until_x), "{a:#}");
    let left = a["remaining_seconds"].as_f64().expect("remaining");
    assert!(left > 0.0 && left < COOLDOWN - 1.0, "{left} s left: {a:#}");
    let used = never_from(&d, &upstream, 15, &[x]);
    assert_eq!(used.len(), 5, "the five others rotate: {used:?}");
    // Another benching in this run (of a held address), then kill -9.
    bench(&d, y);
    let b = address(&d, y);
    assert_eq!(b["state"], "benched", "{b:#}");
    let until_y = benched_until(&b);
    never_from(&d, &upstream, 8, &[x, y]);
    std::thread::sleep(Duration::from_millis(500));
    d.kill_9();

    // Run 3 (after kill -9): both still benched, same ends; neither is
    // used.
    let d = start(&cfg);
    let a = address(&d, x);
    assert_eq!(a["state"], "benched", "{a:#}");
    assert!(same_time(benched_until(&a), until_x), "{a:#}");
    let b = address(&d, y);
    assert_eq!(b["state"], "benched", "{b:#}");
    assert!(same_time(benched_until(&b), until_y), "{b:#}");
    assert!(b["remaining_seconds"].as_f64().unwrap_or(0.0) < COOLDOWN);
    let used = never_from(&d, &upstream, 12, &[x, y]);
    assert_eq!(used.len(), 4, "{used:?}");
    d.stop();

    // The store holds exactly the two benches.
    let s = store::Store::open_dir(&dir.0.join("state")).expect("store");
    let saved: Vec<String> = s
        .benches_of("rr")
        .expect("benches")
        .iter()
        .map(|r| r.address.clone())
        .collect();
    assert_eq!(saved, [x, y]);
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

fn record(address: &str, since: SystemTime, until: SystemTime, cause: &str) -> store::HealthRecord {
    store::HealthRecord {
        pool: "rr".into(),
        address: address.into(),
        since_unix_ms: unix_ms(since),
        until_unix_ms: unix_ms(until),
        strike: 1,
        cause: cause.into(),
    }
}

#[test]
fn saved_egress_benches_resume_expire_to_probation_or_are_dropped() {
    let dir = TempDir::new();
    let cfg = dir.write("ippool.toml", &config("60s"));
    let state = dir.0.join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    let upstream = PeerEcho::start();
    let now = SystemTime::now();
    let s = store::Store::open_dir(&state).expect("store");
    let minute = Duration::from_secs(60);
    let half = Duration::from_secs(30);
    // Benched half a minute ago for a minute: 30 s left.
    s.put_bench(&record(
        "127.0.13.1",
        now - half,
        now + half,
        "consecutive_failures:2",
    ))
    .expect("put");
    // Its cooldown ended while the daemon was down: probation.
    s.put_bench(&record(
        "127.0.13.3",
        now - 2 * minute,
        now - minute,
        "probation_failure",
    ))
    .expect("put");
    // Not in the pool's source: dropped.
    s.put_bench(&record(
        "127.0.99.9",
        now - half,
        now + half,
        "failure_ratio:5/10",
    ))
    .expect("put");
    drop(s);

    let d = start(&cfg);
    let a = address(&d, "127.0.13.1");
    assert_eq!(a["state"], "benched", "{a:#}");
    let left = a["remaining_seconds"].as_f64().expect("remaining");
    assert!(left > 20.0 && left <= 30.0, "{left} s left: {a:#}");
    assert!(
        same_time(benched_until(&a), now + half),
        "the saved end: {a:#}"
    );
    // The expired one is not benched: on probation, or already forgotten
    // by the pool (it does not hold it), to be drawn as a fresh address.
    if let Some(e) = probe(&d, "127.0.13.3") {
        assert_ne!(e["state"], "benched", "{e:#}");
    }
    assert_eq!(probe(&d, "127.0.99.9"), None);
    // Requests rotate over the five others; 127.0.13.3 among them (its
    // probe succeeds).
    let used = never_from(&d, &upstream, 15, &["127.0.13.1"]);
    assert!(used.contains(&ip("127.0.13.3")), "{used:?}");
    let e = address(&d, "127.0.13.3");
    assert_eq!(e["state"], "available", "{e:#}");
    std::thread::sleep(Duration::from_millis(300));
    d.stop();

    // Only the running bench is left in the store.
    let s = store::Store::open_dir(&state).expect("store");
    let saved: Vec<String> = s
        .benches()
        .expect("benches")
        .iter()
        .map(|r| r.key())
        .collect();
    assert_eq!(saved, ["rr/127.0.13.1"]);
}

#[test]
fn an_unreadable_saved_egress_bench_stops_start_up_with_its_key() {
    let dir = TempDir::new();
    let cfg = dir.write("ippool.toml", &config("60s"));
    let state = dir.0.join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    let now = SystemTime::now();
    let s = store::Store::open_dir(&state).expect("store");
    s.put_bench(&record(
        "127.0.13.2",
        now,
        now + Duration::from_secs(60),
        "bad luck",
    ))
    .expect("put");
    drop(s);

    let err = support::serve_fails(&cfg, &[("IPPOOL_TEST_TOKEN", TOKEN)]);
    assert!(
        err.contains("health/rr/127.0.13.2") && err.contains("bad luck"),
        "{err}"
    );
    assert!(!err.contains("admin API listening"), "{err}");

    // Fixed: it starts, and the record was not touched meanwhile.
    let s = store::Store::open_dir(&state).expect("store");
    assert!(s.remove_bench("rr", "127.0.13.2").expect("remove"));
    drop(s);
    start(&cfg).stop();
}

/// An egress address benched by client feedback is announced on the
/// admin events stream, as nginx pools' are.
#[test]
fn egress_benchings_are_published_on_the_events_stream() {
    use std::io::{BufRead, BufReader, Write};
    let dir = TempDir::new();
    let cfg = dir.write("ippool.toml", &config("10m"));
    let d = start(&cfg);
    let upstream = PeerEcho::start();
    // Traffic first: the pool holds the addresses it used.
    let used = sources(&d, &upstream, 6).swap_remove(1).to_string();
    let mut s = std::net::TcpStream::connect(d.admin).expect("connect");
    s.write_all(b"GET /api/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .expect("send");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    reader.read_line(&mut head).expect("status line");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The subscription exists once the head is out; give it a moment.
    std::thread::sleep(Duration::from_millis(200));
    bench(&d, &used);
    let (mut event, mut line) = (String::new(), String::new());
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap_or(0) > 0,
            "the stream ended without a benched event"
        );
        let l = line.trim();
        if let Some(e) = l.strip_prefix("event:") {
            event = e.trim().to_owned();
        } else if let Some(data) = l.strip_prefix("data:")
            && event == "benched"
        {
            let v: Value = serde_json::from_str(data.trim()).expect("JSON");
            assert_eq!(
                (v["pool"].as_str(), v["address"].as_str()),
                (Some("rr"), Some(used.as_str())),
                "{v}"
            );
            assert!(
                v["cooldown_seconds"].as_f64().is_some_and(|c| c > 0.0),
                "{v}"
            );
            break;
        }
    }
    d.stop();
}
