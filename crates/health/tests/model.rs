//! Property tests: random operation sequences on a simulated clock, checked
//! step by step against a naive model of the specification.
//!
//! The model keeps every key in a `BTreeMap`, stores raw rate samples in a
//! `Vec`, recomputes cooldowns from the strike count with integer
//! arithmetic, counts out-of-service keys by scanning, and tracks probe slots
//! through the permits the test holds — none of the tracker's bookkeeping
//! (epochs, shared counters, bucket rings, running totals) is reused.

use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};

use health::{
    BenchCause, HealthOptions, Outcome, Permit, State, Strategy as Policy, Tracker, Transition,
    Unavailable, Verdict,
};
use proptest::prelude::*;

const OUTCOMES: [Outcome; 10] = [
    Outcome::Status(200),
    Outcome::Status(404),
    Outcome::Status(500),
    Outcome::Status(403),
    Outcome::Status(429),
    Outcome::Status(0),
    Outcome::Timeout,
    Outcome::ConnectError(io::ErrorKind::ConnectionRefused),
    Outcome::EarlyEof,
    Outcome::Reported(Verdict::Neutral),
];

/// The default classification, written out.
fn verdict(o: Outcome) -> Verdict {
    match o {
        Outcome::Status(403 | 429) | Outcome::Timeout | Outcome::EarlyEof => Verdict::Failure,
        Outcome::ConnectError(_) => Verdict::Failure,
        Outcome::Status(0) | Outcome::Reported(Verdict::Neutral) => Verdict::Neutral,
        _ => Verdict::Success,
    }
}

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    Record(usize, usize),
    Acquire(usize),
    AcquireNext,
    Finish(usize, usize),
    Drop(usize),
    Remove(usize),
    Insert(usize),
}

/// A key's identity for staleness: (incarnation, benchings so far).
type Tag = (u64, u64);

#[derive(Debug)]
struct MKey {
    incarnation: u64,
    benchings: u64,
    out: Option<(Instant, Duration)>,
    run: u32,
    origin: Option<Instant>,
    samples: Vec<(Instant, bool)>,
    strikes: u32,
    restored_at: Option<Instant>,
}

struct Model {
    o: HealthOptions,
    keys: BTreeMap<usize, MKey>,
    incarnations: u64,
}

impl Model {
    fn insert(&mut self, k: usize) -> bool {
        if self.keys.contains_key(&k) {
            return false;
        }
        self.incarnations += 1;
        self.keys.insert(
            k,
            MKey {
                incarnation: self.incarnations,
                benchings: 0,
                out: None,
                run: 0,
                origin: None,
                samples: Vec::new(),
                strikes: 0,
                restored_at: None,
            },
        );
        true
    }

    fn tag(&self, k: usize) -> Option<Tag> {
        self.keys.get(&k).map(|m| (m.incarnation, m.benchings))
    }

    fn state(&self, k: usize, now: Instant) -> Option<State> {
        let m = self.keys.get(&k)?;
        Some(match m.out {
            None => State::Available,
            Some((since, cooldown)) if now < since + cooldown => State::Benched { since, cooldown },
            Some(_) => State::Probation,
        })
    }

    fn cap(&self) -> usize {
        self.keys.len() * usize::from(self.o.max_benched_percent) / 100
    }

    fn cooldown(&self, strikes: u32) -> Duration {
        let mut cd = self.o.cooldown;
        for _ in 0..strikes {
            // Backoffs in these tests are whole numbers.
            cd = cd
                .checked_mul(self.o.backoff as u32)
                .map_or(self.o.max_cooldown, |d| d.min(self.o.max_cooldown));
        }
        cd
    }

    /// `(failures, requests)` in the rate window at `now`.
    fn window_counts(&self, m: &MKey, now: Instant) -> (u32, u32) {
        let Policy::Rate { window, .. } = self.o.strategy else {
            return (0, 0);
        };
        let Some(origin) = m.origin else {
            return (0, 0);
        };
        let len = (window.as_nanos() / 10).max(1);
        let bucket = |t: Instant| (t - origin).as_nanos() / len;
        let cur = bucket(now);
        let inside: Vec<bool> = m
            .samples
            .iter()
            .filter(|(t, _)| bucket(*t) + 10 > cur)
            .map(|(_, f)| *f)
            .collect();
        let failures = inside.iter().filter(|f| **f).count() as u32;
        (failures, inside.len() as u32)
    }

