//! Hot reload (SIGHUP, `POST /api/reload`): the config file is read and
//! validated again; an invalid file is refused with the reason and the
//! running config stays.
//!
//! # One path
//!
//! Both triggers end in [`Applier::apply`], run by the serve loop (which
//! owns the listeners), one reload at a time: SIGHUP is handled there, and
//! [`Reloader::reload`] (the admin API's side) sends a request to the loop
//! and waits for its [`Report`].
//!
//! # What is applied live
//!
//! - Rule sets take their new config-file rules at once (runtime rules and
//!   bans kept, one pointer swap for readers).
//! - The registry's key store is read again (added `.pub` files accepted,
//!   removed ones refused and their connections closed).
//! - Listeners, compared section by section with what runs:
//!   - `[egress.<name>]` and `[ingress.<name>]` added: bound and served.
//!   - `[egress.*]`, `[ingress.*]` and `[l4.*]` removed: the listener stops
//!     accepting at once (its port refuses connections) and its open
//!     connections, requests and tunnels finish, up to the listener's
//!     `drain_timeout` (or until `shutdown_timeout` if the daemon stops
//!     meanwhile). Its `ippool_egress_*`, `ippool_ingress_*` or
//!     `ippool_l4_*` series go; a removed l4's entry in `/probe` and
//!     `ippool_pool_*` stays until a restart (the pool registry is fixed
//!     at start).
//!   - `[egress.*]` changed (the section, or the users its `users_file`
//!     holds): replaced. The new listener is bound first, then served,
//!     then the old one is stopped as above; open connections stay on the
//!     old one with the old settings. The new one starts with fresh
//!     counters and its own rate-limit state.
//!   - `[ingress.*]` changed outside `routes`: replaced the same way, on
//!     the same route table (registered backends, backend health, the
//!     `/api/routes` view and the registry keep working). Active health
//!     checks move to the replacement at its next idle sweep.
//!   - `[ingress.*.routes.*]` added, changed or removed: applied to the
//!     live route table, without touching the listener. A new route takes
//!     requests at once; a changed one keeps the state of the backends it
//!     still lists; config backends no longer listed, and every backend of
//!     a removed route, drain (no new requests, in-flight ones finish
//!     within the ingress's `drain_timeout`) and then leave. A route whose
//!     `backend_tls` changed (its settings, or the contents of its files,
//!     which a reload reads again even when the config file is the same)
//!     starts its backends afresh: requests in flight finish on their old
//!     connections, new ones use the new setting. Backends that
//!     registered themselves into a config route stay. Listed in `routes`
//!     (`ingress.web.routes.api`). The new routes are first tried on a
//!     scratch copy of the table: one that collides with a registered
//!     backend's route refuses the reload.
//!
//!   A replaced listener is listed in both `started` and `stopped`.
//!
//! # What needs a restart (listed in `restart_required`, not applied)
//!
//! - `[pools.*]`, `[monitor.*]`, `[registry]`, `[admin]`, `[store]`, `state_dir`,
//!   `shutdown_timeout`, rule sets added or removed and a set's `default`,
//!   `autoblock`, `rate_limit` or `kernel_filter`: they own state or
//!   sockets that other parts hold.
//! - `[l4.*]` added or changed: each balancer is also a pool of the
//!   registry behind `/probe` and `ippool_pool_*`, which is fixed at start.
//!
//! Sections are compared with what the daemon runs, so a change still
//! waiting for a restart is listed again by every reload.
//!
//! An `[ingress.*]` added at reload serves its routes and is listed by
//! `/api/routes` (and its backends can be drained); one removed leaves
//! that list. Registered backends keep joining the ingress the registry
//! chose at start (`registry.ingress`, or the first).
//!
//! # Refused reloads
//!
//! A reload is refused, with nothing changed, when the file is invalid,
//! when a listener to start names a pool (`egress.<name>.pool`) or a rule
//! set (`rules`) the daemon does not run (those need a restart first), or
//! when a listener cannot be bound (the error names `<kind>.<name>.listen`
//! and the address): every new socket is bound before anything is
//! applied, and dropped again on failure.
//!
//! # Same address: `SO_REUSEPORT`
//!
//! Every listener socket is bound with `SO_REUSEPORT` (see
//! [`crate::serve`]), so the replacement of a listener on the same address
//! is bound while the old one still accepts: no moment without a listening
//! socket, and a replacement that cannot start leaves the old one running.
//! The cost: a connection the kernel queued on the old socket but that the
//! old listener did not accept before it closed is reset (Linux ≥ 5.14
//! moves them to the new socket with `net.ipv4.tcp_migrate_req = 1`).
//! Outside a replacement, a plain bind is tried first, so a port another
//! process holds (even with `SO_REUSEPORT`) is refused, not shared.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::{self, Config};
use crate::rules::RuleSets;
use crate::serve::{Kind, Listeners, Prepared};

