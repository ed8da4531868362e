//! Who is calling, and may they (invariants 3 and 10).
//!
//! Every accepted connection carries a [`ConnInfo`] (see [`crate::conn`]):
//! `Local` for the unix control socket (file permissions already decided),
//! `Anonymous` for a TLS client without a certificate, or `Node` with the
//! identity read from its verified certificate. tonic puts it into each
//! request's extensions, and every RPC handler asks the [`Authorizer`] before
//! doing anything. Only `GetRootCa` and `IssueNodeCertificate` skip the check.
//!
//! A certificate is necessary, never sufficient: each RPC checks again that
//! it has not expired (connections outlive handshakes), that the deny-list
//! does not refuse it, and — for the powers of a manager — that the store
//! lists the caller as a manager *now* and raft counts it as a member. A
//! demoted manager's certificate is refused at once, whatever its OU says.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use swarmd_certs::tls::{DenyList, DenyReason, PeerIdentity};
use swarmd_certs::{ClusterId, NodeId, Role};
use swarmd_proto::NODE_REMOVED_METADATA;
use tonic::{Request, Status};

use crate::raft::Raft;
use crate::state::{NodeRecord, StateView};
use swarmd_certs::now_unix;

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub enum Caller {
    /// The local control socket.
    Local,
    /// TLS without a client certificate.
    Anonymous,
    /// TLS with a verified node certificate.
    Node(PeerIdentity),
}

/// Per-connection information, visible to every request on it.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The caller.
    pub caller: Caller,
    /// The remote socket address (TCP only).
    pub remote: Option<SocketAddr>,
    /// What its requests may hold undecoded (workers and anonymous clients;
    /// see [`crate::budget`]).
    pub budget: Option<crate::budget::ConnBudget>,
}

/// The status a removed node gets: PERMISSION_DENIED with the
/// [`NODE_REMOVED_METADATA`] key, the typed signal a worker acts on.
pub fn removed_status(node: &NodeId) -> Status {
    let mut s = Status::permission_denied(format!("node {node} was removed from the cluster"));
    s.metadata_mut().insert(NODE_REMOVED_METADATA, node.as_str().parse().expect("node IDs are ASCII"));
    s
}

/// Decides per RPC whether the caller may proceed.
#[derive(Clone)]
pub struct Authorizer {
    cluster_id: ClusterId,
    deny: DenyList,
    view: StateView,
    raft: Raft,
    /// Managers a joining manager trusts before its own store has caught up
    /// (from the manager that handed it the data key).
    bootstrap: Arc<RwLock<HashSet<NodeId>>>,
    /// When this manager last took an append from its leader.
    contact: LeaderContact,
}

/// When a follower last accepted an append (a heartbeat or entries) from its
/// leader: raft's metrics name a leader from the persisted vote alone, before
/// any contact, so that is no sign of being in touch.
#[derive(Clone, Default)]
pub struct LeaderContact(Arc<std::sync::Mutex<Option<std::time::Instant>>>);

impl LeaderContact {
    /// Records an accepted append.
    pub fn heard(&self) {
        *self.0.lock().expect("contact lock") = Some(std::time::Instant::now());
    }

    /// Whether an append from the leader was accepted in the last `d`.
    pub(crate) fn within(&self, d: std::time::Duration) -> bool {
        self.0.lock().expect("contact lock").is_some_and(|t| t.elapsed() <= d)
    }
}

/// How recently a manager must have heard from its leader (or, leading, from
/// a majority) to vouch for anyone: the store's quorum bound.
const IN_TOUCH: std::time::Duration = std::time::Duration::from_millis(1500);

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer").field("cluster_id", &self.cluster_id).finish()
    }
}

impl Authorizer {
    /// Checks callers against this cluster, deny-list, replicated state and raft membership.
    pub fn new(cluster_id: ClusterId, deny: DenyList, view: StateView, raft: Raft) -> Self {
        Self { cluster_id, deny, view, raft, bootstrap: Arc::default(), contact: LeaderContact::default() }
    }

    /// Where the raft service records its leader's appends.
    pub fn leader_contact(&self) -> LeaderContact {
        self.contact.clone()
    }

