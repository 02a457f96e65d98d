//! The per-pool tracker: one state machine per key.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::classify::{Classifier, Observation, Verdict};
use crate::error::{InvalidOption, NoneAvailable, Unavailable, UnknownKey};
use crate::options::{HealthOptions, Strategy};
use crate::ring::Ring;
use crate::window::RateWindow;

/// A key's availability at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// In full service.
    Available,
    /// Out of service until `since + cooldown`.
    Benched {
        /// When the key was benched.
        since: Instant,
        /// How long this benching lasts.
        cooldown: Duration,
    },
    /// The cooldown has elapsed: at most `probation_requests` requests in
    /// flight; the first success restores the key, a failure benches it again.
    Probation,
}

impl State {
    /// When a benching ends (`None` if not benched, or if the instant is not
    /// representable).
    pub fn until(&self) -> Option<Instant> {
        match *self {
            State::Benched { since, cooldown } => since.checked_add(cooldown),
            _ => None,
        }
    }
}

/// Why a key was benched (or would have been, see
/// [`Transition::BenchSuppressed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BenchCause {
    /// [`Strategy::Consecutive`]: this many failures in a row.
    ConsecutiveFailures(u32),
    /// [`Strategy::Rate`]: `failures` of `requests` in the window.
    FailureRatio {
        /// Failures in the window.
        failures: u32,
        /// Successes + failures in the window.
        requests: u32,
    },
    /// A failure while on probation.
    ProbationFailure,
}

/// A change of a key's state caused by one recorded outcome, for callers to
/// publish (events, logs, metrics).
///
/// The move from benched to probation when a cooldown elapses is not a
/// transition: it happens lazily, and [`Tracker::state`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// The key was benched for `cooldown`.
    Benched {
        /// Why.
        cause: BenchCause,
        /// How long.
        cooldown: Duration,
    },
    /// The key should have been benched, but that would have put more than
    /// `max_benched_percent` of the pool out of service: it stays available.
    /// Its failure count is kept, so its next failure tries again.
    BenchSuppressed {
        /// Why it would have been benched.
        cause: BenchCause,
    },
    /// A success on probation restored the key.
    Restored,
}

/// Running totals of a key (or, in [`PoolStats`], of the whole pool).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Outcomes classified as success.
    pub successes: u64,
    /// Outcomes classified as failure.
    pub failures: u64,
    /// Outcomes classified as neutral.
    pub neutral: u64,
    /// Outcomes that changed no counter or state because the key was
    /// benched, or because the permit was taken before the key's last
    /// benching (stale). Also included in the three totals above.
    pub ignored: u64,
    /// Benchings.
    pub benched: u64,
    /// Benchings suppressed by `max_benched_percent`.
    pub bench_suppressed: u64,
    /// Restorations after probation.
    pub restored: u64,
}

/// One entry of a key's outcome history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// When it was recorded (the `now` passed in).
    pub at: Instant,
    /// What happened (status or error kind), target and latency.
    pub observation: Observation,
    /// How the pool's [`Classifier`] read it.
    pub verdict: Verdict,
    /// `false` when it was ignored: the key was benched, or the permit was
    /// stale (see [`Counters::ignored`]).
    pub counted: bool,
}

/// One entry of a key's bench history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchRecord {
    /// When the key was benched.
    pub at: Instant,
    /// For how long.
    pub cooldown: Duration,
    /// Why.
    pub cause: BenchCause,
    /// 1 for a first benching, 2 for the next one without `recovery` of
    /// clean service in between, and so on.
    pub strike: u32,
    /// When a success on probation restored the key, if it did.
    pub restored_at: Option<Instant>,
}

