//! `ippool serve`: the runtime, the listeners and graceful shutdown.
//!
//! Every long-running task is owned by one [`JoinSet`]; a
//! [`CancellationToken`] tells them all to stop on SIGINT or SIGTERM, and
//! they get `shutdown_timeout` to finish before being aborted. Each
//! `[monitor.<name>]` runs as one task of the set (see [`crate::monitor`])
//! feeding its pool in the shared [`Pools`] registry. Each
//! `[pools.<name>]` is an [`addrpool::Pool`] started before the listeners
//! and shut down after them (so a netlink pool removes the addresses it
//! added, even when start-up fails half-way).
//!
//! The data-plane listeners (`[egress.<name>]`, `[l4.<name>]`,
//! `[ingress.<name>]`) are kept apart in [`Listeners`], by `kind.name`:
//! each runs as one task under its own child of the shutdown token, with
//! its access-log writer and kernel socket filter, so a reload (see
//! [`crate::reload`], applied by the serve loop for SIGHUP and
//! `POST /api/reload` alike) can start and stop one without touching the
//! others; shutdown stops them all and awaits them within
//! `shutdown_timeout` like every other task. Their sockets are bound with
//! `SO_REUSEPORT` (after a plain bind that checks the port is free), so a
//! replacement can bind the address its predecessor still listens on.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::Loaded;
use crate::config::PoolAddresses;
use crate::metrics::Metrics;
use crate::pools::Pools;

