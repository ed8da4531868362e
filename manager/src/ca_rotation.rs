//! Root CA rotation without downtime, as `docker swarm ca --rotate` does it.
//!
//! 1. [`start`] records the new root, its key (sealed) and the new root
//!    cross-signed by the current one. From then on every manager signs with
//!    the new key and appends the cross-signed certificate to each leaf, so a
//!    node that still trusts only the old root verifies the new leaves; and
//!    every renewal or session hands nodes both roots to trust.
//! 2. The leader ([`run_leader`]) asks the live nodes that still hold a
//!    certificate of the old root to renew, a batch at a time (the sessions
//!    carry the request to workers; managers watch their own state,
//!    [`run_local`]). A renewal signed by the new root marks its node converged.
//! 3. When no live node is left unconverged, the leader swaps the roots: the new
//!    one becomes the only trust anchor, with new join tokens (they pin the
//!    root's digest). Nodes learn the new bundle from their session. Nodes that
//!    were down converge when they return (see the recovery path).
//!
//! Starting a rotation while one runs starts it over toward the newest root.

use std::collections::BTreeSet;
use std::time::Duration;

use swarmd_certs::{now_unix, JoinToken, NodeId, RootCa};
use swarmd_proto::control::{CaInfo, CaRotation as WireRotation};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use zeroize::Zeroizing;

use crate::cluster::SecretsCache;
use crate::keys::purpose;
use crate::state::{CaRotation, Command, NodeStatus, StateError, StateView};
use crate::store::Store;

/// Most nodes asked to renew at once.
pub const BATCH: usize = 100;
/// A batch whose nodes have not all renewed by then is asked again (with the
/// next nodes).
pub const BATCH_PATIENCE: Duration = Duration::from_secs(20);

/// Starts a rotation toward `given` (a root certificate and its key) or a
/// generated root, starting over any rotation that runs.
pub async fn start(
    store: &Store,
    secrets: &SecretsCache,
    given: Option<(String, Zeroizing<String>)>,
) -> Result<CaRotation, Status> {
    let s = secrets.get()?;
    if let Some(x) = &s.external {
        return Err(Status::failed_precondition(format!(
            "this cluster's CA key is held by the external CA {}: rotate the root there, not with `ca rotate`",
            x.url()
        )));
    }
    let cid = s.anchor.cluster_id().clone();
    let target = match &given {
        None => s.anchor.generate_successor().map_err(crate::status::internal)?,
        Some((cert, key)) => RootCa::from_pem_for(&cid, cert, key)
            .map_err(|e| Status::invalid_argument(format!("the new root CA: {e}")))?,
    };
    if target.digest() == s.anchor.digest() {
        return Err(Status::invalid_argument("the new root CA is the current one"));
    }
    let cross_signed_pem = s.anchor.cross_sign(&target).map_err(crate::status::internal)?;
    let target_key = target.key_pem().ok_or_else(|| Status::internal("the new root has no key"))?;
    let target_key = secrets.seal(&purpose::ca_key(cid.as_str()), target_key.as_bytes())?;
    let now = now_unix();
    let previous = store.view().ca_rotation().map_err(crate::status::internal)?;
    // IDs grow: by the clock, and past the rotation it replaces.
    let id = (now as u64).max(previous.as_ref().map_or(0, |p| p.id + 1));
    let rotation = CaRotation {
        id,
        target_cert_pem: target.cert_pem().to_owned(),
        target_key,
        cross_signed_pem,
        started_at: now,
        batch: Vec::new(),
        batch_at: 0,
    };
    store.propose(Command::StartCaRotation(Box::new(rotation.clone()))).await?;
    let _ = secrets.reload();
    let (sha, _) = swarmd_certs::CertInfo::describe_ca(target.cert_pem()).map_err(crate::status::internal)?;
    if previous.is_some() {
        tracing::info!(rotation = id, target.sha256 = %sha, "root CA rotation started over toward a new root");
    } else {
        tracing::info!(rotation = id, target.sha256 = %sha, "root CA rotation started");
    }
    Ok(rotation)
}

/// What `secretctl ca show` prints: the trust anchor, and the rotation's progress.
pub fn describe(view: &StateView) -> Result<CaInfo, StateError> {
    let cluster = view
        .cluster()?
        .ok_or(StateError::Corrupt { key: "cluster".into(), reason: "the cluster is not initialised".into() })?;
    let (sha256, not_after) = swarmd_certs::CertInfo::describe_ca(&cluster.ca_cert_pem)
        .map_err(|e| StateError::Corrupt { key: "cluster".into(), reason: e.to_string() })?;
    let rotation = match view.ca_rotation()? {
        None => None,
        Some(r) => {
            let (target_sha256, _) = swarmd_certs::CertInfo::describe_ca(&r.target_cert_pem)
                .map_err(|e| StateError::Corrupt { key: "carotation".into(), reason: e.to_string() })?;
            let (mut converged, mut unconverged) = (Vec::new(), Vec::new());
            for n in view.nodes()? {
                if view.ca_converged(&n.id, r.id)? {
                    converged.push(n.id.to_string());
                } else {
                    unconverged.push(n.id.to_string());
                }
            }
            Some(WireRotation { target_sha256, converged, unconverged })
        }
    };
    Ok(CaInfo {
        root_pem: cluster.ca_cert_pem,
        sha256,
        not_after,
        external_signer: view.external_ca()?.is_some(),
        rotation,
    })
}

