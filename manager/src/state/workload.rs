//! Settings of tasks' workload identities: how long their certificates live.
//!
//! | key                 | value |
//! |---------------------|-------|
//! | `workload/identity` | [`IdentitySettings`] |
//!
//! A record of its own rather than a field of [`super::ClusterRecord`]: records
//! are bincode'd, which has no notion of a field missing from an older record,
//! so a new field there would make every existing cluster's record (and its
//! `InitCluster` entry) unreadable. Absent, the defaults hold.

use serde::{Deserialize, Serialize};
use swarmd_certs::workload::IdentityTtl;

use super::{encode, Command, Rejection, StateError, StateView, WriteBatch};

/// Cluster-wide settings of workload identities.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentitySettings {
    /// Certificate lifetime, seconds; 0 (never written): the default.
    pub ttl_secs: u64,
}

impl IdentitySettings {
    /// The lifetime of the certificates issued now. A stored value out of
    /// bounds (which `SetIdentityTtl` never writes) falls back to the default.
    pub fn ttl(&self) -> IdentityTtl {
        IdentityTtl::from_secs(self.ttl_secs).unwrap_or_default()
    }
}

const IDENTITY_KEY: &[u8] = b"workload/identity";

impl StateView {
    /// The workload identity settings (defaults until one is set).
    pub fn identity_settings(&self) -> Result<IdentitySettings, StateError> {
        Ok(self.get(IDENTITY_KEY)?.unwrap_or_default())
    }
}

/// `SetIdentityTtl`: refused (nothing written) outside [`IdentityTtl`]'s bounds.
pub(super) fn plan_workload(view: &StateView, cmd: &Command) -> Result<Result<WriteBatch, Rejection>, StateError> {
    let Command::SetIdentityTtl { secs } = cmd else { unreachable!("not a workload command") };
    if view.cluster()?.is_none() {
        return Ok(Err(Rejection::NotInitialised));
    }
    if let Err(e) = IdentityTtl::from_secs(*secs) {
        return Ok(Err(Rejection::Invalid(e)));
    }
    let mut settings = view.identity_settings()?;
    settings.ttl_secs = *secs;
    let mut batch = WriteBatch::default();
    batch.insert(IDENTITY_KEY, encode(&settings));
    Ok(Ok(batch))
}
