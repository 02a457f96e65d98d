//! The borrowed record a parsed line yields, and its typed accessors.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::escape;
use crate::format::{Known, LogFormat, ParseError};
use crate::time::Timestamp;

const INLINE: usize = 24;

/// Where each value ends; a value starts where the literal before it ends.
/// Inline for formats of up to 24 variables.
#[derive(Clone)]
pub(crate) enum Spans {
    Inline([u32; INLINE]),
    Heap(Vec<u32>),
}

impl Spans {
    #[inline]
    pub(crate) fn with_len(n: usize) -> Self {
        if n <= INLINE {
            Self::Inline([0; INLINE])
        } else {
            Self::Heap(vec![0; n])
        }
    }

    /// The value ends, to be filled in (positions are below 2^32: the
    /// caller rejects longer lines).
    #[inline]
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u32] {
        match self {
            Self::Inline(a) => a,
            Self::Heap(v) => v,
        }
    }

    #[inline]
    fn end(&self, i: usize) -> usize {
        (match self {
            Self::Inline(a) => a[i],
            Self::Heap(v) => v[i],
        }) as usize
    }
}

/// One parsed log line: string slices into the line, nothing copied.
///
/// Values come in three flavours:
/// * [`raw`](Self::raw): exactly the text nginx wrote;
/// * [`value`](Self::value): the same, but `None` for nginx's "no value"
///   (`-` or empty);
/// * [`decoded`](Self::decoded): with the format's escaping undone (`\x22` →
///   `"`), borrowed when there is nothing to undo.
///
/// Typed accessors return `Ok(None)` when the format lacks the variable or
/// the value is `-`, and [`ParseError::InvalidValue`] (naming the variable and
/// its byte offset) when the text is not of the expected type.
#[derive(Clone)]
pub struct Record<'a> {
    line: &'a str,
    format: &'a LogFormat,
    spans: Spans,
}

impl fmt::Debug for Record<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.fields()).finish()
    }
}

impl<'a> Record<'a> {
    pub(crate) fn new(line: &'a str, format: &'a LogFormat, spans: Spans) -> Self {
        Self {
            line,
            format,
            spans,
        }
    }

