//! HTTP/1.1 on the wire, for the lean paths of the ingress (`ingress/h1.rs`)
//! and the egress forward proxy (`egress/h1.rs`): header tests on raw
//! bytes, response heads read and rewritten in place, bodies copied with
//! their framing as it came (a length, chunked with the end found by
//! [`Chunks`], or until close).

use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

/// Most headers in a request or response head (hyper's limit too).
pub(crate) const MAX_HEADERS: usize = 100;
/// Read buffer size, and growth step.
pub(crate) const CHUNK: usize = 16 * 1024;
/// Response body bytes already read with the head that go out with it in
/// one write (more are written on their own).
pub(crate) const COALESCE: usize = 64 * 1024;

/// One timer for a run of deadlines that mostly move forward, as a
/// connection's successive requests make them: registered the first time
/// a wait is pending and re-armed only when it fires before the deadline
/// in force, instead of a timer registered and cancelled per wait.
pub(crate) struct Lazy {
    sleep: Pin<Box<Sleep>>,
}

impl Lazy {
    pub(crate) fn new() -> Lazy {
        // Far enough to never fire before a real deadline sets it.
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        Lazy {
            sleep: Box::pin(tokio::time::sleep_until(far)),
        }
    }

    /// `fut`, or `None` once `deadline` passed first.
    pub(crate) async fn within<F: Future>(
        &mut self,
        deadline: Instant,
        fut: F,
    ) -> Option<F::Output> {
        if self.sleep.deadline() > deadline {
            self.sleep.as_mut().reset(deadline);
        }
        let mut fut = std::pin::pin!(fut);
        loop {
            tokio::select! {
                biased;
                r = &mut fut => return Some(r),
                () = self.sleep.as_mut() => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                    self.sleep.as_mut().reset(deadline);
                }
            }
        }
    }
}

/// What decides a request's fate on a lean path, from one pass over its
/// headers.
pub(crate) struct RequestFrame<'h> {
    /// The body's length (`Content-Length`, else 0).
    pub(crate) body: u64,
    /// The client asked to close after this exchange.
    pub(crate) close: bool,
    connection: [&'h [u8]; 4],
    n_connection: usize,
    /// The value of the header asked for by name, if present (once).
    pub(crate) one: Option<&'h [u8]>,
}

impl<'h> RequestFrame<'h> {
    /// The values of the `Connection` headers.
    pub(crate) fn connection(&self) -> &[&'h [u8]] {
        &self.connection[..self.n_connection]
    }
}

/// Scans a request's headers; `None` when hyper should take the request:
/// `Transfer-Encoding`, `Upgrade` or `Expect`, an invalid or conflicting
/// `Content-Length`, more than four `Connection` headers, or the header
/// named `one` more than once.
pub(crate) fn request_frame<'h>(
    headers: &[httparse::Header<'h>],
    one: &str,
) -> Option<RequestFrame<'h>> {
    let mut f = RequestFrame {
        body: 0,
        close: false,
        connection: [&[]; 4],
        n_connection: 0,
        one: None,
    };
    let mut length_seen: Option<u64> = None;
    for h in headers {
        let name = h.name;
        if is(name, one) {
            if f.one.is_some() {
                return None;
            }
            f.one = Some(h.value);
        } else if is(name, "content-length") {
            match (length(h.value), length_seen) {
                (Some(n), None) => length_seen = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return None,
            }
        } else if is(name, "transfer-encoding") || is(name, "upgrade") || is(name, "expect") {
            return None;
        } else if is(name, "connection") {
            if f.n_connection == f.connection.len() {
                return None;
            }
            f.connection[f.n_connection] = h.value;
            f.n_connection += 1;
            f.close |= tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"close"));
        }
    }
    f.body = length_seen.unwrap_or(0);
    Some(f)
}

