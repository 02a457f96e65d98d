//! The route table: routes, their backends, and the snapshot the request
//! path reads.
//!
//! Writers (config load, the registry, the admin API) change a private
//! configuration under a mutex, compile it into an immutable [`Compiled`]
//! snapshot and publish it with one pointer swap ([`iprules::Shared`]).
//! Requests read the current snapshot without a lock. Per-backend state
//! (in-flight counts, latency, idle connections, health flags) lives in
//! [`BackendRt`]s shared by successive snapshots, so a change keeps it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use health::{
    Classifier, HealthOptions, InvalidOption, Observation, Outcome, Permit, PoolStats, State,
    Tracker, Transition, Unavailable, Verdict,
};
use http::StatusCode;
use iprules::Shared;

use super::backend::{BackendRt, get};
use super::backend_tls::BackendTls;
use super::balance::{Balance, Mask, fnv, schedule};
use super::check::HealthCheck;
use crate::tasks::Tasks;

/// The largest weight a backend may have.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// Which requests a route takes: a host (exact, `*.example.com`, or any)
/// and a path prefix.
///
/// The host picks a virtual host first (exact name, then the longest
/// matching wildcard, then routes for any host); among its routes the
/// longest matching path prefix wins. A request whose host matches but
/// whose path matches none of that host's prefixes gets 404 (it does not
/// fall through to wildcard or any-host routes), as in nginx.
///
/// A prefix matches whole path segments: `/api` matches `/api`, `/api/`
/// and `/api/v1`, not `/apis`; `/api/` matches `/api/v1` but not `/api`.
/// Paths are compared as sent (not decoded or normalised); the query is
/// not part of the path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteMatch {
    /// `example.com`, `*.example.com` (any subdomain, at any depth, not
    /// `example.com` itself) or `None` (any host). Compared without the
    /// port and case-insensitively.
    pub host: Option<String>,
    /// Starts with `/`. `/` matches every path.
    pub path_prefix: String,
}

impl RouteMatch {
    /// Requests for `host` (exact or `*.` wildcard) under `path_prefix`.
    pub fn new(host: Option<&str>, path_prefix: &str) -> RouteMatch {
        RouteMatch {
            host: host.map(str::to_owned),
            path_prefix: path_prefix.to_owned(),
        }
    }

    /// Every request for `host`.
    pub fn host(host: &str) -> RouteMatch {
        RouteMatch::new(Some(host), "/")
    }

    /// Requests for any host under `path_prefix`.
    pub fn path(path_prefix: &str) -> RouteMatch {
        RouteMatch::new(None, path_prefix)
    }
}

impl fmt::Display for RouteMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}",
            self.host.as_deref().unwrap_or("*"),
            self.path_prefix
        )
    }
}

/// One backend of a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Unique in the table (a registration id, or a name from the config).
    pub id: String,
    /// Where requests go (HTTP/1.1).
    pub addr: SocketAddr,
    /// Relative share of requests, `0..=`[`MAX_WEIGHT`]; 0 takes no new
    /// requests. Default 1.
    pub weight: u32,
}

impl Backend {
    /// A backend of weight 1.
    pub fn new(id: impl Into<String>, addr: SocketAddr) -> Backend {
        Backend {
            id: id.into(),
            addr,
            weight: 1,
        }
    }

    /// Sets the weight.
    pub fn with_weight(mut self, weight: u32) -> Backend {
        self.weight = weight;
        self
    }
}

/// A route: what it matches, how it balances, and its backends.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Unique in the table.
    pub name: String,
    /// What it takes (at least one); no two routes may share a host and
    /// prefix.
    pub matches: Vec<RouteMatch>,
    /// How a backend is picked. Default: round robin.
    pub balance: Balance,
    /// Static backends (more can be added at run time).
    pub backends: Vec<Backend>,
    /// Active HTTP checks of the backends. Default: none.
    pub health_check: Option<HealthCheck>,
    /// Further attempts, each on another backend, for an idempotent
    /// request (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) whose connect
    /// failed or timed out. Nothing is retried once the request was sent.
    /// Default: 2.
    pub retries: u32,
    /// The status answered when no backend can take a request (none
    /// configured, all benched, down or draining). Default: 503.
    pub no_backend_status: StatusCode,
    /// Reach the backends over TLS (HTTPS), checking their certificates.
    /// Default: plain HTTP.
    pub backend_tls: Option<BackendTls>,
    /// Speak HTTP/2 to the backends (prior knowledge on plain TCP, ALPN
    /// `h2` over TLS), all of a backend's requests multiplexed on one
    /// connection, trailers passed both ways (gRPC). WebSocket upgrades
    /// still go over HTTP/1.1. Default: HTTP/1.1.
    pub backend_http2: bool,
}

impl Route {
    /// A route named `name` taking `matches`, with the defaults.
    pub fn new(name: impl Into<String>, matches: RouteMatch) -> Route {
        Route {
            name: name.into(),
            matches: vec![matches],
            balance: Balance::RoundRobin,
            backends: Vec::new(),
            health_check: None,
            retries: 2,
            no_backend_status: StatusCode::SERVICE_UNAVAILABLE,
            backend_tls: None,
            backend_http2: false,
        }
    }

    /// Adds a match.
    pub fn with_match(mut self, m: RouteMatch) -> Route {
        self.matches.push(m);
        self
    }

    /// Adds a backend.
    pub fn with_backend(mut self, b: Backend) -> Route {
        self.backends.push(b);
        self
    }

    /// Sets the balancing.
    pub fn with_balance(mut self, balance: Balance) -> Route {
        self.balance = balance;
        self
    }

    /// Sets the active health check.
    pub fn with_health_check(mut self, check: HealthCheck) -> Route {
        self.health_check = Some(check);
        self
    }

    /// Reaches the backends over TLS.
    pub fn with_backend_tls(mut self, tls: BackendTls) -> Route {
        self.backend_tls = Some(tls);
        self
    }

    /// Speaks HTTP/2 to the backends.
    pub fn with_backend_http2(mut self) -> Route {
        self.backend_http2 = true;
        self
    }
}

/// Receives every passive health transition of every backend (benched,
/// restored, benching suppressed), e.g. to publish events. Implemented for
/// any `Fn(&str, &str, Transition) + Send + Sync` (route name, backend
/// id, transition). Called on the request path after the lock is
/// released: keep it short.
pub trait HealthSink: Send + Sync + 'static {
    /// One transition of one backend.
    fn transition(&self, route: &str, backend: &str, transition: Transition);
}

impl<F> HealthSink for F
where
    F: Fn(&str, &str, Transition) + Send + Sync + 'static,
{
    fn transition(&self, route: &str, backend: &str, transition: Transition) {
        self(route, backend, transition)
    }
}

/// Options of a [`RouteTable`]: passive health.
#[derive(Clone)]
pub struct RouteTableOptions {
    /// Passive health of each route's backends (one [`health::Tracker`]
    /// per route). Default: benched on the 3rd consecutive failure, 10 s
    /// cooldown doubling up to 5 minutes, one probe at a time, at most
    /// 50 % of a route's backends benched (a route of one backend never
    /// benches it; set 100 to allow it).
    pub health: HealthOptions,
    /// Which outcomes count against a backend. Default: every 5xx status,
    /// connect errors, timeouts, and a connection closed without a
    /// response.
    pub classifier: Classifier,
    /// Receives every passive health transition. Default: none.
    pub transitions: Option<Arc<dyn HealthSink>>,
}