/// What a reload did.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    /// Rule sets whose config-file rules were replaced.
    pub reloaded: Vec<String>,
    /// Sections that changed but take effect only after a restart.
    pub restart_required: Vec<String>,
    /// Listeners started (`kind.name`, e.g. `ingress.web`): added, or
    /// replacing a changed one.
    pub started: Vec<String>,
    /// Listeners stopped (removed, or replaced); their open connections
    /// drain.
    pub stopped: Vec<String>,
    /// Ingress routes added, changed or removed in a running listener's
    /// table (`ingress.web.routes.api`); backends no longer listed drain.
    pub routes: Vec<String>,
    /// Keys in the registry's key store after the reload (no registry:
    /// absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<usize>,
}

type Reply = oneshot::Sender<Result<Report, String>>;

/// Asks the serve loop to reload (the admin API's handle), and shows the
/// config last loaded.
#[derive(Debug)]
pub struct Reloader {
    requests: mpsc::Sender<Reply>,
    json: Arc<Mutex<Arc<str>>>,
}

impl Reloader {
    /// A reloader of the config at `path`, now running `config`, and the
    /// serve loop's side of it.
    pub fn new(
        path: PathBuf,
        config: &Config,
        rules: Arc<RuleSets>,
        store: store::Store,
        registry: Option<registry::Registry>,
    ) -> (Reloader, Applier) {
        let json = Arc::new(Mutex::new(render(config)));
        let (tx, rx) = mpsc::channel(4);
        let applier = Applier {
            path,
            rules,
            store,
            registry,
            booted: serde_json::to_value(config).unwrap_or_default(),
            json: Arc::clone(&json),
            requests: rx,
        };
        (Reloader { requests: tx, json }, applier)
    }

    /// The config last loaded, as JSON (for `/config`).
    pub fn config_json(&self) -> Arc<str> {
        Arc::clone(&self.json.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Reloads, exactly as SIGHUP does, and waits for the outcome.
    /// Blocking: call off the async workers (`spawn_blocking`).
    pub fn reload(&self) -> Result<Report, String> {
        let stopping = || "the daemon is stopping".to_owned();
        let (tx, rx) = oneshot::channel();
        self.requests.blocking_send(tx).map_err(|_| stopping())?;
        rx.blocking_recv().map_err(|_| stopping())?
    }
}

fn render(config: &Config) -> Arc<str> {
    Arc::from(serde_json::to_string(config).unwrap_or_default())
}

/// The serve loop's side of reloading: applies a reload to the running
/// daemon.
#[derive(Debug)]
pub struct Applier {
    path: PathBuf,
    rules: Arc<RuleSets>,
    store: store::Store,
    registry: Option<registry::Registry>,
    /// The config the daemon started with, as JSON: what sections that
    /// need a restart are compared with.
    booted: serde_json::Value,
    json: Arc<Mutex<Arc<str>>>,
    requests: mpsc::Receiver<Reply>,
}

/// A listener a reload starts.
struct Start {
    key: String,
    spec: StartSpec,
    section: serde_json::Value,
    /// Bind without the busy-port probe (the address is that of a
    /// listener this reload stops or replaces).
    reuse: bool,
}

enum StartSpec {
    Egress(crate::config::EgressSpec),
    Ingress(
        crate::config::IngressSpec,
        Option<gateway::ingress::RouteTable>,
    ),
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("reload failed: {e}"))?
}

impl Applier {
    /// The next reload asked for through a [`Reloader`], with where to
    /// send its outcome (`None` once every reloader is gone).
    pub async fn next(&mut self) -> Option<oneshot::Sender<Result<Report, String>>> {
        self.requests.recv().await
    }

