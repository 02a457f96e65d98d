//! The named rule policies of `[rules.<name>]`, shared by the admin API,
//! the `rules check` command and (later) the listeners.
//!
//! A set holds the rules of the config file (its *base*) plus rules added
//! at run time through the admin API, which `serve` persists in the store
//! and re-applies at start-up. Config rules are changed by editing the
//! file; the API refuses to remove them (they would come back on restart).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use iprules::{Policy, Reason, Rule, Shared, Verdict};
use serde::Serialize;

/// The rule sets by name. Each policy is a [`Shared`] so that readers on
/// hot paths never wait and a writer (admin mutations, auto-blocking) can
/// replace it.
#[derive(Debug, Default)]
pub struct RuleSets {
    sets: BTreeMap<String, Set>,
}

#[derive(Debug)]
struct Set {
    live: Arc<Shared<Policy>>,
    /// The rules of the config file (replaced by a reload).
    base: Shared<Policy>,
    /// Bans of misbehaving clients, written into `live`.
    autoblock: Option<Arc<gateway::guard::AutoBlock>>,
    rate_limit: Option<gateway::guard::RateLimitOptions>,
    kernel_filter: bool,
    /// Every guard made for the set's listeners (their counters are the
    /// set's hits; kept after a listener stops so the sums only grow).
    guards: std::sync::Mutex<Vec<Arc<gateway::guard::Guard>>>,
}

/// What a set adds to its listeners beyond its rules.
#[derive(Clone, Debug, Default)]
pub struct GuardOptions {
    /// Attach a kernel socket filter compiled from the set.
    pub kernel_filter: bool,
    /// Ban misbehaving clients.
    pub autoblock: Option<gateway::guard::AutoBlockOptions>,
    /// Limit connections per client and listener.
    pub rate_limit: Option<gateway::guard::RateLimitOptions>,
}

/// An active ban, as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BanView {
    /// The rule set.
    pub set: String,
    /// The client key banned.
    pub rule: String,
    /// Seconds left.
    pub remaining_seconds: f64,
    /// The ban's length, in seconds.
    pub duration_seconds: f64,
    /// How many times this client has been banned.
    pub times: u32,
    /// The offense that triggered it, if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offense: Option<&'static str>,
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
    /// `"allow"` → Allow, `"deny"` → Deny.
    pub fn parse(text: &str) -> Option<List> {
        match text {
            "allow" => Some(List::Allow),
            "deny" => Some(List::Deny),
            _ => None,
        }
    }

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

/// One rule of a listing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleEntry {
    /// The rule as text.
    pub rule: String,
    /// `"config"` (from the file) or `"runtime"` (added through the API).
    pub source: &'static str,
    /// Seconds until it expires, if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<f64>,
}

/// Every rule of a set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SetListing {
    /// The set's name.
    pub name: String,
    /// The verdict when no rule matches.
    pub default: &'static str,
    /// The allow list, in insertion order.
    pub allow: Vec<RuleEntry>,
    /// The deny list, in insertion order.
    pub deny: Vec<RuleEntry>,
}

/// Why a runtime change was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChangeError {
    /// No such set.
    #[error("no rule set `{0}`")]
    NoSet(String),
    /// The rule comes from the config file.
    #[error("{rule} is in the {list} list of the config file: edit the file and reload")]
    FromConfig {
        /// The rule.
        rule: String,
        /// The list.
        list: &'static str,
    },
    /// The rule is not in the list.
    #[error("{rule} is not in the {list} list")]
    Absent {
        /// The rule.
        rule: String,
        /// The list.
        list: &'static str,
    },
}

/// The API view of ban `b` of set `set` at `now`.
pub fn ban_view(set: &str, b: &gateway::guard::Ban, now: Instant) -> BanView {
    BanView {
        set: set.to_owned(),
        rule: b.rule.to_string(),
        remaining_seconds: b.until.saturating_duration_since(now).as_secs_f64(),
        duration_seconds: b.duration.as_secs_f64(),
        times: b.times,
        offense: b.offense.map(|o| o.name()),
    }
}

