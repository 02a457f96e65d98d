//! The Redis backend: several ippool instances share one state.
//!
//! Each table is one Redis hash, `PREFIX:TABLE` (`ippool:bans`), field =
//! record key, value = the record's JSON, so `redis-cli HGETALL
//! ippool:bans` shows what the fleet holds. `PREFIX:meta` holds the format
//! version. A batch ([`Backend::apply`]) is one `MULTI … EXEC` that also
//! publishes one message per change on `PREFIX:changes`; [`Redis::changes`]
//! subscribes to that channel so an instance learns what the others did
//! (and is told to read everything again after it lost the subscription).
//!
//! Durability is the server's: with `appendonly yes` and `appendfsync
//! always` an acknowledged write survives a crash of Redis as it survives
//! one of the embedded store; with Redis's defaults up to a second of
//! writes can be lost on a crash of the Redis host.
//!
//! `rediss://` URLs speak TLS (rustls): the server's certificate is
//! checked against the system's CA bundle or the CA file of [`RedisTls`],
//! and a client certificate is presented when one is given (Redis asks for
//! one unless `tls-auth-clients` is `no`).
//!
//! The client is a small synchronous RESP2 client over one TCP connection
//! (the commands used are HGET, HGETALL, HSET, HDEL, MULTI/EXEC, PUBLISH,
//! SUBSCRIBE, AUTH, SELECT, and EVAL and DEL for [`Redis::count`]): it
//! keeps the store crate free of an async runtime and of a large
//! dependency. A call that finds the connection broken reconnects and
//! tries once more (every record write is idempotent), except a count's
//! additions, which are not.
//!
//! [`Redis::count`] keeps counters the instances of a fleet add to
//! together (`PREFIX:count:NAME`, each living for a window from its first
//! addition): the auto-blocker's offenses per client.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::{Backend, FORMAT_VERSION, Op, StoreError, Table};

/// How long connecting, and each read or write, may take.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a quiet subscription waits before it PINGs the server.
const PING_EVERY: Duration = Duration::from_secs(5);

/// How long a subscription may hear nothing (not even a PONG) before it
/// is taken for dead and opened again.
const DEAD_AFTER: Duration = Duration::from_secs(15);

/// The largest bulk string or array accepted from the server.
const MAX_BULK: usize = 64 * 1024 * 1024;

/// Where the Redis server is, from a `redis://` URL.
#[derive(Clone, PartialEq, Eq)]
struct Target {
    /// `rediss://`.
    tls: bool,
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
    db: u32,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Target {
    /// `redis://[[user]:password@]host[:port][/db]`, or `rediss://…` for
    /// TLS.
    fn parse(url: &str) -> Result<Target, String> {
        // Messages name the URL without its password.
        let shown = Target::redact(url);
        let (tls, rest) = match (url.strip_prefix("redis://"), url.strip_prefix("rediss://")) {
            (Some(rest), _) => (false, rest),
            (None, Some(rest)) => (true, rest),
            (None, None) => {
                return Err(format!(
                    "{shown:?}: a Redis URL starts with redis:// (or rediss:// for TLS)"
                ));
            }
        };
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (hostport, db) = match hostpart.split_once('/') {
            Some((hp, "")) => (hp, 0),
            Some((hp, db)) => (
                hp,
                db.parse::<u32>()
                    .map_err(|_| format!("database {db:?} in {shown:?} is not a number"))?,
            ),
            None => (hostpart, 0),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6
                .split_once(']')
                .ok_or_else(|| format!("{shown:?}: unclosed [ in the host"))?;
            (h.to_owned(), p.strip_prefix(':').unwrap_or(""))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p),
                None => (hostport.to_owned(), ""),
            }
        };
        if host.is_empty() {
            return Err(format!("{shown:?} names no host"));
        }
        let port = if port.is_empty() {
            6379
        } else {
            port.parse::<u16>()
                .map_err(|_| format!("port {port:?} in {shown:?} is not a port number"))?
        };
        let (username, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => (
                    (!u.is_empty()).then(|| percent_decoded(u)),
                    Some(percent_decoded(p)),
                ),
                None => (None, Some(percent_decoded(a))),
            },
        };
        Ok(Target {
            tls,
            host,
            port,
            username,
            password,
            db,
        })
    }

    /// `url` with anything before an `@` but the user name replaced by
    /// `***` (whatever the scheme, or without one).
    fn redact(url: &str) -> String {
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) => (format!("{s}://"), r),
            None => (String::new(), url),
        };
        match rest.rsplit_once('@') {
            Some((auth, host)) => {
                let user = auth.split_once(':').map_or("", |(u, _)| u);
                format!("{scheme}{user}:***@{host}")
            }
            None => url.to_owned(),
        }
    }

    /// The target without its password.
    fn describe(&self) -> String {
        let user = match (&self.username, &self.password) {
            (Some(u), _) => format!("{u}:***@"),
            (None, Some(_)) => "***@".to_owned(),
            (None, None) => String::new(),
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://{user}{host}:{}/{}", self.port, self.db)
    }
}

