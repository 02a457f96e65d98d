//! The admin HTTP API (axum).
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | the dashboard (one embedded page: pools, routes, rules, bans, request rates, live events) |
//! | `GET /ping` | `pong` |
//! | `GET /config` | the effective config as JSON (holds no secret) |
//! | `GET /metrics` | Prometheus / OpenMetrics text |
//! | `GET /openapi.json` | the OpenAPI 3.1 description of these routes |
//! | `GET /api/rules` | the rule sets, their defaults and rule counts |
//! | `GET /api/rules/{set}/check?ip=ADDR` | the verdict for `ADDR` and the rule that decided |
//! | `GET /api/rules/{set}` | every rule of the set: `rule`, `source` (`config` or `runtime`), `expires_in_seconds` |
//! | `POST /api/rules/{set}/{list}` | add a runtime rule: `{"rule": "192.0.2.0/24", "ttl": "1h"}` (`ttl` optional); durable before the answer |
//! | `DELETE /api/rules/{set}/{list}?rule=RULE` | remove a runtime rule (config rules: 409, edit the file) |
//! | `GET /api/rules/{set}/export[?ports=80,443]` | the live set (runtime rules and bans included) as an nftables script |
//! | `GET /api/events` | server-sent events: `benched`, `restored`, `bench_suppressed`, `banned`, `ban_lifted`, `rule_added`, `rule_removed`, `backend_drained`, `backend_undrained`, and the registry's (JSON data; `lagged` when a slow reader missed some) |
//! | `GET /api/routes` | every ingress route: matches, balance, and each backend's state, weight, draining, held, in-flight requests, latency |
//! | `POST /api/backends/{id}/drain[?ingress=NAME]` | hold a backend out of rotation: no new requests, those in flight finish; it stays listed, and held across restarts and re-registrations, until undrained (durable before the answer) |
//! | `POST /api/backends/{id}/undrain[?ingress=NAME]` | put a held or draining backend back in rotation |
//! | `GET /api/services` | backends registered over the registration channel, and the channel's counters |
//! | `GET /api/keys` | the registry's keys: `id`, `role`, `allow`, `public_key` |
//! | `POST /api/keys` | add a key: `{"id": "web002", "public_key": "BASE64", "role": "agent", "allow": ["peer", "10.0.0.0/24"]}` (`role`, `allow` optional); written to `keys_dir` (fsynced) before the answer; 409 if the id has a key |
//! | `DELETE /api/keys/{id}` | revoke a key: its connection closes (4003) and its services go at once |
//! | `POST /api/reload` | re-read the config file (as SIGHUP): new config-file rules now; `[egress.*]`/`[ingress.*]` added, removed or changed are started and stopped (open connections drain), ingress routes are changed in place, removed `[l4.*]` stopped; `started`, `stopped`, `routes`, `restart_required` in the answer; 400 with the reason (invalid file, a pool or rule set not running, a port that cannot be bound) and nothing changed |
//! | `GET /api/bans` | active bans of every set: `set`, `rule`, `remaining_seconds`, `times`, `offense` |
//! | `DELETE /api/bans/{set}?rule=RULE` | lift a ban (durable; the client's ban count is kept for escalation) |
//! | `GET /probe[?pool=NAME][&ip=ADDR][&recent=N]` | every pool's addresses: state, counters, last N outcomes |
//! | `POST /api/pools/{pool}/addresses/{ip}/outcome` | client feedback: `{"outcome": "success"\|"failure"\|"status", "status": 429, "detail": "captcha"}` |
//! | `POST /api/egress/{pool}/addresses/{ip}/outcome` | the same (the path a crawler behind an egress pool is told about) |
//!
//! Access: `/ping` is open. Other reads are open to loopback peers and
//! need `Authorization: Bearer <token>` from anywhere else. Mutations
//! always need the token.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Secret, is_loopback};
use crate::metrics::{self, Metrics};
use crate::pools::{Pools, Report};
use crate::rules::{List, RuleSets};

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// Re-reads the config (and serves the running one for `/config`).
    pub reloader: Arc<crate::reload::Reloader>,
    /// The rule policies.
    pub rules: Arc<RuleSets>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// The pools whose address health is tracked.
    pub pools: Arc<Pools>,
    /// The admin token, if configured.
    pub token: Option<Arc<Secret>>,
    /// Where runtime changes are persisted.
    pub store: store::Store,
    /// The events stream.
    pub events: crate::events::Events,
    /// Cancelled on shutdown: ends the event streams so the listener can
    /// drain.
    pub shutdown: CancellationToken,
    /// The registration channel, when `[registry]` is configured.
    pub registry: Option<registry::Registry>,
    /// The route tables of the running `[ingress.*]` (a reload adds and
    /// removes them).
    pub ingress: IngressTables,
}

