//! The replicated state: records, the commands that change them, and how a
//! command is applied.
//!
//! Every manager applies the same committed commands in the same order to its
//! own sled tree, so `apply` must be deterministic: it validates against the
//! current state and either produces a batch of writes or a rejection, never a
//! partial change. Keys:
//!
//! | key             | value           |
//! |-----------------|-----------------|
//! | `cluster`       | [`ClusterRecord`] |
//! | `node/<id>`     | [`NodeRecord`]  |
//! | `mgr/<id>`      | [`ManagerEntry`]: an index of the managers, kept with their node records |
//! | `deny/<id>`     | refused until (unix seconds) |
//! | `cert/…`, `admincert/…`, `denyserial/…` | certificates, see [`certs`] |
//! | `secret/<id>`   | [`SecretRecord`]: metadata only |
//! | `secretname/<name>` | the secret's ID: names are unique |
//! | `secretdata/<id>/<version>` | the value, [`Sealed`] under a data key |
//!
//! raft's own bookkeeping (`meta/…`) lives in the same tree, written by the state
//! machine in the same atomic batch as each command's effects.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use swarmd_certs::{ClusterId, NodeId, Role, SecretId, ServiceId, TaskId};

use crate::keys::Sealed;

mod certs;
mod secrets;
pub use certs::*;
pub use secrets::*;

/// Cluster-wide settings and secrets (sealed under the data key).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// The cluster's ID (O of every certificate).
    pub id: ClusterId,
    /// The root CA certificate, PEM: the bundle join tokens pin.
    pub ca_cert_pem: String,
    /// The CA private key, sealed.
    pub ca_key: Sealed,
    /// The worker join token, sealed.
    pub worker_token: Sealed,
    /// The manager join token, sealed.
    pub manager_token: Sealed,
    /// Node certificate lifetime, seconds.
    pub cert_validity_secs: u64,
    /// Heartbeat period, milliseconds.
    pub heartbeat_ms: u64,
    /// Creation time, unix seconds.
    pub created_at: i64,
    /// The data key new values are sealed with.
    pub data_key_id: u32,
    /// A known value sealed under the active data key (purpose
    /// [`crate::keys::purpose::key_check`]): a manager that fetches the key
    /// from another proves it got the right one. `None` for the first key.
    pub data_key_check: Option<Sealed>,
    /// Data keys below this ID are retired: nothing is sealed under them any
    /// more, and every manager deletes them.
    pub retired_below: u32,
    /// With autolock on: the unlock key, sealed under the data key. Every
    /// manager seals its KEK under it.
    pub unlock_key: Option<Sealed>,
}

impl ClusterRecord {
    /// The sealed values of the record itself, with what they are.
    pub fn sealed_fields(&self) -> Vec<(&'static str, &Sealed)> {
        let mut v = vec![
            ("CA key", &self.ca_key),
            ("worker join token", &self.worker_token),
            ("manager join token", &self.manager_token),
        ];
        if let Some(k) = &self.unlock_key {
            v.push(("unlock key", k));
        }
        v
    }
}

/// A node's liveness as the managers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    /// Known, no session seen yet.
    Unknown,
    /// Has a live session.
    Ready,
    /// Missed three heartbeats or lost its session.
    Down,
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeStatus::Unknown => "unknown",
            NodeStatus::Ready => "ready",
            NodeStatus::Down => "down",
        })
    }
}

/// One node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// CN of its certificate.
    pub id: NodeId,
    /// OU of its certificate.
    pub role: Role,
    /// Liveness.
    pub status: NodeStatus,
    /// The address its session comes from (workers) or it advertises (managers).
    pub addr: String,
    /// Its hostname as it reported it.
    pub hostname: String,
    /// Serial of its newest certificate, hex.
    pub cert_serial: String,
    /// NotAfter of its newest certificate, unix seconds.
    pub cert_not_after: i64,
    /// When it joined, unix seconds.
    pub created_at: i64,
    /// Its raft ID (managers only).
    pub raft_id: Option<u64>,
    /// Operator labels (`node update --label-add`).
    pub labels: BTreeMap<String, String>,
    /// Whether the scheduler may place tasks on it.
    pub availability: Availability,
    /// The manager holding its session; only that manager may mark it down.
    pub session_manager: Option<NodeId>,
}

