//! The agent: a backend's client of the control channel.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use futures_util::{SinkExt, StreamExt};
use rand::RngExt;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header::SEC_WEBSOCKET_PROTOCOL};

use crate::keys::{Allow, KeyId, Role};
use crate::proto::{self, Code, Envelope, Route};
use crate::session::{Io, Ws, ws_config};

/// Largest message the agent accepts from the server.
const MAX_MESSAGE: usize = 1 << 20;
/// How long shutdown waits for the server to acknowledge the drains.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Errors of the agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The builder's settings are wrong (URL, TLS, services).
    #[error("agent configuration: {0}")]
    Config(String),
    /// The agent is not connected right now (it is reconnecting).
    #[error("not connected to the registry")]
    NotConnected,
    /// The connection was lost before the server answered.
    #[error("the connection to the registry was lost")]
    Disconnected,
    /// The agent has been shut down.
    #[error("the agent is stopped")]
    Stopped,
    /// The server refused the request with an error frame.
    #[error("refused by the registry: {code} {reason}: {message}")]
    Refused {
        /// The numeric code (see [`Code`]).
        code: u16,
        /// The code's name (`forbidden`, `invalid`, …).
        reason: String,
        /// The server's explanation.
        message: String,
    },
}

/// What the agent is doing, observed with [`Agent::state`] and [`Agent::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentState {
    /// Connecting and authenticating.
    Connecting,
    /// Authenticated; registering the services.
    Connected,
    /// Authenticated and every service registered (at once when there are none).
    Registered,
    /// Authenticated, but the server refused a registration; the agent stays
    /// connected and tries again after the next reconnection.
    Rejected {
        /// The error frame's code.
        code: u16,
        /// Its message.
        message: String,
    },
    /// The connection failed or ended; the agent retries after a backoff.
    Disconnected {
        /// The close code, if the server sent one (4001 auth failed, …).
        code: Option<u16>,
        /// What happened.
        error: String,
    },
    /// [`Agent::shutdown`] completed.
    Stopped,
}

#[derive(Clone, Debug)]
struct ServiceSpec {
    name: Option<String>,
    addr: SocketAddr,
    routes: Vec<Route>,
    weight: u32,
    version: Option<String>,
    metadata: BTreeMap<String, String>,
}

/// Configures an [`Agent`]: its services (each begun by
/// [`service`](AgentBuilder::service), then described by the calls that
/// follow), TLS and reconnection.
#[derive(Debug)]
pub struct AgentBuilder {
    url: String,
    id: String,
    key: SigningKey,
    services: Vec<ServiceSpec>,
    misuse: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
    roots: Option<RootCertStore>,
    ca_file: Option<PathBuf>,
    backoff: (Duration, Duration),
    connect_timeout: Duration,
}

impl AgentBuilder {
    fn last(&mut self, what: &str) -> Option<&mut ServiceSpec> {
        if self.services.is_empty() && self.misuse.is_none() {
            self.misuse = Some(format!("`{what}` before any `service`"));
        }
        self.services.last_mut()
    }

    /// Begins a service at `addr` (the backend's address, which the key's
    /// policy must allow; by default only the agent's own address).
    pub fn service(mut self, addr: SocketAddr) -> Self {
        self.services.push(ServiceSpec {
            name: None,
            addr,
            routes: Vec::new(),
            weight: proto::default_weight(),
            version: None,
            metadata: BTreeMap::new(),
        });
        self
    }

