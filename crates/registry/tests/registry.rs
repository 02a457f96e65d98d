//! The control channel end to end, on loopback sockets.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use registry::{Agent, AgentError, AgentState, Allow, Code, Event, KeyId, Role};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(5);

async fn wait_state(agent: &Agent, pred: impl Fn(&AgentState) -> bool) -> AgentState {
    let mut w = agent.watch();
    tokio::time::timeout(T, w.wait_for(|s| pred(s)))
        .await
        .unwrap_or_else(|_| panic!("agent state did not change in time: {:?}", agent.state()))
        .unwrap()
        .clone()
}

fn is_registered(ev: &Event) -> bool {
    matches!(ev, Event::Registered { .. })
}

fn disconnected_with(code: u16) -> impl Fn(&AgentState) -> bool {
    move |s| matches!(s, AgentState::Disconnected { code: Some(c), .. } if *c == code)
}

#[tokio::test]
async fn handshake_ok_registration_in_snapshot_and_event() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    let agent = Agent::builder(srv.url(), "web001", key)
        .service("127.0.0.1:8080".parse().unwrap())
        .name("web")
        .route("example.com", "/api")
        .route("*.example.org", "/")
        .weight(3)
        .version("1.2.3")
        .metadata("zone", "a")
        .start()
        .unwrap();
    let ev = srv.wait_event(T, is_registered).await;
    let Event::Registered { service } = ev else {
        unreachable!()
    };
    assert_eq!(service.id, "web001/web");
    assert_eq!(service.agent.as_str(), "web001");
    assert_eq!(service.addr, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(service.routes.len(), 2);
    assert_eq!(service.routes[0].host, "example.com");
    assert_eq!(service.routes[0].path_prefix, "/api");
    assert_eq!(service.weight, 3);
    assert_eq!(service.version.as_deref(), Some("1.2.3"));
    assert_eq!(service.metadata.get("zone").map(String::as_str), Some("a"));
    wait_state(&agent, |s| *s == AgentState::Registered).await;
    assert_eq!(srv.registry.snapshot(), vec![service]);
    let m = srv.registry.metrics();
    assert_eq!(m.handshakes_ok, 1);
    assert_eq!(m.agents_connected, 1);
    assert_eq!(m.services, 1);
    assert_eq!(m.messages["service.register"], 1);
    assert!(m.handshakes_failed.values().all(|v| *v == 0), "{m:?}");
}

/// A refused handshake: the close code, the counter, the event, no state.
async fn refused(srv: &mut TestServer, agent: &Agent, code: Code) {
    wait_state(agent, disconnected_with(code.as_u16())).await;
    let ev = srv
        .wait_event(T, |e| matches!(e, Event::AuthFailed { .. }))
        .await;
    let Event::AuthFailed { code: c, .. } = ev else {
        unreachable!()
    };
    assert_eq!(c, code);
    assert!(srv.registry.metrics().handshakes_failed[code.name()] >= 1);
    assert!(srv.registry.snapshot().is_empty());
    assert_eq!(srv.registry.metrics().handshakes_ok, 0);
}

#[tokio::test]
async fn signature_by_another_key_is_refused() {
    let dir = TempDir::new();
    add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    let agent = Agent::builder(srv.url(), "web001", new_key())
        .service("127.0.0.1:8080".parse().unwrap())
        .route("example.com", "/")
        .start()
        .unwrap();
    refused(&mut srv, &agent, Code::AuthFailed).await;
}

#[tokio::test]
async fn unknown_id_is_refused() {
    let dir = TempDir::new();
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    let agent = Agent::builder(srv.url(), "nobody", new_key())
        .service("127.0.0.1:8080".parse().unwrap())
        .route("example.com", "/")
        .start()
        .unwrap();
    refused(&mut srv, &agent, Code::UnknownId).await;
}

#[tokio::test]
async fn revoked_key_is_refused() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    std::fs::create_dir(dir.path().join("revoked")).unwrap();
    std::fs::rename(
        dir.path().join("web001.pub"),
        dir.path().join("revoked/web001.pub"),
    )
    .unwrap();
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    let agent = Agent::builder(srv.url(), "web001", key)
        .service("127.0.0.1:8080".parse().unwrap())
        .route("example.com", "/")
        .start()
        .unwrap();
    refused(&mut srv, &agent, Code::Revoked).await;
}

