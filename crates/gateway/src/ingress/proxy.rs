//! One request: route, pick a backend, forward, stream the answer back.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use health::{Outcome, Verdict};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::backend::{BackendRt, InFlight, inc};
use super::backend_tls::BackendStream;
use super::balance::{Mask, request_key};
use super::body::{ClientBody, Exchange, ProxyBody, TooLarge, UpBody, caused_by};
use super::headers::{self, add_forwarding, strip_hop_by_hop};
use super::metrics::Refusal;
use super::routes::request_host;
use super::upstream::Upstream;
use super::{Conn, Ctx, ERROR_HEADER};
use crate::activity::{Activity, Touched};
use crate::wire::header_text;

/// A request the proxy answers itself.
pub(crate) struct Reject {
    pub(crate) status: StatusCode,
    pub(crate) kind: Refusal,
    pub(crate) reason: String,
}

impl Reject {
    pub(crate) fn new(status: StatusCode, kind: Refusal, reason: impl Into<String>) -> Reject {
        Reject {
            status,
            kind,
            reason: reason.into(),
        }
    }

    fn bad_request(reason: &str) -> Reject {
        Reject::new(StatusCode::BAD_REQUEST, Refusal::BadRequest, reason)
    }

    fn response(self) -> Response<ProxyBody> {
        let mut resp = Response::new(ProxyBody::full(format!("{}\n", self.reason)));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(ERROR_HEADER, header_text(&self.reason));
        resp
    }
}

/// The service of every client connection.
pub(crate) async fn handle(
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let Some(log) = conn.ctx.opts.access_log.clone() else {
        return handle_inner(conn, req).await;
    };
    let h = |name: header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut e = crate::access::AccessEntry {
        peer: conn.peer.ip(),
        user: None,
        time: std::time::SystemTime::now(),
        method: req.method().as_str().to_owned(),
        target: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().to_string(), |p| p.as_str().to_owned()),
        version: crate::access::version_name(req.version()),
        status: 0,
        bytes: 0,
        referer: h(header::REFERER),
        user_agent: h(header::USER_AGENT),
    };
    let resp = handle_inner(conn, req).await;
    if let Ok(r) = &resp {
        e.status = r.status().as_u16();
        e.bytes = r
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        log.record(e);
    }
    resp
}

/// The 429 for a client over its rate limit, and the whole seconds (at
/// least 1) for its `Retry-After`.
pub(crate) fn rate_limited(wait: std::time::Duration) -> (Reject, u64) {
    let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    let reject = Reject::new(
        StatusCode::TOO_MANY_REQUESTS,
        Refusal::BadRequest,
        format!("too many requests from your address; retry after {secs}s"),
    );
    (reject, secs)
}

async fn handle_inner(
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let _busy = conn.act.busy();
    let http2 = req.version() == Version::HTTP_2;
    // The client's rate limit, per request (keep-alive does not escape it).
    if let Err(wait) = conn.ctx.opts.guard.check_request(conn.peer.ip()) {
        let (reject, secs) = rate_limited(wait);
        let mut resp = reject.response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        conn.ctx.metrics.response(resp.status(), http2);
        return Ok(resp);
    }
    let resp = match forward(&conn, req).await {
        Ok(r) => r,
        Err(rej) => {
            conn.ctx.metrics.refused(rej.kind);
            tracing::debug!(peer = %conn.peer, status = %rej.status, reason = %rej.reason, "request answered by the proxy");
            rej.response()
        }
    };
    conn.ctx.metrics.response(resp.status(), http2);
    Ok(resp)
}

fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub(crate) fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

