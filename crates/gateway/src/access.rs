//! Access logging of the proxies, one line per request in nginx's
//! `combined` format, so that the `accesslog` crate (and every log tool
//! that reads nginx logs) reads ippool's own logs.
//!
//! The proxies hand an [`AccessEntry`] to an [`AccessLog`] sink after
//! each response head; where lines go (a file, a channel) is the sink's
//! business. [`combined`] renders one.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// One request, as an access log records it.
#[derive(Debug, Clone)]
pub struct AccessEntry {
    /// The client.
    pub peer: IpAddr,
    /// The authenticated user, if any.
    pub user: Option<String>,
    /// When the request arrived.
    pub time: SystemTime,
    /// The request line: method.
    pub method: String,
    /// The request line: target as sent.
    pub target: String,
    /// The request line: protocol (`HTTP/1.1`).
    pub version: &'static str,
    /// The response status.
    pub status: u16,
    /// Response body bytes, when known from `Content-Length` (else 0).
    pub bytes: u64,
    /// `Referer`.
    pub referer: Option<String>,
    /// `User-Agent`.
    pub user_agent: Option<String>,
}

/// Receives one entry per request. Called on the request's path: record
/// and return (queue the line; never block on I/O).
pub trait AccessLog: Send + Sync + 'static {
    /// One request.
    fn record(&self, entry: AccessEntry);
}

impl<F> AccessLog for F
where
    F: Fn(AccessEntry) + Send + Sync + 'static,
{
    fn record(&self, entry: AccessEntry) {
        self(entry)
    }
}

/// The `HTTP/x` name of a version.
pub fn version_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// Quoted-field text: `"` and `\` escaped, control bytes as `\xHH` (as
/// nginx's default `escape=default`).
fn escaped(out: &mut String, s: &str) {
    for b in s.bytes() {
        match b {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(char::from(b));
            }
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\x{b:02X}");
            }
        }
    }
}

/// `01/Dec/2026:08:30:00 +0000` (UTC).
fn time_local(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[usize::try_from(month - 1).unwrap_or(0)],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The entry as an nginx `combined` line (no newline):
/// `$remote_addr - $remote_user [$time_local] "$request" $status
/// $body_bytes_sent "$http_referer" "$http_user_agent"`.
pub fn combined(e: &AccessEntry) -> String {
    let mut out = String::with_capacity(160);
    let _ = write!(out, "{} - ", e.peer.to_canonical());
    match &e.user {
        Some(u) if !u.is_empty() => escaped(&mut out, u),
        _ => out.push('-'),
    }
    let _ = write!(out, " [{}] \"", time_local(e.time));
    escaped(&mut out, &e.method);
    out.push(' ');
    escaped(&mut out, &e.target);
    let _ = write!(out, " {}\" {} {} \"", e.version, e.status, e.bytes);
    escaped(&mut out, e.referer.as_deref().unwrap_or("-"));
    out.push_str("\" \"");
    escaped(&mut out, e.user_agent.as_deref().unwrap_or("-"));
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn combined_lines() {
        let e = AccessEntry {
            peer: "::ffff:203.0.113.7".parse().unwrap(),
            user: None,
            time: UNIX_EPOCH + Duration::from_secs(1_796_113_800),
            method: "GET".into(),
            target: "/a \"b\"".into(),
            version: "HTTP/1.1",
            status: 200,
            bytes: 612,
            referer: None,
            user_agent: Some("curl/8.0".into()),
        };
        assert_eq!(
            combined(&e),
            r#"203.0.113.7 - - [01/Dec/2026:08:30:00 +0000] "GET /a \"b\" HTTP/1.1" 200 612 "-" "curl/8.0""#
        );
        assert_eq!(time_local(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(
            time_local(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "29/Feb/2000:00:00:00 +0000"
        );
    }
}
