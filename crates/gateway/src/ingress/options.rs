//! Typed options of an ingress listener and their validation.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use iprules::RuleSet;

use super::routes::RouteTable;
use super::tls::CertStore;

/// The smallest accepted [`IngressOptions::max_header_bytes`] (hyper's
/// smallest read buffer).
pub const MIN_HEADER_BYTES: usize = 8 * 1024;
/// The largest accepted [`IngressOptions::max_header_bytes`].
pub const MAX_HEADER_BYTES: usize = 1024 * 1024;

/// Whose `X-Forwarded-*` and `Forwarded` request headers are kept (and
/// appended to) rather than replaced.
#[derive(Debug, Clone, Default)]
pub enum TrustForwarded {
    /// Nobody's: incoming forwarding headers are removed and replaced with
    /// what this proxy saw (the safe default for an edge proxy).
    #[default]
    Never,
    /// Everyone's: incoming values are kept, and the client's address is
    /// appended. Only behind another proxy that sanitises them.
    Always,
    /// Only those of clients whose address is in the set (the load
    /// balancers in front of this proxy).
    From(RuleSet),
}

impl TrustForwarded {
    /// Whether the headers of a client at `peer` are trusted.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        match self {
            TrustForwarded::Never => false,
            TrustForwarded::Always => true,
            TrustForwarded::From(set) => set.contains(peer.to_canonical()),
        }
    }
}

/// The forwarding headers added to each request sent to a backend.
#[derive(Debug, Clone)]
pub struct Forwarding {
    /// Whose incoming forwarding headers are kept. Default:
    /// [`TrustForwarded::Never`].
    pub trust: TrustForwarded,
    /// Set `X-Forwarded-For` (the client address, appended to a trusted
    /// incoming list), `X-Forwarded-Proto` (`http` or `https`) and
    /// `X-Forwarded-Host` (the `Host` the client asked for; a trusted
    /// incoming value is kept). Default: on.
    pub x_forwarded: bool,
    /// Set RFC 7239 `Forwarded: for=…;host=…;proto=…` (appended to a
    /// trusted incoming value). Default: on.
    pub forwarded: bool,
    /// The pseudonym appended to `Via` (`1.1 ippool`); `None` adds no
    /// `Via`. Must be a token (letters, digits, `-._~!#$&'*+^|` and
    /// backquote). Default: `ippool`.
    pub via: Option<String>,
}

impl Default for Forwarding {
    fn default() -> Forwarding {
        Forwarding {
            trust: TrustForwarded::Never,
            x_forwarded: true,
            forwarded: true,
            via: Some("ippool".to_owned()),
        }
    }
}

/// The upstream connection pool: HTTP/1.1 connections to backends kept
/// open between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// Most idle connections kept per backend (0: a new connection per
    /// request). Default: 512.
    pub max_idle_per_backend: usize,
    /// An idle connection unused for this long is closed; keep it below
    /// the backends' own keep-alive timeout. Default: 60 s.
    pub idle_timeout: Duration,
}

impl Default for KeepAlive {
    fn default() -> KeepAlive {
        KeepAlive {
            max_idle_per_backend: 512,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// TLS termination: the certificates and how often their files are
/// checked for changes.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// The certificates (SNI picks one); share one store between
    /// listeners to reload them all at once.
    pub certs: Arc<CertStore>,
    /// How often the certificate and key files are checked for changes
    /// (modification time and size); a change reloads them. `None`: only
    /// [`CertStore::reload`] does. Default: 10 s.
    pub watch: Option<Duration>,
}

impl TlsOptions {
    /// TLS with `certs`, watched every 10 s.
    pub fn new(certs: Arc<CertStore>) -> TlsOptions {
        TlsOptions {
            certs,
            watch: Some(Duration::from_secs(10)),
        }
    }
}

/// Why [`IngressOptions`] are invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IngressOptionsError {
    /// A duration option is zero or absurdly long.
    #[error("invalid `{field}`: {reason}")]
    Duration {
        /// The option's config key.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// `max_header_bytes` out of range.
    #[error(
        "invalid `max_header_bytes` {0}: must be between {MIN_HEADER_BYTES} and {MAX_HEADER_BYTES}"
    )]
    MaxHeaderBytes(usize),
    /// `max_concurrent_streams` is 0.
    #[error("invalid `max_concurrent_streams`: must be at least 1")]
    MaxConcurrentStreams,
    /// The `Via` pseudonym is not a token.
    #[error("invalid `via` pseudonym `{0}`: must be a non-empty token")]
    Via(String),
}

