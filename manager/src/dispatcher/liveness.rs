//! The dispatcher's loops: the liveness checker, the leader's probe of the
//! other managers, the manager list pushed down every session, and the writer
//! that batches liveness transitions into raft.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use swarmd_certs::NodeId;
use swarmd_proto::dispatcher::SessionMessage;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Dispatcher, GRACE_MULTIPLIER};
use crate::state::{Command, NodeStatus, StatusChange};
use crate::store::Store;

impl Dispatcher {
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
        let mut orphans = Orphans::default();
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
                orphans = Orphans::default();
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
            let mut current: std::collections::BTreeSet<NodeId> = managers.iter().map(|m| m.id.clone()).collect();
            current.insert(self.0.me.clone());
            for (node, reporter) in orphans.due(&self.0.store, current, self.grace()) {
                tracing::warn!(node.id = %node, "node ready with no live session on any current manager: down");
                self.report_as(reporter, node, NodeStatus::Down);
            }
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

    /// Pushes the manager list to every session whenever it changes, until cancelled.
    pub async fn run_manager_updates(
        self,
        mut applied: tokio::sync::watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) {
        let mut last = self.managers();
        let mut denied = swarmd_certs::tls::Denied::default();
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
                sessions.retain(|id, _| !now_denied.nodes.contains(id));
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
            let ids = self.manager_ids();
            for (id, tx) in senders {
                let msg = SessionMessage {
                    session_id: id,
                    managers: now.clone(),
                    manager_ids: ids.clone(),
                    ..Default::default()
                };
                let _ = tx.try_send(Ok(msg));
            }
        }
    }

    /// Marks nodes whose sessions missed three heartbeat periods as down, until cancelled.
    pub async fn run_checker(self, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(Duration::from_millis(50));
        let mut last_prune = Instant::now();
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
                    let beating = now.duration_since(s.last_beat) <= grace;
                    // A node that does not acknowledge what it is sent is not
                    // making progress, however well it heartbeats.
                    let stuck = s
                        .progress
                        .lock()
                        .expect("progress lock")
                        .unacked_since
                        .is_some_and(|t| now.duration_since(t) > grace);
                    if beating && stuck {
                        tracing::warn!(node.id = %id, "node does not acknowledge its assignments: session cut");
                    }
                    if !beating || stuck {
                        down.push(id.clone());
                    }
                    beating && !stuck
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
                tracing::warn!(node.id = %node, "node missed {GRACE_MULTIPLIER} heartbeat periods: down");
                self.report(node, NodeStatus::Down, None);
            }
            if last_prune.elapsed() > Duration::from_secs(60) {
                self.0.limits.prune(Duration::from_secs(600));
                last_prune = now;
            }
        }
    }
}

/// Ready nodes whose session is on no current manager: the manager that held
/// it was removed (a forced new cluster, a demotion) or is unknown. Found by a
/// scan of every node record when this manager becomes leader and whenever the
/// set of managers changes; each goes down after the usual grace unless it has
/// opened a session on a current manager meanwhile. (A current manager that
/// went away is the probe's to sweep; one that restarted expects its nodes back.)
#[derive(Default)]
struct Orphans {
    /// The managers at the last scan (`None`: not scanned this leadership).
    scanned: Option<std::collections::BTreeSet<NodeId>>,
    /// Node, the manager its record names, and when it was found.
    found: HashMap<NodeId, (Option<NodeId>, Instant)>,
}

impl Orphans {
    /// The orphans past `grace`, with the manager to report them as (the one
    /// their record names, so that the state machine accepts the report).
    fn due(
        &mut self,
        store: &Store,
        current: std::collections::BTreeSet<NodeId>,
        grace: Duration,
    ) -> Vec<(NodeId, NodeId)> {
        let now = Instant::now();
        let orphaned = |n: &crate::state::NodeRecord, current: &std::collections::BTreeSet<NodeId>| {
            n.status == NodeStatus::Ready
                && n.role == swarmd_certs::Role::Worker
                && n.session_manager.as_ref().is_none_or(|m| !current.contains(m))
        };
        if self.scanned.as_ref() != Some(&current) {
            for n in store.view().nodes().unwrap_or_default().into_iter().filter(|n| orphaned(n, &current)) {
                self.found.entry(n.id.clone()).or_insert((n.session_manager.clone(), now));
            }
            self.scanned = Some(current.clone());
        }
        let mut due = Vec::new();
        self.found.retain(|id, (manager, since)| {
            let Ok(Some(n)) = store.view().node(id) else { return false };
            if !orphaned(&n, &current) || n.session_manager != *manager {
                return false;
            }
            if now.duration_since(*since) <= grace {
                return true;
            }
            due.push((id.clone(), manager.clone().unwrap_or_else(|| id.clone())));
            false
        });
        due
    }
}

/// Writes liveness transitions through raft in batches: whatever arrives within
/// 20 ms of the first change rides the same proposal.
pub struct StatusWriter {
    store: Store,
    rx: mpsc::UnboundedReceiver<StatusChange>,
}

impl StatusWriter {
    pub(super) fn new(store: Store, rx: mpsc::UnboundedReceiver<StatusChange>) -> Self {
        Self { store, rx }
    }

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

/// Folds `c` into what is pending for its node. Reports made as different
/// managers (a session's own and the leader's for a manager that went away)
/// are never mixed — the state machine accepts a report only from the manager
/// the record names, so a mixed one could be refused as a whole: one of them
/// is kept whole, and a session's word that the node is ready beats another
/// manager's that it is down.
fn merge(pending: &mut HashMap<NodeId, StatusChange>, c: StatusChange) {
    match pending.get_mut(&c.node) {
        Some(p) if p.reporter != c.reporter => {
            if c.status == NodeStatus::Ready || p.status != NodeStatus::Ready {
                *p = c;
            }
        }
        Some(p) => {
            p.status = c.status;
            if c.addr.is_some() {
                p.addr = c.addr;
            }
        }
        None => {
            pending.insert(c.node.clone(), c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_as_different_managers_are_never_mixed() {
        let (node, gone, live): (NodeId, NodeId, NodeId) =
            ("n".repeat(25).parse().unwrap(), "g".repeat(25).parse().unwrap(), "l".repeat(25).parse().unwrap());
        let change = |status, reporter: &NodeId| StatusChange {
            node: node.clone(),
            status,
            addr: None,
            reporter: reporter.clone(),
        };
        let mut pending = HashMap::new();
        merge(&mut pending, change(NodeStatus::Down, &gone));
        merge(&mut pending, change(NodeStatus::Ready, &live));
        let p = &pending[&node];
        assert_eq!((p.status, &p.reporter), (NodeStatus::Ready, &live));
        // The sweep's late word does not undo a live session's.
        merge(&mut pending, change(NodeStatus::Down, &gone));
        assert_eq!((pending[&node].status, &pending[&node].reporter), (NodeStatus::Ready, &live));
        merge(&mut pending, change(NodeStatus::Down, &live));
        assert_eq!((pending[&node].status, &pending[&node].reporter), (NodeStatus::Down, &live));
    }
}
