//! `worker.json`: what a worker needs to restart, written last by `join`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use swarmd_certs::{ClusterId, NodeId};

use crate::WorkerError;

/// File name of the worker's config in its data dir.
pub const CONFIG_FILE: &str = "worker.json";

/// A worker's local configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// This node.
    pub node_id: NodeId,
    /// Its cluster.
    pub cluster_id: ClusterId,
    /// Manager addresses to dial, updated from sessions.
    pub remotes: Vec<String>,
    /// Where to listen if this node is promoted to manager.
    #[serde(default)]
    pub listen_addr: Option<String>,
    /// The OCI runtime binary: `runc` (default) or `crun`.
    #[serde(default)]
    pub runtime: Option<String>,
    /// Node IDs of the current managers, updated from sessions: the only
    /// manager certificates this node accepts from a server (empty: any of the
    /// cluster's, until the first session says).
    #[serde(default)]
    pub managers: Vec<NodeId>,
}

impl WorkerConfig {
    /// Loads `worker.json`.
    pub fn load(data_dir: &Path) -> Result<Self, WorkerError> {
        let p = data_dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                WorkerError::NotAWorker { path: data_dir.to_owned() }
            } else {
                WorkerError::Config(format!("{}: {e}", p.display()))
            }
        })?;
        serde_json::from_str(&text).map_err(|e| WorkerError::Config(format!("{}: {e}", p.display())))
    }

    /// Writes `worker.json` atomically.
    pub fn save(&self, data_dir: &Path) -> Result<(), WorkerError> {
        let text = serde_json::to_string_pretty(self).expect("serialize config");
        swarmd_certs::write_atomic(&data_dir.join(CONFIG_FILE), text.as_bytes(), 0o600)?;
        Ok(())
    }
}