/// Why `serve` failed after the config was accepted.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The tokio runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A listener could not bind its address.
    #[error("{key} = \"{addr}\": cannot listen: {source}")]
    Bind {
        /// The config key of the address.
        key: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signal(#[source] std::io::Error),
    /// The state store could not be opened (see its message for what to
    /// do; nothing was changed).
    #[error("state_dir: {0}")]
    Store(#[source] store::StoreError),
    /// The shared store of `[store]` could not be used.
    #[error("[store]: {0}")]
    SharedStore(#[source] store::StoreError),
    /// The state directory could not be created.
    #[error("state_dir = \"{path}\": cannot create: {source}")]
    StateDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The config could not be rendered for `/config`.
    #[error("cannot render the effective config: {0}")]
    Render(#[source] serde_json::Error),
    /// A pool or listener could not be set up.
    #[error("{section}: {message}")]
    Pool {
        /// The config section (`monitor.web`, `pools.v6`, `egress.main`).
        section: String,
        /// What is wrong.
        message: String,
    },
    /// A task stopped with an error, or stopped when it should not have.
    #[error("{task}: {message}")]
    Task {
        /// Which task.
        task: &'static str,
        /// What happened.
        message: String,
    },
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(loaded: Loaded) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    runtime.block_on(serve(loaded))
}

type TaskResult = (&'static str, Result<(), String>);

async fn serve(mut loaded: Loaded) -> Result<(), ServeError> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ServeError::Signal)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(ServeError::Signal)?;
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(ServeError::Signal)?;

    // Renders now so a config that cannot be shown fails at start.
    let config_json = serde_json::to_value(&loaded.config).map_err(ServeError::Render)?;
    let shutdown = CancellationToken::new();

    // The state store: runtime rules come back before anything listens.
    std::fs::create_dir_all(&loaded.state_dir).map_err(|source| ServeError::StateDir {
        path: loaded.state_dir.clone(),
        source,
    })?;
    let dir = loaded.state_dir.clone();
    let spec = loaded.store.clone();
    // With Redis, the subscription to the fleet's changes is taken before
    // the tables are read: nothing written in between is missed.
    let (store, fleet) = tokio::task::spawn_blocking(move || match spec {
        crate::config::StoreSpec::Embedded => store::Store::open_dir(&dir)
            .map(|s| (s, None))
            .map_err(ServeError::Store),
        crate::config::StoreSpec::Redis { url, prefix, tls } => {
            let local =
                store::Embedded::open(&dir.join(store::FILE_NAME)).map_err(ServeError::Store)?;
            let shared =
                store::Redis::connect_with(&url, &prefix, &tls).map_err(ServeError::SharedStore)?;
            let changes = shared.changes().map_err(ServeError::SharedStore)?;
            // The fleet's offense counts, on a connection of their own.
            let counter =
                store::Redis::connect_with(&url, &prefix, &tls).map_err(ServeError::SharedStore)?;
            // A count of nothing: says now if the counters cannot work
            // (an ACL without their commands), without stopping start-up.
            let probe = counter
                .count(&[("probe", 0)], std::time::Duration::from_millis(1))
                .map_err(|e| e.to_string())
                .and_then(|mut r| r.pop().unwrap_or(Ok(0)).map(drop));
            if let Err(e) = probe {
                tracing::error!(
                    error = %e,
                    "offenses cannot be counted across the fleet{}: each instance bans on its own count",
                    crate::fleet::count_hint(&e)
                );
            }
            Ok((
                store::Store::new(store::Split { shared, local }),
                Some((changes, counter)),
            ))
        }
    })
    .await
    .map_err(|e| ServeError::Task {
        task: "store",
        message: e.to_string(),
    })??;
    let (changes, counter) = fleet.unzip();
    let store_error = if changes.is_some() {
        ServeError::SharedStore
    } else {
        ServeError::Store
    };
    let saved = store.rules().map_err(store_error)?;
    let restored = loaded.rules.restore(saved, &store);
    let saved = store.bans().map_err(store_error)?;
    let bans = loaded.rules.restore_bans(saved, &store);
    tracing::info!(store = ?store, runtime_rules = restored, bans, "state store open");
    let rules = Arc::new(loaded.rules);
    let (ban_tx, ban_rx) = tokio::sync::mpsc::unbounded_channel();
    let events = crate::events::Events::default();
    let (offense_tx, offense_rx) = match counter {
        Some(_) => {
            let (tx, rx) = tokio::sync::mpsc::channel(crate::fleet::OFFENSE_QUEUE);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let metrics = Arc::new(Metrics::new(&rules));
    let guards = Arc::new(Guards {
        rules: Arc::clone(&rules),
        bans: ban_tx,
        offenses: offense_tx,
        metrics: Arc::clone(&metrics),
        events: events.clone(),
        filters: std::sync::Mutex::new(Vec::new()),
    });
    if let Some(changes) = changes {
        let follower = crate::fleet::Follower {
            store: store.clone(),
            rules: Arc::clone(&rules),
            events: events.clone(),
            metrics: Arc::clone(&metrics),
        };
        follower
            .spawn(changes, shutdown.clone())
            .map_err(|e| ServeError::Task {
                task: "fleet",
                message: e.to_string(),
            })?;
    }

    // Pools: one per monitor (egress pools will register here too).
    let mut pools = Pools::with_events(events.clone());
    let mut monitors = Vec::new();
    for spec in loaded.monitors {
        let pool_err = |message: String| ServeError::Pool {
            section: format!("monitor.{}", spec.name),
            message,
        };
        let mut tracker =
            health::Tracker::with_classifier(spec.options.clone(), spec.classifier.clone())
                .map_err(|e| pool_err(e.to_string()))?;
        let discover = match &spec.addresses {
            PoolAddresses::Fixed(ips) => {
                for ip in ips {
                    tracker.insert(*ip);
                }
                false
            }
            PoolAddresses::Discover => true,
        };
        let pool = pools
            .register(&spec.name, "nginx", tracker, discover)
            .map_err(|e| pool_err(e.to_string()))?;
        // Saved benches and the log offset come back before anything runs.
        let resume = crate::monitor::resume(&spec, &pool, &store).map_err(ServeError::Store)?;
        metrics.add_pool(&spec.name);
        metrics.add_monitor(&spec.name);
        monitors.push((spec, pool, resume));
    }
    // Egress pools, then the listeners (bound here, served below).
    // Whatever fails, the pools started so far are shut down (netlink
    // addresses removed) first.
    let mut egress_pools: Vec<(String, addrpool::Pool)> = Vec::new();
    // Their saved benches come back before anything serves; the journals
    // of their changes get a saver each.
    let mut journals = Vec::new();
    let mut started = start_pools(
        &loaded.pools,
        &metrics,
        &store,
        &mut pools,
        &mut egress_pools,
        &mut journals,
    )
    .await;
    let env = ListenerEnv {
        guards: Arc::clone(&guards),
        metrics: Arc::clone(&metrics),
        pools: egress_pools.clone(),
        pool_specs: loaded.pools.clone(),
        shutdown: shutdown.clone(),
        tables: crate::admin::IngressTables::default(),
    };
    let section = |kind: Kind, name: &str| {
        config_json
            .get(kind.as_str())
            .and_then(|m| m.get(name))
            .cloned()
            .unwrap_or_default()
    };
    let mut prepared = Vec::new();
    let mut tables = Vec::new();
    if started.is_ok() {
        started = async {
            for spec in &loaded.egress {
                let mut p = env.prepare_egress(spec, true).await?;
                p.section = section(Kind::Egress, &spec.name);
                prepared.push(p);
            }
            for spec in &loaded.l4 {
                let mut p = env.prepare_l4(spec, true).await?;
                if let Listener::L4(proxy) = &p.listener {
                    pools
                        .register_l4(&spec.name, proxy.metrics())
                        .map_err(|e| ServeError::Pool {
                            section: format!("l4.{}", spec.name),
                            message: e.to_string(),
                        })?;
                    metrics.add_pool(&spec.name);
                }
                p.section = section(Kind::L4, &spec.name);
                prepared.push(p);
            }
            for spec in std::mem::take(&mut loaded.ingress) {
                let name = spec.name.clone();
                let mut p = env.prepare_ingress(spec, None, true).await?;
                p.section = section(Kind::Ingress, &name);
                if let Some(t) = &p.table {
                    tables.push((name, t.clone()));
                }
                prepared.push(p);
            }
            Ok::<(), ServeError>(())
        }
        .await;
    }
    let mut registry = None;
    let mut registry_guard = None;
    if started.is_ok()
        && let Some(spec) = &loaded.registry
    {
        let mut spec = spec.clone();
        let guard = guards.guard(spec.rules.as_deref(), false);
        if spec.rules.is_some() {
            let g = Arc::clone(&guard);
            spec.options.admit = Some(registry::Admit(Arc::new(move |peer| g.admit(peer))));
        }
        registry_guard = Some(guard);
        match crate::backends::start(&spec).await {
            Ok(r) => {
                tracing::info!(
                    "registry: registration channel listening on {}://{}",
                    if spec.certs.is_some() { "wss" } else { "ws" },
                    r.server.local_addr()
                );
                registry = Some(r);
            }
            Err(message) => {
                started = Err(ServeError::Pool {
                    section: "registry".into(),
                    message,
                });
            }
        }
    }
    if let Err(e) = started {
        drop(prepared);
        stop_pools(&egress_pools).await;
        return Err(e);
    }
    let pools = Arc::new(pools);
    pools.refresh_metrics(&metrics, std::time::Instant::now());
    // Backends an operator held stay held (before the first request).
    let holds = match store.holds() {
        Ok(h) => h,
        Err(e) => {
            drop(prepared);
            stop_pools(&egress_pools).await;
            return Err(ServeError::Store(e));
        }
    };
    for h in holds {
        match tables.iter().find(|(n, _)| *n == h.ingress) {
            Some((_, t)) => {
                t.hold_id(&h.backend);
                tracing::info!(ingress = %h.ingress, backend = %h.backend, "backend held (saved drain)");
            }
            None => tracing::warn!(
                ingress = %h.ingress,
                backend = %h.backend,
                "a saved drain names an ingress that is not configured; kept for when it is"
            ),
        }
    }
    for (name, t) in &tables {
        env.tables.insert(name, t.clone());
    }

    let (reloader, mut applier) = crate::reload::Reloader::new(
        loaded.path.clone(),
        &loaded.config,
        Arc::clone(&rules),
        store.clone(),
        registry.as_ref().map(|r| r.registry.clone()),
    );
    let state = AdminState {
        reloader: Arc::new(reloader),
        rules: Arc::clone(&rules),
        metrics: Arc::clone(&metrics),
        pools: Arc::clone(&pools),
        token: loaded.admin_token.map(Arc::new),
        store,
        events: events.clone(),
        shutdown: shutdown.clone(),
        registry: registry.as_ref().map(|r| r.registry.clone()),
        ingress: env.tables.clone(),
    };

    let want = *loaded.config.admin.listen.get_ref();
    let bound = match TcpListener::bind(want).await {
        Ok(l) => l.local_addr().map(|a| (l, a)),
        Err(e) => Err(e),
    };
    let (listener, bound) = match bound {
        Ok(b) => b,
        Err(source) => {
            drop(prepared);
            stop_pools(&egress_pools).await;
            return Err(ServeError::Bind {
                key: "admin.listen".into(),
                addr: want,
                source,
            });
        }
    };

    let admin_set = loaded
        .config
        .admin
        .rules
        .as_ref()
        .map(|r| r.get_ref().clone());
    let admin_guard = guards.guard(admin_set.as_deref(), false);
    if let Some(set) = admin_set.as_deref() {
        guards.filter_listener("admin", set, &listener);
    }

    let mut tasks: JoinSet<TaskResult> = JoinSet::new();
    {
        let router = admin::router(state.clone());
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let r = admin::run(listener, admin_guard, router, shutdown).await;
            ("admin", r.map_err(|e| e.to_string()))
        });
    }
    {
        // Bans are saved off the connection path, in order.
        let (store, shutdown) = (state.store.clone(), shutdown.clone());
        tasks.spawn(async move {
            save_bans(ban_rx, store, shutdown).await;
            ("bans", Ok(()))
        });
    }
    if let (Some(counter), Some(rx)) = (counter, offense_rx) {
        // Offenses counted across the fleet, off the connection path.
        let g = Arc::clone(&guards);
        let on_ban: crate::fleet::FleetBanHook = Arc::new(move |set, ban| g.ban_hook(set)(ban));
        let (rules, metrics, shutdown) =
            (Arc::clone(&rules), Arc::clone(&metrics), shutdown.clone());
        tasks.spawn(async move {
            crate::fleet::count_offenses(rx, counter, rules, on_ban, metrics, shutdown).await;
            ("offense counts", Ok(()))
        });
    }
    for (name, journal) in &journals {
        // Egress pools' bench changes, off the connection path, in order.
        let (journal, name) = (Arc::clone(journal), name.clone());
        let (store, shutdown) = (state.store.clone(), shutdown.clone());
        tasks.spawn(async move {
            journal.save_until(name, store, shutdown).await;
            ("egress benches", Ok(()))
        });
    }
    let filters = std::mem::take(&mut *guards.filters.lock().unwrap_or_else(|p| p.into_inner()));
    for (name, set, fd) in filters {
        let (shutdown, policy) = (shutdown.clone(), guards.policy(&set));
        tasks.spawn(async move {
            if let Some(policy) = policy {
                let filter = gateway::guard::KernelFilter::new(policy);
                tracing::info!(listener = %name, set = %set, "kernel socket filter on");
                filter
                    .watch(
                        &fd,
                        std::time::Duration::from_millis(250),
                        shutdown.cancelled_owned(),
                    )
                    .await;
            }
            ("kernel filter", Ok(()))
        });
    }
    // The data-plane listeners: each under its own child token, so a
    // reload can stop one; shutdown stops them all.
    let mut listeners = Listeners::new(env);
    listeners.commit(prepared, Vec::new());
    if let Some(r) = registry {
        let crate::backends::Started { registry, server } = r;
        let s2 = shutdown.clone();
        tasks.spawn(async move {
            server.serve(s2.cancelled_owned()).await;
            ("registry", Ok(()))
        });
        if let Some(certs) = loaded.registry.as_ref().and_then(|r| r.certs.clone()) {
            let s4 = shutdown.clone();
            tasks.spawn(async move {
                crate::backends::watch_certs(certs, s4).await;
                ("registry certificates", Ok(()))
            });
        }
        let (ev, s3) = (events.clone(), shutdown.clone());
        let target = loaded
            .registry
            .as_ref()
            .and_then(|r| r.ingress.clone())
            .and_then(|n| tables.iter().find(|(t, _)| *t == n).map(|(_, t)| t.clone()))
            .or_else(|| tables.first().map(|(_, t)| t.clone()));
        let sync = target.map(crate::backends::RouteSync::new);
        let guard = registry_guard.clone();
        let apply: Arc<dyn Fn(&registry::Event) + Send + Sync> = Arc::new(move |e| {
            if let Some(s) = &sync {
                s.apply(e);
            }
            // A failed handshake is an offense of the peer (auto-blocking).
            if let (Some(g), registry::Event::AuthFailed { peer, .. }) = (&guard, e) {
                g.offense(peer.ip(), gateway::guard::Offense::RegistrationAuthFailed);
            }
        });
        tasks.spawn(async move {
            crate::backends::forward(registry, ev, apply, s3).await;
            ("registry events", Ok(()))
        });
    }
    let monitor_count = monitors.len();
    for (spec, pool, resume) in monitors {
        let (metrics, shutdown) = (Arc::clone(&metrics), shutdown.clone());
        tasks.spawn(async move {
            let r = crate::monitor::run(spec, pool, metrics, resume, shutdown).await;
            ("monitor", r)
        });
    }
    tracing::info!(
        addr = %bound,
        monitors = monitor_count,
        token = loaded.admin_token_source.is_some(),
        rule_sets = rules.names().count(),
        "admin API listening on http://{bound}"
    );

    // SIGHUP and `POST /api/reload` (through `applier.next()`) take the
    // same path: one reload at a time, here, where the listeners live.
    let mut failure = None;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                // The outcome is logged by `apply`.
                let _ = applier.apply(&mut listeners).await;
            }
            Some(reply) = applier.next() => {
                let r = applier.apply(&mut listeners).await;
                let _ = reply.send(r);
            }
            Some(joined) = listeners.join_next() => {
                if let Some(e) = listeners.joined(joined) {
                    failure = Some(e);
                    break;
                }
            }
            Some(joined) = tasks.join_next() => {
                failure = Some(task_failure(joined));
                break;
            }
        }
    }
    shutdown.cancel();
    // Reloads asked for from now on are refused.
    drop(applier);

    let grace = loaded.config.shutdown_timeout;
    let drained = tokio::time::timeout(grace, async {
        while let Some(joined) = tasks.join_next().await {
            if let (task, Err(message)) = flatten(joined) {
                tracing::warn!(task, %message, "task ended with an error during shutdown");
            }
        }
        listeners.drain().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            timeout = %humantime::format_duration(grace),
            "tasks still running after shutdown_timeout; aborting them"
        );
        tasks.shutdown().await;
        listeners.abort().await;
    }
    // The egress pools' last bench changes (up to the listeners' drain).
    for (name, journal) in journals {
        journal.flush(name, state.store.clone()).await;
    }
    stop_pools(&egress_pools).await;
    match failure {
        Some(e) => Err(e),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

/// Starts the `[pools.*]`, registering each for `/probe` and the metrics,
/// and re-applies the benches saved in `store` (see
/// [`crate::pools::Pool::restore_benches`]); the journal of each pool's
/// bench changes, for a saver to write, is added to `journals`. What was
/// started is left in `started` even on error, for the caller to shut
/// down. A saved bench that cannot be read stops start-up
/// ([`ServeError::Store`], naming the record). Blocks on the store.
async fn start_pools(
    specs: &[crate::config::PoolSpec],
    metrics: &Arc<Metrics>,
    store: &store::Store,
    registry: &mut Pools,
    started: &mut Vec<(String, addrpool::Pool)>,
    journals: &mut Vec<(String, Arc<crate::pools::BenchJournal>)>,
) -> Result<(), ServeError> {
    for spec in specs {
        let section = format!("pools.{}", spec.name);
        let err = |message: String| ServeError::Pool {
            section: section.clone(),
            message,
        };
        let source = spec.source.build().map_err(err)?;
        let mut options = spec.options.clone();
        let (name, m) = (spec.name.clone(), Arc::clone(metrics));
        let events = registry.events().clone();
        // addrpool logs the transition itself; count and publish it here.
        options.transitions = Some(Arc::new(
            move |ip: std::net::IpAddr, t: health::Transition| {
                crate::pools::announce_transition(&m, &events, &name, &ip.to_string(), &t);
            },
        ));
        let pool = addrpool::Pool::start(source, spec.assigner.clone(), options)
            .await
            .map_err(|e| err(e.to_string()))?;
        started.push((spec.name.clone(), pool.clone()));
        let registered = registry
            .register_egress(&spec.name, pool.clone())
            .map_err(|e| err(e.to_string()))?;
        let now = (std::time::Instant::now(), std::time::SystemTime::now());
        let restored = registered
            .restore_benches(store, now.0, now.1)
            .map_err(ServeError::Store)?;
        if let Some((journal, _)) = restored {
            journals.push((spec.name.clone(), journal));
        }
        metrics.add_pool(&spec.name);
        metrics.add_egress_pool(&spec.name, pool.clone());
        tracing::info!(
            pool = %spec.name,
            assigner = ?spec.assigner,
            held = pool.held().len(),
            "egress pool started"
        );
    }
    Ok(())
}

/// The kind of a listener section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `[egress.<name>]`: a forward proxy.
    Egress,
    /// `[l4.<name>]`: a TCP balancer.
    L4,
    /// `[ingress.<name>]`: a reverse proxy.
    Ingress,
}

impl Kind {
    /// The section's name in the config file (`egress`, `l4`, `ingress`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Egress => "egress",
            Kind::L4 => "l4",
            Kind::Ingress => "ingress",
        }
    }
}

