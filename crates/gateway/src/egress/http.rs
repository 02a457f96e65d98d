//! HTTP/1.1 side of the listener: absolute-form forwarding and CONNECT.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use addrpool::{Outcome, Pool, Session};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::auth::{self, AuthError, Identity};
use super::body::{Exchange, ProxyBody, UpBody};
use super::dial::{self, DialError};
use super::metrics::{Protocol, RequestResult};
use super::tunnel;
use super::upstream::{Conn, Key};
use super::{Ctx, SessionFrom};
use crate::activity::{Activity, Touched};
use crate::guard::Offense;
use crate::wire::{Rewind, header_text};

/// The response header that tells the client the source address used.
pub const SOURCE_HEADER: &str = "x-ippool-source";
/// The response header with the reason of an error made by the proxy.
pub const ERROR_HEADER: &str = "x-ippool-error";

type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Per client connection: a tunnel to run once hyper hands over the IO,
/// and what its requests (one at a time) reuse.
struct ConnState {
    tunnel: Mutex<Option<Tunnel>>,
    /// The connection's activity: a request waiting for its answer keeps
    /// it from the idle timeout (the answer has its own).
    act: Arc<Activity>,
    peer: SocketAddr,
    /// Who the connection's credentials name.
    auth: Mutex<auth::Remembered>,
    /// The response timer, reset for each request (a later deadline only
    /// updates the registered one, instead of a new timer per request).
    timer: Mutex<Option<Pin<Box<Sleep>>>>,
}

impl ConnState {
    /// `f`, or `None` if it did not finish within `limit`.
    async fn within<F: Future>(&self, limit: Duration, f: F) -> Option<F::Output> {
        let deadline = Instant::now() + limit;
        let taken = self
            .timer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let mut timer = match taken {
            Some(mut t) => {
                t.as_mut().reset(deadline);
                t
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        let r = tokio::select! {
            biased;
            r = f => Some(r),
            () = timer.as_mut() => None,
        };
        *self.timer.lock().unwrap_or_else(PoisonError::into_inner) = Some(timer);
        r
    }
}

/// [`SOURCE_HEADER`] as a header name.
const SOURCE: HeaderName = HeaderName::from_static(SOURCE_HEADER);

/// The [`SOURCE_HEADER`] value for `src` (an address has no character
/// that needs replacing).
fn source_value(src: IpAddr) -> HeaderValue {
    use std::io::Write;
    let mut buf = [0u8; 64];
    let mut w = &mut buf[..];
    let _ = write!(w, "{src}");
    let left = w.len();
    HeaderValue::from_bytes(&buf[..buf.len() - left]).unwrap_or(HeaderValue::from_static("error"))
}

/// A request the proxy answers itself.
pub(crate) struct Reject {
    pub(crate) status: StatusCode,
    pub(crate) result: RequestResult,
    pub(crate) message: String,
    /// The misbehaviour to report to the listener's auto-blocking, if the
    /// client is at fault.
    pub(crate) offense: Option<Offense>,
    /// `Retry-After` (whole seconds).
    pub(crate) retry_after: Option<u64>,
}

impl Reject {
    fn bad_request(message: impl Into<String>) -> Reject {
        Reject {
            status: StatusCode::BAD_REQUEST,
            result: RequestResult::BadRequest,
            message: message.into(),
            offense: Some(Offense::Malformed),
            retry_after: None,
        }
    }
}

impl From<DialError> for Reject {
    fn from(e: DialError) -> Reject {
        Reject {
            status: e.status,
            result: e.result,
            message: e.message,
            offense: None,
            retry_after: None,
        }
    }
}

impl From<AuthError> for Reject {
    fn from(e: AuthError) -> Reject {
        Reject {
            status: StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            result: RequestResult::AuthFailed,
            message: e.reason().to_owned(),
            // A client without credentials is asked for them (407): that
            // is the protocol, not an offense. Wrong ones are.
            offense: match e {
                AuthError::Missing => None,
                AuthError::Malformed => Some(Offense::Malformed),
                AuthError::Invalid | AuthError::BadSession => Some(Offense::AuthFailed),
            },
            retry_after: None,
        }
    }
}

fn error_response(r: &Reject) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(format!("{}\n", r.message)));
    *resp.status_mut() = r.status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(ERROR_HEADER, header_text(&r.message));
    if r.status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        h.insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"ippool\""),
        );
    }
    if r.status == StatusCode::BAD_REQUEST {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(secs) = r.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// Serves one client connection speaking HTTP/1.x; `pre`: bytes already
/// read from it (by the fast path, `h1.rs`).
pub(crate) async fn serve(ctx: Arc<Ctx>, stream: TcpStream, peer: SocketAddr, pre: Bytes) {
    let act = Arc::new(Activity::default());
    act.touch();
    let io = Touched::new(Rewind::new(pre, stream), act.clone());
    let state = Arc::new(ConnState {
        tunnel: Mutex::new(None),
        act: act.clone(),
        peer,
        auth: Mutex::default(),
        timer: Mutex::new(None),
    });
    let svc = {
        let (ctx, state) = (ctx.clone(), state.clone());
        service_fn(move |req| {
            let (ctx, state) = (ctx.clone(), state.clone());
            async move { Ok::<_, Infallible>(handle(&ctx, &state, req).await) }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.opts.header_read_timeout)
        .max_header_size(ctx.opts.max_header_bytes)
        .keep_alive(true);
    let conn = builder
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let mut shutdown = ctx.shutdown.clone();
    let mut draining = *shutdown.borrow();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
                break;
            }
            _ = shutdown.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            () = act.idle(ctx.opts.idle_timeout) => {
                tracing::debug!(%peer, "client connection idle; closing");
                return;
            }
        }
    }
    let tunnel = state
        .tunnel
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(t) = tunnel {
        t.await;
    }
}

