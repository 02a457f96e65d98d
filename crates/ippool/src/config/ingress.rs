//! `[ingress.<name>]`: reverse-proxy listeners, their routes
//! (`[ingress.<name>.routes.<route>]`) and static backends. Backends that
//! register themselves over `[registry]` join the same route table.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::monitor::{HumanDuration, PoolName};
use super::{ConfigError, Source};

fn sp<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}
fn hd(ms: u64) -> Spanned<HumanDuration> {
    sp(HumanDuration(Duration::from_millis(ms)))
}
fn d_header() -> Spanned<HumanDuration> {
    hd(10_000)
}
fn d_connect() -> Spanned<HumanDuration> {
    hd(5_000)
}
fn d_idle() -> Spanned<HumanDuration> {
    hd(60_000)
}
fn d_request() -> Spanned<HumanDuration> {
    hd(60_000)
}
fn d_drain() -> Spanned<HumanDuration> {
    hd(30_000)
}
fn d_max_header() -> usize {
    64 * 1024
}
fn d_path() -> String {
    "/".into()
}
fn d_retries() -> u32 {
    1
}
fn d_status() -> u16 {
    503
}
fn d_true() -> bool {
    true
}
fn d_via() -> Spanned<String> {
    sp("ippool".into())
}

/// A TLS certificate: `{ cert = "a.pem", key = "a.key" }`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    /// The chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The private key (PEM).
    pub key: PathBuf,
}

/// `[ingress.<name>.routes.<route>.backend_tls]`: the route's backends
/// are reached over TLS, their certificates checked.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTlsConfig {
    /// The CA certificates that sign the backends' certificates (PEM).
    /// Default: the system's bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The name the certificates must hold (and the SNI sent). Default:
    /// each backend's IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// A client certificate chain for backends that ask for one (PEM),
    /// with `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// A static backend: `"10.0.0.1:8080"` or `{ addr = "…", weight = 2 }`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BackendConfig {
    /// Weight 1.
    Addr(SocketAddr),
    /// With a weight.
    Weighted {
        /// The address.
        addr: SocketAddr,
        /// The weight (default 1).
        #[serde(default = "d_weight")]
        weight: u32,
    },
}

fn d_weight() -> u32 {
    1
}

/// An active health check of a route.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    /// `GET` this path.
    pub path: String,
    /// Every (default `"2s"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<HumanDuration>,
    /// Within (default `"1s"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    /// Successes that bring a backend back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    /// Failures that take it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
}

/// `[ingress.<name>.routes.<route>]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `example.com`, `*.example.com`; absent: any host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path prefix (default `/`); the longest match wins.
    #[serde(default = "d_path")]
    pub path: String,
    /// `round_robin` (weighted, default), `least_connections`, `p2c_ewma`,
    /// `random`, `hash:client_ip`, `hash:header:NAME`, `hash:cookie:NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Spanned<String>>,
    /// Static backends.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// Active health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<CheckConfig>,
    /// Retries of idempotent requests on another backend after a connect
    /// failure (default 1).
    #[serde(default = "d_retries")]
    pub retries: u32,
    /// The status when no backend can take a request (default 503).
    #[serde(default = "d_status")]
    pub no_backend_status: u16,
    /// Reach the backends over TLS (HTTPS). Absent: plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_tls: Option<Spanned<BackendTlsConfig>>,
    /// Speak HTTP/2 to the backends (h2c with prior knowledge, or ALPN h2
    /// with `backend_tls`): gRPC backends (default false: HTTP/1.1).
    #[serde(default)]
    pub backend_http2: bool,
}

