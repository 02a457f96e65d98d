//! A reader for the parts of nginx configuration that describe address pools.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::format::Escape;

/// An nginx configuration that cannot be read. Syntax errors name the
/// 1-based line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A token that cannot appear where it is (`}` without `{`, `;` without
    /// a directive, text after a closing quote, …).
    #[error("line {line}: unexpected {token}")]
    Unexpected {
        /// Line of the token.
        line: usize,
        /// The token, quoted.
        token: String,
    },
    /// The file ends inside a block, a quoted string or a directive.
    #[error("line {line}: {what} is not closed before the end of the file")]
    UnexpectedEof {
        /// Line where the unclosed construct starts.
        line: usize,
        /// What is not closed.
        what: &'static str,
    },
    /// A directive has too few arguments.
    #[error("line {line}: `{directive}` needs an argument")]
    MissingArgument {
        /// Line of the directive.
        line: usize,
        /// The directive.
        directive: String,
    },
    /// A directive argument that cannot be read.
    #[error("line {line}: `{directive}`: invalid {value:?}")]
    InvalidParameter {
        /// Line of the directive.
        line: usize,
        /// The directive.
        directive: String,
        /// The argument.
        value: String,
    },
    /// Two `server` blocks listen on one port with different `proxy_bind`
    /// addresses, so `$server_port` cannot tell them apart.
    #[error("port {port} is bound to {first} (line {first_line}) and to {second} (line {line})")]
    PortConflict {
        /// The port.
        port: u16,
        /// Address of the first block.
        first: IpAddr,
        /// Line of the first block.
        first_line: usize,
        /// Address of the second block.
        second: IpAddr,
        /// Line of the second block.
        line: usize,
    },
}

/// What [`NginxConfig`] found in an nginx configuration.
///
/// `upstream` and `server` blocks are collected wherever they are (top level
/// of a `conf.d` snippet, inside `http { }` or `stream { }`). `include`
/// directives are **not** followed: their arguments are listed in
/// [`includes`](Self::includes) so the caller can read those files too.
/// Directives in other blocks (`map`, `geo`, `types`, …) are skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NginxConfig {
    /// `upstream NAME { server …; }` blocks.
    pub upstreams: Vec<Upstream>,
    /// `server { listen …; }` blocks.
    pub servers: Vec<ServerBlock>,
    /// `log_format` directives.
    pub log_formats: Vec<LogFormatDecl>,
    /// Arguments of `include` directives, not followed.
    pub includes: Vec<String>,
}

/// An `upstream` block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// Line of `upstream`.
    pub line: usize,
    /// The group name.
    pub name: String,
    /// Its `server` directives.
    pub servers: Vec<UpstreamServer>,
}

/// A `server ADDRESS [params];` directive of an `upstream` block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamServer {
    /// Line of the directive.
    pub line: usize,
    /// The address as written: `ip[:port]`, `[ipv6][:port]`, `host[:port]`,
    /// `unix:/path`.
    pub address: String,
    /// [`address`](Self::address) when it is an IP literal (port 80 when
    /// none is written).
    pub socket_addr: Option<SocketAddr>,
    /// `weight=` (default 1).
    pub weight: u32,
    /// `max_fails=` (default 1).
    pub max_fails: u32,
    /// `fail_timeout=` (default 10 s).
    pub fail_timeout: Duration,
    /// `max_conns=` (default 0: no limit).
    pub max_conns: u32,
    /// `backup`.
    pub backup: bool,
    /// `down`.
    pub down: bool,
    /// Other parameters, as written (`resolve`, `route=…`, …).
    pub other: Vec<String>,
}

/// A `server { }` block (http or stream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerBlock {
    /// Line of `server`.
    pub line: usize,
    /// Its `listen` directives.
    pub listen: Vec<Listen>,
    /// Its `server_name` arguments.
    pub server_names: Vec<String>,
    /// The first argument of the `proxy_bind` in effect at server level
    /// (its own, or inherited from `http`/`stream`).
    pub proxy_bind: Option<String>,
    /// The `proxy_pass` at server level (stream servers have one).
    pub proxy_pass: Option<String>,
    /// Its `location` blocks, nested ones flattened.
    pub locations: Vec<LocationBlock>,
}

