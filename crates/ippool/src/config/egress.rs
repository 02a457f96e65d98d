//! `[pools.<name>]`: egress address pools, and `[egress.<name>]`: the
//! forward-proxy listeners that send connections out from them.
//!
//! The sections are deserialized into [`PoolConfig`] and [`EgressConfig`]
//! (kept in [`Config`](super::Config) for `check` and `/config`) and
//! resolved by [`resolve_pool`] and [`resolve_egress`] into specs: the
//! source parsed, assigner keys checked against the assigner, the health
//! policy validated, proxy users read from their file, the destination
//! policy built; each error names its key path and line.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::monitor::{HealthConfig, HumanDuration, PoolName};
use super::{ConfigError, Source};

fn sp<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}

/// `assigner` of a pool: how its addresses become usable as sources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AssignerKind {
    /// The addresses are already on the host (the default).
    #[default]
    Static,
    /// Bind with IP_FREEBIND under a `local` route; nothing is assigned.
    Freebind,
    /// Add and remove addresses on `interface` over rtnetlink (root or
    /// CAP_NET_ADMIN).
    Netlink,
}

/// `order` of a pool: the order the source is drawn in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderKind {
    /// First to last, once (the default).
    #[default]
    Sequential,
    /// Every address once, in a random order.
    Random,
    /// First to last, again and again.
    Cycle,
}

/// `strategy` of a pool: how a lease picks among the held addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// The next address never used yet (the default).
    #[default]
    Fresh,
    /// The least recently released address.
    RoundRobin,
    /// A random available address.
    Random,
    /// The address with the fewest uses.
    LeastUsed,
    /// The same address per session for `session_ttl`.
    Sticky,
}

/// `session_from` of an egress listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionFromKind {
    /// The proxy username, `USER-session-ID[-ttl-SECONDS]` (the default).
    #[default]
    Username,
    /// The destination host.
    Host,
}

/// `[pools.<name>]`: one egress address pool.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The addresses: a CIDR (`"2001:db8:1::/64"`), an inclusive range
    /// (`"10.0.0.10-10.0.0.20"`) or a comma-separated list. Exclusive with
    /// `source_file`; one of them is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Spanned<String>>,
    /// A file of addresses, one per line, `#` comments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_file: Option<Spanned<PathBuf>>,
    /// `"static"` (default), `"freebind"` or `"netlink"`.
    #[serde(default = "d_assigner")]
    pub assigner: Spanned<AssignerKind>,
    /// `"sequential"` (default), `"random"` or `"cycle"`.
    #[serde(default)]
    pub order: OrderKind,
    /// `"fresh"` (default), `"round_robin"`, `"random"`, `"least_used"`
    /// or `"sticky"`.
    #[serde(default)]
    pub strategy: StrategyKind,
    /// Uses before an address is retired; 0: never (default 1).
    #[serde(default = "d_max_uses")]
    pub max_uses: u64,
    /// Netlink: idle time before an address is removed; `"0s"`: never
    /// (default `"10m"`).
    #[serde(default = "d_max_idle")]
    pub max_idle: Spanned<HumanDuration>,
    /// How often idle addresses and sessions are swept (default `"10s"`).
    #[serde(default = "d_sweep")]
    pub sweep_interval: Spanned<HumanDuration>,
    /// Addresses kept ready ahead of demand (default 10).
    #[serde(default = "d_keep")]
    pub keep_assigned: Spanned<usize>,
    /// Most addresses held at once (default 50).
    #[serde(default = "d_max_assigned")]
    pub max_assigned: Spanned<usize>,
    /// Sticky sessions without a TTL of their own (default `"10m"`).
    #[serde(default = "d_session_ttl")]
    pub session_ttl: Spanned<HumanDuration>,
    /// How long a lease waits for an address (default `"5s"`).
    #[serde(default = "d_lease_timeout")]
    pub lease_timeout: Spanned<HumanDuration>,
    /// Timeout of each outbound TCP connect (default `"10s"`).
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout: Spanned<HumanDuration>,
    /// Addresses of the source never handed out.
    #[serde(default)]
    pub exclude: Vec<iprules::Rule>,
    /// Hand out the network and broadcast addresses of IPv4 CIDRs too
    /// (default false).
    #[serde(default)]
    pub include_network_broadcast: bool,
    /// Netlink: the interface, by name. Required with `netlink`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<Spanned<String>>,
    /// Netlink: add with IFA_F_NODAD (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_dad: Option<Spanned<bool>>,
    /// Netlink: timeout of one add (default `"1s"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assign_timeout: Option<Spanned<HumanDuration>>,
    /// Netlink: timeout of one removal (default `"1s"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_timeout: Option<Spanned<HumanDuration>>,
    /// Netlink: accept addresses already on the interface (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_existing: Option<Spanned<bool>>,
    /// Netlink: prefix length of added addresses (default /32 or /128).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_len: Option<Spanned<u8>>,
    /// Freebind: add the missing `local` route instead of failing (default
    /// false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_local_route: Option<Spanned<bool>>,
    /// Netlink and freebind: remove what the pool added on exit (default
    /// true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_on_exit: Option<Spanned<bool>>,
    /// Per-address health: `[pools.<name>.health]`; always on, defaults
    /// as for monitors.
    #[serde(default = "default_health")]
    pub health: Spanned<HealthConfig>,
}