    /// Until this manager's store holds the cluster: the managers to accept.
    pub fn set_bootstrap_managers(&self, ids: HashSet<NodeId>) {
        *self.bootstrap.write().expect("bootstrap lock") = ids;
    }

    /// Whether `node` was removed from the cluster (its ID is on the deny-list).
    pub fn is_removed(&self, node: &NodeId) -> bool {
        self.deny.contains(node)
    }

    /// The connection information of a request.
    pub fn info<T>(req: &Request<T>) -> ConnInfo {
        req.extensions().get::<ConnInfo>().cloned().unwrap_or(ConnInfo {
            caller: Caller::Anonymous,
            remote: None,
            budget: None,
        })
    }

    /// A node certificate of this cluster, unexpired and not refused by the
    /// deny-list: UNAUTHENTICATED without one or once it expired,
    /// PERMISSION_DENIED otherwise (with [`NODE_REMOVED_METADATA`] for a removed node).
    pub fn node<T>(&self, req: &Request<T>) -> Result<PeerIdentity, Status> {
        match Self::info(req).caller {
            Caller::Anonymous => Err(Status::unauthenticated("this RPC requires a node certificate (mutual TLS)")),
            Caller::Local => Err(Status::permission_denied("this RPC is for cluster nodes, not the control socket")),
            Caller::Node(id) => {
                if id.cluster_id != self.cluster_id {
                    return Err(Status::permission_denied("certificate belongs to another cluster"));
                }
                if now_unix() >= id.not_after {
                    return Err(Status::unauthenticated(format!(
                        "the certificate of {} expired; renew it or get a new one",
                        id.node_id
                    )));
                }
                match self.deny.check(&id.node_id, &id.serial) {
                    Some(DenyReason::NodeRemoved) => Err(removed_status(&id.node_id)),
                    Some(DenyReason::CertificateRevoked) => {
                        Err(Status::permission_denied(format!("certificate {} was revoked", id.serial)))
                    }
                    None => Ok(id),
                }
            }
        }
    }

    /// Requires a node certificate with one of `roles`; returns its identity.
    pub fn require<T>(&self, req: &Request<T>, roles: &[Role]) -> Result<PeerIdentity, Status> {
        let id = self.node(req)?;
        if !roles.contains(&id.role) {
            return Err(Status::permission_denied(format!("a {} certificate cannot call this RPC", id.role)));
        }
        Ok(id)
    }

    /// UNAVAILABLE unless this manager is in touch with the cluster: a leader
    /// that heard from a majority, or a follower that took an append from its
    /// leader, within [`IN_TOUCH`]. Otherwise its state may be as old as its
    /// last contact (a manager restarted while the others are down): it must
    /// not vouch for a node, an admin or a manager by it — one removed, revoked
    /// or demoted meanwhile would be taken back. Raft's own RPCs are exempt:
    /// they elect the leader.
    pub fn require_leader(&self) -> Result<(), Status> {
        let in_touch = {
            let m = self.raft.metrics();
            let m = m.borrow();
            match m.current_leader {
                Some(l) if l == m.id => {
                    m.membership_config.membership().voter_ids().count() == 1
                        || m.millis_since_quorum_ack.is_some_and(|ms| ms <= IN_TOUCH.as_millis() as u64)
                }
                Some(_) => self.contact.within(IN_TOUCH),
                None => false,
            }
        };
        if !in_touch {
            return Err(Status::unavailable(
                "this manager has no raft leader, so its view of the cluster may be stale; try another manager",
            ));
        }
        Ok(())
    }

    /// Whether this manager's store holds the cluster yet (a joining manager's
    /// does not until raft has brought it up to date).
    fn store_ready(&self) -> bool {
        matches!(self.view.cluster(), Ok(Some(_)))
    }

    /// A manager certificate of a node the store lists as a manager now (or,
    /// while this manager's store is still empty, one of the bootstrap managers).
    /// Returns its record, `None` during bootstrap.
    pub fn require_manager<T>(&self, req: &Request<T>) -> Result<(PeerIdentity, Option<NodeRecord>), Status> {
        let id = self.require(req, &[Role::Manager])?;
        if !self.store_ready() {
            if self.bootstrap.read().expect("bootstrap lock").contains(&id.node_id) {
                return Ok((id, None));
            }
            return Err(crate::status::not_caught_up());
        }
        match self.view.node(&id.node_id) {
            Ok(Some(rec)) if rec.role == Role::Manager => Ok((id, Some(rec))),
            Ok(Some(_)) => Err(Status::permission_denied(format!("node {} is no longer a manager", id.node_id))),
            Ok(None) => Err(Status::permission_denied(format!("node {} is not a member of the cluster", id.node_id))),
            Err(e) => Err(crate::status::internal(e)),
        }
    }

