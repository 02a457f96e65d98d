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

/// Offenses waiting to be added to the fleet's counts; beyond this many
/// they are dropped from the fleet's count (each instance's own count
/// still sees every one).
pub const OFFENSE_QUEUE: usize = 4096;

/// Most client counts added in one round trip.
const OFFENSE_BATCH: usize = 512;

/// One offense for the fleet's count: its rule set, the client's key
/// (`AutoBlock::key`), what it did.
pub type Offended = (String, iprules::Rule, gateway::guard::Offense);

/// Called with each ban a fleet count imposes here, with its set.
pub type FleetBanHook = Arc<dyn Fn(&str, &gateway::guard::Ban) + Send + Sync>;

/// Counts offenses across the fleet: every offense an instance counted
/// without banning is added to a counter in Redis (`PREFIX:count:SET/CLIENT`),
/// and the instance whose addition brings it to the set's `threshold`
/// bans the client (`AutoBlock::ban`); the ban then reaches the fleet as
/// any ban does (saved by `on_ban`, followed by the others). So a client
/// cannot spread its attempts over the instances to stay under the
/// threshold of each.
///
/// A fleet counter lives for the set's `window` from its first offense (a
/// fixed window; each instance's own count slides), and is dropped when it
/// bans. Offenses arriving together go in one round trip. While Redis is
/// unreachable the fleet's counts miss what happens meanwhile (said once
/// in the log); each instance still bans on its own count.
pub async fn count_offenses(
    mut rx: tokio::sync::mpsc::Receiver<Offended>,
    counter: store::Redis,
    rules: Arc<RuleSets>,
    on_ban: FleetBanHook,
    stop: CancellationToken,
) {
    let counter = Arc::new(counter);
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => return,
            next = rx.recv() => match next {
                Some(o) => o,
                None => return,
            },
        };
        // Same client, same set: one addition of n.
        let mut batch: std::collections::HashMap<
            (String, iprules::Rule),
            (u64, gateway::guard::Offense),
        > = std::collections::HashMap::new();
        let mut add = |(set, key, offense): Offended| {
            let e = batch.entry((set, key)).or_insert((0, offense));
            e.0 += 1;
            e.1 = offense;
        };
        add(first);
        for _ in 1..OFFENSE_BATCH {
            match rx.try_recv() {
                Ok(o) => add(o),
                Err(_) => break,
            }
        }
        let (counter, rules, on_ban, failing) = (
            Arc::clone(&counter),
            Arc::clone(&rules),
            Arc::clone(&on_ban),
            Arc::clone(&failing),
        );
        let done = tokio::task::spawn_blocking(move || {
            let result = count_batch(batch, &counter, &rules, &on_ban);
            match result {
                Ok(()) => {
                    if failing.swap(false, std::sync::atomic::Ordering::Relaxed) {
                        tracing::info!("offenses are counted across the fleet again");
                    }
                }
                Err(e) => {
                    if !failing.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::error!(
                            error = %e,
                            "offenses not added to the fleet's counts: each instance bans on its \
                             own count until Redis answers again"
                        );
                    }
                }
            }
        })
        .await;
        if let Err(e) = done {
            tracing::error!(error = %e, "the fleet's offense count failed");
        }
    }
}

/// Adds one batch to the fleet's counts, set by set (each has its own
/// window), and bans the clients that reached their set's threshold.
fn count_batch(
    batch: std::collections::HashMap<(String, iprules::Rule), (u64, gateway::guard::Offense)>,
    counter: &store::Redis,
    rules: &RuleSets,
    on_ban: &FleetBanHook,
) -> Result<(), store::StoreError> {
    let mut by_set: std::collections::BTreeMap<
        String,
        Vec<(iprules::Rule, u64, gateway::guard::Offense)>,
    > = std::collections::BTreeMap::new();
    for ((set, key), (n, offense)) in batch {
        by_set.entry(set).or_default().push((key, n, offense));
    }
    for (set, clients) in by_set {
        let Some(ab) = rules.autoblock(&set) else {
            continue;
        };
        let opts = ab.options();
        let names: Vec<String> = clients
            .iter()
            .map(|(k, _, _)| format!("{set}/{k}"))
            .collect();
        let counts: Vec<(&str, u64)> = names
            .iter()
            .zip(&clients)
            .map(|(name, (_, n, _))| (name.as_str(), *n))
            .collect();
        let totals = counter.count(&counts, opts.window)?;
        let mut banned = Vec::new();
        for ((name, (key, _, offense)), total) in names.iter().zip(&clients).zip(totals) {
            if total < u64::from(opts.threshold.max(1)) {
                continue;
            }
            if let Some(ban) = ab.ban(*key, *offense, Instant::now()) {
                tracing::info!(
                    set,
                    rule = %key,
                    offenses = total,
                    "the fleet's count of this client's offenses reached the threshold: banned"
                );
                on_ban(&set, &ban);
            }
            banned.push(name.as_str());
        }
        counter.forget_counts(&banned)?;
    }
    Ok(())
}
