//! The `Dispatcher` service: node sessions, heartbeats, task reports and output.
//!
//! Liveness lives in memory on the manager that holds a node's session; raft
//! sees only transitions (ready ↔ down), written in batches by the
//! [`StatusWriter`]. A node is ready once its session is open *and* it has
//! acknowledged the first, complete assignments it was sent (a node that
//! cannot receive them must not look healthy); a session that misses three
//! heartbeat periods, or stops acknowledging what it is sent for as long, is
//! cut and its node marked down. After a manager restart, nodes the store lists
//! as ready get the same grace period to come back before they are marked down.
//!
//! Tasks' workload identities are issued here too (`identity`).
//!
//! A worker is a potential attacker (invariant 12): what it reports is checked
//! against the store (its own tasks only), coalesced, cut to size and paid for
//! from its budget in [`crate::limits`] before anything reaches raft or memory.

mod identity;
mod liveness;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use swarmd_certs::{NodeId, Role, TaskId};
use swarmd_proto::dispatcher::dispatcher_server::{self, DispatcherServer};
use swarmd_proto::dispatcher::{
    HeartbeatRequest, HeartbeatResponse, IssueTaskIdentityRequest, IssueTaskIdentityResponse, PushLogsRequest,
    PushLogsResponse, SessionMessage, SessionRequest, UpdateTaskStatusRequest, UpdateTaskStatusResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub use liveness::StatusWriter;

use crate::auth::Authorizer;
use crate::cluster::SecretsCache;
use crate::limits::{self, NodeLimits, Spend};
use crate::services::{TaskState, TaskUpdate};
use crate::state::{Command, NodeStatus, StatusChange};
use crate::store::Store;
use swarmd_certs::now_unix;

/// Missed periods after which a node is down.
const GRACE_MULTIPLIER: u32 = 3;

/// What a session has been sent and what the node has acknowledged.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// `seq` of the last complete set of assignments sent.
    pub(crate) sent: u64,
    /// `seq` the node last acknowledged.
    pub(crate) acked: u64,
    /// Since when something sent is unacknowledged.
    pub(crate) unacked_since: Option<Instant>,
}

impl Progress {
    /// Records that the set ending with message `seq` went out.
    pub(crate) fn sent(&mut self, seq: u64) {
        self.sent = seq;
        self.unacked_since.get_or_insert_with(Instant::now);
    }

    /// Records the node's acknowledgement; returns whether it was the first.
    fn ack(&mut self, seq: u64) -> bool {
        if seq == 0 || seq <= self.acked || seq > self.sent {
            return false;
        }
        let first = self.acked == 0;
        self.acked = seq;
        if self.acked == self.sent {
            self.unacked_since = None;
        }
        first
    }
}

struct Session {
    id: String,
    since: i64,
    last_beat: Instant,
    last_beat_unix: i64,
    progress: Arc<Mutex<Progress>>,
    /// The address the session comes from, recorded when the node becomes ready
    /// (workers only; a manager's address is the one it advertises).
    addr: Option<String>,
    // Dropping the sender ends the node's session stream.
    _tx: mpsc::Sender<Result<SessionMessage, Status>>,
    // Dropping it stops the session's assignment stream (which holds a sender too).
    _assigner: tokio_util::sync::DropGuard,
}

/// What the control API shows about a live session.
#[derive(Clone, Debug, Default)]
pub struct SessionInfo {
    /// Session ID.
    pub id: String,
    /// Opened at, unix seconds.
    pub since: i64,
    /// Last heartbeat, unix seconds.
    pub last_heartbeat: i64,
}

struct Inner {
    store: Store,
    auth: Authorizer,
    secrets: SecretsCache,
    limits: NodeLimits,
    logs: crate::assignments::TaskLogs,
    me: NodeId,
    sessions: Mutex<HashMap<NodeId, Session>>,
    /// Nodes believed ready at startup that have not reconnected yet.
    expected: Mutex<HashMap<NodeId, Instant>>,
    status: mpsc::UnboundedSender<StatusChange>,
    /// Where workload certificates are signed (off the async workers).
    work: crate::limits::CaWork,
    /// Serves the blobs of the nodes' tasks' images.
    images: crate::images::Images,
}