/// A data-plane listener `serve` runs until it is stopped.
enum Listener {
    Egress(gateway::egress::EgressProxy),
    L4(gateway::l4::L4Proxy),
    Ingress(gateway::ingress::IngressProxy),
}

/// What listeners are started with, at start-up and at reload.
pub(crate) struct ListenerEnv {
    guards: Arc<Guards>,
    metrics: Arc<Metrics>,
    /// The running egress pools.
    pools: Vec<(String, addrpool::Pool)>,
    /// Their specs as started (the addresses an egress listener must not
    /// reach as destinations).
    pool_specs: Vec<crate::config::PoolSpec>,
    /// The daemon's token; each listener runs under a child of it.
    shutdown: CancellationToken,
    /// The route tables of the running ingresses (the admin API's view).
    tables: crate::admin::IngressTables,
}

/// A listener bound (accepting into its backlog) but not served yet.
/// Dropping it closes the socket: nothing else was changed.
pub(crate) struct Prepared {
    kind: Kind,
    name: String,
    listener: Listener,
    /// The configured address (port 0: any free port).
    listen: SocketAddr,
    /// The log line telling where it listens.
    announce: String,
    writer: Option<crate::accessfile::Writer>,
    /// (rule set, socket) when the set asks for a kernel socket filter.
    filter: Option<(String, std::os::fd::OwnedFd)>,
    /// An ingress's route table.
    table: Option<gateway::ingress::RouteTable>,
    /// Its section of the config file, as JSON (to compare at reload).
    pub(crate) section: serde_json::Value,
    /// An egress listener's users (read from a file the config names, so
    /// they change without the section changing).
    pub(crate) users: HashMap<String, String>,
}