    /// The whole line.
    pub fn line(&self) -> &'a str {
        self.line
    }

    /// The format the line was parsed with.
    pub fn format(&self) -> &'a LogFormat {
        self.format
    }

    #[inline]
    fn at(&self, i: usize) -> (usize, &'a str) {
        let end = self.spans.end(i);
        let start = match i.checked_sub(1) {
            None => self.format.prefix_len(),
            Some(p) => self.spans.end(p) + self.format.fields()[p].suffix.len(),
        };
        // Spans always fall on char boundaries (they border ASCII or a
        // literal taken from the format); `get` keeps this panic-free anyway.
        (start, self.line.get(start..end).unwrap_or(""))
    }

    /// The exact text of a variable (`name` with or without `$`), or `None`
    /// if the format does not contain it. The first occurrence wins.
    pub fn raw(&self, name: &str) -> Option<&'a str> {
        self.format.index_of(name).map(|i| self.at(i).1)
    }

    /// Like [`raw`](Self::raw), but `None` also for `-` and empty values.
    pub fn value(&self, name: &str) -> Option<&'a str> {
        self.raw(name).filter(|v| !is_empty(v))
    }

    /// Like [`value`](Self::value), with the format's escaping undone.
    pub fn decoded(&self, name: &str) -> Option<Cow<'a, str>> {
        self.value(name)
            .map(|v| escape::decode(v, self.format.escape()))
    }

    /// All (variable name, raw text) pairs in format order.
    pub fn fields(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        let fields = self.format.fields();
        fields
            .iter()
            .enumerate()
            .map(move |(i, f)| (&*f.name, self.at(i).1))
    }

    /// Field index, start offset and non-empty value of a well-known variable.
    #[inline]
    fn known(&self, k: Known) -> Option<(usize, usize, &'a str)> {
        let i = self.format.known_index(k)?;
        let (start, v) = self.at(i);
        (!is_empty(v)).then_some((i, start, v))
    }

    fn typed<T>(
        &self,
        k: Known,
        expected: &'static str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, ParseError> {
        let Some((i, start, v)) = self.known(k) else {
            return Ok(None);
        };
        match parse(v) {
            Some(t) => Ok(Some(t)),
            None => Err(self.invalid(i, start, expected)),
        }
    }

    fn invalid(&self, field: usize, offset: usize, expected: &'static str) -> ParseError {
        ParseError::InvalidValue {
            var: self.format.fields()[field].name.to_string(),
            offset,
            expected,
        }
    }

    /// `$status`.
    pub fn status(&self) -> Result<Option<u16>, ParseError> {
        self.typed(Known::Status, "an HTTP status", parse_status)
    }

    /// `$body_bytes_sent`.
    pub fn body_bytes_sent(&self) -> Result<Option<u64>, ParseError> {
        self.typed(Known::BodyBytesSent, "a byte count", parse_u64)
    }

    /// `$request_time` (nginx writes seconds with millisecond resolution).
    pub fn request_time(&self) -> Result<Option<Duration>, ParseError> {
        self.typed(Known::RequestTime, "seconds", parse_seconds)
    }

    /// `$remote_addr`.
    pub fn remote_addr(&self) -> Result<Option<IpAddr>, ParseError> {
        self.typed(Known::RemoteAddr, "an IP address", |v| v.parse().ok())
    }

    /// `$server_addr`.
    pub fn server_addr(&self) -> Result<Option<IpAddr>, ParseError> {
        self.typed(Known::ServerAddr, "an IP address", |v| v.parse().ok())
    }

    /// `$server_port`.
    pub fn server_port(&self) -> Result<Option<u16>, ParseError> {
        self.typed(Known::ServerPort, "a port", |v| {
            parse_u64(v).and_then(|p| u16::try_from(p).ok())
        })
    }

    /// The request's time, from `$time_iso8601`, `$time_local` or `$msec`
    /// (the first of them the format contains).
    pub fn time(&self) -> Result<Option<Timestamp>, ParseError> {
        if self.format.known_index(Known::TimeIso8601).is_some() {
            self.typed(
                Known::TimeIso8601,
                "an ISO 8601 time",
                Timestamp::parse_iso8601,
            )
        } else if self.format.known_index(Known::TimeLocal).is_some() {
            self.typed(
                Known::TimeLocal,
                "a time like 10/Oct/2000:13:55:36 -0700",
                Timestamp::parse_time_local,
            )
        } else {
            self.typed(
                Known::Msec,
                "seconds since the epoch",
                Timestamp::parse_msec,
            )
        }
    }

    /// The items of a list variable (`$upstream_addr`, `$upstream_status`, …;
    /// any variable works, a non-list one is a one-item list). Empty when the
    /// format lacks the variable or its value is `-`.
    pub fn list(&self, name: &str) -> Values<'a> {
        match self.format.index_of(name) {
            Some(i) => self.values_at(i),
            None => Values::empty(),
        }
    }

    fn values_at(&self, i: usize) -> Values<'a> {
        let (start, v) = self.at(i);
        if is_empty(v) {
            Values::empty()
        } else {
            Values {
                rest: v,
                offset: start,
            }
        }
    }

    fn known_values(&self, k: Known) -> Values<'a> {
        match self.format.known_index(k) {
            Some(i) => self.values_at(i),
            None => Values::empty(),
        }
    }

    /// `$upstream_addr` items, one per upstream server tried.
    pub fn upstream_addrs(&self) -> Values<'a> {
        self.known_values(Known::UpstreamAddr)
    }

    /// `$upstream_status` items.
    pub fn upstream_statuses(&self) -> Values<'a> {
        self.known_values(Known::UpstreamStatus)
    }

    /// The last `$upstream_addr` item as a socket address (`None` when there
    /// was no upstream, or the last one is a unix socket or a group name).
    pub fn last_upstream_addr(&self) -> Option<SocketAddr> {
        self.upstream_addrs().last().and_then(|a| a.parse().ok())
    }

    /// The status the upstream gave: the last `$upstream_status` item if the
    /// format has it and it is a number, else `$status`.
    pub fn effective_status(&self) -> Result<Option<u16>, ParseError> {
        if let Some(i) = self.format.known_index(Known::UpstreamStatus) {
            let mut last = None;
            for (off, item) in self.values_at(i).with_offsets() {
                last = Some((off, item));
            }
            if let Some((off, item)) = last.filter(|(_, s)| !is_empty(s)) {
                return match parse_status(item) {
                    Some(s) => Ok(Some(s)),
                    None => Err(self.invalid(i, off, "an HTTP status")),
                };
            }
        }
        self.status()
    }

    /// The upstream attempts of this request: `$upstream_addr`,
    /// `$upstream_status` and `$upstream_response_time` zipped item by item.
    /// Yields one item per `$upstream_addr` entry (nothing when there was no
    /// upstream); an item that is not a number yields an error.
    pub fn attempts(&self) -> Attempts<'a> {
        let idx = |k| self.format.known_index(k);
        Attempts {
            addrs: self.upstream_addrs(),
            statuses: self.known_values(Known::UpstreamStatus),
            times: self.known_values(Known::UpstreamResponseTime),
            status_var: idx(Known::UpstreamStatus).map(|i| self.var_name(i)),
            time_var: idx(Known::UpstreamResponseTime).map(|i| self.var_name(i)),
        }
    }

    fn var_name(&self, i: usize) -> &'a str {
        &self.format.fields()[i].name
    }
}

