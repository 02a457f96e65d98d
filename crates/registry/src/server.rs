//! The registry server: listener, options, shared state, events, metrics.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, broadcast, mpsc, watch};
use tokio::task::JoinSet;

use crate::keys::{KeyEntry, KeyError, KeyId, KeyStore, Role};
use crate::proto::{self, Code, RegisterPayload, Route};

/// Capacity of the event channel; a subscriber that falls further behind
/// gets `RecvError::Lagged` and should resync with
/// [`Registry::subscribe_with_snapshot`].
const EVENT_CAPACITY: usize = 4096;

/// Options of a [`RegistryServer`].
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Where to listen. Default `127.0.0.1:3042`.
    pub listen: SocketAddr,
    /// URLs agents may dial besides `ws(s)://<the address they connected
    /// to>`, e.g. `wss://proxy.example.com:3042` behind a name or NAT. An
    /// agent signs the URL it dialed; a signature for any other channel is
    /// refused (4001).
    pub advertised: Vec<String>,
    /// TLS: when set, the listener speaks `wss://` only, and signatures are
    /// bound to the TLS session too.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// How often the server pings each agent. Default 1 s.
    pub heartbeat_interval: Duration,
    /// An agent that sends nothing (not even a pong) for this long is
    /// removed at once. Default 3 s.
    pub heartbeat_timeout: Duration,
    /// Time from accept to a valid answer to the challenge (TLS and the
    /// WebSocket upgrade included). Default 5 s.
    pub handshake_timeout: Duration,
    /// How long a draining service keeps its in-flight requests before it
    /// is removed. Default 30 s.
    pub drain_timeout: Duration,
    /// Concurrent connections (authenticated or not); more are dropped at
    /// accept. Default 1024.
    pub max_connections: usize,
    /// Largest message (and frame) accepted. Default 64 KiB.
    pub max_message_bytes: usize,
    /// Services one agent may register. Default 64.
    pub max_services_per_agent: usize,
    /// Who may connect at all, decided at accept before a byte is read
    /// (a refused peer is reset and counted as refused). Default: anyone.
    pub admit: Option<Admit>,
}

/// An accept-time check of peers ([`RegistryOptions::admit`]), e.g. an IP
/// rule set.
#[derive(Clone)]
pub struct Admit(pub Arc<dyn Fn(SocketAddr) -> bool + Send + Sync>);

impl std::fmt::Debug for Admit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admit(..)")
    }
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 3042)),
            advertised: Vec::new(),
            tls: None,
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_message_bytes: 64 * 1024,
            max_services_per_agent: 64,
            admit: None,
        }
    }
}

/// Errors of the registry server.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The options are inconsistent.
    #[error("registry options: {0}")]
    Options(String),
    /// A key store operation failed.
    #[error(transparent)]
    Keys(#[from] KeyError),
}

/// A registered service: where to send the requests of its routes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    /// `<agent>/<name>`: unique, and an agent can only name its own.
    pub id: String,
    /// The agent (key id) that registered it.
    pub agent: KeyId,
    /// The name the agent gave it.
    pub name: String,
    /// The backend address.
    pub addr: SocketAddr,
    /// The routes it serves.
    pub routes: Vec<Route>,
    /// Load-balancing weight (0 to 10000; 0 takes no new requests).
    pub weight: u32,
    /// The version the agent reports, if any.
    pub version: Option<String>,
    /// Free-form labels.
    pub metadata: BTreeMap<String, String>,
}