impl Default for RouteTableOptions {
    fn default() -> RouteTableOptions {
        RouteTableOptions {
            health: HealthOptions {
                cooldown: Duration::from_secs(10),
                max_cooldown: Duration::from_secs(300),
                ..HealthOptions::default()
            },
            classifier: default_classifier(),
            transitions: None,
        }
    }
}

impl fmt::Debug for RouteTableOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteTableOptions")
            .field("health", &self.health)
            .field("classifier", &self.classifier)
            .field("transitions", &self.transitions.as_ref().map(|_| "<sink>"))
            .finish()
    }
}

/// The ingress classifier: every 5xx is a failure of the backend.
pub fn default_classifier() -> Classifier {
    Classifier::default()
        .with_blocked_statuses(500..=599)
        .unwrap_or_default()
}

/// Why a change to the route table was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// No route of that name.
    #[error("no route named `{0}`")]
    UnknownRoute(String),
    /// No backend of that id.
    #[error("no backend with id `{0}`")]
    UnknownBackend(String),
    /// The backend id is already used by another route.
    #[error("backend `{id}` belongs to route `{route}`")]
    BackendInOtherRoute {
        /// The backend.
        id: String,
        /// The route that has it.
        route: String,
    },
    /// Two routes take the same host and prefix.
    #[error("`{matches}` is already taken by route `{route}`")]
    DuplicateMatch {
        /// The host and prefix.
        matches: String,
        /// The route that takes it.
        route: String,
    },
    /// An invalid route setting.
    #[error("route `{route}`: {reason}")]
    InvalidRoute {
        /// The route.
        route: String,
        /// Why.
        reason: String,
    },
    /// An invalid backend.
    #[error("backend `{id}`: {reason}")]
    InvalidBackend {
        /// The backend.
        id: String,
        /// Why.
        reason: String,
    },
    /// Invalid health options.
    #[error(transparent)]
    Health(#[from] InvalidOption),
}

// ------------------------------------------------------------ run time

/// Why a backend could not take a request.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Admit {
    Benched,
    ProbationFull,
    CheckDown,
}

/// Why no backend of a route could take a request.
#[derive(Debug, Clone)]
pub(crate) struct NoBackend {
    route: Arc<str>,
    pub(crate) configured: usize,
    pub(crate) pickable: usize,
    pub(crate) tried: usize,
    benched: usize,
    probation_full: usize,
    check_down: usize,
}

impl NoBackend {
    pub(crate) fn new(route: &RouteRt, tried: &Mask) -> NoBackend {
        NoBackend {
            route: route.name.clone(),
            configured: route.all.len(),
            pickable: route.members.len(),
            tried: (0..route.members.len()).filter(|&i| tried.has(i)).count(),
            benched: 0,
            probation_full: 0,
            check_down: 0,
        }
    }

    pub(crate) fn count(&mut self, why: Admit) {
        match why {
            Admit::Benched => self.benched += 1,
            Admit::ProbationFull => self.probation_full += 1,
            Admit::CheckDown => self.check_down += 1,
        }
    }
}

impl fmt::Display for NoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.configured == 0 {
            return write!(f, "route `{}` has no backends", self.route);
        }
        write!(
            f,
            "no backend available for route `{}` ({} configured",
            self.route, self.configured
        )?;
        let out = self.configured - self.pickable;
        for (n, what) in [
            (out, "draining or weight 0"),
            (self.benched, "benched after failures"),
            (self.check_down, "failing health checks"),
            (self.probation_full, "on probation with a probe in flight"),
            (self.tried, "already tried"),
        ] {
            if n > 0 {
                write!(f, ", {n} {what}")?;
            }
        }
        f.write_str(")")
    }
}

/// A route's state that outlives snapshots: passive health and the
/// round-robin counter.
pub(crate) struct RouteState {
    name: Arc<str>,
    tracker: Mutex<Tracker<Arc<str>>>,
    classifier: Classifier,
    /// Consecutive-failure health: successes of a clean backend need not
    /// be recorded.
    fast: bool,
    pub(crate) rr: AtomicUsize,
    sink: Option<Arc<dyn HealthSink>>,
}

