//! The control channel over TLS (`wss://`), with a test CA made by rcgen.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;
use ed25519_dalek::Signer;
use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose};
use registry::{Agent, AgentState, Code, Event, RegistryOptions, Role};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(5);

struct Pki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn pki() -> Pki {
    let ca = ca();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivatePkcs8KeyDer::from(leaf_key.serialize_der()).into(),
        )
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        server: Arc::new(server),
    }
}

fn tls_opts(pki: &Pki) -> RegistryOptions {
    RegistryOptions {
        tls: Some(pki.server.clone()),
        ..fast_opts()
    }
}

#[tokio::test]
async fn wss_agent_verifies_the_server_with_its_ca() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let pki = pki();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &pki.ca_pem).unwrap();
    let mut srv = TestServer::start(dir.path(), tls_opts(&pki)).await;
    let agent = Agent::builder(format!("wss://{}", srv.addr), "web001", key)
        .service("127.0.0.1:8443".parse().unwrap())
        .route("example.com", "/")
        .ca_file(&ca_path)
        .start()
        .unwrap();
    let ev = srv
        .wait_event(T, |e| matches!(e, Event::Registered { .. }))
        .await;
    assert!(matches!(ev, Event::Registered { ref service } if service.id == "web001/svc0"));
    let mut w = agent.watch();
    tokio::time::timeout(T, w.wait_for(|s| *s == AgentState::Registered))
        .await
        .unwrap()
        .unwrap();
    agent.shutdown().await;
    srv.wait_event(T, |e| matches!(e, Event::Draining { .. }))
        .await;
}

#[tokio::test]
async fn wss_agent_with_another_ca_fails_to_connect() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let pki = pki();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca().der().clone()).unwrap();
    let mut srv = TestServer::start(dir.path(), tls_opts(&pki)).await;
    let agent = Agent::builder(format!("wss://{}", srv.addr), "web001", key)
        .service("127.0.0.1:8443".parse().unwrap())
        .route("example.com", "/")
        .tls_roots(roots)
        .start()
        .unwrap();
    let mut w = agent.watch();
    let s = tokio::time::timeout(
        T,
        w.wait_for(|s| matches!(s, AgentState::Disconnected { .. })),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    let AgentState::Disconnected { error, code } = s else {
        unreachable!()
    };
    assert_eq!(code, None);
    assert!(
        error.contains("TLS") && error.to_lowercase().contains("certificate"),
        "{error}"
    );
    srv.wait_event(T, |e| {
        matches!(
            e,
            Event::AuthFailed {
                code: Code::ProtocolError,
                ..
            }
        )
    })
    .await;
    srv.no_event(Duration::from_millis(300), |e| {
        matches!(e, Event::Registered { .. })
    })
    .await;
    let m = srv.registry.metrics();
    assert_eq!(m.handshakes_ok, 0);
    assert!(m.handshakes_failed["protocol_error"] >= 1);
}

#[tokio::test]
async fn wss_by_advertised_name() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let pki = pki();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &pki.ca_pem).unwrap();
    // A free port, so the advertised URL can name it before binding.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut opts = tls_opts(&pki);
    opts.listen = format!("127.0.0.1:{port}").parse().unwrap();
    opts.advertised = vec![format!("wss://LOCALHOST:{port}/registry")];
    let mut srv = TestServer::start(dir.path(), opts).await;
    let _agent = Agent::builder(format!("wss://localhost:{port}/"), "web001", key)
        .service("127.0.0.1:8443".parse().unwrap())
        .route("example.com", "/")
        .ca_file(&ca_path)
        .start()
        .unwrap();
    srv.wait_event(T, |e| matches!(e, Event::Registered { .. }))
        .await;
}

#[tokio::test]
async fn wss_signature_is_bound_to_the_tls_session() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let pki = pki();
    let mut srv = TestServer::start(dir.path(), tls_opts(&pki)).await;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(pki.ca_pem.as_bytes()) {
        let c: CertificateDer = c.unwrap();
        roots.add(c).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let channel = format!("wss://{}", srv.addr);
    // Sign with `tls_exporter` = the exporter of this session, then with an
    // empty one (what a relay that terminates TLS would have to forward).
    for (use_exporter, expect_ok) in [(false, false), (true, true)] {
        let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(client.clone()))
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .unwrap();
        let exporter = tls
            .get_ref()
            .1
            .export_keying_material(vec![0u8; 32], b"EXPORTER-ippool-registry", None)
            .unwrap();
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                channel.as_str(),
            )
            .unwrap();
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            tokio_tungstenite::tungstenite::http::HeaderValue::from_static(registry::SUBPROTOCOL),
        );
        let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
        let Some(Ok(Message::Text(t))) = ws.next().await else {
            panic!("no challenge")
        };
        let ch: serde_json::Value = serde_json::from_str(&t).unwrap();
        let nonce = B64
            .decode(ch["payload"]["nonce"].as_str().unwrap())
            .unwrap();
        let binding: &[u8] = if use_exporter { &exporter } else { b"" };
        let sig = key.sign(&registry::auth_message(&nonce, "web001", &channel, binding));
        let answer = json!({
            "header": {"type": "auth", "action": "answer"},
            "payload": {"id": "web001", "channel": channel, "signature": B64.encode(sig.to_bytes())}
        });
        ws.send(Message::text(answer.to_string())).await.unwrap();
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                assert!(expect_ok, "accepted without the TLS binding: {t}");
                assert!(t.contains("\"ok\""), "{t}");
            }
            Some(Ok(Message::Close(Some(f)))) => {
                assert!(!expect_ok, "refused: {f:?}");
                assert_eq!(u16::from(f.code), 4001);
            }
            other => panic!("{other:?}"),
        }
    }
    srv.wait_event(T, |e| matches!(e, Event::AgentConnected { .. }))
        .await;
}

#[tokio::test]
async fn plain_ws_to_a_tls_listener_fails() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let pki = pki();
    let mut srv = TestServer::start(dir.path(), tls_opts(&pki)).await;
    let agent = Agent::builder(format!("ws://{}", srv.addr), "web001", key)
        .service("127.0.0.1:8443".parse().unwrap())
        .route("example.com", "/")
        .start()
        .unwrap();
    let mut w = agent.watch();
    tokio::time::timeout(
        T,
        w.wait_for(|s| matches!(s, AgentState::Disconnected { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    srv.no_event(Duration::from_millis(300), |e| {
        matches!(e, Event::Registered { .. })
    })
    .await;
}