/// `%XX` escapes decoded (as redis-cli and other clients read the user
/// part of a URL); anything else kept as it is.
fn percent_decoded(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A reply from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// TLS for `rediss://` URLs: whom to trust, and what to show the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisTls {
    /// A PEM file of the CA certificates that sign the server's
    /// certificate. Default: the system's bundle (`SSL_CERT_FILE`, else
    /// the usual places of Debian, Red Hat, Alpine and the BSDs).
    pub ca_file: Option<PathBuf>,
    /// A PEM certificate chain and its PEM private key, presented to the
    /// server (Redis asks for one unless `tls-auth-clients no`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Where systems keep their CA bundle.
const SYSTEM_CA_FILES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

impl RedisTls {
    /// The client configuration; errors name the file and what is wrong.
    fn config(&self) -> Result<Arc<ClientConfig>, String> {
        let mut roots = RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                for cert in pem_certs(path)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("CA file {}: {e}", path.display()))?;
                }
            }
            None => {
                // SSL_CERT_FILE, when set, is the bundle (as for OpenSSL):
                // a wrong one is an error, not a reason to trust another.
                let path = match std::env::var_os("SSL_CERT_FILE") {
                    Some(p) => PathBuf::from(p),
                    None => SYSTEM_CA_FILES
                        .iter()
                        .map(PathBuf::from)
                        .find(|p| p.is_file())
                        .ok_or_else(|| {
                            format!(
                                "no CA bundle found (SSL_CERT_FILE, {}): give a CA file",
                                SYSTEM_CA_FILES.join(", ")
                            )
                        })?,
                };
                // A system bundle may hold a certificate webpki cannot
                // use; the others still count.
                let (added, _) = roots.add_parsable_certificates(pem_certs(&path)?);
                if added == 0 {
                    return Err(format!("{}: no usable CA certificate", path.display()));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = pem_certs(cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("client key {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("client certificate {}: {e}", cert.display()))?
            }
        };
        Ok(Arc::new(config))
    }
}

/// The certificates of a PEM file (at least one).
fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE in the file", path.display()));
    }
    Ok(certs)
}

/// A connection's bytes: plain TCP or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

/// One connection to the server.
struct Conn {
    /// Reads are buffered; writes go to the stream underneath.
    reader: BufReader<Stream>,
}

impl Conn {
    fn open(t: &Target, tls: Option<&Arc<ClientConfig>>) -> io::Result<Conn> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host resolves to no address");
        for addr in (t.host.as_str(), t.port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(IO_TIMEOUT))?;
                    s.set_write_timeout(Some(IO_TIMEOUT))?;
                    let stream = match tls {
                        None => Stream::Plain(s),
                        Some(config) => Stream::Tls(Box::new(handshake(t, config, s)?)),
                    };
                    let mut c = Conn {
                        reader: BufReader::new(stream),
                    };
                    c.hello(t)?;
                    return Ok(c);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.reader.get_ref().tcp().set_read_timeout(Some(timeout))
    }

    /// AUTH and SELECT as the URL asks.
    fn hello(&mut self, t: &Target) -> io::Result<()> {
        if let Some(p) = &t.password {
            let reply = match &t.username {
                Some(u) => self.call(&[b"AUTH", u.as_bytes(), p.as_bytes()])?,
                None => self.call(&[b"AUTH", p.as_bytes()])?,
            };
            ok(reply, "AUTH")?;
        }
        if t.db != 0 {
            let db = t.db.to_string();
            ok(self.call(&[b"SELECT", db.as_bytes()])?, "SELECT")?;
        }
        Ok(())
    }

    fn send(&mut self, commands: &[Vec<&[u8]>]) -> io::Result<()> {
        let mut out = Vec::with_capacity(256);
        for args in commands {
            encode(&mut out, args);
        }
        let stream = self.reader.get_mut();
        stream.write_all(&out)?;
        stream.flush()
    }

    fn call(&mut self, args: &[&[u8]]) -> io::Result<Reply> {
        self.send(&[args.to_vec()])?;
        read_reply(&mut self.reader)
    }
}

