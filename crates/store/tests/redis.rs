//! The Redis backend against a real `redis-server` started here (installed
//! by `.ci/run`): records, batches, the change feed between two instances,
//! a newer format refused, and a server restart survived.

use std::time::Duration;

use store::{Backend, Ban, Change, Op, Redis, RedisTls, RuntimeRule, Store, StoreError, Table};
use testbed::redis::RedisServer as Server;

fn ban(network: &str) -> Ban {
    Ban {
        set: "clients".into(),
        network: network.into(),
        until_unix_ms: 4_000_000_000_000,
        times: 1,
        reason: "test".into(),
    }
}

/// The next change within 5 s.
fn next(c: &store::Changes) -> Change {
    c.recv_timeout(Duration::from_secs(5))
        .expect("a change within 5 s")
}

#[test]
fn two_instances_share_records_and_hear_of_each_others_changes() {
    let srv = Server::start();
    let a = Redis::connect(&srv.url(), "fleet").expect("connect a");
    let b = Redis::connect(&srv.url(), "fleet").expect("connect b");
    let a_changes = a.changes().expect("a subscribes");
    let b_changes = b.changes().expect("b subscribes");
    let (a, b) = (Store::new(a), Store::new(b));

    a.put_ban(&ban("203.0.113.7")).unwrap();
    assert_eq!(
        next(&b_changes),
        Change::Put(Table::Bans, "clients/203.0.113.7".into())
    );
    assert_eq!(
        b.ban("clients/203.0.113.7").unwrap(),
        Some(ban("203.0.113.7"))
    );
    // Readable with Redis's own tools.
    assert!(
        srv.cli(&["HGET", "fleet:bans", "clients/203.0.113.7"])
            .contains("203.0.113.7")
    );

    let rule = RuntimeRule {
        set: "clients".into(),
        list: "deny".into(),
        rule: "10.9.0.0/16".into(),
        until_unix_ms: None,
    };
    b.put_rule(&rule).unwrap();
    assert_eq!(
        next(&a_changes),
        Change::Put(Table::Rules, "clients/deny/10.9.0.0/16".into())
    );
    assert_eq!(a.rules().unwrap(), vec![rule.clone()]);
    assert!(a.remove_rule(&rule).unwrap());
    assert!(!a.remove_rule(&rule).unwrap(), "gone");
    assert_eq!(
        next(&b_changes),
        Change::Delete(Table::Rules, "clients/deny/10.9.0.0/16".into())
    );

    // Nobody hears its own changes: a's feed has nothing more.
    assert!(a_changes.recv_timeout(Duration::from_millis(300)).is_err());

    // A batch is all or nothing, and scans come sorted by key.
    let backend = Redis::connect(&srv.url(), "fleet").unwrap();
    backend
        .apply(&[
            Op::Put(Table::Offsets, "z".into(), b"{}".to_vec()),
            Op::Put(Table::Offsets, "m".into(), b"{}".to_vec()),
            Op::Delete(Table::Offsets, "none".into()),
        ])
        .unwrap();
    let keys: Vec<String> = backend
        .scan(Table::Offsets)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["m", "z"]);
    // Another prefix is another state.
    let other = Store::new(Redis::connect(&srv.url(), "other").unwrap());
    assert!(other.bans().unwrap().is_empty());
    assert_eq!(b.bans().unwrap().len(), 1);
}

#[test]
fn a_newer_format_and_bad_urls_are_refused_with_the_reason() {
    let srv = Server::start();
    srv.cli(&["HSET", "newer:meta", "format", "99"]);
    let e = Redis::connect(&srv.url(), "newer").unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, StoreError::Remote { .. }), "{e:?}");
    assert!(
        text.contains("format \"99\"") && text.contains("newer ippool"),
        "{text}"
    );
    assert_eq!(
        srv.cli(&["HGET", "newer:meta", "format"]),
        "99",
        "left as it was"
    );

    let e = Redis::connect("redis://:pw@127.0.0.1:1/0", "x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("redis://***@127.0.0.1:1/0"),
        "names the server: {e}"
    );
    assert!(!e.contains("pw"), "never prints the password: {e}");
    let e = Redis::connect("http://127.0.0.1", "x")
        .unwrap_err()
        .to_string();
    assert!(e.contains("redis://"), "{e}");
    let e = Redis::connect(&srv.url(), "has space")
        .unwrap_err()
        .to_string();
    assert!(e.contains("prefix"), "{e}");
}