    /// Reloads the config file into the running daemon (see the module
    /// docs) and logs the outcome. On error nothing was changed.
    pub async fn apply(&mut self, listeners: &mut Listeners) -> Result<Report, String> {
        let r = self.try_apply(listeners).await;
        match &r {
            Ok(report) => tracing::info!(
                reloaded = ?report.reloaded,
                restart_required = ?report.restart_required,
                started = ?report.started,
                stopped = ?report.stopped,
                "config reloaded"
            ),
            Err(e) => tracing::warn!("reload refused, the running config stays: {e}"),
        }
        r
    }

    async fn try_apply(&mut self, listeners: &mut Listeners) -> Result<Report, String> {
        let (path, store) = (self.path.clone(), self.store.clone());
        let (mut loaded, runtime) = blocking(move || {
            let loaded = config::load(&path, config::Scope::Full).map_err(|e| e.to_string())?;
            let runtime = store.rules().map_err(|e| e.to_string())?;
            Ok((loaded, runtime))
        })
        .await?;
        let new = serde_json::to_value(&loaded.config).map_err(|e| e.to_string())?;
        let mut report = Report::default();
        let sets = self.restart_required(&new, &mut report.restart_required);

        // Listeners: plan, then bind every new socket; nothing changes
        // before all are bound.
        let Plan {
            starts,
            stops,
            syncs,
        } = plan(listeners, &mut loaded, &new, &mut report.restart_required)?;
        for sync in &syncs {
            sync.dry_run()?;
        }
        let mut prepared: Vec<Prepared> = Vec::with_capacity(starts.len());
        for s in starts {
            let env = listeners.env();
            let mut p = match s.spec {
                StartSpec::Egress(spec) => env.prepare_egress(&spec, !s.reuse).await,
                StartSpec::Ingress(spec, table) => env.prepare_ingress(spec, table, !s.reuse).await,
            }
            .map_err(|e| e.to_string())?;
            debug_assert_eq!(p.key(), s.key);
            p.section = s.section;
            prepared.push(p);
        }
        if let Some(r) = self.registry.clone() {
            let n = blocking(move || {
                r.reload_keys()
                    .map_err(|e| format!("registry.keys_dir: {e}"))?;
                Ok(r.keys().len())
            })
            .await?;
            report.keys = Some(n);
        }

        // Apply: the rules, then the listeners. Neither can fail now.
        let (rules, base) = (Arc::clone(&self.rules), loaded.rules);
        report.reloaded = blocking(move || {
            Ok(sets
                .into_iter()
                .filter(|n| {
                    base.get(n)
                        .map(|p| p.read(Clone::clone))
                        .is_some_and(|b| rules.reload_base(n, b, &runtime))
                })
                .collect())
        })
        .await?;
        let (started, stopped) = listeners.commit(prepared, stops);
        report.started = started;
        report.stopped = stopped;
        for sync in syncs {
            let (key, section) = (sync.key.clone(), sync.section.clone());
            report.routes.extend(sync.apply());
            listeners.set_section(&key, section);
        }
        for v in [
            &mut report.restart_required,
            &mut report.started,
            &mut report.stopped,
            &mut report.routes,
        ] {
            v.sort();
            v.dedup();
        }
        *self.json.lock().unwrap_or_else(PoisonError::into_inner) = render(&loaded.config);
        Ok(report)
    }

