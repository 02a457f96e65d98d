//! The default destination policy: no loopback, private, link-local,
//! metadata or otherwise special destinations unless an allow rule says so.

use iprules::{Policy, Rule, Verdict};

/// The ranges the egress proxy refuses by default, with why, in the order
/// shown to users.
const DEFAULT_DENY: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\", unspecified"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "carrier-grade NAT (RFC 6598)"),
    ("127.0.0.0/8", "loopback"),
    (
        "169.254.0.0/16",
        "link-local, cloud metadata (169.254.169.254)",
    ),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking (RFC 2544)"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, broadcast"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "local-use NAT64 (RFC 8215)"),
    ("100::/64", "discard-only (RFC 6666)"),
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "unique local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
];

/// The destination ranges the egress proxy refuses unless an allow rule
/// punches a hole, each with a short reason (for `ippool check`, the docs
/// and error messages).
///
/// IPv4-mapped IPv6 forms (`::ffff:127.0.0.1`) match the IPv4 rules, so
/// they need no entries of their own.
///
/// ```
/// let rules = gateway::egress::default_deny_rules();
/// assert!(rules.iter().any(|(r, _)| r.to_string() == "169.254.0.0/16"));
/// ```
pub fn default_deny_rules() -> Vec<(Rule, &'static str)> {
    DEFAULT_DENY
        .iter()
        .filter_map(|(r, why)| r.parse::<Rule>().ok().map(|r| (r, *why)))
        .collect()
}

/// The default destination policy: [`default_deny_rules`] denied, an empty
/// allow set, everything else allowed. Add allow rules to reach private
/// destinations on purpose (tests in network namespaces allow `10.0.0.0/8`,
/// `fd00::/8` or `2001:db8::/32`).
///
/// ```
/// let mut policy = gateway::egress::default_policy();
/// assert!(!policy.allows("::ffff:169.254.169.254".parse().unwrap()));
/// policy.allow.add("10.1.0.0/16".parse().unwrap());
/// assert!(policy.allows("10.1.2.3".parse().unwrap()));
/// assert!(!policy.allows("10.2.0.1".parse().unwrap()));
/// ```
pub fn default_policy() -> Policy {
    let mut p = Policy::new(Verdict::Allow);
    p.deny
        .extend(default_deny_rules().into_iter().map(|(rule, _)| rule));
    p
}

/// Why the default policy denies `rule`, if it is one of its rules.
pub(crate) fn default_reason(rule: &Rule) -> Option<&'static str> {
    DEFAULT_DENY
        .iter()
        .find(|(r, _)| r.parse::<Rule>().ok().as_ref() == Some(rule))
        .map(|(_, why)| *why)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each range of the list, at both ends, is refused, in its IPv4-mapped
    /// form too; and the addresses just outside a range that no other rule
    /// covers are not.
    #[test]
    fn each_default_range_is_denied_at_both_ends() {
        let p = default_policy();
        for (rule, why) in default_deny_rules() {
            let (lo, hi) = (rule.first(), rule.last());
            for ip in [lo, hi] {
                assert!(!p.allows(ip), "{ip} ({rule}, {why})");
                if let std::net::IpAddr::V4(v4) = ip {
                    let mapped = std::net::IpAddr::V6(v4.to_ipv6_mapped());
                    assert!(!p.allows(mapped), "{mapped} ({rule})");
                }
            }
        }
        for outside in [
            "11.0.0.0",
            "9.255.255.255",
            "100.128.0.0",
            "169.253.255.255",
            "2001:db9::",
        ] {
            assert!(p.allows(outside.parse().unwrap()), "{outside}");
        }
    }

    #[test]
    fn every_default_rule_parses() {
        assert_eq!(default_deny_rules().len(), DEFAULT_DENY.len());
    }

    #[test]
    fn default_policy_denies_special_and_allows_public() {
        let p = default_policy();
        for denied in [
            "127.0.0.1",
            "10.1.2.3",
            "172.31.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "::",
            "::1",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.1",
            "2001:db8::1",
        ] {
            assert!(!p.allows(denied.parse().unwrap()), "{denied}");
        }
        for allowed in ["1.1.1.1", "93.184.215.14", "2606:4700::1111", "8.8.8.8"] {
            assert!(p.allows(allowed.parse().unwrap()), "{allowed}");
        }
        assert_eq!(
            default_reason(&"127.0.0.0/8".parse().unwrap()),
            Some("loopback")
        );
    }
}
