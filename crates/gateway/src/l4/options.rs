//! Typed options of an L4 listener and their validation.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use health::{Classifier, HealthOptions, Transition};

/// The largest weight an upstream may have.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// How the balancer picks an upstream among the available ones.
///
/// Benched upstreams are never picked; an upstream on probation is picked
/// only while it has a free probe slot. Weights apply to every strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Strategy {
    /// A random upstream, with probability proportional to its weight.
    Random,
    /// Smooth weighted round robin (nginx's): with equal weights a strict
    /// rotation; with weights 5, 1, 1 the sequence `a a b a c a a`, never a
    /// burst on one upstream.
    #[default]
    RoundRobin,
    /// The upstream with the fewest open connections relative to its weight
    /// (`active / weight`), dials in progress included; ties go round robin
    /// (HAProxy's `leastconn`).
    LeastConnections,
}

impl Strategy {
    /// The config name: `random`, `round_robin`, `least_connections`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Random => "random",
            Strategy::RoundRobin => "round_robin",
            Strategy::LeastConnections => "least_connections",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A strategy name that is not one of `random`, `round_robin`,
/// `least_connections`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown balancing strategy `{0}` (expected random, round_robin or least_connections)")]
pub struct UnknownStrategy(pub String);

impl FromStr for Strategy {
    type Err = UnknownStrategy;

    /// Parses a config name (see [`Strategy::as_str`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "random" => Ok(Strategy::Random),
            "round_robin" => Ok(Strategy::RoundRobin),
            "least_connections" => Ok(Strategy::LeastConnections),
            other => Err(UnknownStrategy(other.to_owned())),
        }
    }
}

/// One upstream server of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Upstream {
    /// Where connections are forwarded.
    pub addr: SocketAddr,
    /// Relative share of connections, `1..=`[`MAX_WEIGHT`] (nginx's
    /// `weight=`). Default 1.
    pub weight: u32,
}

impl Upstream {
    /// An upstream of weight 1.
    pub fn new(addr: SocketAddr) -> Upstream {
        Upstream { addr, weight: 1 }
    }

    /// Sets the weight.
    pub fn with_weight(mut self, weight: u32) -> Upstream {
        self.weight = weight;
        self
    }
}

impl From<SocketAddr> for Upstream {
    fn from(addr: SocketAddr) -> Upstream {
        Upstream::new(addr)
    }
}

/// Receives every health transition of every upstream (benched, restored,
/// benching suppressed by `max_benched_percent`), e.g. to publish events.
/// Implemented for any `Fn(SocketAddr, Transition) + Send + Sync`.
///
/// Called synchronously after the balancer's lock is released, on the path
/// of the connection whose dial caused it: keep it short.
pub trait TransitionSink: Send + Sync + 'static {
    /// One transition of one upstream.
    fn transition(&self, upstream: SocketAddr, transition: Transition);
}

impl<F> TransitionSink for F
where
    F: Fn(SocketAddr, Transition) + Send + Sync + 'static,
{
    fn transition(&self, upstream: SocketAddr, transition: Transition) {
        self(upstream, transition)
    }
}

