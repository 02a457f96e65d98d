//! Regression tests, one per fault of the seed (ipmanager) that applies to
//! this crate. The last fault (documenting `/probe`, `/ping`, `/config`
//! endpoints that do not exist) belongs to the binary's admin API; the data a
//! `/probe` view needs is checked in `snapshot_backs_the_probe_view`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use health::{
    BenchCause, HealthOptions, NoneAvailable, Outcome, State, Tracker, Transition, Unavailable,
};

const COOLDOWN: Duration = Duration::from_secs(600);

fn pool(keys: &[&'static str], options: HealthOptions) -> Tracker<&'static str> {
    let mut t = Tracker::new(options).expect("valid options");
    for k in keys {
        assert!(t.insert(*k));
    }
    t
}

/// ipmanager benched when failures *exceeded* the threshold: one failure too
/// late. Here the Nth consecutive failure benches.
#[test]
fn seed_fault_bans_one_failure_too_late() {
    for n in 1..=5u32 {
        let options = HealthOptions {
            strategy: health::Strategy::Consecutive {
                consecutive_failures: n,
            },
            max_benched_percent: 100,
            ..HealthOptions::default()
        };
        let mut t = pool(&["a"], options);
        let t0 = Instant::now();
        for i in 1..n {
            assert_eq!(
                t.record(&"a", Outcome::Timeout, t0),
                Ok(None),
                "failure {i}"
            );
            assert!(t.is_available(&"a", t0));
        }
        assert_eq!(
            t.record(&"a", Outcome::Timeout, t0),
            Ok(Some(Transition::Benched {
                cause: BenchCause::ConsecutiveFailures(n),
                cooldown: COOLDOWN
            }))
        );
        assert!(!t.is_available(&"a", t0));
    }
}

/// ipmanager never reset the failure count after a cooldown, so one failure
/// after the cooldown banned the address again forever after. Here a success
/// on probation restores the key with a clean count: it takes N new
/// consecutive failures to bench it again.
#[test]
fn seed_fault_never_resets_failure_count_after_cooldown() {
    let options = HealthOptions {
        max_benched_percent: 100,
        ..HealthOptions::default()
    };
    let mut t = pool(&["a"], options);
    let t0 = Instant::now();
    for _ in 0..3 {
        let _ = t.record(&"a", Outcome::Status(429), t0);
    }
    let t1 = t0 + COOLDOWN;
    assert_eq!(t.state(&"a", t1), Some(State::Probation));
    assert_eq!(
        t.record(&"a", Outcome::Status(200), t1),
        Ok(Some(Transition::Restored))
    );
    let snap = t.snapshot_key(&"a", t1, 0).expect("known key");
    assert_eq!(snap.consecutive_failures, 0);
    assert_eq!(t.record(&"a", Outcome::Status(429), t1), Ok(None));
    assert_eq!(t.record(&"a", Outcome::Status(429), t1), Ok(None));
    assert!(t.is_available(&"a", t1));
    assert!(matches!(
        t.record(&"a", Outcome::Status(429), t1),
        Ok(Some(Transition::Benched { .. }))
    ));
}

/// ipmanager counted the target's own 404 against the egress address. Here
/// the target's errors prove the address works: they never bench it, and
/// they break a run of failures.
#[test]
fn seed_fault_counts_target_404_against_address() {
    let mut t = pool(&["a", "b"], HealthOptions::default());
    let t0 = Instant::now();
    for status in [404, 500, 502, 503, 410, 404, 404, 404, 404] {
        assert_eq!(t.record(&"a", Outcome::Status(status), t0), Ok(None));
    }
    assert!(t.is_available(&"a", t0));
    let snap = t.snapshot_key(&"a", t0, 0).expect("known key");
    assert_eq!(snap.counters.failures, 0);
    // Failure, failure, 404, failure: no run of three.
    for o in [403, 403, 404, 403] {
        assert_eq!(t.record(&"a", Outcome::Status(o), t0), Ok(None));
    }
    assert!(t.is_available(&"a", t0));
}

/// ipmanager panicked when no address was available. Here the caller gets a
/// typed error with a reason.
#[test]
fn seed_fault_panics_when_no_address_available() {
    let t0 = Instant::now();
    let empty: Tracker<&str> = Tracker::new(HealthOptions::default()).expect("valid");
    let err = empty.acquire_next(t0).unwrap_err();
    assert_eq!(
        err,
        NoneAvailable {
            total: 0,
            benched: 0,
            probation_full: 0
        }
    );
    assert_eq!(err.to_string(), "no address available: the pool is empty");

    let options = HealthOptions {
        max_benched_percent: 100,
        ..HealthOptions::default()
    };
    let mut t = pool(&["a", "b"], options);
    for k in ["a", "b"] {
        for _ in 0..3 {
            let _ = t.record(&k, Outcome::Timeout, t0);
        }
    }
    let err = t.acquire_next(t0).unwrap_err();
    assert_eq!(
        err,
        NoneAvailable {
            total: 2,
            benched: 2,
            probation_full: 0
        }
    );
    assert!(err.to_string().contains("2 of 2 benched"), "{err}");
    assert!(matches!(
        t.acquire(&"a", t0),
        Err(Unavailable::Benched { .. })
    ));
    assert_eq!(t.acquire(&"zz", t0).unwrap_err(), Unavailable::UnknownKey);

    // On probation with the one probe slot taken: still an error.
    let t1 = t0 + COOLDOWN;
    let p1 = t.acquire_next(t1).expect("probe a");
    let p2 = t.acquire_next(t1).expect("probe b");
    assert!(p1.is_probe() && p2.is_probe());
    let err = t.acquire_next(t1).unwrap_err();
    assert_eq!(err.probation_full, 2);
    drop((p1, p2));
    assert!(t.acquire_next(t1).is_ok());
}

/// ipmanager re-seeded its random generator on every request, so requests
/// in the same instant all went to the same address. Here selection is a
/// round robin: every available key once per round, whatever the clock.
#[test]
fn seed_fault_reseeds_rng_per_request() {
    let keys = ["a", "b", "c", "d", "e"];
    let mut t = pool(&keys, HealthOptions::default());
    let t0 = Instant::now();
    // Bench "c" (allowed: 1 of 5 ≤ 50 %).
    for _ in 0..3 {
        let _ = t.record(&"c", Outcome::Timeout, t0);
    }
    let mut seen: HashMap<&str, u32> = HashMap::new();
    for _ in 0..40 {
        let p = t.acquire_next(t0).expect("available");
        *seen.entry(*p.key()).or_default() += 1;
        t.finish(p, Outcome::Connected, t0).expect("known key");
    }
    assert_eq!(seen.get("c"), None);
    for k in ["a", "b", "d", "e"] {
        assert_eq!(seen.get(k), Some(&10), "{k}: {seen:?}");
    }
}

/// Data for the admin `/probe` view (the seed's only real endpoint): state,
/// counters and the last outcomes of each address.
#[test]
fn snapshot_backs_the_probe_view() {
    let mut t = pool(&["a", "b"], HealthOptions::default());
    let t0 = Instant::now();
    let _ = t.record(&"a", Outcome::Status(403), t0);
    let _ = t.record(&"a", Outcome::Status(200), t0 + Duration::from_secs(1));
    let snaps = t.snapshot(t0 + Duration::from_secs(2), 1);
    assert_eq!(snaps.len(), 2);
    let a = snaps.iter().find(|s| s.key == "a").expect("a");
    assert_eq!(a.state, State::Available);
    assert_eq!(a.counters.failures, 1);
    assert_eq!(a.counters.successes, 1);
    assert_eq!(a.recent.len(), 1);
    assert_eq!(a.recent[0].observation.outcome, Outcome::Status(200));
}
