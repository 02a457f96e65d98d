//! The registry of address pools whose health the daemon tracks, shared by
//! the monitors, the admin API (`/probe`, client feedback) and the metrics.
//!
//! # Two kinds of pool, one view
//!
//! - `"nginx"` pools (`[monitor.<name>]`): the registry owns a
//!   `Mutex<health::Tracker<IpAddr>>` that the monitor feeds.
//! - `"egress"` pools (`[pools.<name>]`): an [`addrpool::Pool`] owns its
//!   tracker (leasing must consult it under the pool's own lock); the
//!   registry holds a handle and reads through it.
//!
//! Both get `/probe`, client feedback
//! (`POST /api/pools/{pool}/addresses/{ip}/outcome`) and the
//! `ippool_pool_*` metrics the same way. The registry is built once and
//! then only read, so lookups take no lock; each tracker has its own.
//!
//! # Benches survive a restart
//!
//! The benches of nginx and egress pools are kept in the state store
//! ([`store::HealthRecord`]): [`Pool::restore_benches`] re-applies the
//! saved ones at start, before anything serves (with the cooldown they
//! have left: one that ran out while the daemon was down leaves the
//! address on probation) and from then on every benching and restoration
//! of the pool is queued, in the order the tracker made it, on the pool's
//! [`BenchJournal`]:
//!
//! - an nginx pool queues under the tracker's lock in [`Pool::record`];
//!   its monitor task writes the queue;
//! - an egress pool's tracker lives in `addrpool`, which calls the pool's
//!   [`addrpool::HealthJournal`] under its own lock (the
//!   [`addrpool::TransitionSink`] that counts transitions runs after the
//!   lock is released, so two changes of one address could reach it out
//!   of order); an address it forgets while on probation loses its record
//!   too. A task per pool writes the queue ([`BenchJournal::save_until`])
//!   and `serve` writes what is left once the listeners have drained
//!   ([`BenchJournal::flush`]).
//!
//! Writes happen on blocking threads ([`BenchJournal::save`]), never on a
//! connection path. A change is on disk milliseconds after it happened; a
//! `kill -9` in between loses at most those last changes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use health::{BenchCause, Observation, Tracker, Transition};
use serde::Serialize;

use crate::metrics::Metrics;

/// Client reports kept per address (with their `detail`) for `/probe`.
pub const MAX_REPORTS: usize = 10;

/// One pool of addresses and its health.
#[derive(Debug)]
pub struct Pool {
    name: String,
    kind: &'static str,
    events: crate::events::Events,
    backend: Backend,
    reports: Mutex<HashMap<IpAddr, VecDeque<Report>>>,
    /// Bench changes to persist, once [`Pool::restore_benches`] ran.
    journal: OnceLock<Arc<BenchJournal>>,
}

/// One change of a pool's benched addresses, to persist.
#[derive(Clone, Debug, PartialEq)]
pub enum BenchChange {
    /// `ip` was benched (or benched again from probation).
    Benched {
        /// The address.
        ip: IpAddr,
        /// Since when.
        since: Instant,
        /// For how long.
        cooldown: Duration,
        /// Why.
        cause: BenchCause,
        /// Its strike (1 for a first benching, see
        /// [`health::BenchRecord::strike`]).
        strike: u32,
    },
    /// A successful probe restored `ip`.
    Restored {
        /// The address.
        ip: IpAddr,
    },
    /// An egress pool forgot `ip` while it was on probation (it no longer
    /// holds it; see [`addrpool::HealthJournal::forgotten`]): its record
    /// goes, as the pool would hand it out again as a fresh address.
    Forgotten {
        /// The address.
        ip: IpAddr,
    },
}

/// The bench changes of one pool waiting to be written to the store, in
/// the order the tracker made them (they are queued under the tracker's
/// lock). Filled by [`Pool::record`] (nginx pools) or by the
/// [`addrpool::HealthJournal`] of an egress pool; emptied by its saver
/// ([`BenchJournal::save`]: the pool's monitor task, or
/// [`BenchJournal::save_until`] for an egress pool).
#[derive(Debug, Default)]
pub struct BenchJournal {
    queue: Mutex<Vec<BenchChange>>,
    notify: tokio::sync::Notify,
    /// Held by a save from taking the queue to its last write, so two
    /// saves (a late one and the final one at shutdown) never interleave.
    saving: Mutex<()>,
}

impl BenchJournal {
    fn push(&self, change: BenchChange) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(change);
        self.notify.notify_one();
    }

    /// Takes the queued changes, oldest first.
    pub fn take(&self) -> Vec<BenchChange> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Resolves when changes were queued since the last call (at once if
    /// some were queued while nobody waited).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// Writes the queued changes of `pool` to `store`, in order; returns
    /// how many were written. Blocks on disk I/O (an fsync per change):
    /// call it from a blocking thread. A change the store refuses is
    /// logged as an error and dropped (the address keeps its state in
    /// memory; only a restart would forget it).
    pub fn save(&self, pool: &str, store: &store::Store) -> usize {
        let _saving = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        let changes = self.take();
        if changes.is_empty() {
            return 0;
        }
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut written = 0;
        for change in changes {
            let (ip, result) = match &change {
                BenchChange::Benched {
                    ip,
                    since,
                    cooldown,
                    cause,
                    strike,
                } => {
                    let since_unix_ms = crate::rules::unix_ms(*since, now, wall);
                    let until = since_unix_ms
                        .saturating_add(u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX));
                    let record = store::HealthRecord {
                        pool: pool.to_owned(),
                        address: ip.to_string(),
                        since_unix_ms,
                        until_unix_ms: until,
                        strike: *strike,
                        cause: cause_text(cause),
                    };
                    (ip, store.put_bench(&record))
                }
                BenchChange::Restored { ip } | BenchChange::Forgotten { ip } => {
                    (ip, store.remove_bench(pool, &ip.to_string()).map(|_| ()))
                }
            };
            match result {
                Ok(()) => written += 1,
                Err(e) => tracing::error!(
                    pool,
                    %ip,
                    error = %e,
                    "bench change not saved: a restart would not know it"
                ),
            }
        }
        written
    }

    /// Writes the changes as they are queued, in order, each batch on a
    /// blocking thread (never on the async workers, never on a connection
    /// path), until `shutdown`. The saver of an egress pool; what is
    /// queued after it stops is written by [`BenchJournal::flush`].
    pub async fn save_until(
        self: Arc<Self>,
        pool: String,
        store: store::Store,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.changed() => {}
            }
            self.save_blocking(&pool, &store).await;
        }
    }

    /// Writes what is queued, on a blocking thread: the last changes, once
    /// the listeners have drained at shutdown.
    pub async fn flush(self: Arc<Self>, pool: String, store: store::Store) {
        self.save_blocking(&pool, &store).await;
    }

    async fn save_blocking(self: &Arc<Self>, pool: &str, store: &store::Store) {
        let (journal, p, s) = (Arc::clone(self), pool.to_owned(), store.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || journal.save(&p, &s)).await {
            tracing::error!(pool, error = %e, "saving bench changes failed");
        }
    }
}

