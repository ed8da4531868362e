//! A root CA rotation while it runs, and what it leaves behind.
//!
//! | key                  | value |
//! |----------------------|-------|
//! | `carotation`         | [`CaRotation`]: the root being rotated to |
//! | `caconv/<node>`      | the ID of the rotation whose root signed the node's current certificate |
//! | `caprevious`         | [`PreviousRoot`]: the root the last rotation replaced |
//! | `certrecovery`       | the recovery window, seconds (absent: [`DEFAULT_RECOVERY_WINDOW`]) |
//! | `cachain`            | what an organisation's CA appends to leaves: itself and its chain, PEM |
//! | `externalca`         | [`ExternalCaRecord`]: the signer that holds the CA key, if the cluster does not |
//!
//! The cluster record's root stays the trust anchor (what join tokens pin and
//! `GetRootCa` serves) until `FinishCaRotation` swaps in the new one, its key
//! and new join tokens in one write.

use serde::{Deserialize, Serialize};
use swarmd_certs::NodeId;

use super::cluster::CLUSTER_KEY;
use super::{encode, Command, Rejection, StateError, StateView, WriteBatch};
use crate::keys::Sealed;

/// A root CA rotation in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRotation {
    /// Names this rotation (a rotation started over gets a new one).
    pub id: u64,
    /// The new root, PEM.
    pub target_cert_pem: String,
    /// Its key, sealed under the active data key (purpose `ca_key`).
    pub target_key: Sealed,
    /// The new root cross-signed by the current one, PEM: appended to every
    /// leaf the new key signs until the rotation ends.
    pub cross_signed_pem: String,
    /// When it started, unix seconds.
    pub started_at: i64,
    /// The nodes the leader has asked to renew now (at most a batch).
    pub batch: Vec<NodeId>,
    /// When that batch was asked, unix seconds.
    pub batch_at: i64,
}

/// The root a finished rotation replaced: certificates it signed are not
/// trusted any more, but recovery may still recognise them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousRoot {
    /// The replaced root, PEM.
    pub cert_pem: String,
    /// The root that replaced it, cross-signed by it, PEM.
    pub cross_signed_pem: String,
    /// When it was replaced, unix seconds.
    pub replaced_at: i64,
}

/// An external signer that holds the cluster CA's key: managers forward node
/// CSRs to it instead of signing them (the cluster record's CA key is then
/// sealed empty).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalCaRecord {
    /// Its protocol: `cfssl`.
    pub protocol: String,
    /// Its signing endpoint, `https://…`.
    pub url: String,
    /// The roots its TLS server certificate must chain to, PEM (empty: the
    /// cluster's root).
    pub tls_roots_pem: String,
}

/// The protocols an external CA may speak.
pub const EXTERNAL_CA_PROTOCOLS: &[&str] = &["cfssl"];

/// How long after its certificate expired a node may still recover: 7 days.
pub const DEFAULT_RECOVERY_WINDOW: u64 = 7 * 86400;
/// The longest recovery window accepted: a year.
pub const MAX_RECOVERY_WINDOW: u64 = 365 * 86400;

const ROTATION_KEY: &[u8] = b"carotation";
const RECOVERY_KEY: &[u8] = b"certrecovery";
const CHAIN_KEY: &[u8] = b"cachain";
const EXTERNAL_KEY: &[u8] = b"externalca";
const CONVERGED_PREFIX: &str = "caconv/";
const PREVIOUS_KEY: &[u8] = b"caprevious";

fn converged_key(node: &NodeId) -> Vec<u8> {
    format!("{CONVERGED_PREFIX}{node}").into_bytes()
}

impl StateView {
    /// The rotation in progress, if any.
    pub fn ca_rotation(&self) -> Result<Option<CaRotation>, StateError> {
        self.get(ROTATION_KEY)
    }

    /// The root the last finished rotation replaced.
    pub fn previous_root(&self) -> Result<Option<PreviousRoot>, StateError> {
        self.get(PREVIOUS_KEY)
    }

