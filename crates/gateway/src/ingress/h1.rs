//! The HTTP/1.1 fast path of plain ingress listeners.
//!
//! hyper serves every protocol the ingress speaks. For the most common
//! exchange, though (a plain HTTP/1.1 request with no body or a
//! `Content-Length` one, forwarded over a kept-alive backend connection),
//! its server and client dispatchers, header maps and body channels cost
//! more CPU than the forwarding itself. Here the client connection's task
//! parses the head in place (httparse), writes the rewritten head and the
//! body bytes already read to a pooled backend connection in one write,
//! reads the response head, and copies the response back with its framing
//! untouched (`Content-Length`, chunked, or until close): one read and one
//! write per side for a small exchange, no allocation per request.
//!
//! Anything else is handed to hyper on the same connection before a byte
//! of that request is consumed: HTTP/1.0, `Upgrade` (WebSocket, h2c),
//! `Transfer-Encoding` or `Expect` on a request, absolute-form or
//! non-ASCII targets, `CONNECT`, a missing or repeated `Host`, a head that
//! does not parse or is over the size limit, and the HTTP/2 preface. hyper
//! then serves the rest of that connection and answers as it always does
//! (400, 431, …). What the proxy answers itself on this path (404, 413,
//! 429, 502, 503, 504) and what it sends to backends (hop-by-hop headers
//! removed, `X-Forwarded-*`, `Forwarded`, `Via`) are the same as on the
//! hyper path; `tests/ingress_proxy.rs` runs against both.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use health::{Outcome, Verdict};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::backend::{BackendRt, inc};
use super::balance::{Mask, key_of};
use super::headers::push_param;
use super::metrics::Refusal;
use super::proxy::{Reject, connect, header_text};
use super::routes::{RouteRt, request_host};
use super::upstream::Registration;
use super::{Balance, Conn, Ctx, ERROR_HEADER};

/// Most headers in a request or response head (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// Read buffer size, and growth step.
const CHUNK: usize = 16 * 1024;
/// Response body bytes already read with the head that go out with it in
/// one write (more are written on their own).
const COALESCE: usize = 64 * 1024;

/// A connection to a backend used by the fast path, with its read buffer.
pub(crate) struct RawUpstream {
    // Dropped first: deregistered while the socket is still open.
    _reg: Registration,
    stream: TcpStream,
    buf: BytesMut,
}

