//! The registry side of `serve`: starts the registration channel and turns
//! its events into admin events (and, with an ingress, route-table
//! changes). The registry crate knows nothing of the data plane; this is
//! the one place that translates.

use std::sync::Arc;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::events::Events;

/// The admin view of one registry event; `None` for events not shown.
pub fn event_json(e: &registry::Event) -> Option<(&'static str, serde_json::Value)> {
    use registry::Event as E;
    Some(match e {
        E::Registered { service } => ("registered", json!({ "service": service })),
        E::Deregistered { service, agent } => (
            "deregistered",
            json!({ "service": service, "agent": agent.to_string() }),
        ),
        E::Draining {
            service,
            agent,
            deadline,
        } => (
            "draining",
            json!({
                "service": service,
                "agent": agent.to_string(),
                "seconds": deadline.saturating_duration_since(std::time::Instant::now()).as_secs_f64(),
            }),
        ),
        E::WeightChanged {
            service,
            agent,
            weight,
        } => (
            "weight_changed",
            json!({ "service": service, "agent": agent.to_string(), "weight": weight }),
        ),
        E::Custom {
            agent,
            kind,
            action,
            payload,
        } => (
            "custom",
            json!({ "agent": agent.to_string(), "type": kind, "action": action, "payload": payload }),
        ),
        E::KeyAdded { id, role, by } => (
            "key_added",
            json!({ "id": id.to_string(), "role": role, "by": by.as_ref().map(ToString::to_string) }),
        ),
        E::KeyRevoked { id, by } => (
            "key_revoked",
            json!({ "id": id.to_string(), "by": by.as_ref().map(ToString::to_string) }),
        ),
        E::AgentConnected { agent, role, peer } => (
            "agent_connected",
            json!({ "agent": agent.to_string(), "role": role, "peer": peer.to_string() }),
        ),
        E::AgentDisconnected { agent, peer, code } => (
            "agent_disconnected",
            json!({ "agent": agent.to_string(), "peer": peer.to_string(), "code": code.as_u16(), "reason": code.name() }),
        ),
        E::AuthFailed { peer, code, id } => (
            "auth_failed",
            json!({ "peer": peer.to_string(), "code": code.as_u16(), "reason": code.name(), "id": id }),
        ),
        _ => return None,
    })
}

/// A running registration channel.
pub struct Started {
    /// Its handle (services, keys, metrics).
    pub registry: registry::Registry,
    /// The server, to serve until shutdown.
    pub server: registry::RegistryServer,
}

/// Opens the key store and binds the channel.
pub async fn start(spec: &crate::config::RegistrySpec) -> Result<Started, String> {
    let keys =
        registry::KeyStore::open(spec.keys_dir.clone()).map_err(|e| format!("keys_dir: {e}"))?;
    let server = registry::RegistryServer::bind(spec.options.clone(), keys)
        .await
        .map_err(|e| format!("listen {}: {e}", spec.options.listen))?;
    Ok(Started {
        registry: server.registry(),
        server,
    })
}