#[tokio::test]
async fn replayed_answer_on_another_connection_is_refused() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    let channel = srv.url();
    // Connection A: a valid answer, captured before it is sent.
    let (mut a, nonce_a) = raw_connect(srv.addr).await;
    let captured = answer(&key, "web001", &nonce_a, &channel);
    // Connection B: the captured answer is replayed.
    let (mut b, nonce_b) = raw_connect(srv.addr).await;
    assert_ne!(nonce_a, nonce_b);
    b.send(Message::text(captured.clone())).await.unwrap();
    assert_eq!(expect_close(&mut b).await, 4001);
    let ev = srv
        .wait_event(T, |e| matches!(e, Event::AuthFailed { .. }))
        .await;
    assert!(
        matches!(ev, Event::AuthFailed { code: Code::AuthFailed, id: Some(ref i), .. } if i == "web001")
    );
    // The same answer on its own connection is good: it was not forged.
    let ok = call(&mut a, captured).await;
    assert_eq!(ok["header"]["action"], "ok");
    let m = srv.registry.metrics();
    assert_eq!(
        (m.handshakes_ok, m.handshakes_failed["auth_failed"]),
        (1, 1)
    );
}

#[tokio::test]
async fn answer_for_another_channel_is_refused() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    // Signed for a channel this server does not serve (a relaying server).
    let (mut ws, nonce) = raw_connect(srv.addr).await;
    ws.send(Message::text(answer(
        &key,
        "web001",
        &nonce,
        "ws://evil.example:3042",
    )))
    .await
    .unwrap();
    assert_eq!(expect_close(&mut ws).await, 4001);
    // Signed for our channel but claiming another in the answer.
    let (mut ws, nonce) = raw_connect(srv.addr).await;
    let good = answer(&key, "web001", &nonce, &srv.url());
    let forged = good.replace(&srv.url(), "ws://evil.example:3042");
    ws.send(Message::text(forged)).await.unwrap();
    assert_eq!(expect_close(&mut ws).await, 4001);
    srv.wait_event(T, |e| {
        matches!(
            e,
            Event::AuthFailed {
                code: Code::AuthFailed,
                ..
            }
        )
    })
    .await;
    assert_eq!(srv.registry.metrics().handshakes_failed["auth_failed"], 2);
}

#[tokio::test]
async fn late_answer_times_out() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut opts = fast_opts();
    opts.handshake_timeout = Duration::from_millis(300);
    let mut srv = TestServer::start(dir.path(), opts).await;
    let (mut ws, nonce) = raw_connect(srv.addr).await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = ws
        .send(Message::text(answer(&key, "web001", &nonce, &srv.url())))
        .await;
    assert_eq!(expect_close(&mut ws).await, 4004);
    assert!(started.elapsed() >= Duration::from_millis(300));
    srv.wait_event(T, |e| {
        matches!(
            e,
            Event::AuthFailed {
                code: Code::HandshakeTimeout,
                ..
            }
        )
    })
    .await;
    let m = srv.registry.metrics();
    assert_eq!(
        (m.handshakes_ok, m.handshakes_failed["handshake_timeout"]),
        (0, 1)
    );
}

#[tokio::test]
async fn missing_subprotocol_is_refused_at_upgrade() {
    let dir = TempDir::new();
    let srv = TestServer::start(dir.path(), fast_opts()).await;
    let err = tokio_tungstenite::client_async(
        format!("ws://{}/", srv.addr),
        tokio::net::TcpStream::connect(srv.addr).await.unwrap(),
    )
    .await
    .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 400),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        srv.registry.metrics().handshakes_failed["protocol_error"],
        1
    );
}

#[tokio::test]
async fn address_outside_the_key_policy_is_forbidden() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    // Someone else's address: the default policy allows only the agent's own.
    let agent = Agent::builder(srv.url(), "web001", key.clone())
        .service("10.1.2.3:80".parse().unwrap())
        .route("example.com", "/")
        .start()
        .unwrap();
    let s = wait_state(&agent, |s| matches!(s, AgentState::Rejected { .. })).await;
    assert!(
        matches!(s, AgentState::Rejected { code: 4005, .. }),
        "{s:?}"
    );
    assert!(srv.registry.snapshot().is_empty());
    assert_eq!(srv.registry.metrics().errors["forbidden"], 1);
    srv.no_event(Duration::from_millis(200), is_registered)
        .await;
    drop(agent);

    // Raw: the error frame repeats the request id and action.
    let mut ws = raw_auth(srv.addr, "web001", &key).await;
    let reply = call(&mut ws, register_msg(7, "web", "127.0.0.2:80")).await;
    assert_eq!(
        reply["header"],
        json!({"type": "error", "action": "register", "id": 7})
    );
    assert_eq!(reply["payload"]["code"], 4005);
    assert_eq!(reply["payload"]["reason"], "forbidden");
    // The connection survives; the agent's own address is fine.
    let reply = call(&mut ws, register_msg(8, "web", "127.0.0.1:80")).await;
    assert_eq!(
        reply["header"],
        json!({"type": "ack", "action": "register", "id": 8})
    );
    assert_eq!(reply["payload"]["service"], "web001/web");
}