/// Resumes a saved bench at (`now`, `wall`): its start as an `Instant`,
/// and its cooldown. A bench saved in the future (the clock went back)
/// starts now; one older than this host's monotonic clock keeps what is
/// left of its cooldown.
fn resume_bench(r: &store::HealthRecord, now: Instant, wall: SystemTime) -> (Instant, Duration) {
    let since_wall = SystemTime::UNIX_EPOCH + Duration::from_millis(r.since_unix_ms);
    let cooldown = Duration::from_millis(r.cooldown_ms());
    let elapsed = wall.duration_since(since_wall).unwrap_or(Duration::ZERO);
    match now.checked_sub(elapsed) {
        Some(since) => (since, cooldown),
        None => (now, cooldown.saturating_sub(elapsed)),
    }
}

/// Queues an egress pool's bench changes on its [`BenchJournal`]; called
/// by the pool under its own lock, so in the order it made them.
struct EgressJournal(Arc<BenchJournal>);

impl addrpool::HealthJournal for EgressJournal {
    fn transition(&self, source: IpAddr, t: &Transition, tracker: &Tracker<IpAddr>, now: Instant) {
        Pool::journal_change(&self.0, tracker, source, t, now);
    }

    fn forgotten(&self, source: IpAddr) {
        self.0.push(BenchChange::Forgotten { ip: source });
    }
}

/// A [`BenchCause`] as [`store::HealthRecord::cause`] text.
pub fn cause_text(cause: &BenchCause) -> String {
    match cause {
        BenchCause::ConsecutiveFailures(n) => format!("consecutive_failures:{n}"),
        BenchCause::FailureRatio { failures, requests } => {
            format!("failure_ratio:{failures}/{requests}")
        }
        BenchCause::ProbationFailure => "probation_failure".into(),
    }
}

/// The [`BenchCause`] of [`store::HealthRecord::cause`] text.
pub fn parse_cause(text: &str) -> Option<BenchCause> {
    match text.split_once(':') {
        None if text == "probation_failure" => Some(BenchCause::ProbationFailure),
        Some(("consecutive_failures", n)) => n.parse().ok().map(BenchCause::ConsecutiveFailures),
        Some(("failure_ratio", ratio)) => {
            let (f, r) = ratio.split_once('/')?;
            Some(BenchCause::FailureRatio {
                failures: f.parse().ok()?,
                requests: r.parse().ok()?,
            })
        }
        _ => None,
    }
}

/// What [`Pool::restore_benches`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Addresses benched again, with the cooldown they had left.
    pub benched: usize,
    /// Addresses whose cooldown ran out while the daemon was down: on
    /// probation (the next success restores them).
    pub probation: usize,
    /// Saved benches dropped (the address left the pool, or
    /// `max_benched_percent` is reached); each is logged.
    pub dropped: usize,
}

/// Where a pool's health lives.
#[derive(Debug)]
enum Backend {
    /// The registry owns the tracker (nginx pools).
    Tracked {
        /// Whether addresses join the pool when first seen (monitors
        /// without a fixed address list).
        discover: bool,
        tracker: Box<Mutex<Tracker<IpAddr>>>,
    },
    /// The egress pool owns it (with health on).
    Egress(addrpool::Pool),
    /// A TCP balancer owns it; keys are upstream socket addresses.
    L4(Arc<gateway::l4::L4Metrics>),
}

/// A client report (`POST …/outcome`), kept for `/probe`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// When it arrived (RFC 3339).
    pub at: String,
    /// `success`, `failure` or `status`.
    pub outcome: &'static str,
    /// The status, for `status` reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The client's words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Why an outcome could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The pool takes no client feedback (a balancer's outcomes come from
    /// its own connections).
    #[error(
        "pool `{pool}` is a TCP balancer: its upstreams' health comes from its connections, not from reports"
    )]
    NoFeedback {
        /// The pool.
        pool: String,
    },
    /// The address is not in the pool (and the pool does not discover).
    #[error("address {ip} is not in pool `{pool}`")]
    UnknownAddress {
        /// The pool.
        pool: String,
        /// The address.
        ip: IpAddr,
    },
}

