//! The command-line clients of the admin API against a live daemon.

mod support;

use std::process::{Command, Output};

use support::{Daemon, TempDir};

const TOKEN: &str = "cli-api-admin-token-0123456789";

fn ippool(admin: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(support::BIN);
    c.args(args)
        .env("IPPOOL_ADMIN", admin)
        .env_remove("IPPOOL_ADMIN_TOKEN");
    if let Some(t) = token {
        c.env("IPPOOL_ADMIN_TOKEN", t);
    }
    c.output().expect("run ippool")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn rules_bans_and_pools_from_the_command_line() {
    let dir = TempDir::new();
    let cfg = dir.write(
        "ippool.toml",
        r#"
[admin]
listen = "127.0.0.1:0"
token_env = "IPPOOL_TEST_TOKEN"
[rules.clients]
default = "allow"
deny = ["10.0.0.0/8"]
[pools.loop]
source = "127.0.40.0/30"
"#,
    );
    let mut d = Daemon::start(&cfg, &[("IPPOOL_TEST_TOKEN", TOKEN)]);
    let admin = format!("http://{}", d.admin);

    let o = ippool(
        &admin,
        None,
        &["rules", "add", "--set", "clients", "192.0.2.0/24"],
    );
    assert_eq!(o.status.code(), Some(1), "no token: {}", err(&o));
    assert!(err(&o).contains("401"), "{}", err(&o));

    let o = ippool(
        &admin,
        Some(TOKEN),
        &[
            "rules",
            "add",
            "--set",
            "clients",
            "--ttl",
            "1h",
            "192.0.2.0/24",
        ],
    );
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o), "added 192.0.2.0/24 to clients.deny\n");
    let o = ippool(
        &admin,
        Some(TOKEN),
        &["rules", "add", "--set", "clients", "10.0.0.1/8"],
    );
    assert_eq!(o.status.code(), Some(2), "bad rule: {}", err(&o));

    let o = ippool(&admin, None, &["rules", "list"]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(
        out(&o),
        "set      default  allow  deny\nclients  allow    0      2\n"
    );
    let o = ippool(&admin, None, &["rules", "list", "--set", "clients"]);
    let text = out(&o);
    assert!(
        text.lines()
            .any(|l| l.starts_with("deny  10.0.0.0/8    config")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("deny  192.0.2.0/24  runtime  3")),
        "{text}"
    );
    let o = ippool(
        &admin,
        None,
        &["rules", "list", "--set", "clients", "--json"],
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["deny"][1]["rule"], "192.0.2.0/24");

    let o = ippool(
        &admin,
        Some(TOKEN),
        &["rules", "remove", "--set", "clients", "192.0.2.0/24"],
    );
    assert!(o.status.success(), "{}", err(&o));
    let o = ippool(
        &admin,
        Some(TOKEN),
        &["rules", "remove", "--set", "clients", "10.0.0.0/8"],
    );
    assert_eq!(o.status.code(), Some(1), "config rule: {}", err(&o));
    assert!(
        err(&o).contains("409") && err(&o).contains("config file"),
        "{}",
        err(&o)
    );

    let o = ippool(&admin, None, &["bans", "list"]);
    assert_eq!(out(&o), "set  rule  remaining_s  times  offense\n");
    let o = ippool(
        &admin,
        Some(TOKEN),
        &["bans", "lift", "--set", "clients", "192.0.2.7"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(err(&o).contains("404"), "{}", err(&o));

    let o = ippool(&admin, None, &["pool", "show", "loop"]);
    let text = out(&o);
    assert!(text.starts_with("pool  kind    address"), "{text}");
    assert!(text.contains("loop  egress"), "{text}");
    assert!(
        text.lines().next().is_some_and(|h| h.contains("leases")),
        "{text}"
    );

    assert!(d.terminate().success());
    let o = ippool(&admin, None, &["bans", "list"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).contains("cannot reach the admin API"),
        "{}",
        err(&o)
    );
    let o = ippool("https://127.0.0.1:1", None, &["bans", "list"]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
}

use support::named_backend as backend;

/// Which backends answer `n` requests for `host`, counted.
fn answers(proxy: std::net::SocketAddr, host: &str, n: usize) -> Vec<(String, usize)> {
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..n {
        let r = support::http(proxy, "GET", "/", &[("Host", host)], "");
        *seen.entry(format!("{} {}", r.status, r.body)).or_default() += 1;
    }
    seen.into_iter().collect()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn keys_and_backends_from_the_command_line() {
    let (a, b, c) = (backend("a"), backend("b"), backend("c"));
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.0.join("keys")).expect("mkdir");
    // The agent's key pair is written outside the daemon's keys_dir: it
    // gets there only through `ippool keys add`.
    let agent_dir = dir.0.join("agent");
    std::fs::create_dir_all(agent_dir.join("keys")).expect("mkdir");
    support::keygen(&agent_dir.join("keys"), "web002");
    let cfg = dir.write(
        "ippool.toml",
        &format!(
            r#"
[admin]
listen = "127.0.0.1:0"
token_env = "IPPOOL_TEST_TOKEN"

[ingress.web]
listen = "127.0.0.1:0"

[ingress.web.routes.site]
host = "site.test"
backends = ["{a}", "{b}"]

[registry]
listen = "127.0.0.1:0"
keys_dir = "keys"
heartbeat_interval = "200ms"
heartbeat_timeout = "800ms"
"#
        ),
    );
    let mut d = Daemon::start(&cfg, &[("IPPOOL_TEST_TOKEN", TOKEN)]);
    let admin = format!("http://{}", d.admin);
    let proxy = d.ingress("web");
    let pubfile = agent_dir.join("keys/web002.pub");
    let pubfile = pubfile.to_str().expect("utf-8 path");

    // keys
    let o = ippool(&admin, None, &["keys", "list"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(!out(&o).contains("web002"), "{}", out(&o));
    let o = ippool(&admin, None, &["keys", "add", pubfile]);
    assert_eq!(o.status.code(), Some(1), "no token: {}", err(&o));
    assert!(err(&o).contains("401"), "{}", err(&o));
    let o = ippool(&admin, Some(TOKEN), &["keys", "add", "/nonexistent/x.pub"]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(err(&o).contains("/nonexistent/x.pub"), "{}", err(&o));
    let o = ippool(
        &admin,
        Some(TOKEN),
        &["keys", "add", pubfile, "--allow", "peer,not-an-address"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(err(&o).contains("allow[1]"), "{}", err(&o));
    let o = ippool(
        &admin,
        Some(TOKEN),
        &["keys", "add", pubfile, "--allow", "peer,127.0.0.0/8"],
    );
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o), "added key web002 (agent)\n");
    assert!(
        dir.0.join("keys/web002.pub").exists(),
        "written to keys_dir"
    );
    let o = ippool(&admin, Some(TOKEN), &["keys", "add", pubfile]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(err(&o).contains("409"), "{}", err(&o));
    let o = ippool(&admin, None, &["keys", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let key = &v["keys"][0];
    assert_eq!(
        (key["id"].as_str(), key["role"].as_str()),
        (Some("web002"), Some("agent"))
    );
    assert_eq!(key["allow"], serde_json::json!(["peer", "127.0.0.0/8"]));
    let o = ippool(&admin, None, &["keys", "list"]);
    let listed = out(&o);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("web002") && l.contains("peer,127.0.0.0/8")),
        "{listed}"
    );

    // The added key registers at once.
    let agent = support::Agent::start(
        &agent_dir,
        d.registry(),
        "web002",
        &c.to_string(),
        "app.test/",
    );
    wait_until("the agent's route", || {
        answers(proxy, "app.test", 1) == [("200 c".to_owned(), 1)]
    });

    // backends
    let o = ippool(&admin, None, &["backends", "list"]);
    assert!(o.status.success(), "{}", err(&o));
    let listed = out(&o);
    for id in ["site-1", "site-2", "web002"] {
        assert!(listed.contains(id), "{id}: {listed}");
    }
    assert_eq!(
        answers(proxy, "site.test", 4),
        [("200 a".to_owned(), 2), ("200 b".to_owned(), 2)]
    );
    let o = ippool(&admin, None, &["backends", "drain", "site-1"]);
    assert_eq!(o.status.code(), Some(1), "no token: {}", err(&o));
    let o = ippool(&admin, Some(TOKEN), &["backends", "drain", "site-1"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).starts_with("site-1 drained"), "{}", out(&o));
    assert_eq!(answers(proxy, "site.test", 4), [("200 b".to_owned(), 4)]);
    let o = ippool(&admin, None, &["backends", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let site1 = v["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["backends"].as_array().into_iter().flatten())
        .find(|b| b["id"] == "site-1")
        .cloned()
        .expect("site-1 still listed");
    assert_eq!(
        (site1["held"].as_bool(), site1["draining"].as_bool()),
        (Some(true), Some(true))
    );
    let o = ippool(&admin, None, &["backends", "list", "--ingress", "web"]);
    assert!(
        out(&o)
            .lines()
            .any(|l| l.contains("site-1") && l.contains("held")),
        "{}",
        out(&o)
    );
    // A drain is durable: after a restart site-1 is still held.
    drop(agent);
    assert!(d.terminate().success());
    let mut d = Daemon::start(&cfg, &[("IPPOOL_TEST_TOKEN", TOKEN)]);
    let admin = format!("http://{}", d.admin);
    let proxy = d.ingress("web");
    assert_eq!(answers(proxy, "site.test", 4), [("200 b".to_owned(), 4)]);
    let o = ippool(&admin, None, &["backends", "list"]);
    assert!(
        out(&o)
            .lines()
            .any(|l| l.contains("site-1") && l.contains("held")),
        "{}",
        out(&o)
    );
    let agent = support::Agent::start(
        &agent_dir,
        d.registry(),
        "web002",
        &c.to_string(),
        "app.test/",
    );
    wait_until("the agent's route after the restart", || {
        answers(proxy, "app.test", 1) == [("200 c".to_owned(), 1)]
    });
    let o = ippool(&admin, Some(TOKEN), &["backends", "undrain", "site-1"]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o), "site-1 back in rotation\n");
    assert_eq!(
        answers(proxy, "site.test", 4),
        [("200 a".to_owned(), 2), ("200 b".to_owned(), 2)]
    );
    let o = ippool(&admin, Some(TOKEN), &["backends", "drain", "nope"]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(
        err(&o).contains("404") && err(&o).contains("nope"),
        "{}",
        err(&o)
    );
    let o = ippool(
        &admin,
        Some(TOKEN),
        &["backends", "drain", "site-1", "--ingress", "other"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(err(&o).contains("no ingress `other`"), "{}", err(&o));

    // Revoking the key takes its backend away.
    let o = ippool(&admin, Some(TOKEN), &["keys", "revoke", "web002"]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o), "revoked key web002\n");
    wait_until("the revoked agent's route to go", || {
        answers(proxy, "app.test", 1)[0].0.starts_with("404")
    });
    let o = ippool(&admin, Some(TOKEN), &["keys", "revoke", "web002"]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    drop(agent);
    assert!(d.terminate().success());
}