    fn apply(
        &mut self,
        k: usize,
        v: Verdict,
        now: Instant,
        permit: Option<Tag>,
    ) -> Result<Option<Transition>, ()> {
        let state = self.state(k, now).ok_or(())?;
        if permit.is_some() && permit != self.tag(k) {
            return Ok(None);
        }
        let out_count = self.keys.values().filter(|m| m.out.is_some()).count();
        let cap = self.cap();
        let o = self.o.clone();
        let m = self.keys.get_mut(&k).ok_or(())?;
        let rate = matches!(o.strategy, Policy::Rate { .. });
        let cause = match (state, v) {
            (State::Benched { .. }, _) | (_, Verdict::Neutral) => return Ok(None),
            (State::Probation, Verdict::Success) => {
                m.out = None;
                m.run = 0;
                m.samples.clear();
                m.restored_at = Some(now);
                return Ok(Some(Transition::Restored));
            }
            (State::Probation, Verdict::Failure) => BenchCause::ProbationFailure,
            (State::Available, Verdict::Success) => {
                m.run = 0;
                if rate {
                    m.origin.get_or_insert(now);
                    m.samples.push((now, false));
                }
                return Ok(None);
            }
            (State::Available, Verdict::Failure) => {
                m.run += 1;
                if rate {
                    m.origin.get_or_insert(now);
                    m.samples.push((now, true));
                }
                let run = m.run;
                let tripped = match o.strategy {
                    Policy::Consecutive {
                        consecutive_failures,
                    } => (run >= consecutive_failures)
                        .then_some(BenchCause::ConsecutiveFailures(run)),
                    Policy::Rate {
                        max_failure_ratio,
                        min_requests,
                        ..
                    } => {
                        let m = &self.keys[&k];
                        let (failures, requests) = self.window_counts(m, now);
                        (requests >= min_requests
                            && failures as f64 / requests as f64 >= max_failure_ratio)
                            .then_some(BenchCause::FailureRatio { failures, requests })
                    }
                };
                let Some(cause) = tripped else {
                    return Ok(None);
                };
                if out_count + 1 > cap {
                    return Ok(Some(Transition::BenchSuppressed { cause }));
                }
                let m = self.keys.get_mut(&k).ok_or(())?;
                if m.restored_at
                    .is_some_and(|r| now.duration_since(r) >= o.recovery)
                {
                    m.strikes = 0;
                }
                cause
            }
        };
        let strikes = self.keys[&k].strikes;
        let cooldown = self.cooldown(strikes);
        let m = self.keys.get_mut(&k).ok_or(())?;
        m.strikes += 1;
        m.out = Some((now, cooldown));
        m.benchings += 1;
        m.run = 0;
        m.samples.clear();
        Ok(Some(Transition::Benched { cause, cooldown }))
    }
}

struct Held {
    key: usize,
    tag: Tag,
    permit: Permit<usize>,
}

fn probes_in_flight(held: &[Held], model: &Model, k: usize) -> u32 {
    let tag = model.tag(k);
    held.iter()
        .filter(|h| h.key == k && h.permit.is_probe() && Some(h.tag) == tag)
        .count() as u32
}

/// What the model says `acquire(k)` does: `Ok(is_probe)` or the refusal.
fn model_acquire(
    model: &Model,
    held: &[Held],
    k: usize,
    now: Instant,
) -> Result<bool, Unavailable> {
    match model.state(k, now) {
        None => Err(Unavailable::UnknownKey),
        Some(State::Available) => Ok(false),
        Some(State::Benched { since, cooldown }) => Err(Unavailable::Benched { since, cooldown }),
        Some(State::Probation) => {
            let in_flight = probes_in_flight(held, model, k);
            if in_flight < model.o.probation_requests {
                Ok(true)
            } else {
                Err(Unavailable::ProbationFull { in_flight })
            }
        }
    }
}

fn options() -> impl Strategy<Value = HealthOptions> {
    let strategy = prop_oneof![
        (1u32..=4).prop_map(|n| Policy::Consecutive {
            consecutive_failures: n
        }),
        (
            prop::sample::select(vec![0.25, 0.5, 0.75, 1.0]),
            1u64..=300,
            1u32..=5
        )
            .prop_map(|(r, w, m)| Policy::Rate {
                max_failure_ratio: r,
                window: Duration::from_secs(w),
                min_requests: m,
            }),
    ];
    (
        strategy,
        1u64..=300,
        1u32..=3,
        1u32..=8,
        0u64..=1200,
        1u32..=3,
        prop::sample::select(vec![0u8, 34, 50, 100]),
        0usize..=4,
    )
        .prop_map(
            |(strategy, cooldown, backoff, max_mult, recovery, probes, pct, hist)| HealthOptions {
                strategy,
                cooldown: Duration::from_secs(cooldown),
                backoff: f64::from(backoff),
                max_cooldown: Duration::from_secs(cooldown * u64::from(max_mult)),
                recovery: Duration::from_secs(recovery),
                probation_requests: probes,
                max_benched_percent: pct,
                max_history: hist,
                max_bench_history: hist,
            },
        )
}