/// 429 with `Retry-After` (whole seconds, at least 1).
pub(crate) fn rate_limit_reject(wait: Duration) -> Reject {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    Reject {
        status: StatusCode::TOO_MANY_REQUESTS,
        result: RequestResult::RateLimited,
        message: format!("too many requests from your address; retry after {secs}s"),
        offense: None,
        retry_after: Some(secs.max(1)),
    }
}

async fn handle(ctx: &Arc<Ctx>, state: &ConnState, req: Request<Incoming>) -> Response<ProxyBody> {
    let _busy = state.act.busy();
    let entry = ctx
        .opts
        .access_log
        .as_ref()
        .map(|_| access_entry(state.peer, &req));
    let resp = handle_inner(ctx, state, req).await;
    if let (Some(log), Some(mut e)) = (&ctx.opts.access_log, entry) {
        e.status = resp.status().as_u16();
        e.bytes = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        log.record(e);
    }
    resp
}

/// The request half of an access-log entry.
fn access_entry(peer: SocketAddr, req: &Request<Incoming>) -> crate::access::AccessEntry {
    let h = |name: header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    crate::access::AccessEntry {
        peer: peer.ip(),
        user: None,
        time: std::time::SystemTime::now(),
        method: req.method().as_str().to_owned(),
        target: req.uri().to_string(),
        version: crate::access::version_name(req.version()),
        status: 0,
        bytes: 0,
        referer: h(header::REFERER),
        user_agent: h(header::USER_AGENT),
    }
}

async fn handle_inner(
    ctx: &Arc<Ctx>,
    state: &ConnState,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let protocol = if req.method() == Method::CONNECT {
        Protocol::Connect
    } else {
        Protocol::Http
    };
    if let Err(wait) = ctx.opts.guard.check_request(state.peer.ip()) {
        ctx.metrics.request(protocol, RequestResult::RateLimited);
        return error_response(&rate_limit_reject(wait));
    }
    let r = if protocol == Protocol::Connect {
        connect(ctx, state, req).await
    } else {
        forward(ctx, state, req).await
    };
    match r {
        Ok(resp) => {
            ctx.metrics.request(protocol, RequestResult::Ok);
            resp
        }
        Err(reject) => {
            ctx.metrics.request(protocol, reject.result);
            if let Some(o) = reject.offense {
                ctx.opts.guard.offense(state.peer.ip(), o);
            }
            tracing::debug!(status = %reject.status, reason = %reject.message, "request refused");
            error_response(&reject)
        }
    }
}

/// Who sent `headers` (their `Proxy-Authorization`).
fn authenticate(
    ctx: &Ctx,
    state: &ConnState,
    headers: &HeaderMap,
) -> Result<Arc<Identity>, AuthError> {
    let value = headers
        .get(header::PROXY_AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    state
        .auth
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .identify(&ctx.opts.users, value)
}

/// The sticky session of a request.
pub(crate) fn session_for<'a>(ctx: &Ctx, id: &'a Identity, host: &str) -> Option<Cow<'a, Session>> {
    match ctx.opts.session_from {
        SessionFrom::Username => id.session.as_ref().map(Cow::Borrowed),
        SessionFrom::Host => Some(Cow::Owned(Session::new(format!(
            "{}@{}",
            id.user.as_deref().unwrap_or(""),
            host.to_ascii_lowercase()
        )))),
    }
}

