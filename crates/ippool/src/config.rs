//! The configuration file: its types, loading, validation and the
//! effective (defaults filled in, secrets left out) view.
//!
//! Every section is a struct with `deny_unknown_fields`, so a misspelt key
//! is an error, not a silently ignored line. Every error names the file, the
//! line and column, and the key path (`rules.clients.deny[1]`).
//!
//! Paths in the file (`state_dir`, `admin.token_file`, `store.tls_*`,
//! `rules.<name>.allow_files`, `rules.<name>.deny_files`,
//! `monitor.<name>.access_log`, `.nginx_conf`, `.format_from`) are relative
//! to the directory of the config file.
//!
//! Secrets never enter [`Config`]: the admin token is read at load time
//! into a [`Secret`] kept beside it in [`Loaded`], so printing or serving
//! the config cannot leak it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::rules::RuleSets;

mod egress;
mod ingress;
mod l4;
mod monitor;
mod registry;

pub use egress::{EgressConfig, EgressSpec, PoolConfig, PoolSpec, SourceSpec};
pub use ingress::{IngressConfig, IngressSpec};
pub use l4::{L4Config, L4Spec};
pub use monitor::{MonitorConfig, MonitorSpec, PoolAddresses, PoolName};
pub use registry::{RegistryConfig, RegistrySpec};

/// Where the admin API listens unless `admin.listen` says otherwise.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9095);

/// The shortest admin token accepted, in bytes.
pub const MIN_TOKEN_LEN: usize = 16;

/// The whole configuration file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory for state kept across restarts (`"state"` by default,
    /// relative to the config file): `state.redb` holds the rules added
    /// through the API. Created by `serve` if missing; if it exists it must
    /// be a directory.
    #[serde(default = "default_state_dir")]
    pub state_dir: Spanned<PathBuf>,
    /// How long `serve` waits for in-flight requests after SIGINT/SIGTERM
    /// before it stops anyway (`"10s"` by default).
    #[serde(default = "default_shutdown_timeout", with = "duration")]
    pub shutdown_timeout: Duration,
    /// Where runtime state lives: `[store]` (the embedded file under
    /// `state_dir` by default, or a Redis shared by several instances).
    #[serde(default)]
    pub store: StoreConfig,
    /// The admin API: `[admin]`.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Named rule policies: `[rules.<name>]`.
    #[serde(default)]
    pub rules: BTreeMap<SetName, RuleSetConfig>,
    /// nginx pools watched through their access logs: `[monitor.<name>]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub monitor: BTreeMap<PoolName, MonitorConfig>,
    /// Egress address pools: `[pools.<name>]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pools: BTreeMap<PoolName, PoolConfig>,
    /// Forward-proxy listeners over the pools: `[egress.<name>]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub egress: BTreeMap<PoolName, EgressConfig>,
    /// TCP balancers: `[l4.<name>]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub l4: BTreeMap<PoolName, L4Config>,
    /// Reverse proxies: `[ingress.<name>]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ingress: BTreeMap<PoolName, IngressConfig>,
    /// The backend self-registration channel: `[registry]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryConfig>,
}

/// `[store]`: where runtime rules, bans, holds, benches and log offsets
/// are kept.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `embedded` (default: `state.redb` under `state_dir`) or `redis`
    /// (one Redis shared by every instance of a fleet: a rule added or a
    /// ban taken on one instance applies on all).
    #[serde(default = "default_store_kind")]
    pub backend: Spanned<StoreKind>,
    /// With `backend = "redis"`: `redis://[[user]:password@]host[:port][/db]`,
    /// or `rediss://…` for TLS (see `tls_ca`, `tls_cert`, `tls_key`).
    /// Printed (`/config`, `ippool check`) without its password. Exclusive
    /// with `url_env`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "redacted_url"
    )]
    pub url: Option<Spanned<String>>,
    /// With `backend = "redis"`: the environment variable holding the URL
    /// (keeps a password out of the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_env: Option<Spanned<String>>,
    /// With `backend = "redis"`: the prefix of every key (`ippool` by
    /// default); instances that share state use the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<Spanned<String>>,
    /// With a `rediss://` URL: a PEM file of the CA certificates that sign
    /// the server's certificate (default: the system's CA bundle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<Spanned<PathBuf>>,
    /// With a `rediss://` URL: a PEM client certificate (chain) shown to
    /// the server, which Redis asks for unless `tls-auth-clients no`.
    /// With `tls_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<Spanned<PathBuf>>,
    /// The PEM private key of `tls_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<Spanned<PathBuf>>,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("backend", self.backend.get_ref())
            .field(
                "url",
                &self
                    .url
                    .as_ref()
                    .map(|u| store::Redis::redacted(u.get_ref())),
            )
            .field("url_env", &self.url_env.as_ref().map(Spanned::get_ref))
            .field("prefix", &self.prefix.as_ref().map(Spanned::get_ref))
            .field("tls_ca", &self.tls_ca.as_ref().map(Spanned::get_ref))
            .field("tls_cert", &self.tls_cert.as_ref().map(Spanned::get_ref))
            .field("tls_key", &self.tls_key.as_ref().map(Spanned::get_ref))
            .finish()
    }
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            backend: default_store_kind(),
            url: None,
            url_env: None,
            prefix: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

fn default_store_kind() -> Spanned<StoreKind> {
    Spanned::new(0..0, StoreKind::Embedded)
}

/// `store.backend`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A redb file under `state_dir`.
    #[default]
    Embedded,
    /// A Redis server.
    Redis,
}

/// The store `serve` opens, from `[store]`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// `state.redb` under `state_dir`.
    Embedded,
    /// A Redis server.
    Redis {
        /// The URL (may hold a password: never printed).
        url: String,
        /// The key prefix.
        prefix: String,
        /// TLS settings of a `rediss://` URL (paths resolved).
        tls: store::RedisTls,
    },
}

impl std::fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::Embedded => f.write_str("Embedded"),
            StoreSpec::Redis { url, prefix, tls } => f
                .debug_struct("Redis")
                .field("url", &store::Redis::redacted(url))
                .field("prefix", prefix)
                .field("tls", tls)
                .finish(),
        }
    }
}