fn ops(keys: usize) -> impl Strategy<Value = Vec<Op>> {
    let key = 0..keys;
    let outcome = 0..OUTCOMES.len();
    let op = prop_oneof![
        3 => prop_oneof![0u64..=5, 0u64..=400, Just(1000)].prop_map(Op::Advance),
        8 => (key.clone(), outcome.clone()).prop_map(|(k, o)| Op::Record(k, o)),
        3 => key.clone().prop_map(Op::Acquire),
        3 => Just(Op::AcquireNext),
        4 => (any::<usize>(), outcome).prop_map(|(i, o)| Op::Finish(i, o)),
        1 => any::<usize>().prop_map(Op::Drop),
        1 => key.clone().prop_map(Op::Remove),
        1 => key.prop_map(Op::Insert),
    ];
    prop::collection::vec(op, 1..150)
}

fn scenario() -> impl Strategy<Value = (HealthOptions, usize, Vec<Op>)> {
    (options(), 1usize..=5).prop_flat_map(|(o, n)| (Just(o), Just(n), ops(n)))
}

fn run(options: HealthOptions, n: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut t: Tracker<usize> = Tracker::new(options.clone()).expect("valid options");
    let mut model = Model {
        o: options,
        keys: BTreeMap::new(),
        incarnations: 0,
    };
    for k in 0..n {
        prop_assert!(t.insert(k));
        model.insert(k);
    }
    let mut now = Instant::now();
    let mut held: Vec<Held> = Vec::new();
    let mut prev_out = 0;

    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Advance(s) => now += Duration::from_secs(s),
            Op::Record(k, o) => {
                let got = t.record(&k, OUTCOMES[o], now).map_err(|_| ());
                let want = model.apply(k, verdict(OUTCOMES[o]), now, None);
                prop_assert_eq!(got, want, "step {} record {} {:?}", step, k, OUTCOMES[o]);
            }
            Op::Acquire(k) => {
                let want = model_acquire(&model, &held, k, now);
                match t.acquire(&k, now) {
                    Ok(permit) => {
                        prop_assert_eq!(Ok(permit.is_probe()), want, "step {}", step);
                        let tag = model.tag(k).expect("known");
                        held.push(Held {
                            key: k,
                            tag,
                            permit,
                        });
                    }
                    Err(e) => prop_assert_eq!(Err(e), want, "step {}", step),
                }
            }
            Op::AcquireNext => {
                let verdicts: Vec<_> = model
                    .keys
                    .keys()
                    .map(|&k| model_acquire(&model, &held, k, now))
                    .collect();
                match t.acquire_next(now) {
                    Ok(permit) => {
                        let k = *permit.key();
                        let want = model_acquire(&model, &held, k, now);
                        prop_assert_eq!(Ok(permit.is_probe()), want, "step {}", step);
                        let tag = model.tag(k).expect("known");
                        held.push(Held {
                            key: k,
                            tag,
                            permit,
                        });
                    }
                    Err(e) => {
                        prop_assert!(verdicts.iter().all(Result::is_err), "step {}", step);
                        prop_assert_eq!(e.total, model.keys.len());
                        let benched = verdicts
                            .iter()
                            .filter(|v| matches!(v, Err(Unavailable::Benched { .. })))
                            .count();
                        prop_assert_eq!(e.benched, benched);
                        prop_assert_eq!(e.probation_full, model.keys.len() - benched);
                    }
                }
            }
            Op::Finish(i, o) => {
                if !held.is_empty() {
                    let h = held.swap_remove(i % held.len());
                    let want = model.apply(h.key, verdict(OUTCOMES[o]), now, Some(h.tag));
                    let got = t.finish(h.permit, OUTCOMES[o], now).map_err(|_| ());
                    prop_assert_eq!(got, want, "step {} finish {}", step, h.key);
                }
            }
            Op::Drop(i) => {
                if !held.is_empty() {
                    drop(held.swap_remove(i % held.len()));
                }
            }
            Op::Remove(k) => {
                prop_assert_eq!(t.remove(&k), model.keys.remove(&k).is_some());
            }
            Op::Insert(k) => prop_assert_eq!(t.insert(k), model.insert(k)),
        }

        // After every step: same state, run and probes for every key, and the
        // cap holds.
        for k in 0..n {
            prop_assert_eq!(
                t.state(&k, now),
                model.state(k, now),
                "step {} key {}",
                step,
                k
            );
            if let Some(m) = model.keys.get(&k) {
                let s = t.snapshot_key(&k, now, 0).expect("known");
                prop_assert_eq!(s.consecutive_failures, m.run, "step {} key {}", step, k);
                prop_assert_eq!(
                    (s.window_failures, s.window_requests),
                    model.window_counts(m, now)
                );
                if s.state == State::Probation {
                    prop_assert_eq!(s.probes_in_flight, probes_in_flight(&held, &model, k));
                }
                prop_assert!(s.probes_in_flight <= model.o.probation_requests);
                let history = t.history(&k).expect("known").count();
                prop_assert!(history <= model.o.max_history);
            }
        }
        // Benching never takes the pool over the cap (removing keys may
        // leave it over, so only an increase is checked).
        let stats = t.stats(now);
        let out = stats.benched + stats.probation;
        prop_assert!(
            out <= prev_out || out <= stats.max_benched,
            "step {}: {:?}",
            step,
            stats
        );
        prev_out = out;
        prop_assert_eq!(stats.total, model.keys.len());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn tracker_matches_model((options, n, ops) in scenario()) {
        run(options, n, ops)?;
    }
}