impl RawUpstream {
    fn new(b: &Arc<BackendRt>, stream: TcpStream) -> RawUpstream {
        RawUpstream {
            _reg: Registration::new(b, stream.as_raw_fd()),
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Whether an idle connection was closed by the backend meanwhile (or
    /// sent something unasked). No system call when the socket has not
    /// been readable since it was last drained.
    fn stale(&self) -> bool {
        let mut b = [0u8; 1];
        match self.stream.try_read(&mut b) {
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
            Ok(_) => true,
        }
    }
}

/// How the fast path left a client connection.
pub(crate) enum Served {
    /// Closed, or to be closed.
    Done,
    /// To be served by hyper from here on; the bytes read and not yet
    /// consumed come first.
    Fallback(TcpStream, BytesMut),
}

/// What one buffered head asks for.
enum Prep {
    /// More bytes needed.
    Partial,
    /// Not for the fast path: hyper takes the connection.
    Fallback,
    /// Answered by the proxy. `consumed`: the head's length; `body`: the
    /// request body's (the connection closes after the answer if > 0).
    Answer {
        reject: Reject,
        retry_after: Option<u64>,
        consumed: usize,
        body: u64,
        /// The client asked to close after this exchange.
        close: bool,
        log: Option<LogInfo>,
    },
    /// To forward; the head to send is in the output buffer.
    Forward(Prepared),
}

/// A request to forward.
struct Prepared {
    route: Arc<RouteRt>,
    key: Option<u64>,
    head_len: usize,
    body: u64,
    /// The client asked to close after this exchange.
    close: bool,
    idempotent: bool,
    head: bool,
    log: Option<LogInfo>,
}

/// What the access log needs from a request head.
struct LogInfo {
    method: String,
    target: String,
    referer: Option<String>,
    user_agent: Option<String>,
}

fn is(name: &str, lower: &str) -> bool {
    name.eq_ignore_ascii_case(lower)
}

/// What `http::HeaderValue::to_str` accepts: visible ASCII, space, tab.
fn text(v: &[u8]) -> Option<&str> {
    if v.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)) {
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// A `Content-Length` value: digits only.
fn length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Headers never forwarded (RFC 9110 §7.6.1; `Transfer-Encoding`,
/// `Upgrade` and `Expect` requests never reach the rewrite).
fn hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
    ]
    .iter()
    .any(|h| is(name, h))
}

/// Whether `name` is listed in a `Connection` header (and so is
/// hop-by-hop), `Content-Length` and `Host` excepted as on the hyper path.
fn named_in(connection: &[&[u8]], name: &str) -> bool {
    if is(name, "content-length") || is(name, "host") || is(name, "transfer-encoding") {
        return false;
    }
    connection
        .iter()
        .flat_map(|v| tokens(v))
        .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
}

/// Appends `value`, trimmed, to a `", "`-joined list (the hyper path's
/// `joined`: empty and non-text values skipped).
fn join(list: &mut Vec<u8>, value: &[u8]) {
    let Some(v) = text(value) else { return };
    let v = v.trim();
    if v.is_empty() {
        return;
    }
    if !list.is_empty() {
        list.extend_from_slice(b", ");
    }
    list.extend_from_slice(v.as_bytes());
}

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Parses the head at the start of `buf` and, if the fast path takes it,
/// writes the head to send to the backend into `out`.
fn prepare(conn: &Conn, buf: &[u8], out: &mut Vec<u8>) -> Prep {
    let ctx = &*conn.ctx;
    let opts = &ctx.opts;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Prep::Partial,
        Err(_) => return Prep::Fallback,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Prep::Fallback;
    };
    if method == "CONNECT" || !target.starts_with('/') || !target.is_ascii() {
        return Prep::Fallback;
    }
    let headers: &[httparse::Header<'_>] = req.headers;

    // One pass for what decides the request's fate.
    let mut host: Option<&[u8]> = None;
    let mut hosts = 0;
    let mut body: Option<u64> = None;
    let mut close = false;
    let mut connection: [&[u8]; 4] = [&[]; 4];
    let mut n_connection = 0;
    for h in headers {
        let name = h.name;
        if is(name, "host") {
            hosts += 1;
            host = Some(h.value);
        } else if is(name, "content-length") {
            match (length(h.value), body) {
                (Some(n), None) => body = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return Prep::Fallback,
            }
        } else if is(name, "transfer-encoding") || is(name, "upgrade") || is(name, "expect") {
            return Prep::Fallback;
        } else if is(name, "connection") {
            if n_connection == connection.len() {
                return Prep::Fallback;
            }
            connection[n_connection] = h.value;
            n_connection += 1;
            close |= tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"close"));
        }
    }
    let connection = &connection[..n_connection];
    let body = body.unwrap_or(0);
    let (1, Some(host_raw)) = (hosts, host.and_then(text)) else {
        return Prep::Fallback;
    };
    let log = opts.access_log.as_ref().map(|_| {
        let get = |n: &str| {
            headers
                .iter()
                .find(|h| is(h.name, n))
                .and_then(|h| text(h.value))
                .map(str::to_owned)
        };
        LogInfo {
            method: method.to_owned(),
            target: target.to_owned(),
            referer: get("referer"),
            user_agent: get("user-agent"),
        }
    });
    let answer = |reject: Reject, retry_after: Option<u64>, log: Option<LogInfo>| Prep::Answer {
        reject,
        retry_after,
        consumed: head_len,
        body,
        close,
        log,
    };

    // The client's rate limit, per request (keep-alive does not escape it).
    if let Err(wait) = opts.guard.check_request(conn.peer.ip()) {
        let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        return answer(
            Reject::new(
                StatusCode::TOO_MANY_REQUESTS,
                Refusal::BadRequest,
                format!("too many requests from your address; retry after {secs}s"),
            ),
            Some(secs),
            log,
        );
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let host = request_host(host_raw);
    let Some(route) = opts.routes.find(&host, path) else {
        return answer(
            Reject::new(
                StatusCode::NOT_FOUND,
                Refusal::NoRoute,
                format!("no route for {host}{path}"),
            ),
            None,
            log,
        );
    };
    if let Some(max) = opts.max_body_bytes
        && body > max
    {
        return answer(
            Reject::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Refusal::TooLarge,
                format!("request body larger than {max} bytes"),
            ),
            None,
            log,
        );
    }
    let key = match &route.balance {
        Balance::Hash(_) => key_of(
            &route.balance,
            conn.peer.ip(),
            |name| {
                headers
                    .iter()
                    .find(|h| is(h.name, name.as_str()))
                    .map(|h| h.value)
            },
            || {
                headers
                    .iter()
                    .filter(|h| is(h.name, "cookie"))
                    .map(|h| h.value)
            },
        ),
        _ => None,
    };