async fn forward(
    conn: &Arc<Conn>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Reject> {
    let ctx: &Ctx = &conn.ctx;
    let opts = &ctx.opts;
    if req.method() == Method::CONNECT {
        return Err(Reject::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Refusal::BadRequest,
            "CONNECT is not supported by this reverse proxy",
        ));
    }
    // The host asked for: the URI's authority (HTTP/2, absolute-form),
    // else `Host`.
    let host_value = match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str())
            .map_err(|_| Reject::bad_request("invalid authority"))?,
        None => req
            .headers()
            .get(header::HOST)
            .cloned()
            .ok_or_else(|| Reject::bad_request("no Host header"))?,
    };
    let route = {
        let raw = host_value
            .to_str()
            .map_err(|_| Reject::bad_request("invalid Host header"))?;
        let host = request_host(raw);
        match opts.routes.find(&host, req.uri().path()) {
            Some(r) => r,
            None => {
                return Err(Reject::new(
                    StatusCode::NOT_FOUND,
                    Refusal::NoRoute,
                    format!("no route for {host}{}", req.uri().path()),
                ));
            }
        }
    };
    if let Some(max) = opts.max_body_bytes
        && content_length(req.headers()).is_some_and(|n| n > max)
    {
        return Err(Reject::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::TooLarge,
            format!("request body larger than {max} bytes"),
        ));
    }
    let upgrade = headers::wants_upgrade(req.version(), req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let key = request_key(&route.balance, conn.peer.ip(), req.headers());

    let (mut parts, body) = req.into_parts();
    let version = parts.version;
    let method_idempotent = idempotent(&parts.method);
    // `TE: trailers` (gRPC asks for it) is the one TE an HTTP/2 backend
    // may be sent.
    let te_trailers = route.backend_http2
        && parts.headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|t| {
                t.split(',')
                    .any(|x| x.trim().eq_ignore_ascii_case("trailers"))
            })
        });
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if version == Version::HTTP_2 {
        headers::join_cookies(&mut parts.headers);
    }
    if parts.uri.authority().is_some() {
        parts.headers.insert(header::HOST, host_value.clone());
        parts.uri = match parts.uri.path_and_query() {
            Some(pq) => Uri::from(pq.clone()),
            None => Uri::from_static("/"),
        };
    }
    add_forwarding(
        &mut parts.headers,
        &conn.client,
        &host_value,
        &opts.forwarding,
        ctx.via.as_ref().map(|v| v.get(version)),
    );
    parts.version = Version::HTTP_11;
    let http2 = route.backend_http2 && !upgrade;
    if http2 {
        // HTTP/2 names the host in :authority (from the URI) and the
        // scheme in :scheme (set per backend, by its TLS setting).
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let host = host_value.to_str().unwrap_or_default();
        parts.uri = format!("http://{host}{pq}")
            .parse()
            .map_err(|_| Reject::bad_request("invalid authority"))?;
        parts.headers.remove(header::HOST);
        if te_trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        parts.version = Version::HTTP_2;
    }
    // Only HTTP/2 to the backend loses the body's own error (below).
    let fault = http2.then(super::body::FaultSlot::default);
    let mut body = UpBody::new(body, opts.max_body_bytes);
    if let Some(f) = &fault {
        body = body.watched(f.clone());
    }
    let mut pending = Some(Request::from_parts(parts, body));

    let deadline = Instant::now() + opts.request_timeout;
    let attempts = if method_idempotent {
        route.retries.saturating_add(1)
    } else {
        1
    };
    let measure = matches!(route.balance, super::Balance::P2cEwma);
    let mut tried = Mask::new(route.members.len());
    let mut last: Option<Reject> = None;
    for n in 0..attempts {
        let picked = match route.pick(&tried, key) {
            Ok(p) => p,
            Err(none) => {
                return Err(last.unwrap_or_else(|| {
                    Reject::new(
                        route.no_backend_status,
                        Refusal::NoBackend,
                        none.to_string(),
                    )
                }));
            }
        };
        tried.set(picked.idx);
        if n > 0 {
            ctx.metrics.retry();
        }
        let b = picked.guard.backend();
        inc(&b.stats.requests);
        let tried_once = if client_upgrade.is_some() {
            attempt_upgrade(ctx, b, &mut pending, deadline).await
        } else if http2 {
            attempt_h2(ctx, b, &mut pending, deadline, measure, fault.as_ref()).await
        } else {
            attempt(ctx, b, &mut pending, deadline, measure).await
        };
        match tried_once {
            Attempt::Answered(resp, link, latency) => {
                route.state.record(
                    b,
                    picked.permit,
                    Outcome::Status(resp.status().as_u16()),
                    latency,
                );
                if let Some(l) = latency {
                    b.observe_latency(l);
                }
                return respond(ctx, resp, link, picked.guard, client_upgrade, deadline);
            }
            Attempt::NotSent(outcome, reject) => {
                route.state.record(b, picked.permit, outcome, None);
                tracing::debug!(route = &*route.name, backend = &*b.id, reason = %reject.reason, "attempt failed before sending");
                last = Some(reject);
            }
            Attempt::Failed(outcome, reject) => {
                if let Some(o) = outcome {
                    route.state.record(b, picked.permit, o, None);
                }
                return Err(reject);
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        Reject::new(
            StatusCode::BAD_GATEWAY,
            Refusal::BadGateway,
            "no attempt made",
        )
    }))
}

