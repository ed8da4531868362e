//! The raft log on sled: entries keyed by big-endian index in the `log` tree;
//! vote, committed and purged markers in `raft_meta`.
//!
//! Group commit: `append` writes the entries to sled's memory and returns at
//! once; a flusher thread fsyncs and only then tells openraft the entries are
//! durable. The leader therefore sends entries to its followers while its own
//! fsync runs, and every append that arrives during one fsync shares the next.

// openraft's storage traits fix `StorageError` (224 bytes) as their error type.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogId, StorageError, StorageIOError, Vote};
use serde::{de::DeserializeOwned, Serialize};

use super::TypeConfig;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";

/// The sled-backed raft log. Cloning shares the same trees and flusher.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    flusher: std::sync::mpsc::Sender<LogFlushed<TypeConfig>>,
}

/// Fsyncs `db` for every batch of waiting appends, then acknowledges them in
/// order. Ends when the last [`LogStore`] clone is dropped.
fn run_flusher(db: sled::Db, rx: std::sync::mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        let res = db.flush().map(|_| ());
        for cb in waiting {
            cb.log_io_completed(res.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
        }
    }
}

fn idx(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, bincode::Error> {
    bincode::deserialize(b)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("bincode serialization of raft state cannot fail")
}

impl LogStore {
    pub(super) fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        let (flusher, rx) = std::sync::mpsc::channel();
        let flush_db = db.clone();
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || run_flusher(flush_db, rx))
            .map_err(sled::Error::Io)?;
        Ok(Self { db: db.clone(), log: db.open_tree("log")?, meta: db.open_tree("raft_meta")?, flusher })
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
        self.log.insert(idx(index), encode(&entry)).map_err(|e| StorageError::from(StorageIOError::write_logs(&e)))?;
        self.save_vote(&Vote::new(term, me)).await?;
        Ok(term)
    }

    async fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush_async().await.map(|_| ())
    }
}

fn to_bounds<RB: RangeBounds<u64>>(r: &RB) -> (Bound<[u8; 8]>, Bound<[u8; 8]>) {
    let map = |b: Bound<&u64>| match b {
        Bound::Included(i) => Bound::Included(idx(*i)),
        Bound::Excluded(i) => Bound::Excluded(idx(*i)),
        Bound::Unbounded => Bound::Unbounded,
    };
    (map(r.start_bound()), map(r.end_bound()))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        let mut out = Vec::new();
        for kv in self.log.range(to_bounds(&range)) {
            let (_, v) = kv.map_err(|e| StorageError::from(StorageIOError::read_logs(&e)))?;
            out.push(decode(&v).map_err(|e| StorageError::from(StorageIOError::read_logs(&e)))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        let purged: Option<LogId<u64>> = self.meta_get(PURGED)?;
        let last = match self.log.last().map_err(|e| StorageError::from(StorageIOError::read_logs(&e)))? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = decode(&v).map_err(|e| StorageError::from(StorageIOError::read_logs(&e)))?;
                Some(*e.get_log_id())
            }
            None => purged,
        };
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
        let mut batch = sled::Batch::default();
        for e in entries {
            batch.insert(&idx(e.get_log_id().index), encode(&e));
        }
        self.log.apply_batch(batch).map_err(|e| StorageError::from(StorageIOError::write_logs(&e)))?;
        // Acknowledged only once durable, by the flusher (group commit).
        if let Err(std::sync::mpsc::SendError(callback)) = self.flusher.send(callback) {
            callback.log_io_completed(Err(std::io::Error::other("the raft log flusher has stopped")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let mut batch = sled::Batch::default();
        for kv in self.log.range(idx(log_id.index)..) {
            let (k, _) = kv.map_err(|e| StorageError::from(StorageIOError::write_logs(&e)))?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(|e| StorageError::from(StorageIOError::write_logs(&e)))?;
        self.flush().await.map_err(|e| StorageError::from(StorageIOError::write_logs(&e)))
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        self.meta.insert(PURGED, encode(&log_id)).map_err(|e| StorageError::from(StorageIOError::write(&e)))?;
        let mut batch = sled::Batch::default();
        for kv in self.log.range(..=idx(log_id.index)) {
            let (k, _) = kv.map_err(|e| StorageError::from(StorageIOError::write_logs(&e)))?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(|e| StorageError::from(StorageIOError::write_logs(&e)))?;
        Ok(())
    }
}
