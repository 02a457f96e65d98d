//! The store's errors.

use std::path::PathBuf;

/// Why the store could not open, read or write.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The file exists but is not a store this version can read: damaged,
    /// not a redb file, or from an incompatible redb. Nothing was changed.
    #[error(
        "{path}: cannot open the state store: {reason}. Nothing was changed; move the file \
         aside to start with an empty state, or restore it from a backup"
    )]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// What the storage engine said.
        reason: String,
    },
    /// The store was written by a newer ippool.
    #[error(
        "{path}: the state store has format {found}, this ippool reads up to {supported}: \
         run the newer ippool, or move the file aside to start with an empty state"
    )]
    NewerFormat {
        /// The store file.
        path: PathBuf,
        /// The format found.
        found: u32,
        /// The newest format this build reads.
        supported: u32,
    },
    /// Another process has the store open.
    #[error(
        "{path}: the state store is open in another process (is another ippool running with the same state_dir?)"
    )]
    Locked {
        /// The store file.
        path: PathBuf,
    },
    /// An I/O or engine error while reading or writing.
    #[error("{path}: state store {operation} failed: {reason}")]
    Io {
        /// The store file.
        path: PathBuf,
        /// What was being done.
        operation: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A record could not be encoded.
    #[error("cannot encode {table}/{key}: {reason}")]
    Encode {
        /// The table.
        table: &'static str,
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A stored record could not be decoded (written by a buggy or foreign
    /// writer).
    #[error("record {table}/{key} in the state store is unreadable: {reason}")]
    Decode {
        /// The table.
        table: &'static str,
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A remote store (Redis) could not be reached, refused a command or
    /// answered what this ippool cannot use.
    #[error("{target}: state store: cannot {operation}: {reason}")]
    Remote {
        /// The server, without its password.
        target: String,
        /// What was being done.
        operation: &'static str,
        /// What went wrong.
        reason: String,
    },
}