/// A `location` block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocationBlock {
    /// Line of `location`.
    pub line: usize,
    /// The arguments joined by a space (`= /x`, `~ \.php$`, `/`).
    pub path: String,
    /// The `proxy_bind` in effect (own or inherited).
    pub proxy_bind: Option<String>,
    /// Its `proxy_pass`.
    pub proxy_pass: Option<String>,
}

/// A `listen` directive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listen {
    /// The address argument as written (`8080`, `127.0.0.1:8080`, `[::]:80`,
    /// `unix:/path`, `*:80`).
    pub address: String,
    /// The IP, when one is written.
    pub ip: Option<IpAddr>,
    /// The port (80 when only an address is written; `None` for unix
    /// sockets and unreadable addresses).
    pub port: Option<u16>,
    /// The other arguments (`default_server`, `ssl`, `udp`, …).
    pub params: Vec<String>,
}

/// A `log_format NAME [escape=…] STRING…;` directive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogFormatDecl {
    /// Line of the directive.
    pub line: usize,
    /// The format's name.
    pub name: String,
    /// Its escaping.
    pub escape: Escape,
    /// The strings, joined: what [`crate::LogFormat::with_escape`] takes.
    pub format: String,
}

impl NginxConfig {
    /// Reads a configuration file (see [`parse`](Self::parse)).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&String::from_utf8_lossy(&text))
    }

    /// Parses configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let directives = parse_block(&mut Lexer::new(text), None)?;
        let mut conf = Self::default();
        conf.walk(&directives, None)?;
        Ok(conf)
    }

    /// A `log_format` by name.
    pub fn log_format(&self, name: &str) -> Option<&LogFormatDecl> {
        self.log_formats.iter().find(|d| d.name == name)
    }

    /// The port → pool address map of "one `server` block per pool address"
    /// setups (the ipmanager seed's): for every server block whose requests
    /// all leave from one IP (the `proxy_bind` in effect, own or inherited,
    /// is the same IP literal in every location, or at server level when
    /// there are no locations), each `listen` port maps to that IP. Blocks
    /// without such a bind (none, `off`, a variable, different binds per
    /// location) are left out; one port bound to two different addresses is
    /// an error.
    pub fn port_map(&self) -> Result<HashMap<u16, IpAddr>, ConfigError> {
        let mut map: HashMap<u16, (IpAddr, usize)> = HashMap::new();
        for s in &self.servers {
            let Some(ip) = s.bind_ip() else { continue };
            for port in s.listen.iter().filter_map(|l| l.port) {
                match map.get(&port) {
                    Some(&(first, first_line)) if first != ip => {
                        return Err(ConfigError::PortConflict {
                            port,
                            first,
                            first_line,
                            second: ip,
                            line: s.line,
                        });
                    }
                    Some(_) => {}
                    None => {
                        map.insert(port, (ip, s.line));
                    }
                }
            }
        }
        Ok(map.into_iter().map(|(p, (ip, _))| (p, ip)).collect())
    }

    fn walk(&mut self, dirs: &[Directive], bind: Option<&str>) -> Result<(), ConfigError> {
        // proxy_bind at this level applies to the nested blocks.
        let bind = own(dirs, "proxy_bind").or(bind);
        for d in dirs {
            match (d.name.as_str(), &d.block) {
                ("include", None) => self.includes.extend(d.args.iter().cloned()),
                ("log_format", None) => self.log_formats.push(log_format(d)?),
                ("upstream", Some(block)) => self.upstreams.push(upstream(d, block)?),
                ("server", Some(block)) => self.servers.push(server(d, block, bind)?),
                ("http" | "stream", Some(block)) => self.walk(block, bind)?,
                _ => {}
            }
        }
        Ok(())
    }
}

impl ServerBlock {
    /// The address requests through this block leave from: the `proxy_bind`
    /// in effect in every location when they all agree on one IP (the server
    /// level one when there are no locations).
    fn bind_ip(&self) -> Option<IpAddr> {
        if self.locations.is_empty() {
            return self.proxy_bind.as_deref()?.parse().ok();
        }
        let mut ips = self.locations.iter().map(|l| {
            l.proxy_bind
                .as_deref()
                .and_then(|b| b.parse::<IpAddr>().ok())
        });
        let first = ips.next()??;
        ips.all(|ip| ip == Some(first)).then_some(first)
    }
}

