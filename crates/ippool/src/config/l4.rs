//! `[l4.<name>]`: TCP balancers that forward each connection to an
//! upstream of a pool, listed in the file or read from an nginx `upstream`
//! block, with per-upstream health.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::monitor::{HealthConfig, HumanDuration, PoolName};
use super::{ConfigError, Source};

fn sp<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}

/// `strategy` of a balancer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum L4StrategyKind {
    /// Smooth weighted round robin (the default).
    #[default]
    RoundRobin,
    /// Weighted random.
    Random,
    /// Fewest active connections per weight.
    LeastConnections,
}

/// `[l4.<name>]`: one TCP balancer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L4Config {
    /// The listener. Required.
    pub listen: Spanned<SocketAddr>,
    /// The `[rules.<name>]` set deciding which clients may connect.
    /// Default: every client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Spanned<String>>,
    /// Upstreams as `ip:port`. Exclusive with `upstream`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstreams: Option<Spanned<Vec<SocketAddr>>>,
    /// An nginx configuration to read the `upstream` block from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nginx_conf: Option<Spanned<std::path::PathBuf>>,
    /// The `upstream` block of `nginx_conf` (its `weight=` is used; `down`
    /// servers are left out, `backup` servers too: the balancer has no
    /// backup tier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Spanned<String>>,
    /// `"round_robin"` (default), `"random"` or `"least_connections"`.
    #[serde(default)]
    pub strategy: L4StrategyKind,
    /// Timeout of one upstream connect (default `"5s"`).
    #[serde(default = "d_dial")]
    pub dial_timeout: Spanned<HumanDuration>,
    /// A connection idle this long both ways is closed (default `"10m"`).
    #[serde(default = "d_idle")]
    pub idle_timeout: Spanned<HumanDuration>,
    /// Other upstreams tried after a failed dial (default 2).
    #[serde(default = "d_retries")]
    pub retries: u32,
    /// Time open connections get on shutdown (default `"30s"`).
    #[serde(default = "d_drain")]
    pub drain_timeout: Spanned<HumanDuration>,
    /// Per-upstream health: `[l4.<name>.health]`.
    #[serde(default = "d_health")]
    pub health: Spanned<HealthConfig>,
}

fn d_dial() -> Spanned<HumanDuration> {
    sp(HumanDuration(Duration::from_secs(5)))
}
fn d_idle() -> Spanned<HumanDuration> {
    sp(HumanDuration(Duration::from_secs(600)))
}
fn d_retries() -> u32 {
    2
}
fn d_drain() -> Spanned<HumanDuration> {
    sp(HumanDuration(Duration::from_secs(30)))
}
fn d_health() -> Spanned<HealthConfig> {
    sp(HealthConfig::default())
}

/// A balancer, resolved.
#[derive(Clone)]
pub struct L4Spec {
    /// The balancer's name.
    pub name: String,
    /// Where it listens.
    pub listen: SocketAddr,
    /// The gateway options (upstreams, strategy, timeouts, health).
    pub options: gateway::l4::L4Options,
    /// Where the upstreams came from, for humans.
    pub from: String,
    /// The client rule set, if any.
    pub rules: Option<String>,
}

impl std::fmt::Debug for L4Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L4Spec")
            .field("name", &self.name)
            .field("listen", &self.listen)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

/// Resolves one `[l4.<name>]` section; `base` anchors relative paths.
pub(super) fn resolve(
    src: &Source<'_>,
    base: &Path,
    name: &PoolName,
    c: &L4Config,
) -> Result<L4Spec, ConfigError> {
    let key = |k: &str| Some(format!("l4.{name}.{k}"));
    let err =
        |span: std::ops::Range<usize>, k: &str, msg: String| src.error(Some(span), key(k), msg);

    let (upstreams, from): (Vec<gateway::l4::Upstream>, String) =
        match (&c.upstreams, &c.upstream, &c.nginx_conf) {
            (Some(_), Some(b), _) => {
                return Err(err(
                    b.span(),
                    "upstream",
                    "set either `upstreams` or `upstream`, not both".into(),
                ));
            }
            (Some(u), None, _) => (
                u.get_ref()
                    .iter()
                    .map(|a| gateway::l4::Upstream::new(*a))
                    .collect(),
                "upstreams".into(),
            ),
            (None, Some(b), None) => {
                return Err(err(b.span(), "upstream", "needs `nginx_conf`".into()));
            }
            (None, Some(b), Some(p)) => {
                let path = base.join(p.get_ref());
                let conf = accesslog::NginxConfig::from_file(&path)
                    .map_err(|e| err(p.span(), "nginx_conf", format!("{}: {e}", path.display())))?;
                let wanted = b.get_ref();
                let ups = super::nginx_upstream(
                    &conf,
                    &path,
                    wanted,
                    |s| !s.down && !s.backup,
                    "list the upstreams in `upstreams` instead",
                )
                .map_err(|m| err(b.span(), "upstream", m))?
                .into_iter()
                .map(|(a, w)| gateway::l4::Upstream::new(a).with_weight(w))
                .collect();
                (ups, format!("upstream {wanted} of {}", path.display()))
            }
            (None, None, _) => {
                return Err(src.error(
                    None,
                    Some(format!("l4.{name}")),
                    "no upstreams: set `upstreams = [\"ip:port\", …]`, or `nginx_conf` and \
                     `upstream` to read an nginx upstream block"
                        .into(),
                ));
            }
        };

    let listen = *c.listen.get_ref();
    let (health, classifier) = c.health.get_ref().build().map_err(|(field, why)| {
        let span = c.health.get_ref().span_of(field).unwrap_or(c.health.span());
        err(span, &format!("health.{field}"), why)
    })?;
    let mut options = gateway::l4::L4Options::new(upstreams);
    options.strategy = match c.strategy {
        L4StrategyKind::RoundRobin => gateway::l4::Strategy::RoundRobin,
        L4StrategyKind::Random => gateway::l4::Strategy::Random,
        L4StrategyKind::LeastConnections => gateway::l4::Strategy::LeastConnections,
    };
    options.dial_timeout = c.dial_timeout.get_ref().0;
    options.idle_timeout = c.idle_timeout.get_ref().0;
    options.retries = c.retries;
    options.drain_timeout = c.drain_timeout.get_ref().0;
    options.health = health;
    options.classifier = classifier;
    options.validate().map_err(|e| {
        let (span, k) = match &e {
            gateway::l4::L4OptionsError::Duration { field, .. } => match *field {
                "dial_timeout" => (c.dial_timeout.span(), "dial_timeout"),
                "idle_timeout" => (c.idle_timeout.span(), "idle_timeout"),
                _ => (c.drain_timeout.span(), "drain_timeout"),
            },
            _ => (
                c.upstreams
                    .as_ref()
                    .map(Spanned::span)
                    .or(c.upstream.as_ref().map(Spanned::span))
                    .unwrap_or(c.listen.span()),
                if c.upstreams.is_some() {
                    "upstreams"
                } else {
                    "upstream"
                },
            ),
        };
        err(span, k, e.to_string())
    })?;
    Ok(L4Spec {
        name: name.to_string(),
        listen,
        options,
        from,
        rules: c.rules.as_ref().map(|r| r.get_ref().clone()),
    })
}
