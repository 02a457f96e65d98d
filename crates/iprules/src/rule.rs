//! The `Rule` type: one address, an inclusive range or a CIDR subnet, with
//! its text form.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::space;

/// One IP rule: a single address, an inclusive range or a CIDR subnet.
///
/// A rule remembers how it was written (IPv4, IPv6 or IPv4-mapped IPv6) so
/// that its text form round-trips, but matching happens in one address space
/// where the IPv4 address `a.b.c.d` and the IPv4-mapped IPv6 address
/// `::ffff:a.b.c.d` are the same point. So `10.0.0.0/8` matches
/// `::ffff:10.1.2.3`, and `::ffff:10.0.0.0/104` matches `10.1.2.3`.
///
/// A consequence worth knowing: an IPv6 rule whose range includes
/// `::ffff:0.0.0.0/96` also matches IPv4 peers (`::/0` matches everything).
/// Write `2000::/3` to mean "global IPv6 unicast" only.
///
/// Rules are validated on construction: a range's start may not be after its
/// end, both ends must be of one family, and a subnet may not have host bits
/// set (`10.0.0.1/8` is refused, with the corrected `10.0.0.0/8` in the
/// error) because a typo in a deny list should be loud, not silently widened.
///
/// ```
/// use iprules::Rule;
/// let r: Rule = "10.0.0.1-10.0.0.10".parse()?;
/// assert!(r.contains("10.0.0.5".parse()?));
/// assert!(r.contains("::ffff:10.0.0.5".parse()?));
/// assert_eq!(r.to_string(), "10.0.0.1-10.0.0.10");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    repr: Repr,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Repr {
    Address(IpAddr),
    Range(IpAddr, IpAddr),
    Subnet(IpAddr, u8),
}

/// What kind of rule a [`Rule`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleKind {
    /// One address, such as `10.0.0.1`.
    Address,
    /// An inclusive range of addresses, such as `10.0.0.1-10.0.0.10`.
    Range,
    /// A CIDR subnet, such as `10.0.0.0/8`.
    Subnet,
}

/// Why a rule could not be built or parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The text was empty (or only white space).
    #[error("empty rule: expected an address, a range `a-b` or a subnet `a/len`")]
    Empty,
    /// A part of the text that should be an IP address is not one.
    #[error("`{text}` is not an IPv4 or IPv6 address")]
    BadAddress {
        /// The offending text.
        text: String,
    },
    /// The part after `/` is not a decimal prefix length.
    #[error("`{text}` is not a prefix length (expected a number such as 24)")]
    BadPrefix {
        /// The offending text.
        text: String,
    },
    /// The prefix length is longer than the address family allows.
    #[error("prefix /{prefix} is longer than the {max} bits of an {family} address")]
    PrefixTooLong {
        /// The prefix length given.
        prefix: u32,
        /// The longest prefix for the family (32 or 128).
        max: u8,
        /// `"IPv4"` or `"IPv6"`.
        family: &'static str,
    },
    /// A subnet was written with bits set after its prefix.
    #[error("{addr}/{prefix} has host bits set; write the network address: {network}/{prefix}")]
    HostBitsSet {
        /// The address as written.
        addr: IpAddr,
        /// The prefix length.
        prefix: u8,
        /// The network address the subnet should have been written with.
        network: IpAddr,
    },
    /// A range whose start is after its end.
    #[error("range start {start} is after its end {end}")]
    RangeReversed {
        /// The start as written.
        start: IpAddr,
        /// The end as written.
        end: IpAddr,
    },
    /// A range with one IPv4 end and one IPv6 end.
    #[error(
        "range {start}-{end} mixes IPv4 and IPv6; write both ends in one family (IPv4-mapped `::ffff:a.b.c.d` for IPv6)"
    )]
    MixedFamilies {
        /// The start as written.
        start: IpAddr,
        /// The end as written.
        end: IpAddr,
    },
}

