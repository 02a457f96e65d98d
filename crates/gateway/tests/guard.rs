//! Accept-time filtering, kernel socket filters, nftables export, automatic
//! bans and rate limits, on loopback (no root: all of 127.0.0.0/8 is local
//! on Linux, so clients pick their source among 127.0.0.2, .3, …).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use gateway::guard::{
    AutoBlock, AutoBlockOptions, BpfError, BpfLimits, BpfProgram, FilterState, Guard, KernelFilter,
    NftError, NftOptions, Offense, RateLimit, RateLimitOptions, Recorded, RetryAfter, nft_script,
};
use iprules::{Policy, Rule, Shared, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const IO: Duration = Duration::from_secs(5);
/// Long enough for a loopback handshake, far shorter than the first SYN
/// retransmission (1 s).
const SYN_TIMEOUT: Duration = Duration::from_millis(300);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn rule(s: &str) -> Rule {
    s.parse().unwrap()
}

fn shared(deny: &[&str]) -> Arc<Shared<Policy>> {
    let mut p = Policy::default();
    for d in deny {
        p.deny.add(rule(d));
    }
    Arc::new(Shared::new(p))
}

async fn connect_from(src: &str, to: SocketAddr) -> io::Result<TcpStream> {
    let sock = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(ip(src), 0))?;
    sock.connect(to).await
}

/// Serves admitted connections: reads a line, answers with the peer address.
fn serve(guard: Arc<Guard>, listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = guard.accept(&listener).await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let _ = s
                    .write_all(
                        format!("{}:{}", String::from_utf8_lossy(&buf[..n]), peer.ip()).as_bytes(),
                    )
                    .await;
            });
        }
    })
}

/// Sends `hi`, returns the answer.
async fn exchange(src: &str, to: SocketAddr) -> String {
    let mut s = connect_from(src, to).await.expect("connect");
    s.write_all(b"hi").await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(IO, s.read_to_string(&mut out))
        .await
        .expect("answer in time")
        .unwrap();
    out
}

/// Connects (the kernel completes the handshake) and waits for what the
/// server does without sending anything.
async fn refused(src: &str, to: SocketAddr) -> io::ErrorKind {
    // The reset can come before connect() returns, and it then reports it.
    let mut s = match connect_from(src, to).await {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return e.kind(),
        Err(e) => panic!("connect from {src}: {e}"),
    };
    let mut buf = [0u8; 16];
    match tokio::time::timeout(IO, s.read(&mut buf))
        .await
        .expect("closed in time")
    {
        Ok(0) => io::ErrorKind::UnexpectedEof,
        Ok(n) => panic!("{n} bytes from a refused connection"),
        Err(e) => e.kind(),
    }
}

#[tokio::test]
async fn denied_peer_is_reset_unread_and_counted_allowed_peer_served() {
    let guard = Arc::new(Guard::new(shared(&["127.0.0.2"])));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = serve(guard.clone(), listener);

    // SO_LINGER 0: an RST, not a FIN (a FIN would read as end of stream).
    assert_eq!(
        refused("127.0.0.2", addr).await,
        io::ErrorKind::ConnectionReset
    );
    assert_eq!(exchange("127.0.0.3", addr).await, "hi:127.0.0.3");
    let m = guard.metrics();
    assert_eq!(
        (m.accepted_total, m.denied_total, m.rate_limited_total),
        (1, 1, 0)
    );
    server.abort();
}

