//! Raft transport: openraft's RPCs carried as bincode bytes over the `Raft`
//! gRPC service, on the managers' mTLS port. Only manager certificates may call
//! it (checked in [`RaftService`]); the client side dials with this manager's
//! own certificate.

use std::sync::Arc;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use rustls::ClientConfig;
use serde::{de::DeserializeOwned, Serialize};
use swarmd_certs::dial::{lazy_channel, Remotes};
use swarmd_proto::raft::raft_client::RaftClient;
use swarmd_proto::raft::raft_server;
use swarmd_proto::raft::RaftPayload;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{Raft, TypeConfig};
use crate::auth::Authorizer;

/// Largest raft message accepted or sent (see `max_payload_entries`).
const RAFT_MESSAGE_LIMIT: usize = 128 << 20;

/// Bytes of entries sent in one append (see `PeerClient::append_entries`).
const APPEND_BUDGET: u64 = 2 << 20;

/// Creates clients to peer managers.
#[derive(Clone)]
pub struct Network {
    tls: watch::Receiver<Arc<ClientConfig>>,
}

impl Network {
    /// A factory that dials with the configurations published on `tls`.
    pub fn new(tls: watch::Receiver<Arc<ClientConfig>>) -> Self {
        Self { tls }
    }
}

/// A client to one peer.
pub struct PeerClient {
    target: u64,
    client: RaftClient<Channel>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        let channel = lazy_channel(Remotes::new(vec![node.addr.clone()]), self.tls.clone());
        PeerClient {
            target,
            client: RaftClient::new(channel)
                .max_decoding_message_size(RAFT_MESSAGE_LIMIT)
                .max_encoding_message_size(RAFT_MESSAGE_LIMIT),
        }
    }
}

fn enc<T: Serialize>(v: &T) -> RaftPayload {
    RaftPayload { data: bincode::serialize(v).expect("serialize raft message") }
}

fn dec<T: DeserializeOwned>(p: &RaftPayload) -> Result<T, bincode::Error> {
    bincode::deserialize(&p.data)
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        req: &Req,
        which: fn(&mut RaftClient<Channel>, RaftPayload) -> CallFuture<'_>,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: DeserializeOwned + std::error::Error,
    {
        let reply = which(&mut self.client, enc(req)).await.map_err(|s| {
            if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown) {
                RPCError::Unreachable(Unreachable::new(&s))
            } else {
                RPCError::Network(NetworkError::new(&s))
            }
        })?;
        let res: Result<Resp, RaftError<u64, E>> =
            dec(&reply.into_inner()).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

type CallFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<RaftPayload>, Status>> + Send + 'a>>;

impl RaftNetwork<TypeConfig> for PeerClient {
    /// openraft 0.9 gives every append the raft heartbeat interval (100 ms) to
    /// complete and batches by entry count only, so a batch of large entries
    /// could never make it. A batch is cut at [`APPEND_BUDGET`] bytes (always at
    /// least one entry) and the cut reported as `PartialSuccess`; the leader
    /// sends the rest next.
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let mut size = 0u64;
        let mut keep = 0;
        for e in &rpc.entries {
            let s = bincode::serialized_size(e).unwrap_or(0);
            if keep > 0 && size + s > APPEND_BUDGET {
                break;
            }
            size += s;
            keep += 1;
        }
        if keep == rpc.entries.len() {
            return self.call(&rpc, |c, p| Box::pin(c.append_entries(p))).await;
        }
        let last = rpc.entries[keep - 1].log_id;
        rpc.entries.truncate(keep);
        let resp: AppendEntriesResponse<u64> = self.call(&rpc, |c, p| Box::pin(c.append_entries(p))).await?;
        Ok(match resp {
            AppendEntriesResponse::Success => AppendEntriesResponse::PartialSuccess(Some(last)),
            other => other,
        })
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        self.call(&rpc, |c, p| Box::pin(c.install_snapshot(p))).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(&rpc, |c, p| Box::pin(c.vote(p))).await
    }
}

/// The `Raft` gRPC service: hands peers' messages to the local raft node.
pub struct RaftService {
    raft: Raft,
    auth: Authorizer,
}

impl RaftService {
    /// Serves `raft`, admitting manager certificates only.
    pub fn new(raft: Raft, auth: Authorizer) -> raft_server::RaftServer<Self> {
        raft_server::RaftServer::new(Self { raft, auth })
            .max_decoding_message_size(RAFT_MESSAGE_LIMIT)
            .max_encoding_message_size(RAFT_MESSAGE_LIMIT)
    }
}

fn bad_payload(e: bincode::Error) -> Status {
    Status::invalid_argument(format!("malformed raft message: {e}"))
}

/// A manager speaks in raft as the raft ID the store records for it, never as
/// another's (`None`: a joining manager's store does not know it yet).
fn same_sender(caller: Option<u64>, claimed: Option<u64>) -> Result<(), Status> {
    match caller {
        Some(id) if claimed != Some(id) => Err(Status::permission_denied(format!(
            "raft message claims to come from {:016x} but the caller is {id:016x}",
            claimed.unwrap_or(0)
        ))),
        _ => Ok(()),
    }
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    /// A current manager that is a raft member, speaking as its own raft ID:
    /// PERMISSION_DENIED/UNAUTHENTICATED otherwise; INVALID_ARGUMENT for
    /// undecodable payloads.
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let caller = self.auth.require_raft_member(&req)?.1;
        let rpc: AppendEntriesRequest<TypeConfig> = dec(req.get_ref()).map_err(bad_payload)?;
        same_sender(caller, rpc.vote.leader_id.voted_for())?;
        Ok(Response::new(enc(&self.raft.append_entries(rpc).await)))
    }

    /// As `append_entries`.
    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let caller = self.auth.require_raft_member(&req)?.1;
        let rpc: VoteRequest<u64> = dec(req.get_ref()).map_err(bad_payload)?;
        same_sender(caller, rpc.vote.leader_id.voted_for())?;
        Ok(Response::new(enc(&self.raft.vote(rpc).await)))
    }

    /// As `append_entries`; one chunk of a snapshot per call.
    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let caller = self.auth.require_raft_member(&req)?.1;
        let rpc: InstallSnapshotRequest<TypeConfig> = dec(req.get_ref()).map_err(bad_payload)?;
        same_sender(caller, rpc.vote.leader_id.voted_for())?;
        Ok(Response::new(enc(&self.raft.install_snapshot(rpc).await)))
    }
}
