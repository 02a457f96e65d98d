//! Attributing records to pool addresses, counting malformed lines, and
//! summarising whole files.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use crate::format::{LogFormat, ParseError};
use crate::record::Record;
use crate::time::Timestamp;

/// Where a record's pool address comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressSource {
    /// Each `$upstream_addr` item is an attempt against that address, with
    /// the matching `$upstream_status` / `$upstream_response_time` item.
    /// Items that are not `ip:port` (unix sockets, group names) are skipped.
    UpstreamAddr,
    /// `$server_addr`: the address the request arrived on (one `server`
    /// block per pool address, each listening on its own IP).
    ServerAddr,
    /// `$server_port` looked up in a port → address map, as built by
    /// [`NginxConfig::port_map`](crate::NginxConfig::port_map) from
    /// `server { listen PORT; proxy_bind ADDR; }` blocks. Ports not in the
    /// map are not attributed.
    ServerPort(HashMap<u16, IpAddr>),
}

/// What one request says about one pool address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The pool address.
    pub addr: IpAddr,
    /// The status for this address: the attempt's `$upstream_status` for
    /// [`AddressSource::UpstreamAddr`], else [`Record::effective_status`].
    pub status: Option<u16>,
    /// `$upstream_response_time` of the attempt for
    /// [`AddressSource::UpstreamAddr`], else `$request_time`.
    pub time: Option<Duration>,
}

impl Record<'_> {
    /// The pool addresses this request used, with their outcome: one per
    /// upstream attempt for [`AddressSource::UpstreamAddr`], at most one for
    /// the other sources. Empty when the record names no pool address.
    pub fn outcomes(&self, source: &AddressSource) -> Result<Vec<Outcome>, ParseError> {
        let mut out = Vec::new();
        match source {
            AddressSource::UpstreamAddr => {
                for attempt in self.attempts() {
                    let a = attempt?;
                    if let Some(sa) = a.socket_addr() {
                        out.push(Outcome {
                            addr: sa.ip(),
                            status: a.status,
                            time: a.response_time,
                        });
                    }
                }
            }
            AddressSource::ServerAddr => {
                if let Some(addr) = self.server_addr()? {
                    out.push(self.single(addr)?);
                }
            }
            AddressSource::ServerPort(map) => {
                if let Some(addr) = self.server_port()?.and_then(|p| map.get(&p)) {
                    out.push(self.single(*addr)?);
                }
            }
        }
        Ok(out)
    }

    fn single(&self, addr: IpAddr) -> Result<Outcome, ParseError> {
        Ok(Outcome {
            addr,
            status: self.effective_status()?,
            time: self.request_time()?,
        })
    }
}

/// Counts malformed lines and keeps the first few (bounded) for the caller
/// to log. Malformed lines are never fatal.
#[derive(Clone, Debug)]
pub struct Malformed {
    count: u64,
    max_samples: usize,
    samples: Vec<MalformedSample>,
}

/// A malformed line kept by [`Malformed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MalformedSample {
    /// The line, cut to at most [`Malformed::MAX_SAMPLE_LEN`] bytes.
    pub line: String,
    /// Why it did not parse.
    pub error: ParseError,
}

impl Default for Malformed {
    fn default() -> Self {
        Self::with_max_samples(Self::DEFAULT_SAMPLES)
    }
}

impl Malformed {
    /// Samples kept by [`Malformed::default`].
    pub const DEFAULT_SAMPLES: usize = 8;
    /// Longest line text kept in a sample, in bytes.
    pub const MAX_SAMPLE_LEN: usize = 512;

    /// A counter that keeps at most `max_samples` samples.
    pub fn with_max_samples(max_samples: usize) -> Self {
        Self {
            count: 0,
            max_samples,
            samples: Vec::new(),
        }
    }

    /// Counts one malformed line. Returns `true` when it was kept as a sample
    /// (a hint for the caller to log it now).
    pub fn record(&mut self, line: &str, error: ParseError) -> bool {
        self.count += 1;
        if self.samples.len() >= self.max_samples {
            return false;
        }
        let mut cut = line.len().min(Self::MAX_SAMPLE_LEN);
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        self.samples.push(MalformedSample {
            line: line[..cut].to_string(),
            error,
        });
        true
    }

    /// Malformed lines counted so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The samples kept so far.
    pub fn samples(&self) -> &[MalformedSample] {
        &self.samples
    }

    /// Takes the samples out; sampling starts again (so a daemon that logs
    /// and takes them every interval logs at most `max_samples` per interval).
    pub fn take_samples(&mut self) -> Vec<MalformedSample> {
        std::mem::take(&mut self.samples)
    }
}

/// Per-address totals of a [`Summary`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressStats {
    /// Outcomes attributed to the address.
    pub requests: u64,
    /// Outcomes by status class: index 1–5 for 1xx–5xx, 0 for no status
    /// (or a status outside 100–599).
    pub by_class: [u64; 6],
    /// Sum of the outcomes' times.
    pub total_time: Duration,
    /// Earliest request time seen.
    pub first_seen: Option<Timestamp>,
    /// Latest request time seen.
    pub last_seen: Option<Timestamp>,
}