/// The state of one key, for an admin view (`/probe`).
#[derive(Debug, Clone, PartialEq)]
pub struct KeySnapshot<K> {
    /// The key.
    pub key: K,
    /// Its state at the snapshot's `now`.
    pub state: State,
    /// Current run of consecutive failures.
    pub consecutive_failures: u32,
    /// Failures in the rate window (0 unless [`Strategy::Rate`]).
    pub window_failures: u32,
    /// Successes + failures in the rate window (0 unless [`Strategy::Rate`]).
    pub window_requests: u32,
    /// Probe requests in flight (meaningful on probation).
    pub probes_in_flight: u32,
    /// The cooldown the next benching would get.
    pub next_cooldown: Duration,
    /// Running totals.
    pub counters: Counters,
    /// The newest outcomes, oldest first.
    pub recent: Vec<HistoryEntry>,
    /// The newest benchings, oldest first.
    pub benches: Vec<BenchRecord>,
}

/// Counts of a pool's keys by state, and pool totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Keys in the pool.
    pub total: usize,
    /// Keys available.
    pub available: usize,
    /// Keys benched (cooldown not elapsed).
    pub benched: usize,
    /// Keys on probation.
    pub probation: usize,
    /// Most keys that may be out of service (benched or on probation).
    pub max_benched: usize,
    /// Totals over every key the pool has had.
    pub counters: Counters,
}

/// The right to send one request through a key, from [`Tracker::acquire`]
/// or [`Tracker::acquire_next`].
///
/// Hand it back with its outcome to [`Tracker::finish`]. On probation it
/// holds one of the key's `probation_requests` probe slots; dropping it
/// (request aborted, task cancelled) frees the slot without recording
/// anything, even without access to the tracker.
#[derive(Debug)]
#[must_use = "pass the permit to Tracker::finish with the outcome"]
pub struct Permit<K> {
    key: K,
    epoch: u64,
    probe: Option<ProbeSlot>,
}

impl<K> Permit<K> {
    /// The key to send the request through.
    pub fn key(&self) -> &K {
        &self.key
    }

    /// Whether this request probes a key on probation.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }
}

#[derive(Debug)]
struct ProbeSlot(Arc<AtomicU32>);

impl Drop for ProbeSlot {
    fn drop(&mut self) {
        // Exactly one increment preceded this slot's creation.
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Available,
    /// Benched, or on probation once `cooldown` has elapsed.
    Out {
        since: Instant,
        cooldown: Duration,
    },
}

fn state_of(phase: Phase, now: Instant) -> State {
    match phase {
        Phase::Available => State::Available,
        Phase::Out { since, cooldown } => {
            if now.saturating_duration_since(since) >= cooldown {
                State::Probation
            } else {
                State::Benched { since, cooldown }
            }
        }
    }
}

#[derive(Debug)]
struct Entry<K> {
    key: K,
    phase: Phase,
    /// Changes on every benching (unique within the tracker): permits taken
    /// before the last benching are stale.
    epoch: u64,
    consecutive: u32,
    window: RateWindow,
    next_cooldown: Duration,
    strikes: u32,
    restored_at: Option<Instant>,
    /// Probe slots in use; a fresh counter per benching so that probes of an
    /// earlier probation never hold a slot of the current one.
    probes: Arc<AtomicU32>,
    counters: Counters,
    history: Ring<HistoryEntry>,
    benches: Ring<BenchRecord>,
}

/// The health of every key of one pool.
///
/// # Time
///
/// Every method that depends on time takes `now`; nothing reads the system
/// clock. Callers pass `Instant::now()`, tests pass a simulated instant. A
/// `now` earlier than one already seen is taken as the latest one seen, so
/// the state never moves backwards.
///
/// # Threads
///
/// `Tracker` is a plain struct (`Send + Sync` when `K` is): mutations
/// (`record`, `finish`, `insert`, `remove`) take `&mut self`, so callers
/// sharing a tracker between tasks wrap it in a `Mutex` (or `RwLock`:
/// [`acquire`](Self::acquire), [`acquire_next`](Self::acquire_next) and the
/// queries take `&self`). Each critical section is a hash lookup and a few
/// field updates; a record allocates nothing once the key's history ring is
/// full. A [`Permit`] releases its probe slot on drop with an atomic, without
/// the lock.
///
/// # States
///
/// ```text
///  Available ──Nth failure──▶ Benched ──cooldown elapses──▶ Probation
///      ▲                        ▲                              │
///      │                        └────────── failure ───────────┤
///      └──────────────────────── success ──────────────────────┘
/// ```
///
/// * Available: successes reset the failure run; failures feed the
///   [`Strategy`]; when it trips, the key is benched unless more than
///   `max_benched_percent` of the pool would then be out of service
///   ([`Transition::BenchSuppressed`]). Neutral outcomes change nothing.
/// * Benched: outcomes are recorded in the history but change nothing (they
///   are late answers to requests sent before the benching, or external
///   reports).
/// * Probation (lazily, once `now ≥ since + cooldown`): at most
///   `probation_requests` permits in flight. A success restores the key
///   with a clean failure count; a failure benches it again with the next
///   cooldown. Outcomes of permits taken before the benching are ignored.
/// * Cooldowns: the first is `cooldown`, each repeated one is the previous
///   × `backoff`, at most `max_cooldown`. A key benched after at least
///   `recovery` since its last restoration starts again at `cooldown`.
#[derive(Debug)]
pub struct Tracker<K> {
    options: HealthOptions,
    classifier: Classifier,
    entries: Vec<Entry<K>>,
    index: HashMap<K, usize>,
    /// Entries whose phase is `Out` (benched or on probation).
    out: usize,
    next_epoch: u64,
    cursor: AtomicUsize,
    latest: Option<Instant>,
    totals: Counters,
}

impl<K: Hash + Eq + Clone> Tracker<K> {
    /// An empty tracker with the default [`Classifier`]. Errors if the
    /// options are invalid.
    pub fn new(options: HealthOptions) -> Result<Self, InvalidOption> {
        Self::with_classifier(options, Classifier::default())
    }