impl Pool {
    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Locks a registry-owned tracker. A poisoned lock (a panic while
    /// holding it) is taken over: the tracker's state is updated field by
    /// field and stays usable.
    fn lock(tracker: &Mutex<Tracker<IpAddr>>) -> MutexGuard<'_, Tracker<IpAddr>> {
        tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one outcome of `ip`, adding `ip` first when the pool
    /// discovers its addresses; logs and counts the transition it caused.
    /// (An egress pool logs and counts its transitions through its own
    /// [`addrpool::TransitionSink`], set up by `serve`.)
    pub fn record(
        &self,
        ip: IpAddr,
        observation: impl Into<Observation>,
        now: Instant,
        metrics: &Metrics,
    ) -> Result<Option<Transition>, RecordError> {
        let unknown = || RecordError::UnknownAddress {
            pool: self.name.clone(),
            ip,
        };
        match &self.backend {
            Backend::Tracked { discover, tracker } => {
                let mut tracker = Self::lock(tracker);
                if *discover && tracker.insert(ip) {
                    tracing::info!(pool = %self.name, %ip, "new address in the pool");
                }
                let t = tracker
                    .record(&ip, observation, now)
                    .map_err(|_| unknown())?;
                if let (Some(t), Some(journal)) = (&t, self.journal.get()) {
                    // Under the tracker's lock: queued in the order made.
                    Self::journal_change(journal, &tracker, ip, t, now);
                }
                drop(tracker);
                if let Some(t) = t {
                    self.publish(ip, t, metrics);
                }
                Ok(t)
            }
            Backend::Egress(pool) => pool.record_outcome(ip, observation).map_err(|_| unknown()),
            Backend::L4(_) => Err(RecordError::NoFeedback {
                pool: self.name.clone(),
            }),
        }
    }

    /// Queues the bench change a transition of `ip` made, if any.
    fn journal_change(
        journal: &BenchJournal,
        tracker: &Tracker<IpAddr>,
        ip: IpAddr,
        t: &Transition,
        now: Instant,
    ) {
        match t {
            Transition::Benched { cause, .. } => {
                let Some(health::State::Benched { since, cooldown }) = tracker.state(&ip, now)
                else {
                    return;
                };
                let strike = tracker
                    .bench_history(&ip)
                    .and_then(|h| h.last().map(|b| b.strike))
                    .unwrap_or(1);
                journal.push(BenchChange::Benched {
                    ip,
                    since,
                    cooldown,
                    cause: *cause,
                    strike,
                });
            }
            Transition::Restored => journal.push(BenchChange::Restored { ip }),
            Transition::BenchSuppressed { .. } => {}
        }
    }

    /// Re-applies the benches of this pool saved in `store` and, from now
    /// on, queues every benching and restoration on the returned journal,
    /// for the pool's saver to write ([`BenchJournal::save`]). `None` for a
    /// balancer, and for an egress pool without health: nothing is
    /// restored or persisted for those.
    ///
    /// A saved bench keeps the cooldown it had left at (`now`, `wall`);
    /// one that ran out meanwhile leaves the address on probation. Errors
    /// when the store cannot be read or written, or holds an unreadable
    /// record of this pool (then before anything changed): nothing is
    /// reset silently. Blocks on the store (start-up only).
    ///
    /// - nginx pools: a discovering pool takes the address back in; a
    ///   bench of an address that left a fixed pool, or one over
    ///   `max_benched_percent`, is dropped from the store with a log line.
    /// - egress pools ([`addrpool::Pool::restore_bench`]): an address the
    ///   pool does not hold (the usual case at start) is remembered out of
    ///   service, so the source skips it until its cooldown ends; an
    ///   address outside the pool's source, or a held one over
    ///   `max_benched_percent`, is dropped with a log line. The pool's
    ///   changes are queued under its own lock ([`addrpool::HealthJournal`]),
    ///   so in the order it made them, and an address it forgets while on
    ///   probation has its record removed.
    pub fn restore_benches(
        &self,
        store: &store::Store,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Option<(Arc<BenchJournal>, Restored)>, store::StoreError> {
        match &self.backend {
            Backend::Tracked { .. } => {}
            Backend::Egress(pool) if pool.options().health.is_some() => {}
            Backend::Egress(_) | Backend::L4(_) => return Ok(None),
        }
        let saved = store.benches_of(&self.name)?;
        // 1. Read every record: one unreadable record stops the restore
        // before anything changed.
        let mut records = Vec::with_capacity(saved.len());
        for r in &saved {
            let bad = |reason: String| store::StoreError::Decode {
                table: store::Table::Health.name(),
                key: r.key(),
                reason,
            };
            let ip: IpAddr = r
                .address
                .parse()
                .map_err(|e| bad(format!("address {:?}: {e}", r.address)))?;
            let cause =
                parse_cause(&r.cause).ok_or_else(|| bad(format!("unknown cause {:?}", r.cause)))?;
            records.push((r, ip, cause));
        }
        let mut done = Restored::default();
        let drop_record = |r: &store::HealthRecord, why: &str| {
            tracing::warn!(
                pool = %self.name,
                address = %r.address,
                "saved bench dropped: {why}"
            );
            store.remove_bench(&r.pool, &r.address).map(|_| ())
        };
        // Those still in their cooldown first (they matter most under
        // the cap).
        let now_ms = crate::rules::unix_ms(now, now, wall);
        let by_end = |records: &mut Vec<(&store::HealthRecord, IpAddr, BenchCause)>| {
            records.sort_by_key(|(r, _, _)| r.until_unix_ms <= now_ms);
        };
        let journal = Arc::clone(self.journal.get_or_init(Arc::default));
        match &self.backend {
            Backend::Tracked { discover, tracker } => {
                let mut t = Self::lock(tracker);
                // 2. Take the addresses in first (the cap on benched
                // addresses depends on the pool's size).
                let mut usable = Vec::new();
                for (r, ip, cause) in records {
                    if !t.contains(&ip) {
                        if *discover {
                            t.insert(ip);
                        } else {
                            drop_record(r, "the address is no longer in the pool")?;
                            done.dropped += 1;
                            continue;
                        }
                    }
                    usable.push((r, ip, cause));
                }
                // 3. Bench them again.
                by_end(&mut usable);
                for (r, ip, cause) in usable {
                    let (since, cooldown) = resume_bench(r, now, wall);
                    let applied = t
                        .restore_bench(&ip, since, cooldown, cause, r.strike)
                        .unwrap_or(false);
                    if !applied {
                        drop_record(
                            r,
                            "max_benched_percent of the pool is already out of service",
                        )?;
                        done.dropped += 1;
                        continue;
                    }
                    match t.state(&ip, now) {
                        Some(health::State::Benched { .. }) => done.benched += 1,
                        _ => done.probation += 1,
                    }
                }
            }
            Backend::Egress(pool) => {
                // From now on every change is queued, under the pool's
                // lock (none happens before the listeners serve).
                pool.set_health_journal(Some(Arc::new(EgressJournal(Arc::clone(&journal)))));
                by_end(&mut records);
                for (r, ip, cause) in records {
                    let (since, cooldown) = resume_bench(r, now, wall);
                    match pool.restore_bench(ip, since, cooldown, cause, r.strike) {
                        Ok(true) => match pool.health_state(ip) {
                            Some(health::State::Benched { .. }) => done.benched += 1,
                            _ => done.probation += 1,
                        },
                        Ok(false) => {
                            drop_record(
                                r,
                                "max_benched_percent of the pool is already out of service",
                            )?;
                            done.dropped += 1;
                        }
                        Err(addrpool::PoolError::UnknownAddress { .. }) => {
                            drop_record(r, "the address is not in the pool's source")?;
                            done.dropped += 1;
                        }
                        Err(e) => {
                            drop_record(r, &e.to_string())?;
                            done.dropped += 1;
                        }
                    }
                }
            }
            Backend::L4(_) => return Ok(None),
        }
        if !saved.is_empty() {
            tracing::info!(
                pool = %self.name,
                benched = done.benched,
                probation = done.probation,
                dropped = done.dropped,
                "saved benches restored"
            );
        }
        Ok(Some((journal, done)))
    }

    /// Whether `ip` is in the pool (for an egress pool: held, or retired
    /// while benched and still remembered).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match &self.backend {
            Backend::Tracked { tracker, .. } => Self::lock(tracker).contains(&ip),
            Backend::Egress(pool) => pool.health_state(ip).is_some(),
            Backend::L4(m) => m.health(0).upstreams.iter().any(|u| u.key.ip() == ip),
        }
    }

