//! The `Ca` gRPC service: root CA download, joining, renewal.

use swarmd_certs::{IssuedCert, JoinToken, NodeId, Role};
use swarmd_proto::ca::ca_server::{self, CaServer};
use swarmd_proto::ca::{
    GetRecoveryNonceRequest, GetRecoveryNonceResponse, GetRootCaRequest, GetRootCaResponse,
    IssueNodeCertificateRequest, IssueNodeCertificateResponse, RecoverNodeCertificateRequest,
    RecoverNodeCertificateResponse, RenewNodeCertificateRequest, RenewNodeCertificateResponse,
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
    /// Authenticates this manager's recovery nonces (never leaves memory).
    nonces: std::sync::Arc<ring::hmac::Key>,
}

/// How long a recovery nonce is good for.
const NONCE_LIFE: i64 = 60;

/// A recovery nonce: the time it was made, random bytes, and this manager's
/// MAC over both (so it needs no state and cannot be made up).
fn make_nonce(key: &ring::hmac::Key, now: i64) -> Vec<u8> {
    let mut n = now.to_be_bytes().to_vec();
    let mut r = [0u8; 16];
    swarmd_certs::random_bytes(&mut r);
    n.extend_from_slice(&r);
    let tag = ring::hmac::sign(key, &n);
    n.extend_from_slice(tag.as_ref());
    n
}

fn check_nonce(key: &ring::hmac::Key, nonce: &[u8], now: i64) -> Result<(), Status> {
    let stale = || Status::invalid_argument("the recovery nonce is invalid or older than a minute: ask for a new one");
    if nonce.len() != 8 + 16 + 32 {
        return Err(stale());
    }
    ring::hmac::verify(key, &nonce[..24], &nonce[24..]).map_err(|_| stale())?;
    let at = i64::from_be_bytes(nonce[..8].try_into().expect("8 bytes"));
    if !(0..=NONCE_LIFE).contains(&(now - at)) {
        return Err(stale());
    }
    Ok(())
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
            nonces: std::sync::Arc::new(
                ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
                    .expect("the system RNG works"),
            ),
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

    /// Checks and signs `csr` on the signing pool (see [`CaWork`]); also
    /// says which root rotation's root signed it, if one runs.
    async fn sign(&self, csr: String, node: &NodeId, role: Role) -> Result<(IssuedCert, Option<u64>), Status> {
        let s = self.secrets.get()?;
        let node = node.clone();
        let rotation = s.rotation;
        let issued = match &s.external {
            // Waiting on the network: no signing thread held meanwhile.
            Some(_) => s.sign_node(&csr, &node, role).await?,
            None => self
                .work
                .sign(move || s.ca.sign_node(&csr, &node, role, s.validity))
                .await?
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
        };
        Ok((issued, rotation))
    }
}

