//! The `Control` gRPC service behind secretctl.
//!
//! Served twice: on the unix control socket (callers are `Local`) and on the
//! mTLS port, where recorded, unrevoked admin certificates and the certificates
//! of current managers that are raft members are admitted. Worker certificates,
//! demoted managers and anonymous clients are refused on every RPC.

use swarmd_certs::{JoinToken, NodeId, Role};
use swarmd_proto::control::control_server::{self, ControlServer};
use swarmd_proto::control::{
    GetJoinTokenRequest, GetJoinTokenResponse, GetNodeRequest, InfoRequest, InfoResponse, ListNodesRequest,
    ListNodesResponse, Node, UpdateNodeRequest,
};
use tonic::{Request, Response, Status};

use crate::auth::Authorizer;
use crate::cluster::SecretsCache;
use crate::dispatcher::Dispatcher;
use crate::keys::{purpose, UnlockKey};
use crate::state::{AdminCertRecord, Command, NodeRecord, NodeStatus};
use crate::store::Peers;
use crate::store::Store;
use openraft::ChangeMembers;
use std::collections::BTreeSet;
use swarmd_proto::control::control_client::ControlClient;
use swarmd_proto::control::{
    AdminCertificate, ListAdminCertificatesRequest, ListAdminCertificatesResponse, RemoveNodeRequest,
    RemoveNodeResponse, RevokeAdminCertificateRequest,
};
use swarmd_proto::control::{
    CreateSecretRequest, GetSecretRequest, GetUnlockKeyRequest, GetUnlockKeyResponse, IssueAdminCertificateRequest,
    IssueAdminCertificateResponse, ListSecretsRequest, ListSecretsResponse, RemoveSecretResponse, RotateDataKeyRequest,
    RotateDataKeyResponse, Secret, UpdateClusterRequest, UpdateClusterResponse, UpdateSecretRequest,
    VerifySecretsRequest, VerifySecretsResponse,
};

use crate::secret_store;
use crate::service_api;
use crate::validate;
use swarmd_proto::control::{
    CreateServiceRequest, GetServiceRequest, ListServicesRequest, ListServicesResponse, LogLine, RemoveServiceResponse,
    Service, ServiceLogsRequest, ServiceLogsResponse, ServiceTasksResponse, UpdateServiceRequest,
};