/// Session bookkeeping shared by the gRPC service, the control API and the
/// liveness checker.
#[derive(Clone)]
pub struct Dispatcher(Arc<Inner>);

impl Dispatcher {
    /// A dispatcher for manager `me`, with the heartbeat period of the cluster
    /// record; returns it and the writer that must run beside it.
    pub fn new(
        store: Store,
        auth: Authorizer,
        secrets: SecretsCache,
        limits: NodeLimits,
        me: NodeId,
        images: crate::images::Images,
    ) -> (Self, StatusWriter) {
        let (tx, rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        let expected = store
            .view()
            .nodes()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| {
                n.role == Role::Worker && n.status != NodeStatus::Down && n.session_manager.as_ref() == Some(&me)
            })
            .map(|n| (n.id, now))
            .collect();
        let writer = StatusWriter::new(store.clone(), rx);
        let inner = Inner {
            store,
            auth,
            secrets,
            limits,
            logs: Default::default(),
            me,
            sessions: Mutex::default(),
            expected: Mutex::new(expected),
            status: tx,
            work: Default::default(),
            images,
        };
        (Self(Arc::new(inner)), writer)
    }

    /// The gRPC service.
    pub fn service(&self) -> DispatcherServer<Self> {
        DispatcherServer::new(self.clone()).max_decoding_message_size(limits::MAX_NODE_REQUEST)
    }

    /// Queues a liveness transition of `node`, reported by this manager.
    pub fn report(&self, node: NodeId, status: NodeStatus, addr: Option<String>) {
        let _ = self.0.status.send(StatusChange { node, status, addr, reporter: self.0.me.clone() });
    }

    fn report_as(&self, reporter: NodeId, node: NodeId, status: NodeStatus) {
        let _ = self.0.status.send(StatusChange { node, status, addr: None, reporter });
    }

    /// The heartbeat period (default 5 s until the cluster record is known).
    fn period(&self) -> Duration {
        self.0.secrets.get().map(|s| s.heartbeat).unwrap_or(Duration::from_secs(5))
    }

    fn grace(&self) -> Duration {
        self.period() * GRACE_MULTIPLIER
    }

    /// Addresses of every manager that is a raft member.
    fn managers(&self) -> Vec<String> {
        self.0.store.view().manager_addrs().unwrap_or_default()
    }

    /// Node IDs of every manager that is a raft member: the only servers a
    /// node should trust.
    fn manager_ids(&self) -> Vec<String> {
        let managers = self.0.store.view().managers().unwrap_or_default();
        managers.into_iter().filter(|m| m.raft_id.is_some()).map(|m| m.id.to_string()).collect()
    }

    /// Ends every session (on shutdown), so that nodes move to another manager at once.
    pub fn close_all(&self) {
        self.0.sessions.lock().expect("sessions lock").clear();
    }

    /// The live session of `node` on this manager.
    pub fn session(&self, node: &NodeId) -> Option<SessionInfo> {
        let s = self.0.sessions.lock().expect("sessions lock");
        s.get(node).map(|s| SessionInfo { id: s.id.clone(), since: s.since, last_heartbeat: s.last_beat_unix })
    }

    fn check_session(&self, node: &NodeId, session: &str) -> Result<(), Status> {
        match self.0.sessions.lock().expect("sessions lock").get(node) {
            Some(s) if s.id == session => Ok(()),
            _ => Err(crate::status::no_session()),
        }
    }

    /// This manager's node ID.
    pub fn me(&self) -> &NodeId {
        &self.0.me
    }

    /// Output of `task` held here (its node's session is on this manager).
    pub fn task_logs(&self, task: &TaskId) -> Vec<String> {
        self.0.logs.get(task)
    }

