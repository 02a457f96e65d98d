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
//!
//! [`count_offenses`] keeps the auto-blocker's offense counts of the
//! fleet (see there).

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

/// What the fleet's offense counts are told by this instance.
#[derive(Debug)]
pub enum Tally {
    /// An offense its rule set's `AutoBlock` counted without banning:
    /// the set, the client's key (`AutoBlock::key`), what it did.
    Offense(Arc<str>, iprules::Rule, gateway::guard::Offense),
    /// A client this instance banned on its own count: the fleet's count
    /// of it is spent, as the local one is.
    Banned(Arc<str>, iprules::Rule),
}

/// Called with each ban a fleet count imposes here, with its set.
pub type FleetBanHook = Arc<dyn Fn(&str, &gateway::guard::Ban) + Send + Sync>;

/// What a Redis error about the counters most likely means.
pub fn count_hint(e: &str) -> &'static str {
    if e.contains("NOPERM") || e.contains("can't run this command") || e.contains("no permissions")
    {
        " (the Redis user may not run the counters' commands: its ACL needs +@scripting \
         +@string +@keyspace)"
    } else {
        ""
    }
}

/// One client's part of a batch.
#[derive(Default)]
struct Part {
    /// Offenses to add.
    n: u64,
    /// The last of them.
    offense: Option<gateway::guard::Offense>,
    /// Banned here on its own count: forget, do not add.
    banned: bool,
}

/// Counts offenses across the fleet: every offense an instance counted
/// without banning is added to a counter in Redis (`PREFIX:count:SET/CLIENT`),
/// and the instance whose addition brings it to (or past) the set's
/// `threshold` bans the client (`AutoBlock::ban`); the ban then reaches
/// the fleet as any ban does (saved by `on_ban`, followed by the others).
/// So a client cannot spread its attempts over the instances to stay
/// under the threshold of each.
///
/// A fleet counter lives for the set's `window` from its first offense (a
/// fixed window; each instance's own count slides), and is dropped when
/// the client is banned, here on the fleet's count or on this instance's
/// own. Offenses arriving together go in one round trip. Not added: the
/// offense that bans on an instance's own count, and offenses beyond
/// [`OFFENSE_QUEUE`] waiting. While Redis is unreachable the fleet's
/// counts miss what happens meanwhile (said once in the log); each
/// instance still bans on its own count.
pub async fn count_offenses(
    mut rx: tokio::sync::mpsc::Receiver<Tally>,
    counter: store::Redis,
    rules: Arc<RuleSets>,
    on_ban: FleetBanHook,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let counter = Arc::new(counter);
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            next = rx.recv() => match next {
                Some(t) => t,
                None => return,
            },
        };
        // Same client, same set: one addition of n.
        let mut batch: std::collections::HashMap<(Arc<str>, iprules::Rule), Part> =
            std::collections::HashMap::new();
        let mut add = |t: Tally| match t {
            Tally::Offense(set, key, offense) => {
                let p = batch.entry((set, key)).or_default();
                p.n += 1;
                p.offense = Some(offense);
            }
            Tally::Banned(set, key) => batch.entry((set, key)).or_default().banned = true,
        };
        add(first);
        for _ in 1..OFFENSE_BATCH {
            match rx.try_recv() {
                Ok(t) => add(t),
                Err(_) => break,
            }
        }
        let (counter, rules, on_ban, failing, metrics) = (
            Arc::clone(&counter),
            Arc::clone(&rules),
            Arc::clone(&on_ban),
            Arc::clone(&failing),
            Arc::clone(&metrics),
        );
        let done = tokio::task::spawn_blocking(move || {
            let result = count_batch(batch, &counter, &rules, &on_ban, &metrics);
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
                            "offenses not added to the fleet's counts{}: each instance bans \
                             on its own count until the counts work again",
                            count_hint(&e)
                        );
                    }
                }
            }
        });
        tokio::select! {
            biased;
            // Shutting down: the blocking call ends on its own (bounded by
            // the Redis client's timeouts).
            () = stop.cancelled() => return,
            r = done => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "the fleet's offense count failed");
                }
            }
        }
    }
}

/// Adds one batch to the fleet's counts, set by set (each has its own
/// window), bans the clients that reached their set's threshold, and
/// forgets the counts of the clients banned. A failure (of a set, of a
/// counter) does not stop the others; the first is returned.
fn count_batch(
    batch: std::collections::HashMap<(Arc<str>, iprules::Rule), Part>,
    counter: &store::Redis,
    rules: &RuleSets,
    on_ban: &FleetBanHook,
    metrics: &Metrics,
) -> Result<(), String> {
    let mut by_set: std::collections::BTreeMap<Arc<str>, Vec<(iprules::Rule, Part)>> =
        std::collections::BTreeMap::new();
    for ((set, key), part) in batch {
        by_set.entry(set).or_default().push((key, part));
    }
    let mut first_error: Option<String> = None;
    let mut fail = |e: String| {
        first_error.get_or_insert(e);
    };
    for (set, clients) in by_set {
        let Some(ab) = rules.autoblock(&set) else {
            continue;
        };
        let opts = ab.options();
        let name = |k: &iprules::Rule| format!("{set}/{k}");
        let mut forget: Vec<String> = clients
            .iter()
            .filter(|(_, p)| p.banned)
            .map(|(k, _)| name(k))
            .collect();
        let adding: Vec<(&iprules::Rule, &Part, String)> = clients
            .iter()
            .filter(|(_, p)| !p.banned && p.n > 0)
            .map(|(k, p)| (k, p, name(k)))
            .collect();
        let counts: Vec<(&str, u64)> = adding.iter().map(|(_, p, n)| (n.as_str(), p.n)).collect();
        match counter.count(&counts, opts.window) {
            Err(e) => {
                metrics.count_fleet_offenses("failed", counts.iter().map(|c| c.1).sum());
                fail(e.to_string());
            }
            Ok(totals) => {
                for ((key, part, counter_name), total) in adding.iter().zip(totals) {
                    let total = match total {
                        Ok(t) => {
                            metrics.count_fleet_offenses("added", part.n);
                            t
                        }
                        Err(e) => {
                            metrics.count_fleet_offenses("failed", part.n);
                            fail(format!("counter {counter_name}: {e}"));
                            continue;
                        }
                    };
                    if total < u64::from(opts.threshold.max(1)) {
                        continue;
                    }
                    let offense = part.offense.unwrap_or(gateway::guard::Offense::Malformed);
                    if let Some(ban) = ab.ban(**key, offense, Instant::now()) {
                        tracing::info!(
                            set = &*set,
                            rule = %key,
                            offenses = total,
                            "the fleet's count of this client's offenses reached the threshold: banned"
                        );
                        on_ban(&set, &ban);
                        metrics.count_fleet_ban();
                    }
                    forget.push(counter_name.clone());
                }
            }
        }
        let forget: Vec<&str> = forget.iter().map(String::as_str).collect();
        if let Err(e) = counter.forget_counts(&forget) {
            fail(e.to_string());
        }
    }
    first_error.map_or(Ok(()), Err)
}