/// A connection to a backend: driven by the request (pooled), or a task
/// of its own (upgrades).
enum Link {
    Inline(Box<Upstream>),
    Spawned(SendRequest<UpBody>),
    /// The backend's shared HTTP/2 connection (a task of its own), and
    /// the stream's place on it.
    Shared(super::backend::H2Stream),
}

/// How one attempt on one backend ended.
enum Attempt {
    /// A response head, the connection, and the latency when measured.
    Answered(Response<Incoming>, Link, Option<Duration>),
    /// Nothing was sent (connect failed or timed out): the request is back
    /// in `pending`, another backend may take it.
    NotSent(Outcome, Reject),
    /// The request was sent (or its body failed): no retry. The outcome
    /// to record, if the backend is to blame.
    Failed(Option<Outcome>, Reject),
}

/// The 504 of a backend that did not answer within the request timeout
/// (counted in its stats).
pub(crate) fn response_timeout(ctx: &Ctx, b: &BackendRt) -> Reject {
    inc(&b.stats.timeouts);
    Reject::new(
        StatusCode::GATEWAY_TIMEOUT,
        Refusal::Timeout,
        format!(
            "backend {} ({}) sent no response within {:?}",
            b.id, b.addr, ctx.opts.request_timeout
        ),
    )
}

/// The 502 of a request whose backend was removed while it was in flight
/// (not the backend's failure).
pub(crate) fn removed(b: &BackendRt) -> Reject {
    Reject::new(
        StatusCode::BAD_GATEWAY,
        Refusal::BadGateway,
        format!("backend {} ({}) was removed", b.id, b.addr),
    )
}

fn timed_out(ctx: &Ctx, b: &BackendRt) -> Attempt {
    Attempt::Failed(Some(Outcome::Timeout), response_timeout(ctx, b))
}

/// What a failed send means, once the request is known to have left.
fn send_failed(ctx: &Ctx, b: &BackendRt, err: hyper::Error) -> Attempt {
    if caused_by::<TooLarge>(&err) {
        return Attempt::Failed(
            None,
            Reject::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Refusal::TooLarge,
                format!(
                    "request body larger than {} bytes",
                    ctx.opts.max_body_bytes.unwrap_or(u64::MAX)
                ),
            ),
        );
    }
    if caused_by::<ClientBody>(&err) {
        return Attempt::Failed(
            None,
            Reject::new(
                StatusCode::BAD_REQUEST,
                Refusal::BadRequest,
                format!("reading the request body failed: {err}"),
            ),
        );
    }
    if *b.kill.borrow() {
        return Attempt::Failed(None, removed(b));
    }
    let outcome = if err.is_incomplete_message() || err.is_closed() || err.is_canceled() {
        Outcome::EarlyEof
    } else {
        Outcome::Reported(Verdict::Failure)
    };
    Attempt::Failed(
        Some(outcome),
        Reject::new(
            StatusCode::BAD_GATEWAY,
            Refusal::BadGateway,
            format!("backend {} ({}): {err}", b.id, b.addr),
        ),
    )
}