/// TLS over `tcp` to the server of `t`, handshake done (so that a refused
/// certificate is reported as such, not as a failed command).
fn handshake(
    t: &Target,
    config: &Arc<ClientConfig>,
    mut tcp: TcpStream,
) -> io::Result<StreamOwned<ClientConnection, TcpStream>> {
    // Not retried by `Redis::run` (kind Other): a refused certificate or
    // a server that does not speak TLS fails the same way again.
    let tls_error = |e: &dyn std::fmt::Display| io::Error::other(format!("TLS handshake: {e}"));
    let name = ServerName::try_from(t.host.clone()).map_err(|e| tls_error(&e))?;
    let mut conn = ClientConnection::new(Arc::clone(config), name).map_err(|e| tls_error(&e))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| match e.kind() {
            // A plain Redis waits for the rest of what it takes for a
            // command: no answer at all.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => tls_error(&format!(
                "no answer within {IO_TIMEOUT:?} (if that port speaks plain RESP, the URL is redis://)"
            )),
            _ => tls_error(&e),
        })?;
    }
    Ok(StreamOwned::new(conn, tcp))
}

/// What to do about a connection error that has a usual cause.
fn hint(e: &io::Error, t: &Target) -> &'static str {
    let text = e.to_string();
    if text.contains("CertificateRequired") {
        " (the server asks for a client certificate: give one, with its key)"
    } else if !t.tls
        && matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
        )
    {
        " (if that port speaks TLS, the URL is rediss://)"
    } else {
        ""
    }
}

/// Appends one command as a RESP array of bulk strings.
fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

fn protocol(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    r.by_ref().take(64 * 1024).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection",
        ));
    }
    if !line.ends_with(b"\r\n") {
        return Err(protocol("a reply line without CRLF".into()));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| protocol("a reply line that is not UTF-8".into()))
}

fn read_len(text: &str) -> io::Result<Option<usize>> {
    match text.parse::<i64>() {
        Ok(-1) => Ok(None),
        Ok(n) if n >= 0 && (n as usize) <= MAX_BULK => Ok(Some(n as usize)),
        _ => Err(protocol(format!("bad length {text:?} in a reply"))),
    }
}

/// How deep arrays may nest in a reply (the replies used here nest two).
const MAX_DEPTH: usize = 4;

/// Reads one reply (nested arrays included, up to [`MAX_DEPTH`]).
fn read_reply(r: &mut impl BufRead) -> io::Result<Reply> {
    read_nested(r, 0)
}

fn read_nested(r: &mut impl BufRead, depth: usize) -> io::Result<Reply> {
    let line = read_line(r)?;
    let Some(&kind) = line.as_bytes().first() else {
        return Err(protocol("an empty reply line".into()));
    };
    // An ASCII type byte: slicing after it is on a char boundary.
    let rest = if kind.is_ascii() { &line[1..] } else { "" };
    Ok(match kind {
        b'+' => Reply::Simple(rest.to_owned()),
        b'-' => Reply::Error(rest.to_owned()),
        b':' => Reply::Int(
            rest.parse()
                .map_err(|_| protocol(format!("bad integer {rest:?}")))?,
        ),
        b'$' => match read_len(rest)? {
            None => Reply::Bulk(None),
            Some(n) => {
                let mut b = vec![0; n + 2];
                r.read_exact(&mut b)?;
                if !b.ends_with(b"\r\n") {
                    return Err(protocol("a bulk string without CRLF".into()));
                }
                b.truncate(n);
                Reply::Bulk(Some(b))
            }
        },
        b'*' => match read_len(rest)? {
            None => Reply::Array(None),
            Some(_) if depth >= MAX_DEPTH => {
                return Err(protocol("arrays nested too deep in a reply".into()));
            }
            Some(n) => {
                let mut items = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    items.push(read_nested(r, depth + 1)?);
                }
                Reply::Array(Some(items))
            }
        },
        _ => return Err(protocol(format!("unknown reply {line:?}"))),
    })
}

