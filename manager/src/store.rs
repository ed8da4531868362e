//! The replicated store as services use it: writes go through raft (forwarded
//! to the leader by followers), reads come from this manager's applied state.
//!
//! Reads are local: on the leader they reflect every acknowledged write; on a
//! follower they lag by the replication delay (usually one heartbeat, 100 ms).
//! Writes fail fast when this side of the cluster has no quorum, instead of
//! waiting. gRPC status mapping for store errors lives here, once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use rustls::ClientConfig;
use swarmd_certs::dial::{lazy_channel, Remotes};
use swarmd_proto::cluster::cluster_client::ClusterClient;
use swarmd_proto::cluster::{ProposeRequest, ProposeResponse};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::raft::Raft;
use crate::state::{Command, CommandResult, Rejection, StateError, StateView};
use crate::status::REJECTION_METADATA;

/// How long a write may take before it is reported as not committed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Raft proposals in flight at once; further commands wait and go together.
const PROPOSALS_IN_FLIGHT: usize = 2;
/// At most this many commands share one raft entry...
const BATCH_COMMANDS: usize = 512;
/// ...and, after the first, at most this many encoded bytes.
const BATCH_BYTES: u64 = 4 << 20;
/// A leader that has not heard from a quorum for this long refuses writes.
const QUORUM_STALE: Duration = Duration::from_millis(1500);

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No leader can be reached or the leader has lost its quorum.
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// This manager is not the leader: the write goes to `leader` (its raft
    /// ID, if one is known), forwarded by [`Store::propose`].
    #[error("no quorum: not the leader; leader is {}", match .leader {
        Some(l) => l.to_string(),
        None => "unknown".to_owned(),
    })]
    NotLeader { leader: Option<u64> },
    /// This manager leads, but has not heard from a majority lately (also
    /// just after a voter was added, until the new majority answers).
    #[error("no quorum: this leader has not reached a majority of the {voters} managers {}", match .ms {
        Some(ms) => format!("for {ms} ms"),
        None => "yet (a voter was just added, or it was just elected)".to_owned(),
    })]
    QuorumStale { voters: usize, ms: Option<u64> },
    /// The command was valid raft-wise but refused by the state machine.
    #[error("{0}")]
    Rejected(Rejection),
    /// The write was not confirmed in time; it may or may not be applied.
    #[error("the write was not confirmed within {0:?} (it may still be applied); check the cluster's managers")]
    Timeout(Duration),
    /// raft itself failed (shutting down, storage error).
    #[error("raft: {0}")]
    Raft(String),
    /// Reading state failed.
    #[error(transparent)]
    State(#[from] StateError),
}

impl StoreError {
    /// The same error, for each of the commands that shared a failed proposal.
    fn duplicate(&self) -> StoreError {
        match self {
            StoreError::NoQuorum(s) => StoreError::NoQuorum(s.clone()),
            StoreError::NotLeader { leader } => StoreError::NotLeader { leader: *leader },
            StoreError::QuorumStale { voters, ms } => StoreError::QuorumStale { voters: *voters, ms: *ms },
            StoreError::Rejected(r) => StoreError::Rejected(r.clone()),
            StoreError::Timeout(d) => StoreError::Timeout(*d),
            StoreError::Raft(s) => StoreError::Raft(s.clone()),
            StoreError::State(e) => StoreError::Raft(e.to_string()),
        }
    }
}

