//! `Dispatcher.IssueTaskIdentity`: a workload certificate for one of the
//! calling worker's own live tasks.
//!
//! Why a dispatcher RPC: the question it answers is the dispatcher's — is this
//! task assigned to this node, and should it run? — and the service admits
//! node certificates only, refusing anyone else before a byte of the request
//! is read (`auth::Gate`). The session stream carries only what managers push
//! down, and a CSR goes up; a heartbeat field would tie issuance to the
//! heartbeat period and grow every heartbeat. One RPC per issuance, its own
//! budget, no raft write: a renewal at 10,000 workers costs a signature, not
//! an entry in every manager's log.
//!
//! The policy ([`authorize`]) is a pure function of the task record and the
//! caller's certificate identity: the task must exist, be placed on the
//! caller, be desired running and not have ended. Every other request gets
//! the same PERMISSION_DENIED, whether the task is another node's, ended or
//! unknown (no oracle over other nodes' tasks), and nothing is issued.

use swarmd_certs::workload::{self, WorkloadId, MAX_CSR};
use swarmd_certs::{NodeId, Role, TaskId};
use swarmd_proto::dispatcher::{IssueTaskIdentityRequest, IssueTaskIdentityResponse};
use tonic::{Request, Response, Status};

use super::Dispatcher;
use crate::limits::Spend;
use crate::state::TaskRecord;

/// Why a task's identity is refused to a node.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No such task (it may have been deleted).
    Unknown,
    /// It is placed on another node.
    OtherNode,
    /// It should not run (stopped, its service removed, moved away).
    NotDesired,
    /// It has ended.
    Ended,
}

/// Whether `node` may have an identity for `task`.
pub(crate) fn authorize(task: Option<&TaskRecord>, node: &NodeId) -> Result<(), Refusal> {
    let t = task.ok_or(Refusal::Unknown)?;
    if t.node != *node {
        return Err(Refusal::OtherNode);
    }
    if !t.desired_running {
        return Err(Refusal::NotDesired);
    }
    if t.state.is_terminal() {
        return Err(Refusal::Ended);
    }
    Ok(())
}

impl Dispatcher {
    /// Worker certificate of a node in touch with the cluster. INVALID_ARGUMENT
    /// for a malformed task ID or CSR (over 16 KiB, not ECDSA P-256, a
    /// signature that does not verify); PERMISSION_DENIED unless the task is a
    /// live task of the caller's (see [`authorize`]); RESOURCE_EXHAUSTED past
    /// the node's identity budget; UNAVAILABLE without a raft leader.
    pub(super) async fn issue_identity(
        &self,
        req: Request<IssueTaskIdentityRequest>,
    ) -> Result<Response<IssueTaskIdentityResponse>, Status> {
        let peer = self.0.auth.require(&req, &[Role::Worker])?;
        // A stale manager must not vouch for a task that moved meanwhile.
        self.0.auth.require_leader()?;
        let r = req.into_inner();
        if r.csr_pem.len() > MAX_CSR {
            return Err(Status::invalid_argument(format!("the CSR is larger than {} KiB", MAX_CSR / 1024)));
        }
        let task: TaskId = r.task_id.parse().map_err(crate::status::bad_id)?;
        self.0.limits.spend(&peer.node_id, Spend::Identities, 1.0)?;
        let view = self.0.store.view();
        let record = view.task(&task).map_err(crate::status::internal)?;
        if let Err(why) = authorize(record.as_ref(), &peer.node_id) {
            tracing::warn!(node.id = %peer.node_id, task.id = %task, ?why, "workload identity refused");
            return Err(Status::permission_denied(format!("task {task} is not a live task of node {}", peer.node_id)));
        }
        let record = record.expect("authorized");
        let service = view.service(&record.service).map_err(crate::status::internal)?.ok_or_else(|| {
            Status::permission_denied(format!("task {task} is not a live task of node {}", peer.node_id))
        })?;
        let ttl = view.identity_settings().map_err(crate::status::internal)?.ttl();
        let secrets = self.0.secrets.get()?;
        if secrets.external.is_some() {
            return Ok(Response::new(IssueTaskIdentityResponse { not_issued: true, ..Default::default() }));
        }
        let id = WorkloadId::new(secrets.ca.cluster_id().clone(), &service.name, task.clone())
            .map_err(crate::status::internal)?;
        let spiffe_id = id.spiffe_id();
        let signer = secrets.clone();
        let issued = self
            .0
            .work
            .sign(move || workload::sign_workload(&signer.ca, &r.csr_pem, &id, ttl))
            .await?
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(
            node.id = %peer.node_id, task.id = %task, spiffe.id = %spiffe_id, serial = %issued.serial,
            "workload identity issued"
        );
        Ok(Response::new(IssueTaskIdentityResponse {
            certificate_pem: issued.pem,
            // Both roots while a root rotation runs.
            bundle_pem: secrets.trust_pem.clone(),
            spiffe_id,
            not_after: issued.not_after,
            ttl_secs: ttl.duration().as_secs(),
            not_issued: false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::TaskState;

    fn task(node: &NodeId) -> TaskRecord {
        crate::state::tests::task(&crate::state::tests::service("web", 1), 1, node)
    }

    #[test]
    fn only_a_live_task_of_the_caller_gets_an_identity() {
        let (me, other) = (NodeId::random(), NodeId::random());
        let mine = task(&me);
        assert_eq!(authorize(Some(&mine), &me), Ok(()));
        let running = TaskRecord { state: TaskState::Running, ..mine.clone() };
        assert_eq!(authorize(Some(&running), &me), Ok(()));
        assert_eq!(authorize(None, &me), Err(Refusal::Unknown));
        assert_eq!(authorize(Some(&mine), &other), Err(Refusal::OtherNode));
        let stopping = TaskRecord { desired_running: false, state: TaskState::Running, ..mine.clone() };
        assert_eq!(authorize(Some(&stopping), &me), Err(Refusal::NotDesired));
        for s in [TaskState::Complete, TaskState::Failed, TaskState::Shutdown, TaskState::Rejected] {
            let ended = TaskRecord { state: s, ..mine.clone() };
            assert_eq!(authorize(Some(&ended), &me), Err(Refusal::Ended), "{s}");
        }
    }
}
