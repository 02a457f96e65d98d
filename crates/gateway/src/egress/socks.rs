//! SOCKS5 (RFC 1928) CONNECT, with no authentication or RFC 1929
//! username/password.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::auth::{self, Identity};
use super::dial::{self, DialError};
use super::http::{linger_close, session_for};
use super::metrics::{Protocol, RequestResult};
use super::{Ctx, tunnel};
use crate::guard::Offense;

const VERSION: u8 = 0x05;
const NO_AUTH: u8 = 0x00;
const USER_PASS: u8 = 0x02;
const NO_METHOD: u8 = 0xFF;

/// Reply codes (RFC 1928 §6).
const GENERAL_FAILURE: u8 = 0x01;
const COMMAND_NOT_SUPPORTED: u8 = 0x07;
const ADDRESS_NOT_SUPPORTED: u8 = 0x08;

/// Why the handshake stopped (the reply, if any, was sent).
struct Stop(RequestResult);

/// Serves one client connection that started with the SOCKS5 version byte.
pub(crate) async fn serve(ctx: Arc<Ctx>, mut stream: TcpStream, peer: SocketAddr) {
    let hs = tokio::time::timeout(ctx.opts.header_read_timeout, handshake(&ctx, &mut stream)).await;
    let (id, host, port) = match hs {
        Ok(Ok(v)) => v,
        Ok(Err(Stop(result))) => {
            ctx.metrics.request(Protocol::Socks5, result);
            let offense = match result {
                RequestResult::AuthFailed => Some(Offense::AuthFailed),
                RequestResult::BadRequest => Some(Offense::Malformed),
                _ => None,
            };
            if let Some(o) = offense {
                ctx.opts.guard.offense(peer.ip(), o);
            }
            linger_close(stream).await;
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "SOCKS5 handshake timed out");
            ctx.metrics
                .request(Protocol::Socks5, RequestResult::BadRequest);
            return;
        }
    };
    if ctx.opts.guard.check_request(peer.ip()).is_err() {
        ctx.metrics
            .request(Protocol::Socks5, RequestResult::RateLimited);
        let _ = reply(&mut stream, 0x02, None).await;
        linger_close(stream).await;
        return;
    }
    let session = session_for(&ctx, &id, &host);
    let pool = ctx.opts.pool.pick(id.user.as_deref());
    let upstream = match dial::dial(&ctx, pool, &host, port, session.as_deref()).await {
        Ok(s) => s,
        Err(DialError {
            socks,
            result,
            message,
            ..
        }) => {
            tracing::debug!(%peer, reason = %message, "SOCKS5 request refused");
            ctx.metrics.request(Protocol::Socks5, result);
            let _ = reply(&mut stream, socks, None).await;
            linger_close(stream).await;
            return;
        }
    };
    // BND.ADDR is the source address the connection leaves from.
    let bound = upstream.get_ref().local_addr().ok();
    if reply(&mut stream, 0x00, bound).await.is_err() {
        return;
    }
    ctx.metrics.request(Protocol::Socks5, RequestResult::Ok);
    tunnel::run(
        stream,
        bytes::Bytes::new(),
        upstream,
        ctx.opts.idle_timeout,
        ctx.metrics.clone(),
    )
    .await;
}

async fn reply(stream: &mut TcpStream, code: u8, bound: Option<SocketAddr>) -> std::io::Result<()> {
    let bound = bound.unwrap_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    let mut out = vec![VERSION, code, 0x00];
    match bound.ip().to_canonical() {
        IpAddr::V4(a) => {
            out.push(0x01);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(0x04);
            out.extend_from_slice(&a.octets());
        }
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
    stream.write_all(&out).await
}

async fn read_u8(s: &mut TcpStream) -> Result<u8, Stop> {
    s.read_u8()
        .await
        .map_err(|_| Stop(RequestResult::BadRequest))
}

async fn read_exact(s: &mut TcpStream, n: usize) -> Result<Vec<u8>, Stop> {
    let mut v = vec![0; n];
    s.read_exact(&mut v)
        .await
        .map_err(|_| Stop(RequestResult::BadRequest))?;
    Ok(v)
}

/// Method selection, authentication and the request; returns who and where.
async fn handshake(ctx: &Ctx, s: &mut TcpStream) -> Result<(Identity, String, u16), Stop> {
    if read_u8(s).await? != VERSION {
        return Err(Stop(RequestResult::BadRequest));
    }
    let n = read_u8(s).await?;
    let methods = read_exact(s, usize::from(n)).await?;
    let need_auth = !ctx.opts.users.is_empty();
    let method = if !need_auth && methods.contains(&NO_AUTH) {
        NO_AUTH
    } else if methods.contains(&USER_PASS) {
        USER_PASS
    } else {
        NO_METHOD
    };
    let _ = s.write_all(&[VERSION, method]).await;
    let id = match method {
        NO_METHOD => return Err(Stop(RequestResult::AuthFailed)),
        NO_AUTH => Identity::default(),
        _ => {
            // RFC 1929: VER=1 ULEN UNAME PLEN PASSWD.
            if read_u8(s).await? != 0x01 {
                return Err(Stop(RequestResult::BadRequest));
            }
            let ulen = read_u8(s).await?;
            let user = read_exact(s, usize::from(ulen)).await?;
            let plen = read_u8(s).await?;
            let pass = read_exact(s, usize::from(plen)).await?;
            let checked = match (std::str::from_utf8(&user), std::str::from_utf8(&pass)) {
                (Ok(u), Ok(p)) => auth::check(&ctx.opts.users, Some((u, p))).ok(),
                _ => None,
            };
            let status = if checked.is_some() { 0x00 } else { 0x01 };
            let _ = s.write_all(&[0x01, status]).await;
            checked.ok_or(Stop(RequestResult::AuthFailed))?
        }
    };
    let head = read_exact(s, 4).await?;
    if head[0] != VERSION {
        return Err(Stop(RequestResult::BadRequest));
    }
    if head[1] != 0x01 {
        let _ = reply(s, COMMAND_NOT_SUPPORTED, None).await;
        return Err(Stop(RequestResult::BadRequest));
    }
    let host = match head[3] {
        0x01 => {
            let b = read_exact(s, 4).await?;
            Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()
        }
        0x04 => {
            let b = read_exact(s, 16).await?;
            let mut o = [0u8; 16];
            o.copy_from_slice(&b);
            Ipv6Addr::from(o).to_string()
        }
        0x03 => {
            let len = read_u8(s).await?;
            let name = read_exact(s, usize::from(len)).await?;
            match String::from_utf8(name) {
                Ok(n) if valid_host(&n) => n.to_ascii_lowercase(),
                _ => {
                    let _ = reply(s, GENERAL_FAILURE, None).await;
                    return Err(Stop(RequestResult::BadRequest));
                }
            }
        }
        _ => {
            let _ = reply(s, ADDRESS_NOT_SUPPORTED, None).await;
            return Err(Stop(RequestResult::BadRequest));
        }
    };
    let port = u16::from_be_bytes([read_u8(s).await?, read_u8(s).await?]);
    if port == 0 {
        let _ = reply(s, GENERAL_FAILURE, None).await;
        return Err(Stop(RequestResult::BadRequest));
    }
    Ok((id, host, port))
}

/// A DNS name as a client may send it (no spaces, controls or NULs).
fn valid_host(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
}