/// What an access-log entry needs from a request head.
pub(crate) struct LogInfo {
    method: String,
    target: String,
    referer: Option<String>,
    user_agent: Option<String>,
    time: std::time::SystemTime,
}

impl LogInfo {
    pub(crate) fn new(method: &str, target: &str, headers: &[httparse::Header<'_>]) -> LogInfo {
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
            time: std::time::SystemTime::now(),
        }
    }

    /// The entry, once the response status (and length, if known) is.
    pub(crate) fn entry(
        &self,
        peer: std::net::IpAddr,
        status: u16,
        bytes: u64,
    ) -> crate::access::AccessEntry {
        crate::access::AccessEntry {
            peer,
            user: None,
            time: self.time,
            method: self.method.clone(),
            target: self.target.clone(),
            version: "HTTP/1.1",
            status,
            bytes,
            referer: self.referer.clone(),
            user_agent: self.user_agent.clone(),
        }
    }
}

/// Whether an idle pooled connection was closed by its peer meanwhile
/// (or it sent something unasked). No system call when the socket has
/// not been readable since it was last drained.
pub(crate) fn stale(stream: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    match stream.try_read(&mut b) {
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        Ok(_) => true,
    }
}

/// Why reading more of a head stopped.
enum Wait {
    Data,
    Closed,
    TimedOut,
    Shutdown,
}

/// Reads more bytes of a head into `buf`, until `deadline`; while nothing
/// of the head has arrived yet, `shutdown` resolving ends the wait too
/// (a future kept for the connection's life, not polled again once it
/// resolved).
async fn read_more(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    timer: &mut Lazy,
    deadline: Instant,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Wait {
    buf.reserve(CHUNK);
    let idle = buf.is_empty();
    let read = async {
        tokio::select! {
            biased;
            r = stream.read_buf(buf) => match r {
                Ok(1..) => Wait::Data,
                _ => Wait::Closed,
            },
            () = shutdown, if idle => Wait::Shutdown,
        }
    };
    timer.within(deadline, read).await.unwrap_or(Wait::TimedOut)
}

/// What a lean path's parser makes of the buffered bytes of a head.
pub(crate) enum Parsed<T> {
    /// More bytes needed.
    Partial,
    /// Not for the lean path: hyper takes the connection from here.
    Fallback,
    /// A request the lean path takes.
    Ready(T),
}

/// An HTTP/1.1 request head the lean paths may take.
pub(crate) struct Head<'b, 'h> {
    /// Its length in the buffer.
    pub(crate) len: usize,
    pub(crate) method: &'b str,
    /// The request target, ASCII.
    pub(crate) target: &'b str,
    pub(crate) headers: &'h [httparse::Header<'b>],
}

/// Room for the headers of one [`Head`].
pub(crate) type HeaderSlots<'b> = [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS];

/// Parses the request head at the start of `buf`: [`Parsed::Partial`]
/// until it is complete, [`Parsed::Fallback`] (hyper answers) when it is
/// malformed, over `max_bytes`, over [`MAX_HEADERS`] headers, not
/// HTTP/1.1, or its target is not ASCII.
#[inline]
pub(crate) fn parse_head<'b, 'h>(
    buf: &'b [u8],
    slots: &'h mut HeaderSlots<'b>,
    max_bytes: usize,
) -> Parsed<Head<'b, 'h>> {
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(n)) if n <= max_bytes => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Ok(httparse::Status::Complete(_)) | Err(_) => return Parsed::Fallback,
    };
    let httparse::Request {
        method: Some(method),
        path: Some(target),
        version: Some(1),
        headers,
    } = req
    else {
        return Parsed::Fallback;
    };
    if !target.is_ascii() {
        return Parsed::Fallback;
    }
    Parsed::Ready(Head {
        len,
        method,
        target,
        headers,
    })
}