fn closed_before_sending(b: &BackendRt) -> Attempt {
    Attempt::NotSent(
        Outcome::EarlyEof,
        Reject::new(
            StatusCode::BAD_GATEWAY,
            Refusal::BadGateway,
            format!(
                "backend {} ({}) closed the connection before the request was sent",
                b.id, b.addr
            ),
        ),
    )
}

fn request_lost() -> Attempt {
    Attempt::Failed(
        None,
        Reject::new(StatusCode::BAD_GATEWAY, Refusal::BadGateway, "request lost"),
    )
}

/// One attempt over a pooled (or new) connection driven by this task.
async fn attempt(
    ctx: &Ctx,
    b: &Arc<BackendRt>,
    pending: &mut Option<Request<UpBody>>,
    deadline: Instant,
    measure: bool,
) -> Attempt {
    let ttl = ctx.opts.keep_alive.idle_timeout;
    let mut fresh_only = false;
    loop {
        let pooled = if fresh_only { None } else { b.take_idle(ttl) };
        let (mut up, reused) = match pooled {
            Some(up) => (up, true),
            None => {
                let stream = match connect(ctx, b, deadline).await {
                    Ok(s) => s,
                    Err((outcome, reject)) => return Attempt::NotSent(outcome, reject),
                };
                match Upstream::new(&ctx.client, b, stream).await {
                    Ok(up) => (up, false),
                    Err(e) => {
                        let (o, r) = handshake_failed(b, &e);
                        return Attempt::NotSent(o, r);
                    }
                }
            }
        };
        if reused && !up.ready().await {
            continue;
        }
        let Some(req) = pending.take() else {
            return request_lost();
        };
        let t0 = measure.then(Instant::now);
        match up.send(req, deadline).await {
            Some(Ok(resp)) => {
                return Attempt::Answered(resp, Link::Inline(up), t0.map(|t| t.elapsed()));
            }
            Some(Err(mut e)) => {
                if let Some(req) = e.take_message() {
                    *pending = Some(req);
                    if reused {
                        // Closed by the backend while idle: a new one.
                        fresh_only = true;
                        continue;
                    }
                    return closed_before_sending(b);
                }
                return send_failed(ctx, b, e.into_error());
            }
            None => return timed_out(ctx, b),
        }
    }
}

