//! Prometheus metrics of the daemon, encoded with `prometheus-client`.
//!
//! - `ippool_build_info{version}`: always 1.
//! - `ippool_rule_checks_total{set,verdict}`: rule checks answered.
//! - `ippool_rules{set,list}`: rules in each list of each set.
//! - `ippool_pool_addresses{pool,state}`: addresses of each pool by state
//!   (`available`, `benched`, `probation`), refreshed at scrape time.
//! - `ippool_pool_transitions_total{pool,kind}`: state changes (`benched`,
//!   `bench_suppressed`, `restored`).
//! - `ippool_accesslog_lines_total{monitor,result}`: access-log lines read
//!   by each monitor (`parsed`, `malformed`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::rules::RuleSets;

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    set: String,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    set: String,
    list: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolStateLabels {
    pool: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    pool: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LineLabels {
    monitor: String,
    result: &'static str,
}

/// The registry and the handles to update it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rule_checks: Family<CheckLabels, Counter>,
    rules: Family<RuleLabels, Gauge>,
    pool_addresses: Family<PoolStateLabels, Gauge>,
    pool_transitions: Family<TransitionLabels, Counter>,
    accesslog_lines: Family<LineLabels, Counter>,
}

impl Metrics {
    /// Registers every metric, with the rule counts of `sets` and zeroed
    /// check counters for each set.
    pub fn new(sets: &RuleSets) -> Metrics {
        let mut registry = Registry::with_prefix("ippool");
        registry.register(
            "build",
            "Build information; always 1",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let rule_checks = Family::<CheckLabels, Counter>::default();
        registry.register(
            "rule_checks",
            "Rule checks answered, by rule set and verdict",
            rule_checks.clone(),
        );
        let rules = Family::<RuleLabels, Gauge>::default();
        registry.register(
            "rules",
            "Rules in each list of each rule set",
            rules.clone(),
        );
        let pool_addresses = Family::<PoolStateLabels, Gauge>::default();
        registry.register(
            "pool_addresses",
            "Addresses of each pool by state",
            pool_addresses.clone(),
        );
        let pool_transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "pool_transitions",
            "Address state changes of each pool, by kind",
            pool_transitions.clone(),
        );
        let accesslog_lines = Family::<LineLabels, Counter>::default();
        registry.register(
            "accesslog_lines",
            "Access-log lines read by each monitor, parsed or malformed",
            accesslog_lines.clone(),
        );
        let m = Metrics {
            registry,
            rule_checks,
            rules,
            pool_addresses,
            pool_transitions,
            accesslog_lines,
        };
        for s in sets.summaries() {
            for verdict in ["allow", "deny"] {
                drop(m.rule_checks.get_or_create(&CheckLabels {
                    set: s.name.clone(),
                    verdict,
                }));
            }
            m.set_rule_count(&s.name, "allow", s.allow);
            m.set_rule_count(&s.name, "deny", s.deny);
        }
        m
    }

    /// Counts one check of set `set` with verdict `verdict` (`"allow"` or
    /// `"deny"`).
    pub fn count_check(&self, set: &str, verdict: &'static str) {
        self.rule_checks
            .get_or_create(&CheckLabels {
                set: set.to_owned(),
                verdict,
            })
            .inc();
    }

    /// Sets the number of rules in list `list` of set `set`.
    pub fn set_rule_count(&self, set: &str, list: &'static str, n: usize) {
        self.rules
            .get_or_create(&RuleLabels {
                set: set.to_owned(),
                list,
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Creates the series of pool `pool` at zero, so they show before the
    /// first event.
    pub fn add_pool(&self, pool: &str) {
        self.set_pool_addresses(pool, 0, 0, 0);
        for kind in ["benched", "bench_suppressed", "restored"] {
            drop(self.pool_transitions.get_or_create(&TransitionLabels {
                pool: pool.to_owned(),
                kind,
            }));
        }
    }

    /// Creates the line counters of monitor `monitor` at zero.
    pub fn add_monitor(&self, monitor: &str) {
        for result in ["parsed", "malformed"] {
            drop(self.accesslog_lines.get_or_create(&LineLabels {
                monitor: monitor.to_owned(),
                result,
            }));
        }
    }

    /// Sets the address counts of pool `pool` by state.
    pub fn set_pool_addresses(
        &self,
        pool: &str,
        available: usize,
        benched: usize,
        probation: usize,
    ) {
        for (state, n) in [
            ("available", available),
            ("benched", benched),
            ("probation", probation),
        ] {
            self.pool_addresses
                .get_or_create(&PoolStateLabels {
                    pool: pool.to_owned(),
                    state,
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Counts one transition of kind `kind` in pool `pool`.
    pub fn count_transition(&self, pool: &str, kind: &'static str) {
        self.pool_transitions
            .get_or_create(&TransitionLabels {
                pool: pool.to_owned(),
                kind,
            })
            .inc();
    }

    /// Counts `parsed` and `malformed` lines of monitor `monitor`.
    pub fn count_lines(&self, monitor: &str, parsed: u64, malformed: u64) {
        for (result, n) in [("parsed", parsed), ("malformed", malformed)] {
            if n > 0 {
                self.accesslog_lines
                    .get_or_create(&LineLabels {
                        monitor: monitor.to_owned(),
                        result,
                    })
                    .inc_by(n);
            }
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
