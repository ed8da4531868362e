//! Services and tasks in the replicated state: what a service asks for, the
//! tasks that run it, and the rules that apply when they change.
//!
//! | key                     | value |
//! |-------------------------|-------|
//! | `service/<id>`          | [`ServiceRecord`] |
//! | `servicename/<name>`    | the service's ID: names are unique |
//! | `task/<id>`             | [`TaskRecord`] |
//! | `nodetask/<node>/<task>`| an index of each node's tasks (empty value) |

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use swarmd_certs::{NodeId, SecretId, ServiceId, TaskId};

use crate::state::{check_secret_name, encode, Command, NodeRecord, StateError, StateView};

/// How a task sees one secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRef {
    /// The secret.
    pub secret: SecretId,
    /// Its name when the reference was made (for display).
    pub name: String,
    /// File name below `/run/secrets`.
    pub target: String,
    /// Owner, group and mode of the file.
    pub uid: u32,
    /// Group of the file.
    pub gid: u32,
    /// Mode of the file.
    pub mode: u32,
    /// A fixed version (`SRC@N`), or `None` to follow updates.
    pub pin: Option<u32>,
}

/// What a constraint compares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConstraintKey {
    /// `node.id`
    NodeId,
    /// `node.hostname`
    Hostname,
    /// `node.role`
    Role,
    /// `node.labels.K`
    Label(String),
}

/// A placement constraint: `KEY==VALUE` or `KEY!=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraint {
    /// What is compared.
    pub key: ConstraintKey,
    /// `==` (true) or `!=` (false).
    pub equal: bool,
    /// The value.
    pub value: String,
}

impl std::str::FromStr for Constraint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid constraint {s:?}: use node.id|node.hostname|node.role|node.labels.KEY, then == or !=, then a value"
            )
        };
        let (k, equal, v) = if let Some((k, v)) = s.split_once("==") {
            (k, true, v)
        } else if let Some((k, v)) = s.split_once("!=") {
            (k, false, v)
        } else {
            return Err(bad());
        };
        let (k, v) = (k.trim(), v.trim());
        let key = match k {
            "node.id" => ConstraintKey::NodeId,
            "node.hostname" => ConstraintKey::Hostname,
            "node.role" => ConstraintKey::Role,
            _ => match k.strip_prefix("node.labels.") {
                Some(l) if !l.is_empty() => ConstraintKey::Label(l.to_owned()),
                _ => return Err(bad()),
            },
        };
        if v.is_empty() {
            return Err(bad());
        }
        Ok(Constraint { key, equal, value: v.to_owned() })
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = match &self.key {
            ConstraintKey::NodeId => "node.id".to_string(),
            ConstraintKey::Hostname => "node.hostname".into(),
            ConstraintKey::Role => "node.role".into(),
            ConstraintKey::Label(l) => format!("node.labels.{l}"),
        };
        write!(f, "{k}{}{}", if self.equal { "==" } else { "!=" }, self.value)
    }
}

impl Constraint {
    /// Whether `node` satisfies it.
    pub fn matches(&self, node: &NodeRecord) -> bool {
        let have = match &self.key {
            ConstraintKey::NodeId => Some(node.id.to_string()),
            ConstraintKey::Hostname => Some(node.hostname.clone()),
            ConstraintKey::Role => Some(node.role.to_string()),
            ConstraintKey::Label(l) => node.labels.get(l).cloned(),
        };
        (have.as_deref() == Some(self.value.as_str())) == self.equal
    }
}

/// The container network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Network {
    /// A private network namespace with loopback only.
    #[default]
    None,
    /// The host's network.
    Host,
}

/// Whose user IDs a service's tasks run with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Userns {
    /// A user namespace per task, with a block of host IDs of its own (the default).
    #[default]
    Private,
    /// The host's (`--userns host`): the task's uid N is host uid N, shared
    /// with any host process of that uid.
    Host,
}

/// What a service runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Root filesystem directory on the workers.
    pub image: String,
    /// Command and arguments.
    pub args: Vec<String>,
    /// `K=V` entries.
    pub env: Vec<String>,
    /// User and group (default 65534:65534).
    pub user: Option<(u32, u32)>,
    /// Secrets, by reference.
    pub secrets: Vec<SecretRef>,
    /// Replicas wanted.
    pub replicas: u32,
    /// Placement constraints, all of which must hold.
    pub constraints: Vec<Constraint>,
    /// Memory limit, bytes.
    pub memory: Option<i64>,
    /// Process limit.
    pub pids: Option<i64>,
    /// Network.
    pub network: Network,
    /// User namespace.
    pub userns: Userns,
}