impl Prepared {
    /// `kind.name`, as in reports.
    pub(crate) fn key(&self) -> String {
        format!("{}.{}", self.kind.as_str(), self.name)
    }
}

impl ListenerEnv {
    /// Whether egress pool `name` runs.
    pub(crate) fn has_pool(&self, name: &str) -> bool {
        self.pools.iter().any(|(n, _)| n == name)
    }

    /// Whether rule set `name` runs.
    pub(crate) fn has_rule_set(&self, name: &str) -> bool {
        self.guards.rules.get(name).is_some()
    }

    /// Binds an `[egress.*]` listener on its pool. `probe`: first check
    /// that nothing else holds the address (see [`bind_listener`]).
    pub(crate) async fn prepare_egress(
        &self,
        spec: &crate::config::EgressSpec,
        probe: bool,
    ) -> Result<Prepared, ServeError> {
        let section = format!("egress.{}", spec.name);
        let err = |message: String| ServeError::Pool {
            section: section.clone(),
            message,
        };
        let pool = self
            .pools
            .iter()
            .find(|(n, _)| *n == spec.pool)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| err(format!("pool `{}` is not running", spec.pool)))?;
        let mut options = spec.options(pool);
        options.guard = self.guards.guard(spec.rules.as_deref(), true);
        let (sink, writer) = access_log(&section, spec.access_log.as_deref()).await?;
        options.access_log = sink;
        // The proxy's own addresses are no destination (unless allowed):
        // its pool's range and its listener.
        let own = own_addresses(&self.pool_specs, &spec.pool, spec.listen);
        if !own.is_empty() {
            options
                .policy
                .update(|p| p.deny.extend(own.iter().copied()));
        }
        let socket = bind_listener(&format!("{section}.listen"), spec.listen, probe)?;
        let proxy = gateway::egress::EgressProxy::from_listener(socket, options)
            .map_err(|e| err(e.to_string()))?;
        let addr = proxy.local_addr();
        let filter = self
            .guards
            .listener_filter(&section, spec.rules.as_deref(), proxy.socket());
        Ok(Prepared {
            kind: Kind::Egress,
            name: spec.name.clone(),
            listener: Listener::Egress(proxy),
            listen: spec.listen,
            announce: format!(
                "{section}: proxy (HTTP, CONNECT, SOCKS5) listening on {addr} (pool {}, {} users)",
                spec.pool,
                spec.users.len()
            ),
            writer,
            filter,
            table: None,
            section: serde_json::Value::Null,
            users: spec.users.clone(),
        })
    }

    /// Binds an `[l4.*]` balancer (its pool is registered by the caller).
    pub(crate) async fn prepare_l4(
        &self,
        spec: &crate::config::L4Spec,
        probe: bool,
    ) -> Result<Prepared, ServeError> {
        let section = format!("l4.{}", spec.name);
        let mut options = spec.options.clone();
        let (name, m, ev) = (
            spec.name.clone(),
            Arc::clone(&self.metrics),
            self.guards.events.clone(),
        );
        options.transitions = Some(Arc::new(move |up: SocketAddr, t: health::Transition| {
            crate::pools::announce_transition(&m, &ev, &name, &up.to_string(), &t);
        }));
        options.guard = self.guards.guard(spec.rules.as_deref(), false);
        let key = format!("{section}.listen");
        let socket = bind_listener(&key, spec.listen, probe)?;
        let proxy =
            gateway::l4::L4Proxy::from_listener(socket, options).map_err(|e| ServeError::Pool {
                section: section.clone(),
                message: e.to_string(),
            })?;
        let addr = proxy.local_addr().map_err(|source| ServeError::Bind {
            key,
            addr: spec.listen,
            source,
        })?;
        let filter = self
            .guards
            .listener_filter(&section, spec.rules.as_deref(), proxy.socket());
        Ok(Prepared {
            kind: Kind::L4,
            name: spec.name.clone(),
            listener: Listener::L4(proxy),
            listen: spec.listen,
            announce: format!(
                "{section}: TCP balancer listening on {addr} ({} upstreams, {})",
                spec.options.upstreams.len(),
                spec.options.strategy
            ),
            writer: None,
            filter,
            table: None,
            section: serde_json::Value::Null,
            users: HashMap::new(),
        })
    }

    /// Binds an `[ingress.*]` reverse proxy on `table`, or on a new route
    /// table holding the configured routes.
    pub(crate) async fn prepare_ingress(
        &self,
        spec: crate::config::IngressSpec,
        table: Option<gateway::ingress::RouteTable>,
        probe: bool,
    ) -> Result<Prepared, ServeError> {
        use gateway::ingress as gi;
        let section = format!("ingress.{}", spec.name);
        let err = |message: String| ServeError::Pool {
            section: section.clone(),
            message,
        };
        let table = match table {
            Some(t) => t,
            None => {
                let (name, m, ev) = (
                    spec.name.clone(),
                    Arc::clone(&self.metrics),
                    self.guards.events.clone(),
                );
                let sink = move |route: &str, backend: &str, t: health::Transition| {
                    let pool = format!("{name}/{route}");
                    crate::pools::log_transition(&pool, "backend", backend, &t);
                    crate::pools::announce_transition(&m, &ev, &pool, backend, &t);
                };
                let table = gi::RouteTable::new(gi::RouteTableOptions {
                    transitions: Some(Arc::new(sink)),
                    ..gi::RouteTableOptions::default()
                })
                .map_err(|e| err(e.to_string()))?;
                for r in spec.routes {
                    table.upsert_route(r).map_err(|e| err(e.to_string()))?;
                }
                table
            }
        };
        let mut options = spec.options;
        let (sink, writer) = access_log(&section, spec.access_log.as_deref()).await?;
        options.access_log = sink;
        options.routes = table.clone();
        options.guard = self.guards.guard(spec.rules.as_deref(), true);
        let listen = options.listen;
        let tls = options.tls.is_some();
        let socket = bind_listener(&format!("{section}.listen"), listen, probe)?;
        let proxy =
            gi::IngressProxy::from_listener(socket, options).map_err(|e| err(e.to_string()))?;
        let addr = proxy.local_addr();
        let filter = self
            .guards
            .listener_filter(&section, spec.rules.as_deref(), proxy.socket());
        Ok(Prepared {
            kind: Kind::Ingress,
            name: spec.name,
            listener: Listener::Ingress(proxy),
            listen,
            announce: format!(
                "{section}: reverse proxy listening on {addr} (configured {listen}{})",
                if tls { ", TLS" } else { "" }
            ),
            writer,
            filter,
            table: Some(table),
            section: serde_json::Value::Null,
            users: HashMap::new(),
        })
    }
}