/// One attempt over the backend's shared HTTP/2 connection, opened (and
/// run as a task of its own until the backend is removed or the
/// connection ends) if there is none.
async fn attempt_h2(
    ctx: &Ctx,
    b: &Arc<BackendRt>,
    pending: &mut Option<Request<UpBody>>,
    deadline: Instant,
    measure: bool,
    fault: Option<&super::body::FaultSlot>,
) -> Attempt {
    let mut fresh_only = false;
    loop {
        if *b.kill.borrow() {
            return Attempt::Failed(None, removed(b));
        }
        let mut shared = if fresh_only { None } else { b.h2_sender() };
        // One connection opened at a time per backend (the lock holds when
        // the last opening failed): those who waited take the one just
        // opened if it has room, or give up as the opener did, at once and
        // without blaming the backend twice: another backend may take it.
        let wait = deadline.min(Instant::now() + ctx.opts.connect_timeout);
        let mut opening = match shared {
            Some(_) => None,
            None => match tokio::time::timeout_at(wait, b.h2_opening.lock()).await {
                Ok(guard) => {
                    if !fresh_only {
                        shared = b.h2_sender();
                    }
                    if shared.is_none()
                        && guard.is_some_and(|t| t.elapsed() < ctx.opts.connect_timeout)
                    {
                        return h2_not_opened(b);
                    }
                    Some(guard)
                }
                Err(_) => return h2_not_opened(b),
            },
        };
        let (mut sender, stream, reused) = match shared {
            Some((s, place)) => (s, place, true),
            None => {
                let failed = |o: &mut Option<tokio::sync::MutexGuard<'_, Option<Instant>>>| {
                    if let Some(g) = o.as_mut() {
                        **g = Some(Instant::now());
                    }
                };
                let stream = match connect_as(ctx, b, deadline, true).await {
                    Ok(s) => s,
                    Err((outcome, reject)) => {
                        failed(&mut opening);
                        return Attempt::NotSent(outcome, reject);
                    }
                };
                // Removing the backend shuts the socket down, ending the
                // streams in flight as on HTTP/1.1 (hyper's own task owns
                // the IO: it deregisters as it closes).
                let stream = super::upstream::Registered::new(b, stream);
                let handshake =
                    hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .timer(hyper_util::rt::TokioTimer::new())
                        // A client that stops reading holds at most its stream's
                        // window of the connection's: many must stall before the
                        // connection does.
                        .initial_stream_window_size(H2_STREAM_WINDOW)
                        .initial_connection_window_size(H2_CONNECTION_WINDOW)
                        // A backend gone without a FIN is noticed, and replaced.
                        .keep_alive_interval(H2_PING)
                        .keep_alive_timeout(H2_PING_TIMEOUT)
                        .keep_alive_while_idle(true)
                        .handshake::<_, UpBody>(TokioIo::new(stream));
                let (sender, conn) = match tokio::time::timeout_at(deadline, handshake).await {
                    Ok(Ok(x)) => x,
                    Ok(Err(e)) => {
                        failed(&mut opening);
                        let (o, r) = handshake_failed(b, &e);
                        return Attempt::NotSent(o, r);
                    }
                    Err(_) => {
                        failed(&mut opening);
                        return timed_out(ctx, b);
                    }
                };
                if let Some(g) = opening.as_mut() {
                    **g = None;
                }
                let killed = b.killed();
                let id = b.id.clone();
                ctx.opts.routes.tasks().spawn(async move {
                    tokio::select! {
                        r = conn => if let Err(e) = r {
                            tracing::debug!(backend = &*id, error = %e, "HTTP/2 backend connection ended");
                        },
                        () = killed => {}
                    }
                });
                let place = b.set_h2(sender.clone());
                (sender, place, false)
            }
        };
        drop(opening);
        if sender.ready().await.is_err() {
            if reused {
                fresh_only = true;
                continue;
            }
            return closed_before_sending(b);
        }
        let Some(mut req) = pending.take() else {
            return request_lost();
        };
        let mut uri = req.uri().clone().into_parts();
        uri.scheme = Some(if b.tls.is_some() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        });
        if let Ok(u) = Uri::from_parts(uri) {
            *req.uri_mut() = u;
        }
        let t0 = measure.then(Instant::now);
        match tokio::time::timeout_at(deadline, sender.try_send_request(req)).await {
            Ok(Ok(resp)) => {
                return Attempt::Answered(resp, Link::Shared(stream), t0.map(|t| t.elapsed()));
            }
            Ok(Err(mut e)) => {
                if let Some(req) = e.take_message() {
                    // Not sent: the connection went away meanwhile.
                    *pending = Some(req);
                    if reused {
                        fresh_only = true;
                        continue;
                    }
                    return closed_before_sending(b);
                }
                // The stream was reset for the client's body (HTTP/2 keeps
                // only that): not the backend's failure.
                if let Some(f) = fault.and_then(|f| f.get()) {
                    return Attempt::Failed(None, body_fault(*f));
                }
                return send_failed(ctx, b, e.into_error());
            }
            Err(_) => return timed_out(ctx, b),
        }
    }
}

/// An attempt given up because the backend's HTTP/2 connection could not
/// be opened just now (by another request, which counted the failure):
/// nothing sent, another backend may take it.
fn h2_not_opened(b: &BackendRt) -> Attempt {
    Attempt::NotSent(
        Outcome::Reported(Verdict::Neutral),
        Reject::new(
            StatusCode::BAD_GATEWAY,
            Refusal::BadGateway,
            format!(
                "backend {} ({}): no HTTP/2 connection could be opened just now",
                b.id, b.addr
            ),
        ),
    )
}

