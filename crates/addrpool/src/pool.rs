//! The pool: working set of addresses, leases, the background worker.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use health::{Observation, Permit, Tracker, Transition};

use crate::addr_health::{self, AddressHealth, HealthJournal, HealthSnapshot, LeaseHealth};
use crate::error::PoolError;
use crate::netlink::{self, Added, AssignError};
use crate::outcome::{Metrics, inc};
use crate::source::{AddrStream, Family};
use crate::{
    Assigner, MetricsSnapshot, NetlinkOptions, Outcome, PoolOptions, Session, Source, Strategy,
};

/// Most addresses drawn and skipped (excluded, already held) in one pull.
const MAX_SKIP: u128 = 1 << 16;
/// The same for iterator sources, which often cycle over a few addresses
/// that are all held.
const ITER_MAX_SKIP: u128 = 1 << 10;
/// Most addresses assigned concurrently by the worker.
const FILL_BATCH: usize = 16;
/// Attempts at removing an address before giving up on it.
const REMOVE_ATTEMPTS: u32 = 3;

/// A pool of egress addresses. Cheap to clone (all clones share the pool).
///
/// Start it with [`Pool::start`] inside a tokio runtime; stop it with
/// [`Pool::shutdown`], which removes the addresses it added. Dropping the
/// last handle without `shutdown` stops the background task but cannot
/// remove addresses.
///
/// # Health
///
/// With [`PoolOptions::health`] on, the pool keeps a [`health::Tracker`] of
/// its addresses:
///
/// - An address enters it when it becomes usable (assigned, taken into the
///   working set, adopted) and starts available.
/// - Every outcome reported through the pool reaches it: the connector's own
///   (connected, connect error, timeout), [`Lease::report`] and
///   [`Lease::record`] (the proxies: statuses, EOF after CONNECT),
///   [`Pool::report`] and [`Pool::record_outcome`] (client feedback, access
///   logs). [`PoolOptions::classifier`] decides which count as failures.
///   Through a lease, a plain "connected" counts only if nothing else is
///   reported before the lease is released.
/// - Selection (every [`Strategy`], sticky sessions included) never leases a
///   benched address; an address on probation gets at most
///   `probation_requests` leases at once (the lease holds the probe slot and
///   frees it when dropped); a sticky session whose address is benched moves
///   to another address. Benched addresses do not count as spare, so the
///   pool draws fresh addresses to stand in for them while it may.
/// - A benched address stays held (not leased) while it is held for other
///   reasons. If it is retired meanwhile (use limit, idle time, exclusion,
///   [`Lease::retire`]), the tracker remembers it until its cooldown ends
///   and the source skips it meanwhile: a blocked address does not come
///   back fresh from a cycling source a minute later. Once its cooldown has
///   ended it is forgotten, and it starts over if drawn again.
/// - At most `max_benched_percent` of the tracked addresses are out of
///   service at once; a benching beyond that is suppressed (counted, and
///   sent to [`PoolOptions::transitions`]): a pool does not empty itself.
/// - When every candidate is refused (benched, or probation full) and
///   waiting cannot help, [`Pool::lease`] fails at once with
///   [`PoolError::NoneAvailable`]; if waiting may help (leases outstanding,
///   addresses being assigned) it waits up to `lease_timeout` and then fails
///   the same way.
#[derive(Clone)]
pub struct Pool {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("family", &self.inner.family)
            .field("options", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) opts: PoolOptions,
    pub(crate) family: Option<Family>,
    pub(crate) mode: Mode,
    state: Mutex<State>,
    /// Something changed that a waiting `lease()` may care about.
    changed: Notify,
    /// Work for the background worker.
    wake: Arc<Notify>,
    pub(crate) metrics: Metrics,
    closed: AtomicBool,
    tasks: Mutex<Tasks>,
}

#[derive(Default)]
struct Tasks {
    worker: Option<JoinHandle<()>>,
    netlink_conn: Option<JoinHandle<()>>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        if let Some(t) = self.worker.take() {
            t.abort();
        }
        if let Some(t) = self.netlink_conn.take() {
            t.abort();
        }
    }
}

pub(crate) enum Mode {
    Static,
    Freebind {
        /// Routes this pool added, with the handle to remove them.
        added_routes: Vec<IpNet>,
        handle: Option<rtnetlink::Handle>,
        remove_on_exit: bool,
    },
    Netlink {
        handle: rtnetlink::Handle,
        index: u32,
        ifname: String,
        opts: NetlinkOptions,
    },
}

/// Removes `ip` from interface `index` (`ifname` in logs) within the
/// pool's `remove_timeout`; `false`, logged, when that failed.
async fn remove_address(
    handle: &rtnetlink::Handle,
    (index, ifname): (u32, &str),
    opts: &NetlinkOptions,
    ip: IpAddr,
) -> bool {
    match tokio::time::timeout(
        opts.remove_timeout,
        netlink::remove(handle, index, ip, opts.prefix_len),
    )
    .await
    {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(%ip, iface = %ifname, error = %e, "cannot remove address");
            false
        }
        Err(_) => {
            tracing::warn!(%ip, iface = %ifname, "removing address timed out");
            false
        }
    }
}

impl Mode {
    fn instant(&self) -> bool {
        !matches!(self, Mode::Netlink { .. })
    }

