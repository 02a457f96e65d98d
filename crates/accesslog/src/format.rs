//! `log_format` compilation and line matching.

use std::fmt;

use memchr::{memchr, memchr3};

use crate::record::{Record, Spans};

/// How nginx escaped variable values when it wrote the log
/// (`log_format name escape=default|json|none ...`).
///
/// Escaping only matters for [`Record::decoded`]: matching works on the raw
/// text, and the raw text is what [`Record::value`] returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Escape {
    /// nginx's default: `"`, `\` and bytes below 0x20 or above 0x7e are
    /// written as `\xHH`.
    #[default]
    Default,
    /// `escape=json`: JSON string escapes (`\"`, `\\`, `\n`, `\u00HH`, …).
    Json,
    /// `escape=none`: values are written as they are.
    None,
}

impl Escape {
    /// Parses the value of nginx's `escape=` parameter.
    pub fn from_nginx(value: &str) -> Option<Self> {
        match value {
            "default" => Some(Self::Default),
            "json" => Some(Self::Json),
            "none" => Some(Self::None),
            _ => None,
        }
    }
}

/// A `log_format` string that cannot be compiled.
///
/// Every variant carries `position`, the 0-based byte offset in the format
/// string of the `$` that starts the offending variable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// `$` not followed by a variable name (`[A-Za-z0-9_]+` or `{name}`).
    #[error("log_format byte {position}: `$` is not followed by a variable name")]
    InvalidVariableName {
        /// Byte offset of the `$`.
        position: usize,
    },
    /// `${` without the closing `}`.
    #[error("log_format byte {position}: `${{` is not closed by `}}`")]
    UnclosedBrace {
        /// Byte offset of the `$`.
        position: usize,
    },
    /// Two variables with no literal text between them (`$host$request_uri`):
    /// the parser finds the end of a value by looking for the literal that
    /// follows it, so it needs one.
    #[error(
        "log_format byte {position}: `${name}` directly follows `${previous}`; \
         a literal delimiter is needed between two variables"
    )]
    AdjacentVariables {
        /// Byte offset of the second variable's `$`.
        position: usize,
        /// The second variable.
        name: String,
        /// The variable right before it.
        previous: String,
    },
}

/// A line that does not match its [`LogFormat`], or a value that does not
/// have the type an accessor expects.
///
/// `offset` is always a 0-based byte offset into the line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Literal text of the format was not found where it must be.
    #[error("byte {offset}: expected {expected:?}{}", after_var(after))]
    LiteralMismatch {
        /// Where the literal should start.
        offset: usize,
        /// The literal text.
        expected: String,
        /// The variable the literal follows (none for the format's prefix).
        after: Option<String>,
    },
    /// The literal that ends a variable's value never occurs.
    #[error("`${var}` starting at byte {offset}: delimiter {delimiter:?} not found")]
    MissingDelimiter {
        /// The variable whose value has no end.
        var: String,
        /// Where its value starts.
        offset: usize,
        /// The literal that should follow it.
        delimiter: String,
    },
    /// The line goes on after the format ended.
    #[error("byte {offset}: unexpected text after the end of the format")]
    TrailingData {
        /// Where the extra text starts.
        offset: usize,
    },
    /// A value that a typed accessor could not read.
    #[error("`${var}` at byte {offset}: expected {expected}")]
    InvalidValue {
        /// The variable.
        var: String,
        /// Where the value (or list item) starts.
        offset: usize,
        /// What was expected, e.g. "an HTTP status".
        expected: &'static str,
    },
    /// Lines longer than 4 GiB are not supported.
    #[error("line longer than 4 GiB")]
    LineTooLong,
}

fn after_var(after: &Option<String>) -> String {
    match after {
        Some(v) => format!(" after `${v}`"),
        None => String::new(),
    }
}

/// Variables the record has typed accessors for; their field index is
/// precomputed so that accessors need no name lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Known {
    RemoteAddr,
    TimeLocal,
    TimeIso8601,
    Msec,
    Status,
    BodyBytesSent,
    RequestTime,
    UpstreamAddr,
    UpstreamStatus,
    UpstreamResponseTime,
    ServerAddr,
    ServerPort,
}