fn d_assigner() -> Spanned<AssignerKind> {
    sp(AssignerKind::Static)
}
fn d_max_uses() -> u64 {
    1
}
fn hd(d: Duration) -> Spanned<HumanDuration> {
    sp(HumanDuration(d))
}
fn d_max_idle() -> Spanned<HumanDuration> {
    hd(Duration::from_secs(600))
}
fn d_sweep() -> Spanned<HumanDuration> {
    hd(Duration::from_secs(10))
}
fn d_keep() -> Spanned<usize> {
    sp(10)
}
fn d_max_assigned() -> Spanned<usize> {
    sp(50)
}
fn d_session_ttl() -> Spanned<HumanDuration> {
    hd(Duration::from_secs(600))
}
fn d_lease_timeout() -> Spanned<HumanDuration> {
    hd(Duration::from_secs(5))
}
fn d_connect_timeout() -> Spanned<HumanDuration> {
    hd(Duration::from_secs(10))
}
fn default_health() -> Spanned<HealthConfig> {
    sp(HealthConfig::default())
}

/// `[egress.<name>]`: one forward-proxy listener (HTTP, CONNECT and SOCKS5
/// on one port).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// The listener (default `127.0.0.1:3128`).
    #[serde(default = "d_listen")]
    pub listen: Spanned<SocketAddr>,
    /// The `[pools.<name>]` connections leave from. Required.
    pub pool: Spanned<String>,
    /// The `[rules.<name>]` set deciding which clients may connect (checked
    /// at accept; wrong credentials and malformed requests feed its
    /// `autoblock`). Default: every client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Spanned<String>>,
    /// Proxy users: a file of `user:password` lines (`#` comments). Without
    /// it, no authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users_file: Option<Spanned<PathBuf>>,
    /// Allow a non-loopback listener without users (default false).
    #[serde(default)]
    pub open: bool,
    /// Sticky-session key: `"username"` (default) or `"host"`.
    #[serde(default)]
    pub session_from: SessionFromKind,
    /// Bound on resolving, leasing and connecting (default `"10s"`).
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout: Spanned<HumanDuration>,
    /// Idle timeout of tunnels and kept-alive connections (default `"60s"`).
    #[serde(default = "d_idle")]
    pub idle_timeout: Spanned<HumanDuration>,
    /// Time to send a request head or SOCKS5 handshake (default `"10s"`).
    #[serde(default = "d_header")]
    pub header_read_timeout: Spanned<HumanDuration>,
    /// Largest request head, at least 8192 (default 65536).
    #[serde(default = "d_max_header")]
    pub max_header_bytes: Spanned<usize>,
    /// Time open connections get on shutdown (default `"30s"`).
    #[serde(default = "d_drain")]
    pub drain_timeout: Spanned<HumanDuration>,
    /// Deny the built-in special ranges (loopback, private, link-local, …)
    /// as destinations (default true).
    #[serde(default = "d_true")]
    pub default_deny: bool,
    /// Destinations allowed whatever the deny list says (holes).
    #[serde(default)]
    pub allow: Vec<iprules::Rule>,
    /// More destinations to refuse.
    #[serde(default)]
    pub deny: Vec<iprules::Rule>,
    /// Most idle upstream connections kept; 0 disables keep-alive
    /// (default 256).
    #[serde(default = "d_ka")]
    pub keep_alive_max_idle: usize,
    /// Most idle upstream connections per (source, destination) (default 8).
    #[serde(default = "d_ka_key")]
    pub keep_alive_max_idle_per_key: usize,
    /// An access log, nginx `combined` format (relative to the config
    /// file). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<PathBuf>,
    /// Serve plain `http://` requests on the lean HTTP/1.1 path (default
    /// true); false sends every request through hyper.
    #[serde(default = "d_fast_h1")]
    pub fast_h1: bool,
}

