//! The swarmd manager.
//!
//! A manager runs raft (openraft over sled) for the replicated store, holds the
//! cluster's certificate authority and data key, and serves four gRPC services
//! on one mutual-TLS port — `Ca` (join and renewal), `Dispatcher` (node
//! sessions), `Control` (secretctl) and `Raft` (peers) — plus `Control` on a
//! unix socket (mode 0600) in its data dir.
//!
//! [`Manager::init`] creates a cluster; [`Manager::open`] restarts one from its
//! data dir; [`Manager::run`] serves until shut down.

mod assignments;
mod auth;
mod autolock;
mod budget;
mod ca_rotation;
mod ca_service;
mod cluster;
mod cluster_service;
mod config;
mod conn;
mod control;
mod dispatcher;
mod error;
mod external_ca;
mod images;
pub mod keys;
pub mod limits;
mod membership;
mod node;
pub mod raft;
mod registry;
mod rotation;
mod scheduler;
mod secret_store;
mod service_api;
pub mod services;
pub mod state;
mod status;
mod store;
mod validate;

/// Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`,
/// off by default): raft storage helpers and every Control request's
/// validation. Not an API.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    pub use crate::raft::fuzzing::*;
    pub use crate::secret_store::{find as find_secret, list as list_secrets};
    pub use crate::service_api::{find as find_service, tasks as service_tasks};
    pub use crate::validate::*;
}

pub use auth::{Authorizer, Caller, ConnInfo};
pub use config::{ExternalCaOptions, InitOptions, JoinOptions, ManagerConfig, OwnCa, CONFIG_FILE};
pub use conn::{ConnLimits, ConnRegistry};
pub use error::ManagerError;
pub use membership::{erase_manager_state, erase_removed, Demotion, RunOutcome};
pub use node::{JoinSite, Manager};
pub use store::{Peers, Store, StoreError};

/// Reads the cluster record and the plaintext CA key of a *stopped* manager's
/// data dir, with its own keys. For operators' recovery tools and for tests
/// that prove the key is never on disk in the clear.
pub fn open_ca_key_offline(data_dir: &std::path::Path) -> Result<zeroize::Zeroizing<String>, ManagerError> {
    let dek = keys::KeyDir::new(data_dir).load_keyring()?;
    let storage = raft::open_storage(&data_dir.join("raft"))?;
    let record = storage.sm.view().cluster()?.ok_or(ManagerError::NotInitialised)?;
    let secrets = cluster::ClusterSecrets::open(&record, None, "", None, &dek)?;
    secrets.anchor.key_pem().ok_or_else(|| ManagerError::Invalid("this cluster holds no CA key".into()))
}
