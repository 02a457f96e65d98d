//! Lines per second parsing a generated 1M-line log (`combined` + upstream
//! fields), single-threaded: accesslog's compiled format against a
//! `regex`-crate parser extracting the same twelve fields (ipmanager's
//! approach). Run with `cargo bench -p accesslog --bench parse` or
//! `bench/accesslog.sh`. Set `ACCESSLOG_BENCH_LINES` / `ACCESSLOG_BENCH_REPS`
//! to change the size.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

use accesslog::LogFormat;
use regex::Regex;

const FORMAT_TAIL: &str = " $upstream_addr $upstream_status $request_time $upstream_response_time";

/// The regex a seed-style scanner would use for the same format.
const REGEX: &str = concat!(
    r#"^(\S+) - (\S+) \[([^\]]*)\] "([^"]*)" (\d{3}) (\d+) "([^"]*)" "([^"]*)" "#,
    r#"([^ ,]+(?:(?:, | : )[^ ,]+)*) ([^ ,]+(?:(?:, | : )[^ ,]+)*) ([\d.]+) "#,
    r#"([^ ,]+(?:(?:, | : )[^ ,]+)*)$"#
);

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

fn generate(lines: usize) -> String {
    const PATHS: &[&str] = &[
        "/",
        "/api/v1/items?id=42&sort=desc",
        "/static/app.3f9a1c.js",
        "/login",
        "/search?q=%22nginx%22+log",
        "/images/very/long/path/to/some/resource/photo-000123.jpeg",
    ];
    const METHODS: &[&str] = &["GET", "GET", "GET", "POST", "HEAD", "PUT"];
    const REFERERS: &[&str] = &[
        "-",
        "-",
        "https://example.com/",
        "https://www.example.org/page?x=1",
    ];
    const AGENTS: &[&str] = &[
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
        "curl/8.5.0",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) \\x22quoted\\x22 Mobile/15E148",
        "python-requests/2.31",
        "-",
    ];
    const STATUSES: &[&str] = &["200", "200", "200", "200", "301", "404", "502", "504"];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut out = String::with_capacity(lines * 260);
    for i in 0..lines {
        let secs = i / 1000;
        let _ = write!(
            out,
            "{}.{}.{}.{} - {} [01/Jan/2024:{:02}:{:02}:{:02} +0000] \"{} {} HTTP/1.1\" {} {} \"{}\" \"{}\" ",
            rng.below(223) + 1,
            rng.below(256),
            rng.below(256),
            rng.below(254) + 1,
            if rng.below(10) == 0 { "alice" } else { "-" },
            (secs / 3600) % 24,
            (secs / 60) % 60,
            secs % 60,
            rng.pick(METHODS),
            rng.pick(PATHS),
            rng.pick(STATUSES),
            rng.below(100_000),
            rng.pick(REFERERS),
            rng.pick(AGENTS),
        );
        // 1–3 upstream attempts (a few with an internal redirect), or none.
        let attempts = match rng.below(20) {
            0 => 0,
            1..=3 => 2,
            4 => 3,
            _ => 1,
        };
        if attempts == 0 {
            out.push_str("- - 0.000 -\n");
            continue;
        }
        let mut addrs = String::new();
        let mut statuses = String::new();
        let mut times = String::new();
        for a in 0..attempts {
            let sep = if a == 0 {
                ""
            } else if a == 2 {
                " : "
            } else {
                ", "
            };
            let last = a + 1 == attempts;
            let _ = write!(
                addrs,
                "{sep}10.0.{}.{}:8080",
                rng.below(4),
                rng.below(250) + 1
            );
            let _ = write!(statuses, "{sep}{}", if last { "200" } else { "502" });
            let _ = write!(times, "{sep}0.{:03}", rng.below(1000));
        }
        let _ = writeln!(
            out,
            "{addrs} {statuses} {}.{:03} {times}",
            rng.below(3),
            rng.below(1000)
        );
    }
    out
}

fn for_each_line(text: &str, mut f: impl FnMut(&str)) {
    let mut rest = text;
    while let Some(i) = memchr_newline(rest) {
        f(&rest[..i]);
        rest = &rest[i + 1..];
    }
}