fn redacted_url<S: serde::Serializer>(
    url: &Option<Spanned<String>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_some(&store::Redis::redacted(u.get_ref())),
        None => s.serialize_none(),
    }
}

/// `[admin]`: the admin API listener and its token.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP listener (`127.0.0.1:9095` by default).
    /// A non-loopback address needs a token.
    #[serde(default = "default_admin_listen")]
    pub listen: Spanned<SocketAddr>,
    /// The `[rules.<name>]` set deciding who may connect (checked at
    /// accept). Default: everyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Spanned<String>>,
    /// A file whose content (trailing white space removed) is the admin
    /// token. Exclusive with `token_env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<Spanned<PathBuf>>,
    /// The name of an environment variable holding the admin token.
    /// Exclusive with `token_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<Spanned<String>>,
}

impl Default for AdminConfig {
    fn default() -> AdminConfig {
        AdminConfig {
            listen: default_admin_listen(),
            rules: None,
            token_file: None,
            token_env: None,
        }
    }
}

/// `[rules.<name>]`: one named policy (an allow list, a deny list and a
/// default; allow wins over deny).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSetConfig {
    /// The verdict when no rule matches: `"allow"` or `"deny"`. Required.
    pub default: DefaultVerdict,
    /// Rules that let an address through whatever the deny list says.
    #[serde(default)]
    pub allow: Vec<iprules::Rule>,
    /// Rules that refuse an address unless an allow rule matches.
    #[serde(default)]
    pub deny: Vec<iprules::Rule>,
    /// Files of allow rules, one per line, `#` comments.
    #[serde(default)]
    pub allow_files: Vec<Spanned<PathBuf>>,
    /// Files of deny rules, one per line, `#` comments.
    #[serde(default)]
    pub deny_files: Vec<Spanned<PathBuf>>,
    /// Also compile what the set denies into a kernel socket filter on every
    /// listener that uses it, so SYNs of denied peers are dropped before a
    /// connection exists (up to 512 ranges; beyond, accept-time checks
    /// alone apply). Default false.
    #[serde(default)]
    pub kernel_filter: bool,
    /// Automatic bans of misbehaving clients: `[rules.<name>.autoblock]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoblock: Option<Spanned<AutoBlockConfig>>,
    /// Connections per second per client, per listener:
    /// `[rules.<name>.rate_limit]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<Spanned<RateLimitConfig>>,
}

/// `[rules.<name>.autoblock]`: a client (an IPv4 address, or an IPv6
/// network of `ipv6_prefix`) that misbehaves `threshold` times within
/// `window` (wrong proxy credentials, malformed requests, connections over
/// the rate limit) is denied for `ban`, times `ban_increment` for each
/// repeat, up to `max_ban`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoBlockConfig {
    /// Offenses that ban (default 5).
    #[serde(default = "d_threshold")]
    pub threshold: u32,
    /// The sliding window they are counted in (default `"10m"`).
    #[serde(default = "d_ten_minutes", with = "duration")]
    pub window: Duration,
    /// The first ban's length (default `"10m"`).
    #[serde(default = "d_ten_minutes", with = "duration")]
    pub ban: Duration,
    /// Factor of each repeat ban (default 2.0, at least 1).
    #[serde(default = "d_increment")]
    pub ban_increment: f64,
    /// Longest ban (default `"1d"`).
    #[serde(default = "d_day", with = "duration")]
    pub max_ban: Duration,
    /// IPv6 clients are counted and banned per network of this length
    /// (default 64: one host owns a whole /64).
    #[serde(default = "d_v6_prefix")]
    pub ipv6_prefix: u8,
    /// Addresses never banned.
    #[serde(default)]
    pub ignore: Vec<iprules::Rule>,
}

/// `[rules.<name>.rate_limit]`: a token bucket per client key and
/// listener; a connection over it is reset at accept and counts as an
/// offense for `autoblock`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained connections per second (default 10).
    #[serde(default = "d_rate")]
    pub rate: f64,
    /// Connections allowed at once after a quiet spell (default 20).
    #[serde(default = "d_burst")]
    pub burst: u32,
    /// IPv6 clients share one bucket per network of this length (default 64).
    #[serde(default = "d_v6_prefix")]
    pub ipv6_prefix: u8,
}

fn d_threshold() -> u32 {
    5
}
fn d_ten_minutes() -> Duration {
    Duration::from_secs(600)
}
fn d_increment() -> f64 {
    2.0
}
fn d_day() -> Duration {
    Duration::from_secs(86_400)
}
fn d_v6_prefix() -> u8 {
    64
}
fn d_rate() -> f64 {
    10.0
}
fn d_burst() -> u32 {
    20
}

/// The `default` of a rule set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultVerdict {
    /// Addresses no rule matches are allowed.
    Allow,
    /// Addresses no rule matches are denied.
    Deny,
}

impl From<DefaultVerdict> for iprules::Verdict {
    fn from(v: DefaultVerdict) -> iprules::Verdict {
        match v {
            DefaultVerdict::Allow => iprules::Verdict::Allow,
            DefaultVerdict::Deny => iprules::Verdict::Deny,
        }
    }
}

/// The name of a rule set: 1 to 64 ASCII letters, digits, `_` or `-`,
/// since it appears in API paths and metric labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct SetName(String);

impl SetName {
    /// Validates a name.
    pub fn new(name: &str) -> Result<SetName, String> {
        let ok = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(SetName(name.to_owned()))
        } else {
            Err(format!(
                "bad rule set name `{name}`: use 1 to 64 ASCII letters, digits, `_` or `-`"
            ))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SetName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SetName, D::Error> {
        let s = String::deserialize(d)?;
        SetName::new(&s).map_err(serde::de::Error::custom)
    }
}

fn default_state_dir() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from("state"))
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_admin_listen() -> Spanned<SocketAddr> {
    Spanned::new(0..0, DEFAULT_ADMIN_LISTEN)
}