/// How the wait for the next request head ended.
pub(crate) enum NextHead<T> {
    Ready(T),
    /// For hyper; the bytes read so far stay in the buffer.
    Fallback,
    /// Closed, shut down while idle, or not complete within the head
    /// timeout (`slow`: some of the head had come, a slowloris).
    Done {
        slow: bool,
    },
}

/// Reads into `buf` until `parse` takes or refuses a head, within
/// `header_read_timeout`; a head still incomplete at `max_header_bytes`
/// goes to hyper (which answers 431).
pub(crate) async fn next_head<T>(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    timer: &mut Lazy,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
    (header_read_timeout, max_header_bytes): (Duration, usize),
    mut parse: impl FnMut(&[u8]) -> Parsed<T>,
) -> NextHead<T> {
    let deadline = Instant::now() + header_read_timeout;
    loop {
        if !buf.is_empty() {
            match parse(buf) {
                Parsed::Partial if buf.len() < max_header_bytes => {}
                Parsed::Partial | Parsed::Fallback => return NextHead::Fallback,
                Parsed::Ready(t) => return NextHead::Ready(t),
            }
        }
        match read_more(stream, buf, timer, deadline, shutdown).await {
            Wait::Data => {}
            Wait::Closed | Wait::Shutdown => return NextHead::Done { slow: false },
            Wait::TimedOut => {
                return NextHead::Done {
                    slow: !buf.is_empty(),
                };
            }
        }
    }
}

/// A future that resolves once `shutdown` turns `true`, made once per
/// connection (its waiter stays registered instead of one per wait).
pub(crate) fn shutdown_signal(
    mut shutdown: watch::Receiver<bool>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let _ = shutdown.wait_for(|s| *s).await;
    })
}

/// Whether header `name` is `lower` (ASCII, any case).
pub(crate) fn is(name: &str, lower: &str) -> bool {
    name.eq_ignore_ascii_case(lower)
}

