//! The admin HTTP API (axum).
//!
//! | route | answer |
//! |---|---|
//! | `GET /ping` | `pong` |
//! | `GET /config` | the effective config as JSON (holds no secret) |
//! | `GET /metrics` | Prometheus / OpenMetrics text |
//! | `GET /api/rules` | the rule sets, their defaults and rule counts |
//! | `GET /api/rules/{set}/check?ip=ADDR` | the verdict for `ADDR` and the rule that decided |
//!
//! Access: `/ping` is open. Other reads are open to loopback peers and
//! need `Authorization: Bearer <token>` from anywhere else. Mutations
//! (none yet) always need the token.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Secret, is_loopback};
use crate::metrics::{self, Metrics};
use crate::rules::RuleSets;

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// The effective config as JSON, rendered once (keys in file order).
    pub config_json: Arc<str>,
    /// The rule policies.
    pub rules: Arc<RuleSets>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// The admin token, if configured.
    pub token: Option<Arc<Secret>>,
}

/// The admin API's routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/config", get(config))
        .route("/metrics", get(metrics))
        .route("/api/rules", get(list_rules))
        .route("/api/rules/{set}/check", get(check))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .route("/ping", get(|| async { "pong" }))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route".into()) })
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets
/// in-flight requests finish.
pub async fn run(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn authorize(
    State(state): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
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

async fn config(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.config_json.to_string(),
    )
        .into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
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
        let known: Vec<&str> = state.rules.names().collect();
        return error(
            StatusCode::NOT_FOUND,
            format!("no rule set `{set}` (known: {})", known.join(", ")),
        );
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
