//! Persistence of ippool's runtime state: what changes while the daemon
//! runs (rules and bans added through the API, agent keys, health and
//! bench state, access-log offsets) and must survive a restart or a crash.
//!
//! One trait, [`Backend`], with a small key-value surface (tables of
//! string keys and byte values, atomic batches); [`Store`] puts typed
//! records on top of it as JSON (readable with any redb or Redis tool).
//! Backends:
//!
//! - [`Embedded`] (the default): a [redb](https://docs.rs/redb) file,
//!   `state.redb` under the daemon's `state_dir`. Every write is committed
//!   with immediate durability (fsync) before it returns: what the API
//!   acknowledged survives `kill -9` and power loss.
//! - [`Redis`]: one Redis server shared by several instances, which learn
//!   of each other's changes through [`Redis::changes`].
//! - [`Memory`]: nothing persisted, for tests and for running without a
//!   state directory.
//!
//! A store refuses to open rather than lose state: a file that is not a
//! store, a damaged one, or one written by a newer ippool stops the
//! caller with a [`StoreError`] naming the file and what to do; nothing
//! is ever reset silently.
//!
//! Calls block on disk I/O (milliseconds with fsync): from async code call
//! them through `tokio::task::spawn_blocking` or a dedicated thread.
//!
//! ```
//! use store::{Ban, Store};
//! let dir = std::env::temp_dir().join(format!("store-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let store = Store::open_dir(&dir)?;
//! store.put_ban(&Ban {
//!     set: "clients".into(),
//!     network: "203.0.113.7/32".into(),
//!     until_unix_ms: 1_900_000_000_000,
//!     times: 1,
//!     reason: "auth_failed x5 in 1m".into(),
//! })?;
//! drop(store);
//! let again = Store::open_dir(&dir)?;
//! assert_eq!(again.bans()?.len(), 1);
//! # drop(again); std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod embedded;
mod error;
mod memory;
mod records;
mod redis;

use std::path::Path;
use std::sync::Arc;

pub use embedded::Embedded;
pub use error::StoreError;
pub use memory::Memory;
pub use records::{Ban, HealthRecord, Hold, KeyRecord, LogOffset, RuntimeRule};
pub use redis::{Change, Changes, Redis, RedisTls};

/// The store's format version. A store written with a higher version is
/// refused ([`StoreError::NewerFormat`]).
pub const FORMAT_VERSION: u32 = 1;

/// The file name of the embedded store inside a state directory.
pub const FILE_NAME: &str = "state.redb";

/// The tables of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Rules added at run time ([`RuntimeRule`]).
    Rules,
    /// Bans from auto-blocking or the API ([`Ban`]).
    Bans,
    /// Agent keys ([`KeyRecord`]).
    Keys,
    /// Benched addresses per pool ([`HealthRecord`]).
    Health,
    /// Access-log offsets per monitor ([`LogOffset`]).
    Offsets,
    /// Backends an operator held out of rotation ([`Hold`]).
    Holds,
}

impl Table {
    /// Every table.
    pub const ALL: [Table; 6] = [
        Table::Rules,
        Table::Bans,
        Table::Keys,
        Table::Health,
        Table::Offsets,
        Table::Holds,
    ];

    /// Whether the table holds fleet-wide state (rules, bans, keys), which
    /// instances sharing a store share, rather than one instance's own
    /// (health of its pools, its log offsets, its backends' holds).
    pub fn is_shared(self) -> bool {
        matches!(self, Table::Rules | Table::Bans | Table::Keys)
    }

    /// The table named `name` ([`Table::name`]).
    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The table's name in the backend.
    pub fn name(self) -> &'static str {
        match self {
            Table::Rules => "rules",
            Table::Bans => "bans",
            Table::Keys => "keys",
            Table::Health => "health",
            Table::Offsets => "offsets",
            Table::Holds => "holds",
        }
    }
}

/// One change of an atomic batch ([`Backend::apply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Insert or replace `key` in `table`.
    Put(Table, String, Vec<u8>),
    /// Remove `key` from `table` (nothing if absent).
    Delete(Table, String),
}

/// A key-value backend: tables of string keys and byte values.
///
/// Every method is durable when it returns `Ok` (as durable as the backend
/// can be: [`Memory`] keeps nothing).
pub trait Backend: Send + Sync + 'static {
    /// The value of `key` in `table`.
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every (key, value) of `table`, sorted by key.
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Applies every op, all or none.
    fn apply(&self, ops: &[Op]) -> Result<(), StoreError>;
    /// A short description for logs (`redb /var/lib/ippool/state.redb`).
    fn describe(&self) -> String;
}

/// Two backends in one: the [shared](Table::is_shared) tables in `shared`
/// (a [`Redis`] a fleet shares), the others in `local` (this instance's
/// [`Embedded`] file), so that instances share rules and bans but not
/// their log offsets or the health of their own addresses.
///
/// A batch that touches both sides is applied as two batches (shared
/// first); the typed [`Store`] methods never mix them.
pub struct Split<S, L> {
    /// Where the shared tables live.
    pub shared: S,
    /// Where this instance's own tables live.
    pub local: L,
}

impl<S: Backend, L: Backend> Backend for Split<S, L> {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if table.is_shared() {
            self.shared.get(table, key)
        } else {
            self.local.get(table, key)
        }
    }

    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if table.is_shared() {
            self.shared.scan(table)
        } else {
            self.local.scan(table)
        }
    }

    fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        let table = |op: &Op| match op {
            Op::Put(t, ..) | Op::Delete(t, _) => *t,
        };
        let (shared, local): (Vec<Op>, Vec<Op>) =
            ops.iter().cloned().partition(|op| table(op).is_shared());
        if !shared.is_empty() {
            self.shared.apply(&shared)?;
        }
        if !local.is_empty() {
            self.local.apply(&local)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "{} (rules, bans, keys) + {}",
            self.shared.describe(),
            self.local.describe()
        )
    }
}

