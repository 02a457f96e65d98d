//! Parser properties: round trips through nginx-style rendering, and no
//! panics on arbitrary formats and lines.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use accesslog::{AddressSource, Escape, LogFormat, ParseError};
use common::nginx_escape;
use proptest::prelude::*;

const UPSTREAM_FIELDS: &str =
    " $upstream_addr $upstream_status $request_time $upstream_response_time";

fn combined_upstream() -> LogFormat {
    LogFormat::new(&format!("{}{UPSTREAM_FIELDS}", LogFormat::COMBINED)).unwrap()
}

#[derive(Debug, Clone)]
struct Line {
    remote_addr: IpAddr,
    remote_user: String,
    time_local: String,
    request: String,
    status: u16,
    bytes: u64,
    referer: String,
    user_agent: String,
    xff: String,
    /// (addr, status, response time ms) per attempt, with the separator
    /// before each but the first.
    upstreams: Vec<(String, u16, u32, &'static str)>,
    request_time_ms: u32,
}

impl Line {
    fn combined(&self) -> String {
        format!(
            "{} - {} [{}] \"{}\" {} {} \"{}\" \"{}\"",
            self.remote_addr,
            nginx_escape(&self.remote_user),
            self.time_local,
            nginx_escape(&self.request),
            self.status,
            self.bytes,
            nginx_escape(&self.referer),
            nginx_escape(&self.user_agent),
        )
    }

    fn main(&self) -> String {
        format!("{} \"{}\"", self.combined(), nginx_escape(&self.xff))
    }