    /// Names the current service (default `svc0`, `svc1`, … in order). Its
    /// id in the registry is `<agent id>/<name>`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        if let Some(s) = self.last("name") {
            s.name = Some(name);
        }
        self
    }

    /// Adds a route to the current service: requests for `host` (a name,
    /// `*.domain` or `*`) whose path starts with `path_prefix`.
    pub fn route(mut self, host: impl Into<String>, path_prefix: impl Into<String>) -> Self {
        let route = Route {
            host: host.into(),
            path_prefix: path_prefix.into(),
        };
        if let Some(s) = self.last("route") {
            s.routes.push(route);
        }
        self
    }

    /// Sets the current service's weight (default 1, at most 10000).
    pub fn weight(mut self, weight: u32) -> Self {
        if let Some(s) = self.last("weight") {
            s.weight = weight;
        }
        self
    }

    /// Sets the current service's version label.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        let version = version.into();
        if let Some(s) = self.last("version") {
            s.version = Some(version);
        }
        self
    }

    /// Adds a metadata entry to the current service.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let (k, v) = (key.into(), value.into());
        if let Some(s) = self.last("metadata") {
            s.metadata.insert(k, v);
        }
        self
    }

    /// Trusts these roots for a `wss://` URL.
    pub fn tls_roots(mut self, roots: RootCertStore) -> Self {
        self.roots = Some(roots);
        self
    }

    /// Trusts the CA certificates in this PEM file for a `wss://` URL.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Uses this TLS client configuration for a `wss://` URL (it must
    /// verify the server; the agent has no way to turn verification off).
    pub fn tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Reconnection backoff: the n-th retry waits a random time between
    /// half and all of `min · 2ⁿ`, capped at `max`. Default 100 ms to 5 s.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = (min, max.max(min));
        self
    }

    /// Time allowed to connect and authenticate. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Checks the settings and starts the agent's task on the current
    /// Tokio runtime (it must be called from within one).
    pub fn start(self) -> Result<Agent, AgentError> {
        let cfg = self.into_config()?;
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (state_tx, state_rx) = watch::channel(AgentState::Connecting);
        let task = tokio::spawn(run(Arc::new(cfg), cmd_rx, state_tx));
        Ok(Agent {
            cmd: cmd_tx,
            state: state_rx,
            task: Some(task),
        })
    }

    fn into_config(self) -> Result<Config, AgentError> {
        let bad = |m: String| AgentError::Config(m);
        if let Some(m) = self.misuse {
            return Err(bad(m));
        }
        let id = KeyId::new(self.id).map_err(|e| bad(e.to_string()))?;
        let channel = proto::normalize_channel(&self.url).map_err(bad)?;
        let uri: tokio_tungstenite::tungstenite::http::Uri = self
            .url
            .parse()
            .map_err(|e| bad(format!("`{}`: {e}", self.url)))?;
        let host = uri.host().unwrap_or_default();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let secure = channel.starts_with("wss:");
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let has_tls_setting = self.tls.is_some() || self.roots.is_some() || self.ca_file.is_some();
        let tls = if secure {
            let config = match (self.tls, self.roots, self.ca_file) {
                (Some(c), _, _) => c,
                (None, roots, ca) => {
                    let mut store = roots.unwrap_or_else(RootCertStore::empty);
                    if let Some(path) = ca {
                        add_ca_file(&mut store, &path).map_err(bad)?;
                    }
                    if store.is_empty() {
                        return Err(bad(
                            "a wss:// URL needs trusted roots: tls_roots, ca_file or tls_config"
                                .into(),
                        ));
                    }
                    let provider = Arc::new(rustls::crypto::ring::default_provider());
                    let cfg = rustls::ClientConfig::builder_with_provider(provider)
                        .with_safe_default_protocol_versions()
                        .map_err(|e| bad(format!("TLS: {e}")))?
                        .with_root_certificates(store)
                        .with_no_client_auth();
                    Arc::new(cfg)
                }
            };
            let name = ServerName::try_from(host.clone())
                .map_err(|e| bad(format!("TLS server name `{host}`: {e}")))?;
            Some((config, name))
        } else {
            if has_tls_setting {
                return Err(bad(format!(
                    "TLS settings given for `{}`, which is not wss://",
                    self.url
                )));
            }
            None
        };
        let mut services = Vec::new();
        let mut names = Vec::new();
        for (i, s) in self.services.into_iter().enumerate() {
            let name = s.name.unwrap_or_else(|| format!("svc{i}"));
            if names.contains(&name) {
                return Err(bad(format!("two services named `{name}`")));
            }
            if s.routes.is_empty() {
                return Err(bad(format!("service `{name}` ({}) has no route", s.addr)));
            }
            names.push(name.clone());
            services.push(proto::RegisterPayload {
                name,
                addr: s.addr.to_string(),
                routes: s.routes,
                weight: s.weight,
                version: s.version,
                metadata: s.metadata,
            });
        }
        Ok(Config {
            url: self.url,
            host,
            port,
            id,
            key: self.key,
            channel,
            tls,
            services: std::sync::Mutex::new(services),
            backoff: self.backoff,
            connect_timeout: self.connect_timeout,
        })
    }
}