    /// The updates of `node`'s report that change something: its own tasks
    /// only (another node's, or one that no longer exists, are dropped), one per
    /// task (the furthest state; its last message), messages cut to size, and
    /// only those that move a task forward or change its message.
    fn effective_updates(&self, node: &NodeId, req: &UpdateTaskStatusRequest) -> Result<Vec<TaskUpdate>, Status> {
        if req.updates.len() > limits::MAX_UPDATES_PER_REQUEST {
            return Err(Status::invalid_argument(format!(
                "{} task updates in one request: at most {}",
                req.updates.len(),
                limits::MAX_UPDATES_PER_REQUEST
            )));
        }
        let mut latest: BTreeMap<TaskId, (TaskState, String)> = BTreeMap::new();
        for u in &req.updates {
            let task: TaskId = u.task_id.parse().map_err(crate::status::bad_id)?;
            let state = reported_state(u)?;
            let message = limits::truncate(&u.message, limits::MAX_STATUS_MESSAGE);
            match latest.get_mut(&task) {
                Some((s, m)) if state >= *s => (*s, *m) = (state, message),
                Some(_) => {}
                None => {
                    latest.insert(task, (state, message));
                }
            }
        }
        let view = self.0.store.view();
        let mut out = Vec::new();
        for (task, (state, message)) in latest {
            let Some(t) = view.task(&task).map_err(crate::status::internal)? else { continue };
            if t.node != *node {
                tracing::warn!(node.id = %node, task.id = %task, "a node reported another node's task: ignored");
                continue;
            }
            if state < t.state || (state == t.state && message == t.message) {
                continue;
            }
            out.push(TaskUpdate { task, state, message });
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl dispatcher_server::Dispatcher for Dispatcher {
    type SessionStream = ReceiverStream<Result<SessionMessage, Status>>;

    /// Worker or manager certificate. UNAVAILABLE if this manager does not know
    /// the node yet; RESOURCE_EXHAUSTED past the node's budget of session opens.
    /// The node's self-reported fields (the request's hostname) are ignored:
    /// placement trusts only what the cluster set.
    #[tracing::instrument(skip_all, fields(node.id))]
    async fn session(&self, req: Request<SessionRequest>) -> Result<Response<Self::SessionStream>, Status> {
        let peer = self.0.auth.require(&req, &[Role::Worker, Role::Manager])?;
        tracing::Span::current().record("node.id", tracing::field::display(&peer.node_id));
        // A session is opened only by a manager in touch with the cluster
        // (sessions already open go on through an election).
        self.0.auth.require_leader()?;
        self.0.limits.spend(&peer.node_id, Spend::Sessions, 1.0)?;
        let remote = Authorizer::info(&req).remote;
        let record = self.0.store.member(&peer.node_id)?;
        let mut raw = [0u8; 12];
        swarmd_certs::random_bytes(&mut raw);
        let session_id = hex::encode(raw);
        let (tx, rx) = mpsc::channel(16);
        let first = SessionMessage {
            session_id: session_id.clone(),
            heartbeat_period_ms: self.period().as_millis() as u64,
            node_id: peer.node_id.to_string(),
            role: record.role.to_string(),
            managers: self.managers(),
            manager_ids: self.manager_ids(),
            ..Default::default()
        };
        tx.send(Ok(first)).await.map_err(|_| Status::internal("session channel closed"))?;
        let assigner = CancellationToken::new();
        let progress = Arc::new(Mutex::new(Progress::default()));
        {
            let (store, secrets, node, tx, stop, progress) = (
                self.0.store.clone(),
                self.0.secrets.clone(),
                peer.node_id.clone(),
                tx.clone(),
                assigner.clone(),
                progress.clone(),
            );
            swarmd_certs::spawn_loop("session-stream", async move {
                tokio::select! {
                    _ = crate::assignments::stream(store, secrets, node, tx, progress) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
        let addr = remote.map(|a| a.ip().to_string()).filter(|a| *a != record.addr && record.role == Role::Worker);
        let session = Session {
            id: session_id,
            since: now_unix(),
            last_beat: Instant::now(),
            last_beat_unix: now_unix(),
            progress,
            addr,
            _tx: tx,
            _assigner: assigner.drop_guard(),
        };
        self.0.sessions.lock().expect("sessions lock").insert(peer.node_id.clone(), session);
        self.0.expected.lock().expect("expected lock").remove(&peer.node_id);
        tracing::info!("session opened");
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    /// Worker or manager certificate. NOT_FOUND for an unknown or superseded
    /// session; RESOURCE_EXHAUSTED past the node's heartbeat budget. The first
    /// acknowledgement of the session's assignments makes the node ready.
    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let peer = self.0.auth.require(&req, &[Role::Worker, Role::Manager])?;
        self.0.limits.spend(&peer.node_id, Spend::Heartbeats, 1.0)?;
        let role = self.0.store.member(&peer.node_id)?.role;
        let period_ms = self.period().as_millis() as u64;
        let ready = {
            let mut sessions = self.0.sessions.lock().expect("sessions lock");
            match sessions.get_mut(&peer.node_id) {
                Some(s) if s.id == req.get_ref().session_id => {
                    s.last_beat = Instant::now();
                    s.last_beat_unix = now_unix();
                    let first = s.progress.lock().expect("progress lock").ack(req.get_ref().assignments_seq);
                    first.then(|| s.addr.clone())
                }
                _ => return Err(crate::status::no_session()),
            }
        };
        if let Some(addr) = ready {
            tracing::info!(node.id = %peer.node_id, "node acknowledged its assignments: ready");
            self.report(peer.node_id.clone(), NodeStatus::Ready, addr);
        }
        Ok(Response::new(HeartbeatResponse { period_ms, role: role.to_string() }))
    }

    /// Worker certificate with its live session; only the node's own tasks
    /// (others are dropped). INVALID_ARGUMENT for more than 64 updates or a
    /// malformed one; RESOURCE_EXHAUSTED past the node's budget, with nothing
    /// written. Updates that change nothing are not proposed.
    async fn update_task_status(
        &self,
        req: Request<UpdateTaskStatusRequest>,
    ) -> Result<Response<UpdateTaskStatusResponse>, Status> {
        let peer = self.0.auth.require(&req, &[Role::Worker])?;
        self.check_session(&peer.node_id, &req.get_ref().session_id)?;
        let updates = self.effective_updates(&peer.node_id, req.get_ref())?;
        if !updates.is_empty() {
            self.0.limits.spend(&peer.node_id, Spend::StatusUpdates, updates.len() as f64)?;
            let cmd = Command::TaskStatus { node: peer.node_id.clone(), updates, at: now_unix() };
            self.0.store.propose(cmd).await?;
        }
        Ok(Response::new(UpdateTaskStatusResponse {}))
    }

    /// Worker certificate with its live session; only the node's own tasks.
    /// INVALID_ARGUMENT for more than 1,000 lines; RESOURCE_EXHAUSTED past the
    /// node's output budget. Lines are cut to 4 KiB; a task keeps its last
    /// 1,000 lines and 1 MiB here.
    async fn push_logs(&self, req: Request<PushLogsRequest>) -> Result<Response<PushLogsResponse>, Status> {
        let peer = self.0.auth.require(&req, &[Role::Worker])?;
        self.check_session(&peer.node_id, &req.get_ref().session_id)?;
        let r = req.into_inner();
        if r.lines.len() > limits::MAX_LOG_LINES_PER_REQUEST {
            return Err(Status::invalid_argument(format!(
                "{} lines in one request: at most {}",
                r.lines.len(),
                limits::MAX_LOG_LINES_PER_REQUEST
            )));
        }
        let task: TaskId = r.task_id.parse().map_err(crate::status::bad_id)?;
        match self.0.store.view().task(&task).map_err(crate::status::internal)? {
            Some(t) if t.node == peer.node_id => {
                let lines: Vec<String> = r.lines.iter().map(|l| limits::truncate(l, limits::MAX_LOG_LINE)).collect();
                let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
                self.0.limits.spend(&peer.node_id, Spend::LogBytes, bytes as f64)?;
                self.0.logs.push(task, lines);
                Ok(Response::new(PushLogsResponse {}))
            }
            _ => Err(Status::permission_denied("not a task of this node")),
        }
    }

    /// See [`identity`]: a workload certificate for one of the caller's own live tasks.
    #[tracing::instrument(skip_all)]
    async fn issue_task_identity(
        &self,
        req: Request<IssueTaskIdentityRequest>,
    ) -> Result<Response<IssueTaskIdentityResponse>, Status> {
        self.issue_identity(req).await
    }

    type FetchBlobStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<swarmd_proto::dispatcher::TaskBlobChunk, Status>> + Send>,
    >;

    /// A blob of the image of one of the caller's own live tasks (see
    /// [`crate::images::authorize_task_blob`]); PERMISSION_DENIED for any
    /// other, whoever's it is.
    #[tracing::instrument(skip_all)]
    async fn fetch_blob(
        &self,
        req: Request<swarmd_proto::dispatcher::FetchTaskBlobRequest>,
    ) -> Result<Response<Self::FetchBlobStream>, Status> {
        let peer = self.0.auth.require(&req, &[Role::Worker, Role::Manager])?;
        let r = req.into_inner();
        let stream = self.0.images.serve_task_blob(&peer.node_id, &r.task_id, &r.digest).await?;
        let chunks =
            tokio_stream::StreamExt::map(stream, |r| r.map(|data| swarmd_proto::dispatcher::TaskBlobChunk { data }));
        Ok(Response::new(Box::pin(chunks)))
    }
}

/// The state a node reports in one task status, in the manager's terms.
/// INVALID_ARGUMENT for the retired text field (an older worker), an unset
/// state, a number the enum does not know, or "assigned" (the manager's own).
fn reported_state(u: &swarmd_proto::dispatcher::TaskStatus) -> Result<TaskState, Status> {
    if !u.retired_state_text.is_empty() {
        return Err(Status::invalid_argument(
            "a task state sent as text by an older worker: upgrade the worker to this manager's version",
        ));
    }
    swarmd_proto::dispatcher::TaskState::try_from(u.state)
        .map_err(|_| Status::invalid_argument(format!("unknown task state {}", u.state)))
        .and_then(TaskState::try_from)
}

/// A task state as a node reports it, in the manager's terms: a node may say
/// anything but "assigned" (the manager's own) and the unset value.
impl TryFrom<swarmd_proto::dispatcher::TaskState> for TaskState {
    type Error = Status;
    fn try_from(s: swarmd_proto::dispatcher::TaskState) -> Result<Self, Status> {
        use swarmd_proto::dispatcher::TaskState as Wire;
        Ok(match s {
            Wire::Preparing => TaskState::Preparing,
            Wire::Running => TaskState::Running,
            Wire::Complete => TaskState::Complete,
            Wire::Failed => TaskState::Failed,
            Wire::Shutdown => TaskState::Shutdown,
            Wire::Rejected => TaskState::Rejected,
            Wire::Unspecified => return Err(Status::invalid_argument("a task status without a state")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarmd_proto::dispatcher::{TaskState as Wire, TaskStatus};

    #[test]
    fn a_reported_state_is_one_a_node_may_report() {
        let status =
            |state: i32, text: &str| TaskStatus { state, retired_state_text: text.into(), ..Default::default() };
        assert_eq!(reported_state(&status(Wire::Running.into(), "")).unwrap(), TaskState::Running);
        assert_eq!(reported_state(&status(Wire::Rejected.into(), "")).unwrap(), TaskState::Rejected);
        for bad in [status(Wire::Unspecified.into(), ""), status(7, ""), status(-1, ""), status(i32::MAX, "")] {
            assert_eq!(reported_state(&bad).unwrap_err().code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
        let old = reported_state(&status(Wire::Running.into(), "running")).unwrap_err();
        assert!(old.message().contains("upgrade the worker"), "{}", old.message());
    }
}
