//! Client rules on the daemon's listeners: denied peers are refused at
//! accept (and, with `kernel_filter`, never get a SYN-ACK), wrong proxy
//! credentials ban a client at exactly `threshold`, bans survive a restart
//! and can be lifted through the API; `rules export` writes nftables.

mod support;

use std::time::Duration;

use support::{Daemon, Fate, PeerEcho, TempDir, http, proxy_get, send_from};

const TOKEN: &str = "guard-admin-token-0123456789";

const CONFIG: &str = r#"
shutdown_timeout = "5s"

[admin]
listen = "127.0.0.1:0"
token_env = "IPPOOL_TEST_TOKEN"
rules = "operators"

[rules.operators]
default = "allow"
deny = ["127.0.0.9"]

[rules.clients]
default = "allow"
deny = ["127.0.0.2"]
kernel_filter = true

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
"#;

/// `alice:secret` and `alice:wrong`, Base64.
const GOOD: &str = "YWxpY2U6c2VjcmV0";
const BAD: &str = "YWxpY2U6d3Jvbmc=";

#[test]
fn rules_bans_and_kernel_filter_on_the_daemon() {
    let dir = TempDir::new();
    dir.write("users", "alice:secret\n");
    let cfg = dir.write("ippool.toml", CONFIG);
    let upstream = PeerEcho::start();
    let env = [("IPPOOL_TEST_TOKEN", TOKEN)];
    let mut d = Daemon::start(&cfg, &env);
    let proxy = d.egress("main");
    let ok = proxy_get(upstream.addr, Some(GOOD));
    let bad = proxy_get(upstream.addr, Some(BAD));

    // The admin listener refuses its denied peer at accept.
    let ping = "GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert_eq!(send_from("127.0.0.9", d.admin, ping), Fate::Refused);
    assert_eq!(send_from("127.0.0.10", d.admin, ping), Fate::Status(200));
    // The admin listener's set counts what it decided.
    let m = http(d.admin, "GET", "/metrics", &[], "").body;
    let hits = |result: &str| {
        support::metric(
            &m,
            &format!("ippool_guard_connections_total{{set=\"operators\",result=\"{result}\"}}"),
        )
    };
    assert_eq!(hits("denied"), Some(1.0), "{m}");
    assert!(hits("accepted").is_some_and(|n| n >= 1.0), "{m}");

    // The egress set has a kernel filter: the denied peer gets no SYN-ACK
    // (the filter is attached at start-up, give it a moment).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(send_from("127.0.0.2", proxy, &ok), Fate::NoConnection);
    assert_eq!(send_from("127.0.0.3", proxy, &ok), Fate::Status(200));

    // Wrong credentials: 407 three times, then banned (threshold = 3).
    for i in 1..=3 {
        assert_eq!(
            send_from("127.0.0.4", proxy, &bad),
            Fate::Status(407),
            "attempt {i}"
        );
    }
    let fate = send_from("127.0.0.4", proxy, &ok);
    assert!(
        matches!(fate, Fate::Refused | Fate::NoConnection),
        "banned: {fate:?}"
    );
    assert_eq!(
        send_from("127.0.0.5", proxy, &ok),
        Fate::Status(200),
        "others unaffected"
    );
    // A client without credentials is asked for them: not an offense.
    for _ in 0..4 {
        assert_eq!(
            send_from("127.0.0.6", proxy, &proxy_get(upstream.addr, None)),
            Fate::Status(407)
        );
    }
    assert_eq!(send_from("127.0.0.6", proxy, &ok), Fate::Status(200));

    let bans = || -> serde_json::Value {
        let r = http(d.admin, "GET", "/api/bans", &[], "");
        serde_json::from_str(&r.body).expect("JSON")
    };
    let b = bans();
    assert_eq!(b["bans"].as_array().map(Vec::len), Some(1), "{b}");
    assert_eq!(b["bans"][0]["rule"], "127.0.0.4", "{b}");
    assert_eq!(b["bans"][0]["set"], "clients", "{b}");
    assert_eq!(b["bans"][0]["offense"], "auth_failed", "{b}");
    assert!(d.terminate().success());

    // The ban survives a restart.
    let mut d = Daemon::start(&cfg, &env);
    let proxy = d.egress("main");
    std::thread::sleep(Duration::from_millis(300));
    let fate = send_from("127.0.0.4", proxy, &ok);
    assert!(
        matches!(fate, Fate::Refused | Fate::NoConnection),
        "still banned: {fate:?}"
    );
    let r = http(d.admin, "GET", "/api/bans", &[], "");
    assert!(r.body.contains("127.0.0.4"), "{}", r.body);

    // Lifted through the API (token), durably.
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    assert_eq!(
        http(
            d.admin,
            "DELETE",
            "/api/bans/clients?rule=127.0.0.4",
            &[],
            ""
        )
        .status,
        401
    );
    let r = http(
        d.admin,
        "DELETE",
        "/api/bans/clients?rule=127.0.0.4",
        &auth,
        "",
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        http(
            d.admin,
            "DELETE",
            "/api/bans/clients?rule=127.0.0.4",
            &auth,
            ""
        )
        .status,
        404
    );
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(send_from("127.0.0.4", proxy, &ok), Fate::Status(200));
    assert!(d.terminate().success());
    let mut d = Daemon::start(&cfg, &env);
    let proxy = d.egress("main");
    assert_eq!(
        send_from("127.0.0.4", proxy, &ok),
        Fate::Status(200),
        "lift is durable"
    );

    // The live set as nftables, bans included, and the offline export.
    let r = http(
        d.admin,
        "GET",
        "/api/rules/clients/export?ports=3128",
        &[],
        "",
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body.contains("table inet ippool") && r.body.contains("127.0.0.2"),
        "{}",
        r.body
    );
    assert!(d.terminate().success());
    let out = std::process::Command::new(support::BIN)
        .args(["rules", "export", "--set", "clients", "-c"])
        .arg(&cfg)
        .output()
        .expect("export");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("127.0.0.2") && text.contains("drop"),
        "{text}"
    );
}

#[test]
fn guard_config_errors_name_the_key() {
    let dir = TempDir::new();
    for (body, key) in [
        (
            "[egress.e]\npool = \"p\"\nrules = \"nope\"\n[pools.p]\nsource = \"127.0.0.0/30\"\n",
            "egress.e.rules",
        ),
        (
            "[rules.c]\ndefault = \"allow\"\n[rules.c.autoblock]\nthreshold = 0\n",
            "rules.c.autoblock.threshold",
        ),
        (
            "[rules.c]\ndefault = \"allow\"\n[rules.c.autoblock]\nban = \"1h\"\nmax_ban = \"1m\"\n",
            "rules.c.autoblock.max_ban",
        ),
        (
            "[rules.c]\ndefault = \"allow\"\n[rules.c.rate_limit]\nrate = 0.0\n",
            "rules.c.rate_limit.rate",
        ),
        ("[admin]\nrules = \"x\"\n", "admin.rules"),
    ] {
        let cfg = dir.write("bad.toml", body);
        let out = std::process::Command::new(support::BIN)
            .args(["check", "-c"])
            .arg(&cfg)
            .output()
            .expect("check");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(&format!("{key}: ")), "want {key}: {err}");
    }
}
