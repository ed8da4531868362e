//! The `Dispatcher` service: node sessions and heartbeats.
//!
//! Liveness lives in memory on the manager that holds a node's session; raft
//! sees only transitions (ready ↔ down), written in batches by the
//! [`StatusWriter`]. A session that misses three heartbeat periods is cut and
//! its node marked down. After a manager restart, nodes the store lists as
//! ready get the same grace period to come back before they are marked down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use swarmd_certs::{NodeId, Role};
use swarmd_proto::dispatcher::dispatcher_server::{self, DispatcherServer};
use swarmd_proto::dispatcher::{
    HeartbeatRequest, HeartbeatResponse, PushLogsRequest, PushLogsResponse, SessionMessage, SessionRequest,
    UpdateTaskStatusRequest, UpdateTaskStatusResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::auth::Authorizer;
use crate::ca_service::{clean_hostname, now_unix};
use crate::cluster::SecretsCache;
use crate::state::{Command, NodeStatus, StatusChange};
use crate::store::Store;

/// Missed periods after which a node is down.
const GRACE_MULTIPLIER: u32 = 3;

struct Session {
    id: String,
    since: i64,
    last_beat: Instant,
    last_beat_unix: i64,
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
    logs: crate::assignments::TaskLogs,
    me: NodeId,
    sessions: Mutex<HashMap<NodeId, Session>>,
    /// Nodes believed ready at startup that have not reconnected yet.
    expected: Mutex<HashMap<NodeId, Instant>>,
    status: mpsc::UnboundedSender<StatusChange>,
}

/// Session bookkeeping shared by the gRPC service, the control API and the
/// liveness checker.
#[derive(Clone)]
pub struct Dispatcher(Arc<Inner>);

impl Dispatcher {
    /// A dispatcher for manager `me`, with the heartbeat period of the cluster
    /// record; returns it and the writer that must run beside it.
    pub fn new(store: Store, auth: Authorizer, secrets: SecretsCache, me: NodeId) -> (Self, StatusWriter) {
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
        let writer = StatusWriter { store: store.clone(), rx };
        let inner = Inner {
            store,
            auth,
            secrets,
            logs: Default::default(),
            me,
            sessions: Mutex::default(),
            expected: Mutex::new(expected),
            status: tx,
        };
        (Self(Arc::new(inner)), writer)
    }

    /// The gRPC service.
    pub fn service(&self) -> DispatcherServer<Self> {
        DispatcherServer::new(self.clone())
    }

    /// Queues a liveness transition of `node`, reported by this manager.
    pub fn report(&self, node: NodeId, status: NodeStatus, addr: Option<String>, hostname: Option<String>) {
        let _ = self.0.status.send(StatusChange { node, status, addr, hostname, reporter: self.0.me.clone() });
    }

    fn report_as(&self, reporter: NodeId, node: NodeId, status: NodeStatus) {
        let _ = self.0.status.send(StatusChange { node, status, addr: None, hostname: None, reporter });
    }

    /// On the leader: probes every other manager once a second. A manager that
    /// has not answered for three heartbeat periods is marked down, and so is
    /// every node whose session it held (unless the node has meanwhile opened a
    /// session elsewhere). A manager that answers again is marked ready.
    pub async fn run_manager_probe(self, peers: crate::store::Peers, shutdown: CancellationToken) {
        use swarmd_proto::ca::ca_client::CaClient;
        use swarmd_proto::ca::GetRootCaRequest;
        let mut last_ok: HashMap<NodeId, Instant> = HashMap::new();
        // Managers found down whose nodes were swept during this leadership.
        let mut swept: std::collections::HashSet<NodeId> = std::collections::HashSet::new();
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let m = self.0.store.raft().metrics().borrow().clone();
            if m.current_leader != Some(m.id) {
                last_ok.clear();
                swept.clear();
                continue;
            }
            let managers: Vec<_> = self
                .0
                .store
                .view()
                .managers()
                .unwrap_or_default()
                .into_iter()
                .filter(|n| n.raft_id.is_some() && n.id != self.0.me)
                .collect();
            let probes = managers.iter().map(|mgr| {
                let mut c = CaClient::new(peers.channel(&mgr.addr));
                async move {
                    let ok = tokio::time::timeout(Duration::from_secs(1), c.get_root_ca(GetRootCaRequest {})).await;
                    (mgr, matches!(ok, Ok(Ok(_))))
                }
            });
            let now = Instant::now();
            for (mgr, ok) in futures::future::join_all(probes).await {
                let seen = last_ok.entry(mgr.id.clone()).or_insert(now);
                if ok {
                    *seen = now;
                    swept.remove(&mgr.id);
                    if mgr.status != NodeStatus::Ready {
                        self.report_as(mgr.id.clone(), mgr.id.clone(), NodeStatus::Ready);
                    }
                } else if now.duration_since(*seen) > self.grace() {
                    if mgr.status != NodeStatus::Down {
                        tracing::warn!(node.id = %mgr.id, "manager unreachable: down");
                        self.report_as(mgr.id.clone(), mgr.id.clone(), NodeStatus::Down);
                    }
                    // Its sessions are gone: mark their nodes down, once per
                    // leadership (a scan of every node record).
                    if swept.insert(mgr.id.clone()) {
                        let nodes = self.0.store.view().nodes().unwrap_or_default();
                        for n in nodes.iter().filter(|n| {
                            n.status == NodeStatus::Ready
                                && n.session_manager.as_ref() == Some(&mgr.id)
                                && n.id != mgr.id
                        }) {
                            self.report_as(mgr.id.clone(), n.id.clone(), NodeStatus::Down);
                        }
                    }
                }
            }
        }
    }

    /// The heartbeat period (default 5 s until the cluster record is known).
    fn period(&self) -> Duration {
        self.0.secrets.get().map(|s| s.heartbeat).unwrap_or(Duration::from_secs(5))
    }

    /// Addresses of every manager that is a raft member.
    fn managers(&self) -> Vec<String> {
        self.0.store.view().manager_addrs().unwrap_or_default()
    }

    /// Ends every session (on shutdown), so that nodes move to another manager at once.
    pub fn close_all(&self) {
        self.0.sessions.lock().expect("sessions lock").clear();
    }

    /// Pushes the manager list to every session whenever it changes, until cancelled.
    pub async fn run_manager_updates(
        self,
        mut applied: tokio::sync::watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) {
        let mut last = self.managers();
        let mut denied = std::collections::HashSet::new();
        loop {
            tokio::select! {
                r = applied.changed() => if r.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
            // Coalesce: a burst of writes costs one pass, not one per entry (the
            // manager list is a scan of every node record).
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.cancelled() => return,
            }
            applied.borrow_and_update();
            // A removed node's session ends now (its certificate is refused from
            // here on by the deny-list, which is small).
            let now_denied = self.0.store.view().denied().unwrap_or_default();
            if now_denied != denied {
                let mut sessions = self.0.sessions.lock().expect("sessions lock");
                sessions.retain(|id, _| !now_denied.contains(id));
                denied = now_denied;
            }
            // Output of tasks that no longer exist is forgotten.
            if !self.0.logs.is_empty() {
                if let Ok(tasks) = self.0.store.view().tasks() {
                    self.0.logs.retain(&tasks.into_iter().map(|t| t.id).collect());
                }
            }
            let now = self.managers();
            if now == last {
                continue;
            }
            last = now.clone();
            let senders: Vec<_> = {
                let s = self.0.sessions.lock().expect("sessions lock");
                s.values().map(|s| (s.id.clone(), s._tx.clone())).collect()
            };
            for (id, tx) in senders {
                let msg = SessionMessage { session_id: id, managers: now.clone(), ..Default::default() };
                let _ = tx.try_send(Ok(msg));
            }
        }
    }

    /// The live session of `node` on this manager.
    pub fn session(&self, node: &NodeId) -> Option<SessionInfo> {
        let s = self.0.sessions.lock().expect("sessions lock");
        s.get(node).map(|s| SessionInfo { id: s.id.clone(), since: s.since, last_heartbeat: s.last_beat_unix })
    }

    fn grace(&self) -> Duration {
        self.period() * GRACE_MULTIPLIER
    }

    /// Marks nodes whose sessions missed three heartbeat periods as down, until cancelled.
    pub async fn run_checker(self, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let now = Instant::now();
            let grace = self.grace();
            let mut down = Vec::new();
            {
                let mut sessions = self.0.sessions.lock().expect("sessions lock");
                sessions.retain(|id, s| {
                    let alive = now.duration_since(s.last_beat) <= grace;
                    if !alive {
                        down.push(id.clone());
                    }
                    alive
                });
            }
            {
                let mut expected = self.0.expected.lock().expect("expected lock");
                expected.retain(|id, since| {
                    let waiting = now.duration_since(*since) <= grace;
                    if !waiting {
                        down.push(id.clone());
                    }
                    waiting
                });
            }
            for node in down {
                tracing::warn!(node.id = %node, "node missed {GRACE_MULTIPLIER} heartbeats: down");
                self.report(node, NodeStatus::Down, None, None);
            }
        }
    }
}

