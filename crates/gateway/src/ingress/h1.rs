//! The HTTP/1.1 fast path of ingress connections (plain, or TLS whose
//! ALPN chose HTTP/1.1).
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

use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use health::{Outcome, Verdict};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::wire::{
    self, BodyError, CHUNK, Framing, Head, HeadError, Lazy, LogInfo, MAX_HEADERS, Next, NextHead,
    Parsed, RespHead, Rewrite, copy_body, header_line, header_text, hop_by_hop, is, named_in, text,
};

use super::backend::{BackendRt, inc};
use super::backend_tls::BackendStream;
use super::balance::{Mask, key_of};
use super::headers::push_param;
use super::metrics::Refusal;
use super::options::is_token;
use super::proxy::{Reject, connect, rate_limited, removed, response_timeout};
use super::routes::{RouteRt, request_host};
use super::upstream::Registration;
use super::{Balance, Conn, Ctx};

/// A connection to a backend used by the fast path, with its read buffer.
pub(crate) struct RawUpstream {
    // Dropped first: deregistered while the socket is still open.
    _reg: Registration,
    stream: BackendStream,
    buf: BytesMut,
}

impl RawUpstream {
    fn new(b: &Arc<BackendRt>, stream: BackendStream) -> RawUpstream {
        RawUpstream {
            _reg: Registration::new(b, stream.tcp().as_raw_fd()),
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Whether an idle connection was closed by the backend meanwhile.
    fn stale(&self) -> bool {
        self.stream.stale()
    }

    /// Sends `bytes` (flushed: a TLS stream may hold the last record).
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }
}

/// How the fast path left a client connection.
pub(crate) enum Served<S> {
    /// Closed, or to be closed.
    Done,
    /// To be served by hyper from here on; the bytes read and not yet
    /// consumed come first.
    Fallback(S, BytesMut),
}

/// What a head the fast path takes asks for.
enum Prep {
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

/// Parses the head at the start of `buf` and, if the fast path takes it,
/// writes the head to send to the backend into `out`.
fn prepare(conn: &Conn, buf: &[u8], out: &mut Vec<u8>) -> Parsed<Prep> {
    let ctx = &*conn.ctx;
    let opts = &ctx.opts;
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    // Over max_header_bytes or malformed: hyper answers (431, 400).
    let Head {
        len: head_len,
        method,
        target,
        headers,
    } = match wire::parse_head(buf, &mut slots, opts.max_header_bytes) {
        Parsed::Ready(h) => h,
        Parsed::Partial => return Parsed::Partial,
        Parsed::Fallback => return Parsed::Fallback,
    };
    if method == "CONNECT" || !target.starts_with('/') {
        return Parsed::Fallback;
    }

    // One pass for what decides the request's fate.
    let Some(frame) = wire::request_frame(headers, "host") else {
        return Parsed::Fallback;
    };
    let (connection, body, close) = (frame.connection(), frame.body, frame.close);
    let Some(host_raw) = frame.one.and_then(text) else {
        return Parsed::Fallback;
    };
    let log = opts
        .access_log
        .as_ref()
        .map(|_| LogInfo::new(method, target, headers));
    let answer = |reject: Reject, retry_after: Option<u64>, log: Option<LogInfo>| {
        Parsed::Ready(Prep::Answer {
            reject,
            retry_after,
            consumed: head_len,
            body,
            close,
            log,
        })
    };

    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let host = request_host(host_raw);
    let route = opts.routes.find(&host, path);
    if route.as_ref().is_some_and(|r| r.backend_http2) {
        // HTTP/2 to the backends: hyper's client (before the rate limit
        // counts the request: hyper's path counts it).
        return Parsed::Fallback;
    }
    // The client's rate limit, per request (keep-alive does not escape it).
    if let Err(wait) = opts.guard.check_request(conn.peer.ip()) {
        let (reject, secs) = rate_limited(wait);
        return answer(reject, Some(secs), log);
    }
    let Some(route) = route else {
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
        if hop_by_hop(name) || named_in(connection, name) {
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
        out.extend_from_slice(b"X-Forwarded-For: ");
        if !xff.is_empty() {
            out.extend_from_slice(&xff);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(client.xff.as_bytes());
        out.extend_from_slice(b"\r\n");
        if !(trusted && have_proto) {
            header_line(out, b"X-Forwarded-Proto", client.proto.as_bytes());
        }
        if !(trusted && have_host) {
            header_line(out, b"X-Forwarded-Host", host_raw.as_bytes());
        }
    }
    if fwd.forwarded {
        out.extend_from_slice(b"Forwarded: ");
        if !forwarded.is_empty() {
            out.extend_from_slice(&forwarded);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(b"for=");
        out.extend_from_slice(client.node.as_bytes());
        out.extend_from_slice(b";host=");
        if is_token(host_raw) {
            out.extend_from_slice(host_raw.as_bytes());
        } else {
            let mut quoted = String::new();
            push_param(&mut quoted, host_raw);
            out.extend_from_slice(quoted.as_bytes());
        }
        out.extend_from_slice(b";proto=");
        out.extend_from_slice(client.proto.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(via) = &ctx.via {
        header_line(out, b"Via", via.get(http::Version::HTTP_11).as_bytes());
    }
    out.extend_from_slice(b"\r\n");

    Parsed::Ready(Prep::Forward(Prepared {
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
    }))
}

/// A response the proxy makes itself, as the hyper path makes it.
fn write_reject(out: &mut Vec<u8>, rej: &Reject, close: bool, retry_after: Option<u64>) {
    wire::own_response(
        out,
        rej.status,
        header_text(&rej.reason).as_bytes(),
        &rej.reason,
        b"",
        retry_after,
        close,
    );
}

/// Serves a plain client connection until it closes or needs hyper.
pub(crate) async fn serve<S>(conn: &Conn, mut stream: S) -> Served<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ctx = &*conn.ctx;
    let opts = &ctx.opts;
    let shutdown = &ctx.shutdown;
    let mut stopping = wire::shutdown_signal(shutdown.clone());
    let mut buf = BytesMut::with_capacity(CHUNK);
    let mut req_out: Vec<u8> = Vec::with_capacity(1024);
    let mut resp_out: Vec<u8> = Vec::with_capacity(1024);
    // One timer for the heads, one for the exchanges (wire::Lazy).
    let mut head_timer = Lazy::new();
    let mut timer = Lazy::new();
    loop {
        if buf.is_empty() && *shutdown.borrow() {
            return Served::Done;
        }
        let limits = (opts.header_read_timeout, opts.max_header_bytes);
        let head = wire::next_head(
            &mut stream,
            &mut buf,
            &mut head_timer,
            &mut stopping,
            limits,
            |b| prepare(conn, b, &mut req_out),
        );
        let prep = match head.await {
            NextHead::Ready(p) => p,
            NextHead::Fallback => return Served::Fallback(stream, buf),
            NextHead::Done { slow } => {
                if slow {
                    ctx.metrics.malformed();
                    tracing::debug!(peer = %conn.peer, "request head not complete in time; closed");
                }
                return Served::Done;
            }
        };
        // When the request came: its exchange's deadline, and the backend
        // pool's idle times.
        let now = Instant::now();
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
                    &mut timer,
                    now,
                    p,
                    rest,
                )
                .await
            }
        };
        if matches!(next, Next::Close) {
            return Served::Done;
        }
        if buf.capacity() > 4 * CHUNK && buf.is_empty() {
            buf = BytesMut::with_capacity(CHUNK);
        }
    }
}

/// A response the proxy makes itself.
struct Answer {
    reject: Reject,
    retry_after: Option<u64>,
    close: bool,
}

async fn answer(
    conn: &Conn,
    stream: &mut (impl AsyncWrite + Unpin),
    out: &mut Vec<u8>,
    a: Answer,
    log: Option<&LogInfo>,
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
        l.record(log.entry(conn.peer.ip(), reject.status.as_u16(), 0));
    }
    if reject.status != StatusCode::TOO_MANY_REQUESTS {
        ctx.metrics.refused(reject.kind);
    }
    tracing::debug!(peer = %conn.peer, status = %reject.status, reason = %reject.reason, "request answered by the proxy");
    write_reject(out, &reject, close, retry_after);
    ctx.metrics.response(reject.status, false);
    ctx.metrics.lean();
    // A client that does not read its answers is not held.
    match tokio::time::timeout(ctx.opts.idle_timeout, stream.write_all(out)).await {
        Ok(Ok(())) if !close => Next::KeepAlive,
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

#[allow(clippy::too_many_arguments)]
async fn forward(
    conn: &Conn,
    client: &mut (impl AsyncRead + AsyncWrite + Unpin),
    cbuf: &mut BytesMut,
    req: &[u8],
    resp_out: &mut Vec<u8>,
    timer: &mut Lazy,
    now: Instant,
    p: Prepared,
    rest: u64,
) -> Next {
    let ctx = &*conn.ctx;
    let opts = &ctx.opts;
    let log = p.log;
    let route = &p.route;
    let deadline = now + opts.request_timeout;
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
                now,
            },
            client,
            cbuf,
            resp_out,
            timer,
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
                ctx.metrics.lean();
                if let (Some(l), Some(log)) = (&opts.access_log, &log) {
                    l.record(log.entry(conn.peer.ip(), head.status, head.length));
                }
                close_client |= draining || head.framing == Framing::UntilClose;
                let relayed = timer
                    .within(
                        deadline,
                        wire::relay(
                            &mut up.stream,
                            &mut up.buf,
                            client,
                            resp_out,
                            head.framing,
                            None,
                        ),
                    )
                    .await;
                let reusable = match relayed {
                    Some(Ok(r)) => r.reusable,
                    Some(Err(e)) => {
                        tracing::debug!(peer = %conn.peer, backend = &*b.id, error = %e, "response relay ended early");
                        return Next::Close;
                    }
                    None => {
                        tracing::debug!(peer = %conn.peer, backend = &*b.id, "response not complete within the request timeout; closed");
                        return Next::Close;
                    }
                };
                if reusable && !head.backend_close {
                    b.put_raw(up, opts.keep_alive.max_idle_per_backend, now.into_std());
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
    /// When the request came (for the pool's idle times).
    now: Instant,
}

fn timed_out(ctx: &Ctx, b: &BackendRt) -> Attempt {
    Attempt::Failed(Some(Outcome::Timeout), response_timeout(ctx, b))
}

fn backend_failed(b: &BackendRt, outcome: Outcome, what: &str) -> Attempt {
    if *b.kill.borrow() {
        return Attempt::Failed(None, removed(b));
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

#[allow(clippy::too_many_arguments)]
async fn attempt(
    ctx: &Ctx,
    b: &Arc<BackendRt>,
    s: Sending<'_>,
    client: &mut (impl AsyncRead + Unpin),
    cbuf: &mut BytesMut,
    resp_out: &mut Vec<u8>,
    timer: &mut Lazy,
    deadline: Instant,
    measure: bool,
) -> Attempt {
    let ttl = ctx.opts.keep_alive.idle_timeout;
    let mut fresh_only = false;
    loop {
        let pooled = if fresh_only {
            None
        } else {
            b.take_raw(ttl, s.now.into_std())
        };
        let (mut up, reused) = match pooled {
            Some(up) if up.stale() => continue,
            Some(up) => (up, true),
            None => match connect(ctx, b, deadline).await {
                Ok(stream) => (RawUpstream::new(b, stream), false),
                Err((outcome, reject)) => return Attempt::NotSent(outcome, reject),
            },
        };
        let t0 = measure.then(Instant::now);
        match timer.within(deadline, up.send(s.req)).await {
            Some(Ok(())) => {}
            Some(Err(_)) if reused => {
                // Closed by the backend while idle: a new connection.
                fresh_only = true;
                continue;
            }
            Some(Err(e)) => {
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
            None => return timed_out(ctx, b),
        }
        if s.rest > 0 {
            match timer
                .within(deadline, copy_body(client, cbuf, &mut up.stream, s.rest))
                .await
            {
                Some(Ok(())) => {}
                Some(Err(BodyError::Client(e))) => {
                    return Attempt::Failed(
                        None,
                        Reject::new(
                            StatusCode::BAD_REQUEST,
                            Refusal::BadRequest,
                            format!("reading the request body failed: {e}"),
                        ),
                    );
                }
                Some(Err(BodyError::Backend(e))) => {
                    return backend_failed(b, Outcome::EarlyEof, &e.to_string());
                }
                None => return timed_out(ctx, b),
            }
        }
        up.buf.clear();
        match timer
            .within(
                deadline,
                wire::read_head(
                    &mut up.stream,
                    &mut up.buf,
                    resp_out,
                    Rewrite {
                        head_request: s.head,
                        close_client: s.close_client,
                        drop: |_| false,
                        add: b"",
                    },
                ),
            )
            .await
        {
            Some(Ok(head)) => return Attempt::Answered(up, head, t0.map(|t| t.elapsed())),
            Some(Err(HeadError::Eof | HeadError::Io(_)))
                if reused && s.rest == 0 && s.idempotent =>
            {
                // A kept-alive connection the backend closed (or reset)
                // as the request went out: once more on a new one.
                fresh_only = true;
                continue;
            }
            Some(Err(HeadError::Eof)) => {
                return backend_failed(
                    b,
                    Outcome::EarlyEof,
                    "closed the connection without a response",
                );
            }
            Some(Err(HeadError::Io(e))) => {
                return backend_failed(b, Outcome::EarlyEof, &e.to_string());
            }
            Some(Err(HeadError::Invalid(why))) => {
                return backend_failed(b, Outcome::Reported(Verdict::Failure), why);
            }
            None => return timed_out(ctx, b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn peer_key(balance: &Balance, peer: IpAddr) -> Option<u64> {
        key_of(balance, peer, |_| None, std::iter::empty)
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
