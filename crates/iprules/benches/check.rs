//! `cargo bench -p iprules`: ns per check at 10 … 1M rules of the mixed set
//! (half hits), the cost of single adds and removes, bulk build time, and
//! memory per rule (printed before the timings).

use std::hint::black_box;
use std::sync::OnceLock;

use divan::Bencher;
use divan::counter::ItemsCount;
use iprules::{Rule, RuleSet};

#[allow(dead_code)]
#[path = "support/mix.rs"]
mod mix;

const SIZES: &[usize] = &[10, 1_000, 10_000, 100_000, 1_000_000];
const BATCH: usize = 1024;

struct Fixture {
    rules: Vec<Rule>,
    set: RuleSet,
    queries: Vec<std::net::IpAddr>,
}

fn fixture(n: usize) -> &'static Fixture {
    static CACHE: OnceLock<Vec<Fixture>> = OnceLock::new();
    let all = CACHE.get_or_init(|| {
        SIZES
            .iter()
            .map(|&n| {
                let rules = mix::rules(n, 42);
                let set: RuleSet = rules.iter().copied().collect();
                let queries = mix::queries(&rules, 64 * BATCH, 7);
                Fixture {
                    rules,
                    set,
                    queries,
                }
            })
            .collect()
    });
    let i = SIZES
        .iter()
        .position(|&s| s == n)
        .expect("a benchmarked size");
    &all[i]
}

fn main() {
    println!("memory per rule (RuleSet::heap_size / rules):");
    for &n in SIZES {
        let f = fixture(n);
        println!(
            "  {n:>9} rules: {:>8.1} bytes/rule ({} live)",
            f.set.heap_size() as f64 / n as f64,
            f.set.len()
        );
    }
    divan::main();
}

/// One iteration = 1024 checks over a rotating window of queries.
#[divan::bench(args = SIZES)]
fn check(bencher: Bencher, n: usize) {
    let f = fixture(n);
    let mut round = 0usize;
    bencher.counter(ItemsCount::new(BATCH)).bench_local(|| {
        round = (round + 1) % (f.queries.len() / BATCH);
        let qs = &f.queries[round * BATCH..(round + 1) * BATCH];
        let mut hits = 0usize;
        for &q in qs {
            hits += f.set.check(black_box(q)).is_some() as usize;
        }
        hits
    });
}

/// Building a set of n rules in one go (`collect`/`extend`).
#[divan::bench(args = [10_000, 100_000], sample_count = 10)]
fn build(bencher: Bencher, n: usize) {
    let rules = &fixture(n).rules;
    bencher
        .counter(ItemsCount::new(n))
        .bench_local(|| rules.iter().copied().collect::<RuleSet>());
}

/// 1000 single `add`s into a set of n rules (includes the periodic rebuilds).
#[divan::bench(args = [1_000, 100_000], sample_count = 10)]
fn add_one_by_one(bencher: Bencher, n: usize) {
    let f = fixture(n);
    let extra = mix::rules(1000, 99);
    bencher
        .counter(ItemsCount::new(extra.len()))
        .with_inputs(|| f.set.clone())
        .bench_local_values(|mut set| {
            for r in &extra {
                set.add(*r);
            }
            set
        });
}

/// 1000 single `remove`s from a set of n rules.
#[divan::bench(args = [1_000, 100_000], sample_count = 10)]
fn remove_one_by_one(bencher: Bencher, n: usize) {
    let f = fixture(n);
    let victims: Vec<Rule> = f.rules.iter().step_by((n / 1000).max(1)).copied().collect();
    bencher
        .counter(ItemsCount::new(victims.len()))
        .with_inputs(|| f.set.clone())
        .bench_local_values(|mut set| {
            for r in &victims {
                set.remove(r);
            }
            set
        });
}