    pub(crate) fn freebind(&self) -> bool {
        matches!(self, Mode::Freebind { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Assigning,
    Ready,
    Retiring,
}

#[derive(Debug)]
struct Slot {
    state: SlotState,
    uses: u64,
    leases: u32,
    sessions: u32,
    last_used: Instant,
    /// Added by this pool (removed when retired and on exit).
    owned: bool,
    /// Retire as soon as the last lease is released.
    retire: bool,
    remove_attempts: u32,
}

impl Slot {
    fn new(state: SlotState, owned: bool) -> Slot {
        Slot {
            state,
            uses: 0,
            leases: 0,
            sessions: 0,
            last_used: Instant::now(),
            owned,
            retire: false,
            remove_attempts: 0,
        }
    }
}

struct SessionEntry {
    ip: IpAddr,
    expires: Instant,
}

struct State {
    stream: AddrStream,
    exhausted: bool,
    slots: HashMap<IpAddr, Slot>,
    /// Ready, not leased, not bound to a session, uses left; in release order.
    available: VecDeque<IpAddr>,
    assigning: usize,
    waiting: usize,
    to_remove: Vec<IpAddr>,
    sessions: HashMap<String, SessionEntry>,
    /// Per-address health (`PoolOptions::health`): held addresses, and
    /// retired ones remembered while benched.
    health: Option<Tracker<IpAddr>>,
    /// Told of every change of `health` worth persisting, under the lock
    /// (see [`Pool::set_health_journal`]).
    journal: Option<Arc<dyn HealthJournal>>,
}

impl State {
    /// Takes `ip` into the working set, ready to lease: available, and
    /// known to the health tracker.
    fn insert_ready(&mut self, ip: IpAddr, owned: bool) {
        self.slots.insert(ip, Slot::new(SlotState::Ready, owned));
        self.make_available(ip);
    }

    /// An address being assigned is ready now; `false` if its slot went
    /// meanwhile (the pool is stopping), and then nothing changes.
    fn mark_ready(&mut self, ip: IpAddr, owned: bool) -> bool {
        let Some(slot) = self.slots.get_mut(&ip) else {
            return false;
        };
        slot.state = SlotState::Ready;
        slot.owned = owned;
        slot.last_used = Instant::now();
        self.make_available(ip);
        true
    }

    fn make_available(&mut self, ip: IpAddr) {
        self.available.push_back(ip);
        if let Some(t) = self.health.as_mut() {
            t.insert(ip);
        }
    }

    fn leased_now(&self) -> usize {
        self.slots.values().map(|s| s.leases as usize).sum()
    }

    /// Whether health is on and `ip` is benched (cooldown not elapsed).
    fn benched(&self, ip: &IpAddr, now: std::time::Instant) -> bool {
        self.health
            .as_ref()
            .is_some_and(|t| matches!(t.state(ip, now), Some(health::State::Benched { .. })))
    }

    /// Drops `ip` from the tracker; if it was out of service (on
    /// probation), tells the journal, whose saved bench is stale now.
    fn forget(&mut self, ip: &IpAddr, now: std::time::Instant) {
        let State {
            health: tracker,
            journal,
            ..
        } = self;
        let Some(t) = tracker.as_mut() else {
            return;
        };
        let out = t
            .state(ip, now)
            .is_some_and(|s| s != health::State::Available);
        if t.remove(ip)
            && out
            && let Some(j) = journal
        {
            j.forgotten(*ip);
        }
    }

    /// With health on and nothing leasable: why, as an error.
    fn none_available(&self, now: std::time::Instant) -> Option<PoolError> {
        let t = self.health.as_ref()?;
        let benched = self.slots.keys().filter(|ip| self.benched(ip, now)).count();
        let probation_full = self
            .available
            .iter()
            .filter(|ip| {
                matches!(
                    t.acquire(ip, now),
                    Err(health::Unavailable::ProbationFull { .. })
                )
            })
            .count();
        Some(PoolError::NoneAvailable {
            held: self.slots.len(),
            benched,
            probation_full,
        })
    }
}

/// A source address handed to one user, released when dropped.
///
/// The address is ready to bind; [`Pool::connect`] does the binding. Report
/// what happened with it through [`Lease::report`].
pub struct Lease {
    inner: Arc<Inner>,
    ip: IpAddr,
    health: Mutex<LeaseHealth>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease").field("source", &self.ip).finish()
    }
}

impl Lease {
    /// The source address.
    pub fn source(&self) -> IpAddr {
        self.ip
    }

    /// Reports an outcome of this address (forwarded to the pool's
    /// [`crate::OutcomeSink`], and to its health tracker when health is on).
    pub fn report(&self, outcome: Outcome) {
        self.inner.report_sink(self.ip, outcome);
        if let Some(o) = addr_health::to_health(outcome) {
            self.record(o);
        }
    }

    /// Records a detailed outcome of this address (status, EOF after
    /// CONNECT, target, latency) in the pool's health tracker; not sent to
    /// the [`crate::OutcomeSink`]. Returns the transition it caused. Does
    /// nothing when health is off.
    ///
    /// The first outcome settles the lease's permit (and frees its probe
    /// slot on probation); a [`health::Outcome::Connected`] is deferred
    /// until the lease is released and dropped if anything else is recorded
    /// before.
    pub fn record(&self, observation: impl Into<Observation>) -> Option<Transition> {
        self.inner.opts.health.as_ref()?;
        let (permit, observation) = self
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(observation.into())?;
        self.inner
            .record_health(self.ip, permit, observation)
            .ok()
            .flatten()
    }

    /// Whether this lease probes an address on probation (health on).
    pub fn is_probe(&self) -> bool {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .permit
            .as_ref()
            .is_some_and(Permit::is_probe)
    }

    /// Retires the address once this lease is released, whatever its use
    /// count (e.g. after the destination blocked it).
    pub fn retire(&self) {
        let mut st = self.inner.lock();
        if let Some(slot) = st.slots.get_mut(&self.ip) {
            slot.retire = true;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let LeaseHealth { permit, pending } = std::mem::take(
            self.health
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if let Some(observation) = pending {
            let _ = self.inner.record_health(self.ip, permit, observation);
        } else {
            // Frees a probe slot before the address is offered again.
            drop(permit);
        }
        self.inner.release(self.ip);
    }
}

impl Pool {
    /// Starts a pool over `source` with `assigner`.
    ///
    /// - `netlink`: opens rtnetlink in the current network namespace,
    ///   resolves the interface, adopts the source's addresses already on it,
    ///   and starts keeping `keep_assigned` addresses ready.
    /// - `freebind`: checks that `local` routes cover the source (adds them
    ///   with `add_local_route`), or fails with the command to run.
    /// - `static`: nothing to prepare.
    pub async fn start(
        source: Source,
        assigner: Assigner,
        opts: PoolOptions,
    ) -> Result<Pool, PoolError> {
        if opts.max_assigned == 0 {
            return Err(PoolError::Options("max_assigned must be at least 1".into()));
        }
        if opts.keep_assigned > opts.max_assigned {
            return Err(PoolError::Options(format!(
                "keep_assigned ({}) exceeds max_assigned ({})",
                opts.keep_assigned, opts.max_assigned
            )));
        }
        if opts.max_uses == Some(0) {
            return Err(PoolError::Options(
                "max_uses must be at least 1 (or none)".into(),
            ));
        }
        if opts.sweep_interval.is_zero() {
            return Err(PoolError::Options("sweep_interval must be positive".into()));
        }
        let tracker = match &opts.health {
            Some(h) => Some(Tracker::with_classifier(
                h.clone(),
                opts.classifier.clone(),
            )?),
            None => None,
        };
        let stream = source.into_stream(opts.order, opts.include_network_broadcast)?;
        let family = stream.family();
        let mut tasks = Tasks::default();
        let mut adopted = Vec::new();
        let mode = match assigner {
            Assigner::Static => Mode::Static,
            Assigner::Freebind(fo) => {
                let (handle, conn) = netlink::connect()?;
                tasks.netlink_conn = Some(conn);
                let mut added = Vec::new();
                if let (Some(segs), Some(family)) = (stream.cover(), family) {
                    let missing = netlink::uncovered(&handle, family, segs).await?;
                    if !missing.is_empty() && !fo.add_local_route {
                        return Err(PoolError::NoLocalRoute {
                            uncovered: missing
                                .iter()
                                .map(|n| n.to_string())
                                .collect::<Vec<_>>()
                                .join(", "),
                            commands: missing
                                .iter()
                                .map(netlink::route_command)
                                .collect::<Vec<_>>()
                                .join(" && "),
                        });
                    }
                    for net in missing {
                        netlink::add_local_route(&handle, &net).await?;
                        tracing::info!(%net, "added local route for freebind pool");
                        added.push(net);
                    }
                } else {
                    tracing::warn!(
                        "freebind pool over an iterator source: the local route is not checked"
                    );
                }
                Mode::Freebind {
                    added_routes: added,
                    handle: Some(handle),
                    remove_on_exit: fo.remove_on_exit,
                }
            }
            Assigner::Netlink(no) => {
                let (handle, conn) = netlink::connect()?;
                tasks.netlink_conn = Some(conn);
                let index = netlink::link_index(&handle, &no.interface).await?;
                let ifname = netlink::link_name(&handle, index).await;
                let present =
                    netlink::list(&handle, index)
                        .await
                        .map_err(|source| PoolError::Netlink {
                            what: format!("listing addresses of {ifname}"),
                            source,
                        })?;
                for p in present {
                    let excluded = opts.exclude.as_ref().is_some_and(|x| x.contains(p.ip));
                    if stream.contains(p.ip) == Some(true)
                        && !excluded
                        && (no.use_existing || p.ours)
                        && adopted.len() < opts.max_assigned
                    {
                        adopted.push((p.ip, p.ours));
                    }
                }
                Mode::Netlink {
                    handle,
                    index,
                    ifname,
                    opts: no,
                }
            }
        };
        let mut state = State {
            stream,
            exhausted: false,
            slots: HashMap::new(),
            available: VecDeque::new(),
            assigning: 0,
            waiting: 0,
            to_remove: Vec::new(),
            sessions: HashMap::new(),
            health: None,
            journal: None,
        };
        let metrics = Metrics::default();
        state.health = tracker;
        for (ip, ours) in adopted {
            tracing::debug!(%ip, ours, "adopted address already on the interface");
            state.insert_ready(ip, ours);
            metrics.assign_done(Duration::ZERO);
        }
        let wake = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            opts,
            family,
            mode,
            state: Mutex::new(state),
            changed: Notify::new(),
            wake: wake.clone(),
            metrics,
            closed: AtomicBool::new(false),
            tasks: Mutex::new(Tasks::default()),
        });
        tasks.worker = Some(tokio::spawn(worker(Arc::downgrade(&inner), wake.clone())));
        *inner.tasks.lock().unwrap_or_else(PoisonError::into_inner) = tasks;
        wake.notify_one();
        Ok(Pool { inner })
    }

    /// Leases an address, waiting up to `lease_timeout` when none is
    /// available.
    pub async fn lease(&self) -> Result<Lease, PoolError> {
        self.lease_with(None).await
    }

    /// Leases an address for `session` (sticky with [`Strategy::Sticky`];
    /// other strategies ignore the session).
    pub async fn lease_with(&self, session: Option<&Session>) -> Result<Lease, PoolError> {
        let inner = &self.inner;
        let start = Instant::now();
        let deadline = start + inner.opts.lease_timeout;
        let mut refused: Option<PoolError>;
        loop {
            if inner.closed.load(Ordering::Acquire) {
                return Err(PoolError::Closed);
            }
            let notified = inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let held;
            {
                let mut st = inner.lock();
                if inner.closed.load(Ordering::Acquire) {
                    return Err(PoolError::Closed);
                }
                if let Some((ip, permit)) = inner.try_pick(&mut st, session) {
                    return Ok(Lease {
                        inner: inner.clone(),
                        ip,
                        health: Mutex::new(LeaseHealth::new(permit)),
                    });
                }
                if st.exhausted && st.slots.is_empty() {
                    return Err(PoolError::Exhausted);
                }
                // Health refused every candidate: fail now unless a release
                // or an assignment may bring a leasable address.
                refused = None;
                if !st.available.is_empty() {
                    refused = st.none_available(addr_health::now());
                    let more = !inner.mode.instant()
                        && !st.exhausted
                        && st.slots.len() < inner.opts.max_assigned;
                    if st.leased_now() == 0
                        && st.assigning == 0
                        && !more
                        && let Some(e) = refused
                    {
                        return Err(e);
                    }
                }
                held = st.slots.len();
                st.waiting += 1;
            }
            let _waiting = Waiting(inner);
            inner.wake.notify_one();
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                if let Some(e) = refused {
                    return Err(e);
                }
                return Err(PoolError::NoAddressAvailable {
                    waited: start.elapsed(),
                    held,
                });
            }
        }
    }

    /// Reports an outcome for `source` (forwarded to the pool's
    /// [`crate::OutcomeSink`], counted in the metrics, and recorded by the
    /// health tracker when health is on and it knows `source`).
    pub fn report(&self, source: IpAddr, outcome: Outcome) {
        self.inner.report(source, outcome);
    }

    /// Records an outcome of `source` that came without a lease (client
    /// feedback, an access-log line) in the health tracker, classified by
    /// [`PoolOptions::classifier`]. Returns the transition it caused.
    ///
    /// Errors: [`PoolError::HealthDisabled`] when health is off,
    /// [`PoolError::UnknownAddress`] for an address the tracker does not
    /// know (not held, and not retired-while-benched).
    pub fn record_outcome(
        &self,
        source: IpAddr,
        observation: impl Into<Observation>,
    ) -> Result<Option<Transition>, PoolError> {
        if self.inner.opts.health.is_none() {
            return Err(PoolError::HealthDisabled);
        }
        self.inner
            .record_health(source, None, observation.into())
            .map_err(|_| PoolError::UnknownAddress { ip: source })
    }

    /// The health state of `source` now; `None` when health is off or the
    /// address is not tracked.
    pub fn health_state(&self, source: IpAddr) -> Option<health::State> {
        let st = self.inner.lock();
        st.health.as_ref()?.state(&source, addr_health::now())
    }

    /// Per-address state, counters and the `recent` newest outcomes and
    /// benchings of every tracked address (for the admin `/probe` view);
    /// `None` when health is off.
    pub fn health_snapshot(&self, recent: usize) -> Option<HealthSnapshot> {
        let st = self.inner.lock();
        let t = st.health.as_ref()?;
        let at = addr_health::now();
        let mut addresses: Vec<AddressHealth> = t
            .snapshot(at, recent)
            .into_iter()
            .map(|k| {
                let slot = st.slots.get(&k.key);
                AddressHealth {
                    held: slot.is_some(),
                    leases: slot.map_or(0, |s| s.leases),
                    health: k,
                }
            })
            .collect();
        addresses.sort_by_key(|a| a.health.key);
        Some(HealthSnapshot {
            at,
            stats: t.stats(at),
            addresses,
        })
    }

    /// Sets the [`HealthJournal`] that hears, from now on and in the order
    /// the pool makes them, every benching and restoration of its
    /// addresses and every address it forgets while out of service (or
    /// removes it, with `None`). What it hears is what a durable copy of
    /// the benches must follow; [`Pool::restore_bench`] puts such a copy
    /// back after a restart. Nothing is heard while health is off.
    pub fn set_health_journal(&self, journal: Option<Arc<dyn HealthJournal>>) {
        self.inner.lock().journal = journal;
    }

    /// Puts `source` back out of service as a saved benching left it (after
    /// a restart): benched at `since` (the tracker's clock: tokio's, which
    /// is `std`'s unless paused) for `cooldown`, its `strike`-th benching
    /// in a row, for `cause` (see [`health::Tracker::restore_bench`]).
    /// Once `since + cooldown` has passed it is on probation. Returns
    /// whether it was applied.
    ///
    /// - An address the pool holds is restored under
    ///   `max_benched_percent` like a new benching: `Ok(false)`, changing
    ///   nothing, when the cap is reached.
    /// - An address of the source the pool does not hold (the usual case
    ///   right after start: static and freebind pools draw addresses on
    ///   demand, and a range such as an IPv6 /64 is never materialised) is
    ///   remembered out of service, like an address retired while benched:
    ///   the source skips it until its cooldown ends, then the next sweep
    ///   forgets it ([`HealthJournal::forgotten`]) and the source may hand
    ///   it out again, starting over. It takes no capacity from the pool,
    ///   so the cap does not refuse it; it counts as out of service from
    ///   then on, like every benched address. One whose cooldown has ended
    ///   already is remembered on probation: drawn before the next sweep,
    ///   its first lease is a probe; otherwise the sweep forgets it.
    ///
    /// This is no transition: neither [`PoolOptions::transitions`] nor the
    /// [`HealthJournal`] hears of it.
    ///
    /// Errors: [`PoolError::HealthDisabled`] when health is off;
    /// [`PoolError::UnknownAddress`] for an address outside the source
    /// (for an iterator source, whose members cannot be told, one of the
    /// other family).
    pub fn restore_bench(
        &self,
        source: IpAddr,
        since: std::time::Instant,
        cooldown: Duration,
        cause: health::BenchCause,
        strike: u32,
    ) -> Result<bool, PoolError> {
        let inner = &self.inner;
        if inner.opts.health.is_none() {
            return Err(PoolError::HealthDisabled);
        }
        let unknown = || PoolError::UnknownAddress { ip: source };
        let mut st = inner.lock();
        let in_source = st
            .stream
            .contains(source)
            .unwrap_or_else(|| inner.family.is_none_or(|f| f == Family::of(source)));
        if !in_source {
            return Err(unknown());
        }
        let held = st.slots.contains_key(&source);
        let Some(t) = st.health.as_mut() else {
            return Err(PoolError::HealthDisabled);
        };
        let inserted = t.insert(source);
        let applied = if held {
            t.restore_bench(&source, since, cooldown, cause, strike)
        } else {
            t.restore_bench_uncapped(&source, since, cooldown, cause, strike)
                .map(|()| true)
        }
        .map_err(|_| unknown())?;
        if !applied && inserted {
            t.remove(&source);
        }
        drop(st);
        if applied {
            // A held address benched no longer counts as spare: top up.
            inner.wake.notify_one();
            inner.changed.notify_waiters();
        }
        Ok(applied)
    }

    /// The options the pool was started with.
    pub fn options(&self) -> &PoolOptions {
        &self.inner.opts
    }

    /// The pool's address family (None only for an empty iterator source).
    pub fn family(&self) -> Option<Family> {
        self.inner.family
    }

    /// The addresses the pool holds now (ready, leased, being assigned or
    /// removed), sorted.
    pub fn held(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.inner.lock().slots.keys().copied().collect();
        v.sort();
        v
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        let (held, leased, stats) = {
            let st = self.inner.lock();
            let stats = st.health.as_ref().map(|t| t.stats(addr_health::now()));
            (st.slots.len(), st.leased_now(), stats)
        };
        let mut m = self.inner.metrics.snapshot(held, leased);
        if let Some(s) = stats {
            m.benched_total = s.counters.benched;
            m.restored_total = s.counters.restored;
            m.bench_suppressed_total = s.counters.bench_suppressed;
            m.benched_now = s.benched as u64;
            m.probation_now = s.probation as u64;
        }
        m
    }

    /// Stops the background task, then removes the addresses this pool
    /// added (netlink, `remove_on_exit`) and the local routes it added
    /// (freebind, `remove_on_exit`). Leases still out keep their address
    /// value but the address may be gone. Further leases fail with
    /// [`PoolError::Closed`]. Idempotent.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        inner.changed.notify_waiters();
        inner.wake.notify_one();
        let worker = inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .worker
            .take();
        if let Some(w) = worker {
            let _ = w.await;
        }
        match &inner.mode {
            Mode::Static => {}
            Mode::Freebind {
                added_routes,
                handle: Some(handle),
                remove_on_exit: true,
            } => {
                for net in added_routes {
                    if let Err(e) = netlink::del_local_route(handle, net).await {
                        tracing::warn!(%net, error = %e, "cannot remove local route");
                    }
                }
            }
            Mode::Freebind { .. } => {}
            Mode::Netlink {
                handle,
                index,
                ifname,
                opts,
            } => {
                let owned: Vec<IpAddr> = {
                    let mut st = inner.lock();
                    let owned = st
                        .slots
                        .iter()
                        .filter(|(_, s)| s.owned)
                        .map(|(ip, _)| *ip)
                        .collect();
                    st.slots.clear();
                    st.available.clear();
                    st.to_remove.clear();
                    owned
                };
                if opts.remove_on_exit {
                    let removals = owned.iter().map(|ip| async move {
                        if remove_address(handle, (*index, ifname), opts, *ip).await {
                            inc(&inner.metrics.removed);
                        }
                    });
                    futures::future::join_all(removals).await;
                }
            }
        }
        let conn = inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .netlink_conn
            .take();
        if let Some(c) = conn {
            c.abort();
            let _ = c.await;
        }
    }
}

