//! Hot reload of listener sections with a real `ippool serve` on
//! loopback: sections added at reload are bound and proxy, removed ones
//! refuse new connections while open ones keep working, a changed one is
//! replaced on its port without a moment of refusal, a bad file or a busy
//! port changes nothing, and SIGHUP does what `POST /api/reload` does.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::{Daemon, TempDir, http};

const TOKEN: &str = "reload-admin-token-0123456789";

/// The admin API and an egress pool on loopback addresses (127.0.0.0/8 is
/// local on Linux, so the static assigner can bind them).
const BASE: &str = r#"
shutdown_timeout = "5s"

[admin]
listen = "127.0.0.1:0"
token_env = "IPPOOL_TEST_TOKEN"

[pools.lo]
source = "127.0.20.0/29"
strategy = "round_robin"
max_uses = 0
keep_assigned = 6
"#;

fn start(cfg: &std::path::Path) -> Daemon {
    Daemon::start(cfg, &[("IPPOOL_TEST_TOKEN", TOKEN)])
}

/// `POST /api/reload`: the status and the body as JSON (or as a string).
fn reload(d: &Daemon) -> (u16, serde_json::Value) {
    let bearer = format!("Bearer {TOKEN}");
    let r = http(
        d.admin,
        "POST",
        "/api/reload",
        &[("Authorization", &bearer)],
        "",
    );
    let v = serde_json::from_str(&r.body).unwrap_or(serde_json::Value::String(r.body));
    (r.status, v)
}

fn list(v: &serde_json::Value, field: &str) -> Vec<String> {
    v[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
}

/// `N` addresses free now on 127.0.30.`test`: each test listens on its own
/// loopback address, so that the ports the daemons and the other tests
/// bind on 127.0.0.1 meanwhile cannot take it.
fn free_addrs<const N: usize>(test: u8) -> [SocketAddr; N] {
    // Held together, so they differ.
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind(SocketAddr::from(([127, 0, 30, test], 0))).expect("bind"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("free port"))
}

/// Whether a connection to `addr` is refused (nothing listens).
fn refused(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(_) => false,
        Err(e) => e.kind() == ErrorKind::ConnectionRefused,
    }
}

/// Polls `f` until it holds, failing with `what` after 5 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

use support::named_backend as backend;

/// A TCP server echoing every byte back.
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut w = c.try_clone().expect("clone");
                let _ = std::io::copy(&mut c, &mut w);
            });
        }
    });
    addr
}

/// A CONNECT tunnel through egress proxy `proxy` to `dest`.
fn tunnel(proxy: SocketAddr, dest: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect_timeout(&proxy, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(s, "CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n").expect("send CONNECT");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).expect("read CONNECT answer"), 1, "{head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// Sends `msg` through `s` and reads it back.
fn echoes(s: &mut TcpStream, msg: &str) -> bool {
    if s.write_all(msg.as_bytes()).is_err() {
        return false;
    }
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).is_ok() && back == msg.as_bytes()
}

fn get(addr: SocketAddr) -> (u16, String) {
    let r = http(addr, "GET", "/", &[], "");
    (r.status, r.body)
}

fn ingress(name: &str, listen: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "\n[ingress.{name}]\nlisten = \"{listen}\"\n\
         [ingress.{name}.routes.main]\nbackends = [\"{backend}\"]\n"
    )
}

fn egress(name: &str, listen: SocketAddr, extra: &str) -> String {
    format!(
        "\n[egress.{name}]\nlisten = \"{listen}\"\npool = \"lo\"\n\
         allow = [\"127.0.0.0/8\"]\n{extra}"
    )
}

