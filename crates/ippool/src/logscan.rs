//! `ippool logscan`: read a whole access log and print what it says about
//! each pool address, as a table or JSON.
//!
//! "Failures" are what the daemon's health tracking would count against the
//! address: statuses in `--blocked-statuses` (403 and 429 by default, like
//! `[monitor.<name>.health] blocked_statuses`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use accesslog::{AddressSource, LogFormat, Malformed};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// `--address`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum AddressArg {
    /// `$upstream_addr`: one outcome per upstream attempt.
    UpstreamAddr,
    /// `$server_addr`: the address the request arrived on.
    ServerAddr,
    /// `$server_port`, mapped through `--nginx-conf`'s `proxy_bind` blocks.
    ServerPort,
}

impl AddressArg {
    fn variable(self) -> &'static str {
        match self {
            AddressArg::UpstreamAddr => "upstream_addr",
            AddressArg::ServerAddr => "server_addr",
            AddressArg::ServerPort => "server_port",
        }
    }
}

/// What `logscan` was asked to do.
#[derive(Debug)]
pub struct Options {
    /// The log file.
    pub file: PathBuf,
    /// `combined`, `main`, a `log_format` string, or a name declared in
    /// `nginx_conf`.
    pub format: String,
    /// Which variable names the pool address.
    pub address: AddressArg,
    /// nginx configuration for named formats and `server_port`.
    pub nginx_conf: Option<PathBuf>,
    /// Statuses that count as failures.
    pub blocked_statuses: Vec<u16>,
    /// Print JSON instead of a table.
    pub json: bool,
}

/// Why `logscan` failed.
#[derive(Debug, thiserror::Error)]
pub enum LogscanError {
    /// A bad argument (exit status 2).
    #[error("{0}")]
    Usage(String),
    /// The log could not be read (exit status 1).
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl LogscanError {
    /// The exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            LogscanError::Usage(_) => 2,
            LogscanError::Io { .. } => 1,
        }
    }
}

/// Totals of one address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Row {
    requests: u64,
    /// By status class; 0 for no status.
    by_class: [u64; 6],
    failures: u64,
    timed: u64,
    total_time: Duration,
}

/// One address in the JSON output.
#[derive(Debug, Serialize)]
struct JsonRow {
    address: IpAddr,
    requests: u64,
    status_2xx: u64,
    status_3xx: u64,
    status_4xx: u64,
    status_5xx: u64,
    other_status: u64,
    failures: u64,
    failure_percent: f64,
    mean_time_ms: Option<f64>,
}

/// The whole JSON output.
#[derive(Debug, Serialize)]
struct JsonReport {
    file: String,
    lines: u64,
    attributed: u64,
    unattributed: u64,
    malformed: u64,
    addresses: Vec<JsonRow>,
}

fn resolve_format(
    opts: &Options,
) -> Result<(LogFormat, Option<accesslog::NginxConfig>), LogscanError> {
    let conf = match &opts.nginx_conf {
        Some(p) => Some(
            accesslog::NginxConfig::from_file(p)
                .map_err(|e| LogscanError::Usage(format!("--nginx-conf: {e}")))?,
        ),
        None => None,
    };
    let f = opts.format.as_str();
    let format = if let Some(lf) = LogFormat::builtin(f) {
        lf
    } else if f.contains('$') {
        LogFormat::new(f).map_err(|e| LogscanError::Usage(format!("--format: {e}")))?
    } else if let Some(decl) = conf.as_ref().and_then(|c| c.log_format(f)) {
        LogFormat::with_escape(&decl.format, decl.escape)
            .map_err(|e| LogscanError::Usage(format!("--format {f}: {e}")))?
    } else {
        return Err(LogscanError::Usage(format!(
            "--format: `{f}` is not `combined`, `main`, a log_format string, or a log_format \
             declared in --nginx-conf"
        )));
    };
    if !format.has_variable(opts.address.variable()) {
        return Err(LogscanError::Usage(format!(
            "--address {}: the format has no ${} (give --format the log_format nginx writes)",
            opts.address.variable(),
            opts.address.variable()
        )));
    }
    Ok((format, conf))
}

