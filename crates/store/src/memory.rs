//! A backend that keeps nothing across restarts.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use crate::{Backend, Op, StoreError, Table};

/// Tables in memory, for tests and for a daemon without a state directory.
#[derive(Debug, Default)]
pub struct Memory {
    tables: Mutex<HashMap<Table, BTreeMap<String, Vec<u8>>>>,
}

impl Backend for Memory {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let t = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(t.get(&table).and_then(|m| m.get(key)).cloned())
    }

    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let t = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(t.get(&table)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }

    fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        let mut t = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        for op in ops {
            match op {
                Op::Put(table, k, v) => {
                    t.entry(*table).or_default().insert(k.clone(), v.clone());
                }
                Op::Delete(table, k) => {
                    if let Some(m) = t.get_mut(table) {
                        m.remove(k);
                    }
                }
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "memory (not persisted)".into()
    }
}