    // The head for the backend.
    let fwd = &opts.forwarding;
    let client = &conn.client;
    let trusted = client.trusted;
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut xff: Vec<u8> = Vec::new();
    let mut forwarded: Vec<u8> = Vec::new();
    let (mut have_proto, mut have_host) = (false, false);
    for h in headers {
        let name = h.name;
        if hop_by_hop(name) || (!connection.is_empty() && named_in(connection, name)) {
            continue;
        }
        let x_for = is(name, "x-forwarded-for");
        let x_proto = !x_for && is(name, "x-forwarded-proto");
        let x_host = !x_for && !x_proto && is(name, "x-forwarded-host");
        if x_for || x_proto || x_host {
            if !trusted {
                continue;
            }
            if fwd.x_forwarded {
                if x_for {
                    join(&mut xff, h.value);
                    continue;
                }
                have_proto |= x_proto;
                have_host |= x_host;
            }
        } else if is(name, "forwarded") {
            if !trusted {
                continue;
            }
            if fwd.forwarded {
                join(&mut forwarded, h.value);
                continue;
            }
        }
        header_line(out, name.as_bytes(), h.value);
    }
    if fwd.x_forwarded {
        if !xff.is_empty() {
            xff.extend_from_slice(b", ");
        }
        xff.extend_from_slice(client.xff.as_bytes());
        header_line(out, b"X-Forwarded-For", &xff);
        if !(trusted && have_proto) {
            header_line(out, b"X-Forwarded-Proto", client.proto.as_bytes());
        }
        if !(trusted && have_host) {
            header_line(out, b"X-Forwarded-Host", host_raw.as_bytes());
        }
    }
    if fwd.forwarded {
        let mut s = String::with_capacity(forwarded.len() + 64);
        if !forwarded.is_empty() {
            s.push_str(std::str::from_utf8(&forwarded).unwrap_or(""));
            s.push_str(", ");
        }
        s.push_str("for=");
        s.push_str(&client.node);
        s.push_str(";host=");
        push_param(&mut s, host_raw);
        s.push_str(";proto=");
        s.push_str(client.proto);
        header_line(out, b"Forwarded", s.as_bytes());
    }
    if let Some(via) = &ctx.via {
        header_line(out, b"Via", via.get(http::Version::HTTP_11).as_bytes());
    }
    out.extend_from_slice(b"\r\n");

    Prep::Forward(Prepared {
        route: route.clone(),
        key,
        head_len,
        body,
        close,
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        head: method == "HEAD",
        log,
    })
}

/// A response the proxy makes itself, as the hyper path makes it.
fn write_reject(out: &mut Vec<u8>, rej: &Reject, close: bool, retry_after: Option<u64>) {
    use std::io::Write as _;
    let body_len = rej.reason.len() + 1;
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\n",
        rej.status.as_u16(),
        rej.status.canonical_reason().unwrap_or("")
    );
    header_line(
        out,
        ERROR_HEADER.as_bytes(),
        header_text(&rej.reason).as_bytes(),
    );
    if let Some(secs) = retry_after {
        let _ = write!(out, "retry-after: {secs}\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let _ = write!(out, "content-length: {body_len}\r\n\r\n{}\n", rej.reason);
}

/// Why reading more of a head stopped.
enum Wait {
    Data,
    Closed,
    TimedOut,
    Shutdown,
}

/// Reads more bytes of a head into `buf`, until `deadline`; while nothing
/// of the head has arrived yet, a shutdown ends the wait too.
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    deadline: Instant,
    shutdown: &mut watch::Receiver<bool>,
) -> Wait {
    buf.reserve(CHUNK);
    // Data already waiting: no timer.
    match stream.try_read_buf(buf) {
        Ok(0) => return Wait::Closed,
        Ok(_) => return Wait::Data,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(_) => return Wait::Closed,
    }
    let idle = buf.is_empty();
    tokio::select! {
        r = stream.read_buf(buf) => match r {
            Ok(1..) => Wait::Data,
            _ => Wait::Closed,
        },
        () = tokio::time::sleep_until(deadline) => Wait::TimedOut,
        _ = shutdown.wait_for(|s| *s), if idle => Wait::Shutdown,
    }
}

/// Serves a plain client connection until it closes or needs hyper.
pub(crate) async fn serve(conn: &Conn, mut stream: TcpStream) -> Served {
    let ctx = &*conn.ctx;
    let opts = &ctx.opts;
    let mut shutdown = ctx.shutdown.clone();
    let mut buf = BytesMut::with_capacity(CHUNK);
    let mut req_out: Vec<u8> = Vec::with_capacity(1024);
    let mut resp_out: Vec<u8> = Vec::with_capacity(1024);
    loop {
        if buf.is_empty() && *shutdown.borrow() {
            return Served::Done;
        }
        let deadline = Instant::now() + opts.header_read_timeout;
        let prep = loop {
            if !buf.is_empty() {
                match prepare(conn, &buf, &mut req_out) {
                    Prep::Partial if buf.len() < opts.max_header_bytes => {}
                    Prep::Partial | Prep::Fallback => return Served::Fallback(stream, buf),
                    p => break p,
                }
            }
            match read_more(&mut stream, &mut buf, deadline, &mut shutdown).await {
                Wait::Data => {}
                Wait::Closed | Wait::Shutdown => return Served::Done,
                Wait::TimedOut => {
                    if !buf.is_empty() {
                        ctx.metrics.malformed();
                        tracing::debug!(peer = %conn.peer, "request head not complete in time; closed");
                    }
                    return Served::Done;
                }
            }
        };
        let next = match prep {
            Prep::Answer {
                reject,
                retry_after,
                consumed,
                body,
                close,
                log,
            } => {
                buf.advance(consumed);
                let close = close || body > 0 || *shutdown.borrow();
                let log = log.map(|l| (l, std::time::SystemTime::now()));
                let a = Answer {
                    reject,
                    retry_after,
                    close,
                };
                answer(conn, &mut stream, &mut resp_out, a, log.as_ref()).await
            }
            Prep::Forward(p) => {
                buf.advance(p.head_len);
                // The body bytes read with the head go out with it.
                let with_head = usize::try_from(p.body).unwrap_or(usize::MAX).min(buf.len());
                req_out.extend_from_slice(&buf[..with_head]);
                buf.advance(with_head);
                let rest = p.body - with_head as u64;
                forward(
                    conn,
                    &mut stream,
                    &mut buf,
                    &req_out,
                    &mut resp_out,
                    p,
                    rest,
                )
                .await
            }
            Prep::Partial | Prep::Fallback => unreachable!("handled above"),
        };
        if matches!(next, Next::Close) {
            return Served::Done;
        }
        if buf.capacity() > 4 * CHUNK && buf.is_empty() {
            buf = BytesMut::with_capacity(CHUNK);
        }
    }
}

