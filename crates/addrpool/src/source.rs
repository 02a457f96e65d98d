//! Address sources and the orders in which they are drawn.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::IpNet;

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// The order in which a [`Source`] hands out its addresses.
///
/// Orders apply to CIDR, range, list and file sources; an iterator source
/// ([`Source::iter`]) is drawn in its own order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// First to last, once (the default).
    #[default]
    Sequential,
    /// Every address once, in a random order, without repeats until the
    /// source is exhausted (a keyed permutation: nothing is materialised, so
    /// this holds for a /64 as well).
    Random,
    /// First to last, then again from the first, forever. Retired addresses
    /// come back on the next round.
    Cycle,
}

/// Where a pool's addresses come from: CIDR ranges, inclusive ranges,
/// explicit lists, a file, or any iterator.
///
/// Ranges are never materialised: a whole IPv6 /64 costs a few bytes.
/// A pool is of one address family; a source that mixes IPv4 and IPv6 is
/// rejected.
///
/// ```
/// use addrpool::Source;
/// let a: Source = "2001:db8::/64".parse().unwrap();
/// let b: Source = "10.0.0.10-10.0.0.20".parse().unwrap();
/// let c: Source = "192.0.2.1, 192.0.2.7".parse().unwrap();
/// let d = Source::iter((1..=30u8).map(|i| std::net::Ipv4Addr::new(127, 0, 1, i).into()));
/// # let _ = (a, b, c, d);
/// ```
pub struct Source {
    inner: Inner,
}

enum Inner {
    Segments(Vec<Segment>),
    Iter(Box<dyn Iterator<Item = IpAddr> + Send>),
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Segments(s) => f.debug_tuple("Source").field(s).finish(),
            Inner::Iter(_) => f.write_str("Source(<iterator>)"),
        }
    }
}

/// An inclusive run of addresses of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) family: Family,
    pub(crate) first: u128,
    pub(crate) last: u128,
    /// Prefix length when the segment came from an IPv4 CIDR (its network
    /// and broadcast addresses are excluded unless asked otherwise).
    pub(crate) v4_cidr: Option<u8>,
}

impl Segment {
    fn single(ip: IpAddr) -> Segment {
        let v = to_u128(ip);
        Segment {
            family: Family::of(ip),
            first: v,
            last: v,
            v4_cidr: None,
        }
    }

    fn cidr(net: IpNet) -> Segment {
        let net = net.trunc();
        Segment {
            family: Family::of(net.addr()),
            first: to_u128(net.network()),
            last: to_u128(net.broadcast()),
            v4_cidr: match net {
                IpNet::V4(n) => Some(n.prefix_len()),
                IpNet::V6(_) => None,
            },
        }
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        Family::of(ip) == self.family && (self.first..=self.last).contains(&to_u128(ip))
    }

    pub(crate) fn first_ip(&self) -> IpAddr {
        from_u128(self.family, self.first)
    }

    pub(crate) fn last_ip(&self) -> IpAddr {
        from_u128(self.family, self.last)
    }

    /// The CIDR blocks that exactly cover this segment.
    pub(crate) fn subnets(&self) -> Vec<IpNet> {
        match (self.first_ip(), self.last_ip()) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                ipnet::Ipv4Subnets::new(a, b, 0).map(IpNet::V4).collect()
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                ipnet::Ipv6Subnets::new(a, b, 0).map(IpNet::V6).collect()
            }
            _ => Vec::new(),
        }
    }
}

pub(crate) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

