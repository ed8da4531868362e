//! The replicated state: records, the commands that change them, and how a
//! command is applied.
//!
//! Every manager applies the same committed commands in the same order to its
//! own sled tree, so `apply` must be deterministic: it validates against the
//! current state and either produces a batch of writes or a [`Rejection`],
//! never a partial change.
//!
//! One file per family of records, each with its records, keys, reads (as
//! `impl StateView` blocks) and the `plan_*` function for its commands:
//!
//! | file          | keys | commands |
//! |---------------|------|----------|
//! | `cluster`     | `cluster` | `InitCluster`, `RotateJoinToken`, `AddDataKey`, `Reseal`, `SetAutolock`, `RetireDataKeys` |
//! | `nodes`       | `node/…`, `mgr/…`, `deny/…` | `AddNode`, `RecordCert`, `SetStatus`, `RemoveNodes`, `SetRole`, `SetRaftMember`, `UpdateNode` |
//! | `certs`       | `cert/…`, `admincert/…`, `denyserial/…` | `RecordAdminCert`, `RevokeAdminCert` |
//! | `secrets`     | `secret/…`, `secretname/…`, `secretdata/…` | `CreateSecret`, `AddSecretVersion`, `RemoveSecret` |
//! | `services`    | `service/…`, `servicename/…` | `CreateService`, `UpdateService`, `RemoveService` |
//! | `tasks`       | `task/…`, `nodetask/…` | `Schedule`, `TaskStatus` |
//! | `ca_rotation` | `carotation`, `caconv/…`, `caprevious`, `certrecovery`, `cachain`, `externalca` | `StartCaRotation`, `CaRotationBatch`, `CaConverged`, `FinishCaRotation`, `SetCertRecoveryWindow`, `SetCaChain`, `SetExternalCa`, `UpdateExternalCa` |
//! | `workload`    | `workload/identity` | `SetIdentityTtl` |
//! | `images`      | `image/…`, `imagename/…`, `hostrootfs` | `PutImage`, `ImageHeld`, `RemoveImage`, `SetHostRootfs` |
//! | `trust`       | `trustkey/…`, `imagesig/…`, `contenttrust` | `AddTrustKey`, `RemoveTrustKey`, `AddImageSignature`, `SetContentTrust` |
//! | `labels`      | — | the label rules node and secret commands check |
//!
//! `command` holds the command enum and its versioned log format,
//! `rejection` the reasons a command is refused.
//!
//! raft's own bookkeeping (`meta/…`) lives in the same tree, written by the state
//! machine in the same atomic batch as each command's effects.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

mod ca_rotation;
mod certs;
mod cluster;
mod command;
mod images;
mod labels;
mod nodes;
mod rejection;
mod secrets;
pub(crate) mod services;
pub(crate) mod tasks;
mod trust;
mod workload;

pub use ca_rotation::*;
pub use certs::*;
pub use cluster::*;
pub use command::*;
pub use images::*;
pub use labels::*;
pub use nodes::*;
pub use rejection::*;
pub use secrets::*;
pub use services::*;
pub use tasks::*;
pub use trust::*;
pub use workload::*;

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("bincode serialization of in-memory state cannot fail")
}

/// Writes to the state planned by one command: key → new value, or `None`
/// for a removal. Same interface as `sled::Batch`, but readable, so that the
/// commands applied together can see each other's writes (see [`StateView`]).
#[derive(Clone, Debug, Default)]
pub struct WriteBatch(BTreeMap<sled::IVec, Option<sled::IVec>>);

impl WriteBatch {
    /// Sets `key` to `value`.
    pub fn insert<K: Into<sled::IVec>, V: Into<sled::IVec>>(&mut self, key: K, value: V) {
        self.0.insert(key.into(), Some(value.into()));
    }

    /// Removes `key`.
    pub fn remove<K: Into<sled::IVec>>(&mut self, key: K) {
        self.0.insert(key.into(), None);
    }

    /// Adds `later`'s writes, which win over this batch's.
    pub fn extend(&mut self, later: WriteBatch) {
        self.0.extend(later.0);
    }