impl Known {
    pub(crate) const COUNT: usize = 12;

    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "remote_addr" => Self::RemoteAddr,
            "time_local" => Self::TimeLocal,
            "time_iso8601" => Self::TimeIso8601,
            "msec" => Self::Msec,
            "status" => Self::Status,
            "body_bytes_sent" => Self::BodyBytesSent,
            "request_time" => Self::RequestTime,
            "upstream_addr" => Self::UpstreamAddr,
            "upstream_status" => Self::UpstreamStatus,
            "upstream_response_time" => Self::UpstreamResponseTime,
            "server_addr" => Self::ServerAddr,
            "server_port" => Self::ServerPort,
            _ => return None,
        })
    }
}

/// Variables nginx writes as lists, one item per upstream tried:
/// `a, b : c` (`, ` between servers of one group, ` : ` after an internal
/// redirect to another group).
fn is_list_variable(name: &str) -> bool {
    matches!(
        name,
        "upstream_addr"
            | "upstream_status"
            | "upstream_response_time"
            | "upstream_connect_time"
            | "upstream_header_time"
            | "upstream_response_length"
            | "upstream_bytes_received"
            | "upstream_bytes_sent"
    )
}

/// How the end of a variable's value is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Matcher {
    /// Up to the first occurrence of the following literal.
    Until,
    /// A list whose items are separated by `, ` or ` : `; the value ends at
    /// the first other byte that starts the following literal.
    List,
    /// `$time_local` (`10/Oct/2000:13:55:36 -0700`) contains one space; the
    /// search for the following literal starts after it.
    TimeLocal,
}

#[derive(Clone, Debug)]
pub(crate) struct Field {
    pub(crate) name: Box<str>,
    pub(crate) matcher: Matcher,
    /// Literal text following this variable (empty only for the last one).
    pub(crate) suffix: Box<str>,
    /// Its first byte (0 when empty: only the last variable's suffix may be
    /// empty, and that one is not searched) and the rest, for the search.
    first: u8,
    rest: Box<[u8]>,
}

/// A compiled nginx `log_format`.
///
/// The format string is split into a literal prefix and a sequence of
/// (variable, following literal) pairs. A line is matched left to right in a
/// single pass: each variable's value runs up to the first occurrence of the
/// literal after it (found a word at a time, then with `memchr` for long
/// values), with three refinements that keep the pass linear and free of
/// backtracking:
///
/// * list variables (`$upstream_addr`, `$upstream_status`,
///   `$upstream_response_time`, `$upstream_connect_time`,
///   `$upstream_header_time`, `$upstream_response_length`,
///   `$upstream_bytes_received`, `$upstream_bytes_sent`) may contain the
///   separators `, ` and ` : ` even when the next literal is a space;
/// * `$time_local` may contain its one space;
/// * the last variable, when the format ends with a literal, runs up to that
///   literal at the end of the line (so it may itself contain the literal).
///
/// Any other value that contains its following literal (an unquoted
/// `$http_user_agent` followed by a space, say) is cut at the first
/// occurrence: quote such variables in the format, as `combined` does. With
/// the default escaping nginx writes `"` inside values as `\x22`, so a quoted
/// value never contains a raw `"`.
///
/// Variable names are matched case-insensitively (as nginx does) and stored
/// lowercased. Unknown variables are fine: every variable is available by name
/// through [`Record::value`]; the well-known ones also have typed accessors.
#[derive(Clone)]
pub struct LogFormat {
    source: Box<str>,
    escape: Escape,
    prefix: Box<str>,
    fields: Box<[Field]>,
    known: [u16; Known::COUNT],
}

const ABSENT: u16 = u16::MAX;

impl fmt::Debug for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogFormat")
            .field("format", &self.source)
            .field("escape", &self.escape)
            .finish()
    }
}

impl LogFormat {
    /// nginx's predefined `combined` format.
    pub const COMBINED: &'static str = "$remote_addr - $remote_user [$time_local] \
        \"$request\" $status $body_bytes_sent \"$http_referer\" \"$http_user_agent\"";

