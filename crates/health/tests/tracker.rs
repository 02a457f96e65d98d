//! Behaviour of the tracker, one rule per test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use health::{
    BenchCause, Classifier, HealthOptions, Observation, Outcome, State, Strategy, Tracker,
    Transition, Unavailable, UnknownKey, Verdict,
};

const MIN: Duration = Duration::from_secs(60);

fn opts() -> HealthOptions {
    HealthOptions {
        cooldown: 10 * MIN,
        backoff: 2.0,
        max_cooldown: 35 * MIN,
        recovery: 30 * MIN,
        max_benched_percent: 100,
        ..HealthOptions::default()
    }
}

fn pool(keys: &[&'static str], options: HealthOptions) -> Tracker<&'static str> {
    let mut t = Tracker::new(options).expect("valid options");
    for k in keys {
        t.insert(*k);
    }
    t
}

fn fail_n(
    t: &mut Tracker<&'static str>,
    key: &'static str,
    n: u32,
    now: Instant,
) -> Vec<Transition> {
    (0..n)
        .filter_map(|_| t.record(&key, Outcome::Timeout, now).expect("known key"))
        .collect()
}

fn benched_for(cooldown: Duration, cause: BenchCause) -> Transition {
    Transition::Benched { cause, cooldown }
}

#[test]
fn tracker_is_send_and_sync_and_permits_are_send() {
    fn check<T: Send + Sync>() {}
    check::<Tracker<std::net::IpAddr>>();
    check::<health::Permit<std::net::IpAddr>>();
    check::<health::NoneAvailable>();
}

#[test]
fn invalid_options_are_refused() {
    let e = Tracker::<u32>::new(HealthOptions {
        cooldown: Duration::ZERO,
        ..HealthOptions::default()
    })
    .unwrap_err();
    assert_eq!(e.field(), "cooldown");
    assert_eq!(
        e.to_string(),
        "invalid `cooldown`: must be longer than zero"
    );
}

#[test]
fn backoff_grows_to_max_and_probation_failure_rebenches() {
    let mut t = pool(&["a"], opts());
    let mut now = Instant::now();
    assert_eq!(
        fail_n(&mut t, "a", 3, now),
        [benched_for(10 * MIN, BenchCause::ConsecutiveFailures(3))]
    );
    for expected in [20, 35, 35] {
        // Just before the cooldown ends: still benched, outcomes ignored.
        let state = t.state(&"a", now).expect("known");
        let until = state.until().expect("benched");
        assert_eq!(
            t.record(&"a", Outcome::Status(200), until - Duration::from_nanos(1)),
            Ok(None)
        );
        now = until;
        assert_eq!(t.state(&"a", now), Some(State::Probation));
        assert_eq!(
            t.record(&"a", Outcome::EarlyEof, now),
            Ok(Some(benched_for(
                expected * MIN,
                BenchCause::ProbationFailure
            )))
        );
    }
    let benches: Vec<_> = t.bench_history(&"a").expect("known").collect();
    assert_eq!(
        benches.iter().map(|b| b.strike).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert!(benches.iter().all(|b| b.restored_at.is_none()));
    let c = t.snapshot_key(&"a", now, 0).expect("known").counters;
    assert_eq!((c.benched, c.ignored, c.restored), (4, 3, 0));
}

#[test]
fn recovery_resets_the_backoff() {
    let mut t = pool(&["a"], opts());
    let t0 = Instant::now();
    fail_n(&mut t, "a", 3, t0);
    let t1 = t0 + 10 * MIN;
    assert_eq!(
        t.record(&"a", Outcome::Connected, t1),
        Ok(Some(Transition::Restored))
    );
    assert_eq!(
        t.bench_history(&"a")
            .expect("known")
            .last()
            .and_then(|b| b.restored_at),
        Some(t1)
    );
    // Benched again before `recovery`: backed-off cooldown.
    let t2 = t1 + 29 * MIN;
    assert_eq!(
        t.snapshot_key(&"a", t2, 0).expect("known").next_cooldown,
        20 * MIN
    );
    assert_eq!(
        fail_n(&mut t, "a", 3, t2),
        [benched_for(20 * MIN, BenchCause::ConsecutiveFailures(3))]
    );
    let t3 = t2 + 20 * MIN;
    assert_eq!(
        t.record(&"a", Outcome::Connected, t3),
        Ok(Some(Transition::Restored))
    );
    // `recovery` of clean service: back to `cooldown`.
    let t4 = t3 + 30 * MIN;
    assert_eq!(
        t.snapshot_key(&"a", t4, 0).expect("known").next_cooldown,
        10 * MIN
    );
    assert_eq!(
        fail_n(&mut t, "a", 3, t4),
        [benched_for(10 * MIN, BenchCause::ConsecutiveFailures(3))]
    );
    assert_eq!(
        t.bench_history(&"a")
            .expect("known")
            .last()
            .map(|b| b.strike),
        Some(1)
    );
}

#[test]
fn bench_cap_keeps_half_the_pool() {
    let keys = ["a", "b", "c", "d", "e"];
    let mut t = pool(
        &keys,
        HealthOptions {
            max_benched_percent: 50,
            ..opts()
        },
    );
    let t0 = Instant::now();
    let mut transitions = Vec::new();
    for k in keys {
        transitions.extend(fail_n(&mut t, k, 3, t0));
    }
    // floor(5 × 50 %) = 2 benched; the others were suppressed.
    let benched = transitions
        .iter()
        .filter(|t| matches!(t, Transition::Benched { .. }))
        .count();
    assert_eq!(benched, 2);
    assert_eq!(
        transitions[2..],
        [Transition::BenchSuppressed {
            cause: BenchCause::ConsecutiveFailures(3)
        }; 3]
    );
    let stats = t.stats(t0);
    assert_eq!(
        (stats.available, stats.benched, stats.max_benched),
        (3, 2, 2)
    );
    assert_eq!(stats.counters.bench_suppressed, 3);
    // A suppressed key keeps its run: its next failure tries again.
    assert_eq!(
        t.record(&"c", Outcome::Timeout, t0),
        Ok(Some(Transition::BenchSuppressed {
            cause: BenchCause::ConsecutiveFailures(4)
        }))
    );
    // Probation still counts as out of service; a restore frees a place.
    let t1 = t0 + 10 * MIN;
    assert_eq!(
        t.record(&"c", Outcome::Timeout, t1).map(|t| t.is_some()),
        Ok(true)
    );
    assert_eq!(t.stats(t1).probation, 2);
    assert_eq!(
        t.record(&"a", Outcome::Connected, t1),
        Ok(Some(Transition::Restored))
    );
    assert_eq!(
        t.record(&"c", Outcome::Timeout, t1),
        Ok(Some(benched_for(
            10 * MIN,
            BenchCause::ConsecutiveFailures(6)
        )))
    );
}

#[test]
fn a_pool_of_one_never_benches_at_the_default_cap() {
    let mut t = pool(&["only"], HealthOptions::default());
    let t0 = Instant::now();
    let transitions = fail_n(&mut t, "only", 10, t0);
    assert_eq!(transitions.len(), 8);
    assert!(
        transitions
            .iter()
            .all(|t| matches!(t, Transition::BenchSuppressed { .. }))
    );
    assert!(t.acquire_next(t0).is_ok());
}

#[test]
fn probation_allows_n_probes_and_ignores_stale_permits() {
    let mut t = pool(
        &["a"],
        HealthOptions {
            probation_requests: 2,
            ..opts()
        },
    );
    let t0 = Instant::now();
    let old = t.acquire(&"a", t0).expect("available");
    assert!(!old.is_probe());
    fail_n(&mut t, "a", 3, t0);
    let t1 = t0 + 10 * MIN;
    let p1 = t.acquire(&"a", t1).expect("probe 1");
    let p2 = t.acquire(&"a", t1).expect("probe 2");
    assert_eq!(
        t.acquire(&"a", t1).unwrap_err(),
        Unavailable::ProbationFull { in_flight: 2 }
    );
    // The permit taken before the benching is stale: its success is ignored.
    assert_eq!(t.finish(old, Outcome::Connected, t1), Ok(None));
    assert_eq!(t.state(&"a", t1), Some(State::Probation));
    assert_eq!(
        t.history(&"a").expect("known").last().map(|h| h.counted),
        Some(false)
    );
    // A neutral probe frees its slot and changes nothing.
    assert_eq!(t.finish(p1, Verdict::Neutral, t1), Ok(None));
    assert_eq!(
        t.snapshot_key(&"a", t1, 0).expect("known").probes_in_flight,
        1
    );
    let p3 = t.acquire(&"a", t1).expect("probe 3");
    // A failing probe benches again (20 min); the other probe becomes stale.
    assert!(matches!(
        t.finish(p2, Outcome::Timeout, t1),
        Ok(Some(Transition::Benched { .. }))
    ));
    let t2 = t1 + 20 * MIN;
    // p3 still holds a slot of the previous probation, not of this one.
    let p4 = t.acquire(&"a", t2).expect("probe 4");
    let p5 = t.acquire(&"a", t2).expect("probe 5");
    assert_eq!(t.finish(p3, Outcome::Connected, t2), Ok(None));
    assert_eq!(t.state(&"a", t2), Some(State::Probation));
    assert_eq!(
        t.finish(p4, Outcome::Status(404), t2),
        Ok(Some(Transition::Restored))
    );
    // A probe still out when the key was restored reports as a normal request.
    assert_eq!(t.finish(p5, Outcome::Timeout, t2), Ok(None));
    assert_eq!(
        t.snapshot_key(&"a", t2, 0)
            .expect("known")
            .consecutive_failures,
        1
    );
}

#[test]
fn dropping_a_probe_permit_frees_its_slot() {
    let mut t = pool(&["a"], opts());
    let t0 = Instant::now();
    fail_n(&mut t, "a", 3, t0);
    let t1 = t0 + 10 * MIN;
    let p = t.acquire(&"a", t1).expect("probe");
    assert!(t.acquire(&"a", t1).is_err());
    let handle = std::thread::spawn(move || drop(p));
    handle.join().expect("thread");
    assert!(t.acquire(&"a", t1).is_ok());
}

#[test]
fn rate_strategy_needs_min_requests_and_ratio() {
    let options = HealthOptions {
        strategy: Strategy::Rate {
            max_failure_ratio: 0.5,
            window: 10 * MIN,
            min_requests: 4,
        },
        ..opts()
    };
    let mut t = pool(&["a"], options);
    let t0 = Instant::now();
    assert_eq!(fail_n(&mut t, "a", 3, t0), []); // 3 < min_requests
    // Old failures leave the window.
    let t1 = t0 + 10 * MIN;
    let s = t.snapshot_key(&"a", t1, 0).expect("known");
    assert_eq!((s.window_failures, s.window_requests), (0, 0));
    for _ in 0..3 {
        assert_eq!(t.record(&"a", Outcome::Connected, t1), Ok(None));
    }
    assert_eq!(fail_n(&mut t, "a", 2, t1), []); // 2 of 5
    assert_eq!(
        fail_n(&mut t, "a", 1, t1),
        [benched_for(
            10 * MIN,
            BenchCause::FailureRatio {
                failures: 3,
                requests: 6
            }
        )]
    );
}

#[test]
fn history_is_bounded_and_keeps_the_details() {
    let mut t = pool(
        &["a"],
        HealthOptions {
            max_history: 3,
            max_bench_history: 2,
            ..opts()
        },
    );
    let mut now = Instant::now();
    let target: Arc<str> = Arc::from("example.com:443");
    for i in 0..5u64 {
        let o = Observation::new(Outcome::Status(200 + i as u16))
            .with_target(target.clone())
            .with_latency(Duration::from_millis(i));
        t.record(&"a", o, now).expect("known");
    }
    let h: Vec<_> = t.history(&"a").expect("known").cloned().collect();
    assert_eq!(h.len(), 3);
    assert_eq!(h[0].observation.outcome, Outcome::Status(202));
    assert_eq!(h[2].observation.latency, Some(Duration::from_millis(4)));
    assert_eq!(h[2].observation.target.as_deref(), Some("example.com:443"));
    assert_eq!(h[2].verdict, Verdict::Success);
    for _ in 0..3 {
        fail_n(&mut t, "a", 3, now);
        now += 35 * MIN;
        t.record(&"a", Outcome::Connected, now).expect("known");
    }
    assert_eq!(t.bench_history(&"a").expect("known").count(), 2);
    let s = t.snapshot_key(&"a", now, 1).expect("known");
    assert_eq!((s.recent.len(), s.benches.len()), (1, 1));
    assert_eq!(s.counters.benched, 3);
}

#[test]
fn time_never_moves_backwards() {
    let mut t = pool(&["a"], opts());
    let t0 = Instant::now();
    let t1 = t0 + 10 * MIN;
    fail_n(&mut t, "a", 3, t1);
    // An earlier `now` is taken as the latest seen: still benched, not
    // "benched in the future".
    assert!(matches!(t.state(&"a", t0), Some(State::Benched { .. })));
    assert_eq!(t.state(&"a", t1 + 10 * MIN), Some(State::Probation));
    assert_eq!(t.record(&"a", Outcome::Connected, t0), Ok(None));
    assert!(matches!(t.state(&"a", t0), Some(State::Benched { .. })));
}

#[test]
fn unknown_and_removed_keys_are_errors_not_panics() {
    let mut t = pool(&["a", "b", "c"], opts());
    let t0 = Instant::now();
    assert_eq!(t.record(&"x", Outcome::Timeout, t0), Err(UnknownKey));
    assert_eq!(t.state(&"x", t0), None);
    assert!(t.snapshot_key(&"x", t0, 5).is_none());
    fail_n(&mut t, "a", 3, t0);
    assert_eq!(t.stats(t0).benched, 1);
    let p = t.acquire(&"b", t0).expect("available");
    assert!(t.remove(&"a"));
    assert!(!t.remove(&"a"));
    assert!(t.remove(&"b"));
    assert_eq!(t.finish(p, Outcome::Connected, t0), Err(UnknownKey));
    assert_eq!(t.stats(t0).benched, 0);
    assert_eq!(t.keys().copied().collect::<Vec<_>>(), ["c"]);
    assert!(t.is_available(&"c", t0));
    assert!(!t.insert("c"));
    assert!(t.insert("a"));
    assert!(t.is_available(&"a", t0));
    assert_eq!(t.available_keys(t0).count(), 2);
}

#[test]
fn configured_classifier_applies() {
    let classifier = Classifier::default()
        .with_blocked_statuses([403, 429, 503])
        .expect("valid");
    let mut t = Tracker::with_classifier(opts(), classifier).expect("valid");
    t.insert(1u8);
    let t0 = Instant::now();
    for _ in 0..2 {
        assert_eq!(t.record(&1, Outcome::Status(503), t0), Ok(None));
    }
    assert!(matches!(
        t.record(&1, Outcome::Status(503), t0),
        Ok(Some(Transition::Benched { .. }))
    ));
}

#[test]
fn restored_bench_keeps_its_remaining_cooldown_then_probation() {
    let t0 = Instant::now();
    let mut t = pool(&["a", "b"], opts());
    // Benched 4 minutes before the restart, for 10: 6 left.
    let since = t0.checked_sub(4 * MIN).unwrap_or(t0);
    let cause = BenchCause::ConsecutiveFailures(3);
    assert_eq!(t.restore_bench(&"a", since, 10 * MIN, cause, 1), Ok(true));
    assert_eq!(
        t.state(&"a", t0),
        Some(State::Benched {
            since,
            cooldown: 10 * MIN
        })
    );
    assert!(matches!(
        t.acquire(&"a", t0),
        Err(Unavailable::Benched { .. })
    ));
    let stats = t.stats(t0);
    assert_eq!((stats.benched, stats.available), (1, 1));
    // A restoration is no new benching.
    assert_eq!(stats.counters.benched, 0);
    let history: Vec<_> = t.bench_history(&"a").expect("known").copied().collect();
    assert_eq!(history.len(), 1);
    assert_eq!((history[0].at, history[0].strike), (since, 1));

    // The rest of the cooldown passes: probation, then restored as usual.
    let later = since + 10 * MIN;
    assert_eq!(t.state(&"a", later), Some(State::Probation));
    let probe = t.acquire(&"a", later).expect("a probe");
    assert!(probe.is_probe());
    assert_eq!(
        t.finish(probe, Outcome::Status(200), later),
        Ok(Some(Transition::Restored))
    );
    assert!(t.is_available(&"a", later));
}

#[test]
fn restored_bench_continues_the_backoff_and_respects_the_cap() {
    let t0 = Instant::now();
    let mut t = pool(&["a", "b", "c", "d"], opts());
    // A second strike of 20 minutes: a probation failure gets 35 (the max).
    assert_eq!(
        t.restore_bench(&"a", t0, 20 * MIN, BenchCause::ProbationFailure, 2),
        Ok(true)
    );
    let after = t0 + 20 * MIN;
    assert_eq!(t.state(&"a", after), Some(State::Probation));
    assert_eq!(
        t.record(&"a", Outcome::Timeout, after),
        Ok(Some(benched_for(35 * MIN, BenchCause::ProbationFailure)))
    );

    // An expired bench comes back on probation, not available.
    let long_ago = t0.checked_sub(MIN).unwrap_or(t0);
    assert_eq!(
        t.restore_bench(
            &"b",
            long_ago,
            Duration::from_secs(1),
            BenchCause::ProbationFailure,
            1
        ),
        Ok(true)
    );
    assert_eq!(t.state(&"b", after), Some(State::Probation));

    // The cap: at most half of 4 out of service.
    let mut capped = pool(
        &["a", "b", "c", "d"],
        HealthOptions {
            max_benched_percent: 50,
            ..opts()
        },
    );
    let cause = BenchCause::ConsecutiveFailures(3);
    assert_eq!(capped.restore_bench(&"a", t0, 10 * MIN, cause, 1), Ok(true));
    assert_eq!(capped.restore_bench(&"b", t0, 10 * MIN, cause, 1), Ok(true));
    assert_eq!(
        capped.restore_bench(&"c", t0, 10 * MIN, cause, 1),
        Ok(false)
    );
    assert!(capped.is_available(&"c", t0), "refused: unchanged");
    // Re-restoring a key already out is no new one.
    assert_eq!(capped.restore_bench(&"a", t0, 5 * MIN, cause, 1), Ok(true));
    assert_eq!(capped.stats(t0).benched, 2);
    assert_eq!(
        capped.restore_bench(&"zz", t0, MIN, cause, 1),
        Err(UnknownKey)
    );
    // Uncapped: out of service whatever the cap, and counted as out, so a
    // new benching of the pool is suppressed.
    assert_eq!(
        capped.restore_bench_uncapped(&"c", t0, 10 * MIN, cause, 1),
        Ok(())
    );
    assert!(matches!(
        capped.state(&"c", t0),
        Some(State::Benched { .. })
    ));
    assert_eq!(capped.stats(t0).benched, 3);
    let mut last = None;
    for _ in 0..3 {
        last = capped
            .record(&"d", Outcome::Status(429), t0)
            .expect("known");
    }
    assert!(
        matches!(last, Some(Transition::BenchSuppressed { .. })),
        "{last:?}"
    );
    assert_eq!(
        capped.restore_bench_uncapped(&"zz", t0, MIN, cause, 1),
        Err(UnknownKey)
    );
}

#[test]
fn permits_taken_before_a_restored_bench_are_stale() {
    let t0 = Instant::now();
    let mut t = pool(&["a", "b"], opts());
    let permit = t.acquire(&"a", t0).expect("available");
    assert_eq!(
        t.restore_bench(&"a", t0, MIN, BenchCause::ProbationFailure, 1),
        Ok(true)
    );
    let later = t0 + 2 * MIN;
    // The old permit's success does not restore the key.
    assert_eq!(t.finish(permit, Outcome::Status(200), later), Ok(None));
    assert_eq!(t.state(&"a", later), Some(State::Probation));
}