fn add_ca_file(store: &mut RootCertStore, path: &Path) -> Result<(), String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE in the file", path.display()));
    }
    for c in certs {
        store
            .add(c)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

struct Config {
    url: String,
    host: String,
    port: u16,
    id: KeyId,
    key: SigningKey,
    channel: String,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// The services as they are to be registered; `set_weight` updates them.
    services: std::sync::Mutex<Vec<proto::RegisterPayload>>,
    backoff: (Duration, Duration),
    connect_timeout: Duration,
}

enum Cmd {
    Request {
        kind: String,
        action: String,
        payload: Value,
        /// A weight to remember for re-registration once acknowledged.
        weight: Option<(String, u32)>,
        reply: oneshot::Sender<Result<Value, AgentError>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// A running agent: it keeps a backend's services registered with the
/// registry across disconnections and proxy restarts (reconnecting with
/// jittered exponential backoff and registering again), until
/// [`shutdown`](Agent::shutdown). Dropping it aborts the connection
/// without deregistering (the registry notices at once or within its
/// heartbeat timeout).
///
/// ```no_run
/// # async fn f(key: ed25519_dalek::SigningKey) -> Result<(), registry::AgentError> {
/// use registry::Agent;
/// let agent = Agent::builder("ws://127.0.0.1:3042", "web001", key)
///     .service("127.0.0.1:8080".parse().unwrap())
///     .route("example.com", "/")
///     .weight(2)
///     .start()?;
/// agent.send("deploy", "finished", serde_json::json!({ "build": 42 })).await?;
/// agent.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Agent {
    cmd: mpsc::Sender<Cmd>,
    state: watch::Receiver<AgentState>,
    task: Option<JoinHandle<()>>,
}

impl Agent {
    /// Starts configuring an agent that dials `url` (`ws://host:port` or
    /// `wss://host:port`) and authenticates as `id` with `key`.
    pub fn builder(url: impl Into<String>, id: impl Into<String>, key: SigningKey) -> AgentBuilder {
        AgentBuilder {
            url: url.into(),
            id: id.into(),
            key,
            services: Vec::new(),
            misuse: None,
            tls: None,
            roots: None,
            ca_file: None,
            backoff: (Duration::from_millis(100), Duration::from_secs(5)),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// The current state.
    pub fn state(&self) -> AgentState {
        self.state.borrow().clone()
    }

    /// A receiver of state changes (e.g. `watch().wait_for(|s| *s == AgentState::Registered)`).
    pub fn watch(&self) -> watch::Receiver<AgentState> {
        self.state.clone()
    }

    async fn request(
        &self,
        kind: &str,
        action: &str,
        payload: Value,
        weight: Option<(String, u32)>,
    ) -> Result<Value, AgentError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Request {
            kind: kind.to_string(),
            action: action.to_string(),
            payload,
            weight,
            reply,
        };
        self.cmd.send(cmd).await.map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

    /// Sends a custom message (any `type` but the reserved `auth`,
    /// `service`, `key`, `ack`, `error`) and waits for the server's ack. The
    /// registry publishes it as [`Event::Custom`](crate::Event::Custom).
    pub async fn send(&self, kind: &str, action: &str, payload: Value) -> Result<(), AgentError> {
        if proto::RESERVED_TYPES.contains(&kind) {
            return Err(AgentError::Config(format!(
                "message type `{kind}` is reserved"
            )));
        }
        self.request(kind, action, payload, None).await.map(drop)
    }

    /// Changes the weight of one of this agent's services (by name); once
    /// acknowledged, reconnections register the new weight too.
    pub async fn set_weight(&self, name: &str, weight: u32) -> Result<(), AgentError> {
        let payload = json!({ "name": name, "weight": weight });
        let remember = Some((name.to_string(), weight));
        self.request(proto::T_SERVICE, "set_weight", payload, remember)
            .await
            .map(drop)
    }

    /// Adds a key to the registry's key store (needs an admin key).
    pub async fn add_key(
        &self,
        id: &KeyId,
        public_key: &VerifyingKey,
        role: Role,
        allow: &[Allow],
    ) -> Result<(), AgentError> {
        let allow: Vec<String> = allow.iter().map(ToString::to_string).collect();
        let payload = json!({
            "id": id,
            "public_key": crate::keys::encode_public_key(public_key),
            "role": role,
            "allow": allow,
        });
        self.request(proto::T_KEY, "add", payload, None)
            .await
            .map(drop)
    }

    /// Revokes a key (needs an admin key); its connection is closed.
    pub async fn revoke_key(&self, id: &KeyId) -> Result<(), AgentError> {
        self.request(proto::T_KEY, "revoke", json!({ "id": id }), None)
            .await
            .map(drop)
    }

    /// Stops the agent cleanly: its services are drained (the registry
    /// stops sending new requests and removes them after its
    /// `drain_timeout`), the channel is closed, the task ends. Returns once
    /// the server acknowledged the drains (or could not be reached).
    pub async fn shutdown(mut self) {
        let (reply, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// How a connection ended.
enum Outcome {
    Shutdown,
    Lost {
        authenticated: bool,
        code: Option<u16>,
        error: String,
    },
}

fn lost(authenticated: bool, code: Option<u16>, error: impl Into<String>) -> Outcome {
    Outcome::Lost {
        authenticated,
        code,
        error: error.into(),
    }
}

async fn run(cfg: Arc<Config>, mut cmds: mpsc::Receiver<Cmd>, state: watch::Sender<AgentState>) {
    let mut attempt: u32 = 0;
    loop {
        state.send_replace(AgentState::Connecting);
        let outcome = connection(&cfg, &mut cmds, &state).await;
        let (authenticated, code, error) = match outcome {
            Outcome::Shutdown => break,
            Outcome::Lost {
                authenticated,
                code,
                error,
            } => (authenticated, code, error),
        };
        tracing::info!(url = %cfg.url, id = %cfg.id, "registry agent: {error}");
        state.send_replace(AgentState::Disconnected { code, error });
        if authenticated {
            attempt = 0;
        }
        let (min, max) = cfg.backoff;
        let full = min.saturating_mul(1u32 << attempt.min(16)).min(max);
        let delay = rand::rng().random_range(full / 2..=full);
        attempt = attempt.saturating_add(1);
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        let stop = loop {
            tokio::select! {
                _ = &mut sleep => break false,
                cmd = cmds.recv() => match cmd {
                    None => break true,
                    Some(Cmd::Request { reply, .. }) => { let _ = reply.send(Err(AgentError::NotConnected)); }
                    Some(Cmd::Shutdown { reply }) => { let _ = reply.send(()); break true; }
                },
            }
        };
        if stop {
            break;
        }
    }
    state.send_replace(AgentState::Stopped);
}

/// Answers commands while not connected; returns on shutdown.
async fn refuse_until_shutdown(cmds: &mut mpsc::Receiver<Cmd>) -> Option<oneshot::Sender<()>> {
    loop {
        match cmds.recv().await {
            None => return None,
            Some(Cmd::Request { reply, .. }) => {
                let _ = reply.send(Err(AgentError::NotConnected));
            }
            Some(Cmd::Shutdown { reply }) => return Some(reply),
        }
    }
}

/// Connects and authenticates: returns the channel and the server's
/// heartbeat timeout.
async fn connect(cfg: &Config) -> Result<(Ws, Duration), Outcome> {
    let tcp = TcpStream::connect((cfg.host.as_str(), cfg.port))
        .await
        .map_err(|e| lost(false, None, format!("connect {}: {e}", cfg.url)))?;
    let _ = tcp.set_nodelay(true);
    let (io, exporter): (Box<dyn Io>, Vec<u8>) = match &cfg.tls {
        Some((config, name)) => {
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            let stream = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| lost(false, None, format!("TLS with {}: {e}", cfg.url)))?;
            let exporter = stream
                .get_ref()
                .1
                .export_keying_material(vec![0u8; 32], proto::TLS_EXPORTER_LABEL, None)
                .map_err(|e| lost(false, None, format!("TLS exporter: {e}")))?;
            (Box::new(stream), exporter)
        }
        None => (Box::new(tcp), Vec::new()),
    };
    let mut req = cfg
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| lost(false, None, format!("{}: {e}", cfg.url)))?;
    req.headers_mut().insert(
        SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(proto::SUBPROTOCOL),
    );
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(req, io, Some(ws_config(MAX_MESSAGE)))
            .await
            .map_err(|e| {
                lost(
                    false,
                    None,
                    format!("WebSocket handshake with {}: {e}", cfg.url),
                )
            })?;

    // Challenge.
    let env = next_envelope(&mut ws).await?;
    if env.header.kind != proto::T_AUTH || env.header.action != "challenge" {
        return Err(lost(false, None, "expected auth/challenge from the server"));
    }
    let ch: proto::Challenge = serde_json::from_value(env.payload)
        .map_err(|e| lost(false, None, format!("auth/challenge: {e}")))?;
    if ch.protocol != proto::SUBPROTOCOL {
        return Err(lost(false, None, format!("server speaks {}", ch.protocol)));
    }
    let nonce = B64
        .decode(&ch.nonce)
        .ok()
        .filter(|n| n.len() == 32)
        .ok_or_else(|| lost(false, None, "auth/challenge: bad nonce"))?;
    let msg = proto::auth_message(&nonce, cfg.id.as_str(), &cfg.channel, &exporter);
    let signature = cfg.key.sign(&msg);
    let answer = Envelope::new(
        proto::T_AUTH,
        "answer",
        None,
        json!({ "id": cfg.id, "channel": cfg.channel, "signature": B64.encode(signature.to_bytes()) }),
    );
    ws.send(Message::text(answer.to_text()))
        .await
        .map_err(|e| lost(false, None, format!("send: {e}")))?;

    // Verdict: auth/ok, or a close frame with the reason.
    let env = next_envelope(&mut ws).await?;
    if env.header.kind != proto::T_AUTH || env.header.action != "ok" {
        return Err(lost(false, None, "expected auth/ok from the server"));
    }
    let ok: proto::AuthOk = serde_json::from_value(env.payload)
        .map_err(|e| lost(false, None, format!("auth/ok: {e}")))?;
    let timeout = Duration::from_millis(ok.heartbeat_timeout_ms.max(100));
    Ok((ws, timeout))
}

/// The next text message as an envelope; a close frame becomes `Lost` with
/// its code.
async fn next_envelope(ws: &mut Ws) -> Result<Envelope, Outcome> {
    loop {
        match ws.next().await {
            None => return Err(lost(false, None, "the server closed the connection")),
            Some(Err(e)) => return Err(lost(false, None, format!("receive: {e}"))),
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame
                    .map(|f| (Some(u16::from(f.code)), f.reason.to_string()))
                    .unwrap_or((None, String::new()));
                return Err(lost(
                    false,
                    code,
                    format!("refused by the registry: {}", describe(code, &reason)),
                ));
            }
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(&t)
                    .map_err(|e| lost(false, None, format!("malformed message: {e}")));
            }
            Some(Ok(_)) => continue,
        }
    }
}

fn describe(code: Option<u16>, reason: &str) -> String {
    match code.and_then(Code::from_u16) {
        Some(c) => format!("{c} ({reason})"),
        None => format!(
            "{} ({reason})",
            code.map(|c| c.to_string()).unwrap_or_default()
        ),
    }
}

enum Pending {
    Register,
    User(
        oneshot::Sender<Result<Value, AgentError>>,
        Option<(String, u32)>,
    ),
}

/// One connection: authenticate, register, then serve commands until the
/// connection ends or shutdown.
async fn connection(
    cfg: &Config,
    cmds: &mut mpsc::Receiver<Cmd>,
    state: &watch::Sender<AgentState>,
) -> Outcome {
    let connected = tokio::select! {
        r = tokio::time::timeout(cfg.connect_timeout, connect(cfg)) => r,
        reply = refuse_until_shutdown(cmds) => {
            if let Some(reply) = reply { let _ = reply.send(()); }
            return Outcome::Shutdown;
        }
    };
    let (mut ws, hb_timeout) = match connected {
        Err(_) => return lost(false, None, format!("no answer from {} in time", cfg.url)),
        Ok(Err(o)) => return o,
        Ok(Ok(x)) => x,
    };
    state.send_replace(AgentState::Connected);

    let mut next_id: u64 = 0;
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let services = cfg
        .services
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut to_register = services.len();
    let mut rejected: Option<(u16, String)> = None;
    for s in &services {
        next_id += 1;
        let env = Envelope::new(proto::T_SERVICE, "register", Some(next_id), json!(s));
        if let Err(e) = ws.send(Message::text(env.to_text())).await {
            return lost(true, None, format!("send: {e}"));
        }
        pending.insert(next_id, Pending::Register);
    }
    if to_register == 0 {
        state.send_replace(AgentState::Registered);
    }

    let dead = tokio::time::sleep(hb_timeout);
    tokio::pin!(dead);
    let fail_all = |pending: &mut HashMap<u64, Pending>| {
        for (_, p) in pending.drain() {
            if let Pending::User(reply, _) = p {
                let _ = reply.send(Err(AgentError::Disconnected));
            }
        }
    };
    // Whatever ends the connection, requests still waiting fail with it.
    let outcome = loop {
        tokio::select! {
            msg = ws.next() => {
                dead.as_mut().reset(Instant::now() + hb_timeout);
                let text = match msg {
                    None => break lost(true, None, "the server closed the connection"),
                    Some(Err(e)) => break lost(true, None, format!("receive: {e}")),
                    Some(Ok(Message::Close(frame))) => {
                        let _ = ws.flush().await;
                        let (code, reason) = frame
                            .map(|f| (Some(u16::from(f.code)), f.reason.to_string()))
                            .unwrap_or((None, String::new()));
                        break lost(true, code, format!("closed by the registry: {}", describe(code, &reason)));
                    }
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(_)) => continue,
                };
                let Ok(env) = serde_json::from_str::<Envelope>(&text) else {
                    tracing::warn!("registry agent: malformed message from the server");
                    continue;
                };
                let Some(p) = env.header.id.and_then(|id| pending.remove(&id)) else { continue };
                let result = match env.header.kind.as_str() {
                    proto::T_ACK => Ok(env.payload),
                    proto::T_ERROR => {
                        let e: proto::ErrorPayload = serde_json::from_value(env.payload).unwrap_or(proto::ErrorPayload {
                            code: 0, reason: String::new(), message: "malformed error frame".into(),
                        });
                        Err(AgentError::Refused { code: e.code, reason: e.reason, message: e.message })
                    }
                    _ => continue,
                };
                match p {
                    Pending::User(reply, weight) => {
                        if let (Ok(_), Some((name, w))) = (&result, weight) {
                            let mut services = cfg.services.lock().unwrap_or_else(|e| e.into_inner());
                            if let Some(s) = services.iter_mut().find(|s| s.name == name) {
                                s.weight = w;
                            }
                        }
                        let _ = reply.send(result);
                    }
                    Pending::Register => {
                        to_register -= 1;
                        if let Err(AgentError::Refused { code, message, .. }) = result {
                            tracing::warn!(id = %cfg.id, "registry agent: registration refused: {code}: {message}");
                            rejected.get_or_insert((code, message));
                        }
                        if to_register == 0 {
                            state.send_replace(match rejected.take() {
                                Some((code, message)) => AgentState::Rejected { code, message },
                                None => AgentState::Registered,
                            });
                        }
                    }
                }
            }
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Request { kind, action, payload, weight, reply }) => {
                    next_id += 1;
                    let env = Envelope::new(&kind, &action, Some(next_id), payload);
                    if let Err(e) = ws.send(Message::text(env.to_text())).await {
                        let _ = reply.send(Err(AgentError::Disconnected));
                        break lost(true, None, format!("send: {e}"));
                    }
                    pending.insert(next_id, Pending::User(reply, weight));
                }
                None => break Outcome::Shutdown,
                Some(Cmd::Shutdown { reply }) => {
                    // Failed first: the drain below reads the channel.
                    fail_all(&mut pending);
                    shutdown(cfg, &mut ws, &mut next_id).await;
                    let _ = reply.send(());
                    break Outcome::Shutdown;
                }
            },
            _ = &mut dead => break lost(true, None, "no heartbeat from the registry"),
        }
    };
    fail_all(&mut pending);
    outcome
}

/// Drains every service, waits for the acks, closes the channel.
async fn shutdown(cfg: &Config, ws: &mut Ws, next_id: &mut u64) {
    let mut waiting = Vec::new();
    let names: Vec<String> = {
        let services = cfg.services.lock().unwrap_or_else(|e| e.into_inner());
        services.iter().map(|s| s.name.clone()).collect()
    };
    for name in names {
        *next_id += 1;
        let env = Envelope::new(
            proto::T_SERVICE,
            "drain",
            Some(*next_id),
            json!({ "name": name }),
        );
        if ws.send(Message::text(env.to_text())).await.is_err() {
            return;
        }
        waiting.push(*next_id);
    }
    let _ = tokio::time::timeout(SHUTDOWN_WAIT, async {
        while !waiting.is_empty() {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    if let Ok(env) = serde_json::from_str::<Envelope>(&t)
                        && let Some(id) = env.header.id
                    {
                        waiting.retain(|w| *w != id);
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    crate::session::close(ws, Code::Normal, "agent shutdown").await;
}