/// First argument of a directive at this level.
fn own<'a>(dirs: &'a [Directive], name: &str) -> Option<&'a str> {
    dirs.iter()
        .find(|d| d.name == name && d.block.is_none())
        .and_then(|d| d.args.first())
        .map(String::as_str)
}

fn first_arg(d: &Directive) -> Result<&str, ConfigError> {
    d.args
        .first()
        .map(String::as_str)
        .ok_or_else(|| ConfigError::MissingArgument {
            line: d.line,
            directive: d.name.clone(),
        })
}

fn invalid(d: &Directive, value: &str) -> ConfigError {
    ConfigError::InvalidParameter {
        line: d.line,
        directive: d.name.clone(),
        value: value.to_string(),
    }
}

fn log_format(d: &Directive) -> Result<LogFormatDecl, ConfigError> {
    let name = first_arg(d)?.to_string();
    let mut rest = &d.args[1..];
    let mut escape = Escape::Default;
    if let Some(v) = rest.first().and_then(|a| a.strip_prefix("escape=")) {
        escape = Escape::from_nginx(v).ok_or_else(|| invalid(d, &rest[0]))?;
        rest = &rest[1..];
    }
    Ok(LogFormatDecl {
        line: d.line,
        name,
        escape,
        format: rest.concat(),
    })
}

fn upstream(d: &Directive, block: &[Directive]) -> Result<Upstream, ConfigError> {
    let name = first_arg(d)?.to_string();
    let mut servers = Vec::new();
    for s in block
        .iter()
        .filter(|s| s.name == "server" && s.block.is_none())
    {
        let address = first_arg(s)?.to_string();
        let mut u = UpstreamServer {
            line: s.line,
            socket_addr: socket_addr(&address),
            address,
            weight: 1,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            max_conns: 0,
            backup: false,
            down: false,
            other: Vec::new(),
        };
        for p in &s.args[1..] {
            let num = |v: &str| v.parse::<u32>().map_err(|_| invalid(s, p));
            match p.split_once('=') {
                Some(("weight", v)) => u.weight = num(v)?,
                Some(("max_fails", v)) => u.max_fails = num(v)?,
                Some(("max_conns", v)) => u.max_conns = num(v)?,
                Some(("fail_timeout", v)) => {
                    u.fail_timeout = parse_time(v).ok_or_else(|| invalid(s, p))?;
                }
                None if p == "backup" => u.backup = true,
                None if p == "down" => u.down = true,
                _ => u.other.push(p.clone()),
            }
        }
        servers.push(u);
    }
    Ok(Upstream {
        line: d.line,
        name,
        servers,
    })
}

fn server(
    d: &Directive,
    block: &[Directive],
    bind: Option<&str>,
) -> Result<ServerBlock, ConfigError> {
    let bind = own(block, "proxy_bind").or(bind);
    let mut s = ServerBlock {
        line: d.line,
        listen: Vec::new(),
        server_names: Vec::new(),
        proxy_bind: bind.map(str::to_string),
        proxy_pass: own(block, "proxy_pass").map(str::to_string),
        locations: Vec::new(),
    };
    for x in block {
        match (x.name.as_str(), &x.block) {
            ("listen", None) => {
                let address = first_arg(x)?.to_string();
                let (ip, port) = listen_addr(&address);
                s.listen.push(Listen {
                    address,
                    ip,
                    port,
                    params: x.args[1..].to_vec(),
                });
            }
            ("server_name", None) => s.server_names.extend(x.args.iter().cloned()),
            ("location", Some(inner)) => locations(x, inner, bind, &mut s.locations),
            _ => {}
        }
    }
    Ok(s)
}

fn locations(d: &Directive, block: &[Directive], bind: Option<&str>, out: &mut Vec<LocationBlock>) {
    let bind = own(block, "proxy_bind").or(bind);
    out.push(LocationBlock {
        line: d.line,
        path: d.args.join(" "),
        proxy_bind: bind.map(str::to_string),
        proxy_pass: own(block, "proxy_pass").map(str::to_string),
    });
    for x in block {
        if let ("location", Some(inner)) = (x.name.as_str(), &x.block) {
            locations(x, inner, bind, out);
        }
    }
}

