//! Backend health and lifecycle through the ingress proxy, on loopback:
//! passive ejection (5xx, refused connects) and restoration through
//! probation, active checks with rise and fall, draining.

mod ingress_util;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway::ingress::{
    Backend as B, DrainOutcome, HealthCheck, Route, RouteMatch, RouteTable, RouteTableOptions,
};
use health::{HealthOptions, State, Transition};
use ingress_util::*;

type Events = Arc<Mutex<Vec<(String, Transition)>>>;

/// A table benching on the 2nd consecutive failure for `cooldown`, up to
/// the whole route, recording transitions.
fn table(cooldown: Duration) -> (RouteTable, Events) {
    let events: Events = Arc::default();
    let sink = events.clone();
    let opts = RouteTableOptions {
        health: HealthOptions {
            strategy: health::Strategy::Consecutive {
                consecutive_failures: 2,
            },
            cooldown,
            max_cooldown: cooldown * 4,
            max_benched_percent: 100,
            ..HealthOptions::default()
        },
        transitions: Some(Arc::new(
            move |_route: &str, backend: &str, t: Transition| {
                sink.lock().unwrap().push((backend.to_owned(), t));
            },
        )),
        ..RouteTableOptions::default()
    };
    (RouteTable::new(opts).unwrap(), events)
}