/// Whether a node takes new tasks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Availability {
    /// Takes tasks.
    #[default]
    Active,
    /// Takes none; its tasks move elsewhere.
    Drain,
}

impl fmt::Display for Availability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Availability::Active => "active",
            Availability::Drain => "drain",
        })
    }
}

impl std::str::FromStr for Availability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "active" => Ok(Availability::Active),
            "drain" => Ok(Availability::Drain),
            _ => Err(format!("invalid availability {s:?}: expected active or drain")),
        }
    }
}

/// A liveness transition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    /// The node.
    pub node: NodeId,
    /// Its new status.
    pub status: NodeStatus,
    /// Its new address, if it changed (the address its session comes from,
    /// as the manager sees it — never what the node says about itself).
    pub addr: Option<String>,
    /// The manager reporting the change.
    pub reporter: NodeId,
}

/// A change to the replicated state: one raft log entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    /// Creates the cluster and its first manager. Only valid on an empty store.
    InitCluster { cluster: Box<ClusterRecord>, manager: NodeRecord },
    /// Adds a node that has just been issued its first certificate.
    AddNode(NodeRecord),
    /// Records a renewed certificate, issued at `at` for `role`.
    RecordCert { node: NodeId, serial: String, not_after: i64, role: Role, at: i64 },
    /// Liveness transitions, batched.
    SetStatus(Vec<StatusChange>),
    /// Replaces a join token.
    RotateJoinToken { role: Role, token: Sealed },
    /// Records a manager's raft ID and address as it joins raft.
    SetRaftMember { node: NodeId, raft_id: u64, addr: String },
    /// Removes nodes and refuses their certificates until `deny_until` (unix
    /// seconds, the expiry of their last certificate).
    RemoveNodes { nodes: Vec<NodeId>, deny_until: i64 },
    /// Changes a node's role (promotion or demotion); a worker has no raft ID.
    /// A demotion refuses every manager certificate the node holds, at once.
    SetRole { node: NodeId, role: Role },
    /// Operator changes to a node.
    UpdateNode {
        node: NodeId,
        availability: Option<Availability>,
        labels_add: Vec<(String, String)>,
        labels_rm: Vec<String>,
    },
    /// Creates a secret with its first version (sealed under the active data key).
    CreateSecret { id: SecretId, name: String, labels: BTreeMap<String, String>, created_at: i64, data: Sealed },
    /// Adds version `version` (the current one plus one) to a secret.
    AddSecretVersion { id: SecretId, version: u32, created_at: i64, data: Sealed },
    /// Deletes a secret, every version of it.
    RemoveSecret { id: SecretId },
    /// Makes data key `key_id` (the active one plus one) active; the key itself
    /// travels between managers over mTLS, never through the log.
    AddDataKey { key_id: u32, check: Sealed },
    /// Replaces sealed values with the same values sealed under the active key.
    /// Each item names the value it replaces (by nonce), and is skipped if that
    /// value changed or went away meanwhile.
    Reseal { cluster: Vec<ResealField>, secrets: Vec<ResealSecret> },
    /// Retires every data key below `below` (refused while anything is still
    /// sealed under one of them).
    RetireDataKeys { below: u32 },
    /// Turns autolock on (or rotates its key) with `Some`, off with `None`.
    SetAutolock { unlock_key: Option<Sealed> },
    /// Creates a service.
    CreateService(Box<crate::services::ServiceRecord>),
    /// Replaces a service's spec if it is still at `expected_version`.
    UpdateService { id: ServiceId, spec: Box<crate::services::ServiceSpec>, expected_version: u64, at: i64 },
    /// Deletes a service; its tasks are told to stop.
    RemoveService { id: ServiceId },
    /// The scheduler's decisions: tasks to create, to stop, and to forget.
    Schedule { create: Vec<crate::services::TaskRecord>, stop: Vec<TaskId>, delete: Vec<TaskId> },
    /// Task states reported by the node running them.
    TaskStatus { node: NodeId, updates: Vec<crate::services::TaskUpdate>, at: i64 },
    /// Records an admin certificate as it is issued.
    RecordAdminCert(AdminCertRecord),
    /// Revokes an admin certificate: its serial is refused cluster-wide.
    RevokeAdminCert { serial: String, at: i64 },
    /// Commands proposed concurrently, applied in order as one entry (group
    /// commit); each has its own result. Never nested.
    Batch(Vec<Command>),
}