    /// What the pool's classifier makes of `outcome`.
    pub fn classify(&self, outcome: &health::Outcome) -> health::Verdict {
        match &self.backend {
            Backend::Tracked { tracker, .. } => Self::lock(tracker).classifier().classify(outcome),
            Backend::Egress(pool) => pool.options().classifier.classify(outcome),
            Backend::L4(_) => health::Classifier::default().classify(outcome),
        }
    }

    /// The state of `ip` at `now`, if the pool knows it.
    pub fn state(&self, ip: IpAddr, now: Instant) -> Option<health::State> {
        match &self.backend {
            Backend::Tracked { tracker, .. } => Self::lock(tracker).state(&ip, now),
            Backend::Egress(pool) => pool.health_state(ip),
            Backend::L4(m) => m
                .health(0)
                .upstreams
                .into_iter()
                .find(|u| u.key.ip() == ip)
                .map(|u| u.state),
        }
    }

    /// Counts by state at `now`.
    pub fn stats(&self, now: Instant) -> health::PoolStats {
        match &self.backend {
            Backend::Tracked { tracker, .. } => Self::lock(tracker).stats(now),
            Backend::Egress(pool) => pool.health_snapshot(0).map(|s| s.stats).unwrap_or_default(),
            Backend::L4(m) => m.health(0).stats,
        }
    }

    /// Keeps a client report for `/probe`.
    pub fn add_report(&self, ip: IpAddr, report: Report) {
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        let q = reports.entry(ip).or_default();
        if q.len() >= MAX_REPORTS {
            q.pop_front();
        }
        q.push_back(report);
    }

