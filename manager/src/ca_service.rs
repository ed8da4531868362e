//! The `Ca` gRPC service: root CA download, joining, renewal.

use swarmd_certs::{IssuedCert, JoinToken, NodeId, Role};
use swarmd_proto::ca::ca_server::{self, CaServer};
use swarmd_proto::ca::{
    GetRootCaRequest, GetRootCaResponse, IssueNodeCertificateRequest, IssueNodeCertificateResponse,
    RenewNodeCertificateRequest, RenewNodeCertificateResponse,
};
use tonic::{Request, Response, Status};

use crate::auth::Authorizer;
use crate::cluster::SecretsCache;
use crate::limits::{CaRequest, CaWork, JoinLimits, NodeLimits, Spend};
use crate::state::{Command, NodeRecord, NodeStatus};
use crate::store::Store;

use swarmd_certs::now_unix;

/// Keeps a reported hostname printable and short.
pub(crate) fn clean_hostname(h: &str) -> String {
    h.chars().filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).take(64).collect()
}

/// The certificate authority service.
pub struct CaService {
    store: Store,
    secrets: SecretsCache,
    auth: Authorizer,
    limits: NodeLimits,
    joins: JoinLimits,
    work: CaWork,
    advertise: String,
}

impl CaService {
    /// The service, ready to mount; renewals spend the caller's `limits`.
    pub fn new(
        store: Store,
        secrets: SecretsCache,
        auth: Authorizer,
        limits: NodeLimits,
        advertise: String,
    ) -> CaServer<Self> {
        CaServer::new(Self {
            store,
            secrets,
            auth,
            limits,
            joins: JoinLimits::from_env(),
            work: CaWork::default(),
            advertise,
        })
        .max_decoding_message_size(crate::limits::MAX_CA_REQUEST)
    }

    fn manager_ids(&self) -> Vec<String> {
        let managers = self.store.view().managers().unwrap_or_default();
        managers.into_iter().filter(|m| m.raft_id.is_some()).map(|m| m.id.to_string()).collect()
    }

    fn managers(&self) -> Vec<String> {
        let mut v = self.store.view().manager_addrs().unwrap_or_default();
        if v.is_empty() {
            v.push(self.advertise.clone());
        }
        v
    }

    /// Checks and signs `csr` on the signing pool (see [`CaWork`]).
    async fn sign(&self, csr: String, node: &NodeId, role: Role) -> Result<IssuedCert, Status> {
        let s = self.secrets.get()?;
        let node = node.clone();
        self.work
            .sign(move || s.ca.sign_node(&csr, &node, role, s.validity))
            .await?
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }
}

#[tonic::async_trait]
impl ca_server::Ca for CaService {
    /// Unauthenticated. Never fails while the cluster is initialised.
    async fn get_root_ca(&self, _req: Request<GetRootCaRequest>) -> Result<Response<GetRootCaResponse>, Status> {
        Ok(Response::new(GetRootCaResponse { ca_bundle_pem: self.secrets.get()?.ca.bundle_pem().to_owned() }))
    }

    /// Unauthenticated. INVALID_ARGUMENT for a malformed token or CSR, or a
    /// token of the other role than the one asked for; PERMISSION_DENIED for a
    /// token of another CA, a wrong or rotated secret;
    /// UNAVAILABLE when no raft leader can take the write; RESOURCE_EXHAUSTED
    /// (with `retry-after-ms`) past the join rate (see [`JoinLimits`]).
    #[tracing::instrument(skip_all, fields(remote))]
    async fn issue_node_certificate(
        &self,
        req: Request<IssueNodeCertificateRequest>,
    ) -> Result<Response<IssueNodeCertificateResponse>, Status> {
        let remote = Authorizer::info(&req).remote;
        tracing::Span::current().record("remote", tracing::field::debug(remote));
        let req = req.into_inner();
        let token: JoinToken =
            req.token.parse().map_err(|e: swarmd_certs::TokenError| Status::invalid_argument(e.to_string()))?;
        let secrets = self.secrets.get()?;
        if !token.pins(secrets.ca.bundle_pem()) {
            return Err(Status::permission_denied("join token belongs to another cluster's CA"));
        }
        let role = if secrets.worker_token.ct_matches(&token) {
            Role::Worker
        } else if secrets.manager_token.ct_matches(&token) {
            Role::Manager
        } else {
            tracing::warn!("join refused: wrong or rotated token secret");
            return Err(Status::permission_denied("invalid join token: wrong secret, or the token was rotated"));
        };
        if !req.role.is_empty() && req.role != role.to_string() {
            return Err(Status::invalid_argument(format!(
                "this is a {role} join token; join with `swarmd {role} join`, or use the {} token",
                req.role
            )));
        }
        // Only a valid token spends the join budget: a stranger without one
        // must not make real joiners wait.
        if let Some(r) = remote {
            self.joins.spend(crate::conn::source_key(r.ip()))?;
        }
        let _working = self.work.admit(CaRequest::Join)?;
        let node_id = NodeId::random();
        let issued = self.sign(req.csr_pem, &node_id, role).await?;
        let record = NodeRecord {
            id: node_id.clone(),
            role,
            status: NodeStatus::Unknown,
            addr: remote.map(|a| a.ip().to_string()).unwrap_or_default(),
            hostname: clean_hostname(&req.hostname),
            cert_serial: issued.serial.clone(),
            cert_not_after: issued.not_after,
            created_at: now_unix(),
            raft_id: None,
            labels: Default::default(),
            availability: Default::default(),
            session_manager: None,
        };
        self.store.propose(Command::AddNode(record)).await?;
        tracing::info!(node.id = %node_id, %role, "node joined");
        Ok(Response::new(IssueNodeCertificateResponse {
            node_id: node_id.to_string(),
            certificate_pem: issued.pem,
            ca_bundle_pem: secrets.ca.bundle_pem().to_owned(),
            managers: self.managers(),
            manager_ids: self.manager_ids(),
        }))
    }

    /// Worker or manager certificate, for the node's current role.
    /// UNAVAILABLE if this manager does not know the node yet, or without a
    /// raft leader; INVALID_ARGUMENT for a bad CSR; RESOURCE_EXHAUSTED past the
    /// node's renewal budget.
    #[tracing::instrument(skip_all)]
    async fn renew_node_certificate(
        &self,
        req: Request<RenewNodeCertificateRequest>,
    ) -> Result<Response<RenewNodeCertificateResponse>, Status> {
        let peer = self.auth.require(&req, &[Role::Worker, Role::Manager])?;
        self.limits.spend(&peer.node_id, Spend::Renewals, 1.0)?;
        let _working = self.work.admit(CaRequest::Renewal)?;
        let record = self.store.member(&peer.node_id)?;
        let issued = self.sign(req.into_inner().csr_pem, &peer.node_id, record.role).await?;
        self.store
            .propose(Command::RecordCert {
                node: peer.node_id.clone(),
                serial: issued.serial.clone(),
                not_after: issued.not_after,
                role: record.role,
                at: now_unix(),
            })
            .await?;
        tracing::info!(node.id = %peer.node_id, serial = %issued.serial, "certificate renewed");
        Ok(Response::new(RenewNodeCertificateResponse { certificate_pem: issued.pem }))
    }
}
