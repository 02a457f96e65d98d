//! Log output: human-readable (default) or JSON lines, on stderr.

use std::io::IsTerminal;
use std::str::FromStr;

use clap::ValueEnum;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// The environment variable that sets log levels, e.g. `debug` or
/// `info,ippool=debug`.
pub const LOG_ENV: &str = "IPPOOL_LOG";

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per line.
    Json,
}

/// The conventional variable, read when [`LOG_ENV`] is not set.
pub const FALLBACK_LOG_ENV: &str = "RUST_LOG";

/// Installs the global subscriber. Levels come from `IPPOOL_LOG`, else
/// `RUST_LOG`; a bad value falls back to `info` with a warning.
pub fn init(format: LogFormat) {
    let var = [LOG_ENV, FALLBACK_LOG_ENV].into_iter().find_map(|name| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| (name, v))
    });
    let (filter, bad) = match var {
        Some((name, v)) => match Targets::from_str(&v) {
            Ok(t) => (t, None),
            Err(e) => (
                default_filter(),
                Some(format!("{name}={v:?}: {e}; using `info`")),
            ),
        },
        None => (default_filter(), None),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Human => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal()),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if result.is_ok()
        && let Some(msg) = bad
    {
        tracing::warn!("{msg}");
    }
}

fn default_filter() -> Targets {
    Targets::new().with_default(tracing::Level::INFO)
}