/// An `Instant` (past or future) as Unix milliseconds, given a matching (`now`,
/// `wall`).
pub fn unix_ms(at: Instant, now: Instant, wall: SystemTime) -> u64 {
    let t = if at <= now {
        wall.checked_sub(now - at)
    } else {
        wall.checked_add(at - now)
    };
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Unix milliseconds as an `Instant`; `None` when already past.
pub fn instant_of_unix_ms(ms: u64, now: Instant, wall: SystemTime) -> Option<Instant> {
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    let left = at.duration_since(wall).ok().filter(|d| !d.is_zero())?;
    now.checked_add(left)
}

impl RuleSets {
    /// Adds (or replaces) a set; `policy` is its config-file base.
    #[cfg(test)]
    pub fn insert(&mut self, name: &str, policy: Policy) {
        self.insert_with(name, policy, GuardOptions::default());
    }

    /// Adds (or replaces) a set with its auto-blocking, rate limit and
    /// kernel-filter options.
    pub fn insert_with(&mut self, name: &str, policy: Policy, guard: GuardOptions) {
        let live = Arc::new(Shared::new(policy.clone()));
        let autoblock = guard
            .autoblock
            .map(|o| Arc::new(gateway::guard::AutoBlock::new(Arc::clone(&live), o)));
        self.sets.insert(
            name.to_owned(),
            Set {
                live,
                base: Shared::new(policy),
                autoblock,
                rate_limit: guard.rate_limit,
                kernel_filter: guard.kernel_filter,
                guards: std::sync::Mutex::default(),
            },
        );
    }

    /// A new accept-time guard of set `name` for one listener (its own rate
    /// limit, per request for HTTP listeners, else per connection; the
    /// set's auto-blocking, reporting bans to `on_ban` and, when a fleet
    /// counts offenses together, offenses to `feed`).
    pub fn guard(
        &self,
        name: &str,
        per_request: bool,
        on_ban: gateway::guard::BanHook,
        feed: Option<gateway::guard::OffenseFeed>,
    ) -> Option<Arc<gateway::guard::Guard>> {
        let set = self.sets.get(name)?;
        let mut g = gateway::guard::Guard::new(Arc::clone(&set.live));
        if per_request {
            g = g.rate_per_request();
        }
        if let Some(r) = &set.rate_limit {
            g = g.with_rate_limit(Arc::new(gateway::guard::RateLimit::new(*r)));
        }
        if let Some(ab) = &set.autoblock {
            g = g.with_autoblock(Arc::clone(ab)).with_ban_hook(on_ban);
            if let Some(feed) = feed {
                g = g.with_offense_feed(feed);
            }
        }
        let g = Arc::new(g);
        set.guards
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::clone(&g));
        Some(g)
    }

    /// What the listeners' guards of each set decided so far (connections
    /// accepted, denied, rate limited), summed over every guard the set
    /// made, by set name.
    pub fn guard_counts(&self) -> Vec<(&str, gateway::guard::GuardMetrics)> {
        self.sets
            .iter()
            .map(|(name, set)| {
                let guards = set
                    .guards
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let mut sum = gateway::guard::GuardMetrics::default();
                for g in guards.iter() {
                    let m = g.metrics();
                    sum.accepted_total += m.accepted_total;
                    sum.denied_total += m.denied_total;
                    sum.rate_limited_total += m.rate_limited_total;
                }
                (name.as_str(), sum)
            })
            .collect()
    }

    /// Whether set `name` asks for a kernel socket filter.
    pub fn kernel_filter(&self, name: &str) -> bool {
        self.sets.get(name).is_some_and(|s| s.kernel_filter)
    }

    /// The set a ban hook reports for, by its auto-blocker.
    pub fn autoblock(&self, name: &str) -> Option<&Arc<gateway::guard::AutoBlock>> {
        self.sets.get(name)?.autoblock.as_ref()
    }

    /// Every active ban of every set at `now`.
    pub fn bans(&self, now: Instant) -> Vec<BanView> {
        let mut out = Vec::new();
        for (name, set) in &self.sets {
            let Some(ab) = &set.autoblock else { continue };
            for b in ab.bans(now) {
                out.push(ban_view(name, &b, now));
            }
        }
        out
    }

    /// Lifts the ban of `rule` in set `name`; whether there was one.
    pub fn lift(&self, name: &str, rule: &Rule, now: Instant) -> Result<bool, ChangeError> {
        let set = self
            .sets
            .get(name)
            .ok_or_else(|| ChangeError::NoSet(name.to_owned()))?;
        Ok(set.autoblock.as_ref().is_some_and(|ab| ab.lift(rule, now)))
    }

    /// Re-imposes bans saved in the store (at start-up); returns how many
    /// are active again. Ended ones are dropped from the store.
    pub fn restore_bans(&self, saved: Vec<store::Ban>, st: &store::Store) -> usize {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut n = 0;
        for b in saved {
            let until = SystemTime::UNIX_EPOCH + Duration::from_millis(b.until_unix_ms);
            let (Some(ab), Ok(rule)) = (self.autoblock(&b.set), b.network.parse::<Rule>()) else {
                tracing::warn!(
                    set = b.set,
                    rule = b.network,
                    "saved ban not applied (no autoblock in that set now, or unreadable); kept"
                );
                continue;
            };
            if until <= wall {
                if let Err(e) = st.remove_ban(&b.set, &b.network) {
                    tracing::warn!(error = %e, "cannot drop an ended ban");
                }
                continue;
            }
            let record = gateway::guard::BanRecord {
                rule,
                until,
                times: b.times,
            };
            n += ab.import(&[record], now, wall);
        }
        n
    }

    /// The live policy of set `name` (share it with listeners).
    pub fn get(&self, name: &str) -> Option<&Arc<Shared<Policy>>> {
        self.sets.get(name).map(|s| &s.live)
    }

    /// Adds `rule` to `list` of set `name` at run time, expiring at
    /// `expires`; whether it changed anything (a rule already there with
    /// the same expiry does not).
    pub fn add_runtime(
        &self,
        name: &str,
        list: List,
        rule: Rule,
        expires: Option<Instant>,
    ) -> Result<bool, ChangeError> {
        let set = self
            .sets
            .get(name)
            .ok_or_else(|| ChangeError::NoSet(name.to_owned()))?;
        Ok(set.live.update(|p| {
            let l = match list {
                List::Allow => &mut p.allow,
                List::Deny => &mut p.deny,
            };
            match expires {
                Some(t) => l.add_until(rule, t),
                None => l.add(rule),
            }
        }))
    }

    /// Whether `rule` is in `list` of set `name`'s config-file base.
    pub fn is_config_rule(&self, name: &str, list: List, rule: &Rule) -> bool {
        self.sets.get(name).is_some_and(|s| {
            s.base.read(|b| {
                let l = match list {
                    List::Allow => &b.allow,
                    List::Deny => &b.deny,
                };
                l.get(rule).is_some()
            })
        })
    }

    /// Checks that `rule` can be removed from `list` of `name` at run
    /// time (exists, not from the config file).
    pub fn check_removable(&self, name: &str, list: List, rule: &Rule) -> Result<(), ChangeError> {
        let set = self
            .sets
            .get(name)
            .ok_or_else(|| ChangeError::NoSet(name.to_owned()))?;
        if self.is_config_rule(name, list, rule) {
            return Err(ChangeError::FromConfig {
                rule: rule.to_string(),
                list: list.as_str(),
            });
        }
        let present = set.live.read(|p| match list {
            List::Allow => p.allow.get(rule).is_some(),
            List::Deny => p.deny.get(rule).is_some(),
        });
        if present {
            Ok(())
        } else {
            Err(ChangeError::Absent {
                rule: rule.to_string(),
                list: list.as_str(),
            })
        }
    }

    /// Removes a runtime rule (see [`RuleSets::check_removable`]).
    pub fn remove_runtime(&self, name: &str, list: List, rule: &Rule) -> Result<(), ChangeError> {
        self.check_removable(name, list, rule)?;
        if let Some(set) = self.sets.get(name) {
            set.live.update(|p| match list {
                List::Allow => p.allow.remove(rule),
                List::Deny => p.deny.remove(rule),
            });
        }
        Ok(())
    }

    /// Rules in `list` of set `name` (0 for an unknown set).
    pub fn len(&self, name: &str, list: List) -> usize {
        self.sets.get(name).map_or(0, |s| {
            s.live.read(|p| match list {
                List::Allow => p.allow.len(),
                List::Deny => p.deny.len(),
            })
        })
    }

    /// Re-applies runtime rules saved in the store (at start-up); returns
    /// how many were applied. Expired ones are dropped from the store;
    /// ones whose set or list is gone, or whose text does not parse, are
    /// logged and kept (a config edit may bring their set back).
    pub fn restore(&self, saved: Vec<store::RuntimeRule>, st: &store::Store) -> usize {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut applied = 0;
        for r in saved {
            let Some(until) = r
                .until_unix_ms
                .map(|ms| instant_of_unix_ms(ms, now, wall))
                .map_or(Some(None), |t| t.map(Some))
            else {
                if let Err(e) = st.remove_rule(&r) {
                    tracing::warn!(error = %e, "cannot drop an expired runtime rule");
                }
                continue;
            };
            let (Some(list), Ok(rule)) = (List::parse(&r.list), r.rule.parse::<Rule>()) else {
                tracing::warn!(
                    set = r.set,
                    list = r.list,
                    rule = r.rule,
                    "saved rule unreadable; kept in the store, not applied"
                );
                continue;
            };
            match self.add_runtime(&r.set, list, rule, until) {
                Ok(_) => applied += 1,
                Err(e) => {
                    tracing::warn!(rule = r.rule, error = %e, "saved rule not applied; kept in the store")
                }
            }
        }
        applied
    }

    /// Replaces the config-file rules of set `name` with `new_base` (a
    /// reload), keeping what was added at run time: runtime rules
    /// (`runtime`, from the store) and active bans. One pointer swap for
    /// readers. Returns false for an unknown set.
    pub fn reload_base(
        &self,
        name: &str,
        new_base: Policy,
        runtime: &[store::RuntimeRule],
    ) -> bool {
        let Some(set) = self.sets.get(name) else {
            return false;
        };
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut live = new_base.clone();
        for r in runtime.iter().filter(|r| r.set == name) {
            let (Some(list), Ok(rule)) = (List::parse(&r.list), r.rule.parse::<Rule>()) else {
                continue;
            };
            let until = match r.until_unix_ms.map(|ms| instant_of_unix_ms(ms, now, wall)) {
                None => None,
                Some(Some(t)) => Some(t),
                Some(None) => continue,
            };
            let l = match list {
                List::Allow => &mut live.allow,
                List::Deny => &mut live.deny,
            };
            match until {
                Some(t) => l.add_until(rule, t),
                None => l.add(rule),
            };
        }
        let bans = set
            .autoblock
            .as_ref()
            .map(|ab| ab.export(now, wall))
            .unwrap_or_default();
        // Bans go into the new policy before it is published: no window in
        // which a banned client gets in.
        for b in &bans {
            if let Ok(left) = b.until.duration_since(wall) {
                live.deny.add_until(b.rule, now + left);
            }
        }
        set.base.replace(new_base);
        set.live.replace(live);
        if let Some(ab) = &set.autoblock {
            ab.import(&bans, now, wall);
        }
        true
    }

    /// Every rule of set `name` at `now`, config and runtime.
    pub fn listing(&self, name: &str, now: Instant) -> Option<SetListing> {
        let set = self.sets.get(name)?;
        let entries = |l: &iprules::RuleSet, base: &iprules::RuleSet| -> Vec<RuleEntry> {
            l.iter_at(now)
                .map(|(r, exp)| RuleEntry {
                    rule: r.to_string(),
                    source: if base.get(&r).is_some() {
                        "config"
                    } else {
                        "runtime"
                    },
                    expires_in_seconds: exp.map(|t| t.saturating_duration_since(now).as_secs_f64()),
                })
                .collect()
        };
        let base = set.base.snapshot();
        Some(set.live.read(|p| SetListing {
            name: name.to_owned(),
            default: verdict_str(p.default),
            allow: entries(&p.allow, &base.allow),
            deny: entries(&p.deny, &base.deny),
        }))
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
            .map(|(name, set)| {
                set.live.read(|p| SetSummary {
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
        // Runtime changes: config rules stay, runtime ones come and go.
        let r: Rule = "192.0.2.0/24".parse().unwrap();
        assert_eq!(sets.add_runtime("clients", List::Deny, r, None), Ok(true));
        assert_eq!(sets.add_runtime("clients", List::Deny, r, None), Ok(false));
        assert!(
            !sets
                .check("clients", "192.0.2.1".parse().unwrap())
                .unwrap()
                .is_allowed()
        );
        let cfg: Rule = "10.0.0.0/8".parse().unwrap();
        assert!(matches!(
            sets.remove_runtime("clients", List::Deny, &cfg),
            Err(ChangeError::FromConfig { .. })
        ));
        let l = sets.listing("clients", Instant::now()).unwrap();
        assert_eq!(
            l.deny
                .iter()
                .map(|e| (e.rule.as_str(), e.source))
                .collect::<Vec<_>>(),
            [("10.0.0.0/8", "config"), ("192.0.2.0/24", "runtime")]
        );
        assert_eq!(sets.remove_runtime("clients", List::Deny, &r), Ok(()));
        assert!(matches!(
            sets.remove_runtime("clients", List::Deny, &r),
            Err(ChangeError::Absent { .. })
        ));
        assert!(
            sets.check("clients", "192.0.2.1".parse().unwrap())
                .unwrap()
                .is_allowed()
        );
        assert!(matches!(
            sets.add_runtime("nope", List::Deny, r, None),
            Err(ChangeError::NoSet(_))
        ));
        // Unix-time round trip of expiries.
        let (now, wall) = (Instant::now(), SystemTime::now());
        let ms = unix_ms(now + Duration::from_secs(90), now, wall);
        let back = instant_of_unix_ms(ms, now, wall).unwrap();
        assert!(back.duration_since(now).as_secs_f64() - 90.0 < 0.01);
        assert_eq!(instant_of_unix_ms(1, now, wall), None, "already past");

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
