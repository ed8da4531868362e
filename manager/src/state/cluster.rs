//! The cluster record: cluster-wide settings and the values sealed under the
//! data key (CA key, join tokens, unlock key), and the commands that create
//! it, rotate its tokens and data keys, re-seal and retire.
//!
//! | key       | value |
//! |-----------|-------|
//! | `cluster` | [`ClusterRecord`] |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use swarmd_certs::{ClusterId, Role, SecretId};

use super::certs::record_cert;
use super::nodes::put_node;
use super::secrets::{secret_data_key, secret_key, SecretRecord};
use super::{encode, Command, Rejection, StateError, StateView, WriteBatch};
use crate::keys::Sealed;

/// Cluster-wide settings and secrets (sealed under the data key).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// The cluster's ID (O of every certificate).
    pub id: ClusterId,
    /// The root CA certificate, PEM: the bundle join tokens pin.
    pub ca_cert_pem: String,
    /// The CA private key, sealed.
    pub ca_key: Sealed,
    /// The worker join token, sealed.
    pub worker_token: Sealed,
    /// The manager join token, sealed.
    pub manager_token: Sealed,
    /// Node certificate lifetime, seconds.
    pub cert_validity_secs: u64,
    /// Heartbeat period, milliseconds.
    pub heartbeat_ms: u64,
    /// Creation time, unix seconds.
    pub created_at: i64,
    /// The data key new values are sealed with.
    pub data_key_id: u32,
    /// A known value sealed under the active data key (purpose
    /// [`crate::keys::purpose::key_check`]): a manager that fetches the key
    /// from another proves it got the right one. `None` for the first key.
    pub data_key_check: Option<Sealed>,
    /// Data keys below this ID are retired: nothing is sealed under them any
    /// more, and every manager deletes them.
    pub retired_below: u32,
    /// With autolock on: the unlock key, sealed under the data key. Every
    /// manager seals its KEK under it.
    pub unlock_key: Option<Sealed>,
}

impl ClusterRecord {
    /// The sealed values of the record itself, with what they are.
    pub fn sealed_fields(&self) -> Vec<(&'static str, &Sealed)> {
        let mut v = vec![
            ("CA key", &self.ca_key),
            ("worker join token", &self.worker_token),
            ("manager join token", &self.manager_token),
        ];
        if let Some(k) = &self.unlock_key {
            v.push(("unlock key", k));
        }
        v
    }
}

/// Which sealed field of the cluster record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterField {
    /// The CA key.
    CaKey,
    /// The worker join token.
    WorkerToken,
    /// The manager join token.
    ManagerToken,
    /// The unlock key.
    UnlockKey,
}

/// A cluster record field re-sealed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResealField {
    /// Which field.
    pub field: ClusterField,
    /// The value it replaces.
    pub old: Sealed,
    /// The value re-sealed.
    pub new: Sealed,
}

/// A secret version re-sealed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResealSecret {
    /// The secret.
    pub id: SecretId,
    /// The version.
    pub version: u32,
    /// The value it replaces.
    pub old: Sealed,
    /// The value re-sealed.
    pub new: Sealed,
}

pub(crate) const CLUSTER_KEY: &[u8] = b"cluster";

impl StateView {
    /// The encoded cluster record (to notice changes cheaply).
    pub fn cluster_raw(&self) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.raw(CLUSTER_KEY)?.map(|v| v.to_vec()))
    }

    /// The cluster record, once the cluster is initialised.
    pub fn cluster(&self) -> Result<Option<ClusterRecord>, StateError> {
        self.get(CLUSTER_KEY)
    }
}

