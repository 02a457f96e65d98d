//! Typed options of one pool's tracker and their validation.

use std::time::Duration;

use crate::error::InvalidOption;

/// The longest duration any option accepts (100 years).
///
/// Durations beyond this are configuration mistakes; bounding them keeps all
/// time arithmetic far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// When a key's failures bench it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    /// Bench on the `consecutive_failures`-th failure in a row (HAProxy's
    /// `fall`, Envoy's `consecutive_5xx`). A success resets the run; a
    /// neutral outcome neither resets nor extends it.
    Consecutive {
        /// The failure that benches the key: `3` benches on the third
        /// consecutive failure (not the fourth). At least 1.
        consecutive_failures: u32,
    },
    /// Bench when, over the last `window`, at least `min_requests` outcomes
    /// were seen and `failures / (failures + successes) >= max_failure_ratio`.
    ///
    /// The window slides in steps of `window / 10`: outcomes are counted in
    /// ten buckets of `window / 10` each, and the current bucket plus the nine
    /// before it form the window, so an outcome counts for between
    /// `0.9 × window` and `window`. Neutral outcomes are not counted. The
    /// rule is evaluated when a failure is recorded.
    Rate {
        /// Failure ratio that benches the key, in `(0, 1]`.
        max_failure_ratio: f64,
        /// Length of the sliding window; more than zero.
        window: Duration,
        /// Fewest outcomes (successes + failures) in the window before the
        /// ratio is trusted. At least 1.
        min_requests: u32,
    },
}

impl Default for Strategy {
    /// `Consecutive { consecutive_failures: 3 }`.
    fn default() -> Self {
        Strategy::Consecutive {
            consecutive_failures: 3,
        }
    }
}

/// Options of one pool's [`Tracker`](crate::Tracker).
///
/// Construct with struct-update syntax from [`Default`]:
///
/// ```
/// use std::time::Duration;
/// use health::{HealthOptions, Strategy};
///
/// let options = HealthOptions {
///     strategy: Strategy::Consecutive { consecutive_failures: 5 },
///     cooldown: Duration::from_secs(60),
///     ..HealthOptions::default()
/// };
/// assert!(options.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct HealthOptions {
    /// When failures bench a key. Default: [`Strategy::Consecutive`] with 3.
    pub strategy: Strategy,
    /// How long the first benching of a key lasts. Default 10 minutes.
    pub cooldown: Duration,
    /// Each repeated benching (without `recovery` of clean service in
    /// between) lasts the previous cooldown × `backoff`, at most
    /// `max_cooldown`. At least 1.0 (1.0 means no backoff). Default 2.0.
    pub backoff: f64,
    /// Upper bound of a backed-off cooldown; at least `cooldown`.
    /// Default 1 hour.
    pub max_cooldown: Duration,
    /// A key that has stayed un-benched for `recovery` since it was last
    /// restored gets its next cooldown reset to `cooldown`. Default 30
    /// minutes.
    pub recovery: Duration,
    /// Most requests in flight to a key on probation. At least 1.
    /// Default 1.
    pub probation_requests: u32,
    /// Most keys of the pool, in percent of the pool's size (rounded down),
    /// that may be out of service (benched or on probation) at once. 0..=100.
    /// Default 50: a pool of 1 never benches its key, a pool of 2 or 3
    /// benches at most 1.
    pub max_benched_percent: u8,
    /// Length of each key's outcome history (a ring buffer). 0 keeps none.
    /// Default 1000.
    pub max_history: usize,
    /// Length of each key's bench history (a ring buffer). 0 keeps none.
    /// Default 100.
    pub max_bench_history: usize,
}

impl Default for HealthOptions {
    fn default() -> Self {
        HealthOptions {
            strategy: Strategy::default(),
            cooldown: Duration::from_secs(10 * 60),
            backoff: 2.0,
            max_cooldown: Duration::from_secs(60 * 60),
            recovery: Duration::from_secs(30 * 60),
            probation_requests: 1,
            max_benched_percent: 50,
            max_history: 1000,
            max_bench_history: 100,
        }
    }
}

