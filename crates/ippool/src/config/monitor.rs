//! `[monitor.<name>]`: nginx pools watched through their access logs, and
//! `[monitor.<name>.health]`, the health policy of the pool.
//!
//! The sections are deserialized into [`MonitorConfig`] (kept in
//! [`Config`](super::Config) for `check` and `/config`) and resolved by
//! [`resolve`] into [`MonitorSpec`]s: the log format compiled, the nginx
//! configuration read, the address list decided and the health options
//! validated, each error naming its key path and line.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{ConfigError, Source};

/// The name of a pool (a monitor's name is its pool's name): 1 to 64 ASCII
/// letters, digits, `_` or `-`, since it appears in API paths and metric
/// labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct PoolName(String);

impl PoolName {
    /// Validates a name.
    pub fn new(name: &str) -> Result<PoolName, String> {
        let ok = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(PoolName(name.to_owned()))
        } else {
            Err(format!(
                "bad pool name `{name}`: use 1 to 64 ASCII letters, digits, `_` or `-`"
            ))
        }
    }
}

impl fmt::Display for PoolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PoolName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PoolName, D::Error> {
        let s = String::deserialize(d)?;
        PoolName::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A duration written as a human string (`"250ms"`, `"10m"`), usable
/// inside [`Spanned`] so that a bad value can be pointed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        super::duration::serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
        super::duration::deserialize(d).map(HumanDuration)
    }
}

/// `[monitor.<name>]`: one nginx pool, watched through its access log.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// The access log to follow. Required.
    pub access_log: Spanned<PathBuf>,
    /// The log format: `"combined"`, `"main"` or an nginx `log_format`
    /// string. Exclusive with `format_from`; `"combined"` when neither is
    /// set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Spanned<String>>,
    /// An nginx configuration file to read the `log_format` named by
    /// `format_name` from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_from: Option<Spanned<PathBuf>>,
    /// The `log_format` name to take from `format_from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_name: Option<Spanned<String>>,
    /// Which part of a log line names the pool address. Required.
    pub address: Spanned<AddressKind>,
    /// The nginx configuration: its `server { listen PORT; proxy_bind
    /// ADDR; }` blocks map ports to addresses (`address = "server_port"`),
    /// and its `upstream` blocks can list the addresses (`upstream`).
    /// `include`s are not followed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nginx_conf: Option<Spanned<PathBuf>>,
    /// `"serve"` (new lines only, the default) or `"parse"` (from the start
    /// of the current file).
    #[serde(default)]
    pub mode: MonitorMode,
    /// How often the log is polled (`"250ms"` by default).
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Spanned<HumanDuration>,
    /// The pool's addresses. Exclusive with `upstream`. Without either, the
    /// addresses of the port map (`address = "server_port"`) or, for the
    /// other sources, every address the log names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Spanned<Vec<IpAddr>>>,
    /// The `upstream` block of `nginx_conf` whose servers are the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Spanned<String>>,
    /// The health policy: `[monitor.<name>.health]`.
    #[serde(default = "default_health")]
    pub health: Spanned<HealthConfig>,
}

/// `address` of a monitor: which log variable names the pool address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddressKind {
    /// `$upstream_addr`: every upstream attempt is an outcome of its
    /// address.
    UpstreamAddr,
    /// `$server_addr`: the address the request arrived on.
    ServerAddr,
    /// `$server_port`, mapped to the `proxy_bind` address of the `server`
    /// block listening on it (needs `nginx_conf`).
    ServerPort,
}

impl AddressKind {
    /// The log variable, without `$`.
    pub fn variable(self) -> &'static str {
        match self {
            AddressKind::UpstreamAddr => "upstream_addr",
            AddressKind::ServerAddr => "server_addr",
            AddressKind::ServerPort => "server_port",
        }
    }
}

/// `mode` of a monitor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MonitorMode {
    /// From the start of the current file (everything since the last
    /// rotation), then follow.
    Parse,
    /// New lines only.
    #[default]
    Serve,
}