#[tokio::test]
async fn explicit_allow_list_replaces_the_peer_default() {
    let dir = TempDir::new();
    let key = add_key(
        dir.path(),
        "web001",
        Role::Agent,
        &["10.0.0.0/8", "192.0.2.7"],
    );
    let srv = TestServer::start(dir.path(), fast_opts()).await;
    let mut ws = raw_auth(srv.addr, "web001", &key).await;
    let reply = call(&mut ws, register_msg(1, "a", "10.9.8.7:80")).await;
    assert_eq!(reply["header"]["type"], "ack", "{reply}");
    let reply = call(&mut ws, register_msg(2, "b", "192.0.2.7:443")).await;
    assert_eq!(reply["header"]["type"], "ack", "{reply}");
    let reply = call(&mut ws, register_msg(3, "c", "192.0.2.8:443")).await;
    assert_eq!(reply["payload"]["code"], 4005, "{reply}");
    let reply = call(&mut ws, register_msg(4, "d", "127.0.0.1:80")).await;
    assert_eq!(
        reply["payload"]["code"], 4005,
        "the peer is not in the list: {reply}"
    );
    let ids: Vec<_> = srv.registry.snapshot().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, ["web001/a", "web001/b"]);
}

#[tokio::test]
async fn an_agent_cannot_touch_another_agents_service() {
    let dir = TempDir::new();
    let ka = add_key(dir.path(), "alice", Role::Agent, &[]);
    let kb = add_key(dir.path(), "bob", Role::Agent, &[]);
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    let mut a = raw_auth(srv.addr, "alice", &ka).await;
    assert_eq!(
        call(&mut a, register_msg(1, "web", "127.0.0.1:80")).await["header"]["type"],
        "ack"
    );
    let mut b = raw_auth(srv.addr, "bob", &kb).await;
    for action in ["deregister", "drain"] {
        let msg = json!({"header": {"type": "service", "action": action, "id": 1}, "payload": {"name": "web"}});
        let reply = call(&mut b, msg.to_string()).await;
        assert_eq!(reply["payload"]["code"], 4007, "{reply}");
    }
    // Same name, bob's own namespace: a separate service.
    assert_eq!(
        call(&mut b, register_msg(2, "web", "127.0.0.1:81")).await["payload"]["service"],
        "bob/web"
    );
    let ids: Vec<_> = srv.registry.snapshot().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, ["alice/web", "bob/web"]);
    srv.no_event(Duration::from_millis(100), |e| {
        matches!(e, Event::Deregistered { .. } | Event::Draining { .. })
    })
    .await;
}

#[tokio::test]
async fn agent_key_cannot_manage_keys_and_admin_key_cannot_register() {
    let dir = TempDir::new();
    let agent_key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let admin_key = add_key(dir.path(), "ops", Role::Admin, &[]);
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    let agent = Agent::builder(srv.url(), "web001", agent_key)
        .start()
        .unwrap();
    wait_state(&agent, |s| *s == AgentState::Registered).await;
    let newcomer: KeyId = "intruder".parse().unwrap();
    let err = agent
        .add_key(&newcomer, &new_key().verifying_key(), Role::Admin, &[])
        .await
        .unwrap_err();
    assert!(
        matches!(err, AgentError::Refused { code: 4005, .. }),
        "{err}"
    );
    let err = agent.revoke_key(&"ops".parse().unwrap()).await.unwrap_err();
    assert!(
        matches!(err, AgentError::Refused { code: 4005, .. }),
        "{err}"
    );
    assert!(!dir.path().join("intruder.pub").exists());
    assert!(dir.path().join("ops.pub").exists());
    assert_eq!(srv.registry.metrics().errors["forbidden"], 2);

    let admin = Agent::builder(srv.url(), "ops", admin_key)
        .service("127.0.0.1:8080".parse().unwrap())
        .route("example.com", "/")
        .start()
        .unwrap();
    let s = wait_state(&admin, |s| matches!(s, AgentState::Rejected { .. })).await;
    assert!(
        matches!(s, AgentState::Rejected { code: 4005, .. }),
        "{s:?}"
    );
    assert!(srv.registry.snapshot().is_empty());
    srv.no_event(Duration::from_millis(100), |e| {
        matches!(
            e,
            Event::KeyAdded { .. } | Event::KeyRevoked { .. } | Event::Registered { .. }
        )
    })
    .await;
}

