//! The HTTP/1.1 fast path of egress listeners.
//!
//! The common forward-proxy exchanges are served here without hyper:
//! `GET http://host/path HTTP/1.1` with no request body or a
//! `Content-Length` one, and `CONNECT host:port`. The head is parsed in
//! place (httparse); a request goes to a kept-alive upstream connection
//! from the leased source (or a new one) as one write of the rewritten
//! head and the body bytes read with it, and the response comes back with
//! its framing as it came and [`SOURCE_HEADER`](super::SOURCE_HEADER)
//! added; a `CONNECT` is dialled, answered 200 with the source, and
//! spliced (`tunnel.rs`), what the client sent after it going first. All
//! in the client connection's task (see `crate::wire`).
//!
//! Anything else goes to hyper (`http.rs`) on the same connection
//! before a byte of that request is consumed: HTTP/1.0, origin-form or
//! non-`http` targets, targets with user info, a query right after the
//! authority or an odd port, `Upgrade`, `Transfer-Encoding` or `Expect` on
//! the request, a `CONNECT` with a body, a head that does not parse or is
//! over the limit. hyper then serves the rest of that connection and
//! answers as it always did. The answers made here (407, 403, 429, 502,
//! 503, 504) are those of `http.rs`, checked by `tests/egress_h1.rs`
//! against it.

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use addrpool::{Lease, Outcome, Pool, Session};
use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::Ctx;
use super::auth::{self, Identity};
use super::dial;
use super::http::{Reject, session_for};
use super::metrics::{Protocol, RequestResult};
use super::upstream::{Key, Pooled};
use crate::wire::{
    self, BodyError, CHUNK, Framing, Head, HeadError, Lazy, LogInfo, MAX_HEADERS, Next, NextHead,
    Parsed, Rewrite, copy_body, header_line, header_text, hop_by_hop, is, named_in,
};

/// An upstream connection of the fast path, with its read buffer.
pub(crate) struct RawConn {
    stream: TcpStream,
    buf: BytesMut,
    dest: IpAddr,
    key: Key,
    /// `x-ippool-source: …` (a header line), added to its responses.
    source_line: Box<[u8]>,
}