    /// The same writes as one sled batch.
    pub fn into_sled(self) -> sled::Batch {
        let mut b = sled::Batch::default();
        for (k, v) in self.0 {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        b
    }
}

/// Read access to the state, as of the last applied entry; or, while the
/// state machine applies several commands at once, as of the last one planned
/// (the writes planned so far lie over the tree).
#[derive(Clone)]
pub struct StateView {
    tree: sled::Tree,
    pending: Option<Arc<Mutex<WriteBatch>>>,
}

/// A stored record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// sled failed.
    #[error("state storage: {0}")]
    Storage(#[from] sled::Error),
    /// A record does not decode.
    #[error("corrupt state record {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

impl StateView {
    pub(crate) fn new(tree: sled::Tree) -> Self {
        Self { tree, pending: None }
    }

    /// This view with `pending` writes over it.
    pub(crate) fn with_pending(&self, pending: Arc<Mutex<WriteBatch>>) -> Self {
        Self { tree: self.tree.clone(), pending: Some(pending) }
    }

    pub(crate) fn raw(&self, key: &[u8]) -> Result<Option<sled::IVec>, StateError> {
        if let Some(p) = &self.pending {
            if let Some(v) = p.lock().expect("pending writes lock").0.get(key) {
                return Ok(v.clone());
            }
        }
        Ok(self.tree.get(key)?)
    }

    /// Every key and value below `prefix`, in key order, pending writes included.
    fn prefix(&self, prefix: &[u8]) -> Result<Vec<(sled::IVec, sled::IVec)>, StateError> {
        let Some(p) = &self.pending else {
            return Ok(self.tree.scan_prefix(prefix).collect::<Result<_, _>>()?);
        };
        let mut out = BTreeMap::new();
        for kv in self.tree.scan_prefix(prefix) {
            let (k, v) = kv?;
            out.insert(k, v);
        }
        let p = p.lock().expect("pending writes lock");
        for (k, v) in p.0.range::<[u8], _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded)) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => out.insert(k.clone(), v.clone()),
                None => out.remove(k),
            };
        }
        Ok(out.into_iter().collect())
    }

    pub(crate) fn get<T: for<'de> Deserialize<'de>>(&self, key: &[u8]) -> Result<Option<T>, StateError> {
        match self.raw(key)? {
            None => Ok(None),
            Some(v) => bincode::deserialize(&v).map(Some).map_err(|e| StateError::Corrupt {
                key: String::from_utf8_lossy(key).into_owned(),
                reason: e.to_string(),
            }),
        }
    }

    /// SHA-256 over every replicated record (not raft's own bookkeeping), in key
    /// order: equal on managers that applied the same entries.
    pub fn digest(&self) -> Result<String, StateError> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            if k.starts_with(b"meta/") {
                continue;
            }
            h.update((k.len() as u64).to_be_bytes());
            h.update(&k);
            h.update((v.len() as u64).to_be_bytes());
            h.update(&v);
        }
        Ok(hex::encode(h.finalize()))
    }

    /// The keys below `prefix`, without it.
    pub(crate) fn scan_key_suffixes(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        let mut out = Vec::new();
        for (k, _) in self.prefix(prefix.as_bytes())? {
            out.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        }
        Ok(out)
    }

    pub(crate) fn scan<T: for<'de> Deserialize<'de>>(&self, prefix: &str) -> Result<Vec<T>, StateError> {
        let mut out = Vec::new();
        for (k, v) in self.prefix(prefix.as_bytes())? {
            out.push(bincode::deserialize(&v).map_err(|e| StateError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }
}

/// Validates `cmd` against `view` and returns the writes it makes, or why it is refused.
pub(crate) fn plan(view: &StateView, cmd: &Command) -> Result<Result<WriteBatch, Rejection>, StateError> {
    match cmd {
        Command::InitCluster { .. }
        | Command::RotateJoinToken { .. }
        | Command::AddDataKey { .. }
        | Command::Reseal { .. }
        | Command::SetAutolock { .. }
        | Command::RetireDataKeys { .. } => cluster::plan_cluster(view, cmd),
        Command::AddNode(_)
        | Command::RecordCert { .. }
        | Command::SetStatus(_)
        | Command::RemoveNodes { .. }
        | Command::SetRole { .. }
        | Command::SetRaftMember { .. }
        | Command::UpdateNode { .. } => nodes::plan_nodes(view, cmd),
        Command::RecordAdminCert(_) | Command::RevokeAdminCert { .. } => certs::plan_certs(view, cmd),
        Command::CreateSecret { .. } | Command::AddSecretVersion { .. } | Command::RemoveSecret { .. } => {
            secrets::plan_secrets(view, cmd)
        }
        Command::CreateService(_) | Command::UpdateService { .. } | Command::RemoveService { .. } => {
            services::plan_services(view, cmd)
        }
        Command::Schedule { .. } | Command::TaskStatus { .. } => tasks::plan_tasks(view, cmd),
        Command::StartCaRotation(_)
        | Command::CaRotationBatch { .. }
        | Command::CaConverged { .. }
        | Command::FinishCaRotation { .. }
        | Command::SetCertRecoveryWindow { .. }
        | Command::SetCaChain { .. }
        | Command::SetExternalCa(_)
        | Command::UpdateExternalCa { .. } => ca_rotation::plan_ca_rotation(view, cmd),
        Command::SetIdentityTtl { .. } => workload::plan_workload(view, cmd),
        Command::PutImage { .. }
        | Command::ImageHeld { .. }
        | Command::RemoveImage { .. }
        | Command::SetHostRootfs { .. } => images::plan_images(view, cmd),
        Command::AddTrustKey(_)
        | Command::RemoveTrustKey { .. }
        | Command::AddImageSignature { .. }
        | Command::SetContentTrust { .. } => trust::plan_trust(view, cmd),
        // The state machine applies a batch's commands one by one (see
        // `raft::state_machine`); only a nested batch reaches this point.
        Command::Batch(_) => Ok(Err(Rejection::NestedBatch)),
    }
}

#[cfg(test)]
pub(crate) mod tests;