/// A service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// Its ID.
    pub id: ServiceId,
    /// Its unique name.
    pub name: String,
    /// What it runs.
    pub spec: ServiceSpec,
    /// Bumped by every update; tasks of an older version are replaced.
    pub version: u64,
    /// Creation time, unix seconds.
    pub created_at: i64,
    /// Last update, unix seconds.
    pub updated_at: i64,
}

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

impl std::str::FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "assigned" => TaskState::Assigned,
            "preparing" => TaskState::Preparing,
            "running" => TaskState::Running,
            "complete" => TaskState::Complete,
            "failed" => TaskState::Failed,
            "shutdown" => TaskState::Shutdown,
            "rejected" => TaskState::Rejected,
            _ => return Err(format!("unknown task state {s:?}")),
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

pub(crate) const SERVICE_PREFIX: &str = "service/";
pub(crate) const SERVICE_NAME_PREFIX: &str = "servicename/";
pub(crate) const TASK_PREFIX: &str = "task/";
pub(crate) const NODE_TASK_PREFIX: &str = "nodetask/";

pub(crate) fn service_key(id: &ServiceId) -> Vec<u8> {
    format!("{SERVICE_PREFIX}{id}").into_bytes()
}
pub(crate) fn service_name_key(name: &str) -> Vec<u8> {
    format!("{SERVICE_NAME_PREFIX}{name}").into_bytes()
}
pub(crate) fn task_key(id: &TaskId) -> Vec<u8> {
    format!("{TASK_PREFIX}{id}").into_bytes()
}
pub(crate) fn node_task_key(node: &NodeId, task: &TaskId) -> Vec<u8> {
    format!("{NODE_TASK_PREFIX}{node}/{task}").into_bytes()
}

/// Most replicas a service may ask for.
pub const MAX_REPLICAS: u32 = 1000;

/// Checks a spec's own rules (not the references to secrets).
pub fn check_spec(spec: &ServiceSpec) -> Result<(), String> {
    if spec.image.is_empty() || !spec.image.starts_with('/') {
        return Err(format!("--image {:?}: give the absolute path of a root filesystem on the workers", spec.image));
    }
    if spec.args.is_empty() {
        return Err("no command: give it after --, e.g. -- sh -c 'cat /run/secrets/db_pass'".into());
    }
    if spec.replicas > MAX_REPLICAS {
        return Err(format!("--replicas {}: at most {MAX_REPLICAS}", spec.replicas));
    }
    for e in &spec.env {
        if !e.contains('=') || e.starts_with('=') {
            return Err(format!("--env {e:?}: expected KEY=VALUE"));
        }
    }
    if spec.memory.is_some_and(|m| m < 4 << 20) {
        return Err("--memory: at least 4 MiB (4194304)".into());
    }
    if spec.pids.is_some_and(|p| p < 1) {
        return Err("--pids: at least 1".into());
    }
    let mut targets = std::collections::HashSet::new();
    for r in &spec.secrets {
        check_target(&r.target)?;
        if !targets.insert(r.target.clone()) {
            return Err(format!("two secrets would both be /run/secrets/{}", r.target));
        }
        if r.mode > 0o777 {
            return Err(format!("secret {}: mode {:o} is not a permission mode", r.name, r.mode));
        }
    }
    Ok(())
}

/// A secret's file name below `/run/secrets`.
pub fn check_target(t: &str) -> Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 255
        && t != "."
        && t != ".."
        && t.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid secret target {t:?}: use a file name (it appears as /run/secrets/<name>)"))
    }
}

/// Service names follow the secret name rules.
pub fn check_service_name(name: &str) -> Result<(), String> {
    check_secret_name(name).map_err(|e| e.replace("secret name", "service name"))
}

impl StateView {
    /// One service.
    pub fn service(&self, id: &ServiceId) -> Result<Option<ServiceRecord>, StateError> {
        self.get(&service_key(id))
    }

    /// The ID of the service named `name`.
    pub fn service_id_by_name(&self, name: &str) -> Result<Option<ServiceId>, StateError> {
        self.get(&service_name_key(name))
    }

    /// All services, by ID.
    pub fn services(&self) -> Result<Vec<ServiceRecord>, StateError> {
        self.scan(SERVICE_PREFIX)
    }

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

    /// Names of the services that reference `secret`.
    pub fn services_using(&self, secret: &SecretId) -> Result<Vec<String>, StateError> {
        Ok(self
            .services()?
            .into_iter()
            .filter(|s| s.spec.secrets.iter().any(|r| r.secret == *secret))
            .map(|s| s.name)
            .collect())
    }
}

