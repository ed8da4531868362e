//! Raft transport: openraft's RPCs carried as bincode bytes over the `Raft`
//! gRPC service, on the managers' mTLS port. Only manager certificates may call
//! it (checked in [`RaftService`]); the client side dials with this manager's
//! own certificate.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, LogId, Vote};
use rustls::ClientConfig;
use serde::{de::DeserializeOwned, Serialize};
use swarmd_certs::dial::{lazy_channel, Remotes};
use swarmd_proto::raft::raft_client::RaftClient;
use swarmd_proto::raft::raft_server;
use swarmd_proto::raft::RaftPayload;
use tokio::sync::{oneshot, watch};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{Raft, TypeConfig};
use crate::auth::Authorizer;

/// Largest raft message accepted or sent (see `max_payload_entries`).
const RAFT_MESSAGE_LIMIT: usize = 128 << 20;

/// Bytes of entries sent in one append (see `PeerClient::append_entries`).
const APPEND_BUDGET: u64 = 2 << 20;

/// How long an append that carries entries may run, at most: this plus one
/// second per [`APPEND_RATE`] bytes (a bound against a hung peer, not a
/// schedule: see `PeerClient::append_entries`).
const APPEND_DEADLINE: Duration = Duration::from_secs(5);
/// Slowest transfer an append is given time for, bytes per second.
const APPEND_RATE: u64 = 256 << 10;

/// Fault injection for tests: every append that carries entries waits this
/// many milliseconds before it is sent (a slow link or a slow machine, made
/// deterministic). Heartbeats are not delayed.
pub const APPEND_DELAY_ENV: &str = "SWARMD_FAULT_RAFT_APPEND_DELAY_MS";

/// Creates clients to peer managers.
#[derive(Clone)]
pub struct Network {
    tls: watch::Receiver<Arc<ClientConfig>>,
    delay: Option<Duration>,
}

impl Network {
    /// A factory that dials with the configurations published on `tls`.
    pub fn new(tls: watch::Receiver<Arc<ClientConfig>>) -> Self {
        let delay = std::env::var(APPEND_DELAY_ENV).ok().and_then(|v| v.parse().ok()).map(Duration::from_millis);
        if let Some(d) = delay {
            tracing::warn!(delay = ?d, "fault injection: every raft append with entries is delayed ({APPEND_DELAY_ENV})");
        }
        Self { tls, delay }
    }
}

/// A client to one peer.
pub struct PeerClient {
    target: u64,
    client: RaftClient<Channel>,
    delay: Option<Duration>,
    /// An append that openraft stopped waiting for but that still runs.
    inflight: Option<Inflight>,
}

/// An append sent to a peer, running in a task of its own, and what it covers.
struct Inflight {
    vote: Vote<u64>,
    prev: Option<LogId<u64>>,
    last: LogId<u64>,
    reply: oneshot::Receiver<Result<RaftPayload, Status>>,
    /// Whether openraft already gave up on it once.
    reattached: bool,
    _task: AbortOnDrop,
}

/// Aborts a task when dropped (a replaced or abandoned append).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Inflight {
    /// Whether `rpc` asks again for (a superset of) what this append sends:
    /// same leader and vote, same starting point, and the entry this append
    /// ends with at the same index. A leader never rewrites its own log within
    /// its term, so the entries between are the same.
    fn covered_by(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> bool {
        self.vote == rpc.vote && self.prev == rpc.prev_log_id && rpc.entries.iter().any(|e| e.log_id == self.last)
    }
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
            delay: self.delay,
            inflight: None,
        }
    }
}

fn enc<T: Serialize>(v: &T) -> RaftPayload {
    RaftPayload { data: bincode::serialize(v).expect("serialize raft message") }
}

fn dec<T: DeserializeOwned>(p: &RaftPayload) -> Result<T, bincode::Error> {
    bincode::deserialize(&p.data)
}