/// After an exchange.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

/// A response the proxy makes itself.
struct Answer {
    reject: Reject,
    retry_after: Option<u64>,
    close: bool,
}

/// An access-log entry for a request (its head, and when it came).
fn log_entry(
    conn: &Conn,
    (info, time): &(LogInfo, std::time::SystemTime),
    status: u16,
    bytes: u64,
) -> crate::access::AccessEntry {
    crate::access::AccessEntry {
        peer: conn.peer.ip(),
        user: None,
        time: *time,
        method: info.method.clone(),
        target: info.target.clone(),
        version: "HTTP/1.1",
        status,
        bytes,
        referer: info.referer.clone(),
        user_agent: info.user_agent.clone(),
    }
}

async fn answer(
    conn: &Conn,
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    a: Answer,
    log: Option<&(LogInfo, std::time::SystemTime)>,
) -> Next {
    let Answer {
        reject,
        retry_after,
        close,
    } = a;
    let ctx = &conn.ctx;
    if let (Some(l), Some(log)) = (&ctx.opts.access_log, log) {
        // As on the hyper path: no length is known for the proxy's own
        // answers there.
        l.record(log_entry(conn, log, reject.status.as_u16(), 0));
    }
    if reject.status != StatusCode::TOO_MANY_REQUESTS {
        ctx.metrics.refused(reject.kind);
    }
    tracing::debug!(peer = %conn.peer, status = %reject.status, reason = %reject.reason, "request answered by the proxy");
    write_reject(out, &reject, close, retry_after);
    ctx.metrics.response(reject.status, false);
    match stream.write_all(out).await {
        Ok(()) if !close => Next::KeepAlive,
        _ => Next::Close,
    }
}

/// How one attempt on one backend ended.
enum Attempt {
    /// A response head was read (rewritten into the response buffer).
    Answered(RawUpstream, RespHead, Option<Duration>),
    /// Nothing was sent: another backend may take the request.
    NotSent(Outcome, Reject),
    /// Sent (or the client's body failed): no retry. The outcome to
    /// record, if the backend is to blame.
    Failed(Option<Outcome>, Reject),
}

/// How a response body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the backend closes (the client connection closes too).
    UntilClose,
}

/// A response head read from a backend.
struct RespHead {
    status: u16,
    framing: Framing,
    /// The backend will close the connection after this response.
    backend_close: bool,
    /// `Content-Length` (for the access log).
    length: u64,
}