/// Options of one ingress listener. [`IngressOptions::new`] gives the
/// documented defaults; change fields by assignment or struct update.
#[derive(Clone)]
pub struct IngressOptions {
    /// Where to listen. Default: `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// The routes and backends (a handle: several listeners may share
    /// one table, e.g. port 80 and port 443).
    pub routes: RouteTable,
    /// TLS termination; `None` serves plain HTTP (HTTP/1.1, and HTTP/2
    /// with prior knowledge when [`http2`](Self::http2) is on).
    pub tls: Option<TlsOptions>,
    /// Serve HTTP/2: offered by ALPN over TLS, and accepted with prior
    /// knowledge (h2c) on a plain listener. Default: on.
    pub http2: bool,
    /// A client must send a complete request head within this (also the
    /// TLS handshake, and the wait for the next request on a kept-alive
    /// HTTP/1 connection), so slow clients cannot hold connections.
    /// Default: 10 s.
    pub header_read_timeout: Duration,
    /// Bound on one TCP connect to a backend; longer is a timeout of that
    /// backend. Default: 3 s.
    pub connect_timeout: Duration,
    /// A client connection (or WebSocket tunnel) with no byte moving and
    /// no request waiting for its response for this long is closed.
    /// Default: 60 s.
    pub idle_timeout: Duration,
    /// Bound on a whole exchange: a backend must answer within it (else
    /// 504), and a response body still streaming past it is cut (checked
    /// as data arrives; a stalled body is ended by `idle_timeout`).
    /// WebSocket tunnels are exempt. Default: 60 s.
    pub request_timeout: Duration,
    /// Time open connections get to finish on shutdown before they are
    /// closed. Default: 30 s.
    pub drain_timeout: Duration,
    /// Largest request head (request line and headers) in bytes;
    /// larger gets 431. `8 KiB..=1 MiB`. Default: 32 KiB.
    pub max_header_bytes: usize,
    /// Largest request body in bytes; larger gets 413 (at once when the
    /// `Content-Length` says so, else as soon as the streamed body goes
    /// over). `None`: unlimited. Default: 16 MiB.
    pub max_body_bytes: Option<u64>,
    /// Most concurrent HTTP/2 streams per client connection. Default: 256.
    pub max_concurrent_streams: u32,
    /// The upstream connection pool. See [`KeepAlive`].
    pub keep_alive: KeepAlive,
    /// The forwarding headers. See [`Forwarding`].
    pub forwarding: Forwarding,
    /// Who may connect (checked at accept, before a byte is read).
    /// Malformed requests are reported to it as
    /// [`Offense::Malformed`](crate::guard::Offense::Malformed).
    /// Default: everyone.
    pub guard: Arc<crate::guard::Guard>,
    /// Receives one entry per request. Default: none.
    pub access_log: Option<Arc<dyn crate::access::AccessLog>>,
    /// Serve HTTP/1.1 requests (plain or over TLS) with no request body framing but
    /// `Content-Length` (the common case) on the lean path of `h1.rs`
    /// instead of hyper; anything else still goes to hyper. Answers and
    /// forwarded heads are the same either way; off is for comparing the
    /// two. Default: on.
    pub fast_h1: bool,
}

impl IngressOptions {
    /// The defaults, listening on `listen` and routing by `routes`.
    pub fn new(listen: SocketAddr, routes: RouteTable) -> IngressOptions {
        IngressOptions {
            listen,
            routes,
            tls: None,
            http2: true,
            header_read_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            max_header_bytes: 32 * 1024,
            max_body_bytes: Some(16 * 1024 * 1024),
            max_concurrent_streams: 256,
            keep_alive: KeepAlive::default(),
            forwarding: Forwarding::default(),
            guard: Arc::new(crate::guard::Guard::default()),
            access_log: None,
            fast_h1: true,
        }
    }

