//! The typed records of the store.

use serde::{Deserialize, Serialize};

/// A ban: a client network denied until a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    /// The rule set the ban is in (bans of different sets are apart).
    #[serde(default)]
    pub set: String,
    /// The banned network as text (`203.0.113.7`, `2001:db8:1:2::/64`).
    pub network: String,
    /// When the ban ends, in milliseconds since the Unix epoch.
    pub until_unix_ms: u64,
    /// How many times this network has been banned (for escalation).
    pub times: u32,
    /// Why, for humans.
    pub reason: String,
}

impl Ban {
    /// The record's key: `set/network`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.set, self.network)
    }
}

/// A rule added at run time to a named rule set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeRule {
    /// The rule set.
    pub set: String,
    /// `allow` or `deny`.
    pub list: String,
    /// The rule as text (`10.0.0.0/8`, `10.0.0.1-10.0.0.9`).
    pub rule: String,
    /// When it expires, in milliseconds since the Unix epoch; `None`: never.
    pub until_unix_ms: Option<u64>,
}

impl RuntimeRule {
    /// The record's key: `set/list/rule`.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.set, self.list, self.rule)
    }
}

/// An agent's public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The agent id; the record's key.
    pub id: String,
    /// The public key, as its text encoding.
    pub public_key: String,
    /// Whether it was revoked (kept, so a revoked id cannot come back
    /// unnoticed).
    pub revoked: bool,
    /// When it was added, in milliseconds since the Unix epoch.
    pub added_unix_ms: u64,
}

/// Where a monitor is in its access log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogOffset {
    /// The monitor; the record's key.
    pub monitor: String,
    /// The identity of the file the offset is in (device and inode), so a
    /// rotated file is not read from a stale offset.
    pub file_id: String,
    /// The byte offset of the next unread line.
    pub offset: u64,
}
