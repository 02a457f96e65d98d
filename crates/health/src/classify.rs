//! Raw outcomes of a request and their classification per pool.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::error::InvalidOption;

/// What a request through a key ended with, as its source saw it (the
/// egress proxy, a client's feedback, an nginx access-log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The connection (or CONNECT tunnel) worked and no HTTP status was seen.
    Connected,
    /// The upstream answered with this HTTP status.
    Status(u16),
    /// Connecting failed, with this error kind.
    ConnectError(io::ErrorKind),
    /// Connecting or waiting for the answer timed out.
    Timeout,
    /// The peer closed the connection right after a CONNECT tunnel was
    /// established, before sending anything.
    EarlyEof,
    /// An explicit verdict, e.g. client feedback ("this address is blocked").
    Reported(Verdict),
}

impl Outcome {
    /// The outcome of a failed connect: [`Outcome::ConnectError`] when the
    /// error says something about the peer (refused, reset, unreachable,
    /// ...), and a neutral report when it is this host's own trouble (out
    /// of file descriptors, ephemeral ports, buffers or memory), which must
    /// not bench a healthy peer.
    pub fn of_connect_error(e: &io::Error) -> Outcome {
        let local_kind = matches!(
            e.kind(),
            io::ErrorKind::AddrNotAvailable | io::ErrorKind::AddrInUse | io::ErrorKind::OutOfMemory
        );
        let local_errno = matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        );
        if local_kind || local_errno {
            Outcome::Reported(Verdict::Neutral)
        } else {
            Outcome::ConnectError(e.kind())
        }
    }
}

/// What an [`Outcome`] means for the key's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The key works.
    Success,
    /// The key looks blocked or broken; counts toward benching it.
    Failure,
    /// Says nothing about the key; changes no counter.
    Neutral,
}

/// Maps raw [`Outcome`]s to [`Verdict`]s for one pool.
///
/// Defaults: statuses 403 and 429, connect errors, timeouts and an EOF right
/// after CONNECT are failures; every other status (the target's own 404,
/// 500, …) is a success of the key, since the key reached the target and got
/// an answer; [`Outcome::Connected`] is a success; a status outside
/// `100..=999` (e.g. nginx logging `-` as 0) is neutral.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classifier {
    blocked: StatusSet,
    neutral: StatusSet,
    connect_error: Verdict,
    timeout: Verdict,
    early_eof: Verdict,
}

impl Default for Classifier {
    fn default() -> Self {
        let mut blocked = StatusSet::EMPTY;
        blocked.insert(403);
        blocked.insert(429);
        Classifier {
            blocked,
            neutral: StatusSet::EMPTY,
            connect_error: Verdict::Failure,
            timeout: Verdict::Failure,
            early_eof: Verdict::Failure,
        }
    }
}

impl Classifier {
    /// Replaces the statuses that mean "this key is blocked" (failures).
    /// Errors (field `blocked_statuses`) on a status outside `100..=999`.
    pub fn with_blocked_statuses(
        mut self,
        statuses: impl IntoIterator<Item = u16>,
    ) -> Result<Self, InvalidOption> {
        self.blocked = StatusSet::from_iter_checked("blocked_statuses", statuses)?;
        Ok(self)
    }

    /// Replaces the statuses that say nothing about the key (neutral).
    /// A status both blocked and neutral is blocked. Errors (field
    /// `neutral_statuses`) on a status outside `100..=999`.
    pub fn with_neutral_statuses(
        mut self,
        statuses: impl IntoIterator<Item = u16>,
    ) -> Result<Self, InvalidOption> {
        self.neutral = StatusSet::from_iter_checked("neutral_statuses", statuses)?;
        Ok(self)
    }

    /// Sets the verdict of [`Outcome::ConnectError`] (default failure).
    pub fn with_connect_error(mut self, verdict: Verdict) -> Self {
        self.connect_error = verdict;
        self
    }

    /// Sets the verdict of [`Outcome::Timeout`] (default failure).
    pub fn with_timeout(mut self, verdict: Verdict) -> Self {
        self.timeout = verdict;
        self
    }

    /// Sets the verdict of [`Outcome::EarlyEof`] (default failure).
    pub fn with_early_eof(mut self, verdict: Verdict) -> Self {
        self.early_eof = verdict;
        self
    }

    /// Classifies one outcome. Never panics.
    pub fn classify(&self, outcome: &Outcome) -> Verdict {
        match *outcome {
            Outcome::Connected => Verdict::Success,
            Outcome::Status(s) if !StatusSet::valid(s) => Verdict::Neutral,
            Outcome::Status(s) if self.blocked.contains(s) => Verdict::Failure,
            Outcome::Status(s) if self.neutral.contains(s) => Verdict::Neutral,
            Outcome::Status(_) => Verdict::Success,
            Outcome::ConnectError(_) => self.connect_error,
            Outcome::Timeout => self.timeout,
            Outcome::EarlyEof => self.early_eof,
            Outcome::Reported(v) => v,
        }
    }
}

/// A set of HTTP statuses `0..1024` as a bitset (no allocation, O(1)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatusSet([u64; 16]);

impl StatusSet {
    const EMPTY: StatusSet = StatusSet([0; 16]);

    fn valid(status: u16) -> bool {
        (100..=999).contains(&status)
    }