#[tokio::test]
async fn policy_changed_at_run_time_applies_to_the_next_accept() {
    let guard = Arc::new(Guard::new(shared(&[])));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = serve(guard.clone(), listener);

    assert_eq!(exchange("127.0.0.3", addr).await, "hi:127.0.0.3");
    guard.policy().update(|p| p.deny.add(rule("127.0.0.0/29")));
    assert_eq!(
        refused("127.0.0.3", addr).await,
        io::ErrorKind::ConnectionReset
    );
    assert_eq!(exchange("127.0.0.9", addr).await, "hi:127.0.0.9");
    // An allow entry punches a hole in the deny rule.
    guard.policy().update(|p| p.allow.add(rule("127.0.0.3")));
    assert_eq!(exchange("127.0.0.3", addr).await, "hi:127.0.0.3");
    assert_eq!(
        refused("127.0.0.4", addr).await,
        io::ErrorKind::ConnectionReset
    );
    // A ban that has run out lets the client back in at once.
    guard.policy().update(|p| {
        p.deny.add_until(
            rule("127.0.0.10"),
            Instant::now() + Duration::from_millis(200),
        )
    });
    assert_eq!(
        refused("127.0.0.10", addr).await,
        io::ErrorKind::ConnectionReset
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(exchange("127.0.0.10", addr).await, "hi:127.0.0.10");
    let m = guard.metrics();
    assert_eq!((m.accepted_total, m.denied_total), (4, 3));
    server.abort();
}

#[tokio::test]
async fn dual_stack_listener_matches_mapped_peers_against_ipv4_rules() {
    let guard = Arc::new(Guard::new(shared(&["127.0.0.2"])));
    let listener = TcpListener::bind("[::]:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = serve(guard.clone(), listener);
    assert_eq!(
        refused("127.0.0.2", addr).await,
        io::ErrorKind::ConnectionReset
    );
    // The server sees the peer as IPv4-mapped IPv6.
    assert_eq!(exchange("127.0.0.3", addr).await, "hi:::ffff:127.0.0.3");
    assert_eq!(guard.metrics().denied_total, 1);
    server.abort();
}

#[tokio::test]
async fn rate_limited_connections_are_reset_and_feed_autoblock() {
    let policy = shared(&[]);
    let rate = Arc::new(RateLimit::new(RateLimitOptions {
        rate: 0.2,
        burst: 2,
        ..Default::default()
    }));
    let ab = Arc::new(AutoBlock::new(
        policy.clone(),
        AutoBlockOptions {
            threshold: 2,
            ..Default::default()
        },
    ));
    let guard = Arc::new(
        Guard::new(policy.clone())
            .with_rate_limit(rate)
            .with_autoblock(ab.clone()),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = serve(guard.clone(), listener);

    assert_eq!(exchange("127.0.0.4", addr).await, "hi:127.0.0.4");
    assert_eq!(exchange("127.0.0.4", addr).await, "hi:127.0.0.4");
    assert_eq!(
        refused("127.0.0.4", addr).await,
        io::ErrorKind::ConnectionReset
    ); // offense 1
    assert!(ab.bans(Instant::now()).is_empty());
    assert_eq!(
        refused("127.0.0.4", addr).await,
        io::ErrorKind::ConnectionReset
    ); // offense 2: ban
    let bans = ab.bans(Instant::now());
    assert_eq!(bans.len(), 1);
    assert_eq!(bans[0].rule, rule("127.0.0.4"));
    assert_eq!(bans[0].offense, Some(Offense::RateExceeded));
    assert_eq!(
        refused("127.0.0.4", addr).await,
        io::ErrorKind::ConnectionReset
    ); // the ban
    assert_eq!(exchange("127.0.0.5", addr).await, "hi:127.0.0.5");
    let m = guard.metrics();
    assert_eq!(
        (m.accepted_total, m.rate_limited_total, m.denied_total),
        (3, 2, 1)
    );
    server.abort();
}

// --- kernel socket filter ------------------------------------------------

#[test]
fn bpf_program_agrees_with_the_policy_on_crafted_packets() {
    let now = Instant::now();
    let mut p = Policy::default();
    for r in [
        "10.0.0.0/8",
        "192.0.2.10-192.0.2.20",
        "198.51.100.7",
        "2001:db8::/32",
        "::ffff:203.0.113.0/120",
    ] {
        p.deny.add(rule(r));
    }
    p.allow.add(rule("10.1.2.3"));
    p.allow.add(rule("2001:db8:5::/48"));
    let prog = BpfProgram::compile(&p, now, &BpfLimits::default()).unwrap();
    // 10/8 split by the hole, the range, the address, 203.0.113/24 (IPv4);
    // 2001:db8::/32 split by the hole (IPv6).
    assert_eq!(prog.ranges(), 7);
    assert_eq!(prog.next_change(), None);
    let cases = [
        ("10.0.0.0", false),
        ("10.1.2.2", false),
        ("10.1.2.3", true),
        ("10.1.2.4", false),
        ("10.255.255.255", false),
        ("11.0.0.0", true),
        ("9.255.255.255", true),
        ("192.0.2.9", true),
        ("192.0.2.10", false),
        ("192.0.2.20", false),
        ("192.0.2.21", true),
        ("198.51.100.7", false),
        ("198.51.100.8", true),
        ("203.0.113.200", false), // written as IPv4-mapped, arrives as IPv4
        ("::ffff:10.9.9.9", false),
        ("2001:db8::1", false),
        ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", false),
        ("2001:db8:5::1", true),
        ("2001:db8:4:ffff:ffff:ffff:ffff:ffff", false),
        ("2001:db8:6::", false),
        ("2001:db9::", true),
        ("2001:db7:ffff::1", true),
        ("::1", true),
    ];
    for (addr, allowed) in cases {
        assert_eq!(prog.evaluate(ip(addr)), allowed, "{addr}");
        assert_eq!(
            p.decide_at(ip(addr), now).is_allowed(),
            allowed,
            "policy on {addr}"
        );
    }

    // Default deny: only the allow set gets in.
    let mut only = Policy::new(Verdict::Deny);
    only.allow.add(rule("192.0.2.0/24"));
    only.allow.add(rule("2001:db8::/64"));
    let prog = BpfProgram::compile(&only, now, &BpfLimits::default()).unwrap();
    assert!(prog.evaluate(ip("192.0.2.77")));
    assert!(!prog.evaluate(ip("192.0.3.0")));
    assert!(prog.evaluate(ip("2001:db8::77")));
    assert!(!prog.evaluate(ip("2001:db8:0:1::")));
    assert!(!prog.evaluate(ip("::")));

    // Nothing denied: one instruction that keeps everything.
    let prog = BpfProgram::compile(&Policy::default(), now, &BpfLimits::default()).unwrap();
    assert!(prog.is_empty());
    assert_eq!(prog.instructions().len(), 1);
}

#[test]
fn bpf_expiring_entries_are_compiled_with_their_deadline() {
    let now = Instant::now();
    let mut p = Policy::default();
    p.deny.add(rule("10.0.0.0/8"));
    p.deny
        .add_until(rule("192.0.2.1"), now + Duration::from_secs(30));
    p.allow
        .add_until(rule("10.0.0.1"), now + Duration::from_secs(10));
    let prog = BpfProgram::compile(&p, now, &BpfLimits::default()).unwrap();
    assert_eq!(prog.next_change(), Some(now + Duration::from_secs(10)));
    assert!(!prog.evaluate(ip("192.0.2.1")));
    assert!(prog.evaluate(ip("10.0.0.1")));
    // Compiled after both ran out: the ban and the hole are gone.
    let later =
        BpfProgram::compile(&p, now + Duration::from_secs(30), &BpfLimits::default()).unwrap();
    assert_eq!(later.next_change(), None);
    assert!(later.evaluate(ip("192.0.2.1")));
    assert!(!later.evaluate(ip("10.0.0.1")));
}

#[test]
fn bpf_refuses_policies_too_large_for_a_socket_filter() {
    let mut p = Policy::default();
    for i in 0..600u32 {
        // Every other address: 600 ranges that do not merge.
        p.deny
            .add(Rule::address(IpAddr::V4((0x0a00_0000 + 2 * i).into())));
    }
    let now = Instant::now();
    match BpfProgram::compile(&p, now, &BpfLimits::default()) {
        Err(BpfError::TooManyRanges {
            ranges: 600,
            max: 512,
        }) => {}
        other => panic!("{other:?}"),
    }
    let limits = BpfLimits {
        max_ranges: 1000,
        max_instructions: 1000,
    };
    match BpfProgram::compile(&p, now, &limits) {
        Err(BpfError::TooLong {
            ranges: 600,
            instructions,
            max: 1000,
        }) => assert!(instructions > 1000),
        other => panic!("{other:?}"),
    }
    let fits = BpfProgram::compile(
        &p,
        now,
        &BpfLimits {
            max_ranges: 1000,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(fits.instructions().len() <= gateway::guard::BPF_MAXINSNS);
    assert!(!fits.evaluate(ip("10.0.0.2")) && fits.evaluate(ip("10.0.0.3")));
}

async fn syn_answered(src: &str, to: SocketAddr) -> bool {
    match tokio::time::timeout(SYN_TIMEOUT, connect_from(src, to)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => panic!("connect from {src}: {e}"),
        Err(_) => false,
    }
}

#[tokio::test]
async fn bpf_filter_on_a_loopback_listener_drops_syns_from_denied_sources() {
    let policy = shared(&["127.0.0.2"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let filter = KernelFilter::new(policy.clone());
    let report = filter.refresh(&listener, Instant::now()).unwrap();
    assert!(
        matches!(report.state, FilterState::Attached { ranges: 1, .. }),
        "{report:?}"
    );

    let t = Instant::now();
    assert!(
        !syn_answered("127.0.0.2", addr).await,
        "the SYN is dropped: no SYN-ACK, no RST"
    );
    assert!(t.elapsed() >= SYN_TIMEOUT);
    assert!(syn_answered("127.0.0.3", addr).await);

    // Regenerated for a new policy: the other way round.
    policy.update(|p| {
        p.deny.clear();
        p.deny.add(rule("127.0.0.3"));
    });
    filter.refresh(&listener, Instant::now()).unwrap();
    assert!(!syn_answered("127.0.0.3", addr).await);
    assert!(syn_answered("127.0.0.2", addr).await);

    // Nothing denied: the filter is detached.
    policy.update(|p| p.deny.clear());
    let report = filter.refresh(&listener, Instant::now()).unwrap();
    assert_eq!(report.state, FilterState::Empty);
    assert!(syn_answered("127.0.0.3", addr).await);

    // Too large: detached too, so no stale program keeps dropping.
    policy.update(|p| {
        p.deny.add(rule("127.0.0.3"));
        for i in 0..600u32 {
            p.deny
                .add(Rule::address(IpAddr::V4((0x0a00_0000 + 2 * i).into())));
        }
    });
    let report = filter.refresh(&listener, Instant::now()).unwrap();
    assert_eq!(report.state, FilterState::TooBig { ranges: 601 });
    assert!(
        syn_answered("127.0.0.3", addr).await,
        "accept-time filtering alone now"
    );
}

#[tokio::test]
async fn kernel_filter_watch_follows_changes_and_lifts_bans_at_their_end() {
    let policy = shared(&[]);
    let listener = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let addr = listener.local_addr().unwrap();
    let filter = KernelFilter::new(policy.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watch = {
        let listener = listener.clone();
        tokio::spawn(async move {
            filter
                .watch(&*listener, Duration::from_millis(50), async {
                    let _ = stopped.await;
                })
                .await;
        })
    };
    let ban_end = Instant::now() + Duration::from_millis(900);
    policy.update(|p| p.deny.add_until(rule("127.0.0.2"), ban_end));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !syn_answered("127.0.0.2", addr).await,
        "banned in the kernel"
    );
    assert!(syn_answered("127.0.0.3", addr).await);
    assert!(
        Instant::now() < ban_end,
        "the test checked before the ban ended"
    );
    // The watcher recompiles at the ban's end, not at its next poll only.
    tokio::time::sleep_until((ban_end + Duration::from_millis(20)).into()).await;
    assert!(
        syn_answered("127.0.0.2", addr).await,
        "the ban ended in the kernel too"
    );

    policy.update(|p| p.deny.add(rule("127.0.0.3")));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!syn_answered("127.0.0.3", addr).await);
    let _ = stop.send(());
    tokio::time::timeout(IO, watch)
        .await
        .expect("watch stops")
        .unwrap();
}

// --- nftables ----------------------------------------------------------------

#[test]
fn nft_script_has_the_deny_and_allow_sets_and_the_chain() {
    let now = Instant::now();
    let mut p = Policy::default();
    for r in [
        "10.0.0.0/8",
        "10.0.0.5",
        "192.0.2.10-192.0.2.20",
        "192.0.2.21",
        "::ffff:198.51.100.0/120",
        "2001:db8::/32",
    ] {
        p.deny.add(rule(r));
    }
    p.deny
        .add_until(rule("203.0.113.9"), now + Duration::from_millis(90_500));
    p.allow.add(rule("10.1.2.3"));
    let script = nft_script(&p, now, &NftOptions::default()).unwrap();
    let expected = "\
# ippool IP rules as an nftables table. Load with `nft -f FILE`:
# the table is replaced atomically.
add table inet ippool
delete table inet ippool
table inet ippool {
\tset allow_v4 { type ipv4_addr; flags interval; elements = { 10.1.2.3 } }
\tset allow_v6 { type ipv6_addr; flags interval; }
\tset deny_v4 { type ipv4_addr; flags interval, timeout; elements = { 10.0.0.0/8, 192.0.2.10-192.0.2.21, 198.51.100.0/24, 203.0.113.9 timeout 91s } }
\tset deny_v6 { type ipv6_addr; flags interval; elements = { 2001:db8::/32 } }
\tchain input {
\t\ttype filter hook input priority 0; policy accept;
\t\tip saddr @allow_v4 accept
\t\tip6 saddr @allow_v6 accept
\t\tip saddr @deny_v4 drop
\t\tip6 saddr @deny_v6 drop
\t}
}
";
    assert_eq!(script, expected);
    nft_check(&script);

    // Default deny needs ports; with them, only those ports are closed.
    let mut only = Policy::new(Verdict::Deny);
    only.allow.add(rule("192.0.2.0/24"));
    assert_eq!(
        nft_script(&only, now, &NftOptions::default()),
        Err(NftError::DefaultDenyNeedsPorts)
    );
    let opts = NftOptions {
        table: "edge".into(),
        ports: vec![80, 443],
    };
    let script = nft_script(&only, now, &opts).unwrap();
    assert!(script.contains("table inet edge {"), "{script}");
    assert!(
        script.contains("\t\ttcp dport { 80, 443 } ip saddr @allow_v4 accept\n"),
        "{script}"
    );
    assert!(
        script.contains("\t\ttcp dport { 80, 443 } drop\n"),
        "{script}"
    );
    assert!(!script.contains("@deny_v4"), "{script}");
    nft_check(&script);
    let bad = NftOptions {
        table: "x; flush ruleset".into(),
        ports: vec![],
    };
    assert!(matches!(
        nft_script(&p, now, &bad),
        Err(NftError::BadTable(_))
    ));
}

/// `nft -c -f` when nft is installed (it is not on every CI machine).
fn nft_check(script: &str) {
    use std::io::Write;
    let child = std::process::Command::new("nft")
        .args(["-c", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        eprintln!("nft not installed: script not validated");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft -c: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// --- automatic bans ------------------------------------------------------------

fn autoblock(opts: AutoBlockOptions) -> (Arc<Shared<Policy>>, AutoBlock) {
    let policy = shared(&[]);
    (policy.clone(), AutoBlock::new(policy, opts))
}

fn denied(policy: &Shared<Policy>, addr: &str, at: Instant) -> bool {
    !policy.read(|p| p.decide_at(ip(addr), at).is_allowed())
}

#[test]
fn autoblock_fires_at_exactly_the_threshold_and_ends_with_the_ban() {
    let (policy, ab) = autoblock(AutoBlockOptions {
        threshold: 3,
        ..Default::default()
    });
    let t = Instant::now();
    assert_eq!(ab.record(ip("192.0.2.1"), Offense::AuthFailed, t), None);
    assert_eq!(
        ab.record(
            ip("192.0.2.1"),
            Offense::Malformed,
            t + Duration::from_secs(1)
        ),
        None
    );
    assert!(!denied(&policy, "192.0.2.1", t + Duration::from_secs(2)));
    let at = t + Duration::from_secs(2);
    let ban = ab
        .record(ip("192.0.2.1"), Offense::ClientError4xx, at)
        .expect("third offense bans");
    assert_eq!(ban.rule, rule("192.0.2.1"));
    assert_eq!(ban.duration, Duration::from_secs(600));
    assert_eq!(ban.until, at + Duration::from_secs(600));
    assert_eq!((ban.times, ban.offense), (1, Some(Offense::ClientError4xx)));
    assert!(denied(&policy, "192.0.2.1", at));
    assert!(denied(&policy, "::ffff:192.0.2.1", at), "mapped peers too");
    assert!(denied(
        &policy,
        "192.0.2.1",
        ban.until - Duration::from_nanos(1)
    ));
    assert!(
        !denied(&policy, "192.0.2.1", ban.until),
        "lifted the instant it ends"
    );
    assert!(!denied(&policy, "192.0.2.2", at));
    assert_eq!(ab.bans(at), vec![ban]);
    // Offenses of a banned client are not counted.
    assert_eq!(ab.record(ip("192.0.2.1"), Offense::AuthFailed, at), None);
    assert_eq!(ab.tracked(), 0);
    assert_eq!(ab.bans(ban.until), vec![]);
}

#[test]
fn autoblock_tells_counted_from_not_counted_and_bans_on_a_count_kept_elsewhere() {
    let mut ignore = iprules::RuleSet::new();
    ignore.add(rule("192.0.2.99"));
    let (policy, ab) = autoblock(AutoBlockOptions {
        threshold: 3,
        ban: Duration::from_secs(10),
        ignore,
        ..Default::default()
    });
    let t = Instant::now();
    assert_eq!(
        ab.count(ip("2001:db8:7:7::1"), Offense::AuthFailed, t),
        Recorded::Counted(rule("2001:db8:7:7::/64")),
        "counted against the client's key"
    );
    assert_eq!(
        ab.count(ip("192.0.2.99"), Offense::AuthFailed, t),
        Recorded::NotCounted,
        "ignored"
    );
    // A count kept elsewhere (a fleet's) reached the threshold: banned now,
    // whatever the count here (1 of 3).
    let ban = ab
        .ban(rule("2001:db8:7:7::/64"), Offense::AuthFailed, t)
        .expect("banned");
    assert_eq!((ban.times, ban.duration), (1, Duration::from_secs(10)));
    assert_eq!(ban.offense, Some(Offense::AuthFailed));
    assert!(denied(&policy, "2001:db8:7:7::2", t));
    assert_eq!(ab.tracked(), 0, "its pending offenses are spent");
    assert_eq!(
        ab.ban(rule("2001:db8:7:7::/64"), Offense::AuthFailed, t),
        None
    );
    assert_eq!(
        ab.count(ip("2001:db8:7:7::1"), Offense::AuthFailed, t),
        Recorded::NotCounted,
        "banned: not counted"
    );
    // Back after its ban: a second one, twice as long, as for any repeat
    // offender.
    let later = ban.until + Duration::from_secs(1);
    let again = ab
        .ban(rule("2001:db8:7:7::/64"), Offense::Malformed, later)
        .expect("banned again");
    assert_eq!((again.times, again.duration), (2, Duration::from_secs(20)));
    // The third local offense still bans here on its own.
    for n in 0..2 {
        assert!(
            matches!(
                ab.count(ip("192.0.2.5"), Offense::Malformed, t),
                Recorded::Counted(_)
            ),
            "offense {n}"
        );
    }
    assert!(matches!(
        ab.count(ip("192.0.2.5"), Offense::Malformed, t),
        Recorded::Banned(b) if b.rule == rule("192.0.2.5")
    ));
}

#[test]
fn a_guard_feeds_counted_offenses_only() {
    let (_, ab) = autoblock(AutoBlockOptions {
        threshold: 2,
        ..Default::default()
    });
    let fed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let bans = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (f, b) = (fed.clone(), bans.clone());
    let guard = Guard::new(ab.policy().clone())
        .with_autoblock(Arc::new(ab))
        .with_ban_hook(Arc::new(move |ban| b.lock().unwrap().push(ban.rule)))
        .with_offense_feed(Arc::new(move |key, o| f.lock().unwrap().push((key, o))));
    assert_eq!(guard.offense(ip("192.0.2.7"), Offense::AuthFailed), None);
    assert!(guard.offense(ip("192.0.2.7"), Offense::Malformed).is_some());
    assert_eq!(guard.offense(ip("192.0.2.7"), Offense::Malformed), None);
    assert_eq!(
        *fed.lock().unwrap(),
        vec![(rule("192.0.2.7"), Offense::AuthFailed)],
        "the banning offense and those of a banned client are not fed"
    );
    assert_eq!(*bans.lock().unwrap(), vec![rule("192.0.2.7")]);
}

#[test]
fn autoblock_window_slides() {
    let (_, ab) = autoblock(AutoBlockOptions {
        threshold: 3,
        window: Duration::from_secs(60),
        ..Default::default()
    });
    let t = Instant::now();
    let s = |n| t + Duration::from_secs(n);
    assert_eq!(ab.record(ip("192.0.2.1"), Offense::AuthFailed, s(0)), None);
    assert_eq!(ab.record(ip("192.0.2.1"), Offense::AuthFailed, s(30)), None);
    // The first offense is exactly one window old: out.
    assert_eq!(ab.record(ip("192.0.2.1"), Offense::AuthFailed, s(60)), None);
    assert!(
        ab.record(ip("192.0.2.1"), Offense::AuthFailed, s(61))
            .is_some()
    );
}

#[test]
fn autoblock_escalates_repeat_offenders_up_to_max_ban() {
    let (policy, ab) = autoblock(AutoBlockOptions {
        threshold: 2,
        ban: Duration::from_secs(10),
        ban_increment: 3.0,
        max_ban: Duration::from_secs(60),
        ..Default::default()
    });
    let mut t = Instant::now();
    let mut lengths = Vec::new();
    for _ in 0..4 {
        assert_eq!(ab.record(ip("198.51.100.9"), Offense::AuthFailed, t), None);
        let ban = ab
            .record(ip("198.51.100.9"), Offense::AuthFailed, t)
            .unwrap();
        lengths.push((ban.duration.as_secs(), ban.times));
        assert!(denied(
            &policy,
            "198.51.100.9",
            ban.until - Duration::from_millis(1)
        ));
        t = ban.until; // comes back the moment the ban ends
        assert!(!denied(&policy, "198.51.100.9", t));
    }
    assert_eq!(lengths, [(10, 1), (30, 2), (60, 3), (60, 4)]);
    // A day after the last ban, the count is forgotten.
    let t = t + Duration::from_secs(86_400);
    ab.record(ip("198.51.100.9"), Offense::AuthFailed, t);
    assert_eq!(
        ab.record(ip("198.51.100.9"), Offense::AuthFailed, t)
            .unwrap()
            .duration,
        Duration::from_secs(10)
    );
}

#[test]
fn autoblock_ignores_listed_addresses() {
    let mut ignore = iprules::RuleSet::new();
    ignore.add(rule("10.0.0.0/8"));
    ignore.add(rule("2001:db8:ff::/48"));
    let (policy, ab) = autoblock(AutoBlockOptions {
        threshold: 1,
        ignore,
        ..Default::default()
    });
    let t = Instant::now();
    assert_eq!(ab.record(ip("10.1.1.1"), Offense::AuthFailed, t), None);
    assert_eq!(
        ab.record(ip("::ffff:10.1.1.1"), Offense::AuthFailed, t),
        None
    );
    assert_eq!(
        ab.record(ip("2001:db8:ff::1"), Offense::AuthFailed, t),
        None
    );
    assert_eq!(ab.tracked(), 0);
    assert!(!denied(&policy, "10.1.1.1", t));
    assert!(
        ab.record(ip("11.1.1.1"), Offense::AuthFailed, t).is_some(),
        "threshold 1 bans the others at once"
    );
}

#[test]
fn autoblock_counts_an_ipv6_slash_64_as_one_client() {
    let (policy, ab) = autoblock(AutoBlockOptions {
        threshold: 2,
        ..Default::default()
    });
    let t = Instant::now();
    assert_eq!(
        ab.record(ip("2001:db8:1:2::1"), Offense::AuthFailed, t),
        None
    );
    assert_eq!(
        ab.record(ip("2001:db8:1:3::1"), Offense::AuthFailed, t),
        None,
        "another /64"
    );
    let ban = ab
        .record(
            ip("2001:db8:1:2:ffff:ffff:ffff:fffe"),
            Offense::AuthFailed,
            t,
        )
        .unwrap();
    assert_eq!(ban.rule, rule("2001:db8:1:2::/64"));
    assert!(denied(&policy, "2001:db8:1:2:abcd::1", t));
    assert!(!denied(&policy, "2001:db8:1:3::1", t));

    let (policy, ab) = autoblock(AutoBlockOptions {
        threshold: 2,
        ipv6_prefix: 48,
        ..Default::default()
    });
    ab.record(ip("2001:db8:1:2::1"), Offense::AuthFailed, t);
    assert_eq!(
        ab.record(ip("2001:db8:1:3::1"), Offense::AuthFailed, t)
            .unwrap()
            .rule,
        rule("2001:db8:1::/48")
    );
    assert!(denied(&policy, "2001:db8:1:ffff::1", t));
}

#[test]
fn autoblock_lift_export_import_and_operator_entries() {
    let (policy, ab) = autoblock(AutoBlockOptions {
        threshold: 1,
        ..Default::default()
    });
    let t = Instant::now();
    let ban = ab.record(ip("192.0.2.7"), Offense::AuthFailed, t).unwrap();
    assert!(ab.lift(&ban.rule, t));
    assert!(!ab.lift(&ban.rule, t));
    assert!(!denied(&policy, "192.0.2.7", t));
    assert!(ab.bans(t).is_empty());
    // Lifting keeps the count: the next ban is longer.
    assert_eq!(
        ab.record(ip("192.0.2.7"), Offense::AuthFailed, t)
            .unwrap()
            .times,
        2
    );

    // Export, then import into a fresh policy 100 s later (a restart).
    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    ab.record(
        ip("2001:db8::1"),
        Offense::RegistrationAuthFailed,
        t + Duration::from_secs(5),
    );
    let saved = ab.export(t + Duration::from_secs(10), wall);
    // Soonest to end first.
    assert_eq!(saved.len(), 2);
    assert_eq!(saved[0].rule, rule("2001:db8::/64"));
    assert_eq!(saved[0].until, wall + Duration::from_secs(595));
    assert_eq!(saved[0].times, 1);
    assert_eq!(saved[1].rule, rule("192.0.2.7"));
    assert_eq!(saved[1].until, wall + Duration::from_secs(1190));
    assert_eq!(saved[1].times, 2);

    let (policy2, ab2) = autoblock(AutoBlockOptions {
        threshold: 1,
        ..Default::default()
    });
    let t2 = Instant::now() + Duration::from_secs(3600);
    let restored = ab2.import(&saved, t2, wall + Duration::from_secs(100));
    assert_eq!(restored, 2);
    let bans = ab2.bans(t2);
    assert_eq!(bans.len(), 2);
    assert_eq!(bans[0].rule, rule("2001:db8::/64"));
    assert_eq!(bans[0].until, t2 + Duration::from_secs(495));
    assert_eq!(bans[0].offense, None);
    assert!(denied(&policy2, "2001:db8::99", t2));
    assert!(!denied(
        &policy2,
        "2001:db8::99",
        t2 + Duration::from_secs(495)
    ));
    // The count came along: the next ban of 192.0.2.7 is its third.
    assert!(ab2.lift(&rule("192.0.2.7"), t2));
    assert_eq!(
        ab2.record(ip("192.0.2.7"), Offense::AuthFailed, t2)
            .unwrap()
            .times,
        3
    );
    // Records already over are skipped.
    assert_eq!(ab2.import(&saved, t2, wall + Duration::from_secs(5000)), 0);

    // An entry the operator put in the deny set stays permanent.
    policy.update(|p| p.deny.add(rule("203.0.113.5")));
    let ban = ab.record(ip("203.0.113.5"), Offense::Malformed, t).unwrap();
    assert!(ab.lift(&ban.rule, t));
    assert!(denied(
        &policy,
        "203.0.113.5",
        ban.until + Duration::from_secs(3600)
    ));
}

#[test]
fn autoblock_memory_is_bounded() {
    let (policy, ab) = autoblock(AutoBlockOptions {
        threshold: 3,
        max_tracked: 100,
        ..Default::default()
    });
    let t = Instant::now();
    for i in 0..1000u32 {
        assert_eq!(
            ab.record(IpAddr::V4((0x0a00_0000 + i).into()), Offense::AuthFailed, t),
            None
        );
    }
    assert_eq!(ab.tracked(), 100);
    // The most recent ones are remembered: two more offenses ban 10.0.3.231.
    ab.record(ip("10.0.3.231"), Offense::AuthFailed, t);
    assert!(
        ab.record(ip("10.0.3.231"), Offense::AuthFailed, t)
            .is_some()
    );
    // The oldest were forgotten: two more are not enough for 10.0.0.0.
    ab.record(ip("10.0.0.0"), Offense::AuthFailed, t);
    assert_eq!(ab.record(ip("10.0.0.0"), Offense::AuthFailed, t), None);

    // Active bans are capped as well; the one ending soonest goes first.
    let (policy2, ab) = autoblock(AutoBlockOptions {
        threshold: 1,
        max_tracked: 10,
        ..Default::default()
    });
    for i in 0..20u64 {
        ab.record(
            IpAddr::V4((0x0a00_0000 + i as u32).into()),
            Offense::AuthFailed,
            t + Duration::from_secs(i),
        );
    }
    let now = t + Duration::from_secs(20);
    assert_eq!(ab.bans(now).len(), 10);
    assert!(!denied(&policy2, "10.0.0.0", now));
    assert!(denied(&policy2, "10.0.0.19", now));
    assert_eq!(policy2.read(|p| p.deny.len_at(now)), 10);
    drop(policy);
}

// --- rate limits ------------------------------------------------------------------

#[test]
fn rate_limit_allows_the_burst_then_asks_to_retry_after_one_token() {
    let rl = RateLimit::new(RateLimitOptions {
        rate: 4.0,
        burst: 3,
        ..Default::default()
    });
    let t = Instant::now();
    for _ in 0..3 {
        assert_eq!(rl.check(ip("192.0.2.1"), t), Ok(()));
    }
    assert_eq!(
        rl.check(ip("192.0.2.1"), t),
        Err(RetryAfter(Duration::from_millis(250)))
    );
    assert_eq!(
        rl.check(ip("192.0.2.2"), t),
        Ok(()),
        "another client has its own bucket"
    );
    let Err(RetryAfter(wait)) = rl.check(ip("192.0.2.1"), t + Duration::from_millis(100)) else {
        panic!("still empty");
    };
    assert!(
        wait.abs_diff(Duration::from_millis(150)) < Duration::from_micros(1),
        "{wait:?}"
    );
    assert_eq!(
        rl.check(ip("192.0.2.1"), t + Duration::from_millis(250)),
        Ok(())
    );
    assert!(
        rl.check(ip("192.0.2.1"), t + Duration::from_millis(250))
            .is_err()
    );
    // Idle for the whole refill time: a full burst again.
    let later = t + Duration::from_secs(2);
    for _ in 0..3 {
        assert_eq!(rl.check(ip("192.0.2.1"), later), Ok(()));
    }
    assert!(rl.check(ip("192.0.2.1"), later).is_err());
}

#[test]
fn rate_limit_shares_a_bucket_per_slash_64_and_forgets_idle_clients() {
    let rl = RateLimit::new(RateLimitOptions {
        rate: 1.0,
        burst: 2,
        max_tracked: 50,
        ..Default::default()
    });
    let t = Instant::now();
    assert!(rl.check(ip("2001:db8:0:1::1"), t).is_ok());
    assert!(rl.check(ip("2001:db8:0:1::2"), t).is_ok());
    assert!(
        rl.check(ip("2001:db8:0:1:ffff::3"), t).is_err(),
        "same /64, same bucket"
    );
    assert!(rl.check(ip("2001:db8:0:2::1"), t).is_ok());
    for i in 0..1000u32 {
        let _ = rl.check(IpAddr::V4((0x0a00_0000 + i).into()), t);
    }
    assert_eq!(rl.tracked(), 50);
    // Two seconds refill a burst of 2 at 1/s: every bucket is idle and goes.
    assert!(
        rl.check(ip("192.0.2.1"), t + Duration::from_secs(2))
            .is_ok()
    );
    assert_eq!(rl.tracked(), 1);
}
