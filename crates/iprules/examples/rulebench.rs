//! The iprules side of `bench/iprules_vs_node.sh`.
//!
//! ```text
//! rulebench gen N SEED RULES_FILE QUERIES_FILE QUERIES   # write the benchmark mix
//! rulebench run RULES_FILE QUERIES_FILE ROUNDS           # time build and checks
//! ```
//!
//! `run` prints one line of `key=value`: rules, build_ms, ns_per_check
//! (median over ROUNDS rounds, each round at least 50 ms of checks),
//! hits (over one pass of the queries) and bytes_per_rule.

use std::hint::black_box;
use std::net::IpAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use iprules::{RuleSet, parse_rules};

#[allow(dead_code)]
#[path = "../benches/support/mix.rs"]
mod mix;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["gen", n, seed, rules, queries, q] => gen_files(n, seed, rules, queries, q),
        ["run", rules, queries, rounds] => run(rules, queries, rounds),
        _ => {
            Err("usage: rulebench gen N SEED RULES QUERIES COUNT | run RULES QUERIES ROUNDS".into())
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rulebench: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

fn gen_files(n: &str, seed: &str, rules_path: &str, queries_path: &str, q: &str) -> Res {
    let rules = mix::rules(n.parse()?, seed.parse()?);
    let queries = mix::queries(&rules, q.parse()?, seed.parse()?);
    let mut text = String::new();
    for r in &rules {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    std::fs::write(rules_path, text)?;
    let mut text = String::new();
    for ip in &queries {
        text.push_str(&ip.to_string());
        text.push('\n');
    }
    std::fs::write(queries_path, text)?;
    Ok(())
}

fn run(rules_path: &str, queries_path: &str, rounds: &str) -> Res {
    let rules = parse_rules(&std::fs::read_to_string(rules_path)?)?;
    let queries: Vec<IpAddr> = std::fs::read_to_string(queries_path)?
        .lines()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let rounds: usize = rounds.parse()?;

    let mut builds = Vec::new();
    let mut set = RuleSet::new();
    for _ in 0..rounds.max(3) {
        let t = Instant::now();
        set = rules.iter().copied().collect();
        builds.push(t.elapsed());
    }
    let hits = queries
        .iter()
        .filter(|&&ip| set.check(ip).is_some())
        .count();

    let mut per_check = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let mut n = 0usize;
        while t.elapsed() < Duration::from_millis(50) {
            for &ip in &queries {
                black_box(set.check(black_box(ip)));
            }
            n += queries.len();
        }
        per_check.push(t.elapsed().as_nanos() as f64 / n as f64);
    }
    println!(
        "rules={} build_ms={:.3} ns_per_check={:.1} hits={} bytes_per_rule={:.1}",
        set.len(),
        median_f64(builds.iter().map(|d| d.as_secs_f64() * 1e3).collect()),
        median_f64(per_check),
        hits,
        set.heap_size() as f64 / rules.len().max(1) as f64,
    );
    Ok(())
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