    fn reports_of(&self, ip: IpAddr) -> Vec<Report> {
        let reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        reports
            .get(&ip)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn publish(&self, ip: IpAddr, t: Transition, metrics: &Metrics) {
        log_transition(&self.name, "address", &ip.to_string(), &t);
        announce_transition(metrics, &self.events, &self.name, &ip.to_string(), &t);
    }

    /// The `/probe` view of the pool at `now`, with each address's `recent`
    /// newest outcomes; only `only` when given.
    pub fn probe(&self, now: Instant, recent: usize, only: Option<IpAddr>) -> PoolView {
        let wall = SystemTime::now();
        // (snapshot, port, held, leases); port for balancers, held and
        // leases for egress pools.
        let (stats, mut snaps, now) = match &self.backend {
            Backend::Tracked { tracker, .. } => {
                let tracker = Self::lock(tracker);
                let snaps: Vec<_> = match only {
                    Some(ip) => tracker.snapshot_key(&ip, now, recent).into_iter().collect(),
                    None => tracker.snapshot(now, recent),
                };
                let snaps = snaps
                    .into_iter()
                    .map(|s| (s, None, None, None))
                    .collect::<Vec<_>>();
                (tracker.stats(now), snaps, now)
            }
            Backend::Egress(pool) => match pool.health_snapshot(recent) {
                Some(h) => {
                    let snaps = h
                        .addresses
                        .into_iter()
                        .filter(|a| only.is_none_or(|ip| ip == a.health.key))
                        .map(|a| (a.health, None, Some(a.held), Some(a.leases)))
                        .collect();
                    (h.stats, snaps, h.at)
                }
                None => (health::PoolStats::default(), Vec::new(), now),
            },
            Backend::L4(m) => {
                let h = m.health(recent);
                let snaps = h
                    .upstreams
                    .into_iter()
                    .filter(|u| only.is_none_or(|ip| ip == u.key.ip()))
                    .map(|u| {
                        let addr = u.key;
                        (rekey(u, addr.ip()), Some(addr.port()), None, None)
                    })
                    .collect();
                (h.stats, snaps, h.at)
            }
        };
        snaps.sort_by_key(|s| (s.0.key, s.1));
        let addresses = snaps
            .into_iter()
            .map(|(s, port, held, leases)| {
                let mut a = AddressView::new(s, now, wall);
                a.port = port;
                a.held = held;
                a.leases = leases;
                a.reports = self.reports_of(a.ip);
                a
            })
            .collect();
        PoolView {
            name: self.name.clone(),
            kind: self.kind,
            size: stats.total,
            available: stats.available,
            benched: stats.benched,
            probation: stats.probation,
            max_benched: stats.max_benched,
            addresses,
        }
    }
}

/// Publishes a transition of `key` (an address, or `ip:port` for an
/// upstream) of pool `pool` on the events stream.
pub fn publish_transition(events: &crate::events::Events, pool: &str, key: &str, t: &Transition) {
    let mut data = serde_json::json!({ "pool": pool, "address": key });
    match t {
        Transition::Benched { cause, cooldown } => {
            data["cause"] = format!("{cause:?}").into();
            data["cooldown_seconds"] = cooldown.as_secs_f64().into();
        }
        Transition::BenchSuppressed { cause } => data["cause"] = format!("{cause:?}").into(),
        Transition::Restored => {}
    }
    events.publish(transition_kind(t), data);
}

/// Counts a transition of `key` in pool `pool`
/// (`ippool_pool_transitions_total`) and publishes it on the events
/// stream: what every kind of pool does with its transitions.
pub fn announce_transition(
    metrics: &Metrics,
    events: &crate::events::Events,
    pool: &str,
    key: &str,
    t: &Transition,
) {
    metrics.count_transition(pool, transition_kind(t));
    publish_transition(events, pool, key, t);
}

/// Logs a transition of `key` in pool `pool`; `what` names the key
/// (`address`, `backend`).
pub fn log_transition(pool: &str, what: &str, key: &str, t: &Transition) {
    match t {
        Transition::Benched { cause, cooldown } => tracing::info!(
            pool,
            key,
            cause = ?cause,
            cooldown = %humantime::format_duration(*cooldown),
            "{what} benched"
        ),
        Transition::BenchSuppressed { cause } => tracing::warn!(
            pool,
            key,
            cause = ?cause,
            "{what} not benched: max_benched_percent of the pool is already out"
        ),
        Transition::Restored => tracing::info!(pool, key, "{what} restored"),
    }
}

/// The same snapshot under another key.
fn rekey<K, J>(s: health::KeySnapshot<K>, key: J) -> health::KeySnapshot<J> {
    health::KeySnapshot {
        key,
        state: s.state,
        consecutive_failures: s.consecutive_failures,
        window_failures: s.window_failures,
        window_requests: s.window_requests,
        probes_in_flight: s.probes_in_flight,
        next_cooldown: s.next_cooldown,
        counters: s.counters,
        recent: s.recent,
        benches: s.benches,
    }
}

/// `benched`, `bench_suppressed` or `restored`: the `kind` label of
/// `ippool_pool_transitions_total`.
pub fn transition_kind(t: &Transition) -> &'static str {
    match t {
        Transition::Benched { .. } => "benched",
        Transition::BenchSuppressed { .. } => "bench_suppressed",
        Transition::Restored => "restored",
    }
}

/// `/probe`'s view of one pool.
#[derive(Debug, Serialize)]
pub struct PoolView {
    /// The pool's name.
    pub name: String,
    /// Its kind.
    pub kind: &'static str,
    /// Addresses in the pool.
    pub size: usize,
    /// Addresses available.
    pub available: usize,
    /// Addresses benched.
    pub benched: usize,
    /// Addresses on probation.
    pub probation: usize,
    /// Most addresses out of service at once.
    pub max_benched: usize,
    /// The addresses (all, or the one asked for), sorted.
    pub addresses: Vec<AddressView>,
}

/// `/probe`'s view of one address.
#[derive(Debug, Serialize)]
pub struct AddressView {
    /// The address.
    pub ip: IpAddr,
    /// `available`, `benched` or `probation`.
    pub state: &'static str,
    /// When benched: since when (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub benched_since: Option<String>,
    /// When benched: until when (RFC 3339); then on probation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub benched_until: Option<String>,
    /// When benched: seconds left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining_seconds: Option<f64>,
    /// Probe requests in flight (on probation).
    pub probes_in_flight: u32,
    /// Current run of failures.
    pub consecutive_failures: u32,
    /// Rate strategy: failures in the window.
    pub window_failures: u32,
    /// Rate strategy: outcomes in the window.
    pub window_requests: u32,
    /// The next benching's cooldown, in seconds.
    pub next_cooldown_seconds: f64,
    /// Running totals.
    pub counters: CountersView,
    /// The newest outcomes, oldest first.
    pub recent: Vec<OutcomeView>,
    /// The newest client reports, oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<Report>,
    /// Egress pools: whether the pool holds the address now (`false`: it
    /// was retired while benched and is remembered until its cooldown
    /// ends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<bool>,
    /// Egress pools: leases of the address outstanding now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leases: Option<u32>,
    /// Balancers: the upstream's port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// Counters of an address.
#[derive(Debug, Serialize)]
pub struct CountersView {
    /// Outcomes read as success.
    pub successes: u64,
    /// Outcomes read as failure.
    pub failures: u64,
    /// Outcomes read as neutral.
    pub neutral: u64,
    /// Outcomes that changed nothing (arrived while benched).
    pub ignored: u64,
    /// Benchings.
    pub benched: u64,
    /// Benchings suppressed by `max_benched_percent`.
    pub bench_suppressed: u64,
    /// Restorations.
    pub restored: u64,
}

/// One recorded outcome.
#[derive(Debug, Serialize)]
pub struct OutcomeView {
    /// When (RFC 3339).
    pub at: String,
    /// The raw outcome: `status`, `connected`, `connect_error`, `timeout`,
    /// `early_eof` or `reported`.
    pub outcome: &'static str,
    /// The HTTP status, for `status` outcomes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// `success`, `failure` or `neutral`.
    pub verdict: &'static str,
    /// Whether it counted (not while benched).
    pub counted: bool,
    /// Where the request went, if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// How long it took, in milliseconds, if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
}

/// `success`, `failure` or `neutral`.
pub fn verdict_str(v: health::Verdict) -> &'static str {
    match v {
        health::Verdict::Success => "success",
        health::Verdict::Failure => "failure",
        health::Verdict::Neutral => "neutral",
    }
}