/// Writes a task and its node index entry.
pub(crate) fn put_task(batch: &mut crate::state::WriteBatch, t: &TaskRecord) {
    batch.insert(task_key(&t.id), encode(t));
    batch.insert(node_task_key(&t.node, &t.id), Vec::<u8>::new());
}

/// Deletes a task and its node index entry.
pub(crate) fn delete_task(batch: &mut crate::state::WriteBatch, t: &TaskRecord) {
    batch.remove(task_key(&t.id));
    batch.remove(node_task_key(&t.node, &t.id));
}

/// Checks that every secret a spec references exists.
pub(crate) fn check_references(view: &StateView, spec: &ServiceSpec) -> Result<Result<(), String>, StateError> {
    for r in &spec.secrets {
        match view.secret(&r.secret)? {
            None => return Ok(Err(format!("secret {} ({}) does not exist", r.name, r.secret))),
            Some(s) => {
                if let Some(v) = r.pin {
                    if !s.versions.iter().any(|x| x.version == v) {
                        return Ok(Err(format!("secret {} has no version {v} (kept: the ten newest)", s.name)));
                    }
                }
            }
        }
    }
    Ok(Ok(()))
}

/// Groups tasks by service.
pub fn tasks_by_service(tasks: Vec<TaskRecord>) -> BTreeMap<ServiceId, Vec<TaskRecord>> {
    let mut m: BTreeMap<ServiceId, Vec<TaskRecord>> = BTreeMap::new();
    for t in tasks {
        m.entry(t.service.clone()).or_default().push(t);
    }
    m
}

/// The service and task commands of [`crate::state::plan`].
pub(crate) fn plan(view: &StateView, cmd: &Command) -> Result<Result<crate::state::WriteBatch, String>, StateError> {
    let mut batch = crate::state::WriteBatch::default();
    match cmd {
        Command::CreateService(rec) => {
            if let Err(why) = check_service_name(&rec.name).and_then(|_| check_spec(&rec.spec)) {
                return Ok(Err(why));
            }
            if let Some(other) = view.service_id_by_name(&rec.name)? {
                return Ok(Err(format!("service name {:?} is already in use by service {other}", rec.name)));
            }
            if view.service(&rec.id)?.is_some() {
                return Ok(Err(format!("service ID {} is already in use", rec.id)));
            }
            if let Err(why) = check_references(view, &rec.spec)? {
                return Ok(Err(why));
            }
            batch.insert(service_key(&rec.id), encode(rec.as_ref()));
            batch.insert(service_name_key(&rec.name), encode(&rec.id));
        }
        Command::UpdateService { id, spec, expected_version, at } => {
            let Some(mut rec) = view.service(id)? else {
                return Ok(Err(format!("service {id} does not exist")));
            };
            if rec.version != *expected_version {
                return Ok(Err(format!("service {} was updated meanwhile; try again", rec.name)));
            }
            if let Err(why) = check_spec(spec) {
                return Ok(Err(why));
            }
            if let Err(why) = check_references(view, spec)? {
                return Ok(Err(why));
            }
            // A change of replicas alone keeps the running tasks.
            let mut same_but_replicas = rec.spec.clone();
            same_but_replicas.replicas = spec.replicas;
            if same_but_replicas != **spec {
                rec.version += 1;
            }
            rec.spec = (**spec).clone();
            rec.updated_at = *at;
            batch.insert(service_key(id), encode(&rec));
        }
        Command::RemoveService { id } => {
            let Some(rec) = view.service(id)? else {
                return Ok(Err(format!("service {id} does not exist")));
            };
            batch.remove(service_key(id));
            batch.remove(service_name_key(&rec.name));
            for mut t in view.tasks()?.into_iter().filter(|t| t.service == *id && t.desired_running) {
                t.desired_running = false;
                put_task(&mut batch, &t);
            }
        }
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
        _ => unreachable!("not a service or task command"),
    }
    Ok(Ok(batch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_parse_and_match() {
        let c: Constraint = "node.labels.zone==eu".parse().unwrap();
        assert_eq!(c.to_string(), "node.labels.zone==eu");
        let n: Constraint = "node.role != manager".parse().unwrap();
        assert!(!n.equal);
        for bad in ["node.labels.==x", "zone==eu", "node.id=x", "node.id==", "node.cpu==4"] {
            assert!(bad.parse::<Constraint>().is_err(), "{bad:?}");
        }
    }
}
