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

    /// A key split back into (set, network), as [`Ban::key`] made it.
    pub fn split_key(key: &str) -> Option<(&str, &str)> {
        key.split_once('/')
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

    /// A key split back into (set, list, rule), as [`RuntimeRule::key`]
    /// made it (the rule is last and may hold a `/`).
    pub fn split_key(key: &str) -> Option<(&str, &str, &str)> {
        let (set, rest) = key.split_once('/')?;
        let (list, rule) = rest.split_once('/')?;
        Some((set, list, rule))
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

/// A backend an operator held out of rotation (`ippool backends drain`):
/// it stays held across restarts until undrained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The ingress listener whose route table holds it.
    pub ingress: String,
    /// The backend id.
    pub backend: String,
}

impl Hold {
    /// The record's key: `ingress/backend`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.ingress, self.backend)
    }
}

/// Where a monitor is in its access log.
///
/// Saved about once a second while lines are read and at shutdown, so a
/// restart resumes after the last saved line: reading is at-least-once,
/// and after a crash at most the lines read since the last save are read
/// again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogOffset {
    /// The monitor; the record's key.
    pub monitor: String,
    /// The identity of the file the offset is in (`dev:inode`), so a
    /// rotated file is not read from a stale offset.
    pub file_id: String,
    /// The byte offset of the next unread line.
    pub offset: u64,
    /// The path the monitor followed when the offset was saved (absent in
    /// records written before it was kept). A monitor now following
    /// another path does not use the offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A benched address of a pool: out of service until a time, after
/// failures. Kept while the address is benched or on probation, removed
/// when a successful probe restores it, so a restart does not hand a
/// known-bad address out again before its cooldown has passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRecord {
    /// The pool (`[monitor.<name>]`, `[pools.<name>]`).
    pub pool: String,
    /// The address as text (`192.0.2.7`, `2001:db8::7`).
    pub address: String,
    /// When it was benched, in milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
    /// When the cooldown ends (then the address is on probation), in
    /// milliseconds since the Unix epoch; not before `since_unix_ms`.
    pub until_unix_ms: u64,
    /// 1 for a first benching, 2 for the next one without a recovery in
    /// between, and so on (longer cooldowns follow from it).
    pub strike: u32,
    /// Why, machine-readable: `consecutive_failures:N`,
    /// `failure_ratio:FAILURES/REQUESTS` or `probation_failure`.
    pub cause: String,
}

impl HealthRecord {
    /// The record's key: `pool/address`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.pool, self.address)
    }

    /// How long the benching lasts (`until - since`, 0 if the record is
    /// inconsistent).
    pub fn cooldown_ms(&self) -> u64 {
        self.until_unix_ms.saturating_sub(self.since_unix_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_back_into_their_parts() {
        let r = RuntimeRule {
            set: "clients".into(),
            list: "deny".into(),
            rule: "10.0.0.0/8".into(),
            until_unix_ms: None,
        };
        assert_eq!(
            RuntimeRule::split_key(&r.key()),
            Some(("clients", "deny", "10.0.0.0/8"))
        );
        assert_eq!(RuntimeRule::split_key("clients/deny"), None);
        let b = Ban {
            set: "clients".into(),
            network: "2001:db8::/64".into(),
            until_unix_ms: 1,
            times: 1,
            reason: String::new(),
        };
        assert_eq!(Ban::split_key(&b.key()), Some(("clients", "2001:db8::/64")));
        assert_eq!(Ban::split_key("nothing"), None);
    }

    #[test]
    fn health_record_key_cooldown_and_json() {
        let r = HealthRecord {
            pool: "web".into(),
            address: "192.0.2.7".into(),
            since_unix_ms: 1_000,
            until_unix_ms: 601_000,
            strike: 2,
            cause: "consecutive_failures:3".into(),
        };
        assert_eq!(r.key(), "web/192.0.2.7");
        assert_eq!(r.cooldown_ms(), 600_000);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<HealthRecord>(&json).unwrap(), r);
        let odd = HealthRecord {
            until_unix_ms: 0,
            ..r
        };
        assert_eq!(odd.cooldown_ms(), 0);
    }

    #[test]
    fn log_offset_without_path_still_reads() {
        let o: LogOffset =
            serde_json::from_str(r#"{"monitor":"web","file_id":"1:2","offset":3}"#).unwrap();
        assert_eq!(o.path, None);
        let json = serde_json::to_string(&o).unwrap();
        assert!(!json.contains("path"), "{json}");
    }
}