#[tokio::test]
async fn admin_adds_a_key_then_revokes_it() {
    let dir = TempDir::new();
    let admin_key = add_key(dir.path(), "ops", Role::Admin, &[]);
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    let admin = Agent::builder(srv.url(), "ops", admin_key).start().unwrap();
    wait_state(&admin, |s| *s == AgentState::Registered).await;

    let id: KeyId = "web002".parse().unwrap();
    let key = new_key();
    admin
        .add_key(
            &id,
            &key.verifying_key(),
            Role::Agent,
            &[Allow::Peer, Allow::Rule("10.0.0.0/8".parse().unwrap())],
        )
        .await
        .unwrap();
    let text = std::fs::read_to_string(dir.path().join("web002.pub")).unwrap();
    assert!(
        text.contains("role agent") && text.contains("allow peer, 10.0.0.0/8"),
        "{text}"
    );
    let ev = srv
        .wait_event(T, |e| matches!(e, Event::KeyAdded { .. }))
        .await;
    assert_eq!(
        ev,
        Event::KeyAdded {
            id: id.clone(),
            role: Role::Agent,
            by: Some("ops".parse().unwrap())
        }
    );
    // Adding it again is a conflict; a bad id is invalid.
    let err = admin
        .add_key(&id, &key.verifying_key(), Role::Agent, &[])
        .await
        .unwrap_err();
    assert!(
        matches!(err, AgentError::Refused { code: 4006, .. }),
        "{err}"
    );

    // The new key works at once.
    let web = Agent::builder(srv.url(), "web002", key.clone())
        .service("10.0.0.5:80".parse().unwrap())
        .route("example.com", "/")
        .backoff(Duration::from_millis(50), Duration::from_millis(100))
        .start()
        .unwrap();
    srv.wait_event(T, is_registered).await;

    // Revoked: the file moves, the live connection closes, the service goes.
    admin.revoke_key(&id).await.unwrap();
    assert!(!dir.path().join("web002.pub").exists());
    assert!(dir.path().join("revoked/web002.pub").exists());
    let ev = srv
        .wait_event(T, |e| matches!(e, Event::Deregistered { .. }))
        .await;
    assert!(matches!(ev, Event::Deregistered { ref service, .. } if service == "web002/svc0"));
    srv.wait_event(T, |e| {
        matches!(
            e,
            Event::AgentDisconnected {
                code: Code::Revoked,
                ..
            }
        )
    })
    .await;
    // Its reconnections are refused from now on.
    wait_state(&web, disconnected_with(4003)).await;
    srv.wait_event(T, |e| {
        matches!(
            e,
            Event::AuthFailed {
                code: Code::Revoked,
                ..
            }
        )
    })
    .await;
    assert!(srv.registry.snapshot().is_empty());
    let err = admin.revoke_key(&id).await.unwrap_err();
    assert!(
        matches!(err, AgentError::Refused { code: 4007, .. }),
        "{err}"
    );
    let m = srv.registry.metrics();
    assert_eq!((m.messages["key.add"], m.messages["key.revoke"]), (2, 2));
}

#[tokio::test]
async fn malformed_and_unknown_messages_get_error_frames() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let srv = TestServer::start(dir.path(), fast_opts()).await;
    let mut ws = raw_auth(srv.addr, "web001", &key).await;
    let cases = [
        ("{not json".to_string(), 4008),
        (json!({"header": {"type": "service", "action": "explode", "id": 3}, "payload": {}}).to_string(), 4008),
        (json!({"header": {"type": "service", "action": "register"}, "payload": {}, "extra": 1}).to_string(), 4008),
        (json!({"header": {"type": "service", "action": "register", "id": 4}, "payload": {"name": "w", "addr": "127.0.0.1:1", "routes": [], "sudo": true}}).to_string(), 4008),
        (json!({"header": {"type": "service", "action": "register", "id": 5}, "payload": {"name": "w", "addr": "127.0.0.1:0", "routes": [{"host": "a", "path_prefix": "/"}]}}).to_string(), 4009),
        (json!({"header": {"type": "service", "action": "register", "id": 6}, "payload": {"name": "w", "addr": "127.0.0.1:1", "routes": [{"host": "a", "path_prefix": "no-slash"}]}}).to_string(), 4009),
        (json!({"header": {"type": "service", "action": "register", "id": 7}, "payload": {"name": "../w", "addr": "127.0.0.1:1", "routes": [{"host": "a", "path_prefix": "/"}]}}).to_string(), 4009),
        (json!({"header": {"type": "service", "action": "set_weight", "id": 8}, "payload": {"name": "w", "weight": 1}}).to_string(), 4007),
        (json!({"header": {"type": "auth", "action": "answer", "id": 9}, "payload": {}}).to_string(), 4008),
        (json!({"header": {"type": "bad type!", "action": "x"}, "payload": {}}).to_string(), 4008),
    ];
    for (text, code) in cases {
        let reply = call(&mut ws, text.clone()).await;
        assert_eq!(reply["header"]["type"], "error", "{text} → {reply}");
        assert_eq!(reply["payload"]["code"], code, "{text} → {reply}");
        assert_eq!(
            reply["payload"]["reason"],
            Code::from_u16(code).unwrap().name()
        );
    }
    // The id comes back even when the request is wrong.
    let reply = call(
        &mut ws,
        json!({"header": {"type": "service", "action": "explode", "id": 3}}).to_string(),
    )
    .await;
    assert_eq!(reply["header"]["id"], 3);
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(next_json(&mut ws).await["payload"]["code"], 4008);
    // Still connected and working.
    let reply = call(&mut ws, register_msg(10, "web", "127.0.0.1:80")).await;
    assert_eq!(reply["header"]["type"], "ack", "{reply}");
    assert_eq!(srv.registry.snapshot().len(), 1);
    let m = srv.registry.metrics();
    assert_eq!(m.errors["protocol_error"], 8);
    assert_eq!(m.errors["invalid"], 3);
    assert_eq!(m.errors["not_found"], 1);
}