/// `ip`, `ip:port`, `[v6]`, `[v6]:port`.
fn socket_addr(s: &str) -> Option<SocketAddr> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa);
    }
    let ip = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    ip.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 80))
}

/// `listen` address: `port`, `addr`, `addr:port`, `*:port`, `[v6]:port`.
fn listen_addr(s: &str) -> (Option<IpAddr>, Option<u16>) {
    if s.starts_with("unix:") {
        return (None, None);
    }
    if let Ok(port) = s.parse::<u16>() {
        return (None, Some(port));
    }
    if let Some(sa) = socket_addr(s) {
        return (Some(sa.ip()), Some(sa.port()));
    }
    match s.rsplit_once(':') {
        // `*:80` or `host:80`.
        Some((_, port)) => (None, port.parse().ok()),
        // A host name alone.
        None => (None, Some(80)),
    }
}

/// nginx time: `30` (seconds), `500ms`, `10s`, `1m30s`, `1h`, `2d`, `1w`,
/// `1M` (30 days), `1y` (365 days).
fn parse_time(s: &str) -> Option<Duration> {
    if let Ok(n) = s.parse::<u64>() {
        return Some(Duration::from_secs(n));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit_ms, len): (u64, usize) = if rest.starts_with("ms") {
            (1, 2)
        } else {
            let ms = match rest.as_bytes().first()? {
                b's' => 1_000,
                b'm' => 60_000,
                b'h' => 3_600_000,
                b'd' => 86_400_000,
                b'w' => 7 * 86_400_000,
                b'M' => 30 * 86_400_000,
                b'y' => 365 * 86_400_000,
                _ => return None,
            };
            (ms, 1)
        };
        rest = &rest[len..];
        total = total.checked_add(Duration::from_millis(n.checked_mul(unit_ms)?))?;
    }
    Some(total)
}

/// A directive: `name args… ;` or `name args… { block }`.
#[derive(Debug)]
struct Directive {
    line: usize,
    name: String,
    args: Vec<String>,
    block: Option<Vec<Directive>>,
}