fn d_fast_h1() -> bool {
    true
}

fn d_listen() -> Spanned<SocketAddr> {
    sp(SocketAddr::from(([127, 0, 0, 1], 3128)))
}
fn d_idle() -> Spanned<HumanDuration> {
    hd(Duration::from_secs(60))
}
fn d_header() -> Spanned<HumanDuration> {
    hd(Duration::from_secs(10))
}
fn d_max_header() -> Spanned<usize> {
    sp(64 * 1024)
}
fn d_drain() -> Spanned<HumanDuration> {
    hd(Duration::from_secs(30))
}
fn d_true() -> bool {
    true
}
fn d_ka() -> usize {
    256
}
fn d_ka_key() -> usize {
    8
}

/// Where a pool's addresses come from, resolved.
#[derive(Clone, Debug)]
pub enum SourceSpec {
    /// A CIDR, range or list, as written (already parsed once).
    Text(String),
    /// A file of addresses (already read and parsed once).
    File(PathBuf),
}

impl SourceSpec {
    /// Builds the source (again: [`addrpool::Source`] is not `Clone`).
    pub fn build(&self) -> Result<addrpool::Source, String> {
        match self {
            SourceSpec::Text(t) => t.parse().map_err(|e| format!("{e}")),
            SourceSpec::File(p) => {
                addrpool::Source::file(p).map_err(|e| format!("{}: {e}", p.display()))
            }
        }
    }
}

/// A pool, resolved: what the daemon starts.
#[derive(Clone, Debug)]
pub struct PoolSpec {
    /// The pool's name.
    pub name: String,
    /// Its addresses.
    pub source: SourceSpec,
    /// Its assigner.
    pub assigner: addrpool::Assigner,
    /// Its options (health on).
    pub options: addrpool::PoolOptions,
}

/// An egress listener, resolved. `options` lacks only the pool, which
/// exists once the daemon started it: see [`EgressSpec::options`].
#[derive(Clone, Debug)]
pub struct EgressSpec {
    /// The listener's name.
    pub name: String,
    /// The pool's name.
    pub pool: String,
    /// Where it listens.
    pub listen: SocketAddr,
    /// Whether a non-loopback listener may run without users.
    pub open: bool,
    /// Proxy users (name → password).
    pub users: HashMap<String, String>,
    /// Where the users came from, for humans.
    pub users_file: Option<PathBuf>,
    /// Sticky-session key.
    pub session_from: gateway::egress::SessionFrom,
    /// Timeouts and limits.
    pub connect_timeout: Duration,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// Request-head timeout.
    pub header_read_timeout: Duration,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Drain time on shutdown.
    pub drain_timeout: Duration,
    /// The destination policy.
    pub policy: iprules::Policy,
    /// Upstream keep-alive.
    pub keep_alive: gateway::egress::KeepAlive,
    /// The lean HTTP/1.1 path.
    pub fast_h1: bool,
    /// The client rule set, if any.
    pub rules: Option<String>,
    /// The access log file, resolved.
    pub access_log: Option<PathBuf>,
}

impl EgressSpec {
    /// The gateway options of this listener, leaving from `pool`.
    pub fn options(&self, pool: addrpool::Pool) -> gateway::egress::EgressOptions {
        let mut o = gateway::egress::EgressOptions::new(pool);
        o.listen = self.listen;
        o.open = self.open;
        o.users = self.users.clone();
        o.session_from = self.session_from;
        o.connect_timeout = self.connect_timeout;
        o.idle_timeout = self.idle_timeout;
        o.header_read_timeout = self.header_read_timeout;
        o.max_header_bytes = self.max_header_bytes;
        o.drain_timeout = self.drain_timeout;
        o.policy = Arc::new(iprules::Shared::new(self.policy.clone()));
        o.keep_alive = self.keep_alive;
        o.fast_h1 = self.fast_h1;
        o
    }
}

