//! A policy as an nftables table, for block lists too large for a socket
//! filter or meant to protect more than ippool's own listeners.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use iprules::{Policy, RuleSet, Verdict};

use super::space::{self, Span, V4_FIRST, V4_LAST};

/// What [`nft_script`] produces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftOptions {
    /// The table's name (in family `inet`). Default: `ippool`.
    pub table: String,
    /// Restrict every rule to these TCP destination ports; empty: all
    /// traffic to the host. Default: empty.
    pub ports: Vec<u16>,
}

impl Default for NftOptions {
    fn default() -> NftOptions {
        NftOptions {
            table: "ippool".to_owned(),
            ports: Vec::new(),
        }
    }
}

/// Why a policy could not be exported.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NftError {
    /// The table name is not a plain nftables identifier.
    #[error(
        "`{0}` is not a valid nftables table name (letters, digits and `_`, starting with a letter)"
    )]
    BadTable(String),
    /// A default-deny policy with no ports would drop all traffic to the host.
    #[error(
        "a policy whose default is deny can only be exported for given ports (it would cut off the whole host)"
    )]
    DefaultDenyNeedsPorts,
}

/// The policy at `now` as an nftables script that replaces the table
/// atomically when loaded with `nft -f`.
///
/// - Sets `deny_v4`, `deny_v6`, `allow_v4`, `allow_v6` (`flags interval`):
///   overlapping and touching rules are merged, so nft never sees
///   conflicting intervals. An element is printed as an address, a prefix
///   when it is exactly a CIDR block (`10.0.0.0/8`), or a range `a-b`.
///   IPv4-mapped IPv6 rules go to the IPv4 sets, where IPv4 packets meet
///   them.
/// - Expiring entries keep their remaining lifetime as an element
///   `timeout` (rounded up to a second; such a set gets `flags interval,
///   timeout`); expired entries are left out. Where entries overlap, the
///   one that lasts longest wins.
/// - Chain `input` (`hook input priority 0; policy accept`): allowed
///   sources are accepted first (allow wins), then denied ones dropped; a
///   default-deny policy ends with a drop, which needs
///   [`NftOptions::ports`].
///
/// ```
/// use std::time::{Duration, Instant};
/// use gateway::guard::{NftOptions, nft_script};
/// let now = Instant::now();
/// let mut p = iprules::Policy::default();
/// p.deny.add("10.0.0.0/8".parse()?);
/// p.deny.add("192.0.2.10-192.0.2.20".parse()?);
/// p.deny.add_until("2001:db8::/64".parse()?, now + Duration::from_secs(600));
/// let script = nft_script(&p, now, &NftOptions::default())?;
/// assert!(script.contains("elements = { 10.0.0.0/8, 192.0.2.10-192.0.2.20 }"));
/// assert!(script.contains("2001:db8::/64 timeout 600s"));
/// assert!(script.contains("ip saddr @deny_v4 drop"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn nft_script(policy: &Policy, now: Instant, opts: &NftOptions) -> Result<String, NftError> {
    let table = &opts.table;
    let valid = table
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(NftError::BadTable(table.clone()));
    }
    if policy.default == Verdict::Deny && opts.ports.is_empty() {
        return Err(NftError::DefaultDenyNeedsPorts);
    }
    let ports = match opts.ports.as_slice() {
        [] => String::new(),
        [p] => format!("tcp dport {p} "),
        many => {
            let list: Vec<String> = many.iter().map(u16::to_string).collect();
            format!("tcp dport {{ {} }} ", list.join(", "))
        }
    };
    let deny = elements(&policy.deny, now);
    let allow = elements(&policy.allow, now);

    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        s,
        "# ippool IP rules as an nftables table. Load with `nft -f FILE`:\n\
         # the table is replaced atomically.\n\
         add table inet {table}\n\
         delete table inet {table}\n\
         table inet {table} {{"
    );
    for (name, family, set) in [
        ("allow_v4", "ipv4_addr", &allow.0),
        ("allow_v6", "ipv6_addr", &allow.1),
        ("deny_v4", "ipv4_addr", &deny.0),
        ("deny_v6", "ipv6_addr", &deny.1),
    ] {
        write_set(&mut s, name, family, set, now);
    }
    let _ = writeln!(s, "\tchain input {{");
    let _ = writeln!(s, "\t\ttype filter hook input priority 0; policy accept;");
    let _ = writeln!(s, "\t\t{ports}ip saddr @allow_v4 accept");
    let _ = writeln!(s, "\t\t{ports}ip6 saddr @allow_v6 accept");
    if policy.default == Verdict::Deny {
        let _ = writeln!(s, "\t\t{ports}drop");
    } else {
        let _ = writeln!(s, "\t\t{ports}ip saddr @deny_v4 drop");
        let _ = writeln!(s, "\t\t{ports}ip6 saddr @deny_v6 drop");
    }
    let _ = writeln!(s, "\t}}\n}}");
    Ok(s)
}

/// Disjoint elements with their expiry, split into IPv4 and IPv6.
type Elements = Vec<(Span, Option<Instant>)>;

