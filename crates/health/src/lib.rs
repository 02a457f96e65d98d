//! Availability of the keys of a pool (egress addresses, backends): each key
//! is **available**, **benched** after failures, put on **probation** when
//! its cooldown elapses, and **restored** by a successful probe.
//!
//! No I/O, no async runtime, no clock: every time-dependent call takes
//! `now: Instant`, so tests drive a simulated clock and are deterministic.
//!
//! * [`HealthOptions`] — the policy ([`Strategy`]: consecutive failures or a
//!   failure ratio over a window), cooldown with backoff and recovery,
//!   probation width, the cap on benched keys, history lengths. Defaults
//!   follow Envoy's outlier detection and HAProxy's `fall`: benched on the
//!   3rd consecutive failure, 10 minute cooldown, at most 50 % of the pool
//!   benched.
//! * [`Classifier`] — per pool, maps a raw [`Outcome`] (connect error,
//!   timeout, EOF right after CONNECT, HTTP status, client report) to a
//!   [`Verdict`]. By default only 403, 429, connect errors, timeouts and
//!   early EOFs count against a key; the target's own 404 or 500 proves the
//!   key works.
//! * [`Tracker`] — every key of one pool: [`Tracker::acquire_next`] /
//!   [`Tracker::acquire`] hand out [`Permit`]s (never for a benched key, at
//!   most `probation_requests` for a key on probation),
//!   [`Tracker::finish`] and [`Tracker::record`] feed outcomes back and
//!   return the [`Transition`] they caused, [`Tracker::snapshot`] shows
//!   states, counters and bounded histories. An empty or fully benched pool
//!   yields [`NoneAvailable`], never a panic.
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, Instant};
//! use health::{HealthOptions, Outcome, State, Tracker, Transition};
//!
//! let mut pool = Tracker::new(HealthOptions::default())?;
//! for key in ["10.0.0.1", "10.0.0.2"] {
//!     pool.insert(key);
//! }
//! let t0 = Instant::now(); // the only clock read; the tracker never reads one
//!
//! // Three 403s in a row bench 10.0.0.1 for the default 10 minutes.
//! for i in 1..=3 {
//!     let change = pool.record(&"10.0.0.1", Outcome::Status(403), t0)?;
//!     assert_eq!(matches!(change, Some(Transition::Benched { .. })), i == 3);
//! }
//! assert!(!pool.is_available(&"10.0.0.1", t0));
//!
//! // Selection skips it.
//! let permit = pool.acquire_next(t0)?;
//! assert_eq!(*permit.key(), "10.0.0.2");
//! pool.finish(permit, Outcome::Status(200), t0)?;
//!
//! // After the cooldown it is on probation: one probe at a time ...
//! let later = t0 + Duration::from_secs(600);
//! assert_eq!(pool.state(&"10.0.0.1", later), Some(State::Probation));
//! let probe = pool.acquire(&"10.0.0.1", later)?;
//! assert!(probe.is_probe());
//! assert!(pool.acquire(&"10.0.0.1", later).is_err());
//!
//! // ... and a success restores it.
//! let change = pool.finish(probe, Outcome::Status(404), later)?;
//! assert_eq!(change, Some(Transition::Restored));
//! assert!(pool.is_available(&"10.0.0.1", later));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! See [`Tracker`] for the state machine, the time and the threading model.

mod classify;
mod error;
mod options;
mod ring;
mod tracker;
mod window;

pub use classify::{Classifier, Observation, Outcome, Verdict};
pub use error::{InvalidOption, NoneAvailable, Unavailable, UnknownKey};
pub use options::{HealthOptions, MAX_DURATION, Strategy};
pub use tracker::{
    BenchCause, BenchRecord, Counters, HistoryEntry, KeySnapshot, Permit, PoolStats, State,
    Tracker, Transition,
};