#[inline]
fn is_empty(v: &str) -> bool {
    v.is_empty() || v == "-"
}

/// The items of a list value (`10.0.0.1:80, 10.0.0.2:80 : 10.0.0.3:80`), in
/// order. Both separators (`, ` between servers of one upstream group, ` : `
/// after an internal redirect to another group) are treated alike. Items are
/// raw: nginx writes `-` for an attempt that has no value.
#[derive(Clone, Debug)]
pub struct Values<'a> {
    rest: &'a str,
    offset: usize,
}

impl<'a> Values<'a> {
    fn empty() -> Self {
        Self {
            rest: "",
            offset: 0,
        }
    }

    /// Items together with their byte offset in the line.
    pub fn with_offsets(self) -> impl Iterator<Item = (usize, &'a str)> {
        let mut v = self;
        std::iter::from_fn(move || {
            let off = v.offset;
            v.next().map(|item| (off, item))
        })
    }
}

impl<'a> Iterator for Values<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.rest.is_empty() {
            return None;
        }
        let b = self.rest.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let sep = match b[i] {
                b',' if b.get(i + 1) == Some(&b' ') => 2,
                b' ' if b.get(i + 1) == Some(&b':') && b.get(i + 2) == Some(&b' ') => 3,
                _ => 0,
            };
            if sep > 0 {
                let item = &self.rest[..i];
                self.rest = &self.rest[i + sep..];
                self.offset += i + sep;
                return Some(item);
            }
            i += 1;
        }
        let item = self.rest;
        self.rest = "";
        self.offset += item.len();
        Some(item)
    }
}

/// One upstream server tried for a request (see [`Record::attempts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt<'a> {
    /// The `$upstream_addr` item: `ip:port`, `[ipv6]:port`, `unix:/path`, or
    /// an upstream group name when no server of the group was available.
    pub addr: &'a str,
    /// The matching `$upstream_status` item; `None` when absent or `-`.
    pub status: Option<u16>,
    /// The matching `$upstream_response_time` item; `None` when absent or `-`.
    pub response_time: Option<Duration>,
}