#[tokio::test]
async fn too_many_errors_close_the_channel() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let srv = TestServer::start(dir.path(), fast_opts()).await;
    let mut ws = raw_auth(srv.addr, "web001", &key).await;
    assert_eq!(
        call(&mut ws, register_msg(1, "web", "127.0.0.1:80")).await["header"]["type"],
        "ack"
    );
    for _ in 0..32 {
        assert_eq!(
            call(&mut ws, "nope".into()).await["header"]["type"],
            "error"
        );
    }
    ws.send(Message::text("nope")).await.unwrap();
    assert_eq!(expect_close(&mut ws).await, 4012);
    assert!(
        srv.registry.snapshot().is_empty(),
        "an abusive channel's services are removed"
    );
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut opts = fast_opts();
    opts.max_message_bytes = 4096;
    let srv = TestServer::start(dir.path(), opts).await;
    let mut ws = raw_auth(srv.addr, "web001", &key).await;
    let big = json!({"header": {"type": "x", "action": "y"}, "payload": "a".repeat(10_000)});
    let _ = ws.send(Message::text(big.to_string())).await;
    assert_eq!(expect_close(&mut ws).await, 1009);
    assert_eq!(srv.registry.metrics().errors["too_big"], 1);
}

#[tokio::test]
async fn silent_agent_is_removed_after_heartbeat_timeout() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    let mut ws = raw_auth(srv.addr, "web001", &key).await;
    assert_eq!(
        call(&mut ws, register_msg(1, "web", "127.0.0.1:80")).await["header"]["type"],
        "ack"
    );
    srv.wait_event(T, is_registered).await;
    // The socket stays open, but nothing reads it: no pong ever goes back.
    let stalled = Instant::now();
    let ev = srv
        .wait_event(T, |e| matches!(e, Event::Deregistered { .. }))
        .await;
    let took = stalled.elapsed();
    assert!(matches!(ev, Event::Deregistered { ref service, .. } if service == "web001/web"));
    assert!(
        took >= Duration::from_millis(250),
        "removed too early: {took:?}"
    );
    assert!(
        took < Duration::from_millis(300 + 400),
        "removed too late: {took:?}"
    );
    srv.wait_event(T, |e| {
        matches!(
            e,
            Event::AgentDisconnected {
                code: Code::HeartbeatTimeout,
                ..
            }
        )
    })
    .await;
    let m = srv.registry.metrics();
    assert_eq!(
        (m.heartbeat_timeouts, m.agents_connected, m.services),
        (1, 0, 0)
    );
    drop(ws);
}

#[tokio::test]
async fn pinging_agent_stays_registered() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    let agent = Agent::builder(srv.url(), "web001", key)
        .service("127.0.0.1:8080".parse().unwrap())
        .route("example.com", "/")
        .start()
        .unwrap();
    srv.wait_event(T, is_registered).await;
    // Several heartbeat timeouts pass; the agent answers the pings.
    srv.no_event(Duration::from_millis(1000), |e| {
        !matches!(e, Event::Registered { .. })
    })
    .await;
    assert_eq!(agent.state(), AgentState::Registered);
    assert_eq!(srv.registry.snapshot().len(), 1);
}

#[tokio::test]
async fn killed_agent_is_removed_within_heartbeat_timeout() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    let agent = Agent::builder(srv.url(), "web001", key)
        .service("127.0.0.1:8080".parse().unwrap())
        .route("example.com", "/")
        .start()
        .unwrap();
    srv.wait_event(T, is_registered).await;
    let killed = Instant::now();
    drop(agent); // aborts the task: the socket goes without a close frame
    srv.wait_event(Duration::from_millis(300 + 400), |e| {
        matches!(e, Event::Deregistered { .. })
    })
    .await;
    assert!(killed.elapsed() < Duration::from_millis(700));
    assert!(srv.registry.snapshot().is_empty());
}

