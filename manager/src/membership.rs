//! Membership changes a manager makes to itself: demotion to worker (it
//! stops, rewrites its data dir and re-executes as a worker), recovery from
//! quorum loss (`recover --force-new-cluster`), and the replicated deny-list
//! it enforces at the TLS handshake.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use swarmd_certs::tls::DenyList;
use swarmd_certs::{generate_key_and_csr, NodeId, NodeIdentity, Role};
use tokio_util::sync::CancellationToken;

use crate::cluster::SecretsCache;
use crate::config::{ManagerConfig, CONFIG_FILE};
use crate::node::io_err;
use crate::raft;
use crate::state::{Command, NodeRecord, StateView};
use crate::store::{Peers, Store};
use crate::{Manager, ManagerError};

impl Manager {
    /// `swarmd manager recover --force-new-cluster`: turns this stopped manager
    /// into a single-manager cluster with all the state it has (quorum loss).
    /// The other managers are removed and their certificates refused; they can
    /// join again from an empty data dir with the manager token.
    pub async fn recover(data_dir: &Path) -> Result<Self, ManagerError> {
        let cfg = ManagerConfig::load(data_dir)?;
        let raft_dir = data_dir.join("raft");
        {
            let mut storage = raft::open_storage(&raft_dir)
                .map_err(|e| ManagerError::Invalid(format!("{e} (is this manager still running? stop it first)")))?;
            let term = storage
                .log
                .force_single_voter(cfg.raft_id, cfg.advertise_addr.clone())
                .await
                .map_err(|e| ManagerError::Raft(e.to_string()))?;
            storage.db.flush_async().await.map_err(|e| ManagerError::Raft(e.to_string()))?;
            tracing::warn!(term, "forced a new single-manager cluster; the other managers are being removed");
        }
        // sled releases its file lock from a background thread once the last
        // handle is gone; wait for it rather than fail.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match Self::open(data_dir).await {
                Ok(mut m) => {
                    m.forget_other_managers = true;
                    return Ok(m);
                }
                Err(ManagerError::RaftStart(e)) if std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "waiting for the raft store to be released");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// How a manager's run ended.
#[derive(Debug)]
pub enum RunOutcome {
    /// Shut down on request.
    Stopped,
    /// Demoted: apply the [`Demotion`] to the data dir, then run as a worker.
    Demoted(Box<Demotion>),
}

/// What a demoted manager becomes: a worker identity signed while it still
/// held the CA, and a worker config pointing at the remaining managers.
pub struct Demotion {
    identity: NodeIdentity,
    worker: swarmd_worker::WorkerConfig,
}

impl std::fmt::Debug for Demotion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demotion").field("node", &self.worker.node_id).finish()
    }
}

impl Demotion {
    /// Rewrites `data_dir` as a worker's: certificate and `worker.json` first,
    /// then the manager's config, keys and raft store are deleted.
    pub fn apply(&self, data_dir: &Path) -> Result<(), ManagerError> {
        self.identity.save(&NodeIdentity::dir(data_dir))?;
        self.worker.save(data_dir).map_err(|e| ManagerError::Invalid(e.to_string()))?;
        std::fs::remove_file(data_dir.join(CONFIG_FILE)).map_err(io_err(&data_dir.join(CONFIG_FILE)))?;
        for d in ["keys", "raft"] {
            let p = data_dir.join(d);
            std::fs::remove_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(())
    }
}

/// Stops the manager once it has been demoted and the leader no longer counts
/// it as a voter, with a worker identity prepared while it still has the CA.
pub(crate) async fn watch_demotion(
    store: Store,
    secrets: SecretsCache,
    peers: Peers,
    cfg: ManagerConfig,
    mut applied: tokio::sync::watch::Receiver<u64>,
    stop: CancellationToken,
    out: Arc<std::sync::Mutex<Option<Demotion>>>,
) {
    use swarmd_proto::control::control_client::ControlClient;
    let me = cfg.node_id.clone();
    let my_raft_id = format!("{:016x}", cfg.raft_id);
    loop {
        tokio::select! {
            r = applied.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => return,
        }
        let demoted = matches!(store.view().node(&me), Ok(Some(n)) if n.role == Role::Worker);
        if !demoted {
            continue;
        }
        // Still needed for the membership change until the leader has dropped us.
        let Some(leader) = store.leader_addr() else { continue };
        let info = ControlClient::new(peers.channel(&leader)).info(swarmd_proto::control::InfoRequest {}).await;
        match info {
            Ok(i) if !i.get_ref().voters.contains(&my_raft_id) && i.get_ref().leader_raft_id != my_raft_id => {}
            _ => continue,
        }
        match prepare_demotion(&store, &secrets, &cfg) {
            Ok(d) => {
                tracing::warn!("this manager was demoted: continuing as a worker");
                *out.lock().expect("demotion lock") = Some(d);
                stop.cancel();
                return;
            }
            Err(e) => tracing::error!(error = %e, "cannot prepare the demotion; retrying"),
        }
    }
}

fn prepare_demotion(store: &Store, secrets: &SecretsCache, cfg: &ManagerConfig) -> Result<Demotion, String> {
    let s = secrets.get().map_err(|e| e.to_string())?;
    let (key, csr) = generate_key_and_csr().map_err(|e| e.to_string())?;
    let issued = s.ca.sign_node(&csr, &cfg.node_id, Role::Worker, s.validity).map_err(|e| e.to_string())?;
    let identity = NodeIdentity::new(s.ca.bundle_pem().to_owned(), issued.pem, key).map_err(|e| e.to_string())?;
    let me = store.view().node(&cfg.node_id).map_err(|e| e.to_string())?.map(|n| n.addr);
    let remotes: Vec<String> = store
        .view()
        .manager_addrs()
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|a| Some(a) != me.as_ref())
        .collect();
    if remotes.is_empty() {
        return Err("no other manager is known".into());
    }
    let worker = swarmd_worker::WorkerConfig {
        node_id: cfg.node_id.clone(),
        cluster_id: cfg.cluster_id.clone(),
        remotes,
        listen_addr: Some(cfg.listen_addr.clone()),
        runtime: None,
    };
    Ok(Demotion { identity, worker })
}

/// Keeps the TLS deny-list equal to the replicated one.
pub(crate) async fn follow_deny_list(
    view: StateView,
    deny: DenyList,
    mut applied: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    loop {
        match view.denied() {
            Ok(set) => deny.replace(set),
            Err(e) => tracing::error!(error = %e, "cannot read the deny-list"),
        }
        tokio::select! {
            r = applied.changed() => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// After a forced new cluster: removes every other manager once this one leads.
pub(crate) async fn forget_other_managers(store: Store, me: NodeId, shutdown: CancellationToken) {
    loop {
        let others: Vec<NodeRecord> = store
            .view()
            .nodes()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.role == Role::Manager && n.id != me)
            .collect();
        if others.is_empty() {
            return;
        }
        let deny_until = others.iter().map(|n| n.cert_not_after).max().unwrap_or(0);
        let ids = others.iter().map(|n| n.id.clone()).collect();
        match store.propose(Command::RemoveNodes { nodes: ids, deny_until }).await {
            Ok(()) => {
                tracing::warn!(removed = others.len(), "removed the managers lost with the old cluster");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "waiting to remove the old managers"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