/// Why [`L4Options`] are invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum L4OptionsError {
    /// The upstream list is empty.
    #[error("no upstream: at least one upstream address is needed")]
    NoUpstreams,
    /// The same address is listed twice.
    #[error("upstream {0} is listed twice")]
    DuplicateUpstream(SocketAddr),
    /// An address that cannot be dialled (unspecified address, port 0).
    #[error("upstream {addr} cannot be dialled: {reason}")]
    BadUpstream {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: &'static str,
    },
    /// A weight outside `1..=MAX_WEIGHT`.
    #[error("upstream {addr}: weight {weight} is not between 1 and {MAX_WEIGHT}")]
    Weight {
        /// The upstream.
        addr: SocketAddr,
        /// The weight given.
        weight: u32,
    },
    /// A duration option is zero or absurdly long.
    #[error("invalid `{field}`: {reason}")]
    Duration {
        /// The option's config key (`dial_timeout`, `idle_timeout`,
        /// `drain_timeout`).
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// An invalid health option.
    #[error(transparent)]
    Health(#[from] health::InvalidOption),
}

/// Options of one L4 listener. [`L4Options::new`] gives the documented
/// defaults; change fields with struct-update syntax or assignment.
#[derive(Clone)]
pub struct L4Options {
    /// The upstream pool (at least one, no duplicates).
    pub upstreams: Vec<Upstream>,
    /// How an upstream is picked. Default: round robin.
    pub strategy: Strategy,
    /// Bound on one TCP connect to an upstream; a dial that takes longer is
    /// a [`health::Outcome::Timeout`] of that upstream. Default: 5 s.
    pub dial_timeout: Duration,
    /// A forwarded connection with no byte moved either way for this long
    /// is closed. Default: 10 minutes.
    pub idle_timeout: Duration,
    /// Further dials, each to another upstream not tried yet for this
    /// client, after a connect failure or timeout. Default: 2 (three dials
    /// in all).
    pub retries: u32,
    /// Time open connections get to finish on shutdown before they are
    /// closed. Default: 30 s.
    pub drain_timeout: Duration,
    /// Per-upstream health. Defaults for a backend pool, after Envoy's
    /// outlier detection: benched on the 3rd consecutive connect failure
    /// or timeout, 30 s cooldown doubling up to 5 minutes, one probe at a
    /// time, at most 50 % of the pool benched (set
    /// `max_benched_percent: 100` to let a pool go fully dark, so that
    /// clients are refused at once instead of waiting for dials that fail).
    pub health: HealthOptions,
    /// Which outcomes count against an upstream. Default: connect errors
    /// and timeouts are failures, a connect is a success.
    pub classifier: Classifier,
    /// Receives every health transition. Default: none.
    pub transitions: Option<Arc<dyn TransitionSink>>,
    /// Who may connect (checked at accept, before a byte is read).
    /// Default: everyone.
    pub guard: Arc<crate::guard::Guard>,
}

impl L4Options {
    /// The defaults, forwarding to `upstreams` (addresses or
    /// [`Upstream`]s).
    pub fn new<U: Into<Upstream>>(upstreams: impl IntoIterator<Item = U>) -> L4Options {
        L4Options {
            upstreams: upstreams.into_iter().map(Into::into).collect(),
            strategy: Strategy::RoundRobin,
            dial_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            retries: 2,
            drain_timeout: Duration::from_secs(30),
            health: HealthOptions {
                cooldown: Duration::from_secs(30),
                max_cooldown: Duration::from_secs(300),
                ..HealthOptions::default()
            },
            classifier: Classifier::default(),
            transitions: None,
            guard: Arc::new(crate::guard::Guard::default()),
        }
    }

    /// Checks every option; the error names the first invalid one.
    pub fn validate(&self) -> Result<(), L4OptionsError> {
        if self.upstreams.is_empty() {
            return Err(L4OptionsError::NoUpstreams);
        }
        let mut seen = HashSet::with_capacity(self.upstreams.len());
        for u in &self.upstreams {
            if u.addr.ip().is_unspecified() {
                return Err(L4OptionsError::BadUpstream {
                    addr: u.addr,
                    reason: "the address is unspecified",
                });
            }
            if u.addr.port() == 0 {
                return Err(L4OptionsError::BadUpstream {
                    addr: u.addr,
                    reason: "the port is 0",
                });
            }
            if !(1..=MAX_WEIGHT).contains(&u.weight) {
                return Err(L4OptionsError::Weight {
                    addr: u.addr,
                    weight: u.weight,
                });
            }
            if !seen.insert(u.addr) {
                return Err(L4OptionsError::DuplicateUpstream(u.addr));
            }
        }
        check_duration("dial_timeout", self.dial_timeout)?;
        check_duration("idle_timeout", self.idle_timeout)?;
        check_duration("drain_timeout", self.drain_timeout)?;
        self.health.validate()?;
        Ok(())
    }
}

fn check_duration(field: &'static str, value: Duration) -> Result<(), L4OptionsError> {
    if value.is_zero() {
        Err(L4OptionsError::Duration {
            field,
            reason: "must be longer than zero",
        })
    } else if value > health::MAX_DURATION {
        Err(L4OptionsError::Duration {
            field,
            reason: "must be at most 100 years",
        })
    } else {
        Ok(())
    }
}

impl fmt::Debug for L4Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("L4Options")
            .field("upstreams", &self.upstreams)
            .field("strategy", &self.strategy)
            .field("dial_timeout", &self.dial_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("retries", &self.retries)
            .field("drain_timeout", &self.drain_timeout)
            .field("health", &self.health)
            .field("classifier", &self.classifier)
            .field("transitions", &self.transitions.as_ref().map(|_| "<sink>"))
            .field("guard", &self.guard)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_are_valid_and_documented() {
        let o = L4Options::new([addr("127.0.0.1:80")]);
        assert_eq!(o.validate(), Ok(()));
        assert_eq!(o.strategy, Strategy::RoundRobin);
        assert_eq!(o.dial_timeout, Duration::from_secs(5));
        assert_eq!(o.idle_timeout, Duration::from_secs(600));
        assert_eq!(o.retries, 2);
        assert_eq!(o.health.cooldown, Duration::from_secs(30));
        assert_eq!(o.upstreams[0].weight, 1);
    }

    #[test]
    fn validation_names_the_problem() {
        let bad = |o: L4Options| o.validate().unwrap_err();
        let empty: [SocketAddr; 0] = [];
        assert_eq!(bad(L4Options::new(empty)), L4OptionsError::NoUpstreams);
        assert_eq!(
            bad(L4Options::new([addr("10.0.0.1:80"), addr("10.0.0.1:80")])),
            L4OptionsError::DuplicateUpstream(addr("10.0.0.1:80"))
        );
        assert!(matches!(
            bad(L4Options::new([addr("0.0.0.0:80")])),
            L4OptionsError::BadUpstream { .. }
        ));
        assert!(matches!(
            bad(L4Options::new([addr("10.0.0.1:0")])),
            L4OptionsError::BadUpstream { .. }
        ));
        for w in [0, MAX_WEIGHT + 1] {
            assert_eq!(
                bad(L4Options::new([
                    Upstream::new(addr("10.0.0.1:80")).with_weight(w)
                ])),
                L4OptionsError::Weight {
                    addr: addr("10.0.0.1:80"),
                    weight: w
                }
            );
        }
        let ok = || L4Options::new([addr("10.0.0.1:80")]);
        for (field, o) in [
            (
                "dial_timeout",
                L4Options {
                    dial_timeout: Duration::ZERO,
                    ..ok()
                },
            ),
            (
                "idle_timeout",
                L4Options {
                    idle_timeout: Duration::MAX,
                    ..ok()
                },
            ),
            (
                "drain_timeout",
                L4Options {
                    drain_timeout: Duration::ZERO,
                    ..ok()
                },
            ),
        ] {
            assert!(
                matches!(bad(o), L4OptionsError::Duration { field: f, .. } if f == field),
                "{field}"
            );
        }
        let e = bad(L4Options {
            health: HealthOptions {
                probation_requests: 0,
                ..HealthOptions::default()
            },
            ..ok()
        });
        assert!(
            matches!(&e, L4OptionsError::Health(h) if h.field() == "probation_requests"),
            "{e:?}"
        );
    }

    #[test]
    fn strategy_names_round_trip() {
        for s in [
            Strategy::Random,
            Strategy::RoundRobin,
            Strategy::LeastConnections,
        ] {
            assert_eq!(s.as_str().parse::<Strategy>(), Ok(s));
        }
        assert!("leastconn".parse::<Strategy>().is_err());
    }
}