/// An error reply as an error.
fn ok(reply: Reply, what: &str) -> io::Result<Reply> {
    match reply {
        Reply::Error(e) => Err(io::Error::other(format!("{what}: {e}"))),
        r => Ok(r),
    }
}

/// One change another instance made, from [`Redis::changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `key` of `table` was written: read it with [`Backend::get`].
    Put(Table, String),
    /// `key` of `table` was removed.
    Delete(Table, String),
    /// The subscription was lost and is back: changes may have been
    /// missed, read the tables again.
    Resync,
}

/// The changes other instances publish, as they come
/// ([`Redis::changes`]). Dropping it ends the subscription (within a
/// second).
#[derive(Debug)]
pub struct Changes {
    rx: mpsc::Receiver<Change>,
    stop: Arc<AtomicBool>,
}

impl Changes {
    /// The next change, waiting up to `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Change, mpsc::RecvTimeoutError> {
        self.rx.recv_timeout(timeout)
    }
}

impl Drop for Changes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Adds ARGV[1] to KEYS[1] and gives it a life of ARGV[2] ms if it has
/// none (it was just made): atomic, so a counter never outlives its window.
const COUNT_SCRIPT: &str = "local n = redis.call('INCRBY', KEYS[1], ARGV[1]) \
     if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end \
     return n";