#[test]
fn a_server_restart_is_survived_and_the_feed_asks_for_a_resync() {
    let srv = Server::start();
    let port = srv.port();
    let a = Store::new(Redis::connect(&srv.url(), "r").unwrap());
    let b = Redis::connect(&srv.url(), "r").unwrap();
    let feed = b.changes().unwrap();
    a.put_ban(&ban("192.0.2.1")).unwrap();
    assert_eq!(
        next(&feed),
        Change::Put(Table::Bans, "clients/192.0.2.1".into())
    );

    drop(srv);
    let e = a.put_ban(&ban("192.0.2.2")).unwrap_err().to_string();
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("cannot write"),
        "{e}"
    );

    let _srv = Server::on(port);
    // The feed comes back and says changes may have been missed.
    assert_eq!(next(&feed), Change::Resync);
    // Writes reconnect by themselves.
    a.put_ban(&ban("192.0.2.3")).unwrap();
    assert_eq!(
        next(&feed),
        Change::Put(Table::Bans, "clients/192.0.2.3".into())
    );
    assert_eq!(
        a.bans().unwrap(),
        vec![ban("192.0.2.3")],
        "a server without persistence restarted empty"
    );
}

#[test]
fn passwords_and_acl_users_authenticate_and_wrong_ones_are_refused() {
    let srv = Server::with_args(&["--requirepass", "p@ss:word"]);
    let port = srv.port();
    // The password percent-encoded in the URL, as for any Redis client.
    let url = format!("redis://:p%40ss%3Aword@127.0.0.1:{port}/0");
    let s = Store::new(Redis::connect(&url, "auth").expect("the right password"));
    s.put_ban(&ban("192.0.2.50")).unwrap();
    assert_eq!(s.bans().unwrap(), vec![ban("192.0.2.50")]);

    let e = Redis::connect(&format!("redis://:nope@127.0.0.1:{port}/0"), "auth")
        .unwrap_err()
        .to_string();
    assert!(e.contains("AUTH") && !e.contains("nope"), "{e}");
    let e = Redis::connect(&format!("redis://127.0.0.1:{port}/0"), "auth")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("NOAUTH") && e.contains("redis://:PASSWORD@host"),
        "no password: {e}"
    );

    // An ACL user (Redis 6+), and another database of the same server.
    let acl = Server::with_args(&[
        "--user", "ippool", "on", ">pw", "~*", "&*", "+@all", "--user", "default", "off",
    ]);
    let url = format!("redis://ippool:pw@127.0.0.1:{}/3", acl.port());
    let other = Redis::connect(&url, "acl").expect("the ACL user");
    let feed = other.changes().expect("the feed authenticates too");
    let s = Store::new(Redis::connect(&url, "acl").expect("the ACL user"));
    s.put_ban(&ban("192.0.2.51")).unwrap();
    assert_eq!(
        next(&feed),
        Change::Put(Table::Bans, "clients/192.0.2.51".into())
    );
    assert_eq!(
        acl.cli(&[
            "--user", "ippool", "--pass", "pw", "-n", "3", "HLEN", "acl:bans"
        ]),
        "1",
        "written to database 3"
    );
}

#[test]
fn counters_add_up_across_instances_within_their_window() {
    let srv = Server::start();
    let a = Redis::connect(&srv.url(), "fleet").expect("connect a");
    let b = Redis::connect(&srv.url(), "fleet").expect("connect b");
    let long = Duration::from_secs(60);
    let count = |r: &Redis, c: &[(&str, u64)], w| -> Vec<u64> {
        r.count(c, w)
            .unwrap()
            .into_iter()
            .map(|t| t.expect("a total"))
            .collect()
    };
    assert_eq!(count(&a, &[("x/1", 2), ("x/2", 1)], long), vec![2, 1]);
    assert_eq!(count(&b, &[("x/1", 3)], long), vec![5], "a's 2 and b's 3");
    assert_eq!(count(&a, &[], long), Vec::<u64>::new());
    // The window is the counter's life in Redis, set once by its first
    // addition: a later one does not stretch it.
    let ttl: i64 = srv.cli(&["PTTL", "fleet:count:x/1"]).parse().unwrap();
    assert!(ttl > 50_000 && ttl <= 60_000, "PTTL {ttl}");

    // Forgotten: starts again from zero.
    b.forget_counts(&["x/1"]).unwrap();
    assert_eq!(count(&a, &[("x/1", 1)], long), vec![1]);
    assert_eq!(count(&a, &[("x/2", 1)], long), vec![2], "x/2 kept");

    // A short window ends, and the count with it.
    let short = Duration::from_secs(1);
    assert_eq!(count(&a, &[("y", 4)], short), vec![4]);
    assert_eq!(count(&b, &[("y", 1)], short), vec![5]);
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(count(&b, &[("y", 1)], short), vec![1], "a new window");

    // A key that is not a counter: an error for that one, the others of
    // the batch counted, and the connection still serves.
    srv.cli(&["SET", "fleet:count:z", "not a number"]);
    let r = a.count(&[("x/2", 1), ("z", 1), ("x/1", 1)], long).unwrap();
    assert_eq!(r[0], Ok(3));
    assert!(
        r[1].as_ref().unwrap_err().contains("not an integer"),
        "{r:?}"
    );
    assert_eq!(r[2], Ok(2));
    assert_eq!(count(&a, &[("x/2", 1)], long), vec![4]);
}