/// What `http::HeaderValue::to_str` accepts: visible ASCII, space, tab.
pub(crate) fn text(v: &[u8]) -> Option<&str> {
    if v.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)) {
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

pub(crate) fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// A `Content-Length` value: digits only.
pub(crate) fn length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Whether `name` is listed in a `Connection` header (and so is
/// hop-by-hop), `Content-Length` and `Host` excepted as on the hyper path.
pub(crate) fn named_in(connection: &[&[u8]], name: &str) -> bool {
    // Most messages have no Connection header: one length check.
    if connection.is_empty()
        || is(name, "content-length")
        || is(name, "host")
        || is(name, "transfer-encoding")
    {
        return false;
    }
    connection
        .iter()
        .flat_map(|v| tokens(v))
        .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
}

/// What a lean path does with a client connection after an exchange.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Read the next request.
    KeepAlive,
    /// Close it.
    Close,
}

/// An answer of the proxy's own, as the hyper paths make it, into `out`
/// (cleared first): `status`, `x-ippool-error: error` (a header-safe
/// rendering of `body`), the `extra` header lines as given, `retry-after`
/// and `connection: close` when asked, and `body` plus a newline as a
/// text/plain body.
pub(crate) fn own_response(
    out: &mut Vec<u8>,
    status: http::StatusCode,
    error: &[u8],
    body: &str,
    extra: &[u8],
    retry_after: Option<u64>,
    close: bool,
) {
    use std::io::Write as _;
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    header_line(out, crate::egress::ERROR_HEADER.as_bytes(), error);
    out.extend_from_slice(extra);
    if let Some(secs) = retry_after {
        let _ = write!(out, "retry-after: {secs}\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let _ = write!(out, "content-length: {}\r\n\r\n{body}\n", body.len() + 1);
}

/// Appends one header line.
pub(crate) fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A header value from any text: control and non-ASCII characters
/// replaced by `?`, at most 1024 of them (error reasons, host names).
pub(crate) fn header_text(s: &str) -> http::HeaderValue {
    let clean: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(1024)
        .collect();
    http::HeaderValue::from_str(&clean).unwrap_or(http::HeaderValue::from_static("error"))
}

/// How a response body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the backend closes (the client connection closes too).
    UntilClose,
}

/// A response head read from a backend.
pub(crate) struct RespHead {
    pub(crate) status: u16,
    pub(crate) framing: Framing,
    /// The backend will close the connection after this response.
    pub(crate) backend_close: bool,
    /// `Content-Length` (for the access log).
    pub(crate) length: u64,
}

/// How a response head is rewritten for the client.
#[derive(Clone, Copy)]
pub(crate) struct Rewrite<'a> {
    /// The request was `HEAD` (no body follows whatever the head says).
    pub(crate) head_request: bool,
    /// The client connection closes after this response.
    pub(crate) close_client: bool,
    /// Headers left out besides the hop-by-hop ones.
    pub(crate) drop: fn(&str) -> bool,
    /// Header lines added (each ending in CRLF).
    pub(crate) add: &'a [u8],
}

/// Headers that never cross a proxy (RFC 9110 §7.6.1), `Transfer-Encoding`
/// aside (bodies pass with their framing) and `Upgrade` (checked apart).
pub(crate) fn hop_by_hop(name: &str) -> bool {
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

/// Why sending a request body stopped.
pub(crate) enum BodyError {
    Client(io::Error),
    Backend(io::Error),
}

/// Copies `n` request body bytes from the client to the backend, through
/// `cbuf` (the client's read buffer, empty on entry; bytes read past the
/// body stay in it).
pub(crate) async fn copy_body(
    client: &mut (impl AsyncRead + Unpin),
    cbuf: &mut BytesMut,
    up: &mut (impl AsyncWrite + Unpin),
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
    // Nothing for a TCP socket; a TLS stream may hold the last record.
    up.flush().await.map_err(BodyError::Backend)
}

/// Why reading a response head failed.
pub(crate) enum HeadError {
    /// Closed before a complete head.
    Eof,
    Io(io::Error),
    Invalid(&'static str),
}

/// Reads a response head from `stream` into `buf` (skipping interim 1xx
/// ones) and writes the head for the client into `out`; the head's bytes
/// are consumed from `buf`, body bytes read with it stay there.
pub(crate) async fn read_head(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    rw: Rewrite<'_>,
) -> Result<RespHead, HeadError> {
    loop {
        if !buf.is_empty() {
            match parse_response(buf, out, rw)? {
                Some((len, head)) => {
                    buf.advance(len);
                    match head {
                        Some(h) => return Ok(h),
                        // An interim response: the final one follows.
                        None => continue,
                    }
                }
                None if buf.len() >= MAX_RESPONSE_HEAD => {
                    return Err(HeadError::Invalid("response head too large"));
                }
                None => {}
            }
        }
        buf.reserve(CHUNK);
        match stream.read_buf(buf).await {
            Ok(0) => return Err(HeadError::Eof),
            Ok(_) => {}
            Err(e) => return Err(HeadError::Io(e)),
        }
    }
}

/// The largest response head read.
pub(crate) const MAX_RESPONSE_HEAD: usize = 1024 * 1024;

/// Parses a response head at the start of `buf`. `Ok(None)`: incomplete;
/// `Ok(Some((len, None)))`: an interim (1xx) response of `len` bytes to
/// skip; `Ok(Some((len, Some(head))))`: the final head, rewritten into
/// `out`.
#[allow(clippy::type_complexity)]
pub(crate) fn parse_response(
    buf: &[u8],
    out: &mut Vec<u8>,
    rw: Rewrite<'_>,
) -> Result<Option<(usize, Option<RespHead>)>, HeadError> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(HeadError::Invalid("malformed response head")),
    };
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return Err(HeadError::Invalid("malformed response head"));
    };
    if status < 100 {
        return Err(HeadError::Invalid("invalid status code"));
    }
    if status == 101 {
        return Err(HeadError::Invalid(
            "backend switched protocols without being asked",
        ));
    }
    if (100..200).contains(&status) {
        return Ok(Some((len, None)));
    }
    let headers: &[httparse::Header<'_>] = resp.headers;
    let mut connection: [&[u8]; 8] = [&[]; 8];
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
            if n_connection == connection.len() {
                return Err(HeadError::Invalid(
                    "too many Connection headers in the response",
                ));
            }
            connection[n_connection] = h.value;
            n_connection += 1;
            if tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"close")) {
                backend_close = true;
            } else if version == 0 && tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"keep-alive"))
            {
                backend_close = false;
            }
        }
    }
    let connection = &connection[..n_connection];
    let framing = if rw.head_request || status == 204 || status == 304 {
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
    let close = rw.close_client || framing == Framing::UntilClose;
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
            || named_in(connection, name)
            || (rw.drop)(name)
        {
            continue;
        }
        header_line(out, name.as_bytes(), h.value);
    }
    out.extend_from_slice(rw.add);
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
pub(crate) fn itoa3(status: u16) -> [u8; 3] {
    let s = status.min(999);
    [
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]
}