impl AddressStats {
    /// Outcomes with a 5xx status.
    pub fn failures(&self) -> u64 {
        self.by_class[5]
    }

    fn add(&mut self, o: &Outcome, time: Option<Timestamp>) {
        self.requests += 1;
        let class = o.status.map_or(0, |s| usize::from(s / 100));
        self.by_class[if (1..=5).contains(&class) { class } else { 0 }] += 1;
        self.total_time = self.total_time.saturating_add(o.time.unwrap_or_default());
        if let Some(t) = time {
            if self.first_seen.is_none_or(|f| t < f) {
                self.first_seen = Some(t);
            }
            if self.last_seen.is_none_or(|l| t > l) {
                self.last_seen = Some(t);
            }
        }
    }
}

/// Totals over many lines, per pool address: what `ippool logscan` prints.
///
/// A line that does not parse, or whose values do not have their types, is
/// counted in [`malformed`](Self::malformed) and otherwise ignored.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Lines seen.
    pub lines: u64,
    /// Lines that parsed and were attributed to at least one address.
    pub attributed: u64,
    /// Lines that parsed but named no pool address (`$upstream_addr` is `-`,
    /// an unmapped port, …).
    pub unattributed: u64,
    /// Totals per pool address.
    pub addresses: HashMap<IpAddr, AddressStats>,
    /// Malformed lines.
    pub malformed: Malformed,
}

impl Summary {
    /// Parses and adds one line (without its newline).
    pub fn add_line(&mut self, format: &LogFormat, source: &AddressSource, line: &str) {
        self.lines += 1;
        let result = format
            .parse(line)
            .and_then(|r| Ok((r.outcomes(source)?, r.time()?)));
        match result {
            Ok((outcomes, time)) => {
                if outcomes.is_empty() {
                    self.unattributed += 1;
                } else {
                    self.attributed += 1;
                }
                for o in &outcomes {
                    self.addresses.entry(o.addr).or_default().add(o, time);
                }
            }
            Err(e) => {
                self.malformed.record(line, e);
            }
        }
    }
}

/// Reads a whole log (lines that are not UTF-8 are decoded lossily) and
/// summarises it per pool address.
pub fn scan_reader(
    reader: impl BufRead,
    format: &LogFormat,
    source: &AddressSource,
) -> io::Result<Summary> {
    let mut summary = Summary::default();
    let mut reader = reader;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        let bytes = buf.strip_suffix(b"\n").unwrap_or(&buf);
        summary.add_line(format, source, &String::from_utf8_lossy(bytes));
    }
    Ok(summary)
}

/// [`scan_reader`] on a file.
pub fn scan_file(
    path: impl AsRef<Path>,
    format: &LogFormat,
    source: &AddressSource,
) -> io::Result<Summary> {
    let file = File::open(path)?;
    scan_reader(BufReader::with_capacity(1 << 16, file), format, source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_is_bounded() {
        let mut m = Malformed::with_max_samples(2);
        let e = ParseError::TrailingData { offset: 1 };
        assert!(m.record("a", e.clone()));
        assert!(m.record(&"é".repeat(600), e.clone()));
        assert!(!m.record("c", e.clone()));
        assert_eq!(m.count(), 3);
        assert_eq!(m.samples()[1].line.len(), 512);
        assert_eq!(m.take_samples().len(), 2);
        assert!(m.record("d", e));
    }

    #[test]
    fn summary_per_upstream_attempt() {
        let f = LogFormat::new(
            "[$time_iso8601] $status $upstream_addr $upstream_status $upstream_response_time",
        )
        .unwrap();
        let text = "\
[2024-01-01T00:00:00+00:00] 200 10.0.0.1:80, 10.0.0.2:80 502, 200 0.001, 0.002
[2024-01-01T00:00:01+00:00] 502 10.0.0.1:80 502 0.003
[2024-01-01T00:00:02+00:00] 200 - - -
[2024-01-01T00:00:03+00:00] 200 10.0.0.2:80 abc 0.003
garbage
";
        let s = scan_reader(text.as_bytes(), &f, &AddressSource::UpstreamAddr).unwrap();
        assert_eq!((s.lines, s.attributed, s.unattributed), (5, 2, 1));
        assert_eq!(s.malformed.count(), 2);
        let a = &s.addresses[&"10.0.0.1".parse::<IpAddr>().unwrap()];
        assert_eq!((a.requests, a.failures()), (2, 2));
        assert_eq!(a.total_time, Duration::from_millis(4));
        assert_eq!(a.first_seen.unwrap().unix_seconds(), 1_704_067_200);
        assert_eq!(a.last_seen.unwrap().unix_seconds(), 1_704_067_201);
        let b = &s.addresses[&"10.0.0.2".parse::<IpAddr>().unwrap()];
        assert_eq!((b.requests, b.by_class[2]), (1, 1));
    }
}