async fn forward(
    conn: &Conn,
    client: &mut TcpStream,
    cbuf: &mut BytesMut,
    req: &[u8],
    resp_out: &mut Vec<u8>,
    p: Prepared,
    rest: u64,
) -> Next {
    let ctx = &*conn.ctx;
    let opts = &ctx.opts;
    let log = p.log.map(|l| (l, std::time::SystemTime::now()));
    let route = &p.route;
    let deadline = Instant::now() + opts.request_timeout;
    let attempts = if p.idempotent {
        route.retries.saturating_add(1)
    } else {
        1
    };
    let measure = matches!(route.balance, Balance::P2cEwma);
    let mut tried = Mask::new(route.members.len());
    let mut last: Option<Reject> = None;
    let mut close_client = p.close;
    let mut failed: Option<Reject> = None;
    for n in 0..attempts {
        let picked = match route.pick(&tried, p.key) {
            Ok(x) => x,
            Err(none) => {
                failed = Some(last.take().unwrap_or_else(|| {
                    Reject::new(
                        route.no_backend_status,
                        Refusal::NoBackend,
                        none.to_string(),
                    )
                }));
                break;
            }
        };
        tried.set(picked.idx);
        if n > 0 {
            ctx.metrics.retry();
        }
        let b = picked.guard.backend().clone();
        inc(&b.stats.requests);
        let draining = *ctx.shutdown.borrow();
        let tried_once = attempt(
            ctx,
            &b,
            Sending {
                req,
                rest,
                idempotent: p.idempotent,
                head: p.head,
                close_client: close_client || draining,
            },
            client,
            cbuf,
            resp_out,
            deadline,
            measure,
        )
        .await;
        match tried_once {
            Attempt::Answered(mut up, head, latency) => {
                route
                    .state
                    .record(&b, picked.permit, Outcome::Status(head.status), latency);
                if let Some(l) = latency {
                    b.observe_latency(l);
                }
                ctx.metrics.response(
                    StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY),
                    false,
                );
                if let (Some(l), Some(log)) = (&opts.access_log, &log) {
                    l.record(log_entry(conn, log, head.status, head.length));
                }
                close_client |= draining || head.framing == Framing::UntilClose;
                let relayed = tokio::time::timeout_at(
                    deadline,
                    relay(&mut up, client, resp_out, head.framing),
                )
                .await;
                let reusable = match relayed {
                    Ok(Ok(clean)) => clean,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %conn.peer, backend = &*b.id, error = %e, "response relay ended early");
                        return Next::Close;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %conn.peer, backend = &*b.id, "response not complete within the request timeout; closed");
                        return Next::Close;
                    }
                };
                if reusable && !head.backend_close {
                    b.put_raw(up, opts.keep_alive.max_idle_per_backend);
                }
                drop(picked.guard);
                return if close_client {
                    Next::Close
                } else {
                    Next::KeepAlive
                };
            }
            Attempt::NotSent(outcome, reject) => {
                route.state.record(&b, picked.permit, outcome, None);
                tracing::debug!(route = &*route.name, backend = &*b.id, reason = %reject.reason, "attempt failed before sending");
                last = Some(reject);
            }
            Attempt::Failed(outcome, reject) => {
                if let Some(o) = outcome {
                    route.state.record(&b, picked.permit, o, None);
                }
                // Part of the request body may be consumed: close after.
                close_client |= rest > 0;
                failed = Some(reject);
                break;
            }
        }
    }
    let reject = failed.or(last).unwrap_or_else(|| {
        Reject::new(
            StatusCode::BAD_GATEWAY,
            Refusal::BadGateway,
            "no attempt made",
        )
    });
    let a = Answer {
        reject,
        retry_after: None,
        close: close_client || *ctx.shutdown.borrow(),
    };
    answer(conn, client, resp_out, a, log.as_ref()).await
}

/// The request of one attempt.
struct Sending<'a> {
    /// Head and the body bytes read with it.
    req: &'a [u8],
    /// Body bytes still to come from the client.
    rest: u64,
    idempotent: bool,
    head: bool,
    /// The client connection closes after this response.
    close_client: bool,
}

fn timed_out(ctx: &Ctx, b: &BackendRt) -> Attempt {
    inc(&b.stats.timeouts);
    Attempt::Failed(
        Some(Outcome::Timeout),
        Reject::new(
            StatusCode::GATEWAY_TIMEOUT,
            Refusal::Timeout,
            format!(
                "backend {} ({}) sent no response within {:?}",
                b.id, b.addr, ctx.opts.request_timeout
            ),
        ),
    )
}

fn backend_failed(b: &BackendRt, outcome: Outcome, what: &str) -> Attempt {
    if *b.kill.borrow() {
        // Removed while the request was in flight.
        return Attempt::Failed(
            None,
            Reject::new(
                StatusCode::BAD_GATEWAY,
                Refusal::BadGateway,
                format!("backend {} ({}) was removed", b.id, b.addr),
            ),
        );
    }
    Attempt::Failed(
        Some(outcome),
        Reject::new(
            StatusCode::BAD_GATEWAY,
            Refusal::BadGateway,
            format!("backend {} ({}): {what}", b.id, b.addr),
        ),
    )
}

/// Why sending a request body stopped.
enum BodyError {
    Client(io::Error),
    Backend(io::Error),
}