/// What happened in the registry. The binary maps service events onto its
/// route table and publishes all of them on the admin events stream.
///
/// `Registered` is an upsert: the same id again replaces the service (and
/// ends a drain).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A service was registered or updated.
    Registered {
        /// The service.
        service: Service,
    },
    /// A service was removed: route no more requests to it.
    Deregistered {
        /// The service id.
        service: String,
        /// Its agent.
        agent: KeyId,
    },
    /// A service takes no new requests; in-flight ones have until
    /// `deadline`, when it is removed.
    Draining {
        /// The service id.
        service: String,
        /// Its agent.
        agent: KeyId,
        /// When it will be removed.
        deadline: Instant,
    },
    /// A service's weight changed.
    WeightChanged {
        /// The service id.
        service: String,
        /// Its agent.
        agent: KeyId,
        /// The new weight.
        weight: u32,
    },
    /// A custom message from an agent.
    Custom {
        /// The sender.
        agent: KeyId,
        /// The message's `header.type`.
        kind: String,
        /// The message's `header.action`.
        action: String,
        /// The message's payload.
        payload: serde_json::Value,
    },
    /// A key was added.
    KeyAdded {
        /// The new key's id.
        id: KeyId,
        /// Its role.
        role: Role,
        /// The admin key that added it (`None`: through [`Registry::add_key`]).
        by: Option<KeyId>,
    },
    /// A key was revoked; its live connection was closed with 4003.
    KeyRevoked {
        /// The revoked key's id.
        id: KeyId,
        /// The admin key that revoked it (`None`: through [`Registry::revoke_key`]).
        by: Option<KeyId>,
    },
    /// A key authenticated.
    AgentConnected {
        /// Its id.
        agent: KeyId,
        /// Its role.
        role: Role,
        /// Where it connected from.
        peer: SocketAddr,
    },
    /// An authenticated connection ended.
    AgentDisconnected {
        /// Its id.
        agent: KeyId,
        /// Where it connected from.
        peer: SocketAddr,
        /// Why: 1000 (closed by the agent), 1001, 4003, 4010, 4011, …
        code: Code,
    },
    /// A handshake failed; nothing changed.
    AuthFailed {
        /// Where the attempt came from.
        peer: SocketAddr,
        /// 4001 (bad signature, replay, wrong channel), 4002, 4003, 4004 or 4008.
        code: Code,
        /// The id claimed, if the answer got that far.
        id: Option<String>,
    },
}

/// Counters of one registry, read with [`Registry::metrics`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Metrics {
    /// Connections accepted.
    pub connections_accepted: u64,
    /// Connections dropped at accept because `max_connections` was reached.
    pub connections_refused: u64,
    /// Successful handshakes.
    pub handshakes_ok: u64,
    /// Failed handshakes by close code name (`auth_failed`, `unknown_id`,
    /// `revoked`, `handshake_timeout`, `protocol_error`).
    pub handshakes_failed: BTreeMap<&'static str, u64>,
    /// Authenticated connections now (gauge).
    pub agents_connected: u64,
    /// Registered services now, draining ones included (gauge).
    pub services: u64,
    /// Requests handled, by `type.action` for built-in messages
    /// (`service.register`, `key.add`, …) and `custom` for the others.
    pub messages: BTreeMap<&'static str, u64>,
    /// Error frames sent, by code name (`forbidden`, `protocol_error`, …).
    pub errors: BTreeMap<&'static str, u64>,
    /// Agents removed because their heartbeat stopped.
    pub heartbeat_timeouts: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub handshakes_ok: AtomicU64,
    pub heartbeat_timeouts: AtomicU64,
    pub agents_connected: AtomicU64,
    /// Indexed by `code_slot`.
    handshakes_failed: [AtomicU64; HANDSHAKE_CODES.len()],
    errors: [AtomicU64; ERROR_CODES.len()],
    messages: [AtomicU64; MESSAGE_KINDS.len()],
}

const HANDSHAKE_CODES: [Code; 5] = [
    Code::AuthFailed,
    Code::UnknownId,
    Code::Revoked,
    Code::HandshakeTimeout,
    Code::ProtocolError,
];
const ERROR_CODES: [Code; 8] = [
    Code::Forbidden,
    Code::Conflict,
    Code::NotFound,
    Code::ProtocolError,
    Code::Invalid,
    Code::Limit,
    Code::Internal,
    Code::TooBig,
];
pub(crate) const MESSAGE_KINDS: [&str; 7] = [
    "service.register",
    "service.deregister",
    "service.drain",
    "service.set_weight",
    "key.add",
    "key.revoke",
    "custom",
];

