//! The command-line clients of the admin API (`ippool rules list|add|remove`,
//! `ippool bans`, `ippool pool`, `ippool keys`, `ippool backends`): one HTTP/1.1 request over a plain TCP
//! connection (the admin API listens on loopback by default; put TLS in
//! front of it with a reverse proxy when it does not), a human table by
//! default and the API's JSON with `--json`.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use clap::Args;

/// Where the admin API is and how to authenticate.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The admin API, `http://HOST:PORT`.
    #[arg(
        long,
        env = "IPPOOL_ADMIN",
        default_value = "http://127.0.0.1:9095",
        value_name = "URL"
    )]
    pub admin: String,
    /// The admin token (needed for changes, and for reads from a
    /// non-loopback admin listener). Prefer the environment to the command
    /// line, which other users can see.
    #[arg(
        long,
        env = "IPPOOL_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A failed call, with what to tell the user.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `http://host:port`.
    #[error("--admin {0}: expected http://HOST:PORT")]
    Url(String),
    /// No connection.
    #[error(
        "cannot reach the admin API at {addr}: {source} (is `ippool serve` running? see --admin)"
    )]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The API answered with an error.
    #[error("{status}: {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The API's `error`.
        message: String,
    },
    /// Not an HTTP response or not JSON.
    #[error("unexpected answer from the admin API: {0}")]
    Protocol(String),
    /// A bad argument found before calling (an unreadable or invalid file).
    #[error("{0}")]
    Input(String),
}

impl ClientError {
    /// 1 for API refusals and transport failures, 2 for bad arguments.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Url(_) | ClientError::Input(_) => 2,
            ClientError::Api { status: 400, .. } => 2,
            _ => 1,
        }
    }
}

fn target(url: &str) -> Result<(SocketAddr, String), ClientError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::Url(url.to_owned()))?
        .trim_end_matches('/');
    let addr = rest
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ClientError::Url(url.to_owned()))?;
    Ok((addr, rest.to_owned()))
}

/// Percent-encodes a query value.
pub fn encode(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// One call: `method path` with an optional JSON body; the JSON answer.
pub fn call(
    api: &ApiArgs,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<serde_json::Value, ClientError> {
    let (addr, host) = target(&api.admin)?;
    let connect = |source| ClientError::Connect {
        addr: api.admin.clone(),
        source,
    };
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(connect)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(connect)?;
    let body = body.map(ToString::to_string).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(t) = &api.token {
        let _ = write!(req, "Authorization: Bearer {t}\r\n");
    }
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    let _ = write!(req, "Content-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).map_err(connect)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(connect)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| ClientError::Protocol("no HTTP head".into()))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol("no status".into()))?;
    let json: serde_json::Value = serde_json::from_str(body)
        .map_err(|e| ClientError::Protocol(format!("status {status}: {e}")))?;
    if status >= 400 {
        return Err(ClientError::Api {
            status,
            message: json["error"].as_str().unwrap_or("").to_owned(),
        });
    }
    Ok(json)
}

/// A text table: a header row and rows, columns padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut first = true;
        for (c, w) in cells.zip(&widths) {
            if !first {
                out.push_str("  ");
            }
            first = false;
            let _ = write!(out, "{c:<w$}");
        }
        let trimmed = out.trim_end().len();
        out.truncate(trimmed);
        out.push('\n');
    };
    line(&mut out, &mut header.iter().copied());
    for r in rows {
        line(&mut out, &mut r.iter().map(String::as_str));
    }
    out
}

/// `v` as table text (`-` for null).
pub fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() != 0.0 => format!("{f:.1}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_encoding() {
        let t = table(
            &["set", "rule"],
            &[vec!["clients".into(), "10.0.0.0/8".into()]],
        );
        assert_eq!(t, "set      rule\nclients  10.0.0.0/8\n");
        assert_eq!(encode("10.0.0.0/8"), "10.0.0.0%2F8");
        assert_eq!(encode("2001:db8::/32"), "2001:db8::%2F32");
        assert_eq!(cell(&serde_json::json!(1.25)), "1.2");
        assert_eq!(cell(&serde_json::Value::Null), "-");
        assert!(matches!(target("https://x:1"), Err(ClientError::Url(_))));
        assert_eq!(
            target("http://127.0.0.1:9095/").unwrap().1,
            "127.0.0.1:9095"
        );
    }
}
