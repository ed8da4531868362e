//! Membership changes a manager makes to itself: demotion to worker (it
//! stops, rewrites its data dir and re-executes as a worker), recovery from
//! quorum loss (`recover --force-new-cluster`), and the replicated deny-list
//! it enforces at the TLS handshake.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use swarmd_certs::dial::Standing;
use swarmd_certs::tls::DenyList;
use swarmd_certs::{generate_key_and_csr, NodeId, NodeIdentity, Role};
use tokio_util::sync::CancellationToken;

use crate::cluster::SecretsCache;
use crate::config::{ManagerConfig, CONFIG_FILE};
use crate::node::io_err;
use crate::raft;
use crate::state::{Command, NodeRecord, StateView};
use crate::store::Store;
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
    /// Removed from the cluster while it was down (its peers refuse its node
    /// ID, not only its manager certificates): a `manager recover
    /// --force-new-cluster` elsewhere dropped it. It cannot come back as it is.
    Removed,
}

/// What a demoted manager becomes, as plain data for the root package's
/// `node` module to write as a worker's data dir (then it erases the
/// manager's state with [`erase_manager_state`]): a worker identity signed
/// while this manager still held the CA, and where the worker finds the
/// remaining managers.
pub struct Demotion {
    /// The worker certificate and its new key.
    pub identity: NodeIdentity,
    /// The managers' addresses (this one excluded).
    pub remotes: Vec<String>,
    /// The node IDs of the remaining raft voters.
    pub managers: Vec<swarmd_certs::NodeId>,
    /// Where it listened as a manager (where it listens if promoted again).
    pub listen_addr: String,
}

impl std::fmt::Debug for Demotion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demotion").field("node", &self.identity.info.node_id).finish()
    }
}

/// What only a manager keeps, gone: `manager.json` first (the data dir stops
/// being a manager's), then every file of `keys/` overwritten in place and
/// deleted, then `raft/` deleted. Each step passes if there is nothing to do.
pub fn erase_manager_state(data_dir: &Path) -> Result<(), ManagerError> {
    remove(&data_dir.join(CONFIG_FILE), |p| std::fs::remove_file(p))?;
    crate::keys::KeyDir::new(data_dir).erase()?;
    remove(&data_dir.join("raft"), |p| std::fs::remove_dir_all(p))
}

