//! The `Cluster` gRPC service: what managers ask of each other besides raft.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};
use swarmd_certs::Role;
use swarmd_proto::cluster::cluster_client::ClusterClient;
use swarmd_proto::cluster::cluster_server::{self, ClusterServer};
use swarmd_proto::cluster::{
    GetDataKeyRequest, GetDataKeyResponse, JoinRaftRequest, JoinRaftResponse, ProposeRequest, ProposeResponse,
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
}

impl ClusterService {
    /// The service, ready to mount.
    pub fn new(store: Store, secrets: SecretsCache, auth: Authorizer, peers: Peers) -> ClusterServer<Self> {
        // Forwarded commands are bounded by the control API's 4 MiB requests.
        ClusterServer::new(Self { store, secrets, auth, peers }).max_decoding_message_size(16 << 20)
    }
}

fn manager_record(store: &Store, id: &swarmd_certs::NodeId) -> Result<crate::state::NodeRecord, Status> {
    let rec = store.member(id)?;
    if rec.role != Role::Manager {
        return Err(Status::permission_denied(format!("node {id} is not a manager")));
    }
    Ok(rec)
}

#[tonic::async_trait]
impl cluster_server::Cluster for ClusterService {
    /// Manager certificate of a node the store lists as a manager. UNAVAILABLE
    /// while this manager has not caught up.
    #[tracing::instrument(skip_all)]
    async fn get_data_key(&self, req: Request<GetDataKeyRequest>) -> Result<Response<GetDataKeyResponse>, Status> {
        let peer = self.auth.require(&req, &[Role::Manager])?;
        manager_record(&self.store, &peer.node_id)?;
        self.secrets.get()?;
        tracing::info!(node.id = %peer.node_id, "data key handed to a manager");
        Ok(Response::new(GetDataKeyResponse { key: self.secrets.keyring().encode().to_vec() }))
    }

    /// Manager certificate. Forwarded to the leader; the leader adds the caller
    /// as a learner, waits until it has caught up, then makes it a voter.
    #[tracing::instrument(skip_all, fields(raft_id = req.get_ref().raft_id))]
    async fn join_raft(&self, req: Request<JoinRaftRequest>) -> Result<Response<JoinRaftResponse>, Status> {
        let peer = self.auth.require(&req, &[Role::Manager])?;
        let JoinRaftRequest { raft_id, addr, node_id } = req.into_inner();
        // Managers are trusted to act for a joiner they forward; anyone else is the joiner.
        let joiner = if node_id.is_empty() {
            peer.node_id.clone()
        } else {
            node_id.parse().map_err(|e: swarmd_certs::IdError| Status::invalid_argument(e.to_string()))?
        };
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
            fwd.set_timeout(CATCH_UP);
            // The leader authorizes *this* manager; it acts on the joiner's behalf.
            return c.join_raft(fwd).await;
        }
        manager_record(&self.store, &joiner)?;
        self.store.propose_local(Command::SetRaftMember { node: joiner.clone(), raft_id, addr: addr.clone() }).await?;
        let map_err = |e: openraft::error::RaftError<u64, openraft::error::ClientWriteError<u64, BasicNode>>| {
            Status::unavailable(format!("membership change failed: {e}"))
        };
        tokio::time::timeout(CATCH_UP, raft.add_learner(raft_id, BasicNode { addr }, true))
            .await
            .map_err(|_| Status::deadline_exceeded("the new manager did not catch up in time"))?
            .map_err(map_err)?;
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([raft_id])), false).await.map_err(map_err)?;
        tracing::info!(node.id = %joiner, raft_id, "manager joined raft as a voter");
        Ok(Response::new(JoinRaftResponse {}))
    }

    /// Manager certificate. FAILED_PRECONDITION if the state machine refuses the
    /// command; UNAVAILABLE if this manager is not (or no longer) the leader.
    async fn propose(&self, req: Request<ProposeRequest>) -> Result<Response<ProposeResponse>, Status> {
        self.auth.require(&req, &[Role::Manager])?;
        let cmd: Command = bincode::deserialize(&req.get_ref().command)
            .map_err(|e| Status::invalid_argument(format!("malformed command: {e}")))?;
        let (result, log_index) = match self.store.propose_local(cmd).await {
            Ok(index) => (CommandResult::Ok, index),
            Err(StoreError::Rejected(why)) => (CommandResult::Rejected(why), 0),
            Err(e) => return Err(e.into()),
        };
        Ok(Response::new(ProposeResponse { result: encode(&result), log_index }))
    }
}
