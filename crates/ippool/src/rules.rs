//! The named rule policies of `[rules.<name>]`, shared by the admin API,
//! the `rules check` command and (later) the listeners.

use std::collections::BTreeMap;
use std::net::IpAddr;

use iprules::{Policy, Reason, Rule, Shared, Verdict};
use serde::Serialize;

/// The rule sets by name. Each policy is a [`Shared`] so that readers on
/// hot paths never wait and a writer (admin mutations, auto-blocking) can
/// replace it.
#[derive(Debug, Default)]
pub struct RuleSets {
    sets: BTreeMap<String, Shared<Policy>>,
}

/// Which list of a policy a rule belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum List {
    /// The allow list.
    Allow,
    /// The deny list.
    Deny,
}

impl List {
    /// `"allow"` or `"deny"`.
    pub fn as_str(self) -> &'static str {
        match self {
            List::Allow => "allow",
            List::Deny => "deny",
        }
    }
}

/// `"allow"` or `"deny"`.
pub fn verdict_str(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
    }
}

/// The answer for one address, as the API returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// The address checked.
    pub ip: IpAddr,
    /// `"allow"` or `"deny"`.
    pub verdict: &'static str,
    /// The rule that decided, or `null` when the default applied.
    pub rule: Option<String>,
    /// The list of that rule, or `null` when the default applied.
    pub list: Option<List>,
}

impl CheckReport {
    /// Builds the report of a policy decision.
    pub fn new(ip: IpAddr, verdict: Verdict, reason: Reason) -> CheckReport {
        let (rule, list): (Option<Rule>, _) = match reason {
            Reason::Allowed(r) => (Some(r), Some(List::Allow)),
            Reason::Denied(r) => (Some(r), Some(List::Deny)),
            Reason::Default => (None, None),
        };
        CheckReport {
            ip,
            verdict: verdict_str(verdict),
            rule: rule.map(|r| r.to_string()),
            list,
        }
    }

    /// Whether the verdict is allow.
    pub fn is_allowed(&self) -> bool {
        self.verdict == "allow"
    }

    /// `allow list: 10.0.0.1`, `deny list: 10.0.0.0/8` or `default`.
    pub fn reason_text(&self) -> String {
        match (&self.list, &self.rule) {
            (Some(list), Some(rule)) => format!("{} list: {rule}", list.as_str()),
            _ => "default".to_owned(),
        }
    }
}

/// A rule set's name and sizes, for listings and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SetSummary {
    /// The set's name.
    pub name: String,
    /// The verdict when no rule matches.
    pub default: &'static str,
    /// Rules in the allow list.
    pub allow: usize,
    /// Rules in the deny list.
    pub deny: usize,
}

impl RuleSets {
    /// Adds (or replaces) a set.
    pub fn insert(&mut self, name: &str, policy: Policy) {
        self.sets.insert(name.to_owned(), Shared::new(policy));
    }

    /// The set called `name`.
    pub fn get(&self, name: &str) -> Option<&Shared<Policy>> {
        self.sets.get(name)
    }

    /// The names of all sets, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sets.keys().map(String::as_str)
    }

    /// Decides about `ip` in set `name`; `None` if there is no such set.
    pub fn check(&self, name: &str, ip: IpAddr) -> Option<CheckReport> {
        let d = self.get(name)?.read(|p| p.decide(ip));
        Some(CheckReport::new(ip, d.verdict, d.reason))
    }

    /// One summary per set, sorted by name.
    pub fn summaries(&self) -> Vec<SetSummary> {
        self.sets
            .iter()
            .map(|(name, shared)| {
                shared.read(|p| SetSummary {
                    name: name.clone(),
                    default: verdict_str(p.default),
                    allow: p.allow.len(),
                    deny: p.deny.len(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_reports_rule_and_list() {
        let mut p = Policy::new(Verdict::Allow);
        p.deny.add("10.0.0.0/8".parse().unwrap());
        p.allow.add("10.1.2.3".parse().unwrap());
        let mut sets = RuleSets::default();
        sets.insert("clients", p);
        let r = sets.check("clients", "10.9.9.9".parse().unwrap()).unwrap();
        assert_eq!(
            (r.verdict, r.rule.as_deref(), r.list),
            ("deny", Some("10.0.0.0/8"), Some(List::Deny))
        );
        assert_eq!(r.reason_text(), "deny list: 10.0.0.0/8");
        let r = sets.check("clients", "10.1.2.3".parse().unwrap()).unwrap();
        assert!(r.is_allowed());
        assert_eq!(r.list, Some(List::Allow));
        let r = sets.check("clients", "192.0.2.1".parse().unwrap()).unwrap();
        assert_eq!(
            (
                r.verdict,
                r.rule.as_deref(),
                r.list,
                r.reason_text().as_str()
            ),
            ("allow", None, None, "default")
        );
        assert!(sets.check("nope", "192.0.2.1".parse().unwrap()).is_none());
        let json =
            serde_json::to_string(&sets.check("clients", "10.9.9.9".parse().unwrap())).unwrap();
        assert_eq!(
            json,
            r#"{"ip":"10.9.9.9","verdict":"deny","rule":"10.0.0.0/8","list":"deny"}"#
        );
        assert_eq!(
            sets.summaries()[0],
            SetSummary {
                name: "clients".into(),
                default: "allow",
                allow: 1,
                deny: 1
            }
        );
    }
}