#[tokio::test]
async fn graceful_shutdown_drains_then_deregisters() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    let agent = Agent::builder(srv.url(), "web001", key)
        .service("127.0.0.1:8080".parse().unwrap())
        .route("example.com", "/")
        .start()
        .unwrap();
    srv.wait_event(T, is_registered).await;
    let t0 = Instant::now();
    agent.shutdown().await;
    let ev = srv
        .wait_event(T, |e| !matches!(e, Event::AgentDisconnected { .. }))
        .await;
    let Event::Draining {
        service, deadline, ..
    } = ev
    else {
        panic!("{ev:?}")
    };
    assert_eq!(service, "web001/svc0");
    assert!(deadline > t0);
    assert!(
        srv.registry.snapshot().is_empty(),
        "draining services take no new requests"
    );
    assert_eq!(srv.registry.metrics().services, 1, "but are still there");
    let ev = srv
        .wait_event(T, |e| !matches!(e, Event::AgentDisconnected { .. }))
        .await;
    assert!(
        matches!(ev, Event::Deregistered { ref service, .. } if service == "web001/svc0"),
        "{ev:?}"
    );
    assert!(
        Instant::now() + Duration::from_millis(20) >= deadline,
        "removed before the drain deadline"
    );
    assert_eq!(srv.registry.metrics().services, 0);
    assert_eq!(srv.registry.metrics().messages["service.drain"], 1);
}

#[tokio::test]
async fn clean_close_drains_and_reregistering_cancels_the_drain() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut opts = fast_opts();
    opts.drain_timeout = Duration::from_millis(400);
    let mut srv = TestServer::start(dir.path(), opts).await;
    let mut ws = raw_auth(srv.addr, "web001", &key).await;
    assert_eq!(
        call(&mut ws, register_msg(1, "web", "127.0.0.1:80")).await["header"]["type"],
        "ack"
    );
    ws.close(None).await.unwrap();
    srv.wait_event(T, |e| matches!(e, Event::Draining { .. }))
        .await;
    let mut ws = raw_auth(srv.addr, "web001", &key).await;
    assert_eq!(
        call(&mut ws, register_msg(2, "web", "127.0.0.1:80")).await["header"]["type"],
        "ack"
    );
    let _alive = keep_alive(ws);
    srv.wait_event(T, is_registered).await;
    srv.no_event(Duration::from_millis(600), |e| {
        matches!(e, Event::Deregistered { .. })
    })
    .await;
    assert_eq!(srv.registry.snapshot().len(), 1);
}

#[tokio::test]
async fn agent_reconnects_and_reregisters_after_server_restart() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    let addr = srv.addr;
    let agent = Agent::builder(srv.url(), "web001", key)
        .service("127.0.0.1:8080".parse().unwrap())
        .route("example.com", "/")
        .backoff(Duration::from_millis(50), Duration::from_millis(200))
        .start()
        .unwrap();
    srv.wait_event(T, is_registered).await;
    wait_state(&agent, |s| *s == AgentState::Registered).await;
    agent.set_weight("svc0", 5).await.unwrap();
    srv.stop().await;
    wait_state(&agent, |s| matches!(s, AgentState::Disconnected { .. })).await;

    let mut opts = fast_opts();
    opts.listen = addr;
    let mut srv2 = TestServer::start(dir.path(), opts).await;
    let ev = srv2.wait_event(T, is_registered).await;
    assert!(matches!(ev, Event::Registered { ref service } if service.id == "web001/svc0"));
    let Event::Registered { service } = ev else {
        unreachable!()
    };
    assert_eq!(
        service.weight, 5,
        "the weight set at run time survives the reconnection"
    );
    wait_state(&agent, |s| *s == AgentState::Registered).await;
    assert_eq!(srv2.registry.snapshot().len(), 1);
}

#[tokio::test]
async fn newer_connection_supersedes_and_keeps_the_services() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    let mut old = raw_auth(srv.addr, "web001", &key).await;
    assert_eq!(
        call(&mut old, register_msg(1, "web", "127.0.0.1:80")).await["header"]["type"],
        "ack"
    );
    assert_eq!(
        call(&mut old, register_msg(2, "stale", "127.0.0.1:81")).await["header"]["type"],
        "ack"
    );
    let mut new = raw_auth(srv.addr, "web001", &key).await;
    assert_eq!(expect_close(&mut old).await, 4011);
    // The new connection registers one of the two again: it stays; the
    // other is removed once heartbeat_timeout has passed.
    assert_eq!(
        call(&mut new, register_msg(1, "web", "127.0.0.1:80")).await["header"]["type"],
        "ack"
    );
    let _alive = keep_alive(new);
    let ev = srv
        .wait_event(T, |e| matches!(e, Event::Deregistered { .. }))
        .await;
    assert!(
        matches!(ev, Event::Deregistered { ref service, .. } if service == "web001/stale"),
        "{ev:?}"
    );
    let ids: Vec<_> = srv.registry.snapshot().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, ["web001/web"]);
    srv.no_event(Duration::from_millis(400), |e| {
        matches!(e, Event::Deregistered { .. })
    })
    .await;
}

