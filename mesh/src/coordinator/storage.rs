//! The Raft log, hard state and latest snapshot, kept in memory for raft-rs
//! and written through to an embedded redb database before raft-rs is told
//! they are persisted.
//!
//! Invariant: the in-memory entries are exactly the ones after the
//! snapshot's index, and every change reaches disk (one durable redb
//! transaction) before memory, so a crash at any point leaves the disk no
//! older than anything this node acknowledged.

use std::path::Path;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use redb::{ReadableDatabase, TableDefinition};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
const SNAPSHOT: &str = "snapshot";

/// Why the Raft store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, read or written.
    #[error("raft store: {0}")]
    Db(#[from] redb::Error),
    /// A stored record does not decode.
    #[error("raft store holds a corrupt {what}: {source}")]
    Corrupt {
        /// Which record.
        what: &'static str,
        /// The decoder's complaint.
        source: protobuf::ProtobufError,
    },
    /// raft-rs handed over entries that do not fit the log.
    #[error("raft store: {0}")]
    Gap(String),
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(e.into())
}

/// Raft storage on disk (redb) with an in-memory copy for reads.
pub struct DiskStorage {
    db: redb::Database,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    entries: Vec<Entry>,
    /// The state as last applied, offered to peers that need a snapshot:
    /// only a snapshot whose configuration includes them can be installed.
    applied: Option<Snapshot>,
}

fn decode<M: protobuf::Message>(what: &'static str, bytes: &[u8]) -> Result<M, StoreError> {
    M::parse_from_bytes(bytes).map_err(|source| StoreError::Corrupt { what, source })
}

fn encode<M: protobuf::Message>(message: &M) -> Result<Vec<u8>, StoreError> {
    message.write_to_bytes().map_err(|e| StoreError::Gap(format!("cannot encode: {e}")))
}

impl DiskStorage {
    /// Opens (or creates) the store at `path` and loads it.
    pub fn open(path: &Path) -> Result<DiskStorage, StoreError> {
        let db = redb::Database::create(path).map_err(db_err)?;
        {
            // Tables must exist before the first read transaction.
            let txn = db.begin_write().map_err(db_err)?;
            txn.open_table(ENTRIES).map_err(db_err)?;
            txn.open_table(META).map_err(db_err)?;
            txn.commit().map_err(db_err)?;
        }
        let mut storage = DiskStorage {
            db,
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            snapshot: Snapshot::default(),
            entries: Vec::new(),
            applied: None,
        };
        let txn = storage.db.begin_read().map_err(db_err)?;
        let meta = txn.open_table(META).map_err(db_err)?;
        if let Some(bytes) = meta.get(HARD_STATE).map_err(db_err)? {
            storage.hard_state = decode("hard state", bytes.value())?;
        }
        if let Some(bytes) = meta.get(CONF_STATE).map_err(db_err)? {
            storage.conf_state = decode("conf state", bytes.value())?;
        }
        if let Some(bytes) = meta.get(SNAPSHOT).map_err(db_err)? {
            storage.snapshot = decode("snapshot", bytes.value())?;
        }
        let entries = txn.open_table(ENTRIES).map_err(db_err)?;
        let after = storage.snapshot_index() + 1;
        for item in entries.range(after..).map_err(db_err)? {
            let (_, value) = item.map_err(db_err)?;
            storage.entries.push(decode("log entry", value.value())?);
        }
        Ok(storage)
    }