/// Resolves one `[pools.<name>]` section; `base` anchors relative paths.
pub(super) fn resolve_pool(
    src: &Source<'_>,
    base: &Path,
    name: &PoolName,
    p: &PoolConfig,
) -> Result<PoolSpec, ConfigError> {
    let key = |k: &str| Some(format!("pools.{name}.{k}"));
    let err =
        |span: std::ops::Range<usize>, k: &str, msg: String| src.error(Some(span), key(k), msg);

    let source = match (&p.source, &p.source_file) {
        (Some(_), Some(f)) => {
            return Err(err(
                f.span(),
                "source_file",
                "set one of source and source_file, not both".into(),
            ));
        }
        (None, None) => {
            return Err(src.error(
                None,
                Some(format!("pools.{name}")),
                "no addresses: set source (a CIDR, a-b range or a, b, c list) or source_file"
                    .into(),
            ));
        }
        (Some(t), None) => {
            let text = t.get_ref().trim();
            let parsed: addrpool::Source = text
                .parse()
                .map_err(|e| err(t.span(), "source", format!("{e}")))?;
            if parsed.family().is_none() {
                return Err(err(t.span(), "source", "holds no address".into()));
            }
            SourceSpec::Text(text.to_owned())
        }
        (None, Some(f)) => {
            let path = base.join(f.get_ref());
            let parsed = addrpool::Source::file(&path)
                .map_err(|e| err(f.span(), "source_file", format!("{}: {e}", path.display())))?;
            if parsed.family().is_none() {
                return Err(err(
                    f.span(),
                    "source_file",
                    format!("{}: holds no address", path.display()),
                ));
            }
            SourceSpec::File(path)
        }
    };

    // Assigner-specific keys only with their assigner.
    let kind = *p.assigner.get_ref();
    let netlink_only: [(&str, Option<std::ops::Range<usize>>); 5] = [
        ("interface", p.interface.as_ref().map(Spanned::span)),
        ("skip_dad", p.skip_dad.as_ref().map(Spanned::span)),
        (
            "assign_timeout",
            p.assign_timeout.as_ref().map(Spanned::span),
        ),
        (
            "remove_timeout",
            p.remove_timeout.as_ref().map(Spanned::span),
        ),
        ("use_existing", p.use_existing.as_ref().map(Spanned::span)),
    ];
    let wrong = |k: &str, span: std::ops::Range<usize>, only: &str| {
        Err(err(
            span,
            k,
            format!(
                "only applies to assigner = \"{only}\" (this pool's assigner is \"{}\")",
                assigner_name(kind)
            ),
        ))
    };
    if kind != AssignerKind::Netlink {
        for (k, span) in netlink_only.iter().cloned() {
            if let Some(span) = span {
                return wrong(k, span, "netlink");
            }
        }
        if let Some(pl) = &p.prefix_len {
            return wrong("prefix_len", pl.span(), "netlink");
        }
    }
    if kind != AssignerKind::Freebind
        && let Some(a) = &p.add_local_route
    {
        return wrong("add_local_route", a.span(), "freebind");
    }
    if kind == AssignerKind::Static
        && let Some(r) = &p.remove_on_exit
    {
        return Err(err(
            r.span(),
            "remove_on_exit",
            "applies to the netlink and freebind assigners only".into(),
        ));
    }
    let remove_on_exit = p.remove_on_exit.as_ref().is_none_or(|r| *r.get_ref());
    let assigner = match kind {
        AssignerKind::Static => addrpool::Assigner::Static,
        AssignerKind::Freebind => addrpool::Assigner::Freebind(addrpool::FreebindOptions {
            add_local_route: p.add_local_route.as_ref().is_some_and(|a| *a.get_ref()),
            remove_on_exit,
        }),
        AssignerKind::Netlink => {
            let Some(ifname) = &p.interface else {
                return Err(err(
                    p.assigner.span(),
                    "interface",
                    "assigner = \"netlink\" needs interface = \"<name>\" (the interface the \
                     addresses are added to, e.g. \"eth0\")"
                        .into(),
                ));
            };
            let n = ifname.get_ref();
            if n.is_empty() || n.len() > 15 || n.contains(['/', ' ']) {
                return Err(err(
                    ifname.span(),
                    "interface",
                    format!("`{n}` is not an interface name (1 to 15 characters, no `/` or space)"),
                ));
            }
            let mut o = addrpool::NetlinkOptions::new(n.as_str());
            if let Some(v) = &p.skip_dad {
                o.skip_dad = *v.get_ref();
            }
            if let Some(v) = &p.assign_timeout {
                o.assign_timeout = positive(v, &err, "assign_timeout")?;
            }
            if let Some(v) = &p.remove_timeout {
                o.remove_timeout = positive(v, &err, "remove_timeout")?;
            }
            if let Some(v) = &p.use_existing {
                o.use_existing = *v.get_ref();
            }
            if let Some(v) = &p.prefix_len {
                let max = match source_family(&source) {
                    Some(addrpool::Family::V4) => 32,
                    _ => 128,
                };
                if *v.get_ref() > max {
                    return Err(err(
                        v.span(),
                        "prefix_len",
                        format!(
                            "{} is longer than the family allows (at most {max})",
                            v.get_ref()
                        ),
                    ));
                }
                o.prefix_len = Some(*v.get_ref());
            }
            o.remove_on_exit = remove_on_exit;
            addrpool::Assigner::Netlink(o)
        }
    };

    let keep = *p.keep_assigned.get_ref();
    let max = *p.max_assigned.get_ref();
    if max == 0 {
        return Err(err(
            p.max_assigned.span(),
            "max_assigned",
            "must be at least 1".into(),
        ));
    }
    if keep > max {
        return Err(err(
            p.keep_assigned.span(),
            "keep_assigned",
            format!("{keep} is more than max_assigned ({max})"),
        ));
    }
    let exclude = if p.exclude.is_empty() {
        None
    } else {
        let mut set = iprules::RuleSet::new();
        set.extend(p.exclude.iter().copied());
        Some(addrpool::Exclude::from(set))
    };
    let (health, classifier) = p.health.get_ref().build().map_err(|(field, why)| {
        let span = p.health.get_ref().span_of(field).unwrap_or(p.health.span());
        err(span, &format!("health.{field}"), why)
    })?;
    let options = addrpool::PoolOptions {
        order: match p.order {
            OrderKind::Sequential => addrpool::Order::Sequential,
            OrderKind::Random => addrpool::Order::Random,
            OrderKind::Cycle => addrpool::Order::Cycle,
        },
        strategy: match p.strategy {
            StrategyKind::Fresh => addrpool::Strategy::Fresh,
            StrategyKind::RoundRobin => addrpool::Strategy::RoundRobin,
            StrategyKind::Random => addrpool::Strategy::Random,
            StrategyKind::LeastUsed => addrpool::Strategy::LeastUsed,
            StrategyKind::Sticky => addrpool::Strategy::Sticky,
        },
        max_uses: (p.max_uses > 0).then_some(p.max_uses),
        max_idle: Some(p.max_idle.get_ref().0).filter(|d| !d.is_zero()),
        sweep_interval: positive(&p.sweep_interval, &err, "sweep_interval")?,
        keep_assigned: keep,
        max_assigned: max,
        session_ttl: positive(&p.session_ttl, &err, "session_ttl")?,
        lease_timeout: p.lease_timeout.get_ref().0,
        connect_timeout: positive(&p.connect_timeout, &err, "connect_timeout")?,
        exclude,
        include_network_broadcast: p.include_network_broadcast,
        health: Some(health),
        classifier,
        ..addrpool::PoolOptions::default()
    };
    Ok(PoolSpec {
        name: name.to_string(),
        source,
        assigner,
        options,
    })
}