    /// The `main` format of nginx's stock `nginx.conf`.
    pub const MAIN: &'static str = "$remote_addr - $remote_user [$time_local] \
        \"$request\" $status $body_bytes_sent \"$http_referer\" \"$http_user_agent\" \
        \"$http_x_forwarded_for\"";

    /// Compiles a format string with nginx's default escaping.
    ///
    /// `format` is the text after nginx has joined the quoted strings of the
    /// `log_format` directive (see [`crate::LogFormatDecl`]).
    pub fn new(format: &str) -> Result<Self, FormatError> {
        Self::with_escape(format, Escape::Default)
    }

    /// Compiles a format string written with the given escaping.
    pub fn with_escape(format: &str, escape: Escape) -> Result<Self, FormatError> {
        let b = format.as_bytes();
        let mut fields: Vec<Field> = Vec::new();
        let mut prefix: Option<Box<str>> = None;
        // (name, position) of the variable waiting for its suffix.
        let mut pending: Option<(String, usize)> = None;
        let mut lit_start = 0;
        let mut i = 0;
        while i < b.len() {
            let Some(k) = memchr(b'$', &b[i..]) else {
                break;
            };
            let dollar = i + k;
            let literal = &format[lit_start..dollar];
            let (name, next) = variable_name(b, dollar)?;
            match pending.take() {
                Some((prev, _)) => {
                    if literal.is_empty() {
                        return Err(FormatError::AdjacentVariables {
                            position: dollar,
                            name,
                            previous: prev,
                        });
                    }
                    fields.push(field(prev, literal));
                }
                None => prefix = Some(literal.into()),
            }
            pending = Some((name, dollar));
            i = next;
            lit_start = next;
        }
        let literal = &format[lit_start..];
        match pending {
            Some((prev, _)) => fields.push(field(prev, literal)),
            None => prefix = Some(literal.into()),
        }
        let mut known = [ABSENT; Known::COUNT];
        for (idx, f) in fields.iter().enumerate() {
            if let Some(k) = Known::from_name(&f.name) {
                let slot = &mut known[k as usize];
                if *slot == ABSENT {
                    *slot = u16::try_from(idx).unwrap_or(ABSENT);
                }
            }
        }
        Ok(Self {
            source: format.into(),
            escape,
            prefix: prefix.unwrap_or_default(),
            fields: fields.into_boxed_slice(),
            known,
        })
    }

    /// The `combined` format.
    pub fn combined() -> Self {
        Self::builtin("combined").unwrap_or_else(|| unreachable!())
    }

    /// The `main` format of the stock `nginx.conf`.
    pub fn main() -> Self {
        Self::builtin("main").unwrap_or_else(|| unreachable!())
    }

    /// A built-in format by name: `combined` or `main`.
    pub fn builtin(name: &str) -> Option<Self> {
        let src = match name {
            "combined" => Self::COMBINED,
            "main" => Self::MAIN,
            _ => return None,
        };
        Self::new(src).ok()
    }

    /// The format string as given.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The escaping the format was compiled with.
    pub fn escape(&self) -> Escape {
        self.escape
    }

