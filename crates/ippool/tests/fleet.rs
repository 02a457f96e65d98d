//! Two daemons sharing one real `redis-server` (`[store] backend =
//! "redis"`, installed by `.ci/run`): a rule added or removed on one
//! applies on the other, a ban written by any instance applies on all and
//! is lifted on all, offenses spread over the instances add up to a ban,
//! a restarted instance reads the fleet's state, the
//! same over TLS (`rediss://` with a client certificate), and bad
//! `[store]` settings or an unreachable Redis stop start-up with the key or
//! the server named.

mod support;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Daemon, Fate, PeerEcho, TempDir, http, proxy_get, send_from, serve_fails, verdict};
use testbed::redis::RedisServer as Redis;

const TOKEN: &str = "fleet-admin-token-0123456789";

fn config(redis: &Redis) -> String {
    config_with(&format!("url = \"redis://127.0.0.1:{}/0\"", redis.port()))
}

/// The daemon's config with `store` lines (the URL and more) of its own.
fn config_with(store: &str) -> String {
    format!(
        r#"
shutdown_timeout = "5s"
[store]
backend = "redis"
{store}
prefix = "fleet-test"
[admin]
listen = "127.0.0.1:0"
token_env = "IPPOOL_TEST_TOKEN"
[rules.clients]
default = "allow"
deny = ["10.0.0.0/8"]
[rules.clients.autoblock]
threshold = 3
window = "1m"
ban = "1h"
[pools.loop]
source = "127.0.30.0/29"
strategy = "round_robin"
max_uses = 0
[egress.main]
listen = "127.0.0.1:0"
pool = "loop"
rules = "clients"
users_file = "users"
allow = ["127.0.0.0/8"]
"#
    )
}

fn start(cfg: &std::path::Path) -> Daemon {
    Daemon::start(cfg, &[("IPPOOL_TEST_TOKEN", TOKEN)])
}

fn call(d: &Daemon, method: &str, path: &str, body: &str) -> support::Response {
    let bearer = format!("Bearer {TOKEN}");
    http(
        d.admin,
        method,
        path,
        &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        body,
    )
}