/// Opens access log `path` (if any) of listener `section`: the proxies' sink and
/// the writer to run as a task.
async fn access_log(
    section: &str,
    path: Option<&std::path::Path>,
) -> Result<
    (
        Option<Arc<dyn gateway::access::AccessLog>>,
        Option<crate::accessfile::Writer>,
    ),
    ServeError,
> {
    let Some(path) = path else {
        return Ok((None, None));
    };
    let (sink, writer) = crate::accessfile::open(path)
        .await
        .map_err(|e| ServeError::Pool {
            section: section.to_owned(),
            message: format!("access_log {}: {e}", path.display()),
        })?;
    Ok((Some(Arc::new(sink)), Some(writer)))
}

/// Binds a listening socket on `addr` (`key` names it in errors) with
/// `SO_REUSEPORT`, so that a reload can bind the replacement of a
/// listener on the same address while the old one still accepts (see
/// [`crate::reload`]). With `probe` and a fixed port, a plain bind (no
/// `SO_REUSEPORT`) is tried first and released: it fails if anything
/// listens there, even another process's `SO_REUSEPORT` socket, so a
/// busy port is refused as before instead of being shared.
fn bind_listener(
    key: &str,
    addr: SocketAddr,
    probe: bool,
) -> Result<std::net::TcpListener, ServeError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = |reuse_port: bool| -> std::io::Result<Socket> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        if reuse_port {
            s.set_reuse_port(true)?;
        }
        s.bind(&addr.into())?;
        Ok(s)
    };
    let bound = (|| {
        if probe && addr.port() != 0 {
            drop(socket(false)?);
        }
        let s = socket(true)?;
        s.listen(1024)?;
        s.set_nonblocking(true)?;
        Ok(std::net::TcpListener::from(s))
    })();
    bound.map_err(|source| ServeError::Bind {
        key: key.to_owned(),
        addr,
        source,
    })
}

