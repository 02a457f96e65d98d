//! The benchmark rule mix, shared by `benches/check.rs` and
//! `examples/rulebench.rs`: 45% IPv4 subnets /24–/32, 45% IPv4 ranges of
//! 1–256 addresses, 10% IPv6 subnets /32–/64; queries half hits, half
//! random addresses (almost all misses). Deterministic for a given seed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use iprules::Rule;

/// SplitMix64: small, fast, good enough for benchmark data.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `n` rules of the mix.
pub fn rules(n: usize, seed: u64) -> Vec<Rule> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let pick = rng.below(100);
        let rule = if pick < 45 {
            let prefix = 24 + rng.below(9) as u8;
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            let net = Ipv4Addr::from(rng.next_u64() as u32 & mask);
            Rule::subnet(IpAddr::V4(net), prefix)
        } else if pick < 90 {
            let start = (rng.next_u64() as u32).min(u32::MAX - 256);
            let len = 1 + rng.below(256) as u32;
            Rule::range(
                IpAddr::V4(Ipv4Addr::from(start)),
                IpAddr::V4(Ipv4Addr::from(start + len - 1)),
            )
        } else {
            let prefix = 32 + rng.below(33) as u8;
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            // Inside 2000::/3, global unicast.
            let raw = (u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64())) >> 3
                | (1u128 << 125);
            Rule::subnet(IpAddr::V6(Ipv6Addr::from(raw & mask)), prefix)
        };
        out.push(rule.expect("generated rules are valid"));
    }
    out
}

fn inside(rule: &Rule, rng: &mut Rng) -> IpAddr {
    match (rule.first(), rule.last()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let (a, b) = (u32::from(a), u32::from(b));
            IpAddr::V4(Ipv4Addr::from(
                a + (rng.next_u64() % (u64::from(b - a) + 1)) as u32,
            ))
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let (a, b) = (u128::from(a), u128::from(b));
            let span = b - a;
            let off = (u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()))
                % span.saturating_add(1).max(1);
            IpAddr::V6(Ipv6Addr::from(a + off))
        }
        (a, _) => a,
    }
}

/// `n` queries: even ones inside a random rule, odd ones random addresses.
pub fn queries(rules: &[Rule], n: usize, seed: u64) -> Vec<IpAddr> {
    let mut rng = Rng(seed ^ 0x5151);
    (0..n)
        .map(|i| {
            if i % 2 == 0 && !rules.is_empty() {
                let r = &rules[rng.below(rules.len() as u64) as usize];
                inside(r, &mut rng)
            } else if rng.below(10) == 0 {
                let raw = (u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64())) >> 3
                    | (1u128 << 125);
                IpAddr::V6(Ipv6Addr::from(raw))
            } else {
                IpAddr::V4(Ipv4Addr::from(rng.next_u64() as u32))
            }
        })
        .collect()
}