/// The Redis backend (see the module docs).
pub struct Redis {
    target: Target,
    /// With a `rediss://` URL.
    tls: Option<Arc<ClientConfig>>,
    prefix: String,
    /// Names this instance in what it publishes, so it can skip its own.
    origin: String,
    conn: Mutex<Option<Conn>>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Redis {
    /// `url` with its password (anything before an `@` but the user name)
    /// replaced by `***`, for printing.
    pub fn redacted(url: &str) -> String {
        Target::redact(url)
    }

    /// Checks a URL as [`connect`](Redis::connect) reads it; the error
    /// says what is wrong (and never repeats a password).
    pub fn check_url(url: &str) -> Result<(), String> {
        Target::parse(url).map(drop)
    }

    /// Connects to the server of `url` (`redis://[[user]:password@]host[:port][/db]`,
    /// or `rediss://…` for TLS trusting the system's CA bundle) and checks
    /// the format of the state under `prefix` (keys `PREFIX:…`). Refuses a
    /// state written by a newer ippool, as the embedded store does.
    pub fn connect(url: &str, prefix: &str) -> Result<Redis, StoreError> {
        Redis::connect_with(url, prefix, &RedisTls::default())
    }

    /// [`connect`](Redis::connect), with the TLS settings of a `rediss://`
    /// URL (an error for a `redis://` one if any is set).
    pub fn connect_with(url: &str, prefix: &str, tls: &RedisTls) -> Result<Redis, StoreError> {
        let target = Target::parse(url).map_err(|reason| StoreError::Remote {
            target: Target::redact(url),
            operation: "parse the URL",
            reason,
        })?;
        let tls = match (target.tls, tls == &RedisTls::default()) {
            (true, _) => Some(tls.config().map_err(|reason| StoreError::Remote {
                target: target.describe(),
                operation: "set up TLS",
                reason,
            })?),
            (false, true) => None,
            (false, false) => {
                return Err(StoreError::Remote {
                    target: target.describe(),
                    operation: "set up TLS",
                    reason: "TLS settings are given, but the URL is redis://: use rediss://".into(),
                });
            }
        };
        if prefix.is_empty() || prefix.contains(char::is_whitespace) {
            return Err(StoreError::Remote {
                target: target.describe(),
                operation: "use the prefix",
                reason: format!("prefix {prefix:?} must be non-empty, without white space"),
            });
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let r = Redis {
            origin: format!("{:x}-{:x}", std::process::id(), nanos),
            prefix: prefix.to_owned(),
            conn: Mutex::new(None),
            target,
            tls,
        };
        let meta = format!("{}:meta", r.prefix);
        let found = r.run("read the format", |c| {
            c.call(&[b"HGET", meta.as_bytes(), b"format"])
        })?;
        match found {
            Reply::Bulk(None) => {
                let v = FORMAT_VERSION.to_string();
                r.run("write the format", |c| {
                    ok(
                        c.call(&[b"HSETNX", meta.as_bytes(), b"format", v.as_bytes()])?,
                        "HSETNX",
                    )
                })?;
            }
            Reply::Bulk(Some(v)) => {
                let text = String::from_utf8_lossy(&v).into_owned();
                match text.parse::<u32>() {
                    Ok(n) if n <= FORMAT_VERSION => {}
                    _ => {
                        return Err(StoreError::Remote {
                            target: r.describe(),
                            operation: "read the format",
                            reason: format!(
                                "{meta} says format {text:?}, this ippool reads up to {FORMAT_VERSION}: \
                                 run the newer ippool, or use another prefix"
                            ),
                        });
                    }
                }
            }
            Reply::Error(e) => {
                let hint = if e.starts_with("NOAUTH") {
                    " (the server wants a password: redis://:PASSWORD@host, or \
                     redis://USER:PASSWORD@host for an ACL user)"
                } else {
                    ""
                };
                return Err(StoreError::Remote {
                    target: r.describe(),
                    operation: "read the format",
                    reason: format!("the server answered: {e}{hint}"),
                });
            }
            other => {
                return Err(StoreError::Remote {
                    target: r.describe(),
                    operation: "read the format",
                    reason: format!("unexpected reply {other:?}"),
                });
            }
        }
        Ok(r)
    }

    fn key(&self, table: Table) -> String {
        format!("{}:{}", self.prefix, table.name())
    }

    fn channel(&self) -> String {
        format!("{}:changes", self.prefix)
    }

    /// Runs `f` on the connection, opening it if needed; on an I/O error
    /// reopens it and runs `f` once more.
    fn run<T>(
        &self,
        operation: &'static str,
        f: impl Fn(&mut Conn) -> io::Result<T>,
    ) -> Result<T, StoreError> {
        self.run_tries(operation, 2, f)
    }

    /// [`run`](Redis::run), with `f` run at most `tries` times (1 for what
    /// must not be done twice: a connection that broke mid-reply leaves
    /// unknown whether the server did it).
    fn run_tries<T>(
        &self,
        operation: &'static str,
        tries: usize,
        f: impl Fn(&mut Conn) -> io::Result<T>,
    ) -> Result<T, StoreError> {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut last = None;
        for _ in 0..tries {
            let conn = match slot.as_mut() {
                Some(c) => c,
                None => match Conn::open(&self.target, self.tls.as_ref()) {
                    Ok(c) => slot.insert(c),
                    Err(e) => {
                        // An error reply (AUTH refused) or a failed TLS
                        // handshake fails the same way again.
                        let again = e.kind() != io::ErrorKind::Other;
                        last = Some(e);
                        if again {
                            continue;
                        }
                        break;
                    }
                },
            };
            match f(conn) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    // The connection may be mid-reply: a fresh one next
                    // time. An `Other` error (what the server answered, or
                    // what the caller made of it) fails the same way
                    // again: not retried.
                    *slot = None;
                    if e.kind() == io::ErrorKind::Other {
                        last = Some(e);
                        break;
                    }
                    last = Some(e);
                }
            }
        }
        Err(StoreError::Remote {
            target: self.describe(),
            operation,
            reason: last.map_or_else(
                || "unknown error".into(),
                |e| format!("{e}{}", hint(&e, &self.target)),
            ),
        })
    }

    /// Sends `commands` in one write and reads their replies (error
    /// replies included, in order); tried again on a fresh connection
    /// only if `idempotent`.
    fn pipeline(
        &self,
        operation: &'static str,
        idempotent: bool,
        commands: &[Vec<Vec<u8>>],
    ) -> Result<Vec<Reply>, StoreError> {
        self.run_tries(operation, if idempotent { 2 } else { 1 }, |c| {
            let borrowed: Vec<Vec<&[u8]>> = commands
                .iter()
                .map(|cmd| cmd.iter().map(Vec::as_slice).collect())
                .collect();
            c.send(&borrowed)?;
            let mut replies = Vec::with_capacity(commands.len());
            for _ in 0..commands.len() {
                replies.push(read_reply(&mut c.reader)?);
            }
            Ok(replies)
        })
    }