/// A listener that runs.
pub(crate) struct Running {
    /// Its kind.
    pub(crate) kind: Kind,
    /// Its name.
    pub(crate) name: String,
    /// Its section of the config file, as JSON.
    pub(crate) section: serde_json::Value,
    /// An egress listener's users.
    pub(crate) users: HashMap<String, String>,
    /// The configured address.
    pub(crate) listen: SocketAddr,
    /// An ingress's route table (shared with the admin API and the
    /// registry; a replacement keeps it).
    pub(crate) table: Option<gateway::ingress::RouteTable>,
    token: CancellationToken,
    id: tokio::task::Id,
}

/// The running data-plane listeners: one task each, under a child token
/// of the daemon's, kept by `kind.name`. Only the serve loop touches it
/// (at start-up, at reload and at shutdown).
pub(crate) struct Listeners {
    env: ListenerEnv,
    running: BTreeMap<String, Running>,
    /// Listeners told to stop, draining, by task (their key, for logs).
    stopping: HashMap<tokio::task::Id, String>,
    tasks: JoinSet<()>,
}

impl Listeners {
    fn new(env: ListenerEnv) -> Listeners {
        Listeners {
            env,
            running: BTreeMap::new(),
            stopping: HashMap::new(),
            tasks: JoinSet::new(),
        }
    }

    /// What listeners are started with.
    pub(crate) fn env(&self) -> &ListenerEnv {
        &self.env
    }

    /// Records that listener `key` now runs `section` (its routes were
    /// reloaded in place), so the next reload compares with it.
    pub(crate) fn set_section(&mut self, key: &str, section: serde_json::Value) {
        if let Some(r) = self.running.get_mut(key) {
            r.section = section;
        }
    }

    /// The running listeners by `kind.name`.
    pub(crate) fn running(&self) -> &BTreeMap<String, Running> {
        &self.running
    }

    /// Serves the `prepared` listeners (each replacing a running one of
    /// the same key, which is told to stop once its replacement serves),
    /// then stops the listeners `stop`: they stop accepting at once and
    /// their open connections finish (up to their `drain_timeout`).
    /// Returns the keys started and stopped. Cannot fail: every socket is
    /// bound already.
    pub(crate) fn commit(
        &mut self,
        prepared: Vec<Prepared>,
        stop: Vec<String>,
    ) -> (Vec<String>, Vec<String>) {
        let (mut started, mut stopped) = (Vec::new(), Vec::new());
        for p in prepared {
            let key = p.key();
            let old = self.running.remove(&key);
            self.spawn(p);
            if let Some(old) = old {
                // The replacement took over its metrics already.
                old.token.cancel();
                tracing::info!(listener = %key, "{key}: replaced; the old listener stopped accepting, its open connections drain");
                self.stopping.insert(old.id, format!("{key} (replaced)"));
                stopped.push(key.clone());
            }
            started.push(key);
        }
        for key in stop {
            if let Some(old) = self.running.remove(&key) {
                old.token.cancel();
                self.env
                    .metrics
                    .remove_listener(old.kind.as_str(), &old.name);
                if old.kind == Kind::Ingress {
                    self.env.tables.remove(&old.name);
                }
                tracing::info!(listener = %key, "{key}: stopped accepting; open connections drain");
                self.stopping.insert(old.id, key.clone());
                stopped.push(key);
            }
        }
        (started, stopped)
    }

    fn spawn(&mut self, p: Prepared) {
        let key = p.key();
        let token = self.env.shutdown.child_token();
        let m = &self.env.metrics;
        match &p.listener {
            Listener::Egress(proxy) => m.add_egress_listener(&p.name, proxy.metrics()),
            Listener::L4(proxy) => m.add_l4(&p.name, proxy.metrics()),
            Listener::Ingress(proxy) => m.add_ingress(&p.name, proxy.metrics()),
        }
        if let Some(t) = &p.table {
            self.env.tables.insert(&p.name, t.clone());
        }
        let filter = p.filter.and_then(|(set, fd)| {
            let policy = self.env.guards.policy(&set)?;
            tracing::info!(listener = %key, set = %set, "kernel socket filter on");
            Some((gateway::guard::KernelFilter::new(policy), fd))
        });
        tracing::info!(listener = %key, "{}", p.announce);
        let task = self.tasks.spawn(run_listener(
            key.clone(),
            p.listener,
            token.clone(),
            p.writer,
            filter,
        ));
        self.running.insert(
            key,
            Running {
                kind: p.kind,
                name: p.name,
                section: p.section,
                users: p.users,
                listen: p.listen,
                table: p.table,
                token,
                id: task.id(),
            },
        );
    }