/// `host` (lowercase, brackets kept for IPv6) and port of a target.
fn target(uri: &Uri, default_port: Option<u16>) -> Result<(Cow<'_, str>, u16), &'static str> {
    let auth = uri.authority().ok_or("no host")?;
    let host = auth.host();
    if host.is_empty() || host == "[]" {
        return Err("empty host");
    }
    let port = match auth.port_u16().or(default_port) {
        Some(0) | None => return Err("missing or zero port"),
        Some(p) => p,
    };
    let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    Ok((host, port))
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those named in `Connection`.
/// `Transfer-Encoding` is left to hyper, which re-frames bodies itself.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the (few) names; most messages have no hop-by-hop
    // header, or only `Proxy-Authorization`.
    let mut present = 0u8;
    for k in h.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|n| n == k) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // HOP_BY_HOP[0] is `Connection`: the names it lists go too.
    if present & 1 == 0 {
        for (i, n) in HOP_BY_HOP.iter().enumerate() {
            if present & (1 << i) != 0 {
                h.remove(n);
            }
        }
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        if *n != header::TRANSFER_ENCODING && *n != header::CONTENT_LENGTH {
            h.remove(n);
        }
    }
}

async fn connect(
    ctx: &Arc<Ctx>,
    state: &ConnState,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Reject> {
    let uri = req.uri();
    if uri.scheme().is_some() || uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(Reject::bad_request("CONNECT target must be host:port"));
    }
    let (host, port) = target(uri, None)
        .map_err(|why| Reject::bad_request(format!("bad CONNECT target: {why}")))?;
    let id = authenticate(ctx, state, req.headers())?;
    let session = session_for(ctx, &id, &host);
    let pool = ctx.opts.pool.pick(id.user.as_deref());
    let stream = dial::dial(ctx, pool, &host, port, session.as_deref()).await?;
    drop(host);
    let src = stream.source();
    let (idle, metrics) = (ctx.opts.idle_timeout, ctx.metrics.clone());
    let run: Tunnel = Box::pin(async move {
        match hyper::upgrade::on(req).await {
            // The client connection is a plain socket under hyper: take it
            // back (with what hyper read past the request) to splice it.
            Ok(up) => match up.downcast::<TokioIo<Touched<Rewind<TcpStream>>>>() {
                Ok(parts) => {
                    // What hyper read past the request, then what the
                    // fast path had read that hyper did not get to.
                    let (unread, client) = parts.io.into_inner().io.into_parts();
                    let early = if unread.is_empty() {
                        parts.read_buf
                    } else {
                        let mut b = bytes::BytesMut::from(&parts.read_buf[..]);
                        b.extend_from_slice(&unread);
                        b.freeze()
                    };
                    tunnel::run(client, early, stream, idle, metrics).await;
                }
                Err(_) => tracing::error!("CONNECT upgrade is not a TCP stream; tunnel closed"),
            },
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    *state.tunnel.lock().unwrap_or_else(PoisonError::into_inner) = Some(run);
    let mut resp = Response::new(ProxyBody::Full(None));
    resp.headers_mut().insert(SOURCE, source_value(src));
    resp.extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(
            b"Connection established",
        ));
    Ok(resp)
}

/// The request sent upstream (origin-form, hop-by-hop headers removed,
/// `Host` set from the absolute URI).
fn upstream_request(
    method: &Method,
    uri: &Uri,
    mut headers: HeaderMap,
    host_header: HeaderValue,
    body: UpBody,
) -> Request<UpBody> {
    let path = match uri.path_and_query() {
        Some(p) => {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(p.clone());
            Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
        }
        None => Uri::from_static("/"),
    };
    headers.insert(header::HOST, host_header);
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = path;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

async fn forward(
    ctx: &Arc<Ctx>,
    state: &ConnState,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Reject> {
    match req.uri().scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(Reject::bad_request(format!(
                "only http:// URIs are forwarded ({other}:// given); use CONNECT for TLS"
            )));
        }
        None => {
            return Err(Reject::bad_request(
                "origin-form request to a forward proxy: send an absolute URI \
                 (GET http://host/path) or use CONNECT",
            ));
        }
    }
    let (parts, body) = req.into_parts();
    let (host, port) = target(&parts.uri, Some(80))
        .map_err(|why| Reject::bad_request(format!("bad request URI: {why}")))?;
    let id = authenticate(ctx, state, &parts.headers)?;
    let session = session_for(ctx, &id, &host);
    let session = session.as_deref();
    let pool = ctx.opts.pool.pick(id.user.as_deref());

    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let retryable = body.is_end_stream();
    let body = if retryable {
        UpBody::Empty
    } else {
        UpBody::Client(body, ctx.metrics.clone())
    };

    let reuse = ctx.keep_alive(pool);
    let fresh_from = async |first, addrs: &[IpAddr], deadline| {
        fresh(ctx, pool, session, first, addrs, &host, port, deadline).await
    };
    let dial::Checkout {
        mut conn,
        lease,
        reused,
        addrs,
    } = dial::checkout(
        ctx,
        &ctx.idle,
        pool,
        session,
        &host,
        port,
        async |lease, addrs, deadline| fresh_from(lease, addrs, deadline).await,
    )
    .await?;
    // A request without body on a kept-alive connection may be sent again
    // (below): keep its headers.
    let again = (reused && retryable).then(|| headers.clone());
    let up_req = upstream_request(
        &parts.method,
        &parts.uri,
        headers,
        conn.host_header.clone(),
        body,
    );
    let idle_timeout = ctx.opts.idle_timeout;
    let mut result = state
        .within(idle_timeout, conn.sender.send_request(up_req))
        .await;
    let (conn, lease) = match (&result, again) {
        // A kept-alive connection the destination closed meanwhile: retry a
        // request without body once on a new connection.
        (Some(Err(e)), Some(headers))
            if e.is_canceled() || e.is_closed() || e.is_incomplete_message() =>
        {
            drop(conn);
            let src = lease.source();
            drop(lease);
            tracing::debug!(%src, error = %e, "kept-alive connection failed; retrying on a new one");
            let (mut c, lease) =
                fresh_from(None, &addrs, Instant::now() + ctx.opts.connect_timeout).await?;
            let again = upstream_request(
                &parts.method,
                &parts.uri,
                headers,
                c.host_header.clone(),
                UpBody::Empty,
            );
            result = state
                .within(idle_timeout, c.sender.send_request(again))
                .await;
            (c, lease)
        }
        _ => (conn, lease),
    };
    let src = lease.source();
    let dest = conn.dest;
    let resp = match result {
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            let (outcome, message) =
                if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
                    (
                        Outcome::EarlyEof,
                        format!("{dest} closed the connection from {src} without a response"),
                    )
                } else {
                    (
                        Outcome::Failure,
                        format!("upstream error from {src} to {dest}: {e}"),
                    )
                };
            lease.report(outcome);
            return Err(Reject {
                status: StatusCode::BAD_GATEWAY,
                result: RequestResult::BadGateway,
                message,
                offense: None,
                retry_after: None,
            });
        }
        None => {
            lease.report(Outcome::Failure);
            return Err(Reject {
                status: StatusCode::GATEWAY_TIMEOUT,
                result: RequestResult::Timeout,
                message: format!("{dest} sent no response within {idle_timeout:?}"),
                offense: None,
                retry_after: None,
            });
        }
    };
    lease.report(Outcome::Status(resp.status().as_u16()));
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(SOURCE, conn.source_header.clone());
    // Keep the connection only if the destination did not ask to close it.
    let keep = reuse && !conn.sender.is_closed();
    let exchange = Exchange {
        lease,
        conn,
        reuse: keep.then(|| ctx.idle.clone()),
    };
    let body = ProxyBody::Upstream {
        inner: body,
        exchange: Some(Box::new(exchange)),
        done: false,
        metrics: ctx.metrics.clone(),
    };
    Ok(Response::from_parts(parts, body))
}