fn assigner_name(k: AssignerKind) -> &'static str {
    match k {
        AssignerKind::Static => "static",
        AssignerKind::Freebind => "freebind",
        AssignerKind::Netlink => "netlink",
    }
}

fn source_family(s: &SourceSpec) -> Option<addrpool::Family> {
    s.build().ok().and_then(|s| s.family())
}

fn positive(
    v: &Spanned<HumanDuration>,
    err: &impl Fn(std::ops::Range<usize>, &str, String) -> ConfigError,
    key: &str,
) -> Result<Duration, ConfigError> {
    let d = v.get_ref().0;
    if d.is_zero() {
        return Err(err(v.span(), key, "must be more than 0s".into()));
    }
    Ok(d)
}

/// Resolves one `[egress.<name>]` section against the pools.
pub(super) fn resolve_egress(
    src: &Source<'_>,
    base: &Path,
    name: &PoolName,
    e: &EgressConfig,
    pools: &BTreeMap<PoolName, PoolConfig>,
) -> Result<EgressSpec, ConfigError> {
    let key = |k: &str| Some(format!("egress.{name}.{k}"));
    let err =
        |span: std::ops::Range<usize>, k: &str, msg: String| src.error(Some(span), key(k), msg);

    let pool = e.pool.get_ref();
    if !pools.keys().any(|p| p.to_string() == *pool) {
        let known: Vec<String> = pools.keys().map(ToString::to_string).collect();
        return Err(err(
            e.pool.span(),
            "pool",
            if known.is_empty() {
                format!("no pool `{pool}`: define it in a [pools.{pool}] section")
            } else {
                format!("no pool `{pool}` (pools: {})", known.join(", "))
            },
        ));
    }

    let (users, users_file) = match &e.users_file {
        None => (HashMap::new(), None),
        Some(f) => {
            let path = base.join(f.get_ref());
            let text = std::fs::read_to_string(&path).map_err(|x| {
                err(
                    f.span(),
                    "users_file",
                    format!("{}: cannot read: {x}", path.display()),
                )
            })?;
            let users = parse_users(&text)
                .map_err(|m| err(f.span(), "users_file", format!("{}: {m}", path.display())))?;
            (users, Some(path))
        }
    };
    let listen = *e.listen.get_ref();
    if !super::is_loopback(listen.ip()) && users.is_empty() && !e.open {
        return Err(err(
            e.listen.span(),
            "listen",
            format!(
                "{listen} is not a loopback address and no users_file is set: that is an open \
                 proxy. Set users_file, listen on 127.0.0.1, or set open = true"
            ),
        ));
    }
    let max_header_bytes = *e.max_header_bytes.get_ref();
    if max_header_bytes < 8192 {
        return Err(err(
            e.max_header_bytes.span(),
            "max_header_bytes",
            format!("{max_header_bytes} is too small: at least 8192"),
        ));
    }
    let mut policy = if e.default_deny {
        gateway::egress::default_policy()
    } else {
        iprules::Policy::new(iprules::Verdict::Allow)
    };
    policy.allow.extend(e.allow.iter().copied());
    policy.deny.extend(e.deny.iter().copied());

    Ok(EgressSpec {
        name: name.to_string(),
        pool: pool.clone(),
        listen,
        open: e.open,
        users,
        users_file,
        session_from: match e.session_from {
            SessionFromKind::Username => gateway::egress::SessionFrom::Username,
            SessionFromKind::Host => gateway::egress::SessionFrom::Host,
        },
        connect_timeout: positive(&e.connect_timeout, &err, "connect_timeout")?,
        idle_timeout: positive(&e.idle_timeout, &err, "idle_timeout")?,
        header_read_timeout: positive(&e.header_read_timeout, &err, "header_read_timeout")?,
        max_header_bytes,
        drain_timeout: e.drain_timeout.get_ref().0,
        policy,
        keep_alive: gateway::egress::KeepAlive {
            max_idle: e.keep_alive_max_idle,
            max_idle_per_key: e.keep_alive_max_idle_per_key,
        },
        fast_h1: e.fast_h1,
        rules: e.rules.as_ref().map(|r| r.get_ref().clone()),
        access_log: e.access_log.as_ref().map(|p| base.join(p)),
    })
}

