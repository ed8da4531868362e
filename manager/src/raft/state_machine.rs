//! The state machine on sled: applies committed commands to the `sm` tree and
//! builds and installs snapshots. A snapshot lives in its own file,
//! `raft/snapshot.bin` (written to a temporary file, fsynced, renamed): sled is
//! not made for values of many megabytes.

// openraft's storage traits fix `StorageError` (224 bytes) as their error type.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, StorageError, StorageIOError, StoredMembership,
};
use tokio::sync::{watch, Mutex};

use super::TypeConfig;
use crate::state::{encode, plan, Command, CommandResult, StateView, WriteBatch};

const LAST_APPLIED: &[u8] = b"meta/last_applied";
const MEMBERSHIP: &[u8] = b"meta/membership";
const META_PREFIX: &[u8] = b"meta/";
const SNAPSHOT_FILE: &str = "snapshot.bin";

type Membership = StoredMembership<u64, BasicNode>;

/// The replicated state machine. Cloning shares the same trees.
#[derive(Clone)]
pub struct StateMachine {
    db: sled::Db,
    sm: sled::Tree,
    snapshot_path: std::path::PathBuf,
    /// Serializes applies against snapshot building and installing, so a snapshot
    /// is a consistent cut of the tree.
    lock: Arc<Mutex<()>>,
    applied: Arc<watch::Sender<u64>>,
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
    pub(super) fn open(db: &sled::Db, dir: &std::path::Path) -> Result<Self, sled::Error> {
        let sm = db.open_tree("sm")?;
        let applied = match sm.get(LAST_APPLIED)? {
            Some(v) => bincode::deserialize::<Option<LogId<u64>>>(&v).ok().flatten().map_or(0, |l| l.index),
            None => 0,
        };
        Ok(Self {
            db: db.clone(),
            snapshot_path: dir.join(SNAPSHOT_FILE),
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
}

/// Plans `cmd` against `view` and adds its writes to `pending` (nothing if it
/// is refused); its result.
fn plan_one(
    view: &StateView,
    pending: &std::sync::Mutex<WriteBatch>,
    cmd: &Command,
) -> Result<CommandResult, StorageError<u64>> {
    Ok(match plan(view, cmd).map_err(io_read)? {
        Ok(batch) => {
            pending.lock().expect("pending writes lock").extend(batch);
            CommandResult::Ok
        }
        Err(why) => CommandResult::Rejected(why),
    })
}

/// raft's bookkeeping in `sm`: the last applied log ID and the last membership.
fn read_meta(sm: &sled::Tree) -> Result<(Option<LogId<u64>>, Membership), StorageError<u64>> {
    let last = match sm.get(LAST_APPLIED).map_err(io_read)? {
        Some(v) => bincode::deserialize(&v).map_err(io_read)?,
        None => None,
    };
    let mem = match sm.get(MEMBERSHIP).map_err(io_read)? {
        Some(v) => bincode::deserialize(&v).map_err(io_read)?,
        None => Membership::default(),
    };
    Ok((last, mem))
}

/// Writes `meta` and `data` to `path` atomically: `[u64 meta length][meta][data]`.
fn write_snapshot_file(
    path: &std::path::Path,
    meta: &SnapshotMeta<u64, BasicNode>,
    data: &[u8],
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let meta = encode(meta);
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(&(meta.len() as u64).to_be_bytes())?;
    f.write_all(&meta)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A snapshot read back from its file: metadata and data.
type StoredSnapshot = (SnapshotMeta<u64, BasicNode>, Vec<u8>);

fn read_snapshot_file(path: &std::path::Path) -> std::io::Result<Option<StoredSnapshot>> {
    let mut bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "corrupt snapshot file");
    let len = u64::from_be_bytes(bytes.get(..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
    let meta = bincode::deserialize(bytes.get(8..8 + len).ok_or_else(bad)?).map_err(|_| bad())?;
    let data = bytes.split_off(8 + len);
    Ok(Some((meta, data)))
}

/// Encodes every replicated record (not raft's `meta/…`) of `sm` as
/// `[u32 key length][key][u32 value length][value]...`, in key order: a
/// snapshot's data, streamed from sled without an intermediate structure.
fn encode_records(sm: &sled::Tree) -> Result<Vec<u8>, sled::Error> {
    let mut out = Vec::new();
    for kv in sm.iter() {
        let (k, v) = kv?;
        if k.starts_with(META_PREFIX) {
            continue;
        }
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(&k);
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(&v);
    }
    Ok(out)
}

/// The inverse of [`encode_records`], as a batch that first clears `sm`.
fn decode_records(sm: &sled::Tree, mut bytes: &[u8]) -> Result<sled::Batch, String> {
    let mut b = sled::Batch::default();
    for k in sm.iter().keys() {
        b.remove(k.map_err(|e| e.to_string())?);
    }
    let take = |bytes: &mut &[u8]| -> Result<Vec<u8>, String> {
        let bad = || "truncated snapshot record".to_string();
        let len = u32::from_be_bytes(bytes.get(..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
        let v = bytes.get(4..4 + len).ok_or_else(bad)?.to_vec();
        *bytes = &bytes[4 + len..];
        Ok(v)
    };
    while !bytes.is_empty() {
        let k = take(&mut bytes)?;
        let v = take(&mut bytes)?;
        if k.starts_with(META_PREFIX) {
            return Err("snapshot carries raft bookkeeping records".into());
        }
        b.insert(k, v);
    }
    Ok(b)
}

fn blocking_err(e: tokio::task::JoinError) -> std::io::Error {
    std::io::Error::other(e)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        // A consistent cut: applies wait while the records are copied. The copy
        // runs on a blocking thread, so raft's own tasks (heartbeats, appends)
        // keep running even for a state of hundreds of megabytes.
        let guard = self.lock.clone().lock_owned().await;
        let sm = self.sm.clone();
        let (last, membership, bytes) = tokio::task::spawn_blocking(move || {
            let _g = guard;
            let (last, membership) = read_meta(&sm)?;
            let bytes = encode_records(&sm).map_err(io_read)?;
            Ok::<_, StorageError<u64>>((last, membership, bytes))
        })
        .await
        .map_err(|e| io_read(blocking_err(e)))??;
        let id = match last {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, rand::random::<u32>()),
            None => format!("empty-{}", rand::random::<u32>()),
        };
        let meta = SnapshotMeta { last_log_id: last, last_membership: membership, snapshot_id: id };
        // The state the snapshot covers must be durable before the log behind it is purged.
        self.db.flush_async().await.map_err(snap_err)?;
        let (path, m) = (self.snapshot_path.clone(), meta.clone());
        let bytes = tokio::task::spawn_blocking(move || write_snapshot_file(&path, &m, &bytes).map(|_| bytes))
            .await
            .map_err(|e| snap_err(blocking_err(e)))?
            .map_err(snap_err)?;
        tracing::debug!(snapshot = %meta.snapshot_id, bytes = bytes.len(), "built a snapshot");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, Membership), StorageError<u64>> {
        read_meta(&self.sm)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let _g = self.lock.lock().await;
        // Every entry of this call is planned against the writes of the ones
        // before it, and all of them go to sled in one atomic batch: sled writes
        // its buffers out on every batch, which made one batch per command the
        // largest cost of a busy manager.
        let pending = Arc::new(std::sync::Mutex::new(WriteBatch::default()));
        let view = self.view().with_pending(pending.clone());
        let mut out = Vec::new();
        let mut last = None;
        for entry in entries {
            let log_id = entry.log_id;
            last = Some(log_id);
            let result = match &entry.payload {
                EntryPayload::Blank => CommandResult::Ok,
                EntryPayload::Normal(Command::Batch(cmds)) => {
                    CommandResult::Batch(cmds.iter().map(|c| plan_one(&view, &pending, c)).collect::<Result<_, _>>()?)
                }
                EntryPayload::Normal(cmd) => plan_one(&view, &pending, cmd)?,
                EntryPayload::Membership(m) => {
                    let mut b = WriteBatch::default();
                    b.insert(MEMBERSHIP, encode(&Membership::new(Some(log_id), m.clone())));
                    pending.lock().expect("pending writes lock").extend(b);
                    CommandResult::Ok
                }
            };
            out.push(result);
        }
        if let Some(last) = last {
            let mut batch = std::mem::take(&mut *pending.lock().expect("pending writes lock"));
            let mut meta = WriteBatch::default();
            meta.insert(LAST_APPLIED, encode(&Some(last)));
            batch.extend(meta);
            self.sm.apply_batch(batch.into_sled()).map_err(io_write)?;
            self.applied.send_replace(last.index);
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
        let guard = self.lock.clone().lock_owned().await;
        let (sm, m) = (self.sm.clone(), meta.clone());
        let bytes = tokio::task::spawn_blocking(move || {
            let _g = guard;
            let mut b = decode_records(&sm, &bytes)
                .map_err(|why| StorageIOError::read_snapshot(Some(m.signature()), &std::io::Error::other(why)))?;
            b.insert(LAST_APPLIED, encode(&m.last_log_id));
            b.insert(MEMBERSHIP, encode(&m.last_membership));
            sm.apply_batch(b).map_err(io_write)?;
            Ok::<_, StorageError<u64>>(bytes)
        })
        .await
        .map_err(|e| io_write(blocking_err(e)))??;
        self.db.flush_async().await.map_err(snap_err)?;
        let (path, m) = (self.snapshot_path.clone(), meta.clone());
        tokio::task::spawn_blocking(move || write_snapshot_file(&path, &m, &bytes))
            .await
            .map_err(|e| snap_err(std::io::Error::other(e)))?
            .map_err(snap_err)?;
        if let Some(l) = meta.last_log_id {
            self.applied.send_replace(l.index);
        }
        tracing::info!(snapshot = %meta.snapshot_id, last = ?meta.last_log_id, "installed a snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let path = self.snapshot_path.clone();
        let read = tokio::task::spawn_blocking(move || read_snapshot_file(&path))
            .await
            .map_err(|e| io_read(std::io::Error::other(e)))?
            .map_err(io_read)?;
        Ok(read.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}