#[derive(Debug, PartialEq, Eq)]
enum Tok {
    Word(String),
    Open,
    Close,
    Semi,
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
    line: usize,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            s: text.as_bytes(),
            i: 0,
            line: 1,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        if c == b'\n' {
            self.line += 1;
        }
        Some(c)
    }

    /// The next token and its line.
    fn next(&mut self) -> Result<Option<(usize, Tok)>, ConfigError> {
        loop {
            match self.peek() {
                None => return Ok(None),
                Some(c) if c.is_ascii_whitespace() => {
                    self.bump();
                }
                Some(b'#') => {
                    while self.peek().is_some_and(|c| c != b'\n') {
                        self.bump();
                    }
                }
                Some(_) => break,
            }
        }
        let line = self.line;
        let tok = match self.peek() {
            Some(b'{') => {
                self.bump();
                Tok::Open
            }
            Some(b'}') => {
                self.bump();
                Tok::Close
            }
            Some(b';') => {
                self.bump();
                Tok::Semi
            }
            Some(q @ (b'"' | b'\'')) => {
                self.bump();
                let w = self.quoted(q, line)?;
                if let Some(c) = self.peek()
                    && !(c.is_ascii_whitespace() || matches!(c, b';' | b'{' | b'}'))
                {
                    return Err(ConfigError::Unexpected {
                        line: self.line,
                        token: format!("{:?} after a quoted string", char::from(c)),
                    });
                }
                Tok::Word(w)
            }
            _ => Tok::Word(self.word()),
        };
        Ok(Some((line, tok)))
    }

    fn quoted(&mut self, q: u8, line: usize) -> Result<String, ConfigError> {
        let mut out = Vec::new();
        loop {
            match self.bump() {
                None => {
                    return Err(ConfigError::UnexpectedEof {
                        line,
                        what: "a quoted string",
                    });
                }
                Some(c) if c == q => break,
                Some(b'\\') => match self.peek() {
                    Some(e @ (b'"' | b'\'' | b'\\')) => {
                        self.bump();
                        out.push(e);
                    }
                    Some(b't') => {
                        self.bump();
                        out.push(b'\t');
                    }
                    Some(b'r') => {
                        self.bump();
                        out.push(b'\r');
                    }
                    Some(b'n') => {
                        self.bump();
                        out.push(b'\n');
                    }
                    _ => out.push(b'\\'),
                },
                Some(c) => out.push(c),
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn word(&mut self) -> String {
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            match c {
                b'\\' => {
                    self.bump();
                    if let Some(e) = self.bump() {
                        out.push(e);
                    }
                }
                // `${name}` keeps its braces.
                b'$' if self.s.get(self.i + 1) == Some(&b'{') => {
                    while let Some(c) = self.bump() {
                        out.push(c);
                        if c == b'}' {
                            break;
                        }
                    }
                }
                c if c.is_ascii_whitespace() || matches!(c, b';' | b'{' | b'}') => break,
                c => {
                    self.bump();
                    out.push(c);
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Directives up to the `}` that closes the block opened at `open` (or the
/// end of the text at top level).
fn parse_block(lx: &mut Lexer<'_>, open: Option<usize>) -> Result<Vec<Directive>, ConfigError> {
    let mut out = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut start = 0;
    loop {
        let Some((line, tok)) = lx.next()? else {
            if let Some(line) = open {
                return Err(ConfigError::UnexpectedEof {
                    line,
                    what: "a block",
                });
            }
            if !words.is_empty() {
                return Err(ConfigError::UnexpectedEof {
                    line: start,
                    what: "a directive (missing `;`)",
                });
            }
            return Ok(out);
        };
        match tok {
            Tok::Word(w) => {
                if words.is_empty() {
                    start = line;
                }
                words.push(w);
            }
            Tok::Semi | Tok::Open if words.is_empty() => {
                return Err(ConfigError::Unexpected {
                    line,
                    token: if tok == Tok::Semi { "`;`" } else { "`{`" }.into(),
                });
            }
            Tok::Semi | Tok::Open => {
                let mut it = std::mem::take(&mut words).into_iter();
                let name = it.next().unwrap_or_default();
                let block = if tok == Tok::Open {
                    Some(parse_block(lx, Some(line))?)
                } else {
                    None
                };
                out.push(Directive {
                    line: start,
                    name,
                    args: it.collect(),
                    block,
                });
            }
            Tok::Close => {
                if open.is_none() {
                    return Err(ConfigError::Unexpected {
                        line,
                        token: "`}`".into(),
                    });
                }
                if !words.is_empty() {
                    return Err(ConfigError::Unexpected {
                        line,
                        token: "`}` (missing `;`)".into(),
                    });
                }
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_times() {
        assert_eq!(parse_time("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_time("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_time("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_time("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_time("1x"), None);
        assert_eq!(parse_time("s"), None);
        assert_eq!(parse_time(""), None);
    }

    #[test]
    fn listen_forms() {
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        assert_eq!(listen_addr("8080"), (None, Some(8080)));
        assert_eq!(listen_addr("127.0.0.1:81"), (ip("127.0.0.1"), Some(81)));
        assert_eq!(listen_addr("127.0.0.1"), (ip("127.0.0.1"), Some(80)));
        assert_eq!(listen_addr("[::1]:82"), (ip("::1"), Some(82)));
        assert_eq!(listen_addr("[::]"), (ip("::"), Some(80)));
        assert_eq!(listen_addr("*:83"), (None, Some(83)));
        assert_eq!(listen_addr("unix:/tmp/x"), (None, None));
    }

    #[test]
    fn lexer_quotes_comments_and_variables() {
        let mut lx = Lexer::new("a 'b c' \"d\\\"e\" ${x}y # c ; {\n;");
        let mut toks = Vec::new();
        while let Some((line, t)) = lx.next().unwrap() {
            toks.push((line, t));
        }
        assert_eq!(
            toks,
            [
                (1, Tok::Word("a".into())),
                (1, Tok::Word("b c".into())),
                (1, Tok::Word("d\"e".into())),
                (1, Tok::Word("${x}y".into())),
                (2, Tok::Semi),
            ]
        );
    }
}