/// `strategy` of a health policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyKind {
    /// Bench on the `consecutive_failures`-th failure in a row.
    #[default]
    Consecutive,
    /// Bench when the failure ratio over `window` reaches
    /// `max_failure_ratio` (after `min_requests`).
    Rate,
}

/// `[monitor.<name>.health]`: maps onto [`health::HealthOptions`] and
/// [`health::Classifier`]; defaults are theirs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `"consecutive"` (default) or `"rate"`.
    #[serde(default)]
    pub strategy: StrategyKind,
    /// Consecutive strategy: the failure that benches (default 3).
    #[serde(default = "d_consecutive")]
    pub consecutive_failures: Spanned<u32>,
    /// Rate strategy: failure ratio that benches, in (0, 1] (default 0.5).
    #[serde(default = "d_ratio")]
    pub max_failure_ratio: Spanned<f64>,
    /// Rate strategy: the sliding window (default `"1m"`).
    #[serde(default = "d_window")]
    pub window: Spanned<HumanDuration>,
    /// Rate strategy: fewest outcomes in the window before the ratio is
    /// trusted (default 10).
    #[serde(default = "d_min_requests")]
    pub min_requests: Spanned<u32>,
    /// First benching length (default `"10m"`).
    #[serde(default = "d_cooldown")]
    pub cooldown: Spanned<HumanDuration>,
    /// Factor of each repeated cooldown (default 2.0).
    #[serde(default = "d_backoff")]
    pub backoff: Spanned<f64>,
    /// Longest cooldown (default `"1h"`).
    #[serde(default = "d_max_cooldown")]
    pub max_cooldown: Spanned<HumanDuration>,
    /// Clean service after which cooldowns start over (default `"30m"`).
    #[serde(default = "d_recovery")]
    pub recovery: Spanned<HumanDuration>,
    /// Probe requests in flight on probation (default 1).
    #[serde(default = "d_probation")]
    pub probation_requests: Spanned<u32>,
    /// Most of the pool out of service at once, in percent (default 50).
    #[serde(default = "d_max_benched")]
    pub max_benched_percent: Spanned<u8>,
    /// Outcomes kept per address (default 1000).
    #[serde(default = "d_max_history")]
    pub max_history: Spanned<usize>,
    /// Statuses that count against an address (default `[403, 429]`). Add
    /// 502 and 504 when nginx's own connect errors through an address
    /// should bench it.
    #[serde(default = "d_blocked")]
    pub blocked_statuses: Spanned<Vec<u16>>,
    /// Statuses that say nothing about the address (default none).
    #[serde(default = "d_neutral")]
    pub neutral_statuses: Spanned<Vec<u16>>,
}

fn sp<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}

fn default_health() -> Spanned<HealthConfig> {
    sp(HealthConfig::default())
}

fn default_poll_interval() -> Spanned<HumanDuration> {
    sp(HumanDuration(Duration::from_millis(250)))
}

fn hd(o: impl Fn(&health::HealthOptions) -> Duration) -> Spanned<HumanDuration> {
    sp(HumanDuration(o(&health::HealthOptions::default())))
}

