//! Tasks in the replicated state: one run of one replica of a service on one
//! node, indexed by node, and the commands the scheduler and the nodes write.
//!
//! | key                      | value |
//! |--------------------------|-------|
//! | `task/<id>`              | [`TaskRecord`] |
//! | `nodetask/<node>/<task>` | an index of each node's tasks (empty value) |

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use swarmd_certs::{NodeId, ServiceId, TaskId};

use super::services::ServiceSpec;
use super::{encode, Command, Rejection, StateError, StateView, WriteBatch};

/// Where a task is in its life. Ordered: a task only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TaskState {
    /// Placed on a node; the node has not picked it up yet.
    Assigned,
    /// The node is mounting its secrets and preparing its container.
    Preparing,
    /// Its container runs.
    Running,
    /// It exited with status 0.
    Complete,
    /// It exited otherwise, or could not start.
    Failed,
    /// It was stopped.
    Shutdown,
    /// The node refused it (policy, bad image).
    Rejected,
}

impl TaskState {
    /// Whether the task has ended.
    pub fn is_terminal(self) -> bool {
        self >= TaskState::Complete
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskState::Assigned => "assigned",
            TaskState::Preparing => "preparing",
            TaskState::Running => "running",
            TaskState::Complete => "complete",
            TaskState::Failed => "failed",
            TaskState::Shutdown => "shutdown",
            TaskState::Rejected => "rejected",
        })
    }
}

/// One run of one replica on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Its ID.
    pub id: TaskId,
    /// Its service.
    pub service: ServiceId,
    /// Its replica slot, 1-based.
    pub slot: u32,
    /// The node it runs on.
    pub node: NodeId,
    /// The service version it runs.
    pub spec_version: u64,
    /// The spec it runs (a copy, so the node never needs the service).
    pub spec: ServiceSpec,
    /// Whether it should run.
    pub desired_running: bool,
    /// Where it is.
    pub state: TaskState,
    /// The last error or note.
    pub message: String,
    /// Created, unix seconds.
    pub created_at: i64,
    /// Last change, unix seconds.
    pub updated_at: i64,
}

/// A task status report from its node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskUpdate {
    /// The task.
    pub task: TaskId,
    /// Its new state.
    pub state: TaskState,
    /// An error or note.
    pub message: String,
}

const TASK_PREFIX: &str = "task/";
const NODE_TASK_PREFIX: &str = "nodetask/";

fn task_key(id: &TaskId) -> Vec<u8> {
    format!("{TASK_PREFIX}{id}").into_bytes()
}
fn node_task_key(node: &NodeId, task: &TaskId) -> Vec<u8> {
    format!("{NODE_TASK_PREFIX}{node}/{task}").into_bytes()
}

impl StateView {
    /// One task.
    pub fn task(&self, id: &TaskId) -> Result<Option<TaskRecord>, StateError> {
        self.get(&task_key(id))
    }

    /// All tasks, by ID.
    pub fn tasks(&self) -> Result<Vec<TaskRecord>, StateError> {
        self.scan(TASK_PREFIX)
    }

    /// The tasks placed on `node` (an index lookup, not a scan of every task).
    pub fn node_tasks(&self, node: &NodeId) -> Result<Vec<TaskRecord>, StateError> {
        let mut out = Vec::new();
        let prefix = format!("{NODE_TASK_PREFIX}{node}/");
        for id in self.scan_key_suffixes(&prefix)? {
            if let Ok(id) = id.parse::<TaskId>() {
                if let Some(t) = self.task(&id)? {
                    out.push(t);
                }
            }
        }
        Ok(out)
    }
}

/// Writes a task and its node index entry.
pub(super) fn put_task(batch: &mut WriteBatch, t: &TaskRecord) {
    batch.insert(task_key(&t.id), encode(t));
    batch.insert(node_task_key(&t.node, &t.id), Vec::<u8>::new());
}

/// Deletes a task and its node index entry.
fn delete_task(batch: &mut WriteBatch, t: &TaskRecord) {
    batch.remove(task_key(&t.id));
    batch.remove(node_task_key(&t.node, &t.id));
}

/// Groups tasks by service.
pub fn tasks_by_service(tasks: Vec<TaskRecord>) -> BTreeMap<ServiceId, Vec<TaskRecord>> {
    let mut m: BTreeMap<ServiceId, Vec<TaskRecord>> = BTreeMap::new();
    for t in tasks {
        m.entry(t.service.clone()).or_default().push(t);
    }
    m
}

/// The task commands of [`super::plan`]: `Schedule` (the scheduler's
/// decisions) and `TaskStatus` (reports from the nodes). Neither is refused:
/// a decision or report about something gone meanwhile is skipped.
pub(super) fn plan_tasks(view: &StateView, cmd: &Command) -> Result<Result<WriteBatch, Rejection>, StateError> {
    let mut batch = WriteBatch::default();
    match cmd {
        Command::Schedule { create, stop, delete } => {
            for t in create {
                if view.service(&t.service)?.is_none() || view.node(&t.node)?.is_none() || view.task(&t.id)?.is_some() {
                    continue;
                }
                put_task(&mut batch, t);
            }
            for id in stop {
                if let Some(mut t) = view.task(id)? {
                    if t.desired_running {
                        t.desired_running = false;
                        put_task(&mut batch, &t);
                    }
                }
            }
            for id in delete {
                if let Some(t) = view.task(id)? {
                    if !t.desired_running {
                        delete_task(&mut batch, &t);
                    }
                }
            }
        }
        Command::TaskStatus { node, updates, at } => {
            for u in updates {
                let Some(mut t) = view.task(&u.task)? else { continue };
                if t.node != *node || u.state < t.state || (u.state == t.state && u.message == t.message) {
                    continue;
                }
                t.state = u.state;
                t.message = u.message.chars().take(1024).collect();
                t.updated_at = *at;
                put_task(&mut batch, &t);
            }
        }
        _ => unreachable!("not a task command"),
    }
    Ok(Ok(batch))
}