    /// The next listener task to end (`None` when there is none).
    async fn join_next(&mut self) -> Option<Result<(tokio::task::Id, ()), tokio::task::JoinError>> {
        self.tasks.join_next_with_id().await
    }

    /// A listener task ended: fine if it was told to stop, else a
    /// failure of the daemon.
    fn joined(
        &mut self,
        joined: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    ) -> Option<ServeError> {
        let (id, panic) = match joined {
            Ok((id, ())) => (id, None),
            Err(e) => (e.id(), Some(e.to_string())),
        };
        if let Some(key) = self.stopping.remove(&id) {
            if let Some(p) = panic {
                tracing::warn!(listener = %key, "listener task failed while draining: {p}");
            } else {
                tracing::info!(listener = %key, "{key}: stopped (drained)");
            }
            return None;
        }
        let key = self
            .running
            .iter()
            .find(|(_, r)| r.id == id)
            .map(|(k, _)| k.clone())
            .unwrap_or_default();
        self.running.remove(&key);
        Some(ServeError::Task {
            task: "listener",
            message: match panic {
                Some(p) => format!("{key}: {p}"),
                None => format!("{key}: stopped unexpectedly"),
            },
        })
    }

    /// Waits for every listener task (after shutdown was signalled).
    async fn drain(&mut self) {
        while let Some(joined) = self.tasks.join_next().await {
            if let Err(e) = joined {
                tracing::warn!(error = %e, "listener task failed during shutdown");
            }
        }
    }

    /// Aborts the listener tasks left.
    async fn abort(&mut self) {
        self.tasks.shutdown().await;
    }
}

/// One listener's task: serves until `token` is cancelled (then stops
/// accepting and drains), with its access-log writer (flushed once the
/// proxy is done) and its kernel socket filter (dropped, with its copy of
/// the socket, as soon as the listener stops, so the port closes at once).
async fn run_listener(
    key: String,
    listener: Listener,
    token: CancellationToken,
    writer: Option<crate::accessfile::Writer>,
    filter: Option<(gateway::guard::KernelFilter, std::os::fd::OwnedFd)>,
) {
    let done = CancellationToken::new();
    let serve = async {
        let stop = token.clone().cancelled_owned();
        match listener {
            Listener::Egress(p) => p.serve(stop).await,
            Listener::L4(p) => p.serve(stop).await,
            Listener::Ingress(p) => p.serve(stop).await,
        }
        done.cancel();
    };
    let write = async {
        if let Some(w) = writer {
            w.run(done.clone()).await;
        }
    };
    let watch = async {
        if let Some((f, fd)) = filter {
            f.watch(
                &fd,
                std::time::Duration::from_millis(250),
                token.cancelled(),
            )
            .await;
        }
    };
    tokio::join!(serve, write, watch);
    tracing::debug!(listener = %key, "listener stopped");
}

/// Builds the accept-time guards of listeners and remembers which
/// listeners want a kernel socket filter.
struct Guards {
    rules: Arc<crate::rules::RuleSets>,
    bans: tokio::sync::mpsc::UnboundedSender<(String, gateway::guard::Ban)>,
    /// With a Redis store: offenses and bans for the fleet's counts.
    offenses: Option<tokio::sync::mpsc::Sender<crate::fleet::Tally>>,
    metrics: Arc<Metrics>,
    events: crate::events::Events,
    /// (listener, set, socket) of the admin listener when its set has
    /// `kernel_filter` (data-plane listeners keep their own).
    filters: std::sync::Mutex<Vec<(String, String, std::os::fd::OwnedFd)>>,
}

impl Guards {
    /// The guard of a listener using set `set` (everyone in without one).
    fn guard(&self, set: Option<&str>, per_request: bool) -> Arc<gateway::guard::Guard> {
        let Some(set) = set else {
            return Arc::new(gateway::guard::Guard::default());
        };
        let name: Arc<str> = set.into();
        let feed = self.offenses.clone().map(|tx| {
            let (name, metrics) = (Arc::clone(&name), Arc::clone(&self.metrics));
            let feed: gateway::guard::OffenseFeed = Arc::new(move |key, offense| {
                // Full: the fleet's count misses it, this instance's has it.
                let t = crate::fleet::Tally::Offense(Arc::clone(&name), key, offense);
                if let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) = tx.try_send(t) {
                    metrics.count_fleet_offenses("dropped", 1);
                }
            });
            feed
        });
        let saved = self.ban_hook(set);
        let hook: gateway::guard::BanHook = match self.offenses.clone() {
            None => saved,
            // A ban on this instance's own count spends the fleet's count.
            Some(tx) => Arc::new(move |b: &gateway::guard::Ban| {
                saved(b);
                let _ = tx.try_send(crate::fleet::Tally::Banned(Arc::clone(&name), b.rule));
            }),
        };
        // The config checked that the set exists (and a reload that the
        // set runs).
        self.rules
            .guard(set, per_request, hook, feed)
            .unwrap_or_else(|| Arc::new(gateway::guard::Guard::default()))
    }

    /// What a ban in set `set` does besides the policy entry: saved to the
    /// store (and so shared with a fleet), published as an event.
    fn ban_hook(&self, set: &str) -> gateway::guard::BanHook {
        let (tx, name, ev) = (self.bans.clone(), set.to_owned(), self.events.clone());
        Arc::new(move |b: &gateway::guard::Ban| {
            let _ = tx.send((name.clone(), *b));
            ev.publish(
                "banned",
                serde_json::json!({
                    "set": name,
                    "rule": b.rule.to_string(),
                    "seconds": b.duration.as_secs_f64(),
                    "times": b.times,
                    "offense": b.offense.map(|o| o.name()),
                }),
            );
        })
    }

    fn policy(&self, set: &str) -> Option<Arc<iprules::Shared<iprules::Policy>>> {
        self.rules.get(set).cloned()
    }

    /// (the set, the socket) to attach a kernel filter to, when the
    /// listener has a rule set that asks for one.
    fn listener_filter(
        &self,
        listener: &str,
        rules: Option<&str>,
        fd: std::io::Result<std::os::fd::OwnedFd>,
    ) -> Option<(String, std::os::fd::OwnedFd)> {
        let set = rules?;
        self.filter_fd(listener, set, fd)
            .map(|fd| (set.to_owned(), fd))
    }

    /// The socket to attach a kernel filter to, if set `set` asks for one.
    fn filter_fd(
        &self,
        listener: &str,
        set: &str,
        fd: std::io::Result<std::os::fd::OwnedFd>,
    ) -> Option<std::os::fd::OwnedFd> {
        if !self.rules.kernel_filter(set) {
            return None;
        }
        match fd {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(listener, error = %e, "no kernel socket filter: cannot duplicate the socket");
                None
            }
        }
    }

    fn filter_listener(&self, listener: &str, set: &str, l: &TcpListener) {
        use std::os::fd::AsFd;
        if let Some(fd) = self.filter_fd(listener, set, l.as_fd().try_clone_to_owned()) {
            self.filters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((listener.to_owned(), set.to_owned(), fd));
        }
    }
}