/// Which sealed field of the cluster record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterField {
    /// The CA key.
    CaKey,
    /// The worker join token.
    WorkerToken,
    /// The manager join token.
    ManagerToken,
    /// The unlock key.
    UnlockKey,
}

/// A cluster record field re-sealed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResealField {
    /// Which field.
    pub field: ClusterField,
    /// The value it replaces.
    pub old: Sealed,
    /// The value re-sealed.
    pub new: Sealed,
}

/// A secret version re-sealed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResealSecret {
    /// The secret.
    pub id: SecretId,
    /// The version.
    pub version: u32,
    /// The value it replaces.
    pub old: Sealed,
    /// The value re-sealed.
    pub new: Sealed,
}

/// The outcome of applying one command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Applied.
    Ok,
    /// Refused; nothing changed. The text says why.
    Rejected(String),
    /// The results of a [`Command::Batch`], in its order.
    Batch(Vec<CommandResult>),
}

pub(crate) const CLUSTER_KEY: &[u8] = b"cluster";
const NODE_PREFIX: &str = "node/";

/// The key of a node record.
pub(crate) fn node_key(id: &NodeId) -> Vec<u8> {
    format!("{NODE_PREFIX}{id}").into_bytes()
}

const MANAGER_PREFIX: &str = "mgr/";

fn manager_key(id: &NodeId) -> Vec<u8> {
    format!("{MANAGER_PREFIX}{id}").into_bytes()
}

/// What the managers' own loops need of a manager, indexed apart from its node
/// record so that they never decode every node (records may carry megabytes of
/// labels).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerEntry {
    /// Its node ID.
    pub id: NodeId,
    /// Its raft ID, once it is a member.
    pub raft_id: Option<u64>,
    /// The address it advertises.
    pub addr: String,
    /// Its liveness.
    pub status: NodeStatus,
}

/// Writes a node record and keeps the manager index in step with it.
fn put_node(batch: &mut WriteBatch, rec: &NodeRecord) {
    batch.insert(node_key(&rec.id), encode(rec));
    if rec.role == Role::Manager {
        let e = ManagerEntry { id: rec.id.clone(), raft_id: rec.raft_id, addr: rec.addr.clone(), status: rec.status };
        batch.insert(manager_key(&rec.id), encode(&e));
    } else {
        batch.remove(manager_key(&rec.id));
    }
}

const SECRET_PREFIX: &str = "secret/";
const SECRET_NAME_PREFIX: &str = "secretname/";
const SECRET_DATA_PREFIX: &str = "secretdata/";

fn secret_key(id: &SecretId) -> Vec<u8> {
    format!("{SECRET_PREFIX}{id}").into_bytes()
}
fn secret_name_key(name: &str) -> Vec<u8> {
    format!("{SECRET_NAME_PREFIX}{name}").into_bytes()
}
fn secret_data_key(id: &SecretId, version: u32) -> Vec<u8> {
    format!("{SECRET_DATA_PREFIX}{id}/{version:010}").into_bytes()
}

pub(crate) const DENY_PREFIX: &str = "deny/";

/// The key of a deny-list entry.
pub(crate) fn deny_key(id: &NodeId) -> Vec<u8> {
    format!("{DENY_PREFIX}{id}").into_bytes()
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("bincode serialization of in-memory state cannot fail")
}

/// Writes to the state planned by one command: key → new value, or `None`
/// for a removal. Same interface as `sled::Batch`, but readable, so that the
/// commands applied together can see each other's writes (see [`StateView`]).
#[derive(Clone, Debug, Default)]
pub struct WriteBatch(BTreeMap<sled::IVec, Option<sled::IVec>>);

impl WriteBatch {
    /// Sets `key` to `value`.
    pub fn insert<K: Into<sled::IVec>, V: Into<sled::IVec>>(&mut self, key: K, value: V) {
        self.0.insert(key.into(), Some(value.into()));
    }

