//! One control-channel connection on the server: handshake, then requests.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::Signature;
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{
    HeaderValue, StatusCode, header::SEC_WEBSOCKET_PROTOCOL,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::keys::{KeyEntry, KeyId, Role};
use crate::proto::{self, Code, Envelope};
use crate::server::{Counters, Ctl, End, Refusal, Registry, service_id};

/// A byte stream the channel runs over (TCP or TLS over TCP).
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub(crate) type Ws = WebSocketStream<Box<dyn Io>>;

/// How long a closing side waits for the peer's close frame or EOF.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Error frames one connection may cause before it is closed (4012).
const MAX_ERRORS: u32 = 32;

/// WebSocket limits for a message size.
pub(crate) fn ws_config(max_message_bytes: usize) -> WebSocketConfig {
    // Control messages are small; tungstenite's default 128 KiB read
    // buffer (zero-filled on first read) would cost most of an idle
    // agent's memory.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}

/// Sends a close frame with `code`, then waits (bounded) for the peer's
/// close or EOF so that the frame is not lost to a reset.
pub(crate) async fn close(ws: &mut Ws, code: Code, reason: &str) {
    let mut reason = reason.to_string();
    if reason.len() > 120 {
        let mut cut = 120;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    let frame = CloseFrame {
        code: CloseCode::from(code.as_u16()),
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

/// Sends a text frame, giving up after `limit` (a peer that does not read).
async fn send_text(ws: &mut Ws, text: String, limit: Duration) -> bool {
    matches!(
        tokio::time::timeout(limit, ws.send(Message::text(text))).await,
        Ok(Ok(()))
    )
}

fn offers_subprotocol(req: &Request) -> bool {
    req.headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == proto::SUBPROTOCOL)
}

/// Serves one accepted connection to its end.
pub(crate) async fn run(
    registry: Registry,
    tcp: TcpStream,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
) {
    let opts = &registry.inner.opts;
    let _ = tcp.set_nodelay(true);
    let deadline = Instant::now() + opts.handshake_timeout;
    let Ok(local) = tcp.local_addr() else { return };
    let tls = opts.tls.is_some();

    // TLS and the WebSocket upgrade, under the handshake deadline.
    let upgrade = async {
        let (io, exporter): (Box<dyn Io>, Vec<u8>) = match &opts.tls {
            Some(cfg) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
                let stream = acceptor
                    .accept(tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                let exporter = stream
                    .get_ref()
                    .1
                    .export_keying_material(vec![0u8; 32], proto::TLS_EXPORTER_LABEL, None)
                    .map_err(|e| format!("TLS exporter: {e}"))?;
                (Box::new(stream), exporter)
            }
            None => (Box::new(tcp), Vec::new()),
        };
        // The signature is tungstenite's.
        #[allow(clippy::result_large_err)]
        let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
            if !offers_subprotocol(req) {
                let mut err = ErrorResponse::new(Some(format!(
                    "the control channel needs the WebSocket subprotocol {}\n",
                    proto::SUBPROTOCOL
                )));
                *err.status_mut() = StatusCode::BAD_REQUEST;
                return Err(err);
            }
            resp.headers_mut().insert(
                SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(proto::SUBPROTOCOL),
            );
            Ok(resp)
        };
        let ws = tokio_tungstenite::accept_hdr_async_with_config(
            io,
            callback,
            Some(ws_config(opts.max_message_bytes)),
        )
        .await
        .map_err(|e| format!("WebSocket upgrade: {e}"))?;
        Ok::<_, String>((ws, exporter))
    };
    let (mut ws, exporter) = match tokio::time::timeout_at(deadline, upgrade).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "registry handshake failed: {e}");
            registry.auth_failed(peer, Code::ProtocolError, None);
            return;
        }
        Err(_) => {
            registry.auth_failed(peer, Code::HandshakeTimeout, None);
            return;
        }
    };

    // Challenge and answer.
    let mut nonce = [0u8; 32];
    rand::rng().fill_bytes(&mut nonce);
    let challenge = Envelope::new(
        proto::T_AUTH,
        "challenge",
        None,
        serde_json::json!({ "nonce": B64.encode(nonce), "protocol": proto::SUBPROTOCOL }),
    );
    if !send_text(&mut ws, challenge.to_text(), opts.handshake_timeout).await {
        registry.auth_failed(peer, Code::ProtocolError, None);
        return;
    }
    let accepted_channels = {
        let mut v = vec![proto::channel_for_addr(tls, local)];
        v.extend(registry.inner.advertised.iter().cloned());
        v
    };
    let verdict = match tokio::time::timeout_at(deadline, read_answer(&mut ws)).await {
        Err(_) => Err((
            Code::HandshakeTimeout,
            "no answer to the challenge in time".to_string(),
            None,
        )),
        Ok(Err(None)) => {
            // The peer went away.
            registry.auth_failed(peer, Code::ProtocolError, None);
            return;
        }
        Ok(Err(Some(msg))) => Err((Code::ProtocolError, msg, None)),
        Ok(Ok(answer)) => verify(&registry, &answer, &nonce, &exporter, &accepted_channels),
    };
    let key = match verdict {
        Ok(key) => key,
        Err((code, msg, id)) => {
            tracing::info!(%peer, id = id.as_deref().unwrap_or(""), "registry handshake refused: {code}: {msg}");
            registry.auth_failed(peer, code, id);
            close(&mut ws, code, &msg).await;
            return;
        }
    };

    // Authenticated.
    Counters::inc(&registry.inner.counters.handshakes_ok);
    let (ctl_tx, ctl_rx) = mpsc::channel(4);
    let session = registry.open_session(&key.id, key.role, peer, ctl_tx);
    // A revocation (or a key change by a rescan) between the check in
    // `verify` and the line above found no session to close: look again
    // now that the session is where a revocation looks.
    if !registry.key_unchanged(&key) {
        tracing::info!(%peer, id = %key.id, "registry handshake refused: key revoked meanwhile");
        registry.close_session(session, &key.id, peer, End::Abrupt(Code::Revoked));
        close(&mut ws, Code::Revoked, "key revoked").await;
        return;
    }
    let ok = Envelope::new(
        proto::T_AUTH,
        "ok",
        None,
        serde_json::json!({
            "id": key.id,
            "role": key.role,
            "peer": peer.ip().to_canonical().to_string(),
            "heartbeat_interval_ms": opts.heartbeat_interval.as_millis() as u64,
            "heartbeat_timeout_ms": opts.heartbeat_timeout.as_millis() as u64,
        }),
    );
    let end = if send_text(&mut ws, ok.to_text(), opts.heartbeat_timeout).await {
        let mut conn = Conn {
            registry: &registry,
            ws,
            key_id: key.id.clone(),
            role: key.role,
            peer,
            session,
            errors: 0,
        };
        let end = conn.serve(ctl_rx, stop).await;
        ws = conn.ws;
        end
    } else {
        End::Abrupt(Code::ProtocolError)
    };
    // State first, so removal is not delayed by a slow close handshake.
    registry.close_session(session, &key.id, peer, end);
    if !matches!(end, End::Clean) {
        close(&mut ws, end.code(), end.code().name()).await;
    }
}