/// The same line splitting for both parsers.
fn memchr_newline(s: &str) -> Option<usize> {
    memchr::memchr(b'\n', s.as_bytes())
}

/// The same work for both parsers: the status as a number and the total
/// length of the twelve fields.
#[inline]
fn digest(status: Option<u16>, lens: usize) -> u64 {
    u64::from(status.unwrap_or(0)) + lens as u64
}

fn run_ours(format: &LogFormat, text: &str) -> (u64, u64) {
    let (mut sum, mut bad) = (0u64, 0u64);
    for_each_line(text, |line| match format.parse(line) {
        Ok(r) => {
            let lens: usize = r.fields().map(|(_, v)| v.len()).sum();
            sum += digest(r.status().ok().flatten(), lens);
        }
        Err(_) => bad += 1,
    });
    (sum, bad)
}

fn run_regex(re: &Regex, text: &str) -> (u64, u64) {
    let (mut sum, mut bad) = (0u64, 0u64);
    let mut locs = re.capture_locations();
    for_each_line(text, |line| {
        if re.captures_read(&mut locs, line).is_some() {
            let mut lens = 0;
            for g in 1..=12 {
                if let Some((s, e)) = locs.get(g) {
                    lens += e - s;
                }
            }
            let status = locs
                .get(5)
                .and_then(|(s, e)| line[s..e].parse::<u16>().ok());
            sum += digest(status, lens);
        } else {
            bad += 1;
        }
    });
    (sum, bad)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let lines = env_usize("ACCESSLOG_BENCH_LINES", 1_000_000);
    let reps = env_usize("ACCESSLOG_BENCH_REPS", 5).max(1);

    // A real file, as the tailer would see it; parsing runs from memory.
    let path = std::env::temp_dir().join(format!("accesslog-bench-{}.log", std::process::id()));
    let t = Instant::now();
    std::fs::write(&path, generate(lines)).expect("write log");
    let text = std::fs::read_to_string(&path).expect("read log");
    let _ = std::fs::remove_file(&path);
    println!(
        "generated {lines} lines ({:.1} MB) in {:.2?}",
        text.len() as f64 / 1e6,
        t.elapsed()
    );

    let format = LogFormat::new(&format!("{}{FORMAT_TAIL}", LogFormat::COMBINED)).expect("format");
    let re = Regex::new(REGEX).expect("regex");

    // Both must agree on every line before anything is timed.
    let ours = run_ours(&format, &text);
    let theirs = run_regex(&re, &text);
    assert_eq!(ours.1, 0, "accesslog rejected lines");
    assert_eq!(theirs.1, 0, "regex rejected lines");
    assert_eq!(ours, theirs, "parsers disagree");

    let (mut t_ours, mut t_regex) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        black_box(run_ours(black_box(&format), black_box(&text)));
        t_ours.push(t.elapsed());
        let t = Instant::now();
        black_box(run_regex(black_box(&re), black_box(&text)));
        t_regex.push(t.elapsed());
    }
    let (m_ours, m_regex) = (median(t_ours), median(t_regex));
    let rate = |d: Duration| lines as f64 / d.as_secs_f64();
    let ratio = m_regex.as_secs_f64() / m_ours.as_secs_f64();

    println!("single thread, {lines} lines, median of {reps} runs");
    println!(
        "{:<22} {:>10} {:>14} {:>9}",
        "parser", "median", "lines/s", "ns/line"
    );
    for (name, d) in [
        ("accesslog (LogFormat)", m_ours),
        ("regex (captures_read)", m_regex),
    ] {
        println!(
            "{:<22} {:>10.3?} {:>14.0} {:>9.1}",
            name,
            d,
            rate(d),
            d.as_nanos() as f64 / lines as f64
        );
    }
    println!("ratio (regex time / accesslog time): {ratio:.2}");
    println!(
        "RESULT name=accesslog lines_per_s={:.0} ratio_vs_regex={ratio:.2}",
        rate(m_ours)
    );
}