/// Serde helper for durations written as human strings (`"10s"`,
/// `"1.5s"`, `"10m"`, `"1h 30m"`): `#[serde(with = "duration")]`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes a duration as a human string such as `"1m 30s"`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    /// Reads a human duration string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    /// Parses a human duration string, with an error that shows examples.
    pub fn parse(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text.trim()).map_err(|e| {
            format!(
                "bad duration `{text}`: {e} (write e.g. \"500ms\", \"1.5s\", \"10m\", \"1h 30m\")"
            )
        })
    }

    /// The same for an optional duration: `#[serde(default, with =
    /// "duration::option")]`.
    #[allow(dead_code, reason = "for the config sections to come")]
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Writes `Some` as a human string, `None` as nothing.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        /// Reads an optional human duration string.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|t| super::parse(&t).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

/// A secret value (the admin token). Its `Debug` and `Display` print
/// `<redacted>`; only [`Secret::matches`] looks at it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Compares with `candidate` in time independent of where they differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let ours = self.0.as_bytes();
        if ours.len() != candidate.len() {
            return false;
        }
        ours.iter()
            .zip(candidate)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A config file loaded and validated, with what it refers to read in.
#[derive(Debug)]
pub struct Loaded {
    /// The config file's path as given.
    pub path: PathBuf,
    /// `state_dir`, resolved against the config file's directory.
    pub state_dir: PathBuf,
    /// The store of `[store]`.
    pub store: StoreSpec,
    /// The configuration, defaults filled in. Holds no secret.
    pub config: Config,
    /// The admin token, when `admin.token_file` or `admin.token_env` is set.
    pub admin_token: Option<Secret>,
    /// Where the token came from, for humans (`env IPPOOL_ADMIN_TOKEN`).
    pub admin_token_source: Option<String>,
    /// The rule policies built from `[rules.*]`.
    pub rules: RuleSets,
    /// The monitors of `[monitor.*]`, resolved.
    pub monitors: Vec<MonitorSpec>,
    /// The pools of `[pools.*]`, resolved.
    pub pools: Vec<PoolSpec>,
    /// The listeners of `[egress.*]`, resolved (users included: a secret,
    /// never printed).
    pub egress: Vec<EgressSpec>,
    /// The balancers of `[l4.*]`, resolved.
    pub l4: Vec<L4Spec>,
    /// `[registry]`, resolved.
    pub registry: Option<RegistrySpec>,
    /// The reverse proxies of `[ingress.*]`, resolved.
    pub ingress: Vec<IngressSpec>,
}

impl Loaded {
    /// The effective configuration as TOML: a comment header (source,
    /// token presence, rule counts), then the config with defaults filled
    /// in. The token itself is never printed.
    pub fn effective_toml(&self) -> Result<String, toml::ser::Error> {
        let mut out = format!(
            "# effective configuration of {} (defaults filled in)\n",
            self.path.display()
        );
        match &self.admin_token_source {
            Some(src) => out.push_str(&format!("# admin token: set, from {src} (redacted)\n")),
            None => out.push_str("# admin token: none (reads from loopback only, no mutations)\n"),
        }
        for s in self.rules.summaries() {
            out.push_str(&format!(
                "# rules.{}: {} allow and {} deny rules loaded, default {}\n",
                s.name, s.allow, s.deny, s.default
            ));
        }
        for m in &self.monitors {
            let addresses = match &m.addresses {
                PoolAddresses::Fixed(a) => format!("{} addresses", a.len()),
                PoolAddresses::Discover => "addresses discovered from the log".into(),
            };
            out.push_str(&format!(
                "# monitor.{}: {}, {addresses}\n",
                m.name,
                m.access_log.display()
            ));
        }
        for p in &self.pools {
            out.push_str(&format!(
                "# pools.{}: {} assigner, {} strategy, health on\n",
                p.name,
                match p.assigner {
                    addrpool::Assigner::Static => "static",
                    addrpool::Assigner::Freebind(_) => "freebind",
                    addrpool::Assigner::Netlink(_) => "netlink",
                },
                match p.options.strategy {
                    addrpool::Strategy::Fresh => "fresh",
                    addrpool::Strategy::RoundRobin => "round_robin",
                    addrpool::Strategy::Random => "random",
                    addrpool::Strategy::LeastUsed => "least_used",
                    addrpool::Strategy::Sticky => "sticky",
                }
            ));
        }
        for e in &self.egress {
            let users = match &e.users_file {
                Some(f) => format!(
                    "{} users from {} (passwords redacted)",
                    e.users.len(),
                    f.display()
                ),
                None => "no authentication".into(),
            };
            out.push_str(&format!(
                "# egress.{}: {} from pool {}, {users}, {} allow and {} deny destination rules\n",
                e.name,
                e.listen,
                e.pool,
                e.policy.allow.len(),
                e.policy.deny.len()
            ));
        }
        for b in &self.l4 {
            out.push_str(&format!(
                "# l4.{}: {} to {} upstreams from {}, {}\n",
                b.name,
                b.listen,
                b.options.upstreams.len(),
                b.from,
                b.options.strategy
            ));
        }
        out.push('\n');
        out.push_str(&toml::to_string_pretty(&self.config)?);
        Ok(out)
    }
}

/// A config error, with where it is and which key it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line and column in the config file, when known.
    pub at: Option<(usize, usize)>,
    /// The key path, such as `rules.clients.deny[1]`, when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
    /// The offending source line with a caret under the span, when known.
    pub snippet: Option<String>,
}

impl ConfigError {
    fn render(&self) -> String {
        let mut s = self.file.display().to_string();
        if let Some((line, col)) = self.at {
            s.push_str(&format!(":{line}:{col}"));
        }
        s.push_str(": ");
        if let Some(key) = &self.key {
            s.push_str(key);
            s.push_str(": ");
        }
        s.push_str(&self.message);
        if let Some(snippet) = &self.snippet {
            s.push('\n');
            s.push_str(snippet);
        }
        s
    }
}

