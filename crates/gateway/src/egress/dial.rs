//! Resolve, check the destination policy, lease, connect.
//!
//! The address checked is the address dialled: a host name is resolved
//! once, every address it resolves to is checked, and the connection goes
//! to one of the checked addresses (no DNS-rebinding gap).

use std::io;
use std::net::{IpAddr, SocketAddr};

use addrpool::{ConnectError, Family, Lease, Pool, PoolError, PooledStream, Session};
use http::StatusCode;
use iprules::Reason;
use tokio::time::Instant;

use super::Ctx;
use super::metrics::RequestResult;
use super::policy::default_reason;
use super::upstream::{IdlePool, KeyRef, Pooled};

/// Addresses of one host tried in turn before giving up.
const MAX_ATTEMPTS: usize = 3;

/// Why a destination could not be reached, with what to tell the client.
#[derive(Debug)]
pub(crate) struct DialError {
    /// HTTP status (400, 403, 502, 503, 504).
    pub(crate) status: StatusCode,
    /// SOCKS5 reply code (RFC 1928 §6).
    pub(crate) socks: u8,
    /// The result counted in the metrics.
    pub(crate) result: RequestResult,
    /// A one-line reason for the client.
    pub(crate) message: String,
}

impl DialError {
    fn new(status: StatusCode, socks: u8, result: RequestResult, message: String) -> DialError {
        DialError {
            status,
            socks,
            result,
            message,
        }
    }

    fn bad_gateway(socks: u8, message: String) -> DialError {
        DialError::new(
            StatusCode::BAD_GATEWAY,
            socks,
            RequestResult::BadGateway,
            message,
        )
    }

    fn timeout(message: String) -> DialError {
        DialError::new(
            StatusCode::GATEWAY_TIMEOUT,
            0x04,
            RequestResult::Timeout,
            message,
        )
    }
}

fn from_pool(e: PoolError) -> DialError {
    DialError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        0x01,
        RequestResult::Unavailable,
        e.to_string(),
    )
}

fn from_connect(e: ConnectError) -> DialError {
    match e {
        ConnectError::Pool(p) => from_pool(p),
        ConnectError::Timeout { .. } => DialError::timeout(e.to_string()),
        ConnectError::FamilyMismatch { .. } | ConnectError::NoAddressOfFamily { .. } => {
            DialError::bad_gateway(0x03, e.to_string())
        }
        ConnectError::Connect { ref error, .. } => {
            let code = match error.kind() {
                io::ErrorKind::ConnectionRefused => 0x05,
                io::ErrorKind::NetworkUnreachable => 0x03,
                io::ErrorKind::HostUnreachable => 0x04,
                _ => 0x01,
            };
            DialError::bad_gateway(code, e.to_string())
        }
        other => DialError::bad_gateway(0x01, other.to_string()),
    }
}

/// The destination is refused by the policy.
fn denied(host: &str, addr: IpAddr, reason: Reason) -> DialError {
    let why = match reason {
        Reason::Denied(rule) => match default_reason(&rule) {
            Some(why) => format!("denied by rule {rule} ({why})"),
            None => format!("denied by rule {rule}"),
        },
        Reason::Default | Reason::Allowed(_) => "denied by the default verdict".to_owned(),
    };
    let shown = if host == addr.to_string() {
        addr.to_string()
    } else {
        format!("{host} ({addr})")
    };
    DialError::new(
        StatusCode::FORBIDDEN,
        0x02,
        RequestResult::Denied,
        format!("destination {shown} is not allowed: {why}"),
    )
}

/// Resolves `host` once (off the runtime's workers: `getaddrinfo` runs on
/// the blocking pool), keeps the addresses of the pool's family (IPv6
/// first for a pool of either family), and checks every one against the
/// policy. Returns the allowed addresses, in order.
pub(crate) async fn resolve_checked(
    ctx: &Ctx,
    pool: &Pool,
    host: &str,
    port: u16,
    deadline: Instant,
) -> Result<Vec<IpAddr>, DialError> {
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .parse::<IpAddr>()
        .ok();
    let mut addrs: Vec<IpAddr> = match literal {
        Some(ip) => vec![ip.to_canonical()],
        None => {
            let found = tokio::time::timeout_at(deadline, ctx.opts.resolver.resolve(host, port))
                .await
                .map_err(|_| DialError::timeout(format!("resolving {host} timed out")))?
                .map_err(|e| DialError::bad_gateway(0x04, format!("cannot resolve {host}: {e}")))?;
            let mut v: Vec<IpAddr> = Vec::new();
            for a in found {
                let ip = a.to_canonical();
                if !v.contains(&ip) {
                    v.push(ip);
                }
            }
            v
        }
    };
    if addrs.is_empty() {
        return Err(DialError::bad_gateway(
            0x04,
            format!("{host} resolves to no address"),
        ));
    }
    match pool.family() {
        Some(family) => {
            let all = addrs.clone();
            addrs.retain(|a| Family::of(*a) == family);
            if addrs.is_empty() {
                let found = all
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(DialError::bad_gateway(
                    0x03,
                    format!(
                        "the pool has only {family} source addresses and {host} has no {family} \
                         address ({found}); refusing to connect from any other address"
                    ),
                ));
            }
        }
        None => addrs.sort_by_key(|a| !a.is_ipv6()),
    }
    let policy = ctx.opts.policy.snapshot();
    let mut first_denied = None;
    addrs.retain(|a| {
        let d = policy.decide(*a);
        if !d.is_allowed() && first_denied.is_none() {
            first_denied = Some((*a, d.reason));
        }
        d.is_allowed()
    });
    match (addrs.is_empty(), first_denied) {
        (true, Some((addr, reason))) => Err(denied(host, addr, reason)),
        _ => Ok(addrs),
    }
}