    /// Checks every option; the error names the first invalid one.
    pub fn validate(&self) -> Result<(), IngressOptionsError> {
        check_duration("header_read_timeout", self.header_read_timeout)?;
        check_duration("connect_timeout", self.connect_timeout)?;
        check_duration("idle_timeout", self.idle_timeout)?;
        check_duration("request_timeout", self.request_timeout)?;
        check_duration("drain_timeout", self.drain_timeout)?;
        check_duration("keep_alive.idle_timeout", self.keep_alive.idle_timeout)?;
        if let Some(w) = self.tls.as_ref().and_then(|t| t.watch) {
            check_duration("tls.watch", w)?;
        }
        if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&self.max_header_bytes) {
            return Err(IngressOptionsError::MaxHeaderBytes(self.max_header_bytes));
        }
        if self.max_concurrent_streams == 0 {
            return Err(IngressOptionsError::MaxConcurrentStreams);
        }
        if let Some(via) = &self.forwarding.via
            && !is_token(via)
        {
            return Err(IngressOptionsError::Via(via.clone()));
        }
        Ok(())
    }
}

impl fmt::Debug for IngressOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IngressOptions")
            .field("listen", &self.listen)
            .field("tls", &self.tls)
            .field("http2", &self.http2)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_concurrent_streams", &self.max_concurrent_streams)
            .field("keep_alive", &self.keep_alive)
            .field("forwarding", &self.forwarding)
            .field("fast_h1", &self.fast_h1)
            .finish_non_exhaustive()
    }
}

/// An RFC 9110 token.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
        && HeaderValue::from_str(s).is_ok()
}

pub(crate) fn check_duration(
    field: &'static str,
    value: Duration,
) -> Result<(), IngressOptionsError> {
    if value.is_zero() {
        Err(IngressOptionsError::Duration {
            field,
            reason: "must be longer than zero",
        })
    } else if value > health::MAX_DURATION {
        Err(IngressOptionsError::Duration {
            field,
            reason: "must be at most 100 years",
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> IngressOptions {
        IngressOptions::new("127.0.0.1:0".parse().unwrap(), RouteTable::default())
    }

    #[test]
    fn defaults_are_valid() {
        let o = opts();
        assert_eq!(o.validate(), Ok(()));
        assert!(o.http2);
        assert_eq!(o.max_header_bytes, 32 * 1024);
        assert_eq!(o.forwarding.via.as_deref(), Some("ippool"));
    }

    #[test]
    fn validation_names_the_field() {
        let mut o = opts();
        o.connect_timeout = Duration::ZERO;
        assert!(matches!(
            o.validate(),
            Err(IngressOptionsError::Duration {
                field: "connect_timeout",
                ..
            })
        ));
        let mut o = opts();
        o.max_header_bytes = 100;
        assert_eq!(o.validate(), Err(IngressOptionsError::MaxHeaderBytes(100)));
        let mut o = opts();
        o.forwarding.via = Some("a b".into());
        assert_eq!(o.validate(), Err(IngressOptionsError::Via("a b".into())));
        let mut o = opts();
        o.max_concurrent_streams = 0;
        assert_eq!(o.validate(), Err(IngressOptionsError::MaxConcurrentStreams));
    }

    #[test]
    fn trust() {
        let mut set = RuleSet::new();
        set.add("10.0.0.0/8".parse().unwrap());
        let t = TrustForwarded::From(set);
        assert!(t.trusts("10.1.2.3".parse().unwrap()));
        assert!(t.trusts("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!t.trusts("192.0.2.1".parse().unwrap()));
        assert!(!TrustForwarded::Never.trusts("10.1.2.3".parse().unwrap()));
        assert!(TrustForwarded::Always.trusts("192.0.2.1".parse().unwrap()));
    }
}