/// A peer's reply, or the failure to get one, as openraft wants it (its
/// error type is openraft's, large as it is).
#[allow(clippy::result_large_err)]
fn decode_reply<Resp, E>(
    target: u64,
    reply: Result<RaftPayload, Status>,
) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
where
    Resp: DeserializeOwned,
    E: DeserializeOwned + std::error::Error,
{
    let reply = reply.map_err(|s| {
        if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown) {
            RPCError::Unreachable(Unreachable::new(&s))
        } else {
            RPCError::Network(NetworkError::new(&s))
        }
    })?;
    let res: Result<Resp, RaftError<u64, E>> = dec(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    res.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
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
        let reply = which(&mut self.client, enc(req)).await.map(Response::into_inner);
        decode_reply(self.target, reply)
    }

    /// Sends `rpc` from a task of its own, which runs to its end (or to its
    /// payload-sized deadline) whether or not openraft still waits for it.
    fn launch(&mut self, rpc: &AppendEntriesRequest<TypeConfig>) {
        let payload = enc(rpc);
        let deadline = APPEND_DEADLINE + Duration::from_secs(payload.data.len() as u64 / APPEND_RATE);
        let (tx, reply) = oneshot::channel();
        let mut client = self.client.clone();
        let delay = self.delay;
        let task = tokio::spawn(async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            let r = match tokio::time::timeout(deadline, client.append_entries(payload)).await {
                Ok(r) => r.map(Response::into_inner),
                Err(_) => Err(Status::deadline_exceeded(format!("append not answered within {deadline:?}"))),
            };
            let _ = tx.send(r);
        });
        let last = rpc.entries.last().expect("an append with entries").log_id;
        self.inflight = Some(Inflight {
            vote: rpc.vote,
            prev: rpc.prev_log_id,
            last,
            reply,
            reattached: false,
            _task: AbortOnDrop(task),
        });
    }
}

type CallFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<RaftPayload>, Status>> + Send + 'a>>;

impl RaftNetwork<TypeConfig> for PeerClient {
    /// openraft 0.9 gives every append one raft heartbeat interval (100 ms) —
    /// its own timeout around this call — and batches by entry count only. On a
    /// slow machine or link a large entry (a secret near 500 KiB, sent, decoded
    /// and synced by the follower) needs longer, and used to be cancelled and
    /// sent again forever while the follower, hearing nothing, started
    /// elections. So:
    /// - a batch is cut at [`APPEND_BUDGET`] bytes (always at least one entry)
    ///   and the cut reported as `PartialSuccess`;
    /// - an append with entries runs in a task of its own that openraft's
    ///   timeout does not cancel; when openraft asks again for the same entries
    ///   (it does at once after a timeout) the call waits for that same append
    ///   instead of sending it again, and sends a heartbeat beside it, so that
    ///   the follower keeps hearing from its leader while the large append is
    ///   on its way. The time openraft records for the answer is that of the
    ///   later call (at most one heartbeat interval late per retry; a leader
    ///   lease is only ever extended by a real answer, which this is);
    /// - heartbeats are always sent on their own.
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        if rpc.entries.is_empty() {
            return self.call(&rpc, |c, p| Box::pin(c.append_entries(p))).await;
        }
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
        rpc.entries.truncate(keep);
        let covered = self.inflight.as_ref().is_some_and(|f| f.covered_by(&rpc));
        if !covered {
            self.launch(&rpc);
        }
        let asked_last = rpc.entries.last().expect("an append with entries").log_id;
        let inflight = self.inflight.as_mut().expect("an append in flight");
        let keepalive = if inflight.reattached {
            let beat = AppendEntriesRequest::<TypeConfig> {
                vote: rpc.vote,
                prev_log_id: rpc.prev_log_id,
                leader_commit: rpc.leader_commit,
                entries: Vec::new(),
            };
            let mut client = self.client.clone();
            let target = self.target;
            futures::future::Either::Left(async move {
                let reply = client.append_entries(enc(&beat)).await.map(Response::into_inner);
                decode_reply::<AppendEntriesResponse<u64>, openraft::error::Infallible>(target, reply)
            })
        } else {
            futures::future::Either::Right(std::future::pending())
        };
        // Cancelled here by openraft's timeout, the next call finds it again.
        inflight.reattached = true;
        tokio::pin!(keepalive);
        let mut beat_done = false;
        let reply = loop {
            tokio::select! {
                r = &mut inflight.reply => break r,
                beat = &mut keepalive, if !beat_done => {
                    beat_done = true;
                    if let Ok(AppendEntriesResponse::HigherVote(v)) = beat {
                        return Ok(AppendEntriesResponse::HigherVote(v));
                    }
                }
            }
        };
        let last = inflight.last;
        self.inflight = None;
        let reply = reply.unwrap_or_else(|_| Err(Status::cancelled("the append task ended without an answer")));
        let resp: AppendEntriesResponse<u64> = decode_reply(self.target, reply)?;
        Ok(match resp {
            AppendEntriesResponse::Success if last != asked_last => AppendEntriesResponse::PartialSuccess(Some(last)),
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
    contact: crate::auth::LeaderContact,
}

impl RaftService {
    /// Serves `raft`, admitting manager certificates only.
    pub fn new(raft: Raft, auth: Authorizer) -> raft_server::RaftServer<Self> {
        let contact = auth.leader_contact();
        raft_server::RaftServer::new(Self { raft, auth, contact })
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
        let resp = self.raft.append_entries(rpc).await;
        if matches!(resp, Ok(AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_))) {
            self.contact.heard();
        }
        Ok(Response::new(enc(&resp)))
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
