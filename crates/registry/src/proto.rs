//! The wire protocol: envelope, payloads, codes, the signed challenge.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The WebSocket subprotocol (`Sec-WebSocket-Protocol`) of the control
/// channel. A client must offer it; the version is part of every signature.
pub const SUBPROTOCOL: &str = "ippool.v1";

/// Domain-separation prefix of the signed challenge.
const AUTH_DOMAIN: &[u8] = b"ippool-registry-auth\0";

/// Label of the TLS exporter (RFC 5705 / 8446 §7.5) that binds a signature
/// to the TLS session on `wss://` channels.
pub(crate) const TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-ippool-registry";

/// Close codes (sent in WebSocket close frames) and error codes (sent in
/// error frames). One table for both; see the crate documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "u16")]
#[non_exhaustive]
pub enum Code {
    /// 1000: the channel ended normally.
    Normal,
    /// 1001: the server is shutting down.
    GoingAway,
    /// 1009: a message exceeded `max_message_bytes`.
    TooBig,
    /// 4001: bad or forged signature, a replayed answer, a malformed answer,
    /// or a channel the server does not serve.
    AuthFailed,
    /// 4002: no key with the id (or an invalid id).
    UnknownId,
    /// 4003: the key is revoked (at the handshake, or while connected).
    Revoked,
    /// 4004: no answer to the challenge within `handshake_timeout`.
    HandshakeTimeout,
    /// 4005: the key's role or address policy does not allow the request.
    Forbidden,
    /// 4006: the thing to create exists already (a key id).
    Conflict,
    /// 4007: the thing named does not exist (a service name, a key id).
    NotFound,
    /// 4008: malformed JSON, a schema violation, an unknown type or action,
    /// a binary frame.
    ProtocolError,
    /// 4009: well-formed, but a value is out of range or invalid.
    Invalid,
    /// 4010: no frame from the peer within `heartbeat_timeout`.
    HeartbeatTimeout,
    /// 4011: the same id authenticated on a newer connection.
    Superseded,
    /// 4012: a limit was reached (services per agent, errors per connection).
    Limit,
    /// 4013: the server failed (e.g. a key file could not be written).
    Internal,
}

impl Code {
    const ALL: [Code; 16] = [
        Code::Normal,
        Code::GoingAway,
        Code::TooBig,
        Code::AuthFailed,
        Code::UnknownId,
        Code::Revoked,
        Code::HandshakeTimeout,
        Code::Forbidden,
        Code::Conflict,
        Code::NotFound,
        Code::ProtocolError,
        Code::Invalid,
        Code::HeartbeatTimeout,
        Code::Superseded,
        Code::Limit,
        Code::Internal,
    ];

    /// The numeric code.
    pub fn as_u16(self) -> u16 {
        match self {
            Code::Normal => 1000,
            Code::GoingAway => 1001,
            Code::TooBig => 1009,
            Code::AuthFailed => 4001,
            Code::UnknownId => 4002,
            Code::Revoked => 4003,
            Code::HandshakeTimeout => 4004,
            Code::Forbidden => 4005,
            Code::Conflict => 4006,
            Code::NotFound => 4007,
            Code::ProtocolError => 4008,
            Code::Invalid => 4009,
            Code::HeartbeatTimeout => 4010,
            Code::Superseded => 4011,
            Code::Limit => 4012,
            Code::Internal => 4013,
        }
    }

    /// The code with this number, if it is one of ours.
    pub fn from_u16(n: u16) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_u16() == n)
    }

    /// The short name used in error frames, logs and metrics
    /// (`auth_failed`, `unknown_id`, …).
    pub fn name(self) -> &'static str {
        match self {
            Code::Normal => "normal",
            Code::GoingAway => "going_away",
            Code::TooBig => "too_big",
            Code::AuthFailed => "auth_failed",
            Code::UnknownId => "unknown_id",
            Code::Revoked => "revoked",
            Code::HandshakeTimeout => "handshake_timeout",
            Code::Forbidden => "forbidden",
            Code::Conflict => "conflict",
            Code::NotFound => "not_found",
            Code::ProtocolError => "protocol_error",
            Code::Invalid => "invalid",
            Code::HeartbeatTimeout => "heartbeat_timeout",
            Code::Superseded => "superseded",
            Code::Limit => "limit",
            Code::Internal => "internal",
        }
    }
}