    /// Lists in `out` the changes (from the config the daemon started
    /// with) of sections applied only at a restart; returns the rule sets
    /// whose config-file rules are to be reloaded.
    fn restart_required(&self, new: &serde_json::Value, out: &mut Vec<String>) -> Vec<String> {
        let old = &self.booted;
        let empty = serde_json::Map::new();
        let obj = |v: &serde_json::Value, k: &str| {
            v.get(k)
                .and_then(|x| x.as_object())
                .cloned()
                .unwrap_or_else(|| empty.clone())
        };
        let keys: BTreeSet<&String> = old
            .as_object()
            .into_iter()
            .chain(new.as_object())
            .flat_map(|m| m.keys())
            .collect();
        // Listener sections are planned apart; rules below.
        for k in keys
            .into_iter()
            .filter(|k| !matches!(k.as_str(), "rules" | "egress" | "l4" | "ingress"))
        {
            if old.get(k) == new.get(k) {
                continue;
            }
            if matches!(k.as_str(), "pools" | "monitor") {
                let (a, b) = (obj(old, k), obj(new, k));
                let names: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                out.extend(
                    names
                        .into_iter()
                        .filter(|n| a.get(*n) != b.get(*n))
                        .map(|n| format!("{k}.{n}")),
                );
            } else {
                out.push(k.clone());
            }
        }
        // Rules: new base rules now; structure changes need a restart.
        let (old_rules, new_rules) = (obj(old, "rules"), obj(new, "rules"));
        let names: BTreeSet<&String> = old_rules.keys().chain(new_rules.keys()).collect();
        let mut sets = Vec::new();
        for n in names {
            match (old_rules.get(n), new_rules.get(n)) {
                (Some(a), Some(b)) => {
                    for part in ["default", "autoblock", "rate_limit", "kernel_filter"] {
                        if a.get(part) != b.get(part) {
                            out.push(format!("rules.{n}.{part}"));
                        }
                    }
                    sets.push(n.clone());
                }
                _ => out.push(format!("rules.{n}")),
            }
        }
        sets
    }
}

/// Compares the listener sections of the new file with the running
/// listeners: what to start (added or changed), what to stop (removed);
/// adds what cannot be applied live to `restart`. Refuses (with the
/// reason) a listener that would need a pool or rule set the daemon does
/// not run.
fn plan(
    listeners: &Listeners,
    loaded: &mut config::Loaded,
    new: &serde_json::Value,
    restart: &mut Vec<String>,
) -> Result<Plan, String> {
    let mut syncs = Vec::new();
    let running = listeners.running();
    let env = listeners.env();
    let section = |kind: Kind, name: &str| -> Option<serde_json::Value> {
        new.get(kind.as_str()).and_then(|m| m.get(name)).cloned()
    };
    let check_rules = |key: &str, set: Option<&str>| match set {
        Some(set) if !env.has_rule_set(set) => Err(format!(
            "{key}.rules = \"{set}\": the rule set does not run yet (a new rule set needs a restart)"
        )),
        _ => Ok(()),
    };
    let mut starts = Vec::new();
    let mut listen = Vec::new();
    for spec in std::mem::take(&mut loaded.egress) {
        let key = format!("egress.{}", spec.name);
        let sec = section(Kind::Egress, &spec.name).unwrap_or_default();
        if let Some(r) = running.get(&key)
            && r.section == sec
            && r.users == spec.users
        {
            continue;
        }
        if !env.has_pool(&spec.pool) {
            return Err(format!(
                "{key}.pool = \"{}\": no such pool runs (a new pool needs a restart)",
                spec.pool
            ));
        }
        check_rules(&key, spec.rules.as_deref())?;
        listen.push(spec.listen);
        starts.push(Start {
            key,
            spec: StartSpec::Egress(spec),
            section: sec,
            reuse: false,
        });
    }
    for spec in std::mem::take(&mut loaded.ingress) {
        let key = format!("ingress.{}", spec.name);
        let sec = section(Kind::Ingress, &spec.name).unwrap_or_default();
        let table = match running.get(&key) {
            None => None,
            Some(r) if r.section == sec => {
                // The same file names, maybe not the same files: a route's
                // backend_tls CA or client certificate replaced on disk.
                if let Some(table) = &r.table {
                    let snap = table.snapshot();
                    let rotated = spec.routes.iter().any(|route| {
                        route.backend_tls.is_some()
                            && snap
                                .route(&route.name)
                                .is_some_and(|live| live.backend_tls != route.backend_tls)
                    });
                    if rotated {
                        syncs.push(RouteSync {
                            key: key.clone(),
                            section: sec.clone(),
                            table: table.clone(),
                            old: spec.routes.iter().map(|r| r.name.clone()).collect(),
                            new: spec.routes.clone(),
                            drain_timeout: spec.options.drain_timeout,
                        });
                    }
                }
                continue;
            }
            Some(r) => {
                let Some(table) = r.table.clone() else {
                    restart.push(key);
                    continue;
                };
                if r.section.get("routes") != sec.get("routes") {
                    let old = r
                        .section
                        .get("routes")
                        .and_then(|v| v.as_object())
                        .map(|m| m.keys().cloned().collect())
                        .unwrap_or_default();
                    syncs.push(RouteSync {
                        key: key.clone(),
                        section: sec.clone(),
                        table: table.clone(),
                        old,
                        new: spec.routes.clone(),
                        drain_timeout: spec.options.drain_timeout,
                    });
                }
                let without_routes = |v: &serde_json::Value| {
                    let mut v = v.clone();
                    if let Some(m) = v.as_object_mut() {
                        m.remove("routes");
                    }
                    v
                };
                if without_routes(&r.section) == without_routes(&sec) {
                    // Only the routes changed: the listener stays.
                    continue;
                }
                Some(table)
            }
        };
        check_rules(&key, spec.rules.as_deref())?;
        listen.push(spec.options.listen);
        starts.push(Start {
            key,
            spec: StartSpec::Ingress(spec, table),
            section: sec,
            reuse: false,
        });
    }
    for spec in &loaded.l4 {
        let key = format!("l4.{}", spec.name);
        let sec = section(Kind::L4, &spec.name).unwrap_or_default();
        if running.get(&key).is_none_or(|r| r.section != sec) {
            restart.push(key);
        }
    }
    let stops: Vec<String> = running
        .iter()
        .filter(|(_, r)| section(r.kind, &r.name).is_none())
        .map(|(k, _)| k.clone())
        .collect();
    // Ports this reload frees (listeners stopped or replaced): a listener
    // taking one binds without the busy-port probe, since the old socket
    // still listens (with SO_REUSEPORT) until the new one serves.
    let freed: BTreeSet<u16> = running
        .iter()
        .filter(|(k, _)| stops.contains(k) || starts.iter().any(|s| s.key == **k))
        .map(|(_, r)| r.listen.port())
        .filter(|p| *p != 0)
        .collect();
    for (s, addr) in starts.iter_mut().zip(listen) {
        s.reuse = freed.contains(&addr.port());
    }
    Ok(Plan {
        starts,
        stops,
        syncs,
    })
}

/// What a reload does to the listeners.
struct Plan {
    /// Listeners to start (added, or replacing a changed one).
    starts: Vec<Start>,
    /// Listeners to stop, by key.
    stops: Vec<String>,
    /// Route tables to bring in line with the new file.
    syncs: Vec<RouteSync>,
}

/// The config-file routes of a running ingress, brought in line with the
/// new file: in its live table, so registered backends, backend health,
/// held backends and connections stay.
struct RouteSync {
    /// `ingress.<name>`.
    key: String,
    /// Its new section of the config file, as JSON.
    section: serde_json::Value,
    table: gateway::ingress::RouteTable,
    /// The names of the routes the running config had.
    old: BTreeSet<String>,
    /// The routes of the new config.
    new: Vec<gateway::ingress::Route>,
    /// How long backends taken out get to finish.
    drain_timeout: std::time::Duration,
}

impl RouteSync {
    /// Whether the new routes fit with what else the table holds (routes
    /// of registered backends): tried on a scratch copy, so a refused
    /// reload changes nothing. The error names the route.
    fn dry_run(&self) -> Result<(), String> {
        use gateway::ingress as gi;
        let scratch = gi::RouteTable::default();
        let replaced: BTreeSet<&str> = self
            .old
            .iter()
            .map(String::as_str)
            .chain(self.new.iter().map(|r| r.name.as_str()))
            .collect();
        for r in self.table.snapshot().routes {
            if replaced.contains(r.name.as_str()) {
                continue;
            }
            let Some(first) = r.matches.first() else {
                continue;
            };
            let mut route = gi::Route::new(r.name.clone(), first.clone());
            route.matches = r.matches.clone();
            for b in &r.backends {
                route = route.with_backend(gi::Backend::new(b.id.clone(), b.addr));
            }
            scratch
                .upsert_route(route)
                .map_err(|e| format!("{}: route `{}`: {e}", self.key, r.name))?;
        }
        for r in &self.new {
            scratch.upsert_route(r.clone()).map_err(|e| {
                format!(
                    "{}.routes.{}: {e} (a registered backend's route has it)",
                    self.key, r.name
                )
            })?;
        }
        Ok(())
    }

