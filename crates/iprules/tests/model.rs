//! Property tests: `RuleSet` and `Policy` against a naive linear model with
//! the documented semantics (first live rule in insertion order wins;
//! re-adding with another expiry replaces; expired entries never match).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use iprules::{Policy, Reason, Rule, RuleSet, Verdict};
use proptest::prelude::*;

/// Written independently of the crate: IPv4 compared as IPv4-mapped IPv6.
fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

fn model_contains(rule: &Rule, ip: IpAddr) -> bool {
    let x = as_v6(ip);
    as_v6(rule.first()) <= x && x <= as_v6(rule.last())
}

#[derive(Default, Clone)]
struct Model {
    entries: Vec<(Rule, Option<Instant>)>,
}

impl Model {
    fn live(e: &(Rule, Option<Instant>), now: Instant) -> bool {
        e.1.is_none_or(|t| now < t)
    }
    fn purge(&mut self, now: Instant) {
        self.entries.retain(|e| Model::live(e, now));
    }
    fn check(&self, ip: IpAddr, now: Instant) -> Option<Rule> {
        self.entries
            .iter()
            .find(|e| Model::live(e, now) && model_contains(&e.0, ip))
            .map(|e| e.0)
    }
    fn add(&mut self, rule: Rule, exp: Option<Instant>, now: Instant) -> bool {
        self.purge(now);
        let expired = exp.is_some_and(|t| t <= now);
        if let Some(i) = self.entries.iter().position(|e| e.0 == rule) {
            if self.entries[i].1 == exp {
                return false;
            }
            self.entries.remove(i);
            if expired {
                return true;
            }
        } else if expired {
            return false;
        }
        self.entries.push((rule, exp));
        true
    }
    fn remove(&mut self, rule: &Rule, now: Instant) -> bool {
        self.purge(now);
        match self.entries.iter().position(|e| e.0 == *rule) {
            Some(i) => {
                self.entries.remove(i);
                true
            }
            None => false,
        }
    }
    fn live_entries(&self, now: Instant) -> Vec<(Rule, Option<Instant>)> {
        self.entries
            .iter()
            .filter(|e| Model::live(e, now))
            .copied()
            .collect()
    }
}

const MAPPED_LO: u128 = 0xffff_u128 << 32;
const MAPPED_HI: u128 = MAPPED_LO | 0xffff_ffff;

fn v4_addr() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        4 => (0u32..24).prop_map(|x| Ipv4Addr::new(10, 0, 0, x as u8)),
        1 => Just(Ipv4Addr::UNSPECIFIED),
        1 => Just(Ipv4Addr::new(0, 0, 0, 1)),
        1 => Just(Ipv4Addr::new(255, 255, 255, 254)),
        1 => Just(Ipv4Addr::BROADCAST),
        2 => any::<u32>().prop_map(Ipv4Addr::from),
    ]
}

fn v6_addr() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![
        3 => (0u128..24).prop_map(|x| Ipv6Addr::from(0x2001_0db8_u128 << 96 | x)),
        1 => Just(Ipv6Addr::UNSPECIFIED),
        1 => Just(Ipv6Addr::LOCALHOST),
        1 => Just(Ipv6Addr::from(u128::MAX)),
        1 => Just(Ipv6Addr::from(MAPPED_LO - 1)),
        1 => Just(Ipv6Addr::from(MAPPED_HI + 1)),
        3 => v4_addr().prop_map(|a| a.to_ipv6_mapped()),
        2 => any::<u128>().prop_map(Ipv6Addr::from),
    ]
}

fn addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        v4_addr().prop_map(IpAddr::V4),
        v6_addr().prop_map(IpAddr::V6)
    ]
}

fn subnet_of(a: IpAddr, p: u8) -> Rule {
    let net = match a {
        IpAddr::V4(v) => {
            let m = u32::MAX.checked_shl(32 - u32::from(p)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v) & m))
        }
        IpAddr::V6(v) => {
            let m = u128::MAX.checked_shl(128 - u32::from(p)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v) & m))
        }
    };
    Rule::subnet(net, p).expect("masked subnet is valid")
}