    fn list(&self, f: impl Fn(&(String, u16, u32, &'static str)) -> String) -> String {
        if self.upstreams.is_empty() {
            return "-".into();
        }
        let mut s = String::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            if i > 0 {
                s.push_str(u.3);
            }
            s.push_str(&f(u));
        }
        s
    }

    fn with_upstream(&self) -> String {
        format!(
            "{} {} {} {}.{:03} {}",
            self.combined(),
            self.list(|u| u.0.clone()),
            self.list(|u| u.1.to_string()),
            self.request_time_ms / 1000,
            self.request_time_ms % 1000,
            self.list(|u| format!("{}.{:03}", u.2 / 1000, u.2 % 1000)),
        )
    }
}

fn text() -> impl Strategy<Value = String> {
    // Printable ASCII, quotes, backslashes, control bytes and non-ASCII.
    prop::collection::vec(
        prop_oneof![
            4 => prop::char::range(' ', '~'),
            1 => prop::sample::select(vec!['"', '\\', '\t', '\u{1}', 'é', '€', '😀', '-']),
        ],
        0..40,
    )
    .prop_map(|v| v.into_iter().collect())
    // nginx writes an empty value and a lone "-" the same way.
    .prop_filter("not a lone dash", |s: &String| s != "-")
}

fn user() -> impl Strategy<Value = String> {
    // $remote_user is followed by " [": a user name containing that sequence
    // is ambiguous (documented); everything else must survive.
    text().prop_filter("no ' ['", |s: &String| !s.contains(" ["))
}

fn time_local() -> impl Strategy<Value = String> {
    (
        1..=28u32,
        0..12usize,
        1970..2100u32,
        0..24u32,
        0..60u32,
        0..60u32,
        any::<bool>(),
        0..14u32,
    )
        .prop_map(|(d, m, y, h, mi, s, neg, oh)| {
            const M: [&str; 12] = [
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
            ];
            let sign = if neg { '-' } else { '+' };
            format!("{d:02}/{}/{y}:{h:02}:{mi:02}:{s:02} {sign}{oh:02}00", M[m])
        })
}

fn upstream_addr() -> impl Strategy<Value = String> {
    prop_oneof![
        (any::<[u8; 4]>(), 1..65535u16)
            .prop_map(|(ip, p)| format!("{}:{p}", std::net::Ipv4Addr::from(ip))),
        (any::<[u16; 8]>(), 1..65535u16)
            .prop_map(|(ip, p)| format!("[{}]:{p}", std::net::Ipv6Addr::from(ip))),
        Just("unix:/run/app.sock".to_string()),
        Just("backend_group".to_string()),
    ]
}

fn line() -> impl Strategy<Value = Line> {
    let attempt = (
        upstream_addr(),
        100..600u16,
        0..100_000u32,
        prop::sample::select(vec![", ", " : "]),
    );
    (
        (
            any::<[u8; 4]>(),
            user(),
            time_local(),
            text(),
            100..600u16,
            any::<u64>(),
        ),
        (
            text(),
            text(),
            text(),
            prop::collection::vec(attempt, 0..4),
            0..100_000u32,
        ),
    )
        .prop_map(
            |(
                (ip, remote_user, time_local, request, status, bytes),
                (referer, user_agent, xff, upstreams, request_time_ms),
            )| Line {
                remote_addr: IpAddr::from(ip),
                remote_user,
                time_local,
                request,
                status,
                bytes,
                referer,
                user_agent,
                xff,
                upstreams,
                request_time_ms,
            },
        )
}

fn decoded(r: &accesslog::Record<'_>, name: &str) -> String {
    r.decoded(name).map(|c| c.into_owned()).unwrap_or_default()
}

fn check_combined(r: &accesslog::Record<'_>, l: &Line) {
    assert_eq!(r.remote_addr(), Ok(Some(l.remote_addr)));
    assert_eq!(decoded(r, "remote_user"), l.remote_user);
    assert_eq!(r.raw("time_local"), Some(l.time_local.as_str()));
    assert!(r.time().unwrap().is_some());
    assert_eq!(decoded(r, "request"), l.request);
    assert_eq!(r.status(), Ok(Some(l.status)));
    assert_eq!(r.body_bytes_sent(), Ok(Some(l.bytes)));
    assert_eq!(decoded(r, "http_referer"), l.referer);
    assert_eq!(decoded(r, "$http_user_agent"), l.user_agent);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn combined_round_trip(l in line()) {
        let f = LogFormat::combined();
        let text = l.combined();
        let r = f.parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        check_combined(&r, &l);
    }

    #[test]
    fn main_round_trip(l in line()) {
        let f = LogFormat::main();
        let text = l.main();
        let r = f.parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        check_combined(&r, &l);
        prop_assert_eq!(decoded(&r, "http_x_forwarded_for"), l.xff.clone());
    }

    #[test]
    fn upstream_lists_round_trip(l in line()) {
        let f = combined_upstream();
        let text = l.with_upstream();
        let r = f.parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        check_combined(&r, &l);
        prop_assert_eq!(r.request_time(), Ok(Some(Duration::from_millis(l.request_time_ms.into()))));
        let attempts: Vec<_> = r.attempts().collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(attempts.len(), l.upstreams.len());
        for (a, u) in attempts.iter().zip(&l.upstreams) {
            prop_assert_eq!(a.addr, u.0.as_str());
            prop_assert_eq!(a.status, Some(u.1));
            prop_assert_eq!(a.response_time, Some(Duration::from_millis(u.2.into())));
            prop_assert_eq!(a.socket_addr(), u.0.parse().ok());
        }
        prop_assert_eq!(r.last_upstream_addr(), l.upstreams.last().and_then(|u| u.0.parse().ok()));
        let expected_status = l.upstreams.last().map_or(l.status, |u| u.1);
        prop_assert_eq!(r.effective_status(), Ok(Some(expected_status)));
        let outcomes = r.outcomes(&AddressSource::UpstreamAddr).unwrap();
        let ips = l.upstreams.iter().filter(|u| u.0.parse::<std::net::SocketAddr>().is_ok()).count();
        prop_assert_eq!(outcomes.len(), ips);
    }

    /// Any format built from known and unknown variables and literals parses
    /// the lines rendered from it, when values avoid the literal bytes.
    #[test]
    fn generated_formats_round_trip(
        prefix in "[ |\\[\\]\"#=]{0,3}",
        parts in prop::collection::vec(
            (prop::sample::select(vec![
                "status", "remote_user", "time_local", "upstream_addr",
                "upstream_status", "http_x_y", "request", "a1", "msec",
            ]), "[ |\\[\\]\"#=]{1,3}", "[a-z0-9./_-]{0,12}", prop::collection::vec("[a-z0-9./_-]{1,8}", 1..4), any::<bool>()),
            1..6,
        ),
        last_suffix_empty in any::<bool>(),
    ) {
        let mut seen = std::collections::HashSet::new();
        let parts: Vec<_> = parts.into_iter().filter(|p| seen.insert(p.0)).collect();
        let mut fmt = prefix.clone();
        let mut line = prefix.clone();
        let mut expected = Vec::new();
        let n = parts.len();
        for (i, (name, lit, value, items, braced)) in parts.iter().enumerate() {
            let lit = if i + 1 == n && last_suffix_empty { "" } else { lit.as_str() };
            if *braced { fmt.push_str(&format!("${{{name}}}{lit}")) } else { fmt.push_str(&format!("${name}{lit}")) }
            let value = match *name {
                "time_local" => "10/Oct/2000:13:55:36 -0700".to_string(),
                "upstream_addr" | "upstream_status" => items.join(", "),
                _ => value.clone(),
            };
            line.push_str(&value);
            line.push_str(lit);
            expected.push((*name, value));
        }
        let f = LogFormat::with_escape(&fmt, Escape::None).unwrap();
        let r = f.parse(&line).unwrap_or_else(|e| panic!("{e}: format {fmt:?} line {line:?}"));
        for (name, value) in expected {
            prop_assert_eq!(r.raw(name), Some(value.as_str()), "format {:?} line {:?}", fmt, line);
        }
    }

    /// Arbitrary format strings compile or fail with a position inside them.
    #[test]
    fn arbitrary_formats_never_panic(fmt in "(\\PC|[$ {}\"\\[\\]_a-z])*", line in "\\PC*") {
        match LogFormat::new(&fmt) {
            Ok(f) => exercise(&f, &line),
            Err(e) => {
                let pos = match e {
                    accesslog::FormatError::InvalidVariableName { position }
                    | accesslog::FormatError::UnclosedBrace { position }
                    | accesslog::FormatError::AdjacentVariables { position, .. } => position,
                };
                prop_assert!(pos < fmt.len());
                prop_assert_eq!(fmt.as_bytes()[pos], b'$');
            }
        }
    }

    /// Arbitrary lines, and lines close to valid ones, never panic.
    #[test]
    fn arbitrary_lines_never_panic(
        l in line(),
        junk in "\\PC{0,40}",
        cut in any::<prop::sample::Index>(),
        splice in any::<prop::sample::Index>(),
    ) {
        let good = l.with_upstream();
        let mut mutated = good.clone();
        let mut at = cut.index(good.len() + 1);
        while !good.is_char_boundary(at) { at -= 1; }
        mutated.truncate(at);
        let mut at2 = splice.index(good.len() + 1);
        while !good.is_char_boundary(at2) { at2 -= 1; }
        let spliced = format!("{}{junk}{}", &good[..at2], &good[at2..]);
        for f in [LogFormat::combined(), LogFormat::main(), combined_upstream(),
                  LogFormat::new("$time_iso8601 $status $upstream_addr").unwrap(),
                  LogFormat::with_escape("$upstream_status|$msec|$server_port $server_addr", Escape::Json).unwrap()] {
            for text in [good.as_str(), mutated.as_str(), spliced.as_str(), junk.as_str()] {
                exercise(&f, text);
            }
        }
    }
}

/// Calls everything on a record; errors are fine, panics are not.
fn exercise(f: &LogFormat, line: &str) {
    match f.parse(line) {
        Ok(r) => {
            let _ = (
                r.status(),
                r.body_bytes_sent(),
                r.request_time(),
                r.remote_addr(),
            );
            let _ = (
                r.server_addr(),
                r.server_port(),
                r.time(),
                r.effective_status(),
            );
            let _ = r.attempts().count();
            let _ = r.last_upstream_addr();
            for (name, _) in r.fields() {
                let _ = (r.decoded(name), r.list(name).count());
            }
            let map = [(80u16, IpAddr::from([127, 0, 0, 1]))].into();
            for s in [
                AddressSource::UpstreamAddr,
                AddressSource::ServerAddr,
                AddressSource::ServerPort(map),
            ] {
                let _ = r.outcomes(&s);
            }
            let _ = format!("{r:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

#[test]
fn tricky_combined_line() {
    let line = r#"2001:db8::1 - - [01/Jan/2024:00:00:00 +0000] "GET /q?a=\x22b\x22 HTTP/1.1" 200 0 "-" "Mozilla/5.0 (X11; Linux x86_64) \x22quoted\x22 \x5Cslash""#;
    let f = LogFormat::combined();
    let r = f.parse(line).unwrap();
    assert_eq!(r.remote_addr(), Ok(Some("2001:db8::1".parse().unwrap())));
    assert_eq!(r.value("remote_user"), None);
    assert_eq!(r.raw("remote_user"), Some("-"));
    assert_eq!(r.value("http_referer"), None);
    assert_eq!(r.decoded("request").unwrap(), r#"GET /q?a="b" HTTP/1.1"#);
    assert_eq!(
        r.decoded("http_user_agent").unwrap(),
        r#"Mozilla/5.0 (X11; Linux x86_64) "quoted" \slash"#
    );
    assert_eq!(r.time().unwrap().unwrap().unix_seconds(), 1_704_067_200);
    assert_eq!(r.value("http_not_in_format"), None);
    assert_eq!(r.upstream_addrs().count(), 0);
}

#[test]
fn multi_upstream_line() {
    let f = combined_upstream();
    let line = concat!(
        r#"10.1.1.1 - bob [01/Jan/2024:00:00:00 +0000] "GET / HTTP/1.1" 200 5 "-" "ua" "#,
        "10.0.0.1:80, 10.0.0.2:80 : 10.0.0.3:80 502, - : 200 1.5 0.100, - : 0.250"
    );
    let r = f.parse(line).unwrap();
    assert_eq!(
        r.upstream_addrs().collect::<Vec<_>>(),
        ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
    );
    assert_eq!(
        r.upstream_statuses().collect::<Vec<_>>(),
        ["502", "-", "200"]
    );
    let a: Vec<_> = r.attempts().map(Result::unwrap).collect();
    assert_eq!(a[1].status, None);
    assert_eq!(a[1].response_time, None);
    assert_eq!(a[2].response_time, Some(Duration::from_millis(250)));
    assert_eq!(r.request_time(), Ok(Some(Duration::from_millis(1500))));
    assert_eq!(r.last_upstream_addr(), Some("10.0.0.3:80".parse().unwrap()));
}

#[test]
fn typed_errors_name_variable_and_offset() {
    let f = LogFormat::new("$status $upstream_status $request_time").unwrap();
    let r = f.parse("2x0 200, abc 0.1").unwrap();
    assert_eq!(
        r.status(),
        Err(ParseError::InvalidValue {
            var: "status".into(),
            offset: 0,
            expected: "an HTTP status"
        })
    );
    assert_eq!(
        r.effective_status(),
        Err(ParseError::InvalidValue {
            var: "upstream_status".into(),
            offset: 9,
            expected: "an HTTP status"
        })
    );
    let e = r.outcomes(&AddressSource::ServerAddr).unwrap();
    assert!(e.is_empty());
    let err = f.parse("200").unwrap_err();
    assert_eq!(
        err.to_string(),
        "`$status` starting at byte 0: delimiter \" \" not found"
    );
}

#[test]
fn json_escaped_format() {
    let f =
        LogFormat::with_escape(r#"{"ua":"$http_user_agent","s":$status}"#, Escape::Json).unwrap();
    let r = f.parse(r#"{"ua":"a \"b\" \\ c\u0007","s":404}"#).unwrap();
    assert_eq!(r.decoded("http_user_agent").unwrap(), "a \"b\" \\ c\u{7}");
    assert_eq!(r.status(), Ok(Some(404)));
}

#[test]
fn many_variables_spill_to_heap() {
    let names: Vec<String> = (0..40).map(|i| format!("$v{i}")).collect();
    let f = LogFormat::new(&names.join(" ")).unwrap();
    let values: Vec<String> = (0..40).map(|i| format!("x{i}")).collect();
    let line = values.join(" ");
    let r = f.parse(&line).unwrap();
    assert_eq!(r.value("v39"), Some("x39"));
    assert_eq!(r.fields().count(), 40);
}