    /// The external signer holding the CA key, if the cluster does not hold it.
    pub fn external_ca(&self) -> Result<Option<ExternalCaRecord>, StateError> {
        self.get(EXTERNAL_KEY)
    }

    /// What the cluster CA appends to the leaves it signs (empty for a
    /// generated root; an organisation's CA and its chain otherwise).
    pub fn ca_chain(&self) -> Result<String, StateError> {
        Ok(self.get::<String>(CHAIN_KEY)?.unwrap_or_default())
    }

    /// What every leaf carries after itself: an organisation's chain, and —
    /// after a rotation — the new root cross-signed by the one it replaced, so
    /// a node that was off and trusts only that root still authenticates the
    /// managers before it recovers.
    pub fn leaf_chain(&self) -> Result<String, StateError> {
        let mut chain = self.ca_chain()?;
        if let Some(p) = self.previous_root()? {
            chain.push_str(&p.cross_signed_pem);
        }
        Ok(chain)
    }

    /// How long after expiry a node's certificate may still be recovered, seconds.
    pub fn cert_recovery_window(&self) -> Result<u64, StateError> {
        Ok(self.get::<u64>(RECOVERY_KEY)?.unwrap_or(DEFAULT_RECOVERY_WINDOW))
    }

    /// Whether `node`'s current certificate was signed by rotation `id`'s root.
    pub fn ca_converged(&self, node: &NodeId, id: u64) -> Result<bool, StateError> {
        Ok(self.get::<u64>(&converged_key(node))? == Some(id))
    }

    /// The roots nodes trust now: the cluster's, and while a rotation runs the
    /// one it rotates to. `None` before the cluster exists.
    pub fn trust_bundle(&self) -> Result<Option<String>, StateError> {
        let Some(cluster) = self.cluster()? else { return Ok(None) };
        let mut bundle = cluster.ca_cert_pem;
        if let Some(r) = self.ca_rotation()? {
            bundle.push_str(&r.target_cert_pem);
        }
        Ok(Some(bundle))
    }
}

