//! Active HTTP health checks of backends (HAProxy's `check inter rise
//! fall`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::backend::{BackendRt, inc};
use super::body::UpBody;
use super::routes::RouteTable;

/// Active health checks of a route's backends: `GET path` every
/// `interval`; a 2xx or 3xx within `timeout` passes.
///
/// A backend starts up; `fall` failed checks in a row take it down (no
/// request is sent to it), `rise` passed checks in a row bring it back.
/// Independent of passive health: a backend takes requests only when both
/// allow it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    /// The path (and query) requested; starts with `/`.
    pub path: String,
    /// Time between the starts of two checks of a backend. Default: 5 s.
    pub interval: Duration,
    /// Bound on one check (connect and response head). Default: 2 s.
    pub timeout: Duration,
    /// Passed checks in a row that bring a down backend up. Default: 2.
    pub rise: u32,
    /// Failed checks in a row that take an up backend down. Default: 3.
    pub fall: u32,
    /// The `Host` header of checks. Default: the backend's address.
    pub host: Option<String>,
}

impl HealthCheck {
    /// Checks of `path` with the defaults.
    pub fn new(path: impl Into<String>) -> HealthCheck {
        HealthCheck {
            path: path.into(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 3,
            host: None,
        }
    }

    /// Checks every field; the error names the first invalid one.
    pub fn validate(&self) -> Result<(), InvalidHealthCheck> {
        let bad = |field, reason| Err(InvalidHealthCheck { field, reason });
        if !self.path.starts_with('/') || self.path.parse::<http::Uri>().is_err() {
            return bad("path", "must be a path starting with `/`");
        }
        for (field, d) in [("interval", self.interval), ("timeout", self.timeout)] {
            if d.is_zero() || d > health::MAX_DURATION {
                return bad(field, "must be longer than zero and at most 100 years");
            }
        }
        if self.rise == 0 {
            return bad("rise", "must be at least 1");
        }
        if self.fall == 0 {
            return bad("fall", "must be at least 1");
        }
        if let Some(h) = &self.host
            && http::HeaderValue::from_str(h).is_err()
        {
            return bad("host", "must be a valid header value");
        }
        Ok(())
    }
}

/// An invalid [`HealthCheck`] field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid health_check `{field}`: {reason}")]
pub struct InvalidHealthCheck {
    /// The field's config key.
    pub field: &'static str,
    /// Why.
    pub reason: &'static str,
}

/// Runs the checks of every route of `table` that has them, until `stop`
/// changes.
pub(crate) async fn run(table: RouteTable, mut stop: watch::Receiver<bool>) {
    let mut running: JoinSet<()> = JoinSet::new();
    loop {
        let now = tokio::time::Instant::now();
        let mut wake = now + Duration::from_secs(1);
        {
            let snap = table.compiled();
            for r in &snap.routes {
                let Some(check) = &r.check else { continue };
                for b in r.all.iter() {
                    let mut st = b.check.lock().unwrap_or_else(|e| e.into_inner());
                    if st.running {
                        continue;
                    }
                    let due = st.next.unwrap_or(now);
                    if due <= now {
                        st.running = true;
                        st.next = Some(now + check.interval);
                        wake = wake.min(now + check.interval);
                        running.spawn(probe(b.clone(), check.clone(), r.name.clone()));
                    } else {
                        wake = wake.min(due);
                    }
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            Some(_) = running.join_next() => {}
            _ = stop.changed() => break,
        }
    }
    running.shutdown().await;
}

async fn probe(b: Arc<BackendRt>, check: HealthCheck, route: Arc<str>) {
    let result = tokio::time::timeout(check.timeout, attempt(&b, &check)).await;
    let (ok, why) = match result {
        Ok(Ok(s)) if s.is_success() || s.is_redirection() => (true, String::new()),
        Ok(Ok(s)) => (false, format!("status {s}")),
        Ok(Err(e)) => (false, e),
        Err(_) => (false, format!("no answer within {:?}", check.timeout)),
    };
    inc(&b.stats.checks);
    if !ok {
        inc(&b.stats.checks_failed);
    }
    let mut st = b.check.lock().unwrap_or_else(|e| e.into_inner());
    st.running = false;
    let up = b.check_up.load(Ordering::Relaxed);
    let (backend, addr) = (&*b.id, b.addr);
    if ok {
        st.ok = st.ok.saturating_add(1);
        st.failed = 0;
        if !up && st.ok >= check.rise {
            b.check_up.store(true, Ordering::Relaxed);
            tracing::info!(route = &*route, backend, %addr, "backend up: health checks pass");
        }
    } else {
        st.failed = st.failed.saturating_add(1);
        st.ok = 0;
        tracing::debug!(route = &*route, backend, %addr, reason = %why, "health check failed");
        if up && st.failed >= check.fall {
            b.check_up.store(false, Ordering::Relaxed);
            tracing::warn!(route = &*route, backend, %addr, reason = %why, "backend down: health checks fail");
        }
    }
}

async fn attempt(b: &BackendRt, check: &HealthCheck) -> Result<StatusCode, String> {
    let stream = super::proxy::dial(b, b.http2).await.map_err(|e| match e {
        super::proxy::Dial::Tcp(e) => format!("connect: {e}"),
        super::proxy::Dial::Tls(e) => format!("TLS: {e}"),
    })?;
    let host = check.host.clone().unwrap_or_else(|| b.addr.to_string());
    if b.http2 {
        return attempt_h2(b, check, stream, &host).await;
    }
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, UpBody>(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    let req = Request::get(check.path.as_str())
        .header(header::HOST, host)
        .header(header::USER_AGENT, "ippool-health-check")
        .header(header::CONNECTION, "close")
        .body(UpBody::empty())
        .map_err(|e| format!("request: {e}"))?;
    status_of(sender.send_request(req), conn).await
}

/// The status of `resp`, driving its connection `conn` meanwhile.
async fn status_of<R, C>(resp: R, conn: C) -> Result<StatusCode, String>
where
    R: std::future::Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>>,
    C: std::future::Future<Output = hyper::Result<()>>,
{
    tokio::pin!(conn);
    tokio::pin!(resp);
    let resp = tokio::select! {
        biased;
        r = &mut resp => r,
        r = &mut conn => match r {
            // Closed after answering (`Connection: close`): the answer
            // was handed over before.
            Ok(()) => resp.await,
            Err(e) => return Err(format!("connection: {e}")),
        },
    };
    resp.map(|r| r.status())
        .map_err(|e| format!("request: {e}"))
}

/// [`attempt`] on a route that speaks HTTP/2 to its backends.
async fn attempt_h2(
    b: &BackendRt,
    check: &HealthCheck,
    stream: super::backend_tls::BackendStream,
    host: &str,
) -> Result<StatusCode, String> {
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, UpBody>(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let scheme = if b.tls.is_some() { "https" } else { "http" };
    let req = Request::get(format!("{scheme}://{host}{}", check.path))
        .header(header::USER_AGENT, "ippool-health-check")
        .body(UpBody::empty())
        .map_err(|e| format!("request: {e}"))?;
    status_of(sender.send_request(req), conn).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert_eq!(HealthCheck::new("/healthz").validate(), Ok(()));
        let field = |c: HealthCheck| c.validate().unwrap_err().field;
        assert_eq!(field(HealthCheck::new("healthz")), "path");
        assert_eq!(
            field(HealthCheck {
                interval: Duration::ZERO,
                ..HealthCheck::new("/")
            }),
            "interval"
        );
        assert_eq!(
            field(HealthCheck {
                rise: 0,
                ..HealthCheck::new("/")
            }),
            "rise"
        );
        assert_eq!(
            field(HealthCheck {
                fall: 0,
                ..HealthCheck::new("/")
            }),
            "fall"
        );
    }
}