#[tonic::async_trait]
impl dispatcher_server::Dispatcher for Dispatcher {
    type SessionStream = ReceiverStream<Result<SessionMessage, Status>>;

    /// Worker or manager certificate. NOT_FOUND if the node was removed.
    #[tracing::instrument(skip_all, fields(node.id))]
    async fn session(&self, req: Request<SessionRequest>) -> Result<Response<Self::SessionStream>, Status> {
        let peer = self.0.auth.require(&req, &[Role::Worker, Role::Manager])?;
        tracing::Span::current().record("node.id", tracing::field::display(&peer.node_id));
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
            assignments: None,
        };
        tx.send(Ok(first)).await.map_err(|_| Status::internal("session channel closed"))?;
        let assigner = CancellationToken::new();
        {
            let (store, secrets, node, tx, stop) =
                (self.0.store.clone(), self.0.secrets.clone(), peer.node_id.clone(), tx.clone(), assigner.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = crate::assignments::stream(store, secrets, node, tx) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
        let session = Session {
            id: session_id,
            since: now_unix(),
            last_beat: Instant::now(),
            last_beat_unix: now_unix(),
            _tx: tx,
            _assigner: assigner.drop_guard(),
        };
        self.0.sessions.lock().expect("sessions lock").insert(peer.node_id.clone(), session);
        self.0.expected.lock().expect("expected lock").remove(&peer.node_id);
        let addr = remote.map(|a| a.ip().to_string()).filter(|a| *a != record.addr);
        let hostname = Some(clean_hostname(&req.get_ref().hostname)).filter(|h| !h.is_empty() && *h != record.hostname);
        self.report(peer.node_id.clone(), NodeStatus::Ready, addr, hostname);
        tracing::info!("session opened");
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    /// Worker or manager certificate. NOT_FOUND for an unknown or superseded session.
    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let peer = self.0.auth.require(&req, &[Role::Worker, Role::Manager])?;
        let role = self.0.store.member(&peer.node_id)?.role;
        let period_ms = self.period().as_millis() as u64;
        let mut sessions = self.0.sessions.lock().expect("sessions lock");
        match sessions.get_mut(&peer.node_id) {
            Some(s) if s.id == req.get_ref().session_id => {
                s.last_beat = Instant::now();
                s.last_beat_unix = now_unix();
                Ok(Response::new(HeartbeatResponse { period_ms, role: role.to_string() }))
            }
            _ => Err(Status::not_found("no such session: open a new one")),
        }
    }

    /// Worker certificate with its live session; only the node's own tasks.
    async fn update_task_status(
        &self,
        req: Request<UpdateTaskStatusRequest>,
    ) -> Result<Response<UpdateTaskStatusResponse>, Status> {
        let peer = self.0.auth.require(&req, &[Role::Worker])?;
        self.check_session(&peer.node_id, &req.get_ref().session_id)?;
        let mut updates = Vec::new();
        for u in &req.get_ref().updates {
            let task = u.task_id.parse().map_err(|e: swarmd_certs::IdError| Status::invalid_argument(e.to_string()))?;
            let state = u.state.parse().map_err(Status::invalid_argument)?;
            updates.push(crate::services::TaskUpdate { task, state, message: u.message.clone() });
        }
        if !updates.is_empty() {
            let cmd = Command::TaskStatus { node: peer.node_id.clone(), updates, at: now_unix() };
            self.0.store.propose(cmd).await?;
        }
        Ok(Response::new(UpdateTaskStatusResponse {}))
    }

    /// Worker certificate with its live session; only the node's own tasks.
    async fn push_logs(&self, req: Request<PushLogsRequest>) -> Result<Response<PushLogsResponse>, Status> {
        let peer = self.0.auth.require(&req, &[Role::Worker])?;
        self.check_session(&peer.node_id, &req.get_ref().session_id)?;
        let r = req.into_inner();
        let task: swarmd_certs::TaskId =
            r.task_id.parse().map_err(|e: swarmd_certs::IdError| Status::invalid_argument(e.to_string()))?;
        match self.0.store.view().task(&task).map_err(|e| Status::internal(e.to_string()))? {
            Some(t) if t.node == peer.node_id => {
                self.0.logs.push(task, r.lines);
                Ok(Response::new(PushLogsResponse {}))
            }
            _ => Err(Status::permission_denied("not a task of this node")),
        }
    }
}

impl Dispatcher {
    fn check_session(&self, node: &NodeId, session: &str) -> Result<(), Status> {
        match self.0.sessions.lock().expect("sessions lock").get(node) {
            Some(s) if s.id == session => Ok(()),
            _ => Err(Status::not_found("no such session: open a new one")),
        }
    }