    /// Applies the new routes; returns what changed
    /// (`ingress.web.routes.api`). Routes gone and config backends no
    /// longer listed drain (no new requests, in-flight ones finish within
    /// the ingress's `drain_timeout`), then leave.
    fn apply(self) -> Vec<String> {
        let snap = self.table.snapshot();
        let mut changed = Vec::new();
        let new_names: BTreeSet<&str> = self.new.iter().map(|r| r.name.as_str()).collect();
        for name in self.old.iter().filter(|n| !new_names.contains(n.as_str())) {
            let Some(r) = snap.route(name) else { continue };
            let drains: Vec<_> = r
                .backends
                .iter()
                .filter_map(|b| self.table.drain(&b.id, self.drain_timeout).ok())
                .collect();
            let (table, name2) = (self.table.clone(), name.clone());
            tokio::spawn(async move {
                futures_util::future::join_all(drains).await;
                if let Err(e) = table.remove_route(&name2) {
                    tracing::debug!(route = %name2, error = %e, "route already gone");
                }
            });
            changed.push(format!("{}.routes.{name}", self.key));
        }
        for route in self.new {
            let name = route.name.clone();
            let before = snap.route(&name);
            // Config backends are `<route>-<n>`; registered ones that
            // joined the route are kept.
            let listed: BTreeSet<&str> = route.backends.iter().map(|b| b.id.as_str()).collect();
            let stale: Vec<String> = before
                .map(|r| {
                    r.backends
                        .iter()
                        .map(|b| b.id.clone())
                        .filter(|id| is_config_backend(&name, id) && !listed.contains(id.as_str()))
                        .collect()
                })
                .unwrap_or_default();
            let same = before.is_some_and(|b| same_route(b, &route));
            if let Err(e) = self.table.upsert_route(route) {
                // The dry run passed; only a concurrent registration can
                // get here.
                tracing::warn!(listener = %self.key, route = %name, error = %e, "route not reloaded");
                continue;
            }
            for id in &stale {
                if let Ok(f) = self.table.drain(id, self.drain_timeout) {
                    tokio::spawn(f);
                }
            }
            if !same || !stale.is_empty() {
                changed.push(format!("{}.routes.{name}", self.key));
            }
        }
        changed
    }
}

/// Whether backend `id` is one the config gave route `route`
/// (`<route>-<n>`).
fn is_config_backend(route: &str, id: &str) -> bool {
    id.strip_prefix(route)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `route` would change nothing of `running`'s settings and
/// backends (registered backends that joined it aside).
fn same_route(running: &gateway::ingress::RouteSnapshot, route: &gateway::ingress::Route) -> bool {
    running.matches == route.matches
        && running.balance == route.balance
        && running.health_check == route.health_check
        && running.retries == route.retries
        && running.no_backend_status == route.no_backend_status
        && running.backend_tls == route.backend_tls
        && running.backend_http2 == route.backend_http2
        && route.backends.iter().all(|b| {
            running
                .backends
                .iter()
                .any(|x| x.id == b.id && x.addr == b.addr && x.weight == b.weight)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway::ingress::{Backend, Route, RouteMatch, RouteTable};

    fn addr(port: u16) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn sync(table: &RouteTable, old: &[&str], new: Vec<Route>) -> RouteSync {
        RouteSync {
            key: "ingress.web".into(),
            section: serde_json::Value::Null,
            table: table.clone(),
            old: old.iter().map(|s| (*s).to_owned()).collect(),
            new,
            drain_timeout: std::time::Duration::from_millis(50),
        }
    }

    #[test]
    fn config_backend_ids() {
        assert!(is_config_backend("main", "main-1"));
        assert!(is_config_backend("main", "main-12"));
        assert!(!is_config_backend("main", "main-"));
        assert!(!is_config_backend("main", "main-x"));
        assert!(!is_config_backend("main", "mainx-1"));
        assert!(!is_config_backend("main", "web002"));
    }

    #[test]
    fn a_route_colliding_with_a_registered_one_is_refused_and_nothing_changes() {
        let table = RouteTable::default();
        table
            .upsert_route(
                Route::new("main", RouteMatch::new(None, "/"))
                    .with_backend(Backend::new("main-1", addr(1))),
            )
            .unwrap();
        // A backend registered itself for app.test.
        table
            .upsert_route(
                Route::new("app.test/", RouteMatch::new(Some("app.test"), "/"))
                    .with_backend(Backend::new("web002", addr(2))),
            )
            .unwrap();
        let s = sync(
            &table,
            &["main"],
            vec![
                Route::new("main", RouteMatch::new(None, "/"))
                    .with_backend(Backend::new("main-1", addr(1))),
                Route::new("api", RouteMatch::new(Some("app.test"), "/"))
                    .with_backend(Backend::new("api-1", addr(3))),
            ],
        );
        let e = s.dry_run().unwrap_err();
        assert!(e.contains("ingress.web.routes.api"), "{e}");
        assert!(table.snapshot().route("api").is_none(), "nothing applied");
    }

    #[tokio::test]
    async fn stale_config_backends_drain_and_registered_ones_stay() {
        let table = RouteTable::default();
        table
            .upsert_route(
                Route::new("main", RouteMatch::new(None, "/"))
                    .with_backend(Backend::new("main-1", addr(1)))
                    .with_backend(Backend::new("main-2", addr(2))),
            )
            .unwrap();
        // An agent joined the config route.
        table
            .upsert_backend("main", Backend::new("web002", addr(9)))
            .unwrap();
        let s = sync(
            &table,
            &["main"],
            vec![
                Route::new("main", RouteMatch::new(None, "/"))
                    .with_backend(Backend::new("main-1", addr(1))),
            ],
        );
        s.dry_run().unwrap();
        assert_eq!(s.apply(), ["ingress.web.routes.main"]);
        let ids = |t: &RouteTable| -> Vec<String> {
            let mut v: Vec<String> = t
                .snapshot()
                .route("main")
                .map(|r| r.backends.iter().map(|b| b.id.clone()).collect())
                .unwrap_or_default();
            v.sort();
            v
        };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while ids(&table) != ["main-1", "web002"] {
            assert!(tokio::time::Instant::now() < deadline, "{:?}", ids(&table));
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // The same routes again: nothing to report.
        let s = sync(
            &table,
            &["main"],
            vec![
                Route::new("main", RouteMatch::new(None, "/"))
                    .with_backend(Backend::new("main-1", addr(1))),
            ],
        );
        assert!(s.apply().is_empty());
    }
}