/// The CA lifecycle commands of [`super::plan`]: `StartCaRotation`,
/// `CaRotationBatch`, `CaConverged`, `FinishCaRotation`, `SetCertRecoveryWindow`, `SetCaChain`, `SetExternalCa`, `UpdateExternalCa`.
pub(super) fn plan_ca_rotation(view: &StateView, cmd: &Command) -> Result<Result<WriteBatch, Rejection>, StateError> {
    let mut batch = WriteBatch::default();
    let Some(mut cluster) = view.cluster()? else {
        return Ok(Err(Rejection::NotInitialised));
    };
    let current = view.ca_rotation()?;
    let is_current = |id: u64| current.as_ref().is_some_and(|r| r.id == id);
    match cmd {
        Command::StartCaRotation(r) => {
            if view.external_ca()?.is_some() {
                return Ok(Err(Rejection::Invalid(
                    "this cluster's CA key is held by an external CA: rotate the root there and rejoin the nodes"
                        .into(),
                )));
            }
            if r.target_key.key_id() != cluster.data_key_id {
                return Ok(Err(Rejection::StaleDataKey));
            }
            if current.as_ref().is_some_and(|c| c.id >= r.id) {
                return Ok(Err(Rejection::CaRotationSuperseded));
            }
            // Starting over: convergence toward an abandoned root means nothing.
            clear_converged(view, &mut batch)?;
            batch.insert(ROTATION_KEY, encode(r.as_ref()));
        }
        Command::CaRotationBatch { id, nodes, at } => {
            let Some(mut r) = current.filter(|r| r.id == *id) else {
                return Ok(Err(Rejection::CaRotationSuperseded));
            };
            r.batch = nodes.clone();
            r.batch_at = *at;
            batch.insert(ROTATION_KEY, encode(&r));
        }
        Command::CaConverged { node, id } => {
            // A certificate signed for a rotation that was started over or has
            // ended counts for nothing; not an error for the signer.
            if is_current(*id) && view.node(node)?.is_some() {
                batch.insert(converged_key(node), encode(id));
            }
        }
        Command::FinishCaRotation { id, worker_token, manager_token, at } => {
            let Some(r) = current.filter(|r| r.id == *id) else {
                return Ok(Err(Rejection::CaRotationSuperseded));
            };
            if [&r.target_key, worker_token, manager_token].iter().any(|s| s.key_id() != cluster.data_key_id) {
                return Ok(Err(Rejection::StaleDataKey));
            }
            let previous = PreviousRoot {
                cert_pem: std::mem::replace(&mut cluster.ca_cert_pem, r.target_cert_pem.clone()),
                cross_signed_pem: r.cross_signed_pem.clone(),
                replaced_at: *at,
            };
            cluster.ca_key = r.target_key.clone();
            cluster.worker_token = worker_token.clone();
            cluster.manager_token = manager_token.clone();
            batch.insert(CLUSTER_KEY, encode(&cluster));
            batch.insert(PREVIOUS_KEY, encode(&previous));
            batch.remove(ROTATION_KEY);
            // The new root is the cluster's own: no organisation chain.
            batch.remove(CHAIN_KEY);
            clear_converged(view, &mut batch)?;
        }
        Command::SetCertRecoveryWindow { secs } => {
            if *secs > MAX_RECOVERY_WINDOW {
                return Ok(Err(Rejection::Invalid(format!(
                    "a certificate recovery window of {secs}s is longer than the maximum of {} days",
                    MAX_RECOVERY_WINDOW / 86400
                ))));
            }
            batch.insert(RECOVERY_KEY, encode(secs));
        }
        Command::SetCaChain { chain_pem } => {
            if chain_pem.len() > 64 << 10 {
                return Ok(Err(Rejection::Invalid("a CA chain larger than 64 KiB".into())));
            }
            batch.insert(CHAIN_KEY, encode(chain_pem));
        }
        Command::SetExternalCa(r) => {
            if let Err(e) = check_external_ca(r) {
                return Ok(Err(Rejection::Invalid(e)));
            }
            if current.is_some() {
                return Ok(Err(Rejection::Invalid("a CA rotation is running".into())));
            }
            batch.insert(EXTERNAL_KEY, encode(r.as_ref()));
        }
        Command::UpdateExternalCa { record, auth_key } => {
            if view.external_ca()?.is_none() {
                return Ok(Err(Rejection::Invalid(
                    "this cluster holds its CA key: an external CA is chosen at init".into(),
                )));
            }
            if let Err(e) = check_external_ca(record) {
                return Ok(Err(Rejection::Invalid(e)));
            }
            if auth_key.key_id() != cluster.data_key_id {
                return Ok(Err(Rejection::StaleDataKey));
            }
            cluster.ca_key = auth_key.clone();
            batch.insert(CLUSTER_KEY, encode(&cluster));
            batch.insert(EXTERNAL_KEY, encode(record.as_ref()));
        }
        _ => unreachable!("not a CA rotation command"),
    }
    Ok(Ok(batch))
}

/// Refuses an external CA of an unknown protocol, with a URL that is not
/// `https://` or longer than 2 KiB, or roots larger than 64 KiB.
fn check_external_ca(r: &ExternalCaRecord) -> Result<(), String> {
    if !EXTERNAL_CA_PROTOCOLS.contains(&r.protocol.as_str()) {
        return Err(format!("external CA protocol {:?}: only cfssl is supported", r.protocol));
    }
    if !r.url.starts_with("https://") || r.url.len() > 2048 {
        return Err("an external CA's URL must be https:// and at most 2 KiB".into());
    }
    if r.tls_roots_pem.len() > 64 << 10 {
        return Err("an external CA's TLS roots larger than 64 KiB".into());
    }
    Ok(())
}

fn clear_converged(view: &StateView, batch: &mut WriteBatch) -> Result<(), StateError> {
    for node in view.scan_key_suffixes(CONVERGED_PREFIX)? {
        batch.remove(format!("{CONVERGED_PREFIX}{node}").into_bytes());
    }
    Ok(())
}
