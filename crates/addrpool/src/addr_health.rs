//! Per-address health: the glue between the pool and a
//! [`health::Tracker`] of its addresses.
//!
//! The pool keeps the tracker under its own lock; this module holds the
//! public types (the transition hook, the admin snapshot), the mapping of
//! the pool's [`Outcome`]s to [`health::Outcome`]s, and the per-lease state
//! (the [`health::Permit`] and a deferred "connected").

use std::net::IpAddr;

use health::{KeySnapshot, Observation, Permit, PoolStats, Transition};

use crate::Outcome;

/// Receives every health transition of every address (benched, restored,
/// benching suppressed by `max_benched_percent`), e.g. to publish events.
/// Implemented for any `Fn(IpAddr, Transition) + Send + Sync`.
///
/// Called synchronously after the pool's lock is released, on the path of
/// whoever reported the outcome: keep it short (record and return).
pub trait TransitionSink: Send + Sync + 'static {
    /// One transition of one source address.
    fn transition(&self, source: IpAddr, transition: Transition);
}

impl<F> TransitionSink for F
where
    F: Fn(IpAddr, Transition) + Send + Sync + 'static,
{
    fn transition(&self, source: IpAddr, transition: Transition) {
        self(source, transition)
    }
}

/// Follows the changes of a pool's health tracker that a durable copy of
/// its benches must follow (see [`crate::Pool::set_health_journal`]), in
/// the order the pool made them.
///
/// Unlike a [`TransitionSink`], it is called **while the pool's lock is
/// held**, right after the change, so two changes of one address can never
/// reach it out of order. Keep it to a few field reads and a push onto a
/// queue: never block (no disk I/O, no waiting on a lock held across I/O)
/// and never call back into the pool (that would deadlock).
pub trait HealthJournal: Send + Sync + 'static {
    /// `source` made `transition` at `now`; `tracker` shows the state it
    /// left (a benching's start, cooldown and strike).
    fn transition(
        &self,
        source: IpAddr,
        transition: &Transition,
        tracker: &health::Tracker<IpAddr>,
        now: std::time::Instant,
    );

    /// The pool forgot `source` while it was out of service (on probation:
    /// its cooldown had ended, but no success had restored it), because it
    /// no longer holds it: it was retired on probation, or it was
    /// remembered after being retired while benched and its cooldown ended.
    /// If the source hands it out again it starts over as available.
    fn forgotten(&self, source: IpAddr);
}

/// The health of a pool's addresses, for an admin view (`/probe`).
#[derive(Debug, Clone)]
pub struct HealthSnapshot {
    /// The instant the states were evaluated at (subtract the `Instant`s of
    /// the address snapshots from it to show ages).
    pub at: std::time::Instant,
    /// Counts by state and totals over every address the pool has tracked.
    pub stats: PoolStats,
    /// Every tracked address, sorted by address.
    pub addresses: Vec<AddressHealth>,
}

/// The health of one address of a pool.
#[derive(Debug, Clone)]
pub struct AddressHealth {
    /// Whether the pool holds the address. `false`: it was retired while
    /// benched and is remembered until its cooldown ends, so that the source
    /// does not hand it out again meanwhile.
    pub held: bool,
    /// Leases of the address outstanding now.
    pub leases: u32,
    /// State, counters, recent outcomes and benchings.
    pub health: KeySnapshot<IpAddr>,
}

/// The clock of the tracker: tokio's (so paused test time applies),
/// as a `std` instant.
pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// What a pool [`Outcome`] says about the address's health; `None` for
/// outcomes that are about the host, not the address (bind and assignment
/// failures: the address is retired or never handed out anyway).
pub(crate) fn to_health(outcome: Outcome) -> Option<health::Outcome> {
    match outcome {
        Outcome::Connected => Some(health::Outcome::Connected),
        // The error kind is not carried by `Outcome::ConnectFailed`.
        Outcome::ConnectFailed => Some(health::Outcome::ConnectError(std::io::ErrorKind::Other)),
        Outcome::ConnectTimeout => Some(health::Outcome::Timeout),
        Outcome::BindFailed | Outcome::AssignFailed => None,
        Outcome::Success => Some(health::Outcome::Reported(health::Verdict::Success)),
        Outcome::Failure => Some(health::Outcome::Reported(health::Verdict::Failure)),
        Outcome::EarlyEof => Some(health::Outcome::EarlyEof),
        Outcome::Status(code) => Some(health::Outcome::Status(code)),
    }
}

/// The health side of one lease.
///
/// A lease gives the tracker one verdict per outcome, with one twist: a
/// plain "connected" is deferred until the lease is released, and dropped if
/// anything else is reported meanwhile. Otherwise every 429 reported by a
/// proxy would follow the connector's own "connected" success and reset the
/// address's run of failures, and no address would ever be benched.
#[derive(Debug, Default)]
pub(crate) struct LeaseHealth {
    /// The permit the lease was handed out under (holds a probe slot on
    /// probation); given back with the first outcome.
    pub(crate) permit: Option<Permit<IpAddr>>,
    /// A deferred `Connected`.
    pub(crate) pending: Option<Observation>,
}

impl LeaseHealth {
    pub(crate) fn new(permit: Option<Permit<IpAddr>>) -> Self {
        LeaseHealth {
            permit,
            pending: None,
        }
    }

    /// Takes in an observation: `None` if it is deferred, else the permit
    /// (if not yet used) to record it with.
    pub(crate) fn observe(
        &mut self,
        observation: Observation,
    ) -> Option<(Option<Permit<IpAddr>>, Observation)> {
        if observation.outcome == health::Outcome::Connected {
            self.pending = Some(observation);
            return None;
        }
        self.pending = None;
        Some((self.permit.take(), observation))
    }
}