/// The control API.
pub struct ControlService {
    store: Store,
    secrets: SecretsCache,
    dispatcher: Dispatcher,
    auth: Authorizer,
    peers: Peers,
    /// One data key rotation at a time.
    rotating: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl ControlService {
    /// The service, ready to mount; `peers` reaches the leader for membership changes.
    pub fn new(
        store: Store,
        secrets: SecretsCache,
        dispatcher: Dispatcher,
        auth: Authorizer,
        peers: Peers,
    ) -> ControlServer<Self> {
        ControlServer::new(Self { store, secrets, dispatcher, auth, peers, rotating: Default::default() })
    }

    fn reply(&self, id: &NodeId) -> Result<Response<Node>, Status> {
        let n = self.store.view().node(id).map_err(internal)?.ok_or_else(|| Status::not_found("node was removed"))?;
        Ok(Response::new(self.to_wire(n)))
    }

    /// A control client on the leader, or `None` if this manager leads.
    fn leader_client(&self) -> Result<Option<ControlClient<tonic::transport::Channel>>, Status> {
        let m = self.store.raft().metrics().borrow().clone();
        if m.current_leader == Some(m.id) {
            return Ok(None);
        }
        let addr =
            self.store.leader_addr().ok_or_else(|| Status::unavailable("no quorum: no raft leader right now"))?;
        Ok(Some(ControlClient::new(self.peers.channel(&addr))))
    }

    fn leader_raft_id(&self) -> Option<u64> {
        self.store.raft().metrics().borrow().current_leader
    }

    fn find(&self, key: &str) -> Result<NodeRecord, Status> {
        validate::find_node(self.store.view(), key)
    }

    fn to_wire(&self, n: NodeRecord) -> Node {
        let session = self.dispatcher.session(&n.id).unwrap_or_default();
        Node {
            id: n.id.to_string(),
            role: n.role.to_string(),
            status: n.status.to_string(),
            addr: n.addr,
            hostname: n.hostname,
            cert_serial: n.cert_serial,
            cert_not_after: n.cert_not_after,
            created_at: n.created_at,
            leader: n.raft_id.is_some() && self.leader_raft_id() == n.raft_id,
            raft_id: n.raft_id.unwrap_or(0),
            labels: n.labels.into_iter().collect(),
            availability: n.availability.to_string(),
            session_id: session.id,
            session_since: session.since,
            last_heartbeat: session.last_heartbeat,
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn admin_cert_to_wire(c: AdminCertRecord) -> AdminCertificate {
    AdminCertificate {
        serial: c.serial,
        id: c.id.to_string(),
        issued_at: c.issued_at,
        not_after: c.not_after,
        revoked: c.revoked_at.is_some(),
        revoked_at: c.revoked_at.unwrap_or(0),
    }
}

#[tonic::async_trait]
impl control_server::Control for ControlService {
    /// Administrator only. Prints the new secret; ALREADY_EXISTS for a taken
    /// name, INVALID_ARGUMENT for a bad name, size or label.
    async fn create_secret(&self, req: Request<CreateSecretRequest>) -> Result<Response<Secret>, Status> {
        self.auth.require_admin(&req)?;
        Ok(Response::new(secret_store::create(&self.store, &self.secrets, req.into_inner()).await?))
    }

    /// Administrator only. Adds a version.
    async fn update_secret(&self, req: Request<UpdateSecretRequest>) -> Result<Response<Secret>, Status> {
        self.auth.require_admin(&req)?;
        Ok(Response::new(secret_store::update(&self.store, &self.secrets, req.into_inner()).await?))
    }

    /// Administrator only. Metadata only.
    async fn list_secrets(&self, req: Request<ListSecretsRequest>) -> Result<Response<ListSecretsResponse>, Status> {
        self.auth.require_admin(&req)?;
        Ok(Response::new(ListSecretsResponse { secrets: secret_store::list(self.store.view(), req.get_ref())? }))
    }

    /// Administrator only. Metadata only.
    async fn get_secret(&self, req: Request<GetSecretRequest>) -> Result<Response<Secret>, Status> {
        self.auth.require_admin(&req)?;
        let r = secret_store::find(self.store.view(), &req.get_ref().name_or_id)?;
        Ok(Response::new(secret_store::to_wire(r)))
    }

    /// Administrator only.
    async fn remove_secret(&self, req: Request<GetSecretRequest>) -> Result<Response<RemoveSecretResponse>, Status> {
        self.auth.require_admin(&req)?;
        let id = secret_store::remove(&self.store, &req.get_ref().name_or_id).await?;
        Ok(Response::new(RemoveSecretResponse { id: id.to_string() }))
    }

    /// Administrator only. Runs on the leader (forwarded there).
    async fn rotate_data_key(
        &self,
        req: Request<RotateDataKeyRequest>,
    ) -> Result<Response<RotateDataKeyResponse>, Status> {
        self.auth.require_admin(&req)?;
        if let Some(mut leader) = self.leader_client()? {
            let mut fwd = Request::new(RotateDataKeyRequest {});
            fwd.set_timeout(std::time::Duration::from_secs(600));
            return leader.rotate_data_key(fwd).await;
        }
        let _one = self.rotating.try_lock().map_err(|_| Status::aborted("a data key rotation is already running"))?;
        let r = crate::rotation::rotate(&self.store, &self.secrets, &self.peers).await?;
        Ok(Response::new(RotateDataKeyResponse {
            key_id: r.key_id,
            resealed: r.resealed as u64,
            retired_below: r.retired_below,
        }))
    }

    /// Administrator only. FAILED_PRECONDITION while autolock is off.
    async fn get_unlock_key(
        &self,
        req: Request<GetUnlockKeyRequest>,
    ) -> Result<Response<GetUnlockKeyResponse>, Status> {
        self.auth.require_admin(&req)?;
        let record = self.secrets.record()?;
        let cid = record.id.to_string();
        let Some(sealed) = record.unlock_key else {
            return Err(Status::failed_precondition(
                "autolock is off: turn it on with secretctl cluster update --autolock=true",
            ));
        };
        let key = if req.get_ref().rotate {
            let fresh = UnlockKey::generate();
            let sealed = self.secrets.seal(&purpose::unlock_key(&cid), fresh.expose())?;
            self.store.propose(Command::SetAutolock { unlock_key: Some(sealed) }).await?;
            tracing::info!("unlock key rotated");
            fresh
        } else {
            let raw = self.secrets.open(&purpose::unlock_key(&cid), &sealed).map_err(internal)?;
            UnlockKey::from_bytes(&raw).ok_or_else(|| Status::internal("the stored unlock key is malformed"))?
        };
        Ok(Response::new(GetUnlockKeyResponse { key: key.text().to_string() }))
    }

    /// Administrator only. Turning autolock on returns the new unlock key.
    async fn update_cluster(
        &self,
        req: Request<UpdateClusterRequest>,
    ) -> Result<Response<UpdateClusterResponse>, Status> {
        self.auth.require_admin(&req)?;
        let record = self.secrets.record()?;
        let mut out = UpdateClusterResponse::default();
        match req.get_ref().autolock {
            None => {}
            Some(true) if record.unlock_key.is_some() => {}
            Some(true) => {
                let key = UnlockKey::generate();
                let sealed = self.secrets.seal(&purpose::unlock_key(record.id.as_str()), key.expose())?;
                self.store.propose(Command::SetAutolock { unlock_key: Some(sealed) }).await?;
                tracing::info!("autolock turned on");
                out.unlock_key = key.text().to_string();
            }
            Some(false) if record.unlock_key.is_some() => {
                self.store.propose(Command::SetAutolock { unlock_key: None }).await?;
                tracing::info!("autolock turned off");
            }
            Some(false) => {}
        }
        Ok(Response::new(out))
    }

    /// The control socket only: an admin certificate cannot mint more.
    async fn issue_admin_certificate(
        &self,
        req: Request<IssueAdminCertificateRequest>,
    ) -> Result<Response<IssueAdminCertificateResponse>, Status> {
        if !matches!(Authorizer::info(&req).caller, crate::auth::Caller::Local) {
            return Err(Status::permission_denied(
                "admin certificates are issued only through a manager's control socket",
            ));
        }
        let s = self.secrets.get()?;
        let r = req.get_ref();
        let validity = validate::validate_issue_admin_certificate(r, s.validity)?;
        let id = NodeId::random();
        let issued =
            s.ca.sign_node(&r.csr_pem, &id, Role::Admin, validity)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Recorded before it is handed out: an admin certificate the store does
        // not know is refused, and a recorded one can be revoked.
        let record = AdminCertRecord {
            serial: issued.serial.clone(),
            id: id.clone(),
            issued_at: crate::ca_service::now_unix(),
            not_after: issued.not_after,
            revoked_at: None,
        };
        self.store.propose(Command::RecordAdminCert(record)).await?;
        tracing::info!(admin.id = %id, serial = %issued.serial, not_after = issued.not_after, "admin certificate issued");
        Ok(Response::new(IssueAdminCertificateResponse {
            certificate_pem: issued.pem,
            ca_pem: s.ca.bundle_pem().to_owned(),
            id: id.to_string(),
            not_after: issued.not_after,
        }))
    }

    /// Administrator only. Expired certificates are left out.
    async fn list_admin_certificates(
        &self,
        req: Request<ListAdminCertificatesRequest>,
    ) -> Result<Response<ListAdminCertificatesResponse>, Status> {
        self.auth.require_admin(&req)?;
        let now = crate::ca_service::now_unix();
        let mut certificates: Vec<_> = self
            .store
            .view()
            .admin_certs()
            .map_err(internal)?
            .into_iter()
            .filter(|c| c.not_after > now)
            .map(admin_cert_to_wire)
            .collect();
        certificates.sort_by_key(|c| c.issued_at);
        Ok(Response::new(ListAdminCertificatesResponse { certificates }))
    }

    /// Administrator only. INVALID_ARGUMENT for a malformed serial,
    /// FAILED_PRECONDITION for an unknown one. Every manager refuses the
    /// certificate once it applies the revocation, and closes its connections.
    async fn revoke_admin_certificate(
        &self,
        req: Request<RevokeAdminCertificateRequest>,
    ) -> Result<Response<AdminCertificate>, Status> {
        self.auth.require_admin(&req)?;
        let serial = validate::validate_revoke_admin_certificate(req.get_ref())?;
        let at = crate::ca_service::now_unix();
        self.store.propose(Command::RevokeAdminCert { serial: serial.clone(), at }).await?;
        tracing::warn!(serial = %serial, "admin certificate revoked");
        let rec = self
            .store
            .view()
            .admin_cert(&serial)
            .map_err(internal)?
            .ok_or_else(|| Status::internal("the revoked certificate's record is gone"))?;
        Ok(Response::new(admin_cert_to_wire(rec)))
    }

    /// Administrator only.
    async fn create_service(&self, req: Request<CreateServiceRequest>) -> Result<Response<Service>, Status> {
        self.auth.require_admin(&req)?;
        Ok(Response::new(service_api::create(&self.store, req.into_inner()).await?))
    }

    /// Administrator only.
    async fn update_service(&self, req: Request<UpdateServiceRequest>) -> Result<Response<Service>, Status> {
        self.auth.require_admin(&req)?;
        Ok(Response::new(service_api::update(&self.store, req.into_inner()).await?))
    }

    /// Administrator only.
    async fn list_services(&self, req: Request<ListServicesRequest>) -> Result<Response<ListServicesResponse>, Status> {
        self.auth.require_admin(&req)?;
        let view = self.store.view();
        let running = service_api::running_counts(view);
        let mut services: Vec<Service> = view
            .services()
            .map_err(internal)?
            .into_iter()
            .map(|s| {
                let n = running.get(&s.id).copied().unwrap_or(0);
                service_api::to_wire(s, n)
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(ListServicesResponse { services }))
    }

    /// Administrator only.
    async fn get_service(&self, req: Request<GetServiceRequest>) -> Result<Response<Service>, Status> {
        self.auth.require_admin(&req)?;
        let s = service_api::find(self.store.view(), &req.get_ref().name_or_id)?;
        let n = service_api::running_counts(self.store.view()).get(&s.id).copied().unwrap_or(0);
        Ok(Response::new(service_api::to_wire(s, n)))
    }

    /// Administrator only. Its tasks are stopped.
    async fn remove_service(&self, req: Request<GetServiceRequest>) -> Result<Response<RemoveServiceResponse>, Status> {
        self.auth.require_admin(&req)?;
        let s = service_api::find(self.store.view(), &req.get_ref().name_or_id)?;
        self.store.propose(Command::RemoveService { id: s.id.clone() }).await?;
        tracing::info!(service.id = %s.id, service.name = %s.name, "service removed");
        Ok(Response::new(RemoveServiceResponse { id: s.id.to_string() }))
    }

    /// Administrator only.
    async fn service_tasks(&self, req: Request<GetServiceRequest>) -> Result<Response<ServiceTasksResponse>, Status> {
        self.auth.require_admin(&req)?;
        Ok(Response::new(ServiceTasksResponse {
            tasks: service_api::tasks(self.store.view(), &req.get_ref().name_or_id)?,
        }))
    }

    /// Administrator only. Gathers the output each manager holds for the
    /// sessions of the nodes running the service's tasks.
    async fn service_logs(&self, req: Request<ServiceLogsRequest>) -> Result<Response<ServiceLogsResponse>, Status> {
        self.auth.require_admin(&req)?;
        let view = self.store.view();
        let svc = service_api::find(view, &req.get_ref().name_or_id)?;
        let mut tasks: Vec<_> = view.tasks().map_err(internal)?.into_iter().filter(|t| t.service == svc.id).collect();
        tasks.sort_by_key(|t| (t.slot, t.created_at));
        let mut lines = Vec::new();
        for t in &tasks {
            for line in self.dispatcher.task_logs(&t.id) {
                lines.push(LogLine { task_id: t.id.to_string(), slot: t.slot, line });
            }
        }
        if !req.get_ref().local_only {
            let me = self.store.view().managers().map_err(internal)?;
            let my_addr = me.iter().find(|m| m.id == *self.dispatcher.me()).map(|m| m.addr.clone());
            for addr in view.manager_addrs().map_err(internal)?.into_iter().filter(|a| Some(a) != my_addr.as_ref()) {
                let mut c = ControlClient::new(self.peers.channel(&addr));
                let ask = ServiceLogsRequest { name_or_id: svc.id.to_string(), local_only: true };
                if let Ok(Ok(r)) = tokio::time::timeout(std::time::Duration::from_secs(2), c.service_logs(ask)).await {
                    lines.extend(r.into_inner().lines);
                }
            }
        }
        Ok(Response::new(ServiceLogsResponse { lines }))
    }

    /// Administrator only.
    async fn verify_secrets(
        &self,
        req: Request<VerifySecretsRequest>,
    ) -> Result<Response<VerifySecretsResponse>, Status> {
        self.auth.require_admin(&req)?;
        let store = self.store.view().clone();
        let secrets = self.secrets.clone();
        let checks = tokio::task::spawn_blocking(move || secret_store::verify(&store, &secrets))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(VerifySecretsResponse { checks }))
    }

    /// Administrator only (see module docs).
    async fn list_nodes(&self, req: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        self.auth.require_admin(&req)?;
        let nodes = self.store.view().nodes().map_err(internal)?;
        Ok(Response::new(ListNodesResponse { nodes: nodes.into_iter().map(|n| self.to_wire(n)).collect() }))
    }

    /// Administrator only. NOT_FOUND if no node matches; INVALID_ARGUMENT if a
    /// prefix matches several.
    async fn get_node(&self, req: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        self.auth.require_admin(&req)?;
        let n = self.find(&req.get_ref().id_or_prefix)?;
        Ok(Response::new(self.to_wire(n)))
    }

    /// Administrator only. NOT_FOUND / INVALID_ARGUMENT as `get_node`;
    /// INVALID_ARGUMENT for a bad availability or label key; UNAVAILABLE without quorum.
    async fn update_node(&self, req: Request<UpdateNodeRequest>) -> Result<Response<Node>, Status> {
        self.auth.require_admin(&req)?;
        let cmd = validate::validate_update_node(self.store.view(), req.get_ref())?;
        let Command::UpdateNode { node, .. } = &cmd else { unreachable!("validate_update_node makes an UpdateNode") };
        let id = node.clone();
        self.store.propose(cmd).await?;
        self.reply(&id)
    }

    /// Administrator only. FAILED_PRECONDITION if the node is already a manager.
    /// The worker turns itself into a manager when it next heartbeats.
    async fn promote_node(&self, req: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        self.auth.require_admin(&req)?;
        let n = validate::validate_promote(self.store.view(), &req.get_ref().id_or_prefix)?;
        self.store.propose(Command::SetRole { node: n.id.clone(), role: Role::Manager }).await?;
        tracing::info!(node.id = %n.id, "node promoted to manager");
        self.reply(&n.id)
    }

    /// Administrator only; runs on the leader (forwarded). FAILED_PRECONDITION
    /// for a worker, the last manager, or when the managers left would not
    /// have a reachable majority.
    async fn demote_node(&self, req: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        self.auth.require_admin(&req)?;
        let n = validate::validate_demote(self.store.view(), &req.get_ref().id_or_prefix)?;
        if let Some(mut leader) = self.leader_client()? {
            return leader.demote_node(GetNodeRequest { id_or_prefix: n.id.to_string() }).await;
        }
        let raft = self.store.raft();
        let voters: BTreeSet<u64> = raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        if let Some(rid) = n.raft_id.filter(|r| voters.contains(r)) {
            let remaining: Vec<u64> = voters.iter().copied().filter(|v| *v != rid).collect();
            if remaining.is_empty() {
                return Err(Status::failed_precondition("cannot demote the last manager"));
            }
            let nodes = self.store.view().nodes().map_err(internal)?;
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
            self.store.propose(Command::SetRole { node: n.id.clone(), role: Role::Worker }).await?;
            let failed = |e| Status::unavailable(format!("membership change failed: {e}"));
            raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([rid])), true).await.map_err(failed)?;
            crate::membership::wait_replicated(raft, rid, std::time::Duration::from_secs(10)).await;
            raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([rid])), false).await.map_err(failed)?;
        } else {
            self.store.propose(Command::SetRole { node: n.id.clone(), role: Role::Worker }).await?;
        }
        tracing::info!(node.id = %n.id, "manager demoted to worker");
        self.reply(&n.id)
    }