    fn insert(&mut self, status: u16) {
        let s = usize::from(status);
        if let Some(word) = self.0.get_mut(s / 64) {
            *word |= 1 << (s % 64);
        }
    }

    fn contains(&self, status: u16) -> bool {
        let s = usize::from(status);
        self.0.get(s / 64).is_some_and(|w| w & (1 << (s % 64)) != 0)
    }

    fn from_iter_checked(
        field: &'static str,
        statuses: impl IntoIterator<Item = u16>,
    ) -> Result<Self, InvalidOption> {
        let mut set = StatusSet::EMPTY;
        for s in statuses {
            if !Self::valid(s) {
                return Err(InvalidOption::new(
                    field,
                    "an HTTP status must be between 100 and 999",
                ));
            }
            set.insert(s);
        }
        Ok(set)
    }
}

/// One observed outcome with its context, as recorded in a key's history.
///
/// ```
/// use std::time::Duration;
/// use health::{Observation, Outcome};
///
/// let o = Observation::new(Outcome::Status(403))
///     .with_target("example.com:443".into())
///     .with_latency(Duration::from_millis(120));
/// assert_eq!(o.outcome, Outcome::Status(403));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// What happened.
    pub outcome: Outcome,
    /// Where the request went (`host:port`), if known. An `Arc` so callers can
    /// share one allocation between their own logs and the history.
    pub target: Option<Arc<str>>,
    /// How long the request took, if known.
    pub latency: Option<Duration>,
}

impl Observation {
    /// An observation with no target and no latency.
    pub fn new(outcome: Outcome) -> Self {
        Observation {
            outcome,
            target: None,
            latency: None,
        }
    }

    /// Sets the target.
    pub fn with_target(mut self, target: Arc<str>) -> Self {
        self.target = Some(target);
        self
    }

    /// Sets the latency.
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = Some(latency);
        self
    }
}

impl From<Outcome> for Observation {
    fn from(outcome: Outcome) -> Self {
        Observation::new(outcome)
    }
}

impl From<Verdict> for Observation {
    fn from(verdict: Verdict) -> Self {
        Observation::new(Outcome::Reported(verdict))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_connect_errors_are_neutral_and_the_peers_are_connect_errors() {
        for errno in [
            libc::ECONNREFUSED,
            libc::ECONNRESET,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
        ] {
            let e = io::Error::from_raw_os_error(errno);
            assert_eq!(
                Outcome::of_connect_error(&e),
                Outcome::ConnectError(e.kind()),
                "{errno}"
            );
        }
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRNOTAVAIL,
            libc::EADDRINUSE,
        ] {
            assert_eq!(
                Outcome::of_connect_error(&io::Error::from_raw_os_error(errno)),
                Outcome::Reported(Verdict::Neutral),
                "{errno}"
            );
        }
    }

    #[test]
    fn default_classification() {
        let c = Classifier::default();
        assert_eq!(c.classify(&Outcome::Status(403)), Verdict::Failure);
        assert_eq!(c.classify(&Outcome::Status(429)), Verdict::Failure);
        assert_eq!(c.classify(&Outcome::Status(404)), Verdict::Success);
        assert_eq!(c.classify(&Outcome::Status(500)), Verdict::Success);
        assert_eq!(c.classify(&Outcome::Status(200)), Verdict::Success);
        assert_eq!(c.classify(&Outcome::Status(0)), Verdict::Neutral);
        assert_eq!(c.classify(&Outcome::Status(u16::MAX)), Verdict::Neutral);
        assert_eq!(
            c.classify(&Outcome::ConnectError(io::ErrorKind::ConnectionRefused)),
            Verdict::Failure
        );
        assert_eq!(c.classify(&Outcome::Timeout), Verdict::Failure);
        assert_eq!(c.classify(&Outcome::EarlyEof), Verdict::Failure);
        assert_eq!(c.classify(&Outcome::Connected), Verdict::Success);
        assert_eq!(
            c.classify(&Outcome::Reported(Verdict::Neutral)),
            Verdict::Neutral
        );
    }

    #[test]
    fn configured_classification() {
        let c = Classifier::default()
            .with_blocked_statuses([403, 451])
            .unwrap()
            .with_neutral_statuses([502, 403])
            .unwrap()
            .with_timeout(Verdict::Neutral)
            .with_early_eof(Verdict::Neutral)
            .with_connect_error(Verdict::Neutral);
        assert_eq!(c.classify(&Outcome::Status(451)), Verdict::Failure);
        assert_eq!(c.classify(&Outcome::Status(403)), Verdict::Failure);
        assert_eq!(c.classify(&Outcome::Status(429)), Verdict::Success);
        assert_eq!(c.classify(&Outcome::Status(502)), Verdict::Neutral);
        assert_eq!(c.classify(&Outcome::Timeout), Verdict::Neutral);
        assert_eq!(c.classify(&Outcome::EarlyEof), Verdict::Neutral);
        assert_eq!(
            c.classify(&Outcome::ConnectError(io::ErrorKind::TimedOut)),
            Verdict::Neutral
        );
    }

    #[test]
    fn invalid_statuses_name_the_field() {
        let e = Classifier::default()
            .with_blocked_statuses([99])
            .unwrap_err();
        assert_eq!(e.field(), "blocked_statuses");
        let e = Classifier::default()
            .with_neutral_statuses([1000])
            .unwrap_err();
        assert_eq!(e.field(), "neutral_statuses");
    }
}