/// The route tables of the running `[ingress.*]`, by name: filled by the
/// listeners as they start and stop, read by the admin API.
#[derive(Clone, Debug, Default)]
pub struct IngressTables(
    Arc<std::sync::RwLock<std::collections::BTreeMap<String, gateway::ingress::RouteTable>>>,
);

impl IngressTables {
    /// Every table, by name.
    pub fn all(&self) -> Vec<(String, gateway::ingress::RouteTable)> {
        let map = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.iter().map(|(n, t)| (n.clone(), t.clone())).collect()
    }

    /// Lists `table` as ingress `name` (replacing one of that name).
    pub fn insert(&self, name: &str, table: gateway::ingress::RouteTable) {
        let mut map = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert(name.to_owned(), table);
    }

    /// Stops listing ingress `name`.
    pub fn remove(&self, name: &str) {
        let mut map = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.remove(name);
    }
}

/// The admin API's routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/config", get(config))
        .route("/openapi.json", get(openapi))
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/api/rules", get(list_rules))
        .route("/api/rules/{set}/check", get(check))
        .route("/api/rules/{set}", get(list_set))
        .route("/api/rules/{set}/export", get(export_set))
        .route("/api/bans", get(list_bans))
        .route("/api/reload", post(reload))
        .route("/api/services", get(list_services))
        .route("/api/routes", get(list_routes))
        .route("/api/keys", get(list_keys).post(add_key))
        .route("/api/backends/{id}/drain", post(drain_backend))
        .route("/api/backends/{id}/undrain", post(undrain_backend))
        .route("/api/keys/{id}", axum::routing::delete(revoke_key))
        .route("/api/events", get(events))
        .route("/api/bans/{set}", axum::routing::delete(lift_ban))
        .route(
            "/api/rules/{set}/{list}",
            post(add_rule).delete(remove_rule),
        )
        .route("/probe", get(probe))
        .route("/api/pools/{pool}/addresses/{ip}/outcome", post(outcome))
        .route("/api/egress/{pool}/addresses/{ip}/outcome", post(outcome))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .route("/ping", get(|| async { "pong" }))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route".into()) })
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets
/// in-flight requests finish. `guard` decides who may connect (at accept,
/// before a byte is read).
pub async fn run(
    listener: TcpListener,
    guard: Arc<gateway::guard::Guard>,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(
        Guarded { listener, guard },
        router.into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}

/// The admin listener behind its accept-time guard.
struct Guarded {
    listener: TcpListener,
    guard: Arc<gateway::guard::Guard>,
}

impl axum::serve::Listener for Guarded {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.guard.accept(&self.listener).await {
                Ok(c) => return c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// The peer of an admin connection.
#[derive(Clone, Copy, Debug)]
struct Peer(SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Guarded>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Guarded>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn authorize(
    State(state): State<AdminState>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    req: Request,
    next: Next,
) -> Response {
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    if read && is_loopback(peer.ip()) {
        return next.run(req).await;
    }
    match &state.token {
        Some(token) if bearer(req.headers()).is_some_and(|b| token.matches(b)) => {
            next.run(req).await
        }
        Some(_) => error(
            StatusCode::UNAUTHORIZED,
            "this request needs `Authorization: Bearer <admin token>`".into(),
        ),
        None => error(
            StatusCode::UNAUTHORIZED,
            "admin mutations need a token: set admin.token_file or admin.token_env".into(),
        ),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get(header::AUTHORIZATION)?
        .as_bytes()
        .strip_prefix(b"Bearer ")
}

/// The dashboard: one page, assets inline, nothing from a CDN.
pub const DASHBOARD: &str = include_str!("dashboard/index.html");

async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        DASHBOARD,
    )
        .into_response()
}

/// The OpenAPI document (a test checks it against the real routes).
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn config(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.reloader.config_json().to_string(),
    )
        .into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    state
        .pools
        .refresh_metrics(&state.metrics, std::time::Instant::now());
    match state.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode metrics".into(),
        ),
    }
}