    /// Adds `n` to each named counter (Redis keys `PREFIX:count:NAME`) and
    /// returns the new totals, in order (each, or the server's error for
    /// that counter): a count that the instances of a
    /// fleet keep together (offenses per client). A counter lives for
    /// `window` from its first addition, then starts again from zero (a
    /// fixed window, not a sliding one). One round trip for all of them,
    /// never sent twice: if the connection breaks before the totals come
    /// back, the additions may or may not have been made.
    pub fn count(
        &self,
        counts: &[(&str, u64)],
        window: Duration,
    ) -> Result<Vec<Result<u64, String>>, StoreError> {
        if counts.is_empty() {
            return Ok(Vec::new());
        }
        let ms = window.as_millis().clamp(1, i64::MAX as u128).to_string();
        let commands: Vec<Vec<Vec<u8>>> = counts
            .iter()
            .map(|(name, n)| {
                vec![
                    b"EVAL".to_vec(),
                    COUNT_SCRIPT.as_bytes().to_vec(),
                    b"1".to_vec(),
                    self.count_key(name).into_bytes(),
                    n.to_string().into_bytes(),
                    ms.clone().into_bytes(),
                ]
            })
            .collect();
        let replies = self.pipeline("count", false, &commands)?;
        Ok(replies
            .into_iter()
            .map(|r| match r {
                Reply::Int(n) => Ok(u64::try_from(n).unwrap_or(0)),
                Reply::Error(e) => Err(e),
                other => Err(format!("EVAL answered {other:?}")),
            })
            .collect())
    }

    /// Forgets the named counters of [`count`](Redis::count) (a ban was
    /// taken on them).
    pub fn forget_counts(&self, names: &[&str]) -> Result<(), StoreError> {
        if names.is_empty() {
            return Ok(());
        }
        let mut del = vec![b"DEL".to_vec()];
        del.extend(names.iter().map(|n| self.count_key(n).into_bytes()));
        match self.pipeline("forget counts", true, &[del])?.pop() {
            Some(Reply::Int(_)) => Ok(()),
            other => Err(StoreError::Remote {
                target: self.describe(),
                operation: "forget counts",
                reason: format!("DEL answered {other:?}"),
            }),
        }
    }

    fn count_key(&self, name: &str) -> String {
        format!("{}:count:{name}", self.prefix)
    }

    /// Subscribes to the changes other instances make. Returns once the
    /// subscription is in place: a change made after this returns is
    /// delivered (or, after a lost connection, a [`Change::Resync`]).
    pub fn changes(&self) -> Result<Changes, StoreError> {
        let fail = |e: io::Error| StoreError::Remote {
            target: self.describe(),
            operation: "subscribe to changes",
            reason: format!("{e}{}", hint(&e, &self.target)),
        };
        let channel = self.channel();
        let conn = subscribe(&self.target, self.tls.as_ref(), &channel).map_err(fail)?;
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let follower = Follower {
            target: self.target.clone(),
            tls: self.tls.clone(),
            channel,
            origin: self.origin.clone(),
            tx,
            stop: Arc::clone(&stop),
        };
        std::thread::Builder::new()
            .name("store-changes".into())
            .spawn(move || follower.run(conn))
            .map_err(fail)?;
        Ok(Changes { rx, stop })
    }
}

/// Opens a connection subscribed to `channel`, reading with a short
/// timeout so the follower can notice it should stop.
fn subscribe(t: &Target, tls: Option<&Arc<ClientConfig>>, channel: &str) -> io::Result<Conn> {
    let mut c = Conn::open(t, tls)?;
    let reply = ok(c.call(&[b"SUBSCRIBE", channel.as_bytes()])?, "SUBSCRIBE")?;
    match reply {
        Reply::Array(Some(items))
            if items.first() == Some(&Reply::Bulk(Some(b"subscribe".to_vec()))) => {}
        other => return Err(protocol(format!("SUBSCRIBE answered {other:?}"))),
    }
    c.set_read_timeout(Duration::from_secs(1))?;
    Ok(c)
}

/// The thread behind [`Changes`].
struct Follower {
    target: Target,
    tls: Option<Arc<ClientConfig>>,
    channel: String,
    origin: String,
    tx: mpsc::Sender<Change>,
    stop: Arc<AtomicBool>,
}