/// Reads the `auth/answer`. `Err(None)`: the peer went away;
/// `Err(Some(msg))`: something other than an answer.
async fn read_answer(ws: &mut Ws) -> Result<proto::Answer, Option<String>> {
    loop {
        match ws.next().await {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Err(None),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Binary(_))) => {
                return Err(Some("binary frame; expected auth/answer".into()));
            }
            Some(Ok(Message::Text(text))) => {
                let env: Envelope = serde_json::from_str(&text)
                    .map_err(|e| Some(format!("malformed auth/answer: {e}")))?;
                if env.header.kind != proto::T_AUTH || env.header.action != "answer" {
                    return Err(Some(format!(
                        "expected auth/answer, got {}/{}",
                        env.header.kind, env.header.action
                    )));
                }
                return serde_json::from_value(env.payload)
                    .map_err(|e| Some(format!("malformed auth/answer: {e}")));
            }
        }
    }
}

type AuthRefusal = (Code, String, Option<String>);

fn verify(
    registry: &Registry,
    answer: &proto::Answer,
    nonce: &[u8],
    exporter: &[u8],
    channels: &[String],
) -> Result<KeyEntry, AuthRefusal> {
    let claimed = Some(answer.id.clone());
    let refuse = |code: Code, msg: &str| (code, msg.to_string(), claimed.clone());
    let Ok(id) = KeyId::new(answer.id.clone()) else {
        return Err(refuse(Code::UnknownId, "invalid key id"));
    };
    let key = {
        let keys = registry.read_keys();
        match keys.get(&id) {
            Some(k) => k.clone(),
            None if keys.is_revoked(&id) => return Err(refuse(Code::Revoked, "key revoked")),
            None => return Err(refuse(Code::UnknownId, "unknown key id")),
        }
    };
    if !channels.contains(&answer.channel) {
        return Err(refuse(
            Code::AuthFailed,
            "signature for a channel this server does not serve",
        ));
    }
    let sig = B64
        .decode(&answer.signature)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
        .map(|b| Signature::from_bytes(&b))
        .ok_or_else(|| refuse(Code::AuthFailed, "signature is not 64 bytes of base64"))?;
    let msg = proto::auth_message(nonce, id.as_str(), &answer.channel, exporter);
    key.public_key
        .verify_strict(&msg, &sig)
        .map_err(|_| refuse(Code::AuthFailed, "bad signature"))?;
    Ok(key)
}