/// Sends the response head in `out` and the body read from `stream`
/// (some of it may be in `buf` already), framed as it came. `stall`
/// bounds each wait for more of the body and each write to the client.
pub(crate) async fn relay(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    client: &mut (impl AsyncWrite + Unpin),
    out: &mut Vec<u8>,
    framing: Framing,
    stall: Option<Duration>,
) -> io::Result<Relayed> {
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut chunks = Chunks::default();
    let mut bytes = 0u64;
    loop {
        // The part of `buf` that belongs to this body, and whether the
        // body ends there.
        let (mut take, done) = match framing {
            Framing::None => (0, true),
            Framing::Length(_) => {
                let t = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                left -= t as u64;
                (t, left == 0)
            }
            Framing::Chunked => {
                let t = chunks
                    .feed(buf)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                (t, chunks.done())
            }
            Framing::UntilClose => (buf.len(), false),
        };
        bytes += take as u64;
        if !out.is_empty() {
            // The head, with the first body bytes when they are few.
            if take <= COALESCE {
                out.extend_from_slice(&buf[..take]);
                buf.advance(take);
                take = 0;
            }
            write_within(client, out, stall).await?;
            out.clear();
        }
        if take > 0 {
            write_within(client, &buf[..take], stall).await?;
            buf.advance(take);
        }
        if done {
            // Bytes past the body: the backend broke the framing.
            return Ok(Relayed {
                reusable: buf.is_empty(),
                bytes,
            });
        }
        buf.clear();
        buf.reserve(CHUNK);
        let read = match stall {
            None => stream.read_buf(buf).await,
            Some(limit) => match tokio::time::timeout(limit, stream.read_buf(buf)).await {
                Ok(r) => r,
                Err(_) => return Err(io::ErrorKind::TimedOut.into()),
            },
        };
        match read {
            Ok(0) if framing == Framing::UntilClose => {
                return Ok(Relayed {
                    reusable: false,
                    bytes,
                });
            }
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes all of `bytes`, each wait for the peer to take more bounded by
/// `stall` (a client that stops reading is not held).
async fn write_within(
    stream: &mut (impl AsyncWrite + Unpin),
    bytes: &[u8],
    stall: Option<Duration>,
) -> io::Result<()> {
    match stall {
        None => stream.write_all(bytes).await,
        Some(limit) => match tokio::time::timeout(limit, stream.write_all(bytes)).await {
            Ok(r) => r,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        },
    }
}

/// How a relayed body ended.
pub(crate) struct Relayed {
    /// Cleanly at its end: the connection it came on can be used again.
    pub(crate) reusable: bool,
    /// Body bytes relayed.
    pub(crate) bytes: u64,
}

/// Finds the end of a chunked body (RFC 9112 §7.1) in the bytes that
/// pass, without changing them.
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    state: ChunkState,
    /// Data bytes left in the current chunk.
    left: u64,
    /// Hex digits of the size line seen.
    digits: u8,
    /// The current trailer line has bytes (an empty one ends the body).
    line: bool,
    /// Bytes of chunk extensions on the current size line, and of
    /// trailers in all (both bounded).
    ext: usize,
    trailers: usize,
}

/// Most bytes of chunk extensions on one size line.
const MAX_CHUNK_EXT: usize = 4096;
/// Most bytes of trailers after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

/// A byte allowed in a chunk extension or a trailer line: anything but
/// control characters (a bare LF included, which some clients take for
/// the end of the line: the proxy and the client must see the same body
/// end), HTAB aside.
fn field_byte(c: u8) -> bool {
    c == b'\t' || (c >= 0x20 && c != 0x7f)
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChunkState {
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
                        self.ext = 0;
                        self.state = S::SizeLf;
                    } else if !field_byte(c) {
                        return Err("control character in a chunk extension");
                    } else {
                        self.ext += 1;
                        if self.ext > MAX_CHUNK_EXT {
                            return Err("chunk extension too long");
                        }
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
                    } else if !field_byte(c) {
                        return Err("control character in a trailer");
                    } else {
                        self.line = true;
                        self.trailers += 1;
                        if self.trailers > MAX_TRAILERS {
                            return Err("trailers too long");
                        }
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

/// An IO whose first reads return bytes already read from it (a request
/// the HTTP/1.1 fast path hands over to hyper), then the IO's own.
pub(crate) struct Rewind<S> {
    pre: bytes::Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub(crate) fn new(pre: bytes::Bytes, inner: S) -> Rewind<S> {
        Rewind { pre, inner }
    }

    /// The bytes not read yet, and the IO.
    pub(crate) fn into_parts(self) -> (bytes::Bytes, S) {
        (self.pre, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            let head = self.pre.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(head_request: bool, close_client: bool) -> Rewrite<'static> {
        Rewrite {
            head_request,
            close_client,
            drop: |_| false,
            add: b"",
        }
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
        // A bare LF (or another control character) in an extension or a
        // trailer: a client could end the body there, the proxy would not.
        assert!(scan(&[b"0;x\n\r\nHTTP/1.1 200 OK\r\n\r\n"]).is_err());
        assert!(scan(&[b"0\r\n\nHTTP/1.1 200 OK\r\n\r\n"]).is_err());
        assert!(scan(&[b"0\r\nx: a\x00b\r\n\r\n"]).is_err());
        assert_eq!(
            scan(&[b"0;a=\"b\tc\"\r\nx: \"\xc3\xa9\"\r\n\r\n"]),
            Ok((true, 22))
        );
        let long = [b"1;".as_slice(), &[b'e'; 5000], b"\r\nx\r\n0\r\n\r\n"].concat();
        assert!(scan(&[&long]).is_err());
    }

    #[test]
    fn response_heads_are_rewritten() {
        let mut out = Vec::new();
        let raw = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nx-hop: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 3\r\nx-kept: y\r\n\r\nabc";
        let (len, head) = parse_response(raw, &mut out, rw(false, false))
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
        let (_, head) = parse_response(raw, &mut out, rw(false, true))
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
        let (_, head) = parse_response(raw, &mut out, rw(false, false))
            .ok()
            .flatten()
            .unwrap();
        assert_eq!(head.unwrap().framing, Framing::UntilClose);
        assert!(String::from_utf8_lossy(&out).contains("connection: close"));
        let (_, head) = parse_response(raw, &mut out, rw(true, false))
            .ok()
            .flatten()
            .unwrap();
        assert_eq!(head.unwrap().framing, Framing::None);
        // Interim responses are skipped; 101 unasked is refused.
        let raw = b"HTTP/1.1 100 Continue\r\n\r\n";
        assert!(matches!(
            parse_response(raw, &mut out, rw(false, false)),
            Ok(Some((25, None)))
        ));
        let raw = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        assert!(parse_response(raw, &mut out, rw(false, false)).is_err());
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert!(parse_response(raw, &mut out, rw(false, false)).is_err());
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nA: b", &mut out, rw(false, false)),
            Ok(None)
        ));
    }

    /// A chunked body: chunks of the given sizes (with extensions now
    /// and then), the last chunk, trailers.
    fn encode(sizes: &[usize], ext: bool, trailers: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            if ext && i % 2 == 1 {
                out.extend_from_slice(format!("{n:X};name=\"v\"\r\n").as_bytes());
            } else {
                out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            }
            out.extend((0..n).map(|j| b"0\r\n;x"[j % 5]));
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        for t in 0..trailers {
            out.extend_from_slice(format!("x-t{t}: 0\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    proptest::proptest! {
        /// The end of any chunked body is found exactly, however the bytes
        /// are cut into reads, with the next message's bytes after it
        /// left alone.
        #[test]
        fn chunked_end_is_exact_for_any_body_and_cuts(
            sizes in proptest::collection::vec(1usize..300, 0..8),
            ext: bool,
            trailers in 0usize..3,
            cuts in proptest::collection::vec(0usize..4000, 0..6),
        ) {
            let body = encode(&sizes, ext, trailers);
            let mut stream = body.clone();
            stream.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % stream.len()).collect();
            cuts.push(stream.len());
            cuts.sort_unstable();
            let mut c = Chunks::default();
            let mut at = 0;
            let mut end = None;
            for cut in cuts {
                if cut <= at {
                    continue;
                }
                let n = c.feed(&stream[at..cut]).unwrap();
                if c.done() {
                    end = Some(at + n);
                    break;
                }
                proptest::prop_assert_eq!(n, cut - at);
                at = cut;
            }
            proptest::prop_assert_eq!(end, Some(body.len()));
        }
    }

    proptest::proptest! {
        /// Any bytes from an upstream: a response head parses, is
        /// incomplete or is refused, never a panic; a head that parses
        /// rewrites into one that parses again, with the same status.
        #[test]
        fn any_response_bytes_are_handled(
            status in 0u16..1000,
            lines in proptest::collection::vec(
                (
                    proptest::prop_oneof![
                        proptest::strategy::Just("Content-Length".to_owned()),
                        proptest::strategy::Just("Transfer-Encoding".to_owned()),
                        proptest::strategy::Just("Connection".to_owned()),
                        proptest::strategy::Just("Keep-Alive".to_owned()),
                        "[A-Za-z-]{1,12}",
                    ],
                    proptest::prop_oneof![
                        "[0-9]{1,3}",
                        proptest::strategy::Just("chunked".to_owned()),
                        proptest::strategy::Just("close, x-a".to_owned()),
                        "[ -~]{0,30}",
                    ],
                ),
                0..6,
            ),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            head_request: bool,
        ) {
            let mut raw = format!("HTTP/1.1 {status:03} X\r\n").into_bytes();
            for (name, value) in &lines {
                raw.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            }
            raw.extend_from_slice(b"\r\n");
            raw.extend_from_slice(&tail);
            let mut out = Vec::new();
            let parsed = parse_response(&raw, &mut out, rw(head_request, false));
            if let Ok(Some((len, Some(head)))) = parsed {
                proptest::prop_assert!(len <= raw.len());
                let mut again = Vec::new();
                let parsed = parse_response(&out, &mut again, rw(head_request, false));
                proptest::prop_assert!(
                    matches!(parsed, Ok(Some((_, Some(ref h)))) if h.status == head.status),
                    "{:?}", String::from_utf8_lossy(&out)
                );
            }
            // And arbitrary bytes as a chunked body.
            let mut c = Chunks::default();
            let _ = c.feed(&raw);
        }
    }
}