/// Copies `n` request body bytes from the client to the backend.
async fn copy_body(
    client: &mut TcpStream,
    cbuf: &mut BytesMut,
    up: &mut TcpStream,
    mut n: u64,
) -> Result<(), BodyError> {
    while n > 0 {
        cbuf.clear();
        cbuf.reserve(CHUNK);
        let got = client.read_buf(cbuf).await.map_err(BodyError::Client)?;
        if got == 0 {
            return Err(BodyError::Client(io::ErrorKind::UnexpectedEof.into()));
        }
        let take = usize::try_from(n).unwrap_or(usize::MAX).min(got);
        up.write_all(&cbuf[..take])
            .await
            .map_err(BodyError::Backend)?;
        cbuf.advance(take);
        n -= take as u64;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn attempt(
    ctx: &Ctx,
    b: &Arc<BackendRt>,
    s: Sending<'_>,
    client: &mut TcpStream,
    cbuf: &mut BytesMut,
    resp_out: &mut Vec<u8>,
    deadline: Instant,
    measure: bool,
) -> Attempt {
    let ttl = ctx.opts.keep_alive.idle_timeout;
    let mut fresh_only = false;
    loop {
        let pooled = if fresh_only { None } else { b.take_raw(ttl) };
        let (mut up, reused) = match pooled {
            Some(up) if up.stale() => continue,
            Some(up) => (up, true),
            None => match connect(ctx, b, deadline).await {
                Ok(stream) => (RawUpstream::new(b, stream), false),
                Err((outcome, reject)) => return Attempt::NotSent(outcome, reject),
            },
        };
        let t0 = measure.then(Instant::now);
        match tokio::time::timeout_at(deadline, up.stream.write_all(s.req)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) if reused => {
                // Closed by the backend while idle: a new connection.
                fresh_only = true;
                continue;
            }
            Ok(Err(e)) => {
                return Attempt::NotSent(
                    Outcome::EarlyEof,
                    Reject::new(
                        StatusCode::BAD_GATEWAY,
                        Refusal::BadGateway,
                        format!(
                            "backend {} ({}) closed the connection before the request was sent: {e}",
                            b.id, b.addr
                        ),
                    ),
                );
            }
            Err(_) => return timed_out(ctx, b),
        }
        if s.rest > 0 {
            match tokio::time::timeout_at(deadline, copy_body(client, cbuf, &mut up.stream, s.rest))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(BodyError::Client(e))) => {
                    return Attempt::Failed(
                        None,
                        Reject::new(
                            StatusCode::BAD_REQUEST,
                            Refusal::BadRequest,
                            format!("reading the request body failed: {e}"),
                        ),
                    );
                }
                Ok(Err(BodyError::Backend(e))) => {
                    return backend_failed(b, Outcome::EarlyEof, &e.to_string());
                }
                Err(_) => return timed_out(ctx, b),
            }
        }
        up.buf.clear();
        match tokio::time::timeout_at(
            deadline,
            read_head(&mut up, resp_out, s.head, s.close_client),
        )
        .await
        {
            Ok(Ok(head)) => return Attempt::Answered(up, head, t0.map(|t| t.elapsed())),
            Ok(Err(HeadError::Eof | HeadError::Io(_)))
                if reused && s.rest == 0 && s.idempotent =>
            {
                // A kept-alive connection the backend closed (or reset)
                // as the request went out: once more on a new one.
                fresh_only = true;
                continue;
            }
            Ok(Err(HeadError::Eof)) => {
                return backend_failed(
                    b,
                    Outcome::EarlyEof,
                    "closed the connection without a response",
                );
            }
            Ok(Err(HeadError::Io(e))) => {
                return backend_failed(b, Outcome::EarlyEof, &e.to_string());
            }
            Ok(Err(HeadError::Invalid(why))) => {
                return backend_failed(b, Outcome::Reported(Verdict::Failure), why);
            }
            Err(_) => return timed_out(ctx, b),
        }
    }
}