    /// Whether nothing was ever stored (a node that has not joined yet).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.snapshot_index() == 0 && self.hard_state.term == 0
    }

    /// The latest snapshot (its payload is the cluster state).
    pub fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The current configuration.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// The persisted hard state.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    /// Durably stores what one raft-rs `Ready` asks for: a snapshot
    /// received from the leader, new log entries (replacing any conflicting
    /// tail) and the hard state.
    pub fn persist(
        &mut self,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StoreError> {
        if snapshot.is_none() && entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        let mut next_hard = hard_state.cloned().unwrap_or_else(|| self.hard_state.clone());
        if let Some(snap) = snapshot {
            let index = snap.get_metadata().index;
            next_hard.commit = next_hard.commit.max(index);
        }
        let base = snapshot.map_or(self.snapshot_index(), |s| s.get_metadata().index);
        let last = if snapshot.is_some() { base } else { self.entries.last().map_or(base, |e| e.index) };
        if let Some(first) = entries.first()
            && (first.index <= base || first.index > last + 1)
        {
            return Err(StoreError::Gap(format!(
                "entries from {} do not follow the log (snapshot {base}, last {last})",
                first.index
            )));
        }
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(db_err)?;
            let mut meta = txn.open_table(META).map_err(db_err)?;
            if let Some(snap) = snapshot {
                // A snapshot from the leader replaces the whole log.
                table.retain(|_, _| false).map_err(db_err)?;
                meta.insert(SNAPSHOT, encode(snap)?.as_slice()).map_err(db_err)?;
                meta.insert(CONF_STATE, encode(snap.get_metadata().get_conf_state())?.as_slice()).map_err(db_err)?;
            }
            if let Some(first) = entries.first() {
                table.retain_in(first.index.., |_, _| false).map_err(db_err)?;
                for entry in entries {
                    table.insert(entry.index, encode(entry)?.as_slice()).map_err(db_err)?;
                }
            }
            meta.insert(HARD_STATE, encode(&next_hard)?.as_slice()).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;

        if let Some(snap) = snapshot {
            self.snapshot = snap.clone();
            self.conf_state = snap.get_metadata().get_conf_state().clone();
            self.entries.clear();
        }
        if let Some(first) = entries.first() {
            let keep = (first.index - self.snapshot_index() - 1) as usize;
            self.entries.truncate(keep);
            self.entries.extend_from_slice(entries);
        }
        self.hard_state = next_hard;
        Ok(())
    }

    /// Durably records a new commit index (the leader learns it after
    /// persisting its own entries).
    pub fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
        let mut hard = self.hard_state.clone();
        hard.commit = commit;
        self.persist(None, &[], Some(&hard))
    }

    /// Durably records the configuration after a membership change.
    pub fn set_conf_state(&mut self, conf_state: ConfState) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            meta.insert(CONF_STATE, encode(&conf_state)?.as_slice()).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        self.conf_state = conf_state;
        Ok(())
    }

    /// Makes `data` (the state at applied index `index`) the latest
    /// snapshot and drops the log up to it.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> Result<(), StoreError> {
        if index <= self.snapshot_index() {
            return Ok(());
        }
        let term = self.term(index).map_err(|e| StoreError::Gap(format!("cannot snapshot at {index}: {e}")))?;
        let mut snapshot = Snapshot { data: data.into(), ..Snapshot::default() };
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(db_err)?;
            let mut meta = txn.open_table(META).map_err(db_err)?;
            meta.insert(SNAPSHOT, encode(&snapshot)?.as_slice()).map_err(db_err)?;
            table.retain_in(..=index, |_, _| false).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        let drop = (index - self.snapshot_index()) as usize;
        self.entries.drain(..drop.min(self.entries.len()));
        self.snapshot = snapshot;
        Ok(())
    }

    /// Records the state machine as of applied index `index` (with the
    /// current configuration) for peers that need a snapshot.
    pub fn set_applied(&mut self, index: u64, data: Vec<u8>) {
        if index <= self.snapshot_index() {
            return;
        }
        let Ok(term) = self.term(index) else { return };
        let mut snapshot = Snapshot { data: data.into(), ..Snapshot::default() };
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        self.applied = Some(snapshot);
    }

    /// Number of log entries kept after the snapshot.
    pub fn log_len(&self) -> usize {
        self.entries.len()
    }
}

fn unavailable() -> raft::Error {
    raft::Error::Store(StorageError::Unavailable)
}