fn rule() -> impl Strategy<Value = Rule> {
    let v4_prefix = prop::sample::select(vec![0u8, 1, 8, 16, 24, 28, 29, 30, 31, 32]);
    let v6_prefix = prop::sample::select(vec![0u8, 1, 32, 64, 95, 96, 104, 120, 126, 127, 128]);
    prop_oneof![
        addr().prop_map(Rule::address),
        (v4_addr(), v4_addr()).prop_map(|(a, b)| {
            let (a, b) = if a <= b { (a, b) } else { (b, a) };
            Rule::range(a.into(), b.into()).expect("ordered range")
        }),
        (v6_addr(), v6_addr()).prop_map(|(a, b)| {
            let (a, b) = if a <= b { (a, b) } else { (b, a) };
            Rule::range(a.into(), b.into()).expect("ordered range")
        }),
        (v4_addr(), v4_prefix).prop_map(|(a, p)| subnet_of(a.into(), p)),
        (v6_addr(), v6_prefix).prop_map(|(a, p)| subnet_of(a.into(), p)),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Add(Rule, Option<u64>),
    /// Remove the i-th rule ever added (mod count), or a fresh one.
    Remove(usize, Rule),
    Extend(Vec<Rule>),
    Advance(u64),
    Check(IpAddr),
    Clear,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        30 => (rule(), prop::option::of(1u64..8)).prop_map(|(r, e)| Op::Add(r, e)),
        10 => (any::<usize>(), rule()).prop_map(|(i, r)| Op::Remove(i, r)),
        2 => prop::collection::vec(rule(), 0..60).prop_map(Op::Extend),
        5 => (0u64..4).prop_map(Op::Advance),
        30 => addr().prop_map(Op::Check),
        1 => Just(Op::Clear),
    ]
}

fn probes() -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = (0..26u8)
        .map(|x| IpAddr::V4(Ipv4Addr::new(10, 0, 0, x)))
        .collect();
    v.extend((0..26u8).map(|x| IpAddr::V6(Ipv4Addr::new(10, 0, 0, x).to_ipv6_mapped())));
    v.extend((0..26u128).map(|x| IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | x))));
    for k in [
        0,
        1,
        MAPPED_LO - 1,
        MAPPED_LO,
        MAPPED_HI,
        MAPPED_HI + 1,
        u128::MAX,
    ] {
        v.push(IpAddr::V6(Ipv6Addr::from(k)));
    }
    v.extend([Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST].map(IpAddr::V4));
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ruleset_matches_model(ops in prop::collection::vec(op(), 1..160)) {
        let t0 = Instant::now();
        let mut now = t0 + Duration::from_secs(1);
        let mut set = RuleSet::new();
        let mut model = Model::default();
        let mut history: Vec<Rule> = Vec::new();
        for op in ops {
            match op {
                Op::Add(r, e) => {
                    let exp = e.map(|s| now + Duration::from_secs(s));
                    history.push(r);
                    prop_assert_eq!(set.add_until_at(r, exp, now), model.add(r, exp, now), "add {}", r);
                }
                Op::Remove(i, fresh) => {
                    let r = if history.is_empty() || i % 4 == 0 { fresh } else { history[i % history.len()] };
                    prop_assert_eq!(set.remove_at(&r, now), model.remove(&r, now), "remove {}", r);
                }
                Op::Extend(rules) => {
                    // `extend` purges at the real clock, which is behind the
                    // simulated one: purge the model at the same real time.
                    for r in &rules {
                        history.push(*r);
                        model.add(*r, None, now);
                    }
                    set.extend(rules);
                }
                Op::Advance(s) => now += Duration::from_secs(s),
                Op::Check(ip) => {
                    prop_assert_eq!(set.check_at(ip, now), model.check(ip, now), "check {}", ip);
                }
                Op::Clear => {
                    set.clear();
                    model = Model::default();
                }
            }
            prop_assert_eq!(set.len_at(now), model.live_entries(now).len());
        }
        prop_assert_eq!(set.iter_at(now).collect::<Vec<_>>(), model.live_entries(now));
        for ip in probes() {
            prop_assert_eq!(set.check_at(ip, now), model.check(ip, now), "probe {}", ip);
        }
        // A clone is an independent snapshot.
        let snap = set.clone();
        let before: Vec<_> = probes().into_iter().map(|ip| snap.check_at(ip, now)).collect();
        set.clear();
        let after: Vec<_> = probes().into_iter().map(|ip| snap.check_at(ip, now)).collect();
        prop_assert_eq!(before, after);
    }

    #[test]
    fn policy_matches_model(
        allow in prop::collection::vec(rule(), 0..20),
        deny in prop::collection::vec(rule(), 0..40),
        default_deny in any::<bool>(),
        ips in prop::collection::vec(addr(), 1..60),
    ) {
        let mut p = Policy::new(if default_deny { Verdict::Deny } else { Verdict::Allow });
        p.allow.extend(allow.iter().copied());
        p.deny.extend(deny.iter().copied());
        for ip in ips.into_iter().chain(probes()) {
            let d = p.decide(ip);
            let a = allow.iter().find(|r| model_contains(r, ip));
            let n = deny.iter().find(|r| model_contains(r, ip));
            match (a, n) {
                (Some(r), _) => {
                    prop_assert_eq!(d.verdict, Verdict::Allow);
                    prop_assert_eq!(d.reason, Reason::Allowed(*r));
                }
                (None, Some(r)) => {
                    prop_assert_eq!(d.verdict, Verdict::Deny);
                    prop_assert_eq!(d.reason, Reason::Denied(*r));
                }
                (None, None) => {
                    prop_assert_eq!(d.verdict, p.default);
                    prop_assert_eq!(d.reason, Reason::Default);
                }
            }
        }
    }
}