impl Counters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn handshake_failed(&self, code: Code) {
        if let Some(i) = HANDSHAKE_CODES.iter().position(|c| *c == code) {
            Self::inc(&self.handshakes_failed[i]);
        }
    }

    pub fn error(&self, code: Code) {
        if let Some(i) = ERROR_CODES.iter().position(|c| *c == code) {
            Self::inc(&self.errors[i]);
        }
    }

    pub fn message(&self, kind: &str) {
        if let Some(i) = MESSAGE_KINDS.iter().position(|k| *k == kind) {
            Self::inc(&self.messages[i]);
        }
    }
}

/// Control messages to a live session.
#[derive(Debug)]
pub(crate) enum Ctl {
    Close(Code, String),
}

struct SessionSlot {
    session: u64,
    ctl: mpsc::Sender<Ctl>,
}

struct Entry {
    service: Service,
    session: u64,
    draining: Option<Instant>,
    /// Inherited from a superseded connection: removed unless registered
    /// again by then.
    confirm_by: Option<Instant>,
}

#[derive(Default)]
struct State {
    services: BTreeMap<String, Entry>,
    sessions: HashMap<KeyId, SessionSlot>,
    next_session: u64,
}

impl State {
    /// Starts draining service `id` (no new requests; removed at
    /// `deadline`): its event, or `None` if it is unknown or drains
    /// already.
    fn start_drain(&mut self, id: &str, deadline: Instant) -> Option<Event> {
        let e = self.services.get_mut(id)?;
        if e.draining.is_some() {
            return None;
        }
        e.draining = Some(deadline);
        e.confirm_by = None;
        Some(Event::Draining {
            service: id.to_owned(),
            agent: e.service.agent.clone(),
            deadline,
        })
    }

    /// Removes service `id`: its event, or `None` if it is unknown.
    fn remove_service(&mut self, id: &str) -> Option<Event> {
        let e = self.services.remove(id)?;
        Some(Event::Deregistered {
            service: id.to_owned(),
            agent: e.service.agent,
        })
    }
}

/// A service's id: `AGENT/NAME`.
pub(crate) fn service_id(agent: &KeyId, name: &str) -> String {
    format!("{agent}/{name}")
}

/// How an authenticated session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// The agent closed the channel: drain its services.
    Clean,
    /// The channel died (EOF without close, I/O error, heartbeat, protocol
    /// abuse) or the key was revoked: remove its services now.
    Abrupt(Code),
    /// A newer connection of the same id took the services over.
    Superseded,
    /// The server is shutting down: leave the services as they are.
    Shutdown,
}

impl End {
    /// The close code the channel ends with.
    pub(crate) fn code(self) -> Code {
        match self {
            End::Clean => Code::Normal,
            End::Abrupt(code) => code,
            End::Superseded => Code::Superseded,
            End::Shutdown => Code::GoingAway,
        }
    }
}

pub(crate) struct Inner {
    pub opts: RegistryOptions,
    /// `opts.advertised`, normalized once (as agents sign them).
    pub advertised: Vec<String>,
    pub keys: RwLock<KeyStore>,
    /// Held by whoever changes the key files (add, revoke, rescan), for
    /// the whole change, so that changes do not interleave; handshakes
    /// only take `keys` for a read.
    pub key_writer: Mutex<()>,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    pub counters: Counters,
    reaper: Notify,
}

/// A handle on the registry's state: events, the current services, metrics
/// and key management. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("listen", &self.inner.opts.listen)
            .finish_non_exhaustive()
    }
}

/// A request refused: the code and a message for the error frame.
pub(crate) type Refusal = (Code, String);

impl Registry {
    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// The services that take new requests (registered, not draining),
    /// sorted by id.
    pub fn snapshot(&self) -> Vec<Service> {
        let st = self.lock();
        Self::active(&st)
    }

    /// The current services and the events that follow them, with nothing
    /// lost or repeated in between.
    pub fn subscribe_with_snapshot(&self) -> (Vec<Service>, broadcast::Receiver<Event>) {
        let st = self.lock();
        (Self::active(&st), self.inner.events.subscribe())
    }

    fn active(st: &State) -> Vec<Service> {
        st.services
            .values()
            .filter(|e| e.draining.is_none())
            .map(|e| e.service.clone())
            .collect()
    }