impl From<Code> for u16 {
    fn from(c: Code) -> u16 {
        c.as_u16()
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.as_u16(), self.name())
    }
}

/// The message envelope: `{"header": {"type", "action", "id"?}, "payload"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Envelope {
    pub header: Header,
    #[serde(default)]
    pub payload: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Header {
    #[serde(rename = "type")]
    pub kind: String,
    pub action: String,
    /// Request id chosen by the sender; replies (`ack`, `error`) repeat it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
}

impl Envelope {
    pub fn new(kind: &str, action: &str, id: Option<u64>, payload: serde_json::Value) -> Envelope {
        Envelope {
            header: Header {
                kind: kind.to_string(),
                action: action.to_string(),
                id,
            },
            payload,
        }
    }

    pub fn to_text(&self) -> String {
        // A `Value` tree with string keys always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Message types the protocol reserves; every other valid type is custom.
pub(crate) const T_AUTH: &str = "auth";
pub(crate) const T_SERVICE: &str = "service";
pub(crate) const T_KEY: &str = "key";
pub(crate) const T_ACK: &str = "ack";
pub(crate) const T_ERROR: &str = "error";
pub(crate) const RESERVED_TYPES: [&str; 5] = [T_AUTH, T_SERVICE, T_KEY, T_ACK, T_ERROR];

/// `auth/challenge` (server → agent).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Challenge {
    /// 32 random bytes, base64.
    pub nonce: String,
    pub protocol: String,
}

/// `auth/answer` (agent → server).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Answer {
    pub id: String,
    /// The normalized URL the agent dialed (`ws://host:port`).
    pub channel: String,
    /// Ed25519 signature of [`auth_message`], base64.
    pub signature: String,
}

/// `auth/ok` (server → agent).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthOk {
    pub id: String,
    pub role: crate::Role,
    pub peer: String,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
}

/// One route: requests whose host and path match go to the service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// A host name (`example.com`), a wildcard (`*.example.com`), or `*`
    /// for any host. Lower case.
    pub host: String,
    /// A path prefix starting with `/`.
    pub path_prefix: String,
}

/// `service/register` payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterPayload {
    pub name: String,
    pub addr: String,
    pub routes: Vec<Route>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

pub(crate) fn default_weight() -> u32 {
    1
}

/// `service/deregister`, `service/drain` payload.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NamePayload {
    pub name: String,
}

/// `service/set_weight` payload.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WeightPayload {
    pub name: String,
    pub weight: u32,
}

/// `key/add` payload.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeyAddPayload {
    pub id: String,
    pub public_key: String,
    pub role: crate::Role,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
}

/// `key/revoke` payload.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeyRevokePayload {
    pub id: String,
}

/// `error` payload.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ErrorPayload {
    pub code: u16,
    pub reason: String,
    pub message: String,
}

/// Upper bounds checked on registration.
pub(crate) const MAX_ROUTES: usize = 64;
pub(crate) const MAX_WEIGHT: u32 = 10_000;
pub(crate) const MAX_METADATA: usize = 32;

/// The bytes an agent signs to answer a challenge:
///
/// ```text
/// "ippool-registry-auth\0"
/// ‖ len ‖ "ippool.v1"      (the subprotocol)
/// ‖ len ‖ nonce            (the 32 bytes of the challenge)
/// ‖ len ‖ id               (the key id)
/// ‖ len ‖ channel          (the URL the agent dialed, normalized: `ws://host:port`)
/// ‖ len ‖ tls_exporter     (32 bytes of the TLS exporter on wss://, empty on ws://)
/// ```
///
/// where `len` is the field's length as a 4-byte big-endian integer. The
/// nonce makes an answer good for one connection only; the channel and the
/// TLS exporter keep a relaying server from reusing it elsewhere.
pub fn auth_message(nonce: &[u8], id: &str, channel: &str, tls_exporter: &[u8]) -> Vec<u8> {
    let mut m =
        Vec::with_capacity(AUTH_DOMAIN.len() + 5 * 4 + 32 + id.len() + channel.len() + 32 + 9);
    m.extend_from_slice(AUTH_DOMAIN);
    for field in [
        SUBPROTOCOL.as_bytes(),
        nonce,
        id.as_bytes(),
        channel.as_bytes(),
        tls_exporter,
    ] {
        m.extend_from_slice(&(field.len() as u32).to_be_bytes());
        m.extend_from_slice(field);
    }
    m
}

