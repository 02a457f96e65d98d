//! The text form: round trips, every error, no panics, the seed's examples.

use std::net::IpAddr;

use iprules::{LineError, Rule, RuleError, RuleKind, RuleSet, parse_rules};
use proptest::prelude::*;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn rule(s: &str) -> Rule {
    s.parse().expect("test rule")
}

#[test]
fn forms_parse_and_print() {
    for (text, kind) in [
        ("10.0.0.1", RuleKind::Address),
        ("10.0.0.0/8", RuleKind::Subnet),
        ("10.0.0.1-10.0.0.10", RuleKind::Range),
        ("2001:db8::/32", RuleKind::Subnet),
        ("::ffff:1.2.3.4", RuleKind::Address),
        ("::ffff:1.2.3.0/120", RuleKind::Subnet),
        ("0.0.0.0/0", RuleKind::Subnet),
        ("::/0", RuleKind::Subnet),
        ("255.255.255.255/32", RuleKind::Subnet),
        ("2001:db8::1-2001:db8::ff", RuleKind::Range),
    ] {
        let r = rule(text);
        assert_eq!(r.kind(), kind, "{text}");
        assert_eq!(r.to_string(), text);
    }
    // White space is tolerated and normalised away.
    assert_eq!(
        rule(" 10.0.0.1 - 10.0.0.3 ").to_string(),
        "10.0.0.1-10.0.0.3"
    );
    assert_eq!(rule("10.0.0.0 / 8").to_string(), "10.0.0.0/8");
}

#[test]
fn errors_say_what_is_wrong() {
    let cases: [(&str, RuleError); 9] = [
        ("", RuleError::Empty),
        ("   ", RuleError::Empty),
        (
            "10.0.0.256",
            RuleError::BadAddress {
                text: "10.0.0.256".into(),
            },
        ),
        (
            "fe80::1%eth0",
            RuleError::BadAddress {
                text: "fe80::1%eth0".into(),
            },
        ),
        ("10.0.0.0/x", RuleError::BadPrefix { text: "x".into() }),
        (
            "10.0.0.0/33",
            RuleError::PrefixTooLong {
                prefix: 33,
                max: 32,
                family: "IPv4",
            },
        ),
        (
            "10.0.0.1/8",
            RuleError::HostBitsSet {
                addr: ip("10.0.0.1"),
                prefix: 8,
                network: ip("10.0.0.0"),
            },
        ),
        (
            "10.0.0.9-10.0.0.1",
            RuleError::RangeReversed {
                start: ip("10.0.0.9"),
                end: ip("10.0.0.1"),
            },
        ),
        (
            "10.0.0.1-::ffff:10.0.0.9",
            RuleError::MixedFamilies {
                start: ip("10.0.0.1"),
                end: ip("::ffff:10.0.0.9"),
            },
        ),
    ];
    for (text, want) in cases {
        assert_eq!(text.parse::<Rule>(), Err(want), "{text:?}");
    }
    assert_eq!(
        "2001:db8::/129".parse::<Rule>(),
        Err(RuleError::PrefixTooLong {
            prefix: 129,
            max: 128,
            family: "IPv6"
        })
    );
    assert_eq!(
        "1.2.3.4/99999999999999999999".parse::<Rule>(),
        Err(RuleError::PrefixTooLong {
            prefix: u32::MAX,
            max: 32,
            family: "IPv4"
        })
    );
    let msg = "10.0.0.1/8".parse::<Rule>().unwrap_err().to_string();
    assert!(
        msg.contains("10.0.0.0/8"),
        "the error suggests the fix: {msg}"
    );
}

#[test]
fn rule_lists_name_the_bad_line() {
    let text = "# header\n10.0.0.0/8\n\n  192.0.2.1 # trailing comment\n2001:db8:8000::/32\n";
    let err = parse_rules(text).unwrap_err();
    assert_eq!(
        err,
        LineError {
            line: 5,
            text: "2001:db8:8000::/32".into(),
            error: RuleError::HostBitsSet {
                addr: ip("2001:db8:8000::"),
                prefix: 32,
                network: ip("2001:db8::"),
            },
        }
    );
    let err = parse_rules("10.0.0.0/8\nnot-an-ip\n").unwrap_err();
    assert_eq!(err.line, 2);
    assert_eq!(err.text, "not-an-ip");
    assert!(err.to_string().starts_with("line 2: `not-an-ip`:"), "{err}");
    let ok = parse_rules("# only\n\n10.0.0.0/8 # x\n::1\n").expect("valid list");
    assert_eq!(ok, vec![rule("10.0.0.0/8"), rule("::1")]);
}