    /// An empty tracker with the given classifier.
    pub fn with_classifier(
        options: HealthOptions,
        classifier: Classifier,
    ) -> Result<Self, InvalidOption> {
        options.validate()?;
        Ok(Tracker {
            options,
            classifier,
            entries: Vec::new(),
            index: HashMap::new(),
            out: 0,
            next_epoch: 0,
            cursor: AtomicUsize::new(0),
            latest: None,
            totals: Counters::default(),
        })
    }

    /// The options.
    pub fn options(&self) -> &HealthOptions {
        &self.options
    }

    /// The classifier.
    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    /// Adds an available key; `false` if it was already there (unchanged).
    pub fn insert(&mut self, key: K) -> bool {
        if self.index.contains_key(&key) {
            return false;
        }
        let epoch = self.take_epoch();
        self.index.insert(key.clone(), self.entries.len());
        self.entries.push(Entry {
            key,
            phase: Phase::Available,
            epoch,
            consecutive: 0,
            window: RateWindow::new(),
            next_cooldown: self.options.cooldown,
            strikes: 0,
            restored_at: None,
            probes: Arc::new(AtomicU32::new(0)),
            counters: Counters::default(),
            history: Ring::new(),
            benches: Ring::new(),
        });
        true
    }

    /// Removes a key and its history; `false` if it was not there.
    /// Outstanding permits of the key are then answered with
    /// [`UnknownKey`] by [`finish`](Self::finish).
    pub fn remove(&mut self, key: &K) -> bool {
        let Some(idx) = self.index.remove(key) else {
            return false;
        };
        if idx >= self.entries.len() {
            return false;
        }
        let removed = self.entries.swap_remove(idx);
        if matches!(removed.phase, Phase::Out { .. }) {
            self.out = self.out.saturating_sub(1);
        }
        if let Some(moved) = self.entries.get(idx) {
            self.index.insert(moved.key.clone(), idx);
        }
        true
    }