impl Follower {
    fn run(self, first: Conn) {
        let mut conn = Some(first);
        let mut backoff = Duration::from_millis(100);
        // A subscription that died without a FIN (a rebooted host, a NAT
        // that forgot the flow) looks idle: PING when quiet, and give up
        // on it when nothing at all came back for a while.
        let mut heard = Instant::now();
        let mut pinged = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            let Some(c) = conn.as_mut() else {
                std::thread::sleep(backoff);
                match subscribe(&self.target, self.tls.as_ref(), &self.channel) {
                    Ok(c) => {
                        conn = Some(c);
                        backoff = Duration::from_millis(100);
                        heard = Instant::now();
                        if self.tx.send(Change::Resync).is_err() {
                            return;
                        }
                    }
                    Err(_) => backoff = (backoff * 2).min(Duration::from_secs(5)),
                }
                continue;
            };
            // Wait (up to the read timeout) for a message to begin; a
            // reply cut by a timeout halfway would leave the stream out of
            // step, so only an idle wait counts as "nothing yet".
            match c.reader.fill_buf() {
                Ok([]) => {
                    conn = None;
                    continue;
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if heard.elapsed() >= DEAD_AFTER {
                        conn = None;
                    } else if heard.elapsed() >= PING_EVERY && pinged.elapsed() >= PING_EVERY {
                        pinged = Instant::now();
                        if c.send(&[vec![b"PING".as_slice()]]).is_err() {
                            conn = None;
                        }
                    }
                    continue;
                }
                Err(_) => {
                    conn = None;
                    continue;
                }
            }
            match read_reply(&mut c.reader) {
                Ok(reply) => {
                    heard = Instant::now();
                    if let Some(change) = self.parse(reply)
                        && self.tx.send(change).is_err()
                    {
                        return;
                    }
                }
                Err(_) => conn = None,
            }
        }
    }

    /// A published message as a change, unless it is this instance's own
    /// or not one of ours.
    fn parse(&self, reply: Reply) -> Option<Change> {
        let Reply::Array(Some(items)) = reply else {
            return None;
        };
        let [Reply::Bulk(Some(kind)), _, Reply::Bulk(Some(payload))] = items.as_slice() else {
            return None;
        };
        if kind != b"message" {
            return None;
        }
        let text = std::str::from_utf8(payload).ok()?;
        let mut parts = text.splitn(4, ' ');
        let (origin, op, table, key) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if origin == self.origin {
            return None;
        }
        let table = Table::from_name(table)?;
        match op {
            "put" => Some(Change::Put(table, key.to_owned())),
            "del" => Some(Change::Delete(table, key.to_owned())),
            _ => None,
        }
    }
}

