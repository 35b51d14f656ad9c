//! Durable storage of shoal's cluster-wide state.
//!
//! The agent driver hands every cluster-wide entry that became current to a
//! [`Persist`] implementation and only acknowledges a client's write after
//! [`Persist::save`] returned, so an acknowledged write survives a restart of
//! every agent. Node-owned entries (`node/<name>/...`) are never stored: each
//! node rebuilds its own on start. [`RedbStore`] is the real implementation
//! (one redb file, fsync on every commit); [`MemStore`] keeps entries in memory
//! for tests and the simulator. This crate knows nothing of networking or of how
//! entries are merged: the core decides which entry wins, the store records it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use shoal_core::Entry;

const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");

/// Why storage failed. On error nothing of the failed call is stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (missing directory, locked by another agent, corrupt).
    #[error("cannot open state database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What redb said.
        source: redb::Error,
    },
    /// A read or write transaction failed.
    #[error("state database: {0}")]
    Db(#[from] redb::Error),
    /// A stored entry could not be decoded (the file was written by something else).
    #[error("stored entry {key:?} is corrupt: {reason}")]
    Corrupt {
        /// Key of the bad record.
        key: String,
        /// Decoder message.
        reason: String,
    },
}

/// Where cluster-wide entries are kept across restarts.
pub trait Persist: Send {
    /// Records entries durably; when this returns `Ok`, they survive a crash.
    fn save(&mut self, entries: &[Entry]) -> Result<(), StoreError>;
    /// Every stored entry.
    fn load(&self) -> Result<Vec<Entry>, StoreError>;
}

/// A redb database file holding one record per key.
///
/// After a failed write (a full disk, an I/O error) redb refuses every later
/// transaction until the file is opened again, so the next call reopens it
/// first: a disk that has room again takes writes again without a restart.
pub struct RedbStore {
    path: PathBuf,
    /// `None` only while a reopen failed; the next call tries again.
    db: Option<Database>,
    /// A write failed: reopen before the next transaction.
    poisoned: bool,
}

impl RedbStore {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source: redb::Error| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let db = Database::create(path).map_err(|e| open_err(e.into()))?;
        // Create the table up front so reads of an empty store succeed.
        let txn = db.begin_write().map_err(|e| open_err(e.into()))?;
        txn.open_table(ENTRIES).map_err(|e| open_err(e.into()))?;
        txn.commit().map_err(|e| open_err(e.into()))?;
        Ok(RedbStore {
            path: path.to_path_buf(),
            db: Some(db),
            poisoned: false,
        })
    }

    /// The open database, reopened first if a write failed since.
    fn db(&mut self) -> Result<&Database, StoreError> {
        if self.poisoned || self.db.is_none() {
            // The file lock is released only when the old handle is dropped.
            self.db = None;
            let db = Database::create(&self.path).map_err(|e| StoreError::Open {
                path: self.path.clone(),
                source: e.into(),
            })?;
            self.db = Some(db);
            self.poisoned = false;
        }
        self.db.as_ref().ok_or_else(|| StoreError::Open {
            path: self.path.clone(),
            source: redb::Error::PreviousIo,
        })
    }

    fn write(&mut self, durable: &[&Entry]) -> Result<(), StoreError> {
        let txn = self.db()?.begin_write().map_err(redb::Error::from)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(redb::Error::from)?;
            for e in durable {
                let bytes = serde_cbor::to_vec(e).map_err(|err| StoreError::Corrupt {
                    key: e.key.clone(),
                    reason: err.to_string(),
                })?;
                table
                    .insert(e.key.as_str(), bytes.as_slice())
                    .map_err(redb::Error::from)?;
            }
        }
        // Durability::Immediate (the default): commit returns after fsync.
        txn.commit().map_err(redb::Error::from)?;
        Ok(())
    }
}

impl Persist for RedbStore {
    fn save(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        let durable: Vec<&Entry> = entries.iter().filter(|e| !e.is_node_owned()).collect();
        if durable.is_empty() {
            return Ok(());
        }
        let result = self.write(&durable);
        if matches!(result, Err(StoreError::Db(_))) {
            self.poisoned = true;
        }
        result
    }

    fn load(&self) -> Result<Vec<Entry>, StoreError> {
        let db = self.db.as_ref().ok_or_else(|| StoreError::Open {
            path: self.path.clone(),
            source: redb::Error::PreviousIo,
        })?;
        let txn = db.begin_read().map_err(redb::Error::from)?;
        let table = txn.open_table(ENTRIES).map_err(redb::Error::from)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(redb::Error::from)? {
            let (k, v) = row.map_err(redb::Error::from)?;
            let e: Entry =
                serde_cbor::from_slice(v.value()).map_err(|err| StoreError::Corrupt {
                    key: k.value().to_string(),
                    reason: err.to_string(),
                })?;
            out.push(e);
        }
        Ok(out)
    }
}

/// Entries kept in memory: for tests and simulation.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    entries: BTreeMap<String, Entry>,
}

impl Persist for MemStore {
    fn save(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        for e in entries.iter().filter(|e| !e.is_node_owned()) {
            self.entries.insert(e.key.clone(), e.clone());
        }
        Ok(())
    }

    fn load(&self) -> Result<Vec<Entry>, StoreError> {
        Ok(self.entries.values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::{Hlc, WriterId};

    fn entry(key: &str, value: Option<&str>, hlc: u64) -> Entry {
        Entry {
            key: key.into(),
            value: value.map(|v| v.as_bytes().to_vec()),
            hlc: Hlc(hlc),
            writer: WriterId {
                node: "n1".into(),
                gen: 3,
            },
            seq: hlc,
        }
    }

    fn round_trip(store: &mut dyn Persist) {
        store
            .save(&[
                entry("app/color", Some("blue"), 1),
                entry("app/gone", None, 2),
                entry("node/n1/info", Some("x"), 3),
            ])
            .unwrap();
        store.save(&[entry("app/color", Some("green"), 4)]).unwrap();
        let got = store.load().unwrap();
        assert_eq!(
            got,
            vec![
                entry("app/color", Some("green"), 4),
                entry("app/gone", None, 2)
            ],
            "latest value per key and tombstones are kept; node-owned entries are not"
        );
    }

    #[test]
    fn mem_store_keeps_cluster_wide_entries() {
        round_trip(&mut MemStore::default());
    }

    #[test]
    fn redb_store_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let mut s = RedbStore::open(&path).unwrap();
            round_trip(&mut s);
        }
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.load().unwrap().len(), 2);
    }

    #[test]
    fn open_in_missing_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/dir/state.redb");
        let err = RedbStore::open(&path).err().expect("must fail");
        assert!(
            err.to_string().contains("cannot open state database"),
            "{err}"
        );
    }

    #[test]
    fn corrupt_record_is_reported_not_panicked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            let txn = s.db.as_ref().unwrap().begin_write().unwrap();
            txn.open_table(ENTRIES)
                .unwrap()
                .insert("bad", &b"\xff\x00"[..])
                .unwrap();
            txn.commit().unwrap();
        }
        let s = RedbStore::open(&path).unwrap();
        assert!(matches!(s.load(), Err(StoreError::Corrupt { .. })));
    }
}