/// HTTP/2 flow-control windows to backends: per stream, and for the whole
/// connection (the streams of many clients share it).
const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONNECTION_WINDOW: u32 = 128 << 20;
/// Pings on an HTTP/2 backend connection, and how long an answer may take.
const H2_PING: Duration = Duration::from_secs(10);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// The answer to a request whose body failed on the client's side.
fn body_fault(f: super::body::BodyFault) -> Reject {
    match f {
        super::body::BodyFault::TooLarge(limit) => Reject::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::TooLarge,
            format!("request body larger than {limit} bytes"),
        ),
        super::body::BodyFault::Client => Reject::new(
            StatusCode::BAD_REQUEST,
            Refusal::BadRequest,
            "reading the request body failed",
        ),
    }
}

/// One attempt of an upgrade request, over a new connection run as a task
/// of its own (the upgraded stream outlives the request).
async fn attempt_upgrade(
    ctx: &Ctx,
    b: &Arc<BackendRt>,
    pending: &mut Option<Request<UpBody>>,
    deadline: Instant,
) -> Attempt {
    let stream = match connect(ctx, b, deadline).await {
        Ok(s) => s,
        Err((outcome, reject)) => return Attempt::NotSent(outcome, reject),
    };
    let (mut sender, conn) = match ctx
        .client
        .handshake::<_, UpBody>(TokioIo::new(stream))
        .await
    {
        Ok(x) => x,
        Err(e) => {
            let (o, r) = handshake_failed(b, &e);
            return Attempt::NotSent(o, r);
        }
    };
    let killed = b.killed();
    ctx.opts.routes.tasks().spawn(async move {
        tokio::select! {
            r = conn.with_upgrades() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "backend connection ended with an error");
                }
            }
            () = killed => {}
        }
    });
    let Some(req) = pending.take() else {
        return request_lost();
    };
    match tokio::time::timeout_at(deadline, sender.try_send_request(req)).await {
        Ok(Ok(resp)) => Attempt::Answered(resp, Link::Spawned(sender), None),
        Ok(Err(mut e)) => match e.take_message() {
            Some(req) => {
                *pending = Some(req);
                closed_before_sending(b)
            }
            None => send_failed(ctx, b, e.into_error()),
        },
        Err(_) => timed_out(ctx, b),
    }
}

fn handshake_failed(b: &BackendRt, e: &hyper::Error) -> (Outcome, Reject) {
    (
        Outcome::Reported(Verdict::Neutral),
        Reject::new(
            StatusCode::BAD_GATEWAY,
            Refusal::BadGateway,
            format!("HTTP handshake with backend {} failed: {e}", b.id),
        ),
    )
}

/// A new TCP connection to `b` (`TCP_NODELAY`), within `connect_timeout`
/// and the request's deadline.
pub(crate) async fn connect(
    ctx: &Ctx,
    b: &Arc<BackendRt>,
    deadline: Instant,
) -> Result<BackendStream, (Outcome, Reject)> {
    connect_as(ctx, b, deadline, false).await
}

/// [`connect`], for HTTP/2 when `http2` (ALPN `h2` over TLS).
async fn connect_as(
    ctx: &Ctx,
    b: &Arc<BackendRt>,
    deadline: Instant,
    http2: bool,
) -> Result<BackendStream, (Outcome, Reject)> {
    let limit = ctx
        .opts
        .connect_timeout
        .min(deadline.saturating_duration_since(Instant::now()));
    match tokio::time::timeout(limit, dial(b, http2)).await {
        Ok(Ok(s)) => {
            inc(&b.stats.connections);
            Ok(s)
        }
        Ok(Err(Dial::Tcp(e))) => {
            inc(&b.stats.connect_errors);
            let outcome = Outcome::of_connect_error(&e);
            Err((
                outcome,
                Reject::new(
                    StatusCode::BAD_GATEWAY,
                    Refusal::BadGateway,
                    format!("cannot connect to backend {} ({}): {e}", b.id, b.addr),
                ),
            ))
        }
        Ok(Err(Dial::Tls(e))) => {
            inc(&b.stats.connect_errors);
            Err((
                Outcome::ConnectError(e.kind()),
                Reject::new(
                    StatusCode::BAD_GATEWAY,
                    Refusal::BadGateway,
                    format!(
                        "TLS with backend {} ({}) failed: {e}{}",
                        b.id,
                        b.addr,
                        tls_hint(&e)
                    ),
                ),
            ))
        }
        Err(_) => {
            inc(&b.stats.timeouts);
            Err((
                Outcome::Timeout,
                Reject::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    Refusal::Timeout,
                    format!(
                        "connecting to backend {} ({}){} timed out after {limit:?}",
                        b.id,
                        b.addr,
                        if b.tls.is_some() {
                            " (TCP and TLS handshake)"
                        } else {
                            ""
                        }
                    ),
                ),
            ))
        }
    }
}

