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

use crate::services::{tasks_by_service, TaskRecord, TaskState};
use crate::state::{Availability, Command, NodeRecord, NodeStatus, StateError, StateView};
use crate::store::Store;
use swarmd_certs::now_unix;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::{Constraint, ServiceRecord, TaskUpdate};
    use crate::state::tests::{apply, initialised, node, service, task};
    use crate::state::StatusChange;

    const T0: i64 = 1_000;

    /// The decisions of one pass: tasks created, stopped, deleted.
    type Decisions = (Vec<TaskRecord>, Vec<TaskId>, Vec<TaskId>);

    struct World {
        view: StateView,
        down: HashMap<NodeId, Instant>,
        start: Instant,
    }

    impl World {
        fn new() -> Self {
            Self { view: initialised().0, down: HashMap::new(), start: Instant::now() }
        }

        fn worker(&self, f: impl FnOnce(&mut NodeRecord)) -> NodeId {
            let mut n = node(Role::Worker);
            n.status = NodeStatus::Ready;
            f(&mut n);
            apply(&self.view, &Command::AddNode(n.clone())).unwrap();
            n.id
        }

        fn service(&self, name: &str, replicas: u32, f: impl FnOnce(&mut ServiceRecord)) -> ServiceRecord {
            let mut s = service(name, replicas);
            f(&mut s);
            apply(&self.view, &Command::CreateService(Box::new(s.clone()))).unwrap();
            s
        }

        fn set(&self, cmd: Command) {
            apply(&self.view, &cmd).unwrap();
        }

        /// One pass, `after` past the start and at unix time `unix`.
        fn decide_at(&mut self, after: Duration, unix: i64) -> Option<Decisions> {
            match reconcile(&self.view, &mut self.down, self.start + after, unix).unwrap() {
                None => None,
                Some(Command::Schedule { create, stop, delete }) => Some((create, stop, delete)),
                Some(other) => panic!("the scheduler proposed {other:?}"),
            }
        }

        fn decide(&mut self) -> Option<Decisions> {
            self.decide_at(Duration::ZERO, T0)
        }

        /// One pass, committed.
        fn run(&mut self) -> Decisions {
            let d = self.decide().expect("decisions");
            self.set(Command::Schedule { create: d.0.clone(), stop: d.1.clone(), delete: d.2.clone() });
            d
        }

        fn running(&self, svc: &ServiceRecord) -> Vec<TaskRecord> {
            let mut v: Vec<_> =
                self.view.tasks().unwrap().into_iter().filter(|t| t.service == svc.id && t.desired_running).collect();
            v.sort_by_key(|t| t.slot);
            v
        }
    }

    fn count_on(tasks: &[TaskRecord], node: &NodeId) -> usize {
        tasks.iter().filter(|t| t.node == *node).count()
    }

    #[test]
    fn without_services_or_tasks_there_is_nothing_to_do() {
        let mut w = World::new();
        let a = w.worker(|n| n.status = NodeStatus::Down);
        w.down.insert(a, w.start);
        assert!(w.decide().is_none());
        assert!(w.down.is_empty(), "down times are forgotten while there is nothing to schedule");
    }

    #[test]
    fn replicas_spread_over_ready_active_workers_only() {
        let mut w = World::new();
        let (a, b) = (w.worker(|_| {}), w.worker(|_| {}));
        w.worker(|n| n.availability = Availability::Drain);
        w.worker(|n| n.status = NodeStatus::Down);
        w.worker(|n| n.status = NodeStatus::Unknown);
        w.worker(|n| n.role = Role::Manager);
        let web = w.service("web", 4, |_| {});
        let (create, stop, delete) = w.decide().unwrap();
        assert!(stop.is_empty() && delete.is_empty());
        assert_eq!(create.iter().map(|t| t.slot).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!((count_on(&create, &a), count_on(&create, &b)), (2, 2), "{create:?}");
        for t in &create {
            assert_eq!(
                (t.service.clone(), t.spec_version, t.state, t.desired_running),
                (web.id.clone(), 1, TaskState::Assigned, true)
            );
            assert_eq!((t.created_at, &t.spec), (T0, &web.spec));
        }
    }

    #[test]
    fn a_new_replica_goes_to_the_worker_with_the_fewest_tasks_overall() {
        let mut w = World::new();
        let (a, b) = (w.worker(|_| {}), w.worker(|_| {}));
        let first = w.service("first", 1, |_| {});
        let (create, ..) = w.run();
        let busy = create[0].node.clone();
        let idle = if busy == a { b } else { a };
        w.service("second", 1, |_| {});
        let (create, ..) = w.decide().unwrap();
        assert_eq!(create.len(), 1);
        assert_eq!(create[0].node, idle, "placed beside {first:?}'s task");
    }

    #[test]
    fn constraints_limit_placement_and_without_a_suitable_node_nothing_is_placed() {
        let mut w = World::new();
        let eu = w.worker(|n| {
            n.labels.insert("zone".into(), "eu".into());
        });
        w.worker(|_| {});
        let pinned = |zone: &str| -> Constraint { format!("node.labels.zone=={zone}").parse().unwrap() };
        w.service("nowhere", 2, |s| s.spec.constraints = vec![pinned("us")]);
        assert!(w.decide().is_none(), "a replica was placed against its constraint");
        w.service("eu-only", 2, |s| s.spec.constraints = vec![pinned("eu")]);
        let (create, ..) = w.decide().unwrap();
        assert_eq!(create.len(), 2);
        assert!(create.iter().all(|t| t.node == eu), "{create:?}");
    }

    #[test]
    fn scaling_down_stops_the_highest_slots_and_scaling_up_refills_them() {
        let mut w = World::new();
        w.worker(|_| {});
        w.worker(|_| {});
        let web = w.service("web", 3, |_| {});
        w.run();
        let scale = |w: &World, replicas| {
            let mut spec = w.view.service(&web.id).unwrap().unwrap().spec;
            spec.replicas = replicas;
            w.set(Command::UpdateService { id: web.id.clone(), spec: Box::new(spec), expected_version: 1, at: T0 });
        };
        scale(&w, 1);
        let before = w.running(&web);
        let (create, stop, _) = w.run();
        assert!(create.is_empty());
        assert_eq!(stop, vec![before[2].id.clone(), before[1].id.clone()], "not the highest slots, highest first");
        assert_eq!(w.running(&web), vec![before[0].clone()]);
        scale(&w, 3);
        let (create, stop, _) = w.run();
        assert!(stop.is_empty(), "scaling up replaced a running task");
        assert_eq!(create.iter().map(|t| t.slot).collect::<Vec<_>>(), [2, 3]);
        assert!(w.decide().is_none(), "a settled service was scheduled again");
    }

    #[test]
    fn tasks_on_drained_or_removed_workers_move_elsewhere() {
        let mut w = World::new();
        let a = w.worker(|_| {});
        let web = w.service("web", 1, |_| {});
        w.run();
        let first = w.running(&web)[0].clone();
        assert_eq!(first.node, a);
        let b = w.worker(|_| {});
        w.set(Command::UpdateNode {
            node: a.clone(),
            availability: Some(Availability::Drain),
            labels_add: vec![],
            labels_rm: vec![],
        });
        let (create, stop, _) = w.run();
        assert_eq!(stop, vec![first.id]);
        assert_eq!((create.len(), create[0].node.clone(), create[0].slot), (1, b.clone(), 1));
        let c = w.worker(|_| {});
        let second = w.running(&web)[0].clone();
        w.set(Command::RemoveNodes { nodes: vec![b], deny_until: 0 });
        let (create, stop, _) = w.run();
        assert_eq!(stop, vec![second.id]);
        assert_eq!(create[0].node, c);
    }

    #[test]
    fn a_down_workers_tasks_move_only_after_three_heartbeats() {
        let mut w = World::new();
        let a = w.worker(|_| {});
        let web = w.service("web", 1, |_| {});
        w.run();
        let b = w.worker(|_| {});
        let me = NodeId::random();
        let status =
            |node: &NodeId, status| StatusChange { node: node.clone(), status, addr: None, reporter: me.clone() };
        w.set(Command::SetStatus(vec![status(&a, NodeStatus::Down)]));
        // The heartbeat is 5 s (the sample cluster's): the grace is 15 s from
        // when this scheduler first saw the worker down.
        assert!(w.decide_at(Duration::from_secs(1), T0).is_none());
        assert!(w.decide_at(Duration::from_secs(16), T0).is_none(), "moved within the grace");
        let (create, stop, _) = w.decide_at(Duration::from_secs(17), T0).expect("moved after the grace");
        assert_eq!(stop, vec![w.running(&web)[0].id.clone()]);
        assert_eq!(create[0].node, b);
        // Back before its grace ran out, it keeps its tasks.
        w.set(Command::SetStatus(vec![status(&a, NodeStatus::Ready)]));
        assert!(w.decide_at(Duration::from_secs(18), T0).is_none());
        assert!(w.down.is_empty());
        w.set(Command::SetStatus(vec![status(&a, NodeStatus::Down)]));
        assert!(w.decide_at(Duration::from_secs(20), T0).is_none(), "the grace restarts when it goes down again");
    }

    #[test]
    fn an_ended_task_is_replaced_in_its_slot_after_the_restart_delay() {
        let mut w = World::new();
        let a = w.worker(|_| {});
        let web = w.service("web", 1, |_| {});
        w.run();
        let t = w.running(&web)[0].clone();
        let update = TaskUpdate { task: t.id.clone(), state: TaskState::Failed, message: "exit 1".into() };
        w.set(Command::TaskStatus { node: a, updates: vec![update], at: T0 });
        let delay = RESTART_DELAY.as_secs() as i64;
        assert!(w.decide_at(Duration::ZERO, T0 + delay - 1).is_none(), "restarted before the delay");
        let (create, stop, _) = w.decide_at(Duration::ZERO, T0 + delay).unwrap();
        assert_eq!(stop, vec![t.id]);
        assert_eq!(create.iter().map(|t| t.slot).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn a_new_spec_replaces_the_tasks_of_the_old_one() {
        let mut w = World::new();
        w.worker(|_| {});
        let web = w.service("web", 2, |_| {});
        w.run();
        let mut old: Vec<TaskId> = w.running(&web).into_iter().map(|t| t.id).collect();
        old.sort();
        let mut spec = web.spec.clone();
        spec.env.push("B=2".into());
        w.set(Command::UpdateService { id: web.id.clone(), spec: Box::new(spec.clone()), expected_version: 1, at: T0 });
        let (create, mut stop, _) = w.run();
        stop.sort();
        assert_eq!(stop, old);
        assert_eq!(create.len(), 2);
        assert!(create.iter().all(|t| t.spec_version == 2 && t.spec == spec), "{create:?}");
    }

    #[test]
    fn ended_tasks_are_forgotten_beyond_the_newest_few() {
        let mut w = World::new();
        let a = w.worker(|_| {});
        let web = w.service("web", 0, |_| {});
        let ended: Vec<TaskRecord> = (1..=HISTORY as i64 + 2)
            .map(|at| TaskRecord {
                desired_running: false,
                state: TaskState::Shutdown,
                updated_at: at,
                ..task(&web, 1, &a)
            })
            .collect();
        w.set(Command::Schedule { create: ended.clone(), stop: vec![], delete: vec![] });
        let (create, stop, mut delete) = w.decide().unwrap();
        assert!(create.is_empty() && stop.is_empty());
        delete.sort();
        let mut oldest = vec![ended[0].id.clone(), ended[1].id.clone()];
        oldest.sort();
        assert_eq!(delete, oldest);
    }

    #[test]
    fn tasks_of_a_removed_service_are_forgotten_once_they_ended() {
        let mut w = World::new();
        let a = w.worker(|_| {});
        let web = w.service("web", 1, |_| {});
        w.run();
        let t = w.running(&web)[0].clone();
        w.set(Command::RemoveService { id: web.id.clone() });
        assert!(w.decide().is_none(), "a task still stopping was forgotten");
        let update = TaskUpdate { task: t.id.clone(), state: TaskState::Shutdown, message: String::new() };
        w.set(Command::TaskStatus { node: a, updates: vec![update], at: T0 });
        assert_eq!(w.decide(), Some((vec![], vec![], vec![t.id])));
    }
}