    /// Current counters.
    pub fn metrics(&self) -> Metrics {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let services = self.lock().services.len() as u64;
        Metrics {
            connections_accepted: get(&c.connections_accepted),
            connections_refused: get(&c.connections_refused),
            handshakes_ok: get(&c.handshakes_ok),
            handshakes_failed: HANDSHAKE_CODES
                .iter()
                .zip(&c.handshakes_failed)
                .map(|(k, v)| (k.name(), get(v)))
                .collect(),
            agents_connected: get(&c.agents_connected),
            services,
            messages: MESSAGE_KINDS
                .iter()
                .zip(&c.messages)
                .map(|(k, v)| (*k, get(v)))
                .collect(),
            errors: ERROR_CODES
                .iter()
                .zip(&c.errors)
                .map(|(k, v)| (k.name(), get(v)))
                .collect(),
            heartbeat_timeouts: get(&c.heartbeat_timeouts),
        }
    }

    /// The active keys.
    pub fn keys(&self) -> Vec<KeyEntry> {
        self.read_keys().iter().cloned().collect()
    }

    /// Rescans the key store's directory. Connections whose key disappeared
    /// or changed (key or role) are closed with 4003 and their services
    /// removed. On error nothing changes.
    pub fn reload_keys(&self) -> Result<(), KeyError> {
        // Read from disk without the key lock, swapped in under it.
        let _writer = self.key_writer();
        let dir = self.read_keys().dir().to_owned();
        let fresh = KeyStore::open(&dir)?;
        let mut keys = self.write_keys();
        let before = std::mem::replace(&mut *keys, fresh);
        let st = self.lock();
        for (id, slot) in &st.sessions {
            let same = match (before.get(id), keys.get(id)) {
                (Some(a), Some(b)) => a.public_key == b.public_key && a.role == b.role,
                _ => false,
            };
            if !same {
                let _ = slot
                    .ctl
                    .try_send(Ctl::Close(Code::Revoked, "key changed or removed".into()));
            }
        }
        Ok(())
    }

    /// Adds a key to the store (as the `key/add` message does).
    pub fn add_key(&self, entry: KeyEntry) -> Result<(), KeyError> {
        self.add_key_by(entry, None)
    }

    /// Revokes a key (as the `key/revoke` message does): its file moves to
    /// `revoked/`, its live connection is closed with 4003 and its services
    /// are removed.
    pub fn revoke_key(&self, id: &KeyId) -> Result<(), KeyError> {
        self.revoke_key_by(id, None)
    }

    pub(crate) fn add_key_by(&self, entry: KeyEntry, by: Option<KeyId>) -> Result<(), KeyError> {
        let (id, role) = (entry.id.clone(), entry.role);
        // The file is written (and synced) without the key lock, which
        // every handshake reads.
        let _writer = self.key_writer();
        let path = self.read_keys().check_add(&id)?;
        crate::keys::write_new(&path, &entry)?;
        self.write_keys().added(entry);
        let _st = self.lock();
        self.emit(Event::KeyAdded { id, role, by });
        Ok(())
    }