    /// Removes `key`.
    pub fn remove<K: Into<sled::IVec>>(&mut self, key: K) {
        self.0.insert(key.into(), None);
    }

    /// Adds `later`'s writes, which win over this batch's.
    pub fn extend(&mut self, later: WriteBatch) {
        self.0.extend(later.0);
    }

    /// The same writes as one sled batch.
    pub fn into_sled(self) -> sled::Batch {
        let mut b = sled::Batch::default();
        for (k, v) in self.0 {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        b
    }
}

/// Read access to the state, as of the last applied entry; or, while the
/// state machine applies several commands at once, as of the last one planned
/// (the writes planned so far lie over the tree).
#[derive(Clone)]
pub struct StateView {
    tree: sled::Tree,
    pending: Option<Arc<Mutex<WriteBatch>>>,
}

/// A stored record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// sled failed.
    #[error("state storage: {0}")]
    Storage(#[from] sled::Error),
    /// A record does not decode.
    #[error("corrupt state record {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

impl StateView {
    pub(crate) fn new(tree: sled::Tree) -> Self {
        Self { tree, pending: None }
    }

    /// This view with `pending` writes over it.
    pub(crate) fn with_pending(&self, pending: Arc<Mutex<WriteBatch>>) -> Self {
        Self { tree: self.tree.clone(), pending: Some(pending) }
    }

    fn raw(&self, key: &[u8]) -> Result<Option<sled::IVec>, StateError> {
        if let Some(p) = &self.pending {
            if let Some(v) = p.lock().expect("pending writes lock").0.get(key) {
                return Ok(v.clone());
            }
        }
        Ok(self.tree.get(key)?)
    }

    /// Every key and value below `prefix`, in key order, pending writes included.
    fn prefix(&self, prefix: &[u8]) -> Result<Vec<(sled::IVec, sled::IVec)>, StateError> {
        let Some(p) = &self.pending else {
            return Ok(self.tree.scan_prefix(prefix).collect::<Result<_, _>>()?);
        };
        let mut out = BTreeMap::new();
        for kv in self.tree.scan_prefix(prefix) {
            let (k, v) = kv?;
            out.insert(k, v);
        }
        let p = p.lock().expect("pending writes lock");
        for (k, v) in p.0.range::<[u8], _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded)) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => out.insert(k.clone(), v.clone()),
                None => out.remove(k),
            };
        }
        Ok(out.into_iter().collect())
    }

    pub(crate) fn get<T: for<'de> Deserialize<'de>>(&self, key: &[u8]) -> Result<Option<T>, StateError> {
        match self.raw(key)? {
            None => Ok(None),
            Some(v) => bincode::deserialize(&v).map(Some).map_err(|e| StateError::Corrupt {
                key: String::from_utf8_lossy(key).into_owned(),
                reason: e.to_string(),
            }),
        }
    }

    /// The encoded cluster record (to notice changes cheaply).
    pub fn cluster_raw(&self) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.raw(CLUSTER_KEY)?.map(|v| v.to_vec()))
    }

    /// The cluster record, once the cluster is initialised.
    pub fn cluster(&self) -> Result<Option<ClusterRecord>, StateError> {
        self.get(CLUSTER_KEY)
    }

    /// One node.
    pub fn node(&self, id: &NodeId) -> Result<Option<NodeRecord>, StateError> {
        self.get(&node_key(id))
    }

    /// SHA-256 over every replicated record (not raft's own bookkeeping), in key
    /// order: equal on managers that applied the same entries.
    pub fn digest(&self) -> Result<String, StateError> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            if k.starts_with(b"meta/") {
                continue;
            }
            h.update((k.len() as u64).to_be_bytes());
            h.update(&k);
            h.update((v.len() as u64).to_be_bytes());
            h.update(&v);
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Addresses of the managers that are raft members, sorted.
    pub fn manager_addrs(&self) -> Result<Vec<String>, StateError> {
        let mut v: Vec<String> = self.managers()?.into_iter().filter(|n| n.raft_id.is_some()).map(|n| n.addr).collect();
        v.sort();
        Ok(v)
    }

    /// Every node with the manager role (raft member or not yet), from the
    /// index: cheap however large the node records are.
    pub fn managers(&self) -> Result<Vec<ManagerEntry>, StateError> {
        self.scan(MANAGER_PREFIX)
    }

    /// One secret by ID.
    pub fn secret(&self, id: &SecretId) -> Result<Option<SecretRecord>, StateError> {
        self.get(&secret_key(id))
    }

    /// The ID of the secret named `name`.
    pub fn secret_id_by_name(&self, name: &str) -> Result<Option<SecretId>, StateError> {
        self.get(&secret_name_key(name))
    }

    /// All secrets, ordered by ID.
    pub fn secrets(&self) -> Result<Vec<SecretRecord>, StateError> {
        self.scan(SECRET_PREFIX)
    }

    /// The sealed value of one version of a secret.
    pub fn secret_data(&self, id: &SecretId, version: u32) -> Result<Option<Sealed>, StateError> {
        self.get(&secret_data_key(id, version))
    }

    /// The keys below `prefix`, without it.
    pub(crate) fn scan_key_suffixes(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        let mut out = Vec::new();
        for (k, _) in self.prefix(prefix.as_bytes())? {
            out.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        }
        Ok(out)
    }

    pub(crate) fn scan<T: for<'de> Deserialize<'de>>(&self, prefix: &str) -> Result<Vec<T>, StateError> {
        let mut out = Vec::new();
        for (k, v) in self.prefix(prefix.as_bytes())? {
            out.push(bincode::deserialize(&v).map_err(|e| StateError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// All nodes, ordered by ID.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StateError> {
        self.scan(NODE_PREFIX)
    }
}

/// Validates `cmd` against `view` and returns the writes it makes, or why it is refused.
pub(crate) fn plan(view: &StateView, cmd: &Command) -> Result<Result<WriteBatch, String>, StateError> {
    let mut batch = WriteBatch::default();
    match cmd {
        Command::InitCluster { cluster, manager } => {
            if view.cluster()?.is_some() {
                return Ok(Err("cluster is already initialised".into()));
            }
            batch.insert(CLUSTER_KEY, encode(cluster.as_ref()));
            put_node(&mut batch, manager);
            let cert = (manager.cert_serial.as_str(), manager.role, manager.cert_not_after);
            record_cert(view, &mut batch, &manager.id, manager.role, cert, manager.created_at)?;
        }
        Command::AddNode(node) => {
            if view.cluster()?.is_none() {
                return Ok(Err("cluster is not initialised".into()));
            }
            if view.node(&node.id)?.is_some() {
                return Ok(Err(format!("node {} already exists", node.id)));
            }
            put_node(&mut batch, node);
            let cert = (node.cert_serial.as_str(), node.role, node.cert_not_after);
            record_cert(view, &mut batch, &node.id, node.role, cert, node.created_at)?;
        }
        Command::RecordCert { node, serial, not_after, role, at } => {
            let Some(mut rec) = view.node(node)? else {
                return Ok(Err(format!("node {node} does not exist")));
            };
            rec.cert_serial = serial.clone();
            rec.cert_not_after = rec.cert_not_after.max(*not_after);
            put_node(&mut batch, &rec);
            record_cert(view, &mut batch, node, rec.role, (serial, *role, *not_after), *at)?;
        }
        Command::SetStatus(changes) => {
            for c in changes {
                // A node removed meanwhile is skipped, not an error: liveness is advisory.
                if let Some(mut rec) = view.node(&c.node)? {
                    // A node that moved its session to another manager is not marked
                    // down by the manager it left.
                    if c.status != NodeStatus::Ready && rec.session_manager.as_ref().is_some_and(|m| *m != c.reporter) {
                        continue;
                    }
                    if c.status == NodeStatus::Ready {
                        rec.session_manager = Some(c.reporter.clone());
                    }
                    rec.status = c.status;
                    if let Some(a) = &c.addr {
                        rec.addr = a.clone();
                    }
                    put_node(&mut batch, &rec);
                }
            }
        }
        Command::RotateJoinToken { role, token } => {
            let Some(mut cluster) = view.cluster()? else {
                return Ok(Err("cluster is not initialised".into()));
            };
            if token.key_id() != cluster.data_key_id {
                return Ok(Err(STALE_DATA_KEY.into()));
            }
            match role {
                Role::Worker => cluster.worker_token = token.clone(),
                Role::Manager => cluster.manager_token = token.clone(),
                Role::Admin => return Ok(Err("there is no admin join token".into())),
            }
            batch.insert(CLUSTER_KEY, encode(&cluster));
        }
        Command::AddDataKey { key_id, check } => {
            let Some(mut cluster) = view.cluster()? else {
                return Ok(Err("cluster is not initialised".into()));
            };
            if *key_id != cluster.data_key_id + 1 || check.key_id() != *key_id {
                return Ok(Err(format!(
                    "data key {key_id} cannot follow data key {} (another rotation ran meanwhile?)",
                    cluster.data_key_id
                )));
            }
            cluster.data_key_id = *key_id;
            cluster.data_key_check = Some(check.clone());
            batch.insert(CLUSTER_KEY, encode(&cluster));
        }
        Command::Reseal { cluster: fields, secrets } => {
            let Some(mut cluster) = view.cluster()? else {
                return Ok(Err("cluster is not initialised".into()));
            };
            let active = cluster.data_key_id;
            if fields.iter().map(|f| &f.new).chain(secrets.iter().map(|s| &s.new)).any(|s| s.key_id() != active) {
                return Ok(Err(STALE_DATA_KEY.into()));
            }
            let mut changed = false;
            for f in fields {
                let slot = match f.field {
                    ClusterField::CaKey => &mut cluster.ca_key,
                    ClusterField::WorkerToken => &mut cluster.worker_token,
                    ClusterField::ManagerToken => &mut cluster.manager_token,
                    ClusterField::UnlockKey => match &mut cluster.unlock_key {
                        Some(k) => k,
                        None => continue,
                    },
                };
                if *slot == f.old {
                    *slot = f.new.clone();
                    changed = true;
                }
            }
            if changed {
                batch.insert(CLUSTER_KEY, encode(&cluster));
            }
            let mut records: BTreeMap<SecretId, SecretRecord> = BTreeMap::new();
            for s in secrets {
                if view.secret_data(&s.id, s.version)?.as_ref() != Some(&s.old) {
                    continue;
                }
                let rec = match records.get_mut(&s.id) {
                    Some(r) => r,
                    None => match view.secret(&s.id)? {
                        Some(r) => records.entry(s.id.clone()).or_insert(r),
                        None => continue,
                    },
                };
                if let Some(v) = rec.versions.iter_mut().find(|v| v.version == s.version) {
                    v.key_id = active;
                    batch.insert(secret_data_key(&s.id, s.version), encode(&s.new));
                }
            }
            for (id, rec) in records {
                batch.insert(secret_key(&id), encode(&rec));
            }
        }
        c @ (Command::CreateService(_)
        | Command::UpdateService { .. }
        | Command::RemoveService { .. }
        | Command::Schedule { .. }
        | Command::TaskStatus { .. }) => return crate::services::plan(view, c),
        // The state machine applies a batch's commands one by one (see
        // `raft::state_machine`); only a nested batch reaches this point.
        Command::Batch(_) => return Ok(Err("a batch of commands cannot be nested".into())),
        Command::SetAutolock { unlock_key } => {
            let Some(mut cluster) = view.cluster()? else {
                return Ok(Err("cluster is not initialised".into()));
            };
            if unlock_key.as_ref().is_some_and(|k| k.key_id() != cluster.data_key_id) {
                return Ok(Err(STALE_DATA_KEY.into()));
            }
            cluster.unlock_key = unlock_key.clone();
            batch.insert(CLUSTER_KEY, encode(&cluster));
        }
        Command::RetireDataKeys { below } => {
            let Some(mut cluster) = view.cluster()? else {
                return Ok(Err("cluster is not initialised".into()));
            };
            if *below > cluster.data_key_id {
                return Ok(Err(format!(
                    "data key {} is active: keys below {below} cannot all retire",
                    cluster.data_key_id
                )));
            }
            if let Some((what, _)) = cluster.sealed_fields().into_iter().find(|(_, s)| s.key_id() < *below) {
                return Ok(Err(format!("the {what} is still sealed under an older data key")));
            }
            let mut left = 0;
            for rec in view.secrets()? {
                left += rec.versions.iter().filter(|v| v.key_id < *below).count();
            }
            if left > 0 {
                return Ok(Err(format!("{left} secret versions are still sealed under an older data key")));
            }
            cluster.retired_below = cluster.retired_below.max(*below);
            batch.insert(CLUSTER_KEY, encode(&cluster));
        }
        Command::RemoveNodes { nodes, deny_until } => {
            for node in nodes {
                batch.remove(node_key(node));
                batch.remove(manager_key(node));
                batch.insert(deny_key(node), encode(deny_until));
                forget_node_certs(view, &mut batch, node)?;
            }
        }
        Command::SetRole { node, role } => {
            let Some(mut rec) = view.node(node)? else {
                return Ok(Err(format!("node {node} does not exist")));
            };
            if *role == Role::Admin {
                return Ok(Err("admin is not a node role".into()));
            }
            rec.role = *role;
            if *role == Role::Worker {
                rec.raft_id = None;
                deny_manager_certs(view, &mut batch, node)?;
            }
            put_node(&mut batch, &rec);
        }
        Command::SetRaftMember { node, raft_id, addr } => {
            let Some(mut rec) = view.node(node)? else {
                return Ok(Err(format!("node {node} does not exist")));
            };
            if rec.role != Role::Manager {
                return Ok(Err(format!("node {node} is not a manager")));
            }
            if let Some(other) = view.managers()?.into_iter().find(|n| n.raft_id == Some(*raft_id) && n.id != *node) {
                return Ok(Err(format!("raft ID {raft_id} is already used by {}", other.id)));
            }
            rec.raft_id = Some(*raft_id);
            rec.addr = addr.clone();
            put_node(&mut batch, &rec);
        }
        Command::UpdateNode { node, availability, labels_add, labels_rm } => {
            let Some(mut rec) = view.node(node)? else {
                return Ok(Err(format!("node {node} does not exist")));
            };
            for (k, v) in labels_add {
                if let Err(why) = check_label(k, v) {
                    return Ok(Err(why));
                }
            }
            if let Some(a) = availability {
                rec.availability = *a;
            }
            for k in labels_rm {
                rec.labels.remove(k);
            }
            for (k, v) in labels_add {
                rec.labels.insert(k.clone(), v.clone());
            }
            if rec.labels.len() > 256 {
                return Ok(Err("a node may carry at most 256 labels".into()));
            }
            put_node(&mut batch, &rec);
        }
        Command::RecordAdminCert(rec) => {
            if let Err(why) = record_admin_cert(view, &mut batch, rec)? {
                return Ok(Err(why));
            }
        }
        Command::RevokeAdminCert { serial, at } => {
            if let Err(why) = revoke_admin_cert(view, &mut batch, serial, *at)? {
                return Ok(Err(why));
            }
        }
        c @ (Command::CreateSecret { .. } | Command::AddSecretVersion { .. } | Command::RemoveSecret { .. }) => {
            return secrets::plan(view, c)
        }
    }
    Ok(Ok(batch))
}

/// Longest label value accepted.
pub const MAX_LABEL_VALUE: usize = 4096;

/// A label: key as [`check_label_key`], value at most 4 KiB.
pub fn check_label(k: &str, v: &str) -> Result<(), String> {
    check_label_key(k)?;
    if v.len() > MAX_LABEL_VALUE {
        return Err(format!("label {k:?}: value of {} bytes is over the {MAX_LABEL_VALUE}-byte limit", v.len()));
    }
    Ok(())
}

/// Label keys: 1–128 characters of `[A-Za-z0-9._/-]`, starting with a letter or digit.
pub fn check_label_key(k: &str) -> Result<(), String> {
    let ok = !k.is_empty()
        && k.len() <= 128
        && k.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid label key {:?}: use 1-128 characters of [A-Za-z0-9._/-], starting with a letter or digit",
            k.chars().take(140).collect::<String>()
        ))
    }
}

#[cfg(test)]
mod tests;