#[tokio::test]
async fn custom_messages_and_weight_changes_become_events() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    let agent = Agent::builder(srv.url(), "web001", key)
        .service("127.0.0.1:8080".parse().unwrap())
        .name("web")
        .route("example.com", "/")
        .start()
        .unwrap();
    wait_state(&agent, |s| *s == AgentState::Registered).await;
    agent
        .send("deploy", "FINISHED", json!({"build": 42}))
        .await
        .unwrap();
    let ev = srv
        .wait_event(T, |e| matches!(e, Event::Custom { .. }))
        .await;
    assert_eq!(
        ev,
        Event::Custom {
            agent: "web001".parse().unwrap(),
            kind: "deploy".into(),
            action: "FINISHED".into(),
            payload: json!({"build": 42}),
        }
    );
    assert!(matches!(
        agent.send("service", "register", json!({})).await,
        Err(AgentError::Config(_))
    ));
    let err = agent.send("bad type", "x", json!(null)).await.unwrap_err();
    assert!(
        matches!(err, AgentError::Refused { code: 4008, .. }),
        "{err}"
    );

    agent.set_weight("web", 0).await.unwrap();
    let ev = srv
        .wait_event(T, |e| matches!(e, Event::WeightChanged { .. }))
        .await;
    assert!(
        matches!(ev, Event::WeightChanged { weight: 0, ref service, .. } if service == "web001/web")
    );
    assert_eq!(srv.registry.snapshot()[0].weight, 0);
    let err = agent.set_weight("nope", 1).await.unwrap_err();
    assert!(
        matches!(err, AgentError::Refused { code: 4007, .. }),
        "{err}"
    );
    let err = agent.set_weight("web", 10_001).await.unwrap_err();
    assert!(
        matches!(err, AgentError::Refused { code: 4009, .. }),
        "{err}"
    );
    assert_eq!(srv.registry.metrics().messages["custom"], 1);
}

#[tokio::test]
async fn subscribe_with_snapshot_loses_nothing() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let srv = TestServer::start(dir.path(), fast_opts()).await;
    let mut ws = raw_auth(srv.addr, "web001", &key).await;
    assert_eq!(
        call(&mut ws, register_msg(1, "a", "127.0.0.1:80")).await["header"]["type"],
        "ack"
    );
    let (snap, mut rx) = srv.registry.subscribe_with_snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(
        call(&mut ws, register_msg(2, "b", "127.0.0.1:81")).await["header"]["type"],
        "ack"
    );
    let ev = wait_event(&mut rx, T, is_registered).await;
    assert!(matches!(ev, Event::Registered { ref service } if service.name == "b"));
}

#[tokio::test]
async fn builder_misuse_is_reported() {
    let k = new_key;
    let e = Agent::builder("ws://127.0.0.1:1", "web", k())
        .route("a", "/")
        .start()
        .unwrap_err();
    assert!(
        matches!(e, AgentError::Config(ref m) if m.contains("before any `service`")),
        "{e}"
    );
    let e = Agent::builder("ws://127.0.0.1:1", "../web", k())
        .start()
        .unwrap_err();
    assert!(matches!(e, AgentError::Config(_)), "{e}");
    let e = Agent::builder("http://127.0.0.1:1", "web", k())
        .start()
        .unwrap_err();
    assert!(matches!(e, AgentError::Config(_)), "{e}");
    let e = Agent::builder("wss://127.0.0.1:1", "web", k())
        .start()
        .unwrap_err();
    assert!(
        matches!(e, AgentError::Config(ref m) if m.contains("trusted roots")),
        "{e}"
    );
    let e = Agent::builder("ws://127.0.0.1:1", "web", k())
        .ca_file("/nonexistent")
        .start()
        .unwrap_err();
    assert!(
        matches!(e, AgentError::Config(ref m) if m.contains("not wss")),
        "{e}"
    );
    let e = Agent::builder("ws://127.0.0.1:1", "web", k())
        .service("127.0.0.1:1".parse().unwrap())
        .start()
        .unwrap_err();
    assert!(
        matches!(e, AgentError::Config(ref m) if m.contains("no route")),
        "{e}"
    );
}

