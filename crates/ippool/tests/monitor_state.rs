//! What a monitor keeps across restarts of a real `ippool serve`: where it
//! is in its access log (nothing is read twice after SIGTERM; after
//! `kill -9` at most the lines since the last save), and which addresses
//! of its pool are benched (with the cooldown they have left, not a fresh
//! one; restored as usual once it ends).
//!
//! The log is a plain file the test appends to, in a tiny format; no nginx
//! is needed.

mod support;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Daemon, TempDir, benched_until, http, same_time};

const PARSED: &str = "ippool_accesslog_lines_total{monitor=\"web\",result=\"parsed\"}";

/// A monitor in `serve` mode (new lines only), so whatever it reads after
/// a restart before new lines arrive comes from its saved offset.
fn config(cooldown: &str) -> String {
    format!(
        r#"
shutdown_timeout = "5s"
[admin]
listen = "127.0.0.1:0"

[monitor.web]
access_log = "access.log"
format = "$remote_addr $upstream_addr $upstream_status"
address = "upstream_addr"
addresses = ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"]
mode = "serve"
poll_interval = "50ms"

[monitor.web.health]
consecutive_failures = 3
cooldown = "{cooldown}"
"#
    )
}

/// Appends `n` lines of `status` through `ip`.
fn append(log: &Path, ip: &str, status: u16, n: usize) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open log");
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!("198.51.100.{} {ip}:80 {status}\n", i % 200));
    }
    f.write_all(text.as_bytes()).expect("append");
}

/// Starts the daemon and waits until its monitor follows the log.
fn start(cfg: &Path) -> Daemon {
    let d = Daemon::start(cfg, &[]);
    let following = |l: &String| l.contains("monitor following");
    if !d.startup.iter().any(following) {
        d.wait_for_log("monitor following", Duration::from_secs(10))
            .expect("the monitor follows its log");
    }
    d
}

fn parsed(d: &Daemon) -> f64 {
    let r = http(d.admin, "GET", "/metrics", &[], "");
    support::metric(&r.body, PARSED).unwrap_or(0.0)
}

/// Waits (at most 15 s) until `want` lines were parsed, then a little
/// longer to see that no more come.
fn wait_parsed(d: &Daemon, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while parsed(d) < want as f64 {
        assert!(Instant::now() < deadline, "parsed {} of {want}", parsed(d));
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn probe(d: &Daemon) -> Value {
    let r = http(d.admin, "GET", "/probe?pool=web", &[], "");
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).expect("JSON")
}

fn address(d: &Daemon, ip: &str) -> Value {
    let p = probe(d);
    p["pools"][0]["addresses"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["ip"] == ip).cloned())
        .unwrap_or_else(|| panic!("no {ip} in {p:#}"))
}

/// Outcomes the pool counted (successes + failures) over every address.
fn judged(d: &Daemon) -> u64 {
    let p = probe(d);
    p["pools"][0]["addresses"]
        .as_array()
        .expect("addresses")
        .iter()
        .map(|a| {
            let c = &a["counters"];
            c["successes"].as_u64().unwrap_or(0) + c["failures"].as_u64().unwrap_or(0)
        })
        .sum()
}