/// What a failed TLS handshake with a backend most likely means.
fn tls_hint(e: &std::io::Error) -> &'static str {
    let answer = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match answer {
        Some(rustls::Error::InvalidMessage(_)) => " (does the backend speak TLS on this port?)",
        _ if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            " (the backend closed the connection during the handshake: does it speak TLS on this port?)"
        }
        _ => "",
    }
}

/// Why [`dial`] failed.
pub(crate) enum Dial {
    Tcp(std::io::Error),
    Tls(std::io::Error),
}

/// A new connection to `b`: TCP, and the TLS handshake if its route
/// reaches it over TLS (offering HTTP/2 when `http2`).
pub(crate) async fn dial(b: &BackendRt, http2: bool) -> Result<BackendStream, Dial> {
    let tcp = TcpStream::connect(b.addr).await.map_err(Dial::Tcp)?;
    let _ = tcp.set_nodelay(true);
    BackendStream::over(tcp, b.tls.as_ref(), b.addr, http2)
        .await
        .map_err(Dial::Tls)
}

/// The client's response: the backend's head (hop-by-hop headers
/// removed) and its streamed body; or a 101 and a tunnel.
fn respond(
    ctx: &Ctx,
    mut resp: Response<Incoming>,
    link: Link,
    guard: InFlight,
    client_upgrade: Option<OnUpgrade>,
    deadline: Instant,
) -> Result<Response<ProxyBody>, Reject> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let (Some(client_up), Link::Spawned(sender)) = (client_upgrade, link) else {
            return Err(Reject::new(
                StatusCode::BAD_GATEWAY,
                Refusal::BadGateway,
                "backend switched protocols without being asked",
            ));
        };
        let backend_up = hyper::upgrade::on(&mut resp);
        let (mut parts, _) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, true);
        ctx.metrics.upgrade();
        let idle = ctx.opts.idle_timeout;
        let killed = guard.backend().killed();
        ctx.tasks
            .spawn(tunnel(client_up, backend_up, guard, sender, idle, killed));
        return Ok(Response::from_parts(parts, ProxyBody::empty()));
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    let (up, stream) = match link {
        Link::Inline(up) => (Some(up), None),
        // An upgrade the backend declined: its connection is not pooled.
        Link::Spawned(_) => (None, None),
        Link::Shared(place) => (None, Some(place)),
    };
    Ok(Response::from_parts(
        parts,
        ProxyBody::Upstream {
            inner: body,
            exchange: Exchange {
                up,
                stream,
                guard,
                max_idle: ctx.opts.keep_alive.max_idle_per_backend,
            },
            deadline,
        },
    ))
}

/// Copies bytes both ways between an upgraded client and backend until
/// either side closes, nothing moves for `idle`, or the backend is
/// removed.
async fn tunnel(
    client: OnUpgrade,
    backend: OnUpgrade,
    guard: InFlight,
    sender: SendRequest<UpBody>,
    idle: Duration,
    killed: impl Future<Output = ()>,
) {
    let (c, b) = match tokio::try_join!(client, backend) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    drop(sender);
    let act = Arc::new(Activity::default());
    let mut c = Touched::new(TokioIo::new(c), act.clone());
    let mut b = Touched::new(TokioIo::new(b), act.clone());
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut c, &mut b) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "tunnel ended with an error");
            }
        }
        () = act.idle(idle) => tracing::debug!(backend = &*guard.backend().id, "tunnel idle; closed"),
        () = killed => tracing::debug!(backend = &*guard.backend().id, "backend removed; tunnel closed"),
    }
    drop(guard);
}
