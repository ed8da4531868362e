//! The `Cluster` gRPC service: what managers ask of each other besides raft.
//!
//! Every RPC here wants a manager certificate of a node the store lists as a
//! manager now; `JoinRaft` on another's behalf and `Propose` also want a raft
//! member. A forwarded write is re-authorized by the leader: only the commands
//! a manager proposes for a client or a node it serves are accepted (see
//! [`check_forwarded`]), never raft's or the leader's own.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};
use swarmd_certs::{NodeId, Role};
use swarmd_proto::cluster::cluster_client::ClusterClient;
use swarmd_proto::cluster::cluster_server::{self, ClusterServer};
use swarmd_proto::cluster::{
    BlobChunk, FetchBlobRequest, GetDataKeyRequest, GetDataKeyResponse, HoldImageRequest, HoldImageResponse,
    JoinRaftRequest, JoinRaftResponse, ProposeRequest, ProposeResponse,
};
use tonic::{Request, Response, Status};

use crate::auth::Authorizer;
use crate::cluster::SecretsCache;
use crate::state::{encode, Command, CommandResult};
use crate::store::{Peers, Store, StoreError};

/// How long a joining manager may take to catch up before it is promoted.
const CATCH_UP: Duration = Duration::from_secs(120);

/// The manager-to-manager service.
pub struct ClusterService {
    store: Store,
    secrets: SecretsCache,
    auth: Authorizer,
    peers: Peers,
    images: crate::images::Images,
}

impl ClusterService {
    /// The service, ready to mount.
    pub(crate) fn new(
        store: Store,
        secrets: SecretsCache,
        auth: Authorizer,
        peers: Peers,
        images: crate::images::Images,
    ) -> ClusterServer<Self> {
        // Forwarded commands are bounded by the control API's requests.
        ClusterServer::new(Self { store, secrets, auth, peers, images }).max_decoding_message_size(16 << 20)
    }
}

fn manager_record(store: &Store, id: &swarmd_certs::NodeId) -> Result<crate::state::NodeRecord, Status> {
    let rec = store.member(id)?;
    if rec.role != Role::Manager {
        return Err(Status::permission_denied(format!("node {id} is not a manager")));
    }
    Ok(rec)
}

/// Whether `cmd`, forwarded by manager `from`, is one a follower proposes on
/// behalf of a client or of a node whose session or request it serves.
pub(crate) fn check_forwarded(cmd: &Command, from: &NodeId) -> Result<(), String> {
    match cmd {
        // Control API writes (secretctl through a follower).
        Command::CreateSecret { .. }
        | Command::AddSecretVersion { .. }
        | Command::RemoveSecret { .. }
        | Command::CreateService(_)
        | Command::UpdateService { .. }
        | Command::RemoveService { .. }
        | Command::UpdateNode { .. }
        | Command::SetRole { role: Role::Manager, .. }
        | Command::RemoveNodes { .. }
        | Command::RotateJoinToken { .. }
        | Command::SetAutolock { .. }
        | Command::SetIdentityTtl { .. }
        | Command::RecordAdminCert(_)
        | Command::RevokeAdminCert { .. }
        | Command::StartCaRotation(_)
        | Command::UpdateExternalCa { .. }
        | Command::PutImage { .. }
        | Command::RemoveImage { .. }
        | Command::SetHostRootfs { .. }
        | Command::AddTrustKey(_)
        | Command::RemoveTrustKey { .. }
        | Command::AddImageSignature { .. }
        | Command::SetContentTrust { .. }
        | Command::SetCertRecoveryWindow { .. } => Ok(()),
        // A manager says only that it holds an image itself.
        Command::ImageHeld { node, .. } if node == from => Ok(()),
        Command::ImageHeld { node, .. } => Err(format!("manager {from} cannot say that {node} holds an image")),
        // Joins, renewals and task reports of the nodes a follower serves.
        Command::AddNode(_) | Command::RecordCert { .. } | Command::CaConverged { .. } | Command::TaskStatus { .. } => {
            Ok(())
        }
        // Liveness: a manager reports only what its own sessions saw.
        Command::SetStatus(changes) => match changes.iter().find(|c| c.reporter != *from) {
            None => Ok(()),
            Some(c) => Err(format!("manager {from} cannot report liveness as {}", c.reporter)),
        },
        Command::InitCluster { .. }
        | Command::SetRaftMember { .. }
        | Command::SetRole { .. }
        | Command::AddDataKey { .. }
        | Command::Reseal { .. }
        | Command::RetireDataKeys { .. }
        | Command::Schedule { .. }
        | Command::CaRotationBatch { .. }
        | Command::FinishCaRotation { .. }
        | Command::SetCaChain { .. }
        | Command::SetExternalCa(_)
        | Command::Batch(_) => Err("this command is the leader's own and cannot be forwarded".into()),
    }
}