    /// The variable names in order of appearance (lowercase, without `$`).
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|f| &*f.name)
    }

    /// Whether the format contains a variable (`name` with or without `$`).
    pub fn has_variable(&self, name: &str) -> bool {
        self.index_of(name).is_some()
    }

    pub(crate) fn prefix_len(&self) -> usize {
        self.prefix.len()
    }

    pub(crate) fn fields(&self) -> &[Field] {
        &self.fields
    }

    pub(crate) fn known_index(&self, k: Known) -> Option<usize> {
        let i = self.known[k as usize];
        (i != ABSENT).then_some(i as usize)
    }

    pub(crate) fn index_of(&self, name: &str) -> Option<usize> {
        let name = name.strip_prefix('$').unwrap_or(name);
        self.fields
            .iter()
            .position(|f| f.name.eq_ignore_ascii_case(name))
    }

    /// Matches one line (without its newline) against the format.
    ///
    /// Allocates nothing unless the format has more than 24 variables or the
    /// line does not match. Values are only located here; typed accessors on
    /// the [`Record`] validate them when called.
    pub fn parse<'a>(&'a self, line: &'a str) -> Result<Record<'a>, ParseError> {
        let b = line.as_bytes();
        if u32::try_from(b.len()).is_err() {
            return Err(ParseError::LineTooLong);
        }
        if !b.starts_with(self.prefix.as_bytes()) {
            return Err(ParseError::LiteralMismatch {
                offset: 0,
                expected: self.prefix.to_string(),
                after: None,
            });
        }
        let mut pos = self.prefix.len();
        let mut spans = Spans::with_len(self.fields.len());
        let Some((last, init)) = self.fields.split_last() else {
            if pos != b.len() {
                return Err(ParseError::TrailingData { offset: pos });
            }
            return Ok(Record::new(line, self, spans));
        };
        let n = self.fields.len();
        let ends = spans.as_mut_slice().get_mut(..n).unwrap_or_default();
        for (f, slot) in init.iter().zip(ends.iter_mut()) {
            // Not the last variable: its suffix is not empty.
            let end = match f.matcher {
                Matcher::Until => find(b, pos, f.first, &f.rest),
                Matcher::TimeLocal => find(b, time_local_from(b, pos), f.first, &f.rest),
                Matcher::List => Some(self.list_end(b, pos, f)?),
            }
            .ok_or_else(|| self.missing(f, pos))?;
            *slot = end as u32;
            pos = end + f.suffix.len();
        }
        let suffix = last.suffix.as_bytes();
        let end = match last.matcher {
            // The final literal must end the line.
            Matcher::Until if b.len() >= pos + suffix.len() && b.ends_with(suffix) => {
                b.len() - suffix.len()
            }
            Matcher::Until => return Err(self.missing(last, pos)),
            _ if suffix.is_empty() => b.len(),
            Matcher::TimeLocal => find(b, time_local_from(b, pos), last.first, &last.rest)
                .ok_or_else(|| self.missing(last, pos))?,
            Matcher::List => self.list_end(b, pos, last)?,
        };
        if let Some(slot) = ends.last_mut() {
            *slot = end as u32;
        }
        pos = end + suffix.len();
        if pos != b.len() {
            return Err(ParseError::TrailingData { offset: pos });
        }
        Ok(Record::new(line, self, spans))
    }

    /// End of a list value, checked to be followed by its suffix.
    #[inline]
    fn list_end(&self, b: &[u8], start: usize, f: &Field) -> Result<usize, ParseError> {
        let end = scan_list(b, start, f.suffix.as_bytes().first().copied());
        if f.suffix.is_empty()
            || (b.get(end) == Some(&f.first) && starts_with_at(b, end + 1, &f.rest))
        {
            Ok(end)
        } else {
            Err(ParseError::LiteralMismatch {
                offset: end,
                expected: f.suffix.to_string(),
                after: Some(f.name.to_string()),
            })
        }
    }

    fn missing(&self, f: &Field, start: usize) -> ParseError {
        ParseError::MissingDelimiter {
            var: f.name.to_string(),
            offset: start,
            delimiter: f.suffix.to_string(),
        }
    }
}

/// Reads the variable name starting at the `$` at `dollar`; returns it
/// lowercased and the index after it.
fn variable_name(b: &[u8], dollar: usize) -> Result<(String, usize), FormatError> {
    let is_name = |c: &u8| c.is_ascii_alphanumeric() || *c == b'_';
    let (start, end, next) = if b.get(dollar + 1) == Some(&b'{') {
        let start = dollar + 2;
        let len = b[start..].iter().take_while(|c| is_name(c)).count();
        let end = start + len;
        if b.get(end) != Some(&b'}') {
            return Err(if len == 0 && b.get(end).is_some() {
                FormatError::InvalidVariableName { position: dollar }
            } else {
                FormatError::UnclosedBrace { position: dollar }
            });
        }
        (start, end, end + 1)
    } else {
        let start = dollar + 1;
        let len = b[start..].iter().take_while(|c| is_name(c)).count();
        (start, start + len, start + len)
    };
    if start == end {
        return Err(FormatError::InvalidVariableName { position: dollar });
    }
    // The name is ASCII by construction.
    let name = String::from_utf8_lossy(&b[start..end]).to_ascii_lowercase();
    Ok((name, next))
}