    /// Puts `key` back out of service as it was before a restart: benched
    /// at `since` for `cooldown`, its `strike`-th benching in a row (see
    /// [`BenchRecord::strike`]), for `cause`. Once `since + cooldown` has
    /// passed the key is on probation as usual, so a cooldown that ran out
    /// while the process was down costs one probe, not another cooldown.
    /// The next benching's cooldown continues from `cooldown` (× `backoff`,
    /// at most `max_cooldown`, at least the configured `cooldown`).
    ///
    /// The key's failure run and window are cleared and permits taken
    /// before are stale. This is a restoration, not a new benching: it is
    /// not counted in [`Counters::benched`] and returns no
    /// [`Transition`]; it is added to the key's bench history.
    ///
    /// Returns `Ok(false)`, changing nothing, when the key is available
    /// and `max_benched_percent` of the pool is already out of service (a
    /// key already out of service is re-benched whatever the cap). Errors
    /// for an unknown key.
    pub fn restore_bench(
        &mut self,
        key: &K,
        since: Instant,
        cooldown: Duration,
        cause: BenchCause,
        strike: u32,
    ) -> Result<bool, UnknownKey> {
        self.restore(key, since, cooldown, cause, strike, true)
    }

    /// [`restore_bench`](Self::restore_bench) whatever
    /// `max_benched_percent`: for a key whose benching takes no capacity
    /// from the pool, such as an egress address the pool does not hold
    /// and whose source will not hand it out meanwhile. The key counts as
    /// out of service from then on, like any benched key (later benchings
    /// of the pool see it under the cap). Errors for an unknown key.
    pub fn restore_bench_uncapped(
        &mut self,
        key: &K,
        since: Instant,
        cooldown: Duration,
        cause: BenchCause,
        strike: u32,
    ) -> Result<(), UnknownKey> {
        self.restore(key, since, cooldown, cause, strike, false)
            .map(|_| ())
    }

    fn restore(
        &mut self,
        key: &K,
        since: Instant,
        cooldown: Duration,
        cause: BenchCause,
        strike: u32,
        capped: bool,
    ) -> Result<bool, UnknownKey> {
        let idx = *self.index.get(key).ok_or(UnknownKey)?;
        let cap = self.options.max_benched(self.entries.len());
        let Tracker {
            options,
            entries,
            out,
            next_epoch,
            ..
        } = self;
        let e = entries.get_mut(idx).ok_or(UnknownKey)?;
        if e.phase == Phase::Available {
            if capped && *out >= cap {
                return Ok(false);
            }
            *out += 1;
        }
        let cooldown = cooldown.min(crate::options::MAX_DURATION);
        e.phase = Phase::Out { since, cooldown };
        e.epoch = *next_epoch;
        *next_epoch = next_epoch.wrapping_add(1);
        e.strikes = strike.max(1);
        // Never below the configured first cooldown (the saved one may be
        // from another config, or cut short).
        e.next_cooldown =
            grow(cooldown, options.backoff, options.max_cooldown).max(options.cooldown);
        e.consecutive = 0;
        e.window.clear();
        e.restored_at = None;
        if Arc::strong_count(&e.probes) > 1 {
            e.probes = Arc::new(AtomicU32::new(0));
        }
        e.benches.push(
            options.max_bench_history,
            BenchRecord {
                at: since,
                cooldown,
                cause,
                strike: e.strikes,
                restored_at: None,
            },
        );
        Ok(true)
    }

    /// Whether the key is in the pool.
    pub fn contains(&self, key: &K) -> bool {
        self.index.contains_key(key)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the pool has no key.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every key, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.entries.iter().map(|e| &e.key)
    }

    /// The key's state at `now`; `None` for an unknown key.
    pub fn state(&self, key: &K, now: Instant) -> Option<State> {
        let now = self.clamp(now);
        self.entry(key).map(|e| state_of(e.phase, now))
    }

    /// Whether the key is in full service at `now` (not benched, not on
    /// probation).
    pub fn is_available(&self, key: &K, now: Instant) -> bool {
        self.state(key, now) == Some(State::Available)
    }