impl Pooled for RawConn {
    fn key(&self) -> &Key {
        &self.key
    }
    fn dest(&self) -> IpAddr {
        self.dest
    }
    /// Closed by the destination while idle.
    fn closed(&self) -> bool {
        wire::stale(&self.stream)
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

/// What a head the fast path takes asks for.
enum Parse {
    /// Answered by the proxy; then the connection closes if `close`
    /// (asked, or a request body is left unread).
    Answer {
        reject: Reject,
        protocol: Protocol,
        head_len: usize,
        close: bool,
        log: Option<LogInfo>,
    },
    Forward(Req),
    /// `CONNECT host:port`: a tunnel.
    Connect(Req),
}

/// A request to forward; its head for the destination is in the output
/// buffer.
struct Req {
    head_len: usize,
    body: u64,
    /// The client asked to close after this exchange.
    close: bool,
    head: bool,
    host: String,
    port: u16,
    id: Arc<Identity>,
    log: Option<LogInfo>,
}

/// `http://host[:port]/path?query` split, or `None` for anything hyper
/// should judge.
fn absolute(target: &str) -> Option<(Cow<'_, str>, u16, &str)> {
    let rest = target.strip_prefix("http://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if !(path.is_empty() || path.starts_with('/')) || path.contains('#') {
        return None;
    }
    let path = if path.is_empty() { "/" } else { path };
    let (host, port) = host_port(authority, Some(80))?;
    Some((host, port, path))
}

/// `host[:port]` (`[v6]:port`), the host lowercase; `None` for anything
/// hyper should judge (user info, odd characters, a bad or zero port, no
/// port without a default).
fn host_port(authority: &str, default_port: Option<u16>) -> Option<(Cow<'_, str>, u16)> {
    if authority.is_empty()
        || !authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~:[]".contains(&b))
    {
        return None;
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let close = v6.find(']')?;
            let after = &v6[close + 1..];
            let port = if after.is_empty() {
                None
            } else {
                Some(after.strip_prefix(':')?)
            };
            (&authority[..close + 2], port)
        }
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if host.is_empty() || host == "[]" || (!host.starts_with('[') && host.contains(['[', ']'])) {
        return None;
    }
    let port = match port {
        None => default_port?,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            match p.parse::<u16>() {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            }
        }
        Some(_) => return None,
    };
    let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    Some((host, port))
}

/// Parses the head at the start of `buf` and, if the fast path takes it,
/// writes the head for the destination into `out`.
fn parse(
    ctx: &Ctx,
    peer: SocketAddr,
    cache: &mut auth::Remembered,
    buf: &[u8],
    out: &mut Vec<u8>,
) -> Parsed<Parse> {
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let Head {
        len: head_len,
        method,
        target,
        headers,
    } = match wire::parse_head(buf, &mut slots, ctx.opts.max_header_bytes) {
        Parsed::Ready(h) => h,
        Parsed::Partial => return Parsed::Partial,
        Parsed::Fallback => return Parsed::Fallback,
    };
    let tunnel = method == "CONNECT";
    let parsed = if tunnel {
        host_port(target, None).map(|(h, p)| (h, p, ""))
    } else {
        absolute(target)
    };
    let Some((host, port, path)) = parsed else {
        return Parsed::Fallback;
    };
    let Some(frame) = wire::request_frame(headers, "proxy-authorization") else {
        return Parsed::Fallback;
    };
    let (connection, body, close) = (frame.connection(), frame.body, frame.close);
    let authorization = frame.one;
    if tunnel && body > 0 {
        return Parsed::Fallback;
    }
    let protocol = if tunnel {
        Protocol::Connect
    } else {
        Protocol::Http
    };
    let log = ctx
        .opts
        .access_log
        .as_ref()
        .map(|_| LogInfo::new(method, target, headers));
    if let Err(wait) = ctx.opts.guard.check_request(peer.ip()) {
        return Parsed::Ready(Parse::Answer {
            reject: super::http::rate_limit_reject(wait),
            protocol,
            head_len,
            close: close || body > 0,
            log,
        });
    }
    let id = match cache.identify(&ctx.opts.users, authorization) {
        Ok(id) => id,
        Err(e) => {
            return Parsed::Ready(Parse::Answer {
                reject: Reject::from(e),
                protocol,
                head_len,
                close: close || body > 0,
                log,
            });
        }
    };

    if tunnel {
        return Parsed::Ready(Parse::Connect(Req {
            head_len,
            body: 0,
            close,
            head: false,
            host: host.into_owned(),
            port,
            id,
            log,
        }));
    }
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    if port != 80 {
        use std::io::Write as _;
        let _ = write!(out, ":{port}");
    }
    out.extend_from_slice(b"\r\n");
    for h in headers {
        let name = h.name;
        if hop_by_hop(name)
            || is(name, "proxy-authenticate")
            || is(name, "host")
            || named_in(connection, name)
        {
            continue;
        }
        header_line(out, name.as_bytes(), h.value);
    }
    out.extend_from_slice(b"\r\n");
    Parsed::Ready(Parse::Forward(Req {
        head_len,
        body,
        close,
        head: method == "HEAD",
        host: host.into_owned(),
        port,
        id,
        log,
    }))
}

/// An answer of the proxy's own, as `http.rs` makes it.
fn write_reject(out: &mut Vec<u8>, r: &Reject, close: bool) {
    let extra: &[u8] = if r.status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        b"proxy-authenticate: Basic realm=\"ippool\"\r\n"
    } else {
        b""
    };
    wire::own_response(
        out,
        r.status,
        header_text(&r.message).as_bytes(),
        &r.message,
        extra,
        r.retry_after,
        close,
    );
}

/// A client connection's buffers and timers.
struct Client {
    stream: TcpStream,
    peer: SocketAddr,
    buf: BytesMut,
    resp_out: Vec<u8>,
    timer: Lazy,
}

