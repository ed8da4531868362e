//! Raft: openraft 0.9 with its v2 storage traits implemented over sled.
//!
//! Under `raft/`: the log in its own segment files (`raft/wal/`); one sled
//! database with raft's vote and commit markers (`raft_meta`) and the state
//! machine (`sm`); the last snapshot in the file `raft/snapshot.bin`.
//! Durability: an append is acknowledged to openraft only after its log file
//! is `fdatasync`ed, and a vote only after sled is flushed. Appends waiting
//! during one sync share the next (group commit), and concurrent proposals
//! share raft entries (see `Store`). The state machine is flushed by sled in
//! the background and before the log is purged; after a crash openraft
//! applies again whatever it lost, from the log.

#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod leader_watch;
mod log_store;
mod network;
mod state_machine;
mod wal;

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use log_store::LogStore;
pub use network::{Network, RaftService};
pub use state_machine::StateMachine;

use crate::state::{Command, CommandResult};

openraft::declare_raft_types!(
    /// swarmd's raft types: commands in, command results out, u64 node IDs.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

/// A running raft node.
pub type Raft = openraft::Raft<TypeConfig>;

/// Raft timing and snapshot settings.
///
/// # Defaults
/// heartbeat 100 ms, election timeout 400–800 ms (openraft's leader lease is
/// the upper bound, and no vote succeeds before it has passed, so it sets the
/// floor of failover time), a snapshot every 10,000 entries, 500 entries kept
/// behind the snapshot for slow followers.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RaftSettings {
    /// Leader heartbeat interval.
    pub heartbeat: Duration,
    /// Lower bound of the randomized election timeout.
    pub election_min: Duration,
    /// Upper bound of the randomized election timeout.
    pub election_max: Duration,
    /// Build a snapshot after this many entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the latest snapshot, for slow followers.
    pub keep_behind_snapshot: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(400),
            election_max: Duration::from_millis(800),
            snapshot_every: 10_000,
            keep_behind_snapshot: 500,
        }
    }
}

impl RaftSettings {
    /// Settings with an election timeout randomized in `[election, 2 × election]`.
    pub fn new(heartbeat: Duration, election: Duration, snapshot_every: u64) -> Result<Self, String> {
        if heartbeat.is_zero() || election <= heartbeat * 2 {
            return Err(format!(
                "the election timeout ({election:?}) must be more than twice the raft heartbeat ({heartbeat:?})"
            ));
        }
        if snapshot_every < 10 {
            return Err("the snapshot interval must be at least 10 entries".into());
        }
        Ok(Self {
            heartbeat,
            election_min: election,
            election_max: election * 2,
            snapshot_every,
            keep_behind_snapshot: snapshot_every.min(1_000) / 2,
        })
    }

    fn to_config(&self) -> Result<openraft::Config, RaftStartError> {
        openraft::Config {
            cluster_name: "swarmd".into(),
            heartbeat_interval: self.heartbeat.as_millis() as u64,
            election_timeout_min: self.election_min.as_millis() as u64,
            election_timeout_max: self.election_max.as_millis() as u64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_behind_snapshot,
            // Commands are bounded by the control API's 4 MiB request limit, so 16
            // of them stay inside the raft transport's 128 MiB message limit; the
            // transport also cuts batches by bytes (see `network`).
            max_payload_entries: 64,
            // Snapshots travel in 4 MiB chunks, whatever their size.
            snapshot_max_chunk_size: 4 << 20,
            // Installing the last chunk of a large snapshot takes seconds, not ms.
            install_snapshot_timeout: 60_000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| RaftStartError::Config(Box::new(e)))
    }
}

/// Errors opening or starting raft.
#[derive(Debug, thiserror::Error)]
pub enum RaftStartError {
    /// sled could not open the database.
    #[error("raft storage at {path}: {source}")]
    Storage { path: String, source: sled::Error },
    /// Invalid timing settings.
    #[error("raft settings: {0}")]
    Config(Box<openraft::ConfigError>),
    /// openraft refused to start.
    #[error("raft: {0}")]
    Fatal(Box<openraft::error::Fatal<u64>>),
    /// The raft runtime could not run it.
    #[error("raft runtime: {0}")]
    Runtime(String),
}

/// Storage opened from `raft/`: hand it to [`start`].
pub struct Storage {
    /// The sled database (kept to flush and close it).
    pub db: sled::Db,
    /// The log store.
    pub log: LogStore,
    /// The state machine.
    pub sm: StateMachine,
}

/// Opens (or creates) the sled database in `dir`.
///
/// `dir` and everything in it are private to this node (0700 directories,
/// 0600 files): sled creates its files under the process umask (0077 in the
/// swarmd binaries), and what an older version left wider is narrowed here.
pub fn open_storage(dir: &Path) -> Result<Storage, RaftStartError> {
    let storage_err = |source| RaftStartError::Storage { path: dir.display().to_string(), source };
    let private = |e: swarmd_certs::CertError| storage_err(sled::Error::Io(std::io::Error::other(e.to_string())));
    swarmd_certs::create_private_dir(dir).map_err(private)?;
    let db = sled::Config::new().path(dir).mode(sled::Mode::HighThroughput).open().map_err(storage_err)?;
    swarmd_certs::restrict_tree(dir).map_err(private)?;
    let log = LogStore::open(&db, dir).map_err(storage_err)?;
    let sm = StateMachine::open(&db, dir).map_err(storage_err)?;
    Ok(Storage { db, log, sm })
}

/// Starts raft node `id` on `storage`.
///
/// Raft runs on a runtime of its own (see [`runtime`]): its core, timers,
/// replication, peer connections and applies are never queued behind request
/// work (TLS handshakes, CSR checks and signing, sessions) of the runtime that
/// serves nodes. A follower whose runtime was saturated by a join storm used
/// to miss its leader's heartbeats and call elections.
pub async fn start(
    id: u64,
    settings: &RaftSettings,
    storage: Storage,
    network: Network,
) -> Result<Raft, RaftStartError> {
    let config = Arc::new(settings.to_config()?);
    let started = runtime()
        .spawn(async move { Raft::new(id, config, network, storage.log, storage.sm).await })
        .await
        .map_err(|e| RaftStartError::Runtime(e.to_string()))?;
    started.map_err(|e| RaftStartError::Fatal(Box::new(e)))
}

/// The process's raft runtime: one worker thread named `raft`, created on
/// first use and kept for the process's life (a manager that is demoted and
/// promoted again, or tests that start several, share it).
pub fn runtime() -> &'static tokio::runtime::Handle {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("raft")
                .enable_all()
                .build()
                .expect("start the raft runtime")
        })
        .handle()
}
