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
