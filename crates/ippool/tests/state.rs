//! Runtime rules through the admin API: added, listed, expiring, removed,
//! and still there after a restart and after `kill -9` right after the 200.

mod support;

use support::{Daemon, TempDir, http, verdict};

const TOKEN: &str = "state-admin-token-0123456789";

const CONFIG: &str = r#"
shutdown_timeout = "5s"
[admin]
listen = "127.0.0.1:0"
token_env = "IPPOOL_TEST_TOKEN"
[rules.clients]
default = "allow"
deny = ["10.0.0.0/8"]
"#;

fn start(cfg: &std::path::Path) -> Daemon {
    Daemon::start(cfg, &[("IPPOOL_TEST_TOKEN", TOKEN)])
}

fn post(d: &Daemon, path: &str, body: &str) -> support::Response {
    let bearer = format!("Bearer {TOKEN}");
    http(
        d.admin,
        "POST",
        path,
        &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        body,
    )
}

fn delete(d: &Daemon, path: &str) -> support::Response {
    let bearer = format!("Bearer {TOKEN}");
    http(d.admin, "DELETE", path, &[("Authorization", &bearer)], "")
}

#[test]
fn runtime_rules_survive_restart() {
    let dir = TempDir::new();
    let cfg = dir.write("ippool.toml", CONFIG);
    let mut d = start(&cfg);

    assert_eq!(verdict(&d, "clients", "192.0.2.7"), "allow");
    let body = r#"{"rule": "192.0.2.0/24"}"#;
    assert_eq!(
        http(d.admin, "POST", "/api/rules/clients/deny", &[], body).status,
        401,
        "no token"
    );
    let r = post(&d, "/api/rules/clients/deny", body);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(verdict(&d, "clients", "192.0.2.7"), "deny");
    // A rule with a TTL, and one that expires almost at once.
    assert_eq!(
        post(
            &d,
            "/api/rules/clients/deny",
            r#"{"rule": "198.51.100.1", "ttl": "1h"}"#
        )
        .status,
        200
    );
    assert_eq!(
        post(
            &d,
            "/api/rules/clients/deny",
            r#"{"rule": "198.51.100.2", "ttl": "300ms"}"#
        )
        .status,
        200
    );
    assert_eq!(verdict(&d, "clients", "198.51.100.2"), "deny");
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(
        verdict(&d, "clients", "198.51.100.2"),
        "allow",
        "expired at once, no sweep"
    );

    // Bad input, each with a clear status and reason.
    let r = post(&d, "/api/rules/clients/deny", r#"{"rule": "10.0.0.1/8"}"#);
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("10.0.0.1/8"), "{}", r.body);
    assert_eq!(post(&d, "/api/rules/clients/maybe", body).status, 404);
    assert_eq!(post(&d, "/api/rules/nope/deny", body).status, 404);
    assert_eq!(
        post(
            &d,
            "/api/rules/clients/deny",
            r#"{"rule": "1.2.3.4", "ttl": "soon"}"#
        )
        .status,
        400
    );
    assert_eq!(
        post(&d, "/api/rules/clients/deny", r#"{"rule": "10.0.0.0/8"}"#).status,
        409,
        "already in the file"
    );
    let r = delete(&d, "/api/rules/clients/deny?rule=10.0.0.0/8");
    assert_eq!(r.status, 409, "config rules are edited in the file: {r:?}");
    assert_eq!(
        delete(&d, "/api/rules/clients/deny?rule=203.0.113.9").status,
        404
    );

    let r = http(d.admin, "GET", "/api/rules/clients", &[], "");
    let l: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    let deny: Vec<(String, String)> = l["deny"]
        .as_array()
        .expect("deny")
        .iter()
        .map(|e| {
            (
                e["rule"].as_str().unwrap().to_owned(),
                e["source"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        deny,
        [
            ("10.0.0.0/8".to_owned(), "config".to_owned()),
            ("192.0.2.0/24".to_owned(), "runtime".to_owned()),
            ("198.51.100.1".to_owned(), "runtime".to_owned()),
        ]
    );
    assert!(d.terminate().success());

    // Restart: the runtime rules are back, the expired one is not.
    let mut d = start(&cfg);
    assert_eq!(verdict(&d, "clients", "192.0.2.7"), "deny");
    assert_eq!(verdict(&d, "clients", "198.51.100.1"), "deny");
    assert_eq!(verdict(&d, "clients", "198.51.100.2"), "allow");
    let r = delete(&d, "/api/rules/clients/deny?rule=192.0.2.0/24");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(verdict(&d, "clients", "192.0.2.7"), "allow");
    assert!(d.terminate().success());
    let mut d = start(&cfg);
    assert_eq!(
        verdict(&d, "clients", "192.0.2.7"),
        "allow",
        "removal is durable too"
    );
    assert!(d.terminate().success());
}

#[test]
fn kill_9_right_after_the_200_loses_nothing() {
    let dir = TempDir::new();
    let cfg = dir.write("ippool.toml", CONFIG);
    for i in 1..=5 {
        let mut d = start(&cfg);
        let rule = format!("203.0.113.{i}");
        let r = post(
            &d,
            "/api/rules/clients/deny",
            &format!(r#"{{"rule": "{rule}"}}"#),
        );
        assert_eq!(r.status, 200, "{r:?}");
        d.child.kill().expect("kill -9");
        let _ = d.child.wait();
        let d = start(&cfg);
        for j in 1..=i {
            assert_eq!(
                verdict(&d, "clients", &format!("203.0.113.{j}")),
                "deny",
                "round {i}: rule {j} lost"
            );
        }
    }
}

/// The same for backend drains: each acknowledged drain (and undrain)
/// is there after `kill -9`.
#[test]
fn kill_9_right_after_a_drain_loses_nothing() {
    let dir = TempDir::new();
    // Backends that never answer: a hold needs no live backend.
    let cfg = dir.write(
        "ippool.toml",
        &format!(
            "{CONFIG}[ingress.web]\nlisten = \"127.0.0.1:0\"\n\
             [ingress.web.routes.site]\n\
             backends = [\"127.0.0.1:9\", \"127.0.0.2:9\", \"127.0.0.3:9\"]\n"
        ),
    );
    let held = |d: &Daemon| -> Vec<String> {
        let r = http(d.admin, "GET", "/api/routes", &[], "");
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        let mut ids: Vec<String> = v["routes"][0]["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .filter(|b| b["held"] == true)
            .map(|b| b["id"].as_str().expect("id").to_owned())
            .collect();
        ids.sort();
        ids
    };
    let mut want: Vec<String> = Vec::new();
    for (i, verb) in ["drain", "drain", "undrain", "drain"].iter().enumerate() {
        let d = start(&cfg);
        let id = ["site-1", "site-2", "site-1", "site-3"][i];
        let r = post(&d, &format!("/api/backends/{id}/{verb}"), "");
        assert_eq!(r.status, 200, "{r:?}");
        if *verb == "drain" {
            want.push(id.to_owned());
        } else {
            want.retain(|w| w != id);
        }
        want.sort();
        d.kill_9();
        let d = start(&cfg);
        assert_eq!(held(&d), want, "round {i}: {verb} {id} lost");
        d.kill_9();
    }
}

#[test]
fn a_damaged_store_stops_the_daemon() {
    let dir = TempDir::new();
    let cfg = dir.write("ippool.toml", CONFIG);
    std::fs::create_dir_all(dir.0.join("state")).expect("mkdir");
    let junk = b"not a store\n".repeat(100);
    std::fs::write(dir.0.join("state/state.redb"), &junk).expect("write");
    let err = support::serve_fails(&cfg, &[("IPPOOL_TEST_TOKEN", TOKEN)]);
    assert!(
        err.contains("state.redb") && err.contains("Nothing was changed"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(dir.0.join("state/state.redb")).expect("read"),
        junk,
        "left untouched"
    );
}

#[test]
fn events_stream_tells_rule_changes_and_ends_on_shutdown() {
    use std::io::{BufRead, BufReader, Write};
    let dir = TempDir::new();
    let cfg = dir.write("ippool.toml", CONFIG);
    let mut d = start(&cfg);
    let mut s = std::net::TcpStream::connect(d.admin).expect("connect");
    s.write_all(b"GET /api/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .expect("send");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    reader.read_line(&mut head).expect("status line");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Give the subscription a moment to exist before the change.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let r = post(
        &d,
        "/api/rules/clients/deny",
        r#"{"rule": "192.0.2.9", "ttl": "1m"}"#,
    );
    assert_eq!(r.status, 200, "{r:?}");
    let mut seen = Vec::new();
    let mut line = String::new();
    while seen.iter().all(|l: &String| !l.starts_with("data:")) {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if line.starts_with("event:") || line.starts_with("data:") {
            seen.push(line.trim().to_owned());
        }
    }
    assert!(seen.contains(&"event: rule_added".to_owned()), "{seen:?}");
    let data = seen
        .iter()
        .find(|l| l.starts_with("data:"))
        .expect("data line");
    let v: serde_json::Value = serde_json::from_str(&data[5..]).expect("JSON data");
    assert_eq!(
        (v["set"].as_str(), v["rule"].as_str()),
        (Some("clients"), Some("192.0.2.9"))
    );
    assert_eq!(v["ttl_seconds"], 60.0);
    // An open stream does not hold up shutdown.
    let t0 = std::time::Instant::now();
    assert!(d.terminate().success());
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(4),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn reload_applies_rules_keeps_runtime_ones_and_refuses_bad_files() {
    let dir = TempDir::new();
    let cfg = dir.write("ippool.toml", CONFIG);
    let mut d = start(&cfg);
    assert_eq!(
        post(&d, "/api/rules/clients/deny", r#"{"rule": "192.0.2.0/24"}"#).status,
        200
    );
    assert_eq!(verdict(&d, "clients", "10.1.1.1"), "deny");

    // New file rules: 10/8 gone, 198.51.100.0/24 in; shutdown_timeout changed.
    dir.write(
        "ippool.toml",
        &CONFIG
            .replace("deny = [\"10.0.0.0/8\"]", "deny = [\"198.51.100.0/24\"]")
            .replace("shutdown_timeout = \"5s\"", "shutdown_timeout = \"6s\""),
    );
    let r = post(&d, "/api/reload", "");
    assert_eq!(r.status, 200, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(v["reloaded"], serde_json::json!(["clients"]), "{v}");
    assert_eq!(
        v["restart_required"],
        serde_json::json!(["shutdown_timeout"]),
        "{v}"
    );
    assert_eq!(verdict(&d, "clients", "10.1.1.1"), "allow");
    assert_eq!(verdict(&d, "clients", "198.51.100.4"), "deny");
    assert_eq!(
        verdict(&d, "clients", "192.0.2.7"),
        "deny",
        "the runtime rule stays"
    );

    // An invalid file is refused with where and why; nothing changes.
    dir.write("ippool.toml", &CONFIG.replace("10.0.0.0/8", "10.0.0.1/8"));
    let r = post(&d, "/api/reload", "");
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.body.contains("rules.clients.deny[0]") && r.body.contains(":8:9:"),
        "{}",
        r.body
    );
    assert_eq!(
        verdict(&d, "clients", "198.51.100.4"),
        "deny",
        "the running config stays"
    );

    // SIGHUP does the same.
    dir.write(
        "ippool.toml",
        &CONFIG.replace("10.0.0.0/8", "203.0.113.0/24"),
    );
    let pid = d.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    let t0 = std::time::Instant::now();
    while verdict(&d, "clients", "203.0.113.9") != "deny" {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "SIGHUP not applied"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(verdict(&d, "clients", "198.51.100.4"), "allow");
    let r = http(d.admin, "GET", "/config", &[], "");
    assert!(
        r.body.contains("203.0.113.0/24"),
        "/config shows the reloaded file: {}",
        r.body
    );
    assert!(d.terminate().success());
}

#[test]
fn rust_log_is_read_when_ippool_log_is_not_set() {
    let dir = TempDir::new();
    let cfg = dir.write("ippool.toml", CONFIG);
    let mut d = Daemon::start(
        &cfg,
        &[
            ("IPPOOL_TEST_TOKEN", TOKEN),
            ("IPPOOL_LOG", ""),
            ("RUST_LOG", "ippool=loud"),
        ],
    );
    assert!(
        d.startup
            .iter()
            .any(|l| l.contains("RUST_LOG=\"ippool=loud\"") && l.contains("using `info`")),
        "{:?}",
        d.startup
    );
    assert!(d.terminate().success());
}
