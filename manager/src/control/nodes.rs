//! Control RPCs on nodes: list, get, update, promote, demote, remove.

use swarmd_certs::Role;
use swarmd_proto::control::{GetNodeRequest, ListNodesRequest, ListNodesResponse, Node, UpdateNodeRequest};
use tonic::{Request, Response, Status};

use crate::state::{Command, NodeStatus};
use openraft::ChangeMembers;
use std::collections::BTreeSet;
use swarmd_proto::control::{RemoveNodeRequest, RemoveNodeResponse};

use crate::validate;

use super::{internal, ControlService};

/// Administrator only (see module docs).
pub(super) async fn list_nodes(
    ctl: &ControlService,
    _req: Request<ListNodesRequest>,
) -> Result<Response<ListNodesResponse>, Status> {
    let nodes = ctl.store.view().nodes().map_err(internal)?;
    Ok(Response::new(ListNodesResponse { nodes: nodes.into_iter().map(|n| ctl.to_wire(n)).collect() }))
}

/// Administrator only. NOT_FOUND if no node matches; INVALID_ARGUMENT if a
/// prefix matches several.
pub(super) async fn get_node(ctl: &ControlService, req: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
    let n = ctl.find(&req.get_ref().id_or_prefix)?;
    Ok(Response::new(ctl.to_wire(n)))
}

/// Administrator only. NOT_FOUND / INVALID_ARGUMENT as `get_node`;
/// INVALID_ARGUMENT for a bad availability or label key; UNAVAILABLE without quorum.
pub(super) async fn update_node(
    ctl: &ControlService,
    req: Request<UpdateNodeRequest>,
) -> Result<Response<Node>, Status> {
    let cmd = validate::validate_update_node(ctl.store.view(), req.get_ref())?;
    let Command::UpdateNode { node, .. } = &cmd else { unreachable!("validate_update_node makes an UpdateNode") };
    let id = node.clone();
    ctl.store.propose(cmd).await?;
    ctl.reply(&id)
}

/// Administrator only. FAILED_PRECONDITION if the node is already a manager.
/// The worker turns itself into a manager when it next heartbeats.
pub(super) async fn promote_node(ctl: &ControlService, req: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
    let n = validate::validate_promote(ctl.store.view(), &req.get_ref().id_or_prefix)?;
    ctl.store.propose(Command::SetRole { node: n.id.clone(), role: Role::Manager }).await?;
    tracing::info!(node.id = %n.id, "node promoted to manager");
    ctl.reply(&n.id)
}

/// Administrator only; runs on the leader (forwarded). FAILED_PRECONDITION
/// for a worker, the last manager, or when the managers left would not
/// have a reachable majority.
pub(super) async fn demote_node(ctl: &ControlService, req: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
    let n = validate::validate_demote(ctl.store.view(), &req.get_ref().id_or_prefix)?;
    if let Some(mut leader) = ctl.leader_client()? {
        return leader.demote_node(GetNodeRequest { id_or_prefix: n.id.to_string() }).await;
    }
    let raft = ctl.store.raft();
    let voters: BTreeSet<u64> = raft.metrics().borrow().membership_config.membership().voter_ids().collect();
    if let Some(rid) = n.raft_id.filter(|r| voters.contains(r)) {
        let remaining: Vec<u64> = voters.iter().copied().filter(|v| *v != rid).collect();
        if remaining.is_empty() {
            return Err(Status::failed_precondition("cannot demote the last manager"));
        }
        let nodes = ctl.store.view().nodes().map_err(internal)?;
        let reachable = remaining
            .iter()
            .filter(|r| nodes.iter().any(|x| x.raft_id == Some(**r) && x.status == NodeStatus::Ready))
            .count();
        let need = remaining.len() / 2 + 1;
        if reachable < need {
            return Err(Status::failed_precondition(format!(
                "demoting {} would leave {} managers of which {reachable} are reachable, and {need} are needed for a quorum; bring managers back first",
                n.id,
                remaining.len()
            )));
        }
        // Record the role first, while the manager still receives the log:
        // this refuses its manager certificates at once, and it watches for
        // it. It stays a learner until it has seen that it is no voter any
        // more (then it leaves), and is removed from raft after that.
        ctl.store.propose(Command::SetRole { node: n.id.clone(), role: Role::Worker }).await?;
        let failed = |e| Status::unavailable(format!("membership change failed: {e}"));
        raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([rid])), true).await.map_err(failed)?;
        crate::membership::wait_replicated(raft, rid, std::time::Duration::from_secs(10)).await;
        raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([rid])), false).await.map_err(failed)?;
    } else {
        ctl.store.propose(Command::SetRole { node: n.id.clone(), role: Role::Worker }).await?;
    }
    tracing::info!(node.id = %n.id, "manager demoted to worker");
    ctl.reply(&n.id)
}

/// Administrator only. FAILED_PRECONDITION for a manager that is a raft
/// member (demote it first) or a ready node without `force`. The node's
/// certificate is refused from then on.
pub(super) async fn remove_node(
    ctl: &ControlService,
    req: Request<RemoveNodeRequest>,
) -> Result<Response<RemoveNodeResponse>, Status> {
    let members: BTreeSet<u64> = {
        let m = ctl.store.raft().metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        membership.voter_ids().chain(membership.learner_ids()).collect()
    };
    let n = validate::validate_remove_node(ctl.store.view(), req.get_ref(), &members)?;
    let deny_until = crate::membership::deny_until(&n, &ctl.secrets)?;
    ctl.store.propose(Command::RemoveNodes { nodes: vec![n.id.clone()], deny_until }).await?;
    tracing::info!(node.id = %n.id, "node removed");
    Ok(Response::new(RemoveNodeResponse { id: n.id.to_string() }))
}
