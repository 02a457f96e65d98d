//! Prometheus metrics of the daemon, encoded with `prometheus-client`.
//!
//! - `ippool_build_info{version}`: always 1.
//! - `ippool_rule_checks_total{set,verdict}`: rule checks answered.
//! - `ippool_rules{set,list}`: rules in each list of each set.

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

/// The registry and the handles to update it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rule_checks: Family<CheckLabels, Counter>,
    rules: Family<RuleLabels, Gauge>,
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
        let m = Metrics {
            registry,
            rule_checks,
            rules,
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

    /// The text exposition of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
