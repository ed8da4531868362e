//! The raft log: entries in the log's own segment files (see `wal`); vote,
//! committed and purged markers in sled's `raft_meta` tree.
//!
//! Group commit: `append` writes the entries and returns at once; a flusher
//! thread `fdatasync`s the log file and only then tells openraft the entries
//! are durable. The leader therefore sends entries to its followers while its
//! own sync runs, and every append that arrives during one sync shares the next.
//!
//! The state machine, in sled, is not synced per entry: after a crash it may be
//! behind the log, and openraft applies the difference again from the log. The
//! log is never purged past what sled holds durably (`purge` flushes sled first).

// openraft's storage traits fix `StorageError` (224 bytes) as their error type.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, StorageError, StorageIOError, Vote};
use serde::{de::DeserializeOwned, Serialize};

use super::wal::Wal;
use super::TypeConfig;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";

/// The raft log. Cloning shares the same files, trees and flusher.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    meta: sled::Tree,
    wal: Arc<Mutex<Wal>>,
    flusher: std::sync::mpsc::Sender<LogFlushed<TypeConfig>>,
}

/// Syncs the log for every batch of waiting appends, then acknowledges them in
/// order. Ends when the last [`LogStore`] clone is dropped.
fn run_flusher(wal: Arc<Mutex<Wal>>, rx: std::sync::mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        let file = wal.lock().expect("raft log lock").sync_handle();
        let res = file.map_or(Ok(()), |f| f.sync_data());
        for cb in waiting {
            cb.log_io_completed(res.as_ref().map(|_| ()).map_err(|e| std::io::Error::new(e.kind(), e.to_string())));
        }
    }
}

fn log_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write_logs(&e).into()
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, bincode::Error> {
    bincode::deserialize(b)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("bincode serialization of raft state cannot fail")
}

impl LogStore {
    /// Opens the log in `dir/wal` and its markers in `db`.
    pub(super) fn open(db: &sled::Db, dir: &Path) -> Result<Self, sled::Error> {
        let meta = db.open_tree("raft_meta")?;
        let purged = match meta.get(PURGED)? {
            Some(v) => Some(decode::<LogId<u64>>(&v).map_err(|e| sled::Error::Unsupported(e.to_string()))?.index),
            None => None,
        };
        let mut wal = Wal::open(&dir.join("wal"), purged).map_err(sled::Error::Io)?;
        // A crash between recording a purge and deleting its files leaves them.
        if let Some(index) = purged {
            wal.purge(index).map_err(sled::Error::Io)?;
        }
        let wal = Arc::new(Mutex::new(wal));
        let (flusher, rx) = std::sync::mpsc::channel();
        let flush_wal = wal.clone();
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || run_flusher(flush_wal, rx))
            .map_err(sled::Error::Io)?;
        Ok(Self { db: db.clone(), meta, wal, flusher })
    }

    fn wal(&self) -> std::sync::MutexGuard<'_, Wal> {
        self.wal.lock().expect("raft log lock")
    }

    fn meta_get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError<u64>> {
        match self.meta.get(key).map_err(|e| StorageError::from(StorageIOError::read(&e)))? {
            None => Ok(None),
            Some(v) => decode(&v).map(Some).map_err(|e| StorageError::from(StorageIOError::read(&e))),
        }
    }

    /// Quorum-loss recovery, offline only: appends a membership entry that makes
    /// `me` the sole voter, at a term above anything seen, and moves the vote to
    /// that term. On start the node elects itself and commits everything it has.
    pub async fn force_single_voter(&mut self, me: u64, addr: String) -> Result<u64, StorageError<u64>> {
        use openraft::storage::RaftLogStorage;
        let state = self.get_log_state().await?;
        let vote = self.read_vote().await?;
        let last_term = state.last_log_id.map(|l| l.leader_id.term).unwrap_or(0);
        let term = vote.map(|v| v.leader_id().term).unwrap_or(0).max(last_term) + 1;
        let index = state.last_log_id.map(|l| l.index + 1).unwrap_or(1);
        let membership = openraft::Membership::new(
            vec![std::collections::BTreeSet::from([me])],
            std::collections::BTreeMap::from([(me, openraft::BasicNode { addr })]),
        );
        let entry: Entry<TypeConfig> = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(term, me), index),
            payload: openraft::EntryPayload::Membership(membership),
        };
        {
            let mut wal = self.wal();
            wal.append([entry]).map_err(log_err)?;
            wal.sync_handle().map_or(Ok(()), |f| f.sync_data()).map_err(log_err)?;
        }
        self.save_vote(&Vote::new(term, me)).await?;
        Ok(term)
    }

    async fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush_async().await.map(|_| ())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        self.wal().read(bounds).map_err(|e| StorageError::from(StorageIOError::read_logs(&e)))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        let purged: Option<LogId<u64>> = self.meta_get(PURGED)?;
        let last = self.wal().last().or(purged);
        Ok(LogState { last_purged_log_id: purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        self.meta.insert(VOTE, encode(vote)).map_err(|e| StorageError::from(StorageIOError::write_vote(&e)))?;
        self.flush().await.map_err(|e| StorageError::from(StorageIOError::write_vote(&e)))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        self.meta_get(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), StorageError<u64>> {
        // Not flushed: after a crash raft recomputes the commit index; this only
        // lets a restarted node re-apply what it already knew was committed.
        self.meta.insert(COMMITTED, encode(&committed)).map_err(|e| StorageError::from(StorageIOError::write(&e)))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        Ok(self.meta_get::<Option<LogId<u64>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.wal().append(entries).map_err(log_err)?;
        // Acknowledged only once durable, by the flusher (group commit).
        if let Err(std::sync::mpsc::SendError(callback)) = self.flusher.send(callback) {
            callback.log_io_completed(Err(std::io::Error::other("the raft log flusher has stopped")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        self.wal().truncate(log_id.index).map_err(log_err)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        // The state machine up to the purged entries must be on disk before they
        // go: one flush makes it and the purge marker durable together.
        self.meta.insert(PURGED, encode(&log_id)).map_err(|e| StorageError::from(StorageIOError::write(&e)))?;
        self.flush().await.map_err(log_err)?;
        self.wal().purge(log_id.index).map_err(log_err)
    }
}
