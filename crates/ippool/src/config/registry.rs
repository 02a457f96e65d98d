//! `[registry]`: the channel backends register themselves over.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::monitor::HumanDuration;
use super::{ConfigError, Source};

fn sp<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}
fn hd(ms: u64) -> Spanned<HumanDuration> {
    sp(HumanDuration(Duration::from_millis(ms)))
}
fn d_listen() -> Spanned<SocketAddr> {
    sp(SocketAddr::from(([127, 0, 0, 1], 3042)))
}
fn d_hb() -> Spanned<HumanDuration> {
    hd(1_000)
}
fn d_hb_timeout() -> Spanned<HumanDuration> {
    hd(3_000)
}
fn d_handshake() -> Spanned<HumanDuration> {
    hd(5_000)
}
fn d_drain() -> Spanned<HumanDuration> {
    hd(30_000)
}

/// `[registry]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// The WebSocket listener (default `127.0.0.1:3042`).
    #[serde(default = "d_listen")]
    pub listen: Spanned<SocketAddr>,
    /// The key store: a directory of `<id>.pub` files (`ippool keygen`).
    /// Required.
    pub keys_dir: Spanned<PathBuf>,
    /// Other URLs agents may dial this channel by (`ws://proxy.lan:3042`),
    /// part of what they sign.
    #[serde(default)]
    pub advertised: Vec<String>,
    /// Ping interval (default `"1s"`).
    #[serde(default = "d_hb")]
    pub heartbeat_interval: Spanned<HumanDuration>,
    /// Silence after which an agent's services are removed (default `"3s"`).
    #[serde(default = "d_hb_timeout")]
    pub heartbeat_timeout: Spanned<HumanDuration>,
    /// Time to complete the handshake (default `"5s"`).
    #[serde(default = "d_handshake")]
    pub handshake_timeout: Spanned<HumanDuration>,
    /// How long a leaving service drains (default `"30s"`).
    #[serde(default = "d_drain")]
    pub drain_timeout: Spanned<HumanDuration>,
    /// The `[ingress.<name>]` registered backends join (default: the only
    /// one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<String>,
    /// The `[rules.<name>]` set deciding who may connect (checked at
    /// accept); failed handshakes feed its `autoblock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Spanned<String>>,
    /// TLS certificates (`[{ cert = "…", key = "…" }]`, as for an
    /// ingress; SNI picks one, files are watched and reloaded). Present:
    /// the channel speaks `wss://` only, and agents' signatures cover the
    /// TLS session. Absent: `ws://`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<super::ingress::CertConfig>,
}

/// `[registry]`, resolved.
#[derive(Clone, Debug)]
pub struct RegistrySpec {
    /// The server options.
    pub options: registry::RegistryOptions,
    /// The key store directory.
    pub keys_dir: PathBuf,
    /// The ingress registered backends join.
    pub ingress: Option<String>,
    /// The client rule set, if any.
    pub rules: Option<String>,
    /// The TLS certificates (`wss://`), to watch for changes.
    pub certs: Option<std::sync::Arc<gateway::ingress::CertStore>>,
}

/// Resolves `[registry]`.
pub(super) fn resolve(
    src: &Source<'_>,
    base: &Path,
    c: &RegistryConfig,
) -> Result<RegistrySpec, ConfigError> {
    let err = |span: std::ops::Range<usize>, k: &str, m: String| {
        src.error(Some(span), Some(format!("registry.{k}")), m)
    };
    let keys_dir = base.join(c.keys_dir.get_ref());
    if !keys_dir.is_dir() {
        return Err(err(
            c.keys_dir.span(),
            "keys_dir",
            format!(
                "{} is not a directory (create it and put agents' .pub files there: \
                 ippool keygen --id ID)",
                keys_dir.display()
            ),
        ));
    }
    let interval = c.heartbeat_interval.get_ref().0;
    let timeout = c.heartbeat_timeout.get_ref().0;
    for (k, v) in [
        ("heartbeat_interval", &c.heartbeat_interval),
        ("heartbeat_timeout", &c.heartbeat_timeout),
        ("handshake_timeout", &c.handshake_timeout),
    ] {
        if v.get_ref().0.is_zero() {
            return Err(err(v.span(), k, "must be more than 0s".into()));
        }
    }
    if timeout <= interval {
        return Err(err(
            c.heartbeat_timeout.span(),
            "heartbeat_timeout",
            "must be longer than heartbeat_interval".into(),
        ));
    }
    for (i, u) in c.advertised.iter().enumerate() {
        if !(u.starts_with("ws://") || u.starts_with("wss://")) {
            return Err(src.error(
                None,
                Some(format!("registry.advertised[{i}]")),
                format!("`{u}`: expected ws://HOST:PORT or wss://HOST:PORT"),
            ));
        }
    }
    let certs = if c.tls.is_empty() {
        None
    } else {
        let paths = c
            .tls
            .iter()
            .map(|t| gateway::ingress::CertPaths::new(base.join(&t.cert), base.join(&t.key)));
        Some(
            gateway::ingress::CertStore::load(paths)
                .map_err(|e| err(c.listen.span(), "tls", e.to_string()))?,
        )
    };
    for (i, u) in c.advertised.iter().enumerate() {
        if u.starts_with("wss://") != certs.is_some() {
            return Err(src.error(
                None,
                Some(format!("registry.advertised[{i}]")),
                format!(
                    "`{u}`: the scheme must be {} ({})",
                    if certs.is_some() { "wss://" } else { "ws://" },
                    if certs.is_some() {
                        "registry.tls is set"
                    } else {
                        "registry.tls is not set"
                    }
                ),
            ));
        }
    }
    let tls = match &certs {
        None => None,
        Some(store) => Some(std::sync::Arc::new(
            gateway::ingress::rustls_server_config(std::sync::Arc::clone(store), &[b"http/1.1"])
                .map_err(|e| err(c.listen.span(), "tls", e.to_string()))?,
        )),
    };
    let options = registry::RegistryOptions {
        listen: *c.listen.get_ref(),
        tls,
        advertised: c.advertised.clone(),
        heartbeat_interval: interval,
        heartbeat_timeout: timeout,
        handshake_timeout: c.handshake_timeout.get_ref().0,
        drain_timeout: c.drain_timeout.get_ref().0,
        ..registry::RegistryOptions::default()
    };
    Ok(RegistrySpec {
        options,
        keys_dir,
        ingress: c.ingress.clone(),
        rules: c.rules.as_ref().map(|r| r.get_ref().clone()),
        certs,
    })
}
