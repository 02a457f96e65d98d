//! The admin events stream: what changed, as it happens (`GET
//! /api/events`, server-sent events): benchings and restorations of pool
//! addresses and upstreams, bans and lifted bans, rules added and removed.
//!
//! A bounded broadcast channel: publishing never blocks the data path, and
//! a subscriber that falls behind is told how many events it missed
//! (`lagged`) instead of slowing anyone down.

use serde::Serialize;
use tokio::sync::broadcast;

/// Events kept for slow subscribers before they lag.
const CAPACITY: usize = 1024;

/// One event.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// What happened: `benched`, `restored`, `bench_suppressed`, `banned`,
    /// `ban_lifted`, `rule_added`, `rule_removed`, …
    pub kind: &'static str,
    /// When (RFC 3339, UTC).
    pub at: String,
    /// The details, by kind.
    #[serde(flatten)]
    pub data: serde_json::Value,
}

/// The publishing side; cheap to clone.
#[derive(Clone, Debug)]
pub struct Events {
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Events {
        Events {
            tx: broadcast::channel(CAPACITY).0,
        }
    }
}

impl Events {
    /// Publishes an event (dropped when nobody listens).
    pub fn publish(&self, kind: &'static str, data: serde_json::Value) {
        let at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let _ = self.tx.send(Event { kind, at, data });
    }

    /// A new subscription, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