/// `how(path)`, where a missing path is no error.
fn remove(path: &Path, how: fn(&Path) -> std::io::Result<()>) -> Result<(), ManagerError> {
    match how(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// What a manager removed while it was down leaves behind: nothing that opens
/// the cluster. Its key files (KEK, sealed data keys) and node key are
/// overwritten in place and deleted, its certificates, raft store and
/// `manager.json` deleted (invariant 7: a removed node wipes its secrets; the
/// data keys and the CA key they seal are the cluster's). Call it once the
/// manager has stopped.
pub fn erase_removed(data_dir: &Path) -> Result<(), ManagerError> {
    erase_manager_state(data_dir)?;
    let certs = NodeIdentity::dir(data_dir);
    swarmd_certs::erase_file(&certs.join("node.key"))?;
    remove(&certs, |p| std::fs::remove_dir_all(p))
}

/// Whether the leader can finish removing raft member `me` without it: `me`
/// is no voter of the effective membership, or that membership is the joint
/// one that drops it and `me` has seen it committed (a joint configuration
/// needs a majority of the old voters too, which may include `me`).
fn released_by_raft(m: &openraft::RaftMetrics<u64, openraft::BasicNode>, me: u64) -> bool {
    let stored = &m.membership_config;
    let membership = stored.membership();
    if !membership.voter_ids().any(|v| v == me) {
        return true;
    }
    let joint = membership.get_joint_config();
    let committed = match (stored.log_id(), m.last_applied) {
        (Some(at), Some(applied)) => applied.index >= at.index,
        _ => false,
    };
    joint.len() == 2 && !joint[1].contains(&me) && committed
}

/// On the leader: waits (at most `timeout`) until raft member `target` has
/// the current membership configuration in its log.
pub(crate) async fn wait_replicated(raft: &crate::raft::Raft, target: u64, timeout: Duration) {
    let reached = raft
        .wait(Some(timeout))
        .metrics(
            |m| {
                let at = m.membership_config.log_id().map(|l| l.index);
                let matched = m.replication.as_ref().and_then(|r| r.get(&target).cloned().flatten()).map(|l| l.index);
                matches!((at, matched), (Some(at), Some(matched)) if matched >= at)
            },
            "the demoted manager to see its demotion",
        )
        .await;
    if reached.is_err() {
        tracing::warn!(
            raft_id = target,
            "the demoted manager did not confirm its demotion in time; removing it anyway"
        );
    }
}

/// Stops the manager once it has been demoted and raft no longer needs it,
/// with a worker identity prepared while it still has the CA.
///
/// The demotion refused this manager's manager certificates cluster-wide at
/// once, so a live manager learns it from its own raft state, which the leader
/// keeps replicating to it until the membership change is through. One that
/// was down meanwhile is refused by every peer and never hears of it: after
/// [`LEADERLESS_PROBE`] without a leader it asks its peers directly, and a
/// `certificate_revoked` answer from one of them (which it has authenticated as
/// a manager of its cluster) is its demotion.
pub(crate) async fn watch_demotion(
    store: Store,
    secrets: SecretsCache,
    cfg: ManagerConfig,
    (mut applied, probe): (tokio::sync::watch::Receiver<u64>, Probe),
    stop: CancellationToken,
    out: Arc<std::sync::Mutex<Option<RunOutcome>>>,
) {
    let me = cfg.node_id.clone();
    let mut leaderless = Leaderless::default();
    let mut notice = LeaderlessNotice::default();
    loop {
        tokio::select! {
            r = applied.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => return,
        }
        let demoted = matches!(store.view().node(&me), Ok(Some(n)) if n.role == Role::Worker);
        let released = demoted && released_by_raft(&store.raft().metrics().borrow(), cfg.raft_id);
        // A manager demoted while it was down never learns it from raft: its
        // peers refuse its certificate. Without a leader for a while, it asks
        // them directly.
        let (has_leader, voters) = {
            let m = store.raft().metrics();
            let m = m.borrow();
            (m.current_leader.is_some(), m.membership_config.membership().voter_ids().count())
        };
        notice.observe(has_leader, voters);
        let identity = probe.identity.borrow().clone();
        let refused =
            leaderless.due(has_leader) && standing(&store, &cfg, &probe, &identity).await == Standing::Revoked;
        if !released && !refused {
            continue;
        }
        let d = match prepare_demotion(&store, &secrets, &cfg).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cannot prepare the demotion; retrying");
                continue;
            }
        };
        if !released {
            // A demotion refuses the node's manager certificates; a removal
            // refuses the node itself. Ask again as the worker it would become.
            match standing(&store, &cfg, &probe, &d.identity).await {
                Standing::Accepted => {}
                Standing::Revoked => {
                    tracing::error!(
                        "this manager was removed from the cluster while it was down (its peers refuse this node, \
                         not only its manager certificate: a `manager recover --force-new-cluster` elsewhere \
                         dropped it): erasing its keys and state; join again from an empty data dir"
                    );
                    *out.lock().expect("demotion lock") = Some(RunOutcome::Removed);
                    stop.cancel();
                    return;
                }
                Standing::Unknown => continue,
            }
        }
        tracing::warn!("this manager was demoted: continuing as a worker");
        *out.lock().expect("demotion lock") = Some(RunOutcome::Demoted(Box::new(d)));
        stop.cancel();
        return;
    }
}

/// Says once that a manager has no raft leader (after [`LEADERLESS_NOTICE`];
/// it keeps waiting: a quorum may come back), and once that it found one again.
#[derive(Default)]
struct LeaderlessNotice {
    since: Option<std::time::Instant>,
    said: bool,
}

/// How long a manager goes without a leader before it says so.
const LEADERLESS_NOTICE: Duration = Duration::from_secs(5);

impl LeaderlessNotice {
    fn observe(&mut self, has_leader: bool, voters: usize) {
        if has_leader {
            if self.said {
                tracing::info!("a raft leader is elected again");
            }
            *self = Self::default();
            return;
        }
        let since = *self.since.get_or_insert_with(std::time::Instant::now);
        if !self.said && since.elapsed() >= LEADERLESS_NOTICE {
            self.said = true;
            tracing::warn!(
                "no raft leader for {}s: a majority of the {voters} managers must be up and reachable from each \
                 other; this manager keeps waiting (start the others, or on quorum loss run \
                 `swarmd manager recover --force-new-cluster` on one of them)",
                LEADERLESS_NOTICE.as_secs()
            );
        }
    }
}

/// Paces the asks of a manager without a leader: the first after
/// [`LEADERLESS_PROBE`] without one, then one every [`LEADERLESS_PROBE`].
#[derive(Default)]
struct Leaderless {
    since: Option<std::time::Instant>,
    asked: Option<std::time::Instant>,
}

/// How long a manager goes without a leader before it asks its peers whether
/// they refuse its certificate, and how often it asks again.
const LEADERLESS_PROBE: Duration = Duration::from_secs(10);

impl Leaderless {
    fn due(&mut self, has_leader: bool) -> bool {
        let now = std::time::Instant::now();
        if has_leader {
            *self = Self::default();
            return false;
        }
        let since = *self.since.get_or_insert(now);
        let last = self.asked.unwrap_or(since);
        if now.duration_since(since) < LEADERLESS_PROBE
            || (self.asked.is_some() && now.duration_since(last) < LEADERLESS_PROBE)
        {
            return false;
        }
        self.asked = Some(now);
        true
    }
}

