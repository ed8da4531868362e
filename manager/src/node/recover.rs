//! A manager that starts with a certificate that expired while it was off, or
//! signed by a root its cluster rotated away from meanwhile.
//!
//! It asks a peer first, as a worker does (`swarmd_certs::recover`): the peer
//! has the current state (the current root, removals, the recovery window).
//! When no peer answers — every manager was off, or it is alone — it signs
//! itself a new certificate with the CA key it holds, if its own state says it
//! is within the recovery window, and records the certificate once raft takes
//! writes. Past the window it stops with one line that says to rejoin.

use std::time::Duration;

use swarmd_certs::join::JoinError;
use swarmd_certs::{generate_key_and_csr, now_unix, NodeId, NodeIdentity, Role};
use tokio_util::sync::CancellationToken;

use super::Manager;
use crate::cluster::ClusterSecrets;
use crate::state::Command;
use crate::store::Store;
use crate::ManagerError;

impl Manager {
    /// Replaces this manager's certificate if it expired or its root was
    /// rotated away; see the module's comment.
    pub(super) async fn recover_identity(&mut self) -> Result<(), ManagerError> {
        let current = self.creds.identity();
        let expired = swarmd_certs::recover::expired(&current, 5);
        let me = self.cfg.node_id.clone();
        let peers: Vec<String> = self
            .view
            .managers()?
            .into_iter()
            .filter(|m| m.raft_id.is_some() && m.id != me && !m.addr.is_empty())
            .map(|m| m.addr)
            .collect();
        let refused = |reason: String| {
            ManagerError::Join(format!(
                "this manager cannot come back with its certificate: {reason}; to rejoin, run `swarmd manager join` \
                 from an empty data dir with a manager token"
            ))
        };
        // Bounded: peers that are themselves starting may not answer.
        let asked = tokio::time::timeout(Duration::from_secs(15), swarmd_certs::recover::refresh(&current, &peers));
        let answer = asked
            .await
            .unwrap_or_else(|_| Err(JoinError::Unreachable { detail: "no peer answered within 15s".into() }));
        match answer {
            Ok(None) if !expired => return Ok(()),
            Ok(None) => {}
            Ok(Some(r)) => {
                self.adopt(r.identity)?;
                tracing::info!("certificate recovered from a peer");
                return Ok(());
            }
            Err(JoinError::Refused { reason, .. }) => return Err(refused(reason)),
            Err(_) if !expired => return Ok(()),
            Err(e) => tracing::warn!(error = %e, "no peer recovered this manager's certificate; signing it here"),
        }
        // No peer answered: sign it here, within the window this state knows.
        let record = self.view.cluster()?.ok_or(ManagerError::NotInitialised)?;
        let window = self.view.cert_recovery_window()? as i64;
        let late = now_unix() - current.info.not_after;
        if late > window {
            return Err(refused(format!(
                "its certificate expired {late}s ago, past the cluster's recovery window of {window}s"
            )));
        }
        let rotation = self.view.ca_rotation()?;
        let chain = self.view.leaf_chain()?;
        let external = self.view.external_ca()?;
        let secrets = ClusterSecrets::open(&record, rotation.as_ref(), &chain, external.as_ref(), &self.keyring)
            .map_err(|e| ManagerError::Invalid(format!("cannot open the cluster's CA: {e}")))?;
        let (key, csr) = generate_key_and_csr()?;
        let issued = secrets
            .sign_node(&csr, &me, Role::Manager)
            .await
            .map_err(|e| ManagerError::Invalid(format!("cannot sign this manager's certificate: {e}")))?;
        let identity = NodeIdentity::new(secrets.trust_pem.clone(), issued.pem, key)?;
        self.adopt(identity)?;
        self.unrecorded = Some((issued.serial, issued.not_after));
        tracing::info!("certificate expired while this manager was off: signed a new one with the cluster CA");
        Ok(())
    }

    /// Stores `identity` (its key sealed if autolock is on) and serves with it.
    fn adopt(&self, identity: NodeIdentity) -> Result<(), ManagerError> {
        identity.save_with(&NodeIdentity::dir(&self.data_dir), Some(&*self.wrap))?;
        self.creds.publish(identity)?;
        Ok(())
    }
}

/// Records the certificate a manager signed itself at start, once raft takes
/// the write (so that a later demotion refuses it too).
pub(super) async fn record_own_cert(
    store: Store,
    me: NodeId,
    serial: String,
    not_after: i64,
    shutdown: CancellationToken,
) {
    loop {
        let cmd = Command::RecordCert {
            node: me.clone(),
            serial: serial.clone(),
            not_after,
            role: Role::Manager,
            at: now_unix(),
        };
        match store.propose(cmd).await {
            Ok(_) => return,
            Err(e) => tracing::debug!(error = %e, "recording this manager's certificate; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