/// Dials other managers (the leader, for forwarded writes).
#[derive(Clone)]
pub struct Peers {
    tls: watch::Receiver<Arc<ClientConfig>>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Peers {
    /// Dials with the configurations published on `tls` (this manager's certificate).
    pub fn new(tls: watch::Receiver<Arc<ClientConfig>>) -> Self {
        Self { tls, channels: Arc::default() }
    }

    /// A (cached, lazily connected) channel to the manager at `addr`.
    pub fn channel(&self, addr: &str) -> Channel {
        let mut map = self.channels.lock().expect("peers lock");
        map.entry(addr.to_owned())
            .or_insert_with(|| lazy_channel(Remotes::new(vec![addr.to_owned()]), self.tls.clone()))
            .clone()
    }
}

/// Proposes commands and reads state.
#[derive(Clone)]
pub struct Store {
    raft: Raft,
    view: StateView,
    applied: watch::Receiver<u64>,
    peers: Option<Peers>,
    proposals: mpsc::UnboundedSender<Proposal>,
    /// Held by whoever changes raft's membership on this manager (joins,
    /// demotions): openraft refuses a change while another is under way.
    membership: Arc<tokio::sync::Mutex<()>>,
}

/// A command waiting for its turn in raft, and where its outcome goes.
struct Proposal {
    cmd: Command,
    bytes: u64,
    reply: oneshot::Sender<Result<(u64, CommandResult), StoreError>>,
}

/// Group commit: while [`PROPOSALS_IN_FLIGHT`] proposals are in raft, new
/// commands queue; the next proposal carries every queued command as one
/// [`Command::Batch`] entry. A lone command goes as itself, without waiting.
async fn run_proposals(raft: Raft, mut rx: mpsc::UnboundedReceiver<Proposal>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(PROPOSALS_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < BATCH_COMMANDS && bytes < BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.bytes;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            submit(&raft, batch).await;
            drop(permit);
        });
    }
}

async fn submit(raft: &Raft, mut batch: Vec<Proposal>) {
    let (cmd, replies) = if batch.len() == 1 {
        let p = batch.pop().expect("one proposal");
        (p.cmd, vec![p.reply])
    } else {
        let (cmds, replies) = batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
        (Command::Batch(cmds), replies)
    };
    let outcome = match raft.client_write(cmd).await {
        Ok(resp) => Ok((resp.log_id.index, resp.data)),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(StoreError::NotLeader { leader: f.leader_id })
        }
        Err(e) => Err(StoreError::Raft(e.to_string())),
    };
    match outcome {
        Ok((index, CommandResult::Batch(results))) if results.len() == replies.len() => {
            for (reply, r) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok((index, r)));
            }
        }
        Ok((index, r)) if replies.len() == 1 => {
            let _ = replies.into_iter().next().expect("one reply").send(Ok((index, r)));
        }
        Ok((_, r)) => {
            let why = format!("raft answered a batch of {} commands with {r:?}", replies.len());
            for reply in replies {
                let _ = reply.send(Err(StoreError::Raft(why.clone())));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.duplicate()));
            }
        }
    }
}

impl Store {
    /// A store over a running raft node and its state machine's view; without
    /// `peers`, writes on a follower fail instead of being forwarded.
    ///
    /// Must be called inside a tokio runtime: it starts the task that groups
    /// concurrent proposals into shared raft entries.
    pub fn new(raft: Raft, view: StateView, applied: watch::Receiver<u64>) -> Self {
        let (proposals, rx) = mpsc::unbounded_channel();
        swarmd_certs::spawn_loop("proposals", run_proposals(raft.clone(), rx));
        Self { raft, view, applied, peers: None, proposals, membership: Arc::default() }
    }

    /// Waits for the right to change raft's membership: one change at a time.
    pub async fn membership_change(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.membership.clone().lock_owned().await
    }

    /// Forwards writes to the leader through `peers`.
    pub fn with_peers(mut self, peers: Peers) -> Self {
        self.peers = Some(peers);
        self
    }

    /// Follows the index of the last applied entry.
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// The local applied state.
    pub fn view(&self) -> &StateView {
        &self.view
    }