#[tonic::async_trait]
impl ca_server::Ca for CaService {
    /// Unauthenticated. Never fails while the cluster is initialised.
    async fn get_root_ca(&self, _req: Request<GetRootCaRequest>) -> Result<Response<GetRootCaResponse>, Status> {
        let cross_signed_pem = self
            .store
            .view()
            .previous_root()
            .map_err(crate::status::internal)?
            .map(|p| p.cross_signed_pem)
            .unwrap_or_default();
        Ok(Response::new(GetRootCaResponse {
            ca_bundle_pem: self.secrets.get()?.anchor_pem().to_owned(),
            cross_signed_pem,
        }))
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
        if !token.pins(secrets.anchor_pem()) {
            return Err(Status::permission_denied(
                "join token belongs to another cluster's CA, or to a root CA this cluster has rotated away from: \
                 get the current token with `secretctl join-token`",
            ));
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
        let (issued, rotation) = self.sign(req.csr_pem, &node_id, role).await?;
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
        if let Some(id) = rotation {
            self.store.propose(Command::CaConverged { node: node_id.clone(), id }).await?;
        }
        tracing::info!(node.id = %node_id, %role, "node joined");
        Ok(Response::new(IssueNodeCertificateResponse {
            node_id: node_id.to_string(),
            certificate_pem: issued.pem,
            ca_bundle_pem: secrets.trust_pem.clone(),
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
        let (issued, rotation) = self.sign(req.into_inner().csr_pem, &peer.node_id, record.role).await?;
        self.store
            .propose(Command::RecordCert {
                node: peer.node_id.clone(),
                serial: issued.serial.clone(),
                not_after: issued.not_after,
                role: record.role,
                at: now_unix(),
            })
            .await?;
        if let Some(id) = rotation {
            self.store.propose(Command::CaConverged { node: peer.node_id.clone(), id }).await?;
        }
        tracing::info!(node.id = %peer.node_id, serial = %issued.serial, "certificate renewed");
        let ca_bundle_pem = self.secrets.get()?.trust_pem.clone();
        Ok(Response::new(RenewNodeCertificateResponse { certificate_pem: issued.pem, ca_bundle_pem }))
    }

    /// Unauthenticated; a minute's nonce for [`Self::recover_node_certificate`].
    async fn get_recovery_nonce(
        &self,
        _req: Request<GetRecoveryNonceRequest>,
    ) -> Result<Response<GetRecoveryNonceResponse>, Status> {
        Ok(Response::new(GetRecoveryNonceResponse { nonce: make_nonce(&self.nonces, now_unix()) }))
    }

    /// Unauthenticated. INVALID_ARGUMENT for a malformed request, a stale
    /// nonce or a proof that does not verify; PERMISSION_DENIED (with the
    /// removal signal for a removed node) for a certificate that is not the
    /// node's latest, of another cluster or root, or past the recovery window;
    /// RESOURCE_EXHAUSTED past the join rate.
    #[tracing::instrument(skip_all, fields(remote))]
    async fn recover_node_certificate(
        &self,
        req: Request<RecoverNodeCertificateRequest>,
    ) -> Result<Response<RecoverNodeCertificateResponse>, Status> {
        let remote = Authorizer::info(&req).remote;
        tracing::Span::current().record("remote", tracing::field::debug(remote));
        let req = req.into_inner();
        let now = now_unix();
        check_nonce(&self.nonces, &req.nonce, now)?;
        if req.certificate_pem.len() > 16 * 1024 || req.signature.len() > 128 {
            return Err(Status::invalid_argument(
                "the recovery request is larger than a certificate chain and a signature",
            ));
        }
        // Anonymous: the join budget and the signing pool's admission come
        // before any chain is parsed or signature checked.
        if let Some(r) = remote {
            self.joins.spend(crate::conn::source_key(r.ip()))?;
        }
        let _working = self.work.admit(CaRequest::Join)?;
        // Roots that may have signed the old certificate: today's, and the one
        // the last rotation replaced.
        let view = self.store.view();
        let secrets = self.secrets.get()?;
        let mut roots = secrets.trust_pem.clone();
        if let Some(p) = view.previous_root().map_err(crate::status::internal)? {
            roots.push_str(&p.cert_pem);
        }
        // At debug: anyone can ask, and a refusal must not cost a log line each.
        let refused = |why: String| {
            tracing::debug!(reason = %why, "certificate recovery refused");
            Status::permission_denied(why)
        };
        let (old, leaf) = swarmd_certs::recover::verify_chain_ignoring_expiry(&req.certificate_pem, &roots)
            .map_err(|e| refused(format!("the certificate to recover: {e}")))?;
        swarmd_certs::recover::verify_proof(
            &leaf,
            &swarmd_certs::recover::proof_message(&req.nonce, &req.csr_pem),
            &req.signature,
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // A good certificate of the current roots renews (within its node's
        // budget); recovery is for one that expired or whose root was rotated away.
        let current = || swarmd_certs::recover::verify_chain_ignoring_expiry(&req.certificate_pem, &secrets.trust_pem);
        if old.not_after > now && current().is_ok() {
            return Err(refused("the certificate is still valid: it renews, it is not recovered".into()));
        }
        if old.role == Role::Admin {
            return Err(refused("admin certificates are not recovered: issue a new one (secretctl admin-cert)".into()));
        }
        if old.cluster_id != *secrets.anchor.cluster_id() {
            return Err(refused("the certificate belongs to another cluster".into()));
        }
        if self.auth.is_removed(&old.node_id) {
            tracing::debug!(node.id = %old.node_id, "certificate recovery refused: the node was removed");
            return Err(crate::auth::removed_status(&old.node_id));
        }
        let record = self.store.member(&old.node_id)?;
        if record.cert_serial != old.serial {
            return Err(refused(format!("certificate {} is not node {}'s latest", old.serial, old.node_id)));
        }
        let window = view.cert_recovery_window().map_err(crate::status::internal)? as i64;
        if now > old.not_after.saturating_add(window) {
            return Err(refused(format!(
                "node {}'s certificate expired {}s ago, past the cluster's recovery window of {}s \
                 (secretctl cluster update --cert-recovery-window)",
                old.node_id,
                now - old.not_after,
                window
            )));
        }
        let (issued, rotation) = self.sign(req.csr_pem, &old.node_id, record.role).await?;
        self.store
            .propose(Command::RecordCert {
                node: old.node_id.clone(),
                serial: issued.serial.clone(),
                not_after: issued.not_after,
                role: record.role,
                at: now,
            })
            .await?;
        if let Some(id) = rotation {
            self.store.propose(Command::CaConverged { node: old.node_id.clone(), id }).await?;
        }
        tracing::info!(node.id = %old.node_id, role = %record.role, serial = %issued.serial, "certificate recovered");
        Ok(Response::new(RecoverNodeCertificateResponse {
            certificate_pem: issued.pem,
            ca_bundle_pem: self.secrets.get()?.trust_pem.clone(),
            managers: self.managers(),
            manager_ids: self.manager_ids(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_good_for_a_minute_on_the_manager_that_made_it() {
        let rng = ring::rand::SystemRandom::new();
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).unwrap();
        let n = make_nonce(&key, 1000);
        check_nonce(&key, &n, 1000).unwrap();
        check_nonce(&key, &n, 1060).unwrap();
        assert!(check_nonce(&key, &n, 1061).is_err());
        assert!(check_nonce(&key, &n, 999).is_err());
        let other = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).unwrap();
        assert!(check_nonce(&other, &n, 1000).is_err());
        let mut forged = n.clone();
        forged[..8].copy_from_slice(&2000i64.to_be_bytes());
        assert!(check_nonce(&key, &forged, 2000).is_err());
        assert!(check_nonce(&key, &n[..40], 1000).is_err());
    }
}