/// Decrements `State::waiting` when a waiting `lease()` ends (or is
/// cancelled).
struct Waiting<'a>(&'a Inner);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.waiting = st.waiting.saturating_sub(1);
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Metrics, sink and health (without a permit).
    pub(crate) fn report(&self, source: IpAddr, outcome: Outcome) {
        self.report_sink(source, outcome);
        if let Some(o) = addr_health::to_health(outcome) {
            let _ = self.record_health(source, None, o.into());
        }
    }

    /// Records one observation in the tracker (finishing `permit` if
    /// given), then publishes the transition outside the lock. `Ok(None)`
    /// when health is off.
    pub(crate) fn record_health(
        &self,
        source: IpAddr,
        permit: Option<Permit<IpAddr>>,
        observation: Observation,
    ) -> Result<Option<Transition>, health::UnknownKey> {
        let change = {
            let mut st = self.lock();
            let State {
                health: tracker,
                journal,
                ..
            } = &mut *st;
            let Some(t) = tracker.as_mut() else {
                return Ok(None);
            };
            let now = addr_health::now();
            let change = match permit {
                Some(p) => t.finish(p, observation, now)?,
                None => t.record(&source, observation, now)?,
            };
            // Under the lock: the journal hears changes in the order made.
            if let (Some(c), Some(j)) = (&change, journal.as_ref()) {
                j.transition(source, c, t, now);
            }
            change
        };
        if let Some(change) = change {
            match change {
                Transition::Benched { cause, cooldown } => {
                    tracing::info!(ip = %source, ?cause, ?cooldown, "address benched")
                }
                Transition::BenchSuppressed { cause } => tracing::warn!(
                    ip = %source,
                    ?cause,
                    "address not benched: max_benched_percent of the pool is out of service"
                ),
                Transition::Restored => tracing::info!(ip = %source, "address restored"),
            }
            if let Some(sink) = &self.opts.transitions {
                sink.transition(source, change);
            }
            // A benched address no longer counts as spare: top up.
            self.wake.notify_one();
        }
        Ok(change)
    }

    /// Metrics and the outcome sink.
    pub(crate) fn report_sink(&self, source: IpAddr, outcome: Outcome) {
        if matches!(
            outcome,
            Outcome::ConnectFailed | Outcome::ConnectTimeout | Outcome::BindFailed
        ) {
            inc(&self.metrics.connect_failures);
        }
        if let Some(sink) = &self.opts.outcomes {
            sink.report(source, outcome);
        }
    }

    fn excluded(&self, ip: IpAddr) -> bool {
        self.opts.exclude.as_ref().is_some_and(|x| x.contains(ip))
    }

    /// Held addresses the strategy can hand out now: any available one
    /// (`fresh` and `sticky`: one never used), not benched.
    fn spare(&self, st: &State) -> usize {
        let any = matches!(
            self.opts.strategy,
            Strategy::LeastUsed | Strategy::Random | Strategy::RoundRobin
        );
        if any && st.health.is_none() {
            return st.available.len();
        }
        let now = addr_health::now();
        st.available
            .iter()
            .filter(|ip| any || st.slots.get(ip).is_some_and(|s| s.uses == 0))
            .filter(|ip| !st.benched(ip, now))
            .count()
    }

    /// Draws the next address that is not excluded and not held.
    fn pull(&self, st: &mut State) -> Option<IpAddr> {
        if st.exhausted {
            return None;
        }
        let limit = st.stream.len().unwrap_or(ITER_MAX_SKIP).min(MAX_SKIP);
        let now = addr_health::now();
        let mut skipped: u128 = 0;
        while skipped <= limit {
            let Some(ip) = st.stream.next_addr() else {
                st.exhausted = true;
                return None;
            };
            // Retired while benched: skipped until its cooldown ends.
            if !st.slots.contains_key(&ip) && !self.excluded(ip) && !st.benched(&ip, now) {
                return Some(ip);
            }
            skipped += 1;
        }
        None
    }

    /// Static and freebind: take addresses into the working set on demand.
    fn top_up_instant(&self, st: &mut State) {
        let target = self.opts.keep_assigned.max(1);
        // Counted once: each address taken in is spare (unused, and pull
        // skips benched ones).
        let mut spare = self.spare(st);
        while spare < target && st.slots.len() < self.opts.max_assigned {
            let Some(ip) = self.pull(st) else { break };
            st.insert_ready(ip, false);
            spare += 1;
            self.metrics.assign_done(Duration::ZERO);
        }
    }

    /// Picks an address (and its health permit, when health is on).
    fn try_pick(
        &self,
        st: &mut State,
        session: Option<&Session>,
    ) -> Option<(IpAddr, Option<Permit<IpAddr>>)> {
        let now = Instant::now();
        let hnow = now.into_std();
        let session = session.filter(|_| self.opts.strategy == Strategy::Sticky);
        if let Some(sess) = session
            && let Some(e) = st.sessions.get(&sess.key)
        {
            let (ip, live) = (e.ip, e.expires > now);
            if live
                && !self.excluded(ip)
                && st
                    .slots
                    .get(&ip)
                    .is_some_and(|s| s.state == SlotState::Ready && !s.retire)
            {
                let permit = match st.health.as_ref().map(|t| t.acquire(&ip, hnow)) {
                    None => Ok(None),
                    Some(Ok(p)) => Ok(Some(p)),
                    Some(Err(e)) => Err(e),
                };
                match permit {
                    Ok(permit) => {
                        if let Some(slot) = st.slots.get_mut(&ip) {
                            slot.leases += 1;
                            slot.last_used = now;
                        }
                        inc(&self.metrics.leased);
                        return Some((ip, permit));
                    }
                    Err(why) => {
                        tracing::debug!(%ip, session = %sess.key, %why, "session address unavailable; moving the session");
                    }
                }
            }
            self.end_session(st, &sess.key);
        }
        if self.opts.exclude.is_some() {
            let now_excluded: Vec<IpAddr> = st
                .available
                .iter()
                .copied()
                .filter(|ip| self.excluded(*ip))
                .collect();
            for ip in now_excluded {
                tracing::debug!(%ip, "held address is now excluded; retiring it");
                self.retire(st, ip);
            }
        }
        if self.mode.instant() {
            self.top_up_instant(st);
        }
        let strategy = if self.opts.strategy == Strategy::Sticky {
            Strategy::Fresh
        } else {
            self.opts.strategy
        };
        let (pos, permit) = if st.health.is_some() {
            let (pos, permit) = self.pick_healthy(st, strategy, hnow)?;
            (pos, Some(permit))
        } else {
            (self.pick(st, strategy)?, None)
        };
        let ip = st.available.remove(pos)?;
        let slot = st.slots.get_mut(&ip)?;
        slot.leases += 1;
        slot.uses = slot.uses.saturating_add(1);
        slot.last_used = now;
        if let Some(sess) = session {
            slot.sessions += 1;
            let ttl = sess.ttl.unwrap_or(self.opts.session_ttl);
            st.sessions.insert(
                sess.key.clone(),
                SessionEntry {
                    ip,
                    expires: now + ttl,
                },
            );
        }
        inc(&self.metrics.leased);
        if !self.mode.instant() && self.spare(st) < self.opts.keep_assigned {
            self.wake.notify_one();
        }
        Some((ip, permit))
    }

    /// With health on: the first address, in the strategy's order of
    /// preference, that the tracker gives a permit for (never a benched
    /// one; one on probation only while it has a free probe slot).
    fn pick_healthy(
        &self,
        st: &State,
        strategy: Strategy,
        now: std::time::Instant,
    ) -> Option<(usize, Permit<IpAddr>)> {
        let tracker = st.health.as_ref()?;
        let uses = |i: &usize| {
            st.available
                .get(*i)
                .and_then(|ip| st.slots.get(ip))
                .map_or(u64::MAX, |s| s.uses)
        };
        let mut order: Vec<usize> = (0..st.available.len()).collect();
        match strategy {
            // Never used first, then the least recently released.
            Strategy::Fresh => order.sort_by_key(|i| uses(i) != 0),
            Strategy::RoundRobin | Strategy::Sticky => {}
            Strategy::Random => {
                for i in (1..order.len()).rev() {
                    order.swap(i, rand::random_range(0..=i));
                }
            }
            Strategy::LeastUsed => order.sort_by_key(uses),
        }
        order.into_iter().find_map(|i| {
            let ip = st.available.get(i)?;
            tracker.acquire(ip, now).ok().map(|p| (i, p))
        })
    }

    /// Without health: the position in `available` the strategy picks.
    fn pick(&self, st: &State, strategy: Strategy) -> Option<usize> {
        match strategy {
            Strategy::Fresh => st
                .available
                .iter()
                .position(|ip| st.slots.get(ip).is_some_and(|s| s.uses == 0))
                .or(if st.available.is_empty() {
                    None
                } else {
                    Some(0)
                }),
            Strategy::RoundRobin | Strategy::Sticky => (!st.available.is_empty()).then_some(0),
            Strategy::Random => {
                (!st.available.is_empty()).then(|| rand::random_range(0..st.available.len()))
            }
            Strategy::LeastUsed => st
                .available
                .iter()
                .enumerate()
                .min_by_key(|(_, ip)| st.slots.get(ip).map_or(u64::MAX, |s| s.uses))
                .map(|(i, _)| i),
        }
    }

    fn end_session(&self, st: &mut State, key: &str) {
        if let Some(e) = st.sessions.remove(key) {
            if let Some(slot) = st.slots.get_mut(&e.ip) {
                slot.sessions = slot.sessions.saturating_sub(1);
            }
            self.evaluate(st, e.ip);
        }
    }

    fn release(&self, ip: IpAddr) {
        {
            let mut st = self.lock();
            let Some(slot) = st.slots.get_mut(&ip) else {
                return;
            };
            slot.leases = slot.leases.saturating_sub(1);
            slot.last_used = Instant::now();
            self.evaluate(&mut st, ip);
        }
        self.changed.notify_waiters();
    }

    /// Puts an idle address back in `available`, or retires it.
    fn evaluate(&self, st: &mut State, ip: IpAddr) {
        let Some(slot) = st.slots.get(&ip) else {
            return;
        };
        if slot.state != SlotState::Ready || slot.leases > 0 || slot.sessions > 0 {
            return;
        }
        if slot.retire || self.opts.max_uses.is_some_and(|m| slot.uses >= m) {
            self.retire(st, ip);
        } else if !st.available.contains(&ip) {
            st.available.push_back(ip);
        }
    }

    fn retire(&self, st: &mut State, ip: IpAddr) {
        st.available.retain(|a| *a != ip);
        // A benched address is remembered until its cooldown ends (the
        // source skips it meanwhile); any other is forgotten.
        let now = addr_health::now();
        if !st.benched(&ip, now) {
            st.forget(&ip, now);
        }
        let owned = st.slots.get(&ip).is_some_and(|s| s.owned);
        inc(&self.metrics.retired);
        if owned && matches!(self.mode, Mode::Netlink { .. }) {
            if let Some(slot) = st.slots.get_mut(&ip) {
                slot.state = SlotState::Retiring;
            }
            st.to_remove.push(ip);
            self.wake.notify_one();
        } else {
            st.slots.remove(&ip);
        }
    }

    fn sweep(&self, now: Instant) {
        {
            let mut st = self.lock();
            let expired: Vec<String> = st
                .sessions
                .iter()
                .filter(|(_, e)| e.expires <= now)
                .map(|(k, _)| k.clone())
                .collect();
            for k in expired {
                self.end_session(&mut st, &k);
            }
            // Forget retired addresses whose cooldown has ended.
            let hnow = now.into_std();
            if st.health.is_some() {
                let done: Vec<IpAddr> = st
                    .health
                    .iter()
                    .flat_map(|t| t.keys())
                    .filter(|ip| !st.slots.contains_key(ip) && !st.benched(ip, hnow))
                    .copied()
                    .collect();
                for ip in done {
                    st.forget(&ip, hnow);
                }
            }
            // Idle retirement frees interface addresses; static and freebind
            // addresses cost nothing while idle and are kept.
            if let (Some(max_idle), Mode::Netlink { .. }) = (self.opts.max_idle, &self.mode) {
                let idle: Vec<IpAddr> = st
                    .available
                    .iter()
                    .copied()
                    .filter(|ip| {
                        st.slots
                            .get(ip)
                            .is_some_and(|s| now.duration_since(s.last_used) >= max_idle)
                    })
                    .collect();
                for ip in idle {
                    tracing::debug!(%ip, "retiring idle address");
                    self.retire(&mut st, ip);
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// Netlink: addresses to assign now (marked `Assigning`).
    fn fill_batch(&self, st: &mut State) -> Vec<IpAddr> {
        let want = self.opts.keep_assigned + st.waiting;
        let have = self.spare(st) + st.assigning;
        let room = self.opts.max_assigned.saturating_sub(st.slots.len());
        let n = want.saturating_sub(have).min(room).min(FILL_BATCH);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let Some(ip) = self.pull(st) else { break };
            st.slots.insert(ip, Slot::new(SlotState::Assigning, false));
            st.assigning += 1;
            out.push(ip);
        }
        out
    }

    /// One round of the netlink worker: removals, then assignments.
    async fn netlink_round(&self) -> Round {
        let Mode::Netlink {
            handle,
            index,
            ifname,
            opts,
        } = &self.mode
        else {
            return Round::Idle;
        };
        let removals = std::mem::take(&mut self.lock().to_remove);
        if !removals.is_empty() {
            let results = futures::future::join_all(removals.iter().map(|ip| async move {
                (
                    *ip,
                    remove_address(handle, (*index, ifname), opts, *ip).await,
                )
            }))
            .await;
            let mut st = self.lock();
            for (ip, ok) in results {
                let Some(slot) = st.slots.get_mut(&ip) else {
                    continue;
                };
                slot.remove_attempts += 1;
                if ok {
                    inc(&self.metrics.removed);
                    st.slots.remove(&ip);
                } else if slot.remove_attempts >= REMOVE_ATTEMPTS {
                    tracing::error!(%ip, iface = %ifname, "giving up removing address");
                    st.slots.remove(&ip);
                } else {
                    st.to_remove.push(ip);
                }
            }
            drop(st);
            self.changed.notify_waiters();
        }
        let batch = self.fill_batch(&mut self.lock());
        if batch.is_empty() {
            return if removals.is_empty() {
                Round::Idle
            } else {
                Round::Progress
            };
        }
        let results = futures::future::join_all(batch.iter().map(|ip| async move {
            let t0 = Instant::now();
            let r = match tokio::time::timeout(
                opts.assign_timeout,
                netlink::add(
                    handle,
                    *index,
                    *ip,
                    opts.prefix_len,
                    opts.skip_dad,
                    opts.use_existing,
                ),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(AssignError::Timeout(*ip)),
            };
            (*ip, r, t0.elapsed())
        }))
        .await;
        let mut failures = Vec::new();
        let mut any_ok = false;
        {
            let mut st = self.lock();
            for (ip, r, took) in results {
                st.assigning = st.assigning.saturating_sub(1);
                match r {
                    Ok(added) => {
                        any_ok = true;
                        self.metrics.assign_done(took);
                        if !st.mark_ready(ip, matches!(added, Added::New)) {
                            tracing::debug!(%ip, "assigned after its slot was dropped");
                        }
                    }
                    Err(e) => {
                        inc(&self.metrics.assign_failures);
                        tracing::warn!(iface = %ifname, error = %e, "address assignment failed; trying the next one");
                        // A timed-out add may still land: remove it to be sure.
                        let owned =
                            matches!(e, AssignError::Timeout(_) | AssignError::DadFailed(_));
                        if owned {
                            if let Some(slot) = st.slots.get_mut(&ip) {
                                slot.state = SlotState::Retiring;
                                slot.owned = true;
                            }
                            st.to_remove.push(ip);
                        } else {
                            st.slots.remove(&ip);
                        }
                        failures.push(ip);
                    }
                }
            }
        }
        for ip in failures {
            self.report(ip, Outcome::AssignFailed);
        }
        self.changed.notify_waiters();
        if any_ok {
            Round::Progress
        } else {
            Round::AllFailed
        }
    }
}

/// What one netlink round did.
enum Round {
    Idle,
    Progress,
    AllFailed,
}

/// The background task: sweeps idle addresses and expired sessions; for
/// netlink also assigns ahead of demand and removes retired addresses.
async fn worker(weak: Weak<Inner>, wake: Arc<Notify>) {
    let mut next_sweep = Instant::now();
    loop {
        let mut backoff = None;
        {
            let Some(inner) = weak.upgrade() else { return };
            if inner.closed.load(Ordering::Acquire) {
                return;
            }
            let now = Instant::now();
            if now >= next_sweep {
                inner.sweep(now);
                next_sweep = now + inner.opts.sweep_interval;
            }
            if let Mode::Netlink { opts, .. } = &inner.mode {
                match inner.netlink_round().await {
                    Round::Idle => {}
                    Round::Progress => continue,
                    Round::AllFailed => {
                        backoff = Some(opts.assign_timeout.min(Duration::from_millis(100)))
                    }
                }
            }
        }
        match backoff {
            Some(d) => tokio::time::sleep(d).await,
            None => {
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep_until(next_sweep) => {}
                }
            }
        }
    }
}