/// The tracker's clock: tokio's, as a `std` instant.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl RouteState {
    fn new(name: &str, opts: &RouteTableOptions) -> Result<RouteState, InvalidOption> {
        Ok(RouteState {
            name: name.into(),
            tracker: Mutex::new(Tracker::with_classifier(
                opts.health.clone(),
                opts.classifier.clone(),
            )?),
            classifier: opts.classifier.clone(),
            fast: matches!(opts.health.strategy, health::Strategy::Consecutive { .. }),
            rr: AtomicUsize::new(0),
            sink: opts.transitions.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Tracker<Arc<str>>> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A health permit for a backend that is not clean.
    pub(crate) fn acquire(&self, b: &BackendRt) -> Result<Permit<Arc<str>>, Admit> {
        match self.lock().acquire(&b.id, now()) {
            Ok(p) => Ok(p),
            Err(Unavailable::ProbationFull { .. }) => Err(Admit::ProbationFull),
            Err(_) => Err(Admit::Benched),
        }
    }

    /// Records the outcome of one request to `b`.
    pub(crate) fn record(
        &self,
        b: &BackendRt,
        permit: Option<Permit<Arc<str>>>,
        outcome: Outcome,
        latency: Option<Duration>,
    ) {
        let failed = self.classifier.classify(&outcome) == Verdict::Failure;
        if failed {
            super::backend::inc(&b.stats.failures);
        }
        if permit.is_none() && !failed && self.fast {
            // A success of a clean backend changes nothing.
            return;
        }
        let mut obs = Observation::new(outcome);
        if let Some(l) = latency {
            obs = obs.with_latency(l);
        }
        let at = now();
        let change = {
            let mut t = self.lock();
            let change = match permit {
                Some(p) => t.finish(p, obs, at),
                None => t.record(&b.id, obs, at),
            }
            .ok()
            .flatten();
            let clean = self.fast
                && t.snapshot_key(&b.id, at, 0)
                    .is_some_and(|k| k.state == State::Available && k.consecutive_failures == 0);
            b.clean.store(clean, Ordering::Relaxed);
            change
        };
        if let Some(change) = change {
            self.publish(b, change);
        }
    }

    fn publish(&self, b: &BackendRt, change: Transition) {
        let (route, backend, addr) = (&*self.name, &*b.id, b.addr);
        match change {
            Transition::Benched { cause, cooldown } => {
                tracing::warn!(route, backend, %addr, ?cause, ?cooldown, "backend benched")
            }
            Transition::BenchSuppressed { cause } => tracing::warn!(
                route,
                backend,
                %addr,
                ?cause,
                "backend not benched: max_benched_percent of the route is out of service"
            ),
            Transition::Restored => tracing::info!(route, backend, %addr, "backend restored"),
        }
        if let Some(sink) = &self.sink {
            sink.transition(route, backend, change);
        }
    }
}

/// A backend as a route's snapshot sees it.
pub(crate) struct Member {
    pub(crate) rt: Arc<BackendRt>,
    pub(crate) weight: u32,
    /// Hash of the id (rendezvous hashing).
    pub(crate) key: u64,
}

/// One route in a snapshot.
pub(crate) struct RouteRt {
    pub(crate) name: Arc<str>,
    pub(crate) state: Arc<RouteState>,
    pub(crate) balance: Balance,
    pub(crate) retries: u32,
    pub(crate) no_backend_status: StatusCode,
    pub(crate) check: Option<HealthCheck>,
    /// The backends that may be picked (weight > 0, not draining).
    pub(crate) members: Box<[Member]>,
    /// Smooth weighted round robin over `members`.
    pub(crate) schedule: Box<[u32]>,
    /// Every weight is the same.
    pub(crate) uniform: bool,
    /// Every backend, draining ones included.
    pub(crate) all: Box<[Arc<BackendRt>]>,
    /// Its backends speak HTTP/2 (the hyper path serves its requests).
    pub(crate) backend_http2: bool,
}

#[derive(Clone, Default)]
struct Vhost {
    /// Longest prefix first.
    paths: Vec<(Box<str>, Arc<RouteRt>)>,
}

impl Vhost {
    fn find(&self, path: &str) -> Option<&Arc<RouteRt>> {
        self.paths
            .iter()
            .find(|(p, _)| prefix_matches(p, path))
            .map(|(_, r)| r)
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes()[prefix.len()] == b'/')
}

/// An immutable snapshot of the table, as requests read it.
#[derive(Clone, Default)]
pub(crate) struct Compiled {
    exact: HashMap<Box<str>, Vhost>,
    /// `(".example.com", …)`, longest suffix first.
    wildcard: Vec<(Box<str>, Vhost)>,
    any: Option<Vhost>,
    pub(crate) routes: Vec<Arc<RouteRt>>,
}

impl Compiled {
    /// The route for a request to `host` (lowercase, no port) at `path`.
    pub(crate) fn find(&self, host: &str, path: &str) -> Option<&Arc<RouteRt>> {
        let vhost = match self.exact.get(host) {
            Some(v) => v,
            None => match self
                .wildcard
                .iter()
                .find(|(s, _)| host.len() > s.len() && host.ends_with(&**s))
            {
                Some((_, v)) => v,
                None => self.any.as_ref()?,
            },
        };
        vhost.find(path)
    }
}

// ------------------------------------------------------------ configuration

struct BackendCfg {
    rt: Arc<BackendRt>,
    weight: u32,
    /// The drain generation, while draining.
    drain: Option<u64>,
    /// Held out of rotation by an operator ([`RouteTable::hold`]): takes
    /// nothing new and stays until [`RouteTable::undrain`]; an update of
    /// the backend (a re-registration) keeps it held.
    held: bool,
    /// Its predecessors under other TLS settings with requests or tunnels
    /// still in flight: they finish on their own, and are closed with it.
    retired: Vec<Arc<BackendRt>>,
}

impl BackendCfg {
    /// Replaces the runtime with `rt`, the old one's work in flight left
    /// to finish (different connection settings, same backend).
    fn retire_for(&mut self, rt: Arc<BackendRt>) {
        let old = std::mem::replace(&mut self.rt, rt);
        old.retire();
        // Out of the table: takes nothing new (and a drain waits for it).
        old.draining.store(true, Ordering::Release);
        self.retired.retain(|r| r.in_flight() > 0);
        if old.in_flight() > 0 {
            self.retired.push(old);
        }
    }

    /// Closes it and its predecessors' work in flight (removed).
    fn kill(&self) {
        self.rt.kill();
        for r in &self.retired {
            r.kill();
        }
    }
}

/// A backend's runtime state with `route`'s connection settings.
fn new_backend(
    route: &Route,
    state: &RouteState,
    id: Arc<str>,
    addr: SocketAddr,
) -> Arc<BackendRt> {
    Arc::new(BackendRt::new(
        id,
        addr,
        state.fast,
        route.backend_tls.clone(),
        route.backend_http2,
    ))
}

struct RouteCfg {
    /// Settings; `backends` is kept empty (they are in `backends` below).
    route: Route,
    state: Arc<RouteState>,
    backends: Vec<BackendCfg>,
}

#[derive(Default)]
struct Config {
    routes: BTreeMap<String, RouteCfg>,
    /// Backend id → route name.
    owners: HashMap<String, String>,
    next_drain: u64,
    /// Ids held out of rotation ([`RouteTable::hold`]); a backend added
    /// with one of them starts held.
    holds: HashSet<String>,
}

impl Config {
    fn backend_mut(&mut self, id: &str) -> Result<(&mut RouteCfg, usize), RouteError> {
        let route = self
            .owners
            .get(id)
            .ok_or_else(|| RouteError::UnknownBackend(id.to_owned()))?;
        let rc = self
            .routes
            .get_mut(route)
            .ok_or_else(|| RouteError::UnknownBackend(id.to_owned()))?;
        let i = rc
            .backends
            .iter()
            .position(|b| &*b.rt.id == id)
            .ok_or_else(|| RouteError::UnknownBackend(id.to_owned()))?;
        Ok((rc, i))
    }

    fn compile(&self) -> Compiled {
        let mut out = Compiled::default();
        for rc in self.routes.values() {
            let members: Box<[Member]> = rc
                .backends
                .iter()
                .filter(|b| b.weight > 0 && b.drain.is_none() && !b.held)
                .map(|b| Member {
                    rt: b.rt.clone(),
                    weight: b.weight,
                    key: fnv(b.rt.id.as_bytes()),
                })
                .collect();
            let weights: Vec<u32> = members.iter().map(|m| m.weight).collect();
            let rt = Arc::new(RouteRt {
                name: rc.state.name.clone(),
                state: rc.state.clone(),
                balance: rc.route.balance.clone(),
                retries: rc.route.retries,
                no_backend_status: rc.route.no_backend_status,
                check: rc.route.health_check.clone(),
                schedule: schedule(&weights).into(),
                uniform: weights.windows(2).all(|w| w[0] == w[1]),
                members,
                all: rc.backends.iter().map(|b| b.rt.clone()).collect(),
                backend_http2: rc.route.backend_http2,
            });
            for m in &rc.route.matches {
                let vhost = match m.host.as_deref() {
                    None => out.any.get_or_insert_with(Vhost::default),
                    Some(h) => match h.strip_prefix('*') {
                        Some(suffix) => {
                            match out.wildcard.iter().position(|(s, _)| **s == *suffix) {
                                Some(i) => &mut out.wildcard[i].1,
                                None => {
                                    out.wildcard.push((suffix.into(), Vhost::default()));
                                    &mut out.wildcard.last_mut().expect("just pushed").1
                                }
                            }
                        }
                        None => out.exact.entry(h.into()).or_default(),
                    },
                };
                vhost
                    .paths
                    .push((m.path_prefix.as_str().into(), rt.clone()));
            }
            out.routes.push(rt);
        }
        let by_len = |v: &mut Vhost| v.paths.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        out.exact.values_mut().for_each(by_len);
        out.wildcard.iter_mut().for_each(|(_, v)| by_len(v));
        out.any.iter_mut().for_each(by_len);
        out.wildcard.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        out
    }
}

/// Lowercases, drops a trailing dot; checks a route's host pattern.
fn normalize_host_pattern(h: &str) -> Result<String, String> {
    let h = h.trim_end_matches('.').to_ascii_lowercase();
    let name = h.strip_prefix("*.").unwrap_or(&h);
    if name.is_empty() {
        return Err("empty host".into());
    }
    if name.starts_with('[') {
        if name.ends_with(']')
            && name[1..name.len() - 1]
                .parse::<std::net::Ipv6Addr>()
                .is_ok()
        {
            return Ok(h);
        }
        return Err(format!("bad IPv6 host `{name}`"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        || name.contains("..")
    {
        return Err(format!(
            "bad host `{h}` (a name, `*.name` or `[IPv6]`, without port)"
        ));
    }
    Ok(h)
}

fn check_route(route: &mut Route) -> Result<(), RouteError> {
    let bad = |reason: String| RouteError::InvalidRoute {
        route: route.name.clone(),
        reason,
    };
    if route.name.is_empty() {
        return Err(bad("the name is empty".into()));
    }
    if route.matches.is_empty() {
        return Err(bad("no match (host and path prefix)".into()));
    }
    let mut matches = Vec::with_capacity(route.matches.len());
    for m in &route.matches {
        let host = match &m.host {
            Some(h) => Some(normalize_host_pattern(h).map_err(bad)?),
            None => None,
        };
        if !m.path_prefix.starts_with('/') {
            return Err(bad(format!(
                "path prefix `{}` does not start with `/`",
                m.path_prefix
            )));
        }
        let m = RouteMatch {
            host,
            path_prefix: m.path_prefix.clone(),
        };
        if matches.contains(&m) {
            return Err(bad(format!("`{m}` is listed twice")));
        }
        matches.push(m);
    }
    route.matches = matches;
    if !(route.no_backend_status.is_client_error() || route.no_backend_status.is_server_error()) {
        return Err(bad(format!(
            "no_backend_status {} is not a 4xx or 5xx",
            route.no_backend_status
        )));
    }
    if let Some(c) = &route.health_check {
        c.validate().map_err(|e| bad(e.to_string()))?;
    }
    Ok(())
}

fn check_backend(b: &Backend) -> Result<(), RouteError> {
    let bad = |reason: &str| RouteError::InvalidBackend {
        id: b.id.clone(),
        reason: reason.to_owned(),
    };
    if b.id.is_empty() {
        return Err(bad("the id is empty"));
    }
    if b.addr.ip().is_unspecified() {
        return Err(bad("the address is unspecified"));
    }
    if b.addr.port() == 0 {
        return Err(bad("the port is 0"));
    }
    if b.weight > MAX_WEIGHT {
        return Err(bad(&format!("weight {} is above {MAX_WEIGHT}", b.weight)));
    }
    Ok(())
}

// ------------------------------------------------------------ the handle

struct TableInner {
    live: Shared<Compiled>,
    config: Mutex<Config>,
    opts: RouteTableOptions,
    /// Upstream connection tasks.
    pub(crate) tasks: Tasks,
    /// A listener runs the active health checks.
    checker: AtomicBool,
}

/// The routes and backends of one or more ingress listeners, changeable
/// while they serve. Cloning gives another handle to the same table.
///
/// Requests read an immutable snapshot (one atomic pointer load, no
/// lock); each change builds a new snapshot and publishes it with a
/// pointer swap, so a writer never blocks a request. A backend keeps its
/// in-flight count, latency, idle connections and health across changes
/// as long as its id and address stay the same.
///
/// ```
/// use gateway::ingress::{Backend, Route, RouteMatch, RouteTable};
///
/// let table = RouteTable::default();
/// table.upsert_route(
///     Route::new("api", RouteMatch::new(Some("api.example.com"), "/v1"))
///         .with_backend(Backend::new("api-1", "10.0.0.1:8080".parse()?)),
/// )?;
/// // A backend registers ...
/// table.upsert_backend("api", Backend::new("api-2", "10.0.0.2:8080".parse()?).with_weight(2))?;
/// table.set_weight("api-1", 3)?;
/// assert_eq!(table.snapshot().routes[0].backends.len(), 2);
/// // ... and leaves: `drain` returns a future that waits for its
/// // requests (up to the timeout), then removes it.
/// let drained = table.drain("api-2", std::time::Duration::from_secs(30))?;
/// # drop(drained);
/// table.remove("api-1")?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct RouteTable {
    inner: Arc<TableInner>,
}

impl Default for RouteTable {
    /// An empty table with [`RouteTableOptions::default`].
    fn default() -> RouteTable {
        RouteTable::new(RouteTableOptions::default()).expect("the default options are valid")
    }
}

impl fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteTable")
            .field("routes", &self.inner.live.read(|c| c.routes.len()))
            .finish_non_exhaustive()
    }
}

/// How a [`RouteTable::drain`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every request finished; the backend was removed.
    Drained,
    /// The timeout passed with requests (or tunnels) still open: they
    /// were cut, and the backend removed.
    TimedOut {
        /// Requests and tunnels cut.
        cut: u64,
    },
    /// The backend was added again (same id) or removed meanwhile: the
    /// drain was abandoned and nothing more was done.
    Cancelled,
}

impl RouteTable {
    /// An empty table. Errors if the health options are invalid.
    pub fn new(opts: RouteTableOptions) -> Result<RouteTable, RouteError> {
        opts.health.validate()?;
        Ok(RouteTable {
            inner: Arc::new(TableInner {
                live: Shared::new(Compiled::default()),
                config: Mutex::new(Config::default()),
                opts,
                tasks: Tasks::default(),
                checker: AtomicBool::new(false),
            }),
        })
    }

    /// The options.
    pub fn options(&self) -> &RouteTableOptions {
        &self.inner.opts
    }

    fn config(&self) -> MutexGuard<'_, Config> {
        self.inner
            .config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, cfg: &Config) {
        self.inner.live.replace(cfg.compile());
    }

    /// The current snapshot.
    pub(crate) fn compiled(&self) -> Arc<Compiled> {
        self.inner.live.snapshot()
    }

    /// The route for a request to `host` (lowercase, no port) at `path`.
    pub(crate) fn find(&self, host: &str, path: &str) -> Option<Arc<RouteRt>> {
        self.inner.live.read(|c| c.find(host, path).cloned())
    }

    pub(crate) fn tasks(&self) -> &Tasks {
        &self.inner.tasks
    }

    /// Claims the right to run the active health checks (one listener
    /// of those sharing the table does); released by the guard.
    pub(crate) fn claim_checker(&self) -> Option<CheckerClaim> {
        self.inner
            .checker
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| CheckerClaim(self.clone()))
    }

    /// Adds a route, or changes one: its matches, balancing, checks,
    /// retries and status are replaced; the backends listed are added or
    /// updated (weight, or address: a new address starts afresh), and
    /// backends added earlier but not listed are kept (remove them with
    /// [`remove`](Self::remove)).
    pub fn upsert_route(&self, mut route: Route) -> Result<(), RouteError> {
        check_route(&mut route)?;
        let mut seen = std::collections::HashSet::new();
        for b in &route.backends {
            check_backend(b)?;
            if !seen.insert(b.id.as_str()) {
                return Err(RouteError::InvalidBackend {
                    id: b.id.clone(),
                    reason: "listed twice".into(),
                });
            }
        }
        let mut cfg = self.config();
        for (name, rc) in &cfg.routes {
            if *name == route.name {
                continue;
            }
            if let Some(m) = route.matches.iter().find(|m| rc.route.matches.contains(m)) {
                return Err(RouteError::DuplicateMatch {
                    matches: m.to_string(),
                    route: name.clone(),
                });
            }
        }
        for b in &route.backends {
            if let Some(owner) = cfg.owners.get(&b.id)
                && *owner != route.name
            {
                return Err(RouteError::BackendInOtherRoute {
                    id: b.id.clone(),
                    route: owner.clone(),
                });
            }
        }
        let backends = std::mem::take(&mut route.backends);
        if !cfg.routes.contains_key(&route.name) {
            let state = Arc::new(RouteState::new(&route.name, &self.inner.opts)?);
            cfg.routes.insert(
                route.name.clone(),
                RouteCfg {
                    route: route.clone(),
                    state,
                    backends: Vec::new(),
                },
            );
        } else if let Some(rc) = cfg.routes.get_mut(&route.name) {
            let tls_changed = rc.route.backend_tls != route.backend_tls
                || rc.route.backend_http2 != route.backend_http2;
            rc.route = route.clone();
            if tls_changed {
                // Plain and TLS connections do not mix: every backend
                // starts afresh (state, connections) with the new setting.
                // Requests in flight finish on their connections; a
                // backend being drained away keeps its own until it goes.
                for x in rc.backends.iter_mut().filter(|x| x.drain.is_none()) {
                    let mut t = rc.state.lock();
                    t.remove(&x.rt.id);
                    t.insert(x.rt.id.clone());
                    drop(t);
                    let rt = new_backend(&route, &rc.state, x.rt.id.clone(), x.rt.addr);
                    if x.held {
                        rt.draining.store(true, Ordering::Release);
                    }
                    x.retire_for(rt);
                }
            }
        }
        for b in backends {
            Self::put_backend(&mut cfg, &route.name, b);
        }
        self.publish(&cfg);
        Ok(())
    }

    /// Removes a route and its backends (their connections are closed).
    pub fn remove_route(&self, name: &str) -> Result<(), RouteError> {
        let mut cfg = self.config();
        let rc = cfg
            .routes
            .remove(name)
            .ok_or_else(|| RouteError::UnknownRoute(name.to_owned()))?;
        for b in &rc.backends {
            cfg.owners.remove(&*b.rt.id);
            b.kill();
        }
        self.publish(&cfg);
        Ok(())
    }

    /// Adds a backend to a route, or updates it (same id): a new weight
    /// applies at once; a new address replaces it (fresh state and
    /// connections); a draining backend stops draining.
    pub fn upsert_backend(&self, route: &str, backend: Backend) -> Result<(), RouteError> {
        check_backend(&backend)?;
        let mut cfg = self.config();
        if !cfg.routes.contains_key(route) {
            return Err(RouteError::UnknownRoute(route.to_owned()));
        }
        if let Some(owner) = cfg.owners.get(&backend.id)
            && owner != route
        {
            return Err(RouteError::BackendInOtherRoute {
                id: backend.id,
                route: owner.clone(),
            });
        }
        Self::put_backend(&mut cfg, route, backend);
        self.publish(&cfg);
        Ok(())
    }

    fn put_backend(cfg: &mut Config, route: &str, b: Backend) {
        let held = cfg.holds.contains(&b.id);
        cfg.owners.insert(b.id.clone(), route.to_owned());
        let Some(rc) = cfg.routes.get_mut(route) else {
            return;
        };
        match rc.backends.iter_mut().find(|x| *x.rt.id == *b.id) {
            // Same address and TLS setting (one drained away across a TLS
            // change keeps its old one): the same backend.
            Some(x)
                if x.rt.addr == b.addr
                    && x.rt.tls == rc.route.backend_tls
                    && x.rt.http2 == rc.route.backend_http2 =>
            {
                x.weight = b.weight;
                if x.drain.take().is_some() && !x.held {
                    x.rt.undrain();
                }
            }
            Some(x) => {
                let id: Arc<str> = b.id.as_str().into();
                let mut t = rc.state.lock();
                t.remove(&id);
                t.insert(id.clone());
                drop(t);
                let rt = new_backend(&rc.route, &rc.state, id, b.addr);
                if x.rt.addr == b.addr {
                    // Only the TLS setting differs (it was being drained
                    // away across a change): its work in flight finishes.
                    x.retire_for(rt);
                } else {
                    // Another address: another backend.
                    x.kill();
                    x.retired.clear();
                    x.rt = rt;
                }
                x.weight = b.weight;
                x.drain = None;
                if x.held {
                    x.rt.draining.store(true, Ordering::Release);
                }
            }
            None => {
                let id: Arc<str> = b.id.as_str().into();
                rc.state.lock().insert(id.clone());
                let rt = new_backend(&rc.route, &rc.state, id, b.addr);
                if held {
                    rt.draining.store(true, Ordering::Release);
                }
                rc.backends.push(BackendCfg {
                    rt,
                    weight: b.weight,
                    drain: None,
                    held,
                    retired: Vec::new(),
                });
            }
        }
    }

    /// Changes a backend's weight (`0..=`[`MAX_WEIGHT`]; 0 takes no new
    /// requests).
    pub fn set_weight(&self, id: &str, weight: u32) -> Result<(), RouteError> {
        if weight > MAX_WEIGHT {
            return Err(RouteError::InvalidBackend {
                id: id.to_owned(),
                reason: format!("weight {weight} is above {MAX_WEIGHT}"),
            });
        }
        let mut cfg = self.config();
        let (rc, i) = cfg.backend_mut(id)?;
        rc.backends[i].weight = weight;
        self.publish(&cfg);
        Ok(())
    }

    /// Removes a backend at once: no new requests; its idle connections,
    /// requests in flight and tunnels are closed. See
    /// [`drain`](Self::drain) for a graceful removal.
    pub fn remove(&self, id: &str) -> Result<(), RouteError> {
        let mut cfg = self.config();
        let (rc, i) = cfg.backend_mut(id)?;
        let b = rc.backends.remove(i);
        rc.state.lock().remove(&b.rt.id);
        cfg.owners.remove(id);
        self.publish(&cfg);
        drop(cfg);
        b.kill();
        Ok(())
    }

    /// Starts draining a backend: from now on it takes no new requests.
    /// The returned future (run it, e.g. in a task you own) waits until
    /// its requests and tunnels in flight are done or `timeout` passes,
    /// then cuts what is left and removes the backend. Dropping the future
    /// leaves the backend draining (it takes nothing) until it is removed
    /// or added again.
    pub fn drain(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<impl Future<Output = DrainOutcome> + Send + 'static, RouteError> {
        let (rt, generation, retired) = {
            let mut cfg = self.config();
            cfg.next_drain += 1;
            let generation = cfg.next_drain;
            let (rc, i) = cfg.backend_mut(id)?;
            let b = &mut rc.backends[i];
            b.drain = Some(generation);
            b.rt.draining.store(true, Ordering::Release);
            let rt = b.rt.clone();
            let retired = b.retired.clone();
            self.publish(&cfg);
            (rt, generation, retired)
        };
        let table = self.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        Ok(async move {
            let mut idle = rt.wait_idle(deadline).await;
            for r in &retired {
                idle &= r.wait_idle(deadline).await;
            }
            let cut = rt.in_flight() + retired.iter().map(|r| r.in_flight()).sum::<u64>();
            let removed = {
                let mut cfg = table.config();
                let ours = match cfg.backend_mut(&rt.id) {
                    Ok((rc, i)) => {
                        Arc::ptr_eq(&rc.backends[i].rt, &rt)
                            && rc.backends[i].drain == Some(generation)
                    }
                    Err(_) => false,
                };
                if ours {
                    let (rc, i) = cfg.backend_mut(&rt.id).expect("checked above");
                    let gone = rc.backends.remove(i);
                    rc.state.lock().remove(&rt.id);
                    cfg.owners.remove(&*rt.id);
                    table.publish(&cfg);
                    Some(gone)
                } else {
                    None
                }
            };
            let Some(gone) = removed else {
                return DrainOutcome::Cancelled;
            };
            gone.kill();
            tracing::info!(backend = &*rt.id, addr = %rt.addr, cut, "backend drained and removed");
            if idle {
                DrainOutcome::Drained
            } else {
                DrainOutcome::TimedOut { cut }
            }
        })
    }

    /// Holds a backend out of rotation, as an operator's drain (HAProxy's
    /// `set server … state drain`): it takes no new requests, those in
    /// flight finish, and it stays in the table (counters, health checks)
    /// until [`undrain`](Self::undrain). The hold belongs to the id: a
    /// backend that leaves and comes back under it (an agent restarting)
    /// is still held. A [`drain`](Self::drain) in progress stops short of
    /// removing it. Whether it was not already held.
    pub fn hold(&self, id: &str) -> Result<bool, RouteError> {
        let mut cfg = self.config();
        cfg.backend_mut(id)?;
        let changed = Self::hold_in(&mut cfg, id);
        self.publish(&cfg);
        Ok(changed)
    }

    /// Holds the id whether or not a backend has it now (restoring saved
    /// holds at start, before agents register). Whether it was not already
    /// held.
    pub fn hold_id(&self, id: &str) -> bool {
        let mut cfg = self.config();
        let changed = Self::hold_in(&mut cfg, id);
        self.publish(&cfg);
        changed
    }

    fn hold_in(cfg: &mut Config, id: &str) -> bool {
        let changed = cfg.holds.insert(id.to_owned());
        if let Ok((rc, i)) = cfg.backend_mut(id) {
            let b = &mut rc.backends[i];
            b.held = true;
            // A drain in progress sees another generation and leaves it be.
            b.drain = None;
            b.rt.draining.store(true, Ordering::Release);
        }
        changed
    }

    /// Puts a held or draining backend back in rotation; a drain in
    /// progress is cancelled. Whether it was held or draining.
    pub fn undrain(&self, id: &str) -> Result<bool, RouteError> {
        let mut cfg = self.config();
        let was_held = cfg.holds.remove(id);
        let changed = match cfg.backend_mut(id) {
            Ok((rc, i)) => {
                let b = &mut rc.backends[i];
                let changed = b.held || b.drain.is_some();
                b.held = false;
                b.drain = None;
                b.rt.undrain();
                changed
            }
            Err(_) if was_held => true,
            Err(e) => return Err(e),
        };
        self.publish(&cfg);
        Ok(changed)
    }

    /// The ids held by [`hold`](Self::hold) or [`hold_id`](Self::hold_id),
    /// sorted; present or not.
    pub fn holds(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.config().holds.iter().cloned().collect();
        ids.sort();
        ids
    }

    /// Closes every idle upstream connection.
    pub fn close_idle(&self) {
        for r in &self.compiled().routes {
            for b in r.all.iter() {
                b.clear_idle();
            }
        }
    }

    /// Drops idle connections older than `ttl` or closed.
    pub(crate) fn sweep_idle(&self, ttl: Duration) {
        for r in &self.compiled().routes {
            for b in r.all.iter() {
                b.sweep_idle(ttl);
            }
        }
    }

    /// Every route with its backends, their state and counters.
    pub fn snapshot(&self) -> RoutesSnapshot {
        let cfg = self.config();
        let at = now();
        let routes = cfg
            .routes
            .values()
            .map(|rc| {
                let t = rc.state.lock();
                let backends = rc
                    .backends
                    .iter()
                    .map(|b| {
                        let rt = &b.rt;
                        BackendSnapshot {
                            id: rt.id.to_string(),
                            addr: rt.addr,
                            weight: b.weight,
                            state: t.state(&rt.id, at).unwrap_or(State::Available),
                            check_up: rc
                                .route
                                .health_check
                                .as_ref()
                                .map(|_| rt.check_up.load(Ordering::Relaxed)),
                            draining: b.drain.is_some() || b.held,
                            held: b.held,
                            in_flight: rt.in_flight(),
                            requests_total: get(&rt.stats.requests),
                            failures_total: get(&rt.stats.failures),
                            connect_errors_total: get(&rt.stats.connect_errors),
                            timeouts_total: get(&rt.stats.timeouts),
                            connections_total: get(&rt.stats.connections),
                            checks_total: get(&rt.stats.checks),
                            checks_failed_total: get(&rt.stats.checks_failed),
                            idle_connections: rt.idle_count(),
                            latency_ewma: rt.ewma(),
                        }
                    })
                    .collect();
                RouteSnapshot {
                    name: rc.route.name.clone(),
                    matches: rc.route.matches.clone(),
                    balance: rc.route.balance.clone(),
                    health_check: rc.route.health_check.clone(),
                    retries: rc.route.retries,
                    no_backend_status: rc.route.no_backend_status,
                    backend_tls: rc.route.backend_tls.clone(),
                    backend_http2: rc.route.backend_http2,
                    health: t.stats(at),
                    backends,
                }
            })
            .collect();
        RoutesSnapshot { at, routes }
    }
}