fn wait_state(d: &Daemon, ip: &str, state: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let a = address(d, ip);
        if a["state"] == state {
            return a;
        }
        assert!(Instant::now() < deadline, "{ip} not {state}: {a:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn log_offset_survives_sigterm_and_kill_9() {
    let dir = TempDir::new();
    let cfg = dir.write("ippool.toml", &config("10m"));
    let log = dir.0.join("access.log");
    std::fs::write(&log, "198.51.100.1 192.0.2.1:80 200\n").expect("log");

    // Run 1: serve mode skips the line already there; N lines are read,
    // two failures of 192.0.2.2 among them (one short of a benching).
    let d = start(&cfg);
    append(&log, "192.0.2.1", 200, 30);
    append(&log, "192.0.2.2", 429, 2);
    let n = 32;
    wait_parsed(&d, n);
    d.stop();

    // Stopped: M1 lines arrive; after the restart M2 more.
    append(&log, "192.0.2.3", 200, 7);
    let d = start(&cfg);
    append(&log, "192.0.2.2", 429, 1);
    append(&log, "192.0.2.4", 200, 4);
    let m = 7 + 1 + 4;
    wait_parsed(&d, m);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(parsed(&d), m as f64, "only the new lines are read");
    assert_eq!(judged(&d), m as u64, "the first N are not judged again");
    // Had the two earlier 429s been read again, this third one would have
    // benched the address.
    let a = address(&d, "192.0.2.2");
    assert_eq!(a["state"], "available", "{a:#}");
    assert_eq!(a["consecutive_failures"], 1, "{a:#}");

    // Quiet for more than a save interval: the offset is saved. Then K
    // lines, and kill -9 as soon as they are read.
    std::thread::sleep(Duration::from_millis(1500));
    let k = 25;
    append(&log, "192.0.2.1", 200, k);
    wait_parsed(&d, m + k);
    d.kill_9();

    // Run 3: at most the K lines since the last save are read again.
    let d = start(&cfg);
    let m3 = 5;
    append(&log, "192.0.2.3", 200, m3);
    wait_parsed(&d, m3);
    std::thread::sleep(Duration::from_millis(400));
    let again = parsed(&d) as usize - m3;
    assert!(
        again <= k,
        "read {again} lines again after kill -9; at most the {k} since the last save"
    );
    assert_eq!(judged(&d), (m3 + again) as u64);
    d.stop();
}

/// The wall-clock end of a benching, from `/probe`.

#[test]
fn benches_survive_sigterm_and_kill_9_with_their_remaining_cooldown() {
    const COOLDOWN: f64 = 12.0;
    let dir = TempDir::new();
    let cfg = dir.write("ippool.toml", &config("12s"));
    let log = dir.0.join("access.log");

    // Run 1: three 429s bench 192.0.2.1.
    let d = start(&cfg);
    append(&log, "192.0.2.1", 429, 3);
    let a = wait_state(&d, "192.0.2.1", "benched", Duration::from_secs(10));
    let until1 = benched_until(&a);
    std::thread::sleep(Duration::from_millis(1200));
    d.stop();

    // Run 2 (after SIGTERM): still benched, same end, less than a full
    // cooldown left.
    let d = start(&cfg);
    let a = address(&d, "192.0.2.1");
    assert_eq!(a["state"], "benched", "{a:#}");
    assert!(same_time(benched_until(&a), until1), "{a:#}");
    let left = a["remaining_seconds"].as_f64().expect("remaining");
    assert!(left > 0.0 && left < COOLDOWN - 1.0, "{left} s left: {a:#}");
    // Another benching in this run, then kill -9.
    append(&log, "192.0.2.2", 429, 3);
    let b = wait_state(&d, "192.0.2.2", "benched", Duration::from_secs(10));
    let until2 = benched_until(&b);
    std::thread::sleep(Duration::from_millis(500));
    d.kill_9();

    // Run 3 (after kill -9): both still benched, same ends.
    let d = start(&cfg);
    let a = address(&d, "192.0.2.1");
    assert_eq!(a["state"], "benched", "{a:#}");
    assert!(same_time(benched_until(&a), until1), "{a:#}");
    let b = address(&d, "192.0.2.2");
    assert_eq!(b["state"], "benched", "{b:#}");
    assert!(same_time(benched_until(&b), until2), "{b:#}");
    assert!(b["remaining_seconds"].as_f64().unwrap_or(0.0) < COOLDOWN);

    // The cooldown of 192.0.2.1 ends: probation; a success restores it.
    wait_state(&d, "192.0.2.1", "probation", Duration::from_secs(15));
    append(&log, "192.0.2.1", 200, 1);
    wait_state(&d, "192.0.2.1", "available", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    d.stop();

    // Run 4: the restoration was kept too; 192.0.2.2 is still out (benched,
    // or on probation if its cooldown has ended meanwhile).
    let d = start(&cfg);
    let a = address(&d, "192.0.2.1");
    assert_eq!(a["state"], "available", "{a:#}");
    let b = address(&d, "192.0.2.2");
    assert_ne!(b["state"], "available", "{b:#}");
    d.stop();
}

#[test]
fn unreadable_saved_state_stops_start_up_with_its_key() {
    let dir = TempDir::new();
    let cfg = dir.write("ippool.toml", &config("10m"));
    let state = dir.0.join("state");
    std::fs::create_dir_all(&state).expect("mkdir");

    // An offset whose file identity is not `dev:inode`.
    let s = store::Store::open_dir(&state).expect("store");
    s.put_offset(&store::LogOffset {
        monitor: "web".into(),
        file_id: "not-an-id".into(),
        offset: 7,
        path: None,
    })
    .expect("put");
    drop(s);
    let err = support::serve_fails(&cfg, &[]);
    assert!(
        err.contains("offsets/web") && err.contains("not-an-id"),
        "{err}"
    );

    // A bench with a cause no ippool writes.
    let s = store::Store::open_dir(&state).expect("store");
    s.backend()
        .apply(&[store::Op::Delete(store::Table::Offsets, "web".into())])
        .expect("delete");
    s.put_bench(&store::HealthRecord {
        pool: "web".into(),
        address: "192.0.2.1".into(),
        since_unix_ms: 1,
        until_unix_ms: 2,
        strike: 1,
        cause: "bad luck".into(),
    })
    .expect("put");
    drop(s);
    let err = support::serve_fails(&cfg, &[]);
    assert!(
        err.contains("health/web/192.0.2.1") && err.contains("bad luck"),
        "{err}"
    );

    // Fixed: it starts (and forgets nothing silently: the record is read).
    let s = store::Store::open_dir(&state).expect("store");
    assert!(s.remove_bench("web", "192.0.2.1").expect("remove"));
    drop(s);
    start(&cfg).stop();
}