#[tonic::async_trait]
impl cluster_server::Cluster for ClusterService {
    /// Manager certificate of a node the store lists as a manager. UNAVAILABLE
    /// while this manager has not caught up.
    #[tracing::instrument(skip_all)]
    async fn get_data_key(&self, req: Request<GetDataKeyRequest>) -> Result<Response<GetDataKeyResponse>, Status> {
        let (peer, rec) = self.auth.require_manager(&req)?;
        if rec.is_none() {
            return Err(crate::status::not_caught_up());
        }
        self.secrets.get()?;
        let view = self.store.view();
        let internal = crate::status::internal;
        let denied = view.denied().map_err(internal)?;
        let managers = view.managers().map_err(internal)?;
        tracing::info!(node.id = %peer.node_id, "data key handed to a manager");
        Ok(Response::new(GetDataKeyResponse {
            key: self.secrets.keyring().encode().to_vec(),
            manager_ids: managers.into_iter().filter(|m| m.raft_id.is_some()).map(|m| m.id.to_string()).collect(),
            denied_nodes: denied.nodes.into_iter().map(|n| n.to_string()).collect(),
            denied_serials: denied.serials.into_iter().collect(),
        }))
    }

    /// Manager certificate. Forwarded to the leader; the leader adds the caller
    /// as a learner, waits until it has caught up, then makes it a voter.
    #[tracing::instrument(skip_all, fields(raft_id = req.get_ref().raft_id))]
    async fn join_raft(&self, req: Request<JoinRaftRequest>) -> Result<Response<JoinRaftResponse>, Status> {
        // A raft member may act for a joiner it forwards; anyone else is the joiner.
        let joiner = if req.get_ref().node_id.is_empty() {
            let (peer, rec) = self.auth.require_manager(&req)?;
            if rec.is_none() {
                return Err(crate::status::not_caught_up());
            }
            peer.node_id
        } else {
            self.auth.require_raft_member(&req)?;
            req.get_ref().node_id.parse().map_err(crate::status::bad_id)?
        };
        let JoinRaftRequest { raft_id, addr, .. } = req.into_inner();
        if raft_id == 0 || addr.is_empty() {
            return Err(Status::invalid_argument("raft_id and addr are required"));
        }
        let raft = self.store.raft();
        let m = raft.metrics().borrow().clone();
        if m.current_leader != Some(m.id) {
            let leader =
                self.store.leader_addr().ok_or_else(|| Status::unavailable("no raft leader right now; retry"))?;
            let mut c = ClusterClient::new(self.peers.channel(&leader));
            let mut fwd = Request::new(JoinRaftRequest { raft_id, addr, node_id: joiner.to_string() });
            // The leader's own bound, plus the way there and back.
            fwd.set_timeout(CATCH_UP + Duration::from_secs(10));
            // The leader authorizes *this* manager; it acts on the joiner's behalf.
            return c.join_raft(fwd).await;
        }
        let rec = manager_record(&self.store, &joiner)?;
        // The join runs to its end (or its undoing) in a task of its own,
        // whether or not the caller still waits: a join cut off half-way
        // would leave a learner, or a voter nobody runs.
        let (store, secrets) = (self.store.clone(), self.secrets.clone());
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        tokio::spawn(async move {
            // One membership change at a time on this leader: two managers
            // joining at once used to meet openraft's "already undergoing a
            // configuration change" and leave a half-joined record behind.
            let _turn = tokio::time::timeout_at(deadline, store.membership_change())
                .await
                .map_err(|_| Status::unavailable("other membership changes took the time of this join; retry"))?;
            let set = Command::SetRaftMember { node: joiner.clone(), raft_id, addr: addr.clone() };
            retry_until(deadline, "record the new manager", || store.propose_local(set.clone())).await?;
            if let Err(e) = admit(store.raft(), raft_id, addr, deadline).await {
                // A failed join leaves nothing behind: not the learner, not
                // the record (the joiner gives up and wipes itself on ABORTED).
                tracing::warn!(node.id = %joiner, raft_id, error = %e.message(), "manager join failed: undoing it");
                undo_join(&store, &secrets, &rec, raft_id).await;
                return Err(Status::aborted(format!("{} (the join was undone; join again)", e.message())));
            }
            tracing::info!(node.id = %joiner, raft_id, "manager joined raft as a voter");
            Ok(Response::new(JoinRaftResponse {}))
        })
        .await
        .map_err(|e| crate::status::internal(format!("the join task failed: {e}")))?
    }

    /// A current manager that is a raft member. PERMISSION_DENIED for a command
    /// that cannot be forwarded (see [`check_forwarded`]); FAILED_PRECONDITION if
    /// the state machine refuses the command; UNAVAILABLE if this manager is not
    /// (or no longer) the leader.
    async fn propose(&self, req: Request<ProposeRequest>) -> Result<Response<ProposeResponse>, Status> {
        let (peer, _) = self.auth.require_raft_member(&req)?;
        let cmd: Command = bincode::deserialize(&req.get_ref().command)
            .map_err(|e| Status::invalid_argument(format!("malformed command: {e}")))?;
        check_forwarded(&cmd, &peer.node_id).map_err(Status::permission_denied)?;
        let (result, log_index) = match self.store.propose_local(cmd).await {
            Ok(index) => (CommandResult::Ok, index),
            Err(StoreError::Rejected(why)) => (CommandResult::Rejected(why), 0),
            Err(e) => return Err(e.into()),
        };
        Ok(Response::new(ProposeResponse { result: encode(&result), log_index }))
    }