/// Releases the active-check claim on drop.
pub(crate) struct CheckerClaim(RouteTable);

impl CheckerClaim {
    pub(crate) fn table(&self) -> &RouteTable {
        &self.0
    }
}

impl Drop for CheckerClaim {
    fn drop(&mut self) {
        self.0.inner.checker.store(false, Ordering::Release);
    }
}

/// Every route of a table, for an admin view.
#[derive(Debug, Clone)]
pub struct RoutesSnapshot {
    /// When it was taken (the clock of the health states).
    pub at: Instant,
    /// By name.
    pub routes: Vec<RouteSnapshot>,
}

impl RoutesSnapshot {
    /// The route named `name`.
    pub fn route(&self, name: &str) -> Option<&RouteSnapshot> {
        self.routes.iter().find(|r| r.name == name)
    }

    /// The backend `id`, in whichever route.
    pub fn backend(&self, id: &str) -> Option<&BackendSnapshot> {
        self.routes
            .iter()
            .flat_map(|r| r.backends.iter())
            .find(|b| b.id == id)
    }
}

/// One route and its backends.
#[derive(Debug, Clone)]
pub struct RouteSnapshot {
    /// Its name.
    pub name: String,
    /// What it takes.
    pub matches: Vec<RouteMatch>,
    /// How it balances.
    pub balance: Balance,
    /// Its active checks.
    pub health_check: Option<HealthCheck>,
    /// Retries of idempotent requests.
    pub retries: u32,
    /// The status when no backend can take a request.
    pub no_backend_status: StatusCode,
    /// How its backends are reached over TLS (`None`: plain HTTP).
    pub backend_tls: Option<BackendTls>,
    /// Its backends are spoken to in HTTP/2.
    pub backend_http2: bool,
    /// Backends by passive health state, and health totals.
    pub health: PoolStats,
    /// Every backend, in the order added.
    pub backends: Vec<BackendSnapshot>,
}