/// Normalizes a control-channel URL to `scheme://host:port` (lower case,
/// explicit port, no path): the channel an agent signs.
pub(crate) fn normalize_channel(url: &str) -> Result<String, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let scheme = uri
        .scheme_str()
        .map(str::to_ascii_lowercase)
        .ok_or_else(|| format!("`{url}`: no scheme (expected ws:// or wss://)"))?;
    let default_port = match scheme.as_str() {
        "ws" => 80,
        "wss" => 443,
        other => return Err(format!("`{url}`: scheme `{other}` is not ws or wss")),
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("`{url}`: no host"))?
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(default_port);
    Ok(format_channel(&scheme, &host, port))
}

/// The channel for a socket address the server accepted on.
pub(crate) fn channel_for_addr(tls: bool, addr: SocketAddr) -> String {
    let ip = addr.ip().to_canonical();
    let host = match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    };
    format_channel(if tls { "wss" } else { "ws" }, &host, addr.port())
}

fn format_channel(scheme: &str, host: &str, port: u16) -> String {
    format!("{scheme}://{host}:{port}")
}

/// Checks a route's host and path prefix.
pub(crate) fn check_route(r: &Route) -> Result<(), String> {
    let host = r.host.as_str();
    let name = host.strip_prefix("*.").unwrap_or(host);
    let host_ok = host == "*"
        || (!name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            }));
    if !host_ok {
        return Err(format!(
            "route host `{host}`: expected a lower-case host name, `*.domain` or `*`"
        ));
    }
    let p = r.path_prefix.as_str();
    if !p.starts_with('/')
        || p.len() > 1024
        || !p
            .bytes()
            .all(|c| c.is_ascii_graphic() && c != b'?' && c != b'#')
    {
        return Err(format!(
            "route path_prefix `{p}`: expected `/` then printable ASCII without spaces, `?` or `#` (at most 1024 bytes)"
        ));
    }
    Ok(())
}

/// Checks a custom message's type or action name.
pub(crate) fn check_custom_name(what: &str, s: &str) -> Result<(), String> {
    if crate::keys::is_valid_name(s, true) {
        Ok(())
    } else {
        Err(format!(
            "{what} `{s}`: expected 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_normalize() {
        assert_eq!(
            normalize_channel("ws://127.0.0.1:3042/x").unwrap(),
            "ws://127.0.0.1:3042"
        );
        assert_eq!(
            normalize_channel("WSS://Proxy.Example.COM./").unwrap(),
            "wss://proxy.example.com:443"
        );
        assert_eq!(normalize_channel("ws://[::1]:9").unwrap(), "ws://[::1]:9");
        assert!(normalize_channel("http://x").is_err());
        assert!(normalize_channel("nonsense").is_err());
        assert_eq!(
            channel_for_addr(false, "[::ffff:127.0.0.1]:3042".parse().unwrap()),
            "ws://127.0.0.1:3042"
        );
        assert_eq!(
            channel_for_addr(true, "[::1]:1".parse().unwrap()),
            "wss://[::1]:1"
        );
    }

    #[test]
    fn codes_round_trip() {
        for c in Code::ALL {
            assert_eq!(Code::from_u16(c.as_u16()), Some(c));
        }
        assert_eq!(Code::from_u16(4999), None);
    }

    #[test]
    fn auth_message_separates_fields() {
        // Moving a byte from one field to the next changes the message.
        assert_ne!(
            auth_message(b"n", "ab", "c", b""),
            auth_message(b"n", "a", "bc", b"")
        );
        assert!(auth_message(b"n", "a", "c", b"").starts_with(AUTH_DOMAIN));
    }

    #[test]
    fn routes_are_checked() {
        let r = |h: &str, p: &str| {
            check_route(&Route {
                host: h.into(),
                path_prefix: p.into(),
            })
        };
        assert!(r("example.com", "/").is_ok());
        assert!(r("*.example.com", "/api/").is_ok());
        assert!(r("*", "/").is_ok());
        assert!(r("Example.com", "/").is_err());
        assert!(r("ex ample.com", "/").is_err());
        assert!(r("example.com", "api").is_err());
        assert!(r("example.com", "/a b").is_err());
        assert!(r("", "/").is_err());
        assert!(r("a..b", "/").is_err());
    }
}