/// A fresh directory for certificates, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ippool-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tls(ca: &std::path::Path, client: Option<(&std::path::Path, &std::path::Path)>) -> RedisTls {
    let mut t = RedisTls::default();
    t.ca_file = Some(ca.to_owned());
    t.client_cert = client.map(|(c, k)| (c.to_owned(), k.to_owned()));
    t
}

#[test]
fn rediss_with_a_client_certificate_shares_records_and_changes() {
    let dir = TempDir::new("tls");
    let (srv, f) = Server::with_tls(&dir.0, true);
    let url = format!("rediss://127.0.0.1:{}/0", srv.port());
    let settings = tls(&f.ca, Some((&f.client_cert, &f.client_key)));
    let a = Redis::connect_with(&url, "tls", &settings).expect("TLS with a client certificate");
    let b = Redis::connect_with(&url, "tls", &settings).expect("a second instance");
    assert!(format!("{a:?}").contains("rediss://127.0.0.1:"), "{a:?}");
    let feed = b.changes().expect("the feed over TLS");
    let a = Store::new(a);
    a.put_ban(&ban("192.0.2.60")).unwrap();
    assert_eq!(
        next(&feed),
        Change::Put(Table::Bans, "clients/192.0.2.60".into())
    );
    assert_eq!(Store::new(b).bans().unwrap(), vec![ban("192.0.2.60")]);

    // Without a client certificate the server closes the channel.
    let e = Redis::connect_with(&url, "tls", &tls(&f.ca, None))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("127.0.0.1:{}", srv.port())) && e.contains("client certificate"),
        "{e}"
    );
    // A server certificate from a CA we do not trust is refused by us.
    let e = Redis::connect_with(
        &url,
        "tls",
        &tls(&f.other_ca, Some((&f.client_cert, &f.client_key))),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("TLS handshake") && e.contains("certificate"),
        "{e}"
    );
    // Plain RESP to a TLS port fails, and says where.
    let e = Redis::connect(&format!("redis://127.0.0.1:{}/0", srv.port()), "tls")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("redis://127.0.0.1:{}", srv.port())),
        "{e}"
    );
}

#[test]
fn bad_tls_settings_are_refused_naming_the_file() {
    let dir = TempDir::new("tls-bad");
    let (srv, f) = Server::with_tls(&dir.0, false);
    let url = format!("rediss://127.0.0.1:{}/0", srv.port());
    // Server-only TLS (tls-auth-clients no): the CA alone is enough.
    let s =
        Store::new(Redis::connect_with(&url, "tls", &tls(&f.ca, None)).expect("server-only TLS"));
    s.put_ban(&ban("192.0.2.61")).unwrap();
    assert_eq!(s.bans().unwrap(), vec![ban("192.0.2.61")]);

    let missing = dir.0.join("missing.pem");
    let e = Redis::connect_with(&url, "tls", &tls(&missing, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.pem"), "{e}");
    let empty = dir.0.join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let e = Redis::connect_with(&url, "tls", &tls(&empty, None))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("empty.pem") && e.contains("no CERTIFICATE"),
        "{e}"
    );
    // A key that is not the certificate's.
    let e = Redis::connect_with(
        &url,
        "tls",
        &tls(&f.ca, Some((&f.client_cert, &f.server_key))),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("client.pem"), "{e}");
    // rediss:// to a plain server: the handshake fails, and says what to check.
    let plain = Server::start();
    let e = Redis::connect_with(
        &format!("rediss://127.0.0.1:{}/0", plain.port()),
        "tls",
        &tls(&f.ca, None),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("TLS handshake") && e.contains("redis://"), "{e}");
    // TLS settings for a plain URL are a mistake, not ignored.
    let e = Redis::connect_with(
        &format!("redis://127.0.0.1:{}/0", srv.port()),
        "tls",
        &tls(&f.ca, None),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("use rediss://"), "{e}");
}