async fn list_rules(State(state): State<AdminState>) -> Response {
    #[derive(serde::Serialize)]
    struct Sets {
        sets: Vec<crate::rules::SetSummary>,
    }
    Json(Sets {
        sets: state.rules.summaries(),
    })
    .into_response()
}

#[derive(Debug, Deserialize)]
struct CheckQuery {
    ip: Option<String>,
}

async fn check(
    State(state): State<AdminState>,
    Path(set): Path<String>,
    Query(q): Query<CheckQuery>,
) -> Response {
    if state.rules.get(&set).is_none() {
        return unknown_set(&state, &set);
    }
    let Some(text) = q.ip else {
        return error(
            StatusCode::BAD_REQUEST,
            "missing query parameter `ip`".into(),
        );
    };
    let Ok(ip) = text.trim().parse::<IpAddr>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`{text}` is not an IPv4 or IPv6 address"),
        );
    };
    match state.rules.check(&set, ip) {
        Some(report) => {
            state.metrics.count_check(&set, report.verdict);
            Json(report).into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("no rule set `{set}`")),
    }
}

async fn list_set(State(state): State<AdminState>, Path(set): Path<String>) -> Response {
    match state.rules.listing(&set, std::time::Instant::now()) {
        Some(l) => Json(l).into_response(),
        None => unknown_set(&state, &set),
    }
}

fn unknown_set(state: &AdminState, set: &str) -> Response {
    no_set(state, set).into_response()
}

fn no_set(state: &AdminState, set: &str) -> ApiError {
    let known: Vec<&str> = state.rules.names().collect();
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no rule set `{set}` (known: {})", known.join(", ")),
    )
}

/// An API error: a status and the reason, answered as `{"error": …}`.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

/// Parses the `{set}/{list}` of a rule route.
fn set_and_list(state: &AdminState, set: &str, list: &str) -> Result<List, ApiError> {
    if state.rules.get(set).is_none() {
        return Err(no_set(state, set));
    }
    List::parse(list).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no list `{list}`: use `allow` or `deny`"),
        )
    })
}

fn parse_rule(text: &str) -> Result<iprules::Rule, ApiError> {
    text.trim()
        .parse()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("rule: `{text}`: {e}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddRuleBody {
    rule: String,
    #[serde(default)]
    ttl: Option<String>,
}

/// Runs a store call off the async workers (it waits for an fsync).
async fn persist<T: Send + 'static>(
    store: &store::Store,
    f: impl FnOnce(&store::Store) -> Result<T, store::StoreError> + Send + 'static,
) -> Result<T, Response> {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "state store write failed");
            Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("not saved, nothing changed: {e}"),
            ))
        }
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("not saved, nothing changed: {e}"),
        )),
    }
}