#[test]
fn an_added_ingress_is_started_and_proxies() {
    let (a, b) = (backend("a"), backend("b"));
    let [p1, p2] = free_addrs(1);
    let dir = TempDir::new();
    let first = format!("{BASE}{}", ingress("web", p1, a));
    let cfg = dir.write("ippool.toml", &first);
    let mut d = start(&cfg);
    assert_eq!(get(p1), (200, "a".into()));
    assert!(refused(p2));

    dir.write(
        "ippool.toml",
        &format!("{first}{}", ingress("extra", p2, b)),
    );
    let (status, v) = reload(&d);
    assert_eq!(status, 200, "{v}");
    assert_eq!(list(&v, "started"), ["ingress.extra"], "{v}");
    assert_eq!(list(&v, "stopped"), Vec::<String>::new(), "{v}");
    assert_eq!(list(&v, "restart_required"), Vec::<String>::new(), "{v}");
    assert_eq!(get(p2), (200, "b".into()), "the new port proxies");
    assert_eq!(get(p1), (200, "a".into()), "the old one still does");
    let m = http(d.admin, "GET", "/metrics", &[], "").body;
    assert!(
        m.contains("ippool_ingress_requests_total{listener=\"extra\"}"),
        "{m}"
    );
    // The admin API sees the new ingress's routes.
    let routes = |d: &Daemon| {
        let r = http(d.admin, "GET", "/api/routes", &[], "");
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        let mut names: Vec<String> = v["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r["ingress"].as_str().unwrap_or_default().to_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(routes(&d), ["extra", "web"]);

    // The same file again: nothing to do.
    let (status, v) = reload(&d);
    assert_eq!(status, 200, "{v}");
    assert_eq!(list(&v, "started"), Vec::<String>::new(), "{v}");
    // Removed again: its routes leave the view.
    dir.write("ippool.toml", &first);
    let (status, v) = reload(&d);
    assert_eq!(status, 200, "{v}");
    assert_eq!(list(&v, "stopped"), ["ingress.extra"], "{v}");
    assert_eq!(routes(&d), ["web"]);
    assert!(d.terminate().success());
}

#[test]
fn a_removed_egress_refuses_new_clients_and_keeps_open_tunnels() {
    let echo = echo_server();
    let [p1, p2] = free_addrs(2);
    let dir = TempDir::new();
    let keep = egress("keep", p2, "");
    let cfg = dir.write(
        "ippool.toml",
        &format!("{BASE}{}{keep}", egress("tun", p1, "")),
    );
    let mut d = start(&cfg);
    let mut open = tunnel(p1, echo);
    assert!(echoes(&mut open, "before\n"));

    dir.write("ippool.toml", &format!("{BASE}{keep}"));
    let (status, v) = reload(&d);
    assert_eq!(status, 200, "{v}");
    assert_eq!(list(&v, "stopped"), ["egress.tun"], "{v}");
    assert_eq!(list(&v, "started"), Vec::<String>::new(), "{v}");
    eventually("the removed listener's port refuses", || refused(p1));
    // The tunnel opened before goes on working, again and again.
    for i in 0..3 {
        assert!(echoes(&mut open, &format!("after {i}\n")), "tunnel cut");
    }
    // The other listener is untouched.
    let mut other = tunnel(p2, echo);
    assert!(echoes(&mut other, "other\n"));
    drop(other);
    // Closing the tunnel ends the drain.
    drop(open);
    assert!(
        d.wait_for_log("egress.tun: stopped (drained)", Duration::from_secs(5))
            .is_some(),
        "the removed listener did not finish draining"
    );
    let m = http(d.admin, "GET", "/metrics", &[], "").body;
    assert!(
        !m.contains("listener=\"tun\""),
        "series of a removed listener: {m}"
    );
    assert!(d.terminate().success());
}

#[test]
fn a_changed_ingress_is_replaced_on_its_port_without_refusing_anyone() {
    let a = backend("a");
    let [p] = free_addrs(3);
    let dir = TempDir::new();
    let section = ingress("web", p, a);
    let cfg = dir.write("ippool.toml", &format!("{BASE}{section}"));
    let mut d = start(&cfg);
    assert_eq!(get(p), (200, "a".into()));

    // Clients keep coming while the listener is replaced.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refusals) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = {
        let (stop, ok, refusals) = (stop.clone(), ok.clone(), refusals.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match TcpStream::connect_timeout(&p, Duration::from_secs(2)) {
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                        refusals.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {}
                    Ok(mut s) => {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                        let _ =
                            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                        let mut out = String::new();
                        let _ = s.read_to_string(&mut out);
                        if out.starts_with("HTTP/1.1 200") {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        })
    };
    eventually("requests flow", || ok.load(Ordering::Relaxed) > 5);
    // Same port, another setting: replaced.
    let changed = section.replace(
        "[ingress.web.routes",
        "header_read_timeout = \"7s\"\n[ingress.web.routes",
    );
    dir.write("ippool.toml", &format!("{BASE}{changed}"));
    let (status, v) = reload(&d);
    assert_eq!(status, 200, "{v}");
    assert_eq!(list(&v, "started"), ["ingress.web"], "{v}");
    assert_eq!(list(&v, "stopped"), ["ingress.web"], "{v}");
    let after = ok.load(Ordering::Relaxed);
    eventually("requests flow after the reload", || {
        ok.load(Ordering::Relaxed) > after + 5
    });
    stop.store(true, Ordering::Relaxed);
    client.join().expect("client thread");
    assert_eq!(
        refusals.load(Ordering::Relaxed),
        0,
        "the port refused connections during the replacement"
    );
    assert_eq!(get(p), (200, "a".into()));
    assert!(d.terminate().success());
}

fn get_path(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = http(addr, "GET", path, &[], "");
    (r.status, r.body)
}

#[test]
fn route_changes_apply_live_without_replacing_the_listener() {
    let (a, b, c) = (backend("a"), backend("b"), backend("c"));
    let [p] = free_addrs(1);
    let dir = TempDir::new();
    let listener = format!("\n[ingress.web]\nlisten = \"{p}\"\n");
    let main = |backends: &str| format!("[ingress.web.routes.main]\nbackends = [{backends}]\n");
    let cfg = dir.write(
        "ippool.toml",
        &format!("{BASE}{listener}{}", main(&format!("\"{a}\", \"{b}\""))),
    );
    let mut d = start(&cfg);
    let spread = |n: usize| {
        let mut seen: Vec<String> = (0..n).map(|_| get(p).1).collect();
        seen.sort();
        seen.dedup();
        seen
    };
    assert_eq!(spread(4), ["a", "b"]);
    let before = get_path(p, "/api/x");
    assert!(
        before == (200, "a".into()) || before == (200, "b".into()),
        "{before:?}"
    );

    // b leaves main; a new route sends /api to c.
    let api = format!("[ingress.web.routes.api]\npath = \"/api\"\nbackends = [\"{c}\"]\n");
    dir.write(
        "ippool.toml",
        &format!("{BASE}{listener}{}{api}", main(&format!("\"{a}\""))),
    );
    let (status, v) = reload(&d);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        list(&v, "started"),
        Vec::<String>::new(),
        "the listener stays: {v}"
    );
    assert_eq!(list(&v, "stopped"), Vec::<String>::new(), "{v}");
    assert_eq!(list(&v, "restart_required"), Vec::<String>::new(), "{v}");
    assert_eq!(
        list(&v, "routes"),
        ["ingress.web.routes.api", "ingress.web.routes.main"],
        "{v}"
    );
    assert_eq!(spread(4), ["a"], "b drained out of main");
    assert_eq!(get_path(p, "/api/x"), (200, "c".into()));
    eventually("b leaves the table once drained", || {
        let r = http(d.admin, "GET", "/api/routes", &[], "");
        !r.body.contains(&b.to_string())
    });

    // The route removed again: /api goes back to main.
    dir.write(
        "ippool.toml",
        &format!("{BASE}{listener}{}", main(&format!("\"{a}\""))),
    );
    let (status, v) = reload(&d);
    assert_eq!(status, 200, "{v}");
    assert_eq!(list(&v, "routes"), ["ingress.web.routes.api"], "{v}");
    eventually("the api route goes", || {
        get_path(p, "/api/x") == (200, "a".into())
    });
    // Nothing changed: nothing reported.
    let (status, v) = reload(&d);
    assert_eq!(status, 200, "{v}");
    assert_eq!(list(&v, "routes"), Vec::<String>::new(), "{v}");
    assert!(d.terminate().success());
}

#[test]
fn an_invalid_file_or_a_missing_pool_changes_nothing() {
    let a = backend("a");
    let [p1, p2] = free_addrs(4);
    let dir = TempDir::new();
    let first = format!("{BASE}{}", ingress("web", p1, a));
    let cfg = dir.write("ippool.toml", &first);
    let mut d = start(&cfg);

    // Invalid: the web section removed, a new one added, and a bad key.
    dir.write(
        "ippool.toml",
        &format!(
            "{BASE}{}\n[ingress.new.routes.other]\nnonsense = 1\n",
            ingress("new", p2, a)
        ),
    );
    let (status, v) = reload(&d);
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("nonsense"), "{v}");
    assert_eq!(get(p1), (200, "a".into()), "the running listener stays");
    assert!(refused(p2), "nothing new was started");

    // Valid, but the new egress listener leaves from a pool that does not
    // run yet (pools start only at start-up).
    dir.write(
        "ippool.toml",
        &format!(
            "{BASE}[pools.later]\nsource = \"127.0.21.0/29\"\n{}",
            egress("out", p2, "").replace("pool = \"lo\"", "pool = \"later\"")
        ),
    );
    let (status, v) = reload(&d);
    assert_eq!(status, 400, "{v}");
    let why = v.to_string();
    assert!(
        why.contains("egress.out.pool") && why.contains("later"),
        "{why}"
    );
    assert_eq!(get(p1), (200, "a".into()), "ingress.web not stopped");
    assert!(refused(p2));
    assert!(d.terminate().success());
}

#[test]
fn a_busy_port_refuses_the_reload_naming_the_section_and_address() {
    let a = backend("a");
    let holder = TcpListener::bind(SocketAddr::from(([127, 0, 30, 5], 0))).expect("bind");
    let [p1, p3] = free_addrs(5);
    let busy = holder.local_addr().expect("addr");
    let dir = TempDir::new();
    let cfg = dir.write("ippool.toml", &format!("{BASE}{}", ingress("web", p1, a)));
    let mut d = start(&cfg);

    // web removed, one new section on a free port, one on the busy port.
    let next = format!(
        "{BASE}{}{}",
        ingress("free", p3, a),
        ingress("taken", busy, a)
    );
    dir.write("ippool.toml", &next);
    let (status, v) = reload(&d);
    assert_eq!(status, 400, "{v}");
    let why = v.to_string();
    assert!(
        why.contains("ingress.taken.listen") && why.contains(&busy.to_string()),
        "{why}"
    );
    assert_eq!(get(p1), (200, "a".into()), "ingress.web still serves");
    assert!(refused(p3), "ingress.free was not left running");

    // Once the port is free, the same file applies.
    drop(holder);
    let (status, v) = reload(&d);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        list(&v, "started"),
        ["ingress.free", "ingress.taken"],
        "{v}"
    );
    assert_eq!(list(&v, "stopped"), ["ingress.web"], "{v}");
    assert_eq!(get(busy), (200, "a".into()));
    assert_eq!(get(p3), (200, "a".into()));
    eventually("ingress.web's port refuses", || refused(p1));
    assert!(d.terminate().success());
}