    /// Keys in full service at `now`.
    pub fn available_keys(&self, now: Instant) -> impl Iterator<Item = &K> {
        let now = self.clamp(now);
        self.entries
            .iter()
            .filter(move |e| state_of(e.phase, now) == State::Available)
            .map(|e| &e.key)
    }

    /// Takes a permit to send one request through `key`: always for an
    /// available key, for a key on probation only while fewer than
    /// `probation_requests` probes are in flight, never for a benched key.
    pub fn acquire(&self, key: &K, now: Instant) -> Result<Permit<K>, Unavailable> {
        let now = self.clamp(now);
        let idx = *self.index.get(key).ok_or(Unavailable::UnknownKey)?;
        self.try_acquire(idx, now)
    }

    /// Takes a permit on the next key that accepts one, round robin over the
    /// pool (no random generator: the spread is even and deterministic). Keys
    /// on probation get their probes when their turn comes.
    pub fn acquire_next(&self, now: Instant) -> Result<Permit<K>, NoneAvailable> {
        let now = self.clamp(now);
        let total = self.entries.len();
        let mut refused = NoneAvailable {
            total,
            benched: 0,
            probation_full: 0,
        };
        if total == 0 {
            return Err(refused);
        }
        let start = self.cursor.load(Ordering::Relaxed) % total;
        for i in 0..total {
            let idx = (start + i) % total;
            match self.try_acquire(idx, now) {
                Ok(permit) => {
                    self.cursor.store(idx + 1, Ordering::Relaxed);
                    return Ok(permit);
                }
                Err(Unavailable::Benched { .. }) => refused.benched += 1,
                Err(Unavailable::ProbationFull { .. }) => refused.probation_full += 1,
                Err(Unavailable::UnknownKey) => {}
            }
        }
        Err(refused)
    }

    /// Records an outcome of `key` that came without a permit (client
    /// feedback, access logs), classified by the pool's [`Classifier`].
    /// Returns the transition it caused, if any.
    pub fn record(
        &mut self,
        key: &K,
        observation: impl Into<Observation>,
        now: Instant,
    ) -> Result<Option<Transition>, UnknownKey> {
        let now = self.advance(now);
        let idx = *self.index.get(key).ok_or(UnknownKey)?;
        Ok(self.apply(idx, observation.into(), now, None))
    }

    /// Records the outcome of the request a permit was taken for, and frees
    /// its probe slot. If the key was benched after the permit was taken the
    /// outcome is only kept in the history (stale). Errors if the key has
    /// been removed.
    pub fn finish(
        &mut self,
        permit: Permit<K>,
        observation: impl Into<Observation>,
        now: Instant,
    ) -> Result<Option<Transition>, UnknownKey> {
        let Permit { key, epoch, probe } = permit;
        drop(probe);
        let now = self.advance(now);
        let idx = *self.index.get(&key).ok_or(UnknownKey)?;
        Ok(self.apply(idx, observation.into(), now, Some(epoch)))
    }

    /// Counts of keys by state at `now`, and pool totals.
    pub fn stats(&self, now: Instant) -> PoolStats {
        let now = self.clamp(now);
        let mut stats = PoolStats {
            total: self.entries.len(),
            max_benched: self.options.max_benched(self.entries.len()),
            counters: self.totals,
            ..PoolStats::default()
        };
        for e in &self.entries {
            match state_of(e.phase, now) {
                State::Available => stats.available += 1,
                State::Benched { .. } => stats.benched += 1,
                State::Probation => stats.probation += 1,
            }
        }
        stats
    }

    /// The outcome history of `key`, oldest first (at most `max_history`).
    pub fn history(&self, key: &K) -> Option<impl Iterator<Item = &HistoryEntry>> {
        self.entry(key).map(|e| e.history.iter())
    }

    /// The bench history of `key`, oldest first (at most
    /// `max_bench_history`).
    pub fn bench_history(&self, key: &K) -> Option<impl Iterator<Item = &BenchRecord>> {
        self.entry(key).map(|e| e.benches.iter())
    }