/// An authenticated connection.
struct Conn<'a> {
    registry: &'a Registry,
    ws: Ws,
    key_id: KeyId,
    role: Role,
    peer: SocketAddr,
    session: u64,
    errors: u32,
}

impl Conn<'_> {
    async fn serve(
        &mut self,
        mut ctl: mpsc::Receiver<Ctl>,
        mut stop: watch::Receiver<bool>,
    ) -> End {
        let opts = &self.registry.inner.opts;
        let hb_timeout = opts.heartbeat_timeout;
        let mut ping = tokio::time::interval_at(
            Instant::now() + opts.heartbeat_interval,
            opts.heartbeat_interval,
        );
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let dead = tokio::time::sleep(hb_timeout);
        tokio::pin!(dead);
        loop {
            tokio::select! {
                msg = self.ws.next() => {
                    dead.as_mut().reset(Instant::now() + hb_timeout);
                    match msg {
                        None => return End::Abrupt(Code::ProtocolError),
                        Some(Err(tungstenite::Error::Capacity(e))) => {
                            self.registry.inner.counters.error(Code::TooBig);
                            tracing::info!(peer = %self.peer, agent = %self.key_id, "registry: {e}");
                            return End::Abrupt(Code::TooBig);
                        }
                        Some(Err(_)) => return End::Abrupt(Code::ProtocolError),
                        Some(Ok(Message::Close(_))) => {
                            // tungstenite queued the reply; push it out.
                            let _ = tokio::time::timeout(CLOSE_WAIT, self.ws.flush()).await;
                            return End::Clean;
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                        Some(Ok(Message::Binary(_))) => {
                            let reply = error_frame(None, "", Code::ProtocolError, "binary frames are not part of the protocol");
                            if let Some(end) = self.reply_error(reply, Code::ProtocolError).await {
                                return end;
                            }
                        }
                        Some(Ok(Message::Text(text))) => {
                            let (reply, failed) = self.handle(&text);
                            let limit = hb_timeout;
                            if !send_text(&mut self.ws, reply, limit).await {
                                return End::Abrupt(Code::ProtocolError);
                            }
                            if let Some(code) = failed {
                                self.registry.inner.counters.error(code);
                                if let Some(end) = self.count_error() {
                                    return end;
                                }
                            }
                        }
                    }
                }
                _ = ping.tick() => {
                    let sent = tokio::time::timeout(hb_timeout, self.ws.send(Message::Ping(Default::default()))).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        return End::Abrupt(Code::HeartbeatTimeout);
                    }
                }
                _ = &mut dead => {
                    Counters::inc(&self.registry.inner.counters.heartbeat_timeouts);
                    tracing::info!(peer = %self.peer, agent = %self.key_id, "registry: heartbeat timeout");
                    return End::Abrupt(Code::HeartbeatTimeout);
                }
                Some(Ctl::Close(code, why)) = ctl.recv() => {
                    tracing::info!(peer = %self.peer, agent = %self.key_id, "registry: closing: {code}: {why}");
                    return if code == Code::Superseded { End::Superseded } else { End::Abrupt(code) };
                }
                _ = stop.changed() => return End::Shutdown,
            }
        }
    }

    async fn reply_error(&mut self, reply: String, code: Code) -> Option<End> {
        if !send_text(
            &mut self.ws,
            reply,
            self.registry.inner.opts.heartbeat_timeout,
        )
        .await
        {
            return Some(End::Abrupt(Code::ProtocolError));
        }
        self.registry.inner.counters.error(code);
        self.count_error()
    }

    fn count_error(&mut self) -> Option<End> {
        self.errors += 1;
        (self.errors > MAX_ERRORS).then_some(End::Abrupt(Code::Limit))
    }

    /// Handles one text message; returns the reply frame and, for an error
    /// reply, its code.
    fn handle(&self, text: &str) -> (String, Option<Code>) {
        let value: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                let code = Code::ProtocolError;
                return (
                    error_frame(None, "", code, &format!("malformed JSON: {e}")),
                    Some(code),
                );
            }
        };
        // Repeat the request's id and action in an error even if the
        // envelope is otherwise wrong.
        let id = value.pointer("/header/id").and_then(|v| v.as_u64());
        let action = value
            .pointer("/header/action")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let result = serde_json::from_value::<Envelope>(value)
            .map_err(|e| (Code::ProtocolError, format!("malformed envelope: {e}")))
            .and_then(|env| self.dispatch(env));
        match result {
            Ok(payload) => {
                let ack = Envelope::new(proto::T_ACK, &action, id, payload);
                (ack.to_text(), None)
            }
            Err((code, msg)) => {
                tracing::debug!(peer = %self.peer, agent = %self.key_id, "registry request refused: {code}: {msg}");
                (error_frame(id, &action, code, &msg), Some(code))
            }
        }
    }

    fn dispatch(&self, env: Envelope) -> Result<serde_json::Value, Refusal> {
        let Envelope { header, payload } = env;
        let kind = header.kind.as_str();
        let action = header.action.as_str();
        let counters = &self.registry.inner.counters;
        fn parse<T: serde::de::DeserializeOwned>(
            kind: &str,
            action: &str,
            v: serde_json::Value,
        ) -> Result<T, Refusal> {
            serde_json::from_value(v)
                .map_err(|e| (Code::ProtocolError, format!("{kind}/{action} payload: {e}")))
        }
        match kind {
            proto::T_SERVICE => {
                if !matches!(action, "register" | "deregister" | "drain" | "set_weight") {
                    return Err(unknown_action(kind, action));
                }
                if self.role != Role::Agent {
                    return Err((
                        Code::Forbidden,
                        format!("service/{action} needs an agent key"),
                    ));
                }
                counters.message(&format!("service.{action}"));
                match action {
                    "register" => {
                        let p: proto::RegisterPayload = parse(kind, action, payload)?;
                        let key = self
                            .registry
                            .read_keys()
                            .get(&self.key_id)
                            .cloned()
                            .ok_or_else(|| (Code::Forbidden, "key no longer active".to_string()))?;
                        let s = self.registry.register(self.session, &key, self.peer, p)?;
                        Ok(serde_json::json!({ "service": s.id }))
                    }
                    "deregister" => {
                        let p: proto::NamePayload = parse(kind, action, payload)?;
                        self.registry
                            .deregister(self.session, &self.key_id, &p.name)?;
                        Ok(serde_json::json!({ "service": service_id(&self.key_id, &p.name) }))
                    }
                    "drain" => {
                        let p: proto::NamePayload = parse(kind, action, payload)?;
                        let deadline = self.registry.drain(self.session, &self.key_id, &p.name)?;
                        let left = deadline.saturating_duration_since(std::time::Instant::now());
                        Ok(serde_json::json!({
                            "service": service_id(&self.key_id, &p.name),
                            "drain_ms": left.as_millis() as u64,
                        }))
                    }
                    _ => {
                        let p: proto::WeightPayload = parse(kind, action, payload)?;
                        self.registry
                            .set_weight(self.session, &self.key_id, &p.name, p.weight)?;
                        Ok(serde_json::json!({ "service": service_id(&self.key_id, &p.name) }))
                    }
                }
            }
            proto::T_KEY => {
                if !matches!(action, "add" | "revoke") {
                    return Err(unknown_action(kind, action));
                }
                if self.role != Role::Admin {
                    return Err((Code::Forbidden, format!("key/{action} needs an admin key")));
                }
                counters.message(&format!("key.{action}"));
                let by = Some(self.key_id.clone());
                if action == "add" {
                    let p: proto::KeyAddPayload = parse(kind, action, payload)?;
                    let id = KeyId::new(p.id).map_err(|e| (Code::Invalid, e.to_string()))?;
                    let public_key = crate::keys::parse_public_key(&p.public_key)
                        .map_err(|m| (Code::Invalid, m))?;
                    let mut allow = Vec::new();
                    for a in &p.allow {
                        allow.push(
                            a.parse()
                                .map_err(|e| (Code::Invalid, format!("allow `{a}`: {e}")))?,
                        );
                    }
                    if p.role == Role::Admin && !allow.is_empty() {
                        return Err((Code::Invalid, "`allow` applies to agent keys only".into()));
                    }
                    let entry = KeyEntry {
                        id: id.clone(),
                        public_key,
                        role: p.role,
                        allow,
                    };
                    self.registry.add_key_by(entry, by).map_err(key_refusal)?;
                    Ok(serde_json::json!({ "id": id }))
                } else {
                    let p: proto::KeyRevokePayload = parse(kind, action, payload)?;
                    let id = KeyId::new(p.id).map_err(|e| (Code::Invalid, e.to_string()))?;
                    self.registry.revoke_key_by(&id, by).map_err(key_refusal)?;
                    Ok(serde_json::json!({ "id": id }))
                }
            }
            k if proto::RESERVED_TYPES.contains(&k) => Err((
                Code::ProtocolError,
                format!("unexpected message type `{k}`"),
            )),
            _ => {
                proto::check_custom_name("type", kind).map_err(|m| (Code::ProtocolError, m))?;
                proto::check_custom_name("action", action).map_err(|m| (Code::ProtocolError, m))?;
                counters.message("custom");
                self.registry
                    .custom(&self.key_id, header.kind, header.action, payload);
                Ok(serde_json::json!({}))
            }
        }
    }
}

fn unknown_action(kind: &str, action: &str) -> Refusal {
    (
        Code::ProtocolError,
        format!("unknown action `{action}` for type `{kind}`"),
    )
}

fn key_refusal(e: crate::KeyError) -> Refusal {
    use crate::KeyError as K;
    match e {
        K::Exists { .. } => (Code::Conflict, e.to_string()),
        K::NotFound(_) => (Code::NotFound, e.to_string()),
        K::InvalidId(_) => (Code::Invalid, e.to_string()),
        other => {
            tracing::error!("registry key store: {other}");
            (Code::Internal, "the key store could not be updated".into())
        }
    }
}

fn error_frame(id: Option<u64>, action: &str, code: Code, message: &str) -> String {
    Envelope::new(
        proto::T_ERROR,
        action,
        id,
        serde_json::json!({ "code": code.as_u16(), "reason": code.name(), "message": message }),
    )
    .to_text()
}