impl Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState { hard_state: self.hard_state.clone(), conf_state: self.conf_state.clone() })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let first = self.snapshot_index() + 1;
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let last = self.entries.last().map_or(self.snapshot_index(), |e| e.index);
        if high > last + 1 {
            return Err(unavailable());
        }
        let from = (low - first) as usize;
        let to = (high - first) as usize;
        let mut entries = self.entries[from..to].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let snap = self.snapshot.get_metadata();
        if idx == snap.index {
            return Ok(snap.term);
        }
        if idx < snap.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.entries.get((idx - snap.index - 1) as usize).map(|e| e.term).ok_or_else(unavailable)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.snapshot_index() + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.entries.last().map_or(self.snapshot_index(), |e| e.index))
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let newest = match &self.applied {
            Some(applied) if applied.get_metadata().index > self.snapshot_index() => applied,
            _ => &self.snapshot,
        };
        if newest.get_metadata().index < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(newest.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: format!("cmd-{index}-{term}").into_bytes().into(), ..Entry::default() }
    }

    fn hard(term: u64, vote: u64, commit: u64) -> HardState {
        HardState { term, vote, commit, ..HardState::default() }
    }

    #[test]
    fn everything_persisted_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft.redb");
        {
            let mut store = DiskStorage::open(&path).expect("opens");
            assert!(store.is_empty());
            store.persist(None, &[entry(1, 1), entry(2, 1), entry(3, 1)], Some(&hard(1, 7, 2))).expect("persists");
            // A new leader's entries replace a conflicting tail.
            store.persist(None, &[entry(3, 2), entry(4, 2)], Some(&hard(2, 8, 3))).expect("persists");
            store.set_commit(4).expect("commit");
        }
        let store = DiskStorage::open(&path).expect("reopens");
        assert_eq!(store.hard_state(), &hard(2, 8, 4));
        assert_eq!(store.last_index().ok(), Some(4));
        assert_eq!(store.term(3).ok(), Some(2));
        let entries = store.entries(1, 5, None, GetEntriesContext::empty(false)).expect("entries");
        assert_eq!(entries.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(), vec![(1, 1), (2, 1), (3, 2), (4, 2)]);
    }

    #[test]
    fn compaction_keeps_the_state_in_the_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft.redb");
        {
            let mut store = DiskStorage::open(&path).expect("opens");
            let entries: Vec<Entry> = (1..=10).map(|i| entry(i, 3)).collect();
            store.persist(None, &entries, Some(&hard(3, 1, 10))).expect("persists");
            store.compact(6, b"state@6".to_vec()).expect("compacts");
            assert_eq!(store.log_len(), 4);
        }
        let store = DiskStorage::open(&path).expect("reopens");
        assert_eq!(store.first_index().ok(), Some(7));
        assert_eq!(store.term(6).ok(), Some(3), "the snapshot's term answers for its index");
        assert!(matches!(store.term(5), Err(raft::Error::Store(StorageError::Compacted))));
        assert!(matches!(
            store.entries(5, 8, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        let snap = store.snapshot(0, 2).expect("snapshot");
        assert_eq!(snap.get_metadata().index, 6);
        assert_eq!(&snap.data[..], b"state@6");
    }

    #[test]
    fn a_received_snapshot_replaces_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = DiskStorage::open(&dir.path().join("raft.redb")).expect("opens");
        store.persist(None, &[entry(1, 1), entry(2, 1)], None).expect("persists");
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 4;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        store.persist(Some(&snap), &[entry(21, 4)], Some(&hard(4, 0, 20))).expect("persists");
        assert_eq!(store.first_index().ok(), Some(21));
        assert_eq!(store.last_index().ok(), Some(21));
        assert_eq!(store.conf_state().voters, vec![1, 2, 3]);
        assert!(store.persist(None, &[entry(30, 4)], None).is_err(), "a gap is refused");
    }
}