fn state(routes: &RouteTable, id: &str) -> State {
    routes.snapshot().backend(id).unwrap().state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_5xx_benches_a_backend_and_probation_restores_it() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let (routes, events) = table(Duration::from_millis(800));
    routes
        .upsert_route(
            Route::new("r", RouteMatch::host("a.test"))
                .with_backend(B::new("a", a.addr))
                .with_backend(B::new("b", b.addr)),
        )
        .unwrap();
    let p = Running::start(opts(&routes)).await;
    let mut client = H1::connect(p.addr).await;
    a.set_status(500);
    // Round robin: a (500), b, a (500): benched on the second failure.
    let got: Vec<(u16, String)> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let r = client.get("a.test", "/").await;
            v.push((r.status, r.backend()));
        }
        v
    };
    assert_eq!(
        got,
        [(500, "a".into()), (200, "b".into()), (500, "a".into())]
    );
    assert!(matches!(state(&routes, "a"), State::Benched { .. }));
    assert!(matches!(
        events.lock().unwrap().as_slice(),
        [(id, Transition::Benched { .. })] if id == "a"
    ));
    // Benched: everything goes to b.
    for _ in 0..6 {
        assert_eq!(client.get("a.test", "/").await.backend(), "b");
    }
    assert_eq!(a.hits(), 2);
    // Healthy again; after the cooldown a probe reaches it and restores it.
    a.set_status(0);
    tokio::time::sleep(Duration::from_millis(850)).await;
    assert_eq!(state(&routes, "a"), State::Probation);
    let mut names = Vec::new();
    for _ in 0..6 {
        names.push(client.get("a.test", "/").await.backend());
    }
    assert_eq!(tally(names.iter().map(String::as_str))["a"], 3, "{names:?}");
    assert_eq!(state(&routes, "a"), State::Available);
    assert!(matches!(
        events.lock().unwrap().last(),
        Some((id, Transition::Restored)) if id == "a"
    ));
    let snap = routes.snapshot();
    assert_eq!(snap.backend("a").unwrap().failures_total, 2);
    assert_eq!(snap.route("r").unwrap().health.counters.restored, 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connects_bench_a_backend_until_it_comes_back() {
    let dead = Dead::new();
    let dead_addr = dead.addr;
    let live = Backend::start("live").await;
    let (routes, events) = table(Duration::from_millis(500));
    routes
        .upsert_route(
            Route::new("r", RouteMatch::host("a.test"))
                .with_backend(B::new("dead", dead_addr))
                .with_backend(B::new("live", live.addr)),
        )
        .unwrap();
    let p = Running::start(opts(&routes)).await;
    let mut client = H1::connect(p.addr).await;
    // Every GET succeeds (retried on `live`) while `dead` gets benched.
    for _ in 0..8 {
        let r = client.get("a.test", "/").await;
        assert_eq!((r.status, r.backend().as_str()), (200, "live"));
    }
    assert!(matches!(state(&routes, "dead"), State::Benched { .. }));
    let snap = routes.snapshot();
    assert_eq!(snap.backend("dead").unwrap().connect_errors_total, 2);
    assert_eq!(p.metrics.snapshot().retries_total, 2);
    // It comes back on the same address; probation restores it.
    let back = Backend::serve("back", dead.revive());
    tokio::time::sleep(Duration::from_millis(550)).await;
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(client.get("a.test", "/").await.backend());
    }
    assert!(names.contains(&"back".to_owned()), "{names:?}");
    assert_eq!(state(&routes, "dead"), State::Available);
    assert!(
        events
            .lock()
            .unwrap()
            .iter()
            .any(|(id, t)| id == "dead" && *t == Transition::Restored)
    );
    assert!(back.hits() >= 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_backend_is_not_benched_by_default() {
    // Default options: at most 50 % of a route benched, so a route of
    // one backend keeps trying it rather than answering 503.
    let a = Backend::start("a").await;
    let routes = RouteTable::default();
    routes
        .upsert_route(Route::new("r", RouteMatch::host("a.test")).with_backend(B::new("a", a.addr)))
        .unwrap();
    let p = Running::start(opts(&routes)).await;
    a.set_status(503);
    for _ in 0..5 {
        assert_eq!(get(p.addr, "a.test", "/").await.status, 503);
    }
    assert_eq!(a.hits(), 5);
    assert_eq!(state(&routes, "a"), State::Available);
    assert_eq!(
        routes
            .snapshot()
            .route("r")
            .unwrap()
            .health
            .counters
            .bench_suppressed,
        3
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_take_a_backend_down_and_up_with_fall_and_rise() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let routes = RouteTable::default();
    let check = HealthCheck {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
        rise: 3,
        fall: 2,
        ..HealthCheck::new("/health")
    };
    routes
        .upsert_route(
            Route::new("r", RouteMatch::host("a.test"))
                .with_health_check(check)
                .with_backend(B::new("a", a.addr))
                .with_backend(B::new("b", b.addr)),
        )
        .unwrap();
    let p = Running::start(opts(&routes)).await;
    let check_up = |routes: &RouteTable| routes.snapshot().backend("a").unwrap().check_up;
    wait_for("a first check", || {
        a.state.checks.load(std::sync::atomic::Ordering::SeqCst) >= 1
    })
    .await;
    assert_eq!(check_up(&routes), Some(true));
    // Failing checks: down after `fall` (2) of them.
    let counts = |routes: &RouteTable| {
        let s = routes.snapshot();
        let b = s.backend("a").unwrap();
        (
            b.checks_total - b.checks_failed_total,
            b.checks_failed_total,
        )
    };
    assert_eq!(counts(&routes).1, 0);
    a.set_health(503);
    wait_for("a down", || check_up(&routes) == Some(false)).await;
    let (passed_then, failed) = counts(&routes);
    assert!(
        (2..=3).contains(&failed),
        "down after {failed} failed checks"
    );
    let mut client = H1::connect(p.addr).await;
    for _ in 0..6 {
        assert_eq!(client.get("a.test", "/").await.backend(), "b");
    }
    assert_eq!(a.hits(), 0);
    // Passing again: up after `rise` (3).
    a.set_health(200);
    wait_for("a up", || check_up(&routes) == Some(true)).await;
    let passed = counts(&routes).0 - passed_then;
    assert!((3..=4).contains(&passed), "up after {passed} passed checks");
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(client.get("a.test", "/").await.backend());
    }
    assert_eq!(tally(names.iter().map(String::as_str))["a"], 2, "{names:?}");
    let snap = routes.snapshot();
    assert!(snap.backend("a").unwrap().checks_failed_total >= 2);
    // Checks stop with the proxy.
    p.stop().await;
    let n = a.state.checks.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.state.checks.load(std::sync::atomic::Ordering::SeqCst), n);
}

/// Two listeners share a table (one replacing the other at a reload):
/// when the one running the checks stops, the other takes them over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_move_to_the_listener_left_when_the_first_stops() {
    let a = Backend::start("a").await;
    let routes = RouteTable::default();
    let check = HealthCheck {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
        rise: 1,
        fall: 1,
        ..HealthCheck::new("/health")
    };
    routes
        .upsert_route(
            Route::new("r", RouteMatch::host("a.test"))
                .with_health_check(check)
                .with_backend(B::new("a", a.addr)),
        )
        .unwrap();
    let mut keep = opts(&routes);
    // The idle sweep (where a claim is retried) runs every 500 ms.
    keep.keep_alive.idle_timeout = Duration::from_secs(1);
    let first = Running::start(opts(&routes)).await;
    let second = Running::start(keep).await;
    let checks = || a.state.checks.load(std::sync::atomic::Ordering::SeqCst);
    wait_for("checks run", || checks() >= 2).await;
    first.stop().await;
    let n = checks();
    wait_for("checks go on under the second listener", || {
        checks() >= n + 3
    })
    .await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_the_request_in_flight_finish_and_sends_new_ones_elsewhere() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let routes = RouteTable::default();
    routes
        .upsert_route(
            Route::new("r", RouteMatch::host("a.test"))
                .with_backend(B::new("a", a.addr))
                .with_backend(B::new("b", b.addr)),
        )
        .unwrap();
    let p = Running::start(opts(&routes)).await;
    let addr = p.addr;
    // Round robin: the first request goes to a and stays there.
    let held = tokio::spawn(async move { get(addr, "a.test", "/hold").await });
    a.wait_holding(1).await;
    let drain = tokio::spawn(routes.drain("a", Duration::from_secs(10)).unwrap());
    let mut client = H1::connect(p.addr).await;
    for _ in 0..6 {
        assert_eq!(client.get("a.test", "/").await.backend(), "b");
    }
    let snap = routes.snapshot();
    let sa = snap.backend("a").unwrap();
    assert!(sa.draining && sa.in_flight == 1, "{sa:?}");
    assert!(!drain.is_finished());
    a.release();
    let r = held.await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "a held\n"));
    let outcome = tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .expect("drained once the request finished")
        .unwrap();
    assert_eq!(outcome, DrainOutcome::Drained);
    assert!(routes.snapshot().backend("a").is_none());
    assert!(routes.set_weight("a", 1).is_err());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_cuts_what_is_left_at_its_timeout() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let routes = RouteTable::default();
    routes
        .upsert_route(
            Route::new("r", RouteMatch::host("a.test"))
                .with_backend(B::new("a", a.addr))
                .with_backend(B::new("b", b.addr)),
        )
        .unwrap();
    let p = Running::start(opts(&routes)).await;
    let addr = p.addr;
    let held = tokio::spawn(async move { send(addr, request("GET", "a.test", "/hold")).await });
    a.wait_holding(1).await;
    let t0 = tokio::time::Instant::now();
    let outcome = routes.drain("a", Duration::from_millis(300)).unwrap().await;
    assert_eq!(outcome, DrainOutcome::TimedOut { cut: 1 });
    assert!(t0.elapsed() >= Duration::from_millis(290));
    // The cut request fails (502 or a closed connection), promptly.
    let r = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the cut request ends")
        .unwrap();
    if let Ok(r) = r {
        assert_eq!(r.status, 502, "{r:?}");
    }
    assert!(routes.snapshot().backend("a").is_none());
    // Draining again, then re-adding, cancels.
    let again = routes.drain("b", Duration::from_secs(10)).unwrap();
    routes.upsert_backend("r", B::new("b", b.addr)).unwrap();
    assert_eq!(again.await, DrainOutcome::Cancelled);
    assert_eq!(get(p.addr, "a.test", "/").await.backend(), "b");
    a.release();
    p.stop().await;
}