/// `available`, `benched` or `probation`.
pub fn state_str(s: &health::State) -> &'static str {
    match s {
        health::State::Available => "available",
        health::State::Benched { .. } => "benched",
        health::State::Probation => "probation",
    }
}

/// An `Instant` as wall-clock RFC 3339, given a matching (`now`, `wall`).
fn wall_time(at: Instant, now: Instant, wall: SystemTime) -> String {
    let t = if at <= now {
        wall.checked_sub(now - at)
    } else {
        wall.checked_add(at - now)
    };
    t.map_or_else(String::new, |t| {
        humantime::format_rfc3339_millis(t).to_string()
    })
}

impl AddressView {
    fn new(s: health::KeySnapshot<IpAddr>, now: Instant, wall: SystemTime) -> AddressView {
        let (since, until, remaining) = match s.state {
            health::State::Benched { since, cooldown } => {
                let until = since.checked_add(cooldown);
                (
                    Some(wall_time(since, now, wall)),
                    until.map(|u| wall_time(u, now, wall)),
                    until.map(|u| u.saturating_duration_since(now).as_secs_f64()),
                )
            }
            _ => (None, None, None),
        };
        let c = s.counters;
        AddressView {
            ip: s.key,
            state: state_str(&s.state),
            benched_since: since,
            benched_until: until,
            remaining_seconds: remaining,
            probes_in_flight: s.probes_in_flight,
            consecutive_failures: s.consecutive_failures,
            window_failures: s.window_failures,
            window_requests: s.window_requests,
            next_cooldown_seconds: s.next_cooldown.as_secs_f64(),
            counters: CountersView {
                successes: c.successes,
                failures: c.failures,
                neutral: c.neutral,
                ignored: c.ignored,
                benched: c.benched,
                bench_suppressed: c.bench_suppressed,
                restored: c.restored,
            },
            recent: s
                .recent
                .iter()
                .map(|h| {
                    let (outcome, status) = match h.observation.outcome {
                        health::Outcome::Status(st) => ("status", Some(st)),
                        health::Outcome::Connected => ("connected", None),
                        health::Outcome::ConnectError(_) => ("connect_error", None),
                        health::Outcome::Timeout => ("timeout", None),
                        health::Outcome::EarlyEof => ("early_eof", None),
                        health::Outcome::Reported(_) => ("reported", None),
                    };
                    OutcomeView {
                        at: wall_time(h.at, now, wall),
                        outcome,
                        status,
                        verdict: verdict_str(h.verdict),
                        counted: h.counted,
                        target: h.observation.target.as_deref().map(str::to_owned),
                        latency_ms: h.observation.latency.map(|d| d.as_secs_f64() * 1e3),
                    }
                })
                .collect(),
            reports: Vec::new(),
            held: None,
            leases: None,
            port: None,
        }
    }
}

/// Every pool, by name.
#[derive(Debug, Default)]
pub struct Pools {
    pools: BTreeMap<String, Arc<Pool>>,
    events: crate::events::Events,
}

/// A pool name registered twice.
#[derive(Debug, thiserror::Error)]
#[error("a pool named `{0}` is already registered")]
pub struct DuplicatePool(pub String);

impl Pools {
    /// Registers a pool with its tracker (see the module docs). `discover`
    /// lets unknown addresses join on their first outcome.
    pub fn register(
        &mut self,
        name: &str,
        kind: &'static str,
        tracker: Tracker<IpAddr>,
        discover: bool,
    ) -> Result<Arc<Pool>, DuplicatePool> {
        self.insert(
            name,
            kind,
            Backend::Tracked {
                discover,
                tracker: Box::new(Mutex::new(tracker)),
            },
        )
    }

    /// Registers a TCP balancer's upstreams.
    pub fn register_l4(
        &mut self,
        name: &str,
        metrics: Arc<gateway::l4::L4Metrics>,
    ) -> Result<Arc<Pool>, DuplicatePool> {
        self.insert(name, "l4", Backend::L4(metrics))
    }

    /// Registers an egress pool (started with health on; without it the
    /// pool shows no address).
    pub fn register_egress(
        &mut self,
        name: &str,
        pool: addrpool::Pool,
    ) -> Result<Arc<Pool>, DuplicatePool> {
        self.insert(name, "egress", Backend::Egress(pool))
    }

    fn insert(
        &mut self,
        name: &str,
        kind: &'static str,
        backend: Backend,
    ) -> Result<Arc<Pool>, DuplicatePool> {
        if self.pools.contains_key(name) {
            return Err(DuplicatePool(name.to_owned()));
        }
        let pool = Arc::new(Pool {
            name: name.to_owned(),
            kind,
            events: self.events.clone(),
            backend,
            reports: Mutex::new(HashMap::new()),
            journal: OnceLock::new(),
        });
        self.pools.insert(name.to_owned(), Arc::clone(&pool));
        Ok(pool)
    }

    /// A registry whose pools publish their transitions on `events`.
    pub fn with_events(events: crate::events::Events) -> Pools {
        Pools {
            pools: BTreeMap::new(),
            events,
        }
    }

    /// The events stream pools publish their transitions on.
    pub fn events(&self) -> &crate::events::Events {
        &self.events
    }

    /// A pool by name.
    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(name)
    }

    /// The pools, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.values()
    }

    /// The pool names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.pools.keys().map(String::as_str)
    }

    /// Sets `ippool_pool_addresses` from every pool's state at `now`
    /// (benched → probation happens lazily, so this runs at scrape time).
    pub fn refresh_metrics(&self, metrics: &Metrics, now: Instant) {
        for p in self.pools.values() {
            let s = p.stats(now);
            metrics.set_pool_addresses(&p.name, s.available, s.benched, s.probation);
        }
    }
}