fn d_consecutive() -> Spanned<u32> {
    sp(3)
}
fn d_ratio() -> Spanned<f64> {
    sp(0.5)
}
fn d_window() -> Spanned<HumanDuration> {
    sp(HumanDuration(Duration::from_secs(60)))
}
fn d_min_requests() -> Spanned<u32> {
    sp(10)
}
fn d_cooldown() -> Spanned<HumanDuration> {
    hd(|o| o.cooldown)
}
fn d_backoff() -> Spanned<f64> {
    sp(health::HealthOptions::default().backoff)
}
fn d_max_cooldown() -> Spanned<HumanDuration> {
    hd(|o| o.max_cooldown)
}
fn d_recovery() -> Spanned<HumanDuration> {
    hd(|o| o.recovery)
}
fn d_probation() -> Spanned<u32> {
    sp(health::HealthOptions::default().probation_requests)
}
fn d_max_benched() -> Spanned<u8> {
    sp(health::HealthOptions::default().max_benched_percent)
}
fn d_max_history() -> Spanned<usize> {
    sp(health::HealthOptions::default().max_history)
}
fn d_blocked() -> Spanned<Vec<u16>> {
    sp(vec![403, 429])
}
fn d_neutral() -> Spanned<Vec<u16>> {
    sp(Vec::new())
}

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            strategy: StrategyKind::default(),
            consecutive_failures: d_consecutive(),
            max_failure_ratio: d_ratio(),
            window: d_window(),
            min_requests: d_min_requests(),
            cooldown: d_cooldown(),
            backoff: d_backoff(),
            max_cooldown: d_max_cooldown(),
            recovery: d_recovery(),
            probation_requests: d_probation(),
            max_benched_percent: d_max_benched(),
            max_history: d_max_history(),
            blocked_statuses: d_blocked(),
            neutral_statuses: d_neutral(),
        }
    }
}

impl HealthConfig {
    /// The span of a field by its key, for errors.
    pub(super) fn span_of(&self, field: &str) -> Option<std::ops::Range<usize>> {
        Some(match field {
            "consecutive_failures" => self.consecutive_failures.span(),
            "max_failure_ratio" => self.max_failure_ratio.span(),
            "window" => self.window.span(),
            "min_requests" => self.min_requests.span(),
            "cooldown" => self.cooldown.span(),
            "backoff" => self.backoff.span(),
            "max_cooldown" => self.max_cooldown.span(),
            "recovery" => self.recovery.span(),
            "probation_requests" => self.probation_requests.span(),
            "max_benched_percent" => self.max_benched_percent.span(),
            "max_history" => self.max_history.span(),
            "blocked_statuses" => self.blocked_statuses.span(),
            "neutral_statuses" => self.neutral_statuses.span(),
            _ => return None,
        })
    }

    /// The tracker options and classifier, or the invalid field's key and
    /// why.
    pub fn build(
        &self,
    ) -> Result<(health::HealthOptions, health::Classifier), (&'static str, String)> {
        let strategy = match self.strategy {
            StrategyKind::Consecutive => health::Strategy::Consecutive {
                consecutive_failures: *self.consecutive_failures.get_ref(),
            },
            StrategyKind::Rate => health::Strategy::Rate {
                max_failure_ratio: *self.max_failure_ratio.get_ref(),
                window: self.window.get_ref().0,
                min_requests: *self.min_requests.get_ref(),
            },
        };
        let options = health::HealthOptions {
            strategy,
            cooldown: self.cooldown.get_ref().0,
            backoff: *self.backoff.get_ref(),
            max_cooldown: self.max_cooldown.get_ref().0,
            recovery: self.recovery.get_ref().0,
            probation_requests: *self.probation_requests.get_ref(),
            max_benched_percent: *self.max_benched_percent.get_ref(),
            max_history: *self.max_history.get_ref(),
            ..health::HealthOptions::default()
        };
        let invalid = |e: health::InvalidOption| (e.field(), e.reason().to_owned());
        options.validate().map_err(invalid)?;
        let classifier = health::Classifier::default()
            .with_blocked_statuses(self.blocked_statuses.get_ref().iter().copied())
            .map_err(invalid)?
            .with_neutral_statuses(self.neutral_statuses.get_ref().iter().copied())
            .map_err(invalid)?;
        Ok((options, classifier))
    }
}

/// The addresses of a monitored pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolAddresses {
    /// A fixed list (`addresses`, an `upstream` block or the port map):
    /// outcomes of other addresses are ignored.
    Fixed(Vec<IpAddr>),
    /// Every address the log names joins the pool when first seen.
    Discover,
}