    /// This manager's node ID.
    pub fn me(&self) -> &NodeId {
        &self.0.me
    }

    /// Output of `task` held here (its node's session is on this manager).
    pub fn task_logs(&self, task: &swarmd_certs::TaskId) -> Vec<String> {
        self.0.logs.get(task)
    }
}

/// Writes liveness transitions through raft in batches: whatever arrives within
/// 20 ms of the first change rides the same proposal.
pub struct StatusWriter {
    store: Store,
    rx: mpsc::UnboundedReceiver<StatusChange>,
}

impl StatusWriter {
    /// Runs until cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut pending: HashMap<NodeId, StatusChange> = HashMap::new();
        loop {
            if pending.is_empty() {
                tokio::select! {
                    c = self.rx.recv() => match c { Some(c) => { pending.insert(c.node.clone(), c); } None => return },
                    _ = shutdown.cancelled() => return,
                }
            }
            let window = tokio::time::sleep(Duration::from_millis(20));
            tokio::pin!(window);
            loop {
                tokio::select! {
                    c = self.rx.recv() => match c { Some(c) => { merge(&mut pending, c); } None => break },
                    _ = &mut window => break,
                }
            }
            let changes: Vec<StatusChange> = pending
                .values()
                .filter(|c| match self.store.view().node(&c.node) {
                    Ok(Some(n)) => {
                        n.status != c.status
                            || c.addr.is_some()
                            || c.hostname.is_some()
                            || (c.status == NodeStatus::Ready && n.session_manager.as_ref() != Some(&c.reporter))
                    }
                    _ => false,
                })
                .cloned()
                .collect();
            if changes.is_empty() {
                pending.clear();
                continue;
            }
            match self.store.propose(Command::SetStatus(changes)).await {
                Ok(()) => pending.clear(),
                Err(e) => {
                    tracing::warn!(error = %e, "could not record node status; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
}

fn merge(pending: &mut HashMap<NodeId, StatusChange>, c: StatusChange) {
    match pending.get_mut(&c.node) {
        Some(p) => {
            p.status = c.status;
            if c.addr.is_some() {
                p.addr = c.addr;
            }
            if c.hostname.is_some() {
                p.hostname = c.hostname;
            }
        }
        None => {
            pending.insert(c.node.clone(), c);
        }
    }
}