/// The examples of the seed (Node's net.BlockList PR), IPv4-mapped both ways.
#[test]
fn seed_examples() {
    let mut set = RuleSet::new();
    set.add(rule("123.123.123.123"));
    set.add(rule("::f8f8"));
    set.add(rule("10.0.0.1-10.0.0.10"));
    set.add(rule("123.123.0.0/16"));
    assert_eq!(
        set.check(ip("123.123.123.123")),
        Some(rule("123.123.123.123"))
    );
    assert_eq!(
        set.check(ip("::ffff:123.123.123.123")),
        Some(rule("123.123.123.123"))
    );
    assert_eq!(
        set.check(ip("::ffff:7b7b:7b7b")),
        Some(rule("123.123.123.123"))
    );
    assert_eq!(set.check(ip("123.123.1.1")), Some(rule("123.123.0.0/16")));
    assert_eq!(set.check(ip("10.0.0.10")), Some(rule("10.0.0.1-10.0.0.10")));
    assert_eq!(set.check(ip("10.0.0.11")), None);
    assert_eq!(set.check(ip("::f8f8")), Some(rule("::f8f8")));
    assert_eq!(set.check(ip("::f8f9")), None);
    // And an IPv4 address matches a rule written in the mapped form.
    set.add(rule("::ffff:198.51.100.0/120"));
    assert_eq!(
        set.check(ip("198.51.100.77")),
        Some(rule("::ffff:198.51.100.0/120"))
    );
    // IPv4-compatible (deprecated, ::a.b.c.d) is not IPv4-mapped.
    assert_eq!(set.check(ip("::123.123.123.123")), None);
}

#[test]
fn duplicates_are_idempotent() {
    let mut set = RuleSet::new();
    assert!(set.add(rule("10.0.0.0/8")));
    assert!(!set.add(rule("10.0.0.0/8")));
    set.extend([rule("10.0.0.0/8"), rule("10.0.0.0/8"), rule("::1")]);
    assert_eq!(set.len(), 2);
    // Same coverage written differently is another rule, listed separately.
    assert!(set.add(rule("::ffff:10.0.0.0/104")));
    assert_eq!(set.len(), 3);
}

#[test]
fn serde_uses_the_text_form() {
    let rules = vec![
        rule("10.0.0.0/8"),
        rule("10.0.0.1-10.0.0.3"),
        rule("::ffff:1.2.3.4"),
    ];
    let json = serde_json::to_string(&rules).expect("serialize");
    assert_eq!(
        json,
        r#"["10.0.0.0/8","10.0.0.1-10.0.0.3","::ffff:1.2.3.4"]"#
    );
    let back: Vec<Rule> = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, rules);
    let err = serde_json::from_str::<Rule>(r#""10.0.0.1/8""#).unwrap_err();
    assert!(err.to_string().contains("host bits"), "{err}");
}

fn any_rule() -> impl Strategy<Value = Rule> {
    let ip = prop_oneof![
        any::<u32>().prop_map(|x| IpAddr::from(std::net::Ipv4Addr::from(x))),
        any::<u128>().prop_map(|x| IpAddr::from(std::net::Ipv6Addr::from(x))),
        any::<u32>().prop_map(|x| IpAddr::from(std::net::Ipv4Addr::from(x).to_ipv6_mapped())),
    ];
    prop_oneof![
        ip.clone().prop_map(Rule::address),
        (ip.clone(), 0u8..=128).prop_filter_map("valid subnet", |(a, p)| {
            let max = if a.is_ipv4() { 32 } else { 128 };
            let p = p.min(max);
            let net = match a {
                IpAddr::V4(v) => IpAddr::from(std::net::Ipv4Addr::from(
                    u32::from(v) & u32::MAX.checked_shl(32 - u32::from(p)).unwrap_or(0),
                )),
                IpAddr::V6(v) => IpAddr::from(std::net::Ipv6Addr::from(
                    u128::from(v) & u128::MAX.checked_shl(128 - u32::from(p)).unwrap_or(0),
                )),
            };
            Rule::subnet(net, p).ok()
        }),
        (ip.clone(), ip).prop_filter_map("valid range", |(a, b)| {
            Rule::range(a, b).or_else(|_| Rule::range(b, a)).ok()
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn display_from_str_round_trip(r in any_rule()) {
        let text = r.to_string();
        prop_assert_eq!(text.parse::<Rule>(), Ok(r));
        prop_assert!(r.contains(r.first()) && r.contains(r.last()));
    }

    #[test]
    fn arbitrary_text_never_panics(s in any::<String>()) {
        let _ = s.parse::<Rule>();
        let _ = parse_rules(&s);
    }

    #[test]
    fn rule_like_text_never_panics(s in "[0-9a-fA-F:./ #\\-\n%]{0,48}") {
        if let Ok(r) = s.parse::<Rule>() {
            // Whatever parses prints back to something that parses the same.
            prop_assert_eq!(r.to_string().parse::<Rule>(), Ok(r));
        }
        let _ = parse_rules(&s);
    }
}