    /// Administrator only. FAILED_PRECONDITION for a manager that is a raft
    /// member (demote it first) or a ready node without `force`. The node's
    /// certificate is refused from then on.
    async fn remove_node(&self, req: Request<RemoveNodeRequest>) -> Result<Response<RemoveNodeResponse>, Status> {
        self.auth.require_admin(&req)?;
        let members: BTreeSet<u64> = {
            let m = self.store.raft().metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            membership.voter_ids().chain(membership.learner_ids()).collect()
        };
        let n = validate::validate_remove_node(self.store.view(), req.get_ref(), &members)?;
        let deny_until = crate::membership::deny_until(&n, &self.secrets)?;
        self.store.propose(Command::RemoveNodes { nodes: vec![n.id.clone()], deny_until }).await?;
        tracing::info!(node.id = %n.id, "node removed");
        Ok(Response::new(RemoveNodeResponse { id: n.id.to_string() }))
    }

    /// Administrator only. This manager's view of raft and a digest of its state.
    async fn info(&self, req: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        self.auth.require_admin(&req)?;
        let m = self.store.raft().metrics().borrow().clone();
        let me = self.store.view().managers().map_err(internal)?.into_iter().find(|n| n.raft_id == Some(m.id));
        let secrets = self.secrets.get().ok();
        Ok(Response::new(InfoResponse {
            node_id: me.map(|n| n.id.to_string()).unwrap_or_default(),
            cluster_id: secrets.map(|s| s.ca.cluster_id().to_string()).unwrap_or_default(),
            raft_id: format!("{:016x}", m.id),
            leader_raft_id: m.current_leader.map(|l| format!("{l:016x}")).unwrap_or_default(),
            term: m.current_term,
            last_applied: m.last_applied.map_or(0, |l| l.index),
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            voters: m.membership_config.membership().voter_ids().map(|v| format!("{v:016x}")).collect(),
            state_digest: self.store.view().digest().map_err(internal)?,
            state: format!("{:?}", m.state),
        }))
    }

    /// Administrator only. INVALID_ARGUMENT for an unknown role; with `rotate`,
    /// UNAVAILABLE when no raft leader can take the write.
    async fn get_join_token(
        &self,
        req: Request<GetJoinTokenRequest>,
    ) -> Result<Response<GetJoinTokenResponse>, Status> {
        self.auth.require_admin(&req)?;
        let role = validate::validate_get_join_token(req.get_ref())?;
        if req.get_ref().rotate {
            let secrets = self.secrets.get()?;
            let fresh = JoinToken::generate(secrets.ca.digest());
            let cluster = secrets.ca.cluster_id().to_string();
            let sealed = self.secrets.seal(&purpose::join_token(&cluster, role), fresh.expose().as_bytes())?;
            self.store.propose(Command::RotateJoinToken { role, token: sealed }).await?;
            self.secrets.reload()?;
            tracing::info!(%role, "join token rotated");
        }
        let secrets = self.secrets.get()?;
        let token = secrets.token(role).ok_or_else(|| Status::invalid_argument("there is no admin join token"))?;
        Ok(Response::new(GetJoinTokenResponse { token: token.expose().to_string() }))
    }
}