impl HealthOptions {
    /// Checks every field; the error names the first invalid one by its
    /// config key (`cooldown`, `max_failure_ratio`, …).
    pub fn validate(&self) -> Result<(), InvalidOption> {
        match self.strategy {
            Strategy::Consecutive {
                consecutive_failures,
            } => {
                if consecutive_failures == 0 {
                    return Err(InvalidOption::new(
                        "consecutive_failures",
                        "must be at least 1",
                    ));
                }
            }
            Strategy::Rate {
                max_failure_ratio,
                window,
                min_requests,
            } => {
                if !(max_failure_ratio > 0.0 && max_failure_ratio <= 1.0) {
                    return Err(InvalidOption::new(
                        "max_failure_ratio",
                        "must be greater than 0 and at most 1",
                    ));
                }
                check_duration("window", window)?;
                if min_requests == 0 {
                    return Err(InvalidOption::new("min_requests", "must be at least 1"));
                }
            }
        }
        check_duration("cooldown", self.cooldown)?;
        if !(self.backoff.is_finite() && self.backoff >= 1.0) {
            return Err(InvalidOption::new(
                "backoff",
                "must be a finite number of at least 1",
            ));
        }
        check_duration("max_cooldown", self.max_cooldown)?;
        if self.max_cooldown < self.cooldown {
            return Err(InvalidOption::new(
                "max_cooldown",
                "must be at least `cooldown`",
            ));
        }
        if self.recovery > MAX_DURATION {
            return Err(InvalidOption::new("recovery", "must be at most 100 years"));
        }
        if self.probation_requests == 0 {
            return Err(InvalidOption::new(
                "probation_requests",
                "must be at least 1",
            ));
        }
        if self.max_benched_percent > 100 {
            return Err(InvalidOption::new(
                "max_benched_percent",
                "must be between 0 and 100",
            ));
        }
        Ok(())
    }

    /// Most keys out of service at once in a pool of `pool_size` keys:
    /// `floor(pool_size × max_benched_percent / 100)`.
    pub fn max_benched(&self, pool_size: usize) -> usize {
        let cap = pool_size as u128 * u128::from(self.max_benched_percent) / 100;
        usize::try_from(cap).unwrap_or(usize::MAX)
    }
}

fn check_duration(field: &'static str, value: Duration) -> Result<(), InvalidOption> {
    if value.is_zero() {
        Err(InvalidOption::new(field, "must be longer than zero"))
    } else if value > MAX_DURATION {
        Err(InvalidOption::new(field, "must be at most 100 years"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_issue() {
        let o = HealthOptions::default();
        assert_eq!(
            o.strategy,
            Strategy::Consecutive {
                consecutive_failures: 3
            }
        );
        assert_eq!(o.cooldown, Duration::from_secs(600));
        assert_eq!(o.max_benched_percent, 50);
        assert_eq!(o.max_history, 1000);
        assert_eq!(o.validate(), Ok(()));
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |o: HealthOptions| o.validate().unwrap_err().field();
        let d = HealthOptions::default;
        assert_eq!(
            bad(HealthOptions {
                strategy: Strategy::Consecutive {
                    consecutive_failures: 0
                },
                ..d()
            }),
            "consecutive_failures"
        );
        let rate = |r: f64, w: u64, m: u32| Strategy::Rate {
            max_failure_ratio: r,
            window: Duration::from_secs(w),
            min_requests: m,
        };
        for (s, field) in [
            (rate(0.0, 1, 1), "max_failure_ratio"),
            (rate(1.5, 1, 1), "max_failure_ratio"),
            (rate(f64::NAN, 1, 1), "max_failure_ratio"),
            (rate(0.5, 0, 1), "window"),
            (rate(0.5, 1, 0), "min_requests"),
        ] {
            assert_eq!(bad(HealthOptions { strategy: s, ..d() }), field);
        }
        assert_eq!(
            bad(HealthOptions {
                cooldown: Duration::ZERO,
                ..d()
            }),
            "cooldown"
        );
        assert_eq!(
            bad(HealthOptions {
                backoff: 0.5,
                ..d()
            }),
            "backoff"
        );
        assert_eq!(
            bad(HealthOptions {
                backoff: f64::INFINITY,
                ..d()
            }),
            "backoff"
        );
        assert_eq!(
            bad(HealthOptions {
                max_cooldown: Duration::from_secs(1),
                ..d()
            }),
            "max_cooldown"
        );
        assert_eq!(
            bad(HealthOptions {
                max_cooldown: Duration::MAX,
                ..d()
            }),
            "max_cooldown"
        );
        assert_eq!(
            bad(HealthOptions {
                recovery: Duration::MAX,
                ..d()
            }),
            "recovery"
        );
        assert_eq!(
            bad(HealthOptions {
                probation_requests: 0,
                ..d()
            }),
            "probation_requests"
        );
        assert_eq!(
            bad(HealthOptions {
                max_benched_percent: 101,
                ..d()
            }),
            "max_benched_percent"
        );
    }

    #[test]
    fn bench_cap_rounds_down() {
        let o = HealthOptions::default();
        assert_eq!(o.max_benched(0), 0);
        assert_eq!(o.max_benched(1), 0);
        assert_eq!(o.max_benched(2), 1);
        assert_eq!(o.max_benched(3), 1);
        assert_eq!(o.max_benched(256), 128);
        let all = HealthOptions {
            max_benched_percent: 100,
            ..o
        };
        assert_eq!(all.max_benched(1), 1);
        assert_eq!(all.max_benched(usize::MAX), usize::MAX);
    }
}