/// Checks `[store]`; reads `store.url_env` unless offline.
fn store_spec(
    c: &StoreConfig,
    scope: Scope,
    src: &Source<'_>,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<StoreSpec, ConfigError> {
    // No source line under these errors: `store.url` may hold a password.
    let at = |span: Range<usize>, key: &str, m: String| ConfigError {
        snippet: None,
        ..src.error(Some(span), Some(key.into()), m)
    };
    if *c.backend.get_ref() == StoreKind::Embedded {
        for (set, key) in [
            (c.url.as_ref().map(Spanned::span), "store.url"),
            (c.url_env.as_ref().map(Spanned::span), "store.url_env"),
            (c.prefix.as_ref().map(Spanned::span), "store.prefix"),
            (c.tls_ca.as_ref().map(Spanned::span), "store.tls_ca"),
            (c.tls_cert.as_ref().map(Spanned::span), "store.tls_cert"),
            (c.tls_key.as_ref().map(Spanned::span), "store.tls_key"),
        ] {
            if let Some(span) = set {
                return Err(at(
                    span,
                    key,
                    "only used with store.backend = \"redis\"".into(),
                ));
            }
        }
        return Ok(StoreSpec::Embedded);
    }
    let prefix = match &c.prefix {
        None => "ippool".to_owned(),
        Some(p) => {
            let v = p.get_ref();
            if v.is_empty()
                || !v
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.:".contains(ch))
            {
                return Err(at(
                    p.span(),
                    "store.prefix",
                    format!("{v:?}: letters, digits and - _ . : only, not empty"),
                ));
            }
            v.clone()
        }
    };
    let url = match (&c.url, &c.url_env) {
        (Some(_), Some(env)) => {
            return Err(at(
                env.span(),
                "store.url_env",
                "set one of store.url and store.url_env, not both".into(),
            ));
        }
        (None, None) => {
            return Err(at(
                c.backend.span(),
                "store.backend",
                "backend = \"redis\" needs store.url or store.url_env".into(),
            ));
        }
        (Some(u), None) => {
            store::Redis::check_url(u.get_ref()).map_err(|m| at(u.span(), "store.url", m))?;
            u.get_ref().clone()
        }
        (None, Some(env)) => {
            let name = env.get_ref();
            if scope == Scope::Offline {
                String::new()
            } else {
                let url = std::env::var(name).map_err(|e| {
                    at(
                        env.span(),
                        "store.url_env",
                        format!("environment variable {name}: {e}"),
                    )
                })?;
                store::Redis::check_url(&url).map_err(|m| {
                    at(
                        env.span(),
                        "store.url_env",
                        format!("environment variable {name}: {m}"),
                    )
                })?;
                url
            }
        }
    };
    let url_key = if c.url.is_some() {
        "store.url"
    } else {
        "store.url_env"
    };
    let tls = store_tls(c, scope, (&url, url_key), &at, resolve)?;
    Ok(StoreSpec::Redis { url, prefix, tls })
}

/// `store.tls_*`: files that exist (unless offline: `rules check` may run
/// where the keys are not), a key with its certificate, and a `rediss://`
/// URL (when the URL is known here; `url` is the URL and the key it came
/// from).
fn store_tls(
    c: &StoreConfig,
    scope: Scope,
    (url, url_key): (&str, &str),
    at: &dyn Fn(Range<usize>, &str, String) -> ConfigError,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<store::RedisTls, ConfigError> {
    let file = |v: &Option<Spanned<PathBuf>>, key: &str| -> Result<Option<PathBuf>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        let path = resolve(v.get_ref());
        if scope == Scope::Full && !path.is_file() {
            return Err(at(
                v.span(),
                key,
                format!("{}: no such file", path.display()),
            ));
        }
        if !url.is_empty() && !url.starts_with("rediss://") {
            return Err(at(
                v.span(),
                key,
                format!("TLS settings need a rediss:// URL ({url_key} gives redis://)"),
            ));
        }
        Ok(Some(path))
    };
    match (&c.tls_cert, &c.tls_key) {
        (Some(v), None) => {
            return Err(at(v.span(), "store.tls_cert", "needs store.tls_key".into()));
        }
        (None, Some(v)) => {
            return Err(at(v.span(), "store.tls_key", "needs store.tls_cert".into()));
        }
        _ => {}
    }
    let mut tls = store::RedisTls::default();
    tls.ca_file = file(&c.tls_ca, "store.tls_ca")?;
    let cert = file(&c.tls_cert, "store.tls_cert")?;
    tls.client_cert = cert.zip(file(&c.tls_key, "store.tls_key")?);
    Ok(tls)
}

/// Turns spans into line/column and snippets for one source text.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn error(
        &self,
        span: Option<Range<usize>>,
        key: Option<String>,
        message: String,
    ) -> ConfigError {
        // Defaults carry the empty span 0..0: no location for them.
        let span = span.filter(|s| !(s.start == 0 && s.end == 0));
        let (at, snippet) = match span {
            Some(span) if span.start <= self.text.len() => {
                let before = &self.text[..span.start];
                let line = before.matches('\n').count() + 1;
                let line_start = before.rfind('\n').map_or(0, |i| i + 1);
                let col = self.text[line_start..span.start].chars().count() + 1;
                let line_end = self.text[span.start..]
                    .find('\n')
                    .map_or(self.text.len(), |i| span.start + i);
                let src_line = &self.text[line_start..line_end];
                let width = self.text[span.start..span.end.min(line_end).max(span.start)]
                    .chars()
                    .count()
                    .max(1);
                let gutter = " ".repeat(line.to_string().len());
                let snippet = format!(
                    "{gutter} |\n{line} | {src_line}\n{gutter} | {}{}",
                    " ".repeat(col - 1),
                    "^".repeat(width)
                );
                (Some((line, col)), Some(snippet))
            }
            _ => (None, None),
        };
        ConfigError {
            file: self.file.to_owned(),
            at,
            key,
            message,
            snippet,
        }
    }
}

/// Renders a serde path as `a.b[0].c`, leaving out toml's `Spanned`
/// internals.
fn key_path(path: &serde_path_to_error::Path) -> Option<String> {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } if key.starts_with("$__serde_spanned") => {}
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if bare {
                    out.push_str(key);
                } else {
                    out.push_str(&format!("{key:?}"));
                }
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// How much of the config [`load`] resolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything `serve` needs, the admin token included (`serve`,
    /// `check`).
    Full,
    /// What offline tools need: the admin token is neither read nor
    /// required (`rules check`).
    Offline,
}

/// Loads, validates and resolves the config file at `path`.
pub fn load(path: &Path, scope: Scope) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        at: None,
        key: None,
        message: format!("cannot read the config file: {e}"),
        snippet: None,
    })?;
    load_str(path, &text, scope)
}