#[test]
fn l4_balancers_stop_live_but_start_only_at_restart() {
    let echo = echo_server();
    let [p1, p2] = free_addrs(6);
    let dir = TempDir::new();
    let l4 = |name: &str, port: SocketAddr| {
        format!("\n[l4.{name}]\nlisten = \"{port}\"\nupstreams = [\"{echo}\"]\n")
    };
    let cfg = dir.write("ippool.toml", &format!("{BASE}{}", l4("tcp", p1)));
    let mut d = start(&cfg);
    let mut open = TcpStream::connect(p1).expect("connect");
    open.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    assert!(echoes(&mut open, "hello\n"));

    dir.write("ippool.toml", &format!("{BASE}{}", l4("other", p2)));
    let (status, v) = reload(&d);
    assert_eq!(status, 200, "{v}");
    assert_eq!(list(&v, "stopped"), ["l4.tcp"], "{v}");
    assert_eq!(list(&v, "restart_required"), ["l4.other"], "{v}");
    assert_eq!(list(&v, "started"), Vec::<String>::new(), "{v}");
    eventually("the removed balancer's port refuses", || refused(p1));
    assert!(refused(p2), "an added balancer waits for a restart");
    assert!(echoes(&mut open, "still\n"), "the open connection was cut");
    drop(open);
    assert!(d.terminate().success());
}