fn elements(set: &RuleSet, now: Instant) -> (Elements, Elements) {
    let (mut live, _) = space::live(set, now);
    // Longest-lasting first (permanent before any expiry): each entry
    // claims only what nothing longer-lasting already holds.
    live.sort_by_key(|(_, exp)| std::cmp::Reverse(exp.map_or(Duration::MAX, |t| t - now)));
    let mut claimed: BTreeMap<u128, (u128, Option<Instant>)> = BTreeMap::new();
    for ((lo, hi), exp) in live {
        let mut gaps = Vec::new();
        let mut cur = Some(lo);
        // Claimed intervals that may overlap [lo, hi]: the one starting at
        // or before lo, and every one starting inside.
        let first = claimed
            .range(..=lo)
            .next_back()
            .map(|(s, _)| *s)
            .unwrap_or(lo);
        for (&s, &(e, _)) in claimed.range(first..=hi) {
            let Some(c) = cur else { break };
            if e < c {
                continue;
            }
            if s > c {
                gaps.push((c, s - 1));
            }
            cur = e.checked_add(1).filter(|n| *n <= hi);
        }
        if let Some(c) = cur {
            gaps.push((c, hi));
        }
        for (s, e) in gaps {
            claimed.insert(s, (e, exp));
        }
    }
    // Merge neighbours with the same expiry, then split by family.
    let mut merged: Vec<(Span, Option<Instant>)> = Vec::new();
    for (s, (e, exp)) in claimed {
        match merged.last_mut() {
            Some(((_, le), lexp)) if *lexp == exp && le.checked_add(1) == Some(s) => *le = e,
            _ => merged.push(((s, e), exp)),
        }
    }
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for ((lo, hi), exp) in merged {
        for part in space::clip(&[(lo, hi)], V4_FIRST, V4_LAST) {
            v4.push((part, exp));
        }
        for part in space::clip(&[(lo, hi)], 0, V4_FIRST - 1)
            .into_iter()
            .chain(space::clip(&[(lo, hi)], V4_LAST + 1, u128::MAX))
        {
            v6.push((part, exp));
        }
    }
    (v4, v6)
}

fn write_set(s: &mut String, name: &str, family: &str, elements: &Elements, now: Instant) {
    let timeouts = elements.iter().any(|(_, exp)| exp.is_some());
    let flags = if timeouts {
        "interval, timeout"
    } else {
        "interval"
    };
    let _ = write!(s, "\tset {name} {{ type {family}; flags {flags};");
    if !elements.is_empty() {
        let list: Vec<String> = elements
            .iter()
            .map(|(span, exp)| {
                let mut e = element(*span);
                if let Some(t) = exp {
                    let left = t.saturating_duration_since(now);
                    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                    let _ = write!(e, " timeout {}s", secs.max(1));
                }
                e
            })
            .collect();
        let _ = write!(s, " elements = {{ {} }}", list.join(", "));
    }
    let _ = writeln!(s, " }}");
}

/// One element: an address, a CIDR prefix or a range.
fn element((lo, hi): Span) -> String {
    let v4 = (V4_FIRST..=V4_LAST).contains(&lo);
    let addr = |p: u128| -> IpAddr {
        if v4 {
            // Inside the mapped block the low 32 bits are the address.
            IpAddr::V4(Ipv4Addr::from(p as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(p))
        }
    };
    if lo == hi {
        return addr(lo).to_string();
    }
    let size = hi.wrapping_sub(lo).wrapping_add(1); // 0 means the whole space
    let aligned = if size == 0 {
        lo == 0
    } else {
        size.is_power_of_two() && lo & (size - 1) == 0
    };
    if aligned {
        let host_bits = if size == 0 {
            128
        } else {
            size.trailing_zeros()
        };
        let bits = if v4 { 32 } else { 128 };
        if host_bits <= bits {
            return format!("{}/{}", addr(lo), bits - host_bits);
        }
    }
    format!("{}-{}", addr(lo), addr(hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_forms() {
        let k = |s: &str| space::key(s.parse().unwrap());
        assert_eq!(element((k("10.0.0.0"), k("10.255.255.255"))), "10.0.0.0/8");
        assert_eq!(element((k("10.0.0.1"), k("10.0.0.1"))), "10.0.0.1");
        assert_eq!(element((k("10.0.0.1"), k("10.0.0.2"))), "10.0.0.1-10.0.0.2");
        assert_eq!(element((k("0.0.0.0"), k("255.255.255.255"))), "0.0.0.0/0");
        assert_eq!(element((0, u128::MAX)), "::/0");
        assert_eq!(
            element((k("2001:db8::"), k("2001:db8::ffff"))),
            "2001:db8::/112"
        );
    }

    #[test]
    fn overlapping_expiries_are_split_longest_wins() {
        let now = Instant::now();
        let mut set = RuleSet::new();
        set.add_until(
            "10.0.0.0/24".parse().unwrap(),
            now + Duration::from_secs(60),
        );
        set.add("10.0.0.128/25".parse().unwrap());
        set.add_until("10.0.0.5".parse().unwrap(), now + Duration::from_secs(600));
        set.add_until(
            "10.0.1.0/24".parse().unwrap(),
            now + Duration::from_secs(60),
        );
        let (v4, v6) = elements(&set, now);
        assert!(v6.is_empty());
        let shown: Vec<String> = v4
            .iter()
            .map(|(s, e)| format!("{} {:?}", element(*s), e.map(|t| (t - now).as_secs())))
            .collect();
        assert_eq!(
            shown,
            [
                "10.0.0.0-10.0.0.4 Some(60)",
                "10.0.0.5 Some(600)",
                "10.0.0.6-10.0.0.127 Some(60)",
                "10.0.0.128/25 None",
                "10.0.1.0/24 Some(60)",
            ]
        );
    }
}