pub(crate) fn from_u128(family: Family, v: u128) -> IpAddr {
    match family {
        // Truncation is intended: IPv4 segments never exceed u32::MAX.
        Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

/// Why a [`Source`] could not be built or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// An inclusive range whose ends are of different families or reversed.
    #[error("invalid range {start} - {end}: {reason}")]
    BadRange {
        /// First address of the range.
        start: IpAddr,
        /// Last address of the range.
        end: IpAddr,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// IPv4 and IPv6 in one source.
    #[error("source mixes IPv4 and IPv6 ({first} and {other}); use one pool per family")]
    MixedFamilies {
        /// The first address seen.
        first: IpAddr,
        /// An address of the other family.
        other: IpAddr,
    },
    /// A source with no address at all.
    #[error("address source is empty")]
    Empty,
    /// More than 2^128 - 1 addresses in total.
    #[error("address source is too large (more than 2^128 - 1 addresses)")]
    TooLarge,
    /// Text that is not an address, a CIDR or a range.
    #[error("cannot parse {input:?} as an IP address, CIDR or range (a.b.c.d-e.f.g.h)")]
    Parse {
        /// The offending text.
        input: String,
    },
    /// A line of a source file that is not an address, a CIDR or a range.
    #[error("{path}:{line}: cannot parse {text:?} as an IP address, CIDR or range")]
    FileLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The offending text.
        text: String,
    },
    /// A source file that cannot be read.
    #[error("cannot read address file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl Source {
    /// All addresses of a CIDR block (host bits are ignored). For IPv4
    /// blocks shorter than /31 the network and broadcast addresses are
    /// skipped unless `PoolOptions::include_network_broadcast` is set.
    pub fn cidr(net: IpNet) -> Source {
        Source {
            inner: Inner::Segments(vec![Segment::cidr(net)]),
        }
    }

    /// The inclusive range `start..=end` (same family, `start <= end`).
    pub fn range(start: IpAddr, end: IpAddr) -> Result<Source, SourceError> {
        Ok(Source {
            inner: Inner::Segments(vec![range_segment(start, end)?]),
        })
    }

    /// An explicit list, handed out in the given order (or shuffled with
    /// [`Order::Random`]).
    pub fn list(addrs: impl IntoIterator<Item = IpAddr>) -> Result<Source, SourceError> {
        let segs: Vec<Segment> = addrs.into_iter().map(Segment::single).collect();
        check_segments(&segs)?;
        Ok(Source {
            inner: Inner::Segments(segs),
        })
    }

    /// Reads a file with one address, CIDR (`2001:db8::/64`) or inclusive
    /// range (`10.0.0.1-10.0.0.9`) per line; blank lines and `#` comments
    /// are ignored. Errors name the file and line.
    pub fn file(path: impl AsRef<Path>) -> Result<Source, SourceError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| SourceError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut segs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            let seg = parse_entry(entry).map_err(|_| SourceError::FileLine {
                path: path.to_owned(),
                line: i + 1,
                text: entry.to_owned(),
            })?;
            segs.push(seg);
        }
        check_segments(&segs)?;
        Ok(Source {
            inner: Inner::Segments(segs),
        })
    }

    /// Any iterator, for full control (the seed's "iterable"): it may be
    /// endless, repeat itself, or compute addresses on the fly. It is drawn
    /// lazily, in its own order; addresses of another family than the first
    /// one are skipped.
    pub fn iter(addrs: impl Iterator<Item = IpAddr> + Send + 'static) -> Source {
        Source {
            inner: Inner::Iter(Box::new(addrs)),
        }
    }

    /// The family of the source, when known without drawing from it (not for
    /// iterator sources).
    pub fn family(&self) -> Option<Family> {
        match &self.inner {
            Inner::Segments(s) => s.first().map(|s| s.family),
            Inner::Iter(_) => None,
        }
    }

    /// Builds the internal stream for a pool.
    pub(crate) fn into_stream(
        self,
        order: Order,
        include_network_broadcast: bool,
    ) -> Result<AddrStream, SourceError> {
        match self.inner {
            Inner::Segments(mut segs) => {
                let cover = segs.clone();
                if !include_network_broadcast {
                    for s in &mut segs {
                        if matches!(s.v4_cidr, Some(len) if len < 31) {
                            s.first += 1;
                            s.last -= 1;
                        }
                    }
                }
                check_segments(&segs)?;
                let mut ends = Vec::with_capacity(segs.len());
                let mut total: u128 = 0;
                for s in &segs {
                    let size = (s.last - s.first)
                        .checked_add(1)
                        .ok_or(SourceError::TooLarge)?;
                    total = total.checked_add(size).ok_or(SourceError::TooLarge)?;
                    ends.push(total);
                }
                let family = segs[0].family;
                Ok(AddrStream {
                    family: Some(family),
                    cover,
                    kind: Kind::Indexed {
                        perm: (order == Order::Random).then(|| Box::new(Perm::new(total))),
                        segs,
                        ends,
                        total,
                        order,
                        pos: 0,
                    },
                })
            }
            Inner::Iter(mut it) => {
                let first = it.next();
                Ok(AddrStream {
                    family: first.map(Family::of),
                    cover: Vec::new(),
                    kind: Kind::Iter { pending: first, it },
                })
            }
        }
    }
}