    /// The record of `node`, a member of the cluster. A node this manager
    /// does not know gets UNAVAILABLE (retry: a follower may not have applied
    /// its join yet) or, on the leader, which has every committed write,
    /// NOT_FOUND. Neither says the node was removed: removal is the deny-list's
    /// to say (see [`crate::auth::removed_status`]). INTERNAL if the store fails.
    pub fn member(&self, node: &swarmd_certs::NodeId) -> Result<crate::state::NodeRecord, Status> {
        if let Some(rec) = self.view.node(node).map_err(|e| Status::internal(e.to_string()))? {
            return Ok(rec);
        }
        let leads = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.current_leader == Some(m.id)
        };
        Err(if leads {
            Status::not_found(format!("node {node} is not known to the cluster"))
        } else {
            Status::unavailable(format!("node {node} is not known to this manager yet; retry"))
        })
    }

    /// The raft handle.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The address of the current leader, if one is known.
    pub fn leader_addr(&self) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        m.membership_config.membership().get_node(&leader).map(|n| n.addr.clone())
    }

    /// Commits `cmd` through raft (forwarding to the leader if needed) and
    /// returns once it is applied here too (read-your-writes on this manager).
    pub async fn propose(&self, cmd: Command) -> Result<(), StoreError> {
        match self.propose_local(cmd.clone()).await {
            Err(StoreError::NotLeader { .. }) => match (&self.peers, self.leader_addr()) {
                (Some(peers), Some(addr)) => {
                    let index = forward(peers, &addr, &cmd).await?;
                    self.wait_applied(index).await
                }
                _ => Err(StoreError::NoQuorum("no raft leader is known to this manager".into())),
            },
            other => other.map(|_| ()),
        }
    }

    async fn wait_applied(&self, index: u64) -> Result<(), StoreError> {
        let mut rx = self.applied.clone();
        let reached = tokio::time::timeout(WRITE_TIMEOUT, rx.wait_for(|a| *a >= index)).await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            _ => Err(StoreError::Timeout(WRITE_TIMEOUT)),
        }
    }

    /// Commits `cmd` through the local raft node, which must be the leader;
    /// returns the log index it was committed at.
    pub async fn propose_local(&self, cmd: Command) -> Result<u64, StoreError> {
        // Read what is needed under the borrow: cloning the metrics (membership
        // maps included) on every write was measurable.
        let (id, leader, voters, quorum_ack) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.id, m.current_leader, m.membership_config.membership().voter_ids().count(), m.millis_since_quorum_ack)
        };
        match leader {
            None => {
                return Err(StoreError::NoQuorum(format!(
                    "no raft leader among the {voters} managers reachable from here"
                )))
            }
            Some(l) if l != id => return Err(StoreError::NotLeader { leader: Some(l) }),
            Some(_) => {}
        }
        if voters > 1 && quorum_ack.is_none_or(|ms| ms > QUORUM_STALE.as_millis() as u64) {
            return Err(StoreError::QuorumStale { voters, ms: quorum_ack });
        }
        let (reply, outcome) = oneshot::channel();
        let bytes = bincode::serialized_size(&cmd).unwrap_or(0);
        if self.proposals.send(Proposal { cmd, bytes, reply }).is_err() {
            return Err(StoreError::Raft("raft is shutting down".into()));
        }
        match tokio::time::timeout(WRITE_TIMEOUT, outcome).await {
            Err(_) => Err(StoreError::Timeout(WRITE_TIMEOUT)),
            Ok(Err(_)) => Err(StoreError::Raft("raft is shutting down".into())),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Ok(Ok((index, CommandResult::Ok)))) => Ok(index),
            Ok(Ok(Ok((_, CommandResult::Rejected(r))))) => Err(StoreError::Rejected(r)),
            Ok(Ok(Ok((_, other)))) => Err(StoreError::Raft(format!("unexpected result {other:?}"))),
        }
    }
}

/// The rejection a FAILED_PRECONDITION status carries: the typed one from its
/// metadata, else (a status from elsewhere) its message as [`Rejection::Invalid`].
fn rejection_of(s: &Status) -> Rejection {
    s.metadata()
        .get_bin(REJECTION_METADATA)
        .and_then(|v| v.to_bytes().ok())
        .and_then(|b| bincode::deserialize(&b).ok())
        .unwrap_or_else(|| Rejection::Invalid(s.message().to_owned()))
}

async fn forward(peers: &Peers, addr: &str, cmd: &Command) -> Result<u64, StoreError> {
    let mut client = ClusterClient::new(peers.channel(addr));
    let req = ProposeRequest { command: crate::state::encode(cmd) };
    match tokio::time::timeout(WRITE_TIMEOUT, client.propose(req)).await {
        Err(_) => Err(StoreError::Timeout(WRITE_TIMEOUT)),
        Ok(reply) => leader_outcome(addr, reply.map(|r| r.into_inner())),
    }
}

