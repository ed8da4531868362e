//! The manager's top-level error.

use std::path::PathBuf;

/// Why a manager could not be created, started or kept running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// `init` on a data dir that already holds a node.
    #[error("{path} already holds a swarmd node; use `swarmd run --data-dir {path}` to start it, or choose an empty data dir")]
    AlreadyInitialised { path: PathBuf },
    /// A data dir with leftovers of an interrupted init.
    #[error("{path} contains {what} from an interrupted setup; remove it or choose an empty data dir")]
    PartialState { path: PathBuf, what: String },
    /// `run` on a data dir without a manager.
    #[error("{path} holds no swarmd manager (no {file}); create one with `swarmd manager init`")]
    NotAManager { path: PathBuf, file: &'static str },
    /// The store has no cluster record.
    #[error("the raft store holds no cluster")]
    NotInitialised,
    /// Invalid option.
    #[error("{0}")]
    Invalid(String),
    /// Joining an existing cluster failed.
    #[error("{0}")]
    Join(String),
    /// Cannot bind a listener.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    /// Other I/O on the data dir.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Certificates.
    #[error(transparent)]
    Cert(#[from] swarmd_certs::CertError),
    /// Keys.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// Raft start-up.
    #[error(transparent)]
    RaftStart(Box<crate::raft::RaftStartError>),
    /// Raft at run time.
    #[error("raft: {0}")]
    Raft(String),
    /// Store.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// State records.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// Cluster secrets.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// gRPC server.
    #[error("server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl From<crate::raft::RaftStartError> for ManagerError {
    fn from(e: crate::raft::RaftStartError) -> Self {
        ManagerError::RaftStart(Box::new(e))
    }
}
