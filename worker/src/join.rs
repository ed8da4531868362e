//! A worker's join: [`swarmd_certs::join::request_certificate`] (the CA
//! pinned by the token's digest, then a certificate for a fresh key), then
//! `certs/` and `worker.json` (the marker of a complete join) are stored. If
//! anything fails, what was written is removed.

use std::path::{Path, PathBuf};

use swarmd_certs::join::{request_certificate, Issued, JoinError};
use swarmd_certs::{JoinToken, NodeIdentity, Role};

use crate::config::{WorkerConfig, CONFIG_FILE};
use crate::WorkerError;

/// Options of `swarmd worker join`.
#[derive(Clone, Debug)]
pub struct JoinOptions {
    /// The join token text.
    pub token: String,
    /// Manager addresses, tried in order.
    pub remotes: Vec<String>,
    /// Where to keep state.
    pub data_dir: PathBuf,
    /// Hostname to report.
    pub hostname: String,
    /// Where to listen if this node is later promoted to manager.
    pub listen_addr: Option<String>,
    /// The OCI runtime binary.
    pub runtime: Option<String>,
}

fn check_fresh(data_dir: &Path) -> Result<(), JoinError> {
    for marker in [CONFIG_FILE, "manager.json", "certs"] {
        if data_dir.join(marker).exists() {
            return Err(JoinError::AlreadyInitialised { path: data_dir.to_owned() });
        }
    }
    Ok(())
}

pub(crate) async fn join(opts: &JoinOptions) -> Result<(WorkerConfig, NodeIdentity), WorkerError> {
    let token: JoinToken = opts.token.parse().map_err(JoinError::Token)?;
    if opts.remotes.is_empty() {
        return Err(JoinError::NoRemote.into());
    }
    check_fresh(&opts.data_dir)?;

    let issued = request_certificate(&token, &opts.remotes, &opts.hostname, Role::Worker).await?;
    persist(opts, issued).map_err(Into::into)
}

/// Step 3: certs first, config last; on failure, removes what it wrote.
fn persist(opts: &JoinOptions, issued: Issued) -> Result<(WorkerConfig, NodeIdentity), JoinError> {
    let Issued { identity, managers, manager_ids, .. } = issued;
    let cluster_id = identity.info.cluster_id.clone();
    let mut remotes = opts.remotes.clone();
    for m in managers {
        if !remotes.contains(&m) {
            remotes.push(m);
        }
    }
    let cfg = WorkerConfig {
        node_id: identity.info.node_id.clone(),
        cluster_id,
        remotes,
        listen_addr: opts.listen_addr.clone(),
        runtime: opts.runtime.clone(),
        managers: manager_ids,
    };
    let certs = NodeIdentity::dir(&opts.data_dir);
    let persisted = std::fs::create_dir_all(&opts.data_dir)
        .map_err(|source| JoinError::Io { path: opts.data_dir.clone(), source })
        .and_then(|_| identity.save(&certs).map_err(|e| JoinError::BadCertificate(e.to_string())))
        .and_then(|_| cfg.save(&opts.data_dir).map_err(|e| JoinError::BadCertificate(e.to_string())));
    if let Err(e) = persisted {
        let _ = std::fs::remove_dir_all(&certs);
        return Err(e);
    }
    Ok((cfg, identity))
}