/// Serves an HTTP client connection until it closes or needs hyper.
pub(crate) async fn serve(ctx: &Arc<Ctx>, stream: TcpStream, peer: SocketAddr) -> Served {
    let opts = &ctx.opts;
    let mut stopping = wire::shutdown_signal(ctx.shutdown.clone());
    let mut c = Client {
        stream,
        peer,
        buf: BytesMut::with_capacity(CHUNK),
        resp_out: Vec::with_capacity(1024),
        timer: Lazy::new(),
    };
    let mut req_out: Vec<u8> = Vec::with_capacity(1024);
    let mut head_timer = Lazy::new();
    let mut cache: auth::Remembered = auth::Remembered::default();
    loop {
        if c.buf.is_empty() && *ctx.shutdown.borrow() {
            return Served::Done;
        }
        let limits = (opts.header_read_timeout, opts.max_header_bytes);
        let head = wire::next_head(
            &mut c.stream,
            &mut c.buf,
            &mut head_timer,
            &mut stopping,
            limits,
            |b| parse(ctx, peer, &mut cache, b, &mut req_out),
        );
        let parsed = match head.await {
            NextHead::Ready(p) => p,
            NextHead::Fallback => return Served::Fallback(c.stream, c.buf),
            NextHead::Done { slow } => {
                if slow {
                    tracing::debug!(%peer, "request head not complete in time; closed");
                }
                return Served::Done;
            }
        };
        let next = match parsed {
            Parse::Answer {
                reject,
                protocol,
                head_len,
                close,
                log,
            } => {
                c.buf.advance(head_len);
                refuse(ctx, &mut c, protocol, &reject, close, log.as_ref()).await
            }
            Parse::Connect(mut req) => {
                c.buf.advance(req.head_len);
                let log = req.log.take();
                match tunnel(ctx, &mut c, &req, log.as_ref()).await {
                    Ok(None) => return Served::Done,
                    Ok(Some(upstream)) => {
                        // What the client sent after its request goes
                        // first; the connection is the tunnel's now.
                        let early = c.buf.split().freeze();
                        let metrics = ctx.metrics.clone();
                        super::tunnel::run(c.stream, early, upstream, opts.idle_timeout, metrics)
                            .await;
                        return Served::Done;
                    }
                    Err(reject) => {
                        let log = log.as_ref();
                        refuse(ctx, &mut c, Protocol::Connect, &reject, req.close, log).await
                    }
                }
            }
            Parse::Forward(mut req) => {
                c.buf.advance(req.head_len);
                // The body bytes read with the head go out with it.
                let with_head = usize::try_from(req.body)
                    .unwrap_or(usize::MAX)
                    .min(c.buf.len());
                req_out.extend_from_slice(&c.buf[..with_head]);
                c.buf.advance(with_head);
                let rest = req.body - with_head as u64;
                let log = req.log.take();
                match forward(ctx, &mut c, &req_out, &req, rest, log.as_ref()).await {
                    Ok(next) => next,
                    Err(reject) => {
                        let close = req.close || rest > 0;
                        refuse(ctx, &mut c, Protocol::Http, &reject, close, log.as_ref()).await
                    }
                }
            }
        };
        if next == Next::Close {
            return Served::Done;
        }
    }
}

/// Sends an answer of the proxy's own, counts it and reports the
/// offense if the client is at fault.
async fn refuse(
    ctx: &Ctx,
    c: &mut Client,
    protocol: Protocol,
    r: &Reject,
    close: bool,
    log: Option<&LogInfo>,
) -> Next {
    ctx.metrics.request(protocol, r.result);
    if let Some(o) = r.offense {
        ctx.opts.guard.offense(c.peer.ip(), o);
    }
    if let (Some(l), Some(log)) = (&ctx.opts.access_log, log) {
        l.record(log.entry(c.peer.ip(), r.status.as_u16(), 0));
    }
    tracing::debug!(status = %r.status, reason = %r.message, "request refused");
    let close = close || r.status == StatusCode::BAD_REQUEST || *ctx.shutdown.borrow();
    write_reject(&mut c.resp_out, r, close);
    // A client that does not read its answers is not held.
    let write = c.stream.write_all(&c.resp_out);
    match tokio::time::timeout(ctx.opts.idle_timeout, write).await {
        Ok(Ok(())) if !close => Next::KeepAlive,
        _ => Next::Close,
    }
}