impl Attempt<'_> {
    /// [`addr`](Self::addr) as a socket address, when it is one.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.addr.parse().ok()
    }
}

/// Iterator over a record's [`Attempt`]s.
#[derive(Clone, Debug)]
pub struct Attempts<'a> {
    addrs: Values<'a>,
    statuses: Values<'a>,
    times: Values<'a>,
    status_var: Option<&'a str>,
    time_var: Option<&'a str>,
}

impl<'a> Iterator for Attempts<'a> {
    type Item = Result<Attempt<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        let addr = self.addrs.next()?;
        let status_off = self.statuses.offset;
        let status = self.statuses.next().filter(|s| !is_empty(s));
        let time_off = self.times.offset;
        let time = self.times.next().filter(|s| !is_empty(s));
        let invalid = |var: Option<&str>, offset, expected| ParseError::InvalidValue {
            var: var.unwrap_or_default().to_string(),
            offset,
            expected,
        };
        let status = match status.map(parse_status) {
            Some(None) => return Some(Err(invalid(self.status_var, status_off, "an HTTP status"))),
            Some(s) => s,
            None => None,
        };
        let response_time = match time.map(parse_seconds) {
            Some(None) => return Some(Err(invalid(self.time_var, time_off, "seconds"))),
            Some(t) => t,
            None => None,
        };
        Some(Ok(Attempt {
            addr,
            status,
            response_time,
        }))
    }
}

/// 1 to 3 ASCII digits.
#[inline]
pub(crate) fn parse_status(v: &str) -> Option<u16> {
    let b = v.as_bytes();
    if b.is_empty() || b.len() > 3 {
        return None;
    }
    let mut n = 0u16;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u16::from(c - b'0');
    }
    Some(n)
}

/// ASCII digits only (no sign), fitting in a u64.
#[inline]
pub(crate) fn parse_u64(v: &str) -> Option<u64> {
    let b = v.as_bytes();
    if b.is_empty() {
        return None;
    }
    let mut n = 0u64;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(n)
}

/// `S[.fff]` seconds, up to nanosecond precision (extra digits truncated).
pub(crate) fn parse_seconds(v: &str) -> Option<Duration> {
    let (int, frac) = match v.split_once('.') {
        Some((i, f)) => (i, f),
        None => (v, ""),
    };
    let secs = parse_u64(int)?;
    if !frac.bytes().all(|c| c.is_ascii_digit()) || (v.contains('.') && frac.is_empty()) {
        return None;
    }
    let mut nanos = 0u32;
    for i in 0..9 {
        let d = frac.as_bytes().get(i).map_or(0, |c| u32::from(c - b'0'));
        nanos = nanos * 10 + d;
    }
    Some(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("0.123"), Some(Duration::from_millis(123)));
        assert_eq!(parse_seconds("12"), Some(Duration::from_secs(12)));
        assert_eq!(parse_seconds("1.0000000019"), Some(Duration::new(1, 1)));
        assert_eq!(parse_seconds("1."), None);
        assert_eq!(parse_seconds(".5"), None);
        assert_eq!(parse_seconds("-1"), None);
        assert_eq!(parse_seconds("1.-"), None);
    }

    #[test]
    fn statuses() {
        assert_eq!(parse_status("200"), Some(200));
        assert_eq!(parse_status("000"), Some(0));
        assert_eq!(parse_status("2000"), None);
        assert_eq!(parse_status("+20"), None);
        assert_eq!(parse_u64("18446744073709551616"), None);
    }

    #[test]
    fn values_split() {
        let v = Values {
            rest: "a:1, b:2 : c:3",
            offset: 10,
        };
        assert_eq!(
            v.with_offsets().collect::<Vec<_>>(),
            [(10, "a:1"), (15, "b:2"), (21, "c:3")]
        );
    }
}