impl Rule {
    /// A rule matching exactly one address.
    pub fn address(addr: IpAddr) -> Rule {
        Rule {
            repr: Repr::Address(addr),
        }
    }

    /// A rule matching every address from `start` to `end`, both included.
    ///
    /// Both ends must be of the same family and `start <= end`.
    pub fn range(start: IpAddr, end: IpAddr) -> Result<Rule, RuleError> {
        if start.is_ipv4() != end.is_ipv4() {
            return Err(RuleError::MixedFamilies { start, end });
        }
        if space::key(start) > space::key(end) {
            return Err(RuleError::RangeReversed { start, end });
        }
        Ok(Rule {
            repr: Repr::Range(start, end),
        })
    }

    /// A rule matching the CIDR subnet `network/prefix`.
    ///
    /// Fails if `prefix` is longer than the family allows or if `network`
    /// has bits set after the prefix.
    pub fn subnet(network: IpAddr, prefix: u8) -> Result<Rule, RuleError> {
        let max = max_prefix(network);
        if prefix > max {
            return Err(RuleError::PrefixTooLong {
                prefix: u32::from(prefix),
                max,
                family: family_name(network),
            });
        }
        let masked = mask(network, prefix);
        if masked != network {
            return Err(RuleError::HostBitsSet {
                addr: network,
                prefix,
                network: masked,
            });
        }
        Ok(Rule {
            repr: Repr::Subnet(network, prefix),
        })
    }

    /// What kind of rule this is.
    pub fn kind(&self) -> RuleKind {
        match self.repr {
            Repr::Address(_) => RuleKind::Address,
            Repr::Range(..) => RuleKind::Range,
            Repr::Subnet(..) => RuleKind::Subnet,
        }
    }

    /// The first address the rule matches, in the family it was written in.
    pub fn first(&self) -> IpAddr {
        match self.repr {
            Repr::Address(a) | Repr::Range(a, _) | Repr::Subnet(a, _) => a,
        }
    }

    /// The last address the rule matches, in the family it was written in.
    pub fn last(&self) -> IpAddr {
        match self.repr {
            Repr::Address(a) => a,
            Repr::Range(_, b) => b,
            Repr::Subnet(a, p) => last_of(a, p),
        }
    }

    /// The prefix length, for a subnet rule.
    pub fn prefix_len(&self) -> Option<u8> {
        match self.repr {
            Repr::Subnet(_, p) => Some(p),
            _ => None,
        }
    }

    /// Whether `addr` falls inside this rule (IPv4 and IPv4-mapped IPv6
    /// addresses are the same point).
    pub fn contains(&self, addr: IpAddr) -> bool {
        let (lo, hi) = self.bounds();
        let k = space::key(addr);
        lo <= k && k <= hi
    }

    /// Whether the rule was written as IPv6 (including IPv4-mapped IPv6).
    pub fn is_ipv6(&self) -> bool {
        self.first().is_ipv6()
    }

    /// Rebuilds a rule from its stored parts (already validated when the
    /// rule was first made). `kind`: 0 address, 1 range, 2 subnet.
    pub(crate) fn from_parts(kind: u8, first: IpAddr, last: IpAddr, prefix: u8) -> Rule {
        let repr = match kind {
            0 => Repr::Address(first),
            1 => Repr::Range(first, last),
            _ => Repr::Subnet(first, prefix),
        };
        Rule { repr }
    }

    /// The stored kind code used by [`Rule::from_parts`].
    pub(crate) fn kind_code(&self) -> u8 {
        match self.repr {
            Repr::Address(_) => 0,
            Repr::Range(..) => 1,
            Repr::Subnet(..) => 2,
        }
    }

    /// First and last point in the unified 128-bit space.
    pub(crate) fn bounds(&self) -> (u128, u128) {
        (space::key(self.first()), space::key(self.last()))
    }
}

fn family_name(a: IpAddr) -> &'static str {
    if a.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn max_prefix(a: IpAddr) -> u8 {
    if a.is_ipv4() { 32 } else { 128 }
}