    /// A current manager that raft counts as a member (voter or learner).
    /// Returns its raft ID (`None` during bootstrap, see [`Self::require_manager`]).
    pub fn require_raft_member<T>(&self, req: &Request<T>) -> Result<(PeerIdentity, Option<u64>), Status> {
        let (id, rec) = self.require_manager(req)?;
        let Some(rec) = rec else { return Ok((id, None)) };
        let member = rec.raft_id.filter(|r| {
            let m = self.raft.metrics();
            let m = m.borrow();
            let members = m.membership_config.membership();
            members.voter_ids().any(|v| v == *r) || members.learner_ids().any(|l| l == *r)
        });
        match member {
            Some(r) => Ok((id, Some(r))),
            None => Err(Status::permission_denied(format!("node {} is not a raft member", id.node_id))),
        }
    }

    /// Requires an administrator: the local control socket, a recorded and
    /// unrevoked admin certificate, or a current manager that is a raft member
    /// (managers forward to each other).
    pub fn require_admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let refuse = |s: Status| Status::new(s.code(), format!("control API: {}", s.message()));
        match Self::info(req).caller {
            Caller::Local => Ok(()),
            Caller::Anonymous => Err(Status::unauthenticated(
                "the control API requires the local socket or an administrator certificate",
            )),
            Caller::Node(ref peer) if peer.role == Role::Admin => {
                let id = self.node(req).map_err(refuse)?;
                match self.view.admin_cert(&id.serial) {
                    Ok(Some(rec)) if rec.revoked_at.is_none() && rec.id == id.node_id => Ok(()),
                    Ok(Some(rec)) if rec.revoked_at.is_some() => {
                        Err(Status::permission_denied(format!("control API: certificate {} was revoked", id.serial)))
                    }
                    Ok(_) => Err(Status::permission_denied(format!(
                        "control API: admin certificate {} is not known to this cluster",
                        id.serial
                    ))),
                    Err(e) => Err(crate::status::internal(e)),
                }
            }
            Caller::Node(_) => self.require_raft_member(req).map(|_| ()).map_err(refuse),
        }
    }
}

/// Which services' callers a [`Gate`] admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admits {
    /// A current manager that raft counts as a member (`Raft.*`).
    RaftMembers,
    /// A current manager (`Cluster.*`; `Propose` and forwarded joins check
    /// raft membership again in the handler).
    Managers,
    /// An administrator (`Control.*`).
    Admins,
    /// A node certificate, worker or manager (`Dispatcher.*`).
    Nodes,
}

/// Authorization in front of a whole service, run on the request's headers
/// before its body is read or decoded: a caller a service would refuse never
/// gets a byte of its request buffered. (Each handler still checks what is
/// specific to its RPC.)
#[derive(Clone, Debug)]
pub struct Gate {
    auth: Authorizer,
    admits: Admits,
}

impl Gate {
    /// A gate admitting `admits` by `auth`'s rules.
    pub fn new(auth: Authorizer, admits: Admits) -> Self {
        Self { auth, admits }
    }
}

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match self.admits {
            Admits::RaftMembers => self.auth.require_raft_member(&req).map(|_| ()),
            Admits::Managers => self.auth.require_manager(&req).and_then(|_| self.auth.require_leader()),
            // The control socket's caller is trusted as root is, and may ask
            // a manager that lost its leader what it knows (`secretctl info`).
            Admits::Admins if matches!(Authorizer::info(&req).caller, Caller::Local) => Ok(()),
            Admits::Admins => self.auth.require_admin(&req).and_then(|_| self.auth.require_leader()),
            Admits::Nodes => self.auth.require(&req, &[Role::Worker, Role::Manager]).map(|_| ()),
        }?;
        Ok(req)
    }
}