/// A monitor, resolved: what the daemon runs.
#[derive(Clone, Debug)]
pub struct MonitorSpec {
    /// The monitor's (and its pool's) name.
    pub name: String,
    /// The access log, relative paths resolved.
    pub access_log: PathBuf,
    /// The compiled log format.
    pub format: accesslog::LogFormat,
    /// How a line is attributed to a pool address.
    pub source: accesslog::AddressSource,
    /// Where the tailer starts.
    pub mode: accesslog::Mode,
    /// How often the log is polled.
    pub poll_interval: Duration,
    /// The pool's addresses.
    pub addresses: PoolAddresses,
    /// The health policy.
    pub options: health::HealthOptions,
    /// Outcome classification.
    pub classifier: health::Classifier,
}

/// Resolves one `[monitor.<name>]` section; `base` anchors relative paths.
pub(super) fn resolve(
    src: &Source<'_>,
    base: &Path,
    name: &PoolName,
    m: &MonitorConfig,
) -> Result<MonitorSpec, ConfigError> {
    let key = |k: &str| Some(format!("monitor.{name}.{k}"));
    let err =
        |span: std::ops::Range<usize>, k: &str, msg: String| src.error(Some(span), key(k), msg);

    let access_log = base.join(m.access_log.get_ref());
    if m.access_log.get_ref().as_os_str().is_empty() {
        return Err(err(
            m.access_log.span(),
            "access_log",
            "must not be empty".into(),
        ));
    }
    if access_log.is_dir() {
        return Err(err(
            m.access_log.span(),
            "access_log",
            format!("{} is a directory", access_log.display()),
        ));
    }

    // nginx configuration, read once when something needs it.
    let nginx = match &m.nginx_conf {
        Some(p) => {
            let path = base.join(p.get_ref());
            let conf = accesslog::NginxConfig::from_file(&path)
                .map_err(|e| err(p.span(), "nginx_conf", format!("{}: {e}", path.display())))?;
            Some((p, path, conf))
        }
        None => None,
    };

    // log format
    let format = match (&m.format, &m.format_from, &m.format_name) {
        (Some(f), Some(_), _) | (Some(f), _, Some(_)) => {
            return Err(err(
                f.span(),
                "format",
                "set either `format` or `format_from` + `format_name`, not both".into(),
            ));
        }
        (Some(f), None, None) => {
            let text = f.get_ref();
            match accesslog::LogFormat::builtin(text) {
                Some(lf) => lf,
                None if text.contains('$') => accesslog::LogFormat::new(text)
                    .map_err(|e| err(f.span(), "format", e.to_string()))?,
                None => {
                    return Err(err(
                        f.span(),
                        "format",
                        format!(
                            "`{text}` is neither a built-in format (`combined`, `main`) nor a \
                             log_format string (use `format_from` + `format_name` for a named \
                             format of nginx.conf)"
                        ),
                    ));
                }
            }
        }
        (None, Some(from), Some(fname)) => {
            let path = base.join(from.get_ref());
            let conf = accesslog::NginxConfig::from_file(&path).map_err(|e| {
                err(
                    from.span(),
                    "format_from",
                    format!("{}: {e}", path.display()),
                )
            })?;
            let wanted = fname.get_ref();
            match conf.log_format(wanted) {
                Some(decl) => accesslog::LogFormat::with_escape(&decl.format, decl.escape)
                    .map_err(|e| {
                        err(
                            fname.span(),
                            "format_name",
                            format!("{} line {}: {e}", path.display(), decl.line),
                        )
                    })?,
                None => match accesslog::LogFormat::builtin(wanted) {
                    Some(lf) => lf,
                    None => {
                        let known: Vec<&str> =
                            conf.log_formats.iter().map(|d| d.name.as_str()).collect();
                        return Err(err(
                            fname.span(),
                            "format_name",
                            format!(
                                "{} has no log_format `{wanted}` (found: {})",
                                path.display(),
                                if known.is_empty() {
                                    "none".into()
                                } else {
                                    known.join(", ")
                                }
                            ),
                        ));
                    }
                },
            }
        }
        (None, Some(from), None) => {
            return Err(err(
                from.span(),
                "format_from",
                "needs `format_name`".into(),
            ));
        }
        (None, None, Some(fname)) => {
            return Err(err(
                fname.span(),
                "format_name",
                "needs `format_from`".into(),
            ));
        }
        (None, None, None) => accesslog::LogFormat::combined(),
    };

    // address source
    let kind = *m.address.get_ref();
    if !format.has_variable(kind.variable()) {
        return Err(err(
            m.address.span(),
            "address",
            format!(
                "the log format has no ${}: add it to the nginx log_format (and to `format`)",
                kind.variable()
            ),
        ));
    }
    let source = match kind {
        AddressKind::UpstreamAddr => accesslog::AddressSource::UpstreamAddr,
        AddressKind::ServerAddr => accesslog::AddressSource::ServerAddr,
        AddressKind::ServerPort => {
            let Some((p, path, conf)) = &nginx else {
                return Err(err(
                    m.address.span(),
                    "address",
                    "`server_port` needs `nginx_conf` (its server blocks map ports to addresses)"
                        .into(),
                ));
            };
            let map = conf
                .port_map()
                .map_err(|e| err(p.span(), "nginx_conf", format!("{}: {e}", path.display())))?;
            if map.is_empty() {
                return Err(err(
                    p.span(),
                    "nginx_conf",
                    format!(
                        "{}: no `server` block with `listen PORT` and one `proxy_bind ADDRESS`",
                        path.display()
                    ),
                ));
            }
            accesslog::AddressSource::ServerPort(map)
        }
    };

    // addresses
    let addresses = match (&m.addresses, &m.upstream) {
        (Some(a), Some(_)) => {
            return Err(err(
                a.span(),
                "addresses",
                "set either `addresses` or `upstream`, not both".into(),
            ));
        }
        (Some(a), None) => {
            if a.get_ref().is_empty() {
                return Err(err(a.span(), "addresses", "must not be empty".into()));
            }
            PoolAddresses::Fixed(a.get_ref().clone())
        }
        (None, Some(up)) => {
            let Some((_, path, conf)) = &nginx else {
                return Err(err(up.span(), "upstream", "needs `nginx_conf`".into()));
            };
            let wanted = up.get_ref();
            let mut ips = Vec::new();
            let servers = super::nginx_upstream(
                conf,
                path,
                wanted,
                |_| true,
                "list the pool in `addresses` instead",
            )
            .map_err(|m| err(up.span(), "upstream", m))?;
            for (sa, _) in servers {
                if !ips.contains(&sa.ip()) {
                    ips.push(sa.ip());
                }
            }
            if ips.is_empty() {
                return Err(err(
                    up.span(),
                    "upstream",
                    format!("{}: upstream `{wanted}` has no server", path.display()),
                ));
            }
            PoolAddresses::Fixed(ips)
        }
        (None, None) => match &source {
            accesslog::AddressSource::ServerPort(map) => {
                let mut ips: Vec<IpAddr> = map.values().copied().collect();
                ips.sort();
                ips.dedup();
                PoolAddresses::Fixed(ips)
            }
            _ => PoolAddresses::Discover,
        },
    };

    let poll_interval = m.poll_interval.get_ref().0;
    if poll_interval < Duration::from_millis(10) || poll_interval > Duration::from_secs(3600) {
        return Err(err(
            m.poll_interval.span(),
            "poll_interval",
            "must be between 10ms and 1h".into(),
        ));
    }

    let h = m.health.get_ref();
    let (options, classifier) = h.build().map_err(|(field, reason)| {
        // A default value has no span: point at the table instead.
        let span = h
            .span_of(field)
            .filter(|s| !(s.start == 0 && s.end == 0))
            .unwrap_or_else(|| m.health.span());
        src.error(Some(span), key(&format!("health.{field}")), reason)
    })?;

    Ok(MonitorSpec {
        name: name.to_string(),
        access_log,
        format,
        source,
        mode: match m.mode {
            MonitorMode::Parse => accesslog::Mode::Parse,
            MonitorMode::Serve => accesslog::Mode::Serve,
        },
        poll_interval,
        addresses,
        options,
        classifier,
    })
}
