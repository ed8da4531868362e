//! The `Control` gRPC service behind secretctl.
//!
//! Served on the unix control socket (callers are `Local`) and on the mTLS
//! port, where recorded, unrevoked admin certificates and the certificates of
//! current managers that are raft members are admitted. Worker certificates,
//! demoted managers and anonymous clients are refused on every RPC — by one
//! gate in front of the whole service ([`ControlService::new`]), not by each
//! handler. One file per resource: secrets, services, nodes, cluster, admin
//! certificates.

use swarmd_certs::NodeId;
use swarmd_proto::control::control_server::{self, ControlServer};
use swarmd_proto::control::{
    CaInfo, GetCaRequest, GetJoinTokenRequest, GetJoinTokenResponse, GetNodeRequest, InfoRequest, InfoResponse,
    ListNodesRequest, ListNodesResponse, Node, RotateCaRequest, UpdateNodeRequest,
};
use tonic::{Request, Response, Status};

use crate::auth::{Admits, Authorizer, Gate};
use crate::cluster::SecretsCache;
use crate::dispatcher::Dispatcher;
use crate::state::NodeRecord;
use crate::store::Peers;
use crate::store::Store;
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
use tonic::service::interceptor::InterceptedService;

use crate::validate;
use swarmd_proto::control::{
    CreateServiceRequest, GetServiceRequest, ListServicesRequest, ListServicesResponse, RemoveServiceResponse, Service,
    ServiceLogsRequest, ServiceLogsResponse, ServiceTasksResponse, UpdateServiceRequest,
};

mod admin_certs;
mod cluster;
mod images;
mod nodes;
mod secrets;
mod services;