/// The classifier against a naive model: a status is a failure if blocked,
/// else neutral if listed neutral or not a three-digit status, else success.
fn classify_model(blocked: &[u16], neutral: &[u16], status: u16) -> Verdict {
    if !(100..=999).contains(&status) {
        Verdict::Neutral
    } else if blocked.contains(&status) {
        Verdict::Failure
    } else if neutral.contains(&status) {
        Verdict::Neutral
    } else {
        Verdict::Success
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn classifier_matches_model(
        blocked in prop::collection::vec(100u16..=999, 0..8),
        neutral in prop::collection::vec(100u16..=999, 0..8),
        statuses in prop::collection::vec(prop_oneof![any::<u16>(), 0u16..1100], 1..50),
    ) {
        let c = health::Classifier::default()
            .with_blocked_statuses(blocked.iter().copied())
            .expect("valid")
            .with_neutral_statuses(neutral.iter().copied())
            .expect("valid");
        for s in statuses {
            prop_assert_eq!(c.classify(&Outcome::Status(s)), classify_model(&blocked, &neutral, s), "{}", s);
        }
    }

    /// Extreme but valid options never make the tracker panic (no overflow in
    /// backoff, cooldown or window arithmetic).
    #[test]
    fn extreme_options_never_panic(
        backoff in prop_oneof![Just(1.0), Just(1e300), Just(f64::MAX), 1.0f64..1e6],
        cooldown_s in prop_oneof![Just(1u64), Just(health::MAX_DURATION.as_secs())],
        window_ns in prop_oneof![Just(1u64), Just(health::MAX_DURATION.as_nanos() as u64)],
        steps in prop::collection::vec((0usize..OUTCOMES.len(), prop_oneof![Just(0u64), Just(1), Just(3_000_000_000)]), 1..60),
        rate in any::<bool>(),
    ) {
        let options = HealthOptions {
            strategy: if rate {
                Policy::Rate { max_failure_ratio: 0.5, window: Duration::from_nanos(window_ns), min_requests: 1 }
            } else {
                Policy::Consecutive { consecutive_failures: 1 }
            },
            cooldown: Duration::from_secs(cooldown_s),
            backoff,
            max_cooldown: health::MAX_DURATION,
            max_benched_percent: 100,
            ..HealthOptions::default()
        };
        let mut t: Tracker<u8> = Tracker::new(options).expect("valid");
        t.insert(0);
        let mut now = Instant::now();
        for (o, secs) in steps {
            now += Duration::from_secs(secs);
            let _ = t.record(&0, OUTCOMES[o], now);
            if let Ok(p) = t.acquire_next(now) {
                let _ = t.finish(p, OUTCOMES[o], now);
            }
            let s = t.snapshot_key(&0, now, 3).expect("known");
            prop_assert!(s.next_cooldown <= health::MAX_DURATION);
        }
    }
}