    /// A snapshot of one key with its `recent` newest outcomes and benchings.
    pub fn snapshot_key(&self, key: &K, now: Instant, recent: usize) -> Option<KeySnapshot<K>> {
        let now = self.clamp(now);
        self.entry(key).map(|e| self.snapshot_entry(e, now, recent))
    }

    /// A snapshot of every key, each with its `recent` newest outcomes and
    /// benchings.
    pub fn snapshot(&self, now: Instant, recent: usize) -> Vec<KeySnapshot<K>> {
        let now = self.clamp(now);
        self.entries
            .iter()
            .map(|e| self.snapshot_entry(e, now, recent))
            .collect()
    }

    fn snapshot_entry(&self, e: &Entry<K>, now: Instant, recent: usize) -> KeySnapshot<K> {
        let (window_failures, window_requests) = match self.options.strategy {
            Strategy::Rate { window, .. } => e.window.counts(window, now),
            Strategy::Consecutive { .. } => (0, 0),
        };
        let state = state_of(e.phase, now);
        let next_cooldown = if state == State::Available && self.recovered(e, now) {
            self.options.cooldown
        } else {
            e.next_cooldown
        };
        KeySnapshot {
            key: e.key.clone(),
            state,
            consecutive_failures: e.consecutive,
            window_failures,
            window_requests,
            probes_in_flight: e.probes.load(Ordering::Acquire),
            next_cooldown,
            counters: e.counters,
            recent: e.history.last(recent).cloned().collect(),
            benches: e.benches.last(recent).copied().collect(),
        }
    }

    fn entry(&self, key: &K) -> Option<&Entry<K>> {
        self.index.get(key).and_then(|&i| self.entries.get(i))
    }

    fn clamp(&self, now: Instant) -> Instant {
        match self.latest {
            Some(latest) if latest > now => latest,
            _ => now,
        }
    }

    fn advance(&mut self, now: Instant) -> Instant {
        let now = self.clamp(now);
        self.latest = Some(now);
        now
    }

    fn take_epoch(&mut self) -> u64 {
        let epoch = self.next_epoch;
        self.next_epoch = self.next_epoch.wrapping_add(1);
        epoch
    }

    /// Whether `recovery` of clean service has passed since the key's last
    /// restoration.
    fn recovered(&self, e: &Entry<K>, now: Instant) -> bool {
        e.restored_at
            .is_some_and(|r| now.saturating_duration_since(r) >= self.options.recovery)
    }