impl FromStr for Source {
    type Err = SourceError;

    /// Parses `CIDR`, `first-last`, a single address, or a comma-separated
    /// list of those.
    fn from_str(s: &str) -> Result<Source, SourceError> {
        let segs = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(parse_entry)
            .collect::<Result<Vec<_>, _>>()?;
        check_segments(&segs)?;
        Ok(Source {
            inner: Inner::Segments(segs),
        })
    }
}

impl From<IpNet> for Source {
    fn from(net: IpNet) -> Source {
        Source::cidr(net)
    }
}

fn parse_entry(s: &str) -> Result<Segment, SourceError> {
    let err = || SourceError::Parse {
        input: s.to_owned(),
    };
    if let Some((a, b)) = s.split_once('-') {
        let a: IpAddr = a.trim().parse().map_err(|_| err())?;
        let b: IpAddr = b.trim().parse().map_err(|_| err())?;
        return range_segment(a, b);
    }
    if s.contains('/') {
        return s.parse::<IpNet>().map(Segment::cidr).map_err(|_| err());
    }
    s.parse::<IpAddr>().map(Segment::single).map_err(|_| err())
}

fn range_segment(start: IpAddr, end: IpAddr) -> Result<Segment, SourceError> {
    if Family::of(start) != Family::of(end) {
        return Err(SourceError::BadRange {
            start,
            end,
            reason: "the ends are of different families",
        });
    }
    let (first, last) = (to_u128(start), to_u128(end));
    if first > last {
        return Err(SourceError::BadRange {
            start,
            end,
            reason: "the first address is after the last",
        });
    }
    Ok(Segment {
        family: Family::of(start),
        first,
        last,
        v4_cidr: None,
    })
}

fn check_segments(segs: &[Segment]) -> Result<(), SourceError> {
    let first = segs.first().ok_or(SourceError::Empty)?;
    if let Some(other) = segs.iter().find(|s| s.family != first.family) {
        return Err(SourceError::MixedFamilies {
            first: first.first_ip(),
            other: other.first_ip(),
        });
    }
    if segs.iter().any(|s| s.first > s.last) {
        // An IPv4 /31-less CIDR cannot get here; kept for safety.
        return Err(SourceError::Empty);
    }
    Ok(())
}

/// A source being drawn by a pool.
pub(crate) struct AddrStream {
    family: Option<Family>,
    /// The source's blocks as given (IPv4 network and broadcast included),
    /// for route checks.
    cover: Vec<Segment>,
    kind: Kind,
}

enum Kind {
    Indexed {
        segs: Vec<Segment>,
        /// Cumulative sizes: `ends[i]` is the index one past segment `i`.
        ends: Vec<u128>,
        total: u128,
        order: Order,
        perm: Option<Box<Perm>>,
        pos: u128,
    },
    Iter {
        pending: Option<IpAddr>,
        it: Box<dyn Iterator<Item = IpAddr> + Send>,
    },
}

impl AddrStream {
    /// The family of the addresses (None only for an empty iterator).
    pub(crate) fn family(&self) -> Option<Family> {
        self.family
    }

    /// The segments, when the source is made of ranges.
    pub(crate) fn segments(&self) -> Option<&[Segment]> {
        match &self.kind {
            Kind::Indexed { segs, .. } => Some(segs),
            Kind::Iter { .. } => None,
        }
    }

    /// The blocks as given (with IPv4 network and broadcast addresses),
    /// when the source is made of ranges.
    pub(crate) fn cover(&self) -> Option<&[Segment]> {
        self.segments().map(|_| self.cover.as_slice())
    }

    /// Whether `ip` belongs to the source (None when it cannot be told).
    pub(crate) fn contains(&self, ip: IpAddr) -> Option<bool> {
        self.segments().map(|s| s.iter().any(|s| s.contains(ip)))
    }

    /// How many addresses one pass yields, when known.
    pub(crate) fn len(&self) -> Option<u128> {
        match &self.kind {
            Kind::Indexed { total, .. } => Some(*total),
            Kind::Iter { .. } => None,
        }
    }