#[test]
fn sighup_adds_and_removes_listeners_and_shutdown_drains_them() {
    let echo = echo_server();
    let a = backend("a");
    let [p1, p2] = free_addrs(7);
    let dir = TempDir::new();
    let web = ingress("web", p1, a);
    let cfg = dir.write("ippool.toml", &format!("{BASE}{web}"));
    let mut d = start(&cfg);
    let pid = d.child.id().to_string();
    let hup = || {
        let st = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill -HUP");
        assert!(st.success());
    };

    // Added by SIGHUP: an egress listener that drains for 2 s at most.
    dir.write(
        "ippool.toml",
        &format!(
            "{BASE}{web}{}",
            egress("out", p2, "drain_timeout = \"2s\"\n")
        ),
    );
    hup();
    eventually("SIGHUP started egress.out", || !refused(p2));
    let mut open = tunnel(p2, echo);
    assert!(echoes(&mut open, "through\n"));

    // Removed by SIGHUP.
    dir.write(
        "ippool.toml",
        &format!("{BASE}{}", egress("out", p2, "drain_timeout = \"2s\"\n")),
    );
    hup();
    eventually("SIGHUP stopped ingress.web", || refused(p1));
    assert!(echoes(&mut open, "still\n"));

    // Shutdown waits for the listener started at reload: its tunnel works
    // while it drains, and is cut at its drain_timeout.
    let t0 = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    eventually("the listener stops accepting", || refused(p2));
    assert!(echoes(&mut open, "draining\n"), "cut before its drain");
    assert!(d.terminate().success());
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "{took:?}"
    );
}