    fn try_acquire(&self, idx: usize, now: Instant) -> Result<Permit<K>, Unavailable> {
        let e = self.entries.get(idx).ok_or(Unavailable::UnknownKey)?;
        match state_of(e.phase, now) {
            State::Available => Ok(Permit {
                key: e.key.clone(),
                epoch: e.epoch,
                probe: None,
            }),
            State::Benched { since, cooldown } => Err(Unavailable::Benched { since, cooldown }),
            State::Probation => {
                let max = self.options.probation_requests;
                match e
                    .probes
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < max).then_some(n + 1)
                    }) {
                    Ok(_) => Ok(Permit {
                        key: e.key.clone(),
                        epoch: e.epoch,
                        probe: Some(ProbeSlot(Arc::clone(&e.probes))),
                    }),
                    Err(in_flight) => Err(Unavailable::ProbationFull { in_flight }),
                }
            }
        }
    }

    /// Applies one observation to entry `idx`. `epoch` is the permit's, if
    /// the observation came with one.
    fn apply(
        &mut self,
        idx: usize,
        observation: Observation,
        now: Instant,
        epoch: Option<u64>,
    ) -> Option<Transition> {
        let verdict = self.classifier.classify(&observation.outcome);
        let cap = self.options.max_benched(self.entries.len());
        let recovered = self
            .entries
            .get(idx)
            .is_some_and(|e| self.recovered(e, now));
        let epoch_after = self.next_epoch;
        let Tracker {
            options,
            entries,
            out,
            next_epoch,
            totals,
            ..
        } = self;
        let e = entries.get_mut(idx)?;

        let stale = epoch.is_some_and(|p| p != e.epoch);
        let state = state_of(e.phase, now);
        let counted = !stale && !matches!(state, State::Benched { .. });
        for c in [&mut e.counters, &mut *totals] {
            match verdict {
                Verdict::Success => c.successes += 1,
                Verdict::Failure => c.failures += 1,
                Verdict::Neutral => c.neutral += 1,
            }
            if !counted {
                c.ignored += 1;
            }
        }
        e.history.push(
            options.max_history,
            HistoryEntry {
                at: now,
                observation,
                verdict,
                counted,
            },
        );
        if !counted {
            return None;
        }

        let cause = match (state, verdict) {
            (_, Verdict::Neutral) => return None,
            (State::Benched { .. }, _) => return None,
            (State::Probation, Verdict::Success) => {
                e.phase = Phase::Available;
                e.consecutive = 0;
                e.window.clear();
                e.restored_at = Some(now);
                if let Some(b) = e.benches.last_mut() {
                    b.restored_at = Some(now);
                }
                e.counters.restored += 1;
                totals.restored += 1;
                *out = out.saturating_sub(1);
                return Some(Transition::Restored);
            }
            (State::Probation, Verdict::Failure) => BenchCause::ProbationFailure,
            (State::Available, Verdict::Success) => {
                e.consecutive = 0;
                if let Strategy::Rate { window, .. } = options.strategy {
                    e.window.add(window, now, false);
                }
                return None;
            }
            (State::Available, Verdict::Failure) => {
                e.consecutive = e.consecutive.saturating_add(1);
                let tripped = match options.strategy {
                    Strategy::Consecutive {
                        consecutive_failures,
                    } => (e.consecutive >= consecutive_failures)
                        .then_some(BenchCause::ConsecutiveFailures(e.consecutive)),
                    Strategy::Rate {
                        max_failure_ratio,
                        window,
                        min_requests,
                    } => {
                        e.window.add(window, now, true);
                        let (failures, requests) = e.window.counts(window, now);
                        (requests >= min_requests
                            && f64::from(failures) / f64::from(requests) >= max_failure_ratio)
                            .then_some(BenchCause::FailureRatio { failures, requests })
                    }
                };
                let cause = tripped?;
                if *out >= cap {
                    e.counters.bench_suppressed += 1;
                    totals.bench_suppressed += 1;
                    return Some(Transition::BenchSuppressed { cause });
                }
                *out += 1;
                if recovered {
                    e.next_cooldown = options.cooldown;
                    e.strikes = 0;
                }
                cause
            }
        };

        // Bench (from available, or again from probation).
        let cooldown = e.next_cooldown;
        e.phase = Phase::Out {
            since: now,
            cooldown,
        };
        e.epoch = epoch_after;
        *next_epoch = epoch_after.wrapping_add(1);
        e.strikes = e.strikes.saturating_add(1);
        e.next_cooldown = grow(cooldown, options.backoff, options.max_cooldown);
        e.consecutive = 0;
        e.window.clear();
        if Arc::strong_count(&e.probes) > 1 {
            // Probes of the last probation are still in flight: they keep the
            // old counter, the next probation starts from zero.
            e.probes = Arc::new(AtomicU32::new(0));
        }
        e.counters.benched += 1;
        totals.benched += 1;
        e.benches.push(
            options.max_bench_history,
            BenchRecord {
                at: now,
                cooldown,
                cause,
                strike: e.strikes,
                restored_at: None,
            },
        );
        Some(Transition::Benched { cause, cooldown })
    }
}

/// `min(cooldown × backoff, max)`, without overflow or panic.
fn grow(cooldown: Duration, backoff: f64, max: Duration) -> Duration {
    let secs = cooldown.as_secs_f64() * backoff;
    Duration::try_from_secs_f64(secs).map_or(max, |d| d.min(max))
}