/// `[ingress.<name>]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressConfig {
    /// The listener. Required.
    pub listen: Spanned<SocketAddr>,
    /// The client rule set (checked at accept; per-request rate limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Spanned<String>>,
    /// TLS certificates; the client's SNI picks one. Absent: plain HTTP
    /// (HTTP/1.1 and h2c).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<CertConfig>,
    /// Client addresses whose X-Forwarded-* / Forwarded headers are kept
    /// (default: none).
    #[serde(default)]
    pub trust_forwarded: Vec<iprules::Rule>,
    /// Set `X-Forwarded-For`, `-Proto` and `-Host` on requests to
    /// backends (default true).
    #[serde(default = "d_true")]
    pub x_forwarded: bool,
    /// Set RFC 7239 `Forwarded` (default true).
    #[serde(default = "d_true")]
    pub forwarded: bool,
    /// The pseudonym appended to `Via` (default `"ippool"`); `""` adds no
    /// `Via`.
    #[serde(default = "d_via")]
    pub via: Spanned<String>,
    /// Time for a TLS handshake and each request head (default `"10s"`).
    #[serde(default = "d_header")]
    pub header_read_timeout: Spanned<HumanDuration>,
    /// Backend connect timeout (default `"5s"`).
    #[serde(default = "d_connect")]
    pub connect_timeout: Spanned<HumanDuration>,
    /// Idle connections and tunnels (default `"60s"`).
    #[serde(default = "d_idle")]
    pub idle_timeout: Spanned<HumanDuration>,
    /// Each exchange with a backend (default `"60s"`).
    #[serde(default = "d_request")]
    pub request_timeout: Spanned<HumanDuration>,
    /// Time in-flight requests get on shutdown (default `"30s"`).
    #[serde(default = "d_drain")]
    pub drain_timeout: Spanned<HumanDuration>,
    /// Largest request head (default 65536; over: 431).
    #[serde(default = "d_max_header")]
    pub max_header_bytes: usize,
    /// Largest request body (default: no limit; over: 413).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    /// The routes.
    #[serde(default)]
    pub routes: BTreeMap<PoolName, RouteConfig>,
    /// An access log, nginx `combined` format (relative to the config
    /// file). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<PathBuf>,
    /// Serve plain HTTP/1.1 requests on the lean path (default true);
    /// false sends every request through hyper.
    #[serde(default = "d_true")]
    pub fast_h1: bool,
}

/// An ingress, resolved.
pub struct IngressSpec {
    /// Its name.
    pub name: String,
    /// The gateway options (its route table a scratch one: see `routes`).
    pub options: gateway::ingress::IngressOptions,
    /// The configured routes, to put into the live route table.
    pub routes: Vec<gateway::ingress::Route>,
    /// The client rule set, if any.
    pub rules: Option<String>,
    /// The access log file, resolved.
    pub access_log: Option<PathBuf>,
}

impl std::fmt::Debug for IngressSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngressSpec")
            .field("name", &self.name)
            .field("listen", &self.options.listen)
            .finish_non_exhaustive()
    }
}

fn balance(text: &str) -> Result<gateway::ingress::Balance, String> {
    use gateway::ingress::{Balance, HashKey};
    Ok(match text {
        "round_robin" => Balance::RoundRobin,
        "least_connections" => Balance::LeastConnections,
        "p2c_ewma" => Balance::P2cEwma,
        "random" => Balance::Random,
        "hash:client_ip" => Balance::Hash(HashKey::ClientIp),
        other => {
            if let Some(h) = other.strip_prefix("hash:header:") {
                let name = h
                    .parse::<http::HeaderName>()
                    .map_err(|_| format!("`{h}` is not a header name"))?;
                Balance::Hash(HashKey::Header(name))
            } else if let Some(c) = other.strip_prefix("hash:cookie:")
                && !c.is_empty()
            {
                Balance::Hash(HashKey::Cookie(c.to_owned()))
            } else {
                return Err(format!(
                    "`{other}`: use round_robin, least_connections, p2c_ewma, random, \
                     hash:client_ip, hash:header:NAME or hash:cookie:NAME"
                ));
            }
        }
    })
}