async fn add_rule(
    State(state): State<AdminState>,
    Path((set, list)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let list = match set_and_list(&state, &set, &list) {
        Ok(l) => l,
        Err(r) => return r.into_response(),
    };
    let body: AddRuleBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")),
    };
    let rule = match parse_rule(&body.rule) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let ttl = match body.ttl.as_deref().map(crate::config::duration::parse) {
        None => None,
        Some(Ok(d)) if !d.is_zero() => Some(d),
        Some(Ok(_)) => return error(StatusCode::BAD_REQUEST, "ttl: must be more than 0s".into()),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("ttl: {e}")),
    };
    if state.rules.is_config_rule(&set, list, &rule) {
        return error(
            StatusCode::CONFLICT,
            format!(
                "{rule} is already in the {} list of the config file",
                list.as_str()
            ),
        );
    }
    let (now, wall) = (std::time::Instant::now(), std::time::SystemTime::now());
    let expires = ttl.and_then(|d| now.checked_add(d));
    let record = store::RuntimeRule {
        set: set.clone(),
        list: list.as_str().to_owned(),
        rule: rule.to_string(),
        until_unix_ms: expires.map(|t| crate::rules::unix_ms(t, now, wall)),
    };
    // Durable first, then live: a failed write changes nothing.
    if let Err(r) = persist(&state.store, move |s| s.put_rule(&record)).await {
        return r;
    }
    match state.rules.add_runtime(&set, list, rule, expires) {
        Ok(changed) => {
            state
                .metrics
                .set_rule_count(&set, list.as_str(), state.rules.len(&set, list));
            tracing::info!(set, list = list.as_str(), %rule, ttl = ?ttl, "rule added");
            state.events.publish(
                "rule_added",
                serde_json::json!({"set": set, "list": list.as_str(), "rule": rule.to_string(),
                    "ttl_seconds": ttl.map(|d| d.as_secs_f64())}),
            );
            Json(serde_json::json!({
                "set": set,
                "list": list.as_str(),
                "rule": rule.to_string(),
                "changed": changed,
                "expires_in_seconds": ttl.map(|d| d.as_secs_f64()),
            }))
            .into_response()
        }
        Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct RuleQuery {
    rule: Option<String>,
}

async fn remove_rule(
    State(state): State<AdminState>,
    Path((set, list)): Path<(String, String)>,
    Query(q): Query<RuleQuery>,
) -> Response {
    let list = match set_and_list(&state, &set, &list) {
        Ok(l) => l,
        Err(r) => return r.into_response(),
    };
    let Some(text) = q.rule else {
        return error(
            StatusCode::BAD_REQUEST,
            "missing query parameter `rule`".into(),
        );
    };
    let rule = match parse_rule(&text) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    match state.rules.check_removable(&set, list, &rule) {
        Ok(()) => {}
        Err(e @ crate::rules::ChangeError::FromConfig { .. }) => {
            return error(StatusCode::CONFLICT, e.to_string());
        }
        Err(e) => return error(StatusCode::NOT_FOUND, e.to_string()),
    }
    let record = store::RuntimeRule {
        set: set.clone(),
        list: list.as_str().to_owned(),
        rule: rule.to_string(),
        until_unix_ms: None,
    };
    if let Err(r) = persist(&state.store, move |s| s.remove_rule(&record)).await {
        return r;
    }
    match state.rules.remove_runtime(&set, list, &rule) {
        Ok(()) => {
            state
                .metrics
                .set_rule_count(&set, list.as_str(), state.rules.len(&set, list));
            tracing::info!(set, list = list.as_str(), %rule, "rule removed");
            state.events.publish(
                "rule_removed",
                serde_json::json!({"set": set, "list": list.as_str(), "rule": rule.to_string()}),
            );
            Json(serde_json::json!({"set": set, "list": list.as_str(), "rule": rule.to_string(), "removed": true}))
                .into_response()
        }
        Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct ExportQuery {
    ports: Option<String>,
}

async fn export_set(
    State(state): State<AdminState>,
    Path(set): Path<String>,
    Query(q): Query<ExportQuery>,
) -> Response {
    let Some(policy) = state.rules.get(&set) else {
        return unknown_set(&state, &set);
    };
    let mut ports = Vec::new();
    for p in q
        .ports
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|p| !p.is_empty())
    {
        match p.trim().parse::<u16>() {
            Ok(n) => ports.push(n),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("ports: `{p}` is not a port"),
                );
            }
        }
    }
    let opts = gateway::guard::NftOptions {
        table: "ippool".into(),
        ports,
    };
    match policy.read(|p| gateway::guard::nft_script(p, std::time::Instant::now(), &opts)) {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn events(State(state): State<AdminState>) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let rx = state.events.subscribe();
    let stop = state.shutdown.clone();
    let stream = futures_util::stream::unfold((rx, stop), |(mut rx, stop)| async move {
        let next = tokio::select! {
            () = stop.cancelled() => return None,
            next = rx.recv() => next,
        };
        let ev = match next {
            Ok(e) => Event::default()
                .event(e.kind)
                .json_data(&e)
                .unwrap_or_else(|_| Event::default().event("error")),
            Err(RecvError::Lagged(n)) => Event::default()
                .event("lagged")
                .data(format!("{{\"missed\":{n}}}")),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok::<_, std::convert::Infallible>(ev), (rx, stop)))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn reload(State(state): State<AdminState>) -> Response {
    let r = Arc::clone(&state.reloader);
    match tokio::task::spawn_blocking(move || r.reload()).await {
        Ok(Ok(report)) => {
            tracing::info!(reloaded = ?report.reloaded, restart_required = ?report.restart_required, "config reloaded");
            Json(report).into_response()
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "reload refused; the running config stays");
            error(
                StatusCode::BAD_REQUEST,
                format!("reload refused, the running config stays: {e}"),
            )
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn list_routes(State(state): State<AdminState>) -> Response {
    let mut out = Vec::new();
    for (name, table) in &state.ingress.all() {
        let snap = table.snapshot();
        for r in &snap.routes {
            let backends: Vec<serde_json::Value> = r
                .backends
                .iter()
                .map(|b| {
                    serde_json::json!({
                        "id": b.id,
                        "addr": b.addr.to_string(),
                        "weight": b.weight,
                        "state": crate::pools::state_str(&b.state),
                        "check_up": b.check_up,
                        "draining": b.draining,
                        "held": b.held,
                        "in_flight": b.in_flight,
                        "requests": b.requests_total,
                        "failures": b.failures_total,
                        "latency_ms": b.latency_ewma.map(|d| d.as_secs_f64() * 1e3),
                    })
                })
                .collect();
            out.push(serde_json::json!({
                "ingress": name,
                "route": r.name,
                "matches": r.matches.iter().map(|m| serde_json::json!({
                    "host": m.host, "path_prefix": m.path_prefix })).collect::<Vec<_>>(),
                "balance": format!("{:?}", r.balance),
                "backend_tls": r.backend_tls.is_some(),
                "backend_http2": r.backend_http2,
                "backends": backends,
            }));
        }
    }
    Json(serde_json::json!({ "routes": out })).into_response()
}

fn no_registry() -> Response {
    error(StatusCode::NOT_FOUND, "no [registry] is configured".into())
}

async fn list_services(State(state): State<AdminState>) -> Response {
    let Some(r) = &state.registry else {
        return no_registry();
    };
    Json(serde_json::json!({ "services": r.snapshot(), "metrics": r.metrics() })).into_response()
}

async fn list_keys(State(state): State<AdminState>) -> Response {
    let Some(r) = &state.registry else {
        return no_registry();
    };
    let keys: Vec<serde_json::Value> = r
        .keys()
        .iter()
        .map(|k| {
            serde_json::json!({
                "id": k.id.to_string(),
                "role": k.role,
                "allow": k.allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "public_key": k.public_key_text(),
            })
        })
        .collect();
    Json(serde_json::json!({ "keys": keys })).into_response()
}

/// The body of `POST /api/keys`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddKeyBody {
    id: String,
    public_key: String,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    allow: Vec<String>,
}

async fn add_key(State(state): State<AdminState>, body: Bytes) -> Response {
    let Some(r) = state.registry.clone() else {
        return no_registry();
    };
    let body: AddKeyBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")),
    };
    let id: registry::KeyId = match body.id.parse() {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("id: {e}")),
    };
    let public_key = match registry::KeyEntry::decode_public_key(&body.public_key) {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("public_key: {e}")),
    };
    let role: registry::Role = match body.role.as_deref().unwrap_or("agent").parse() {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("role: {e}")),
    };
    let mut allow = Vec::with_capacity(body.allow.len());
    for (i, a) in body.allow.iter().enumerate() {
        match a.parse::<registry::Allow>() {
            Ok(a) => allow.push(a),
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("allow[{i}]: `{a}`: {e}")),
        }
    }
    if r.keys().iter().any(|k| k.id == id) {
        return error(
            StatusCode::CONFLICT,
            format!("`{id}` already has a key: revoke it first"),
        );
    }
    let entry = registry::KeyEntry {
        id: id.clone(),
        public_key,
        role,
        allow,
    };
    let shown = serde_json::json!({
        "id": id.to_string(),
        "role": entry.role,
        "allow": entry.allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "public_key": entry.public_key_text(),
    });
    match tokio::task::spawn_blocking(move || r.add_key(entry)).await {
        Ok(Ok(())) => {
            tracing::info!(%id, "key added");
            Json(shown).into_response()
        }
        Ok(Err(e @ registry::KeyError::Exists { .. })) => {
            error(StatusCode::CONFLICT, e.to_string())
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The query of the backend routes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendQuery {
    ingress: Option<String>,
}

/// The route table holding backend `id` (narrowed to `ingress` if given).
fn backend_table(
    state: &AdminState,
    id: &str,
    ingress: Option<&str>,
) -> Result<(String, gateway::ingress::RouteTable), (StatusCode, String)> {
    let tables = state.ingress.all();
    if tables.is_empty() {
        return Err((StatusCode::NOT_FOUND, "no [ingress] is configured".into()));
    }
    if let Some(n) = ingress
        && !tables.iter().any(|(name, _)| name == n)
    {
        return Err((StatusCode::NOT_FOUND, format!("no ingress `{n}`")));
    }
    let found: Vec<_> = tables
        .iter()
        .filter(|(name, _)| ingress.is_none_or(|n| n == name))
        .filter(|(_, t)| t.snapshot().backend(id).is_some())
        .collect();
    match found.as_slice() {
        [] => Err((StatusCode::NOT_FOUND, format!("no backend `{id}`"))),
        [(name, t)] => Ok((name.clone(), t.clone())),
        _ => Err((
            StatusCode::CONFLICT,
            format!(
                "backend `{id}` is in several ingresses ({}): add ?ingress=NAME",
                found
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

async fn drain_backend(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    Query(q): Query<BackendQuery>,
) -> Response {
    set_held(&state, &id, q.ingress.as_deref(), true).await
}

async fn undrain_backend(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    Query(q): Query<BackendQuery>,
) -> Response {
    set_held(&state, &id, q.ingress.as_deref(), false).await
}

/// Holds (or undrains) a backend: durable first, then live, so a hold
/// survives a restart and a failed write changes nothing.
async fn set_held(state: &AdminState, id: &str, ingress: Option<&str>, hold: bool) -> Response {
    let (name, table) = match backend_table(state, id, ingress) {
        Ok(t) => t,
        Err((status, message)) => return error(status, message),
    };
    let name = name.as_str();
    let record = store::Hold {
        ingress: name.to_owned(),
        backend: id.to_owned(),
    };
    let saved = if hold {
        persist(&state.store, move |s| s.put_hold(&record)).await
    } else {
        persist(&state.store, move |s| s.remove_hold(&record).map(drop)).await
    };
    if let Err(r) = saved {
        return r;
    }
    let changed = if hold {
        table.hold(id)
    } else {
        table.undrain(id)
    };
    match changed {
        Ok(changed) => {
            let what = if hold { "drained" } else { "undrained" };
            tracing::info!(
                ingress = name,
                backend = id,
                changed,
                "backend {what} by the admin API"
            );
            if changed {
                state.events.publish(
                    if hold {
                        "backend_drained"
                    } else {
                        "backend_undrained"
                    },
                    serde_json::json!({ "ingress": name, "backend": id }),
                );
            }
            let in_flight = table.snapshot().backend(id).map_or(0, |b| b.in_flight);
            Json(serde_json::json!({
                "ingress": name,
                "backend": id,
                "held": hold,
                "changed": changed,
                "in_flight": in_flight,
            }))
            .into_response()
        }
        // Removed between the lookup and the change.
        Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
    }
}

async fn revoke_key(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    let Some(r) = state.registry.clone() else {
        return no_registry();
    };
    let id: registry::KeyId = match id.parse() {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("id: {e}")),
    };
    if !r.keys().iter().any(|k| k.id == id) {
        return error(StatusCode::NOT_FOUND, format!("no active key `{id}`"));
    }
    let id2 = id.clone();
    match tokio::task::spawn_blocking(move || r.revoke_key(&id2)).await {
        Ok(Ok(())) => {
            tracing::info!(%id, "key revoked");
            Json(serde_json::json!({ "id": id.to_string(), "revoked": true })).into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn list_bans(State(state): State<AdminState>) -> Response {
    Json(serde_json::json!({ "bans": state.rules.bans(std::time::Instant::now()) })).into_response()
}

async fn lift_ban(
    State(state): State<AdminState>,
    Path(set): Path<String>,
    Query(q): Query<RuleQuery>,
) -> Response {
    if state.rules.get(&set).is_none() {
        return unknown_set(&state, &set);
    }
    let Some(text) = q.rule else {
        return error(
            StatusCode::BAD_REQUEST,
            "missing query parameter `rule`".into(),
        );
    };
    let rule = match parse_rule(&text) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let now = std::time::Instant::now();
    if !state
        .rules
        .bans(now)
        .iter()
        .any(|b| b.set == set && b.rule == rule.to_string())
    {
        return error(
            StatusCode::NOT_FOUND,
            format!("no active ban of {rule} in `{set}`"),
        );
    }
    let (s2, r2) = (set.clone(), rule.to_string());
    if let Err(r) = persist(&state.store, move |st| st.remove_ban(&s2, &r2)).await {
        return r;
    }
    match state.rules.lift(&set, &rule, now) {
        Ok(true) => {
            tracing::info!(set, %rule, "ban lifted");
            state.events.publish(
                "ban_lifted",
                serde_json::json!({"set": set, "rule": rule.to_string()}),
            );
            Json(serde_json::json!({"set": set, "rule": rule.to_string(), "lifted": true}))
                .into_response()
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("no active ban of {rule} in `{set}`"),
        ),
        Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
    }
}

/// Outcomes shown per address by `/probe` unless `recent=` says otherwise.
const DEFAULT_RECENT: usize = 20;

#[derive(Debug, Deserialize)]
struct ProbeQuery {
    pool: Option<String>,
    ip: Option<String>,
    recent: Option<String>,
}

fn unknown_pool(state: &AdminState, pool: &str) -> Response {
    let known: Vec<&str> = state.pools.names().collect();
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no pool `{pool}` (known: {})",
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        ),
    )
}

async fn probe(State(state): State<AdminState>, Query(q): Query<ProbeQuery>) -> Response {
    let ip = match q.ip.as_deref().map(|t| (t, t.trim().parse::<IpAddr>())) {
        None => None,
        Some((_, Ok(ip))) => Some(ip),
        Some((text, Err(_))) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("ip: `{text}` is not an IPv4 or IPv6 address"),
            );
        }
    };
    let recent = match q.recent.as_deref().map(str::parse::<usize>) {
        None => DEFAULT_RECENT,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "recent: `{}` is not a number",
                    q.recent.as_deref().unwrap_or_default()
                ),
            );
        }
    };
    let selected: Vec<_> = match &q.pool {
        Some(name) => match state.pools.get(name) {
            Some(p) => vec![Arc::clone(p)],
            None => return unknown_pool(&state, name),
        },
        None => state.pools.iter().cloned().collect(),
    };
    let now = std::time::Instant::now();
    let pools: Vec<_> = selected
        .iter()
        .filter(|p| ip.is_none_or(|ip| p.contains(ip)))
        .map(|p| p.probe(now, recent, ip))
        .collect();
    if let Some(ip) = ip
        && pools.is_empty()
    {
        return error(
            StatusCode::NOT_FOUND,
            format!("address {ip} is in no monitored pool"),
        );
    }
    Json(serde_json::json!({ "pools": pools })).into_response()
}

/// The body of a client report.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutcomeBody {
    outcome: OutcomeKind,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    detail: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OutcomeKind {
    Success,
    Failure,
    Status,
}

/// Longest `detail` kept, in bytes.
const MAX_DETAIL: usize = 256;

async fn outcome(
    State(state): State<AdminState>,
    Path((pool_name, ip_text)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Some(pool) = state.pools.get(&pool_name) else {
        return unknown_pool(&state, &pool_name);
    };
    let Ok(ip) = ip_text.trim().parse::<IpAddr>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`{ip_text}` is not an IPv4 or IPv6 address"),
        );
    };
    let body: OutcomeBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")),
    };
    let (observation, kind): (health::Observation, &'static str) = match (body.outcome, body.status)
    {
        (OutcomeKind::Success, None) => (health::Verdict::Success.into(), "success"),
        (OutcomeKind::Failure, None) => (health::Verdict::Failure.into(), "failure"),
        (OutcomeKind::Status, Some(s)) if (100..=999).contains(&s) => {
            (health::Outcome::Status(s).into(), "status")
        }
        (OutcomeKind::Status, Some(s)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("status: {s} is not an HTTP status (100 to 999)"),
            );
        }
        (OutcomeKind::Status, None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "status: required when outcome is \"status\"".into(),
            );
        }
        (_, Some(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "status: only allowed when outcome is \"status\"".into(),
            );
        }
    };
    let mut detail = body.detail;
    if let Some(d) = &mut detail {
        let mut cut = d.len().min(MAX_DETAIL);
        while !d.is_char_boundary(cut) {
            cut -= 1;
        }
        d.truncate(cut);
    }
    if !pool.contains(ip) {
        return error(
            StatusCode::NOT_FOUND,
            format!("address {ip} is not in pool `{pool_name}`"),
        );
    }
    let now = std::time::Instant::now();
    let verdict = crate::pools::verdict_str(pool.classify(&observation.outcome));
    let transition = match pool.record(ip, observation, now, &state.metrics) {
        Ok(t) => t,
        Err(e @ crate::pools::RecordError::NoFeedback { .. }) => {
            return error(StatusCode::CONFLICT, e.to_string());
        }
        Err(e) => return error(StatusCode::NOT_FOUND, e.to_string()),
    };
    tracing::info!(
        pool = pool.name(),
        %ip,
        outcome = kind,
        status = body.status,
        detail = detail.as_deref().unwrap_or(""),
        verdict,
        "client reported an outcome"
    );
    pool.add_report(
        ip,
        Report {
            at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            outcome: kind,
            status: body.status,
            detail,
        },
    );
    let state_now = pool.state(ip, now).map(|s| crate::pools::state_str(&s));
    Json(serde_json::json!({
        "pool": pool_name,
        "ip": ip,
        "verdict": verdict,
        "transition": transition.as_ref().map(crate::pools::transition_kind),
        "state": state_now,
    }))
    .into_response()
}
