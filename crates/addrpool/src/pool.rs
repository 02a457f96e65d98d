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
}

impl State {
    fn leased_now(&self) -> usize {
        self.slots.values().map(|s| s.leases as usize).sum()
    }
}

/// A source address handed to one user, released when dropped.
///
/// The address is ready to bind; [`Pool::connect`] does the binding. Report
/// what happened with it through [`Lease::report`].
pub struct Lease {
    inner: Arc<Inner>,
    ip: IpAddr,
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
    /// [`crate::OutcomeSink`]).
    pub fn report(&self, outcome: Outcome) {
        self.inner.report(self.ip, outcome);
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
        let now = Instant::now();
        let mut state = State {
            stream,
            exhausted: false,
            slots: HashMap::new(),
            available: VecDeque::new(),
            assigning: 0,
            waiting: 0,
            to_remove: Vec::new(),
            sessions: HashMap::new(),
        };
        let metrics = Metrics::default();
        for (ip, ours) in adopted {
            tracing::debug!(%ip, ours, "adopted address already on the interface");
            state.slots.insert(
                ip,
                Slot {
                    state: SlotState::Ready,
                    uses: 0,
                    leases: 0,
                    sessions: 0,
                    last_used: now,
                    owned: ours,
                    retire: false,
                    remove_attempts: 0,
                },
            );
            state.available.push_back(ip);
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
                if let Some(ip) = inner.try_pick(&mut st, session) {
                    return Ok(Lease {
                        inner: inner.clone(),
                        ip,
                    });
                }
                if st.exhausted && st.slots.is_empty() {
                    return Err(PoolError::Exhausted);
                }
                held = st.slots.len();
                st.waiting += 1;
            }
            let _waiting = Waiting(inner);
            inner.wake.notify_one();
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(PoolError::NoAddressAvailable {
                    waited: start.elapsed(),
                    held,
                });
            }
        }
    }

    /// Reports an outcome for `source` (forwarded to the pool's
    /// [`crate::OutcomeSink`], counted in the metrics).
    pub fn report(&self, source: IpAddr, outcome: Outcome) {
        self.inner.report(source, outcome);
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
        let (held, leased) = {
            let st = self.inner.lock();
            (st.slots.len(), st.leased_now())
        };
        self.inner.metrics.snapshot(held, leased)
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
                        match tokio::time::timeout(opts.remove_timeout, netlink::remove(handle, *index, *ip, opts.prefix_len)).await {
                            Ok(Ok(())) => inc(&inner.metrics.removed),
                            Ok(Err(e)) => tracing::warn!(%ip, iface = %ifname, error = %e, "cannot remove address"),
                            Err(_) => tracing::warn!(%ip, iface = %ifname, "removing address timed out"),
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

    pub(crate) fn report(&self, source: IpAddr, outcome: Outcome) {
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

    fn spare(&self, st: &State) -> usize {
        if self.opts.strategy == Strategy::LeastUsed
            || self.opts.strategy == Strategy::Random
            || self.opts.strategy == Strategy::RoundRobin
        {
            st.available.len()
        } else {
            st.available
                .iter()
                .filter(|ip| st.slots.get(ip).is_some_and(|s| s.uses == 0))
                .count()
        }
    }

    /// Draws the next address that is not excluded and not held.
    fn pull(&self, st: &mut State) -> Option<IpAddr> {
        if st.exhausted {
            return None;
        }
        let limit = st.stream.len().unwrap_or(ITER_MAX_SKIP).min(MAX_SKIP);
        let mut skipped: u128 = 0;
        while skipped <= limit {
            let Some(ip) = st.stream.next_addr() else {
                st.exhausted = true;
                return None;
            };
            if !st.slots.contains_key(&ip) && !self.excluded(ip) {
                return Some(ip);
            }
            skipped += 1;
        }
        None
    }

    fn insert_ready(&self, st: &mut State, ip: IpAddr, owned: bool) {
        st.slots.insert(
            ip,
            Slot {
                state: SlotState::Ready,
                uses: 0,
                leases: 0,
                sessions: 0,
                last_used: Instant::now(),
                owned,
                retire: false,
                remove_attempts: 0,
            },
        );
        st.available.push_back(ip);
    }

    /// Static and freebind: take addresses into the working set on demand.
    fn top_up_instant(&self, st: &mut State) {
        let target = self.opts.keep_assigned.max(1);
        while self.spare(st) < target && st.slots.len() < self.opts.max_assigned {
            let Some(ip) = self.pull(st) else { break };
            self.insert_ready(st, ip, false);
            self.metrics.assign_done(Duration::ZERO);
        }
    }

    fn try_pick(&self, st: &mut State, session: Option<&Session>) -> Option<IpAddr> {
        let now = Instant::now();
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
                    .is_some_and(|s| s.state == SlotState::Ready)
            {
                if let Some(slot) = st.slots.get_mut(&ip) {
                    slot.leases += 1;
                    slot.last_used = now;
                }
                inc(&self.metrics.leased);
                return Some(ip);
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
        let pos = match strategy {
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
        }?;
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
        Some(ip)
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
            st.slots.insert(
                ip,
                Slot {
                    state: SlotState::Assigning,
                    uses: 0,
                    leases: 0,
                    sessions: 0,
                    last_used: Instant::now(),
                    owned: false,
                    retire: false,
                    remove_attempts: 0,
                },
            );
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
                let r = tokio::time::timeout(
                    opts.remove_timeout,
                    netlink::remove(handle, *index, *ip, opts.prefix_len),
                )
                .await;
                (*ip, r)
            }))
            .await;
            let mut st = self.lock();
            for (ip, r) in results {
                let ok = match r {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::warn!(%ip, iface = %ifname, error = %e, "cannot remove address");
                        false
                    }
                    Err(_) => {
                        tracing::warn!(%ip, iface = %ifname, "removing address timed out");
                        false
                    }
                };
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
                        if let Some(slot) = st.slots.get_mut(&ip) {
                            slot.state = SlotState::Ready;
                            slot.owned = matches!(added, Added::New);
                            slot.last_used = Instant::now();
                        }
                        st.available.push_back(ip);
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