/// One backend: state and counters (`_total` are monotonic).
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSnapshot {
    /// Its id.
    pub id: String,
    /// Its address.
    pub addr: SocketAddr,
    /// Its weight.
    pub weight: u32,
    /// Its passive health state.
    pub state: State,
    /// What active checks say (`None`: the route has none).
    pub check_up: Option<bool>,
    /// Draining (takes no new requests): being drained for removal, or
    /// held.
    pub draining: bool,
    /// Held out of rotation by an operator ([`RouteTable::hold`]).
    pub held: bool,
    /// Requests (and tunnels) in flight.
    pub in_flight: u64,
    /// Requests sent to it.
    pub requests_total: u64,
    /// Outcomes classified as failures (5xx, connect errors, timeouts,
    /// closed without a response).
    pub failures_total: u64,
    /// Connects that failed.
    pub connect_errors_total: u64,
    /// Connects or responses that timed out.
    pub timeouts_total: u64,
    /// Upstream connections opened.
    pub connections_total: u64,
    /// Active checks run.
    pub checks_total: u64,
    /// Active checks failed.
    pub checks_failed_total: u64,
    /// Idle kept-alive connections now.
    pub idle_connections: usize,
    /// Peak EWMA of its response latency (time to response head).
    /// Tracked for `p2c_ewma` routes only.
    pub latency_ewma: Option<Duration>,
}

