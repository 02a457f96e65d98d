//! Upstream selection over a [`health::Tracker`] of the upstreams.
//!
//! One `std` mutex guards the tracker and the selection state; every
//! critical section is a scan of the upstream list and a few field updates,
//! and none spans an `.await`. Per-upstream counters are atomics outside
//! the lock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use health::{
    InvalidOption, KeySnapshot, NoneAvailable, Observation, Permit, PoolStats, State, Tracker,
    Transition, Unavailable,
};

use super::options::{L4Options, Strategy, TransitionSink};

/// The clock of the tracker: tokio's (so paused test time applies), as a
/// `std` instant.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// One upstream and its live counters.
#[derive(Debug)]
pub(crate) struct Up {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
    /// Connections open or being dialled now.
    pub(crate) active: AtomicU64,
    pub(crate) dials: AtomicU64,
    pub(crate) forwarded: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) bytes_up: AtomicU64,
    pub(crate) bytes_down: AtomicU64,
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

struct Sel {
    tracker: Tracker<SocketAddr>,
    /// Smooth weighted round robin: the current weight of each upstream.
    current: Vec<i64>,
    /// Least connections: ties go to the first upstream at or after this.
    cursor: usize,
}

/// The upstreams of one listener, their health, and the selection state.
pub(crate) struct Balancer {
    strategy: Strategy,
    pub(crate) ups: Box<[Up]>,
    sel: Mutex<Sel>,
    transitions: Option<Arc<dyn TransitionSink>>,
}

/// A chosen upstream: its index, the health permit for the dial (a probe
/// slot on probation), and its share of the `active` count.
pub(crate) struct Pick {
    pub(crate) idx: usize,
    pub(crate) permit: Permit<SocketAddr>,
    pub(crate) active: Active,
}

/// Counts one connection (or dial) in an upstream's `active` gauge until
/// dropped.
pub(crate) struct Active {
    balancer: Arc<Balancer>,
    idx: usize,
}