/// [`load`] from text already read; `path` names the file in errors and
/// anchors relative paths.
pub fn load_str(path: &Path, text: &str, scope: Scope) -> Result<Loaded, ConfigError> {
    let src = Source { file: path, text };
    let de = toml::Deserializer::parse(text)
        .map_err(|e| src.error(e.span(), None, e.message().to_owned()))?;
    let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = key_path(e.path());
        let inner = e.into_inner();
        src.error(inner.span(), key, inner.message().to_owned())
    })?;
    let base = path.parent().unwrap_or(Path::new(""));
    let resolve = |p: &Path| -> PathBuf { base.join(p) };

    // state_dir
    let state_dir = config.state_dir.get_ref();
    if state_dir.as_os_str().is_empty() {
        return Err(src.error(
            Some(config.state_dir.span()),
            Some("state_dir".into()),
            "must not be empty".into(),
        ));
    }
    let state_path = resolve(state_dir);
    if state_path.exists() && !state_path.is_dir() {
        return Err(src.error(
            Some(config.state_dir.span()),
            Some("state_dir".into()),
            format!("{} exists and is not a directory", state_path.display()),
        ));
    }

    let store = store_spec(&config.store, scope, &src, &resolve)?;

    // admin token
    let admin = &config.admin;
    let tokens = match scope {
        Scope::Full => (&admin.token_file, &admin.token_env),
        Scope::Offline => (&None, &None),
    };
    let (admin_token, admin_token_source) = match tokens {
        (Some(_), Some(env)) => {
            return Err(src.error(
                Some(env.span()),
                Some("admin.token_env".into()),
                "set one of admin.token_file and admin.token_env, not both".into(),
            ));
        }
        (Some(file), None) => {
            let p = resolve(file.get_ref());
            let err = |m: String| src.error(Some(file.span()), Some("admin.token_file".into()), m);
            let raw = std::fs::read_to_string(&p)
                .map_err(|e| err(format!("{}: cannot read: {e}", p.display())))?;
            let token =
                check_token(raw.trim_end()).map_err(|m| err(format!("{}: {m}", p.display())))?;
            (Some(token), Some(format!("file {}", p.display())))
        }
        (None, Some(env)) => {
            let name = env.get_ref();
            let err = |m: String| src.error(Some(env.span()), Some("admin.token_env".into()), m);
            let raw = match std::env::var(name) {
                Ok(v) => v,
                Err(std::env::VarError::NotPresent) => {
                    return Err(err(format!("environment variable {name} is not set")));
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(err(format!("environment variable {name} is not UTF-8")));
                }
            };
            let token = check_token(raw.trim_end())
                .map_err(|m| err(format!("environment variable {name}: {m}")))?;
            (Some(token), Some(format!("env {name}")))
        }
        (None, None) => (None, None),
    };
    let listen = *admin.listen.get_ref();
    if scope == Scope::Full && !is_loopback(listen.ip()) && admin_token.is_none() {
        return Err(src.error(
            Some(admin.listen.span()),
            Some("admin.listen".into()),
            format!(
                "{listen} is not a loopback address and no admin token is configured: \
                 set admin.token_file or admin.token_env, or listen on 127.0.0.1"
            ),
        ));
    }

    // rules
    let mut rules = RuleSets::default();
    for (name, set) in &config.rules {
        let mut policy = iprules::Policy::new(set.default.into());
        policy.allow.extend(set.allow.iter().copied());
        policy.deny.extend(set.deny.iter().copied());
        for (list, files) in [
            ("allow_files", &set.allow_files),
            ("deny_files", &set.deny_files),
        ] {
            for (i, file) in files.iter().enumerate() {
                let key = Some(format!("rules.{name}.{list}[{i}]"));
                let p = resolve(file.get_ref());
                let body = std::fs::read_to_string(&p).map_err(|e| {
                    src.error(
                        Some(file.span()),
                        key.clone(),
                        format!("{}: cannot read: {e}", p.display()),
                    )
                })?;
                let parsed = iprules::parse_rules(&body).map_err(|e| {
                    src.error(
                        Some(file.span()),
                        key.clone(),
                        format!("{}: {e}", p.display()),
                    )
                })?;
                if list == "allow_files" {
                    policy.allow.extend(parsed);
                } else {
                    policy.deny.extend(parsed);
                }
            }
        }
        let guard = guard_options(&src, name, set)?;
        rules.insert_with(name.as_str(), policy, guard);
    }
    // Listeners name their rule set.
    let check_set = |r: &Option<Spanned<String>>, key: String| -> Result<(), ConfigError> {
        if let Some(r) = r
            && rules.get(r.get_ref()).is_none()
        {
            let known: Vec<&str> = rules.names().collect();
            return Err(src.error(
                Some(r.span()),
                Some(key),
                format!(
                    "no rule set `{}` (sets: {})",
                    r.get_ref(),
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        Ok(())
    };
    check_set(&config.admin.rules, "admin.rules".into())?;
    for (name, e) in &config.egress {
        check_set(&e.rules, format!("egress.{name}.rules"))?;
    }
    for (name, c) in &config.l4 {
        check_set(&c.rules, format!("l4.{name}.rules"))?;
    }

    // monitors
    let mut monitors = Vec::with_capacity(config.monitor.len());
    for (name, m) in &config.monitor {
        monitors.push(monitor::resolve(&src, base, name, m)?);
    }

    // egress pools and listeners; a pool and a monitor share the
    // namespace of /probe and the metrics, so their names must differ.
    let mut pools = Vec::with_capacity(config.pools.len());
    for (name, p) in &config.pools {
        if config.monitor.contains_key(name) {
            return Err(src.error(
                None,
                Some(format!("pools.{name}")),
                format!("a [monitor.{name}] has the same name; pool names must be unique"),
            ));
        }
        pools.push(egress::resolve_pool(&src, base, name, p)?);
    }
    let mut listeners = Vec::with_capacity(config.egress.len());
    for (name, e) in &config.egress {
        let spec = egress::resolve_egress(&src, base, name, e, &config.pools)?;
        // Port 0 (any free port) never clashes.
        let clash = (spec.listen.port() != 0 && spec.listen == listen)
            .then_some("admin.listen".to_owned())
            .or_else(|| {
                listeners
                    .iter()
                    .find(|o: &&EgressSpec| spec.listen.port() != 0 && o.listen == spec.listen)
                    .map(|o| format!("egress.{}.listen", o.name))
            });
        if let Some(other) = clash {
            return Err(src.error(
                Some(e.listen.span()),
                Some(format!("egress.{name}.listen")),
                format!("{} is already used by {other}", spec.listen),
            ));
        }
        listeners.push(spec);
    }
    let mut balancers: Vec<L4Spec> = Vec::with_capacity(config.l4.len());
    for (name, c) in &config.l4 {
        if config.monitor.contains_key(name) || config.pools.contains_key(name) {
            return Err(src.error(
                None,
                Some(format!("l4.{name}")),
                format!(
                    "a [monitor.{name}] or [pools.{name}] has the same name; the names of \
                     pools, monitors and balancers must be unique (they share /probe)"
                ),
            ));
        }
        let spec = l4::resolve(&src, base, name, c)?;
        let port = spec.listen.port();
        let clash = if port != 0 && spec.listen == listen {
            Some("admin.listen".to_owned())
        } else {
            listeners
                .iter()
                .filter(|o| port != 0 && o.listen == spec.listen)
                .map(|o| format!("egress.{}.listen", o.name))
                .chain(
                    balancers
                        .iter()
                        .filter(|o| port != 0 && o.listen == spec.listen)
                        .map(|o| format!("l4.{}.listen", o.name)),
                )
                .next()
        };
        if let Some(other) = clash {
            return Err(src.error(
                Some(c.listen.span()),
                Some(format!("l4.{name}.listen")),
                format!("{} is already used by {other}", spec.listen),
            ));
        }
        balancers.push(spec);
    }

    let mut proxies = Vec::with_capacity(config.ingress.len());
    for (name, c) in &config.ingress {
        check_set(&c.rules, format!("ingress.{name}.rules"))?;
        proxies.push(ingress::resolve(&src, base, name, c)?);
    }
    let registry = match (&config.registry, scope) {
        (Some(r), Scope::Full) => {
            check_set(&r.rules, "registry.rules".into())?;
            let spec = registry::resolve(&src, base, r)?;
            if let Some(i) = &spec.ingress
                && !config.ingress.keys().any(|k| k.to_string() == *i)
            {
                return Err(src.error(
                    None,
                    Some("registry.ingress".into()),
                    format!("no [ingress.{i}] to put registered backends in"),
                ));
            }
            if spec.ingress.is_none() && config.ingress.len() > 1 {
                return Err(src.error(
                    None,
                    Some("registry.ingress".into()),
                    "several [ingress.*] sections: name the one registered backends join".into(),
                ));
            }
            Some(spec)
        }
        _ => None,
    };

    Ok(Loaded {
        path: path.to_owned(),
        state_dir: state_path,
        store,
        config,
        admin_token,
        admin_token_source,
        rules,
        monitors,
        pools,
        egress: listeners,
        l4: balancers,
        registry,
        ingress: proxies,
    })
}

/// Builds the guard options of `[rules.<name>]` (auto-blocking, rate
/// limit, kernel filter), each error naming its key.
fn guard_options(
    src: &Source<'_>,
    name: &SetName,
    set: &RuleSetConfig,
) -> Result<crate::rules::GuardOptions, ConfigError> {
    let mut out = crate::rules::GuardOptions {
        kernel_filter: set.kernel_filter,
        ..Default::default()
    };
    if let Some(ab) = &set.autoblock {
        let a = ab.get_ref();
        let err = |k: &str, m: String| {
            src.error(
                Some(ab.span()),
                Some(format!("rules.{name}.autoblock.{k}")),
                m,
            )
        };
        if a.threshold == 0 {
            return Err(err("threshold", "must be at least 1".into()));
        }
        for (k, d) in [("window", a.window), ("ban", a.ban), ("max_ban", a.max_ban)] {
            if d.is_zero() {
                return Err(err(k, "must be more than 0s".into()));
            }
        }
        if a.max_ban < a.ban {
            return Err(err("max_ban", "is shorter than ban".into()));
        }
        if !(a.ban_increment.is_finite() && a.ban_increment >= 1.0) {
            return Err(err(
                "ban_increment",
                format!("{} must be at least 1", a.ban_increment),
            ));
        }
        if !(1..=128).contains(&a.ipv6_prefix) {
            return Err(err(
                "ipv6_prefix",
                format!("{} is not 1 to 128", a.ipv6_prefix),
            ));
        }
        let mut ignore = iprules::RuleSet::new();
        ignore.extend(a.ignore.iter().copied());
        out.autoblock = Some(gateway::guard::AutoBlockOptions {
            threshold: a.threshold,
            window: a.window,
            ban: a.ban,
            ban_increment: a.ban_increment,
            max_ban: a.max_ban,
            ipv6_prefix: a.ipv6_prefix,
            ignore,
            ..Default::default()
        });
    }
    if let Some(rl) = &set.rate_limit {
        let r = rl.get_ref();
        let err = |k: &str, m: String| {
            src.error(
                Some(rl.span()),
                Some(format!("rules.{name}.rate_limit.{k}")),
                m,
            )
        };
        if !(r.rate.is_finite() && r.rate > 0.0) {
            return Err(err("rate", format!("{} must be more than 0", r.rate)));
        }
        if r.burst == 0 {
            return Err(err("burst", "must be at least 1".into()));
        }
        if !(1..=128).contains(&r.ipv6_prefix) {
            return Err(err(
                "ipv6_prefix",
                format!("{} is not 1 to 128", r.ipv6_prefix),
            ));
        }
        out.rate_limit = Some(gateway::guard::RateLimitOptions {
            rate: r.rate,
            burst: r.burst,
            ipv6_prefix: r.ipv6_prefix,
            ..Default::default()
        });
    }
    Ok(out)
}

/// The servers of the `upstream` block `name` of the nginx config `conf`
/// (read from `path`) that `keep` selects, as (address, weight); the
/// message says which block or server line is wrong, and `instead` what
/// to write in the config instead.
fn nginx_upstream(
    conf: &accesslog::NginxConfig,
    path: &Path,
    name: &str,
    keep: impl Fn(&accesslog::UpstreamServer) -> bool,
    instead: &str,
) -> Result<Vec<(SocketAddr, u32)>, String> {
    let Some(block) = conf.upstreams.iter().find(|u| u.name == name) else {
        let known: Vec<&str> = conf.upstreams.iter().map(|u| u.name.as_str()).collect();
        return Err(format!(
            "{} has no upstream `{name}` (found: {})",
            path.display(),
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        ));
    };
    block
        .servers
        .iter()
        .filter(|s| keep(s))
        .map(|s| {
            s.socket_addr.map(|a| (a, s.weight)).ok_or_else(|| {
                format!(
                    "{} line {}: server `{}` is not an IP address; {instead}",
                    path.display(),
                    s.line,
                    s.address
                )
            })
        })
        .collect()
}

fn check_token(token: &str) -> Result<Secret, String> {
    if token.is_empty() {
        return Err("the admin token is empty".into());
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "the admin token is {} bytes; use at least {MIN_TOKEN_LEN}",
            token.len()
        ));
    }
    Ok(Secret(token.to_owned()))
}

/// Loopback, including IPv4-mapped `::ffff:127.x.y.z`.
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ConfigError {
        match load_str(Path::new("/nonexistent/t.toml"), text, Scope::Full) {
            Ok(_) => panic!("expected an error for {text:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn defaults() {
        let l = load_str(Path::new("/nonexistent/t.toml"), "", Scope::Full).unwrap();
        assert_eq!(*l.config.admin.listen.get_ref(), DEFAULT_ADMIN_LISTEN);
        assert_eq!(l.config.shutdown_timeout, Duration::from_secs(10));
        assert!(l.admin_token.is_none());
        let t = l.effective_toml().unwrap();
        assert!(t.contains("listen = \"127.0.0.1:9095\""), "{t}");
        assert!(t.contains("shutdown_timeout = \"10s\""), "{t}");
        // The effective config loads again to the same thing.
        let again = load_str(Path::new("/nonexistent/t.toml"), &t, Scope::Full).unwrap();
        assert_eq!(
            again.config.admin.listen.get_ref(),
            l.config.admin.listen.get_ref()
        );
    }

    #[test]
    fn errors_name_key_and_line() {
        let e = err("[rules.a]\ndefault = \"allow\"\ndeny = [\"10.0.0.0/8\",\n  \"10.0.0.1/8\"]\n");
        assert_eq!(e.key.as_deref(), Some("rules.a.deny[1]"));
        assert_eq!(e.at, Some((4, 3)));
        assert!(
            e.to_string()
                .contains("t.toml:4:3: rules.a.deny[1]: 10.0.0.1/8"),
            "{e}"
        );

        let e = err("[admin]\nlisten = \"nope\"\n");
        assert_eq!(e.key.as_deref(), Some("admin.listen"));
        assert_eq!(e.at, Some((2, 10)));

        let e = err("[admin]\nlisten = \"0.0.0.0:9095\"\n");
        assert_eq!(e.key.as_deref(), Some("admin.listen"));
        assert!(e.message.contains("not a loopback"), "{e}");

        let e = err("[rules.\"a b\"]\ndefault = \"deny\"\n");
        assert!(e.message.contains("bad rule set name"), "{e}");

        let e = err("shutdown_timeout = \"10 parsecs\"\n");
        assert_eq!(e.key.as_deref(), Some("shutdown_timeout"));
        assert!(e.message.contains("bad duration"), "{e}");
    }

    #[test]
    fn ingress_forwarding_headers_are_configurable() {
        let base = "[ingress.web]\nlisten = \"127.0.0.1:0\"\n";
        let l = load_str(Path::new("/nonexistent/t.toml"), base, Scope::Full).unwrap();
        let f = &l.ingress[0].options.forwarding;
        assert!(f.x_forwarded && f.forwarded);
        assert_eq!(f.via.as_deref(), Some("ippool"));
        let off = format!("{base}x_forwarded = false\nforwarded = false\nvia = \"\"\n");
        let l = load_str(Path::new("/nonexistent/t.toml"), &off, Scope::Full).unwrap();
        let f = &l.ingress[0].options.forwarding;
        assert!(!f.x_forwarded && !f.forwarded && f.via.is_none());
        assert!(l.ingress[0].options.fast_h1);
        let l = load_str(
            Path::new("/nonexistent/t.toml"),
            &format!("{base}fast_h1 = false\n"),
            Scope::Full,
        )
        .unwrap();
        assert!(!l.ingress[0].options.fast_h1);
        let e = err(&format!("{base}via = \"two words\"\n"));
        assert_eq!(e.key.as_deref(), Some("ingress.web.via"));
        assert_eq!(e.at.map(|a| a.0), Some(3));
        assert!(e.message.contains("token"), "{e}");
    }

    #[test]
    fn monitor_errors_name_key_and_line() {
        let m = "[monitor.web]\naccess_log = \"a.log\"\nformat = \"$remote_addr $upstream_addr $upstream_status\"\naddress = \"upstream_addr\"\n";
        let l = load_str(Path::new("/nonexistent/t.toml"), m, Scope::Full).unwrap();
        assert_eq!(l.monitors.len(), 1);
        assert_eq!(l.monitors[0].addresses, PoolAddresses::Discover);
        assert_eq!(l.monitors[0].poll_interval, Duration::from_millis(250));
        assert_eq!(l.monitors[0].access_log, Path::new("/nonexistent/a.log"));

        let e = err(&format!("{m}[monitor.web.health]\ncooldown = \"0s\"\n"));
        assert_eq!(e.key.as_deref(), Some("monitor.web.health.cooldown"));
        assert_eq!(e.at, Some((6, 12)));

        let e = err(&format!("{m}poll_interval = \"1 fortnight\"\n"));
        assert_eq!(e.key.as_deref(), Some("monitor.web.poll_interval"));
        assert_eq!(e.at.map(|a| a.0), Some(5));

        let e = err(&format!(
            "{m}[monitor.web.health]\nstrategy = \"rate\"\nmax_failure_ratio = 1.5\n"
        ));
        assert_eq!(
            e.key.as_deref(),
            Some("monitor.web.health.max_failure_ratio")
        );
        assert_eq!(e.at.map(|a| a.0), Some(7));

        let e = err(&format!(
            "{m}[monitor.web.health]\nneutral_statuses = [1000]\n"
        ));
        assert_eq!(
            e.key.as_deref(),
            Some("monitor.web.health.neutral_statuses")
        );

        let e = err(&format!("{m}upstream = \"pool\"\n"));
        assert_eq!(e.key.as_deref(), Some("monitor.web.upstream"));
        assert!(e.message.contains("nginx_conf"), "{e}");

        let e = err(&format!("{m}addresses = [\"10.0.0.1\", \"10.0.0.x\"]\n"));
        assert_eq!(e.key.as_deref(), Some("monitor.web.addresses[1]"));

        let e = err(&m
            .replace("upstream_addr\"\n", "server_port\"\n")
            .replace(" $upstream_addr", " $server_port"));
        assert_eq!(e.key.as_deref(), Some("monitor.web.address"));
        assert!(e.message.contains("nginx_conf"), "{e}");

        let e = err(&m.replace(
            "format = \"$remote_addr $upstream_addr $upstream_status\"",
            "format = \"common\"",
        ));
        assert_eq!(e.key.as_deref(), Some("monitor.web.format"));
        assert_eq!(e.at, Some((3, 10)));

        let e = err("[monitor.\"a b\"]\naccess_log = \"a\"\naddress = \"server_addr\"\n");
        assert!(e.message.contains("bad pool name"), "{e}");
    }

    #[test]
    fn egress_sections() {
        let base = "[pools.loop]\nsource = \"127.0.0.0/29\"\n[egress.main]\npool = \"loop\"\n";
        let l = load_str(Path::new("/nonexistent/t.toml"), base, Scope::Full).unwrap();
        assert_eq!(l.pools.len(), 1);
        assert_eq!(l.pools[0].options.max_uses, Some(1));
        assert!(l.pools[0].options.health.is_some());
        assert!(matches!(l.pools[0].assigner, addrpool::Assigner::Static));
        assert_eq!(l.egress[0].listen, "127.0.0.1:3128".parse().unwrap());
        assert!(l.egress[0].fast_h1);
        let off = load_str(
            Path::new("/nonexistent/t.toml"),
            &format!("{base}fast_h1 = false\n"),
            Scope::Full,
        )
        .unwrap();
        assert!(!off.egress[0].fast_h1);
        // The default destination policy refuses loopback and metadata.
        let p = &l.egress[0].policy;
        assert!(!p.allows("169.254.169.254".parse().unwrap()));
        assert!(p.allows("93.184.216.34".parse().unwrap()));
        let t = l.effective_toml().unwrap();
        assert!(
            t.contains("# egress.main: 127.0.0.1:3128 from pool loop"),
            "{t}"
        );

        let e = err(&base.replace("pool = \"loop\"", "pool = \"nope\""));
        assert_eq!(e.key.as_deref(), Some("egress.main.pool"));
        assert!(e.message.contains("pools: loop"), "{e}");
        assert_eq!(e.at.map(|a| a.0), Some(4));

        let e = err(&format!("{base}listen = \"0.0.0.0:3128\"\n"));
        assert_eq!(e.key.as_deref(), Some("egress.main.listen"));
        assert!(e.message.contains("open proxy"), "{e}");

        let e = err(&format!("{base}listen = \"127.0.0.1:9095\"\n"));
        assert!(e.message.contains("already used by admin.listen"), "{e}");

        let e = err(&base.replace("0/29\"\n", "0/29\"\ninterface = \"eth0\"\n"));
        assert_eq!(e.key.as_deref(), Some("pools.loop.interface"));
        assert!(
            e.message.contains("only applies to assigner = \"netlink\""),
            "{e}"
        );
        assert_eq!(e.at.map(|a| a.0), Some(3));

        let e = err(&base.replace("0/29\"\n", "0/29\"\nassigner = \"netlink\"\n"));
        assert_eq!(e.key.as_deref(), Some("pools.loop.interface"));
        assert!(e.message.contains("needs interface"), "{e}");

        let e = err(&base.replace("127.0.0.0/29", "127.0.0.0/33"));
        assert_eq!(e.key.as_deref(), Some("pools.loop.source"));

        let e = err(&base.replace("127.0.0.0/29", "10.0.0.1, 2001:db8::1"));
        assert!(e.message.contains("mixes IPv4 and IPv6"), "{e}");

        let e = err(&base.replace("0/29\"\n", "0/29\"\nkeep_assigned = 60\n"));
        assert_eq!(e.key.as_deref(), Some("pools.loop.keep_assigned"));

        let e = err(&format!("{base}[pools.loop.health]\nbackoff = 0.5\n"));
        assert_eq!(e.key.as_deref(), Some("pools.loop.health.backoff"));
        assert_eq!(e.at.map(|a| a.0), Some(6));

        let e = err("[pools.x]\nassigner = \"static\"\n");
        assert_eq!(e.key.as_deref(), Some("pools.x"));
        assert!(e.message.contains("no addresses"), "{e}");

        let e = err(&format!("{base}users_file = \"missing-users\"\n"));
        assert_eq!(e.key.as_deref(), Some("egress.main.users_file"));
        assert!(e.message.contains("cannot read"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(duration::parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration::parse("10m"), Ok(Duration::from_secs(600)));
        assert!(duration::parse("ten").is_err());
        #[derive(Deserialize, Serialize)]
        struct T {
            #[serde(default, with = "duration::option")]
            d: Option<Duration>,
        }
        let t: T = toml::from_str("d = \"1h 30m\"").unwrap();
        assert_eq!(t.d, Some(Duration::from_secs(5400)));
        assert_eq!(toml::to_string(&t).unwrap().trim(), "d = \"1h 30m\"");
        let t: T = toml::from_str("").unwrap();
        assert_eq!(t.d, None);
    }

    #[test]
    fn secret_is_redacted() {
        let s = check_token("0123456789abcdef-secret").unwrap();
        assert_eq!(format!("{s} {s:?}"), "<redacted> <redacted>");
        assert!(s.matches(b"0123456789abcdef-secret"));
        assert!(!s.matches(b"0123456789abcdef-secreT"));
        assert!(check_token("short").is_err());
    }
}
