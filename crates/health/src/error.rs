//! Typed errors of the crate.

use std::fmt;
use std::time::{Duration, Instant};

/// An option (of [`HealthOptions`](crate::HealthOptions) or a
/// [`Classifier`](crate::Classifier)) has an invalid value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {reason}")]
pub struct InvalidOption {
    field: &'static str,
    reason: &'static str,
}

impl InvalidOption {
    pub(crate) fn new(field: &'static str, reason: &'static str) -> Self {
        InvalidOption { field, reason }
    }

    /// The config key of the invalid option, e.g. `"cooldown"`.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// Why the value is invalid, e.g. `"must be longer than zero"`.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

/// The key is not part of the tracker's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown key: not in this pool")]
pub struct UnknownKey;

/// Why [`Tracker::acquire`](crate::Tracker::acquire) refused a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// The key is not part of the pool.
    #[error("unknown key: not in this pool")]
    UnknownKey,
    /// The key is benched and its cooldown has not elapsed.
    #[error("benched for {cooldown:?} since {since:?}")]
    Benched {
        /// When the key was benched.
        since: Instant,
        /// How long the benching lasts.
        cooldown: Duration,
    },
    /// The key is on probation and all its probe slots are in use.
    #[error("on probation with all {in_flight} probe slots in use")]
    ProbationFull {
        /// Probe requests in flight.
        in_flight: u32,
    },
}

/// No key of the pool can take a request now.
///
/// Proxies answer `503 Service Unavailable` with the [`Display`](fmt::Display)
/// text as the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoneAvailable {
    /// Keys in the pool.
    pub total: usize,
    /// Keys benched (cooldown not elapsed).
    pub benched: usize,
    /// Keys on probation with every probe slot in use.
    pub probation_full: usize,
}

impl fmt::Display for NoneAvailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total == 0 {
            return f.write_str("no address available: the pool is empty");
        }
        write!(
            f,
            "no address available: {} of {} benched, {} on probation with every probe slot in use",
            self.benched, self.total, self.probation_full
        )
    }
}

impl std::error::Error for NoneAvailable {}