/// Adds `rule` to the deny list of `clients` through `d`'s API.
fn deny(d: &Daemon, rule: &str) {
    let r = call(
        d,
        "POST",
        "/api/rules/clients/deny",
        &format!(r#"{{"rule": "{rule}"}}"#),
    );
    assert_eq!(r.status, 200, "{r:?}");
}

fn bans(d: &Daemon) -> Vec<String> {
    let r = http(d.admin, "GET", "/api/bans", &[], "");
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    v["bans"]
        .as_array()
        .expect("bans")
        .iter()
        .map(|b| b["rule"].as_str().expect("rule").to_owned())
        .collect()
}

/// Two daemons sharing `redis` (each with its own state_dir).
fn pair(redis: &Redis) -> (TempDir, TempDir, Daemon, Daemon) {
    let (da, db) = (TempDir::new(), TempDir::new());
    da.write("users", "alice:secret\n");
    db.write("users", "alice:secret\n");
    let a = start(&da.write("ippool.toml", &config(redis)));
    let b = start(&db.write("ippool.toml", &config(redis)));
    (da, db, a, b)
}

/// Polls `f` until it is true, for up to 10 s.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "not within 10 s: {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn rules_and_bans_apply_across_the_fleet() {
    let redis = Redis::start();
    let (_da, db, mut a, mut b) = pair(&redis);
    let cb = db.0.join("ippool.toml");

    // A rule added on a applies on b, and its removal too.
    deny(&a, "192.0.2.0/24");
    eventually("b denies 192.0.2.7", || {
        verdict(&b, "clients", "192.0.2.7") == "deny"
    });
    let r = call(
        &b,
        "DELETE",
        "/api/rules/clients/deny?rule=192.0.2.0/24",
        "",
    );
    assert_eq!(r.status, 200, "{r:?}");
    eventually("a allows 192.0.2.7 again", || {
        verdict(&a, "clients", "192.0.2.7") == "allow"
    });
    // Readable with Redis's tools; config-file rules are not written.
    assert_eq!(redis.cli(&["HLEN", "fleet-test:rules"]), "0");

    // A ban written by any instance (here: by hand, as another instance
    // would) is enforced by both, and lifted on one it is lifted on all.
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 3_600_000;
    let ban = format!(
        r#"{{"set":"clients","network":"198.51.100.9","until_unix_ms":{until},"times":1,"reason":"test"}}"#
    );
    redis.cli(&["HSET", "fleet-test:bans", "clients/198.51.100.9", &ban]);
    redis.cli(&[
        "PUBLISH",
        "fleet-test:changes",
        "elsewhere put bans clients/198.51.100.9",
    ]);
    eventually("both ban 198.51.100.9", || {
        bans(&a) == ["198.51.100.9"] && bans(&b) == ["198.51.100.9"]
    });
    assert_eq!(verdict(&a, "clients", "198.51.100.9"), "deny");
    // What b applied from the fleet, counted.
    let m = http(b.admin, "GET", "/metrics", &[], "").body;
    for (change, n) in [
        ("rule_added", 1.0),
        ("rule_removed", 0.0),
        ("ban_taken", 1.0),
    ] {
        let series = format!("ippool_fleet_changes_total{{change=\"{change}\"}}");
        assert_eq!(
            support::metric(&m, &series).unwrap_or(0.0),
            n,
            "{series}\n{m}"
        );
    }
    let r = call(&a, "DELETE", "/api/bans/clients?rule=198.51.100.9", "");
    assert_eq!(r.status, 200, "{r:?}");
    eventually("b lifted it too", || bans(&b).is_empty());
    assert_eq!(verdict(&b, "clients", "198.51.100.9"), "allow");

    // While b is down a rule is added; b reads it at start.
    assert!(b.terminate().success());
    deny(&a, "203.0.113.0/24");
    let mut b = start(&cb);
    assert_eq!(verdict(&b, "clients", "203.0.113.5"), "deny");

    // Redis gone: a change is refused with the reason and nothing changes.
    drop(redis);
    let r = call(
        &b,
        "POST",
        "/api/rules/clients/deny",
        r#"{"rule": "198.51.100.0/24"}"#,
    );
    assert!(r.status >= 500, "{r:?}");
    assert!(
        r.body.contains("redis://127.0.0.1"),
        "names the server: {}",
        r.body
    );
    assert_eq!(verdict(&b, "clients", "198.51.100.1"), "allow");
    assert_eq!(
        verdict(&b, "clients", "203.0.113.5"),
        "deny",
        "what it had stays"
    );
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

/// `alice:secret` and `alice:wrong`, Base64.
const GOOD: &str = "YWxpY2U6c2VjcmV0";
const BAD: &str = "YWxpY2U6d3Jvbmc=";

#[test]
fn a_client_banned_by_one_instance_is_refused_by_the_other() {
    let mut redis = Redis::start();
    let port = redis.port();
    let (_da, _db, mut a, mut b) = pair(&redis);
    let upstream = PeerEcho::start();
    let (pa, pb) = (a.egress("main"), b.egress("main"));
    let ok = proxy_get(upstream.addr, Some(GOOD));
    let bad = proxy_get(upstream.addr, Some(BAD));
    let refused = |f: Fate| matches!(f, Fate::Refused | Fate::NoConnection);

    assert_eq!(send_from("127.0.0.4", pb, &ok), Fate::Status(200));
    // Wrong credentials on a, three times: a bans 127.0.0.4, and so does b.
    for i in 1..=3 {
        assert_eq!(
            send_from("127.0.0.4", pa, &bad),
            Fate::Status(407),
            "attempt {i}"
        );
    }
    assert!(refused(send_from("127.0.0.4", pa, &ok)), "banned on a");
    eventually("b refuses 127.0.0.4", || {
        refused(send_from("127.0.0.4", pb, &ok))
    });
    assert_eq!(
        send_from("127.0.0.5", pb, &ok),
        Fate::Status(200),
        "others unaffected"
    );

    // Redis down: a ban taken meanwhile is enforced where it was taken,
    // and reaches the others once Redis is back (written again by a).
    drop(redis);
    for i in 1..=3 {
        assert_eq!(
            send_from("127.0.0.7", pa, &bad),
            Fate::Status(407),
            "attempt {i}"
        );
    }
    assert!(refused(send_from("127.0.0.7", pa, &ok)), "banned on a");
    assert_eq!(
        send_from("127.0.0.7", pb, &ok),
        Fate::Status(200),
        "b has not heard yet"
    );
    redis = Redis::on(port);
    eventually("b refuses 127.0.0.7 once Redis is back", || {
        refused(send_from("127.0.0.7", pb, &ok))
    });
    assert!(
        refused(send_from("127.0.0.4", pb, &ok)),
        "the earlier ban stays"
    );
    assert!(
        redis
            .cli(&["HGET", "fleet-test:bans", "clients/127.0.0.7"])
            .contains("auth_failed"),
        "saved once Redis was back"
    );
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

#[test]
fn offenses_spread_over_the_fleet_add_up_to_one_ban() {
    let redis = Redis::start();
    let (_da, _db, mut a, mut b) = pair(&redis);
    let upstream = PeerEcho::start();
    let (pa, pb) = (a.egress("main"), b.egress("main"));
    let ok = proxy_get(upstream.addr, Some(GOOD));
    let bad = proxy_get(upstream.addr, Some(BAD));
    let refused = |f: Fate| matches!(f, Fate::Refused | Fate::NoConnection);
    let counter = "fleet-test:count:clients/127.0.0.9";

    // One wrong password on each instance: 2 of the threshold of 3, below
    // it on each and in the fleet.
    assert_eq!(send_from("127.0.0.9", pa, &bad), Fate::Status(407));
    assert_eq!(send_from("127.0.0.9", pb, &bad), Fate::Status(407));
    eventually("both offenses counted in Redis", || {
        redis.cli(&["GET", counter]) == "2"
    });
    assert_eq!(send_from("127.0.0.9", pa, &ok), Fate::Status(200));
    assert_eq!(send_from("127.0.0.9", pb, &ok), Fate::Status(200));

    // A third, on b: its own count is 2, the fleet's 3: banned by b, and
    // then by a through the store.
    assert_eq!(send_from("127.0.0.9", pb, &bad), Fate::Status(407));
    eventually("b bans on the fleet's count", || {
        refused(send_from("127.0.0.9", pb, &ok))
    });
    eventually("a refuses too", || refused(send_from("127.0.0.9", pa, &ok)));
    assert!(bans(&a).contains(&"127.0.0.9".to_owned()), "{:?}", bans(&a));
    assert!(
        redis
            .cli(&["HGET", "fleet-test:bans", "clients/127.0.0.9"])
            .contains("auth_failed"),
        "saved with its offense"
    );
    eventually("the count is spent", || {
        redis.cli(&["EXISTS", counter]) == "0"
    });
    let offenses = |d: &Daemon, result: &str| {
        let text = http(d.admin, "GET", "/metrics", &[], "").body;
        support::metric(
            &text,
            &format!("ippool_fleet_offenses_total{{result=\"{result}\"}}"),
        )
    };
    let bans = support::metric(
        &http(b.admin, "GET", "/metrics", &[], "").body,
        "ippool_fleet_bans_total ",
    );
    assert_eq!(bans, Some(1.0), "b banned on the fleet's count");
    assert_eq!(offenses(&a, "added"), Some(1.0), "a added its one offense");
    assert_eq!(offenses(&b, "added"), Some(2.0));

    // Banned by a on its own count (3 failures there): the fleet's count,
    // 2 (the banning failure is not added), is spent too, so one more
    // failure after the ban does not start from 2.
    let counter11 = "fleet-test:count:clients/127.0.0.11";
    for _ in 0..2 {
        assert_eq!(send_from("127.0.0.11", pa, &bad), Fate::Status(407));
    }
    eventually("two offenses in the fleet's count", || {
        redis.cli(&["GET", counter11]) == "2"
    });
    assert_eq!(send_from("127.0.0.11", pa, &bad), Fate::Status(407));
    assert!(refused(send_from("127.0.0.11", pa, &ok)), "banned on a");
    eventually("its fleet count is spent", || {
        redis.cli(&["EXISTS", counter11]) == "0"
    });

    // Someone else with one failure on a: counted, not banned.
    assert_eq!(send_from("127.0.0.10", pa, &bad), Fate::Status(407));
    eventually("counted", || {
        redis.cli(&["GET", "fleet-test:count:clients/127.0.0.10"]) == "1"
    });
    assert_eq!(send_from("127.0.0.10", pb, &ok), Fate::Status(200));
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

#[test]
fn a_redis_restart_removes_nothing_here_and_the_feed_comes_back() {
    let mut redis = Redis::start();
    let port = redis.port();
    let (_da, _db, mut a, mut b) = pair(&redis);
    deny(&a, "192.0.2.0/24");
    eventually("b denies 192.0.2.7", || {
        verdict(&b, "clients", "192.0.2.7") == "deny"
    });

    // Redis restarts empty (no persistence): nobody lifts what it enforces.
    drop(redis);
    redis = Redis::on(port);
    // Written while the instances' feeds were down: read at their resync.
    let rule = r#"{"set":"clients","list":"deny","rule":"198.51.100.0/24","until_unix_ms":null}"#;
    redis.cli(&[
        "HSET",
        "fleet-test:rules",
        "clients/deny/198.51.100.0/24",
        rule,
    ]);
    eventually("both read the tables again", || {
        verdict(&a, "clients", "198.51.100.1") == "deny"
            && verdict(&b, "clients", "198.51.100.1") == "deny"
    });
    assert_eq!(verdict(&a, "clients", "192.0.2.7"), "deny", "kept");
    assert_eq!(verdict(&b, "clients", "192.0.2.7"), "deny", "kept");
    // And the feed works again.
    deny(&b, "203.0.113.0/24");
    eventually("a denies 203.0.113.5", || {
        verdict(&a, "clients", "203.0.113.5") == "deny"
    });
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

#[test]
fn a_fleet_over_tls_shares_rules() {
    let (da, db) = (TempDir::new(), TempDir::new());
    // Redis asks for a client certificate (its default with TLS).
    let (redis, files) = Redis::with_tls(&da.0.join("tls"), true);
    let port = redis.port();
    let url = format!("url = \"rediss://127.0.0.1:{port}/0\"");
    // a names the files relative to its config, b by absolute path.
    let a_store = format!(
        "{url}\ntls_ca = \"tls/ca.pem\"\ntls_cert = \"tls/client.pem\"\ntls_key = \"tls/client.key\""
    );
    let b_store = format!(
        "{url}\ntls_ca = {:?}\ntls_cert = {:?}\ntls_key = {:?}",
        files.ca, files.client_cert, files.client_key
    );
    da.write("users", "alice:secret\n");
    db.write("users", "alice:secret\n");
    let a = start(&da.write("ippool.toml", &config_with(&a_store)));
    let b = start(&db.write("ippool.toml", &config_with(&b_store)));
    deny(&a, "198.51.100.0/24");
    eventually("b denies 198.51.100.9", || {
        verdict(&b, "clients", "198.51.100.9") == "deny"
    });
    a.stop();
    b.stop();

    // Without the client certificate the server refuses us, and start-up
    // says so and what to do.
    let c_store = format!("{url}\ntls_ca = {:?}", files.ca);
    let err = serve_fails(
        &db.write("no-cert.toml", &config_with(&c_store)),
        &[("IPPOOL_TEST_TOKEN", TOKEN)],
    );
    assert!(
        err.contains(&format!("rediss://127.0.0.1:{port}")) && err.contains("client certificate"),
        "{err}"
    );
}

#[test]
fn bad_store_settings_and_an_unreachable_redis_stop_start_up() {
    let dir = TempDir::new();
    dir.write("ca.pem", "exists\n");
    for (text, says) in [
        ("[store]\nbackend = \"redis\"\n", "store.backend"),
        ("[store]\nurl = \"redis://127.0.0.1/0\"\n", "store.url"),
        (
            "[store]\nbackend = \"redis\"\nurl = \"http://127.0.0.1\"\n",
            "store.url",
        ),
        (
            "[store]\nbackend = \"redis\"\nurl = \"redis://h\"\nprefix = \"a b\"\n",
            "store.prefix",
        ),
        ("[store]\nbackend = \"mysql\"\n", "store.backend"),
        (
            "[store]\nbackend = \"redis\"\nurl_env = \"IPPOOL_TEST_NO_SUCH_VAR\"\n",
            "store.url_env",
        ),
        (
            "[store]\nbackend = \"redis\"\nurl = \"rediss://h\"\ntls_ca = \"nowhere.pem\"\n",
            "store.tls_ca",
        ),
        (
            "[store]\nbackend = \"redis\"\nurl = \"redis://h\"\ntls_ca = \"ca.pem\"\n",
            "store.tls_ca",
        ),
        (
            "[store]\nbackend = \"redis\"\nurl = \"rediss://h\"\ntls_cert = \"ca.pem\"\n",
            "store.tls_cert",
        ),
        (
            "[store]\nbackend = \"redis\"\nurl = \"rediss://h\"\ntls_key = \"ca.pem\"\n",
            "store.tls_key",
        ),
        ("[store]\ntls_ca = \"ca.pem\"\n", "store.tls_ca"),
    ] {
        let cfg = dir.write("bad.toml", text);
        let err = serve_fails(&cfg, &[]);
        assert!(err.contains(says), "{text:?}: {err}");
        assert!(
            (2..=4).any(|line| err.contains(&format!("bad.toml:{line}:"))),
            "names the line: {text:?}: {err}"
        );
    }

    // A password in the file is not repeated by an error about the URL.
    for text in [
        "[store]\nbackend = \"redis\"\nurl = \"redis://:hunter2@127.0.0.1:99999\"\n",
        "[store]\nurl = \"redis://:hunter2@127.0.0.1\"\n",
    ] {
        let cfg = dir.write("secret.toml", text);
        let err = serve_fails(&cfg, &[]);
        assert!(err.contains("store.url"), "{err}");
        assert!(
            !err.contains("hunter2"),
            "the password is never printed: {err}"
        );
    }

    // Nothing listens on the port: start-up stops, naming the server but
    // not the password.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.write(
        "down.toml",
        "[admin]\nlisten = \"127.0.0.1:0\"\n[store]\nbackend = \"redis\"\nurl_env = \"IPPOOL_TEST_REDIS\"\n",
    );
    let url = format!("redis://:hunter2@127.0.0.1:{port}/0");
    let err = serve_fails(&cfg, &[("IPPOOL_TEST_REDIS", &url)]);
    assert!(
        err.contains("[store]") && err.contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(
        !err.contains("hunter2"),
        "the password is never printed: {err}"
    );

    // `ippool check` shows the effective config without the password.
    let cfg = dir.write(
        "shown.toml",
        &format!("[store]\nbackend = \"redis\"\nurl = \"{url}\"\nprefix = \"p1\"\n"),
    );
    let out = Command::new(support::BIN)
        .args(["check", "-c"])
        .arg(&cfg)
        .output()
        .expect("ippool check");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains(&format!("redis://:***@127.0.0.1:{port}/0")) && shown.contains("p1"),
        "{shown}"
    );
    assert!(!shown.contains("hunter2"), "{shown}");
}
