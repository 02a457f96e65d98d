//! Backend self-registration: backends ("agents") register their services
//! with the proxy over an authenticated WebSocket control channel.
//!
//! - [`RegistryServer`]: the control-channel listener (`ws://`, or `wss://`
//!   with a rustls config), default `127.0.0.1:3042`. Its [`Registry`]
//!   handle reports every change as an [`Event`] and gives a
//!   [`snapshot`](Registry::snapshot) of the services; the binary turns
//!   those into route-table updates (this crate knows nothing of the data
//!   plane).
//! - [`Agent`]: the backend's side: register services, stay registered
//!   across disconnections and proxy restarts, drain on shutdown, send
//!   custom messages.
//! - [`KeyStore`]: the public keys allowed to connect, one file per id;
//!   [`generate_keypair`] makes a key pair (`ippool keygen`).
//!
//! ```no_run
//! use std::path::Path;
//! use registry::{Agent, Event, KeyId, KeyStore, RegistryOptions, RegistryServer, Role};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // Once (`ippool keygen --id web001`): a key pair for the backend. Its
//! // `web001.pub` goes into the registry's key store, `web001.key` stays
//! // with the backend.
//! let id: KeyId = "web001".parse()?;
//! registry::generate_keypair(Path::new("."), &id, Role::Agent)?;
//! std::fs::copy("web001.pub", "/etc/ippool/keys/web001.pub")?;
//!
//! // The proxy side.
//! let keys = KeyStore::open("/etc/ippool/keys")?;
//! let server = RegistryServer::bind(RegistryOptions::default(), keys).await?;
//! let registry = server.registry();
//! let mut events = registry.subscribe();
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let serving = tokio::spawn(server.serve(async { let _ = stopped.await; }));
//!
//! // The backend side.
//! let key = registry::load_signing_key(Path::new("web001.key"))?;
//! let agent = Agent::builder("ws://127.0.0.1:3042", "web001", key)
//!     .service("127.0.0.1:8080".parse()?)
//!     .route("example.com", "/")
//!     .start()?;
//!
//! if let Event::Registered { service } = events.recv().await? {
//!     println!("{} serves {:?} at {}", service.id, service.routes, service.addr);
//! }
//! agent.shutdown().await; // Draining, then Deregistered after drain_timeout
//! let _ = stop.send(());
//! serving.await?;
//! # Ok(()) }
//! ```
//!
//! # Key store
//!
//! A directory. `<id>.pub` is an active public key; `revoked/<id>.pub` a
//! revoked one. An id is 1-64 characters of `a-z 0-9 . _ -`, starting with
//! a letter or digit, without `..` ([`KeyId`]); files with any other name
//! are ignored, and `.pub` files whose stem is not a valid id are an error.
//! A public key file is lines of `keyword value`, `#` starting a comment:
//!
//! ```text
//! # ippool registry key `web001`
//! ed25519 Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=
//! role agent
//! allow peer, 10.0.0.0/8, 192.0.2.10-192.0.2.20, 2001:db8::/32
//! ```
//!
//! - `ed25519`: the 32-byte public key, base64 (standard, padded). Once.
//! - `role`: `agent` (registers services for itself) or `admin` (adds and
//!   revokes keys). Once, required: a role is never implied, and neither
//!   role can do what the other does.
//! - `allow` (agent keys only, any number of lines): the addresses its
//!   services may have: `peer` (the address the agent connects from) and
//!   addresses, ranges, subnets. Without `allow`, only `peer`.
//!
//! Private keys (`<id>.key`, written by [`generate_keypair`] with mode
//! 0600) are PKCS#8 PEM, the format of `openssl genpkey -algorithm ed25519`.
//! [`load_signing_key`] refuses a private key file others may read.
//!
//! # Wire protocol (`ippool.v1`)
//!
//! The client offers the subprotocol `ippool.v1` (the upgrade is refused
//! with HTTP 400 otherwise). Every message is a text frame holding the
//! envelope `{"header": {"type", "action", "id"?}, "payload"}`; unknown
//! fields are refused everywhere. `id` is the sender's request number,
//! repeated in the reply.
//!
//! Handshake, all within `handshake_timeout` of the TCP accept:
//!
//! 1. server: `auth/challenge {nonce, protocol}`: 32 fresh random bytes.
//! 2. agent: `auth/answer {id, channel, signature}`: `channel` is the URL
//!    it dialed, normalized to `ws://host:port`; `signature` signs
//!    [`auth_message`] (nonce, id, channel, subprotocol and, on `wss://`,
//!    a TLS exporter value, behind a domain-separation prefix). An answer
//!    is good for one connection only: replayed on another it fails. The
//!    server accepts the channel `ws(s)://<address the agent connected
//!    to>` and the [`RegistryOptions::advertised`] URLs.
//! 3. server: `auth/ok {id, role, peer, heartbeat_interval_ms,
//!    heartbeat_timeout_ms}`, or a close frame with the reason code.
//!
//! Then requests, each answered by `ack` (same `action` and `id`) or
//! `error {code, reason, message}`:
//!
//! | type/action | role | payload | effect |
//! |---|---|---|---|
//! | `service/register` | agent | `{name, addr, routes: [{host, path_prefix}], weight?, version?, metadata?}` | [`Event::Registered`] (an upsert) |
//! | `service/drain` | agent | `{name}` | [`Event::Draining`], then [`Event::Deregistered`] after `drain_timeout`; ack has `drain_ms` |
//! | `service/deregister` | agent | `{name}` | [`Event::Deregistered`] at once |
//! | `service/set_weight` | agent | `{name, weight}` | [`Event::WeightChanged`] |
//! | `key/add` | admin | `{id, public_key, role, allow?}` | writes `<id>.pub`; [`Event::KeyAdded`] |
//! | `key/revoke` | admin | `{id}` | moves it to `revoked/`, closes its connection (4003); [`Event::KeyRevoked`] |
//! | any other type | both | anything | [`Event::Custom`] |
//!
//! A service's id is `<agent id>/<name>`, so an agent can only name its
//! own; `addr` is an IP address and port that the key's `allow` policy
//! must cover. The server pings every `heartbeat_interval`.
//!
//! When a connection ends: a clean close (close frame from the agent)
//! drains its services; a dead one (EOF without close, no frame within
//! `heartbeat_timeout`, revocation, protocol abuse) removes them at once; a
//! newer connection of the same id (4011) takes them over, and those it
//! does not register again within `heartbeat_timeout` are removed.
//!
//! Request errors (malformed JSON, schema, unknown action, forbidden,
//! invalid) get an error frame and the connection stays open, up to 32 of
//! them; handshake errors close the connection.
//!
//! # Codes
//!
//! One table ([`Code`]) for close frames and error frames:
//!
//! | code | name | sent as | when |
//! |---|---|---|---|
//! | 1000 | `normal` | close | the agent closed the channel |
//! | 1001 | `going_away` | close | the server shuts down |
//! | 1009 | `too_big` | close | a message over `max_message_bytes` |
//! | 4001 | `auth_failed` | close | forged or replayed signature, wrong channel, malformed answer |
//! | 4002 | `unknown_id` | close | no key with that id |
//! | 4003 | `revoked` | close | the key is revoked (also while connected) |
//! | 4004 | `handshake_timeout` | close | no answer within `handshake_timeout` |
//! | 4005 | `forbidden` | error | wrong role, or an address the key may not register |
//! | 4006 | `conflict` | error | `key/add` of an id that has an active key |
//! | 4007 | `not_found` | error | unknown service name or key id |
//! | 4008 | `protocol_error` | both | malformed JSON, schema, unknown type or action, binary frame (close before authentication) |
//! | 4009 | `invalid` | error | a value out of range (address, route, weight, id, …) |
//! | 4010 | `heartbeat_timeout` | close | nothing from the agent within `heartbeat_timeout` |
//! | 4011 | `superseded` | close | the same id authenticated on a newer connection |
//! | 4012 | `limit` | both | services per agent (error), more than 32 errors (close) |
//! | 4013 | `internal` | error | the key store could not be written |
//!
//! Every handshake failure is counted ([`Metrics::handshakes_failed`]) and
//! reported ([`Event::AuthFailed`]); it changes nothing.

mod agent;
mod keys;
mod proto;
mod server;
mod session;

pub use agent::{Agent, AgentBuilder, AgentError, AgentState};
pub use keys::{
    Allow, KeyEntry, KeyError, KeyId, KeyStore, Role, generate_keypair, load_signing_key,
};
pub use proto::{Code, Route, SUBPROTOCOL, auth_message};
pub use server::{
    Admit, Event, Metrics, Registry, RegistryError, RegistryOptions, RegistryServer, Service,
};

/// Re-exported so users name the same key types as this crate.
pub use ed25519_dalek::{SigningKey, VerifyingKey};
