//! `Policy`: an allow set, a deny set and a default verdict.

use std::net::IpAddr;
use std::time::Instant;

use crate::rule::Rule;
use crate::set::RuleSet;

/// What a policy says about an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Verdict {
    /// Let it through.
    #[default]
    Allow,
    /// Refuse it.
    Deny,
}

/// Why a policy gave its verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A rule of the allow set matched.
    Allowed(Rule),
    /// A rule of the deny set matched and no allow rule did.
    Denied(Rule),
    /// No rule matched: the policy's default applied.
    Default,
}

/// A policy's answer: the verdict and the rule (if any) that decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny.
    pub verdict: Verdict,
    /// Which rule decided, or the default.
    pub reason: Reason,
}

impl Decision {
    /// Whether the verdict is [`Verdict::Allow`].
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

/// An allow set, a deny set and a default verdict.
///
/// Allow wins over deny: an allow entry punches a hole in a deny rule. With
/// the default set to [`Verdict::Deny`], the allow set is an allow list.
///
/// ```
/// use iprules::{Policy, Reason, Verdict};
/// let mut p = Policy::default(); // default: allow
/// p.deny.add("10.0.0.0/8".parse()?);
/// p.allow.add("10.0.0.7".parse()?);
/// assert_eq!(p.decide("10.0.0.8".parse()?).verdict, Verdict::Deny);
/// let d = p.decide("10.0.0.7".parse()?);
/// assert_eq!(d.reason, Reason::Allowed("10.0.0.7".parse()?));
/// assert!(p.decide("192.0.2.1".parse()?).is_allowed());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Rules that let an address through, whatever the deny set says.
    pub allow: RuleSet,
    /// Rules that refuse an address unless an allow rule matches.
    pub deny: RuleSet,
    /// The verdict when no rule matches.
    pub default: Verdict,
}

impl Policy {
    /// A policy with empty sets and the given default.
    pub fn new(default: Verdict) -> Policy {
        Policy {
            default,
            ..Policy::default()
        }
    }

    /// Decides about `addr`.
    #[inline]
    pub fn decide(&self, addr: IpAddr) -> Decision {
        if let Some(rule) = self.allow.check(addr) {
            return Decision {
                verdict: Verdict::Allow,
                reason: Reason::Allowed(rule),
            };
        }
        if let Some(rule) = self.deny.check(addr) {
            return Decision {
                verdict: Verdict::Deny,
                reason: Reason::Denied(rule),
            };
        }
        Decision {
            verdict: self.default,
            reason: Reason::Default,
        }
    }

    /// [`decide`](Policy::decide) with the current time given.
    pub fn decide_at(&self, addr: IpAddr, now: Instant) -> Decision {
        if let Some(rule) = self.allow.check_at(addr, now) {
            return Decision {
                verdict: Verdict::Allow,
                reason: Reason::Allowed(rule),
            };
        }
        if let Some(rule) = self.deny.check_at(addr, now) {
            return Decision {
                verdict: Verdict::Deny,
                reason: Reason::Denied(rule),
            };
        }
        Decision {
            verdict: self.default,
            reason: Reason::Default,
        }
    }

    /// Whether `addr` is allowed.
    #[inline]
    pub fn allows(&self, addr: IpAddr) -> bool {
        self.decide(addr).is_allowed()
    }
}
