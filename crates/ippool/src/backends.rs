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
