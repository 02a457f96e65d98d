//! Following the other instances of a fleet that share a Redis store
//! (`[store] backend = "redis"`): a runtime rule added or removed, or a
//! ban taken or lifted, on any instance applies here within a round trip
//! of Redis's pub/sub.
//!
//! The store is written by whoever made the change (the admin API, the
//! autoblocker); this follower only reads: for each change it reads the
//! record back and applies it to the live rule sets, as a restart would
//! (expired records are dropped, unreadable ones logged and kept). After
//! the subscription was lost it reads both tables again and adds what is
//! missing here; it never removes a rule or ban for being absent from the
//! store (see [`Follower::resync`]). A delete is applied only if the record
//! is still absent when it arrives, so a stale delete cannot undo a newer
//! write.
//!
//! Runs on its own thread: store calls block on the network.

use std::sync::Arc;
use std::time::{Duration, Instant};

use store::{Change, Changes, Store, Table};
use tokio_util::sync::CancellationToken;

use crate::events::Events;
use crate::metrics::Metrics;
use crate::rules::{List, RuleSets};

/// A store that keeps nothing, for `restore`/`restore_bans` on this path:
/// they drop expired records from the store they are given, and an
/// expired record is for the instance that wrote it (or the next start)
/// to drop, not for every follower of the fleet, whose clocks differ.
fn scratch() -> Store {
    Store::memory()
}

/// What the follower changes.
pub struct Follower {
    /// The shared store.
    pub store: Store,
    /// The live rule sets.
    pub rules: Arc<RuleSets>,
    /// The admin events stream.
    pub events: Events,
    /// Rule counts per set.
    pub metrics: Arc<Metrics>,
}

impl Follower {
    /// Applies `changes` until `stop` is cancelled or the feed ends.
    pub fn spawn(
        self,
        changes: Changes,
        stop: CancellationToken,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("fleet".into())
            .spawn(move || {
                while !stop.is_cancelled() {
                    match changes.recv_timeout(Duration::from_millis(250)) {
                        Ok(change) => self.apply(change),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                            tracing::error!(
                                "the fleet's change feed ended: changes made by other \
                                 instances apply here only after a restart"
                            );
                            return;
                        }
                    }
                }
            })
    }

    fn apply(&self, change: Change) {
        let done = match &change {
            Change::Put(Table::Rules, key) => self.rule_put(key),
            Change::Delete(Table::Rules, key) => self.rule_deleted(key),
            Change::Put(Table::Bans, key) => self.ban_put(key),
            Change::Delete(Table::Bans, key) => self.ban_deleted(key),
            Change::Resync => self.resync(),
            // Holds, benches, offsets and keys belong to one instance's
            // listeners, pools and files.
            _ => Ok(()),
        };
        if let Err(e) = done {
            tracing::warn!(?change, error = %e, "change from the fleet not applied");
        }
    }

    fn rule_put(&self, key: &str) -> Result<(), store::StoreError> {
        let Some(r) = self.store.rule(key)? else {
            return Ok(()); // removed again meanwhile
        };
        let (set, list, rule) = (r.set.clone(), r.list.clone(), r.rule.clone());
        if self.rules.restore(vec![r], &scratch()) == 1 {
            self.counted(&set, &list);
            self.metrics.count_fleet_change("rule_added");
            tracing::info!(set, list, rule, "rule added by the fleet");
            self.events.publish(
                "rule_added",
                serde_json::json!({"set": set, "list": list, "rule": rule, "origin": "fleet"}),
            );
        }
        Ok(())
    }

    fn rule_deleted(&self, key: &str) -> Result<(), store::StoreError> {
        // Written again since (here, or elsewhere): the delete is stale.
        if self.store.rule(key)?.is_some() {
            return Ok(());
        }
        let Some((set, list, text)) = store::RuntimeRule::split_key(key) else {
            return Ok(());
        };
        let (Some(l), Ok(rule)) = (List::parse(list), text.parse::<iprules::Rule>()) else {
            return Ok(());
        };
        if self.rules.remove_runtime(set, l, &rule).is_ok() {
            self.counted(set, list);
            self.metrics.count_fleet_change("rule_removed");
            tracing::info!(set, list, rule = text, "rule removed by the fleet");
            self.events.publish(
                "rule_removed",
                serde_json::json!({"set": set, "list": list, "rule": text, "origin": "fleet"}),
            );
        }
        Ok(())
    }

    fn ban_put(&self, key: &str) -> Result<(), store::StoreError> {
        let Some(b) = self.store.ban(key)? else {
            return Ok(());
        };
        let (set, rule) = (b.set.clone(), b.network.clone());
        if self.rules.restore_bans(vec![b], &scratch()) == 1 {
            self.metrics.count_fleet_change("ban_taken");
            tracing::info!(set, rule, "ban taken by the fleet");
            self.events.publish(
                "banned",
                serde_json::json!({"set": set, "rule": rule, "origin": "fleet"}),
            );
        }
        Ok(())
    }

    fn ban_deleted(&self, key: &str) -> Result<(), store::StoreError> {
        if self.store.ban(key)?.is_some() {
            return Ok(());
        }
        let Some((set, text)) = store::Ban::split_key(key) else {
            return Ok(());
        };
        let Ok(rule) = text.parse::<iprules::Rule>() else {
            return Ok(());
        };
        if let Ok(true) = self.rules.lift(set, &rule, Instant::now()) {
            self.metrics.count_fleet_change("ban_lifted");
            tracing::info!(set, rule = text, "ban lifted by the fleet");
            self.events.publish(
                "ban_lifted",
                serde_json::json!({"set": set, "rule": text, "origin": "fleet"}),
            );
        }
        Ok(())
    }

    /// Reads both tables again and applies what is missing here. Nothing
    /// is removed for being absent: a Redis restarted empty (without
    /// persistence) must not lift every rule and ban of the fleet, and a
    /// rule or ban this instance just took may not be written yet. A
    /// removal missed while the feed was lost holds here until the record
    /// expires or the instance restarts.
    fn resync(&self) -> Result<(), store::StoreError> {
        let banned = self.rules.restore_bans(self.store.bans()?, &scratch());
        let added = self.rules.restore(self.store.rules()?, &scratch());
        for set in self.rules.names() {
            for list in [List::Allow, List::Deny] {
                self.counted(set, list.as_str());
            }
        }
        self.metrics.count_fleet_change("resync");
        tracing::info!(added, banned, "state read again from the fleet's store");
        Ok(())
    }

    fn counted(&self, set: &str, list: &str) {
        if let Some(l) = List::parse(list) {
            self.metrics
                .set_rule_count(set, l.as_str(), self.rules.len(set, l));
        }
    }
}