    /// The next address, or None once exhausted (never for `Cycle`; for an
    /// iterator, also after [`OTHER_FAMILY_MAX`] addresses in a row of the
    /// other family).
    pub(crate) fn next_addr(&mut self) -> Option<IpAddr> {
        match &mut self.kind {
            Kind::Indexed {
                segs,
                ends,
                total,
                order,
                perm,
                pos,
            } => {
                if *pos == *total {
                    if *order == Order::Cycle {
                        *pos = 0;
                    } else {
                        return None;
                    }
                }
                let i = match perm {
                    Some(p) => p.apply(*pos),
                    None => *pos,
                };
                *pos += 1;
                let j = ends.partition_point(|e| *e <= i);
                let seg = segs[j];
                let start = ends[j] - (seg.last - seg.first + 1);
                Some(from_u128(seg.family, seg.first + (i - start)))
            }
            Kind::Iter { pending, it } => {
                // Bounded: draws run under the pool's lock, and an endless
                // iterator of the other family must not hang every lease.
                for skipped in 0..OTHER_FAMILY_MAX {
                    let ip = pending.take().or_else(|| it.next())?;
                    if Some(Family::of(ip)) == self.family {
                        return Some(ip);
                    }
                    if skipped == 0 {
                        tracing::warn!(%ip, "address source yielded an address of the other family; skipped");
                    }
                }
                tracing::error!(
                    skipped = OTHER_FAMILY_MAX,
                    "address source yields only addresses of the other family; taken as exhausted"
                );
                None
            }
        }
    }
}

/// How many addresses of the other family in a row an iterator source may
/// yield before it is taken as exhausted.
const OTHER_FAMILY_MAX: usize = 4096;

/// A keyed pseudo-random permutation of `0..n` (cycle-walking over a
/// bijection of the enclosing power of two).
#[derive(Debug, Clone)]
struct Perm {
    n: u128,
    bits: u32,
    mask: u128,
    mul: [u128; 4],
    add: [u128; 4],
}