impl Backend for Redis {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let hash = self.key(table);
        match self.run("read", |c| {
            ok(c.call(&[b"HGET", hash.as_bytes(), key.as_bytes()])?, "HGET")
        })? {
            Reply::Bulk(v) => Ok(v),
            other => Err(StoreError::Remote {
                target: self.describe(),
                operation: "read",
                reason: format!("HGET answered {other:?}"),
            }),
        }
    }

    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let hash = self.key(table);
        let reply = self.run("scan", |c| {
            ok(c.call(&[b"HGETALL", hash.as_bytes()])?, "HGETALL")
        })?;
        let bad = |what: String| StoreError::Remote {
            target: self.describe(),
            operation: "scan",
            reason: what,
        };
        let Reply::Array(Some(items)) = reply else {
            return Err(bad(format!("HGETALL answered {reply:?}")));
        };
        let mut out = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            let (Reply::Bulk(Some(k)), Reply::Bulk(Some(v))) = (k, v) else {
                return Err(bad("HGETALL answered a non-string field".into()));
            };
            let k =
                String::from_utf8(k).map_err(|_| bad(format!("a key of {hash} is not UTF-8")))?;
            out.push((k, v));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let channel = self.channel();
        let mut commands: Vec<Vec<Vec<u8>>> = vec![vec![b"MULTI".to_vec()]];
        for op in ops {
            let (table, key, cmd, word) = match op {
                Op::Put(t, k, v) => (
                    *t,
                    k,
                    vec![
                        b"HSET".to_vec(),
                        self.key(*t).into_bytes(),
                        k.clone().into_bytes(),
                        v.clone(),
                    ],
                    "put",
                ),
                Op::Delete(t, k) => (
                    *t,
                    k,
                    vec![
                        b"HDEL".to_vec(),
                        self.key(*t).into_bytes(),
                        k.clone().into_bytes(),
                    ],
                    "del",
                ),
            };
            commands.push(cmd);
            let note = format!("{} {word} {} {key}", self.origin, table.name());
            commands.push(vec![
                b"PUBLISH".to_vec(),
                channel.clone().into_bytes(),
                note.into_bytes(),
            ]);
        }
        commands.push(vec![b"EXEC".to_vec()]);
        let replies = self.pipeline("write", true, &commands)?;
        let refused = |reason: String| StoreError::Remote {
            target: self.describe(),
            operation: "write",
            reason,
        };
        // MULTI: +OK, each queued command: +QUEUED, EXEC: the results.
        if let Some(Reply::Error(e)) = replies.iter().find(|r| matches!(r, Reply::Error(_))) {
            return Err(refused(format!("the batch was refused: {e}")));
        }
        match replies.last() {
            Some(Reply::Array(Some(results))) => {
                if let Some(Reply::Error(e)) = results.iter().find(|r| matches!(r, Reply::Error(_)))
                {
                    return Err(refused(format!("a write failed: {e}")));
                }
                Ok(())
            }
            other => Err(refused(format!("EXEC answered {other:?}"))),
        }
    }

    fn describe(&self) -> String {
        format!("redis {} prefix {}", self.target.describe(), self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_print_without_the_password() {
        let t = Target::parse("redis://user:s3cret@cache.example:6380/2").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("cache.example", 6380, 2));
        assert_eq!(t.username.as_deref(), Some("user"));
        assert_eq!(t.password.as_deref(), Some("s3cret"));
        assert_eq!(t.describe(), "redis://user:***@cache.example:6380/2");
        let t = Target::parse("redis://:pw@[::1]").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("::1", 6379, 0));
        assert_eq!(t.username, None);
        assert_eq!(t.describe(), "redis://***@[::1]:6379/0");
        let t = Target::parse("redis://us%40r:p%3Aw%2Fd@h").unwrap();
        assert_eq!(t.username.as_deref(), Some("us@r"));
        assert_eq!(t.password.as_deref(), Some("p:w/d"), "percent-decoded");
        assert_eq!(Target::redact("u:pw@h:1"), "u:***@h:1", "no scheme");
        assert_eq!(Target::redact("redis://h:1/0"), "redis://h:1/0");
        let e = Target::parse("redis://:hunter2@h:99999").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        let t = Target::parse("rediss://:hunter2@h").unwrap();
        assert!(t.tls);
        assert_eq!(t.describe(), "rediss://***@h:6379/0");
        let e = Target::parse("rediss://:hunter2@h:0x").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        let t = Target::parse("redis://127.0.0.1:7000/").unwrap();
        assert_eq!((t.port, t.db, t.password), (7000, 0, None));
        for (bad, says) in [
            ("http://x", "redis://"),
            ("redis://", "no host"),
            ("redis://h:99999", "port"),
            ("redis://h/x", "database"),
            ("redis://[::1", "unclosed"),
        ] {
            let e = Target::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn replies_parse_and_bad_ones_are_errors() {
        let mut r = &b"*3\r\n$7\r\nmessage\r\n$-1\r\n:42\r\n+OK\r\n-ERR no\r\n"[..];
        assert_eq!(
            read_reply(&mut r).unwrap(),
            Reply::Array(Some(vec![
                Reply::Bulk(Some(b"message".to_vec())),
                Reply::Bulk(None),
                Reply::Int(42)
            ]))
        );
        assert_eq!(read_reply(&mut r).unwrap(), Reply::Simple("OK".into()));
        assert_eq!(read_reply(&mut r).unwrap(), Reply::Error("ERR no".into()));
        for bad in [
            &b"$5\r\nab\r\n"[..],
            b"$-7\r\n",
            b"?x\r\n",
            b"+OK\n",
            b":x\r\n",
            b"",
        ] {
            let mut r = bad;
            assert!(
                read_reply(&mut r).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A hostile or broken server: never a panic, never a deep stack.
        let mut r = "é\r\n".as_bytes();
        assert!(read_reply(&mut r).is_err());
        let deep = "*1\r\n".repeat(100_000);
        let mut r = deep.as_bytes();
        assert!(read_reply(&mut r).is_err());
        let mut r = &b"*2\r\n*1\r\n:1\r\n$2\r\nok\r\n"[..];
        assert!(read_reply(&mut r).is_ok(), "two levels are fine");
        let mut r = &b"$99999999999\r\n"[..];
        assert!(read_reply(&mut r).is_err(), "a length beyond the bound");
        let mut out = Vec::new();
        encode(&mut out, &[b"HGET", b"k", b""]);
        assert_eq!(out, b"*3\r\n$4\r\nHGET\r\n$1\r\nk\r\n$0\r\n\r\n");
    }
}