/// What a forwarded write's reply from the leader at `addr` means: the log
/// index it was committed at, or the leader's error with the same variant
/// (a rejection comes back typed, in the reply or in the status).
fn leader_outcome(addr: &str, reply: Result<ProposeResponse, Status>) -> Result<u64, StoreError> {
    match reply {
        Ok(r) => match bincode::deserialize::<CommandResult>(&r.result) {
            Ok(CommandResult::Ok) => Ok(r.log_index),
            Ok(CommandResult::Rejected(why)) => Err(StoreError::Rejected(why)),
            Ok(other) => Err(StoreError::Raft(format!("the leader answered a single command with {other:?}"))),
            Err(e) => Err(StoreError::Raft(format!("leader sent an undecodable result: {e}"))),
        },
        Err(s) => Err(match s.code() {
            Code::FailedPrecondition => StoreError::Rejected(rejection_of(&s)),
            Code::DeadlineExceeded => StoreError::Timeout(WRITE_TIMEOUT),
            _ => StoreError::NoQuorum(format!("leader at {addr}: {}", s.message())),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Missing, ObjectKind};
    use crate::status::rejection_message;

    fn samples() -> Vec<Rejection> {
        vec![
            Rejection::StaleDataKey,
            Rejection::NameInUse { kind: ObjectKind::Secret, name: "db".into(), holder: "s1".into() },
            Rejection::SecretUpdatedMeanwhile { name: "db".into(), next: 3, proposed: 2 },
            Rejection::SecretInUse { name: "db".into(), services: vec!["web".into(), "api".into()] },
            Rejection::NotFound(Missing::AdminCert { serial: "0b".into() }),
            Rejection::Invalid("secret value is empty".into()),
        ]
    }

    #[test]
    fn a_rejection_in_the_leaders_reply_comes_back_as_the_same_variant() {
        for r in samples() {
            let reply =
                ProposeResponse { result: crate::state::encode(&CommandResult::Rejected(r.clone())), log_index: 0 };
            match leader_outcome("10.0.0.1:4242", Ok(reply)) {
                Err(StoreError::Rejected(got)) => assert_eq!(got, r),
                other => panic!("{r:?} came back as {other:?}"),
            }
        }
        let ok = ProposeResponse { result: crate::state::encode(&CommandResult::Ok), log_index: 42 };
        assert_eq!(leader_outcome("x", Ok(ok)).unwrap(), 42);
    }

    #[test]
    fn a_rejection_in_a_failed_precondition_status_comes_back_as_the_same_variant() {
        for r in samples() {
            let status: Status = StoreError::Rejected(r.clone()).into();
            assert_eq!(status.code(), Code::FailedPrecondition);
            assert_eq!(status.message(), rejection_message(&r));
            // As tonic carries it: through the HTTP/2 headers and back.
            let status = Status::from_header_map(status.into_http::<()>().headers()).unwrap();
            match leader_outcome("10.0.0.1:4242", Err(status)) {
                Err(StoreError::Rejected(got)) => assert_eq!(got, r),
                other => panic!("{r:?} came back as {other:?}"),
            }
        }
        // A status without the metadata keeps its text.
        let plain = Status::failed_precondition("refused elsewhere");
        match leader_outcome("x", Err(plain)) {
            Err(StoreError::Rejected(Rejection::Invalid(why))) => assert_eq!(why, "refused elsewhere"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn users_see_todays_texts_with_the_cli_hints_added_at_the_edge() {
        let in_use = Rejection::SecretInUse { name: "db".into(), services: vec!["web".into(), "api".into()] };
        assert_eq!(in_use.to_string(), "secret db is in use by service(s) web, api");
        assert_eq!(
            Status::from(StoreError::Rejected(in_use)).message(),
            "secret db is in use by service(s) web, api: remove it from them first (service update --secret-rm)"
        );
        let missing = Rejection::NotFound(Missing::AdminCert { serial: "0b".into() });
        assert_eq!(
            Status::from(StoreError::Rejected(missing)).message(),
            "no admin certificate with serial 0b: see secretctl admin-cert ls"
        );
        let spec = Rejection::InvalidSpec(crate::state::SpecError::Memory);
        assert!(!spec.to_string().contains("--"), "{spec}");
        assert_eq!(Status::from(StoreError::Rejected(spec)).message(), "--memory: at least 4 MiB (4194304)");
        assert_eq!(StoreError::NotLeader { leader: Some(3) }.to_string(), "no quorum: not the leader; leader is 3");
    }
}