/// Dials the destination of a `CONNECT` and, once connected, tells the
/// client (200 with the source address). `Err`: answered by the proxy;
/// `Ok(None)`: the client went away meanwhile.
async fn tunnel(
    ctx: &Ctx,
    c: &mut Client,
    req: &Req,
    log: Option<&LogInfo>,
) -> Result<Option<addrpool::PooledStream>, Reject> {
    let session = session_for(ctx, &req.id, &req.host);
    let pool = ctx.opts.pool.pick(req.id.user.as_deref());
    let stream = dial::dial(ctx, pool, &req.host, req.port, session.as_deref()).await?;
    ctx.metrics.request(Protocol::Connect, RequestResult::Ok);
    if let (Some(l), Some(log)) = (&ctx.opts.access_log, log) {
        l.record(log.entry(c.peer.ip(), 200, 0));
    }
    c.resp_out.clear();
    c.resp_out
        .extend_from_slice(b"HTTP/1.1 200 Connection established\r\n");
    header_line(
        &mut c.resp_out,
        super::SOURCE_HEADER.as_bytes(),
        stream.source().to_string().as_bytes(),
    );
    c.resp_out.extend_from_slice(b"\r\n");
    let write = c.stream.write_all(&c.resp_out);
    if !matches!(
        tokio::time::timeout(ctx.opts.idle_timeout, write).await,
        Ok(Ok(()))
    ) {
        tracing::debug!(peer = %c.peer, "client gone (or not reading) before the tunnel started");
        return Ok(None);
    }
    Ok(Some(stream))
}

/// A new upstream connection from a source of `pool` (the first attempt
/// from `first` if given).
#[allow(clippy::too_many_arguments)]
async fn fresh(
    pool: &Pool,
    session: Option<&Session>,
    first: Option<Lease>,
    addrs: &[IpAddr],
    host: &str,
    port: u16,
    deadline: Instant,
) -> Result<(RawConn, Lease), Reject> {
    let (stream, dest) = dial::connect(pool, session, first, addrs, port, deadline).await?;
    let (tcp, lease) = stream.into_parts();
    let _ = tcp.set_nodelay(true);
    let src = lease.source();
    let conn = RawConn {
        stream: tcp,
        buf: BytesMut::new(),
        dest,
        key: Key {
            src,
            host: host.into(),
            port,
        },
        source_line: format!("{}: {src}\r\n", super::SOURCE_HEADER)
            .into_bytes()
            .into_boxed_slice(),
    };
    Ok((conn, lease))
}

/// How sending on one connection went.
enum Sent {
    Answered(wire::RespHead),
    /// A kept-alive connection the destination had closed: nothing
    /// answered, the request may go again on a new one.
    Stale,
    Failed(Reject, Option<Outcome>),
}

/// Resolves, leases, connects (or reuses), forwards and relays the
/// response. `Err`: answered by the proxy.
async fn forward(
    ctx: &Ctx,
    c: &mut Client,
    req_bytes: &[u8],
    req: &Req,
    rest: u64,
    log: Option<&LogInfo>,
) -> Result<Next, Reject> {
    let opts = &ctx.opts;
    let session = session_for(ctx, &req.id, &req.host);
    let session = session.as_deref();
    let pool = opts.pool.pick(req.id.user.as_deref());
    let reuse = ctx.keep_alive(pool);
    let fresh_from = async |first, addrs: &[IpAddr], deadline| {
        fresh(pool, session, first, addrs, &req.host, req.port, deadline).await
    };
    let dial::Checkout {
        mut conn,
        mut lease,
        reused,
        addrs,
    } = dial::checkout(
        ctx,
        &ctx.raw_idle,
        pool,
        session,
        &req.host,
        req.port,
        async |lease, addrs, deadline| fresh_from(lease, addrs, deadline).await,
    )
    .await?;
    let close_client = req.close || *ctx.shutdown.borrow();
    let mut sent = send(
        ctx,
        c,
        &mut conn,
        reused,
        req_bytes,
        req,
        rest,
        close_client,
    )
    .await;
    if matches!(sent, Sent::Stale) {
        // Once more, on a new connection (only requests without a body
        // are sent again; see `send`).
        let src = lease.source();
        drop(conn);
        drop(lease);
        tracing::debug!(%src, "kept-alive connection closed by the destination; retrying on a new one");
        let deadline = Instant::now() + opts.connect_timeout;
        (conn, lease) = fresh_from(None, &addrs, deadline).await?;
        sent = send(ctx, c, &mut conn, false, req_bytes, req, rest, close_client).await;
    }
    let head = match sent {
        Sent::Answered(h) => h,
        Sent::Stale => {
            lease.report(Outcome::EarlyEof);
            return Err(bad_gateway(format!(
                "{} closed the connection from {} without a response",
                conn.dest,
                lease.source()
            )));
        }
        Sent::Failed(reject, outcome) => {
            if let Some(o) = outcome {
                lease.report(o);
            }
            return Err(reject);
        }
    };
    lease.report(Outcome::Status(head.status));
    ctx.metrics.request(Protocol::Http, RequestResult::Ok);
    if let (Some(l), Some(log)) = (&opts.access_log, log) {
        l.record(log.entry(c.peer.ip(), head.status, head.length));
    }
    let relayed = wire::relay(
        &mut conn.stream,
        &mut conn.buf,
        &mut c.stream,
        &mut c.resp_out,
        head.framing,
        Some(opts.idle_timeout),
    )
    .await;
    let next = match relayed {
        Ok(r) => {
            ctx.metrics
                .down(usize::try_from(r.bytes).unwrap_or(usize::MAX));
            if reuse && r.reusable && !head.backend_close {
                ctx.raw_idle.put(conn);
            }
            if close_client || head.framing == Framing::UntilClose {
                Next::Close
            } else {
                Next::KeepAlive
            }
        }
        Err(e) => {
            tracing::debug!(peer = %c.peer, error = %e, "response relay ended early");
            Next::Close
        }
    };
    drop(lease);
    Ok(next)
}