    pub(crate) fn revoke_key_by(&self, id: &KeyId, by: Option<KeyId>) -> Result<(), KeyError> {
        let _writer = self.key_writer();
        let dir = {
            let keys = self.read_keys();
            keys.check_revoke(id)?;
            keys.dir().to_owned()
        };
        crate::keys::move_to_revoked(&dir, id)?;
        // Renamed: revoked, whatever the sync below says (the file is no
        // longer where a restart would take it from).
        self.write_keys().revoked_now(id);
        let synced = crate::keys::sync_revoked(&dir);
        let st = self.lock();
        self.emit(Event::KeyRevoked { id: id.clone(), by });
        if let Some(slot) = st.sessions.get(id) {
            let _ = slot
                .ctl
                .try_send(Ctl::Close(Code::Revoked, "key revoked".into()));
        }
        synced
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // No code path panics while holding the lock; recover regardless.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `key` is still the active key of its id, with the same
    /// public key and role.
    pub(crate) fn key_unchanged(&self, key: &KeyEntry) -> bool {
        self.read_keys()
            .get(&key.id)
            .is_some_and(|k| k.public_key == key.public_key && k.role == key.role)
    }

    pub(crate) fn read_keys(&self) -> std::sync::RwLockReadGuard<'_, KeyStore> {
        self.inner.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    fn key_writer(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .key_writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn write_keys(&self) -> std::sync::RwLockWriteGuard<'_, KeyStore> {
        self.inner.keys.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends an event; called with the state lock held so that events are
    /// ordered like the changes they describe.
    pub(crate) fn emit(&self, ev: Event) {
        let _ = self.inner.events.send(ev);
    }

    /// Records a new authenticated session; closes (supersedes) an older
    /// one of the same id and takes its services over until they are
    /// registered again or `heartbeat_timeout` passes.
    pub(crate) fn open_session(
        &self,
        agent: &KeyId,
        role: Role,
        peer: SocketAddr,
        ctl: mpsc::Sender<Ctl>,
    ) -> u64 {
        let mut st = self.lock();
        st.next_session += 1;
        let session = st.next_session;
        if let Some(old) = st
            .sessions
            .insert(agent.clone(), SessionSlot { session, ctl })
        {
            let _ = old.ctl.try_send(Ctl::Close(
                Code::Superseded,
                "a newer connection of this id".into(),
            ));
            let confirm_by = Instant::now() + self.inner.opts.heartbeat_timeout;
            for e in st.services.values_mut() {
                if e.session == old.session {
                    e.session = session;
                    if e.draining.is_none() {
                        e.confirm_by = Some(confirm_by);
                    }
                }
            }
            self.inner.reaper.notify_one();
        }
        Counters::inc(&self.inner.counters.agents_connected);
        self.emit(Event::AgentConnected {
            agent: agent.clone(),
            role,
            peer,
        });
        session
    }

    /// Ends a session: drains or removes what it owns.
    pub(crate) fn close_session(&self, session: u64, agent: &KeyId, peer: SocketAddr, end: End) {
        let mut st = self.lock();
        if st.sessions.get(agent).is_some_and(|s| s.session == session) {
            st.sessions.remove(agent);
        }
        self.inner
            .counters
            .agents_connected
            .fetch_sub(1, Ordering::Relaxed);
        let owned: Vec<String> = st
            .services
            .iter()
            .filter(|(_, e)| e.session == session)
            .map(|(k, _)| k.clone())
            .collect();
        match end {
            End::Clean => {
                let deadline = Instant::now() + self.inner.opts.drain_timeout;
                for id in owned {
                    if let Some(ev) = st.start_drain(&id, deadline) {
                        self.emit(ev);
                    }
                }
                self.inner.reaper.notify_one();
            }
            End::Abrupt(_) => {
                for id in owned {
                    if let Some(ev) = st.remove_service(&id) {
                        self.emit(ev);
                    }
                }
            }
            End::Superseded | End::Shutdown => {}
        }
        self.emit(Event::AgentDisconnected {
            agent: agent.clone(),
            peer,
            code: end.code(),
        });
    }

    /// `service/register`.
    pub(crate) fn register(
        &self,
        session: u64,
        key: &KeyEntry,
        peer: SocketAddr,
        p: RegisterPayload,
    ) -> Result<Service, Refusal> {
        let invalid = |m: String| (Code::Invalid, m);
        if !crate::keys::is_valid_name(&p.name, false) {
            return Err(invalid(format!(
                "service name `{}`: expected 1-64 characters of a-z 0-9 . _ -, starting with a letter or digit",
                p.name
            )));
        }
        let addr: SocketAddr = p.addr.parse().map_err(|_| {
            invalid(format!(
                "addr `{}`: expected an IP address and port",
                p.addr
            ))
        })?;
        let ip = addr.ip().to_canonical();
        if ip.is_unspecified() || ip.is_multicast() || addr.port() == 0 {
            return Err(invalid(format!(
                "addr `{addr}`: not a unicast address and port"
            )));
        }
        if !key.allows(ip, peer.ip()) {
            return Err((
                Code::Forbidden,
                format!("key `{}` may not register services at {ip}", key.id),
            ));
        }
        if p.routes.is_empty() || p.routes.len() > proto::MAX_ROUTES {
            return Err(invalid(format!(
                "routes: expected 1 to {} routes",
                proto::MAX_ROUTES
            )));
        }
        let mut routes = Vec::with_capacity(p.routes.len());
        for r in p.routes {
            proto::check_route(&r).map_err(invalid)?;
            if !routes.contains(&r) {
                routes.push(r);
            }
        }
        if p.weight > proto::MAX_WEIGHT {
            return Err(invalid(format!(
                "weight {}: at most {}",
                p.weight,
                proto::MAX_WEIGHT
            )));
        }
        if let Some(v) = &p.version
            && (v.is_empty() || v.len() > 64 || !v.bytes().all(|c| c.is_ascii_graphic()))
        {
            return Err(invalid("version: 1-64 printable ASCII characters".into()));
        }
        if p.metadata.len() > proto::MAX_METADATA
            || p.metadata
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 64 || v.len() > 1024)
        {
            return Err(invalid(format!(
                "metadata: at most {} entries, keys of 1-64 bytes, values of at most 1024",
                proto::MAX_METADATA
            )));
        }
        let id = service_id(&key.id, &p.name);
        let service = Service {
            id: id.clone(),
            agent: key.id.clone(),
            name: p.name,
            addr,
            routes,
            weight: p.weight,
            version: p.version,
            metadata: p.metadata,
        };
        let mut st = self.lock();
        current(&st, &key.id, session)?;
        if !st.services.contains_key(&id) {
            let prefix = format!("{}/", key.id);
            let count = st
                .services
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .count();
            if count >= self.inner.opts.max_services_per_agent {
                return Err((
                    Code::Limit,
                    format!(
                        "at most {} services per agent",
                        self.inner.opts.max_services_per_agent
                    ),
                ));
            }
        }
        st.services.insert(
            id,
            Entry {
                service: service.clone(),
                session,
                draining: None,
                confirm_by: None,
            },
        );
        self.emit(Event::Registered {
            service: service.clone(),
        });
        Ok(service)
    }

    /// `service/drain`: returns the deadline.
    pub(crate) fn drain(
        &self,
        session: u64,
        agent: &KeyId,
        name: &str,
    ) -> Result<Instant, Refusal> {
        let id = service_id(agent, name);
        let mut st = self.lock();
        current(&st, agent, session)?;
        let e = st.services.get(&id).ok_or_else(|| not_found(&id))?;
        if let Some(d) = e.draining {
            return Ok(d);
        }
        let deadline = Instant::now() + self.inner.opts.drain_timeout;
        if let Some(ev) = st.start_drain(&id, deadline) {
            self.emit(ev);
        }
        self.inner.reaper.notify_one();
        Ok(deadline)
    }

    /// `service/deregister`: removes at once.
    pub(crate) fn deregister(
        &self,
        session: u64,
        agent: &KeyId,
        name: &str,
    ) -> Result<(), Refusal> {
        let id = service_id(agent, name);
        let mut st = self.lock();
        current(&st, agent, session)?;
        let ev = st.remove_service(&id).ok_or_else(|| not_found(&id))?;
        self.emit(ev);
        Ok(())
    }

    /// `service/set_weight`.
    pub(crate) fn set_weight(
        &self,
        session: u64,
        agent: &KeyId,
        name: &str,
        weight: u32,
    ) -> Result<(), Refusal> {
        if weight > proto::MAX_WEIGHT {
            return Err((
                Code::Invalid,
                format!("weight {weight}: at most {}", proto::MAX_WEIGHT),
            ));
        }
        let id = service_id(agent, name);
        let mut st = self.lock();
        current(&st, agent, session)?;
        let e = st.services.get_mut(&id).ok_or_else(|| not_found(&id))?;
        if e.service.weight != weight {
            e.service.weight = weight;
            self.emit(Event::WeightChanged {
                service: id,
                agent: agent.clone(),
                weight,
            });
        }
        Ok(())
    }

    /// A custom message.
    pub(crate) fn custom(
        &self,
        agent: &KeyId,
        kind: String,
        action: String,
        payload: serde_json::Value,
    ) {
        let _st = self.lock();
        self.emit(Event::Custom {
            agent: agent.clone(),
            kind,
            action,
            payload,
        });
    }

    pub(crate) fn auth_failed(&self, peer: SocketAddr, code: Code, id: Option<String>) {
        self.inner.counters.handshake_failed(code);
        let _st = self.lock();
        self.emit(Event::AuthFailed { peer, code, id });
    }

    /// Removes services whose drain or take-over deadline passed; returns
    /// the next deadline.
    fn reap(&self, now: Instant) -> Option<Instant> {
        let mut st = self.lock();
        let due: Vec<String> = st
            .services
            .iter()
            .filter(|(_, e)| e.draining.or(e.confirm_by).is_some_and(|d| d <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for id in due {
            if let Some(ev) = st.remove_service(&id) {
                self.emit(ev);
            }
        }
        st.services
            .values()
            .filter_map(|e| e.draining.or(e.confirm_by))
            .min()
    }
}

fn not_found(id: &str) -> Refusal {
    (Code::NotFound, format!("no service `{id}`"))
}

/// The control-channel listener. Bind it, keep a [`Registry`] handle, then
/// [`serve`](RegistryServer::serve) until shutdown.
#[derive(Debug)]
pub struct RegistryServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    registry: Registry,
}

/// Refuses a service change from a connection a newer one of the same id
/// has superseded: its services were handed over to the newer one, and a
/// message still queued on the old connection must not take them back or
/// change them (the old connection's end does not clean up after it).
fn current(st: &State, agent: &KeyId, session: u64) -> Result<(), Refusal> {
    if st.sessions.get(agent).is_some_and(|s| s.session == session) {
        Ok(())
    } else {
        Err((
            Code::Superseded,
            "a newer connection of this id took over".into(),
        ))
    }
}

impl RegistryServer {
    /// Checks the options and binds the listener.
    pub async fn bind(
        opts: RegistryOptions,
        keys: KeyStore,
    ) -> Result<RegistryServer, RegistryError> {
        if opts.heartbeat_interval.is_zero() || opts.heartbeat_timeout <= opts.heartbeat_interval {
            return Err(RegistryError::Options(format!(
                "heartbeat_timeout ({:?}) must be longer than heartbeat_interval ({:?}), which must not be zero",
                opts.heartbeat_timeout, opts.heartbeat_interval
            )));
        }
        if opts.handshake_timeout.is_zero()
            || opts.max_connections == 0
            || opts.max_message_bytes < 1024
        {
            return Err(RegistryError::Options(
                "handshake_timeout and max_connections must not be zero; max_message_bytes at least 1024".into(),
            ));
        }
        let mut advertised = Vec::with_capacity(opts.advertised.len());
        for url in &opts.advertised {
            let norm = proto::normalize_channel(url)
                .map_err(|e| RegistryError::Options(format!("advertised: {e}")))?;
            if norm.starts_with("wss:") != opts.tls.is_some() {
                return Err(RegistryError::Options(format!(
                    "advertised `{url}`: the scheme must be wss:// with TLS and ws:// without"
                )));
            }
            advertised.push(norm);
        }
        let listener =
            TcpListener::bind(opts.listen)
                .await
                .map_err(|source| RegistryError::Bind {
                    addr: opts.listen,
                    source,
                })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| RegistryError::Bind {
                addr: opts.listen,
                source,
            })?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let registry = Registry {
            inner: Arc::new(Inner {
                opts,
                advertised,
                keys: RwLock::new(keys),
                key_writer: Mutex::new(()),
                state: Mutex::new(State::default()),
                events,
                counters: Counters::default(),
                reaper: Notify::new(),
            }),
        };
        Ok(RegistryServer {
            listener,
            local_addr,
            registry,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle on the registry.
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// Accepts and serves agents until `shutdown` completes; then closes
    /// every connection with 1001 and returns. Registered services are left
    /// as they are (no events): the process is going away with them.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let RegistryServer {
            listener, registry, ..
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(registry.inner.opts.max_connections));
        let mut tasks = JoinSet::new();
        {
            let registry = registry.clone();
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                loop {
                    let next = registry.reap(Instant::now());
                    let sleep = async {
                        match next {
                            Some(t) => tokio::time::sleep_until(t.into()).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = sleep => {}
                        _ = registry.inner.reaper.notified() => {}
                        _ = stop.changed() => return,
                    }
                }
            });
        }
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = res
                        && e.is_panic()
                    {
                        tracing::error!("registry connection task panicked: {e}");
                    }
                }
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!("registry accept: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    if let Some(admit) = &registry.inner.opts.admit
                        && !(admit.0)(peer)
                    {
                        Counters::inc(&registry.inner.counters.connections_refused);
                        // An RST, not a FIN: nothing more to say to it.
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        drop(stream);
                        continue;
                    }
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        Counters::inc(&registry.inner.counters.connections_refused);
                        drop(stream);
                        continue;
                    };
                    Counters::inc(&registry.inner.counters.connections_accepted);
                    let registry = registry.clone();
                    let stop = stop_rx.clone();
                    tasks.spawn(async move {
                        crate::session::run(registry, stream, peer, stop).await;
                        drop(permit);
                    });
                }
            }
        }
        drop(listener);
        let _ = stop_tx.send(true);
        let grace = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(2), grace)
            .await
            .is_err()
        {
            tasks.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(dir: &std::path::Path) -> Registry {
        std::fs::create_dir_all(dir).unwrap();
        Registry {
            inner: Arc::new(Inner {
                opts: RegistryOptions::default(),
                advertised: Vec::new(),
                keys: RwLock::new(KeyStore::open(dir).unwrap()),
                key_writer: Mutex::new(()),
                state: Mutex::new(State::default()),
                events: broadcast::channel(64).0,
                counters: Counters::default(),
                reaper: Notify::new(),
            }),
        }
    }

    fn payload(name: &str, weight: u32) -> RegisterPayload {
        RegisterPayload {
            name: name.into(),
            addr: "127.0.0.1:8081".into(),
            routes: vec![Route {
                host: "example.com".into(),
                path_prefix: "/".into(),
            }],
            weight,
            version: None,
            metadata: BTreeMap::new(),
        }
    }

    #[test]
    fn a_superseded_connection_can_no_longer_change_the_services_it_handed_over() {
        let dir = std::env::temp_dir().join(format!("ippool-registry-sup-{}", std::process::id()));
        let r = registry(&dir);
        let id: KeyId = "web001".parse().unwrap();
        let key = KeyEntry {
            id: id.clone(),
            public_key: ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key(),
            role: Role::Agent,
            allow: Vec::new(),
        };
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let (old_tx, mut old_rx) = mpsc::channel(4);
        let old = r.open_session(&id, Role::Agent, peer, old_tx);
        r.register(old, &key, peer, payload("svc", 1)).unwrap();
        let (new_tx, _new_rx) = mpsc::channel(4);
        let new = r.open_session(&id, Role::Agent, peer, new_tx);
        assert!(
            matches!(old_rx.try_recv(), Ok(Ctl::Close(Code::Superseded, _))),
            "the old connection is told to close"
        );
        // Messages still queued on the old connection are refused...
        let refused = |res: Result<(), Refusal>| matches!(res, Err((Code::Superseded, _)));
        assert!(refused(
            r.register(old, &key, peer, payload("svc", 9)).map(drop)
        ));
        assert!(refused(
            r.register(old, &key, peer, payload("other", 1)).map(drop)
        ));
        assert!(refused(r.set_weight(old, &id, "svc", 5)));
        assert!(refused(r.drain(old, &id, "svc").map(drop)));
        assert!(refused(r.deregister(old, &id, "svc")));
        // ...and the service is the newer connection's, unchanged.
        {
            let st = r.lock();
            assert_eq!(st.services.len(), 1);
            let e = &st.services["web001/svc"];
            assert_eq!((e.session, e.service.weight, e.draining), (new, 1, None));
        }
        // The old connection's end leaves it alone; the newer one may change it.
        r.close_session(old, &id, peer, End::Superseded);
        r.set_weight(new, &id, "svc", 4).unwrap();
        r.close_session(new, &id, peer, End::Abrupt(Code::Normal));
        assert!(r.lock().services.is_empty(), "removed with its connection");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