fn field(name: String, suffix: &str) -> Field {
    let matcher = if is_list_variable(&name) {
        Matcher::List
    } else if name == "time_local" {
        Matcher::TimeLocal
    } else {
        Matcher::Until
    };
    let (first, rest) = suffix.as_bytes().split_first().unwrap_or((&0, &[]));
    Field {
        name: name.into_boxed_str(),
        matcher,
        suffix: suffix.into(),
        first: *first,
        rest: rest.into(),
    }
}

/// Where to look for the literal after `$time_local`: past its one space
/// (`10/Oct/2000:13:55:36 -0700`) when the value has that shape.
#[inline]
fn time_local_from(b: &[u8], start: usize) -> usize {
    if b.get(start + 20) == Some(&b' ') {
        start + 21
    } else {
        start
    }
}

/// First occurrence of the literal `first` + `rest` in `h[from..]`, as an
/// index into `h`.
#[inline(always)]
fn find(h: &[u8], from: usize, first: u8, rest: &[u8]) -> Option<usize> {
    let mut p = from;
    loop {
        let q = find_byte(first, h, p)?;
        if starts_with_at(h, q + 1, rest) {
            return Some(q);
        }
        p = q + 1;
    }
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// High bit set in each byte of `word` equal to the byte repeated in
/// `pattern`. The lowest set bit marks the first such byte exactly (borrows
/// only cause false marks above a true one).
#[inline(always)]
fn eq_mask(word: u64, pattern: u64) -> u64 {
    let v = word ^ pattern;
    v.wrapping_sub(LO) & !v & HI
}

#[inline(always)]
fn word_at(h: &[u8], p: usize) -> Option<u64> {
    let w = h.get(p..p + 8)?;
    <[u8; 8]>::try_from(w).ok().map(u64::from_le_bytes)
}

/// First `c` in `h[from..]`. Most values are short, so the first 32 bytes
/// are searched a word at a time (SWAR), which needs no set-up, and only
/// longer values go to the vectorised `memchr`.
#[inline(always)]
fn find_byte(c: u8, h: &[u8], from: usize) -> Option<usize> {
    let pattern = LO * u64::from(c);
    let mut p = from;
    for _ in 0..4 {
        let Some(word) = word_at(h, p) else { break };
        let m = eq_mask(word, pattern);
        if m != 0 {
            return Some(p + (m.trailing_zeros() / 8) as usize);
        }
        p += 8;
    }
    memchr(c, h.get(p..)?).map(|i| p + i)
}

/// First of `a`, `b`, `c` in `h[from..]`, like [`find_byte`].
#[inline(always)]
fn find_byte3(a: u8, b: u8, c: u8, h: &[u8], from: usize) -> Option<usize> {
    let (pa, pb, pc) = (LO * u64::from(a), LO * u64::from(b), LO * u64::from(c));
    let mut p = from;
    for _ in 0..4 {
        let Some(word) = word_at(h, p) else { break };
        let m = eq_mask(word, pa) | eq_mask(word, pb) | eq_mask(word, pc);
        if m != 0 {
            return Some(p + (m.trailing_zeros() / 8) as usize);
        }
        p += 8;
    }
    memchr3(a, b, c, h.get(p..)?).map(|i| p + i)
}

/// `h[at..].starts_with(s)` without a call to `memcmp` for short literals.
#[inline]
fn starts_with_at(h: &[u8], at: usize, s: &[u8]) -> bool {
    match h.get(at..at + s.len()) {
        Some(w) if s.len() <= 4 => w.iter().zip(s).all(|(a, b)| a == b),
        Some(w) => w == s,
        None => false,
    }
}

/// End of a list value starting at `start`: items run up to a space, a comma
/// or `stop` (the first byte of the following literal); `, ` and ` : `
/// continue the list. Without a following literal the list runs to the end.
#[inline]
fn scan_list(b: &[u8], start: usize, stop: Option<u8>) -> usize {
    let Some(stop) = stop else {
        return b.len();
    };
    let mut p = start;
    loop {
        let Some(q) = find_byte3(b' ', b',', stop, b, p) else {
            return b.len();
        };
        let rest = &b[q..];
        if rest.starts_with(b", ") {
            p = q + 2;
        } else if rest.starts_with(b" : ") {
            p = q + 3;
        } else {
            return q;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The word-at-a-time searches agree with a naive scan.
        #[test]
        fn swar_search_matches_naive(
            h in prop::collection::vec(prop::sample::select(vec![0u8, b' ', b',', b'"', b'a', 0x80, 0xff, 0x7f, 0x01]), 0..80),
            from in 0usize..90,
            c in prop::sample::select(vec![0u8, b' ', b',', b'"', 0x80, 0xff, 0x01]),
        ) {
            let naive = |set: &[u8]| h.iter().enumerate().skip(from).find(|(_, b)| set.contains(b)).map(|(i, _)| i);
            prop_assert_eq!(find_byte(c, &h, from), naive(&[c]));
            prop_assert_eq!(find_byte3(b' ', b',', c, &h, from), naive(&[b' ', b',', c]));
        }
    }

    #[test]
    fn compile_errors_name_the_position() {
        assert_eq!(
            LogFormat::new("abc $").unwrap_err(),
            FormatError::InvalidVariableName { position: 4 }
        );
        assert_eq!(
            LogFormat::new("x ${status").unwrap_err(),
            FormatError::UnclosedBrace { position: 2 }
        );
        assert_eq!(
            LogFormat::new("$a $b$c").unwrap_err(),
            FormatError::AdjacentVariables {
                position: 5,
                name: "c".into(),
                previous: "b".into()
            }
        );
        assert_eq!(
            LogFormat::new("$-").unwrap_err(),
            FormatError::InvalidVariableName { position: 0 }
        );
    }

    #[test]
    fn braces_and_case() {
        let f = LogFormat::new("${Status}x$body_bytes_sent").unwrap();
        assert_eq!(
            f.variables().collect::<Vec<_>>(),
            ["status", "body_bytes_sent"]
        );
        let r = f.parse("200x12").unwrap();
        assert_eq!(r.status(), Ok(Some(200)));
        assert_eq!(r.value("$BODY_BYTES_SENT"), Some("12"));
    }

    #[test]
    fn no_variables() {
        let f = LogFormat::new("static").unwrap();
        assert!(f.parse("static").is_ok());
        assert!(f.parse("statics").is_err());
        let f = LogFormat::new("").unwrap();
        assert!(f.parse("").is_ok());
        assert_eq!(
            f.parse("x").unwrap_err(),
            ParseError::TrailingData { offset: 0 }
        );
    }

    #[test]
    fn lists_with_space_delimiters() {
        let f = LogFormat::new("$upstream_addr $upstream_status $status").unwrap();
        let r = f
            .parse("10.0.0.1:80, 10.0.0.2:80 : 10.0.0.3:80 502, 504 : 200 200")
            .unwrap();
        assert_eq!(
            r.value("upstream_addr"),
            Some("10.0.0.1:80, 10.0.0.2:80 : 10.0.0.3:80")
        );
        assert_eq!(r.value("upstream_status"), Some("502, 504 : 200"));
        assert_eq!(r.status(), Ok(Some(200)));
    }

    #[test]
    fn time_local_unbracketed() {
        let f = LogFormat::new("$time_local $status").unwrap();
        let r = f.parse("10/Oct/2000:13:55:36 -0700 404").unwrap();
        assert_eq!(r.value("time_local"), Some("10/Oct/2000:13:55:36 -0700"));
        assert_eq!(r.status(), Ok(Some(404)));
    }

    #[test]
    fn errors_name_variable_and_offset() {
        let f = LogFormat::combined();
        let e = f.parse("1.2.3.4 - - [x").unwrap_err();
        assert_eq!(
            e,
            ParseError::MissingDelimiter {
                var: "time_local".into(),
                offset: 13,
                delimiter: "] \"".into()
            }
        );
        let f = LogFormat::new("$status [$upstream_addr]").unwrap();
        let e = f.parse("200 [1.2.3.4:80 x]").unwrap_err();
        assert_eq!(
            e,
            ParseError::LiteralMismatch {
                offset: 15,
                expected: "]".into(),
                after: Some("upstream_addr".into())
            }
        );
        assert!(e.to_string().contains("byte 15"));
    }
}