enum HeadError {
    /// Closed before a complete head.
    Eof,
    Io(io::Error),
    Invalid(&'static str),
}

/// Reads a response head from `up` (skipping interim 1xx ones) and writes
/// the head for the client into `out`; the head's bytes are consumed from
/// `up.buf`, body bytes read with it stay there.
async fn read_head(
    up: &mut RawUpstream,
    out: &mut Vec<u8>,
    head_request: bool,
    close_client: bool,
) -> Result<RespHead, HeadError> {
    loop {
        if !up.buf.is_empty() {
            match parse_response(&up.buf, out, head_request, close_client)? {
                Some((len, head)) => {
                    up.buf.advance(len);
                    match head {
                        Some(h) => return Ok(h),
                        // An interim response: the final one follows.
                        None => continue,
                    }
                }
                None if up.buf.len() >= super::MAX_HEADER_BYTES => {
                    return Err(HeadError::Invalid("response head too large"));
                }
                None => {}
            }
        }
        up.buf.reserve(CHUNK);
        match up.stream.read_buf(&mut up.buf).await {
            Ok(0) => return Err(HeadError::Eof),
            Ok(_) => {}
            Err(e) => return Err(HeadError::Io(e)),
        }
    }
}

/// Parses a response head at the start of `buf`. `Ok(None)`: incomplete;
/// `Ok(Some((len, None)))`: an interim (1xx) response of `len` bytes to
/// skip; `Ok(Some((len, Some(head))))`: the final head, rewritten into
/// `out`.
#[allow(clippy::type_complexity)]
fn parse_response(
    buf: &[u8],
    out: &mut Vec<u8>,
    head_request: bool,
    close_client: bool,
) -> Result<Option<(usize, Option<RespHead>)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(HeadError::Invalid("malformed response head")),
    };
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return Err(HeadError::Invalid("malformed response head"));
    };
    if status == 101 {
        return Err(HeadError::Invalid(
            "backend switched protocols without being asked",
        ));
    }
    if (100..200).contains(&status) {
        return Ok(Some((len, None)));
    }
    let headers: &[httparse::Header<'_>] = resp.headers;
    let mut connection: [&[u8]; 4] = [&[]; 4];
    let mut n_connection = 0;
    let mut backend_close = version == 0;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut encoded = false;
    for h in headers {
        let name = h.name;
        if is(name, "content-length") {
            match (self::length(h.value), length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return Err(HeadError::Invalid("invalid Content-Length in the response")),
            }
        } else if is(name, "transfer-encoding") {
            encoded = true;
            chunked = tokens(h.value)
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if is(name, "connection") {
            if n_connection < connection.len() {
                connection[n_connection] = h.value;
                n_connection += 1;
            }
            if tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"close")) {
                backend_close = true;
            } else if version == 0 && tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"keep-alive"))
            {
                backend_close = false;
            }
        }
    }
    let connection = &connection[..n_connection];
    let framing = if head_request || status == 204 || status == 304 {
        Framing::None
    } else if encoded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let close = close_client || framing == Framing::UntilClose;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(status).as_slice());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in headers {
        let name = h.name;
        if hop_by_hop(name)
            || is(name, "upgrade")
            || (encoded && is(name, "content-length"))
            || (!connection.is_empty() && named_in(connection, name))
        {
            continue;
        }
        header_line(out, name.as_bytes(), h.value);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some((
        len,
        Some(RespHead {
            status,
            framing,
            backend_close,
            length: if encoded { 0 } else { length.unwrap_or(0) },
        }),
    )))
}

/// A status code's three digits.
fn itoa3(status: u16) -> [u8; 3] {
    let s = status.min(999);
    [
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]
}