/// The leader's next step in a rotation.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Ask these nodes to renew now.
    Batch(Vec<NodeId>),
    /// Every live node has converged: swap the roots.
    Finish,
}

/// What the leader does next for rotation `r` at `now` (unix seconds), if
/// anything. Live nodes are those READY; the others converge when they return.
pub(crate) fn next_step(view: &StateView, r: &CaRotation, now: i64) -> Result<Option<Step>, StateError> {
    let mut waiting = Vec::new();
    for n in view.nodes()? {
        if n.status == NodeStatus::Ready && !view.ca_converged(&n.id, r.id)? {
            waiting.push(n.id);
        }
    }
    if waiting.is_empty() {
        return Ok(Some(Step::Finish));
    }
    let waiting_set: BTreeSet<&NodeId> = waiting.iter().collect();
    let outstanding: Vec<NodeId> = r.batch.iter().filter(|n| waiting_set.contains(n)).cloned().collect();
    let stale = now - r.batch_at >= BATCH_PATIENCE.as_secs() as i64;
    if !r.batch.is_empty() && outstanding.len() > BATCH / 2 && !stale {
        return Ok(None);
    }
    // Keep the outstanding ones, fill up with the next that wait.
    let mut next = outstanding;
    for n in waiting {
        if next.len() >= BATCH {
            break;
        }
        if !next.contains(&n) {
            next.push(n);
        }
    }
    if next == r.batch && !stale {
        return Ok(None);
    }
    Ok(Some(Step::Batch(next)))
}

/// Runs until cancelled; drives the rotation while this manager leads.
pub(crate) async fn run_leader(
    store: Store,
    secrets: SecretsCache,
    mut applied: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = applied.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = shutdown.cancelled() => return,
        }
        applied.borrow_and_update();
        let m = store.raft().metrics().borrow().clone();
        if m.current_leader != Some(m.id) {
            continue;
        }
        let view = store.view();
        let r = match view.ca_rotation() {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the root CA rotation");
                continue;
            }
        };
        let now = now_unix();
        let cmd = match next_step(view, &r, now) {
            Ok(None) => continue,
            Ok(Some(Step::Batch(nodes))) => {
                tracing::info!(rotation = r.id, nodes = nodes.len(), "asking nodes to renew for the root CA rotation");
                Command::CaRotationBatch { id: r.id, nodes, at: now }
            }
            Ok(Some(Step::Finish)) => match finish_command(&secrets, &r, now) {
                Ok(cmd) => cmd,
                Err(e) => {
                    tracing::error!(error = %e, "cannot prepare the end of the root CA rotation");
                    continue;
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot read the nodes for the root CA rotation");
                continue;
            }
        };
        let finishing = matches!(cmd, Command::FinishCaRotation { .. });
        match store.propose(cmd).await {
            Ok(_) if finishing => {
                let _ = secrets.reload();
                tracing::info!(rotation = r.id, "root CA rotation finished: the new root is the only trust root");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "root CA rotation step not committed; retrying"),
        }
    }
}

/// The swap: new join tokens pinning the new root, sealed.
fn finish_command(secrets: &SecretsCache, r: &CaRotation, now: i64) -> Result<Command, Status> {
    let s = secrets.get()?;
    let cid = s.anchor.cluster_id().to_string();
    let digest = swarmd_certs::ca_digest(&r.target_cert_pem);
    let seal = |role| -> Result<_, Status> {
        let token = JoinToken::generate(digest);
        Ok(secrets.seal(&purpose::join_token(&cid, role), token.expose().as_bytes())?)
    };
    Ok(Command::FinishCaRotation {
        id: r.id,
        worker_token: seal(swarmd_certs::Role::Worker)?,
        manager_token: seal(swarmd_certs::Role::Manager)?,
        at: now,
    })
}

/// What a node is told by the rotation: the roots to trust, and whether to
/// renew now. `None` before the cluster exists.
pub(crate) fn node_view(view: &StateView, node: &NodeId) -> Result<Option<(String, Option<i64>)>, StateError> {
    let Some(bundle) = view.trust_bundle()? else { return Ok(None) };
    let renew = match view.ca_rotation()? {
        Some(r) if r.batch.contains(node) && !view.ca_converged(node, r.id)? => Some(r.batch_at),
        _ => None,
    };
    Ok(Some((bundle, renew)))
}

/// A manager's own part: follows the trust bundle, and renews when its batch
/// comes. Runs until cancelled.
pub(crate) async fn run_local(
    store: Store,
    me: NodeId,
    control: swarmd_certs::renew::RenewControl,
    mut applied: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    let mut last = None;
    loop {
        match node_view(store.view(), &me) {
            Ok(Some(now)) if last.as_ref() != Some(&now) => {
                control.trust(now.0.clone());
                if now.1.is_some() {
                    control.renew_now();
                }
                last = Some(now);
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot read the trust bundle"),
        }
        tokio::select! {
            r = applied.changed() => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}