/// Runs `logscan`; returns the text for stdout.
pub fn run(opts: &Options) -> Result<String, LogscanError> {
    let (format, conf) = resolve_format(opts)?;
    let source = match opts.address {
        AddressArg::UpstreamAddr => AddressSource::UpstreamAddr,
        AddressArg::ServerAddr => AddressSource::ServerAddr,
        AddressArg::ServerPort => {
            let Some(conf) = conf else {
                return Err(LogscanError::Usage(
                    "--address server_port needs --nginx-conf".into(),
                ));
            };
            let map = conf
                .port_map()
                .map_err(|e| LogscanError::Usage(format!("--nginx-conf: {e}")))?;
            AddressSource::ServerPort(map)
        }
    };
    let classifier = health::Classifier::default()
        .with_blocked_statuses(opts.blocked_statuses.iter().copied())
        .map_err(|e| LogscanError::Usage(format!("--blocked-statuses: {}", e.reason())))?;

    let io_err = |source| LogscanError::Io {
        path: opts.file.clone(),
        source,
    };
    let file = File::open(&opts.file).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    bar.set_style(
        ProgressStyle::with_template("{wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut reader = BufReader::with_capacity(1 << 16, bar.wrap_read(file));

    let mut rows: HashMap<IpAddr, Row> = HashMap::new();
    let (mut lines, mut attributed, mut unattributed) = (0u64, 0u64, 0u64);
    let mut malformed = Malformed::default();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(io_err)? == 0 {
            break;
        }
        lines += 1;
        let bytes = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let line = String::from_utf8_lossy(bytes);
        let parsed = format.parse(&line).and_then(|r| r.outcomes(&source));
        match parsed {
            Ok(outcomes) if outcomes.is_empty() => unattributed += 1,
            Ok(outcomes) => {
                attributed += 1;
                for o in outcomes {
                    let row = rows.entry(o.addr).or_default();
                    row.requests += 1;
                    let class = o.status.map_or(0, |s| usize::from(s / 100));
                    row.by_class[if (1..=5).contains(&class) { class } else { 0 }] += 1;
                    if let Some(s) = o.status
                        && classifier.classify(&health::Outcome::Status(s))
                            == health::Verdict::Failure
                    {
                        row.failures += 1;
                    }
                    if let Some(t) = o.time {
                        row.timed += 1;
                        row.total_time = row.total_time.saturating_add(t);
                    }
                }
            }
            Err(e) => {
                if malformed.record(&line, e.clone()) {
                    eprintln!("warning: line {lines}: malformed ({e}): {line}");
                }
            }
        }
    }
    bar.finish_and_clear();
    if malformed.count() > malformed.samples().len() as u64 {
        eprintln!(
            "warning: {} malformed lines in all (the first {} shown)",
            malformed.count(),
            malformed.samples().len()
        );
    }

    let mut sorted: Vec<(IpAddr, Row)> = rows.into_iter().collect();
    sorted.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(&b.0)));
    let pct = |r: &Row| {
        if r.requests == 0 {
            0.0
        } else {
            r.failures as f64 * 100.0 / r.requests as f64
        }
    };
    let mean_ms =
        |r: &Row| (r.timed > 0).then(|| r.total_time.as_secs_f64() * 1e3 / r.timed as f64);
    if opts.json {
        let report = JsonReport {
            file: opts.file.display().to_string(),
            lines,
            attributed,
            unattributed,
            malformed: malformed.count(),
            addresses: sorted
                .iter()
                .map(|(ip, r)| JsonRow {
                    address: *ip,
                    requests: r.requests,
                    status_2xx: r.by_class[2],
                    status_3xx: r.by_class[3],
                    status_4xx: r.by_class[4],
                    status_5xx: r.by_class[5],
                    other_status: r.by_class[0] + r.by_class[1],
                    failures: r.failures,
                    failure_percent: (pct(r) * 100.0).round() / 100.0,
                    mean_time_ms: mean_ms(r).map(|m| (m * 1000.0).round() / 1000.0),
                })
                .collect(),
        };
        let mut text = serde_json::to_string_pretty(&report)
            .map_err(|e| LogscanError::Usage(format!("cannot render JSON: {e}")))?;
        text.push('\n');
        return Ok(text);
    }
    Ok(table(
        &opts.file,
        &sorted,
        lines,
        attributed,
        unattributed,
        malformed.count(),
        pct,
        mean_ms,
    ))
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site, all plain numbers"
)]
fn table(
    file: &Path,
    rows: &[(IpAddr, Row)],
    lines: u64,
    attributed: u64,
    unattributed: u64,
    malformed: u64,
    pct: impl Fn(&Row) -> f64,
    mean_ms: impl Fn(&Row) -> Option<f64>,
) -> String {
    let header = [
        "ADDRESS", "REQUESTS", "2XX", "3XX", "4XX", "5XX", "FAILURES", "FAIL%", "MEAN_MS",
    ];
    let mut cells: Vec<[String; 9]> = vec![header.map(str::to_owned)];
    for (ip, r) in rows {
        cells.push([
            ip.to_string(),
            r.requests.to_string(),
            r.by_class[2].to_string(),
            r.by_class[3].to_string(),
            r.by_class[4].to_string(),
            r.by_class[5].to_string(),
            r.failures.to_string(),
            format!("{:.1}", pct(r)),
            mean_ms(r).map_or_else(|| "-".to_owned(), |m| format!("{m:.3}")),
        ]);
    }
    let mut widths = [0usize; 9];
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for row in &cells {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i == 0 {
                line.push_str(&format!("{c:<w$}"));
            } else {
                line.push_str(&format!("  {c:>w$}"));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(&format!(
        "# {}: {lines} lines, {attributed} attributed, {unattributed} naming no pool address, \
         {malformed} malformed\n",
        file.display()
    ));
    out
}