/// The control API.
pub struct ControlService {
    store: Store,
    secrets: SecretsCache,
    dispatcher: Dispatcher,
    peers: Peers,
    images: crate::images::Images,
    /// One data key rotation at a time.
    rotating: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl ControlService {
    /// The service, ready to mount on every server that serves it: behind
    /// the admin gate ([`Gate`] with [`Admits::Admins`]), which runs on every
    /// RPC's headers before its body is read. There is no other constructor,
    /// so no server can mount the control API without it. `peers` reaches the
    /// leader for membership changes.
    pub fn new(
        store: Store,
        secrets: SecretsCache,
        dispatcher: Dispatcher,
        auth: Authorizer,
        peers: Peers,
        images: crate::images::Images,
    ) -> InterceptedService<ControlServer<Self>, Gate> {
        let gate = Gate::new(auth, Admits::Admins);
        let service = Self { store, secrets, dispatcher, peers, images, rotating: Default::default() };
        // An image load's header carries a manifest and a config of up to 4 MiB each.
        let server = ControlServer::new(service).max_decoding_message_size(10 << 20);
        InterceptedService::new(server, gate)
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
        let addr = self.store.leader_addr().ok_or_else(crate::status::no_leader)?;
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

use crate::status::internal;

// Authorization is not here: the service is only ever mounted behind the
// admin gate (see `ControlService::new`), so a new RPC cannot forget it.
#[tonic::async_trait]
impl control_server::Control for ControlService {
    async fn create_secret(&self, req: Request<CreateSecretRequest>) -> Result<Response<Secret>, Status> {
        secrets::create_secret(self, req).await
    }

    async fn update_secret(&self, req: Request<UpdateSecretRequest>) -> Result<Response<Secret>, Status> {
        secrets::update_secret(self, req).await
    }

    async fn list_secrets(&self, req: Request<ListSecretsRequest>) -> Result<Response<ListSecretsResponse>, Status> {
        secrets::list_secrets(self, req).await
    }

    async fn get_secret(&self, req: Request<GetSecretRequest>) -> Result<Response<Secret>, Status> {
        secrets::get_secret(self, req).await
    }

    async fn remove_secret(&self, req: Request<GetSecretRequest>) -> Result<Response<RemoveSecretResponse>, Status> {
        secrets::remove_secret(self, req).await
    }

    async fn rotate_data_key(
        &self,
        req: Request<RotateDataKeyRequest>,
    ) -> Result<Response<RotateDataKeyResponse>, Status> {
        cluster::rotate_data_key(self, req).await
    }

    async fn get_unlock_key(
        &self,
        req: Request<GetUnlockKeyRequest>,
    ) -> Result<Response<GetUnlockKeyResponse>, Status> {
        cluster::get_unlock_key(self, req).await
    }

    async fn update_cluster(
        &self,
        req: Request<UpdateClusterRequest>,
    ) -> Result<Response<UpdateClusterResponse>, Status> {
        cluster::update_cluster(self, req).await
    }

    async fn issue_admin_certificate(
        &self,
        req: Request<IssueAdminCertificateRequest>,
    ) -> Result<Response<IssueAdminCertificateResponse>, Status> {
        admin_certs::issue_admin_certificate(self, req).await
    }

    async fn list_admin_certificates(
        &self,
        req: Request<ListAdminCertificatesRequest>,
    ) -> Result<Response<ListAdminCertificatesResponse>, Status> {
        admin_certs::list_admin_certificates(self, req).await
    }

    async fn revoke_admin_certificate(
        &self,
        req: Request<RevokeAdminCertificateRequest>,
    ) -> Result<Response<AdminCertificate>, Status> {
        admin_certs::revoke_admin_certificate(self, req).await
    }

    async fn create_service(&self, req: Request<CreateServiceRequest>) -> Result<Response<Service>, Status> {
        services::create_service(self, req).await
    }

    async fn update_service(&self, req: Request<UpdateServiceRequest>) -> Result<Response<Service>, Status> {
        services::update_service(self, req).await
    }

    async fn list_services(&self, req: Request<ListServicesRequest>) -> Result<Response<ListServicesResponse>, Status> {
        services::list_services(self, req).await
    }

    async fn get_service(&self, req: Request<GetServiceRequest>) -> Result<Response<Service>, Status> {
        services::get_service(self, req).await
    }

    async fn remove_service(&self, req: Request<GetServiceRequest>) -> Result<Response<RemoveServiceResponse>, Status> {
        services::remove_service(self, req).await
    }

    async fn service_tasks(&self, req: Request<GetServiceRequest>) -> Result<Response<ServiceTasksResponse>, Status> {
        services::service_tasks(self, req).await
    }

    async fn service_logs(&self, req: Request<ServiceLogsRequest>) -> Result<Response<ServiceLogsResponse>, Status> {
        services::service_logs(self, req).await
    }

    async fn verify_secrets(
        &self,
        req: Request<VerifySecretsRequest>,
    ) -> Result<Response<VerifySecretsResponse>, Status> {
        secrets::verify_secrets(self, req).await
    }

    async fn list_nodes(&self, req: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        nodes::list_nodes(self, req).await
    }

    async fn get_node(&self, req: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        nodes::get_node(self, req).await
    }

    async fn update_node(&self, req: Request<UpdateNodeRequest>) -> Result<Response<Node>, Status> {
        nodes::update_node(self, req).await
    }

    async fn promote_node(&self, req: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        nodes::promote_node(self, req).await
    }

    async fn demote_node(&self, req: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        nodes::demote_node(self, req).await
    }

    async fn remove_node(&self, req: Request<RemoveNodeRequest>) -> Result<Response<RemoveNodeResponse>, Status> {
        nodes::remove_node(self, req).await
    }

    async fn info(&self, req: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        cluster::info(self, req).await
    }

    async fn get_ca(&self, req: Request<GetCaRequest>) -> Result<Response<CaInfo>, Status> {
        cluster::get_ca(self, req).await
    }

    async fn rotate_ca(&self, req: Request<RotateCaRequest>) -> Result<Response<CaInfo>, Status> {
        cluster::rotate_ca(self, req).await
    }

    async fn load_image(
        &self,
        req: Request<tonic::Streaming<swarmd_proto::control::LoadImageChunk>>,
    ) -> Result<Response<swarmd_proto::control::Image>, Status> {
        images::load_image(self, req).await
    }

    async fn list_images(
        &self,
        req: Request<swarmd_proto::control::ListImagesRequest>,
    ) -> Result<Response<swarmd_proto::control::ListImagesResponse>, Status> {
        images::list_images(self, req).await
    }

    async fn get_image(
        &self,
        req: Request<swarmd_proto::control::GetImageRequest>,
    ) -> Result<Response<swarmd_proto::control::Image>, Status> {
        images::get_image(self, req).await
    }

    async fn remove_image(
        &self,
        req: Request<swarmd_proto::control::GetImageRequest>,
    ) -> Result<Response<swarmd_proto::control::RemoveImageResponse>, Status> {
        images::remove_image(self, req).await
    }

    async fn pull_image(
        &self,
        req: Request<swarmd_proto::control::PullImageRequest>,
    ) -> Result<Response<swarmd_proto::control::Image>, Status> {
        images::pull_image(self, req).await
    }

    async fn add_trust_key(
        &self,
        req: Request<swarmd_proto::control::AddTrustKeyRequest>,
    ) -> Result<Response<swarmd_proto::control::TrustKey>, Status> {
        images::add_trust_key(self, req).await
    }

    async fn list_trust_keys(
        &self,
        req: Request<swarmd_proto::control::ListTrustKeysRequest>,
    ) -> Result<Response<swarmd_proto::control::ListTrustKeysResponse>, Status> {
        images::list_trust_keys(self, req).await
    }

    async fn remove_trust_key(
        &self,
        req: Request<swarmd_proto::control::RemoveTrustKeyRequest>,
    ) -> Result<Response<swarmd_proto::control::TrustKey>, Status> {
        images::remove_trust_key(self, req).await
    }

    async fn add_image_signature(
        &self,
        req: Request<swarmd_proto::control::AddImageSignatureRequest>,
    ) -> Result<Response<swarmd_proto::control::Image>, Status> {
        images::add_image_signature(self, req).await
    }

    async fn get_join_token(
        &self,
        req: Request<GetJoinTokenRequest>,
    ) -> Result<Response<GetJoinTokenResponse>, Status> {
        cluster::get_join_token(self, req).await
    }
}