/// Resolves one `[ingress.<name>]`; `base` anchors relative paths.
pub(super) fn resolve(
    src: &Source<'_>,
    base: &Path,
    name: &PoolName,
    c: &IngressConfig,
) -> Result<IngressSpec, ConfigError> {
    use gateway::ingress as gi;
    let key = |k: &str| Some(format!("ingress.{name}.{k}"));
    let whole = |k: String, m: String| src.error(None, Some(k), m);

    // Checked in a scratch table here (duplicate matches, bad weights);
    // serve builds the live one with its health sink.
    let routes = gi::RouteTable::default();
    let mut all = Vec::new();
    for (rname, r) in &c.routes {
        let rkey = format!("ingress.{name}.routes.{rname}");
        let m = gi::RouteMatch::new(r.host.as_deref(), &r.path);
        let mut route = gi::Route::new(rname.to_string(), m);
        if let Some(b) = &r.balance {
            route = route.with_balance(
                balance(b.get_ref())
                    .map_err(|e| src.error(Some(b.span()), Some(format!("{rkey}.balance")), e))?,
            );
        }
        for (i, b) in r.backends.iter().enumerate() {
            let (addr, weight) = match b {
                BackendConfig::Addr(a) => (*a, 1),
                BackendConfig::Weighted { addr, weight } => (*addr, *weight),
            };
            route = route.with_backend(
                gi::Backend::new(format!("{rname}-{}", i + 1), addr).with_weight(weight),
            );
        }
        if let Some(h) = &r.health_check {
            let mut check = gi::HealthCheck::new(h.path.clone());
            if let Some(v) = h.interval {
                check.interval = v.0;
            }
            if let Some(v) = h.timeout {
                check.timeout = v.0;
            }
            if let Some(v) = h.rise {
                check.rise = v;
            }
            if let Some(v) = h.fall {
                check.fall = v;
            }
            route = route.with_health_check(check);
        }
        if let Some(spanned) = &r.backend_tls {
            let (t, span) = (spanned.get_ref(), spanned.span());
            let k = format!("{rkey}.backend_tls");
            let at = |m: String| src.error(Some(span.clone()), Some(k.clone()), m);
            let client = match (&t.cert, &t.key) {
                (Some(c), Some(k)) => Some((base.join(c), base.join(k))),
                (None, None) => None,
                _ => {
                    return Err(at("cert and key go together: give both, or neither".into()));
                }
            };
            let ca = t.ca.as_ref().map(|c| base.join(c));
            let mut tls = gi::BackendTls::from_pem(
                ca.as_deref(),
                client.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            )
            .map_err(at)?;
            if let Some(n) = &t.server_name {
                tls = tls.with_server_name(n).map_err(at)?;
            }
            route = route.with_backend_tls(tls);
        }
        route.backend_http2 = r.backend_http2;
        route.retries = r.retries;
        route.no_backend_status = http::StatusCode::from_u16(r.no_backend_status)
            .ok()
            .filter(|s| s.as_u16() >= 400)
            .ok_or_else(|| {
                whole(
                    format!("{rkey}.no_backend_status"),
                    format!(
                        "{} is not an error status (400 to 599)",
                        r.no_backend_status
                    ),
                )
            })?;
        routes
            .upsert_route(route.clone())
            .map_err(|e| whole(rkey.clone(), e.to_string()))?;
        all.push(route);
    }

    let mut options = gi::IngressOptions::new(*c.listen.get_ref(), routes);
    if !c.tls.is_empty() {
        let paths = c
            .tls
            .iter()
            .map(|t| gi::CertPaths::new(base.join(&t.cert), base.join(&t.key)));
        let certs = gi::CertStore::load(paths)
            .map_err(|e| src.error(Some(c.listen.span()), key("tls"), e.to_string()))?;
        let mut tls = gi::TlsOptions::new(certs);
        tls.watch = Some(Duration::from_secs(2));
        options.tls = Some(tls);
    }
    if !c.trust_forwarded.is_empty() {
        let mut set = iprules::RuleSet::new();
        set.extend(c.trust_forwarded.iter().copied());
        options.forwarding.trust = gi::TrustForwarded::From(set);
    }
    options.fast_h1 = c.fast_h1;
    options.forwarding.x_forwarded = c.x_forwarded;
    options.forwarding.forwarded = c.forwarded;
    let via = c.via.get_ref();
    options.forwarding.via = (!via.is_empty()).then(|| via.clone());
    options.header_read_timeout = c.header_read_timeout.get_ref().0;
    options.connect_timeout = c.connect_timeout.get_ref().0;
    options.idle_timeout = c.idle_timeout.get_ref().0;
    options.request_timeout = c.request_timeout.get_ref().0;
    options.drain_timeout = c.drain_timeout.get_ref().0;
    options.max_header_bytes = c.max_header_bytes;
    options.max_body_bytes = c.max_body_bytes;
    options.validate().map_err(|e| match e {
        gi::IngressOptionsError::Via(_) => src.error(Some(c.via.span()), key("via"), e.to_string()),
        _ => src.error(Some(c.listen.span()), key("listen"), e.to_string()),
    })?;
    Ok(IngressSpec {
        name: name.to_string(),
        options,
        routes: all,
        rules: c.rules.as_ref().map(|r| r.get_ref().clone()),
        access_log: c.access_log.as_ref().map(|p| base.join(p)),
    })
}
