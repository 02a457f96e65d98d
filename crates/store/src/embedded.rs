//! The embedded backend: one redb file.

use std::path::{Path, PathBuf};

use redb::{Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{Backend, FORMAT_VERSION, Op, StoreError, Table};

const META: TableDefinition<&str, u32> = TableDefinition::new("meta");
const FORMAT_KEY: &str = "format";

fn def(t: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(t.name())
}

/// A redb file. Every write commits with immediate durability.
#[derive(Debug)]
pub struct Embedded {
    db: Database,
    path: PathBuf,
}

impl Embedded {
    /// Opens the store at `path`, creating it if the file does not exist or
    /// is empty. Refuses (never resets) a damaged file, a foreign file and
    /// a newer format; recovers from an unclean shutdown (redb repairs
    /// its allocator state on open; committed data is intact).
    pub fn open(path: &Path) -> Result<Embedded, StoreError> {
        let db = Database::create(path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                path: path.to_owned(),
            },
            DatabaseError::Storage(redb::StorageError::Io(io))
                if io.kind() != std::io::ErrorKind::InvalidData =>
            {
                StoreError::Io {
                    path: path.to_owned(),
                    operation: "open",
                    reason: io.to_string(),
                }
            }
            other => StoreError::Corrupt {
                path: path.to_owned(),
                reason: other.to_string(),
            },
        })?;
        let store = Embedded {
            db,
            path: path.to_owned(),
        };
        store.init()?;
        Ok(store)
    }

    fn io(&self, operation: &'static str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            operation,
            reason: e.to_string(),
        }
    }

    /// Checks the format and creates the tables.
    fn init(&self) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(|e| self.io("open", e))?;
        tx.set_durability(Durability::Immediate)
            .map_err(|e| self.io("open", e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| self.corrupt(e))?;
            let found = meta
                .get(FORMAT_KEY)
                .map_err(|e| self.corrupt(e))?
                .map(|v| v.value());
            match found {
                Some(v) if v > FORMAT_VERSION => {
                    return Err(StoreError::NewerFormat {
                        path: self.path.clone(),
                        found: v,
                        supported: FORMAT_VERSION,
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert(FORMAT_KEY, FORMAT_VERSION)
                        .map_err(|e| self.io("open", e))?;
                }
            }
            for t in Table::ALL {
                tx.open_table(def(t)).map_err(|e| self.corrupt(e))?;
            }
        }
        tx.commit().map_err(|e| self.io("open", e))
    }

    fn corrupt(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Backend for Embedded {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.io("read", e))?;
        let t = tx.open_table(def(table)).map_err(|e| self.io("read", e))?;
        let v = t.get(key).map_err(|e| self.io("read", e))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.io("read", e))?;
        let t = tx.open_table(def(table)).map_err(|e| self.io("read", e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.io("read", e))? {
            let (k, v) = row.map_err(|e| self.io("read", e))?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(|e| self.io("write", e))?;
        tx.set_durability(Durability::Immediate)
            .map_err(|e| self.io("write", e))?;
        for op in ops {
            match op {
                Op::Put(table, k, v) => {
                    let mut t = tx
                        .open_table(def(*table))
                        .map_err(|e| self.io("write", e))?;
                    t.insert(k.as_str(), v.as_slice())
                        .map_err(|e| self.io("write", e))?;
                }
                Op::Delete(table, k) => {
                    let mut t = tx
                        .open_table(def(*table))
                        .map_err(|e| self.io("write", e))?;
                    t.remove(k.as_str()).map_err(|e| self.io("write", e))?;
                }
            }
        }
        tx.commit().map_err(|e| self.io("write", e))
    }

    fn describe(&self) -> String {
        format!("redb {}", self.path.display())
    }
}
