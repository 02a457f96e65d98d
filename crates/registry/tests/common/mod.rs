//! Helpers shared by the integration tests: a temporary key store, a
//! server on a loopback port, a raw protocol client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::Signer;
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use registry::{
    Allow, Event, KeyEntry, KeyId, KeyStore, Registry, RegistryOptions, RegistryServer, Role,
    SigningKey,
};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!("registry-test-{:016x}", rand::rng().next_u64()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn new_key() -> SigningKey {
    SigningKey::generate(&mut rand::rng())
}

/// Writes `<id>.pub` into the store directory and returns the private key.
pub fn add_key(dir: &Path, id: &str, role: Role, allow: &[&str]) -> SigningKey {
    let key = new_key();
    let entry = KeyEntry {
        id: KeyId::new(id).unwrap(),
        public_key: key.verifying_key(),
        role,
        allow: allow.iter().map(|a| a.parse::<Allow>().unwrap()).collect(),
    };
    std::fs::write(dir.join(format!("{id}.pub")), entry.to_file_string()).unwrap();
    key
}

/// Short timeouts for tests.
pub fn fast_opts() -> RegistryOptions {
    RegistryOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_timeout: Duration::from_millis(300),
        handshake_timeout: Duration::from_millis(1000),
        drain_timeout: Duration::from_millis(200),
        ..RegistryOptions::default()
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub registry: Registry,
    pub events: broadcast::Receiver<Event>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(dir: &Path, opts: RegistryOptions) -> TestServer {
        let keys = KeyStore::open(dir).unwrap();
        let server = RegistryServer::bind(opts, keys).await.unwrap();
        let addr = server.local_addr();
        let registry = server.registry();
        let events = registry.subscribe();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            registry,
            events,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }

    /// Waits for the first event matching `pred` (other events are skipped).
    pub async fn wait_event(&mut self, within: Duration, pred: impl Fn(&Event) -> bool) -> Event {
        wait_event(&mut self.events, within, pred).await
    }

    /// Asserts that no event matching `pred` arrives within `within`.
    pub async fn no_event(&mut self, within: Duration, pred: impl Fn(&Event) -> bool) {
        let r = tokio::time::timeout(within, async {
            loop {
                match self.events.recv().await {
                    Ok(ev) if pred(&ev) => return ev,
                    Ok(_) => {}
                    Err(e) => panic!("event stream: {e}"),
                }
            }
        })
        .await;
        if let Ok(ev) = r {
            panic!("unexpected event {ev:?}");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

pub async fn wait_event(
    rx: &mut broadcast::Receiver<Event>,
    within: Duration,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    tokio::time::timeout(within, async {
        loop {
            match rx.recv().await {
                Ok(ev) if pred(&ev) => return ev,
                Ok(_) => {}
                Err(e) => panic!("event stream: {e}"),
            }
        }
    })
    .await
    .expect("expected event did not arrive in time")
}

pub type RawWs = WebSocketStream<TcpStream>;

/// An upgrade request offering the subprotocol.
pub fn ws_request(addr: SocketAddr) -> Request {
    let mut req = format!("ws://{addr}/").into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(registry::SUBPROTOCOL),
    );
    req
}

/// Opens a raw channel (with the subprotocol) and returns it with the
/// challenge nonce.
pub async fn raw_connect(addr: SocketAddr) -> (RawWs, Vec<u8>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(ws_request(addr), tcp)
        .await
        .unwrap();
    let challenge = next_json(&mut ws).await;
    assert_eq!(challenge["header"]["type"], "auth");
    assert_eq!(challenge["header"]["action"], "challenge");
    let nonce = B64
        .decode(challenge["payload"]["nonce"].as_str().unwrap())
        .unwrap();
    assert_eq!(nonce.len(), 32);
    (ws, nonce)
}

/// An `auth/answer` text for a channel.
pub fn answer(key: &SigningKey, id: &str, nonce: &[u8], channel: &str) -> String {
    let sig = key.sign(&registry::auth_message(nonce, id, channel, b""));
    json!({
        "header": {"type": "auth", "action": "answer"},
        "payload": {"id": id, "channel": channel, "signature": B64.encode(sig.to_bytes())}
    })
    .to_string()
}

/// A raw channel, authenticated.
pub async fn raw_auth(addr: SocketAddr, id: &str, key: &SigningKey) -> RawWs {
    let (mut ws, nonce) = raw_connect(addr).await;
    ws.send(Message::text(answer(
        key,
        id,
        &nonce,
        &format!("ws://{addr}"),
    )))
    .await
    .unwrap();
    let ok = next_json(&mut ws).await;
    assert_eq!(ok["header"]["action"], "ok", "{ok}");
    ws
}

/// The next text message, as JSON (panics on close).
pub async fn next_json(ws: &mut RawWs) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("no message in time")
            .expect("stream ended")
            .expect("receive error");
        match m {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Close(f) => panic!("closed: {f:?}"),
            _ => {}
        }
    }
}

/// Reads until a close frame (within 5 s in all) and returns its code.
pub async fn expect_close(ws: &mut RawWs) -> u16 {
    let read = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
                Some(Ok(Message::Close(None))) => panic!("close without a code"),
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("no close frame in time")
}

/// Sends a request and returns the reply.
pub async fn call(ws: &mut RawWs, text: String) -> Value {
    ws.send(Message::text(text)).await.unwrap();
    next_json(ws).await
}

pub fn register_msg(id: u64, name: &str, addr: &str) -> String {
    json!({
        "header": {"type": "service", "action": "register", "id": id},
        "payload": {"name": name, "addr": addr, "routes": [{"host": "example.com", "path_prefix": "/"}]}
    })
    .to_string()
}

/// Reads a raw channel in the background so that it answers pings; the
/// channel closes when the guard drops.
pub fn keep_alive(mut ws: RawWs) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        while let Some(Ok(_)) = ws.next().await {}
    }))
}

pub struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
