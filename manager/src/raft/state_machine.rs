//! The state machine on sled: applies committed commands to the `sm` tree and
//! builds and installs snapshots (kept in their own `snapshot` tree).

// openraft's storage traits fix `StorageError` (224 bytes) as their error type.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};

use super::TypeConfig;
use crate::state::{encode, plan, CommandResult, StateView};

const LAST_APPLIED: &[u8] = b"meta/last_applied";
const MEMBERSHIP: &[u8] = b"meta/membership";
const META_PREFIX: &[u8] = b"meta/";
const SNAP_META: &[u8] = b"meta";
const SNAP_DATA: &[u8] = b"data";

type Membership = StoredMembership<u64, BasicNode>;

/// The replicated state machine. Cloning shares the same trees.
#[derive(Clone)]
pub struct StateMachine {
    db: sled::Db,
    sm: sled::Tree,
    snap: sled::Tree,
    /// Serializes applies against snapshot building and installing, so a snapshot
    /// is a consistent cut of the tree.
    lock: Arc<Mutex<()>>,
    applied: Arc<watch::Sender<u64>>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotData {
    kvs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn io_read(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::read_state_machine(&e).into()
}
fn io_write(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write_state_machine(&e).into()
}
fn snap_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write_snapshot(None, &e).into()
}

impl StateMachine {
    pub(super) fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        let sm = db.open_tree("sm")?;
        let applied = match sm.get(LAST_APPLIED)? {
            Some(v) => bincode::deserialize::<Option<LogId<u64>>>(&v).ok().flatten().map_or(0, |l| l.index),
            None => 0,
        };
        Ok(Self {
            db: db.clone(),
            snap: db.open_tree("snapshot")?,
            sm,
            lock: Arc::new(Mutex::new(())),
            applied: Arc::new(watch::Sender::new(applied)),
        })
    }

    /// Read access to the applied state.
    pub fn view(&self) -> StateView {
        StateView::new(self.sm.clone())
    }

    /// Follows the index of the last applied entry (to react to changes).
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    fn read_meta(&self) -> Result<(Option<LogId<u64>>, Membership), StorageError<u64>> {
        let last = match self.sm.get(LAST_APPLIED).map_err(io_read)? {
            Some(v) => bincode::deserialize(&v).map_err(io_read)?,
            None => None,
        };
        let mem = match self.sm.get(MEMBERSHIP).map_err(io_read)? {
            Some(v) => bincode::deserialize(&v).map_err(io_read)?,
            None => Membership::default(),
        };
        Ok((last, mem))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let (meta, bytes) = {
            let _g = self.lock.lock().await;
            let (last, membership) = self.read_meta()?;
            let mut kvs = Vec::new();
            for kv in self.sm.iter() {
                let (k, v) = kv.map_err(io_read)?;
                if !k.starts_with(META_PREFIX) {
                    kvs.push((k.to_vec(), v.to_vec()));
                }
            }
            let id = match last {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, rand::random::<u32>()),
                None => format!("empty-{}", rand::random::<u32>()),
            };
            let meta = SnapshotMeta { last_log_id: last, last_membership: membership, snapshot_id: id };
            (meta, encode(&SnapshotData { kvs }))
        };
        let mut b = sled::Batch::default();
        b.insert(SNAP_META, encode(&meta));
        b.insert(SNAP_DATA, bytes.clone());
        self.snap.apply_batch(b).map_err(snap_err)?;
        self.db.flush_async().await.map_err(snap_err)?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, Membership), StorageError<u64>> {
        self.read_meta()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let _g = self.lock.lock().await;
        let view = self.view();
        let mut out = Vec::new();
        let mut last = 0;
        for entry in entries {
            let log_id = entry.log_id;
            last = log_id.index;
            let (mut batch, result) = match &entry.payload {
                EntryPayload::Blank => (sled::Batch::default(), CommandResult::Ok),
                EntryPayload::Normal(cmd) => match plan(&view, cmd).map_err(io_read)? {
                    Ok(batch) => (batch, CommandResult::Ok),
                    Err(why) => (sled::Batch::default(), CommandResult::Rejected(why)),
                },
                EntryPayload::Membership(m) => {
                    let mut b = sled::Batch::default();
                    b.insert(MEMBERSHIP, encode(&Membership::new(Some(log_id), m.clone())));
                    (b, CommandResult::Ok)
                }
            };
            batch.insert(LAST_APPLIED, encode(&Some(log_id)));
            self.sm.apply_batch(batch).map_err(io_write)?;
            out.push(result);
        }
        if last > 0 {
            self.applied.send_replace(last);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let bytes = snapshot.into_inner();
        let data: SnapshotData = bincode::deserialize(&bytes)
            .map_err(|e| StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e)))?;
        {
            let _g = self.lock.lock().await;
            let mut b = sled::Batch::default();
            for k in self.sm.iter().keys() {
                b.remove(k.map_err(io_write)?);
            }
            for (k, v) in data.kvs {
                b.insert(k, v);
            }
            b.insert(LAST_APPLIED, encode(&meta.last_log_id));
            b.insert(MEMBERSHIP, encode(&meta.last_membership));
            self.sm.apply_batch(b).map_err(io_write)?;
            let mut s = sled::Batch::default();
            s.insert(SNAP_META, encode(meta));
            s.insert(SNAP_DATA, bytes);
            self.snap.apply_batch(s).map_err(snap_err)?;
        }
        self.db.flush_async().await.map_err(snap_err)?;
        if let Some(l) = meta.last_log_id {
            self.applied.send_replace(l.index);
        }
        tracing::info!(snapshot = %meta.snapshot_id, last = ?meta.last_log_id, "installed a snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let (Some(m), Some(d)) =
            (self.snap.get(SNAP_META).map_err(io_read)?, self.snap.get(SNAP_DATA).map_err(io_read)?)
        else {
            return Ok(None);
        };
        let meta: SnapshotMeta<u64, BasicNode> = bincode::deserialize(&m).map_err(io_read)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(d.to_vec())) }))
    }
}