/// Writes bans to the store as they happen, until shutdown. A ban the
/// store refused (a shared Redis that is down) is kept and written again
/// every [`BAN_RETRY`], in order, until it is saved or has ended: it is
/// enforced here all along, and reaches the fleet once the store is back.
async fn save_bans(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(String, gateway::guard::Ban)>,
    store: store::Store,
    shutdown: CancellationToken,
) {
    let mut pending: std::collections::VecDeque<store::Ban> = std::collections::VecDeque::new();
    let mut failing = false;
    let mut retry = tokio::time::interval(BAN_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            next = rx.recv() => match next {
                Some((set, ban)) => {
                    let (now, wall) = (std::time::Instant::now(), std::time::SystemTime::now());
                    pending.push_back(store::Ban {
                        set,
                        network: ban.rule.to_string(),
                        until_unix_ms: crate::rules::unix_ms(ban.until, now, wall),
                        times: ban.times,
                        reason: ban.offense.map_or("restored", |o| o.name()).to_owned(),
                    });
                }
                None => return,
            },
            _ = retry.tick(), if !pending.is_empty() => {}
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        pending.retain(|b| b.until_unix_ms > now_ms);
        let mut saved = 0usize;
        while let Some(record) = pending.front().cloned() {
            let st = store.clone();
            let error = match tokio::task::spawn_blocking(move || st.put_ban(&record)).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            match error {
                None => {
                    pending.pop_front();
                    saved += 1;
                }
                Some(e) => {
                    if !failing {
                        tracing::error!(
                            error = %e,
                            pending = pending.len(),
                            "ban not saved: enforced here, written again every {:?} until the store takes it",
                            BAN_RETRY
                        );
                    }
                    failing = true;
                    break;
                }
            }
        }
        if failing && pending.is_empty() {
            failing = false;
            tracing::info!(saved, "bans saved: the store is back");
        }
    }
}

/// How often bans the store refused are written again.
const BAN_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// The addresses an egress listener must not connect to as destinations:
/// the source range of its pool (CIDR, range or list) and its own listen
/// address when it is a specific one.
fn own_addresses(
    pools: &[crate::config::PoolSpec],
    pool: &str,
    listen: SocketAddr,
) -> Vec<iprules::Rule> {
    let mut out = Vec::new();
    if let Some(p) = pools.iter().find(|p| p.name == pool)
        && let crate::config::SourceSpec::Text(t) = &p.source
    {
        out.extend(
            t.split(',')
                .filter_map(|r| r.trim().parse::<iprules::Rule>().ok()),
        );
    }
    if !listen.ip().is_unspecified() {
        out.push(iprules::Rule::from(listen.ip()));
    }
    out
}

/// Shuts the egress pools down: netlink pools remove the addresses they
/// added, freebind pools the routes they added.
async fn stop_pools(pools: &[(String, addrpool::Pool)]) {
    for (name, pool) in pools {
        pool.shutdown().await;
        tracing::debug!(pool = %name, "egress pool stopped");
    }
}

fn flatten(joined: Result<TaskResult, tokio::task::JoinError>) -> TaskResult {
    match joined {
        Ok(r) => r,
        Err(e) => ("", Err(format!("task panicked or was cancelled: {e}"))),
    }
}

fn task_failure(joined: Result<TaskResult, tokio::task::JoinError>) -> ServeError {
    let (task, r) = flatten(joined);
    let task = if task.is_empty() { "task" } else { task };
    ServeError::Task {
        task,
        message: match r {
            Ok(()) => "stopped unexpectedly".into(),
            Err(e) => e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_addresses_are_the_pool_range_and_the_listener() {
        let text = "[pools.v6]\nsource = \"2001:db8:1::/64\"\nassigner = \"freebind\"\n\
                    [pools.list]\nsource = \"192.0.2.1, 192.0.2.9\"\n";
        let l = crate::config::load_str(
            std::path::Path::new("/nonexistent/t.toml"),
            text,
            crate::config::Scope::Full,
        )
        .unwrap();
        let own = own_addresses(&l.pools, "v6", "0.0.0.0:3128".parse().unwrap());
        assert_eq!(
            own,
            vec!["2001:db8:1::/64".parse::<iprules::Rule>().unwrap()]
        );
        let own = own_addresses(&l.pools, "list", "198.51.100.7:3128".parse().unwrap());
        let shown: Vec<String> = own.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["192.0.2.1", "192.0.2.9", "198.51.100.7"]);
        // Through the default policy and these, none is reachable.
        let mut p = gateway::egress::default_policy();
        p.deny
            .extend(own_addresses(&l.pools, "v6", "0.0.0.0:1".parse().unwrap()));
        assert!(!p.allows("2001:db8:1::5".parse().unwrap()));
    }
}
