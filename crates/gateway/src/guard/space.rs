//! Rule sets as sorted, disjoint intervals of one 128-bit address space
//! (the same space `iprules` matches in: IPv4 `a.b.c.d` is the point
//! `::ffff:a.b.c.d`), plus the client key used by rate limits and bans.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Instant;

use iprules::{Rule, RuleSet};

/// First point of the IPv4-mapped block `::ffff:0.0.0.0/96`.
pub(crate) const V4_FIRST: u128 = 0xffff_u128 << 32;
/// Last point of the IPv4-mapped block.
pub(crate) const V4_LAST: u128 = V4_FIRST | 0xffff_ffff;

/// An inclusive interval `[lo, hi]` of the unified space.
pub(crate) type Span = (u128, u128);

/// The point of `addr` in the unified space.
pub(crate) fn key(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => V4_FIRST | u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// A rule's first and last point.
pub(crate) fn bounds(rule: &Rule) -> Span {
    (key(rule.first()), key(rule.last()))
}

/// The live rules of `set` at `now` as intervals (unsorted), each with its
/// expiry, and the earliest expiry among them.
pub(crate) fn live(set: &RuleSet, now: Instant) -> (Vec<(Span, Option<Instant>)>, Option<Instant>) {
    let mut first_expiry: Option<Instant> = None;
    let spans = set
        .iter_at(now)
        .map(|(rule, exp)| {
            if let Some(t) = exp {
                first_expiry = Some(first_expiry.map_or(t, |f| f.min(t)));
            }
            (bounds(&rule), exp)
        })
        .collect();
    (spans, first_expiry)
}

/// Sorts and merges overlapping or touching intervals.
pub(crate) fn merge(mut spans: Vec<Span>) -> Vec<Span> {
    spans.sort_unstable();
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for (lo, hi) in spans {
        match out.last_mut() {
            Some(last) if last.1 == u128::MAX || lo <= last.1 + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// `a` minus `b`, both sorted and merged; the result is sorted and merged.
pub(crate) fn subtract(a: &[Span], b: &[Span]) -> Vec<Span> {
    let mut out = Vec::with_capacity(a.len());
    let mut j = 0;
    for &(lo, hi) in a {
        let mut cur = lo;
        // Skip holes that end before this interval.
        while j < b.len() && b[j].1 < cur {
            j += 1;
        }
        let mut k = j;
        let mut done = false;
        while k < b.len() && b[k].0 <= hi {
            let (blo, bhi) = b[k];
            if blo > cur {
                out.push((cur, blo - 1));
            }
            if bhi >= hi {
                done = true;
                break;
            }
            cur = bhi + 1;
            k += 1;
        }
        if !done {
            out.push((cur, hi));
        }
    }
    out
}

/// Everything not in `a` (sorted and merged).
pub(crate) fn complement(a: &[Span]) -> Vec<Span> {
    subtract(&[(0, u128::MAX)], a)
}

/// Keeps the parts of `a` inside `[lo, hi]`.
pub(crate) fn clip(a: &[Span], lo: u128, hi: u128) -> Vec<Span> {
    a.iter()
        .filter(|s| s.1 >= lo && s.0 <= hi)
        .map(|&(l, h)| (l.max(lo), h.min(hi)))
        .collect()
}

/// The address of a point, as IPv4 when it lies in the mapped block.
#[cfg(test)]
pub(crate) fn addr_of(point: u128) -> IpAddr {
    if (V4_FIRST..=V4_LAST).contains(&point) {
        // The mask keeps the low 32 bits, so the conversion is exact.
        IpAddr::V4(std::net::Ipv4Addr::from((point & 0xffff_ffff) as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(point))
    }
}

/// The client key of `ip`: the address itself for IPv4 (IPv4-mapped IPv6
/// counts as IPv4), its `/ipv6_prefix` network for IPv6.
///
/// Rate limits and automatic bans count per key, so a client holding a whole
/// IPv6 /64 (as every ordinary subscriber does) is one client, not 2^64.
///
/// ```
/// use gateway::guard::client_key;
/// let k = client_key("2001:db8:1:2:aaaa::1".parse()?, 64);
/// assert_eq!(k.to_string(), "2001:db8:1:2::/64");
/// assert_eq!(client_key("::ffff:192.0.2.7".parse()?, 64).to_string(), "192.0.2.7");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn client_key(ip: IpAddr, ipv6_prefix: u8) -> Rule {
    match ip.to_canonical() {
        IpAddr::V4(v4) => Rule::address(IpAddr::V4(v4)),
        IpAddr::V6(v6) => {
            let prefix = ipv6_prefix.min(128);
            if prefix == 128 {
                return Rule::address(IpAddr::V6(v6));
            }
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            let net = Ipv6Addr::from(u128::from(v6) & mask);
            // The network address has no host bits and the prefix is at most
            // 128, so this cannot fail; fall back to the address regardless.
            Rule::subnet(IpAddr::V6(net), prefix).unwrap_or(Rule::address(IpAddr::V6(v6)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_subtract_complement() {
        let m = merge(vec![(5, 9), (1, 3), (4, 4), (20, 30), (25, 40)]);
        assert_eq!(m, vec![(1, 9), (20, 40)]);
        assert_eq!(merge(vec![(0, u128::MAX), (5, 6)]), vec![(0, u128::MAX)]);
        let d = subtract(&m, &[(0, 1), (5, 5), (9, 21), (39, 100)]);
        assert_eq!(d, vec![(2, 4), (6, 8), (22, 38)]);
        assert_eq!(subtract(&[(10, 20)], &[(10, 20)]), vec![]);
        assert_eq!(complement(&[(0, 5), (10, u128::MAX)]), vec![(6, 9)]);
        assert_eq!(complement(&[]), vec![(0, u128::MAX)]);
        assert_eq!(clip(&[(0, 10), (20, 30)], 5, 25), vec![(5, 10), (20, 25)]);
    }

    #[test]
    fn keys() {
        assert_eq!(
            key("1.2.3.4".parse().unwrap()),
            key("::ffff:1.2.3.4".parse().unwrap())
        );
        assert_eq!(
            addr_of(key("1.2.3.4".parse().unwrap())).to_string(),
            "1.2.3.4"
        );
        assert_eq!(
            client_key("2001:db8::1".parse().unwrap(), 48).to_string(),
            "2001:db8::/48"
        );
        assert_eq!(
            client_key("2001:db8::1".parse().unwrap(), 128).to_string(),
            "2001:db8::1"
        );
        assert_eq!(
            client_key("2001:db8::1".parse().unwrap(), 0).to_string(),
            "::/0"
        );
    }
}