impl Drop for Active {
    fn drop(&mut self) {
        if let Some(up) = self.balancer.ups.get(self.idx) {
            up.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Balancer {
    pub(crate) fn new(opts: &L4Options) -> Result<Balancer, InvalidOption> {
        let mut tracker = Tracker::with_classifier(opts.health.clone(), opts.classifier.clone())?;
        let ups: Box<[Up]> = opts
            .upstreams
            .iter()
            .map(|u| {
                tracker.insert(u.addr);
                Up {
                    addr: u.addr,
                    weight: u.weight.max(1),
                    active: AtomicU64::new(0),
                    dials: AtomicU64::new(0),
                    forwarded: AtomicU64::new(0),
                    connect_failures: AtomicU64::new(0),
                    timeouts: AtomicU64::new(0),
                    bytes_up: AtomicU64::new(0),
                    bytes_down: AtomicU64::new(0),
                }
            })
            .collect();
        Ok(Balancer {
            strategy: opts.strategy,
            sel: Mutex::new(Sel {
                tracker,
                current: vec![0; ups.len()],
                cursor: 0,
            }),
            ups,
            transitions: opts.transitions.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Sel> {
        self.sel.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Picks an upstream not in `tried`, by the strategy, among those the
    /// tracker gives a permit for (never a benched one; one on probation
    /// only while it has a free probe slot).
    pub(crate) fn pick(
        self: &Arc<Self>,
        tried: &[usize],
        now: Instant,
    ) -> Result<Pick, NoneAvailable> {
        let mut guard = self.lock();
        let Sel {
            tracker,
            current,
            cursor,
        } = &mut *guard;
        let n = self.ups.len();
        let mut refused = NoneAvailable {
            total: n,
            benched: 0,
            probation_full: 0,
        };
        let mut cands: Vec<usize> = Vec::with_capacity(n);
        for (i, up) in self.ups.iter().enumerate() {
            if tried.contains(&i) {
                continue;
            }
            match tracker.state(&up.addr, now) {
                Some(State::Benched { .. }) => refused.benched += 1,
                Some(_) => cands.push(i),
                None => {}
            }
        }
        while !cands.is_empty() {
            let pos = match self.strategy {
                Strategy::RoundRobin => self.pick_swrr(&cands, current),
                Strategy::Random => self.pick_random(&cands),
                Strategy::LeastConnections => self.pick_least(&cands, *cursor),
            };
            let i = cands[pos];
            match tracker.acquire(&self.ups[i].addr, now) {
                Ok(permit) => {
                    match self.strategy {
                        Strategy::RoundRobin => {
                            let total: i64 = cands.iter().map(|&c| self.weight(c)).sum();
                            for &c in &cands {
                                current[c] += self.weight(c);
                            }
                            current[i] -= total;
                        }
                        Strategy::LeastConnections => *cursor = (i + 1) % n,
                        Strategy::Random => {}
                    }
                    inc(&self.ups[i].active);
                    return Ok(Pick {
                        idx: i,
                        permit,
                        active: Active {
                            balancer: self.clone(),
                            idx: i,
                        },
                    });
                }
                Err(Unavailable::ProbationFull { .. }) => refused.probation_full += 1,
                Err(Unavailable::Benched { .. }) => refused.benched += 1,
                Err(Unavailable::UnknownKey) => {}
            }
            cands.swap_remove(pos);
        }
        Err(refused)
    }

    fn weight(&self, i: usize) -> i64 {
        i64::from(self.ups[i].weight)
    }

    /// Smooth weighted round robin: the highest `current + weight`, ties to
    /// the lowest index. Returns a position in `cands` (not empty).
    fn pick_swrr(&self, cands: &[usize], current: &[i64]) -> usize {
        let mut best = 0;
        for (pos, &c) in cands.iter().enumerate() {
            let b = cands[best];
            let (sc, sb) = (current[c] + self.weight(c), current[b] + self.weight(b));
            if sc > sb || (sc == sb && c < b) {
                best = pos;
            }
        }
        best
    }

    /// A random candidate, weighted.
    fn pick_random(&self, cands: &[usize]) -> usize {
        let total: u64 = cands.iter().map(|&c| u64::from(self.ups[c].weight)).sum();
        let mut r = rand::random_range(0..total.max(1));
        for (pos, &c) in cands.iter().enumerate() {
            let w = u64::from(self.ups[c].weight);
            if r < w {
                return pos;
            }
            r -= w;
        }
        cands.len() - 1
    }

    /// The fewest `active / weight`; ties to the first at or after `cursor`.
    fn pick_least(&self, cands: &[usize], cursor: usize) -> usize {
        let n = self.ups.len();
        let dist = |c: usize| (c + n - cursor % n) % n;
        let mut best = 0;
        for (pos, &c) in cands.iter().enumerate() {
            let b = cands[best];
            let (ac, ab) = (
                u128::from(get(&self.ups[c].active)),
                u128::from(get(&self.ups[b].active)),
            );
            let (wc, wb) = (
                u128::from(self.ups[c].weight),
                u128::from(self.ups[b].weight),
            );
            // ac / wc < ab / wb, without division.
            let (lc, lb) = (ac * wb, ab * wc);
            if lc < lb || (lc == lb && dist(c) < dist(b)) {
                best = pos;
            }
        }
        best
    }

    /// Records the outcome of a dial (freeing its probe slot), then
    /// publishes the transition it caused, outside the lock.
    pub(crate) fn finish(
        &self,
        idx: usize,
        permit: Permit<SocketAddr>,
        observation: Observation,
        now: Instant,
    ) -> Option<Transition> {
        let change = self
            .lock()
            .tracker
            .finish(permit, observation, now)
            .ok()
            .flatten();
        if let (Some(change), Some(up)) = (change, self.ups.get(idx)) {
            let upstream = up.addr;
            match change {
                Transition::Benched { cause, cooldown } => {
                    tracing::warn!(%upstream, ?cause, ?cooldown, "upstream benched")
                }
                Transition::BenchSuppressed { cause } => tracing::warn!(
                    %upstream,
                    ?cause,
                    "upstream not benched: max_benched_percent of the pool is out of service"
                ),
                Transition::Restored => tracing::info!(%upstream, "upstream restored"),
            }
            if let Some(sink) = &self.transitions {
                sink.transition(upstream, change);
            }
        }
        change
    }

    /// The state of every upstream (in configured order) and the pool
    /// counts, at `now`.
    pub(crate) fn states(&self, now: Instant) -> (PoolStats, Vec<State>) {
        let sel = self.lock();
        let states = self
            .ups
            .iter()
            .map(|u| sel.tracker.state(&u.addr, now).unwrap_or(State::Available))
            .collect();
        (sel.tracker.stats(now), states)
    }

    /// One upstream's state at `now`.
    pub(crate) fn state(&self, addr: SocketAddr, now: Instant) -> Option<State> {
        self.lock().tracker.state(&addr, now)
    }

    /// Snapshots of every upstream (in configured order) with their
    /// `recent` newest outcomes and benchings.
    pub(crate) fn health(
        &self,
        now: Instant,
        recent: usize,
    ) -> (PoolStats, Vec<KeySnapshot<SocketAddr>>) {
        let sel = self.lock();
        let keys = self
            .ups
            .iter()
            .filter_map(|u| sel.tracker.snapshot_key(&u.addr, now, recent))
            .collect();
        (sel.tracker.stats(now), keys)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use health::{HealthOptions, Outcome};

    use super::*;
    use crate::l4::Upstream;

    fn balancer(strategy: Strategy, weights: &[u32], health: HealthOptions) -> Arc<Balancer> {
        let ups = weights.iter().enumerate().map(|(i, w)| {
            Upstream::new(SocketAddr::from(([10, 0, 0, i as u8 + 1], 80))).with_weight(*w)
        });
        let opts = L4Options {
            strategy,
            health,
            ..L4Options::new(ups)
        };
        Arc::new(Balancer::new(&opts).unwrap())
    }

    /// Picks `n` times, each dial succeeding at once; the indices.
    fn sequence(b: &Arc<Balancer>, n: usize, now: Instant) -> Vec<usize> {
        (0..n)
            .map(|_| {
                let p = b.pick(&[], now).unwrap();
                let i = p.idx;
                b.finish(i, p.permit, Outcome::Connected.into(), now);
                i
            })
            .collect()
    }

    #[test]
    fn round_robin_is_smooth_and_weighted() {
        let t0 = Instant::now();
        let b = balancer(Strategy::RoundRobin, &[1, 1, 1], HealthOptions::default());
        assert_eq!(sequence(&b, 7, t0), [0, 1, 2, 0, 1, 2, 0]);
        let b = balancer(Strategy::RoundRobin, &[5, 1, 1], HealthOptions::default());
        assert_eq!(sequence(&b, 7, t0), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn benched_upstreams_are_skipped_and_tried_ones_excluded() {
        let t0 = Instant::now();
        let health = HealthOptions {
            strategy: health::Strategy::Consecutive {
                consecutive_failures: 1,
            },
            cooldown: Duration::from_secs(10),
            max_benched_percent: 100,
            ..HealthOptions::default()
        };
        let b = balancer(Strategy::RoundRobin, &[1, 1, 1], health);
        let p = b.pick(&[], t0).unwrap();
        assert_eq!(p.idx, 0);
        let change = b.finish(
            0,
            p.permit,
            Outcome::ConnectError(std::io::ErrorKind::ConnectionRefused).into(),
            t0,
        );
        assert!(matches!(change, Some(Transition::Benched { .. })));
        let got = sequence(&b, 6, t0);
        assert!(!got.contains(&0), "{got:?}");
        // Excluding the tried ones: only 2 is left, then nothing.
        assert_eq!(b.pick(&[1], t0).unwrap().idx, 2);
        let none = b.pick(&[1, 2], t0).err().unwrap();
        assert_eq!((none.total, none.benched), (3, 1));
        // After the cooldown: one probe at a time.
        let later = t0 + Duration::from_secs(10);
        let probe = b.pick(&[1, 2], later).unwrap();
        assert!(probe.permit.is_probe());
        let none = b.pick(&[1, 2], later).err().unwrap();
        assert_eq!(none.probation_full, 1);
        assert_eq!(
            b.finish(0, probe.permit, Outcome::Connected.into(), later),
            Some(Transition::Restored)
        );
    }

    #[test]
    fn least_connections_counts_open_ones() {
        let t0 = Instant::now();
        let b = balancer(
            Strategy::LeastConnections,
            &[1, 1, 1],
            HealthOptions::default(),
        );
        // Hold two on 0 and 1 ...
        let held: Vec<Pick> = (0..2).map(|_| b.pick(&[], t0).unwrap()).collect();
        assert_eq!(held.iter().map(|p| p.idx).collect::<Vec<_>>(), [0, 1]);
        // ... then 2 is the idle one.
        let p = b.pick(&[], t0).unwrap();
        assert_eq!(p.idx, 2);
        drop(p);
        assert_eq!(b.pick(&[], t0).unwrap().idx, 2);
        drop(held);
        assert!(b.ups.iter().all(|u| get(&u.active) == 0));
        // Weights: 3 connections on a weight-3 upstream equal 1 on weight 1.
        let b = balancer(
            Strategy::LeastConnections,
            &[3, 1],
            HealthOptions::default(),
        );
        let held: Vec<usize> = (0..4)
            .map(|_| {
                let p = b.pick(&[], t0).unwrap();
                let i = p.idx;
                std::mem::forget(p.active);
                i
            })
            .collect();
        assert_eq!(held.iter().filter(|i| **i == 0).count(), 3, "{held:?}");
    }

    #[test]
    fn random_is_weighted() {
        let t0 = Instant::now();
        let b = balancer(Strategy::Random, &[9, 1], HealthOptions::default());
        let got = sequence(&b, 2000, t0);
        let zeros = got.iter().filter(|i| **i == 0).count();
        assert!((1600..=1950).contains(&zeros), "{zeros}");
    }
}