    type FetchBlobStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<BlobChunk, Status>> + Send>>;

    /// Manager certificate (a manager catching up may not be a raft member
    /// yet). Any blob of this manager's store.
    async fn fetch_blob(&self, req: Request<FetchBlobRequest>) -> Result<Response<Self::FetchBlobStream>, Status> {
        self.auth.require_manager(&req)?;
        let d = req.get_ref().digest.parse().map_err(|e| Status::invalid_argument(format!("digest: {e}")))?;
        let stream = self.images.serve(&d).await?;
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(stream, |r| r.map(|data| BlobChunk { data })))))
    }

    /// Raft member's certificate: the manager loading an image.
    async fn hold_image(&self, req: Request<HoldImageRequest>) -> Result<Response<HoldImageResponse>, Status> {
        self.auth.require_raft_member(&req)?;
        let r = req.into_inner();
        self.images.hold(&r.source, &r.record).await?;
        Ok(Response::new(HoldImageResponse {}))
    }
}

/// After a failed join: the learner leaves raft and the joiner's record goes
/// (its certificates refused), so no ghost manager stays listed.
async fn undo_join(store: &Store, secrets: &SecretsCache, rec: &crate::state::NodeRecord, raft_id: u64) {
    {
        let raft = store.raft();
        let is_learner = raft.metrics().borrow().membership_config.membership().learner_ids().any(|l| l == raft_id);
        if is_learner {
            if let Err(e) = raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([raft_id])), false).await {
                tracing::warn!(raft_id, error = %e, "could not remove the failed joiner's learner");
            }
        }
        let removal = crate::membership::deny_until(rec, secrets)
            .map(|deny_until| Command::RemoveNodes { nodes: vec![rec.id.clone()], deny_until });
        match removal {
            Ok(cmd) => {
                if let Err(e) = store.propose_local(cmd).await {
                    tracing::warn!(node.id = %rec.id, error = %e, "could not remove the failed joiner's record");
                }
            }
            Err(e) => {
                tracing::warn!(node.id = %rec.id, error = %e.message(), "could not remove the failed joiner's record")
            }
        }
    }
}

/// Makes raft member `raft_id` a learner, waits until it has every entry the
/// leader had when it was added, then makes it a voter — so the voter set
/// never counts a manager that cannot vote yet (a learner still at index 0
/// counted as a voter cost a cluster its quorum).
async fn admit(
    raft: &crate::raft::Raft,
    raft_id: u64,
    addr: String,
    deadline: tokio::time::Instant,
) -> Result<(), Status> {
    let node = BasicNode { addr };
    retry_until(deadline, "add the new manager as a learner", || async {
        raft.add_learner(raft_id, node.clone(), true).await.map(|_| ())
    })
    .await?;
    let target = raft.metrics().borrow().last_log_index.unwrap_or(0);
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    raft.wait(Some(left))
        .metrics(
            |m| {
                let matched = m.replication.as_ref().and_then(|r| r.get(&raft_id).cloned().flatten());
                matched.is_some_and(|l| l.index >= target)
            },
            "the new manager to catch up",
        )
        .await
        .map_err(|_| Status::deadline_exceeded("the new manager did not catch up in time"))?;
    retry_until(deadline, "make the new manager a voter", || async {
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([raft_id])), false).await.map(|_| ())
    })
    .await
}

/// Errors a membership step may meet that pass: a change still under way, a
/// leader that has not heard from its new majority yet.
trait Transient {
    fn transient(&self) -> bool;
    fn status(self) -> Status;
}

impl Transient for StoreError {
    fn transient(&self) -> bool {
        // Not a lost leadership: the joiner retries with the new leader.
        matches!(self, StoreError::QuorumStale { .. })
    }
    fn status(self) -> Status {
        self.into()
    }
}

impl Transient for openraft::error::RaftError<u64, openraft::error::ClientWriteError<u64, BasicNode>> {
    fn transient(&self) -> bool {
        use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
        matches!(
            self,
            RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(_)))
        )
    }
    fn status(self) -> Status {
        Status::unavailable(format!("membership change failed: {self}"))
    }
}

/// Runs `step` until it succeeds, fails for good, or `deadline` passes,
/// waiting 100–300 ms between tries.
async fn retry_until<T, E, F, Fut>(deadline: tokio::time::Instant, what: &str, mut step: F) -> Result<T, Status>
where
    E: Transient + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    loop {
        match step().await {
            Ok(v) => return Ok(v),
            Err(e) if e.transient() && tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "{what}: retrying");
                let pause = Duration::from_millis(100 + rand::random::<u64>() % 200);
                tokio::time::sleep(pause).await;
            }
            Err(e) => return Err(e.status()),
        }
    }
}