/// Typed records over a [`Backend`]. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Store")
            .field(&self.backend.describe())
            .finish()
    }
}

impl Store {
    /// A store over any backend.
    pub fn new(backend: impl Backend) -> Store {
        Store {
            backend: Arc::new(backend),
        }
    }

    /// Opens (or creates) the embedded store `state.redb` in `dir`, which
    /// must exist.
    pub fn open_dir(dir: &Path) -> Result<Store, StoreError> {
        Ok(Store::new(Embedded::open(&dir.join(FILE_NAME))?))
    }

    /// A store that keeps nothing across restarts.
    pub fn memory() -> Store {
        Store::new(Memory::default())
    }

    /// The backend, for raw access.
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    fn put_json<T: serde::Serialize>(
        &self,
        table: Table,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Encode {
            table: table.name(),
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
        self.backend.apply(&[Op::Put(table, key.to_owned(), bytes)])
    }

    fn delete(&self, table: Table, key: &str) -> Result<bool, StoreError> {
        let existed = self.backend.get(table, key)?.is_some();
        if existed {
            self.backend.apply(&[Op::Delete(table, key.to_owned())])?;
        }
        Ok(existed)
    }

    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.backend.get(table, key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Decode {
                    table: table.name(),
                    key: key.to_owned(),
                    reason: e.to_string(),
                }),
        }
    }

    fn scan_json<T: serde::de::DeserializeOwned>(
        &self,
        table: Table,
    ) -> Result<Vec<T>, StoreError> {
        self.backend
            .scan(table)?
            .into_iter()
            .map(|(key, v)| {
                serde_json::from_slice(&v).map_err(|e| StoreError::Decode {
                    table: table.name(),
                    key,
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    /// Saves a ban (replacing one of the same set and network).
    pub fn put_ban(&self, ban: &Ban) -> Result<(), StoreError> {
        self.put_json(Table::Bans, &ban.key(), ban)
    }

    /// Removes the ban of `network` in `set`; whether there was one.
    pub fn remove_ban(&self, set: &str, network: &str) -> Result<bool, StoreError> {
        self.delete(Table::Bans, &format!("{set}/{network}"))
    }

    /// The ban saved under `key` (`set/network`, as [`Ban::key`]).
    pub fn ban(&self, key: &str) -> Result<Option<Ban>, StoreError> {
        self.get_json(Table::Bans, key)
    }

    /// The runtime rule saved under `key` (`set/list/rule`, as
    /// [`RuntimeRule::key`]).
    pub fn rule(&self, key: &str) -> Result<Option<RuntimeRule>, StoreError> {
        self.get_json(Table::Rules, key)
    }

    /// Every saved ban (expired ones included: the caller decides).
    pub fn bans(&self) -> Result<Vec<Ban>, StoreError> {
        self.scan_json(Table::Bans)
    }

    /// Saves a rule added at run time.
    pub fn put_rule(&self, rule: &RuntimeRule) -> Result<(), StoreError> {
        self.put_json(Table::Rules, &rule.key(), rule)
    }

    /// Removes a runtime rule; whether it was there.
    pub fn remove_rule(&self, rule: &RuntimeRule) -> Result<bool, StoreError> {
        self.delete(Table::Rules, &rule.key())
    }

    /// Every runtime rule, sorted by (set, list, rule).
    pub fn rules(&self) -> Result<Vec<RuntimeRule>, StoreError> {
        self.scan_json(Table::Rules)
    }

    /// Saves an agent key (replacing one of the same id).
    pub fn put_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        self.put_json(Table::Keys, &key.id, key)
    }

    /// Every agent key.
    pub fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.scan_json(Table::Keys)
    }

    /// Saves a held backend.
    pub fn put_hold(&self, hold: &Hold) -> Result<(), StoreError> {
        self.put_json(Table::Holds, &hold.key(), hold)
    }

    /// Removes a hold; whether there was one.
    pub fn remove_hold(&self, hold: &Hold) -> Result<bool, StoreError> {
        self.delete(Table::Holds, &hold.key())
    }

    /// Every held backend, sorted by (ingress, backend).
    pub fn holds(&self) -> Result<Vec<Hold>, StoreError> {
        self.scan_json(Table::Holds)
    }

    /// Saves a benched address (replacing the record of the same pool and
    /// address).
    pub fn put_bench(&self, record: &HealthRecord) -> Result<(), StoreError> {
        self.put_json(Table::Health, &record.key(), record)
    }

    /// Removes the bench of `address` in `pool`; whether there was one.
    pub fn remove_bench(&self, pool: &str, address: &str) -> Result<bool, StoreError> {
        self.delete(Table::Health, &format!("{pool}/{address}"))
    }

    /// Every saved bench, sorted by (pool, address) as text (expired ones
    /// included: the caller decides).
    pub fn benches(&self) -> Result<Vec<HealthRecord>, StoreError> {
        self.scan_json(Table::Health)
    }

    /// The saved benches of `pool`.
    pub fn benches_of(&self, pool: &str) -> Result<Vec<HealthRecord>, StoreError> {
        let mut all = self.benches()?;
        all.retain(|r| r.pool == pool);
        Ok(all)
    }

    /// Saves where a monitor is in its log.
    pub fn put_offset(&self, offset: &LogOffset) -> Result<(), StoreError> {
        self.put_json(Table::Offsets, &offset.monitor, offset)
    }

    /// Where `monitor` was in its log, if saved.
    pub fn offset(&self, monitor: &str) -> Result<Option<LogOffset>, StoreError> {
        self.get_json(Table::Offsets, monitor)
    }
}