fn mask(a: IpAddr, prefix: u8) -> IpAddr {
    match a {
        IpAddr::V4(v4) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & m))
        }
        IpAddr::V6(v6) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & m))
        }
    }
}

fn last_of(a: IpAddr, prefix: u8) -> IpAddr {
    match a {
        IpAddr::V4(v4) => {
            let host = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) | host))
        }
        IpAddr::V6(v6) => {
            let host = u128::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) | host))
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.repr {
            Repr::Address(a) => write!(f, "{a}"),
            Repr::Range(a, b) => write!(f, "{a}-{b}"),
            Repr::Subnet(a, p) => write!(f, "{a}/{p}"),
        }
    }
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rule({self})")
    }
}

fn parse_addr(text: &str) -> Result<IpAddr, RuleError> {
    text.parse().map_err(|_| RuleError::BadAddress {
        text: text.to_owned(),
    })
}

impl FromStr for Rule {
    type Err = RuleError;

    /// Parses `10.0.0.1`, `10.0.0.0/8`, `10.0.0.1-10.0.0.10`,
    /// `2001:db8::/32`, `::ffff:1.2.3.4`. White space around the text and
    /// around `-` and `/` is allowed.
    fn from_str(s: &str) -> Result<Rule, RuleError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(RuleError::Empty);
        }
        if let Some((addr, prefix)) = s.split_once('/') {
            let addr = parse_addr(addr.trim())?;
            let ptext = prefix.trim();
            if ptext.is_empty() || !ptext.bytes().all(|b| b.is_ascii_digit()) {
                return Err(RuleError::BadPrefix {
                    text: prefix.to_owned(),
                });
            }
            // Any run of digits: saturate instead of overflowing so the error
            // says "too long" rather than "not a number".
            let p = ptext.parse::<u32>().unwrap_or(u32::MAX);
            let max = max_prefix(addr);
            if p > u32::from(max) {
                return Err(RuleError::PrefixTooLong {
                    prefix: p,
                    max,
                    family: family_name(addr),
                });
            }
            // p <= 128 here, so the conversion cannot fail.
            return Rule::subnet(addr, u8::try_from(p).unwrap_or(max));
        }
        if let Some((a, b)) = s.split_once('-') {
            let start = parse_addr(a.trim())?;
            let end = parse_addr(b.trim())?;
            return Rule::range(start, end);
        }
        Ok(Rule::address(parse_addr(s)?))
    }
}

impl From<IpAddr> for Rule {
    fn from(addr: IpAddr) -> Rule {
        Rule::address(addr)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rule, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Rule;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an IP rule such as \"10.0.0.1\", \"10.0.0.0/8\" or \"10.0.0.1-10.0.0.9\"",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Rule, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// An error in a rule list, naming the line (1-based) and its text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: `{text}`: {error}")]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// The rule text on that line (comment and white space removed).
    pub text: String,
    /// What was wrong with it.
    #[source]
    pub error: RuleError,
}

/// Parses a rule list: one rule per line, `#` starts a comment (whole-line
/// or trailing), blank lines are skipped.
///
/// Stops at the first bad line; the error names its 1-based number and text.
///
/// ```
/// let rules = iprules::parse_rules("# bad actors\n10.0.0.0/8\n\n2001:db8::1  # one host\n")?;
/// assert_eq!(rules.len(), 2);
/// let err = iprules::parse_rules("10.0.0.1\n10.0.0.1/8\n").unwrap_err();
/// assert_eq!(err.line, 2);
/// # Ok::<(), iprules::LineError>(())
/// ```
pub fn parse_rules(text: &str) -> Result<Vec<Rule>, LineError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let body = match line.find('#') {
            Some(at) => &line[..at],
            None => line,
        }
        .trim();
        if body.is_empty() {
            continue;
        }
        match body.parse() {
            Ok(r) => out.push(r),
            Err(error) => {
                return Err(LineError {
                    line: i + 1,
                    text: body.to_owned(),
                    error,
                });
            }
        }
    }
    Ok(out)
}