/// The cluster commands of [`super::plan`]: `InitCluster`, `RotateJoinToken`,
/// `AddDataKey`, `Reseal`, `SetAutolock`, `RetireDataKeys`.
pub(super) fn plan_cluster(view: &StateView, cmd: &Command) -> Result<Result<WriteBatch, Rejection>, StateError> {
    let mut batch = WriteBatch::default();
    if let Command::InitCluster { cluster, manager } = cmd {
        if view.cluster()?.is_some() {
            return Ok(Err(Rejection::AlreadyInitialised));
        }
        batch.insert(CLUSTER_KEY, encode(cluster.as_ref()));
        put_node(&mut batch, manager);
        let cert = (manager.cert_serial.as_str(), manager.role, manager.cert_not_after);
        record_cert(view, &mut batch, &manager.id, manager.role, cert, manager.created_at)?;
        return Ok(Ok(batch));
    }
    let Some(mut cluster) = view.cluster()? else {
        return Ok(Err(Rejection::NotInitialised));
    };
    match cmd {
        Command::RotateJoinToken { role, token } => {
            if token.key_id() != cluster.data_key_id {
                return Ok(Err(Rejection::StaleDataKey));
            }
            match role {
                Role::Worker => cluster.worker_token = token.clone(),
                Role::Manager => cluster.manager_token = token.clone(),
                Role::Admin => return Ok(Err(Rejection::Invalid("there is no admin join token".into()))),
            }
            batch.insert(CLUSTER_KEY, encode(&cluster));
        }
        Command::AddDataKey { key_id, check } => {
            if view.ca_rotation()?.is_some() {
                return Ok(Err(Rejection::CaRotationRunning));
            }
            if *key_id != cluster.data_key_id + 1 || check.key_id() != *key_id {
                return Ok(Err(Rejection::DataKeyOutOfOrder { key_id: *key_id, active: cluster.data_key_id }));
            }
            cluster.data_key_id = *key_id;
            cluster.data_key_check = Some(check.clone());
            batch.insert(CLUSTER_KEY, encode(&cluster));
        }
        Command::Reseal { cluster: fields, secrets } => {
            let active = cluster.data_key_id;
            if fields.iter().map(|f| &f.new).chain(secrets.iter().map(|s| &s.new)).any(|s| s.key_id() != active) {
                return Ok(Err(Rejection::StaleDataKey));
            }
            let mut changed = false;
            for f in fields {
                let slot = match f.field {
                    ClusterField::CaKey => &mut cluster.ca_key,
                    ClusterField::WorkerToken => &mut cluster.worker_token,
                    ClusterField::ManagerToken => &mut cluster.manager_token,
                    ClusterField::UnlockKey => match &mut cluster.unlock_key {
                        Some(k) => k,
                        None => continue,
                    },
                };
                if *slot == f.old {
                    *slot = f.new.clone();
                    changed = true;
                }
            }
            if changed {
                batch.insert(CLUSTER_KEY, encode(&cluster));
            }
            let mut records: BTreeMap<SecretId, SecretRecord> = BTreeMap::new();
            for s in secrets {
                if view.secret_data(&s.id, s.version)?.as_ref() != Some(&s.old) {
                    continue;
                }
                let rec = match records.get_mut(&s.id) {
                    Some(r) => r,
                    None => match view.secret(&s.id)? {
                        Some(r) => records.entry(s.id.clone()).or_insert(r),
                        None => continue,
                    },
                };
                if let Some(v) = rec.versions.iter_mut().find(|v| v.version == s.version) {
                    v.key_id = active;
                    batch.insert(secret_data_key(&s.id, s.version), encode(&s.new));
                }
            }
            for (id, rec) in records {
                batch.insert(secret_key(&id), encode(&rec));
            }
        }
        Command::SetAutolock { unlock_key } => {
            if unlock_key.as_ref().is_some_and(|k| k.key_id() != cluster.data_key_id) {
                return Ok(Err(Rejection::StaleDataKey));
            }
            cluster.unlock_key = unlock_key.clone();
            batch.insert(CLUSTER_KEY, encode(&cluster));
        }
        Command::RetireDataKeys { below } => {
            if *below > cluster.data_key_id {
                return Ok(Err(Rejection::RetiresActiveKey { active: cluster.data_key_id, below: *below }));
            }
            if let Some((what, _)) = cluster.sealed_fields().into_iter().find(|(_, s)| s.key_id() < *below) {
                return Ok(Err(Rejection::FieldUnderOldKey { field: what.to_owned() }));
            }
            let mut left = 0;
            for rec in view.secrets()? {
                left += rec.versions.iter().filter(|v| v.key_id < *below).count();
            }
            if left > 0 {
                return Ok(Err(Rejection::SecretsUnderOldKey { versions: left }));
            }
            cluster.retired_below = cluster.retired_below.max(*below);
            batch.insert(CLUSTER_KEY, encode(&cluster));
        }
        _ => unreachable!("not a cluster command"),
    }
    Ok(Ok(batch))
}
