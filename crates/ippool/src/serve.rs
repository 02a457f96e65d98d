//! `ippool serve`: the runtime, the listeners and graceful shutdown.
//!
//! Every long-running task is owned by one [`JoinSet`]; a
//! [`CancellationToken`] tells them all to stop on SIGINT or SIGTERM, and
//! they get `shutdown_timeout` to finish before being aborted. Later
//! sections (egress proxy, ingress proxy, …) add their tasks to the same
//! set. Each `[monitor.<name>]` runs as one task of the set (see
//! [`crate::monitor`]) feeding its pool in the shared [`Pools`] registry.
//! Each `[pools.<name>]` is an [`addrpool::Pool`] started before the
//! listeners and shut down after them (so a netlink pool removes the
//! addresses it added, even when start-up fails half-way); each
//! `[egress.<name>]` is a [`gateway::egress::EgressProxy`] task.

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
    serde_json::to_string(&loaded.config).map_err(ServeError::Render)?;
    let shutdown = CancellationToken::new();

    // The state store: runtime rules come back before anything listens.
    std::fs::create_dir_all(&loaded.state_dir).map_err(|source| ServeError::StateDir {
        path: loaded.state_dir.clone(),
        source,
    })?;
    let dir = loaded.state_dir.clone();
    let store = tokio::task::spawn_blocking(move || store::Store::open_dir(&dir))
        .await
        .map_err(|e| ServeError::Task {
            task: "store",
            message: e.to_string(),
        })?
        .map_err(ServeError::Store)?;
    let saved = store.rules().map_err(ServeError::Store)?;
    let restored = loaded.rules.restore(saved, &store);
    let saved = store.bans().map_err(ServeError::Store)?;
    let bans = loaded.rules.restore_bans(saved, &store);
    tracing::info!(store = ?store, runtime_rules = restored, bans, "state store open");
    let rules = Arc::new(loaded.rules);
    let (ban_tx, ban_rx) = tokio::sync::mpsc::unbounded_channel();
    let events = crate::events::Events::default();
    let guards = Guards {
        rules: Arc::clone(&rules),
        bans: ban_tx,
        events: events.clone(),
        writers: std::sync::Mutex::new(Vec::new()),
        filters: std::sync::Mutex::new(Vec::new()),
    };
    let metrics = Arc::new(Metrics::new(&rules));

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
        metrics.add_pool(&spec.name);
        metrics.add_monitor(&spec.name);
        monitors.push((spec, pool));
    }
    // Egress pools, then their listeners. Whatever fails, the pools
    // started so far are shut down (netlink addresses removed) first.
    let mut egress_pools: Vec<(String, addrpool::Pool)> = Vec::new();
    let mut proxies = Vec::new();
    let mut started = start_egress(
        &loaded.pools,
        &loaded.egress,
        &metrics,
        &guards,
        &mut pools,
        &mut egress_pools,
        &mut proxies,
    )
    .await;
    if started.is_ok() {
        started = start_l4(&loaded.l4, &metrics, &guards, &mut pools, &mut proxies).await;
    }
    let mut tables = Vec::new();
    if started.is_ok() {
        match start_ingress(
            std::mem::take(&mut loaded.ingress),
            &metrics,
            &guards,
            &mut proxies,
        )
        .await
        {
            Ok(t) => tables = t,
            Err(e) => started = Err(e),
        }
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
                    "registry: registration channel listening on ws://{}",
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
        stop_pools(&egress_pools).await;
        return Err(e);
    }
    let pools = Arc::new(pools);
    pools.refresh_metrics(&metrics, std::time::Instant::now());

    let reloader = Arc::new(crate::reload::Reloader::new(
        loaded.path.clone(),
        loaded.config.clone(),
        Arc::clone(&rules),
        store.clone(),
        registry.as_ref().map(|r| r.registry.clone()),
    ));
    let state = AdminState {
        reloader: Arc::clone(&reloader),
        rules: Arc::clone(&rules),
        metrics: Arc::clone(&metrics),
        pools: Arc::clone(&pools),
        token: loaded.admin_token.map(Arc::new),
        store,
        events: events.clone(),
        shutdown: shutdown.clone(),
        registry: registry.as_ref().map(|r| r.registry.clone()),
        ingress: tables.clone(),
    };

    let want = *loaded.config.admin.listen.get_ref();
    let bound = match TcpListener::bind(want).await {
        Ok(l) => l.local_addr().map(|a| (l, a)),
        Err(e) => Err(e),
    };
    let (listener, bound) = match bound {
        Ok(b) => b,
        Err(source) => {
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
    let writers = std::mem::take(&mut *guards.writers.lock().unwrap_or_else(|p| p.into_inner()));
    for w in writers {
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            w.run(shutdown).await;
            ("access log", Ok(()))
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
    for (name, proxy) in proxies {
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            match proxy {
                Listener::Egress(p) => p.serve(shutdown.cancelled_owned()).await,
                Listener::L4(p) => p.serve(shutdown.cancelled_owned()).await,
                Listener::Ingress(p) => p.serve(shutdown.cancelled_owned()).await,
            }
            tracing::debug!(listener = %name, "listener stopped");
            ("listener", Ok(()))
        });
    }
    if let Some(r) = registry {
        let crate::backends::Started { registry, server } = r;
        let s2 = shutdown.clone();
        tasks.spawn(async move {
            server.serve(s2.cancelled_owned()).await;
            ("registry", Ok(()))
        });
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
    for (spec, pool) in monitors {
        let (metrics, shutdown) = (Arc::clone(&metrics), shutdown.clone());
        tasks.spawn(async move {
            let r = crate::monitor::run(spec, pool, metrics, shutdown).await;
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

    let mut failure = None;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = sighup.recv() => {
                let r = Arc::clone(&reloader);
                match tokio::task::spawn_blocking(move || r.reload()).await {
                    Ok(Ok(report)) => tracing::info!(
                        reloaded = ?report.reloaded,
                        restart_required = ?report.restart_required,
                        "SIGHUP: config reloaded"
                    ),
                    Ok(Err(e)) => tracing::warn!("SIGHUP: reload refused, the running config stays: {e}"),
                    Err(e) => tracing::warn!("SIGHUP: reload failed: {e}"),
                }
            }
            Some(joined) = tasks.join_next() => {
                failure = Some(task_failure(joined));
                break;
            }
        }
    }
    shutdown.cancel();

    let grace = loaded.config.shutdown_timeout;
    let drained = tokio::time::timeout(grace, async {
        while let Some(joined) = tasks.join_next().await {
            if let (task, Err(message)) = flatten(joined) {
                tracing::warn!(task, %message, "task ended with an error during shutdown");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            timeout = %humantime::format_duration(grace),
            "tasks still running after shutdown_timeout; aborting them"
        );
        tasks.shutdown().await;
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

/// Starts the `[pools.*]` and binds the `[egress.*]` listeners, registering
/// each pool for `/probe` and the metrics. What was started is left in
/// `started` and `proxies` even on error, for the caller to shut down.
async fn start_egress(
    specs: &[crate::config::PoolSpec],
    listeners: &[crate::config::EgressSpec],
    metrics: &Arc<Metrics>,
    guards: &Guards,
    registry: &mut Pools,
    started: &mut Vec<(String, addrpool::Pool)>,
    proxies: &mut Vec<(String, Listener)>,
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
        // addrpool logs the transition itself; count it here.
        options.transitions = Some(Arc::new(
            move |_: std::net::IpAddr, t: health::Transition| {
                m.count_transition(&name, crate::pools::transition_kind(&t));
            },
        ));
        let pool = addrpool::Pool::start(source, spec.assigner.clone(), options)
            .await
            .map_err(|e| err(e.to_string()))?;
        started.push((spec.name.clone(), pool.clone()));
        registry
            .register_egress(&spec.name, pool.clone())
            .map_err(|e| err(e.to_string()))?;
        metrics.add_pool(&spec.name);
        metrics.add_egress_pool(&spec.name, pool.clone());
        tracing::info!(
            pool = %spec.name,
            assigner = ?spec.assigner,
            held = pool.held().len(),
            "egress pool started"
        );
    }
    for spec in listeners {
        let pool = started
            .iter()
            .find(|(n, _)| *n == spec.pool)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| ServeError::Pool {
                section: format!("egress.{}", spec.name),
                message: format!("pool `{}` did not start", spec.pool),
            })?;
        let mut options = spec.options(pool);
        options.guard = guards.guard(spec.rules.as_deref(), true);
        if let Some(p) = &spec.access_log {
            options.access_log = Some(
                guards
                    .access_log(format!("egress.{}", spec.name), p)
                    .await?,
            );
        }
        // The proxy's own addresses are no destination (unless allowed):
        // its pool's range and its listener.
        let own = own_addresses(specs, &spec.pool, spec.listen);
        if !own.is_empty() {
            options
                .policy
                .update(|p| p.deny.extend(own.iter().copied()));
        }
        let proxy = gateway::egress::EgressProxy::bind(options)
            .await
            .map_err(|e| match e {
                gateway::egress::EgressError::Bind { addr, source } => ServeError::Bind {
                    key: format!("egress.{}.listen", spec.name),
                    addr,
                    source,
                },
                other => ServeError::Pool {
                    section: format!("egress.{}", spec.name),
                    message: other.to_string(),
                },
            })?;
        let addr = proxy.local_addr();
        metrics.add_egress_listener(&spec.name, proxy.metrics());
        if let Some(set) = &spec.rules {
            guards.filter_socket(&format!("egress.{}", spec.name), set, proxy.socket());
        }
        tracing::info!(
            listener = %spec.name,
            pool = %spec.pool,
            users = spec.users.len(),
            "egress.{}: proxy (HTTP, CONNECT, SOCKS5) listening on {addr}",
            spec.name
        );
        proxies.push((spec.name.clone(), Listener::Egress(proxy)));
    }
    Ok(())
}

/// Binds the `[l4.*]` balancers and registers their upstreams.
async fn start_l4(
    specs: &[crate::config::L4Spec],
    metrics: &Arc<Metrics>,
    guards: &Guards,
    registry: &mut Pools,
    proxies: &mut Vec<(String, Listener)>,
) -> Result<(), ServeError> {
    for spec in specs {
        let mut options = spec.options.clone();
        let (name, m, ev) = (
            spec.name.clone(),
            Arc::clone(metrics),
            guards.events.clone(),
        );
        options.transitions = Some(Arc::new(move |up: SocketAddr, t: health::Transition| {
            m.count_transition(&name, crate::pools::transition_kind(&t));
            crate::pools::publish_transition(&ev, &name, &up.to_string(), &t);
        }));
        options.guard = guards.guard(spec.rules.as_deref(), false);
        let proxy = gateway::l4::L4Proxy::bind(spec.listen, options)
            .await
            .map_err(|e| match e {
                gateway::l4::L4Error::Bind { addr, source } => ServeError::Bind {
                    key: format!("l4.{}.listen", spec.name),
                    addr,
                    source,
                },
                other => ServeError::Pool {
                    section: format!("l4.{}", spec.name),
                    message: other.to_string(),
                },
            })?;
        let addr = proxy.local_addr().map_err(|source| ServeError::Bind {
            key: format!("l4.{}.listen", spec.name),
            addr: spec.listen,
            source,
        })?;
        registry
            .register_l4(&spec.name, proxy.metrics())
            .map_err(|e| ServeError::Pool {
                section: format!("l4.{}", spec.name),
                message: e.to_string(),
            })?;
        metrics.add_pool(&spec.name);
        metrics.add_l4(&spec.name, proxy.metrics());
        if let Some(set) = &spec.rules {
            guards.filter_socket(&format!("l4.{}", spec.name), set, proxy.socket());
        }
        tracing::info!(
            listener = %spec.name,
            upstreams = spec.options.upstreams.len(),
            strategy = %spec.options.strategy,
            "l4.{}: TCP balancer listening on {addr}",
            spec.name
        );
        proxies.push((spec.name.clone(), Listener::L4(proxy)));
    }
    Ok(())
}

/// A data-plane listener `serve` runs until shutdown.
enum Listener {
    Egress(gateway::egress::EgressProxy),
    L4(gateway::l4::L4Proxy),
    Ingress(gateway::ingress::IngressProxy),
}

/// Binds the `[ingress.*]` reverse proxies with their live route tables;
/// returns the tables by ingress name (registered backends join one).
async fn start_ingress(
    specs: Vec<crate::config::IngressSpec>,
    metrics: &Arc<Metrics>,
    guards: &Guards,
    proxies: &mut Vec<(String, Listener)>,
) -> Result<Vec<(String, gateway::ingress::RouteTable)>, ServeError> {
    use gateway::ingress as gi;
    let mut tables = Vec::new();
    for spec in specs {
        let section = format!("ingress.{}", spec.name);
        let err = |message: String| ServeError::Pool {
            section: section.clone(),
            message,
        };
        let (name, m, ev) = (
            spec.name.clone(),
            Arc::clone(metrics),
            guards.events.clone(),
        );
        let sink = move |route: &str, backend: &str, t: health::Transition| {
            let pool = format!("{name}/{route}");
            m.count_transition(&pool, crate::pools::transition_kind(&t));
            crate::pools::log_transition(&pool, "backend", backend, &t);
            crate::pools::publish_transition(&ev, &pool, backend, &t);
        };
        let table = gi::RouteTable::new(gi::RouteTableOptions {
            transitions: Some(Arc::new(sink)),
            ..gi::RouteTableOptions::default()
        })
        .map_err(|e| err(e.to_string()))?;
        for r in spec.routes {
            table.upsert_route(r).map_err(|e| err(e.to_string()))?;
        }
        let mut options = spec.options;
        if let Some(p) = &spec.access_log {
            options.access_log = Some(
                guards
                    .access_log(format!("ingress.{}", spec.name), p)
                    .await?,
            );
        }
        options.routes = table.clone();
        options.guard = guards.guard(spec.rules.as_deref(), true);
        let listen = options.listen;
        let tls = options.tls.is_some();
        let proxy = gi::IngressProxy::bind(options).await.map_err(|e| match e {
            gi::IngressError::Bind { addr, source } => ServeError::Bind {
                key: format!("ingress.{}.listen", spec.name),
                addr,
                source,
            },
            other => err(other.to_string()),
        })?;
        let addr = proxy.local_addr();
        metrics.add_ingress(&spec.name, proxy.metrics());
        tracing::info!(
            listener = %spec.name,
            tls,
            "ingress.{}: reverse proxy listening on {addr} (configured {listen})",
            spec.name
        );
        tables.push((spec.name.clone(), table));
        proxies.push((spec.name, Listener::Ingress(proxy)));
    }
    Ok(tables)
}

/// Builds the accept-time guards of listeners and remembers which
/// listeners want a kernel socket filter.
struct Guards {
    rules: Arc<crate::rules::RuleSets>,
    bans: tokio::sync::mpsc::UnboundedSender<(String, gateway::guard::Ban)>,
    events: crate::events::Events,
    /// Access-log writers to run as tasks.
    writers: std::sync::Mutex<Vec<crate::accessfile::Writer>>,
    /// (listener, set, socket) of listeners whose set has `kernel_filter`.
    filters: std::sync::Mutex<Vec<(String, String, std::os::fd::OwnedFd)>>,
}

impl Guards {
    /// The guard of a listener using set `set` (everyone in without one).
    fn guard(&self, set: Option<&str>, per_request: bool) -> Arc<gateway::guard::Guard> {
        let Some(set) = set else {
            return Arc::new(gateway::guard::Guard::default());
        };
        let (tx, name, ev) = (self.bans.clone(), set.to_owned(), self.events.clone());
        let hook: gateway::guard::BanHook = Arc::new(move |b: &gateway::guard::Ban| {
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
        });
        // The config checked that the set exists.
        self.rules
            .guard(set, per_request, hook)
            .unwrap_or_else(|| Arc::new(gateway::guard::Guard::default()))
    }

    /// An access-log sink for `path`, its writer kept to run as a task.
    async fn access_log(
        &self,
        key: String,
        path: &std::path::Path,
    ) -> Result<Arc<dyn gateway::access::AccessLog>, ServeError> {
        let (sink, writer) = crate::accessfile::open(path)
            .await
            .map_err(|e| ServeError::Pool {
                section: key,
                message: format!("access_log {}: {e}", path.display()),
            })?;
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(writer);
        Ok(Arc::new(sink))
    }

    fn policy(&self, set: &str) -> Option<Arc<iprules::Shared<iprules::Policy>>> {
        self.rules.get(set).cloned()
    }

    fn filter_socket(&self, listener: &str, set: &str, fd: std::io::Result<std::os::fd::OwnedFd>) {
        if !self.rules.kernel_filter(set) {
            return;
        }
        match fd {
            Ok(fd) => self
                .filters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((listener.to_owned(), set.to_owned(), fd)),
            Err(e) => {
                tracing::warn!(listener, error = %e, "no kernel socket filter: cannot duplicate the socket")
            }
        }
    }

    fn filter_listener(&self, listener: &str, set: &str, l: &TcpListener) {
        use std::os::fd::AsFd;
        self.filter_socket(listener, set, l.as_fd().try_clone_to_owned());
    }
}

/// Writes bans to the store as they happen, until shutdown.
async fn save_bans(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(String, gateway::guard::Ban)>,
    store: store::Store,
    shutdown: CancellationToken,
) {
    loop {
        let (set, ban) = tokio::select! {
            () = shutdown.cancelled() => return,
            next = rx.recv() => match next {
                Some(b) => b,
                None => return,
            },
        };
        let (now, wall) = (std::time::Instant::now(), std::time::SystemTime::now());
        let record = store::Ban {
            set,
            network: ban.rule.to_string(),
            until_unix_ms: crate::rules::unix_ms(ban.until, now, wall),
            times: ban.times,
            reason: ban.offense.map_or("restored", |o| o.name()).to_owned(),
        };
        let st = store.clone();
        match tokio::task::spawn_blocking(move || st.put_ban(&record)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "ban not saved: it ends with this process"),
            Err(e) => tracing::error!(error = %e, "ban not saved"),
        }
    }
}

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