/// `Instant` of a log timestamp: `now` minus its age (a line from the
/// future, or older than the monotonic clock can express, is `now`).
pub fn instant_of(t: SystemTime, now: Instant, wall: SystemTime) -> Instant {
    let age = wall.duration_since(t).unwrap_or(Duration::ZERO);
    now.checked_sub(age).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(ips: &[&str]) -> Tracker<IpAddr> {
        let mut t = Tracker::new(health::HealthOptions::default()).unwrap();
        for ip in ips {
            t.insert(ip.parse().unwrap());
        }
        t
    }

    #[test]
    fn fixed_and_discovered_pools() {
        let metrics = Metrics::new(&Arc::new(crate::rules::RuleSets::default()));
        let mut pools = Pools::default();
        let fixed = pools
            .register("fixed", "nginx", tracker(&["10.0.0.1", "10.0.0.2"]), false)
            .unwrap();
        let open = pools.register("open", "nginx", tracker(&[]), true).unwrap();
        assert!(
            pools
                .register("open", "egress", tracker(&[]), false)
                .is_err()
        );
        assert_eq!(pools.names().collect::<Vec<_>>(), ["fixed", "open"]);

        let now = Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let outsider: IpAddr = "10.9.9.9".parse().unwrap();
        assert!(matches!(
            fixed.record(outsider, health::Outcome::Status(200), now, &metrics),
            Err(RecordError::UnknownAddress { .. })
        ));
        assert!(
            open.record(outsider, health::Outcome::Status(200), now, &metrics)
                .is_ok()
        );
        assert!(open.contains(outsider));

        let mut last = None;
        for _ in 0..3 {
            last = fixed
                .record(ip, health::Outcome::Status(429), now, &metrics)
                .unwrap();
        }
        assert_eq!(last.as_ref().map(transition_kind), Some("benched"));
        let view = fixed.probe(now, 2, None);
        assert_eq!((view.size, view.benched, view.available), (2, 1, 1));
        let a = &view.addresses[0];
        assert_eq!((a.ip, a.state), (ip, "benched"));
        assert_eq!(a.recent.len(), 2);
        assert_eq!(a.recent[1].status, Some(429));
        assert!(a.benched_until.is_some());
        assert_eq!(a.remaining_seconds, Some(600.0));
        let only = fixed.probe(now, 2, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(only.addresses.len(), 1);
        assert_eq!(only.addresses[0].state, "available");

        pools.refresh_metrics(&metrics, now);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("ippool_pool_addresses{pool=\"fixed\",state=\"benched\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ippool_pool_transitions_total{pool=\"fixed\",kind=\"benched\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn benches_are_journaled_saved_and_restored_with_their_remaining_cooldown() {
        let metrics = Metrics::new(&Arc::new(crate::rules::RuleSets::default()));
        let store = store::Store::memory();
        let ips = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"];
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let (now, wall) = (Instant::now(), SystemTime::now());

        let mut pools = Pools::default();
        let p = pools
            .register("web", "nginx", tracker(&ips), false)
            .unwrap();
        let (journal, r) = p.restore_benches(&store, now, wall).unwrap().unwrap();
        assert_eq!(r, Restored::default());
        for _ in 0..3 {
            p.record(ip, health::Outcome::Status(429), now, &metrics)
                .unwrap();
        }
        assert_eq!(journal.save("web", &store), 1);
        assert_eq!(journal.save("web", &store), 0, "taken once");
        let saved = store.benches().unwrap();
        assert_eq!(saved.len(), 1);
        assert_eq!(
            (saved[0].address.as_str(), saved[0].cause.as_str()),
            ("10.0.0.1", "consecutive_failures:3")
        );
        assert_eq!((saved[0].cooldown_ms(), saved[0].strike), (600_000, 1));

        // A restart 100 s later: 500 s left, not a fresh 600.
        let (later, wall2) = (
            now + Duration::from_secs(100),
            wall + Duration::from_secs(100),
        );
        let mut pools = Pools::default();
        let p = pools
            .register("web", "nginx", tracker(&ips), false)
            .unwrap();
        let (journal, r) = p.restore_benches(&store, later, wall2).unwrap().unwrap();
        assert_eq!((r.benched, r.probation, r.dropped), (1, 0, 0));
        let view = p.probe(later, 0, Some(ip));
        let left = view.addresses[0].remaining_seconds.unwrap();
        assert!((499.9..=500.1).contains(&left), "{left}");
        assert_eq!(view.benched, 1);
        assert_eq!(
            journal.save("web", &store),
            0,
            "a restoration is not rewritten"
        );

        // The cooldown ends: probation, a success restores it and the
        // record goes.
        let after = later + Duration::from_secs(501);
        assert_eq!(p.state(ip, after), Some(health::State::Probation));
        let t = p
            .record(ip, health::Outcome::Status(200), after, &metrics)
            .unwrap();
        assert_eq!(t, Some(Transition::Restored));
        assert_eq!(journal.save("web", &store), 1);
        assert!(store.benches().unwrap().is_empty());
    }

    #[test]
    fn saved_benches_that_no_longer_fit_are_dropped_or_refused() {
        let store = store::Store::memory();
        let (now, wall) = (Instant::now(), SystemTime::now());
        let since = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let record = |pool: &str, address: &str, cause: &str| store::HealthRecord {
            pool: pool.into(),
            address: address.into(),
            since_unix_ms: since - 1_000,
            until_unix_ms: since + 60_000,
            strike: 1,
            cause: cause.into(),
        };
        store
            .put_bench(&record("fixed", "10.0.0.9", "probation_failure"))
            .unwrap();
        store
            .put_bench(&record("open", "10.0.0.9", "failure_ratio:5/10"))
            .unwrap();
        // An expired one: probation.
        let mut old = record("open", "10.0.0.8", "probation_failure");
        old.until_unix_ms = since - 500;
        store.put_bench(&old).unwrap();

        let mut pools = Pools::default();
        let fixed = pools
            .register("fixed", "nginx", tracker(&["10.0.0.1", "10.0.0.2"]), false)
            .unwrap();
        let everyone = Tracker::new(health::HealthOptions {
            max_benched_percent: 100,
            ..health::HealthOptions::default()
        })
        .unwrap();
        let open = pools.register("open", "nginx", everyone, true).unwrap();
        // Out of a fixed pool: dropped from the store.
        let (_, r) = fixed.restore_benches(&store, now, wall).unwrap().unwrap();
        assert_eq!((r.benched, r.dropped), (0, 1));
        assert!(store.benches_of("fixed").unwrap().is_empty());
        // A discovering pool takes the addresses back.
        let (_, r) = open.restore_benches(&store, now, wall).unwrap().unwrap();
        assert_eq!((r.benched, r.probation), (1, 1));
        assert!(open.contains("10.0.0.9".parse().unwrap()));
        assert_eq!(
            open.state("10.0.0.8".parse().unwrap(), now),
            Some(health::State::Probation)
        );

        // An unreadable record stops the restore with its key.
        store
            .put_bench(&record("bad", "10.0.0.1", "because"))
            .unwrap();
        let bad = pools
            .register("bad", "nginx", tracker(&["10.0.0.1"]), false)
            .unwrap();
        let e = bad.restore_benches(&store, now, wall).unwrap_err();
        assert!(e.to_string().contains("bad/10.0.0.1"), "{e}");
        assert!(e.to_string().contains("because"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn egress_benches_are_journaled_saved_and_restored() {
        let metrics = Metrics::new(&Arc::new(crate::rules::RuleSets::default()));
        let store = store::Store::memory();
        let start = || async {
            let options = addrpool::PoolOptions {
                strategy: addrpool::Strategy::RoundRobin,
                max_uses: None,
                keep_assigned: 6,
                health: Some(health::HealthOptions {
                    strategy: health::Strategy::Consecutive {
                        consecutive_failures: 2,
                    },
                    ..health::HealthOptions::default()
                }),
                ..addrpool::PoolOptions::default()
            };
            let source: addrpool::Source = "127.0.14.0/29".parse().unwrap();
            addrpool::Pool::start(source, addrpool::Assigner::Static, options)
                .await
                .unwrap()
        };
        let ip: IpAddr = "127.0.14.1".parse().unwrap();

        let egress = start().await;
        let mut pools = Pools::default();
        let p = pools.register_egress("out", egress.clone()).unwrap();
        let (now, wall) = (Instant::now(), SystemTime::now());
        let (journal, r) = p.restore_benches(&store, now, wall).unwrap().unwrap();
        assert_eq!(r, Restored::default());
        // The pool takes its addresses; two 429s bench one.
        drop(egress.lease().await.unwrap());
        for _ in 0..2 {
            p.record(ip, health::Outcome::Status(429), Instant::now(), &metrics)
                .unwrap();
        }
        assert_eq!(journal.save("out", &store), 1);
        let saved = store.benches_of("out").unwrap();
        assert_eq!(saved.len(), 1);
        assert_eq!(
            (saved[0].address.as_str(), saved[0].cause.as_str()),
            ("127.0.14.1", "consecutive_failures:2")
        );
        assert_eq!(saved[0].cooldown_ms(), 600_000);
        egress.shutdown().await;

        // A restart 100 s later: benched with 500 s left, and not held.
        let egress = start().await;
        let mut pools = Pools::default();
        let p = pools.register_egress("out", egress.clone()).unwrap();
        let (later, wall2) = (Instant::now(), SystemTime::now() + Duration::from_secs(100));
        let (journal, r) = p.restore_benches(&store, later, wall2).unwrap().unwrap();
        assert_eq!((r.benched, r.probation, r.dropped), (1, 0, 0));
        let view = p.probe(Instant::now(), 0, Some(ip));
        let a = &view.addresses[0];
        assert_eq!((a.state, a.held), ("benched", Some(false)));
        let left = a.remaining_seconds.unwrap();
        assert!((490.0..=500.1).contains(&left), "{left}");
        for _ in 0..12 {
            assert_ne!(egress.lease().await.unwrap().source(), ip);
        }
        assert_eq!(
            journal.save("out", &store),
            0,
            "a restoration is not rewritten"
        );
        egress.shutdown().await;

        // A balancer, or an egress pool without health: nothing to restore.
        let plain = addrpool::Pool::start(
            "127.0.14.0/29".parse().unwrap(),
            addrpool::Assigner::Static,
            addrpool::PoolOptions::default(),
        )
        .await
        .unwrap();
        let p = pools.register_egress("plain", plain.clone()).unwrap();
        assert!(p.restore_benches(&store, now, wall).unwrap().is_none());
        plain.shutdown().await;
    }

    #[test]
    fn forgotten_addresses_lose_their_saved_bench() {
        let store = store::Store::memory();
        let journal = BenchJournal::default();
        let ip: IpAddr = "127.0.14.1".parse().unwrap();
        journal.push(BenchChange::Benched {
            ip,
            since: Instant::now(),
            cooldown: Duration::from_secs(60),
            cause: BenchCause::ProbationFailure,
            strike: 2,
        });
        assert_eq!(journal.save("out", &store), 1);
        assert_eq!(store.benches_of("out").unwrap()[0].strike, 2);
        journal.push(BenchChange::Forgotten { ip });
        assert_eq!(journal.save("out", &store), 1);
        assert!(store.benches().unwrap().is_empty());
    }

    #[test]
    fn bench_causes_round_trip_as_text() {
        for c in [
            BenchCause::ConsecutiveFailures(3),
            BenchCause::FailureRatio {
                failures: 5,
                requests: 10,
            },
            BenchCause::ProbationFailure,
        ] {
            assert_eq!(parse_cause(&cause_text(&c)), Some(c));
        }
        for bad in ["", "consecutive_failures", "failure_ratio:5", "x:1"] {
            assert_eq!(parse_cause(bad), None, "{bad}");
        }
    }

    #[test]
    fn log_times_map_to_instants() {
        let now = Instant::now();
        let wall = SystemTime::now();
        let ten_ago = wall - Duration::from_secs(10);
        assert_eq!(
            instant_of(ten_ago, now, wall),
            now - Duration::from_secs(10)
        );
        // From the future: now.
        assert_eq!(instant_of(wall + Duration::from_secs(5), now, wall), now);
    }
}
