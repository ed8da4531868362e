//! The scheduler: on the leader, keeps every service at its replica count.
//!
//! After each applied change (coalesced) and once a second, it compares the
//! services with their tasks and proposes one `Schedule` entry:
//! * a task is stopped (and replaced) when its node is removed, drained, or
//!   DOWN for longer than three heartbeat periods; when it ended more than
//!   [`RESTART_DELAY`] ago (tasks restart whatever their exit status, as
//!   Swarm's default); or when its service's spec changed;
//! * missing replicas are placed on READY, active workers that match every
//!   constraint, spreading them: fewest tasks of the service first, then
//!   fewest tasks overall;
//! * ended tasks are forgotten beyond the [`HISTORY`] newest per service.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use swarmd_certs::{NodeId, Role, TaskId};
use tokio_util::sync::CancellationToken;

use crate::ca_service::now_unix;
use crate::services::{tasks_by_service, TaskRecord, TaskState};
use crate::state::{Availability, Command, NodeRecord, NodeStatus, StateError, StateView};
use crate::store::Store;

/// How long an ended task stays before it is replaced.
pub const RESTART_DELAY: Duration = Duration::from_secs(5);
/// Ended tasks kept per service for `service ps`.
pub const HISTORY: usize = 5;

/// Runs until cancelled; acts only while this manager leads.
pub(crate) async fn run(store: Store, mut applied: tokio::sync::watch::Receiver<u64>, shutdown: CancellationToken) {
    let mut down_since: HashMap<NodeId, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = applied.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        // Coalesce a burst of entries into one pass.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = shutdown.cancelled() => return,
        }
        applied.borrow_and_update();
        let m = store.raft().metrics().borrow().clone();
        if m.current_leader != Some(m.id) {
            down_since.clear();
            continue;
        }
        let cmd = match reconcile(store.view(), &mut down_since, Instant::now(), now_unix()) {
            Ok(Some(cmd)) => cmd,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(error = %e, "scheduler cannot read the state");
                continue;
            }
        };
        if let Err(e) = store.propose(cmd).await {
            tracing::warn!(error = %e, "scheduling decision not committed; retrying");
        }
    }
}

/// One pass: the decisions to propose, if any.
pub(crate) fn reconcile(
    view: &StateView,
    down_since: &mut HashMap<NodeId, Instant>,
    now: Instant,
    now_unix: i64,
) -> Result<Option<Command>, StateError> {
    // Every applied entry wakes the scheduler (secret writes too): with no
    // services and no tasks there is nothing to read the nodes for.
    let services = view.services()?;
    let tasks = view.tasks()?;
    if services.is_empty() && tasks.is_empty() {
        down_since.clear();
        return Ok(None);
    }
    let heartbeat = view.cluster()?.map_or(5000, |c| c.heartbeat_ms);
    let grace = Duration::from_millis(heartbeat * 3);
    let nodes: HashMap<NodeId, NodeRecord> = view.nodes()?.into_iter().map(|n| (n.id.clone(), n)).collect();
    down_since.retain(|id, _| nodes.get(id).is_some_and(|n| n.status == NodeStatus::Down));
    for n in nodes.values().filter(|n| n.status == NodeStatus::Down) {
        down_since.entry(n.id.clone()).or_insert(now);
    }
    let lost = |id: &NodeId| match nodes.get(id) {
        None => true,
        Some(n) => {
            n.availability == Availability::Drain
                || (n.status == NodeStatus::Down && down_since.get(id).is_some_and(|t| now.duration_since(*t) > grace))
        }
    };
    let usable = |n: &NodeRecord| {
        n.role == Role::Worker && n.status == NodeStatus::Ready && n.availability == Availability::Active
    };

    let mut by_service = tasks_by_service(tasks);
    let mut load: HashMap<NodeId, usize> = HashMap::new();
    for t in by_service.values().flatten().filter(|t| t.desired_running) {
        *load.entry(t.node.clone()).or_default() += 1;
    }
    let (mut create, mut stop, mut delete) = (Vec::new(), Vec::new(), Vec::<TaskId>::new());
    for svc in &services {
        let tasks = by_service.remove(&svc.id).unwrap_or_default();
        let mut live: Vec<&TaskRecord> = Vec::new();
        for t in tasks.iter().filter(|t| t.desired_running) {
            // An ended task keeps its slot until the restart delay has passed.
            let ended_long_ago = t.state.is_terminal() && now_unix - t.updated_at >= RESTART_DELAY.as_secs() as i64;
            if lost(&t.node) || ended_long_ago || t.spec_version != svc.version {
                stop.push(t.id.clone());
                *load.entry(t.node.clone()).or_default() -= 1;
            } else {
                live.push(t);
            }
        }
        live.sort_by_key(|t| t.slot);
        while live.len() > svc.spec.replicas as usize {
            let t = live.pop().expect("non-empty");
            stop.push(t.id.clone());
            *load.entry(t.node.clone()).or_default() -= 1;
        }
        let used: Vec<u32> = live.iter().map(|t| t.slot).collect();
        let mut per_node: HashMap<NodeId, usize> = HashMap::new();
        for t in &live {
            *per_node.entry(t.node.clone()).or_default() += 1;
        }
        for slot in (1..=svc.spec.replicas).filter(|s| !used.contains(s)) {
            let pick = nodes
                .values()
                .filter(|n| usable(n) && svc.spec.constraints.iter().all(|c| c.matches(n)))
                .min_by_key(|n| {
                    (per_node.get(&n.id).copied().unwrap_or(0), load.get(&n.id).copied().unwrap_or(0), n.id.clone())
                });
            let Some(node) = pick else {
                tracing::debug!(service = %svc.name, slot, "no suitable node for a replica");
                break;
            };
            *per_node.entry(node.id.clone()).or_default() += 1;
            *load.entry(node.id.clone()).or_default() += 1;
            create.push(TaskRecord {
                id: TaskId::random(),
                service: svc.id.clone(),
                slot,
                node: node.id.clone(),
                spec_version: svc.version,
                spec: svc.spec.clone(),
                desired_running: true,
                state: TaskState::Assigned,
                message: String::new(),
                created_at: now_unix,
                updated_at: now_unix,
            });
        }
        // History: ended, unwanted tasks beyond the newest few.
        let mut done: Vec<&TaskRecord> = tasks
            .iter()
            .filter(|t| !t.desired_running && (t.state.is_terminal() || !nodes.contains_key(&t.node)))
            .collect();
        done.sort_by_key(|t| std::cmp::Reverse(t.updated_at));
        delete.extend(done.into_iter().skip(HISTORY).map(|t| t.id.clone()));
    }
    // Tasks of removed services: forgotten once they ended (or their node is gone).
    for t in by_service.into_values().flatten() {
        if !t.desired_running && (t.state.is_terminal() || !nodes.contains_key(&t.node)) {
            delete.push(t.id);
        } else if t.desired_running {
            stop.push(t.id);
        }
    }
    if create.is_empty() && stop.is_empty() && delete.is_empty() {
        return Ok(None);
    }
    Ok(Some(Command::Schedule { create, stop, delete }))
}
