//! Nodes in the replicated state: their records, the manager index, the
//! deny-list of removed nodes, and the commands that add, renew, change and
//! remove them.
//!
//! | key         | value |
//! |-------------|-------|
//! | `node/<id>` | [`NodeRecord`] |
//! | `mgr/<id>`  | [`ManagerEntry`]: an index of the managers, kept with their node records |
//! | `deny/<id>` | refused until (unix seconds) |

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use swarmd_certs::{NodeId, Role};

use super::certs::{deny_manager_certs, forget_node_certs, record_cert};
use super::{check_label, encode, Command, Missing, Rejection, StateError, StateView, WriteBatch};

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

/// Most labels a node may carry.
pub const MAX_NODE_LABELS: usize = 256;

const NODE_PREFIX: &str = "node/";
const MANAGER_PREFIX: &str = "mgr/";
pub(crate) const DENY_PREFIX: &str = "deny/";

/// The key of a node record.
pub(crate) fn node_key(id: &NodeId) -> Vec<u8> {
    format!("{NODE_PREFIX}{id}").into_bytes()
}

fn manager_key(id: &NodeId) -> Vec<u8> {
    format!("{MANAGER_PREFIX}{id}").into_bytes()
}

/// The key of a deny-list entry.
pub(crate) fn deny_key(id: &NodeId) -> Vec<u8> {
    format!("{DENY_PREFIX}{id}").into_bytes()
}

/// Writes a node record and keeps the manager index in step with it.
pub(super) fn put_node(batch: &mut WriteBatch, rec: &NodeRecord) {
    batch.insert(node_key(&rec.id), encode(rec));
    if rec.role == Role::Manager {
        let e = ManagerEntry { id: rec.id.clone(), raft_id: rec.raft_id, addr: rec.addr.clone(), status: rec.status };
        batch.insert(manager_key(&rec.id), encode(&e));
    } else {
        batch.remove(manager_key(&rec.id));
    }
}

impl StateView {
    /// One node.
    pub fn node(&self, id: &NodeId) -> Result<Option<NodeRecord>, StateError> {
        self.get(&node_key(id))
    }

    /// All nodes, ordered by ID.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StateError> {
        self.scan(NODE_PREFIX)
    }

    /// Every node with the manager role (raft member or not yet), from the
    /// index: cheap however large the node records are.
    pub fn managers(&self) -> Result<Vec<ManagerEntry>, StateError> {
        self.scan(MANAGER_PREFIX)
    }

    /// Addresses of the managers that are raft members, sorted.
    pub fn manager_addrs(&self) -> Result<Vec<String>, StateError> {
        let mut v: Vec<String> = self.managers()?.into_iter().filter(|n| n.raft_id.is_some()).map(|n| n.addr).collect();
        v.sort();
        Ok(v)
    }

    /// The node `id`, or the rejection a command naming it gets.
    fn existing_node(&self, id: &NodeId) -> Result<Result<NodeRecord, Rejection>, StateError> {
        Ok(self.node(id)?.ok_or_else(|| Missing::Node(id.clone()).into()))
    }
}

/// The node commands of [`super::plan`]: `AddNode`, `RecordCert`,
/// `SetStatus`, `RemoveNodes`, `SetRole`, `SetRaftMember`, `UpdateNode`.
pub(super) fn plan_nodes(view: &StateView, cmd: &Command) -> Result<Result<WriteBatch, Rejection>, StateError> {
    let mut batch = WriteBatch::default();
    match cmd {
        Command::AddNode(node) => {
            if view.cluster()?.is_none() {
                return Ok(Err(Rejection::NotInitialised));
            }
            if view.node(&node.id)?.is_some() {
                return Ok(Err(Rejection::NodeExists { node: node.id.clone() }));
            }
            put_node(&mut batch, node);
            let cert = (node.cert_serial.as_str(), node.role, node.cert_not_after);
            record_cert(view, &mut batch, &node.id, node.role, cert, node.created_at)?;
        }
        Command::RecordCert { node, serial, not_after, role, at } => {
            let mut rec = match view.existing_node(node)? {
                Ok(rec) => rec,
                Err(r) => return Ok(Err(r)),
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
        Command::RemoveNodes { nodes, deny_until } => {
            for node in nodes {
                batch.remove(node_key(node));
                batch.remove(manager_key(node));
                batch.insert(deny_key(node), encode(deny_until));
                forget_node_certs(view, &mut batch, node)?;
            }
        }
        Command::SetRole { node, role } => {
            let mut rec = match view.existing_node(node)? {
                Ok(rec) => rec,
                Err(r) => return Ok(Err(r)),
            };
            if *role == Role::Admin {
                return Ok(Err(Rejection::Invalid("admin is not a node role".into())));
            }
            rec.role = *role;
            if *role == Role::Worker {
                rec.raft_id = None;
                deny_manager_certs(view, &mut batch, node)?;
            }
            put_node(&mut batch, &rec);
        }
        Command::SetRaftMember { node, raft_id, addr } => {
            let mut rec = match view.existing_node(node)? {
                Ok(rec) => rec,
                Err(r) => return Ok(Err(r)),
            };
            if rec.role != Role::Manager {
                return Ok(Err(Rejection::NotAManager { node: node.clone() }));
            }
            if let Some(other) = view.managers()?.into_iter().find(|n| n.raft_id == Some(*raft_id) && n.id != *node) {
                return Ok(Err(Rejection::RaftIdInUse { raft_id: *raft_id, holder: other.id }));
            }
            rec.raft_id = Some(*raft_id);
            rec.addr = addr.clone();
            put_node(&mut batch, &rec);
        }
        Command::UpdateNode { node, availability, labels_add, labels_rm } => {
            let mut rec = match view.existing_node(node)? {
                Ok(rec) => rec,
                Err(r) => return Ok(Err(r)),
            };
            for (k, v) in labels_add {
                if let Err(why) = check_label(k, v) {
                    return Ok(Err(Rejection::Invalid(why)));
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
            if rec.labels.len() > MAX_NODE_LABELS {
                return Ok(Err(Rejection::Invalid(format!("a node may carry at most {MAX_NODE_LABELS} labels"))));
            }
            put_node(&mut batch, &rec);
        }
        _ => unreachable!("not a node command"),
    }
    Ok(Ok(batch))
}