fn bad_gateway(message: String) -> Reject {
    Reject {
        status: StatusCode::BAD_GATEWAY,
        result: RequestResult::BadGateway,
        message,
        offense: None,
        retry_after: None,
    }
}

/// Sends the request on `conn` and reads the response head (rewritten
/// into the client's response buffer), within the idle timeout. On a
/// `reused` connection, a request without body that finds it closed is
/// [`Sent::Stale`].
#[allow(clippy::too_many_arguments)]
async fn send(
    ctx: &Ctx,
    c: &mut Client,
    conn: &mut RawConn,
    reused: bool,
    req_bytes: &[u8],
    req: &Req,
    rest: u64,
    close_client: bool,
) -> Sent {
    let idle = ctx.opts.idle_timeout;
    let deadline = Instant::now() + idle;
    let (src, dest) = (conn.key.src, conn.dest);
    let retryable = reused && req.body == 0;
    let timed_out = || {
        Sent::Failed(
            Reject {
                status: StatusCode::GATEWAY_TIMEOUT,
                result: RequestResult::Timeout,
                message: format!("{dest} sent no response within {idle:?}"),
                offense: None,
                retry_after: None,
            },
            Some(Outcome::Failure),
        )
    };
    let failed = |e: &dyn std::fmt::Display| {
        Sent::Failed(
            bad_gateway(format!("upstream error from {src} to {dest}: {e}")),
            Some(Outcome::Failure),
        )
    };
    match c
        .timer
        .within(deadline, conn.stream.write_all(req_bytes))
        .await
    {
        Some(Ok(())) => {}
        Some(Err(_)) if retryable => return Sent::Stale,
        Some(Err(e)) => return failed(&e),
        None => return timed_out(),
    }
    if rest > 0 {
        match c
            .timer
            .within(
                deadline,
                copy_body(&mut c.stream, &mut c.buf, &mut conn.stream, rest),
            )
            .await
        {
            Some(Ok(())) => {}
            Some(Err(BodyError::Client(e))) => {
                return Sent::Failed(
                    Reject {
                        status: StatusCode::BAD_REQUEST,
                        result: RequestResult::BadRequest,
                        message: format!("reading the request body failed: {e}"),
                        offense: None,
                        retry_after: None,
                    },
                    None,
                );
            }
            Some(Err(BodyError::Backend(e))) => return failed(&e),
            None => return timed_out(),
        }
    }
    ctx.metrics
        .up(usize::try_from(req.body).unwrap_or(usize::MAX));
    conn.buf.clear();
    let drop_header: fn(&str) -> bool =
        |n| is(n, "proxy-authenticate") || is(n, super::SOURCE_HEADER);
    let rw = Rewrite {
        head_request: req.head,
        close_client,
        drop: drop_header,
        add: &conn.source_line,
    };
    match c
        .timer
        .within(
            deadline,
            wire::read_head(&mut conn.stream, &mut conn.buf, &mut c.resp_out, rw),
        )
        .await
    {
        Some(Ok(head)) => Sent::Answered(head),
        Some(Err(HeadError::Eof | HeadError::Io(_))) if retryable => Sent::Stale,
        Some(Err(HeadError::Eof)) => Sent::Failed(
            bad_gateway(format!(
                "{dest} closed the connection from {src} without a response"
            )),
            Some(Outcome::EarlyEof),
        ),
        Some(Err(HeadError::Io(e))) => failed(&e),
        Some(Err(HeadError::Invalid(why))) => failed(&why),
        None => timed_out(),
    }
}