#[tokio::test]
async fn max_connections_drops_extra_connections() {
    let dir = TempDir::new();
    let mut opts = fast_opts();
    opts.max_connections = 1;
    let srv = TestServer::start(dir.path(), opts).await;
    let (_first, _) = raw_connect(srv.addr).await;
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let r = tokio_tungstenite::client_async(ws_request(srv.addr), tcp).await;
    assert!(r.is_err(), "the second connection is dropped");
    assert_eq!(srv.registry.metrics().connections_refused, 1);
}

#[tokio::test]
async fn services_per_agent_are_limited() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut opts = fast_opts();
    opts.max_services_per_agent = 2;
    let srv = TestServer::start(dir.path(), opts).await;
    let mut ws = raw_auth(srv.addr, "web001", &key).await;
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        let reply = call(&mut ws, register_msg(i as u64, name, "127.0.0.1:80")).await;
        assert_eq!(reply["header"]["type"], "ack", "{reply}");
    }
    let reply = call(&mut ws, register_msg(3, "c", "127.0.0.1:80")).await;
    assert_eq!(reply["payload"]["code"], 4012, "{reply}");
    // Updating an existing one is not a new service.
    let reply = call(&mut ws, register_msg(4, "a", "127.0.0.1:81")).await;
    assert_eq!(reply["header"]["type"], "ack", "{reply}");
    assert_eq!(srv.registry.snapshot().len(), 2);
    assert_eq!(srv.registry.snapshot()[0].addr.port(), 81);
}

#[tokio::test]
async fn local_revocation_and_key_reload_close_live_connections() {
    let dir = TempDir::new();
    let k1 = add_key(dir.path(), "web001", Role::Agent, &[]);
    let k2 = add_key(dir.path(), "web002", Role::Agent, &[]);
    let mut srv = TestServer::start(dir.path(), fast_opts()).await;
    let mut a = raw_auth(srv.addr, "web001", &k1).await;
    assert_eq!(
        call(&mut a, register_msg(1, "web", "127.0.0.1:80")).await["header"]["type"],
        "ack"
    );
    let mut b = raw_auth(srv.addr, "web002", &k2).await;

    srv.registry.revoke_key(&"web001".parse().unwrap()).unwrap();
    assert_eq!(expect_close(&mut a).await, 4003);
    let ev = srv
        .wait_event(T, |e| matches!(e, Event::Deregistered { .. }))
        .await;
    assert!(matches!(ev, Event::Deregistered { ref service, .. } if service == "web001/web"));
    assert!(dir.path().join("revoked/web001.pub").exists());

    // web002's key file is replaced on disk: after a reload its connection goes.
    let _new = add_key(dir.path(), "web002", Role::Agent, &[]);
    srv.registry.reload_keys().unwrap();
    assert_eq!(expect_close(&mut b).await, 4003);
    let (mut c, nonce) = raw_connect(srv.addr).await;
    c.send(Message::text(answer(&k2, "web002", &nonce, &srv.url())))
        .await
        .unwrap();
    assert_eq!(
        expect_close(&mut c).await,
        4001,
        "the old key no longer signs"
    );
}

#[tokio::test]
async fn ipv6_loopback_channel() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut opts = fast_opts();
    opts.listen = "[::1]:0".parse().unwrap();
    let mut srv = TestServer::start(dir.path(), opts).await;
    let _agent = Agent::builder(format!("ws://{}", srv.addr), "web001", key)
        .service("[::1]:8080".parse().unwrap())
        .route("*", "/")
        .start()
        .unwrap();
    let ev = srv.wait_event(T, is_registered).await;
    assert!(
        matches!(ev, Event::Registered { ref service } if service.addr == "[::1]:8080".parse().unwrap())
    );
}

#[tokio::test]
async fn admit_refuses_peers_at_accept() {
    let dir = TempDir::new();
    let key = add_key(dir.path(), "web001", Role::Agent, &[]);
    let mut opts = fast_opts();
    // Only 127.0.0.1 may connect; a client from 127.0.0.2 may not.
    opts.admit = Some(registry::Admit(std::sync::Arc::new(
        |peer: std::net::SocketAddr| peer.ip() == std::net::IpAddr::from([127, 0, 0, 1]),
    )));
    let srv = TestServer::start(dir.path(), opts).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let refused = match sock.connect(srv.addr).await {
        Err(_) => true,
        Ok(tcp) => tokio_tungstenite::client_async(ws_request(srv.addr), tcp)
            .await
            .is_err(),
    };
    assert!(refused, "a peer the admit check refuses gets no channel");
    assert_eq!(srv.registry.metrics().connections_refused, 1);
    // An admitted peer is served as usual.
    let _ws = raw_auth(srv.addr, "web001", &key).await;
    assert_eq!(srv.registry.metrics().handshakes_ok, 1);
}