/// What a manager asks its peers with: its identity and its deny-list.
pub(crate) struct Probe {
    pub(crate) identity: tokio::sync::watch::Receiver<Arc<swarmd_certs::NodeIdentity>>,
    pub(crate) deny: swarmd_certs::tls::DenyList,
}

/// Whether a peer manager refuses this manager's certificate as revoked (see
/// [`swarmd_certs::dial::probe_standing`]): only a demotion (or the removal
/// that follows one) deny-lists a manager's certificate. The answer counts
/// only from a server whose certificate is a current manager's by this
/// manager's store and not on its deny-list: a stolen certificate of a
/// manager demoted earlier, served from a peer's address, cannot talk a
/// healthy manager out of its role.
async fn standing(store: &Store, cfg: &ManagerConfig, probe: &Probe, identity: &NodeIdentity) -> Standing {
    let view = store.view();
    let own = view.node(&cfg.node_id).ok().flatten().map(|n| n.addr);
    let (Ok(addrs), Ok(managers)) = (view.manager_addrs(), view.managers()) else { return Standing::Unknown };
    let peers: std::collections::HashSet<NodeId> =
        managers.into_iter().filter(|m| m.raft_id.is_some() && m.id != cfg.node_id).map(|m| m.id).collect();
    if peers.is_empty() {
        return Standing::Unknown;
    }
    let set = swarmd_certs::tls::ManagerSet::default();
    set.replace(peers);
    let checks = swarmd_certs::tls::ServerChecks { deny: Some(probe.deny.clone()), managers: Some(set) };
    let client = match swarmd_certs::tls::client_config_checked(identity, &checks) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::warn!(error = %e, "cannot build the configuration to ask peers about this manager's standing");
            return Standing::Unknown;
        }
    };
    let mut probes = tokio::task::JoinSet::new();
    for addr in addrs.into_iter().filter(|a| Some(a) != own.as_ref() && *a != cfg.advertise_addr) {
        let client = client.clone();
        probes.spawn(async move { (swarmd_certs::dial::probe_standing(&addr, client).await, addr) });
    }
    let mut answer = Standing::Unknown;
    while let Some(done) = probes.join_next().await {
        match done {
            Ok((Standing::Revoked, addr)) => {
                tracing::warn!(manager = %addr, role = %identity.info.role, "a manager refuses this node's certificate as revoked");
                return Standing::Revoked;
            }
            Ok((Standing::Accepted, _)) => answer = Standing::Accepted,
            _ => {}
        }
    }
    answer
}

async fn prepare_demotion(store: &Store, secrets: &SecretsCache, cfg: &ManagerConfig) -> Result<Demotion, String> {
    let s = secrets.get().map_err(|e| e.to_string())?;
    let (key, csr) = generate_key_and_csr().map_err(|e| e.to_string())?;
    let issued = s.sign_node(&csr, &cfg.node_id, Role::Worker).await.map_err(|e| e.to_string())?;
    let identity = NodeIdentity::new(s.trust_pem.clone(), issued.pem, key).map_err(|e| e.to_string())?;
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
    let managers = store
        .view()
        .managers()
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|m| m.raft_id.is_some() && m.id != cfg.node_id)
        .map(|m| m.id)
        .collect();
    Ok(Demotion { identity, remotes, managers, listen_addr: cfg.listen_addr.clone() })
}

/// Keeps the TLS deny-list equal to the replicated one (once this manager's
/// store holds the cluster: a joining manager keeps the list it was handed
/// until then), and closes the connections it starts to refuse.
pub(crate) async fn follow_deny_list(
    view: StateView,
    deny: DenyList,
    conns: crate::conn::ConnRegistry,
    mut applied: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    loop {
        if matches!(view.cluster(), Ok(Some(_))) {
            match view.denied() {
                Ok(set) => {
                    if deny.replace(set) {
                        let closed = conns.close_denied(&deny);
                        if closed > 0 {
                            tracing::warn!(closed, "closed the connections of removed nodes and revoked certificates");
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot read the deny-list"),
            }
        }
        tokio::select! {
            r = applied.changed() => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Until when a removed node's ID must be refused: past every certificate it
/// may hold — the last one recorded, and any signed without a record (a demoted
/// manager signs its own worker certificate), which lives at most the cluster's
/// certificate lifetime from now.
pub(crate) fn deny_until(node: &NodeRecord, secrets: &SecretsCache) -> Result<i64, tonic::Status> {
    let validity = secrets.get()?.validity.duration().as_secs() as i64;
    Ok(node.cert_not_after.max(swarmd_certs::now_unix() + validity + 60))
}

/// After a forced new cluster: removes every other manager once this one leads.
pub(crate) async fn forget_other_managers(
    store: Store,
    secrets: SecretsCache,
    me: NodeId,
    shutdown: CancellationToken,
) {
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
        let Ok(deny_until) = others.iter().map(|n| deny_until(n, &secrets)).try_fold(0, |a, d| d.map(|d| a.max(d)))
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
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