/// Sends the response head in `out` and the body, framed as it came.
/// `Ok(true)`: the body ended cleanly and the backend connection can be
/// used again.
async fn relay(
    up: &mut RawUpstream,
    client: &mut TcpStream,
    out: &mut Vec<u8>,
    framing: Framing,
) -> io::Result<bool> {
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut chunks = Chunks::default();
    loop {
        // The part of `up.buf` that belongs to this body, and whether the
        // body ends there.
        let (mut take, done) = match framing {
            Framing::None => (0, true),
            Framing::Length(_) => {
                let t = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(up.buf.len());
                left -= t as u64;
                (t, left == 0)
            }
            Framing::Chunked => {
                let t = chunks
                    .feed(&up.buf)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                (t, chunks.done())
            }
            Framing::UntilClose => (up.buf.len(), false),
        };
        if !out.is_empty() {
            // The head, with the first body bytes when they are few.
            if take <= COALESCE {
                out.extend_from_slice(&up.buf[..take]);
                up.buf.advance(take);
                take = 0;
            }
            client.write_all(out).await?;
            out.clear();
        }
        if take > 0 {
            client.write_all(&up.buf[..take]).await?;
            up.buf.advance(take);
        }
        if done {
            // Bytes past the body: the backend broke the framing.
            return Ok(up.buf.is_empty());
        }
        up.buf.clear();
        up.buf.reserve(CHUNK);
        match up.stream.read_buf(&mut up.buf).await {
            Ok(0) if framing == Framing::UntilClose => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Finds the end of a chunked body (RFC 9112 §7.1) in the bytes that
/// pass, without changing them.
#[derive(Debug, Default)]
struct Chunks {
    state: ChunkState,
    /// Data bytes left in the current chunk.
    left: u64,
    /// Hex digits of the size line seen.
    digits: u8,
    /// The current trailer line has bytes (an empty one ends the body).
    line: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// After the size: extensions until CR LF.
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    Done,
}

impl Chunks {
    fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consumes `bytes` up to the end of the body; how many belong to it.
    fn feed(&mut self, bytes: &[u8]) -> Result<usize, &'static str> {
        use ChunkState as S;
        let mut i = 0;
        while i < bytes.len() && self.state != S::Done {
            let c = bytes[i];
            match self.state {
                S::Size => match c {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits == 15 {
                            return Err("chunk size too large");
                        }
                        let d = (c as char).to_digit(16).unwrap_or(0);
                        self.left = self.left * 16 + u64::from(d);
                        self.digits += 1;
                    }
                    _ if self.digits == 0 => return Err("invalid chunk size"),
                    b';' | b' ' | b'\t' => self.state = S::Ext,
                    b'\r' => self.state = S::SizeLf,
                    _ => return Err("invalid chunk size"),
                },
                S::Ext => {
                    if c == b'\r' {
                        self.state = S::SizeLf;
                    }
                }
                S::SizeLf => {
                    if c != b'\n' {
                        return Err("invalid chunk size line");
                    }
                    self.digits = 0;
                    if self.left == 0 {
                        self.line = false;
                        self.state = S::Trailer;
                    } else {
                        self.state = S::Data;
                    }
                }
                S::Data => {
                    let n = usize::try_from(self.left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len() - i);
                    self.left -= n as u64;
                    i += n;
                    if self.left == 0 {
                        self.state = S::DataCr;
                    }
                    continue;
                }
                S::DataCr => {
                    if c != b'\r' {
                        return Err("chunk data not followed by CRLF");
                    }
                    self.state = S::DataLf;
                }
                S::DataLf => {
                    if c != b'\n' {
                        return Err("chunk data not followed by CRLF");
                    }
                    self.state = S::Size;
                }
                S::Trailer => {
                    if c == b'\r' {
                        self.state = S::TrailerLf;
                    } else {
                        self.line = true;
                    }
                }
                S::TrailerLf => {
                    if c != b'\n' {
                        return Err("invalid trailer line");
                    }
                    if self.line {
                        self.line = false;
                        self.state = S::Trailer;
                    } else {
                        self.state = S::Done;
                    }
                }
                S::Done => {}
            }
            i += 1;
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn peer_key(balance: &Balance, peer: IpAddr) -> Option<u64> {
        key_of(balance, peer, |_| None, std::iter::empty)
    }

    fn scan(parts: &[&[u8]]) -> Result<(bool, usize), &'static str> {
        let mut c = Chunks::default();
        let mut total = 0;
        for p in parts {
            let n = c.feed(p)?;
            total += n;
            if c.done() {
                return Ok((true, total));
            }
            assert_eq!(n, p.len());
        }
        Ok((false, total))
    }

    #[test]
    fn chunked_end_is_found_across_reads() {
        let body = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        // Whole, and split at every position.
        assert_eq!(scan(&[body]), Ok((true, end)));
        for cut in 1..body.len() {
            let (a, b) = body.split_at(cut);
            assert_eq!(scan(&[a, b]), Ok((true, end)), "cut {cut}");
        }
        assert_eq!(scan(&[b"0\r\n\r\n"]), Ok((true, 5)));
        assert_eq!(scan(&[b"3\r\nab"]), Ok((false, 5)));
        assert!(scan(&[b"zz\r\n"]).is_err());
        assert!(scan(&[b"3\r\nabcX"]).is_err());
        assert!(scan(&[b"ffffffffffffffffff\r\n"]).is_err());
    }

    #[test]
    fn response_heads_are_rewritten() {
        let mut out = Vec::new();
        let raw = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nx-hop: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 3\r\nx-kept: y\r\n\r\nabc";
        let (len, head) = parse_response(raw, &mut out, false, false)
            .ok()
            .flatten()
            .unwrap();
        let head = head.unwrap();
        assert_eq!(len, raw.len() - 3);
        assert_eq!(head.framing, Framing::Length(3));
        assert!(!head.backend_close);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nx-kept: y\r\n\r\n"
        );
        // Chunked wins over a length; closing the client is said.
        let raw = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\nConnection: close\r\n\r\n";
        let (_, head) = parse_response(raw, &mut out, false, true)
            .ok()
            .flatten()
            .unwrap();
        let head = head.unwrap();
        assert_eq!(head.framing, Framing::Chunked);
        assert!(head.backend_close);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        // No framing: until close. HEAD and 304: no body.
        let raw = b"HTTP/1.1 200 OK\r\n\r\n";
        let (_, head) = parse_response(raw, &mut out, false, false)
            .ok()
            .flatten()
            .unwrap();
        assert_eq!(head.unwrap().framing, Framing::UntilClose);
        assert!(String::from_utf8_lossy(&out).contains("connection: close"));
        let (_, head) = parse_response(raw, &mut out, true, false)
            .ok()
            .flatten()
            .unwrap();
        assert_eq!(head.unwrap().framing, Framing::None);
        // Interim responses are skipped; 101 unasked is refused.
        let raw = b"HTTP/1.1 100 Continue\r\n\r\n";
        assert!(matches!(
            parse_response(raw, &mut out, false, false),
            Ok(Some((25, None)))
        ));
        let raw = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        assert!(parse_response(raw, &mut out, false, false).is_err());
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert!(parse_response(raw, &mut out, false, false).is_err());
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nA: b", &mut out, false, false),
            Ok(None)
        ));
    }

    #[test]
    fn client_ip_key_is_the_hyper_paths() {
        let b = Balance::Hash(super::super::HashKey::ClientIp);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(peer_key(&b, ip), peer_key(&b, mapped));
        assert_eq!(
            peer_key(&b, ip),
            super::super::balance::request_key(&b, ip, &http::HeaderMap::new())
        );
        assert_eq!(peer_key(&Balance::RoundRobin, ip), None);
    }
}