/// Whether `addr` is still allowed (for reused connections: the policy
/// may have changed since they were made).
pub(crate) fn allowed(ctx: &Ctx, addr: IpAddr) -> bool {
    ctx.opts.policy.read(|p| p.allows(addr))
}

/// Leases a source (for `session`) within `deadline`.
pub(crate) async fn lease(
    pool: &Pool,
    session: Option<&Session>,
    deadline: Instant,
) -> Result<Lease, DialError> {
    match tokio::time::timeout_at(deadline, pool.lease_with(session)).await {
        Ok(Ok(l)) => Ok(l),
        Ok(Err(e)) => Err(from_pool(e)),
        Err(_) => Err(DialError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            0x01,
            RequestResult::Unavailable,
            "no source address available within the connect timeout".to_owned(),
        )),
    }
}

/// Connects to one of `addrs` (already checked) on `port`, the first
/// attempt from `first` if given, each further one from a new lease.
/// Returns the stream and the address it is connected to.
pub(crate) async fn connect(
    pool: &Pool,
    session: Option<&Session>,
    mut first: Option<Lease>,
    addrs: &[IpAddr],
    port: u16,
    deadline: Instant,
) -> Result<(PooledStream, IpAddr), DialError> {
    let mut last = None;
    for ip in addrs.iter().take(MAX_ATTEMPTS) {
        let lease = match first.take() {
            Some(l) => l,
            None => lease(pool, session, deadline).await?,
        };
        let dest = SocketAddr::new(*ip, port);
        let src = lease.source();
        match tokio::time::timeout_at(deadline, pool.connect_from(lease, dest)).await {
            Ok(Ok(s)) => return Ok((s, *ip)),
            Ok(Err(e @ ConnectError::Pool(_))) => return Err(from_connect(e)),
            Ok(Err(e)) => last = Some(from_connect(e)),
            Err(_) => {
                // The gateway's deadline ran out before the pool's own
                // connect timeout: still an outcome of this source.
                pool.report(src, addrpool::Outcome::ConnectTimeout);
                return Err(DialError::timeout(format!(
                    "connecting from {src} to {dest} timed out"
                )));
            }
        }
    }
    Err(last.unwrap_or_else(|| DialError::bad_gateway(0x01, "no address to connect to".into())))
}

/// A connection for one forwarded request, from [`checkout`].
pub(crate) struct Checkout<C> {
    pub(crate) conn: C,
    pub(crate) lease: Lease,
    /// Taken from the idle pool (the destination may have closed it since).
    pub(crate) reused: bool,
    /// The destination's allowed addresses, for a retry on a new connection.
    pub(crate) addrs: Vec<IpAddr>,
}

/// Resolves and checks `host`, leases a source (for `session`), then takes
/// an idle connection from that source to that destination that is still
/// allowed and [ready](Pooled::ready) (where the pool keeps connections
/// alive at all), or makes one with `fresh` (given the lease, the allowed
/// addresses and the deadline; callers keep theirs for a retry, and pass
/// a closure calling it: a borrowed async closure would make the
/// connection's future not `Send`), all within the connect timeout.
pub(crate) async fn checkout<C: Pooled, E: From<DialError>>(
    ctx: &Ctx,
    idle: &IdlePool<C>,
    pool: &Pool,
    session: Option<&Session>,
    host: &str,
    port: u16,
    fresh: impl AsyncFnOnce(Option<Lease>, &[IpAddr], Instant) -> Result<(C, Lease), E>,
) -> Result<Checkout<C>, E> {
    let deadline = Instant::now() + ctx.opts.connect_timeout;
    let addrs = resolve_checked(ctx, pool, host, port, deadline).await?;
    let lease = lease(pool, session, deadline).await?;
    if ctx.keep_alive(pool) {
        let key = KeyRef {
            src: lease.source(),
            host,
            port,
        };
        while let Some(mut conn) = idle.take(key, &addrs) {
            if allowed(ctx, conn.dest())
                && tokio::time::timeout_at(deadline, conn.ready())
                    .await
                    .unwrap_or(false)
            {
                return Ok(Checkout {
                    conn,
                    lease,
                    reused: true,
                    addrs,
                });
            }
        }
    }
    let (conn, lease) = fresh(Some(lease), &addrs, deadline).await?;
    Ok(Checkout {
        conn,
        lease,
        reused: false,
        addrs,
    })
}

/// Resolve, check, lease and connect, for tunnels.
pub(crate) async fn dial(
    ctx: &Ctx,
    pool: &Pool,
    host: &str,
    port: u16,
    session: Option<&Session>,
) -> Result<PooledStream, DialError> {
    let deadline = Instant::now() + ctx.opts.connect_timeout;
    let addrs = resolve_checked(ctx, pool, host, port, deadline).await?;
    let (stream, _) = connect(pool, session, None, &addrs, port, deadline).await?;
    Ok(stream)
}