/// Parses a users file: `user:password` per line, `#` comments and blank
/// lines skipped. Errors name the line (never the password).
pub fn parse_users(text: &str) -> Result<HashMap<String, String>, String> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let Some((user, pass)) = line.split_once(':') else {
            return Err(format!("line {n}: expected `user:password`"));
        };
        if user.is_empty() || user.len() > 255 || user.contains(|c: char| c.is_whitespace()) {
            return Err(format!(
                "line {n}: bad user name (1 to 255 bytes, no white space)"
            ));
        }
        if pass.is_empty() || pass.len() > 255 {
            return Err(format!(
                "line {n}: user `{user}`: the password must be 1 to 255 bytes (SOCKS5 limit)"
            ));
        }
        if users.insert(user.to_owned(), pass.to_owned()).is_some() {
            return Err(format!("line {n}: user `{user}` appears twice"));
        }
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_file() {
        let u = parse_users("# proxy users\nalice:s3cret\n\nbob:pa:ss\n").unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u["bob"], "pa:ss");
        let e = parse_users("alice:x\nbob\n").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
        let e = parse_users("alice:x\nalice:y\n").unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let e = parse_users("carol:\n").unwrap_err();
        assert!(e.contains("line 1") && !e.contains("carol:"), "{e}");
    }
}