/// `host` as routes compare it: no port, lowercase, no trailing dot.
pub(crate) fn request_host(raw: &str) -> Cow<'_, str> {
    let host = if raw.starts_with('[') {
        raw.find(']').map_or(raw, |i| &raw[..=i])
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    fn table() -> RouteTable {
        let t = RouteTable::default();
        for (name, host, prefix) in [
            ("exact", Some("a.example.com"), "/"),
            ("exact-api", Some("a.example.com"), "/api"),
            ("exact-api-v1", Some("a.example.com"), "/api/v1/"),
            ("wild", Some("*.example.com"), "/"),
            ("wild-deeper", Some("*.b.example.com"), "/"),
            ("any-static", None, "/static"),
        ] {
            t.upsert_route(Route::new(name, RouteMatch::new(host, prefix)))
                .unwrap();
        }
        t
    }

    fn found(t: &RouteTable, host: &str, path: &str) -> Option<String> {
        t.find(&request_host(host), path)
            .map(|r| r.name.to_string())
    }

    #[test]
    fn hosts_and_prefixes() {
        let t = table();
        let f = |h, p| found(&t, h, p);
        assert_eq!(f("a.example.com", "/").as_deref(), Some("exact"));
        assert_eq!(f("A.Example.COM:8080", "/x").as_deref(), Some("exact"));
        assert_eq!(f("a.example.com", "/api").as_deref(), Some("exact-api"));
        assert_eq!(f("a.example.com", "/api/x").as_deref(), Some("exact-api"));
        assert_eq!(f("a.example.com", "/apis").as_deref(), Some("exact"));
        assert_eq!(f("a.example.com", "/api/v1").as_deref(), Some("exact-api"));
        assert_eq!(
            f("a.example.com", "/api/v1/x").as_deref(),
            Some("exact-api-v1")
        );
        assert_eq!(f("x.example.com", "/").as_deref(), Some("wild"));
        assert_eq!(f("x.y.example.com", "/").as_deref(), Some("wild"));
        assert_eq!(f("x.b.example.com", "/").as_deref(), Some("wild-deeper"));
        assert_eq!(f("example.com", "/static/a").as_deref(), Some("any-static"));
        assert_eq!(f("other.test", "/static").as_deref(), Some("any-static"));
        assert_eq!(f("other.test", "/"), None);
        // A matched host does not fall through to any-host routes.
        assert_eq!(f("x.example.com", "/static").as_deref(), Some("wild"));
        assert_eq!(f("[::1]:80", "/static").as_deref(), Some("any-static"));
    }

    #[test]
    fn conflicts_and_validation() {
        let t = table();
        let e = t
            .upsert_route(Route::new(
                "dup",
                RouteMatch::new(Some("A.example.com."), "/api"),
            ))
            .unwrap_err();
        assert!(matches!(e, RouteError::DuplicateMatch { ref route, .. } if route == "exact-api"));
        for (m, what) in [
            (RouteMatch::new(Some("a b"), "/"), "bad host"),
            (RouteMatch::new(Some("x.test:80"), "/"), "bad host"),
            (RouteMatch::new(Some("x.test"), "api"), "does not start"),
            (RouteMatch::new(Some(""), "/"), "empty host"),
        ] {
            let e = t
                .upsert_route(Route::new("bad", m))
                .unwrap_err()
                .to_string();
            assert!(e.contains(what), "{e}");
        }
        t.upsert_route(
            Route::new("r", RouteMatch::host("r.test")).with_backend(Backend::new("b1", addr(1))),
        )
        .unwrap();
        let e = t
            .upsert_route(
                Route::new("r2", RouteMatch::host("r2.test"))
                    .with_backend(Backend::new("b1", addr(2))),
            )
            .unwrap_err();
        assert!(matches!(e, RouteError::BackendInOtherRoute { .. }), "{e}");
        assert!(matches!(
            t.upsert_backend("nope", Backend::new("x", addr(3))),
            Err(RouteError::UnknownRoute(_))
        ));
        assert!(matches!(
            t.upsert_backend("r", Backend::new("x", "0.0.0.0:1".parse().unwrap())),
            Err(RouteError::InvalidBackend { .. })
        ));
        assert!(matches!(
            t.set_weight("nope", 1),
            Err(RouteError::UnknownBackend(_))
        ));
        assert!(t.set_weight("b1", MAX_WEIGHT + 1).is_err());
    }

    #[test]
    fn runtime_changes_keep_backend_state() {
        let t = RouteTable::default();
        t.upsert_route(
            Route::new("r", RouteMatch::host("r.test"))
                .with_backend(Backend::new("a", addr(1)))
                .with_backend(Backend::new("b", addr(2))),
        )
        .unwrap();
        let before = t.find("r.test", "/").unwrap();
        let a = before.members[0].rt.clone();
        t.set_weight("a", 3).unwrap();
        let after = t.find("r.test", "/").unwrap();
        assert!(Arc::ptr_eq(&a, &after.members[0].rt));
        assert_eq!(after.members[0].weight, 3);
        assert_eq!(after.schedule.len(), 4);
        // Weight 0: not pickable, still listed.
        t.set_weight("b", 0).unwrap();
        let r = t.find("r.test", "/").unwrap();
        assert_eq!((r.members.len(), r.all.len()), (1, 2));
        // A new address replaces the state.
        t.upsert_backend("r", Backend::new("a", addr(9))).unwrap();
        let r = t.find("r.test", "/").unwrap();
        assert!(!Arc::ptr_eq(&a, &r.members[0].rt));
        t.remove("a").unwrap();
        t.remove("b").unwrap();
        assert!(t.find("r.test", "/").unwrap().all.is_empty());
        assert!(matches!(t.remove("a"), Err(RouteError::UnknownBackend(_))));
        t.remove_route("r").unwrap();
        assert!(t.find("r.test", "/").is_none());
    }

    #[test]
    fn hold_takes_a_backend_out_until_undrained() {
        let t = RouteTable::default();
        t.upsert_route(
            Route::new("r", RouteMatch::host("r.test"))
                .with_backend(Backend::new("a", addr(1)))
                .with_backend(Backend::new("b", addr(2))),
        )
        .unwrap();
        let members = |t: &RouteTable| {
            let r = t.find("r.test", "/").unwrap();
            let mut ids: Vec<String> = r.members.iter().map(|m| m.rt.id.to_string()).collect();
            ids.sort();
            (ids, r.all.len())
        };
        assert!(t.hold("a").unwrap());
        assert!(!t.hold("a").unwrap(), "a second hold changes nothing");
        assert_eq!(members(&t), (vec!["b".to_owned()], 2));
        let snap = t.snapshot();
        let a = snap.backend("a").unwrap();
        assert!(a.held && a.draining);
        // A re-registration (same address) keeps it held.
        t.upsert_backend("r", Backend::new("a", addr(1)).with_weight(5))
            .unwrap();
        assert_eq!(members(&t), (vec!["b".to_owned()], 2));
        assert!(t.undrain("a").unwrap());
        assert!(!t.undrain("a").unwrap(), "nothing to undrain");
        assert_eq!(members(&t), (vec!["a".to_owned(), "b".to_owned()], 2));
        assert!(!t.snapshot().backend("a").unwrap().draining);
        assert!(matches!(t.hold("zz"), Err(RouteError::UnknownBackend(_))));
        assert!(matches!(
            t.undrain("zz"),
            Err(RouteError::UnknownBackend(_))
        ));
        // The hold belongs to the id: gone and back, still held.
        t.hold("a").unwrap();
        t.remove("a").unwrap();
        t.upsert_backend("r", Backend::new("a", addr(7))).unwrap();
        assert_eq!(members(&t), (vec!["b".to_owned()], 2));
        assert_eq!(t.holds(), ["a"]);
        // Restored holds apply to backends that come later.
        assert!(t.hold_id("later"));
        assert!(!t.hold_id("later"));
        t.upsert_backend("r", Backend::new("later", addr(8)))
            .unwrap();
        assert_eq!(members(&t), (vec!["b".to_owned()], 3));
        assert!(t.undrain("later").unwrap());
        t.remove("later").unwrap();
        assert!(t.hold_id("gone"));
        assert!(t.undrain("gone").unwrap(), "an absent held id is undrained");
        assert_eq!(t.holds(), ["a"]);
    }

    #[tokio::test]
    async fn hold_stops_a_drain_short_of_removal() {
        let t = RouteTable::default();
        t.upsert_route(
            Route::new("r", RouteMatch::host("r.test")).with_backend(Backend::new("a", addr(1))),
        )
        .unwrap();
        let drain = t.drain("a", Duration::from_secs(5)).unwrap();
        t.hold("a").unwrap();
        assert_eq!(drain.await, DrainOutcome::Cancelled);
        assert!(t.snapshot().backend("a").unwrap().held);
        // And undrain cancels a drain in progress too.
        t.undrain("a").unwrap();
        let drain = t.drain("a", Duration::from_secs(5)).unwrap();
        t.undrain("a").unwrap();
        assert_eq!(drain.await, DrainOutcome::Cancelled);
        assert_eq!(t.find("r.test", "/").unwrap().members.len(), 1);
    }

    #[test]
    fn no_backend_reasons() {
        let t = RouteTable::default();
        t.upsert_route(Route::new("empty", RouteMatch::host("e.test")))
            .unwrap();
        let r = t.find("e.test", "/").unwrap();
        let e = r.pick(&Mask::new(0), None).err().unwrap();
        assert_eq!(e.to_string(), "route `empty` has no backends");
        t.upsert_backend("empty", Backend::new("z", addr(1)).with_weight(0))
            .unwrap();
        let r = t.find("e.test", "/").unwrap();
        let e = r.pick(&Mask::new(0), None).err().unwrap();
        assert_eq!(
            e.to_string(),
            "no backend available for route `empty` (1 configured, 1 draining or weight 0)"
        );
    }

    #[test]
    fn rendezvous_moves_few_keys() {
        let t = RouteTable::default();
        let mut route = Route::new("h", RouteMatch::host("h.test"))
            .with_balance(Balance::Hash(super::super::balance::HashKey::ClientIp));
        for i in 0..4u16 {
            route = route.with_backend(Backend::new(format!("b{i}"), addr(100 + i)));
        }
        t.upsert_route(route).unwrap();
        let assign = |t: &RouteTable| -> Vec<String> {
            let r = t.find("h.test", "/").unwrap();
            (0..10_000u64)
                .map(|k| {
                    let p = r.pick(&Mask::new(r.members.len()), Some(k)).ok().unwrap();
                    r.members[p.idx].rt.id.to_string()
                })
                .collect()
        };
        let before = assign(&t);
        for i in 0..4 {
            let n = before.iter().filter(|b| **b == format!("b{i}")).count();
            assert!((2000..3000).contains(&n), "b{i}: {n}");
        }
        t.upsert_backend("h", Backend::new("b4", addr(200)))
            .unwrap();
        let after = assign(&t);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        // Ideal: 1/5 of the keys, all of them to the new backend.
        assert!(moved < 2400, "{moved}");
        assert!(
            before
                .iter()
                .zip(&after)
                .filter(|(a, b)| a != b)
                .all(|(_, b)| b == "b4")
        );
        // Weighted: b4 with weight 4 takes about half.
        t.set_weight("b4", 4).unwrap();
        let weighted = assign(&t);
        let n4 = weighted.iter().filter(|b| *b == "b4").count();
        assert!((4300..5700).contains(&n4), "{n4}");
    }
}