/// Forwards registry events to the admin events until shutdown; `apply`
/// sees each one first (the ingress route table).
pub async fn forward(
    registry: registry::Registry,
    events: Events,
    apply: Arc<dyn Fn(&registry::Event) + Send + Sync>,
    shutdown: CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    let mut rx = registry.subscribe();
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return,
            next = rx.recv() => next,
        };
        match next {
            Ok(e) => {
                apply(&e);
                if let Some((kind, data)) = event_json(&e) {
                    events.publish(kind, data);
                }
            }
            Err(RecvError::Lagged(n)) => {
                // The route table must not miss a change: rebuild it from a
                // snapshot is the ingress's job; say so loudly.
                tracing::warn!(missed = n, "registry events lagged");
                events.publish("lagged", json!({ "source": "registry", "missed": n }));
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Prefix of the routes created for registered services.
const REGISTERED: &str = "registered:";

/// Keeps an ingress route table in step with the registry: a registered
/// service becomes one backend per route it asked for (in the route with
/// the same host and path prefix, created when there is none), with the
/// service's weight; draining and removal follow the registry.
pub struct RouteSync {
    table: gateway::ingress::RouteTable,
    /// Service id → the (route, backend id) pairs it put in the table.
    placed: std::sync::Mutex<std::collections::HashMap<String, Vec<(String, String)>>>,
}

impl RouteSync {
    /// Syncs into `table`.
    pub fn new(table: gateway::ingress::RouteTable) -> RouteSync {
        RouteSync {
            table,
            placed: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Puts `backend` into the route matching (`host`, `path`), creating
    /// that route with the backend in one step when there is none (so no
    /// request sees it empty). Returns the route's name.
    fn place(
        &self,
        host: &str,
        path: &str,
        backend: gateway::ingress::Backend,
    ) -> Result<String, String> {
        use gateway::ingress as gi;
        let host = (!host.is_empty() && host != "*").then_some(host);
        let want = gi::RouteMatch::new(host, path);
        let snap = self.table.snapshot();
        if let Some(r) = snap.routes.iter().find(|r| r.matches.contains(&want)) {
            self.table
                .upsert_backend(&r.name, backend)
                .map_err(|e| e.to_string())?;
            return Ok(r.name.clone());
        }
        let name = format!("{REGISTERED}{}{}", host.unwrap_or("*"), path);
        self.table
            .upsert_route(gi::Route::new(name.clone(), want).with_backend(backend))
            .map_err(|e| e.to_string())?;
        Ok(name)
    }

    /// Removes backends, then the routes this sync created that are left
    /// empty (a departed host answers 404 again, and the table does not
    /// grow with every host ever registered).
    fn remove_all(&self, placed: Vec<(String, String)>) {
        for (route, id) in &placed {
            let _ = self.table.remove(id);
            if route.starts_with(REGISTERED) {
                let snap = self.table.snapshot();
                if snap.route(route).is_some_and(|r| r.backends.is_empty()) {
                    let _ = self.table.remove_route(route);
                }
            }
        }
    }

    /// The backend ids `service` has in the table.
    fn placed_of(&self, service: &str) -> Vec<(String, String)> {
        self.placed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    fn take(&self, service: &str) -> Vec<(String, String)> {
        self.placed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(service)
            .unwrap_or_default()
    }

    /// Applies one registry event.
    pub fn apply(&self, e: &registry::Event) {
        use registry::Event as E;
        match e {
            E::Registered { service } => {
                // An upsert: what the service had before goes first.
                let before = self.take(&service.id);
                let mut placed = Vec::new();
                for r in &service.routes {
                    let id = format!("{}@{}{}", service.id, r.host, r.path_prefix);
                    let b = gateway::ingress::Backend::new(id.clone(), service.addr)
                        .with_weight(service.weight.max(1));
                    match self.place(&r.host, &r.path_prefix, b) {
                        Ok(route) => placed.push((route, id)),
                        Err(err) => {
                            tracing::warn!(service = %service.id, error = %err, "backend not added");
                        }
                    }
                }
                // Old placements not renewed go (after the new ones are in).
                let stale: Vec<_> = before.into_iter().filter(|p| !placed.contains(p)).collect();
                self.remove_all(stale);
                self.placed
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(service.id.clone(), placed);
            }
            E::Deregistered { service, .. } => {
                let placed = self.take(service);
                self.remove_all(placed);
            }
            E::Draining {
                service, deadline, ..
            } => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let placed = self.placed_of(service);
                for (_, id) in placed {
                    // Draining at once (no new requests); the registry's
                    // Deregistered, after its drain_timeout, removes it.
                    // The returned future (waiting for in-flight requests)
                    // is not needed for that.
                    drop(self.table.drain(&id, left));
                }
            }
            E::WeightChanged {
                service, weight, ..
            } => {
                let placed = self.placed_of(service);
                for (_, id) in placed {
                    let _ = self.table.set_weight(&id, (*weight).max(1));
                }
            }
            _ => {}
        }
    }
}

/// Reloads the registration channel's certificates when their files
/// change (checked every 2 s) until `shutdown`; a bad new file keeps the
/// old certificates and says why.
pub async fn watch_certs(certs: Arc<gateway::ingress::CertStore>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(2));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let c = Arc::clone(&certs);
        match tokio::task::spawn_blocking(move || c.reload_if_changed()).await {
            Ok(Ok(true)) => {
                tracing::info!(names = ?certs.names(), "registry: certificates reloaded")
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "registry: certificate reload failed; keeping the old ones")
            }
            Err(e) => tracing::warn!(error = %e, "registry: certificate reload failed"),
        }
    }
}