/// Large sets use the IPv4 top-16-bit table (6,000 overlapping ranges make
/// well over the 4,096 segments that turn it on); check it against the model.
#[test]
fn large_random_set_matches_model() {
    let mut rng = 0x1234_5678_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut rules = Vec::new();
    for _ in 0..6_000 {
        let start = (next() as u32).min(u32::MAX - 4096);
        let len = (next() % 4096) as u32;
        rules.push(
            Rule::range(
                IpAddr::V4(Ipv4Addr::from(start)),
                IpAddr::V4(Ipv4Addr::from(start + len)),
            )
            .expect("ordered"),
        );
    }
    let set: RuleSet = rules.iter().copied().collect();
    let now = Instant::now();
    let mut model = Model::default();
    for r in &rules {
        model.add(*r, None, now);
    }
    assert_eq!(set.len(), model.entries.len());
    for i in 0..6_000 {
        let ip = if i % 2 == 0 {
            let r = &rules[(next() % rules.len() as u64) as usize];
            match r.first() {
                IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) + (next() % 2) as u32)),
                other => other,
            }
        } else {
            IpAddr::V4(Ipv4Addr::from(next() as u32))
        };
        assert_eq!(set.check(ip), model.check(ip, now), "{ip}");
    }
}

/// Removing a permanent rule that shadowed others makes them visible again.
#[test]
fn removing_a_shadowing_rule_uncovers_later_ones() {
    let mut set = RuleSet::new();
    let wide: Rule = "10.0.0.0/8".parse().expect("rule");
    let narrow: Rule = "10.1.0.0/16".parse().expect("rule");
    set.extend([wide, narrow]);
    let ip = "10.1.2.3".parse().expect("ip");
    assert_eq!(set.check(ip), Some(wide));
    assert!(set.remove(&wide));
    assert_eq!(set.check(ip), Some(narrow));
    assert_eq!(set.len(), 1);
}

/// An expired entry stops matching with no write in between.
#[test]
fn expiry_needs_no_sweep() {
    let t0 = Instant::now();
    let mut set = RuleSet::new();
    let ban: Rule = "198.51.100.7".parse().expect("rule");
    let net: Rule = "198.51.100.0/24".parse().expect("rule");
    set.add_until_at(ban, Some(t0 + Duration::from_secs(60)), t0);
    set.add_until_at(net, Some(t0 + Duration::from_secs(120)), t0);
    let ip = "198.51.100.7".parse().expect("ip");
    assert_eq!(set.check_at(ip, t0 + Duration::from_secs(59)), Some(ban));
    assert_eq!(set.check_at(ip, t0 + Duration::from_secs(60)), Some(net));
    assert_eq!(set.check_at(ip, t0 + Duration::from_secs(120)), None);
    assert_eq!(set.len_at(t0 + Duration::from_secs(60)), 1);
    assert_eq!(set.get(&ban), Some(Some(t0 + Duration::from_secs(60))));
}