/// A new upstream connection and its HTTP/1.1 handshake.
#[allow(clippy::too_many_arguments)]
async fn fresh(
    ctx: &Arc<Ctx>,
    pool: &Pool,
    session: Option<&Session>,
    first: Option<addrpool::Lease>,
    addrs: &[IpAddr],
    host: &str,
    port: u16,
    deadline: Instant,
) -> Result<(Conn, addrpool::Lease), Reject> {
    let (stream, dest) = dial::connect(pool, session, first, addrs, port, deadline).await?;
    let (tcp, lease) = stream.into_parts();
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, UpBody>(TokioIo::new(tcp))
        .await
        .map_err(|e| Reject {
            status: StatusCode::BAD_GATEWAY,
            result: RequestResult::BadGateway,
            message: format!("HTTP handshake with {dest} failed: {e}"),
            offense: None,
            retry_after: None,
        })?;
    ctx.tasks.spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    let host_header = if port == 80 {
        header_text(host)
    } else {
        header_text(&format!("{host}:{port}"))
    };
    let src = lease.source();
    let conn = Conn {
        sender,
        dest,
        key: Key {
            src,
            host: host.into(),
            port,
        },
        host_header,
        source_header: source_value(src),
    };
    Ok((conn, lease))
}

/// Answers 400 on a connection that is not HTTP, then closes it.
pub(crate) async fn refuse_raw(mut stream: TcpStream, why: &str) {
    use tokio::io::AsyncWriteExt;
    let body = format!("{why}\n");
    let head = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n{ERROR_HEADER}: {why}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(head.as_bytes())).await;
    linger_close(stream).await;
}

/// Closes after a reply: half-closes, then reads what the client still
/// sends (at most 256 KiB or 1 s) so that closing with unread data does not
/// turn into a reset that could discard the reply.
pub(crate) async fn linger_close(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 4096];
        for _ in 0..64 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}