impl Perm {
    fn new(n: u128) -> Perm {
        let bits = if n <= 1 {
            0
        } else {
            128 - (n - 1).leading_zeros()
        };
        let mask = if bits == 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        };
        Perm {
            n,
            bits,
            mask,
            mul: std::array::from_fn(|_| rand::random::<u128>() | 1),
            add: std::array::from_fn(|_| rand::random::<u128>()),
        }
    }

    fn round(&self, mut x: u128) -> u128 {
        let shift = self.bits.div_ceil(2).max(1);
        for r in 0..4 {
            x = x.wrapping_mul(self.mul[r]) & self.mask;
            x ^= x >> shift;
            x = x.wrapping_add(self.add[r]) & self.mask;
        }
        x
    }

    fn apply(&self, i: u128) -> u128 {
        if self.bits == 0 {
            return i;
        }
        let mut x = i;
        loop {
            x = self.round(x);
            if x < self.n {
                return x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn drain(s: Source, order: Order, incl: bool, max: usize) -> Vec<IpAddr> {
        let mut st = s.into_stream(order, incl).unwrap();
        std::iter::from_fn(|| st.next_addr()).take(max).collect()
    }

    #[test]
    fn sequential_cidr_skips_network_and_broadcast() {
        let v = drain(
            "192.0.2.0/29".parse().unwrap(),
            Order::Sequential,
            false,
            100,
        );
        let want: Vec<IpAddr> = (1..=6)
            .map(|i| IpAddr::V4(Ipv4Addr::new(192, 0, 2, i)))
            .collect();
        assert_eq!(v, want);
        let all = drain(
            "192.0.2.0/29".parse().unwrap(),
            Order::Sequential,
            true,
            100,
        );
        assert_eq!(all.len(), 8);
        // /31 and /32 keep both addresses.
        assert_eq!(
            drain("192.0.2.0/31".parse().unwrap(), Order::Sequential, false, 9).len(),
            2
        );
        // IPv6 has no broadcast.
        assert_eq!(
            drain(
                "2001:db8::/126".parse().unwrap(),
                Order::Sequential,
                false,
                9
            )
            .len(),
            4
        );
    }

    #[test]
    fn random_is_a_permutation() {
        for n in [1u32, 2, 3, 7, 64, 100, 1000] {
            let src = Source::range(
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)),
                IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n - 1)),
            )
            .unwrap();
            let v = drain(src, Order::Random, true, 10_000);
            assert_eq!(v.len(), n as usize);
            assert_eq!(v.iter().collect::<HashSet<_>>().len(), n as usize);
        }
        let v = drain("10.0.0.0/24".parse().unwrap(), Order::Random, true, 1000);
        let seq = drain(
            "10.0.0.0/24".parse().unwrap(),
            Order::Sequential,
            true,
            1000,
        );
        assert_ne!(v, seq, "random order should not be sequential");
    }

    #[test]
    fn random_over_a_slash_64_has_no_repeats_and_stays_inside() {
        let net: IpNet = "2001:db8:1:2::/64".parse().unwrap();
        let v = drain(Source::cidr(net), Order::Random, false, 100_000);
        assert_eq!(v.iter().collect::<HashSet<_>>().len(), 100_000);
        assert!(v.iter().all(|a| net.contains(a)));
        // Whole IPv6 space minus one bit still works.
        let v = drain("::/1".parse().unwrap(), Order::Random, false, 1000);
        assert_eq!(v.iter().collect::<HashSet<_>>().len(), 1000);
    }

    #[test]
    fn cycle_repeats_forever() {
        let v = drain("10.0.0.1-10.0.0.3".parse().unwrap(), Order::Cycle, false, 7);
        let o: Vec<u8> = v
            .iter()
            .map(|a| match a {
                IpAddr::V4(a) => a.octets()[3],
                IpAddr::V6(_) => 0,
            })
            .collect();
        assert_eq!(o, [1, 2, 3, 1, 2, 3, 1]);
    }

    #[test]
    fn lists_ranges_and_mixed_families() {
        let v = drain(
            "10.0.0.5, 10.0.0.1-10.0.0.2".parse().unwrap(),
            Order::Sequential,
            false,
            9,
        );
        assert_eq!(v.len(), 3);
        assert_eq!(v[0], IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)));
        assert!(matches!(
            "10.0.0.1, ::1".parse::<Source>(),
            Err(SourceError::MixedFamilies { .. })
        ));
        assert!(matches!(
            "10.0.0.9-10.0.0.1".parse::<Source>(),
            Err(SourceError::BadRange { .. })
        ));
        assert!(matches!(
            "10.0.0.1-::2".parse::<Source>(),
            Err(SourceError::BadRange { .. })
        ));
        assert!(matches!(
            "nope".parse::<Source>(),
            Err(SourceError::Parse { .. })
        ));
        assert!(matches!("".parse::<Source>(), Err(SourceError::Empty)));
        assert!(matches!(
            Source::cidr("::/0".parse().unwrap()).into_stream(Order::Sequential, false),
            Err(SourceError::TooLarge)
        ));
    }

    #[test]
    fn file_source_names_the_bad_line() {
        let dir = std::env::temp_dir().join(format!("addrpool-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.txt");
        std::fs::write(
            &good,
            "# pool\n10.0.0.1\n\n10.0.1.0/30  # four, two usable\n10.0.2.1-10.0.2.2\n",
        )
        .unwrap();
        let v = drain(Source::file(&good).unwrap(), Order::Sequential, false, 99);
        assert_eq!(v.len(), 5);
        let bad = dir.join("bad.txt");
        std::fs::write(&bad, "10.0.0.1\n10.0.0.300\n").unwrap();
        let err = Source::file(&bad).unwrap_err();
        assert!(
            matches!(err, SourceError::FileLine { line: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("bad.txt:2"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(Source::file(&bad), Err(SourceError::Io { .. })));
    }

    #[test]
    fn iterator_source_skips_other_family() {
        let it = vec![
            "10.0.0.1".parse().unwrap(),
            "::1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
        ];
        let mut st = Source::iter(it.into_iter())
            .into_stream(Order::Random, false)
            .unwrap();
        assert_eq!(st.family(), Some(Family::V4));
        assert_eq!(st.next_addr(), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(st.next_addr(), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(st.next_addr(), None);
    }

    #[test]
    fn an_endless_iterator_of_the_other_family_ends_instead_of_hanging() {
        let v6 = |i: u128| IpAddr::from(std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | i));
        let it = std::iter::once("10.0.0.1".parse().unwrap()).chain((1..).map(v6));
        let mut st = Source::iter(it).into_stream(Order::Random, false).unwrap();
        assert_eq!(st.next_addr(), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(st.next_addr(), None, "bounded, not an endless loop");
    }
}
